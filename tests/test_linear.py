"""FusedLowRankLinear: forms, form changes, state dicts, dispatch and bad input."""

import re

import numpy as np
import pytest
import torch
from torch import nn

from _helpers import (BACKENDS, INTERPRETING, REL_TOL, assert_lbfgs_step_like_the_reference, engine_cases, kernel_devices,
                      rel_err)
from dynrank import FusedLowRankLinear
from dynrank import functional as F
from dynrank.kernels import reference_lowrank_linear
from dynrank.linear import svd_factors


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("DYNRANK_BACKEND", request.param)
    return request.param


def with_backends(forms):
    """(backend, form) cases (:func:`engine_cases`) for a test taking the ``backend`` fixture: every form on torch,
    and on Triton only the forms with a kernel."""
    return pytest.mark.parametrize("backend, form", engine_cases([(form,) for form in forms]), indirect=["backend"])


def _device():
    return kernel_devices()[0] if kernel_devices() else "cpu"


def _reference_forward(layer, x):
    weight = None if layer.weight is None else layer.weight.double()
    A = None if layer.A is None else layer.A.double()
    B = None if layer.B is None else layer.B.double()
    bias = None if layer.bias is None else layer.bias.double()
    if layer.form == "full":
        return x.double() @ weight.t() + (bias if bias is not None else 0)
    return reference_lowrank_linear(x.double(), weight, A, B, bias, layer.scale)


def _randomize_adapter(layer):
    with torch.no_grad():
        layer.A.normal_(0, 0.3)


# -- forward in every form and dtype -----------------------------------------------

@with_backends(["lowrank", "adapter", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("lead", [(7,), (2, 5)], ids=["2d", "3d"])
def test_forward_and_gradients_every_form(backend, form, dtype, lead, kernel_calls):
    """Every form and dtype on either engine against float64.  A float64 layer takes the torch path whatever
    the backend: its Triton cases check that route (no kernel runs)."""
    device = _device()
    layer = FusedLowRankLinear(33, 17, rank=6, form=form, alpha=12.0, device=device, dtype=dtype)
    if form == "adapter":
        _randomize_adapter(layer)
    x = torch.randn(*lead, 33, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead, 17) and y.dtype == dtype
    ref = _reference_forward(layer, x.detach())
    assert rel_err(y, ref) < REL_TOL[dtype]

    dy = torch.randn_like(y)
    y.backward(dy)
    _assert_gradients_match_float64(layer, x, dy, REL_TOL[dtype])
    expected = ["lowrank_linear_forward", "lowrank_linear_backward"]
    assert kernel_calls == (expected if backend == "triton" and dtype != torch.float64 else [])


def _assert_gradients_match_float64(layer, x, dy, tol):
    """x's and every trainable parameter's gradient (after ``y.backward(dy)``) against float64
    autograd through the reference; frozen parameters must have none."""
    xr = x.detach().double().requires_grad_()
    params = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().double() for n, p in layer.named_parameters() if not p.requires_grad}
    allp = {**params, **frozen}
    if layer.form == "full":
        yr = xr @ allp["weight"].t() + allp["bias"]
    else:
        yr = reference_lowrank_linear(xr, allp.get("weight"), allp["A"], allp["B"], allp["bias"], layer.scale)
    yr.backward(dy.double())
    assert rel_err(x.grad, xr.grad) < tol
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, params[name].grad) < tol, name
        else:
            assert p.grad is None, f"frozen {name} must get no gradient"


def test_non_contiguous_input(backend):
    device = _device()
    layer = FusedLowRankLinear(20, 12, rank=4, form="adapter", device=device)
    _randomize_adapter(layer)
    base = torch.randn(6, 40, 3, device=device)
    x = base[:, ::2, 1]                    # (6, 20) with strides (120, 6)
    assert not x.is_contiguous()
    assert rel_err(layer(x), _reference_forward(layer, x)) < REL_TOL[torch.float32]
    x3 = torch.randn(4, 20, 5, device=device).transpose(1, 2)   # (4, 5, 20)
    assert rel_err(layer(x3), _reference_forward(layer, x3)) < REL_TOL[torch.float32]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning")
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
@with_backends(["lowrank", "adapter", "full"])
def test_nested_input_as_nn_linear_takes_it(backend, form, layout, kernel_calls):
    """A torch.nested input (nn.TransformerEncoder's eval path nests a padded batch), either layout, on
    either engine: each component's rows as the layer gives them unnested and as float64 gives them, and
    the gradients of the input and every trainable parameter against float64 on the rows concatenated."""
    layer = FusedLowRankLinear(13, 9, rank=3, form=form, alpha=6.0)
    if form == "adapter":
        _randomize_adapter(layer)
    parts = [torch.randn(3, 13), torch.randn(1, 13), torch.randn(5, 13)]
    x = torch.nested.nested_tensor(parts, layout=layout, requires_grad=True)
    y = layer(x)
    assert y.is_nested and y.layout == layout
    plain = nn.functional.linear(torch.cat(parts), layer.weight, layer.bias) if form == "adapter" else None
    for part, y_part in zip(parts, y.unbind()):
        assert rel_err(y_part, layer(part)) < REL_TOL[torch.float32]
        assert rel_err(y_part, _reference_forward(layer, part)) < REL_TOL[torch.float32]
    if plain is not None:     # the adapter term is there
        assert rel_err(torch.cat(y.unbind()), plain) > 0.1

    dy = torch.randn_like(y)
    y.backward(dy)
    xr = torch.cat(parts).double().requires_grad_()
    params = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    if form == "full":
        yr = xr @ params["weight"].t() + params["bias"]
    else:
        yr = reference_lowrank_linear(xr, params.get("weight"), params["A"], params["B"], params["bias"], layer.scale)
    yr.backward(torch.cat(dy.unbind()).double())
    assert rel_err(torch.cat(x.grad.unbind()), xr.grad) < REL_TOL[torch.float32]
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, params[name].grad) < REL_TOL[torch.float32], name
        else:
            assert p.grad is None, f"frozen {name} must get no gradient"
    assert bool(kernel_calls) == (backend == "triton")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning")
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_nested_input_of_the_wrong_size_is_named(form, layout):
    """(Refused before any backend is read: the same code on either.)"""
    layer = FusedLowRankLinear(6, 9, rank=2, form=form)
    x = torch.nested.nested_tensor([torch.randn(3, 5), torch.randn(2, 5)], layout=layout)
    with pytest.raises(ValueError, match=re.escape("input must have shape (..., 6), got a nested tensor of "
                                                   "shapes [(3, 5), (2, 5)]")):
        layer(x)


def test_backends_agree(monkeypatch):
    if len(BACKENDS) < 2:
        pytest.skip("Triton is not available")
    device = _device()
    layer = FusedLowRankLinear(24, 18, rank=5, form="adapter", device=device)
    _randomize_adapter(layer)
    x = torch.randn(3, 24, device=device)
    outs = []
    for name in BACKENDS:
        monkeypatch.setenv("DYNRANK_BACKEND", name)
        outs.append(layer(x))
    assert rel_err(outs[1], outs[0].double()) < REL_TOL[torch.float32]


def test_autocast_bf16_on_cpu(backend):
    if backend == "triton" and not INTERPRETING:
        pytest.skip("Triton kernels run on CPU tensors only in the interpreter (off where CUDA is present)")
    layer = FusedLowRankLinear(16, 8, rank=4, form="adapter")
    _randomize_adapter(layer)
    x = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, _reference_forward(layer, x.detach())) < REL_TOL[torch.bfloat16]
    dy = torch.randn(y.shape)
    y.float().backward(dy)
    assert layer.A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    _assert_gradients_match_float64(layer, x, dy, REL_TOL[torch.bfloat16])


@with_backends(["lowrank", "adapter", "full"])
def test_float64_layer_stays_float64_under_autocast(backend, form, kernel_calls):
    """As nn.Linear: autocast leaves float64 tensors alone, so a float64 layer computes in float64 (on the torch
    path whatever the backend: no kernel runs)."""
    layer = FusedLowRankLinear(16, 8, rank=4, form=form, alpha=6.0, dtype=torch.float64, device=_device())
    if form == "adapter":
        _randomize_adapter(layer)
    x = torch.randn(5, 16, dtype=torch.float64, device=_device())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float64
    assert rel_err(y, _reference_forward(layer, x)) < REL_TOL[torch.float64]
    assert kernel_calls == []


@pytest.mark.parametrize("form", ["lowrank", "adapter", "full"])
def test_float64_layer_beside_float32_input_under_autocast_is_named(form):
    """nn.Linear refuses this pair under autocast (the input is cast, float64 is not); so does the layer, by name,
    with the dtype the input was given in (the lowrank and adapter forms named autocast's bfloat16 copy)."""
    layer = FusedLowRankLinear(16, 8, rank=4, form=form, dtype=torch.float64)
    operand = "weight" if form != "lowrank" else "A"
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match=re.escape(
            f"input has dtype torch.float32 but {operand} has torch.float64, and torch.autocast leaves float64 "
            f"tensors as they are")):
        layer(torch.randn(5, 16))


def test_full_form_names_a_bias_or_weight_that_does_not_fit():
    """torch's own messages named neither ("self and mat2 must have the same dtype", "mat1 and mat2 shapes
    cannot be multiplied"); the lowrank and adapter forms already named the operand."""
    layer = FusedLowRankLinear(16, 8, rank=4, form="full")
    x = torch.randn(5, 16)
    with pytest.raises(TypeError, match=re.escape("input has dtype torch.float32 but bias has torch.float64")):
        torch.func.functional_call(layer, {"bias": layer.bias.detach().double()}, (x,))
    with pytest.raises(ValueError, match=re.escape("weight must have shape (8, 16), got (9, 16)")):
        torch.func.functional_call(layer, {"weight": torch.randn(9, 16)}, (x,))
    with pytest.raises(ValueError, match=re.escape("bias must have shape (8,), got (9,)")):
        torch.func.functional_call(layer, {"bias": torch.randn(9)}, (x,))


# -- torch.func transforms and tracing ------------------------------------------------

def _float64_function(layer):
    """The layer's function in float64, as ``f(params, x)`` over its named parameters."""
    def f(params, x):
        p = {**{n: t.detach().double() for n, t in layer.named_parameters()}, **params}
        if layer.form == "full":
            return x @ p["weight"].t() + p["bias"]
        return reference_lowrank_linear(x, p.get("weight"), p["A"], p["B"], p["bias"], layer.scale)
    return f


@with_backends(["lowrank", "adapter", "full"])
def test_per_sample_gradients_through_vmap_and_grad(backend, form, kernel_calls):
    """torch.func.vmap(grad(...)) of a loss through the layer (per-sample gradients, as for DP-SGD)
    against each sample's float64 gradient; the Triton backend's node has no vmap rule: under a transform
    the layer takes the torch path whatever the backend (no kernel runs)."""
    layer = FusedLowRankLinear(12, 7, rank=3, form=form, alpha=6.0, device=_device())
    if form == "adapter":
        _randomize_adapter(layer)
    trainable = {n: p.detach() for n, p in layer.named_parameters() if p.requires_grad}
    x = torch.randn(4, 12, device=_device())

    def loss(params, xi):
        return (torch.func.functional_call(layer, params, (xi[None],)) ** 2).sum()

    per_sample = torch.vmap(torch.func.grad(loss), in_dims=(None, 0))(trainable, x)
    f64 = _float64_function(layer)
    for i in range(x.shape[0]):
        params = {n: p.double().requires_grad_() for n, p in trainable.items()}
        (f64(params, x[i:i + 1].double()) ** 2).sum().backward()
        for name, p in params.items():
            assert rel_err(per_sample[name][i], p.grad) < REL_TOL[torch.float32], (name, i)
    assert kernel_calls == []


@pytest.mark.parametrize("form", ["lowrank", "adapter"])
def test_vmap_over_the_factors_alone(backend, form, kernel_calls):
    """An ensemble of adapters on one frozen base and one input: only A and B batched, the output
    batched (an in-place add into the unbatched base output cannot take them); on the torch path whatever
    the backend, as under every transform."""
    layer = FusedLowRankLinear(12, 7, rank=3, form=form, device=_device())
    stacked = {"A": torch.randn(3, 7, 3, device=_device()), "B": torch.randn(3, 12, 3, device=_device())}
    x = torch.randn(5, 12, device=_device())
    y = torch.vmap(lambda p: torch.func.functional_call(layer, p, (x,)))(stacked)
    f64 = _float64_function(layer)
    for i in range(3):
        assert rel_err(y[i], f64({n: t[i].double() for n, t in stacked.items()}, x.double())) < REL_TOL[torch.float32]
    assert kernel_calls == []


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("form", ["lowrank", "adapter"])
def test_vmap_over_the_factors_alone_compiles(form):
    """The same ensemble under torch.compile (the torch engine's traced GEMMs): the unbatched base
    output cannot take the batched adapter term in place there either."""
    layer = FusedLowRankLinear(12, 7, rank=3, form=form, alpha=6.0)
    stacked = {"A": torch.randn(3, 7, 3), "B": torch.randn(3, 12, 3)}
    x = torch.randn(5, 12)
    ensemble = torch.compile(lambda p: torch.vmap(lambda q: torch.func.functional_call(layer, q, (x,)))(p),
                             backend="aot_eager")
    y = ensemble(stacked)
    f64 = _float64_function(layer)
    for i in range(3):
        assert rel_err(y[i], f64({n: t[i].double() for n, t in stacked.items()}, x.double())) < REL_TOL[torch.float32]


# torch.func.jvp loads its decompositions through the deprecated torch.jit.script
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@with_backends(["lowrank", "adapter", "full"])
def test_jvp_and_jacobian(backend, form, kernel_calls):
    """Forward-mode (jvp) and reverse-mode (jacrev) derivatives in the input against float64 (on the torch
    path whatever the backend, as under every transform)."""
    layer = FusedLowRankLinear(10, 6, rank=3, form=form, alpha=6.0, device=_device())
    if form == "adapter":
        _randomize_adapter(layer)
    x, v = torch.randn(4, 10, device=_device()), torch.randn(4, 10, device=_device())
    f64 = _float64_function(layer)
    y, tangent = torch.func.jvp(layer, (x,), (v,))
    y_ref, tangent_ref = torch.func.jvp(lambda t: f64({}, t), (x.double(),), (v.double(),))
    assert rel_err(y, y_ref) < REL_TOL[torch.float32]
    assert rel_err(tangent, tangent_ref) < REL_TOL[torch.float32]
    jac = torch.func.jacrev(layer)(x)
    assert rel_err(jac, torch.func.jacrev(lambda t: f64({}, t))(x.double())) < REL_TOL[torch.float32]
    assert kernel_calls == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@with_backends(["lowrank", "adapter", "full"])
def test_jit_trace_saves_and_reloads(backend, form):
    """torch.jit.trace records plain aten ops in every form (its check reruns the module without grad,
    so the trace must not depend on it), and the saved trace computes the layer's function."""
    import io
    layer = FusedLowRankLinear(10, 6, rank=3, form=form, alpha=6.0, device=_device())
    if form == "adapter":
        _randomize_adapter(layer)
    x = torch.randn(4, 10, device=_device())
    traced = torch.jit.trace(layer, x, check_trace=True, check_inputs=[(torch.randn(3, 10, device=_device()),)])
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x2 = torch.randn(7, 10, device=_device())
    assert rel_err(loaded(x2), _reference_forward(layer, x2)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("form", ["lowrank", "adapter", "full"])
def test_torch_export_saves_and_reloads(form):
    """torch.export with a dynamic batch: the exported program, saved and loaded, computes the layer."""
    import io
    layer = FusedLowRankLinear(10, 6, rank=3, form=form, alpha=6.0)
    if form == "adapter":
        _randomize_adapter(layer)
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(layer, (torch.randn(4, 10),), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    x = torch.randn(9, 10)
    assert rel_err(torch.export.load(buffer).module()(x), _reference_forward(layer, x)) < REL_TOL[torch.float32]


# -- initialization ------------------------------------------------------------------

def test_deflate_random_draws_glorot_normal_factors():
    """deflate(init="random") draws A ~ N(0, 2/(out + r)) and B ~ N(0, 2/(in + r)); with in ≠ out a fan
    taken from the wrong side shows.  Each std is estimated from ≥ 8192 entries (relative standard error
    ≤ 0.8 %), so a 5 % bound is tight yet far from the draw's scatter."""
    torch.manual_seed(0)
    layer = FusedLowRankLinear(2048, 128, rank=64, form="full", dtype=torch.float64)
    layer.deflate(init="random")
    expected = {"A": (2.0 / (128 + 64)) ** 0.5, "B": (2.0 / (2048 + 64)) ** 0.5}
    for name, std in expected.items():
        factor = getattr(layer, name).detach()
        assert abs(factor.std().item() / std - 1) < 0.05, name
        assert abs(factor.mean().item()) < 0.05 * std, name


@pytest.mark.parametrize("alpha", [None, 32.0])
def test_lowrank_init_has_linear_variance(alpha):
    """s·A·Bᵀ of a fresh lowrank layer has nn.Linear's weight variance 1/(3·in) whatever alpha (alpha 32 at
    rank 8: s = 4): A's spread is divided by s.  One draw scatters (rank-8 sums), so 100 draws are averaged; the
    bound is about 5 standard errors of that mean (over 2000 draws: 1.7 %, mean within 0.5 % of 1)."""
    torch.manual_seed(0)
    second_moments = []
    for _ in range(100):
        layer = FusedLowRankLinear(24, 16, rank=8, alpha=alpha, dtype=torch.float64)
        second_moments.append((layer.scale * layer.A.detach() @ layer.B.detach().t()).pow(2).mean().item())
    expected = 1.0 / (3 * 24)                # nn.Linear's default: U(±1/sqrt(in_features))
    assert abs(np.mean(second_moments) / expected - 1) < 0.09


# -- form changes --------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [None, 8.0])
def test_inflate_preserves_function_and_releases_factors(backend, alpha):
    device = _device()
    layer = FusedLowRankLinear(30, 21, rank=7, alpha=alpha, device=device)
    x = torch.randn(9, 30, device=device)
    before = layer(x).detach()
    layer.inflate()
    assert layer.form == "full" and layer.A is None and layer.B is None
    assert layer.weight.requires_grad and layer.weight.shape == (21, 30)
    assert rel_err(layer(x), before) < 1e-5
    assert {n for n, _ in layer.named_parameters()} == {"weight", "bias"}


@pytest.mark.parametrize("init", ["zeros", "svd"])
@pytest.mark.parametrize("alpha, rank", [(10.0, None), (4.0, 3)], ids=["own-rank", "new-rank"])
def test_deflate_preserves_function(backend, init, alpha, rank):
    """At the layer's rank and at another one: the factors are fitted, and W_f formed, at the new rank's
    scale alpha / rank, not the layer's old one."""
    device = _device()
    layer = FusedLowRankLinear(26, 19, rank=5, form="full", alpha=alpha, device=device)
    x = torch.randn(8, 26, device=device)
    before = layer(x).detach()
    W = layer.weight.detach().clone()
    layer.deflate(rank=rank, init=init)
    kept = 5 if rank is None else rank
    assert layer.rank == kept and layer.scale == alpha / kept
    assert layer.form == "adapter" and not layer.weight.requires_grad
    assert layer.A.requires_grad and layer.B.requires_grad
    assert rel_err(layer(x), before) < 1e-5
    delta = layer.scale * layer.A.detach().double() @ layer.B.detach().double().t()
    if init == "zeros":
        assert torch.equal(layer.weight.detach(), W) and delta.abs().max() == 0
        assert layer.B.detach().abs().max() > 0       # the other factor is random: gradients flow
        layer(x).square().sum().backward()
        assert layer.A.grad.abs().max() > 0
    else:
        U, S, Vh = torch.linalg.svd(W.double())
        best = (U[:, :kept] * S[:kept]) @ Vh[:kept]
        assert rel_err(delta, best) < 1e-5             # top singular pairs moved into A, B
        assert rel_err(layer.weight.double() + delta, W.double()) < 1e-6


def test_deflate_random_changes_function_and_takes_rank():
    layer = FusedLowRankLinear(12, 10, rank=3, form="full")
    x = torch.randn(4, 12)
    before = layer(x).detach()
    layer.deflate(rank=6, init="random")
    assert layer.rank == 6 and layer.A.shape == (10, 6) and layer.B.shape == (12, 6)
    assert rel_err(layer(x), before) > 1e-3


def test_deflate_drops_the_gradient_the_weight_held():
    """W becomes the frozen W_f: a gradient it kept would count in ``clip_grad_norm_`` and come back at the
    next inflate.  The bias keeps its own."""
    layer = FusedLowRankLinear(12, 10, rank=3, form="full")
    layer(torch.randn(4, 12)).square().sum().backward()
    weight, bias_grad = layer.weight, layer.bias.grad.clone()
    assert weight.grad is not None
    layer.deflate()
    assert layer.weight is weight and not weight.requires_grad and weight.grad is None
    assert torch.equal(layer.bias.grad, bias_grad)
    total = torch.nn.utils.clip_grad_norm_(layer.parameters(), max_norm=1e9)
    assert rel_err(total, bias_grad.double().norm()) < REL_TOL[torch.float32]
    layer.inflate()
    assert layer.weight is weight and weight.grad is None


def test_deflate_svd_gives_row_major_factors_that_lbfgs_steps():
    """A is taken from the SVD's transposed factors: installed with those strides it passes them on to its
    gradient, which torch.optim.LBFGS views flat ("view size is not compatible").  Every factor is row-major,
    and an L-BFGS step moves A, B and the bias as the same step on the float64 reference does."""
    layer = FusedLowRankLinear(16, 12, rank=4, form="full", dtype=torch.float64).deflate(init="svd")
    assert all(p.is_contiguous() for p in layer.factors().values())
    x, target = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 12, dtype=torch.float64)
    W = layer.weight.detach().clone()
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"A", "B", "bias"}
    assert_lbfgs_step_like_the_reference(
        layer, lambda: layer(x), lambda ref: reference_lowrank_linear(x, W, ref["A"], ref["B"], ref["bias"],
                                                                      layer.scale), target, moves=1e-3)


def test_round_trip_lowrank_full_adapter_full(backend):
    device = _device()
    layer = FusedLowRankLinear(18, 14, rank=4, device=device)
    x = torch.randn(5, 18, device=device)
    y0 = layer(x).detach()
    layer.inflate()
    layer.deflate(init="zeros")
    _randomize_adapter(layer)          # train the adapter a little
    y1 = layer(x).detach()
    assert rel_err(y1, y0) > 1e-3
    layer.inflate()
    assert layer.form == "full"
    assert rel_err(layer(x), y1) < 1e-5


def test_form_changes_that_do_not_apply_raise():
    layer = FusedLowRankLinear(8, 8, rank=2)
    with pytest.raises(RuntimeError, match="deflate applies to full form"):
        layer.deflate()
    layer.inflate()
    with pytest.raises(RuntimeError, match="already in full form"):
        layer.inflate()
    with pytest.raises(ValueError, match="init must be one of"):
        layer.deflate(init="orthogonal")
    with pytest.raises(ValueError, match=r"rank must be in \[1, 8\]"):
        layer.deflate(rank=9)
    assert layer.form == "full"        # a failed change leaves the layer as it was
    layer.deflate()
    _randomize_adapter(layer)          # trained adapters, which a second deflate would throw away
    factors = layer.factors()
    trained = {n: f.detach().clone() for n, f in factors.items()}
    with pytest.raises(RuntimeError, match="is in adapter form; deflate applies to full form"):
        layer.deflate()
    assert layer.form == "adapter" and layer.factors() == factors
    assert all(torch.equal(f, trained[n]) for n, f in factors.items())


# -- from_dense -----------------------------------------------------------------------

def test_from_dense_lowrank_is_best_approximation():
    dense = nn.Linear(20, 15)
    layer = FusedLowRankLinear.from_dense(dense, rank=4)
    W = dense.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W)
    best = (U[:, :4] * S[:4]) @ Vh[:4]
    merged = layer.A.detach().double() @ layer.B.detach().double().t()
    assert rel_err(merged, best) < 1e-5
    # √σ split: both factors carry the same column norms.
    assert torch.allclose(layer.A.norm(dim=0), layer.B.norm(dim=0), rtol=1e-4)
    assert torch.equal(layer.bias, dense.bias)


@pytest.mark.parametrize("alpha", [None, 4.0])
@pytest.mark.parametrize("how", ["from_dense", "deflate svd"])
def test_svd_fit_of_a_rank_deficient_weight_keeps_every_component_trainable(how, alpha):
    """A weight of rank 3 fitted at rank 10: the 7 components beyond its rank had singular value ≈1e-16 and A, B
    columns ≈1e-8, a saddle point that never trained; they now get the zero-output init (A zero, B random)."""
    torch.manual_seed(0)
    dense = nn.Linear(48, 64, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(64, 3, dtype=torch.float64) @ torch.randn(3, 48, dtype=torch.float64))
    if how == "from_dense":
        layer = FusedLowRankLinear.from_dense(dense, rank=10, alpha=alpha)
    else:
        layer = FusedLowRankLinear.from_dense(dense, rank=10, form="full", alpha=alpha).deflate(init="svd")
        assert layer.form == "adapter"
    x = torch.randn(32, 48, dtype=torch.float64)
    y = layer(x)
    assert rel_err(y, dense(x)) < 1e-12
    assert torch.equal(layer.A[:, 3:], torch.zeros(64, 7, dtype=torch.float64))
    assert layer.B[:, 3:].norm(dim=0).min() > 0.5                            # Glorot columns, ‖·‖ ≈ 1.3
    g_A, = torch.autograd.grad((y * torch.randn_like(y)).sum(), [layer.A])
    assert g_A[:, 3:].norm(dim=0).min() > 1e-3 * g_A.norm()                  # every component trains


def test_svd_fit_of_a_full_rank_weight_draws_no_random_numbers():
    """Only zero components draw their B from the RNG (a seeded run's stream is as it was)."""
    def fresh():
        raise AssertionError("no component of a full-rank weight is zero")
    weight = torch.randn(15, 20, dtype=torch.float64)
    A, B = svd_factors(weight, 15, 2.0, fresh)
    assert rel_err(2.0 * A @ B.t(), weight) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_svd_fit_of_a_16_bit_weight_keeps_its_small_real_components(dtype):
    """A 16-bit weight with one dominant direction (σ₁ ≈ 100, the rest ≤ 0.5): with bf16's eps (0.8 % of
    σ_max) as the floor of zero, 127 of 128 components were taken as zero and their part of the product
    dropped.  The floor is capped at float32's eps: the fit is the best rank-128 one, to the dtype's rounding."""
    torch.manual_seed(0)
    n, rank = 256, 128
    W = 100.0 * torch.randn(n, 1) @ torch.randn(1, n) / n + torch.randn(n, n) / n ** 0.5 * 0.25
    dense = nn.Linear(n, n, bias=False, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(W)
    U, S, Vh = torch.linalg.svd(dense.weight.double())
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    layer = FusedLowRankLinear.from_dense(dense, rank=rank)
    assert bool((layer.A != 0).any(dim=0).all())                             # no component taken as zero
    tail = best - (U[:, :1] * S[:1]) @ Vh[:1]                                # the product beyond the top one
    error = (layer.A.double() @ layer.B.double().t() - best).norm() / tail.norm()
    assert error < 0.1                                                       # dtype's rounding (bf16: 0.08)


def test_from_dense_full_rank_and_dense_forms_reproduce_layer():
    dense = nn.Linear(9, 6)
    x = torch.randn(4, 9)
    expected = dense(x).detach()
    for form, rank in [("lowrank", 6), ("full", 3), ("adapter", 3)]:
        layer = FusedLowRankLinear.from_dense(dense, rank=rank, form=form)
        assert layer.form == form
        assert rel_err(layer(x), expected) < 1e-5, form


def test_from_dense_takes_anything_with_a_weight_and_bias():
    """Not only modules, as its docstring says: an object without forward hooks raised an AttributeError."""
    class Holder:
        def __init__(self):
            self.weight = torch.randn(7, 9, dtype=torch.float64)
            self.bias = torch.randn(7, dtype=torch.float64)

    held = Holder()
    layer = FusedLowRankLinear.from_dense(held, rank=7, form="lowrank")
    x = torch.randn(3, 9, dtype=torch.float64)
    assert rel_err(layer(x), x @ held.weight.t() + held.bias) < 1e-12

def test_from_dense_rejects_non_linear():
    with pytest.raises(TypeError, match="2-D weight"):
        FusedLowRankLinear.from_dense(nn.Conv2d(3, 4, 3), rank=2)


@pytest.mark.parametrize("bias_trains", [False, True], ids=["frozen bias", "trained bias"])
@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_from_dense_keeps_the_bias_requires_grad(form, bias_trains):
    """The bias keeps its requires_grad in every form: a frozen one gets no gradient (and stays out of an
    optimizer that takes the trainable parameters), beside a weight that trains as its factors (lowrank),
    as W (full) or through the adapter (adapter)."""
    dense = nn.Linear(9, 6, dtype=torch.float64)
    dense.bias.requires_grad_(bias_trains)
    layer = FusedLowRankLinear.from_dense(dense, rank=6 if form == "lowrank" else 3, form=form)
    trained = {"full": {"weight"}}.get(form, {"A", "B"}) | ({"bias"} if bias_trains else set())
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == trained
    assert torch.equal(layer.bias, dense.bias)
    x = torch.randn(4, 9, dtype=torch.float64)
    y = layer(x)
    assert rel_err(y, dense(x)) < REL_TOL[torch.float64]
    dy = torch.randn_like(y)
    y.backward(dy)
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == trained
    if bias_trains:
        assert rel_err(layer.bias.grad, dy.sum(0)) < REL_TOL[torch.float64]


# -- state dicts across forms ------------------------------------------------------------

@pytest.mark.parametrize("saved_form", ["full", "adapter", "lowrank"])
@pytest.mark.parametrize("target_form", ["lowrank", "full"])
def test_state_dict_loads_across_forms(saved_form, target_form):
    src = FusedLowRankLinear(16, 12, rank=3)
    if saved_form != "lowrank":
        src.inflate()
    if saved_form == "adapter":
        src.deflate(rank=5)
        _randomize_adapter(src)
    x = torch.randn(4, 16)
    expected = src(x).detach()
    dst = FusedLowRankLinear(16, 12, rank=3, form=target_form)
    dst.load_state_dict(src.state_dict())
    assert dst.form == saved_form and dst.rank == src.rank
    assert torch.equal(dst(x), expected)
    if saved_form == "adapter":
        assert not dst.weight.requires_grad and dst.A.requires_grad


def test_plain_linear_state_dict_loads_as_full():
    dense = nn.Linear(10, 4)
    layer = FusedLowRankLinear(10, 4, rank=2)
    layer.load_state_dict(dense.state_dict())
    x = torch.randn(3, 10)
    assert layer.form == "full" and torch.equal(layer(x), dense(x))


def test_state_dict_inside_model_after_inflate_loads_into_fresh_lowrank_model():
    def build():
        torch.manual_seed(1)
        return nn.Sequential(FusedLowRankLinear(8, 16, rank=2), nn.ReLU(), FusedLowRankLinear(16, 4, rank=2))
    trained = build()
    trained[0].inflate()
    sd = trained.state_dict()
    fresh = build()
    fresh.load_state_dict(sd)
    assert [m.form for m in fresh if isinstance(m, FusedLowRankLinear)] == ["full", "lowrank"]
    x = torch.randn(2, 8)
    assert torch.equal(fresh(x), trained(x))


def _bad_state(key, value, saved_form="full", rank=2):
    src = FusedLowRankLinear(8, 6, rank=rank, form=saved_form)
    state = src.state_dict()
    state[key] = value
    return state


@pytest.mark.parametrize("state, message", [
    (_bad_state("weight", torch.randn(6, 7)), r"weight must have shape \(6, 8\) \(full form\), got \(6, 7\)"),
    (_bad_state("B", torch.randn(8, 2), "lowrank", 3),
     r"B must have shape \(8, 3\) \(lowrank form, rank 3\), got \(8, 2\)"),
    (_bad_state("A", torch.randn(6), "adapter", 3), r"the saved factors \{'A': \(6,\), 'B': \(8, 3\)\} give no valid rank"),
    (_bad_state("A", torch.randn(6, 7), "lowrank", 3), r"give no valid rank \(rank must be in \[1, 6\], got 7\)"),
    (_bad_state("bias", torch.randn(5), "lowrank", 3), r"bias must have shape \(6,\) .*got \(5,\)"),
], ids=["dense", "factor", "1-d factor", "rank too large", "bias"])
def test_bad_state_dict_leaves_the_layer_as_it_was(state, message):
    # The form and rank change before torch copies the values: a checkpoint that does not fit must be
    # refused before anything of the layer is reallocated.
    layer = FusedLowRankLinear(8, 6, rank=2, form="lowrank")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match=message + r".*the layer is left as it was \(lowrank form, rank 2\)"):
        layer.load_state_dict(state)
    assert layer.form == "lowrank" and layer.rank == 2
    after = layer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


# -- torch.compile ---------------------------------------------------------------------

@pytest.mark.parametrize("form", ["lowrank", "adapter"])
def test_compiles_without_graph_break(backend, form):
    # Compiled, the Triton path's backward is the lowrank_linear_backward custom op, which eager
    # mode never runs: its gradients are checked here against float64.
    device = _device()
    layer = FusedLowRankLinear(12, 8, rank=3, form=form, alpha=6.0, device=device)
    if form == "adapter":
        _randomize_adapter(layer)
    x = torch.randn(4, 12, device=device, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    assert rel_err(y, _reference_forward(layer, x.detach())) < REL_TOL[torch.float32]
    dy = torch.randn_like(y)
    y.backward(dy)
    _assert_gradients_match_float64(layer, x, dy, REL_TOL[torch.float32])


# -- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("rank, exc, message", [
    (0, ValueError, r"rank must be in \[1, 6\]"),
    (7, ValueError, r"rank must be in \[1, 6\]"),
    (2.5, TypeError, "rank must be an int"),
    (True, TypeError, "rank must be an int"),
])
def test_bad_rank(rank, exc, message):
    with pytest.raises(exc, match=message):
        FusedLowRankLinear(6, 9, rank=rank)


def test_bad_form_and_sizes():
    with pytest.raises(ValueError, match="form must be one of"):
        FusedLowRankLinear(6, 9, rank=2, form="dense")
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        FusedLowRankLinear(0, 9, rank=1)
    with pytest.raises(TypeError, match=r"alpha must be a number or None, got str \('16'\)"):
        FusedLowRankLinear(6, 9, rank=2, alpha="16")


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, "float32"], ids=str)
def test_dtype_must_be_floating_point(dtype):
    from dynrank import LowRankConv2d
    message = rf"dtype must be a floating-point torch.dtype or None, got {re.escape(repr(dtype))}"
    with pytest.raises(TypeError, match=message):
        FusedLowRankLinear(6, 9, rank=2, dtype=dtype)
    with pytest.raises(TypeError, match=message):
        LowRankConv2d(4, 6, 3, rank=2, dtype=dtype)


@pytest.mark.parametrize("alpha", [0, -2.0, float("inf"), float("nan")])
@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_alpha_must_be_finite_and_positive(alpha, form):
    with pytest.raises(ValueError, match=rf"alpha must be a finite number > 0 \(the scale is alpha / rank\), "
                                         rf"got {alpha!r}"):
        FusedLowRankLinear(6, 9, rank=2, form=form, alpha=alpha)


@with_backends(["lowrank", "adapter", "full"])
def test_wrong_last_dimension(backend, form):
    """Named on either engine: on Triton by the operand checks before a kernel, on torch after torch refuses it."""
    layer = FusedLowRankLinear(6, 9, rank=2, form=form, device=_device())
    with pytest.raises(ValueError, match=r"input must have shape \(\.\.\., 6\), got \(3, 5\)"):
        layer(torch.randn(3, 5, device=_device()))


def test_dtype_mismatch(backend):
    layer = FusedLowRankLinear(6, 9, rank=2, form="adapter", device=_device())
    with pytest.raises(TypeError, match="input has dtype torch.float16 but A has torch.float32"):
        layer(torch.randn(3, 6, device=_device(), dtype=torch.float16))


def test_device_mismatch():
    from dynrank.functional import lowrank_linear
    A, B = torch.randn(9, 2), torch.randn(6, 2)
    with pytest.raises(ValueError, match="input is on meta but A is on cpu"):
        lowrank_linear(torch.empty(3, 6, device="meta"), None, A, B)


@pytest.mark.parametrize("dtypes, alpha", [((torch.float32,) * 3, -0.5),
                                           ((torch.float32, torch.bfloat16, torch.bfloat16), -0.5),
                                           ((torch.float16, torch.float32, torch.float16), -0.5),
                                           ((torch.float64,) * 3, -0.5),
                                           ((torch.float32, torch.float64, torch.float64), -0.5e300)],
                         ids=["fp32", "bf16-factors-into-fp32", "mixed-into-fp16", "fp64",
                              "fp64-factors-into-fp32-alpha-past-fp32"])
def test_functional_merge_matches_float64(backend, dtypes, alpha, kernel_calls):
    """``merge_`` on either engine: W += alpha·A·Bᵀ in place, any mix of float dtypes, fp32 products
    (float64 to float64 precision: it takes the torch path whatever the backend, no kernel runs).  An
    alpha past float32's range is taken where a factor is float64 (the product is formed in float64):
    A is scaled by 0.5/|alpha|, so alpha·A·Bᵀ is the same size in every case."""
    w_dtype, a_dtype, b_dtype = dtypes
    device = _device()
    W = torch.randn(33, 20, device=device).to(w_dtype)
    A = torch.randn(33, 5, device=device).to(a_dtype) * (0.5 / abs(alpha))
    B = torch.randn(20, 5, device=device).to(b_dtype)
    expected = W.double() + alpha * (A.double() @ B.double().t())
    assert (alpha * (A.double() @ B.double().t())).norm() > 0.1 * expected.norm()
    ptr = W.data_ptr()
    assert F.merge_(W, A, B, alpha=alpha) is W and W.data_ptr() == ptr and W.dtype == w_dtype
    assert rel_err(W, expected) < REL_TOL[w_dtype]
    assert kernel_calls == (["merge_"] if backend == "triton" and torch.float64 not in dtypes else [])


def test_functional_merge_rejects_bad_input(backend):
    device = _device()
    W, A, B = torch.randn(4, 5, device=device), torch.randn(4, 2, device=device), torch.randn(5, 2, device=device)
    with pytest.raises(ValueError, match=r"A must have shape \(4, R\) and B \(5, R\).*got A \(4, 2\) and B \(6, 2\)"):
        F.merge_(W, A, torch.randn(6, 2, device=device))
    with pytest.raises(ValueError, match="2-D tensors"):
        F.merge_(W[None], A, B)
    with pytest.raises(TypeError, match="floating-point tensors, got A of dtype torch.int64"):
        F.merge_(W, A.long(), B)
    with pytest.raises(ValueError, match="one device"):
        F.merge_(torch.empty(4, 5, device="meta"), A, B)
    expanded = torch.zeros(1, 5, device=device).expand(4, 5)
    with pytest.raises(ValueError, match=r"must not share memory, got a view whose elements overlap \(shape "
                                         r"\(4, 5\), strides \(0, 1\)\)"):
        F.merge_(expanded, A, B)
    assert not expanded.any()
    # An unfold's windows overlap with no zero stride: each write landed on several elements (|W − A·Bᵀ|
    # reached 3.8); transposed and sliced views still pass.
    windows = torch.zeros(8, device=device).unfold(0, 5, 1)
    with pytest.raises(ValueError, match=r"elements overlap \(shape \(4, 5\), strides \(1, 1\)\)"):
        F.merge_(windows, A, B)
    assert not windows.any()
    for view in (torch.zeros(5, 4, device=device).t(), torch.zeros(8, 10, device=device)[::2, 1:6]):
        F.merge_(view, A, B, 0.5)
        torch.testing.assert_close(view, 0.5 * A @ B.t())
    # Interleaved strides whose offsets all differ (row i, column j at 2i + 5j): refused as overlapping.
    storage = torch.zeros(27, device=device)
    interleaved = storage.as_strided((4, 5), (2, 5))
    F.merge_(interleaved, A, B, 0.5)
    torch.testing.assert_close(interleaved, 0.5 * A @ B.t())
    for alpha, exc, message in (("2", TypeError, r"alpha must be a real number, got str \('2'\)"),
                                (float("nan"), ValueError, "alpha must be finite, got nan"),
                                (float("-inf"), ValueError, "alpha must be finite, got -inf")):
        before = W.clone()
        with pytest.raises(exc, match=message):
            F.merge_(W, A, B, alpha)
        assert torch.equal(W, before)


@pytest.mark.parametrize("form", ["lowrank", "adapter"])
@pytest.mark.parametrize("scale, exc, message", [
    ("2", TypeError, r"scale must be a real number, got str \('2'\)"),
    (None, TypeError, r"scale must be a real number, got NoneType \(None\)"),
    (torch.tensor([2.0]), TypeError, r"scale must be a real number, got Tensor"),
    (torch.tensor(1j), TypeError, r"scale must be a real number, got Tensor"),
    (1j, TypeError, r"scale must be a real number, got complex \(1j\)"),
    (float("nan"), ValueError, "scale must be finite, got nan"),
    (float("inf"), ValueError, "scale must be finite, got inf"),
], ids=["str", "None", "1-d tensor", "complex tensor", "complex", "nan", "inf"])
def test_functional_lowrank_linear_rejects_a_bad_scale(form, scale, exc, message):
    """(Refused before any backend is read: the same code on either.)"""
    device = _device()
    x, A, B = torch.randn(3, 5, device=device), torch.randn(4, 2, device=device), torch.randn(5, 2, device=device)
    weight = torch.randn(4, 5, device=device) if form == "adapter" else None
    with pytest.raises(exc, match=message):
        F.lowrank_linear(x, weight, A, B, None, scale)


def test_functional_lowrank_linear_takes_any_real_scale(backend):
    device = _device()
    x, A, B = torch.randn(3, 5, device=device), torch.randn(4, 2, device=device), torch.randn(5, 2, device=device)
    expected = 2 * (x.double() @ B.double()) @ A.double().t()
    for scale in (2, np.float64(2.0), np.int32(2), torch.tensor(2.0), torch.tensor(2)):
        assert rel_err(F.lowrank_linear(x, None, A, B, None, scale), expected) < REL_TOL[torch.float32]


def test_numpy_alpha_gives_a_python_float_scale():
    layer = FusedLowRankLinear(6, 9, rank=2, alpha=np.float32(8.0))
    assert type(layer.alpha) is float and type(layer.scale) is float and layer.scale == 4.0


@pytest.mark.parametrize("form", ["lowrank", "adapter"])
def test_functional_compiles_whole_with_changing_scales(backend, form):
    # Dynamo passes a float argument that changes between calls as a SymFloat; the check of the
    # scale must not break the graph or fail on it.
    device = _device()
    x, A, B = torch.randn(3, 5, device=device), torch.randn(4, 2, device=device), torch.randn(5, 2, device=device)
    weight = torch.randn(4, 5, device=device) if form == "adapter" else None
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, s: F.lowrank_linear(x, weight, A, B, None, s), backend="aot_eager",
                             fullgraph=True)
    for scale in (0.5, 0.25, 3.0):
        expected = scale * (x.double() @ B.double()) @ A.double().t()
        if weight is not None:
            expected = expected + x.double() @ weight.double().t()
        assert rel_err(compiled(x, scale), expected) < REL_TOL[torch.float32]


def test_merge_on_the_torch_engine_compiles_whole_with_changing_alphas(monkeypatch):
    # The same for merge_'s alpha (the Triton merge is not a custom op: it runs eagerly).
    monkeypatch.setenv("DYNRANK_BACKEND", "torch")
    A, B = torch.randn(4, 2), torch.randn(5, 2)
    torch._dynamo.reset()
    merged = torch.compile(lambda W, s: F.merge_(W, A, B, s), backend="aot_eager", fullgraph=True)
    for alpha in (0.5, 0.25, 3.0):
        W = torch.randn(4, 5)
        expected = W.double() + alpha * A.double() @ B.double().t()
        assert rel_err(merged(W, alpha), expected) < REL_TOL[torch.float32]


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv("DYNRANK_BACKEND", "cuda")
    layer = FusedLowRankLinear(6, 9, rank=2)
    with pytest.raises(ValueError, match="DYNRANK_BACKEND must be one of auto, torch, triton, got 'cuda'"):
        layer(torch.randn(3, 6))


@pytest.mark.parametrize("value, engine", [("Triton", "triton"), (" TORCH\n", "torch"), ("Auto", "auto"),
                                           ("", "auto"), ("  ", "auto")])
def test_backend_value_is_read_without_case_or_surrounding_blanks(monkeypatch, value, engine, kernel_calls):
    """The variable's value is stripped and lower-cased (an empty one is the default, auto), so
    ``DYNRANK_BACKEND=Triton`` selects the Triton engine and a layer runs on its kernels."""
    from dynrank import _backend
    monkeypatch.setenv("DYNRANK_BACKEND", value)
    assert _backend.requested_backend() == engine
    if engine == "triton" and not kernel_devices():
        return
    layer = FusedLowRankLinear(6, 9, rank=2, alpha=4.0, device=_device())
    x = torch.randn(3, 6, device=_device())
    assert rel_err(layer(x), _reference_forward(layer, x)) < REL_TOL[torch.float32]
    assert kernel_calls == (["lowrank_linear_forward"] if engine == "triton" else [])


def test_auto_backend_follows_the_measured_table(monkeypatch):
    from dynrank import _backend
    monkeypatch.delenv("DYNRANK_BACKEND", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(_backend, "_triton_available", lambda: True)
    monkeypatch.setattr(_backend, "AUTO_TRITON_OPS", frozenset({"merge"}))
    assert [_backend.backend_for(cuda, op) for op in _backend.OPS] == ["torch", "triton", "torch"]
    assert {_backend.backend_for(cpu, op) for op in _backend.OPS} == {"torch"}
    # An operand the kernels do not take (float64: they accumulate in fp32) sends the op to torch.
    assert _backend.backend_for(cuda, "merge", torch.float32, torch.bfloat16) == "triton"
    assert _backend.backend_for(cuda, "merge", torch.float32, torch.float64) == "torch"
    monkeypatch.setenv("DYNRANK_BACKEND", "triton")
    assert _backend.backend_for(cpu, "lowrank_linear", torch.float16) == "triton"
    assert _backend.backend_for(cpu, "lowrank_linear", torch.float64) == "torch"
    monkeypatch.delenv("DYNRANK_BACKEND")
    monkeypatch.setattr(_backend, "_triton_available", lambda: False)
    assert _backend.backend_for(cuda, "merge") == "torch"
    monkeypatch.setenv("DYNRANK_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        _backend.backend_for(cuda, "merge")
    with pytest.raises(ValueError, match="op must be one of lowrank_linear, merge, conv_merge, got 'conv'"):
        _backend.backend_for(cuda, "conv")


@pytest.mark.parametrize("form", ["lowrank", "adapter"])
def test_triton_backend_leaves_meta_tensors_to_torch(monkeypatch, form):
    """Meta tensors hold no data, so there is nothing for a kernel to run on: with DYNRANK_BACKEND=triton the
    forward and inflate() of a meta layer raised "the Triton backend runs on CUDA or (interpreted) CPU
    tensors, got meta".  They run torch's ops, which give the shapes."""
    from dynrank import _backend
    monkeypatch.setattr(_backend, "_triton_available", lambda: True)
    monkeypatch.setenv("DYNRANK_BACKEND", "triton")
    assert _backend.backend_for(torch.device("meta"), "merge", torch.float32) == "torch"
    layer = FusedLowRankLinear(6, 9, rank=2, form=form, device="meta")     # float32: a dtype the kernels take
    y = layer(torch.empty(4, 3, 6, device="meta"))
    assert y.is_meta and y.shape == (4, 3, 9)
    layer.inflate()
    assert layer.form == "full" and layer.weight.is_meta and layer.weight.shape == (9, 6)


def test_from_dense_of_an_unrun_lazy_linear_says_to_run_it_first():
    """An nn.LazyLinear not run yet has no weight shape: from_dense gave torch's "Attempted to use an
    uninitialized parameter in <method 'dim' ...>"; it names the module and what to do."""
    lazy = nn.LazyLinear(5)
    with pytest.raises(ValueError, match=re.escape("from_dense: the LazyLinear still has uninitialized (lazy) "
                                                   "parameters; run it once on a dummy batch")):
        FusedLowRankLinear.from_dense(lazy, 2)
    x = torch.randn(3, 7)
    lazy(x)
    layer = FusedLowRankLinear.from_dense(lazy, 5, form="full")
    assert (layer.in_features, layer.out_features) == (7, 5) and torch.equal(layer(x), lazy(x))


def test_adapter_inflate_keeps_the_weight_parameter_object():
    layer = FusedLowRankLinear(10, 7, rank=2, form="adapter")
    _randomize_adapter(layer)
    weight = layer.weight
    layer.inflate()
    assert layer.weight is weight and weight.requires_grad
    layer.deflate()
    assert layer.weight is weight and not weight.requires_grad


def test_gradients_only_where_needed(backend):
    """An input that needs no gradient gets none, and the factors' gradients stay right."""
    device = _device()
    layer = FusedLowRankLinear(14, 9, rank=3, form="adapter", device=device)
    _randomize_adapter(layer)
    layer.B.requires_grad_(False)
    x = torch.randn(5, 14, device=device)
    layer(x).square().sum().backward()
    assert layer.B.grad is None and layer.A.grad is not None
    A = layer.A.detach().double().requires_grad_()
    ref = reference_lowrank_linear(x.double(), layer.weight.double(), A, layer.B.double(), layer.bias.double(),
                                   layer.scale)
    ref.square().sum().backward()
    assert rel_err(layer.A.grad, A.grad) < REL_TOL[torch.float32]


@pytest.mark.parametrize("with_weight", [False, True], ids=["lowrank", "weight"])
def test_torch_engine_gradients_by_finite_differences(monkeypatch, with_weight):
    """The torch path's backward (and double backward) against finite differences: the adapter's
    hand-written one, and autograd's for the lowrank form."""
    monkeypatch.setenv("DYNRANK_BACKEND", "torch")
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, A, B, bias = make(2, 3, 5), make(4, 2), make(5, 2), make(4)
    weight = make(4, 5) if with_weight else None
    inputs = (x, weight, A, B, bias) if with_weight else (x, A, B, bias)

    def fn(*args):
        if with_weight:
            return F.lowrank_linear(*args, scale=0.7)
        x_, A_, B_, b_ = args
        return F.lowrank_linear(x_, None, A_, B_, b_, scale=0.7)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    # Only some inputs need a gradient: the others get none, and nothing is formed for them.
    x.requires_grad_(False)
    bias.requires_grad_(False)
    fn(*inputs).sum().backward()
    assert x.grad is None and bias.grad is None and A.grad is not None and B.grad is not None


def _graph_nodes(root):
    seen, todo = [], [root]
    while todo:
        node = todo.pop()
        if node is None or any(node is n for n in seen):
            continue
        seen.append(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return seen


def test_torch_engine_graphs(monkeypatch):
    """Lowrank: autograd's own nodes (the same GEMMs as a fused node, less host time); adapter: one
    Python node (5 GEMMs in its backward where autograd's nodes would launch 8 kernels)."""
    monkeypatch.setenv("DYNRANK_BACKEND", "torch")
    python_node = torch.autograd.function.BackwardCFunction
    x = torch.randn(3, 8, requires_grad=True)
    A, B, bias = torch.randn(6, 2, requires_grad=True), torch.randn(8, 2, requires_grad=True), torch.randn(6)
    # The outputs stay referenced while the graph is walked: a Python node's object holds its graph
    # node weakly, and torch 2.11 frees the node with a temporary output (then next_functions raises).
    y_lowrank = F.lowrank_linear(x, None, A, B, bias, 0.5)
    lowrank = _graph_nodes(y_lowrank.grad_fn)
    assert lowrank and not any(isinstance(node, python_node) for node in lowrank)
    y_adapter = F.lowrank_linear(x, torch.randn(6, 8), A, B, bias, 0.5)
    adapter = _graph_nodes(y_adapter.grad_fn)
    assert sum(isinstance(node, python_node) for node in adapter) == 1


@pytest.mark.skipif(not kernel_devices(), reason="no Triton device (CUDA or the interpreter)")
def test_the_triton_path_refuses_a_double_backward(monkeypatch):
    monkeypatch.setenv("DYNRANK_BACKEND", "triton")
    device = _device()
    x = torch.randn(4, 8, device=device, requires_grad=True)
    A, B = torch.randn(6, 2, device=device, requires_grad=True), torch.randn(8, 2, device=device)
    y = F.lowrank_linear(x, None, A, B)
    (gx,) = torch.autograd.grad(y.sum(), x)                  # first order: fine
    assert gx.shape == x.shape
    with pytest.raises(RuntimeError, match="no double backward.*DYNRANK_BACKEND=torch"):
        torch.autograd.grad(F.lowrank_linear(x, None, A, B).sum(), x, create_graph=True)


def test_scaled_products_reuse_one_zero_per_device_and_dtype():
    """s·(a·b) through addmm with beta = 0: its ignored input is one cached zero per (device, dtype)."""
    a, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(F._scaled_mm(a, b, 0.5), 0.5 * (a @ b))
    zero = F._BETA0_INPUTS[(a.device, torch.float64)]
    torch.testing.assert_close(F._scaled_mm(a, b, 3.0), 3.0 * (a @ b))
    assert F._BETA0_INPUTS[(a.device, torch.float64)] is zero
    F._scaled_mm(a.float(), b.float(), 0.5)
    assert F._BETA0_INPUTS[(a.device, torch.float32)] is not zero
    # With beta = 0 the input's value is never read: a NaN there does not reach the product.
    zero.fill_(float("nan"))
    try:
        torch.testing.assert_close(F._scaled_mm(a, b, 0.5), 0.5 * (a @ b))
    finally:
        zero.zero_()


def test_the_cached_zero_serves_inside_a_capture_and_none_is_kept_from_one(monkeypatch):
    """During a CUDA-graph capture a zero made there is never filled, so it is not kept; a zero kept
    before serves, and the capture status (a CUDA runtime query) is asked only when none is kept."""
    asked = []
    monkeypatch.setattr(F, "_capturing", lambda a: asked.append(a) or True)       # as if capturing
    monkeypatch.setattr(F, "_BETA0_INPUTS", {})
    a, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(F._scaled_mm(a, b, 0.5), 0.5 * (a @ b))
    assert len(asked) == 1 and F._BETA0_INPUTS == {}                 # made in the capture: not kept
    monkeypatch.setattr(F, "_capturing", lambda a: asked.append(a) or False)
    F._scaled_mm(a, b, 0.5)
    zero = F._BETA0_INPUTS[(a.device, torch.float64)]
    assert len(asked) == 2
    monkeypatch.setattr(F, "_capturing", lambda a: asked.append(a) or True)
    for _ in range(3):
        torch.testing.assert_close(F._scaled_mm(a, b, 2.0), 2.0 * (a @ b))
    assert len(asked) == 2 and F._BETA0_INPUTS[(a.device, torch.float64)] is zero   # kept: not asked


@pytest.mark.parametrize("allow_real", [False, True])
def test_a_fake_tensor_run_leaves_no_fake_zero_for_later_real_runs(allow_real, monkeypatch):
    """A dry run under FakeTensorMode (shape or memory estimates) used the cache: a real zero cached
    before failed the strict mode's run; with allow_non_fake_inputs the run cached a fake zero, and a
    later real adapter forward with alpha gave a wrong output."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    monkeypatch.setattr(F, "_BETA0_INPUTS", {})              # empty here, the process's cache kept
    torch.manual_seed(0)
    layer = FusedLowRankLinear(16, 5, rank=2, form="adapter", alpha=4.0, dtype=torch.float64)
    with torch.no_grad():
        layer.A.normal_()
    x = torch.randn(3, 16, dtype=torch.float64)
    if not allow_real:
        F._scaled_mm(x, x.t(), 0.5)                               # a real zero cached before
    with FakeTensorMode(allow_non_fake_inputs=allow_real) as mode:
        fake = FusedLowRankLinear(8, 6, rank=4, form="adapter", alpha=8.0, dtype=torch.float64)
        fake_x = mode.from_tensor(torch.randn(2, 8, dtype=torch.float64))
        assert isinstance(fake(fake_x), FakeTensor)
    assert all(type(z) is torch.Tensor for z in F._BETA0_INPUTS.values())
    ref = (x @ (layer.weight + layer.scale * layer.A @ layer.B.t()).t() + layer.bias).detach()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert rel_err(layer(x), ref) < 1e-12


def test_lowrank_linear_names_b_and_refuses_a_scale_that_would_lose_its_gradient():
    """A B of the wrong input size was reported as the weight's or the input's fault, an A of the wrong
    output size as the weight's; a scale tensor that requires grad was read as a number, so it never
    trained (only torch's generic warning said so)."""
    x, W, A = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4, 2)
    with pytest.raises(ValueError, match=re.escape("B must have shape (8, 2) for an input of shape (3, 8), "
                                                   "got (7, 2)")):
        F.lowrank_linear(x, W, A, torch.randn(7, 2))           # "weight must have shape (4, 7)" before
    with pytest.raises(ValueError, match=re.escape("input must have shape (..., 7), got (3, 8)")):
        F.lowrank_linear(x, None, A, torch.randn(7, 2))        # without a weight, either may be wrong
    B, bias = torch.randn(8, 2), torch.randn(4)
    with pytest.raises(ValueError, match=re.escape("A must have shape (4, 2) to match weight (4, 8), got (7, 2)")):
        F.lowrank_linear(x, W, torch.randn(7, 2), B, bias)     # "weight must have shape (7, 8)" before
    with pytest.raises(ValueError, match=re.escape("bias must have shape (7,), got (4,) (A (7, 2) gives the "
                                                   "output size)")):
        F.lowrank_linear(x, None, torch.randn(7, 2), B, bias)  # without a weight, A or the bias may be wrong
    scale = torch.tensor(0.5, requires_grad=True)
    with pytest.raises(TypeError, match="scale is read as a number, so a tensor that requires grad would get no "
                                        "gradient"):
        F.lowrank_linear(x, W, A, torch.randn(8, 2), None, scale)
    B = torch.randn(8, 2, dtype=torch.float64)
    y = F.lowrank_linear(x.double(), W.double(), A.double(), B, None, torch.tensor(0.5))     # a plain 0-d tensor
    torch.testing.assert_close(y, x.double() @ W.double().t() + 0.5 * (x.double() @ B) @ A.double().t())
