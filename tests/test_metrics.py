"""Rank metrics against numpy float64 SVD of the dense effective weight."""

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from _helpers import REL_TOL, rel_err
from dynrank._forms import FormLayer
from dynrank.linear import FusedLowRankLinear
from dynrank.metrics import (default_tol, effective_rank, entropy_effective_rank, layer_metrics, model_metrics,
                             monitored_layers, restricted_spectral_ratio, singular_values, spectral_ratio,
                             stable_rank)

TOL64 = REL_TOL[torch.float64]


def np_sigma(matrix):
    """Reference: numpy float64 singular values of a 2-D array-like, descending."""
    return np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)


def with_sigma(m, n, sigma, dtype=torch.float64):
    """m × n matrix with exactly the given singular values (orthogonal factors from QR)."""
    g = torch.Generator().manual_seed(m * 1000 + n)
    U = torch.linalg.qr(torch.randn(m, len(sigma), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64)).Q
    return ((U * torch.tensor(sigma, dtype=torch.float64)) @ V.t()).to(dtype)


def dense_of(layer):
    """Independent float64 dense effective weight of a FusedLowRankLinear."""
    s = layer.scale
    if layer.form == "full":
        return layer.weight.detach().double().numpy()
    lowrank = s * layer.A.detach().double().numpy() @ layer.B.detach().double().numpy().T
    if layer.form == "lowrank":
        return lowrank
    return layer.weight.detach().double().numpy() + lowrank


# -- constructed matrices ---------------------------------------------------------------------

@pytest.mark.parametrize("m,n", [(17, 5), (5, 17), (123, 64), (1, 9)])
def test_known_singular_values(m, n):
    p = min(m, n)
    sigma = sorted(np.geomspace(0.01, 10.0, p), reverse=True)
    W = with_sigma(m, n, sigma)
    got = singular_values(W, method="svd")
    assert got.dtype == torch.float64 and got.shape == (p,)
    assert rel_err(got, torch.tensor(sigma)) < TOL64
    assert spectral_ratio(got) == pytest.approx(sigma[0] / sigma[-1], rel=1e-12)
    assert effective_rank(got) == p


@pytest.mark.parametrize("m,n,rank", [(17, 5, 3), (64, 123, 1), (40, 40, 39)])
def test_exact_rank_deficiency_gives_inf(m, n, rank):
    sigma = list(np.linspace(3.0, 1.0, rank)) + [0.0] * (min(m, n) - rank)
    W = with_sigma(m, n, sigma[:rank])           # rank-`rank` matrix built from `rank` components
    got = singular_values(W, method="svd")
    lam = spectral_ratio(got)
    assert lam == math.inf and isinstance(lam, float)
    assert effective_rank(got) == rank
    assert restricted_spectral_ratio(got, rank) == pytest.approx(sigma[0] / sigma[rank - 1], rel=1e-12)
    m_ = layer_metrics(W)
    assert m_.spectral_ratio == math.inf and m_.effective_rank == rank


def test_scalar_metrics_against_direct_formulas():
    W = torch.randn(31, 12, dtype=torch.float64)
    ref = np_sigma(W)
    got = singular_values(W, method="svd")
    p = ref / ref.sum()
    assert entropy_effective_rank(got) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-12)
    fro, two = np.linalg.norm(W.numpy(), "fro"), np.linalg.norm(W.numpy(), 2)
    assert stable_rank(got) == pytest.approx(fro ** 2 / two ** 2, rel=1e-12)
    assert spectral_ratio(got) == pytest.approx(ref[0] / ref[-1], rel=1e-12)
    assert entropy_effective_rank(torch.ones(7)) == pytest.approx(7.0, rel=1e-14)
    assert entropy_effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("values, dtype, tol, rank", [
    ([3.0, 1.1], torch.bfloat16, None, 2),             # a bf16 quotient: 2.71875
    ([6e4, 0.01], torch.float16, 1e-9, 2),             # an fp16 quotient overflows to inf
    ([1e30, 1e-20, 0.0], torch.float32, 0.0, 2)])      # so does an fp32 one
def test_spectral_ratio_is_the_float64_quotient_of_the_given_values(values, dtype, tol, rank):
    """λ is taken in float64 whatever σ's dtype, so it is ∞ exactly when the effective rank is below p."""
    sigma = torch.tensor(values, dtype=dtype)
    expected = float(sigma[0].double() / sigma[rank - 1].double())
    assert effective_rank(sigma[:rank], tol) == rank
    assert spectral_ratio(sigma[:rank], tol) == pytest.approx(expected, rel=1e-15)
    assert restricted_spectral_ratio(sigma, rank, tol) == pytest.approx(expected, rel=1e-15)


def test_tolerance_counts_and_zero_matrix():
    sigma = torch.tensor([1.0, 1e-2, 1e-4, 1e-7], dtype=torch.float64)
    assert effective_rank(sigma, tol=1e-3) == 2
    assert effective_rank(sigma, tol=1e-5) == 3
    assert spectral_ratio(sigma, tol=1e-3) == math.inf
    assert spectral_ratio(sigma, tol=1e-8) == pytest.approx(1e7)
    zero = layer_metrics(torch.zeros(6, 4))
    assert (zero.spectral_ratio, zero.effective_rank, zero.entropy_rank, zero.stable_rank) == (math.inf, 0, 0.0, 0.0)


def test_default_tolerance():
    assert default_tol((768, 3072), torch.float32) == pytest.approx(3072 * torch.finfo(torch.float32).eps)
    assert default_tol((768, 3072), torch.bfloat16) == 1e-2        # capped: 3072·2⁻⁸ > 1
    assert layer_metrics(nn.Linear(40, 30)).tol == pytest.approx(40 * torch.finfo(torch.float32).eps)


def test_default_tolerance_takes_a_shape_of_two_positive_ints():
    """A negative shape gave a negative tolerance, a 1-D one a value, and None, an int or a str bare
    TypeErrors from max()."""
    eps = torch.finfo(torch.float32).eps
    for shape in ((np.int64(768), 3072), [768, 3072], torch.Size([768, 3072])):
        assert default_tol(shape, torch.float32) == pytest.approx(3072 * eps)
    for shape in (None, 768, "768x3072"):
        with pytest.raises(TypeError, match=re.escape(f"shape must be a tuple (m, n), got {type(shape).__name__} "
                                                      f"({shape!r})")):
            default_tol(shape, torch.float32)
    with pytest.raises(TypeError, match=re.escape("shape must be (m, n) of positive ints, got float (3.0) in "
                                                  "(3.0, 4)")):
        default_tol((3.0, 4), torch.float32)
    for shape, got in (((-5, -7), "-5 in (-5, -7)"), ((3, 0), "0 in (3, 0)"), ((4,), "(4,)"), ((2, 3, 4), "(2, 3, 4)")):
        with pytest.raises(ValueError, match=re.escape(f"shape must be (m, n) of positive ints, got {got}")):
            default_tol(shape, torch.float32)


@pytest.mark.parametrize("metric", [effective_rank, spectral_ratio, entropy_effective_rank, stable_rank,
                                    lambda sigma: restricted_spectral_ratio(sigma, 2)], ids=lambda f: f.__name__)
def test_singular_values_on_the_meta_device_are_refused(metric):
    """A meta σ has no values: spectral_ratio and stable_rank raised torch's "Tensor.item() cannot be
    called on meta tensors"."""
    with pytest.raises(ValueError, match=re.escape("singular values must have values, got a tensor on the meta "
                                                   "device")):
        metric(torch.ones(4, device="meta"))


# -- layers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(17, 5), (5, 17), (64, 123)])
def test_plain_linear_and_methods(shape):
    out_f, in_f = shape
    lin = nn.Linear(in_f, out_f)
    ref = torch.from_numpy(np_sigma(lin.weight.detach()))
    assert rel_err(singular_values(lin, method="svd"), ref) < TOL64
    gram = singular_values(lin, method="gram")
    # Gram eigenvalues: absolute σ error ~ p·eps64·σmax²/σ, far below the default tolerance.
    assert (gram - ref).abs().max() < 1e-9 * ref[0]
    assert layer_metrics(lin).form == "dense" and layer_metrics(lin).rank is None


def test_auto_uses_gram_on_large_layers_accurately():
    lin = nn.Linear(300, 260, bias=False)
    ref = torch.from_numpy(np_sigma(lin.weight.detach()))
    got = singular_values(lin)                                        # auto → gram (p = 260)
    assert (got - ref).abs().max() < 1e-9 * ref[0]
    assert layer_metrics(lin).spectral_ratio == pytest.approx(float(ref[0] / ref[-1]), rel=1e-8)


def test_auto_keeps_svd_on_large_float64_layers_below_the_gram_resolution():
    """"auto" takes Gram eigenvalues on a large layer only when the default tolerance is ≥ 1e-5: they resolve
    σ only down to ~sqrt(eps)·σmax, so a float64 layer (tol p·eps64) with σ down to 1e-10 needs the SVD."""
    p = 260
    sigma = np.geomspace(1.0, 1e-10, p)
    lin = nn.Linear(300, p, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(with_sigma(p, 300, sigma))
    ref = np_sigma(lin.weight.detach())
    got = singular_values(lin).numpy()                                # auto, p ≥ 256
    assert np.abs(got / ref - 1).max() < 1e-5
    m = layer_metrics(lin)
    assert m.tol == pytest.approx(300 * torch.finfo(torch.float64).eps) and m.tol < 1e-5
    assert m.sigma_min == pytest.approx(1e-10, rel=1e-4)
    assert m.effective_rank == p
    assert m.spectral_ratio == pytest.approx(1e10, rel=1e-4)


def test_conv_is_reshaped_to_out_by_rest():
    conv = nn.Conv2d(3, 16, (3, 5))
    ref = np_sigma(conv.weight.detach().reshape(16, 45))
    got = singular_values(conv)
    assert got.shape == (16,)
    assert rel_err(got, torch.from_numpy(ref)) < TOL64
    wide = nn.Conv2d(32, 4, 3)                                         # 4 × 288
    assert rel_err(singular_values(wide), torch.from_numpy(np_sigma(wide.weight.detach().reshape(4, -1)))) < TOL64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_f,out_f,rank,alpha", [(5, 17, 3, None), (123, 64, 8, 16.0), (9, 9, 9, 4.0)])
def test_fused_linear_every_form(in_f, out_f, rank, alpha, dtype):
    layer = FusedLowRankLinear(in_f, out_f, rank, alpha=alpha, dtype=dtype)
    p = min(in_f, out_f)
    # lowrank: k×k QR path, exact zeros beyond the rank
    got = singular_values(layer)
    ref = np_sigma(dense_of(layer))
    assert got.shape == (p,) and bool((got[rank:] == 0).all())
    assert rel_err(got[:rank], torch.from_numpy(ref[:rank])) < TOL64
    lm = layer_metrics(layer)
    assert lm.form == "lowrank" and lm.rank == rank and lm.effective_rank == rank
    assert (lm.spectral_ratio == math.inf) == (rank < p)
    assert lm.restricted_spectral_ratio == pytest.approx(ref[0] / ref[rank - 1], rel=1e-10)
    # full: the inflated A·Bᵀ is still rank `rank` up to rounding — the default tolerance sees that
    layer.inflate()
    full = layer_metrics(layer)
    assert full.form == "full" and full.effective_rank == rank
    assert (full.spectral_ratio == math.inf) == (rank < p)
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn_like(layer.weight))        # "training" restores full rank
    ref = np_sigma(dense_of(layer))
    assert rel_err(singular_values(layer, method="svd"), torch.from_numpy(ref)) < TOL64
    assert layer_metrics(layer).spectral_ratio == pytest.approx(ref[0] / ref[-1], rel=1e-10)
    # adapter: W_f + s·A·Bᵀ with a non-zero adapter (must differ from W_f alone)
    layer.deflate(init="random")
    ref = np_sigma(dense_of(layer))
    assert not np.allclose(ref, np_sigma(layer.weight.detach().double()))
    assert rel_err(singular_values(layer, method="svd"), torch.from_numpy(ref)) < TOL64
    assert layer_metrics(layer).form == "adapter"


class _EffectiveOnly(nn.Module):
    """Stand-in for a conv layer that exposes only effective_weight() (F, C, kh, kw)."""

    def __init__(self):
        super().__init__()
        self.U = nn.Parameter(torch.randn(6, 2, dtype=torch.float64))
        self.V = nn.Parameter(torch.randn(2, 4 * 3 * 3, dtype=torch.float64))

    def effective_weight(self):
        return (self.U @ self.V).reshape(6, 4, 3, 3)


def test_module_with_effective_weight():
    layer = _EffectiveOnly()
    dense = (layer.U @ layer.V).detach().numpy()
    got = singular_values(layer, method="svd")
    assert rel_err(got[:2], torch.from_numpy(np_sigma(dense)[:2])) < TOL64
    assert layer_metrics(layer).effective_rank == 2 and layer_metrics(layer).spectral_ratio == math.inf


@pytest.mark.parametrize("decomposition", ["svd", "tucker", "cp", "tkd-cpd"])
def test_lowrank_conv2d_every_form(decomposition):
    conv_mod = pytest.importorskip("dynrank.conv")
    from dynrank.kernels.conv_merge import reference_kernel
    layer = conv_mod.LowRankConv2d(8, 12, 3, rank=4, decomposition=decomposition, alpha=6.0).double()
    for step in ("lowrank", "full", "adapter"):
        if step == "full":
            layer.inflate()
            with torch.no_grad():
                layer.weight.add_(0.05 * torch.randn_like(layer.weight))
        if step == "adapter":
            layer.deflate(init="random")
        # Reference dense kernel from the layer's tensors by the kernels' float64 reference merge
        # (not the layer's own merge, which metrics uses).
        dense = 0 if step == "lowrank" else layer.weight.detach()
        if step != "full":
            factors = {n: f.detach() for n, f in layer.factors().items()}
            dense = dense + reference_kernel(decomposition, factors, layer.scale)
        ref = torch.from_numpy(np_sigma(dense.reshape(12, -1)))
        got = singular_values(layer, method="svd")
        assert got.shape == (12,) and rel_err(got, ref) < 1e-10
        assert layer_metrics(layer).form == step


# -- models -----------------------------------------------------------------------------------

def test_model_metrics_batches_same_shapes_like_single_calls():
    model = nn.Sequential(*[FusedLowRankLinear(24, 24, 6) for _ in range(3)], nn.Linear(24, 24), nn.Linear(24, 24),
                          nn.Conv2d(4, 24, 1), FusedLowRankLinear(24, 10, 4, form="full"))
    model[1].inflate()
    batched = model_metrics(model, method="svd")
    assert list(batched) == ["0", "1", "2", "3", "4", "5", "6"]
    for name, module in model.named_children():
        single = layer_metrics(module, method="svd")
        ref = np_sigma(dense_of(module) if isinstance(module, FusedLowRankLinear)
                       else module.weight.detach().reshape(module.weight.shape[0], -1))
        assert batched[name].sigma_max == pytest.approx(ref[0], rel=1e-12)
        assert batched[name].as_dict() == single.as_dict()


def test_model_metrics_batches_per_device(monkeypatch):
    """Same-shape layers on two devices (a model split over two GPUs) are stacked per device: one stack of
    both raised "Expected all tensors to be on the same device"."""
    import dynrank.metrics as metrics_module
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6))
    plans = [metrics_module._plan(layer) for layer in model]
    batches = []
    sigma_batch = metrics_module._sigma_batch
    monkeypatch.setattr(metrics_module, "_sigma_batch", lambda mats, how: batches.append(len(mats)) or
                        sigma_batch(mats, how))
    metrics_module._run_plans(plans, [1e-6] * 3, "svd")
    assert batches == [3]
    batches.clear()
    plans[1].device = torch.device("cuda", 1)     # the device key only: build() still gives a CPU matrix
    sigmas = metrics_module._run_plans(plans, [1e-6] * 3, "svd")
    assert sorted(batches) == [1, 2]
    for layer, sigma in zip(model, sigmas):
        assert rel_err(sigma, torch.from_numpy(np_sigma(layer.weight.detach()))) < 1e-12


def test_model_metrics_names_an_empty_layer():
    model = nn.Sequential(nn.Linear(16, 16), nn.Sequential(nn.Linear(0, 16), nn.Linear(16, 4)))
    with pytest.raises(ValueError, match=r"^layer '1\.0': a weight tensor must have no zero-size dimension .*"
                                         r"got shape \(16, 0\)$"):
        model_metrics(model)


def test_monitored_layers_selection():
    inner = nn.Sequential(nn.Linear(4, 4))
    model = nn.Sequential(FusedLowRankLinear(8, 8, 2), nn.ReLU(), nn.Conv2d(3, 8, 3), inner)
    assert [n for n, _ in monitored_layers(model)] == ["0", "2", "3.0"]
    assert [n for n, _ in monitored_layers(model, ["2"])] == ["2"]
    assert [n for n, _ in monitored_layers(model, lambda n, m: isinstance(m, nn.Conv2d))] == ["2"]
    with pytest.raises(ValueError, match="not modules"):
        monitored_layers(model, ["nope"])


def test_bad_input_errors():
    with pytest.raises(TypeError, match="nn.Linear"):
        layer_metrics(nn.ReLU())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        layer_metrics(nn.Linear(3, 3), tol=1.5)
    with pytest.raises(TypeError, match="tol must be a float"):
        layer_metrics(nn.Linear(3, 3), tol="small")
    with pytest.raises(ValueError, match="method must be one of"):
        singular_values(nn.Linear(3, 3), method="lanczos")
    with pytest.raises(ValueError, match="non-empty 1-D"):
        spectral_ratio(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="at least 2 dims"):
        singular_values(torch.ones(5))
    with pytest.raises(ValueError, match="rank must be an int"):
        restricted_spectral_ratio(torch.ones(3), 4)


def test_tensor_of_the_wrong_kind_is_refused():
    """Complex σ used to drop the imaginary part with only a warning; integer and empty tensors gave torch errors."""
    with pytest.raises(TypeError, match=r"a weight tensor must be real floating point \(singular values of a complex "
                                        r"tensor are not supported\), got torch.complex64"):
        singular_values(torch.randn(3, 3, dtype=torch.complex64))
    for dtype in (torch.int64, torch.bool):
        with pytest.raises(TypeError, match=f"a weight tensor must be real floating point .*non-float.*got {dtype}"):
            layer_metrics(torch.ones(3, 3, dtype=dtype))
    for shape in [(0, 3), (3, 0), (4, 0, 3, 3)]:
        with pytest.raises(ValueError, match=r"a weight tensor must have no zero-size dimension \(an empty matrix has "
                                             f"no singular values\\), got shape {re.escape(str(shape))}"):
            singular_values(torch.randn(shape))
    with pytest.raises(ValueError, match=r"^singular values must be finite and ≥ 0, got nan at index 1$"):
        effective_rank(torch.tensor([3.0, math.nan, 1.0]))          # was 0: NaN compared False everywhere
    with pytest.raises(ValueError, match="singular values must be finite and ≥ 0, got -1.0 at index 2"):
        stable_rank([2.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="singular values must be finite and ≥ 0, got inf at index 0"):
        spectral_ratio(torch.tensor([math.inf, 1.0]))
    with pytest.raises(TypeError, match="singular values must be real, got a torch.complex128 tensor"):
        entropy_effective_rank(torch.ones(3, dtype=torch.complex128))
    with pytest.raises(TypeError, match=r"dtype must be a real floating torch.dtype \(the weight's\), got torch.int32"):
        default_tol((3, 4), torch.int32)


def _diverged_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), FusedLowRankLinear(8, 8, 3), nn.Linear(8, 8), FusedLowRankLinear(8, 5, 2),
                          nn.Conv2d(2, 4, 3))
    with torch.no_grad():
        model[0].weight[1, 2] = math.nan
        model[3].A[0, 0] = math.inf                                      # lowrank: the k × k QR path
        model[4].weight[0, 0, 0, 0] = -math.inf
    return model


@pytest.mark.parametrize("method", ["svd", "gram", "auto"])
def test_non_finite_weights(method):
    model = _diverged_model()
    with pytest.raises(ValueError, match=r"^layers \['0', '3', '4'\] have NaN or infinite weights: their singular "
                                         r"values are undefined \(nonfinite='nan' gives them NaN metrics instead\)$"):
        model_metrics(model, method=method)
    with pytest.raises(ValueError, match="the weight has NaN or infinite entries: its singular values are undefined"):
        singular_values(model[0], method=method)
    with pytest.raises(ValueError, match=r"layers \['layer'\] have NaN or infinite weights"):
        layer_metrics(model[3], method=method)
    got = model_metrics(model, method=method, nonfinite="nan")
    assert list(got) == ["0", "1", "2", "3", "4"]
    numbers = ["sigma_max", "sigma_min", "spectral_ratio", "restricted_spectral_ratio", "effective_rank",
               "entropy_rank", "stable_rank"]
    for name, shape in (("0", [8, 6]), ("3", [5, 8]), ("4", [4, 18])):
        m = got[name].as_dict()
        assert all(math.isnan(m[k]) for k in numbers), (name, m)
        assert m["shape"] == shape
    assert got["3"].form == "lowrank" and got["3"].rank == 2
    # The finite layers are measured as if alone, against numpy.
    ref = {"1": np_sigma(dense_of(model[1])), "2": np_sigma(model[2].weight.detach())}
    for name, sigma in ref.items():
        assert got[name].as_dict() == layer_metrics(model[int(name)], method=method).as_dict()
        assert got[name].sigma_max == pytest.approx(sigma[0], rel=1e-10)
    with pytest.raises(ValueError, match="nonfinite must be one of raise, nan, got 'skip'"):
        model_metrics(model, nonfinite="skip")


def test_layers_on_the_meta_device_are_refused_by_name():
    """A meta tensor has no values: the metrics named neither the layer nor the cause (an internal
    "Tensor.item() cannot be called on meta tensors")."""
    from dynrank import RankMonitor
    from dynrank.conv import LowRankConv2d
    meta = "hold tensors on the meta device, which have no values to measure: materialize them first"
    for layer in (FusedLowRankLinear(16, 8, 4, device="meta"), FusedLowRankLinear(16, 8, 4, form="adapter",
                  device="meta"), nn.Linear(4, 4, device="meta"), LowRankConv2d(8, 16, 3, rank=(4, 4),
                  decomposition="tucker", device="meta")):
        with pytest.raises(ValueError, match=re.escape(f"layers ['layer ({type(layer).__name__})'] {meta}")):
            layer_metrics(layer)
        with pytest.raises(ValueError, match=re.escape(meta)):
            singular_values(layer)
    with pytest.raises(ValueError, match=re.escape(f"layers ['layer (Tensor)'] {meta}")):
        singular_values(torch.empty(4, 4, device="meta"))
    model = nn.Sequential(nn.Linear(4, 8), FusedLowRankLinear(8, 8, 2, device="meta"), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=re.escape(f"layers ['1 (FusedLowRankLinear)'] {meta}")):
        model_metrics(model)
    with pytest.raises(ValueError, match=re.escape(f"layers ['1 (FusedLowRankLinear)'] {meta}")):
        RankMonitor(model).measure()
    model[1].to_empty(device="cpu").reset_parameters()
    assert list(model_metrics(model)) == ["0", "1", "2"]


def test_layer_names_are_names_not_characters():
    inner = nn.Sequential(nn.Linear(4, 4))
    model = nn.Sequential(FusedLowRankLinear(8, 8, 2), nn.ReLU(), nn.Conv2d(3, 8, 3), inner)
    assert monitored_layers(model, "3.0") == [("3.0", inner[0])]     # was split into '3', '.', '0'
    assert list(model_metrics(model, layers="3.0")) == ["3.0"]
    with pytest.raises(TypeError, match=r"layers must be None, module names \(a str or an iterable of str\) or a "
                                        r"predicate fn\(name, module\), got int \(3\)"):
        monitored_layers(model, 3)
    with pytest.raises(TypeError, match=r"layers must hold module names \(str\), got 3 \(int\)"):
        monitored_layers(model, ["0", 3])


def _conv_reference_sigma(layer):
    """Singular values of the layer's effective kernel, merged from float64 copies of its tensors."""
    import copy
    ref = copy.deepcopy(layer).double()
    if ref.form != "full":
        ref.inflate()
    W = ref.weight.detach()
    return torch.linalg.svdvals(W.reshape(W.shape[0], -1))


@pytest.mark.parametrize("channels, k, groups, decomposition, rank", [
    ((8, 16), 3, 1, "tucker", (8, 4)), ((8, 16), 3, 1, "tkd-cpd", (8, 3, 8)), ((8, 16), 3, 1, "tkd-cpd", (4, 8, 4)),
    ((8, 16), 3, 1, "svd", 4), ((8, 16), 3, 1, "cp", 4), ((8, 16), 3, 4, "svd", 8),
    # r_out above r_in·kh·kw: the input side bounds the rank (16 and 18)
    ((64, 256), 1, 1, "tucker", (16, 64)), ((64, 256), 3, 1, "tucker", (2, 32)),
    ((64, 256), 1, 1, "tkd-cpd", (16, 16, 64)), ((64, 256), 3, 1, "tkd-cpd", (2, 18, 32)),
    ((64, 256), 1, 1, "svd", 16), ((64, 256), 1, 1, "cp", 16),
    # a CP rank past p = min(m, n) = 8 (legal up to 72 here): the ratio is σ₁/σ_p
    ((16, 8), 3, 1, "cp", 40), ((16, 8), 3, 1, "cp", 72)])
def test_restricted_spectral_ratio_of_a_lowrank_conv_uses_its_true_rank_bound(channels, k, groups, decomposition,
                                                                             rank):
    """σ₁/σ_r with r the rank the merged kernel can have: min(r_out, r_in·kh·kw) for Tucker,
    min(R, r_out, r_in·kh·kw) for TKD-CPD.  The largest entry of a tuple rank reached past it, and so did
    r_out alone: both reported ∞ for healthy layers."""
    from dynrank.conv import LowRankConv2d
    torch.manual_seed(0)
    layer = LowRankConv2d(*channels, k, rank=rank, decomposition=decomposition, groups=groups,
                          dtype=torch.float64)
    with torch.no_grad():
        for p in layer.factors().values():
            p.normal_()
    sigma = _conv_reference_sigma(layer)
    true_rank = int((sigma > sigma[0] * 1e-10).sum())
    got = layer_metrics(layer).restricted_spectral_ratio
    assert math.isfinite(got)
    assert got == pytest.approx(float(sigma[0] / sigma[true_rank - 1]), rel=1e-9)


@pytest.mark.parametrize("form", ["lowrank", "adapter"])
@pytest.mark.parametrize("decomposition", ["svd", "tucker", "cp", "tkd-cpd"])
def test_conv_metrics_merge_in_float64(form, decomposition):
    """A bf16 conv's factors were merged in bf16 before the float64 SVD: σ_min of a TKD-CPD adapter came out
    59 % off, and a lowrank layer's zero singular values as 5e-4.  The merge is float64, as documented."""
    from dynrank.conv import LowRankConv2d
    torch.manual_seed(1)
    rank = {"svd": 4, "tucker": (4, 4), "cp": 4, "tkd-cpd": (4, 4, 4)}[decomposition]
    layer = LowRankConv2d(8, 16, 3, rank=rank, decomposition=decomposition, form=form, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    sigma = _conv_reference_sigma(layer)
    got = singular_values(layer)
    assert torch.allclose(got, sigma.to(got.dtype), rtol=1e-9, atol=1e-12 * float(sigma[0]))


@pytest.mark.parametrize("form", ["lowrank", "adapter"])
@pytest.mark.parametrize("decomposition", ["svd", "tucker", "cp", "tkd-cpd"])
def test_conv_default_tolerance_follows_the_storage_dtype(form, decomposition):
    """The merge is float64, but the default tolerance is that of the stored factors' dtype: with float64's,
    a float32 layer would count the rounding noise of its factors as rank."""
    from dynrank.conv import LowRankConv2d
    rank = {"svd": 4, "tucker": (4, 8), "cp": 4, "tkd-cpd": (4, 4, 8)}[decomposition]
    for dtype in (torch.float32, torch.bfloat16):
        layer = LowRankConv2d(8, 16, 3, rank=rank, decomposition=decomposition, form=form, dtype=dtype)
        m = layer_metrics(layer)
        assert m.shape == (16, 72) and m.form == form
        assert m.tol == min(72 * torch.finfo(dtype).eps, 1e-2) == default_tol((16, 72), dtype)


class _UVLayer(FormLayer):
    """A FormLayer of another kind (W0 + U·V, no effective_weight()): measured as what inflate builds."""

    def __init__(self, n, m, rank, form="lowrank"):
        super().__init__()
        self.n, self.m = n, m
        self._build_parameters(form, rank, True, dtype=torch.float64)

    def _factor_names(self, rank):
        return ("U", "V")

    def _dense_shape(self):
        return (self.m, self.n)

    def _factor_shapes(self, rank):
        return {"U": (self.m, rank), "V": (rank, self.n)}

    def _init_factors(self, rank, zero_output, device=None, dtype=None):
        return {"U": torch.randn(self.m, rank, device=device, dtype=dtype),
                "V": torch.randn(rank, self.n, device=device, dtype=dtype)}

    def _merge_into_(self, weight, alpha, factors):
        weight.add_(factors["U"] @ factors["V"], alpha=alpha)

    def _check_rank(self, rank):
        return int(rank)

    def _init_lowrank_(self, factors, rank):
        pass


@pytest.mark.parametrize("form", ["lowrank", "adapter"])
def test_a_form_layer_of_another_kind_is_measured_by_its_own_merge(form):
    torch.manual_seed(0)
    layer = _UVLayer(12, 10, 3, form=form)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    dense = layer._dense()
    expected = (0 if dense is None else dense.detach()) + layer.U.detach() @ layer.V.detach()
    torch.testing.assert_close(singular_values(layer), torch.linalg.svdvals(expected), rtol=1e-12, atol=1e-12)


def test_scalar_metrics_take_sigma_in_any_order_and_agree_at_the_tolerance():
    """σ may come in any order (every other test passed them sorted), and a value exactly at tol·σmax is not
    counted: the effective rank is below p exactly where λ is ∞."""
    from dynrank.spectra import effective_rank, restricted_spectral_ratio, spectral_ratio
    sigma = torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)
    assert restricted_spectral_ratio(sigma, 2) == 2.0
    assert spectral_ratio(sigma) == 4.0 and effective_rank(sigma) == 3
    at_tol = torch.tensor([1.0, 0.5], dtype=torch.float64)
    assert effective_rank(at_tol, 0.5) == 1 and spectral_ratio(at_tol, 0.5) == math.inf
    assert effective_rank(at_tol, 0.49) == 2 and spectral_ratio(at_tol, 0.49) == 2.0


def test_numpy_singular_values_keep_their_dtype_for_the_default_tolerance():
    """A numpy float32 σ (or a list of numpy float32 scalars) was made float64 first, so the default tol took
    float64's eps: effective rank 4 and λ 5.5e7 for a rank-1 float32 matrix plus 1e-6 noise, where the same
    values as a torch float32 tensor give 1 and ∞."""
    W = np.outer(np.arange(1, 5), np.arange(1, 7)).astype(np.float32)
    W += np.float32(1e-6) * np.eye(4, 6, dtype=np.float32)
    s32 = np.linalg.svd(W, compute_uv=False)
    assert s32.dtype == np.float32
    # Reference: the float64 values against p·eps(float32)·σmax, the rule the docstring states.
    s64 = s32.astype(np.float64)
    tol32 = len(s32) * float(np.finfo(np.float32).eps)
    expected_rank = int((s64 > tol32 * s64.max()).sum())
    assert expected_rank == 1
    for sigma in (s32, list(s32), torch.from_numpy(s32)):
        assert effective_rank(sigma) == expected_rank
        assert spectral_ratio(sigma) == math.inf
        assert restricted_spectral_ratio(sigma, 2) == math.inf
    # Python floats are doubles and numpy float64 stays float64: float64's eps, so 1e-10 counts.
    tol64 = 2 * float(np.finfo(np.float64).eps)
    assert 1e-10 > tol64
    for sigma in ([1.0, 1e-10], np.array([1.0, 1e-10]), [np.float64(1.0), np.float64(1e-10)]):
        assert effective_rank(sigma) == 2
        assert spectral_ratio(sigma) == pytest.approx(1e10, rel=1e-15)
    assert effective_rank(np.array([3, 0])) == 1                      # integers are measured as float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_restricted_spectral_ratio_default_tolerance_is_that_of_all_of_sigma(dtype):
    """The default tol is p·eps of σ's dtype with p = len(σ) (capped at 1e-2), as for effective_rank, not
    rank·eps: σ₁/σ_rank is ∞ exactly when the effective rank is below rank."""
    values = [1.0, 1e-2, 1e-5] + [0.0] * 997 if dtype == torch.float32 else list(np.geomspace(1.0, 1e-14, 300))
    sigma = torch.tensor(values, dtype=dtype)
    exact = sigma.double().numpy()                     # reference: the rule σ > tol·σmax in float64
    tol = min(len(exact) * torch.finfo(dtype).eps, 1e-2)
    live = int((exact > tol * exact.max()).sum())
    assert effective_rank(sigma) == live and 1 <= live < len(exact)
    for rank in range(1, len(exact) + 1):
        got = restricted_spectral_ratio(sigma, rank)
        if rank > live:
            assert got == math.inf, rank
        else:
            assert got == pytest.approx(exact[0] / exact[rank - 1], rel=1e-15), rank


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_reversed_numpy_sigma_is_measured_like_the_sorted_one(dtype):
    """numpy's σ reversed to ascending order (s[::-1], a negative stride) was refused as "must be a 1-D tensor or
    sequence of numbers, got ndarray"."""
    W = np.random.default_rng(0).standard_normal((7, 5)).astype(dtype)
    s = np.linalg.svd(W, compute_uv=False)
    ascending = s[::-1]
    assert ascending.strides[0] < 0 and ascending.dtype == dtype
    s64 = s.astype(np.float64)                                          # reference: float64 formulas on σ
    p = s64 / s64.sum()
    assert spectral_ratio(ascending) == pytest.approx(s64[0] / s64[-1], rel=TOL64)
    assert effective_rank(ascending) == 5
    assert restricted_spectral_ratio(ascending, 3) == pytest.approx(s64[0] / s64[2], rel=TOL64)
    assert entropy_effective_rank(ascending) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=TOL64)
    assert stable_rank(ascending) == pytest.approx((s64 ** 2).sum() / s64[0] ** 2, rel=TOL64)
    # The copy keeps the array's shape: a reversed 2-D array is still no σ.
    with pytest.raises(ValueError, match=r"must be a non-empty 1-D tensor, got shape \(2, 3\)"):
        spectral_ratio(np.ones((2, 3), dtype=dtype)[:, ::-1])


@pytest.mark.parametrize("scale", [1e200, 1e-170, 1e300])
def test_stable_rank_does_not_depend_on_the_scale(scale):
    """stable_rank squared σ before dividing by σmax²: inf/inf or 0/0 = NaN in float64 beyond ~1e154 and below
    ~1e-162, where the other metrics stay finite."""
    assert stable_rank(torch.tensor([scale, scale], dtype=torch.float64)) == 2.0
    assert stable_rank([2.0 * scale, scale, scale]) == pytest.approx(1.5, rel=1e-15)
    assert stable_rank([1e-323, 5e-324, 5e-324]) == 1.5                 # subnormal: 2, 1 and 1 ulps
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, dtype=torch.float64)
    fro, two = np.linalg.norm(layer.weight.detach().numpy(), "fro"), np.linalg.norm(layer.weight.detach().numpy(), 2)
    with torch.no_grad():
        layer.weight.mul_(scale)
    assert layer_metrics(layer).stable_rank == pytest.approx(fro ** 2 / two ** 2, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tol", [None, 1e-2, 1e-3])
def test_sigma_of_any_dtype_is_compared_with_the_float64_threshold(dtype, tol):
    """tol·σmax was computed in σ's own dtype: in bf16 the threshold rounded up to 0.0100098 for tol 0.01, so
    σ = [1, bf16(0.01)] gave rank 1 and λ = ∞ where the same values in float64 give 2 and 99.9, and a random
    bf16 spectrum lost a value just above the threshold.  The default tol is still p·eps of σ's dtype."""
    values = np.random.default_rng(0).random(300) * 1e-5
    sigma = torch.tensor(values, dtype=dtype)
    # Reference: the same values in float64 against the docstring's rule σ > tol·σmax.
    exact = sigma.double().numpy()
    rel = min(len(exact) * torch.finfo(dtype).eps, 1e-2) if tol is None else tol
    assert effective_rank(sigma, tol) == int((exact > rel * exact.max()).sum())
    expected_ratio = math.inf if exact.min() <= rel * exact.max() else exact.max() / exact.min()
    assert spectral_ratio(sigma, tol) == expected_ratio
    assert restricted_spectral_ratio(sigma, 300, tol) == expected_ratio
    # Two values, the second the first of σ's dtype above tol: counted, and λ their float64 quotient.
    t = 1e-2 if tol is None else tol
    second = torch.tensor(t, dtype=dtype)
    if float(second) <= t:
        second = torch.nextafter(second, torch.tensor(1.0, dtype=dtype))
    pair = torch.stack([torch.ones((), dtype=dtype), second])
    assert float(pair[1]) > t
    assert effective_rank(pair, t) == 2
    assert spectral_ratio(pair, t) == 1.0 / float(pair[1])


@pytest.mark.parametrize("sigma, expected", [([1e308, 1e308], 2.0), ([1.5e308, 1e308, 5e307], None),
                                             ([1e200, 1e-200], 1.0), ([1e200, 1e200, 1e-200], 2.0),
                                             ([1e-300, 5e-301, 5e-301], None)])
def test_entropy_effective_rank_does_not_depend_on_the_scale(sigma, expected):
    """p = σ / Σσ: Σσ overflowed to inf (all p 0) or a ratio underflowed to 0 after dropping σ = 0, and
    0·log 0 gave NaN for finite float64 σ; the rank depends only on the ratios of σ."""
    ratios = np.asarray(sigma) / max(sigma)
    if expected is None:                              # reference: the definition on the ratios, in float64
        p = ratios / ratios.sum()
        expected = float(np.exp(-(p * np.log(p)).sum()))
    assert entropy_effective_rank(torch.tensor(sigma, dtype=torch.float64)) == pytest.approx(expected, rel=1e-15)
    assert entropy_effective_rank(sigma) == pytest.approx(expected, rel=1e-15)
