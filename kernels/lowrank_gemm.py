"""The GEMM engine behind every dynrank linear kernel.

One kernel computes, tile by tile,

    out[M, N] = alpha * X[M, K] @ Wt[K, N] + beta * U[M, R] @ Vt[R, N] + bias[N]

with both products accumulated in the same fp32 accumulator and ``out`` written
once.  Every operand is addressed through explicit strides, so transposed views
(``W.t()``, ``A.t()``) need no copy.  The adapter forward, the adapter input
gradient, the low-rank chain and the factor gradients are all instances of it
(see ``lowrank_linear.py``).  The in-place merges stream W through their own
kernel (``merge.py``).

The rank ``R`` is a runtime argument (the rank loop steps by ``BLOCK_K``), so a
new rank never triggers a recompilation.
"""

import functools

import torch
import triton
import triton.language as tl

from ._runtime import (check_kernel_dtypes, check_launchable, check_no_overlap, check_scale, check_tensors,
                       interpreting, launch_device)

__all__ = ["lowrank_gemm", "reference_lowrank_gemm"]


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program, in groups of GROUP_M row tiles that share column tiles in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m), (pid % num_pid_in_group) // group_size_m


@triton.jit
def _dot_loop(acc, p_a, p_b, size, step_a, step_b, o_k, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              BLOCK_K: tl.constexpr, INDEX_64: tl.constexpr):
    """acc += A·B over a reduction of ``size``: A tiles (rows, BLOCK_K) at p_a, B tiles (BLOCK_K, cols) at p_b.

    ``step_a``/``step_b`` are the strides along the reduction; only that dimension is masked
    (the caller wraps rows and columns into range).  Under INDEX_64 the caller passes an int64
    ``o_k`` and the pointer steps are formed in int64.
    """
    if INDEX_64:
        # BLOCK_K times an int32 stride need not fit int32.  tl.cast, not .to: a stride of 1 comes
        # as a constant.
        step_a = tl.cast(step_a, tl.int64)
        step_b = tl.cast(step_b, tl.int64)
    for k0 in range(0, size, BLOCK_K):
        m_k = (k0 + o_k) < size
        b_a = tl.load(p_a, mask=m_k[None, :], other=0.0)
        b_b = tl.load(p_b, mask=m_k[:, None], other=0.0)
        if DOT_FP32:
            b_a = b_a.to(tl.float32)
            b_b = b_b.to(tl.float32)
        acc = tl.dot(b_a, b_b, acc, input_precision=INPUT_PRECISION)
        p_a += BLOCK_K * step_a
        p_b += BLOCK_K * step_b
    return acc


# M is never specialized (Triton would otherwise make M == 1 a constant).  With M == 1 a constant,
# Triton 3.6's LLVM packed two lanes' integer offsets into one 64-bit register for the fp32
# adapter forward at rank 1, and the top bit of one lane spilled into the next: the X tile was
# read at wrong columns (found on an H200; tests/test_kernels_compile.py holds the check).
@triton.jit(do_not_specialize=["M"])
def _lowrank_gemm_kernel(
    # pointers
    x_ptr, wt_ptr, u_ptr, vt_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_xm, stride_xk, stride_wk, stride_wn,
    stride_um, stride_ur, stride_vr, stride_vn,
    stride_om, stride_on,
    # scalars
    alpha, beta_over_alpha, beta,
    # meta-parameters
    HAS_X: tl.constexpr, HAS_U: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = alpha·X·Wt + beta·U·Vt + bias.

    X: (M, K), Wt: (K, N), U: (M, R), Vt: (R, N), bias: (N,), out: (M, N).
    One program computes one (BLOCK_M, BLOCK_N) tile of ``out``; programs are
    ordered in groups of GROUP_M row-tiles so neighbouring programs share
    column tiles of Wt in L2.  Both products go into one fp32 accumulator: the
    rank term first, rescaled by beta/alpha, then the X·Wt loop, then ×alpha
    (the host passes beta/alpha; alpha ≠ 0 whenever there is an X, and with both
    products the host puts the one of larger scale in the X·Wt slot, so
    |beta/alpha| ≤ 1: see :func:`_product_order`).
    """
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if INDEX_64:   # only where some offset can pass 2**31 elements (the host checks)
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Operand loads wrap rows and columns past the edge back into range (their results land in
    # rows and columns the store masks off), so the loops mask only the reduction dimension.
    r_m = o_m % M
    r_n = o_n % N
    o_k = tl.arange(0, BLOCK_K)
    if INDEX_64:   # the reduction's index too: a stride that fits int32 comes as int32, and o_k·stride wraps
        o_k = o_k.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_U:
        p_u = u_ptr + r_m[:, None] * stride_um + o_k[None, :] * stride_ur
        p_v = vt_ptr + o_k[:, None] * stride_vr + r_n[None, :] * stride_vn
        acc = _dot_loop(acc, p_u, p_v, R, stride_ur, stride_vr, o_k, DOT_FP32, INPUT_PRECISION, BLOCK_K,
                        INDEX_64)
        if HAS_X:
            acc = acc * beta_over_alpha
        else:
            acc = acc * beta
    if HAS_X:
        p_x = x_ptr + r_m[:, None] * stride_xm + o_k[None, :] * stride_xk
        p_w = wt_ptr + o_k[:, None] * stride_wk + r_n[None, :] * stride_wn
        acc = _dot_loop(acc, p_x, p_w, K, stride_xk, stride_wk, o_k, DOT_FP32, INPUT_PRECISION, BLOCK_K,
                        INDEX_64)
        acc = acc * alpha
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + r_n)
        acc += b_bias.to(tl.float32)[None, :]
    # Formed only now: 64-bit addresses per element, not kept alive through the loops.
    m_o = (o_m < M)[:, None] & (o_n < N)[None, :]
    p_o = out_ptr + o_m[:, None] * stride_om + o_n[None, :] * stride_on
    tl.store(p_o, acc.to(out_ptr.dtype.element_ty), mask=m_o)


# A tile's indices run up to one tile past a size (pid·BLOCK + arange); a tile is at most 2**20
# elements, Triton's largest block.
_INT32_SIZE = 2 ** 31 - 2 ** 20


def _needs_int64(*tensors):
    """True if an element offset of any 2-D operand can reach 2**31, or a size comes within a tile of it
    (then the kernel indexes in int64).

    The largest offset is (rows - 1)·|row stride| + (cols - 1)·|col stride|, reduction axes included;
    a loop's pointer step (BLOCK_K·stride) is at most that whenever the loop takes a second step.
    The int32 variant forms larger offsets only in lanes past an edge, which are masked, and in the
    pointers past a loop's last step, which are never read.
    """
    for t in tensors:
        (rows, cols), (row_stride, col_stride) = t.shape, t.stride()
        if (rows - 1) * abs(row_stride) + (cols - 1) * abs(col_stride) >= 2 ** 31 or max(rows, cols) > _INT32_SIZE:
            return True
    return False


def _cdiv(a, b):
    return -(-a // b)   # plain ints: triton.cdiv called from the host costs a few µs per call


def _fit(size, lo, hi):
    """Smallest power of two >= size, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(size)))


@functools.lru_cache(maxsize=1024)   # a few µs per launch otherwise; callers only read the dict
def _native_config(M, N, dtype):
    """Tile shape for a compiled launch.

    Large tiles with a deep pipeline for the big GEMMs; narrower tiles when
    one side is small, so skinny problems (few tokens, factor gradients)
    still spread over the SMs.  16-bit operands take BLOCK_K = 64, fp32 32,
    which keeps every config within ~96 KB of shared memory.
    """
    block_k = 32 if dtype == torch.float32 else 64
    if M >= 1024 and N >= 1024:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)
    if M <= 64 or N <= 64:
        # Skinny: size the small side to the problem (tensor-core minimum 16),
        # e.g. x·B with N = rank = 16 runs 16-wide tiles, not 64-wide.
        return dict(BLOCK_M=_fit(M, 16, 64 if N <= 64 else 128), BLOCK_N=_fit(N, 16, 64 if M <= 64 else 128),
                    BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=4)


# The interpreter pays per program, not per FLOP: few, large tiles.
_INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)


def _input_precision(dtype):
    if dtype == torch.float32 and not _tf32_matmul():
        return "ieee"
    return "tf32"


def _tf32_matmul():
    """Whether torch lets fp32 matmuls use TF32, set either way torch offers: ``fp32_precision``
    ("tf32"/"ieee"; torch refuses a read of the older ``allow_tf32`` once it is set) or ``allow_tf32``."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    return torch.backends.cuda.matmul.allow_tf32


def check_operands(op, N, bias, **operands):
    """Raise where ``op``'s kernel would read past ``bias`` (not (N,)) or compute in the wrong precision
    (an operand that is not float32/float16/bfloat16; None operands are absent)."""
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"{op}: bias must have shape ({N},), got {tuple(bias.shape)}")
    check_kernel_dtypes(op, **{name: t for name, t in operands.items() if t is not None},
                        **({"bias": bias} if bias is not None else {}))


_OPERANDS = frozenset(("x", "wt", "u", "vt", "bias", "out"))     # each may be None (absent)


def check_gemm(op, x, wt, u, vt, bias, alpha, beta, optional=_OPERANDS):
    """(alpha, beta, M, N, K, R) of ``op``'s launch of out = alpha·x·wt + beta·u·vt + bias, once the
    operands pass :func:`lowrank_gemm`'s checks (its Raises section, all but ``out``'s); the names in
    ``optional`` may be None (an absent operand)."""
    check_tensors(op, optional, x=x, wt=wt, u=u, vt=vt, bias=bias)
    alpha = check_scale(op, "alpha", alpha)
    beta = check_scale(op, "beta", beta)
    if (x is None) != (wt is None) or (u is None) != (vt is None):
        raise ValueError(f"{op} needs x with wt and u with vt")
    if x is None and u is None:
        raise ValueError(f"{op} needs at least one product (x·wt or u·vt)")
    for name, t in (("x", x), ("wt", wt), ("u", u), ("vt", vt)):
        if t is not None and t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    M = (x if x is not None else u).shape[0]
    N = (wt if wt is not None else vt).shape[1]
    K = x.shape[1] if x is not None else 0
    R = u.shape[1] if u is not None else 0
    if x is not None and (wt.shape[0] != K or x.shape[0] != M):
        raise ValueError(f"{op}: x·wt shapes do not chain: {tuple(x.shape)} · {tuple(wt.shape)}")
    if u is not None and (u.shape[0] != M or vt.shape != (R, N)):
        raise ValueError(f"{op}: u·vt shapes do not match: {tuple(u.shape)} · {tuple(vt.shape)} for ({M}, {N})")
    check_operands(op, N, bias, x=x, wt=wt, u=u, vt=vt)
    for (a, b), (ta, tb) in ((("x", "wt"), (x, wt)), (("u", "vt"), (u, vt))):
        if ta is not None and ta.dtype != tb.dtype:
            raise TypeError(f"{op}: {a} and {b} must have one dtype (one product), got {ta.dtype} and {tb.dtype}")
    if x is not None and u is not None and x.dtype != u.dtype:
        # The kernel picks its tile precision (tf32 or IEEE, fp32 tiles for bf16 in the interpreter) once.
        raise TypeError(f"{op}: x·wt and u·vt must have one dtype (the kernel runs both products at one "
                        f"precision), got {x.dtype} and {u.dtype}")
    return alpha, beta, M, N, K, R


def _product_order(alpha, beta, has_x, has_u):
    """(swap, (alpha, beta_over_alpha, beta)): the kernel's scalars, and whether the host puts u·vt in
    the kernel's X·Wt slot and x·wt in its U·Vt slot.

    The kernel scales the U·Vt slot by beta/alpha, adds the X·Wt slot and multiplies the sum by alpha,
    so its accumulator holds out/alpha.  With both products, the one of larger scale takes the X·Wt slot:
    the ratio is at most 1 in magnitude and the accumulator no larger than the products (an alpha far
    below beta gave inf, 1e-20 beside 1e20 or 1e-39 beside 1, and NaN where it rounds to 0 in fp32).
    """
    if has_x and has_u and abs(beta) > abs(alpha):
        return True, (beta, alpha / beta, alpha)
    return False, (alpha, beta / alpha if has_x else 0.0, beta)


def lowrank_gemm(x=None, wt=None, u=None, vt=None, bias=None, *, alpha=1.0, beta=1.0,
                 out=None, out_dtype=None, config=None):
    """out = alpha·x·wt + beta·u·vt + bias.

    Args:
        x: (M, K) or None; wt: (K, N) or None (both or neither).
        u: (M, R) or None; vt: (R, N) or None (both or neither).  x, wt, u and vt of one dtype.
        bias: (N,) or None.
        out: (M, N) to write into (default: a new tensor); any strides whose elements do not share
            memory (an expanded view is refused, as ``torch.mm`` refuses it).
        alpha, beta: real scales of the two products, finite and within float32's range.  Each is
            applied in fp32, as torch applies a GEMM's alpha to float32 tensors: one below float32's
            smallest subnormal (1.4e-45) in magnitude acts as 0.
        out_dtype: dtype of a newly allocated ``out`` (default: dtype of x or u).
        config: tile config of a compiled launch (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
            num_stages), for tuning (``benchmarks/sweep_tiles.py``); default: ``_native_config``.

    Returns:
        out, shape (M, N).

    All operands are 2-D views with arbitrary strides on one device.  This is
    the internal engine; its callers validate user-facing shapes and dtypes.

    Raises:
        ValueError: an operand that is not 2-D, shapes that do not chain, a bias that is not (N,), an
            ``out`` whose elements share memory, a meta tensor, an alpha or beta that is not finite or
            past float32's range.
        TypeError: an operand that is not a tensor (or None); an operand (``out`` included) that is
            not float32, float16 or bfloat16; x, wt, u and vt not of one dtype (the two operands of one
            product, or the two products); an alpha or beta that is not a real number.
        RuntimeError: ``TRITON_INTERPRET`` changed after triton was imported
            (:func:`_runtime.interpreting`).
    """
    check_tensors("lowrank_gemm", _OPERANDS, out=out)
    alpha, beta, M, N, K, R = check_gemm("lowrank_gemm", x, wt, u, vt, bias, alpha, beta)
    first = x if x is not None else u
    if out is None:
        out = torch.empty((M, N), device=first.device, dtype=out_dtype or first.dtype)
    elif out.shape != (M, N):
        raise ValueError(f"lowrank_gemm: out must have shape ({M}, {N}), got {tuple(out.shape)}")
    else:
        check_no_overlap("lowrank_gemm", "out", out)
    check_kernel_dtypes("lowrank_gemm", out=out)
    if M == 0 or N == 0:
        return out

    dummy = out  # stands in for absent operands; never dereferenced
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the kernel reads bias with unit stride; it is tiny
    x_, wt_ = (x, wt) if x is not None else (dummy, dummy)
    u_, vt_ = (u, vt) if u is not None else (dummy, dummy)
    sx = (x.stride(0), x.stride(1)) if x is not None else (0, 0)
    sw = (wt.stride(0), wt.stride(1)) if wt is not None else (0, 0)
    su = (u.stride(0), u.stride(1)) if u is not None else (0, 0)
    sv = (vt.stride(0), vt.stride(1)) if vt is not None else (0, 0)
    operands = [out] + ([x, wt] if x is not None else []) + ([u, vt] if u is not None else [])
    interpreted = interpreting(_lowrank_gemm_kernel)
    check_launchable(out)
    has_x = x is not None and K > 0 and alpha != 0.0
    has_u = u is not None and R > 0
    swap, scalars = _product_order(alpha, beta, has_x, has_u)
    if swap:    # u·vt in the kernel's X·Wt slot, x·wt in its U·Vt slot
        x_, wt_, u_, vt_, sx, sw, su, sv, K, R = u_, vt_, x_, wt_, su, sv, sx, sw, R, K
    flags = dict(
        HAS_X=has_x, HAS_U=has_u, HAS_BIAS=bias is not None,
        INDEX_64=_needs_int64(*operands),
        # Triton's interpreter multiplies bf16 tiles wrongly; fp32 tiles hold bf16 exactly.
        DOT_FP32=interpreted and first.dtype == torch.bfloat16,
        INPUT_PRECISION=_input_precision(first.dtype),
    )
    args = (x_, wt_, u_, vt_, bias if bias is not None else dummy, out,
            M, N, K, R, *sx, *sw, *su, *sv, out.stride(0), out.stride(1), *scalars)

    if interpreted:
        config = _INTERPRETER_CONFIG
    else:
        config = config or _native_config(M, N, first.dtype)
    grid = (_cdiv(M, config["BLOCK_M"]) * _cdiv(N, config["BLOCK_N"]),)
    with launch_device(out):
        _lowrank_gemm_kernel[grid](*args, **flags, **config)
    return out


def reference_lowrank_gemm(x=None, wt=None, u=None, vt=None, bias=None, *, alpha=1.0, beta=1.0):
    """Plain-torch twin of :func:`lowrank_gemm` (returns a new tensor)."""
    first = x if x is not None else u
    N = (wt if wt is not None else vt).shape[1]
    acc = torch.zeros(first.shape[0], N, dtype=torch.float64, device=first.device)
    if x is not None:
        acc += alpha * (x.double() @ wt.double())
    if u is not None:
        acc += beta * (u.double() @ vt.double())
    if bias is not None:
        acc += bias.double()
    return acc
