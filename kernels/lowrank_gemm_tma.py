"""Experimental: the GEMM engine's products with every operand tile loaded through a TMA descriptor.

Same math and the same single fp32 accumulator as ``lowrank_gemm.py``:

    out = alpha·X·Wt + beta·U·Vt + bias

but X, Wt, U and Vt are read through tensor descriptors (Hopper's Tensor Memory Accelerator on
sm_90+; Triton's interpreter runs them on a CPU), which load whole tiles asynchronously, fill
out-of-range elements with zeros (no masks, no edge arithmetic in the loops) and take the
address generation off the threads.  A transposed view (``W.t()``, ``A.t()``) is read through a
descriptor of the underlying row-major tensor and transposed in the tile.

Nothing dispatches here yet: ``benchmarks/sweep_tiles.py`` times it beside the pointer engine
and cuBLAS, and it moves into the engine only if it wins there.  Its host checks are the engine's
(:func:`lowrank_gemm.check_gemm`); descriptors also need 16-bit operands with a unit stride in one
dimension, 16-byte aligned data and 16-byte multiples for the other stride, and
:func:`lowrank_gemm_tma` raises ``ValueError`` otherwise.
"""

import torch
import triton
import triton.language as tl

from ._runtime import check_launchable, interpreting, launch_device
from .lowrank_gemm import _cdiv, _grouped_tile, _product_order, check_gemm

__all__ = ["lowrank_gemm_tma", "tma_layout"]


@triton.jit
def _lowrank_gemm_tma_kernel(
    x_desc, w_desc, u_desc, v_desc, bias_ptr, out_ptr,
    M, N, K, R, stride_om, stride_on,
    alpha, beta_over_alpha, beta,
    HAS_X: tl.constexpr, HAS_U: tl.constexpr, HAS_BIAS: tl.constexpr, W_T: tl.constexpr, V_T: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of out; W_T / V_T: Wt / Vt are read as their (N, ·) transposes."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_U:
        acc = _tma_dot_loop(acc, u_desc, v_desc, off_m, off_n, R, V_T, DOT_FP32, BLOCK_K)
        if HAS_X:
            acc = acc * beta_over_alpha
        else:
            acc = acc * beta
    if HAS_X:
        acc = _tma_dot_loop(acc, x_desc, w_desc, off_m, off_n, K, W_T, DOT_FP32, BLOCK_K)
        acc = acc * alpha
    # The store's offsets in int64: the (M, N) output may pass 2**31 elements, where descriptors (which
    # read the operands) address in 64 bits and pointers offset by an int32 product would wrap.  Once
    # per tile, after the loops.
    o_m = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
    o_n = (off_n + tl.arange(0, BLOCK_N)).to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o_n, mask=o_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (o_m < M)[:, None] & (o_n < N)[None, :]
    tl.store(out_ptr + o_m[:, None] * stride_om + o_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _tma_dot_loop(acc, a_desc, b_desc, off_m, off_n, size, B_T: tl.constexpr, DOT_FP32: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """acc += A[off_m:, :size]·B[:size, off_n:], B read from its transpose when B_T."""
    for k0 in range(0, size, BLOCK_K):
        a = a_desc.load([off_m, k0])
        if B_T:
            b = b_desc.load([off_n, k0]).T
        else:
            b = b_desc.load([k0, off_n])
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    return acc


def tma_layout(t):
    """(row-major base tensor, transposed?) for a 2-D operand a descriptor can read, else ValueError."""
    if t.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"TMA operands must be float16 or bfloat16, got {t.dtype}")
    size = t.element_size()
    if t.stride(1) == 1 and t.stride(0) * size % 16 == 0:
        base, transposed = t, False
    elif t.stride(0) == 1 and t.stride(1) * size % 16 == 0:
        base, transposed = t.t(), True
    else:
        raise ValueError(f"a TMA operand needs a unit stride and the other stride a multiple of 16 bytes, "
                         f"got shape {tuple(t.shape)} with strides {t.stride()} ({t.dtype})")
    if base.data_ptr() % 16:
        raise ValueError("a TMA operand's data must be 16-byte aligned")
    return base, transposed


def lowrank_gemm_tma(x, wt, u, vt, bias=None, *, alpha=1.0, beta=1.0, config):
    """out = alpha·x·wt + beta·u·vt + bias through TMA descriptors (both products required).

    Args:
        x: (M, K) row-major.  wt: (K, N), row-major or a transposed view.  u: (M, R) row-major.
        vt: (R, N), row-major or a transposed view.  x, wt, u and vt of one dtype.  bias: (N,) or None.
        alpha, beta: as :func:`lowrank_gemm`'s.
        config: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages.

    Returns:
        new (M, N) tensor in x's dtype.

    Raises:
        ValueError, TypeError, RuntimeError: as :func:`lowrank_gemm` (the same checks; x, wt, u and vt
            may not be None); ValueError for an empty size, or an operand a descriptor cannot read.
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    alpha, beta, M, N, K, R = check_gemm("lowrank_gemm_tma", x, wt, u, vt, bias, alpha, beta, optional=("bias",))
    if 0 in (M, K, R, N):
        raise ValueError(f"lowrank_gemm_tma needs every size positive (a descriptor cannot describe an empty "
                         f"operand; lowrank_gemm takes these), got M={M}, K={K}, R={R}, N={N}")
    x_base, x_t = tma_layout(x)
    u_base, u_t = tma_layout(u)
    if x_t or u_t:
        raise ValueError("x and u must be row-major for the TMA path")
    w_base, w_t = tma_layout(wt)
    v_base, v_t = tma_layout(vt)
    interpreted = interpreting(_lowrank_gemm_tma_kernel)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    check_launchable(out)
    if bias is not None:
        bias = bias.contiguous()
    has_x = alpha != 0.0
    swap, scalars = _product_order(alpha, beta, has_x, True)
    if swap:    # u·vt in the kernel's X·Wt slot, x·wt in its U·Vt slot
        x_base, w_base, w_t, u_base, v_base, v_t, K, R = u_base, v_base, v_t, x_base, w_base, w_t, R, K
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    descriptors = (TensorDescriptor.from_tensor(x_base, [bm, bk]),
                   TensorDescriptor.from_tensor(w_base, [bn, bk] if w_t else [bk, bn]),
                   TensorDescriptor.from_tensor(u_base, [bm, bk]),
                   TensorDescriptor.from_tensor(v_base, [bn, bk] if v_t else [bk, bn]))
    grid = (_cdiv(M, bm) * _cdiv(N, bn),)
    flags = dict(HAS_X=has_x, HAS_U=True, HAS_BIAS=bias is not None, W_T=w_t, V_T=v_t, DOT_FP32=interpreted,
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config.get("GROUP_M", 8))
    if not interpreted:
        flags.update(num_warps=config["num_warps"], num_stages=config["num_stages"])
    args = (*descriptors, bias if bias is not None else out, out, M, N, K, R, out.stride(0), out.stride(1), *scalars)
    with launch_device(out):
        _lowrank_gemm_tma_kernel[grid](*args, **flags)
    return out
