"""The experimental TMA-descriptor engine (kernels/lowrank_gemm_tma.py) against the float64 reference."""

import functools
import re

import pytest
import torch

from _helpers import REL_TOL, kernel_devices, rel_err

pytestmark = pytest.mark.skipif(not kernel_devices(), reason="no device can run Triton kernels here")

CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)


def _device():
    return kernel_devices()[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("role", ["adapter forward", "adapter dx"])
def test_both_products_match_float64(dtype, role):
    """Odd row counts and sizes that are not multiples of the tiles: the descriptors zero-fill the edges."""
    from dynrank.kernels import reference_lowrank_gemm
    from dynrank.kernels.lowrank_gemm_tma import lowrank_gemm_tma
    device, (M, K, N, R) = _device(), (37, 48, 40, 24)
    make = lambda *shape: torch.randn(*shape, device=device).to(dtype)  # noqa: E731
    x, u, bias = make(M, K), make(M, R), make(N)
    if role == "adapter forward":   # x·W_fᵀ + xbs·Aᵀ: both right operands are transposed views
        wt, vt = make(N, K).t(), make(N, R).t()
    else:                           # dy·W_f + dyas·Bᵀ: W_f read row-major
        wt, vt = make(K, N), make(N, R).t()
    out = lowrank_gemm_tma(x, wt, u, vt, bias, alpha=0.5, beta=-1.5, config=CONFIG)
    ref = reference_lowrank_gemm(x, wt, u, vt, bias, alpha=0.5, beta=-1.5)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, ref) < REL_TOL[dtype]


def test_operands_a_descriptor_cannot_read_are_refused():
    from dynrank.kernels.lowrank_gemm_tma import lowrank_gemm_tma, tma_layout
    device = _device()
    with pytest.raises(ValueError, match="float16 or bfloat16, got torch.float32"):
        tma_layout(torch.randn(4, 8, device=device))
    odd = torch.randn(8, 20, device=device, dtype=torch.bfloat16)          # rows of 40 bytes
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        tma_layout(odd)
    base, transposed = tma_layout(torch.randn(16, 8, device=device, dtype=torch.float16).t())
    assert transposed and base.shape == (16, 8)
    x = torch.randn(8, 16, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="shapes do not chain"):
        lowrank_gemm_tma(x, x, x, x, config=CONFIG)
    wt, u, vt = torch.randn(16, 8, device=device, dtype=torch.float16), x, torch.randn(16, 8, device=device,
                                                                                      dtype=torch.float16)
    with pytest.raises(ValueError, match=re.escape("lowrank_gemm_tma: bias must have shape (8,), got (1,)")):
        lowrank_gemm_tma(x, wt, u, vt, torch.ones(1, device=device, dtype=torch.float16), config=CONFIG)


@pytest.mark.parametrize("empty", ["M", "K", "R", "N"])
def test_an_empty_size_is_refused_by_name(empty):
    from dynrank.kernels.lowrank_gemm_tma import lowrank_gemm_tma
    device = _device()
    M, K, R, N = (0 if name == empty else 16 for name in "MKRN")
    make = functools.partial(torch.randn, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match=f"every size positive.*{empty}=0"):
        lowrank_gemm_tma(make(M, K), make(K, N), make(M, R), make(R, N), config=CONFIG)


@pytest.mark.parametrize("alpha, beta", [(1e-20, 1e20), (1e-39, 1.0), (1e-46, 1.0)], ids=str)
def test_scales_far_apart_match_float64(alpha, beta):
    """As in the engine, u·vt was scaled by beta/alpha and the sum by alpha, in fp32: ±inf for an alpha far
    below beta (1e-20 beside 1e20, 1e-39 beside 1), NaN for one that rounds to 0 in fp32 (1e-46)."""
    from dynrank.kernels import reference_lowrank_gemm
    from dynrank.kernels.lowrank_gemm_tma import lowrank_gemm_tma
    device, (M, K, N, R) = _device(), (16, 32, 16, 16)
    make = lambda *shape: torch.randn(*shape, device=device).to(torch.bfloat16)  # noqa: E731
    x, wt, u, vt = make(M, K), make(N, K).t(), make(M, R), make(R, N)
    out = lowrank_gemm_tma(x, wt, u, vt, alpha=alpha, beta=beta, config=CONFIG)
    assert rel_err(out, reference_lowrank_gemm(x, wt, u, vt, alpha=alpha, beta=beta)) < REL_TOL[torch.bfloat16]


# case → (what lowrank_gemm_tma is given in place of valid fp16 operands, the error, its message)
_HOST_CHECKS = {
    "nan alpha": (lambda t: dict(alpha=float("nan")), ValueError, "lowrank_gemm_tma: alpha must be finite, got nan"),
    "1e300 beta": (lambda t: dict(beta=1e300), ValueError, "lowrank_gemm_tma: beta must be within float32's range"),
    "x fp16, wt bf16": (lambda t: dict(wt=t["wt"].bfloat16()), TypeError,
                        "lowrank_gemm_tma: x and wt must have one dtype (one product), got torch.float16 and "
                        "torch.bfloat16"),
    "u·vt in bf16": (lambda t: dict(u=t["u"].bfloat16(), vt=t["vt"].bfloat16()), TypeError,
                     "lowrank_gemm_tma: x·wt and u·vt must have one dtype (the kernel runs both products at one "
                     "precision), got torch.float16 and torch.bfloat16"),
    "list x": (lambda t: dict(x=t["x"].tolist()), TypeError, "lowrank_gemm_tma takes tensors, got x of type list"),
    "None u": (lambda t: dict(u=None), TypeError, "lowrank_gemm_tma takes tensors, got u of type NoneType"),
    "meta vt": (lambda t: dict(vt=t["vt"].to("meta")), ValueError,
                "lowrank_gemm_tma runs Triton kernels, which need tensors with real data, got vt on the meta device"),
    "1-D wt": (lambda t: dict(wt=t["wt"][0]), ValueError, "lowrank_gemm_tma: wt must be 2-D, got shape (16,)"),
}


@pytest.mark.parametrize("case", list(_HOST_CHECKS))
def test_host_checks_are_the_engines(case):
    """Only shapes, the bias and dtypes one by one were checked: a NaN or 1e300 alpha ran (NaN, ±inf out), a
    product of fp16 and bf16 was taken, a list operand was an AttributeError."""
    from dynrank.kernels.lowrank_gemm_tma import lowrank_gemm_tma
    change, error, message = _HOST_CHECKS[case]
    make = functools.partial(torch.randn, device=_device(), dtype=torch.float16)
    operands = dict(x=make(16, 16), wt=make(16, 16), u=make(16, 16), vt=make(16, 16))
    with pytest.raises(error, match=re.escape(message)):
        lowrank_gemm_tma(**{**operands, **change(operands)}, config=CONFIG)


@pytest.mark.skipif(not ("cuda" in kernel_devices() and torch.cuda.get_device_capability()[0] >= 9),
                    reason="an output of 2**31 elements needs 4 GiB and a Hopper GPU")
def test_an_output_past_2_31_elements_is_stored_through_int64_offsets():
    """The descriptors read the operands with 64-bit addresses, but the store's offsets o_m·stride_om were
    int32: rows from 2**16 on of a (2**16 + 32, 2**15) output wrapped (an illegal access or misplaced rows)."""
    from dynrank.kernels import reference_lowrank_gemm
    from dynrank.kernels.lowrank_gemm_tma import lowrank_gemm_tma
    M, K, N, R = 2 ** 16 + 32, 32, 2 ** 15, 16
    make = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    x, wt, u, vt = make(M, K), make(K, N), make(M, R), make(R, N)
    config = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    out = lowrank_gemm_tma(x, wt, u, vt, alpha=0.5, beta=-1.5, config=config)
    rows = torch.tensor([0, 2 ** 16 - 1, 2 ** 16, M - 1], device="cuda")
    ref = reference_lowrank_gemm(x[rows], wt, u[rows], vt, alpha=0.5, beta=-1.5)
    assert rel_err(out[rows], ref) < REL_TOL[torch.bfloat16]
