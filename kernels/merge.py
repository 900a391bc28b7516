"""Fused inflate-merge: W ← W + alpha·A·Bᵀ, in place.

Shapes: W (N, K), A (N, R), B (K, R).  The merge is memory bound: W is nearly
all the bytes, so one kernel streams it tile by tile — the old tile loaded
first, the rank-R product of the tile's rows of A and columns of Bᵀ formed in
fp32 while that load is in flight, the sum written back in W's dtype.  W is
read once and written once; A·Bᵀ never exists in memory.  A negative alpha
subtracts (the SVD deflate: W_f = W − A·Bᵀ).

The product runs on the tensor cores (``tl.dot``) for 16-bit factors and for
fp32 ones under TF32; fp32 factors at full precision take R rank-one FMA
updates instead, which hold one tile in registers where an IEEE fp32
``tl.dot`` holds three.

The kernel is the merge's own rather than the GEMM engine's: 13 arguments and
7 constexprs to bind instead of the engine's 23 and 10 (Triton's argument
binding is most of a launch's host time, ``benchmarks/KERNEL_NOTES.md``), and
programs that walk W along its rows in memory order.  The conv-kernel merges
(``conv_merge.py``) launch it too.
"""

import functools

import torch
import triton
import triton.language as tl

from ._runtime import (check_kernel_dtypes, check_launchable, check_writable, check_no_overlap,
                       check_not_aliased, check_scale, check_tensors, interpreting, launch_device)
from .lowrank_gemm import _cdiv, _dot_loop, _fit, _input_precision, _needs_int64

__all__ = ["merge_", "reference_merge"]


@triton.jit
def _merge_kernel(
    # pointers
    w_ptr, a_ptr, b_ptr,
    # sizes
    N, K, R,
    # strides
    stride_wn, stride_wk, stride_an, stride_ar, stride_bk, stride_br,
    # scalars
    alpha,
    # meta-parameters
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
    OUTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """W[n, k] += alpha·Σ_r A[n, r]·B[k, r] over one (BLOCK_N, BLOCK_K) tile of W.

    W: (N, K), A: (N, R), B: (K, R).  Program ``pid`` takes column tile
    ``pid % tiles_k`` of row tile ``pid // tiles_k``: consecutive programs read
    consecutive stretches of a row-major W.
    """
    pid = tl.program_id(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // tiles_k
    pid_k = pid % tiles_k
    if INDEX_64:   # only where some offset can pass 2**31 elements (the host checks)
        pid_n = pid_n.to(tl.int64)
        pid_k = pid_k.to(tl.int64)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_n = o_n < N
    m_k = o_k < K
    m_w = m_n[:, None] & m_k[None, :]
    p_w = w_ptr + o_n[:, None] * stride_wn + o_k[None, :] * stride_wk
    # The old tile first: its load latency overlaps the small loads and the rank-R dot below.
    b_w = tl.load(p_w, mask=m_w, other=0.0)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if OUTER:
        # fp32 factors at IEEE precision: R rank-one updates in fp32 FMAs, the products an IEEE
        # tl.dot would form, with the accumulator the only tile in registers (that tl.dot holds
        # both operand tiles per thread and spilled at 32 × 128 under Triton 3.6).
        p_a = a_ptr + o_n * stride_an
        p_b = b_ptr + o_k * stride_bk
        for r in range(0, R):
            b_a = tl.load(p_a, mask=m_n, other=0.0).to(tl.float32)
            b_b = tl.load(p_b, mask=m_k, other=0.0).to(tl.float32)
            acc += b_a[:, None] * b_b[None, :]
            p_a += stride_ar
            p_b += stride_br
    else:
        # The engine's rank loop; rows and columns past the edge wrap into range (the store masks
        # their results off), so only the rank is masked.
        o_r = tl.arange(0, BLOCK_R)
        if INDEX_64:   # o_r multiplies the rank strides: int64 as the row and column indices are
            o_r = o_r.to(tl.int64)
        p_a = a_ptr + (o_n % N)[:, None] * stride_an + o_r[None, :] * stride_ar
        p_b = b_ptr + o_r[:, None] * stride_br + (o_k % K)[None, :] * stride_bk
        acc = _dot_loop(acc, p_a, p_b, R, stride_ar, stride_br, o_r, DOT_FP32, INPUT_PRECISION, BLOCK_R, INDEX_64)
    b_new = b_w.to(tl.float32) + alpha * acc
    tl.store(p_w, b_new.to(w_ptr.dtype.element_ty), mask=m_w)


@functools.lru_cache(maxsize=256)
def _merge_config(w_dtype, outer, R):
    """Tile shape of a compiled launch: rows of W wide, 8 warps, at most ~105 registers per thread.

    Sized from ptxas's register counts under Triton 3.6 for sm_90 (``tests/_compile_for_gpu.py``):
    the tensor-core path keeps 64 × 128 tiles of 16-bit W (32 × 128 of fp32 W) within 105
    registers, so several programs share an SM and keep many loads of W in flight; the rank loop
    runs in one step up to rank 64 (``BLOCK_R`` at least 16, the tensor cores' minimum).  The
    fp32 FMA path takes 32 × 128 tiles (100 registers; 64 × 128 needs 179).
    """
    if outer:
        return dict(BLOCK_N=32, BLOCK_K=128, BLOCK_R=16, num_warps=8, num_stages=1)
    return dict(BLOCK_N=32 if w_dtype == torch.float32 else 64, BLOCK_K=128, BLOCK_R=_fit(R, 16, 64),
                num_warps=8, num_stages=2)


def _interpreter_config(R):
    # The interpreter pays per program, not per element: few, large tiles.
    return dict(BLOCK_N=64, BLOCK_K=64, BLOCK_R=_fit(R, 16, 64))


def merge_(weight, A, B, alpha=1.0, config=None):
    """In-place ``weight += alpha * A @ B.T`` with fp32 accumulation; returns ``weight``.

    Args:
        weight: (N, K), any strides (a transposed view is merged as ``weight.T += alpha·B·Aᵀ``,
            so the kernel always walks memory in order), written in place; it must not require grad
            while grad mode is on (autograd cannot record the kernel's write).
        A: (N, R).  B: (K, R).  On weight's device; float32, float16 or bfloat16, not necessarily
            weight's dtype nor each other's (cast to one dtype for the product: A's when B matches
            it, fp32 otherwise).
        alpha: real scale (negative to subtract), finite and within float32's range.
        config: tile config of a compiled launch (BLOCK_N, BLOCK_K, BLOCK_R, num_warps,
            num_stages), for tuning; default: ``_merge_config``.  The product's path follows
            the factors' dtype.

    Raises:
        ValueError: on shapes that do not fit, a weight whose elements share memory (an
            expanded view, an unfold's windows), an A or B that lies within the bytes the weight
            spans (a view of it, such as ``weight[:, :R]``, which the kernel would read after
            writing some of it; also columns beside the weight's in one buffer), a meta tensor, an
            alpha that is not finite or past float32's range.  Devices are the caller's to check
            (``dynrank.functional.merge_`` and ``conv_merge_`` do).
        TypeError: an operand that is not a tensor; a tensor that is not float32, float16 or
            bfloat16 (float64 would lose its precision in the fp32 accumulation, an integer weight
            would take a truncated sum); an alpha that is not a real number.
        RuntimeError: a weight that requires grad while grad mode is on (torch's in-place ops refuse a
            leaf that requires grad); ``TRITON_INTERPRET`` changed after triton was imported
            (:func:`_runtime.interpreting`).

    Example (CUDA tensors, or CPU ones with ``TRITON_INTERPRET=1`` set before triton is imported):
        >>> device = "cuda" if torch.cuda.is_available() else "cpu"
        >>> W = torch.zeros(3, 4, device=device)
        >>> merge_(W, torch.ones(3, 1, device=device), torch.ones(4, 1, device=device), 0.5).sum().item()
        6.0
    """
    check_tensors("merge_", weight=weight, A=A, B=B)
    alpha = check_scale("merge_", "alpha", alpha)
    N, K = weight.shape if weight.dim() == 2 else (None, None)
    if weight.dim() != 2 or A.dim() != 2 or B.dim() != 2 or A.shape[0] != N or B.shape[0] != K \
            or A.shape[1] != B.shape[1]:
        raise ValueError(f"merge_ takes weight (N, K), A (N, R) and B (K, R), got weight {tuple(weight.shape)}, "
                         f"A {tuple(A.shape)} and B {tuple(B.shape)}")
    interpreted = interpreting(_merge_kernel)
    check_launchable(weight)
    check_kernel_dtypes("merge_", weight=weight, A=A, B=B)
    check_writable("merge_", "weight", weight)
    check_no_overlap("merge_", "weight", weight)
    check_not_aliased("merge_", "weight", weight, A=A, B=B)
    if weight.numel() == 0 or A.shape[1] == 0:
        return weight
    if A.dtype != B.dtype:
        # One dtype per tile product; fp32 holds every narrower float exactly.
        A, B = A.float(), B.float()
    W = weight
    if W.stride(0) < W.stride(1):
        # Column-major memory: merge into the row-major transpose, the same bytes walked in order.
        W, A, B = W.t(), B, A
    N, K = W.shape
    R = A.shape[1]
    precision = _input_precision(A.dtype)
    # fp32 factors without TF32 take the FMA path (what an IEEE fp32 tl.dot would do, in fewer registers).
    outer = precision == "ieee"
    if interpreted:
        config = _interpreter_config(R)
    else:
        config = config or _merge_config(W.dtype, outer, R)
    grid = (_cdiv(N, config["BLOCK_N"]) * _cdiv(K, config["BLOCK_K"]),)
    with launch_device(W):
        _merge_kernel[grid](
            W, A, B, N, K, R, W.stride(0), W.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1),
            alpha,
            # Triton's interpreter multiplies bf16 tiles wrongly; fp32 tiles hold bf16 exactly.
            DOT_FP32=interpreted and A.dtype == torch.bfloat16, INPUT_PRECISION=precision, OUTER=outer,
            INDEX_64=_needs_int64(W, A, B), **config)
    # The kernel writes through the pointer: move the version counter as a torch in-place op would, so a
    # graph that saved ``weight`` refuses its backward instead of using the merged values.
    torch.autograd.graph.increment_version(weight)
    return weight


def reference_merge(weight, A, B, alpha=1.0):
    """Float64 result of ``weight + alpha * A @ B.T`` (a new tensor)."""
    return weight.double() + alpha * (A.double() @ B.double().t())
