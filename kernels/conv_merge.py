"""Fused conv-kernel merge: W[g] ← W[g] + alpha·U[g]·V[g], in place, per group.

Every factorized convolution of dynrank (SVD, Tucker-2, CP, TKD-CPD) merges
into its dense kernel as one low-rank product over the kernel's columns:

    W (F, C/g, kh, kw)  viewed as  (F, C/g·kh·kw),
    U (F, q/g)          the output-side operand,
    V (q, C/g, kh, kw)  the input-side operand, viewed as (q, C/g·kh·kw),

    W[f, :] += alpha · Σ_k U[f, k] · V[g(f)·q/g + k, :]      (g(f): group of row f)

The decomposition-specific work — contracting a Tucker core with its input
factor, forming a CP outer product — touches only the small (q, C/g·kh·kw)
operand and happens before the launch (see ``dynrank.conv_factorizations``).
The dense kernel itself is then read once and written once by the linear
merge's kernel (``merge.py``), with an fp32 accumulator and the product U·V
never materialized.

The weight is addressed through a matrix view of its own memory: contiguous
kernels flatten as (c, i, j), channels-last kernels as (i, j, c) — V is
permuted to the same column order, which is cheap because V is small.  A
kernel with any other layout is merged through a contiguous copy.
"""

import math
import numbers

import torch

from ._runtime import (check_kernel_dtypes, check_writable, check_no_overlap, check_not_aliased, check_scale,
                       check_tensors)
from .merge import merge_

__all__ = ["conv_merge_", "reference_conv_merge", "reference_svd_kernel", "reference_tucker_kernel",
           "reference_cp_kernel", "reference_tkd_cpd_kernel"]

# Column orders of a (C, kh, kw) kernel slice that can be flattened without a copy:
# (c, i, j) for contiguous kernels, (i, j, c) for channels-last ones.
_COLUMN_ORDERS = ((1, 2, 3), (2, 3, 1))


def _matrix_view(weight):
    """(F, C·kh·kw) view of ``weight``'s memory and the column order it uses, or (None, None)."""
    for order in _COLUMN_ORDERS:
        try:
            return weight.permute(0, *order).view(weight.shape[0], -1), order
        except RuntimeError:
            continue
    return None, None


def conv_merge_(weight, U, V, alpha=1.0, groups=1):
    """In place ``weight += alpha · U·V`` per group, fp32 accumulation; returns ``weight``.

    Args:
        weight: (F, C/g, kh, kw) dense kernel, written in place; it must not require grad while grad
            mode is on (autograd cannot record the kernel's write).
        U: (F, q/g) output-side operand.
        V: (q, C/g, kh, kw) input-side operand.
        alpha: real scale (negative to subtract), finite and within float32's range.
        groups: g, the convolution's groups (an int or a numpy integer); F and q must be multiples of g.

    Returns:
        ``weight``, unchanged where it is empty or q is 0.

    Raises:
        ValueError: shapes that do not fit, tensors on different devices, a meta tensor, a weight whose
            elements share memory (an expanded view), a U or V within the bytes the weight spans (a
            view of it), ``groups`` below 1, an alpha that is not finite or past float32's range.
        TypeError: an operand that is not a tensor; a tensor that is not float32, float16 or bfloat16
            (float64 would lose its precision in the fp32 accumulation); ``groups`` that is not an int;
            an alpha that is not a real number.
        RuntimeError: a weight that requires grad while grad mode is on (torch's in-place ops refuse a
            leaf that requires grad); ``TRITON_INTERPRET`` changed after triton was imported.

    Example (CUDA tensors, or CPU ones with ``TRITON_INTERPRET=1`` set before triton is imported):
        >>> import torch
        >>> from dynrank.kernels import conv_merge_
        >>> device = "cuda" if torch.cuda.is_available() else "cpu"
        >>> W = torch.zeros(4, 3, 3, 3, device=device)
        >>> conv_merge_(W, torch.ones(4, 2, device=device), torch.ones(2, 3, 3, 3, device=device)).sum().item()
        216.0
    """
    check_tensors("conv_merge_", weight=weight, U=U, V=V)
    alpha = check_scale("conv_merge_", "alpha", alpha)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if weight.dim() != 4 or U.dim() != 2 or V.dim() != 4:
        raise ValueError(f"conv_merge_ takes weight (F, C/g, kh, kw), U (F, q/g) and V (q, C/g, kh, kw), "
                         f"got weight {tuple(weight.shape)}, U {tuple(U.shape)}, V {tuple(V.shape)}")
    F_out = weight.shape[0]
    qg = U.shape[1]
    if F_out % groups or U.shape[0] != F_out or V.shape[0] != qg * groups or V.shape[1:] != weight.shape[1:]:
        raise ValueError(f"for weight {tuple(weight.shape)} and groups={groups}, U must have shape "
                         f"({F_out}, q) and V ({groups}·q, {', '.join(map(str, weight.shape[1:]))}), "
                         f"got U {tuple(U.shape)} and V {tuple(V.shape)}")
    if U.device != weight.device or V.device != weight.device:
        raise ValueError(f"weight, U and V must be on one device, got {weight.device}, {U.device}, {V.device}")
    check_kernel_dtypes("conv_merge_", weight=weight, U=U, V=V)
    # Before the copy below, whose copy-back torch would refuse only for some layouts.
    check_writable("conv_merge_", "weight", weight)
    # Before the per-group merges, each of which sees only its own rows.
    check_no_overlap("conv_merge_", "weight", weight)
    check_not_aliased("conv_merge_", "weight", weight, U=U, V=V)
    if weight.numel() == 0 or qg == 0:
        # Nothing to add (as merge_); an empty kernel has no matrix view, nor its contiguous copy.
        return weight
    W2, order = _matrix_view(weight)
    if W2 is None:
        dense = weight.contiguous()
        conv_merge_(dense, U, V, alpha, groups)
        return weight.copy_(dense)
    V2 = V.permute(0, *order).reshape(V.shape[0], -1)
    Fg = F_out // groups
    for g in range(groups):
        merge_(W2[g * Fg:(g + 1) * Fg], U[g * Fg:(g + 1) * Fg], V2[g * qg:(g + 1) * qg].t(), alpha)
    return weight


def reference_conv_merge(weight, U, V, alpha=1.0, groups=1):
    """Float64 result of :func:`conv_merge_` (a new tensor)."""
    F_out, qg = U.shape
    Fg = F_out // groups
    U3 = U.double().reshape(groups, Fg, qg)
    V3 = V.double().reshape(groups, qg, math.prod(V.shape[1:]))     # -1 is no size when q = 0
    return weight.double() + alpha * torch.bmm(U3, V3).reshape(weight.shape)


# -- dense kernels straight from each decomposition's factors (float64) -------------------
# Written index by index, independently of the operand route the layer takes, so
# tests can check a layer's merge and its chain of convolutions against them.

def reference_svd_kernel(A, B, scale=1.0, groups=1):
    """W[f, c, i, j] = scale·Σ_k A[f, k]·B[g(f)·r/g + k, c, i, j].

    A: (F, r/g, 1, 1), B: (r, C/g, kh, kw).  Returns float64 (F, C/g, kh, kw).
    """
    F_out, rg = A.shape[:2]
    Fg = F_out // groups
    A3 = A.double().reshape(groups, Fg, rg)
    B3 = B.double().reshape(groups, rg, *B.shape[1:])
    return scale * torch.einsum("gfk,gkcij->gfcij", A3, B3).reshape(F_out, *B.shape[1:])


def reference_tucker_kernel(B, core, A, scale=1.0):
    """W[f, c, i, j] = scale·Σ_{p,q} A[f, p]·core[p, q, i, j]·B[q, c].

    B: (r_in, C, 1, 1), core: (r_out, r_in, kh, kw), A: (F, r_out, 1, 1).
    """
    return scale * torch.einsum("fp,pqij,qc->fcij", A.double()[:, :, 0, 0], core.double(),
                                B.double()[:, :, 0, 0])


def reference_cp_kernel(B, Kh, Kw, A, scale=1.0):
    """W[f, c, i, j] = scale·Σ_q A[f, q]·Kh[q, i]·Kw[q, j]·B[q, c].

    B: (r, C, 1, 1), Kh: (r, 1, kh, 1), Kw: (r, 1, 1, kw), A: (F, r, 1, 1).
    """
    return scale * torch.einsum("fq,qi,qj,qc->fcij", A.double()[:, :, 0, 0], Kh.double()[:, 0, :, 0],
                                Kw.double()[:, 0, 0, :], B.double()[:, :, 0, 0])


def reference_tkd_cpd_kernel(B, core_in, Kh, Kw, core_out, A, scale=1.0):
    """Tucker-2 kernel whose core is the CP tensor core_out ∘ Kh ∘ Kw ∘ core_in.

    W[f, c, i, j] = scale·Σ_{p,s,q} A[f, p]·core_out[p, s]·Kh[s, i]·Kw[s, j]·core_in[s, q]·B[q, c].
    B: (r_in, C, 1, 1), core_in: (R, r_in, 1, 1), Kh: (R, 1, kh, 1), Kw: (R, 1, 1, kw),
    core_out: (r_out, R, 1, 1), A: (F, r_out, 1, 1).
    """
    return scale * torch.einsum("fp,ps,si,sj,sq,qc->fcij", A.double()[:, :, 0, 0],
                                core_out.double()[:, :, 0, 0], Kh.double()[:, 0, :, 0],
                                Kw.double()[:, 0, 0, :], core_in.double()[:, :, 0, 0],
                                B.double()[:, :, 0, 0])


def reference_kernel(decomposition, factors, scale=1.0, groups=1):
    """Float64 dense kernel of a LowRankConv2d's ``factors`` dict, any decomposition.

    Autograd flows back to the factors.  ``groups`` applies to ``"svd"`` only
    (the one decomposition with grouped support).
    """
    f = factors
    if decomposition == "svd":
        return reference_svd_kernel(f["A"], f["B"], scale, groups)
    if decomposition == "tucker":
        return reference_tucker_kernel(f["B"], f["core"], f["A"], scale)
    if decomposition == "cp":
        return reference_cp_kernel(f["B"], f["Kh"], f["Kw"], f["A"], scale)
    if decomposition == "tkd-cpd":
        return reference_tkd_cpd_kernel(*(f[n] for n in ("B", "core_in", "Kh", "Kw", "core_out", "A")), scale)
    raise ValueError(f"decomposition must be one of svd, tucker, cp, tkd-cpd, got {decomposition!r}")
