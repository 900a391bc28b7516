"""The two adapter-form strategies of LowRankConv2d and how a layer picks one.

"chain": the frozen dense conv beside the factor chain; "merged": one conv
with W_f + ΔW, ΔW merged differentiably for the step.  Which is faster
depends on batch, spatial size and rank; "auto" times both once per input
key on CUDA and uses a fitted roofline cost model elsewhere.
"""

import math
import time

import torch
from torch.nn import functional as F

from ._args import check_int
from .conv_factorizations import _axis, run_chain
from .conv_merging import merged_kernel
from .functional import autocast_off

__all__ = ["ADAPTER_STRATEGIES", "AdapterChoice", "adapter_costs", "adapter_work", "time_adapter_strategies"]

ADAPTER_STRATEGIES = ("auto", "chain", "merged")


# ---------------------------------------------------------------------------
# The strategies (and the dense conv and factor chain they are built from)
# ---------------------------------------------------------------------------

def _dense_conv(layer, x, weight, bias):
    # The private fields behind the layer's geometry properties: one attribute read each per call.
    return F.conv2d(x, weight, bias, layer._stride, layer._conv_padding, layer._dilation, layer.groups)


def _chain(layer, x, factors, bias):
    steps = layer._dec.steps(factors, layer.scale_for(layer._dec.rank_of(factors)), layer.groups)
    return run_chain(x, steps, bias, layer._stride, layer._conv_padding, layer._dilation)


def _adapter_chain(layer, x, weight, factors, bias):
    """Strategy "chain": frozen dense conv beside the factor chain."""
    return _dense_conv(layer, x, weight, bias) + _chain(layer, x, factors, None)


def _adapter_merged(layer, x, weight, factors, bias):
    """Strategy "merged": one conv with W_f + ΔW, ΔW merged differentiably for this step."""
    scale = layer.scale_for(layer._dec.rank_of(factors))
    # The merged kernel is built in the parameters' dtype; under autocast only the conv is cast.
    with autocast_off(x.device.type):
        U, V = layer._dec.operands(factors)
        kernel = merged_kernel(weight, U, V, scale, layer.groups)
    return _dense_conv(layer, x, kernel, bias)


_ADAPTERS = {"chain": _adapter_chain, "merged": _adapter_merged}


# ---------------------------------------------------------------------------
# Choosing the adapter strategy: timing on CUDA, a cost model elsewhere
# ---------------------------------------------------------------------------

# Roofline constants per device type: (multiply-add throughput in FLOP/s,
# memory bandwidth in B/s, fixed cost per launched op in s).  The CPU values
# were fitted to the measured single-thread CPU time of both strategies (torch
# 2.13 / oneDNN, 108 layers: C = 16..512, H = W = 8..32, batch 16..128, rank
# ratio 1/64..1/2, all four decompositions): they pick the faster strategy in
# all 108 and predict the time within 34 % (median).  There, time follows the
# bytes moved: the dense conv's FLOPs are cheap next to the activation traffic
# of a chain's small convs.  CUDA uses its values only where timing is
# impossible (inside torch.compile or CUDA-graph capture).
_MACHINE = {"cpu": (1.0e12, 1.5e9, 5.0e-6), "cuda": (2.0e14, 2.0e12, 5.0e-6)}


def _out_size(size, k, s, p, d):
    return size if p == "same" else (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_work(n, cin, h, w, kernel_shape, groups, stride, padding, dilation, elt):
    """([flops, bytes moved, 1 op], output height, output width) of one conv pass."""
    cout, cin_g, kh, kw = kernel_shape
    pad = ("same", "same") if isinstance(padding, str) else padding
    ho = _out_size(h, kh, stride[0], pad[0], dilation[0])
    wo = _out_size(w, kw, stride[1], pad[1], dilation[1])
    flops = 2.0 * n * ho * wo * cout * cin_g * kh * kw
    moved = elt * (n * cin * h * w + n * cout * ho * wo + cout * cin_g * kh * kw)
    return [flops, moved, 1.0], ho, wo


def _add(total, work, times=1.0):
    for i, v in enumerate(work):
        total[i] += times * v


def _check_adapter_input(op, layer, x):
    from .conv import LowRankConv2d
    if not isinstance(layer, LowRankConv2d):
        raise TypeError(f"{op} needs a LowRankConv2d in adapter form, got {type(layer).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if layer.form != "adapter":
        raise RuntimeError(f"{op} needs a layer in adapter form, got {layer.form!r}")
    if x.dim() not in (3, 4):
        raise ValueError(f"input must have shape (N, C, H, W) or (C, H, W), got {tuple(x.shape)}")
    if x.shape[-3] != layer.in_channels:
        raise ValueError(f"input must have {layer.in_channels} channels (the layer's in_channels), got "
                         f"{x.shape[-3]} (shape {tuple(x.shape)})")


def adapter_work(layer, x):
    """Work of one adapter step per strategy: {"chain": [flops, bytes, ops], "merged": [...]}.

    A step is the forward, plus — when grad mode is on — the backward: input
    gradients (where ``x`` needs one) and factor gradients; a conv's input or
    weight gradient costs what its forward costs.  "chain" pays the frozen conv
    and every conv of the factor chain (forward, input and weight gradients)
    and the sum of the two paths; "merged" pays the kernel merge and one dense
    conv, and in the backward the dense conv's weight gradient (it feeds ΔW's
    factors) and the two GEMMs of the merge's backward.

    Args:
        layer: a :class:`~dynrank.LowRankConv2d` in adapter form.
        x: its input, (N, C, H, W) or unbatched (C, H, W) (costed as N = 1), C the
            layer's ``in_channels``; only its shape, dtype, device and ``requires_grad``
            are read (a ``meta`` tensor will do).  Unpadded: a ``padding_mode`` other
            than ``"zeros"`` is costed as the forward runs it (the input padded once,
            every conv unpadded).

    Returns:
        dict strategy → [multiply-add FLOPs, bytes moved, ops launched] (floats).

    Raises:
        TypeError: ``layer`` not a LowRankConv2d, or ``x`` not a ``torch.Tensor``.
        RuntimeError: if the layer is not in adapter form.
        ValueError: ``x`` not 3-D or 4-D, or with another channel count than ``in_channels``.
    """
    _check_adapter_input("adapter_work", layer, x)
    n, _, h, w = x.shape if x.dim() == 4 else (1, *x.shape)
    if layer._pad is not None:
        left, right, top, bottom = layer._pad
        h, w = h + top + bottom, w + left + right
    return _step_work(layer, n, h, w, x.element_size(), x.requires_grad)


def _step_work(layer, n, h, w, elt, needs_grad):
    """:func:`adapter_work` of the input the forward's convs see: n×C×h×w, padded where the forward pads."""
    train = torch.is_grad_enabled()
    dx = train and needs_grad
    dense, ho, wo = _conv_work(n, layer.in_channels, h, w, layer.weight.shape, layer.groups, layer.stride,
                               layer._conv_padding, layer.dilation, elt)
    dense_passes = 1 + (1 if dx else 0)          # forward, input gradient (W_f is frozen)

    chain = [0.0, 0.0, 0.0]
    _add(chain, dense, dense_passes)
    _add(chain, [0.0, 3.0 * elt * n * layer.out_channels * ho * wo, 1.0], 2 if train else 1)
    # Walk the chain on meta tensors to get every conv's shape.
    factors = {k: torch.empty(p.shape, device="meta") for k, p in layer.factors().items()}
    cin, hh, ww = layer.in_channels, h, w
    for i, (kernel, kind, groups) in enumerate(layer._dec.steps(factors, 1.0, layer.groups)):
        if kind == "pointwise":
            geom = ((1, 1), (0, 0), (1, 1))
        elif kind == "spatial":
            geom = (layer.stride, layer._conv_padding, layer.dilation)
        else:
            axis = 0 if kind == "h" else 1
            geom = (_axis(layer.stride, axis, 1), _axis(layer._conv_padding, axis, 0),
                    _axis(layer.dilation, axis, 1))
        work, hh, ww = _conv_work(n, cin, hh, ww, kernel.shape, groups, *geom, elt)
        _add(chain, work, 1 + ((2 if (i > 0 or dx) else 1) if train else 0))
        cin = kernel.shape[0]

    U, V = layer._dec.operands(factors)
    merge = [2.0 * U.shape[0] * U.shape[1] * V[0].numel(),
             elt * (2 * layer.weight.numel() + U.numel() + V.numel()), 2.0]
    merged = [0.0, 0.0, 0.0]
    _add(merged, merge, 3 if train else 1)
    _add(merged, dense, dense_passes + (1 if train else 0))
    return {"chain": chain, "merged": merged}


def adapter_costs(layer, x):
    """Roofline estimate (seconds) of one adapter step per strategy: {"chain": t, "merged": t}.

    t = flops / throughput + bytes / bandwidth + ops · launch cost, with the
    work from :func:`adapter_work` (``x`` as it takes it) and the constants of
    ``x``'s device type.

    Raises:
        TypeError/RuntimeError/ValueError: as :func:`adapter_work`.
    """
    _check_adapter_input("adapter_costs", layer, x)
    return _seconds(adapter_work(layer, x), x.device.type)


def _padded_input_costs(layer, x):
    """:func:`adapter_costs` of the (N, C, H, W) input the forward's convs see, already padded where the
    forward pads: the layer's own choice."""
    n, _, h, w = x.shape
    return _seconds(_step_work(layer, n, h, w, x.element_size(), x.requires_grad), x.device.type)


def _seconds(work, device_type):
    flops_per_s, bytes_per_s, launch = _MACHINE.get(device_type, _MACHINE["cpu"])
    return {k: f / flops_per_s + b / bytes_per_s + o * launch for k, (f, b, o) in work.items()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_adapter_strategies(layer, x, repeats=3):
    """Measured seconds of one adapter step per strategy: {"chain": t, "merged": t}.

    Runs each strategy once to warm up (cuDNN autotuning, kernel compilation),
    then ``repeats`` times, and keeps the fastest.  A step is the forward and,
    when grad mode is on, the backward.  The layer's parameters are used
    through detached copies, so no ``.grad`` is touched.  ``x`` is the layer's
    input, (N, C, H, W) or unbatched (C, H, W), padded as the forward pads it
    (a ``padding_mode`` other than ``"zeros"``).

    Raises:
        TypeError: ``layer`` not a LowRankConv2d, or ``x`` not a ``torch.Tensor``.
        RuntimeError: if the layer is not in adapter form.
        ValueError: ``x`` not 3-D or 4-D, or with another channel count than ``in_channels``.
        TypeError, ValueError: ``repeats`` not an int ≥ 1.
    """
    _check_adapter_input("time_adapter_strategies", layer, x)
    repeats = check_int(repeats, "repeats", "an int >= 1", 1)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if layer._pad is not None:
        x = F.pad(x, layer._pad, mode=layer.padding_mode)
    return _time_strategies(layer, x, repeats)


def _time_strategies(layer, x, repeats=3):
    """:func:`time_adapter_strategies` of the (N, C, H, W) input the forward's convs see (padded where the
    forward pads): the layer's own timing."""
    train = torch.is_grad_enabled()
    weight = layer.weight.detach()
    factors = {k: p.detach().requires_grad_(train) for k, p in layer.factors().items()}
    bias = layer.bias
    if bias is not None:
        bias = bias.detach().requires_grad_(train and layer.bias.requires_grad)
    xx = x.detach().requires_grad_(train and x.requires_grad)
    leaves = [t for t in (xx, bias, *factors.values()) if t is not None and t.requires_grad]

    def step(fn):
        y = fn(layer, xx, weight, factors, bias)
        if leaves:
            torch.autograd.grad(y, leaves, torch.ones_like(y))

    times = {}
    # The trial steps keep their saved tensors as they are: inside a checkpointed forward
    # (torch.utils.checkpoint) the checkpoint's hooks would count them among the layer's, and its
    # recompute, which finds the choice made, saves fewer (a CheckpointError); under save_on_cpu they
    # would be timed with the copies.
    with torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is):
        for name, fn in _ADAPTERS.items():
            step(fn)
            best = math.inf
            for _ in range(repeats):
                _sync(x.device)
                start = time.perf_counter()
                step(fn)
                _sync(x.device)
                best = min(best, time.perf_counter() - start)
            times[name] = best
    return times


def _as_is(tensor):
    return tensor


class AdapterChoice:
    """Which adapter strategy a layer picked for one input key, how, and on what evidence."""

    __slots__ = ("strategy", "method", "seconds")

    def __init__(self, strategy, method, seconds):
        self.strategy, self.method, self.seconds = strategy, method, seconds

    def __repr__(self):
        est = ", ".join(f"{k}={v * 1e3:.3f} ms" for k, v in self.seconds.items())
        return f"AdapterChoice({self.strategy!r} by {self.method}: {est})"
