"""SO / DSO / SRIP against their literal formulas and autograd gradients (float64)."""

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
    return W.reshape(W.shape[0], -1)


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


def test_srip_larger_side_would_be_pinned_at_one():
    W = with_sigma(4, 12, [1.2, 1.1, 0.9, 0.95])                       # wide: WᵀW is 12 × 12
    big = torch.linalg.matrix_norm(W.t() @ W - torch.eye(12, dtype=W.dtype), ord=2)
    assert float(big) == pytest.approx(1.0, rel=1e-12)                 # the zero eigenvalues dominate
    assert float(srip_penalty(W, n_power_iterations=None)) == pytest.approx(1.2 ** 2 - 1, rel=1e-12)


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


def test_errors():
    with pytest.raises(ValueError, match="coef"):
        SoftOrthogonality(-1.0)
    with pytest.raises(ValueError, match="kind"):
        OrthogonalityRegularizer(1.0, kind="l2")
    with pytest.raises(ValueError, match="not modules"):
        regularized_tensors(_model(), exclude=["nope"])
    with pytest.raises(ValueError, match="at least 2 dims"):
        so_penalty(torch.ones(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        dso_penalty([[1.0]])
    with pytest.raises(ValueError, match="n_power_iterations"):
        srip_penalty(torch.eye(3), n_power_iterations=0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        srip_penalty(torch.eye(3), start=torch.ones(4))
    with pytest.raises(TypeError, match="nn.Module"):
        regularized_tensors("model")
