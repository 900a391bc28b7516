"""Triton kernels of the fused low-rank linear against float64 references.

On a CPU-only machine the kernels run through Triton's interpreter (small
shapes); with CUDA they are compiled natively.  Every case first checks that
the low-rank term changes the result, so it cannot pass vacuously.
"""

import mmap
import re
import sys
import warnings

import pytest
import torch

from _helpers import (REL_TOL, assert_aliased_operand_refused, assert_grad_write_refused_then_merged,
                      assert_inference_write_refused_then_merged, kernel_devices, rel_err)

pytestmark = pytest.mark.skipif(not kernel_devices(), reason="no device can run Triton kernels here")

DEVICES = kernel_devices()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (tokens M, in K, out N, rank R): odd sizes, rank 1 / 8 / 64 / min(in, out).
SHAPES = [(1, 17, 5, 1), (17, 33, 123, 8), (123, 70, 65, 64), (9, 17, 23, 17)]


def _operands(M, K, N, R, dtype, device, with_weight):
    x = torch.randn(M, K, device=device).to(dtype)
    weight = torch.randn(N, K, device=device).div(K ** 0.5).to(dtype) if with_weight else None
    A = torch.randn(N, R, device=device).div(R ** 0.5).to(dtype)
    B = torch.randn(K, R, device=device).div(K ** 0.5).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    return x, weight, A, B, bias


def _reference(x, weight, A, B, bias, scale, dy):
    """Float64 forward and gradients by autograd through the plain formula."""
    from dynrank.kernels import reference_lowrank_linear
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, A, B, bias)]
    xr, wr, Ar, Br, br = leaves
    y = reference_lowrank_linear(xr, wr, Ar, Br, br, scale)
    y.backward(dy.double())
    return y.detach(), xr.grad, Ar.grad, Br.grad, br.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("form", ["lowrank", "adapter"])
def test_forward_backward_match_float64(device, dtype, shape, form):
    from dynrank.kernels import lowrank_linear_backward, lowrank_linear_forward
    M, K, N, R = shape
    scale = 0.75
    x, weight, A, B, bias = _operands(M, K, N, R, dtype, device, form == "adapter")
    dy = torch.randn(M, N, device=device).to(dtype)

    y, xbs = lowrank_linear_forward(x, weight, A, B, bias, scale)
    dx, dA, dB = lowrank_linear_backward(dy, x, weight, A, B, xbs, scale)
    y_ref, dx_ref, dA_ref, dB_ref, _ = _reference(x, weight, A, B, bias, scale, dy)

    lowrank_term = scale * (x.double() @ B.double()) @ A.double().t()
    assert lowrank_term.norm() > 1e-3 * y_ref.norm(), "low-rank term must matter in this case"
    tol = REL_TOL[dtype]
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel_err(y, y_ref) < tol
    assert rel_err(xbs, scale * x.double() @ B.double()) < tol
    assert rel_err(dx, dx_ref) < tol
    assert rel_err(dA, dA_ref) < tol
    assert rel_err(dB, dB_ref) < tol


@pytest.mark.parametrize("device", DEVICES)
def test_strided_operands_need_no_copy(device):
    """Transposed and sliced views are read through their strides."""
    from dynrank.kernels import lowrank_gemm, reference_lowrank_gemm
    M, K, N, R = 19, 24, 13, 5
    x = torch.randn(K, 2 * M, device=device)[:, ::2].t()          # (M, K), both strides non-unit-ish
    wt = torch.randn(N, K, device=device).t()                      # (K, N) transposed view
    u = torch.randn(M, R + 3, device=device)[:, 1:R + 1]           # (M, R) slice
    vt = torch.randn(N, R, device=device).t()                      # (R, N) transposed view
    bias = torch.randn(2 * N, device=device)[::2]
    out = lowrank_gemm(x, wt, u, vt, bias, alpha=0.5, beta=-2.0)
    ref = reference_lowrank_gemm(x, wt, u, vt, bias, alpha=0.5, beta=-2.0)
    assert rel_err(out, ref) < REL_TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16], ids=str)
def test_out_dtype_sets_the_dtype_of_a_new_out(device, out_dtype):
    """fp16 operands into an out of ``out_dtype`` (default: theirs): the fp32 accumulator is cast once, to
    that dtype, so a float32 out holds the sum to fp32 accuracy, past what an fp16 one can."""
    from dynrank.kernels import lowrank_gemm, reference_lowrank_gemm
    x, wt = torch.randn(19, 33, device=device).half(), torch.randn(33, 13, device=device).half()
    u, vt = torch.randn(19, 3, device=device).half(), torch.randn(3, 13, device=device).half()
    bias = torch.randn(13, device=device).half()
    out = lowrank_gemm(x, wt, u, vt, bias, alpha=0.5, beta=-2.0, out_dtype=out_dtype)
    expected_dtype = out_dtype or torch.float16
    assert out.dtype == expected_dtype and out.shape == (19, 13)
    assert rel_err(out, reference_lowrank_gemm(x, wt, u, vt, bias, alpha=0.5, beta=-2.0)) < REL_TOL[expected_dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [1.0, -0.5])
@pytest.mark.parametrize("shape", [(23, 17, 1), (65, 123, 8), (40, 70, 40)], ids=str)
def test_merge_in_place(device, dtype, alpha, shape):
    from dynrank.kernels import merge_, reference_merge
    N, K, R = shape
    W = torch.randn(N, K, device=device).to(dtype)
    A = torch.randn(N, R, device=device).to(dtype)
    B = torch.randn(K, R, device=device).to(dtype)
    expected = reference_merge(W, A, B, alpha)
    ptr = W.data_ptr()
    out = merge_(W, A, B, alpha)
    assert out is W and W.data_ptr() == ptr
    assert rel_err(W - W.new_zeros(()), expected) < REL_TOL[dtype]
    # The product is not negligible next to W, so a no-op merge would fail.
    assert (A.double() @ B.double().t()).norm() > 0.1 * expected.norm()


@pytest.mark.parametrize("device", DEVICES)
def test_merge_into_transposed_view(device):
    from dynrank.kernels import merge_, reference_merge
    storage = torch.randn(31, 18, device=device)
    W = storage.t()                                    # (18, 31), non-contiguous
    A, B = torch.randn(18, 3, device=device), torch.randn(31, 3, device=device)
    expected = reference_merge(W, A, B, 2.0)
    merge_(W, A, B, 2.0)
    assert rel_err(storage.t(), expected) < REL_TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["rank past one rank step", "16-bit factors into fp32", "column-major fp16",
                                  "fp16 A beside bf16 B", "fp16 A beside fp32 B"])
def test_merge_rank_loop_mixed_dtypes_and_layouts(device, case):
    """Ranks that take several BLOCK_R steps, factors narrower than W or of two dtypes (an fp16 A beside a
    bf16 or fp32 B met in one tile product), and a W stored column-major."""
    from dynrank.kernels import merge_, reference_merge
    N, K = 37, 90
    R, w_dtype, a_dtype, b_dtype = {
        "rank past one rank step": (70, torch.float32, torch.float32, torch.float32),
        "16-bit factors into fp32": (9, torch.float32, torch.bfloat16, torch.bfloat16),
        "column-major fp16": (5, torch.float16, torch.float16, torch.float16),
        "fp16 A beside bf16 B": (9, torch.float32, torch.float16, torch.bfloat16),
        "fp16 A beside fp32 B": (9, torch.float32, torch.float16, torch.float32)}[case]
    storage = torch.randn(K, N, device=device).to(w_dtype)
    W = storage.t() if case == "column-major fp16" else storage.t().contiguous()
    A = torch.randn(N, R, device=device).div(R ** 0.5).to(a_dtype)
    B = torch.randn(K, R, device=device).to(b_dtype)
    expected = reference_merge(W, A, B, -0.75)
    assert (A.double() @ B.double().t()).norm() > 0.1 * expected.norm()
    out = merge_(W, A, B, -0.75)
    assert out is W and W.dtype == w_dtype
    assert rel_err(W, expected) < REL_TOL[w_dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_merge_int64_variant_and_empty_rank(device, monkeypatch):
    """The INDEX_64 variant (huge weights) run on a small one; a rank-0 merge leaves W as it was."""
    import sys

    from dynrank.kernels import merge_, reference_merge
    monkeypatch.setattr(sys.modules["dynrank.kernels.merge"], "_needs_int64", lambda *tensors: True)
    W, A, B = torch.randn(65, 33, device=device), torch.randn(65, 4, device=device), torch.randn(33, 4, device=device)
    expected = reference_merge(W, A, B, 1.5)
    merge_(W, A, B, 1.5)
    assert rel_err(W, expected) < REL_TOL[torch.float32]
    before = W.clone()
    merge_(W, A[:, :0], B[:, :0], 1.5)
    assert torch.equal(W, before)


@pytest.mark.parametrize("device", DEVICES)
def test_engine_rejects_bad_shapes(device):
    from dynrank.kernels import lowrank_gemm, merge_
    with pytest.raises(ValueError, match=re.escape("x·wt shapes do not chain: (4, 5) · (6, 3)")):
        lowrank_gemm(torch.randn(4, 5, device=device), torch.randn(6, 3, device=device))
    with pytest.raises(ValueError, match=r"out must have shape \(4, 3\), got \(3, 4\)"):
        lowrank_gemm(u=torch.randn(4, 2, device=device), vt=torch.randn(2, 3, device=device),
                     out=torch.empty(3, 4, device=device))
    with pytest.raises(ValueError, match=re.escape("weight (N, K), A (N, R) and B (K, R), "
                                                   "got weight (4, 5), A (4, 2) and B (6, 2)")):
        merge_(torch.randn(4, 5, device=device), torch.randn(4, 2, device=device), torch.randn(6, 2, device=device))
    with pytest.raises(ValueError, match=r"weight \(N, K\).*got weight \(4, 5, 1\), A \(4, 2\) and B \(5, 2\)"):
        merge_(torch.randn(4, 5, 1, device=device), torch.randn(4, 2, device=device), torch.randn(5, 2, device=device))
    # A 1-D operand was an IndexError, mixed dtypes of one product an error inside tl.dot.
    with pytest.raises(ValueError, match=re.escape("lowrank_gemm: wt must be 2-D, got shape (5,)")):
        lowrank_gemm(torch.randn(4, 5, device=device), torch.randn(5, device=device))
    with pytest.raises(TypeError, match=re.escape("lowrank_gemm: x and wt must have one dtype (one product), "
                                                  "got torch.float32 and torch.float16")):
        lowrank_gemm(torch.randn(4, 5, device=device), torch.randn(5, 3, device=device).half())


@pytest.mark.parametrize("device", DEVICES)
def test_an_empty_feature_axis_is_sized(device, monkeypatch):
    """An N-D input with in_features = 0 could not be reshaped on the Triton engine (the torch engine
    gives the bias)."""
    import dynrank.functional as DF
    monkeypatch.setenv("DYNRANK_BACKEND", "triton")
    A, B = torch.randn(3, 2, device=device), torch.randn(4, 2, device=device)
    x = torch.randn(2, 3, 0, device=device)
    y = DF.lowrank_linear(x, None, A, B[:0], torch.ones(3, device=device), 1.0)
    assert y.shape == (2, 3, 3) and torch.equal(y, torch.ones(2, 3, 3, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32], ids=str)
def test_engine_refuses_dtypes_the_kernels_do_not_take(device, dtype):
    """float64 came back as denormal garbage from lowrank_gemm (fp32 loads of float64 memory), NaN from
    lowrank_linear_forward, at fp32 accuracy from merge_; an int32 weight took a truncated sum."""
    from dynrank.kernels import lowrank_gemm, lowrank_linear_forward, merge_
    odd = lambda *shape: torch.ones(*shape, device=device).to(dtype)    # noqa: E731
    f32 = lambda *shape: torch.ones(*shape, device=device)              # noqa: E731
    name = str(dtype)
    with pytest.raises(TypeError, match=re.escape(f"lowrank_gemm takes float32, float16 or bfloat16 tensors "
                                                  f"(fp32 accumulation), got x of dtype {name}")):
        lowrank_gemm(odd(4, 5), f32(5, 3))
    with pytest.raises(TypeError, match=f"got vt of dtype {re.escape(name)}"):
        lowrank_gemm(u=f32(4, 2), vt=odd(2, 3))
    with pytest.raises(TypeError, match=f"got out of dtype {re.escape(name)}"):
        lowrank_gemm(f32(4, 5), f32(5, 3), out=odd(4, 3))
    with pytest.raises(TypeError, match=f"got bias of dtype {re.escape(name)}"):
        lowrank_gemm(f32(4, 5), f32(5, 3), bias=odd(3))
    with pytest.raises(TypeError, match="lowrank_gemm takes float32"):
        lowrank_linear_forward(odd(4, 6), odd(5, 6), odd(5, 2), odd(6, 2))
    for which in ("weight", "A", "B"):
        operands = {"weight": f32(4, 5), "A": f32(4, 2), "B": f32(5, 2)}
        operands[which] = operands[which].to(dtype)
        before = operands["weight"].clone()
        with pytest.raises(TypeError, match=re.escape(f"merge_ takes float32, float16 or bfloat16 tensors "
                                                      f"(fp32 accumulation), got {which} of dtype {name}")):
            merge_(operands["weight"], operands["A"], operands["B"], 0.6)
        assert torch.equal(operands["weight"], before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1,), (4, 8), (9,)])
def test_engine_refuses_a_bias_that_is_not_one_per_output(device, shape):
    """The kernels read N bias elements: a (1,) bias gave outputs 9.5e35 off (a read past its end)."""
    from dynrank.kernels import lowrank_gemm, lowrank_linear_forward
    x, W = torch.randn(4, 6, device=device), torch.randn(8, 6, device=device)
    A, B = torch.randn(8, 2, device=device), torch.randn(6, 2, device=device)
    bias = torch.randn(*shape, device=device)
    message = re.escape(f"bias must have shape (8,), got {shape}")
    with pytest.raises(ValueError, match="lowrank_gemm: " + message):
        lowrank_gemm(x, W.t(), bias=bias)
    with pytest.raises(ValueError, match=message):
        lowrank_linear_forward(x, W, A, B, bias)

@pytest.mark.skipif("cuda" not in DEVICES, reason="int64 offsets need > 2**31 elements: CUDA only")
def test_int64_offsets_past_2_31():
    from dynrank.kernels import lowrank_linear_forward
    M, K, N, R = 2 ** 20 + 3, 2 ** 11 + 1, 64, 8        # x has > 2**31 elements
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(N, R, device="cuda", dtype=torch.bfloat16)
    B = torch.randn(K, R, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    y, _ = lowrank_linear_forward(x, None, A, B)
    rows = torch.tensor([0, M // 2, M - 1], device="cuda")
    ref = (x[rows].double() @ B.double()) @ A.double().t()
    assert rel_err(y[rows], ref) < REL_TOL[torch.bfloat16]


def test_int64_indexing_is_chosen_by_the_largest_offset():
    from types import SimpleNamespace

    from dynrank.kernels.lowrank_gemm import _needs_int64
    view = lambda shape, stride: SimpleNamespace(shape=shape, stride=lambda: stride)  # noqa: E731
    assert not _needs_int64(torch.empty(64, 32), view((2 ** 15, 2 ** 16), (2 ** 16, 1)))   # last offset 2**31 - 1
    assert _needs_int64(torch.empty(2, 2), view((2 ** 15 + 1, 2 ** 16), (2 ** 16, 1)))
    assert _needs_int64(view((3, 4), (2 ** 30, 2 ** 29)))                                  # strides alone
    assert _needs_int64(view((3, 1), (2 ** 30, 1)))                                        # last offset 2**31
    assert not _needs_int64(view((3, 1), (2 ** 30 - 1, 1)))                                # last offset 2**31 - 2


@pytest.mark.parametrize("device", DEVICES)
def test_the_int64_kernel_variant_computes_the_same(device, monkeypatch):
    """The INDEX_64 variant (huge operands) run on small ones, against the float64 reference."""
    import sys

    from dynrank.kernels import lowrank_gemm, reference_lowrank_gemm
    module = sys.modules["dynrank.kernels.lowrank_gemm"]      # the package exports the function by that name
    monkeypatch.setattr(module, "_needs_int64", lambda *tensors: True)
    M, K, N, R = 37, 29, 71, 6
    x, wt = torch.randn(M, K, device=device), torch.randn(K, N, device=device)
    u, vt = torch.randn(M, R, device=device), torch.randn(R, N, device=device)
    out = lowrank_gemm(x, wt, u, vt, alpha=0.75, beta=-1.5)
    assert rel_err(out, reference_lowrank_gemm(x, wt, u, vt, alpha=0.75, beta=-1.5)) < REL_TOL[torch.float32]


def test_int64_indexing_covers_tile_indices_past_a_size():
    """A tile's indices run up to a tile past its size (pid·BLOCK + arange): a (2**31 - 2**10)-row column
    whose last offset fits int32 still takes the int64 variant, or its last row tile's indices wrap."""
    from types import SimpleNamespace

    from dynrank.kernels.lowrank_gemm import _needs_int64
    view = lambda shape, stride: SimpleNamespace(shape=shape, stride=lambda: stride)  # noqa: E731
    assert _needs_int64(view((2 ** 31 - 2 ** 10, 1), (1, 1)))
    assert not _needs_int64(view((2 ** 30, 1), (1, 1)))


# Linux's MAP_NORESERVE (its value on x86 and ARM where the mmap module does not name it): the mapping takes
# no memory until a page is written, so 8 GiB of address space costs the few pages a test writes.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def _far_view(shape, strides, dtype=torch.float16):
    """A CPU tensor of random values with these strides, 2**31 elements into an anonymous mapping: offsets
    past 2**31 elements in a few kB of memory.  An offset that wraps to -2**31 in int32 reads the zeros
    below the tensor (a wrong value, not a crash)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux's MAP_NORESERVE")
    start = 2 ** 31
    elements = start + sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    try:
        buffer = mmap.mmap(-1, elements * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    except OSError as error:    # a strict overcommit policy or an address-space limit
        pytest.skip(f"cannot map {elements} elements of address space: {error}")
    view = torch.frombuffer(buffer, dtype=dtype).as_strided(shape, strides, start)   # keeps the buffer alive
    return view.copy_(torch.randn(shape))


@pytest.mark.skipif(DEVICES != ["cpu"], reason="the CPU views need Triton's interpreter")
@pytest.mark.parametrize("case", ["x column stride", "x column step", "wt row stride", "merge A rank stride",
                                  "merge B rank step"])
def test_int64_offsets_along_the_reduction_axis(case):
    """Under INDEX_64 only the row and column tile indices were int64: index·stride along the reduction
    (o_k·stride_xk, o_r·stride_ar) and the loop's pointer step BLOCK·stride stayed int32 and wrapped to
    -2**31, a read 2**31 elements before the operand (a segfault; here, zeros).  The interpreter's tiles
    have BLOCK_K = 64: K = 3 at stride 2**30 wraps the index product, K = 65 at 2**25 the step."""
    from dynrank.kernels import lowrank_gemm, merge_, reference_lowrank_gemm, reference_merge
    from dynrank.kernels.lowrank_gemm import _needs_int64
    if case.startswith("merge"):
        N, K, R = 5, 7, 3 if case == "merge A rank stride" else 65
        stride = 2 ** 30 if case == "merge A rank stride" else 2 ** 25
        A, B = torch.randn(N, R).half(), torch.randn(K, R).half()
        if case == "merge A rank stride":
            A = _far_view((N, R), (1, stride))
        else:
            B = _far_view((K, R), (1, stride))
        weight = torch.randn(N, K)
        expected = reference_merge(weight, A, B, 0.5)
        assert _needs_int64(weight, A, B) and rel_err(weight, expected) > 0.1
        merge_(weight, A, B, 0.5)
        assert rel_err(weight, expected) < REL_TOL[torch.float16]
        return
    M, N = 4, 5
    K, stride = (65, 2 ** 25) if case == "x column step" else (3, 2 ** 30)
    if case == "wt row stride":
        x, wt = torch.randn(M, K).half(), _far_view((K, N), (stride, 1))
    else:
        x, wt = _far_view((M, K), (1, stride)), torch.randn(K, N).half()
    assert _needs_int64(x, wt)
    out = lowrank_gemm(x, wt)
    assert rel_err(out, reference_lowrank_gemm(x, wt)) < REL_TOL[torch.float16]


@pytest.mark.skipif(DEVICES != ["cpu"], reason="the CPU views need Triton's interpreter")
def test_an_offset_of_exactly_2_31_takes_int64():
    """2**31 is the first offset int32 cannot hold: x's last row at exactly that offset wraps to -2**31 in
    int32 and reads the zeros below the tensor.  Each row is checked on its own, so that one stands out."""
    from dynrank.kernels import lowrank_gemm, reference_lowrank_gemm
    from dynrank.kernels.lowrank_gemm import _needs_int64
    x, wt = _far_view((3, 1), (2 ** 30, 1)), torch.randn(1, 4).half()
    assert _needs_int64(x)
    out, expected = lowrank_gemm(x, wt), reference_lowrank_gemm(x, wt)
    assert expected[2].norm() > 0.1                     # a row of zeros would be far off
    for row in range(3):
        assert rel_err(out[row], expected[row]) < REL_TOL[torch.float16]


@pytest.mark.skipif("cuda" not in DEVICES, reason="reduction strides past 2**31 / BLOCK_K need GiBs: CUDA only")
@pytest.mark.parametrize("K, stride", [(3, 2 ** 30), (65, 2 ** 25)], ids=["index product", "pointer step"])
def test_int64_offsets_along_the_reduction_axis_on_cuda(K, stride):
    """x as the (T, C) view of a (C, T) fp16 activation with T = stride tokens: its column stride times
    the column (K = 3 at 2**30) or the loop's step BLOCK_K·stride (64·2**25, K = 65 for a second step)
    reaches 2**31, which int32 offsets wrapped (an illegal access or wrong values)."""
    from dynrank.kernels import lowrank_linear_forward
    M, N, R = 8, 16, 4
    storage = torch.zeros((K - 1) * stride + M, device="cuda", dtype=torch.float16)
    x = storage.as_strided((M, K), (1, stride))
    x.copy_(torch.randn(M, K, device="cuda"))
    weight = torch.randn(N, K, device="cuda", dtype=torch.float16) / K ** 0.5
    A, B = torch.randn(N, R, device="cuda", dtype=torch.float16), torch.randn(K, R, device="cuda", dtype=torch.float16)
    y, _ = lowrank_linear_forward(x, weight, A, B)
    xd = x.double()
    ref = xd @ weight.double().t() + (xd @ B.double()) @ A.double().t()
    assert rel_err(y, ref) < REL_TOL[torch.float16]


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_zero_drops_the_dense_product(device):
    from dynrank.kernels import lowrank_gemm, reference_lowrank_gemm
    x, wt = torch.randn(9, 20, device=device), torch.randn(20, 11, device=device)
    u, vt = torch.randn(9, 3, device=device), torch.randn(3, 11, device=device)
    out = lowrank_gemm(x, wt, u, vt, alpha=0.0, beta=2.0)
    assert rel_err(out, reference_lowrank_gemm(x, wt, u, vt, alpha=0.0, beta=2.0)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha, beta", [(1e-20, 1e20), (1e-39, 1.0), (1e-46, 1.0), (-1e-30, 1e10), (1e20, 1e-20),
                                         (1.0, -1e-46)], ids=str)
def test_scales_far_apart_match_float64(device, alpha, beta):
    """The kernel scaled u·vt by beta/alpha and the sum by alpha, both in fp32: an alpha far below beta gave
    ±inf (1e-20 beside 1e20, 1e-39 beside 1, -1e-30 beside 1e10) or NaN (1e-46, which rounds to 0 in fp32),
    though both are finite and within float32's range."""
    from dynrank.kernels import lowrank_gemm, reference_lowrank_gemm
    x, wt = torch.randn(9, 20, device=device), torch.randn(20, 11, device=device)
    u, vt = torch.randn(9, 3, device=device), torch.randn(3, 11, device=device)
    out = lowrank_gemm(x, wt, u, vt, alpha=alpha, beta=beta)
    assert rel_err(out, reference_lowrank_gemm(x, wt, u, vt, alpha=alpha, beta=beta)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.float16, torch.float32)], ids=str)
def test_engine_refuses_products_of_two_dtypes(device, dtypes):
    """The tile precision was chosen from x's dtype for both products: x·wt in float32 beside u·vt in bfloat16
    came out 4.8e9 off a result of 4.9 (the interpreter's bf16 tiles); on a GPU one product ran at the other's
    precision (tf32 or IEEE).  Nothing is written."""
    from dynrank.kernels import lowrank_gemm
    x, wt = torch.randn(4, 5, device=device).to(dtypes[0]), torch.randn(5, 3, device=device).to(dtypes[0])
    u, vt = torch.randn(4, 2, device=device).to(dtypes[1]), torch.randn(2, 3, device=device).to(dtypes[1])
    out = torch.zeros(4, 3, device=device)
    with pytest.raises(TypeError, match=re.escape(f"lowrank_gemm: x·wt and u·vt must have one dtype (the kernel "
                                                  f"runs both products at one precision), got {dtypes[0]} and "
                                                  f"{dtypes[1]}")):
        lowrank_gemm(x, wt, u, vt, out=out)
    assert not out.any()


_MODE_SCRIPT = """
import os, sys
scenario = sys.argv[1]
os.environ.pop("TRITON_INTERPRET", None)
if scenario == "unset after the imports":
    os.environ["TRITON_INTERPRET"] = "1"
if scenario == "set between triton and dynrank":
    import triton
    os.environ["TRITON_INTERPRET"] = "1"
import torch
from dynrank.kernels import lowrank_gemm, merge_
if scenario == "set after the imports":
    os.environ["TRITON_INTERPRET"] = "1"
if scenario == "unset after the imports":
    del os.environ["TRITON_INTERPRET"]
for call in (lambda: lowrank_gemm(torch.ones(2, 3), torch.ones(3, 2)),
             lambda: merge_(torch.zeros(2, 3), torch.ones(2, 1), torch.ones(3, 1))):
    try:
        call()
        print("ran")
    except Exception as error:
        print(type(error).__name__, error)
"""

_RESTART = ("TRITON_INTERPRET must be set before Python imports triton and dynrank: restart Python with it set as "
            "you want it")


def test_triton_interpret_changed_after_import_is_a_clear_error():
    """Triton fixes compiled or interpreted per function as it decorates it, at import, but the mode was read
    from TRITON_INTERPRET at every launch: set after the imports (as the CPU error message asked), a launch
    was "0 active drivers"; set between the imports of triton and dynrank, an InterpreterError; unset after,
    a message asking to set it.  Each case in a fresh process (the mode is process-wide)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    expected = {
        "set after the imports": ["TRITON_INTERPRET is '1' now, but Triton made its functions compiled when triton "
                                  "was imported (it reads the variable once, at import); "] * 2,
        "unset after the imports": ["TRITON_INTERPRET is unset now, but Triton made its functions interpreted when "
                                    "triton was imported (it reads the variable once, at import); "] * 2,
        "set between triton and dynrank": [
            f"Triton made its own functions compiled when triton was imported but dynrank's kernel {kernel} "
            f"interpreted when its module was (TRITON_INTERPRET changed in between); "
            for kernel in ("_lowrank_gemm_kernel", "_merge_kernel")],
    }
    runs = {scenario: subprocess.Popen([sys.executable, "-c", _MODE_SCRIPT, scenario], cwd=root, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for scenario in expected}
    for scenario, run in runs.items():
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-2000:]
        assert stdout.splitlines() == [f"RuntimeError {message}{_RESTART}" for message in expected[scenario]], scenario


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setting", ["tf32", "ieee"])
def test_the_fp32_precision_setting_of_torch_is_read(device, setting, monkeypatch):
    """torch refuses a read of allow_tf32 once fp32_precision is set: every fp32 launch raised ("mix of
    the legacy and new APIs") where torch's own matmuls ran."""
    from dynrank.kernels import lowrank_linear_forward
    from dynrank.kernels.lowrank_gemm import _input_precision
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision setting")
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = setting
    try:
        assert _input_precision(torch.float32) == setting
        assert _input_precision(torch.bfloat16) == "tf32"          # 16-bit operands: the flag is unused
        x, weight, A, B, bias = _operands(9, 17, 23, 8, torch.float32, device, True)
        y, _ = lowrank_linear_forward(x, weight, A, B, bias, 0.75)
        y_ref = _reference(x, weight, A, B, bias, 0.75, torch.zeros(9, 23, device=device))[0]
        # TF32 rounds the operands to 10 mantissa bits (2^-11 relative), IEEE fp32 keeps 23.
        assert rel_err(y, y_ref) < (2e-3 if setting == "tf32" and device != "cpu" else REL_TOL[torch.float32])
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", ["leaf", "transposed leaf"])
def test_merge_refuses_a_weight_that_requires_grad_in_grad_mode(device, view):
    """The kernel writes through a pointer, which autograd does not record: a leaf that requires grad was
    merged without the error torch's addmm_ gives.  Under torch.no_grad(), as dynrank's merges run, it is
    merged."""
    from dynrank.kernels import merge_, reference_merge
    leaf = torch.randn(5, 4, device=device, requires_grad=True)
    W = leaf if view == "leaf" else leaf.t()
    A, B = torch.randn(W.shape[0], 2, device=device), torch.randn(W.shape[1], 2, device=device)
    assert_grad_write_refused_then_merged("merge_", lambda: merge_(W, A, B, 0.5), W,
                                          reference_merge(W.detach(), A, B, 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_merge_refuses_an_inference_weight_outside_inference_mode(device):
    """An inference tensor was merged outside inference mode, where torch's addmm_ refuses it."""
    from dynrank.kernels import merge_, reference_merge
    with torch.inference_mode():
        W = torch.randn(5, 4, device=device)
        A, B = torch.randn(5, 2, device=device), torch.randn(4, 2, device=device)
    assert_inference_write_refused_then_merged("merge_", lambda: merge_(W, A, B, 0.5), W,
                                               reference_merge(W.clone(), A, B, 0.5))


def _overlapping(base_numel, shape, stride, device):
    """(storage, view): a view of ``shape`` and ``stride`` over zeros whose elements share memory."""
    storage = torch.zeros(base_numel, device=device)
    return storage, storage.as_strided(shape, stride)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["windows", "expanded"])
def test_merge_refuses_a_weight_whose_elements_overlap(device, layout):
    """Only a zero stride was refused: for W[i, j] = storage[i + j] the adds that land on shared elements
    were lost, without a word (dynrank.functional.merge_ and torch's addmm_ refuse the view)."""
    from dynrank.kernels import merge_
    storage, W = _overlapping(8, (3, 4), (1, 1) if layout == "windows" else (0, 1), device)
    with pytest.raises(ValueError, match=re.escape(f"merge_ writes weight, so its elements must not share memory, "
                                                   f"got a view whose elements overlap (shape (3, 4), strides "
                                                   f"{W.stride()})")):
        merge_(W, torch.ones(3, 1, device=device), torch.ones(4, 1, device=device), 1.0)
    assert torch.equal(storage, torch.zeros(8, device=device))
    # Interleaved strides whose offsets all differ (2i + 3j) are no overlap: merged through them.
    storage = torch.zeros(8, device=device)
    W = storage.as_strided((3, 2), (2, 3))
    A, B = torch.randn(3, 2, device=device), torch.randn(2, 2, device=device)
    merge_(W, A, B, 0.5)
    assert rel_err(W, 0.5 * A.double() @ B.double().t()) < REL_TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["windows", "expanded"])
def test_engine_refuses_an_out_whose_elements_overlap(device, layout):
    """An expanded or overlapping ``out`` was written row over row (4.4 and 5.7 off x·wt); torch.mm refuses it."""
    from dynrank.kernels import lowrank_gemm, reference_lowrank_gemm
    x, wt = torch.randn(3, 4, device=device), torch.randn(4, 5, device=device)
    storage, out = _overlapping(8, (3, 5), (1, 1) if layout == "windows" else (0, 1), device)
    with pytest.raises(ValueError, match=re.escape(f"lowrank_gemm writes out, so its elements must not share "
                                                   f"memory, got a view whose elements overlap (shape (3, 5), "
                                                   f"strides {out.stride()})")):
        lowrank_gemm(x, wt, out=out)
    assert torch.equal(storage, torch.zeros(8, device=device))
    # A strided out whose elements are apart is written through its strides.
    storage = torch.zeros(5, 7, device=device)
    out = storage[:, 1:4].t()
    assert lowrank_gemm(x, wt, out=out) is out
    assert rel_err(storage[:, 1:4].t(), reference_lowrank_gemm(x, wt)) < REL_TOL[torch.float32]


def _entry_points(device):
    """name → (callable, its keyword arguments): every public launcher of dynrank.kernels, on valid operands."""
    from dynrank.kernels import conv_merge_, lowrank_gemm, lowrank_linear_backward, lowrank_linear_forward, merge_
    t = lambda *shape: torch.randn(*shape, device=device)   # noqa: E731
    return {
        "lowrank_gemm": (lowrank_gemm, dict(x=t(3, 4), wt=t(4, 5), u=t(3, 2), vt=t(2, 5), bias=t(5), out=t(3, 5),
                                            alpha=0.5, beta=2.0)),
        "lowrank_linear_forward": (lowrank_linear_forward, dict(x=t(3, 4), weight=t(5, 4), A=t(5, 2), B=t(4, 2),
                                                                bias=t(5), scale=0.5)),
        "lowrank_linear_backward": (lowrank_linear_backward, dict(dy=t(3, 5), x=t(3, 4), weight=t(5, 4), A=t(5, 2),
                                                                  B=t(4, 2), xbs=t(3, 2), scale=0.5)),
        "merge_": (merge_, dict(weight=t(5, 4), A=t(5, 2), B=t(4, 2), alpha=0.5)),
        "conv_merge_": (conv_merge_, dict(weight=t(4, 3, 2, 2), U=t(4, 2), V=t(2, 3, 2, 2), alpha=0.5, groups=1)),
    }


# The operands each op takes as None (absent).
_OPTIONAL = {"lowrank_gemm": {"x", "wt", "u", "vt", "bias", "out"}, "lowrank_linear_forward": {"weight", "bias"},
             "lowrank_linear_backward": {"weight"}}
_SCALES = {"lowrank_gemm": ("alpha", "beta"), "lowrank_linear_forward": ("scale",),
           "lowrank_linear_backward": ("scale",), "merge_": ("alpha",), "conv_merge_": ("alpha",)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op, wrong", [(op, wrong) for op in _SCALES for wrong in ("None", "list", "ndarray")
                                       if not (op == "lowrank_gemm" and wrong == "None")])
def test_kernels_refuse_an_operand_that_is_not_a_tensor(device, op, wrong):
    """A list, numpy array or None operand was an AttributeError (``'list' object has no attribute 'dim'``).
    None is refused where the operand is not optional (every operand of lowrank_gemm is)."""
    import numpy as np
    fn, kwargs = _entry_points(device)[op]
    names = [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)
             and not (wrong == "None" and name in _OPTIONAL.get(op, ()))]
    assert names
    for name in names:
        value = {"None": None, "list": kwargs[name].tolist(), "ndarray": np.zeros(tuple(kwargs[name].shape))}[wrong]
        with pytest.raises(TypeError, match=re.escape(f"{op} takes tensors, got {name} of type "
                                                      f"{type(value).__name__}")):
            fn(**{**kwargs, name: value})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(_SCALES))
def test_kernels_refuse_meta_tensors_by_name(device, op):
    """A meta operand was a NotImplementedError from torch ("Cannot copy out of meta tensor")."""
    fn, kwargs = _entry_points(device)[op]
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            with pytest.raises(ValueError, match=re.escape(f"{op} runs Triton kernels, which need tensors with "
                                                           f"real data, got {name} on the meta device")):
                fn(**{**kwargs, name: value.to("meta")})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op, scale", [(op, s) for op, names in _SCALES.items() for s in names])
@pytest.mark.parametrize("value, error, message", [
    (None, TypeError, "must be a real number, got NoneType (None)"),
    ([1.0], TypeError, "must be a real number, got list ([1.0])"),
    (True, TypeError, "must be a real number, got bool (True)"),
    (1j, TypeError, "must be a real number, got complex (1j)"),
    (float("nan"), ValueError, "must be finite, got nan"),
    (-float("inf"), ValueError, "must be finite, got -inf"),
    (1e300, ValueError, "must be within float32's range (magnitude at most 3.403e+38): the kernels compute "
                        "in fp32, got 1e+300"),
    (-10 ** 400, ValueError, "must be within float32's range"),
    (torch.tensor(0.5, requires_grad=True), TypeError, "is read as a number, so a tensor that requires grad would "
                                                       "get no gradient"),
], ids=["None", "list", "bool", "complex", "nan", "-inf", "1e300", "-10**400", "requires-grad"])
def test_kernels_refuse_a_scale_that_is_not_a_finite_float32(device, op, scale, value, error, message):
    """None or a list was a bare float() TypeError, NaN / inf went into W in place (functional.merge_ refuses
    it), 1e300 became inf in the fp32 accumulator.  Nothing is written."""
    fn, kwargs = _entry_points(device)[op]
    written = kwargs.get("weight") if op.endswith("merge_") else kwargs.get("out")
    before = written.clone() if written is not None else None
    with pytest.raises(error, match=re.escape(f"{op}: {scale} {message}")):
        fn(**{**kwargs, scale: value})
    if before is not None:
        assert torch.equal(written, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["lowrank_gemm", "merge_", "lowrank_linear_forward"])
def test_kernels_take_numpy_and_0d_tensor_scales_as_floats(device, op):
    """A numpy number or a 0-d real tensor is the float it holds (as ``float()`` read it)."""
    import numpy as np
    fn, kwargs = _entry_points(device)[op]
    name = _SCALES[op][0]
    copy = lambda kw: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}  # noqa: E731
    expected = fn(**copy(kwargs))
    for value in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5, dtype=torch.float64)):
        got = fn(**{**copy(kwargs), name: value})
        assert torch.equal(got[0] if isinstance(got, tuple) else got, expected[0] if isinstance(expected, tuple)
                           else expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["lowrank_linear_forward", "lowrank_linear_backward"])
@pytest.mark.parametrize("name", ["weight", "A", "B"])
def test_linear_kernels_refuse_operands_that_are_not_2d(device, op, name):
    """A 3-D weight was a RuntimeError from ``t()``; a 1-D B was named ``wt`` by the engine."""
    fn, kwargs = _entry_points(device)[op]
    for shape in ((1, *kwargs[name].shape), tuple(kwargs[name].shape[:1])):
        with pytest.raises(ValueError, match=re.escape(f"{op}: {name} must be 2-D, got shape {shape}")):
            fn(**{**kwargs, name: torch.randn(shape, device=device)})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op, name, shape", [
    ("lowrank_linear_forward", "B", (4, 3)), ("lowrank_linear_forward", "B", (6, 2)),
    ("lowrank_linear_forward", "weight", (5, 6)), ("lowrank_linear_forward", "bias", (4,)),
    ("lowrank_linear_backward", "xbs", (3, 5)), ("lowrank_linear_backward", "xbs", (4, 2)),
    ("lowrank_linear_backward", "dy", (3, 6)), ("lowrank_linear_backward", "dy", (2, 5)),
    ("lowrank_linear_backward", "B", (4, 3)), ("lowrank_linear_backward", "weight", (6, 4))])
def test_linear_kernels_name_an_operand_of_the_wrong_shape(device, op, name, shape):
    """An xbs of another rank came back as a dA of that rank, no error; the other mistakes were reported in
    the engine's names (``lowrank_gemm: x·wt shapes do not chain`` for a dy of the wrong width)."""
    fn, kwargs = _entry_points(device)[op]      # x (3, 4) and A (5, 2): M, K, N, R = 3, 4, 5, 2
    expected = {"B": (4, 2), "weight": (5, 4), "bias": (5,), "dy": (3, 5), "xbs": (3, 2)}[name]
    with pytest.raises(ValueError, match=re.escape(f"{op}: {name} must have shape {expected}, got {shape} "
                                                   f"(for x (3, 4) and A (5, 2))")):
        fn(**{**kwargs, name: torch.randn(shape, device=device)})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factor", ["A = weight[:, :4]", "B = weight[:4].t()", "A interleaved with weight's rows"])
def test_merge_refuses_a_factor_that_shares_memory_with_the_weight(device, factor):
    """A factor that is a view of the weight was read while the kernel wrote it: values off by 28 to 31,
    without a word."""
    from dynrank.kernels import merge_, reference_merge
    weight = torch.randn(10, 13, device=device)
    A, B = torch.randn(10, 4, device=device), torch.randn(13, 4, device=device)
    if factor == "A = weight[:, :4]":
        A, name = weight[:, :4], "A"
    elif factor == "B = weight[:4].t()":
        B, name = weight[:4].t(), "B"
    else:                   # elements apart from the weight's, within the bytes it spans: refused too
        storage = torch.randn(10, 17, device=device)
        weight, A, name = storage[:, :13], storage[:, 13:], "A"
    assert_aliased_operand_refused("merge_", merge_, reference_merge, weight, {"A": A, "B": B}, name)
    # So do factors elsewhere in the weight's storage.
    storage = torch.randn(10 * 13 + 10 * 4 + 13 * 4, device=device)
    weight, A, B = storage[:130].view(10, 13), storage[130:170].view(10, 4), storage[170:].view(13, 4)
    expected = reference_merge(weight, A, B, 0.5)
    merge_(weight, A, B, 0.5)
    assert rel_err(weight, expected) < REL_TOL[torch.float32]


@pytest.mark.parametrize("factor", ["A = weight[:, :4]", "B = weight[:4].t()"])
def test_functional_merge_on_the_torch_engine_refuses_a_factor_in_the_weights_memory(torch_backend, factor):
    """dynrank.functional.merge_ on torch's addmm_ gave wrong values for B = W[:4].t(), without a word; it
    refuses as the kernel does (float64 takes addmm_ on every engine)."""
    from dynrank.functional import merge_
    from dynrank.kernels import reference_merge
    for dtype in (torch.float32, torch.float64):
        weight = torch.randn(10, 13, dtype=dtype)
        A, B = torch.randn(10, 4, dtype=dtype), torch.randn(13, 4, dtype=dtype)
        if factor == "A = weight[:, :4]":
            A, name = weight[:, :4], "A"
        else:
            B, name = weight[:4].t(), "B"
        assert_aliased_operand_refused("merge_", merge_, reference_merge, weight, {"A": A, "B": B}, name)


def test_functional_merge_runs_under_vmap_and_functionalize(torch_backend):
    """The aliasing check read the data pointers of torch.func's wrapped tensors: vmap raised "Cannot access data
    pointer", functionalize refused separate tensors as sharing memory.  There is nothing to compare there."""
    from dynrank.functional import merge_
    W = torch.randn(3, 6, 5, dtype=torch.float64)
    A, B = torch.randn(3, 6, 2, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    expected = W + A @ B.transpose(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # torch: no batching rule for addmm_ (a slower fallback)
        assert rel_err(torch.vmap(merge_)(W.clone(), A, B), expected) < 1e-12
    merged = torch.func.functionalize(lambda w, a, b: merge_(w.clone(), a, b))(W[0], A[0], B[0])
    assert rel_err(merged, expected[0]) < 1e-12
