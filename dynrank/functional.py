"""Functional ops of dynrank: the fused low-rank linear and the in-place merge.

Both dispatch per op and device (see :mod:`dynrank._backend`): the Triton
kernels where ``DYNRANK_BACKEND`` or the measured ``auto`` choice picks them,
plain torch (cuBLAS on CUDA) elsewhere.  The Triton path is registered as the
custom ops ``dynrank::lowrank_linear`` and ``dynrank::lowrank_linear_backward``
so ``torch.compile`` treats it as one opaque node instead of breaking the graph.
"""

import contextlib
import functools
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._args import check_real
from ._backend import backend_for

__all__ = ["lowrank_linear", "merge_"]


def _autocast_devices():
    found = set()
    for device_type in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu"):
        try:
            if torch.amp.is_autocast_available(device_type):
                found.add(device_type)
        except (RuntimeError, ValueError):
            pass
    return frozenset(found)


# Read once: torch.compile cannot trace torch.amp.is_autocast_available in torch < 2.12.
_AUTOCAST_DEVICES = _autocast_devices()


def _check_operands(x, weight, A, B, bias):
    """Validate user-facing operands of lowrank_linear; returns (N, K, R)."""
    for name, t in (("x", x), ("A", A), ("B", B), ("weight", weight), ("bias", bias)):
        if (t is not None or name in ("A", "B")) and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor{'' if name in ('A', 'B') else ' or None'}, "
                            f"got {type(t).__name__}")
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"A and B must be 2-D, got A {tuple(A.shape)} and B {tuple(B.shape)}")
    N, R = A.shape
    K = B.shape[0]
    if B.shape[1] != R:
        raise ValueError(f"B must have shape ({K}, {R}) to match A {tuple(A.shape)}, got {tuple(B.shape)}")
    in_size = last_size(x)
    if weight is not None and in_size not in (None, K) and weight.shape[-1:] == (in_size,):
        # The input and the weight agree on the input size; B's rows do not.
        raise ValueError(f"B must have shape ({in_size}, {R}) for an input of shape {shape_of(x)}, "
                         f"got {tuple(B.shape)}")
    if weight is not None and tuple(weight.shape) != (N, K):
        if weight.dim() == 2 and weight.shape[1] == K and (bias is None or tuple(bias.shape) == weight.shape[:1]):
            # The weight (and the bias) agree on the output size; A's rows do not.
            raise ValueError(f"A must have shape ({weight.shape[0]}, {R}) to match weight {tuple(weight.shape)}, "
                             f"got {tuple(A.shape)}")
        raise ValueError(f"weight must have shape ({N}, {K}), got {tuple(weight.shape)} (A {tuple(A.shape)} and "
                         f"B {tuple(B.shape)} give the output and input sizes)")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)} (A {tuple(A.shape)} gives the "
                         f"output size)")
    if in_size != K:
        raise ValueError(f"input must have shape (..., {K}), got {shape_of(x)}")
    check_floating_input(x)
    for name, t in (("A", A), ("B", B), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_matches_input(x, name, t)
    return N, K, R


def last_size(x):
    """``x``'s last size; None for a 0-d input, or a nested one (``torch.nested``) whose components differ
    in it.  Read with ``size(-1)``: a nested tensor of the strided layout has no ``shape``."""
    if x.dim() == 0:
        return None
    if not x.is_nested:
        return x.shape[-1]
    try:
        return x.size(-1)
    except RuntimeError:
        return None


def shape_of(x):
    """``x``'s shape for a message: a nested tensor's as its components' shapes."""
    if x.is_nested:
        return f"a nested tensor of shapes {[tuple(t.shape) for t in x.unbind()]}"
    return tuple(x.shape)


def check_floating_input(x):
    """Raise where the input ``x`` is not floating-point (an integer, bool or complex tensor).

    The one rule for every form of both layers: such an input gets this message rather than a dtype
    mismatch's "cast them", since ``torch.autocast`` never casts it.
    """
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")


def check_matches_input(x, name, t):
    """Raise where operand ``name`` (tensor ``t``) is not on the input ``x``'s device or dtype (a dtype
    mismatch with an input that is not floating-point: :func:`check_floating_input`'s message)."""
    if t.device != x.device:
        raise ValueError(f"input is on {x.device} but {name} is on {t.device}; move them to one device")
    if t.dtype != x.dtype:
        check_floating_input(x)
        if torch.float64 in (x.dtype, t.dtype) and _autocasting(x.device.type):
            raise TypeError(f"input has dtype {x.dtype} but {name} has {t.dtype}, and torch.autocast leaves "
                            f"float64 tensors as they are (as for nn.Linear); cast them to one dtype")
        raise TypeError(f"input has dtype {x.dtype} but {name} has {t.dtype}; cast them to one dtype "
                        f"(or run under torch.autocast)")


def _autocasting(device_type):
    """True while ``torch.autocast`` is on for ``device_type``."""
    return device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)


def autocast_off(device_type):
    """A context with autocast off on ``device_type``: a no-op where it is not on, or where the
    device type has no autocast (``meta``, whose ``torch.autocast`` raises "unsupported scalarType")."""
    return torch.autocast(device_type, enabled=False) if _autocasting(device_type) else contextlib.nullcontext()


def without_autocast(function):
    """Run ``function`` with autocast off on every device type where it is on: form changes, their
    optimizer-state maps and exports compute weights, which are no activations (under autocast a
    Tucker kernel's einsum, or a factor fit's matmul, ran in 16 bits for a float32 layer)."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in _AUTOCAST_DEVICES:
                stack.enter_context(autocast_off(device_type))
            return function(*args, **kwargs)
    return run


# ---------------------------------------------------------------------------
# Triton path as custom ops
# ---------------------------------------------------------------------------

@torch.library.custom_op("dynrank::lowrank_linear", mutates_args=())
def _lowrank_linear_op(x: Tensor, weight: Optional[Tensor], A: Tensor, B: Tensor,
                       bias: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor]:
    from .kernels.lowrank_linear import _forward
    return _forward(x, weight, A, B, bias, scale)


@_lowrank_linear_op.register_fake
def _(x, weight, A, B, bias, scale):
    return x.new_empty((x.shape[0], A.shape[0])), x.new_empty((x.shape[0], A.shape[1]))


@torch.library.custom_op("dynrank::lowrank_linear_backward", mutates_args=())
def _lowrank_linear_backward_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], A: Tensor, B: Tensor,
                                xbs: Tensor, scale: float, needs_dx: bool, needs_dA: bool,
                                needs_dB: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from .kernels.lowrank_linear import _backward
    grads = _backward(dy, x, weight, A, B, xbs, scale, needs_dx, needs_dA, needs_dB)
    # A custom op returns tensors: a gradient that was not asked for comes back empty.
    return tuple(g if g is not None else dy.new_empty(0) for g in grads)


@_lowrank_linear_backward_op.register_fake
def _(dy, x, weight, A, B, xbs, scale, needs_dx, needs_dA, needs_dB):
    return tuple(t.new_empty(t.shape if needed else (0,)) for t, needed in ((x, needs_dx), (A, needs_dA), (B, needs_dB)))


def _setup_context(ctx, inputs, output):
    x, weight, A, B, bias, scale = inputs
    _, xbs = output
    ctx.save_for_backward(x, weight, A, B, xbs)
    ctx.scale = scale
    ctx.has_bias = bias is not None


def _gradients(ctx, dy, backward_kernels):
    """Gradients of (x, weight, A, B, bias, scale) from the saved tensors and ``backward_kernels``."""
    x, weight, A, B, xbs = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, dA, dB = backward_kernels(dy, x, weight, A, B, xbs, ctx.scale, needs[0], needs[2], needs[3])
    dweight = None
    if weight is not None and needs[1]:
        # A trainable weight beside the factors (not the frozen-adapter case).
        dweight = dy.t() @ x
    dbias = dy.sum(0) if ctx.has_bias and needs[4] else None
    return (dx if needs[0] else None), dweight, (dA if needs[2] else None), (dB if needs[3] else None), dbias, None


def _backward(ctx, dy, _dxbs):
    return _gradients(ctx, dy, _lowrank_linear_backward_op)


_lowrank_linear_op.register_autograd(_backward, setup_context=_setup_context)


# (device, dtype) → a 0-dim zero: addmm's ``input`` where beta = 0 (torch then ignores its value).
_BETA0_INPUTS = {}


# Resolved once: _beta0_input asks on every adapter forward and backward.
_get_dispatch_mode, _FAKE_MODE = torch._C._get_dispatch_mode, torch._C._TorchDispatchModeKey.FAKE
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _fake_mode_active():
    return _get_dispatch_mode(_FAKE_MODE) is not None


def _beta0_input(a):
    """A 0-dim zero of ``a``'s device and dtype, made once per pair in eager mode.

    ``a.new_zeros(())`` per call costs an allocation and a fill launch, twice per adapter
    forward+backward.  Under ``torch.compile`` a fresh one is made as before, and so under a
    FakeTensorMode (shape or memory estimates) or for a tensor subclass: a fake zero kept here
    would be fed to later real calls, and a real one to the fake mode's.  A zero made during a
    CUDA-graph capture is never filled, so it is not kept; one kept before serves inside a capture,
    and the capture status is asked only when none is kept (a CUDA runtime query per call saved).
    Nor is one made under a vmap (a batched backward's) kept: it would outlive the vmap.
    """
    if torch.compiler.is_compiling() or type(a) not in _PLAIN_TENSORS or _fake_mode_active():
        return a.new_zeros(())
    key = (a.device, a.dtype)
    zero = _BETA0_INPUTS.get(key)
    if zero is None:
        zero = a.new_zeros(())
        if not (_capturing(a) or _batched(zero)):
            _BETA0_INPUTS[key] = zero
    return zero


def _batched(t):
    """Whether ``t`` is a vmapped tensor: ``torch.func.vmap``'s, or the older vmap behind batched backwards
    (``torch.autograd.grad(..., is_grads_batched=True)``, ``jacobian(..., vectorize=True)``)."""
    return _is_batchedtensor(t) or _is_legacy_batchedtensor(t)


# Private functorch queries, resolved once; where a torch release lacks one, no tensor counts as batched by it.
_is_batchedtensor = getattr(torch._C._functorch, "is_batchedtensor", lambda t: False)
_is_legacy_batchedtensor = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def _capturing(a):
    """Whether ``a`` is a CUDA tensor and its device's current stream is capturing a CUDA graph."""
    return a.is_cuda and torch.cuda.is_current_stream_capturing()


def _scaled_mm(a, b, scale):
    """scale·(a @ b) in one GEMM (cuBLAS's alpha), without a separate scaling pass."""
    if scale == 1.0:
        return a @ b
    return torch.addmm(_beta0_input(a), a, b, beta=0.0, alpha=scale)


def _torch_forward(x, weight, A, B, bias, scale, in_place=True):
    """The torch engine's forward (cuBLAS on CUDA): (y, xbs), as the kernels' ``lowrank_linear_forward``.

    ``y = x·W_fᵀ + bias`` first, then ``xbs = s·x·B`` and ``y += xbs·Aᵀ`` in
    place (``in_place=False``: the same GEMM, beta = 1, into a new tensor).  The
    big GEMM is the first launch: on a GPU the host's work on the two small
    ones (and the autograd node's saves after them) then overlaps it instead
    of delaying it.

    Under selective activation checkpointing the add is out of place too: a
    policy that saves matmuls keeps the dense GEMM's output, hands that very
    tensor back at the recompute, and refuses one modified after it was saved.
    """
    if weight is None:
        xbs = _scaled_mm(x, B, scale)
        return torch.nn.functional.linear(xbs, A, bias), xbs
    y = torch.nn.functional.linear(x, weight, bias)
    xbs = _scaled_mm(x, B, scale)
    if in_place and not (_dispatch_mode_count() and _caching_mode_active()):
        return y.addmm_(xbs, A.t()), xbs
    return torch.addmm(y, xbs, A.t()), xbs


# How many Python dispatch modes (TorchDispatchMode) are active: one C call, a fraction of a µs per forward.
_dispatch_mode_count = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)


def _caching_mode_active():
    """True while a dispatch mode that keeps op outputs is active: selective activation checkpointing's
    (``torch.utils.checkpoint``'s ``context_fn=create_selective_checkpoint_contexts(...)``), in its
    forward and in its recompute.  Where torch names them otherwise, any dispatch mode counts."""
    if _dispatch_mode_stack is None:
        return True
    return any(isinstance(mode, _CACHING_MODES) for mode in _dispatch_mode_stack())


try:    # private names, resolved once: where a torch release moves them, every dispatch mode counts as caching
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as _dispatch_mode_stack
    from torch.utils.checkpoint import _CachedTorchDispatchMode, _CachingTorchDispatchMode
    _CACHING_MODES = (_CachingTorchDispatchMode, _CachedTorchDispatchMode)
except ImportError:
    _dispatch_mode_stack = None


def _torch_backward(dy, x, weight, A, B, xbs, scale, needs_dx, needs_dA, needs_dB):
    """The torch engine's backward: (dx, dA, dB), as the kernels' ``lowrank_linear_backward``.

    ``dx = dy·W_f`` first (the big GEMM, launched before the small ones as in
    the forward), then ``dyas = s·dy·A`` and ``dx += dyas·Bᵀ`` in place (no
    second T × K gradient to add, as autograd would); ``dA = dyᵀ·xbs``;
    ``dB = xᵀ·dyas``.
    """
    dx = dA = dB = None
    if needs_dx and weight is not None:
        dx = dy @ weight
    if torch.is_grad_enabled():
        # A double backward (create_graph=True) differentiates through dA: form xbs from x and B
        # here, where autograd sees it, not from the forward's saved copy.
        xbs = _scaled_mm(x, B, scale)
    dyas = _scaled_mm(dy, A, scale) if (needs_dx or needs_dB) else None
    if needs_dx:
        dx = dyas @ B.t() if dx is None else dx.addmm_(dyas, B.t())
    if needs_dA:
        dA = dy.t() @ xbs
    if needs_dB:
        dB = x.t() @ dyas
    return dx, dA, dB


def _triton_engine():
    """The kernels' forward and backward less their shape checks, which :func:`_check_operands` (the forward's)
    and autograd (the backward's: the saved tensors, dy of y's shape) have made; the custom ops run them too."""
    from .kernels.lowrank_linear import _backward, _forward
    return _forward, _backward


class _EagerLowRankLinear(torch.autograd.Function):
    """The Triton kernels outside ``torch.compile``: one autograd node over the engine's forward and backward.

    ``engine`` is (forward, backward), the kernels of :func:`_triton_engine`.
    The Triton path's custom ops are what ``torch.compile`` needs; in eager
    mode their dispatch layers cost about 100 µs of host time per
    forward+backward on a CPU host.  Same kernels, same saved tensors.
    """

    @staticmethod
    def forward(ctx, x, weight, A, B, bias, scale, engine):
        y, xbs = engine[0](x, weight, A, B, bias, scale)
        _setup_context(ctx, (x, weight, A, B, bias, scale), (y, xbs))
        ctx.engine_backward = engine[1]
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError("the Triton path of dynrank's low-rank linear has no double backward "
                               "(create_graph=True); set DYNRANK_BACKEND=torch for higher-order gradients")
        if _batched(dy):
            # A batched backward (jacobian(..., vectorize=True), autograd.grad(..., is_grads_batched=True)):
            # the kernels cannot read a vmapped gradient's storage; torch's GEMMs take it.
            return (*_gradients(ctx, dy, _torch_backward), None)
        return (*_gradients(ctx, dy, ctx.engine_backward), None)


class _TorchAdapterLinear(torch.autograd.Function):
    """The adapter form on the torch engine (cuBLAS on CUDA) in eager mode: one autograd node.

    Forward: :func:`_torch_forward`, 3 GEMMs.  Backward: :func:`_torch_backward`,
    5 GEMMs, the scale on cuBLAS's alpha and the input gradient's two parts
    summed in place.  Autograd's own nodes for the same math launch 11 kernels
    (a mul per scaled gradient, the input gradient's two parts written apart and
    then summed), unfused LoRA 12.  The node is kept lean (no arguments but the
    operands, a direct backward): on a CPU host, called bare, its
    forward+backward costs the host what autograd's nodes for the same math do
    (KERNEL_NOTES.md, v0.7).
    """

    @staticmethod
    def forward(ctx, x, weight, A, B, bias, scale):
        y, xbs = _torch_forward(x, weight, A, B, bias, scale)
        ctx.save_for_backward(x, weight, A, B, xbs)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B, xbs = ctx.saved_tensors
        needs_x, needs_weight, needs_A, needs_B, needs_bias = ctx.needs_input_grad[:5]
        dx, dA, dB = _torch_backward(dy, x, weight, A, B, xbs, ctx.scale, needs_x, needs_A, needs_B)
        # A trainable weight beside the factors (not the frozen-adapter case), a trainable bias.
        dweight = dy.t() @ x if needs_weight else None
        dbias = dy.sum(0) if needs_bias else None
        return dx, dweight, dA, dB, dbias, None


# ---------------------------------------------------------------------------
# Public functional API
# ---------------------------------------------------------------------------

def lowrank_linear(x, weight, A, B, bias=None, scale=1.0):
    """y = x·weightᵀ + scale·(x·B)·Aᵀ + bias, fused.

    Args:
        x: (..., in_features) input, any strides; or a nested tensor (``torch.nested``, strided or
            jagged layout) of such components, computed with ``F.linear`` on either engine.
        weight: (out_features, in_features) dense weight W_f, or None (lowrank form).
        A: (out_features, rank).  B: (in_features, rank).
        bias: (out_features,) or None.
        scale: float multiplying the low-rank term (alpha / rank, or 1.0).

    Returns:
        (..., out_features) tensor in the input's dtype (the autocast dtype under
        ``torch.autocast``).

    Under ``torch.fx.symbolic_trace`` (an operand is an FX ``Proxy``) the call is recorded as one
    ``call_function`` node of this function, its parameters as ``get_attr`` nodes.

    Raises:
        ValueError: shapes that do not fit, operands on different devices, a scale that is not finite, or
            (an input that is not float64) above float32's largest value, 3.4e38, in magnitude.
        TypeError: non-tensor operands, an input that is not floating-point, mismatched dtypes outside
            autocast, a scale that is not a number.

    Example:
        >>> x = torch.randn(4, 16); A = torch.randn(8, 2); B = torch.randn(16, 2)
        >>> lowrank_linear(x, None, A, B).shape
        torch.Size([4, 8])
    """
    if not isinstance(x, Tensor):
        traced = _fx_node(x, weight, A, B, bias, scale)
        if traced is not None:
            return traced
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    compiling = torch.compiler.is_compiling()
    if type(scale) is not float or not -FLOAT32_MAX <= scale <= FLOAT32_MAX:
        # Traced as well: dynamo folds these tests for a constant and guards on them for a SymFloat.
        scale = _check_scale(scale, "scale", x.dtype)
    device_type = x.device.type
    if _autocasting(device_type):
        return _autocast_lowrank_linear(x, weight, A, B, bias, scale)
    if x.is_nested:
        # A torch.nested input (nn.TransformerEncoder's eval path nests a padded batch), either layout:
        # F.linear takes it, with autograd, where the engines' reshape to 2-D and x @ B do not, and
        # the Triton kernels take no nested tensor.
        _check_operands(x, weight, A, B, bias)
        return _autograd_ops(x, weight, A, B, bias, scale)
    backend = None      # read once; first only where the cheap guard passes, before the full checks
    if not compiling and _torch_would_catch(x, weight, A, B, bias):
        backend = backend_for(x.device, "lowrank_linear", x.dtype)
        if backend == "torch":
            try:
                return _torch_lowrank_linear(x, weight, A, B, bias, scale)
            except RuntimeError:
                # torch refused the operands (shapes, dtypes, devices): say which one and why. An error
                # that is not the operands' (out of memory, say) passes the checks and is raised as it came.
                _check_operands(x, weight, A, B, bias)
                raise
    try:
        N, K, _ = _check_operands(x, weight, A, B, bias)
    except TypeError:
        traced = _fx_node(x, weight, A, B, bias, scale)   # an operand (a parametrized weight) traced by FX
        if traced is not None:
            return traced
        raise
    use_torch = (backend or backend_for(x.device, "lowrank_linear", x.dtype)) == "torch"
    if not compiling and (use_torch or _eager_transform_active()):
        return _torch_lowrank_linear(x, weight, A, B, bias, scale)
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(math.prod(lead), K)      # reshape(-1, K) cannot size K = 0
    if compiling and use_torch:
        # The torch engine's GEMMs traced out of place (inductor fuses them its own way): an in-place
        # add cannot take a batched adapter term into an unbatched base output when the compiled code
        # runs a vmap over the factors.
        y, _ = _torch_forward(x2, weight, A, B, bias, float(scale), in_place=False)
    elif compiling or _fake_mode_active():
        # The Triton kernels, opaque; under a FakeTensorMode (shape or memory estimates) the custom op's
        # fake implementation runs, since a kernel cannot launch on fake tensors.
        y, _ = _lowrank_linear_op(x2, weight, A, B, bias, float(scale))
    else:
        y = _EagerLowRankLinear.apply(x2, weight, A, B, bias, float(scale), _triton_engine())
    return y if x.dim() == 2 else y.reshape(*lead, N)


def _fx_node(*operands):
    """A ``call_function`` node of :func:`lowrank_linear` on ``operands`` where one of them is a
    ``torch.fx.Proxy`` (``torch.fx.symbolic_trace`` reached the call: the layers' parameters become
    ``get_attr`` nodes), else None."""
    proxy = next((t for t in operands if isinstance(t, torch.fx.Proxy)), None)
    if proxy is None:
        return None
    return proxy.tracer.create_proxy("call_function", lowrank_linear, operands, {})


def _autocast_lowrank_linear(x, weight, A, B, bias, scale):
    """``lowrank_linear`` under ``torch.autocast``: cast as for ``nn.Linear``, then run with autocast off.

    Floating-point operands go to the autocast dtype, except float64 ones, which autocast leaves as
    they are: a float64 layer given a float64 input stays float64, and a float64 operand beside
    autocast-dtype ones is a mismatch, named while autocast is still on.
    """
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type)
    given = (x, weight, A, B, bias)
    operands = [t if not isinstance(t, Tensor) or not t.is_floating_point() or t.dtype == torch.float64
                else t.to(dtype) for t in given]
    cast = operands[0]
    for name, t, before in zip(("weight", "A", "B", "bias"), operands[1:], given[1:]):
        if isinstance(t, Tensor) and cast.is_floating_point() and torch.float64 in (cast.dtype, t.dtype) \
                and t.dtype != cast.dtype:
            check_matches_input(x, name, before)     # the dtypes given, not autocast's copies
    with torch.autocast(device_type, enabled=False):
        return lowrank_linear(*operands, scale)


def _torch_would_catch(x, weight, A, B, bias):
    """True when every operand mistake left is one torch's own ops refuse.

    Shapes that do not chain, mismatched dtypes and devices all make a torch op raise, and
    :func:`lowrank_linear` then names the fault with :func:`_check_operands`; these are the mistakes
    torch would accept silently: non-2-D factors (broadcast as batched products), a bias that
    broadcasts, a weight whose rows do not match A's (its product broadcast against the low-rank
    term's on autograd's own ops), an integer input multiplied exactly, a meta tensor beside real
    ones (the product comes back on meta); and a 0-d input, which the adapter's reshape would
    refuse with an IndexError.
    """
    return (isinstance(A, Tensor) and isinstance(B, Tensor) and A.dim() == 2 and B.dim() == 2
            and (weight is None or (isinstance(weight, Tensor) and not weight.is_meta
                                    and weight.shape == (A.shape[0], B.shape[0])))
            and x.dim() != 0 and x.is_floating_point() and not (x.is_meta or A.is_meta or B.is_meta)
            and (bias is None or (isinstance(bias, Tensor) and bias.dim() == 1 and bias.shape[0] == A.shape[0]
                                  and not bias.is_meta)))


def transform_active():
    """True under a ``torch.func`` transform (vmap, grad, jvp, jacrev, ...), forward-mode AD
    (``torch.autograd.forward_ad.dual_level``, ``jacobian(..., strategy="forward-mode")``) or
    ``torch.jit.trace``, in eager mode (False while ``torch.compile`` traces: the custom ops are what
    it needs)."""
    return not torch.compiler.is_compiling() and _eager_transform_active()


def _eager_transform_active():
    """:func:`transform_active` where the caller knows it runs eagerly (one check less per call)."""
    return _functorch_transforms_active() or _tracing() or _forward_ad.__dict__.get("_current_level", -1) >= 0


_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)   # torch.jit.is_tracing without its Python wrapper
# Forward-mode AD: the dual level open now (-1: none), a private module global of torch.autograd.forward_ad;
# the fused nodes have no jvp, autograd's own ops do.
_forward_ad = torch.autograd.forward_ad


# Private but long-standing (torch.autograd.Function.apply asks it on every call); absent, no transform runs.
_functorch_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _autograd_ops(x, weight, A, B, bias, scale):
    """y = x·weightᵀ + scale·(x·B)·Aᵀ + bias on autograd's own ops, out of place (a nested ``x`` too)."""
    xb = torch.nn.functional.linear(x, B.t()) if x.is_nested else x @ B
    y = torch.nn.functional.linear(xb if scale == 1.0 else xb * scale, A, bias)
    return y if weight is None else torch.nn.functional.linear(x, weight) + y


def _torch_lowrank_linear(x, weight, A, B, bias, scale):
    """``lowrank_linear`` on the torch engine, eager mode, operands not yet checked (see its caller)."""
    if weight is None or _eager_transform_active():
        # The lowrank form runs the same GEMMs fused or not (x·B, then ·Aᵀ; dA, dB and dx from the
        # same products), so autograd's own C++ nodes serve: a Python node costs the host more
        # than it saves (KERNEL_NOTES.md, v0.3).  The adapter takes them too under torch.func's
        # transforms, which have no vmap or jvp rule for its node (and an in-place add cannot take
        # a batched operand into an unbatched output), and under torch.jit.trace, which records
        # the node as a Python call that cannot be saved.
        return _autograd_ops(x, weight, A, B, bias, scale)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _TorchAdapterLinear.apply(x2, weight, A, B, bias, float(scale))
    else:
        # Nothing to differentiate (inference, a frozen layer): the engine's ops without the node.
        y, _ = _torch_forward(x2, weight, A, B, bias, float(scale))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def merge_(weight, A, B, alpha=1.0):
    """In place ``weight += alpha * A @ B.T`` with fp32 accumulation; returns ``weight``.

    The inflate-merge of dynrank: one pass over ``weight``, the product A·Bᵀ
    never materialized (Triton kernel, or cuBLAS ``addmm_``: see :mod:`dynrank._backend`;
    float64 tensors always take ``addmm_``).  Outside autograd: ``weight`` may
    be a parameter that requires grad.

    Args:
        weight: (out_features, in_features), modified in place.
        A: (out_features, rank).  B: (in_features, rank).  Same device.
        alpha: scale of the product (negative to subtract).

    Raises:
        ValueError: shapes that do not fit, tensors on different devices, a weight whose elements share
            memory (an expanded view, an unfold's windows), a factor in the bytes the weight spans (a view
            of it such as ``W[:, :r]``, or columns interleaved with its rows in one buffer: pass a copy),
            an alpha that is not finite, or (no tensor
            float64) above float32's largest value, 3.4e38, in magnitude.
        TypeError: tensors that are not floating point, an alpha that is not a number.

    Example:
        >>> W = torch.zeros(3, 4); merge_(W, torch.ones(3, 1), torch.ones(4, 1)).sum().item()
        12.0
    """
    for name, t in (("weight", weight), ("A", A), ("B", B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"merge_ takes tensors, got {name} of type {type(t).__name__}")
    if type(alpha) is not float or not -FLOAT32_MAX <= alpha <= FLOAT32_MAX:
        # Mixed dtypes add in float64 where one of them is float64 (see below).
        wide = torch.float64 in (weight.dtype, A.dtype, B.dtype)
        alpha = _check_scale(alpha, "alpha", torch.float64 if wide else weight.dtype)
    if torch.is_grad_enabled() and (weight.requires_grad or A.requires_grad or B.requires_grad):
        with torch.no_grad():
            return merge_(weight, A, B, alpha)
    dtypes = (weight.dtype, A.dtype, B.dtype)
    if (A.dtype == weight.dtype == B.dtype and weight.is_floating_point() and A.dim() == 2 and B.dim() == 2
            and not (weight.is_meta or A.is_meta or B.is_meta) and backend_for(weight.device, "merge", *dtypes) == "torch"):
        # Common case first: torch's addmm_ refuses every other mistake itself (see lowrank_linear), but
        # not a weight whose elements overlap (an unfold's windows), nor a factor in the weight's memory.
        check_no_overlap("merge_", weight)
        _check_not_aliased(weight, A, B)
        try:
            return weight.addmm_(A, B.t(), alpha=alpha)
        except RuntimeError:
            _check_merge_operands(weight, A, B)
            raise
    _check_merge_operands(weight, A, B)
    if backend_for(weight.device, "merge", *dtypes) == "triton" and not _fake_mode_active():
        # (A kernel cannot launch on a FakeTensorMode's tensors: torch's ops give their shapes.)
        from .kernels import merge_ as kernel_merge_
        return kernel_merge_(weight, A, B, alpha)
    if A.dtype == weight.dtype == B.dtype:
        _check_not_aliased(weight, A, B)
        return weight.addmm_(A, B.t(), alpha=alpha)
    # Mixed dtypes: in fp32 (or wider), as the kernel and addmm_ accumulate.
    acc = torch.promote_types(torch.promote_types(A.dtype, B.dtype),
                              torch.promote_types(weight.dtype, torch.float32))
    return add_rounded_once_(weight, acc, weight.shape, lambda w: w.addmm_(A.to(acc), B.to(acc).t(), alpha=alpha))


def _check_not_aliased(weight, A, B):
    """ValueError where A or B lies in ``weight``'s memory (``A = W[:, :r]``): ``addmm_`` reads it after
    writing some of it, as the kernel would (``kernels.merge_`` refuses it by the same rule).  Skipped where
    there are no data pointers to compare: traced by ``torch.compile``, under a FakeTensorMode or a
    ``torch.func`` transform (vmap, grad, functionalize: their wrapped tensors), for a tensor subclass."""
    if torch.compiler.is_compiling() or _fake_mode_active() or _eager_transform_active() or \
            any(type(t) not in _PLAIN_TENSORS for t in (weight, A, B)):
        return
    from .kernels._runtime import check_not_aliased
    check_not_aliased("merge_", "weight", weight, A=A, B=B)


def add_rounded_once_(weight, acc, shape, add_):
    """``add_(w)`` (an in-place product-add such as ``addmm_``) on ``weight`` in dtype ``acc``, viewed as
    ``shape``, rounded to ``weight``'s dtype once; returns ``weight``.

    Rounding the product to a 16-bit weight's dtype before the scale and the add would make W inf where
    only the unscaled product overflows (alpha < 1, or W cancelling it).  In place on ``weight`` itself
    where it is already in ``acc`` and the view needs no copy, else on one copy written back.
    """
    work = weight.to(acc).reshape(shape)
    add_(work)
    # In one dtype, reshape gave a view of ``weight`` or (no ``_base``) a copy: asked so, not by comparing
    # data pointers, which torch.compile cannot trace and a FakeTensorMode warns about.
    if work.dtype != weight.dtype or work._base is None:
        weight.copy_(work.reshape(weight.shape))
    return weight


# The largest scale torch applies to float32 and 16-bit tensors: it converts a GEMM's alpha, or a scalar
# factor, to float32 first (a larger one is a RuntimeError, or inf).  float64 tensors take any finite scale.
FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_scale(value, name, dtype=None):
    """A finite real number as float (``lowrank_linear``'s scale, ``merge_``'s alpha): a Python or
    numpy number, or a 0-d real tensor (read once, as ``float()`` reads it).  Where ``dtype`` (the
    dtype that applies it) is given and is not float64, at most :data:`FLOAT32_MAX` in magnitude.
    Traced by ``torch.compile`` too, a 0-d tensor's value read as in eager (a graph break; under
    ``fullgraph=True`` dynamo refuses the data-dependent read): unread, a NaN tensor alpha was
    taken as 1 by the compiled ``addmm_``."""
    if isinstance(value, Tensor) and value.requires_grad:
        raise TypeError(f"{name} is read as a number, so a tensor that requires grad would get no gradient; "
                        f"pass a float (or detach it), or scale the output yourself to learn it")
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    value = float(check_real(value, name, "a real number"))
    if not -math.inf < value < math.inf:     # not math.isfinite: torch.compile cannot trace it on a SymFloat
        raise ValueError(f"{name} must be finite, got {value}")
    if dtype is not None and dtype != torch.float64 and not -FLOAT32_MAX <= value <= FLOAT32_MAX:
        raise ValueError(f"{name} must be at most {FLOAT32_MAX:.6g} in magnitude (float32's largest value: torch "
                         f"applies it to {dtype} tensors in float32; float64 ones take any finite {name}), "
                         f"got {value}")
    return value


def check_no_overlap(op, weight):
    """ValueError where elements of ``weight``, which ``op`` writes in place, share memory (an expanded
    view, or an unfold's overlapping windows): each write would land on several elements.  A layout
    passes at once when, in increasing stride order, each stride steps past all that the smaller ones
    reach (every dense, permuted or sliced view); any other is checked element by element (an
    interleaved ``as_strided`` view's offsets may all differ).  ``kernels._runtime.check_no_overlap``
    is the same rule for the kernels package, which imports without dynrank."""
    if _elements_overlap(weight):
        raise ValueError(f"{op} writes weight in place, so its elements must not share memory, got a "
                         f"view whose elements overlap (shape {tuple(weight.shape)}, strides {weight.stride()})")


def _elements_overlap(t):
    reach = 0
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= reach:
            break
        reach += stride * (size - 1)
    else:
        return False
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size) * stride
    return torch.unique(offsets).numel() < t.numel()


def _check_merge_operands(weight, A, B):
    if weight.dim() != 2 or A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"merge_ takes 2-D tensors, got weight {tuple(weight.shape)}, "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)}")
    N, K = weight.shape
    if A.shape[0] != N or B.shape[0] != K or A.shape[1] != B.shape[1]:
        raise ValueError(f"A must have shape ({N}, R) and B ({K}, R) for weight ({N}, {K}), "
                         f"got A {tuple(A.shape)} and B {tuple(B.shape)}")
    if A.device != weight.device or B.device != weight.device:
        raise ValueError(f"weight, A and B must be on one device, got {weight.device}, {A.device}, {B.device}")
    for name, t in (("weight", weight), ("A", A), ("B", B)):
        if not t.is_floating_point():
            raise TypeError(f"merge_ needs floating-point tensors, got {name} of dtype {t.dtype}")
    check_no_overlap("merge_", weight)
