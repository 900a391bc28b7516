"""SO / DSO / SRIP against their literal formulas and autograd gradients (float64)."""

import math
import re
import warnings

import pytest
import torch
from torch import nn

from _helpers import REL_TOL, rel_err
from dynrank.linear import FusedLowRankLinear
from dynrank.regularizers import (SRIP, DoubleSoftOrthogonality, OrthogonalityRegularizer, SoftOrthogonality,
                                  dso_penalty, gram_small, regularized_tensors, so_penalty, srip_penalty)

TOL64 = REL_TOL[torch.float64]
SHAPES = [(17, 5), (5, 17), (8, 8), (6, 3, 3, 3), (1, 9)]


def as_matrix(W):
    return W.reshape(W.shape[0], math.prod(W.shape[1:]))


def direct_so_literal(W):
    """‖WᵀW − I_n‖²_F exactly as written (n = columns), whatever the shape."""
    M = as_matrix(W)
    return ((M.t() @ M - torch.eye(M.shape[1], dtype=M.dtype)) ** 2).sum()


def direct_so_rows(W):
    M = as_matrix(W)
    return ((M @ M.t() - torch.eye(M.shape[0], dtype=M.dtype)) ** 2).sum()


def grad_of(fn, W):
    W = W.detach().clone().requires_grad_(True)
    value = fn(W)
    (g,) = torch.autograd.grad(value, W)
    return value.detach(), g


def with_sigma(m, n, sigma):
    g = torch.Generator().manual_seed(7 * m + n)
    U = torch.linalg.qr(torch.randn(m, len(sigma), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64)).Q
    return (U * torch.tensor(sigma, dtype=torch.float64)) @ V.t()


@pytest.mark.parametrize("shape", SHAPES)
def test_so_value_and_gradient(shape):
    W = torch.randn(*shape, dtype=torch.float64) * 0.4
    m, n = as_matrix(W).shape
    value, grad = grad_of(so_penalty, W)
    smaller = direct_so_literal if m >= n else direct_so_rows
    assert rel_err(value, smaller(W)) < TOL64
    # The literal ‖WᵀW − I‖² differs by the constant max(0, n − m): same gradient.
    lit_value, lit_grad = grad_of(direct_so_literal, W)
    assert rel_err(value + max(0, n - m), lit_value) < TOL64
    assert rel_err(grad, lit_grad) < TOL64
    assert grad.abs().max() > 0


@pytest.mark.parametrize("shape", SHAPES)
def test_dso_value_and_gradient(shape):
    W = torch.randn(*shape, dtype=torch.float64) * 0.4
    value, grad = grad_of(dso_penalty, W)
    ref_value, ref_grad = grad_of(lambda w: direct_so_literal(w) + direct_so_rows(w), W)
    assert rel_err(value, ref_value) < TOL64
    assert rel_err(grad, ref_grad) < TOL64


@pytest.mark.parametrize("m,n", [(17, 5), (5, 17), (9, 9)])
def test_srip_value_and_gradient(m, n):
    p = min(m, n)
    # |σ² − 1| well separated (2.0 vs 0.96 at most), so power iteration converges fast.
    sigma = [3.0 ** 0.5] + list(torch.linspace(0.2, 1.4, p - 1).tolist())
    W = with_sigma(m, n, sigma)

    def direct(w):
        M = as_matrix(w)
        G = M.t() @ M if m >= n else M @ M.t()
        return torch.linalg.matrix_norm(G - torch.eye(p, dtype=w.dtype), ord=2)

    ref_value, ref_grad = grad_of(direct, W)
    assert float(ref_value) == pytest.approx(2.0, rel=1e-12)
    for iters in (200, None):
        value, grad = grad_of(lambda w: srip_penalty(w, n_power_iterations=iters), W)
        assert rel_err(value, ref_value) < TOL64
        assert rel_err(grad, ref_grad) < 1e-10


def test_srip_under_another_default_device():
    """The default start vector is drawn on the CPU generator's device: under torch.set_default_device("cuda")
    (here "meta") it was drawn on the default device, which refused the CPU generator or gave no values."""
    W = with_sigma(6, 4, [1.5, 1.2, 0.9, 0.5])
    ref = srip_penalty(W, n_power_iterations=50)
    model = nn.Sequential(nn.Linear(4, 6, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight.copy_(W)
    ref_model = SRIP(1.0)(model)
    with torch.device("meta"):                # as torch.set_default_device("meta"), undone on exit
        value = srip_penalty(W, n_power_iterations=50)
        value_model = SRIP(1.0)(model)
    assert value.device.type == "cpu" and float(value) == float(ref)
    assert float(value_model) == float(ref_model)


def test_srip_larger_side_would_be_pinned_at_one():
    W = with_sigma(4, 12, [1.2, 1.1, 0.9, 0.95])                       # wide: WᵀW is 12 × 12
    big = torch.linalg.matrix_norm(W.t() @ W - torch.eye(12, dtype=W.dtype), ord=2)
    assert float(big) == pytest.approx(1.0, rel=1e-12)                 # the zero eigenvalues dominate
    assert float(srip_penalty(W, n_power_iterations=None)) == pytest.approx(1.2 ** 2 - 1, rel=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
def test_exact_srip_checks_its_start_and_returns_the_top_eigenvector(groups):
    """With n_power_iterations=None the start was never checked (a str or a wrong shape passed) and the
    vector came back None, where the docstring promises (value, v) with v a unit vector to start from."""
    torch.manual_seed(0)
    W = torch.randn(8, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="start must be a real tensor"):
        srip_penalty(W, n_power_iterations=None, start="abc", groups=groups)
    with pytest.raises(ValueError, match="start must be a tensor of shape"):
        srip_penalty(W, n_power_iterations=None, start=torch.ones(99, dtype=torch.float64), groups=groups)
    value, v = srip_penalty(W, n_power_iterations=None, return_vector=True, groups=groups)
    blocks = W.reshape(groups, 8 // groups, 5)
    p = min(8 // groups, 5)
    assert v.shape == ((p,) if groups == 1 else (groups, p))
    # Reference in float64 numpy: M = WᵀW − I (or WWᵀ − I, the smaller side) per block.
    import numpy as np
    best = 0.0
    for b, vec in zip(blocks.numpy(), v.reshape(groups, p).numpy()):
        M = (b.T @ b if b.shape[1] <= b.shape[0] else b @ b.T) - np.eye(p)
        w, vectors = np.linalg.eigh(M)
        k = np.abs(w).argmax()
        assert abs(abs(vec @ vectors[:, k]) - 1) < 1e-12
        best = max(best, abs(w[k]))
    assert float(value) == pytest.approx(best, rel=1e-12)
    # The vector is the limit power iteration reaches from it: a warm start gives the same value.
    warm = srip_penalty(W, n_power_iterations=1, start=v, groups=groups)
    assert float(warm) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_zero_on_orthogonal(shape):
    M = torch.randn(*shape, dtype=torch.float64)
    flat = as_matrix(M)
    tall = flat.shape[0] >= flat.shape[1]
    Q = torch.linalg.qr(flat if tall else flat.t()).Q
    W = (Q if tall else Q.t()).reshape(shape)
    m, n = flat.shape
    assert float(so_penalty(W)) < 1e-26
    assert float(srip_penalty(W, n_power_iterations=5)) < 1e-13
    assert float(dso_penalty(W)) == pytest.approx(abs(m - n), abs=1e-13)   # 0 iff square
    assert float(so_penalty(W * 1.1)) > 1e-3                           # and not zero otherwise


def test_gram_on_smaller_side_and_half_precision():
    assert gram_small(torch.randn(10, 3)).shape == (3, 3)
    assert gram_small(torch.randn(3, 10)).shape == (3, 3)
    assert gram_small(torch.randn(4, 2, 3, 3)).shape == (4, 4)
    W = torch.randn(12, 5, dtype=torch.float64)
    half = so_penalty(W.to(torch.bfloat16))
    assert half.dtype == torch.float32
    assert rel_err(half, direct_so_literal(W.to(torch.bfloat16).double())) < REL_TOL[torch.float32]


def _model():
    torch.manual_seed(3)
    return nn.Sequential(FusedLowRankLinear(12, 20, 4, alpha=8.0), nn.ReLU(), FusedLowRankLinear(20, 20, 5),
                         nn.Conv2d(3, 6, 3), nn.Linear(20, 7), nn.BatchNorm1d(7))


@pytest.mark.parametrize("kind,fn", [("so", so_penalty), ("dso", dso_penalty),
                                     ("srip", lambda w: srip_penalty(w, n_power_iterations=None))])
def test_model_regularizer_every_form(kind, fn):
    model = _model().double()
    model[2].inflate()
    with torch.no_grad():
        model[2].weight.add_(0.1 * torch.randn_like(model[2].weight))
    model[2].deflate(init="random")                                      # adapter: W_f frozen
    model[0].inflate()                                                   # full
    expected_names = ["0.weight", "2.A", "2.B", "3.weight", "4.weight"]
    got = regularized_tensors(model)
    assert sorted(n for n, _ in got) == sorted(expected_names)
    reg = OrthogonalityRegularizer(0.25, kind=kind, n_power_iterations=300)
    value = reg(model)
    params = dict(model.named_parameters())
    ref = 0.25 * sum(fn(params[n]) for n in expected_names)
    assert rel_err(value, ref) < 1e-10
    value.backward()
    assert model[2].weight.grad is None and model[0].bias.grad is None
    assert all(params[n].grad is not None and params[n].grad.abs().max() > 0 for n in expected_names)


def test_lowrank_form_regularizes_factors_only():
    model = _model()
    names = [n for n, _ in regularized_tensors(model, exclude=["3", "4"])]
    assert names == ["0.A", "0.B", "2.A", "2.B"]
    params = dict(model.named_parameters())
    value = SoftOrthogonality(1e-2, exclude=["3", "4"])(model)
    ref = 1e-2 * sum(so_penalty(params[n]) for n in names)
    assert rel_err(value, ref) < REL_TOL[torch.float32]
    dso = DoubleSoftOrthogonality(1e-2, exclude=["3", "4"])(model)
    assert rel_err(dso, 1e-2 * sum(dso_penalty(params[n]) for n in names)) < REL_TOL[torch.float32]


def test_srip_warm_start_converges_across_calls():
    model = nn.Sequential(nn.Linear(9, 14, bias=False).double())
    with torch.no_grad():
        model[0].weight.copy_(with_sigma(14, 9, [2.0, 1.5, 1.3, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5]))
    reg = SRIP(1.0, n_power_iterations=1)
    exact = srip_penalty(model[0].weight, n_power_iterations=None)
    values = [float(reg(model).detach()) for _ in range(80)]
    assert values[-1] == pytest.approx(float(exact.detach()), rel=1e-12)
    assert "0.weight" in reg._vectors


def test_exclude_is_a_name_or_names():
    """A str is one module name, never split into characters (module "10" vs modules "1" and "0")."""
    torch.manual_seed(5)
    model = nn.Sequential(*[nn.Linear(4 + i % 3, 4 + (i + 1) % 3, bias=False) for i in range(11)]).double()
    params = dict(model.named_parameters())
    kept = [f"{i}.weight" for i in range(10)]                             # all but module "10"
    for cls, fn in ((SoftOrthogonality, so_penalty), (DoubleSoftOrthogonality, dso_penalty)):
        reg = cls(0.5, exclude="10")
        assert reg.exclude == ("10",)
        assert rel_err(reg(model), 0.5 * sum(fn(params[n]) for n in kept)) < TOL64
        assert rel_err(cls(0.5, exclude=["10"])(model), reg(model)) < TOL64
    assert [n for n, _ in regularized_tensors(model, exclude="10")] == kept
    assert SRIP(1.0, exclude=None).exclude == () and SRIP(1.0, exclude=("1", "2")).exclude == ("1", "2")
    with pytest.raises(TypeError, match=r"exclude must be a module name \(str\) or an iterable of module names, "
                                        r"got int \(3\)"):
        SRIP(1.0, exclude=3)
    with pytest.raises(TypeError, match=r"exclude must hold module names \(str\), got 3 \(int\)"):
        regularized_tensors(model, exclude=["1", 3])



def test_exclude_names_a_block_and_refuses_a_name_that_skips_nothing():
    """A block's name was accepted and skipped nothing (the penalty was the same with and without it)."""
    torch.manual_seed(2)
    model = nn.Sequential()
    model.features = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 4, bias=False))
    model.head = nn.Linear(4, 3, bias=False)
    model.double()
    params = dict(model.named_parameters())
    assert [n for n, _ in regularized_tensors(model, exclude="features")] == ["head.weight"]
    assert [n for n, _ in regularized_tensors(model, exclude=["features.2", "head"])] == ["features.0.weight"]
    value = SoftOrthogonality(0.5, exclude="features")(model)
    assert rel_err(value, 0.5 * so_penalty(params["head.weight"])) < TOL64
    assert regularized_tensors(model, exclude="") == []                  # the root holds every layer
    with pytest.raises(ValueError, match=re.escape("exclude names ['features.1'] hold no layer the regularizers "
                                                   "act on (Linear/Conv weights, dynrank layers; the model's are: "
                                                   "'features.0', 'features.2', 'head')")):
        regularized_tensors(model, exclude=["features.1", "head"])
    with pytest.raises(ValueError, match=re.escape("exclude names ['feature'] are not modules of the model")):
        SoftOrthogonality(0.5, exclude="feature")(model)

@pytest.mark.parametrize("coef", [math.nan, math.inf, -math.inf, -1.0])
def test_coef_must_be_finite_and_non_negative(coef):
    for make in (SoftOrthogonality, DoubleSoftOrthogonality, SRIP, lambda c: OrthogonalityRegularizer(c, "so")):
        with pytest.raises(ValueError, match=f"^coef must be a finite number >= 0, got {coef}$"):
            make(coef)
    with pytest.raises(TypeError, match=r"coef must be a finite number >= 0, got str \('1e-4'\)"):
        SRIP("1e-4")
    assert SoftOrthogonality(0).coef == 0.0


def _exact_srip(W):
    """σmax(G − I) of the smaller-side Gram, from torch.linalg in float64."""
    M = as_matrix(W).double()
    G = M.t() @ M if M.shape[0] >= M.shape[1] else M @ M.t()
    return float(torch.linalg.matrix_norm(G - torch.eye(G.shape[0], dtype=G.dtype), ord=2))


@pytest.mark.parametrize("start", ["zeros", "nan", "inf"])
def test_srip_degenerate_start_falls_back_to_the_default(start):
    W = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fill = {"zeros": 0.0, "nan": math.nan, "inf": math.inf}[start]
    value, v = srip_penalty(W, 300, start=torch.full((5,), fill, dtype=torch.float64), return_vector=True)
    assert float(value) == pytest.approx(_exact_srip(W), rel=1e-12)
    assert float(torch.linalg.vector_norm(v)) == pytest.approx(1.0, rel=1e-12)
    assert float(value) == float(srip_penalty(W, 300))                 # exactly the default start
    assert float(srip_penalty(W.float(), 5, start=torch.zeros(5))) > 0.5 * _exact_srip(W)
    with pytest.raises(TypeError, match=r"start must be a real tensor of shape \(5,\), got list"):
        srip_penalty(W, start=[1.0] * 5)
    with pytest.raises(TypeError, match=r"start must be a real tensor of shape \(5,\), got a torch.complex128 tensor"):
        srip_penalty(W, start=torch.ones(5, dtype=torch.complex128))


def test_srip_warm_start_survives_an_orthogonal_weight():
    """M = 0 (orthogonal W) used to turn the stored iterate into zeros, and every later call returned 0."""
    model = nn.Sequential(nn.Linear(5, 5, bias=False).double())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(5, dtype=torch.float64))
    reg = SRIP(1.0, n_power_iterations=1)
    assert float(reg(model).detach()) == 0.0
    assert float(torch.linalg.vector_norm(reg._vectors["0.weight"])) == pytest.approx(1.0, rel=1e-12)
    with torch.no_grad():
        model[0].weight.copy_(with_sigma(5, 5, [2.0, 1.2, 1.0, 0.9, 0.5]))
    values = [float(reg(model).detach()) for _ in range(80)]
    assert values[-1] == pytest.approx(_exact_srip(model[0].weight.detach()), rel=1e-12)     # 3.0


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 2, 3, 3), (4, 0, 3, 3)])
def test_empty_weight_has_defined_penalties(shape):
    """No elements: the Gram on the smaller side is 0 × 0, so SO = SRIP = 0 and DSO = |m − n| — the literal
    formulas' values (‖WᵀW − I_n‖²_F + ‖WWᵀ − I_m‖²_F = n + 0 for m = 0)."""
    W = torch.zeros(shape, dtype=torch.float64)
    m, n = as_matrix(W).shape
    assert gram_small(W).shape == (0, 0)
    smaller = direct_so_literal if m >= n else direct_so_rows
    checks = [(so_penalty, smaller(W)), (dso_penalty, direct_so_literal(W) + direct_so_rows(W)),
              (lambda w: srip_penalty(w, 3), torch.zeros((), dtype=torch.float64)),
              (lambda w: srip_penalty(w, None), torch.zeros((), dtype=torch.float64))]
    for fn, ref in checks:
        value, grad = grad_of(fn, W)
        assert float(value) == float(ref) and grad.shape == shape
    assert float(dso_penalty(W)) == abs(m - n)


def test_errors():
    with pytest.raises(ValueError, match="coef must be a finite number >= 0, got -1.0"):
        SoftOrthogonality(-1.0)
    with pytest.raises(ValueError, match="kind must be one of so, dso, srip, got 'l2'"):
        OrthogonalityRegularizer(1.0, kind="l2")
    with pytest.raises(ValueError, match=r"exclude names \['nope'\] are not modules of the model"):
        regularized_tensors(_model(), exclude=["nope"])
    with pytest.raises(ValueError, match=r"weight must have at least 2 dims.*got shape \(3,\)"):
        so_penalty(torch.ones(3))
    with pytest.raises(TypeError, match=r"weight must be a torch\.Tensor, got list"):
        dso_penalty([[1.0]])
    with pytest.raises(ValueError, match="n_power_iterations must be an int ≥ 1 or None, got 0"):
        srip_penalty(torch.eye(3), n_power_iterations=0)
    with pytest.raises(ValueError, match=r"start must be a tensor of shape \(3,\), got \(4,\)"):
        srip_penalty(torch.eye(3), start=torch.ones(4))
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got str"):
        regularized_tensors("model")


# -- mixed precision, non-finite weights, checkpoints, transformers Conv1D ----------------------------

@pytest.mark.parametrize("shape", [(17, 5), (5, 17), (6, 3, 3, 3)])
@pytest.mark.parametrize("name,fn", [("so", so_penalty), ("dso", dso_penalty),
                                     ("srip", lambda w: srip_penalty(w, n_power_iterations=None)),
                                     ("srip-power", lambda w: srip_penalty(w, n_power_iterations=7))])
def test_penalties_under_autocast_run_in_float32(shape, name, fn):
    """Under torch.autocast (AMP: the penalty added to the loss inside the autocast block) the Gram and the
    power iteration ran in bfloat16: SO of a float32 weight came out 1e-2 off and its gradient was noise."""
    W64 = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.4
    W = W64.float()
    plain, plain_grad = grad_of(fn, W)
    W = W.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = fn(W)
    (grad,) = torch.autograd.grad(value, W)                 # backward outside autocast, as AMP has it
    assert value.dtype == torch.float32
    assert torch.equal(value, plain) and torch.equal(grad, plain_grad)
    if name != "srip-power":                                 # 7 iterations: not converged, no exact reference
        ref, ref_grad = grad_of(fn, W64)
        assert rel_err(value, ref) < REL_TOL[torch.float32]
        assert rel_err(grad, ref_grad) < REL_TOL[torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gram_small(W).dtype == torch.float32
        half = fn(W.detach().to(torch.bfloat16))                          # 16-bit weights: float32 too
    assert torch.equal(half, fn(W.detach().to(torch.bfloat16)))


def test_regularizer_under_autocast_equals_the_one_outside():
    model = _model()
    for make in (lambda: SoftOrthogonality(0.5), lambda: SRIP(0.5)):
        outside = make()(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = make()(model)
        assert inside.dtype == torch.float32 and torch.equal(inside, outside)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_srip_warm_start_survives_non_finite_weights(bad):
    """One call on a diverged weight stored a NaN warm-start vector, and every later call returned NaN, also
    after the weights were rolled back to finite ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False).double())
    good = {k: v.clone() for k, v in model.state_dict().items()}

    def diverge():
        with torch.no_grad():
            model[0].weight[0, 0] = bad

    # Diverged on the first call: after the roll back, the same values as a fresh regularizer.
    reg, fresh = SRIP(1.0), SRIP(1.0)
    diverge()
    assert not math.isfinite(float(reg(model).detach()))
    model.load_state_dict(good)
    assert [float(reg(model).detach()) for _ in range(4)] == [float(fresh(model).detach()) for _ in range(4)]
    # Diverged later: the warm start goes on from the last finite vector, as if the bad step never happened.
    reg, undisturbed = SRIP(1.0), SRIP(1.0)
    assert float(reg(model).detach()) == float(undisturbed(model).detach())
    diverge()
    assert not math.isfinite(float(reg(model).detach()))
    model.load_state_dict(good)
    values = [float(reg(model).detach()) for _ in range(4)]
    assert all(math.isfinite(v) for v in values)
    assert values == [float(undisturbed(model).detach()) for _ in range(4)]
    # The function itself: the returned vector stays the (finite, unit) start.
    diverge()
    start = torch.ones(6, dtype=torch.float64)
    _, v = srip_penalty(model[0].weight, 3, start=start, return_vector=True)
    assert torch.equal(v, start / start.norm())


def _srip_training(reg_state=None):
    """Model, optimizer, dynamic-rank scheduler and SRIP as at the start of a run, seeded."""
    from dynrank import DynamicRankScheduler, convert_model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4))
    convert_model(model, rank_ratio=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, optimizer, DynamicRankScheduler(model, optimizer, 2, 4), SRIP(0.1)


def _srip_epochs(model, optimizer, scheduler, reg, epochs):
    x = torch.linspace(-1.0, 1.0, 8 * 12).reshape(8, 12)
    y = torch.linspace(0.5, -0.5, 8 * 4).reshape(8, 4)
    for epoch in epochs:
        scheduler.step(epoch)
        for _ in range(3):
            loss = ((model(x) - y) ** 2).mean() + reg(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@pytest.mark.parametrize("stop", [1, 3, 5])
def test_srip_state_dict_resumes_the_uninterrupted_run(stop):
    """SRIP's warm-start vectors had no state_dict: a run resumed from training_state restarted them from the
    default vector and ended 1e-2 away from the run never interrupted."""
    import io

    from dynrank.checkpoint import load_training_state, training_state
    reference = _srip_training()
    _srip_epochs(*reference, range(6))
    run = _srip_training()
    _srip_epochs(*run, range(stop))
    buffer = io.BytesIO()
    torch.save(training_state(*run[:3], rng=torch.get_rng_state(), srip=run[3].state_dict()), buffer)

    def resume(load_srip):
        model, optimizer, scheduler, reg = _srip_training()
        buffer.seek(0)
        extra = load_training_state(torch.load(buffer, weights_only=True), model, optimizer, scheduler)
        torch.set_rng_state(extra["rng"])
        if load_srip:
            reg.load_state_dict(extra["srip"])
        _srip_epochs(model, optimizer, scheduler, reg, range(stop, 6))
        return model.state_dict()

    expected = reference[0].state_dict()
    resumed = resume(load_srip=True)
    assert list(resumed) == list(expected)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    cold = resume(load_srip=False)                           # the state matters: without it the run differs
    assert not all(torch.equal(cold[k], expected[k]) for k in expected)


def test_srip_state_dict_is_a_copy_and_load_checks_it():
    model = _model()
    reg = SRIP(1.0)
    reg(model)
    state = reg.state_dict()
    assert sorted(state) == sorted(n for n, _ in regularized_tensors(model))
    assert all(torch.equal(state[n], reg._vectors[n]) and state[n] is not reg._vectors[n] for n in state)
    assert SoftOrthogonality(1.0).state_dict() == {} and DoubleSoftOrthogonality(1.0).state_dict() == {}
    other = SRIP(1.0)
    other.load_state_dict(state)
    assert float(other(model).detach()) == float(reg(model).detach())
    target = SRIP(1.0)
    target.load_state_dict(state)

    def refused(error, match, bad, into=target):
        with pytest.raises(error, match=match):
            into.load_state_dict(bad)

    refused(TypeError, r"state must be a dict tensor name → vector from SRIP\.state_dict\(\), got list", [1])
    refused(TypeError, r"state must map tensor names \(str\) to vectors, got the key 3 \(int\)", {3: torch.ones(2)})
    refused(TypeError, r"state\['0\.A'\] must be a real floating-point tensor, got list", {"0.A": [1.0]})
    refused(TypeError, r"state\['0\.A'\] must be a real floating-point tensor, got a torch\.int64 tensor",
            {"0.A": torch.ones(4, dtype=torch.int64)})
    refused(ValueError, r"state\['0\.A'\] must be a 1-D vector, or a 2-D tensor of one vector per group, got "
                        r"shape \(2, 2, 2\)", {"0.A": torch.ones(2, 2, 2)})
    refused(ValueError, r"state\['0\.A'\] is on the meta device: no values to start from",
            {"0.A": torch.ones(4, device="meta")})
    for vector in (torch.zeros(4), torch.tensor([1.0, math.nan, 0.0, 0.0])):
        refused(ValueError, r"state\['0\.A'\] must be a finite vector that is not all zeros", {"0.A": vector})
    refused(ValueError, r"a 'so' regularizer keeps no warm-start vectors, got vectors for \['0\.A'\]",
            {"0.A": torch.ones(4)}, into=SoftOrthogonality(1.0))
    assert all(torch.equal(target._vectors[n], state[n]) for n in state)          # nothing changed
    SoftOrthogonality(1.0).load_state_dict({})


def test_srip_state_of_a_model_with_empty_layers_loads_back():
    """An empty tensor (p = 0, penalty 0) kept an empty vector, which load_state_dict refuses as all zeros: the
    regularizer's own state could not be restored.  It keeps no vector for it now; the round trip goes on as
    the uninterrupted regularizer does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(0, 5), nn.Linear(5, 3), nn.Linear(3, 0),
                          nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(0, 4, 3)).double()
    reg = SRIP(1.0, n_power_iterations=1)
    first = float(reg(model).detach())
    reference = srip_penalty(model[1].weight.detach(), 1) + srip_penalty(model[3].weight.detach(), 1, groups=2)
    assert first == pytest.approx(float(reference), rel=TOL64)
    state = reg.state_dict()
    resumed = SRIP(1.0, n_power_iterations=1)
    resumed.load_state_dict(state)
    assert sorted(state) == ["1.weight", "3.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # every loaded name is a tensor's
        value = resumed(model)
    expected = float(reg(model).detach())
    assert float(value.detach()) == expected and expected != first             # the warm start mattered


def _tiny_gpt2(vocab_size):
    """A float64 GPT-2 LM of 2 blocks, width 16, built from its config (nothing downloaded), seeded."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=8, vocab_size=vocab_size,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).double()


def test_transformers_conv1d_kept_dense_is_regularized():
    """GPT-2's Conv1D layers that convert_model left dense were skipped: no penalty acted on them."""
    from dynrank import convert_model
    model = _tiny_gpt2(vocab_size=20)
    convert_model(model, rank_ratio=0.5, exclude=["transformer.h.1.*"])
    sites = [f"transformer.h.1.{s}" for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    modules = dict(model.named_modules())
    got = dict(regularized_tensors(model))
    for site in sites:
        assert got[f"{site}.weight"] is modules[site].weight
    reg = SoftOrthogonality(0.5, exclude=["transformer.h.0", "lm_head"])

    def linear_so(weight):
        """SO of the (out, in) weight an nn.Linear of the same layer would hold, on its smaller side."""
        W = weight.t()
        return direct_so_literal(W) if W.shape[0] >= W.shape[1] else direct_so_rows(W)

    ref = 0.5 * sum(linear_so(modules[s].weight) for s in sites)
    value = reg(model)
    assert rel_err(value, ref) < TOL64
    value.backward()
    assert all(modules[s].weight.grad is not None and modules[s].weight.grad.abs().max() > 0 for s in sites)


# -- grouped convs, wrappers, sharded weights, meta models, bad weights --------------------------------

def block_diagonal(kernel, groups):
    """The matrix a conv with ``groups`` g computes with: the g (F/g) × (C/g·kh·kw) slices of its kernel on the
    diagonal of an F × C·kh·kw matrix."""
    return torch.block_diag(*as_matrix(kernel).chunk(groups))


def literal(kind, M):
    """SO (smaller side), DSO or SRIP of the matrix ``M`` by the literal formulas."""
    m, n = M.shape
    if kind == "so":
        return direct_so_literal(M) if m >= n else direct_so_rows(M)
    if kind == "dso":
        return direct_so_literal(M) + direct_so_rows(M)
    G = M.t() @ M if m >= n else M @ M.t()
    return torch.linalg.matrix_norm(G - torch.eye(G.shape[0], dtype=M.dtype), ord=2)


def _grouped_layer(case):
    """(layer, its groups, the names of its regularized tensors)."""
    from dynrank import LowRankConv2d
    torch.manual_seed(11)
    if case == "conv-depthwise":
        return nn.Conv2d(16, 16, 3, groups=16, bias=False), 16, ["weight"]
    if case == "conv-groups4":
        return nn.Conv2d(8, 12, 3, groups=4), 4, ["weight"]
    if case == "lowrank-depthwise":
        return LowRankConv2d(8, 8, 3, rank=8, groups=8), 8, ["B", "A"]
    layer = LowRankConv2d(16, 24, 3, rank=8, groups=4)
    form = case.split("-")[-1]
    if form == "lowrank":
        return layer, 4, ["B", "A"]
    layer.inflate()
    with torch.no_grad():              # not of rank 2 per group: σmax(G_i − I) = 1 would be tied in every group
        layer.weight.add_(0.2 * torch.randn_like(layer.weight))
    if form == "full":
        return layer, 4, ["weight"]
    layer.deflate(init="random")
    return layer, 4, ["B", "A"]


@pytest.mark.parametrize("kind", ["so", "dso", "srip"])
@pytest.mark.parametrize("case", ["conv-depthwise", "conv-groups4", "lowrank-depthwise", "svd-groups4-lowrank",
                                  "svd-groups4-full", "svd-groups4-adapter"])
def test_grouped_convs_are_penalised_on_their_block_diagonal_weight(kind, case):
    """A grouped conv was penalised on its stacked kernel (F × C/g·kh·kw), whose Gram adds terms between groups
    that the layer's block-diagonal weight does not have."""
    layer, groups, names = _grouped_layer(case)
    model = nn.Sequential(layer).double()
    tensors = regularized_tensors(model)
    assert [n for n, _ in tensors] == [f"0.{n}" for n in names]
    reg = OrthogonalityRegularizer(0.5, kind, n_power_iterations=500)
    value = reg(model)
    value.backward()
    ref_total, stacked_total = 0.0, 0.0
    for name, tensor in tensors:
        ref_value, ref_grad = grad_of(lambda w: literal(kind, block_diagonal(w, groups)), tensor)
        ref_total = ref_total + ref_value
        stacked_total = stacked_total + literal(kind, as_matrix(tensor.detach()))
        tol = TOL64 if kind != "srip" else 1e-10
        assert rel_err(tensor.grad, 0.5 * ref_grad) < tol, name
    assert rel_err(value, 0.5 * ref_total) < (TOL64 if kind != "srip" else 1e-10)
    assert rel_err(stacked_total, ref_total) > 1e-2                       # the stacked kernel's is another value
    assert [(n, t, g) for n, t, g in regularized_tensors(model, with_groups=True)] == [(n, t, groups)
                                                                                      for n, t in tensors]
    if kind == "srip":
        assert all(tuple(v.shape) == (groups, min(t.shape[0] // groups, t[0].numel()))
                   for (_, t), v in zip(tensors, reg.state_dict().values()))


def test_penalty_functions_take_groups():
    """The literal formulas on the block-diagonal weight, for the functions and the exact SRIP; a depthwise conv
    whose weight has orthonormal rows (unit filters) has no SO or SRIP penalty (it had SO ≈ 400 for 64 channels)."""
    w = torch.randn(64, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    unit = (w / w.norm(dim=1, keepdim=True)).reshape(64, 1, 3, 3)
    assert float(so_penalty(unit, groups=64)) < 1e-26
    assert float(dso_penalty(unit, groups=64)) == pytest.approx(64 * 8, rel=1e-13)
    assert float(srip_penalty(unit, None, groups=64)) < 1e-14
    assert float(srip_penalty(unit, 3, groups=64)) < 1e-14
    assert float(so_penalty(unit)) > 100                                    # the stacked kernel's
    W = torch.randn(12, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.3
    big = block_diagonal(W, 4)
    for kind, fn in (("so", so_penalty), ("dso", dso_penalty), ("srip", lambda w, g: srip_penalty(w, None, groups=g))):
        value, grad = grad_of(lambda w: fn(w, 4), W)
        ref_value, ref_grad = grad_of(lambda w: literal(kind, block_diagonal(w, 4)), W)
        assert rel_err(value, ref_value) < TOL64 and rel_err(grad, ref_grad) < 1e-10, kind
    assert rel_err(literal("so", big), so_penalty(W, groups=4)) < TOL64
    assert gram_small(W, groups=4).shape == (4, 3, 3)
    value, v = srip_penalty(W, 300, return_vector=True, groups=4)
    assert v.shape == (4, 3) and rel_err(value, literal("srip", big)) < 1e-10
    # A per-block start: a degenerate block falls back to the default start, the others are kept.
    start = torch.randn(4, 3, dtype=torch.float64)
    start[1] = 0.0
    fixed = start.clone()
    fixed[1] = torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)   # the default
    assert torch.equal(srip_penalty(W, 2, start=start, groups=4), srip_penalty(W, 2, start=fixed, groups=4))
    with pytest.raises(ValueError, match=r"start must be a tensor of shape \(4, 3\), got \(3,\)"):
        srip_penalty(W, start=torch.ones(3), groups=4)
    with pytest.raises(ValueError, match=r"groups \(5\) must divide the weight's first dim \(its output channels\), "
                                         r"got shape \(12, 2, 3, 3\)"):
        so_penalty(W, groups=5)
    with pytest.raises(TypeError, match=r"groups must be a positive int, got str \('4'\)"):
        dso_penalty(W, groups="4")
    with pytest.raises(ValueError, match="groups must be a positive int, got 0"):
        gram_small(W, groups=0)


def test_grouped_srip_state_round_trips():
    """A grouped conv's SRIP state is one vector per group: saved and loaded, the run goes on as uninterrupted."""
    import io
    from dynrank import LowRankConv2d

    def build():
        torch.manual_seed(4)
        return nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), LowRankConv2d(8, 12, 3, rank=4, groups=2),
                             nn.Conv2d(12, 6, 1))

    model, reg = build(), SRIP(1.0, n_power_iterations=1)
    for _ in range(3):
        reg(model)
    state = reg.state_dict()
    assert {n: tuple(v.shape) for n, v in state.items()} == {"0.weight": (8, 1), "1.B": (2, 2), "1.A": (2, 2),
                                                              "2.weight": (6,)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = SRIP(1.0, n_power_iterations=1)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    going_on = [float(reg(model).detach()) for _ in range(3)]
    assert [float(resumed(model).detach()) for _ in range(3)] == going_on
    cold = SRIP(1.0, n_power_iterations=1)                   # without the state: other values
    assert [float(cold(model).detach()) for _ in range(3)] != going_on


def test_srip_state_saved_under_ddp_resumes_bitwise_without_it(one_rank):
    """Tensor names carried DDP's "module." prefix, while checkpoints unwrap it: a resume without the wrapper
    ignored the saved vectors silently, and exclude="2" had to be written "module.2"."""
    from dynrank import DynamicRankScheduler
    from dynrank.checkpoint import load_training_state, training_state
    x = torch.linspace(-1.0, 1.0, 8 * 32).reshape(8, 32)
    y = torch.linspace(0.5, -0.5, 8 * 4).reshape(8, 4)

    def build():
        torch.manual_seed(0)
        net = nn.Sequential(FusedLowRankLinear(32, 16, rank=4), nn.ReLU(), nn.Linear(16, 4))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        return net, optimizer, SRIP(0.1, n_power_iterations=1)

    def steps(model, optimizer, reg, n):
        for _ in range(n):
            loss = (model(x) - y).pow(2).mean() + reg(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    net, optimizer, reg = build()
    DynamicRankScheduler(net, optimizer, 100, 200)
    steps(net, optimizer, reg, 10)
    expected = net.state_dict()

    net, optimizer, reg = build()
    ddp = nn.parallel.DistributedDataParallel(net)
    scheduler = DynamicRankScheduler(ddp, optimizer, 100, 200)
    steps(ddp, optimizer, reg, 5)
    assert [n for n, _ in regularized_tensors(ddp)] == [n for n, _ in regularized_tensors(net)]
    assert sorted(reg.state_dict()) == ["0.A", "0.B", "2.weight"]
    assert [n for n, _ in regularized_tensors(ddp, exclude="2")] == ["0.A", "0.B"]
    assert rel_err(SoftOrthogonality(1.0, exclude="2")(ddp), SoftOrthogonality(1.0, exclude="2")(net)) == 0.0
    checkpoint = training_state(ddp, optimizer, scheduler, srip=reg.state_dict())

    net, optimizer, reg = build()
    scheduler = DynamicRankScheduler(net, optimizer, 100, 200)
    extra = load_training_state(checkpoint, net, optimizer, scheduler)
    reg.load_state_dict(extra["srip"])
    steps(net, optimizer, reg, 5)
    resumed = net.state_dict()
    assert list(resumed) == list(expected) and all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert sorted(reg.state_dict()) == ["0.A", "0.B", "2.weight"]


def test_loaded_srip_names_that_match_no_tensor_warn_once():
    model = _model()
    reg = SRIP(1.0)
    reg(model)
    state = reg.state_dict()
    other = SRIP(1.0)
    other.load_state_dict({"module." + n: v for n, v in state.items()} | {"0.A": state["0.A"]})
    with pytest.warns(UserWarning, match=re.escape("SRIP: loaded vectors ['module.0.A', 'module.0.B', ") +
                      r".* match no tensor it regularizes in the model \(its tensors: '0\.A', '0\.B', "):
        other(model)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other(model)                                  # once, after the load
        matching = SRIP(1.0)
        matching.load_state_dict(state)
        matching(model)                               # all names match: no warning


@pytest.mark.parametrize("kind", ["so", "dso", "srip"])
def test_regularizers_gather_fsdp2_sharded_weights(one_rank, kind):
    """Under fully_shard the plain weights of a sharded block are DTensors after its forward: every
    regularizer failed with "mixed torch.Tensor and DTensor"."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from dynrank.distributed import dynrank_params
    torch.manual_seed(0)
    net = nn.Sequential(FusedLowRankLinear(16, 12, rank=4), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(),
                        nn.Linear(6, 5)).double()
    reference = copy.deepcopy(net)
    x = torch.randn(3, 16, dtype=torch.float64)
    make = lambda: OrthogonalityRegularizer(0.1, kind, n_power_iterations=3)
    ref_reg = make()
    ref_value = ref_reg(reference)
    (reference(x).square().mean() + ref_value).backward()
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(net[4], mesh=mesh)
    fully_shard(net, mesh=mesh, ignored_params=dynrank_params(net))
    reg = make()
    out = net(x).square().mean()
    assert isinstance(net[4].weight, DTensor)
    value = reg(net)
    (out + value).backward()
    assert rel_err(value, ref_value) < TOL64
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        assert rel_err(grad, q.grad) < TOL64, name
    if kind == "srip":
        assert all(torch.equal(reg.state_dict()[n], v) for n, v in ref_reg.state_dict().items())


def test_srip_on_a_meta_model_keeps_no_vectors():
    """One call on a model built on the meta device stored meta vectors, and every call after to_empty and
    reset_parameters failed with "Cannot copy out of meta tensor"."""
    with torch.device("meta"):
        model = nn.Sequential(FusedLowRankLinear(16, 12, rank=4), nn.Linear(12, 3))
    reg = SRIP(5e-4)
    assert reg(model).is_meta
    assert reg.state_dict() == {}
    model.to_empty(device="cpu")
    for module in model:
        module.reset_parameters()
    assert torch.equal(reg(model), SRIP(5e-4)(model))
    assert all(not v.is_meta for v in reg.state_dict().values()) and len(reg.state_dict()) == 3
    W = torch.randn(5, 4)                     # a start without values is no start
    assert torch.equal(srip_penalty(W, 3, start=torch.ones(4, device="meta")), srip_penalty(W, 3))


@pytest.mark.parametrize("bad,error,match", [
    (torch.tensor(1.0), ValueError, r"weight must have at least 2 dims \(matrix or conv kernel\), got shape \(\)"),
    ([[1.0, 0.0], [0.0, 1.0]], TypeError, "weight must be a torch.Tensor, got list"),
    (torch.ones(2, 2, dtype=torch.int64), TypeError, "weight must be floating point, got torch.int64")])
def test_srip_penalty_checks_the_weight(bad, error, match):
    """SRIP.penalty read the weight's shape before checking it: IndexError / AttributeError."""
    for reg in (SoftOrthogonality(1.0), DoubleSoftOrthogonality(1.0), SRIP(1.0)):
        with pytest.raises(error, match=match):
            reg.penalty("w", bad)


def test_weight_tied_to_an_embedding_is_left_out():
    """A Linear head tied to an nn.Embedding put the embedding under the penalty (GPT-2's tied LM head: 98.9 %
    of SO), though the penalties are on layer weights."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(30, 6), nn.Linear(6, 6, bias=False), nn.Linear(6, 30, bias=False)).double()
    model[2].weight = model[0].weight                                    # the LM head ties the embedding
    assert [n for n, _ in regularized_tensors(model)] == ["1.weight"]
    for kind, fn in (("so", so_penalty), ("dso", dso_penalty),
                     ("srip", lambda w: srip_penalty(w, n_power_iterations=None))):
        reg = OrthogonalityRegularizer(0.5, kind, n_power_iterations=300)
        value = reg(model)
        assert rel_err(value, 0.5 * fn(model[1].weight)) < 1e-10
        model.zero_grad()
        value.backward()
        assert model[0].weight.grad is None and model[1].weight.grad.abs().max() > 0
        assert sorted(reg.state_dict()) == (["1.weight"] if kind == "srip" else [])


def test_gpt2_tied_lm_head_is_left_out():
    """GPT-2's LM head is tied to the token embedding: 4 projections per block are regularized, not the head."""
    from dynrank import convert_model
    model = _tiny_gpt2(vocab_size=40)
    convert_model(model, rank_ratio=0.5, form="full")
    assert model.lm_head.weight is model.transformer.wte.weight
    sites = [f"transformer.h.{i}.{s}" for i in range(2) for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                  "mlp.c_proj")]
    assert [n for n, _ in regularized_tensors(model)] == [f"{s}.weight" for s in sites]
    value = SoftOrthogonality(0.5)(model)
    assert rel_err(value, SoftOrthogonality(0.5, exclude="lm_head")(model)) == 0.0
    value.backward()
    assert model.transformer.wte.weight.grad is None


def test_parameter_tied_between_layers_is_penalised_once():
    """A weight tied between two layers was listed under both names and penalised twice (SRIP kept two vectors),
    while model.parameters() lists it once and a module used twice was penalised once."""
    torch.manual_seed(8)
    first, second = FusedLowRankLinear(7, 7, 3, form="full"), FusedLowRankLinear(7, 7, 3, form="full")
    second.weight = first.weight
    tied = nn.Sequential(first, nn.ReLU(), second, nn.Linear(7, 4, bias=False)).double()
    with torch.no_grad():              # an eigengap SRIP's power iteration converges over
        first.weight.copy_(with_sigma(7, 7, [2.0, 1.5, 1.2, 1.0, 0.9, 0.8, 0.7]))
    lowrank = nn.Sequential(FusedLowRankLinear(9, 5, 3), FusedLowRankLinear(9, 5, 3)).double()
    lowrank[1].A = lowrank[0].A                                          # one factor tied, the other not
    for model, names in ((tied, ["0.weight", "3.weight"]), (lowrank, ["0.A", "0.B", "1.B"])):
        assert [n for n, _ in regularized_tensors(model)] == names
        params = dict(model.named_parameters())
        for kind, fn in (("so", so_penalty), ("dso", dso_penalty),
                         ("srip", lambda w: srip_penalty(w, n_power_iterations=None))):
            reg = OrthogonalityRegularizer(0.5, kind, n_power_iterations=300)
            value = reg(model)
            assert rel_err(value, 0.5 * sum(fn(params[n]) for n in names)) < 1e-10
            assert sorted(reg.state_dict()) == (sorted(names) if kind == "srip" else [])
            grads = torch.autograd.grad(value, [params[n] for n in names])
            refs = torch.autograd.grad(0.5 * sum(fn(params[n]) for n in names), [params[n] for n in names])
            assert all(rel_err(g, r) < 1e-8 for g, r in zip(grads, refs))


def test_exclude_names_any_place_of_a_shared_module():
    """A module used twice is listed by named_modules() under its first name: exclude= its second name raised
    "not modules of the model", though model.get_submodule finds it."""
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.ReLU(), shared)
    assert [n for n, _ in regularized_tensors(model)] == ["0.weight", "1.weight"]
    for name in ("1", "3", ["1", "3"]):
        assert [n for n, _ in regularized_tensors(model, exclude=name)] == ["0.weight"]
        assert SoftOrthogonality(1.0, exclude=name)(model) == so_penalty(model[0].weight)
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    outer = nn.Sequential(block, nn.Linear(4, 4), block)
    assert [n for n, _ in regularized_tensors(outer, exclude="2")] == ["1.weight"]
    assert [n for n, _ in regularized_tensors(outer, exclude="2.0")] == ["1.weight"]
    with pytest.raises(ValueError, match=re.escape("exclude names ['2.1'] hold no layer the regularizers act on")):
        regularized_tensors(outer, exclude="2.1")


@pytest.mark.parametrize("name", ["weight", "nonsense", "0.wieght", "x.weight", "1.weight", "0.bias"])
def test_loaded_srip_names_under_no_regularized_tensor_warn(name):
    """A loaded name under any module of the model (the root included: every name without a dot) passed as a
    layer's, so 'weight' saved from a bare layer, 'nonsense' and '0.wieght' went unused without a warning."""
    model = nn.Sequential(FusedLowRankLinear(8, 6, 3, form="full"), nn.ReLU(), nn.Linear(6, 4))
    reg = SRIP(1.0, exclude="2")
    reg.load_state_dict({name: torch.ones(4)})
    with pytest.warns(UserWarning, match=re.escape(f"SRIP: loaded vectors [{name!r}] match no tensor it regularizes "
                                                   "in the model (its tensors: '0.weight';")):
        reg(model)


def test_loaded_srip_names_of_another_form_do_not_warn():
    """The factors' vectors of a layer now in full form (saved before an inflate) are no mismatch."""
    import warnings
    model = nn.Sequential(FusedLowRankLinear(8, 6, 3), nn.ReLU(), nn.Linear(6, 4))
    saved = SRIP(1.0)
    saved(model)
    state = saved.state_dict()
    assert sorted(state) == ["0.A", "0.B", "2.weight"]
    model[0].inflate()
    reg = SRIP(1.0)
    reg.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg(model)
        model[0].deflate()                                               # adapter: W's vector is no mismatch
        again = SRIP(1.0)
        again.load_state_dict(reg.state_dict())
        again(model)
    assert sorted(again.state_dict()) == ["0.A", "0.B", "0.weight", "2.weight"]
