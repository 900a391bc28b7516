"""Conv-kernel merges through Triton (the interpreter on CPU) against float64 references."""

import re

import pytest
import torch

from _helpers import (REL_TOL, assert_aliased_operand_refused, assert_grad_write_refused_then_merged,
                      assert_inference_write_refused_then_merged, kernel_devices, rel_err)
from dynrank.conv import LowRankConv2d
from dynrank.kernels.conv_merge import conv_merge_, reference_conv_merge, reference_kernel

pytestmark = pytest.mark.skipif(not kernel_devices(), reason="Triton kernels cannot run here")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RANKS = {"svd": 4, "tucker": (3, 5), "cp": 6, "tkd-cpd": (3, 4, 5)}


def _device():
    return kernel_devices()[0]


def _layout(weight, layout):
    if layout == "channels_last":
        return weight.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        # (i, c, j) order in memory: no matrix view exists, the merge goes through a copy.
        return weight.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    return weight


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_merge_matches_reference(dtype, groups, layout):
    device = _device()
    F_out, Cg, kh, kw, q = 9, 5, 3, 2, 6
    weight = _layout(torch.randn(F_out, Cg, kh, kw, device=device, dtype=dtype), layout)
    U = torch.randn(F_out, q // groups, device=device, dtype=dtype)
    V = torch.randn(q, Cg, kh, kw, device=device, dtype=dtype)
    expected = reference_conv_merge(weight, U, V, -0.75, groups)
    ptr = weight.data_ptr()
    out = conv_merge_(weight, U, V, -0.75, groups)
    assert out is weight and weight.data_ptr() == ptr
    assert rel_err(weight, expected) < REL_TOL[dtype]


def test_conv_merge_mixed_operand_dtypes_accumulate_in_fp32():
    device = _device()
    weight = torch.zeros(4, 3, 3, 3, device=device, dtype=torch.bfloat16)
    U = torch.randn(4, 2, device=device, dtype=torch.bfloat16)
    V = torch.randn(2, 3, 3, 3, device=device, dtype=torch.float32)
    expected = reference_conv_merge(weight, U, V)
    conv_merge_(weight, U, V)
    assert rel_err(weight, expected) < REL_TOL[torch.bfloat16]


def test_conv_merge_rejects_bad_shapes():
    W = torch.zeros(6, 2, 3, 3, device=_device())
    expected = re.escape("U must have shape (6, q) and V (1·q, 2, 3, 3)")
    with pytest.raises(ValueError, match=expected + ".*" + re.escape("got U (5, 2) and V (2, 2, 3, 3)")):
        conv_merge_(W, torch.zeros(5, 2, device=W.device), torch.zeros(2, 2, 3, 3, device=W.device))
    with pytest.raises(ValueError, match=expected + ".*" + re.escape("got U (6, 2) and V (2, 2, 1, 3)")):
        conv_merge_(W, torch.zeros(6, 2, device=W.device), torch.zeros(2, 2, 1, 3, device=W.device))
    with pytest.raises(ValueError, match=re.escape("takes weight (F, C/g, kh, kw), U (F, q/g) and V (q, C/g, kh, kw)")
                       + ".*" + re.escape("got weight (2, 3, 3), U (6, 2), V (2, 2, 3, 3)")):
        conv_merge_(W[0], torch.zeros(6, 2, device=W.device), torch.zeros(2, 2, 3, 3, device=W.device))



@pytest.mark.parametrize("which", ["weight", "U", "V"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32], ids=str)
def test_conv_merge_refuses_dtypes_the_kernel_does_not_take(which, dtype):
    """float64 went through the fp32 accumulator (1.7e-7 off), an int32 weight took a truncated sum."""
    operands = {"weight": torch.zeros(4, 3, 3, 3), "U": torch.ones(4, 2), "V": torch.ones(2, 3, 3, 3)}
    operands = {k: (v.to(dtype) if k == which else v).to(_device()) for k, v in operands.items()}
    before = operands["weight"].clone()
    with pytest.raises(TypeError, match=re.escape(f"conv_merge_ takes float32, float16 or bfloat16 tensors "
                                                  f"(fp32 accumulation), got {which} of dtype {dtype}")):
        conv_merge_(operands["weight"], operands["U"], operands["V"])
    assert torch.equal(operands["weight"], before)


def test_the_kernels_folder_imports_as_a_top_level_package():
    """transformers probes for the kernels hub package with an import of ``kernels``; from the repository root
    that finds this folder, and a relative import beyond it made the probe raise inside transformers."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import kernels._runtime as r, torch; print(r.TRITON_DTYPES == (torch.float32, torch.float16, torch.bfloat16))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"

@pytest.mark.parametrize("groups, error, message", [(0, ValueError, "groups must be >= 1, got 0"),
                                                    (-2, ValueError, "groups must be >= 1, got -2"),
                                                    (1.0, TypeError, "groups must be an int, got float"),
                                                    (True, TypeError, "groups must be an int, got bool")])
def test_conv_merge_refuses_bad_groups(groups, error, message):
    W = torch.zeros(4, 3, 3, 3, device=_device())
    with pytest.raises(error, match=re.escape(message)):
        conv_merge_(W, torch.ones(4, 2, device=W.device), torch.ones(2, 3, 3, 3, device=W.device), groups=groups)


def test_conv_merge_takes_numpy_integer_groups():
    """``groups=np.int64(3)`` was a TypeError, against the package's rule that a numpy integer is an int."""
    import numpy as np
    device = _device()
    weight = torch.randn(6, 2, 3, 3, device=device)
    U, V = torch.randn(6, 2, device=device), torch.randn(6, 2, 3, 3, device=device)
    expected = reference_conv_merge(weight, U, V, 0.5, 3)
    assert conv_merge_(weight, U, V, 0.5, np.int64(3)) is weight
    assert rel_err(weight, expected) < REL_TOL[torch.float32]


@pytest.mark.parametrize("layout", ["rows share memory", "windows"])
def test_conv_merge_refuses_a_weight_whose_elements_overlap(layout):
    """Each group's merge sees only its own rows: two one-row groups on one row of memory both added into
    it, and overlapping windows lost adds, without a word."""
    device = _device()
    if layout == "rows share memory":
        storage = torch.zeros(2 * 2 * 2, device=device)
        weight = storage.as_strided((2, 2, 2, 2), (0, 4, 2, 1))
    else:
        storage = torch.zeros(20, device=device)
        weight = storage.as_strided((2, 2, 2, 2), (1, 4, 2, 1))
    with pytest.raises(ValueError, match=re.escape(f"conv_merge_ writes weight, so its elements must not share "
                                                   f"memory, got a view whose elements overlap (shape (2, 2, 2, 2), "
                                                   f"strides {weight.stride()})")):
        conv_merge_(weight, torch.ones(2, 1, device=device), torch.ones(2, 2, 2, 2, device=device), 1.0, 2)
    assert not storage.any()


@pytest.mark.parametrize("case", ["F=0", "kh=0", "q=0", "q=0 groups=2"])
def test_conv_merge_leaves_an_empty_kernel_or_rank_0_as_it_is(case):
    """F = 0 (or kh = 0) recursed until RecursionError (an empty kernel has no matrix view, nor has its
    contiguous copy), q = 0 was reshape's "ambiguous -1" RuntimeError; merge_ returns such a weight as it is.
    reference_conv_merge raised that RuntimeError for q = 0."""
    device = _device()
    F_out, Cg, kh, kw, q, groups = {"F=0": (0, 3, 3, 3, 2, 1), "kh=0": (4, 3, 0, 3, 2, 1),
                                    "q=0": (4, 3, 3, 3, 0, 1), "q=0 groups=2": (4, 3, 3, 3, 0, 2)}[case]
    weight = torch.randn(F_out, Cg, kh, kw, device=device)
    before = weight.clone()
    U, V = torch.randn(F_out, q // groups, device=device), torch.randn(q, Cg, kh, kw, device=device)
    assert conv_merge_(weight, U, V, 0.5, groups) is weight
    assert torch.equal(weight, before)
    # Its reference too: reshape's -1 has no size among 0 elements.
    assert torch.equal(reference_conv_merge(before, U, V, 0.5, groups), before.double())


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("operand", ["U", "V"])
def test_conv_merge_refuses_an_operand_that_shares_memory_with_the_weight(operand, layout):
    """U or V a view of the weight was read while the kernel wrote it (or, through the copy of a layout
    with no matrix view, read from the old kernel): refused as merge_ refuses it."""
    device = _device()
    weight = _layout(torch.randn(6, 3, 3, 2, device=device), layout)
    U, V = torch.randn(6, 2, device=device), torch.randn(2, 3, 3, 2, device=device)
    if operand == "U":
        U = weight[:, 0, 0, :]
    else:
        V = weight[:2]
    assert_aliased_operand_refused("conv_merge_", conv_merge_, reference_conv_merge, weight, {"U": U, "V": V},
                                   operand)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_conv_merge_refuses_a_weight_that_requires_grad_in_grad_mode(layout):
    """A contiguous leaf that requires grad was merged without torch's in-place error (autograd records no
    kernel write), while a layout merged through a copy raised torch's error from the copy back.  Both are
    refused now; under torch.no_grad(), as dynrank's merges run, both are merged."""
    device = _device()
    leaf = _layout(torch.randn(6, 3, 3, 2, device=device), layout).requires_grad_()
    U, V = torch.randn(6, 2, device=device), torch.randn(2, 3, 3, 2, device=device)
    assert_grad_write_refused_then_merged("conv_merge_", lambda: conv_merge_(leaf, U, V, 0.5), leaf,
                                          reference_conv_merge(leaf.detach(), U, V, 0.5))


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_conv_merge_refuses_an_inference_weight_outside_inference_mode(layout):
    """A contiguous inference kernel was merged outside inference mode (torch refuses any in-place update of
    one there), while a layout merged through a copy raised torch's error from the copy back."""
    device = _device()
    with torch.inference_mode():
        weight = _layout(torch.randn(6, 3, 3, 2, device=device), layout)
        U, V = torch.randn(6, 2, device=device), torch.randn(2, 3, 3, 2, device=device)
    assert_inference_write_refused_then_merged("conv_merge_", lambda: conv_merge_(weight, U, V, 0.5), weight,
                                               reference_conv_merge(weight.clone(), U, V, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dec", list(RANKS))
def test_inflate_through_triton_matches_reference(triton_backend, dec, dtype):
    groups = 3 if dec == "svd" else 1
    rank = 6 if dec == "svd" else RANKS[dec]
    layer = LowRankConv2d(6, 9, (3, 5), rank=rank, decomposition=dec, groups=groups, alpha=3.0,
                          device=_device(), dtype=dtype)
    factors = {n: p.detach().clone() for n, p in layer.factors().items()}
    expected = reference_kernel(dec, factors, layer.scale, groups)
    layer.inflate()
    assert rel_err(layer.weight, expected) < REL_TOL[dtype]


@pytest.mark.parametrize("dec", list(RANKS))
def test_merged_adapter_through_triton_matches_torch(monkeypatch, dec):
    """Strategy "merged" on the Triton custom op: outputs and gradients equal the torch path."""
    device = _device()
    layer = LowRankConv2d(5, 7, 3, rank=RANKS[dec], decomposition=dec, stride=2, padding=1, form="adapter",
                          alpha=2.0, adapter_strategy="merged", device=device)
    with torch.no_grad():
        for p in layer.factors().values():
            p.normal_(0.0, 0.5)
    x = torch.randn(2, 5, 9, 8, device=device)
    dy = torch.randn(2, 7, 5, 4, device=device)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("DYNRANK_BACKEND", backend)
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.backward(dy)
        results[backend] = (y, xx.grad, {n: p.grad.clone() for n, p in layer.factors().items()})
    (y0, dx0, g0), (y1, dx1, g1) = results["torch"], results["triton"]
    tol = REL_TOL[torch.float32]
    assert y0.abs().max() > 0.1
    assert rel_err(y1, y0) < tol and rel_err(dx1, dx0) < tol
    for name in g0:
        assert rel_err(g1[name], g0[name]) < tol, name
    assert layer.weight.grad is None


def test_factors_the_kernel_does_not_take_send_the_merge_to_torch(triton_backend):
    """The engine was chosen from the kernel's dtype alone: float64 factors beside a float32 kernel reached
    the Triton launcher's TypeError, where functional.merge_ (every operand's dtype) takes torch."""
    from dynrank.conv_merging import merge_conv_, merged_kernel
    device = _device()
    W = torch.randn(6, 4, 3, 3, device=device)
    U = torch.randn(6, 2, device=device, dtype=torch.float64)
    V = torch.randn(2, 4, 3, 3, device=device, dtype=torch.float64)
    expected = reference_conv_merge(W, U, V, 0.5)
    merged = merged_kernel(W, U, V, 0.5, 1)
    assert merged.dtype == torch.float32
    assert rel_err(merged, expected) < REL_TOL[torch.float32]
    assert rel_err(merge_conv_(W.clone(), U, V, 0.5, 1), expected) < REL_TOL[torch.float32]


def test_merged_kernel_on_torch_rounds_a_16_bit_kernel_plus_float32_factors_once(torch_backend):
    """A bfloat16 kernel beside float32 factors is merged in float32 and rounded to bfloat16 once, at the end.
    Integer operands keep every float32 product and sum exact, so the result is the float64 reference rounded
    to bfloat16 in every entry; factors rounded to the kernel's dtype first change over a third of them."""
    from dynrank.conv_merging import merged_kernel
    device = _device()
    W = torch.randint(-100, 101, (8, 4, 3, 3), device=device).to(torch.bfloat16)
    U = torch.randint(-1000, 1001, (8, 3), device=device).float()
    V = torch.randint(-1000, 1001, (3, 4, 3, 3), device=device).float()
    expected = reference_conv_merge(W, U, V, 0.5)
    assert not torch.equal(expected, reference_conv_merge(W, U.bfloat16(), V.bfloat16(), 0.5)), \
        "the factors must not be exact in bfloat16"
    merged = merged_kernel(W, U, V, 0.5, 1)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, expected.to(torch.bfloat16))


def test_merged_kernel_backward_takes_factors_of_two_dtypes(triton_backend):
    """U in float32 and V in bfloat16 (both kernel dtypes, so the Triton op runs): the backward's bmm met the
    two dtypes and failed.  Each gradient comes back in its factor's dtype, against float64 autograd."""
    from dynrank.conv_merging import merged_kernel
    device = _device()
    W = torch.randn(6, 4, 3, 3, device=device)
    U = torch.randn(6, 2, device=device).requires_grad_()
    V = torch.randn(2, 4, 3, 3, device=device, dtype=torch.bfloat16).requires_grad_()
    G = torch.randn(6, 4, 3, 3, device=device)
    merged_kernel(W, U, V, 0.5, 1).backward(G)
    U64, V64 = U.detach().double().requires_grad_(), V.detach().double().requires_grad_()
    (W.double() + 0.5 * torch.einsum("fq,qchw->fchw", U64, V64)).backward(G.double())
    assert U.grad.dtype == torch.float32 and V.grad.dtype == torch.bfloat16
    assert rel_err(U.grad, U64.grad) < REL_TOL[torch.float32]             # computed in fp32, kept in fp32
    assert rel_err(V.grad, V64.grad) < REL_TOL[torch.bfloat16]
