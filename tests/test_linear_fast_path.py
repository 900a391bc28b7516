"""The low-rank linear's eager torch path: operand mistakes named without up-front checks, the big
GEMM launched first, no autograd node where nothing needs a gradient, the layer's parameter reads and
the backend variable's reader."""

import os

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from _helpers import REL_TOL, kernel_devices, rel_err
from dynrank import FusedLowRankLinear
from dynrank import _backend
from dynrank import functional as F
from dynrank.kernels import reference_lowrank_linear

T, K, N, R = 5, 7, 11, 3  # all different, so a GEMM is known by its shapes


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("DYNRANK_BACKEND", "torch")


def _operands(with_weight, **changes):
    gen = torch.Generator().manual_seed(0)
    ops = dict(x=torch.randn(T, K, generator=gen), weight=torch.randn(N, K, generator=gen) if with_weight else None,
               A=torch.randn(N, R, generator=gen), B=torch.randn(K, R, generator=gen), bias=torch.randn(N, generator=gen))
    ops.update(changes)
    return ops


# Each mistake, and the error that names it.  torch's own ops refuse the first group (lowrank_linear
# then says which operand is at fault); it would accept the second group silently, so those are
# caught before any op runs.
MISTAKES = [
    ("A float64", dict(A=torch.randn(N, R, dtype=torch.float64)), TypeError,
     "input has dtype torch.float32 but A has torch.float64"),
    ("B float16", dict(B=torch.randn(K, R, dtype=torch.float16)), TypeError,
     "input has dtype torch.float32 but B has torch.float16"),
    ("bias float64", dict(bias=torch.randn(N, dtype=torch.float64)), TypeError,
     "input has dtype torch.float32 but bias has torch.float64"),
    ("input's last dim", dict(x=torch.randn(T, K + 1)), ValueError, rf"input must have shape \(\.\.\., {K}\)"),
    ("B's rank", dict(B=torch.randn(K, R + 1)), ValueError, rf"B must have shape \({K}, {R}\)"),
    ("0-d input", dict(x=torch.tensor(1.0)), ValueError, rf"input must have shape \(\.\.\., {K}\), got \(\)"),
    ("bias (N, 1)", dict(bias=torch.randn(N, 1)), ValueError, rf"bias must have shape \({N},\), got \({N}, 1\)"),
    # accepted silently by torch:
    ("bias (1,)", dict(bias=torch.randn(1)), ValueError, rf"bias must have shape \({N},\), got \(1,\)"),
    ("0-d bias", dict(bias=torch.tensor(0.5)), ValueError, rf"bias must have shape \({N},\), got \(\)"),
    ("bias (T, N)", dict(bias=torch.randn(T, N)), ValueError, rf"bias must have shape \({N},\)"),
    ("A 1-D", dict(A=torch.randn(N)), ValueError, "A and B must be 2-D"),
    ("B 3-D", dict(B=torch.randn(2, K, R)), ValueError, "A and B must be 2-D"),
    ("integer operands", dict(x=torch.ones(T, K, dtype=torch.long), A=torch.ones(N, R, dtype=torch.long),
                              B=torch.ones(K, R, dtype=torch.long), bias=None),
     TypeError, "input must be a floating-point tensor, got torch.int64"),
    ("A on meta", dict(A=torch.empty(N, R, device="meta")), ValueError, "input is on cpu but A is on meta"),
    ("bias on meta", dict(bias=torch.empty(N, device="meta")), ValueError, "input is on cpu but bias is on meta"),
    ("A a list", dict(A=[[1.0] * R] * N), TypeError, "A must be a torch.Tensor, got list"),
    ("A None", dict(A=None), TypeError, "A must be a torch.Tensor, got NoneType"),   # was an AttributeError
    ("B None", dict(B=None), TypeError, "B must be a torch.Tensor, got NoneType"),
]


@pytest.mark.parametrize("with_weight", [False, True], ids=["lowrank", "adapter"])
@pytest.mark.parametrize("what, changes, exc, message", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_operand_mistakes_are_named(with_weight, what, changes, exc, message):
    ops = _operands(with_weight, **changes)
    if ops["x"].is_floating_point():
        ops["x"].requires_grad_()
    with pytest.raises(exc, match=message):
        F.lowrank_linear(ops["x"], ops["weight"], ops["A"], ops["B"], ops["bias"], 0.5)


@pytest.mark.parametrize("changes, message", [
    (dict(weight=torch.randn(N, K + 1)), rf"weight must have shape \({N}, {K}\), got \({N}, {K + 1}\)"),
    (dict(weight=torch.randn(N, K, dtype=torch.float64)), "input has dtype torch.float32 but weight has torch.float64"),
    (dict(weight=torch.empty(N, K, device="meta")), "input is on cpu but weight is on meta"),
], ids=["shape", "dtype", "meta"])
def test_adapter_weight_mistakes_are_named(changes, message):
    ops = _operands(True, **changes)
    with pytest.raises((ValueError, TypeError), match=message):
        F.lowrank_linear(ops["x"].requires_grad_(), ops["weight"], ops["A"], ops["B"], ops["bias"], 0.5)


@pytest.mark.parametrize("transform", ["vmap", "grad", "forward_ad"])
@pytest.mark.parametrize("changes, message", [
    (dict(weight=torch.randn(1, K)), rf"weight must have shape \({N}, {K}\), got \(1, {K}\)"),
    (dict(A=torch.randn(1, R)), rf"A must have shape \({N}, {R}\) to match weight \({N}, {K}\), got \(1, {R}\)"),
], ids=["weight one row", "A one row"])
def test_mismatched_rows_are_named_under_transforms(transform, changes, message):
    """torch.func's transforms and forward-mode AD take autograd's own ops, where a (1, K) weight (or a
    (1, R) A) broadcast against the other term and came back as an output of the wrong function."""
    ops = _operands(True, **changes)
    call = lambda x: F.lowrank_linear(x, ops["weight"], ops["A"], ops["B"], ops["bias"], 0.5)  # noqa: E731
    with pytest.raises(ValueError, match=message):
        if transform == "vmap":
            torch.func.vmap(call)(ops["x"])
        elif transform == "grad":
            torch.func.grad(lambda x: call(x).sum())(ops["x"])
        else:
            with torch.autograd.forward_ad.dual_level():
                call(torch.autograd.forward_ad.make_dual(ops["x"], torch.ones_like(ops["x"])))

@pytest.mark.parametrize("with_weight", [False, True], ids=["lowrank", "adapter"])
def test_an_error_that_is_not_the_operands_passes_through(monkeypatch, with_weight):
    """A failure with sound operands (out of memory, say) is raised as it came, not renamed."""
    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(F, "_torch_lowrank_linear", out_of_memory)
    ops = _operands(with_weight)
    with pytest.raises(RuntimeError, match=r"out of memory \(simulated\)"):
        F.lowrank_linear(ops["x"], ops["weight"], ops["A"], ops["B"], ops["bias"], 0.5)


def test_all_meta_operands_run():
    """Meta tensors throughout are a valid call (shape inference); only a mix of meta and real is refused."""
    meta = {k: (None if v is None else v.to("meta")) for k, v in _operands(True).items()}
    y = F.lowrank_linear(meta["x"], meta["weight"], meta["A"], meta["B"], meta["bias"], 0.5)
    assert y.device.type == "meta" and y.shape == (T, N)


class _GemmLog(TorchDispatchMode):
    """The ops dispatched while active that compute (views and detaches left out), and of those the
    GEMMs: (first operand's shape, output's shape)."""

    GEMMS = {"mm", "addmm", "addmm_"}
    VIEWS = {"t", "transpose", "view", "_unsafe_view", "reshape", "expand", "detach", "alias", "as_strided",
             "permute", "unsqueeze", "squeeze"}

    def __init__(self):
        super().__init__()
        self.gemms = []
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.ops.append(name)
        if name in self.GEMMS:
            first = args[1] if name.startswith("addmm") else args[0]
            self.gemms.append((tuple(first.shape), tuple(out.shape)))
        return out


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_adapter_launches_the_big_gemm_first(grad):
    """x·W_fᵀ is the forward's first GEMM and dy·W_f the backward's: on a GPU the host's work on the
    small ones then overlaps the big one instead of delaying its launch.  The backward is five GEMMs
    and nothing else (autograd's own nodes would add a mul per scaled gradient and a sum)."""
    ops = _operands(True)
    A = ops["A"].requires_grad_(grad)
    B = ops["B"].requires_grad_(grad)
    x = ops["x"].requires_grad_(grad)
    F._beta0_input(x)             # the cached zero exists (made once per process, not per call)
    with _GemmLog() as forward:
        y = F.lowrank_linear(x, ops["weight"], A, B, ops["bias"], 0.5)
    assert forward.gemms[0] == ((T, K), (T, N))
    assert sorted(forward.gemms[1:]) == sorted([((T, K), (T, R)), ((T, R), (T, N))])
    assert forward.ops == ["addmm", "addmm", "addmm_"]      # x·W_fᵀ + b, s·x·B, y += xbs·Aᵀ: nothing else
    expected = reference_lowrank_linear(*(t.detach().double() for t in (x, ops["weight"], A, B, ops["bias"])), 0.5)
    assert rel_err(y, expected) < REL_TOL[torch.float32]
    if not grad:
        assert y.grad_fn is None
        return
    assert type(y.grad_fn).__name__ == "_TorchAdapterLinearBackward"
    dy = torch.randn(T, N)
    with _GemmLog() as backward:
        y.backward(dy)
    assert backward.gemms[0] == ((T, N), (T, K))
    assert len(backward.gemms) == 5 and len(backward.ops) == 5, backward.ops


@pytest.mark.parametrize("scale", [0.5, 1.0])
@pytest.mark.parametrize("with_bias, trainable", [(True, "factors"), (True, "factors+bias"),
                                                  (True, "factors+bias+weight"), (False, "factors"),
                                                  (False, "factors+weight")])
def test_adapter_values_and_gradients(scale, with_bias, trainable):
    """The torch path's adapter against float64 math: output and every gradient asked for, with and
    without a bias and a scale, with a trainable bias and weight beside the factors."""
    ops = _operands(True, bias=torch.randn(N) if with_bias else None)
    trained = {"x", "A", "B"} | ({"bias"} if "bias" in trainable else set()) | ({"weight"} if "weight" in trainable
                                                                                else set())
    ops = {k: (None if v is None else v.double().requires_grad_(k in trained)) for k, v in ops.items()}
    dy = torch.randn(T, N, dtype=torch.float64)
    y = F.lowrank_linear(ops["x"], ops["weight"], ops["A"], ops["B"], ops["bias"], scale)
    names = [k for k in ("x", "weight", "A", "B", "bias") if ops[k] is not None and k in trained]
    got = dict(zip(names, torch.autograd.grad(y, [ops[k] for k in names], dy)))
    x, W, A, B, b = (ops[k].detach() if ops[k] is not None else None for k in ("x", "weight", "A", "B", "bias"))
    assert torch.allclose(y, x @ W.T + scale * (x @ B) @ A.T + (0 if b is None else b), rtol=1e-12, atol=1e-12)
    expected = {"x": dy @ W + scale * dy @ A @ B.T, "weight": dy.T @ x, "A": scale * dy.T @ (x @ B),
                "B": scale * x.T @ (dy @ A), "bias": dy.sum(0)}
    for name, g in got.items():
        assert torch.allclose(g, expected[name], rtol=1e-12, atol=1e-12), name


def test_inference_path_matches_the_training_path():
    """With nothing to differentiate the adapter runs the engine's ops without the autograd node:
    the same ops in the same order, so the same bits."""
    ops = _operands(True)
    A = ops["A"].requires_grad_()
    trained = F.lowrank_linear(ops["x"], ops["weight"], A, ops["B"], ops["bias"], 0.5)
    with torch.no_grad():
        inferred = F.lowrank_linear(ops["x"], ops["weight"], A, ops["B"], ops["bias"], 0.5)
    assert trained.grad_fn is not None and inferred.grad_fn is None
    assert torch.equal(trained, inferred)


# -- the layer's parameter reads ------------------------------------------------------------------

class _Doubled(nn.Module):
    def forward(self, t):
        return 2.0 * t


@pytest.mark.parametrize("form, name", [("lowrank", "A"), ("adapter", "B"), ("full", "weight"), ("lowrank", "bias")])
def test_a_parametrized_parameter_is_the_one_used(form, name):
    """A parametrization moves the parameter out of ``_parameters``: the forward then reads it through
    the parametrization."""
    layer = FusedLowRankLinear(K, N, rank=R, form=form, alpha=6.0)
    if form == "adapter":
        with torch.no_grad():
            layer.A.normal_()
    parametrize.register_parametrization(layer, name, _Doubled())
    x = torch.randn(T, K)
    double = lambda t: None if t is None else t.detach().double()  # noqa: E731
    operands = [double(getattr(layer, n)) for n in ("weight", "A", "B", "bias")]
    if form == "full":
        expected = x.double() @ operands[0].t() + operands[3]
    else:
        expected = reference_lowrank_linear(x.double(), *operands, layer.scale)
    assert rel_err(layer(x), expected) < REL_TOL[torch.float32]
    original = double(getattr(layer.parametrizations, name).original)
    assert rel_err(operands[["weight", "A", "B", "bias"].index(name)], 2.0 * original) < 1e-12


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_every_form_reads_its_parameters(bias):
    """The forward's parameter reads through a round of form changes, with and without a bias (a layer
    without one holds ``bias`` as a plain attribute, not in ``_parameters``)."""
    layer = FusedLowRankLinear(K, N, rank=R, bias=bias, form="lowrank", alpha=6.0)
    x = torch.randn(T, K)
    double = lambda t: None if t is None else t.detach().double()  # noqa: E731
    for change in (None, "inflate", "deflate", "inflate"):
        if change == "deflate":
            layer.deflate(init="random")
        elif change:
            layer.inflate()
        weight, A, B, b = (double(getattr(layer, n)) for n in ("weight", "A", "B", "bias"))
        if layer.form == "full":
            expected = x.double() @ weight.t() + (0.0 if b is None else b)
        else:
            expected = reference_lowrank_linear(x.double(), weight, A, B, b, layer.scale)
        assert rel_err(layer(x), expected) < REL_TOL[torch.float32], layer.form


def test_full_form_names_input_mistakes():
    layer = FusedLowRankLinear(K, N, rank=R, form="full")
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        layer([[1.0] * K])
    with pytest.raises(TypeError, match="input has dtype torch.float64 but weight has torch.float32"):
        layer(torch.randn(T, K, dtype=torch.float64))
    with pytest.raises(ValueError, match="input is on meta but weight is on cpu"):
        layer(torch.empty(T, K, device="meta"))
    with pytest.raises(ValueError, match="input is on cpu but weight is on meta"):
        layer.to("meta")(torch.randn(T, K))


# -- the backend variable's reader ----------------------------------------------------------------

def test_the_environment_reader_sees_every_change(monkeypatch):
    name = "DYNRANK_TEST_READER_VARIABLE"
    monkeypatch.delenv(name, raising=False)
    read = _backend._environ_reader(name)
    assert read() is None
    monkeypatch.setenv(name, "triton")
    assert read() == "triton"
    os.environ[name] = "tórch"          # non-ASCII round-trips as os.environ.get gives it
    assert read() == os.environ.get(name) == "tórch"
    del os.environ[name]
    assert read() is None
    # os.environ replaced (as some test helpers do): the reader follows the new mapping.
    monkeypatch.setattr(os, "environ", {name: "auto"})
    assert read() == "auto"


def test_the_environment_reader_falls_back_without_cpythons_dict(monkeypatch):
    class PlainMapping(dict):
        """An environment without CPython's ``_data``/``encodekey``."""
    name = "DYNRANK_TEST_READER_VARIABLE"
    env = PlainMapping({name: "torch"})
    monkeypatch.setattr(os, "environ", env)
    read = _backend._environ_reader(name)
    assert read() == "torch"
    env[name] = "triton"
    assert read() == "triton"


# -- merge_ -------------------------------------------------------------------------------------

def test_merge_into_a_parameter_in_grad_mode():
    """merge_ runs outside autograd whatever the mode: a trainable parameter is updated in place and
    stays a leaf."""
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(N, K, generator=gen))
    A, B = torch.randn(N, R, generator=gen, requires_grad=True), torch.randn(K, R, generator=gen)
    expected = weight.detach().double() + 0.5 * A.detach().double() @ B.double().t()
    assert F.merge_(weight, A, B, 0.5) is weight
    assert weight.grad_fn is None and weight.requires_grad and torch.is_grad_enabled()
    assert rel_err(weight, expected) < REL_TOL[torch.float32]


@pytest.mark.parametrize("args, exc, message", [
    (([[0.0] * K] * N, torch.randn(N, R), torch.randn(K, R)), TypeError, "merge_ takes tensors, got weight of type list"),
    ((torch.randn(N, K), torch.randn(N, R), None), TypeError, "got B of type NoneType"),
    ((torch.randn(N, K), torch.randn(N, R), torch.randn(K + 1, R)), ValueError, r"A must have shape \(11, R\)"),
    ((torch.randn(N, K), torch.randn(N, R, dtype=torch.float64), torch.randn(K, R, device="meta")), ValueError,
     "one device"),
], ids=["weight a list", "B None", "B's rows", "B on meta"])
def test_merge_mistakes_are_named(args, exc, message):
    with pytest.raises(exc, match=message):
        F.merge_(*args)


# -- scale and alpha checks under torch.compile ---------------------------------------------------

_SCALE_MISTAKES = [
    ("scale requires grad", "lowrank_linear", lambda: torch.tensor(0.5, requires_grad=True), TypeError,
     "scale is read as a number, so a tensor that requires grad would get no gradient"),
    ("nan scale", "lowrank_linear", lambda: float("nan"), ValueError, "scale must be finite, got nan"),
    ("inf alpha", "merge_", lambda: float("inf"), ValueError, "alpha must be finite, got inf"),
    ("nan alpha", "merge_", lambda: float("nan"), ValueError, "alpha must be finite, got nan"),
    ("alpha requires grad", "merge_", lambda: torch.tensor(0.5, requires_grad=True), TypeError,
     "alpha is read as a number, so a tensor that requires grad would get no gradient"),
]


@pytest.mark.parametrize("engine", ["torch", "triton"])
@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph-breaks", "fullgraph"])
@pytest.mark.parametrize("what, op, make, exc, message", _SCALE_MISTAKES, ids=[m[0] for m in _SCALE_MISTAKES])
def test_compiled_calls_refuse_the_scales_eager_refuses(monkeypatch, engine, fullgraph, what, op, make, exc, message):
    """Compiled, the checks were skipped: a scale tensor that requires grad ran and never got a gradient,
    a NaN scale gave an all-NaN output, a NaN alpha filled the weight with NaN in place.  (Both engines
    check before dispatch, so no kernel runs here.)"""
    monkeypatch.setenv("DYNRANK_BACKEND", engine)
    ops = _operands(True)
    weight = ops["weight"].clone()
    if op == "lowrank_linear":
        call = lambda x, value: F.lowrank_linear(x, weight, ops["A"], ops["B"], ops["bias"], value)
        first = ops["x"]
    else:
        call = lambda w, value: F.merge_(w, ops["A"], ops["B"], value)
        first = weight
    with pytest.raises(exc, match=message):
        call(first, make())
    torch._dynamo.reset()
    compiled = torch.compile(call, backend="aot_eager", fullgraph=fullgraph)
    # Under fullgraph dynamo refuses the frame with its own error, which quotes the check's.
    with pytest.raises(exc if not fullgraph else Exception, match=message):
        compiled(first, make())
    assert torch.equal(weight, ops["weight"])          # merge_ wrote nothing


@pytest.mark.parametrize("engine", ["torch", "triton"])
@pytest.mark.parametrize("op, value", [("lowrank_linear", float("inf")), ("merge_", float("nan"))])
def test_compiled_calls_read_a_tensor_scale_and_refuse_it_as_eager(monkeypatch, engine, op, value):
    """A 0-d tensor scale or alpha went unread while compiling: an inf scale gave an inf/NaN output and a
    NaN alpha merged A·Bᵀ with alpha 1, without a word.  It is read (a graph break) and refused."""
    monkeypatch.setenv("DYNRANK_BACKEND", engine)
    ops = _operands(True)
    weight = ops["weight"].clone()
    if op == "lowrank_linear":
        call, first, name = (lambda x, s: F.lowrank_linear(x, weight, ops["A"], ops["B"], None, s)), ops["x"], "scale"
    else:
        call, first, name = (lambda w, s: F.merge_(w, ops["A"], ops["B"], s)), weight, "alpha"
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=f"{name} must be finite, got {value}"):
        torch.compile(call, backend="aot_eager")(first, torch.tensor(value))
    assert torch.equal(weight, ops["weight"])


def test_compiled_calls_still_take_a_scale_tensor_without_grad():
    """Compiled (graph breaks allowed), a 0-d tensor scale or alpha that needs no gradient is read as in eager mode."""
    ops = _operands(True)
    x, weight, A, B = ops["x"], ops["weight"], ops["A"], ops["B"]
    torch._dynamo.reset()
    y = torch.compile(lambda x, s: F.lowrank_linear(x, weight, A, B, None, s), backend="aot_eager")(x, torch.tensor(0.5))
    expected = x.double() @ (weight.double() + 0.5 * A.double() @ B.double().t()).t()
    assert rel_err(y, expected) < REL_TOL[torch.float32]
    merged = torch.compile(lambda w, s: F.merge_(w, A, B, s), backend="aot_eager")(weight.clone(), torch.tensor(0.5))
    assert rel_err(merged, weight.double() + 0.5 * A.double() @ B.double().t()) < REL_TOL[torch.float32]


# -- batched backward through the Triton path -------------------------------------------------------

@pytest.mark.skipif(not kernel_devices(), reason="no Triton device (CUDA or the interpreter)")
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")    # torch.func.vmap's addmm_ fallback
@pytest.mark.parametrize("with_weight", [False, True], ids=["lowrank", "adapter"])
@pytest.mark.parametrize("how", ["jacobian vectorize", "is_grads_batched", "vmap over grad"])
def test_a_batched_backward_through_the_triton_path(monkeypatch, with_weight, how):
    """The Triton node handed the vmapped gradient of a batched backward to its kernels, which failed with
    "Cannot access storage of BatchedTensorImpl"; it now takes torch's GEMMs, as the torch engine does,
    and keeps no vmapped zero for later calls."""
    monkeypatch.setenv("DYNRANK_BACKEND", "triton")
    monkeypatch.setattr(F, "_BETA0_INPUTS", {})
    device = kernel_devices()[0]
    ops = {k: (None if v is None else v.to(device)) for k, v in _operands(with_weight).items()}
    names = [k for k in ("x", "weight", "A", "B", "bias") if ops[k] is not None]
    leaves = [ops[k].requires_grad_() for k in names]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]

    def call(operands, function):
        given = dict(zip(names, operands))
        return function(given["x"], given.get("weight"), given["A"], given["B"], given["bias"], 0.5)

    if how == "jacobian vectorize":
        got = torch.autograd.functional.jacobian(lambda *t: call(t, F.lowrank_linear), tuple(leaves), vectorize=True)
        expected = torch.autograd.functional.jacobian(lambda *t: call(t, reference_lowrank_linear), tuple(leaves64))
    else:
        grads = torch.randn(4, T, N, dtype=torch.float64, device=device)
        y, y64 = call(leaves, F.lowrank_linear), call(leaves64, reference_lowrank_linear)
        if how == "is_grads_batched":
            got = torch.autograd.grad(y, leaves, grads.float(), is_grads_batched=True)
        else:
            got = torch.func.vmap(lambda g: torch.autograd.grad(y, leaves, g, retain_graph=True))(grads.float())
        expected = [torch.stack(parts) for parts in zip(*(torch.autograd.grad(y64, leaves64, g, retain_graph=True)
                                                           for g in grads))]
    for name, g, e in zip(names, got, expected):
        assert e.abs().max() > 0 and rel_err(g, e) < REL_TOL[torch.float32], name
    assert all(not F._batched(zero) for zero in F._BETA0_INPUTS.values())
