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
