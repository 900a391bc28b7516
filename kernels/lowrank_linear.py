"""Fused low-rank linear: y = x·W_fᵀ + s·(x·B)·Aᵀ + bias, forward and backward.

Shapes: x (M, K), W_f (N, K) or None (lowrank form), A (N, R), B (K, R),
bias (N,) or None, s a float scale (alpha / rank, or 1).

Forward, two launches of the low-rank GEMM engine:
    1. xbs = s·x·B                          (M, R), tiny
    2. y   = x·W_fᵀ + xbs·Aᵀ + bias          one kernel, one fp32 accumulator,
                                             y written once
Backward (W_f frozen, so no weight gradient at all):
    dyas = s·dy·A                            (M, R)
    dx   = dy·W_f + dyas·Bᵀ                  one kernel, like the forward
    dA   = dyᵀ·xbs,  dB = xᵀ·dyas            skinny GEMMs, reduction over tokens
"""

import torch

from ._runtime import check_scale, check_tensors
from .lowrank_gemm import lowrank_gemm

__all__ = ["lowrank_linear_forward", "lowrank_linear_backward", "reference_lowrank_linear"]


def _skinny_gemm(a, b):
    """(P, M)·(M, R) with a long reduction over M and a small output.

    cuBLAS splits the token reduction across SMs (split-K), which a tile-per-
    program kernel cannot; on CUDA it is the faster engine for these two
    factor gradients.  Off CUDA the Triton engine runs (interpreter).
    """
    if a.is_cuda:
        return torch.mm(a, b)
    return lowrank_gemm(a, b)


def _check_operands(op, scale, **operands):
    """``scale`` as a float, once ``operands`` (name → tensor; weight and bias may be None) pass
    :func:`_runtime.check_tensors` and all but the bias are 2-D (some are transposed here, by name)."""
    check_tensors(op, ("weight", "bias"), **operands)
    for name, t in operands.items():
        if t is not None and name != "bias" and t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    return check_scale(op, "scale", scale)


def _check_shapes(op, x, weight, A, B, bias=None, dy=None, xbs=None):
    """ValueError naming the first operand (None: absent) whose shape does not fit x (M, K) and A (N, R):
    B (K, R), weight (N, K), bias (N,), dy (M, N), xbs (M, R).  Checked here, not left to the engine:
    its launches name their own operands (x·wt, u·vt), and dA = dyᵀ·xbs takes an xbs of any rank."""
    (M, K), (N, R) = x.shape, A.shape
    for name, t, shape in (("B", B, (K, R)), ("weight", weight, (N, K)), ("bias", bias, (N,)),
                           ("dy", dy, (M, N)), ("xbs", xbs, (M, R))):
        if t is not None and t.shape != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)} (for x {tuple(x.shape)} "
                             f"and A {tuple(A.shape)})")


def lowrank_linear_forward(x, weight, A, B, bias=None, scale=1.0):
    """Fused forward.

    Args:
        x: (M, K) any strides.  weight: (N, K) or None.  A: (N, R).  B: (K, R).
        bias: (N,) or None.  scale: real number multiplying the low-rank term, finite and within
        float32's range.

    Returns:
        (y, xbs): y (M, N) in x's dtype and xbs = scale·x·B (M, R), kept for
        the backward so it is not recomputed.

    Raises:
        TypeError: an operand that is not a tensor (weight and bias may be None), a scale that is not
            a real number; the engine's (:func:`lowrank_gemm`) dtype errors.
        ValueError: an operand other than bias that is not 2-D, shapes that do not fit x (M, K) and
            A (N, R), a meta tensor, a scale that is not finite or past float32's range.
    """
    return _forward(x, weight, A, B, bias, scale, check_shapes=True)


def _forward(x, weight, A, B, bias, scale, check_shapes=False):
    """:func:`lowrank_linear_forward`, whose shapes are checked only with ``check_shapes``: dynrank.functional's
    Triton path, the one caller without it, has checked them (its ``_check_operands``)."""
    scale = _check_operands("lowrank_linear_forward", scale, x=x, weight=weight, A=A, B=B, bias=bias)
    if check_shapes:
        _check_shapes("lowrank_linear_forward", x, weight, A, B, bias)
    xbs = lowrank_gemm(x, B, alpha=scale)
    if weight is not None:
        y = lowrank_gemm(x, weight.t(), xbs, A.t(), bias)
    else:
        y = lowrank_gemm(u=xbs, vt=A.t(), bias=bias)
    return y, xbs


def lowrank_linear_backward(dy, x, weight, A, B, xbs, scale=1.0, needs_dx=True, needs_dA=True,
                            needs_dB=True):
    """Fused backward.

    Args:
        dy: (M, N).  x: (M, K).  weight: (N, K) or None.  A: (N, R).  B: (K, R).
        xbs: scale·x·B from the forward, (M, R).

    Returns:
        (dx, dA, dB), each None when not requested.  No gradient is formed for
        ``weight``: it is the frozen W_f.

    Raises:
        TypeError, ValueError: as :func:`lowrank_linear_forward` (dy, x and xbs must be 2-D tensors too,
            dy of shape (M, N) and xbs (M, R)).
    """
    return _backward(dy, x, weight, A, B, xbs, scale, needs_dx, needs_dA, needs_dB, check_shapes=True)


def _backward(dy, x, weight, A, B, xbs, scale, needs_dx, needs_dA, needs_dB, check_shapes=False):
    """:func:`lowrank_linear_backward`, whose shapes are checked only with ``check_shapes``: dynrank.functional's
    Triton path, the one caller without it, passes the forward's saved tensors and autograd's dy of y's shape."""
    scale = _check_operands("lowrank_linear_backward", scale, dy=dy, x=x, weight=weight, A=A, B=B, xbs=xbs)
    if check_shapes:
        _check_shapes("lowrank_linear_backward", x, weight, A, B, dy=dy, xbs=xbs)
    dx = dA = dB = None
    dyas = lowrank_gemm(dy, A, alpha=scale) if (needs_dx or needs_dB) else None
    if needs_dx:
        if weight is not None:
            dx = lowrank_gemm(dy, weight, dyas, B.t())
        else:
            dx = lowrank_gemm(u=dyas, vt=B.t())
    if needs_dA:
        dA = _skinny_gemm(dy.t(), xbs)
    if needs_dB:
        dB = _skinny_gemm(x.t(), dyas)
    return dx, dA, dB


def reference_lowrank_linear(x, weight, A, B, bias=None, scale=1.0):
    """Plain-torch, differentiable twin: x·Wᵀ + scale·(x·B)·Aᵀ + bias, any leading dims."""
    y = scale * ((x @ B) @ A.t())
    if weight is not None:
        y = y + x @ weight.t()
    if bias is not None:
        y = y + bias
    return y
