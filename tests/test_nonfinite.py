"""Non-finite values and overflow: a diverging run behaves as nn.Linear / nn.Conv2d would.

NaN and ±inf in the input, a factor, W or W_f, the bias or the upstream gradient reach the outputs and
gradients of every form on either engine (the full form, F.linear on both, on the torch one) exactly
where the same computation in float64 puts them (the Triton kernels' masked loads, zero-filled
accumulators and skipped terms must never turn 0·NaN into 0),
and where F.linear / F.conv2d with the effective weight puts them.  fp16 and bf16 overflow gives inf
exactly where torch's own F.linear does.  The merges never make a non-finite layer finite.  Form changes
of a diverged layer, the scheduler and the rank metrics either carry the NaN along or refuse with a
message naming what is wrong, leaving everything as it was.
"""

import copy
import math
import os
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as TF

from _helpers import BACKENDS, REL_TOL, engine_cases, kernel_devices, rel_err
from _scheduling import held, mlp, train_steps
from dynrank import DynamicRankScheduler, FusedLowRankLinear, LowRankConv2d, RankMonitor
from dynrank import functional as F
from dynrank.kernels import reference_kernel, reference_lowrank_linear, reference_merge
from dynrank.metrics import layer_metrics, model_metrics

NAN, INF = math.nan, math.inf
DECOMPOSITIONS = ["svd", "tucker", "cp", "tkd-cpd"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("DYNRANK_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    """Triton's interpreter runs the kernels through numpy, which warns on every NaN it makes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\..*")
        yield


def _device():
    return kernel_devices()[0] if kernel_devices() else "cpu"


def _classes(t):
    t = t.detach().double().cpu()
    return {"NaN": torch.isnan(t), "+inf": torch.isposinf(t), "-inf": torch.isneginf(t)}


def _assert_same_values(actual, expected, what, tol):
    """NaN, +inf and -inf exactly where ``expected`` (float64) has them; the finite rest within ``tol``."""
    got, want = _classes(actual), _classes(expected)
    for kind in got:
        assert torch.equal(got[kind], want[kind]), (
            f"{what}: {kind} at {got[kind].nonzero().tolist()}, expected at {want[kind].nonzero().tolist()}")
    finite = torch.isfinite(expected.detach().double().cpu())
    if finite.any():
        assert rel_err(actual.detach().cpu()[finite], expected.detach().cpu()[finite]) < tol, what


def _assert_same_nonfinite(actual, expected, what):
    """Non-finite entries (NaN or inf, either kind) exactly where ``expected`` has them."""
    got, want = ~torch.isfinite(actual.detach().cpu()), ~torch.isfinite(expected.detach().cpu())
    assert torch.equal(got, want), f"{what}: non-finite at {got.nonzero().tolist()}, expected {want.nonzero().tolist()}"


# -- FusedLowRankLinear: NaN / ±inf in every operand, every form, both engines ------------------------

# Where each operand gets its planted value.  Beside them: x[0, 2] = 0 (x·W_f and x·B meet an inf in
# column 2 as 0·inf = NaN), A[6, 1] = 0 (an inf in xbs[:, 1] meets a zero of A) and dy[0, 4] = 0 (an inf
# in row 4 of W_f or A meets a zero of dy), so every product of a zero and an inf is exercised.
SITES = {"x": (1, 2), "weight": (4, 2), "A": (4, 1), "B": (2, 1), "bias": (4,), "dy": (1, 4)}
# "adapter A=0" is a fresh deflate(init="zeros"): its adapter term is zero, and a NaN in W_f or B must
# still reach the output (0·NaN = NaN), as it would through nn.Linear with W_f + s·A·Bᵀ.
LINEAR_FORMS = ["lowrank", "full", "adapter", "adapter A=0"]


def _linear_case(form, dtype, site, value):
    device = _device()
    layer = FusedLowRankLinear(17, 23, rank=4, form=form.split()[0], alpha=6.0, device=device, dtype=dtype)
    x = torch.randn(3, 17, device=device, dtype=dtype)
    dy = torch.randn(3, 23, device=device, dtype=dtype)
    with torch.no_grad():
        if form == "adapter":
            layer.A.normal_(0, 0.3)
        if layer.A is not None and form != "adapter A=0":
            layer.A[6, 1] = 0.0
        x[0, 2] = 0.0
        dy[0, 4] = 0.0
        target = {"x": x, "dy": dy}.get(site)
        if target is None:
            target = getattr(layer, site)
        target[SITES[site]] = value
    return layer, x.requires_grad_(), dy


def _float64_references(layer, x, dy):
    """(same computation, effective weight): each a dict of float64 outputs and gradients by name."""
    params = {n: p.detach().double().requires_grad_(p.requires_grad) for n, p in layer.named_parameters()}
    trained = [n for n, p in layer.named_parameters() if p.requires_grad]
    out = []
    for effective in (False, True):
        xr = x.detach().double().requires_grad_()
        p = {n: t.detach().requires_grad_(t.requires_grad) for n, t in params.items()}
        if layer.form == "full":
            y = xr @ p["weight"].t() + p["bias"]
        elif not effective:
            y = reference_lowrank_linear(xr, p.get("weight"), p["A"], p["B"], p["bias"], layer.scale)
        else:
            W = layer.scale * p["A"] @ p["B"].t() + (p["weight"] if "weight" in p else 0)
            y = TF.linear(xr, W, p["bias"])
        y.backward(dy.double())
        out.append({"y": y, "dx": xr.grad, **{n: p[n].grad for n in trained}})
    return out


LINEAR_CASES = engine_cases([(form, site) for form in LINEAR_FORMS for site in SITES
                              if not (form == "full" and site in ("A", "B"))
                              and not (form == "lowrank" and site == "weight")])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend, form, site", LINEAR_CASES, ids=["-".join(case) for case in LINEAR_CASES],
                         indirect=["backend"])
def test_linear_non_finite_operands_propagate(backend, form, site, dtype, kernel_calls):
    for value in (NAN, INF, -INF):
        layer, x, dy = _linear_case(form, dtype, site, value)
        y = layer(x)
        y.backward(dy)
        same, effective = _float64_references(layer, x, dy)
        got = {"y": y, "dx": x.grad, **{n: p.grad for n, p in layer.named_parameters() if p.requires_grad}}
        assert set(got) == set(same)
        for name, value_ in got.items():
            _assert_same_values(value_, same[name], f"{form} {site}={value} {name}", REL_TOL[dtype])
        for name in ("y", "dx"):
            _assert_same_nonfinite(got[name], effective[name], f"{form} {site}={value} {name} (effective weight)")
        if layer.weight is not None and not layer.weight.requires_grad:
            assert layer.weight.grad is None
    runs = 3 if backend == "triton" else 0
    assert Counter(kernel_calls) == ({"lowrank_linear_forward": runs, "lowrank_linear_backward": runs} if runs else {})


# -- fp16 / bf16 overflow -----------------------------------------------------------------------------

# big² overflows the dtype (fp16: 9e4 > 65504; bf16 and its fp32 accumulator: 4e38 > 3.4e38), big does not.
BIG = {torch.float16: 300.0, torch.bfloat16: 2e19}


def _overflow_operands(form, dtype):
    """float64 operands (x, W or None, A or None, B or None, bias, dy) of ``form`` whose products overflow
    ``dtype`` in a few outputs and gradients only: row 0 of x and rows 3 and 5 of the effective weight are
    big (so y[0, 3] and y[0, 5] overflow), and so is dy[0, 3] where W is (so dx[0] and dW[3] do; lowrank:
    dB, through x[0]).  fp16 adds a row 1 of x whose products with W's row 7 overflow one by one but
    cancel in the sum, which an fp32 accumulator keeps finite."""
    big = BIG[dtype]
    g = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(3, 17, generator=g, dtype=torch.float64)
    x[0] = big
    x[0, 16] = 0.5                                   # one small column: its gradients stay finite
    dy = 0.1 * torch.randn(3, 23, generator=g, dtype=torch.float64)
    bias = 0.1 * torch.randn(23, generator=g, dtype=torch.float64)
    W = A = B = None
    if form in ("full", "adapter"):
        W = 0.2 * torch.randn(23, 17, generator=g, dtype=torch.float64)
        W[3], W[5] = big, -big
        dy[0, 3] = big
        if dtype == torch.float16:
            x[1, :2] = big
            W[7, :2] = torch.tensor([big, -big], dtype=torch.float64)
            W[3, :2] = W[5, :2] = 0.0                # x's row 1 overflows nowhere else
    if form in ("lowrank", "adapter"):
        A = 0.3 * torch.randn(23, 4, generator=g, dtype=torch.float64)
        B = 0.05 + 0.01 * torch.rand(17, 4, generator=g, dtype=torch.float64)     # x[0]·B ≈ 16·0.055·big
        if form == "lowrank":
            A[3], A[5] = big, -big
            dy[0, 3], dy[0, 5] = 2.0, -2.0
        else:
            A[3] = 0.01                              # dy[0, 3]·A[3] stays small: so does dyas = s·dy·A
    return x, W, A, B, bias, dy


def _check_unambiguous(name, value, limit):
    """Every entry of ``value`` (float64) lies clearly inside or clearly outside the dtype's range."""
    a = value.detach().abs()
    assert not ((a > 0.9 * limit) & (a < 1.1 * limit)).any(), f"{name} too close to the overflow threshold"


@pytest.fixture
def fp32_gemm_sums():
    """On CUDA, cuBLAS may otherwise reduce 16-bit GEMMs in 16 bits: every sum here is meant in fp32.

    torch keeps these flags behind ``torch.backends.cuda.matmul``'s ``__getattr__``/``__setattr__``;
    pytest 9.2's monkeypatch restores only instance attributes and data descriptors, so it would
    leave them off and fail at teardown.  They are set and restored here."""
    matmul = torch.backends.cuda.matmul
    names = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    kept = {name: getattr(matmul, name) for name in names}
    for name in names:
        setattr(matmul, name, False)
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(matmul, name, value)


OVERFLOW_CASES = engine_cases([("lowrank",), ("full",), ("adapter",)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend, form", OVERFLOW_CASES, ids=["-".join(case) for case in OVERFLOW_CASES],
                         indirect=["backend"])
def test_overflow_gives_inf_where_torch_does(backend, form, dtype, fp32_gemm_sums, kernel_calls):
    """Outputs and gradients are ±inf exactly where the float64 result is beyond the dtype's range and
    where torch's own F.linear in the dtype (with the effective weight) is inf; finite elsewhere."""
    device, limit, scale = _device(), torch.finfo(dtype).max, 1.5
    x, W, A, B, bias, dy = (None if t is None else t.to(dtype).double() for t in _overflow_operands(form, dtype))
    # Intermediates (xbs = s·x·B, dyas = s·dy·A) are stored in the dtype: they must stay in range here.
    if A is not None:
        for name, value in (("xbs", scale * x @ B), ("dyas", scale * dy @ A)):
            _check_unambiguous(name, value, limit)
            assert value.abs().max() < limit, name
    layer = FusedLowRankLinear(17, 23, rank=4, form=form, alpha=6.0, device=device, dtype=dtype)
    with torch.no_grad():
        for name, value in (("weight", W), ("A", A), ("B", B), ("bias", bias)):
            if value is not None:
                getattr(layer, name).copy_(value)
    assert layer.scale == scale
    xd = x.to(device, dtype).requires_grad_()
    y = layer(xd)
    y.backward(dy.to(device, dtype))
    runs = 1 if backend == "triton" else 0
    assert Counter(kernel_calls) == ({"lowrank_linear_forward": runs, "lowrank_linear_backward": runs} if runs else {})
    same, _ = _float64_references(layer, xd, dy)
    got = {"y": y, "dx": xd.grad, **{n: p.grad for n, p in layer.named_parameters() if p.requires_grad}}
    inf_somewhere = False
    for name, value in got.items():
        ref = same[name].detach()
        _check_unambiguous(name, ref, limit)
        expected = torch.where(ref.abs() > limit, ref.sign() * math.inf, ref)
        _assert_same_values(value, expected, f"{form} {name}", REL_TOL[dtype])
        inf_somewhere |= bool(torch.isinf(expected).any())
        assert torch.isfinite(expected).any(), name
    assert inf_somewhere
    # torch's F.linear in the dtype, with the effective weight (cast once to the dtype), agrees.
    W_eff = (0 if W is None else W) + (0 if A is None else scale * A @ B.t())
    xt = x.to(dtype).requires_grad_()
    yt = TF.linear(xt, W_eff.to(dtype), bias.to(dtype))
    yt.backward(dy.to(dtype))
    for name, actual, expected in (("y", y, yt), ("dx", xd.grad, xt.grad)):
        _assert_same_values(actual, expected.double(), f"{form} {name} against torch's F.linear", 2 * REL_TOL[dtype])
    if dtype == torch.float16 and W is not None:
        # x[1]·W[7]: products of ±9e4 that cancel. Finite, as through F.linear's fp32 accumulator.
        assert torch.isfinite(y[1, 7]) and torch.isfinite(yt[1, 7])
        # Within fp32 accumulation's error on terms of 9e4 (17·eps32·Σ|x·w|) and one fp16 rounding.
        want = float(same["y"][1, 7].detach())
        bound = 17 * 2 ** -24 * float(x[1].abs() @ W_eff[7].abs()) + 2 ** -11 * abs(want)
        assert abs(float(y[1, 7].detach()) - want) <= bound


# -- merges: functional.merge_ and the conv merges of inflate() ----------------------------------------

@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "column-major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_merge_keeps_non_finite_values(backend, dtype, transposed):
    """W += alpha·A·Bᵀ with NaN/±inf in W, A or B: non-finite exactly where float64 is (a zero of A
    beside an inf of B gives NaN), never a finite number."""
    device = _device()
    for where in ("W", "A", "B"):
        for value in (NAN, INF, -INF):
            W = torch.randn(23, 17, device=device, dtype=dtype)
            A = torch.randn(23, 4, device=device, dtype=dtype)
            B = torch.randn(17, 4, device=device, dtype=dtype)
            A[5, 2] = 0.0
            {"W": W, "A": A, "B": B}[where][3, 2] = value
            if transposed:
                W = W.t().contiguous().t()
            expected = reference_merge(W, A, B, -0.75)
            out = F.merge_(W, A, B, -0.75)
            assert out is W
            _assert_same_values(W, expected, f"{where}={value}", REL_TOL[dtype])


def test_merge_rounds_once_with_mixed_dtypes(backend):
    """fp16 W with fp32 factors: W + alpha·A·Bᵀ formed in fp32 and rounded once, as the kernel does and as
    one-dtype operands are.  The product 1e5 alone overflows fp16, the scaled one (2.5e4) and the sum
    with W (-6e4 + 1e5) do not: neither may come back inf.  One beyond fp16's range is inf."""
    device = _device()
    A = torch.full((3, 1), 400.0, device=device)
    B = torch.full((4, 1), 250.0, device=device)
    for W0, alpha in ((0.0, 0.25), (-60000.0, 1.0), (60000.0, 1.0), (-60000.0, -1.0)):
        for factors in ((A, B), (A.half(), B.half())):
            W = torch.full((3, 4), W0, device=device, dtype=torch.float16)
            expected = reference_merge(W, *factors, alpha)
            expected = torch.where(expected.abs() > 65504, expected.sign() * math.inf, expected)
            F.merge_(W, *factors, alpha)
            _assert_same_values(W, expected, f"W0={W0} alpha={alpha} {factors[0].dtype}", REL_TOL[torch.float16])


@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_conv_inflate_keeps_non_finite_factors(backend, dec):
    """inflate() of a lowrank or adapter conv with NaN/inf in one factor (the adapter's output-side
    factor is zero, so 0·NaN decides) or in W_f: non-finite exactly where the float64 merge is."""
    device = _device()
    names = list(LowRankConv2d(3, 4, 3, rank=2, decomposition=dec)._dec.factor_names)
    for form in ("lowrank", "adapter"):
        for where in names + (["weight"] if form == "adapter" else []):
            for value in (NAN, INF):
                layer = LowRankConv2d(3, 4, 3, rank=2, decomposition=dec, form=form, alpha=3.0, device=device)
                with torch.no_grad():
                    getattr(layer, where).view(-1)[1] = value
                expected = reference_kernel(dec, {n: p.detach() for n, p in layer.factors().items()}, layer.scale)
                if form == "adapter":
                    expected = expected + layer.weight.detach().double()
                W = layer.inflate().weight
                assert not torch.isfinite(W).all()
                _assert_same_nonfinite(W, expected, f"{dec} {form} {where}={value}")
                finite = torch.isfinite(expected)
                if finite.any():
                    assert rel_err(W.detach()[finite], expected[finite]) < REL_TOL[torch.float32]


CONV_FP16_CASES = ["lowrank inflate", "adapter inflate", "adapter merged forward"]


@pytest.mark.parametrize("case", CONV_FP16_CASES)
def test_conv_fp16_merge_rounds_once_on_the_torch_engine(torch_backend, case):
    _check_conv_fp16_merge(case)


@pytest.mark.skipif(not kernel_devices(), reason="Triton kernels cannot run here")
@pytest.mark.parametrize("case", CONV_FP16_CASES)
def test_conv_fp16_merge_rounds_once_on_the_kernels(triton_backend, case):
    _check_conv_fp16_merge(case)


def _check_conv_fp16_merge(case):
    """An fp16 1×1 svd conv whose factors' product U·V = 1e5 overflows fp16 but whose kernel does not:
    lowrank s·U·V = 2.5e4 (s = 1/4), adapter W_f + U·V = -6e4 + 1e5 = 4e4.  inflate() and the adapter's
    merged strategy must give that finite kernel, not inf."""
    form = case.split()[0]
    layer = LowRankConv2d(2, 3, 1, rank=2, decomposition="svd", form=form, alpha=0.5 if form == "lowrank" else 2.0,
                          bias=False, adapter_strategy="merged", device=_device(), dtype=torch.float16)
    with torch.no_grad():
        layer.A.fill_(400.0)
        layer.B.fill_(125.0)
        if form == "adapter":
            layer.weight.fill_(-60000.0)
    expected = reference_kernel("svd", {n: p.detach() for n, p in layer.factors().items()}, layer.scale)
    if form == "adapter":
        expected = expected + layer.weight.detach().double()
    assert expected.abs().max() < 65504 and (layer.A.double()[:, :, 0, 0] @ layer.B.double()[:, :, 0, 0]).max() > 65504
    if case.endswith("inflate"):
        merged = layer.inflate().weight
    else:
        x = torch.zeros(1, 2, 1, 1, device=_device(), dtype=torch.float16)
        x[0, 0] = 1.0
        merged, expected = layer(x)[0, :, 0, 0], expected[:, 0, 0, 0]        # the kernel's column of channel 0
    _assert_same_values(merged, expected, case, REL_TOL[torch.float16])


# -- LowRankConv2d: NaN / inf in every operand ---------------------------------------------------------

# The Triton engine changes the merged adapter strategy only (the others run torch's convolutions).
CONV_CASES = [("torch", "lowrank", "auto"), ("torch", "full", "auto"), ("torch", "adapter", "chain"),
              ("torch", "adapter", "merged")] + ([("triton", "adapter", "merged")] if kernel_devices() else [])


@pytest.mark.parametrize("engine, form, strategy", CONV_CASES, ids=["-".join(c) for c in CONV_CASES])
@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_conv_non_finite_operands_propagate(monkeypatch, dec, engine, form, strategy):
    """Output, input gradient and every trainable gradient are non-finite exactly where F.conv2d (the
    layer's dtype) with the effective weight makes them so; the finite part matches float64.  (The chain's
    convolutions group the sums otherwise than one conv with the merged kernel, so NaN and inf may trade
    places, as they may between two nn.Conv2d and one.)"""
    monkeypatch.setenv("DYNRANK_BACKEND", engine)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)     # CUDA: float32 convs at full precision
    device = _device()
    names = ["x", "dy", "bias"] + (["weight"] if form != "lowrank" else []) + (
        list(LowRankConv2d(3, 4, 3, rank=2, decomposition=dec)._dec.factor_names) if form != "full" else [])
    for site in names:
        for value in (NAN, INF):
            torch.manual_seed(0)
            layer = LowRankConv2d(3, 4, 3, rank=2, decomposition=dec, padding=1, form=form, alpha=3.0,
                                  adapter_strategy=strategy, device=device)
            if form == "adapter":
                with torch.no_grad():
                    for p in layer.factors().values():
                        p.normal_(0, 0.5)
            x = torch.randn(2, 3, 5, 5, device=device)
            with torch.no_grad():
                if site == "x":
                    x[1, 2, 1, 3] = value
                elif site == "bias":
                    layer.bias[1] = value
                elif site != "dy":
                    getattr(layer, site).view(-1)[1] = value
            x.requires_grad_()
            y = layer(x)
            dy = torch.randn_like(y)
            if site == "dy":
                dy[0, 1, 2, 2] = value
            y.backward(dy)
            got = {"y": y, "dx": x.grad, **{n: p.grad for n, p in layer.named_parameters() if p.requires_grad}}
            refs = []
            for dtype in (torch.float32, torch.float64):
                xr = x.detach().double().requires_grad_()
                params = {n: p.detach().double().requires_grad_(p.requires_grad) for n, p in layer.named_parameters()}
                W = params.get("weight")
                if form != "full":
                    K = reference_kernel(dec, {n: params[n] for n in layer.factors()}, layer.scale)
                    W = K if W is None else W + K
                yr = TF.conv2d(xr.to(dtype), W.to(dtype), params["bias"].to(dtype), layer.stride, layer.padding)
                yr.backward(dy.to(dtype))
                refs.append({"y": yr, "dx": xr.grad, **{n: params[n].grad for n in got if n in params}})
            what = f"{dec} {form}/{strategy} {site}={value}"
            for name, actual in got.items():
                # torch's float32 conv skips padded taps where float64 multiplies them (0·inf = NaN
                # there): the masks come from the layer's own dtype, the finite values from float64.
                _assert_same_nonfinite(actual, refs[0][name], f"{what} {name}")
                finite = torch.isfinite(refs[1][name])
                assert torch.isfinite(actual[finite]).all(), f"{what} {name}"
                if finite.any():
                    assert rel_err(actual[finite], refs[1][name][finite]) < REL_TOL[torch.float32], f"{what} {name}"


# -- form changes of a diverged layer -------------------------------------------------------------------

def _layer_state(layer):
    return (layer.form, layer.rank, [(n, p, p.detach().clone(), p.requires_grad) for n, p in layer.named_parameters()])


def _assert_layer_unchanged(layer, before):
    form, rank, params = _layer_state(layer)
    assert (form, rank) == before[:2]
    assert [(n, id(p), g) for n, p, _, g in params] == [(n, id(p), g) for n, p, _, g in before[2]]
    for (name, _, value, _), (_, _, old, _) in zip(params, before[2]):
        torch.testing.assert_close(value, old, rtol=0, atol=0, equal_nan=True, msg=name)


def _full_layers():
    linear = FusedLowRankLinear(17, 23, rank=4, form="full")
    convs = [LowRankConv2d(3, 4, 3, rank=2, decomposition=dec, form="full", padding=1) for dec in DECOMPOSITIONS]
    return [(linear, torch.randn(3, 17), "SVD", "weight", 391)] + [
        (conv, torch.randn(2, 3, 5, 5), dec, "kernel", 108) for conv, dec in zip(convs, DECOMPOSITIONS)]


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_deflate_svd_refuses_a_diverged_weight_and_changes_nothing(value):
    for layer, _, fit, kind, numel in _full_layers():
        with torch.no_grad():
            layer.weight.view(-1)[5] = value
        before = _layer_state(layer)
        with pytest.raises(ValueError, match=rf"^cannot fit {fit} factors to a {kind} with non-finite entries "
                                             rf"\(1 NaN/inf of {numel}\)$"):
            layer.deflate(init="svd")
        _assert_layer_unchanged(layer, before)


@pytest.mark.parametrize("init", ["zeros", "random"])
def test_deflate_and_inflate_carry_a_diverged_weight(init):
    """deflate(init="zeros"/"random") freezes the NaN/inf weight as W_f as it is (fresh, finite factors);
    inflate() brings it back: the NaN is neither lost nor spread beyond where the merge puts it."""
    for layer, x, *_ in _full_layers():
        with torch.no_grad():
            layer.weight.view(-1)[5] = NAN
            layer.weight.view(-1)[7] = -INF
        W = layer.weight.detach().clone()
        y = layer(x)
        layer.deflate(init=init)
        assert layer.form == "adapter" and not layer.weight.requires_grad
        torch.testing.assert_close(layer.weight.detach(), W, rtol=0, atol=0, equal_nan=True)
        assert all(torch.isfinite(f).all() for f in layer.factors().values())
        if init == "zeros":
            _assert_same_values(layer(x), y.double(), "deflated output", REL_TOL[torch.float32])
        expected = W.double() + (reference_kernel(layer.decomposition, dict(layer.factors()), layer.scale)
                                 if isinstance(layer, LowRankConv2d) else
                                 layer.scale * layer.A.detach().double() @ layer.B.detach().double().t())
        layer.inflate()
        _assert_same_values(layer.weight, expected, "inflated weight", REL_TOL[torch.float32])


# -- the scheduler: all or nothing -----------------------------------------------------------------------

def _snapshot(model, opt, sched, monitor):
    return {"forms": dict(sched.forms()),
            "params": [(n, p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
            "groups": [[id(p) for p in g["params"]] for g in opt.param_groups],
            "state": {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
            "scheduler": sched.state_dict(), "switches": list(monitor.switches)}


def _assert_snapshot(before, model, opt, sched, monitor):
    now = _snapshot(model, opt, sched, monitor)
    for key in ("forms", "groups", "scheduler", "switches"):
        assert now[key] == before[key], key
    assert [(n, id(p), g) for n, p, _, g in now["params"]] == [(n, id(p), g) for n, p, _, g in before["params"]]
    for (name, _, value, _), (_, _, old, _) in zip(now["params"], before["params"]):
        torch.testing.assert_close(value, old, rtol=0, atol=0, equal_nan=True, msg=name)
    assert now["state"].keys() == before["state"].keys()
    for pid, state in now["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(v, before["state"][pid][k], rtol=0, atol=0, equal_nan=True)


def _scheduled_and_trained(model, start=True):
    """Adam (carrying state), a scheduler inflating at epoch 1 and a monitor attached to it for ``model``,
    trained 2 steps (after ``step(0)`` where ``start``): (optimizer, scheduler, monitor, (x, y))."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2, optimizer_state="carry")
    monitor = RankMonitor(model).attach(sched)
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    if start:
        sched.step(0)
    train_steps(model, opt, x, y, steps=2)
    return opt, sched, monitor, (x, y)


@pytest.mark.parametrize("where", ["B", "A"])
def test_scheduler_refuses_to_inflate_a_diverged_model_and_changes_nothing(where):
    """lowrank → full at the inflate epoch with inf in the second layer's factor (the first is healthy):
    a ValueError naming the layer and tensor, no layer switched, the optimizer (Adam, carrying state), the
    scheduler and an attached monitor as they were; once the value is repaired the same step switches
    every layer."""
    model = mlp()
    opt, sched, monitor, (x, y) = _scheduled_and_trained(model)
    with torch.no_grad():
        saved = getattr(model[2], where)[1, 0].item()
        getattr(model[2], where)[1, 0] = INF
    before = _snapshot(model, opt, sched, monitor)
    with pytest.raises(ValueError, match=rf"^layer '2' has non-finite values in {where}; not switching any "
                                         rf"layer at epoch 1$"):
        sched.step(1)
    _assert_snapshot(before, model, opt, sched, monitor)
    with torch.no_grad():
        getattr(model[2], where)[1, 0] = saved
    assert sched.step(1) == [(n, "lowrank", "full") for n in ("0", "2")]
    assert [s["changes"] for s in monitor.switches] == [[[n, "lowrank", "full"] for n in ("0", "2")]]
    train_steps(model, opt, x, y, steps=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scheduler_refuses_to_inflate_an_adapter_whose_frozen_weight_diverged():
    """adapter → full at the inflate epoch with NaN in the second layer's frozen W_f, which no optimizer
    holds: inflating would make it a trainable NaN W, so the step is refused naming the layer and W, and
    nothing changes; growth (``frozen=False``) reads only A and B, and lets such a layer through."""
    from dynrank._checks import check_finite
    model = mlp()
    for layer in (model[0], model[2]):
        layer.inflate()
        layer.deflate()
    opt, sched, monitor, _ = _scheduled_and_trained(model, start=False)
    assert not model[2].weight.requires_grad and all(p is not model[2].weight for p in held(opt))
    with torch.no_grad():
        saved = model[2].weight[1, 0].item()
        model[2].weight[1, 0] = NAN
    assert check_finite([("0", model[0]), ("2", model[2])], "not growing", frozen=False) is None
    before = _snapshot(model, opt, sched, monitor)
    with pytest.raises(ValueError, match=r"^layer '2' has non-finite values in weight; not switching any layer "
                                         r"at epoch 1$") as caught:
        sched.step(1)
    assert (caught.value.layer, caught.value.tensor) == ("2", "weight")
    _assert_snapshot(before, model, opt, sched, monitor)
    with torch.no_grad():
        model[2].weight[1, 0] = saved
    assert sched.step(1) == [(n, "adapter", "full") for n in ("0", "2")]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scheduler_names_the_first_of_two_diverged_layers():
    """With NaN in both layers (B of the first, A of the second), the refusal names the first layer in the
    model's order and its tensor, and nothing changes."""
    model = mlp()
    opt, sched, monitor, (x, y) = _scheduled_and_trained(model)
    with torch.no_grad():
        model[0].B[1, 0] = NAN
        model[2].A[0, 1] = NAN
    before = _snapshot(model, opt, sched, monitor)
    with pytest.raises(ValueError, match=r"^layer '0' has non-finite values in B; not switching any layer at "
                                         r"epoch 1$") as caught:
        sched.step(1)
    assert (caught.value.layer, caught.value.tensor) == ("0", "B")
    _assert_snapshot(before, model, opt, sched, monitor)


# -- rank metrics and the monitor on a diverged model ----------------------------------------------------

def test_monitor_records_nan_metrics_for_diverged_conv_and_adapter_layers(tmp_path):
    """Conv layers (lowrank Tucker, svd adapter with a NaN in W_f and a zero adapter) and a linear adapter
    with an inf in W_f: NaN metrics and a warning naming them; the healthy layer measured as alone; the
    earlier epochs kept; the CSV files alone (no JSON) read back NaN and inf as they were written."""
    torch.manual_seed(0)
    model = nn.Sequential(LowRankConv2d(2, 4, 3, rank=(2, 3), decomposition="tucker"),
                          LowRankConv2d(4, 4, 3, rank=2, decomposition="svd", form="adapter"),
                          FusedLowRankLinear(8, 6, rank=2, form="adapter"), FusedLowRankLinear(6, 5, rank=3))
    monitor = RankMonitor(model, name="diverged")
    with monitor.epoch(0):
        pass
    monitor.log(loss=1.5)
    first = copy.deepcopy(monitor.records)
    with torch.no_grad():
        model[0].core.view(-1)[3] = NAN
        model[1].weight.view(-1)[2] = NAN
        model[2].weight[1, 1] = INF
    with pytest.warns(RuntimeWarning, match=r"layers \['0', '1', '2'\] have NaN or infinite weights at epoch 1"):
        with monitor.epoch(1):
            pass
    monitor.log(loss=NAN, grad_norm=INF)
    assert monitor.records[0] == first[0]
    layers = monitor.records[1]["layers"]
    for name in ("0", "1", "2"):
        assert all(math.isnan(layers[name][k]) for k in ("sigma_max", "spectral_ratio", "effective_rank")), name
    assert layers["1"]["form"] == "adapter" and layers["1"]["shape"] == [4, 36]
    assert layers["3"] == dict(type="FusedLowRankLinear", **layer_metrics(model[3]).as_dict())
    paths = monitor.save(tmp_path / "diverged")
    os.remove(paths["json"])
    loaded = RankMonitor.load(paths["layers"])
    assert loaded.epochs == [0, 1]
    assert loaded.records[0]["layers"]["0"]["sigma_max"] == pytest.approx(first[0]["layers"]["0"]["sigma_max"])
    back = loaded.records[1]
    assert math.isnan(back["scalars"]["loss"]) and back["scalars"]["grad_norm"] == INF
    for name in ("0", "1", "2"):
        assert math.isnan(back["layers"][name]["sigma_max"]) and math.isnan(back["layers"][name]["effective_rank"])
    assert back["layers"]["3"]["sigma_max"] == pytest.approx(layers["3"]["sigma_max"], rel=1e-12)


@pytest.mark.parametrize("magnitude", [1e200, 1e-170], ids=["huge", "tiny"])
def test_gram_metrics_of_extreme_but_finite_float64_weights(magnitude):
    """Finite float64 weights whose squares overflow or underflow: the Gram method gives the singular
    values numpy does (not a LAPACK convergence error, not zeros), as the SVD method does."""
    torch.manual_seed(0)
    layer = nn.Linear(40, 30, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.mul_(magnitude)
    sigma = np.linalg.svd(layer.weight.detach().numpy(), compute_uv=False)
    for method in ("gram", "svd"):
        m = layer_metrics(layer, method=method)
        assert m.sigma_max == pytest.approx(sigma[0], rel=1e-8, abs=0), method
        assert m.sigma_min == pytest.approx(sigma[-1], rel=1e-6, abs=0), method
        assert m.effective_rank == 30 and m.spectral_ratio == pytest.approx(sigma[0] / sigma[-1], rel=1e-6)
    got = model_metrics(nn.Sequential(layer, nn.Linear(30, 30, dtype=torch.float64)), method="gram")
    assert got["0"].sigma_max == pytest.approx(sigma[0], rel=1e-8, abs=0)


def test_the_non_finite_refusal_pickles_and_copies_with_its_layer():
    """check_finite's NonFiniteError failed to unpickle or copy (its __init__ took three arguments, the
    rebuilt one got one): a diverged run in a process pool ended in BrokenProcessPool, not its error."""
    import pickle
    from dynrank._checks import NonFiniteError, check_finite
    layer = FusedLowRankLinear(6, 5, rank=2)
    with torch.no_grad():
        layer.B[0, 0] = float("nan")
    with pytest.raises(NonFiniteError) as caught:
        check_finite([("head", layer)], "not switching")
    for again in (pickle.loads(pickle.dumps(caught.value)), copy.copy(caught.value)):
        assert type(again) is NonFiniteError and isinstance(again, ValueError)
        assert (str(again), again.layer, again.tensor) == (str(caught.value), "head", "B")
