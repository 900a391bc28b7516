"""Merging a factorized conv's factors into a dense kernel: dispatch and autograd.

``W[g] += alpha·U[g]·V[g]`` per group, with U (F, q/g) and V (q, C/g, kh, kw)
from ``Factorization.operands``: in place for ``inflate`` and the SVD deflate
(:func:`merge_conv_`), and differentiably for the adapter's "merged" strategy
(:func:`merged_kernel`).  Triton (``dynrank.kernels.conv_merge``) where
``dynrank._backend.backend_for`` picks it, torch elsewhere.
"""

import torch
from torch import Tensor

from ._args import check_int
from ._backend import backend_for
from .functional import _check_scale, _fake_mode_active, add_rounded_once_, check_no_overlap, transform_active

__all__ = ["merge_conv_", "merged_kernel"]


def _bmm_operands(U, V, groups):
    F_out, qg = U.shape
    return U.reshape(groups, F_out // groups, qg), V.reshape(groups, qg, -1)


def _check_conv_merge(weight, U, V, alpha, groups):
    """Validate :func:`merge_conv_`'s operands on either engine (the torch bmm truncated integer factors,
    merged a NaN alpha, summed the updates of an expanded kernel's rows); returns ``alpha`` as a float."""
    for name, t in (("weight", weight), ("U", U), ("V", V)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = f"dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"merge_conv_ needs floating-point tensors, got {name} of {got}")
    groups = check_int(groups, "groups", "an int >= 1", 1)
    if weight.dim() != 4 or U.dim() != 2 or V.dim() != 4:
        raise ValueError(f"merge_conv_ takes weight (F, C/g, kh, kw), U (F, q/g) and V (q, C/g, kh, kw), got "
                         f"weight {tuple(weight.shape)}, U {tuple(U.shape)}, V {tuple(V.shape)}")
    F_out, qg = U.shape
    if F_out != weight.shape[0] or F_out % groups or V.shape[0] != qg * groups or V.shape[1:] != weight.shape[1:]:
        raise ValueError(f"for weight {tuple(weight.shape)} and groups={groups}, U must have shape "
                         f"({weight.shape[0]}, q) and V ({groups}·q, {', '.join(map(str, weight.shape[1:]))}), "
                         f"got U {tuple(U.shape)} and V {tuple(V.shape)}")
    if U.device != weight.device or V.device != weight.device:
        raise ValueError(f"weight, U and V must be on one device, got {weight.device}, {U.device}, {V.device}")
    check_no_overlap("merge_conv_", weight)
    applied = torch.float64 if torch.float64 in (weight.dtype, U.dtype, V.dtype) else weight.dtype
    return _check_scale(alpha, "alpha", applied)


def _uses_triton(weight, U, V):
    """Whether the merge of U·V into ``weight`` runs the Triton kernel: every operand's dtype counts (a
    float64 factor beside a float32 kernel takes torch, as ``functional.merge_`` does)."""
    return backend_for(weight.device, "conv_merge", weight.dtype, U.dtype, V.dtype) == "triton"


@torch.no_grad()
def merge_conv_(weight, U, V, alpha, groups):
    """In place ``weight += alpha·U·V`` per group (see ``dynrank.kernels.conv_merge``).

    Triton where the backend picks it (one pass over the kernel, fp32
    accumulator); otherwise a torch bmm, accumulated in fp32 for 16-bit kernels.  float64 kernels always
    take the torch path.

    Raises:
        TypeError: an operand that is not a floating-point tensor, ``groups`` not an int, ``alpha``
            not a number.
        ValueError: shapes that do not fit, ``groups`` below 1 or not dividing F and q, operands on
            different devices, a non-finite ``alpha``, a weight whose elements share memory.
    """
    alpha = _check_conv_merge(weight, U, V, alpha, groups)
    if _uses_triton(weight, U, V) and not _fake_mode_active():
        # (A kernel cannot launch on a FakeTensorMode's tensors: torch's ops give their shapes.)
        from .kernels.conv_merge import conv_merge_
        return conv_merge_(weight, U, V, alpha, groups)
    acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    U3, V3 = _bmm_operands(U.to(acc), V.to(acc), groups)
    return add_rounded_once_(weight, acc, (U3.shape[0], U3.shape[1], -1), lambda w: w.baddbmm_(U3, V3, alpha=alpha))


@torch.library.custom_op("dynrank::conv_merged_kernel", mutates_args=())
def _merged_kernel_op(weight: Tensor, U: Tensor, V: Tensor, alpha: float, groups: int) -> Tensor:
    from .kernels.conv_merge import conv_merge_
    return conv_merge_(weight.clone(), U, V, alpha, groups)


@_merged_kernel_op.register_fake
def _(weight, U, V, alpha, groups):
    return torch.empty_like(weight)


def _merged_setup_context(ctx, inputs, output):
    _, U, V, alpha, groups = inputs
    ctx.save_for_backward(U, V)
    ctx.alpha, ctx.groups = alpha, groups


def _merged_backward(ctx, grad):
    # dW_eff → dU = alpha·dW·Vᵀ, dV = alpha·Uᵀ·dW per group: two small GEMMs
    # (F × q × C/g·kh·kw), cuBLAS is the right engine for them.
    # U and V of two dtypes meet in the wider one; each gradient comes back in its factor's dtype.
    U, V = ctx.saved_tensors
    acc = torch.promote_types(U.dtype, V.dtype)
    U3, V3 = _bmm_operands(U.to(acc), V.to(acc), ctx.groups)
    G3 = grad.reshape(ctx.groups, U3.shape[1], -1).to(acc)
    dU = (torch.bmm(G3, V3.transpose(1, 2)).reshape(U.shape) * ctx.alpha).to(U.dtype)
    dV = (torch.bmm(U3.transpose(1, 2), G3).reshape(V.shape) * ctx.alpha).to(V.dtype)
    dW = grad if ctx.needs_input_grad[0] else None
    return dW, dU, dV, None, None


_merged_kernel_op.register_autograd(_merged_backward, setup_context=_merged_setup_context)


def merged_kernel(weight, U, V, alpha, groups):
    """Differentiable ``weight + alpha·U·V`` (per group) as a new dense kernel.

    On the Triton path the merge is one kernel pass (custom op
    ``dynrank::conv_merged_kernel``) and the backward maps the kernel's
    gradient to U and V with two small GEMMs; elsewhere plain torch autograd.
    """
    if _uses_triton(weight, U, V) and not transform_active():
        # (torch.func's transforms and torch.jit.trace take the plain ops: the custom op has no vmap
        # or forward-mode rule.)
        return _merged_kernel_op(weight, U, V, float(alpha), int(groups))
    acc = torch.promote_types(weight.dtype, U.dtype)
    U3, V3 = _bmm_operands(U.to(acc), V.to(acc), groups)
    # One baddbmm: W + alpha·U·V rounded once (cuBLAS and CPU GEMMs accumulate 16-bit operands in fp32),
    # in the wider of W's and the factors' dtypes.
    W3 = weight.reshape(U3.shape[0], U3.shape[1], -1).to(acc)
    return torch.baddbmm(W3, U3, V3, alpha=alpha).reshape(weight.shape).to(weight.dtype)
