"""Inflate-merge throughput: W += alpha·A·Bᵀ, and the conv-kernel merges.

Linear merge, one group per shape, each call timed to its synchronize (``test_merge``) and
queued, 20 calls per synchronize (``test_merge_queued``, groups ``merge queued …``):

- ``dynrank``: ``dynrank.functional.merge_`` (one fused pass over W on CUDA);
- ``addmm_``: ``W.addmm_(A, B.T, alpha=alpha)``;
- ``unfused``: ``W + alpha * (A @ B.T)`` (the product materialized, a new W);
- ``copy``: ``W2.copy_(W)``, the same bytes with no arithmetic: the ceiling.

GB/s counts the minimal traffic, the same for every provider: W read and
written once plus A and B read once.

Conv merges, one group per (decomposition, kernel shape):

- ``dynrank``: the merge of ``LowRankConv2d`` (``_merge_into_``, the layer
  contract every ``inflate()`` goes through);
- ``tensorly``: the same layer's factors, the dense kernel reconstructed with
  ``tensorly.tucker_to_tensor`` / ``cp_to_tensor`` (plain matrix product for SVD),
  then added to W.

Conv GB/s counts the dense kernel's read and write.  Two tests that are not
benchmarks check that every provider computes its merge (against float64).
"""

from dataclasses import dataclass

import pytest
import torch

import _bench_common as common


@dataclass(frozen=True)
class MergeCase:
    out_features: int
    in_features: int
    rank: int
    dtype: torch.dtype
    target: bool = False

    @property
    def id(self):
        tag = "-target" if self.target else ""
        return f"N{self.out_features}-K{self.in_features}-r{self.rank}-{common.dtype_name(self.dtype)}{tag}"


def merge_cases(grid):
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    if grid == "cpu":
        return [MergeCase(192, 100, 8, f32), MergeCase(512, 384, 32, f32)]
    # Merges run on the parameters: fp32 masters under AMP, bf16 in pure-bf16 training.
    cases = [MergeCase(n, n, 16, dt, target=True) for n in (4096, 8192) for dt in (bf16, f32)]
    if grid == "full":
        cases += [MergeCase(4096, 4096, r, bf16) for r in (64, 512)]
        cases += [MergeCase(4000, 4000, 16, bf16), MergeCase(11008, 4096, 64, bf16),
                  MergeCase(5000, 1100, 8, f32), MergeCase(8192, 8192, 16, f16),
                  MergeCase(1024, 1024, 8, bf16)]
    return cases


MERGE_PROVIDERS = ("copy", "unfused", "addmm_", "dynrank", "dynrank_triton")
MERGE_ALPHA = 0.5


def merge_operands(case, device=common.DEVICE):
    """W, A, B of one merge case."""
    kw = dict(device=device, dtype=case.dtype)
    W = torch.randn(case.out_features, case.in_features, **kw)
    # Small factors: thousands of timed in-place merges must not overflow fp16.
    A = torch.randn(case.out_features, case.rank, **kw) * 1e-3
    B = torch.randn(case.in_features, case.rank, **kw) * 1e-3
    return W, A, B


def make_merge(provider, case, device=common.DEVICE, operands=None, timed=True):
    """Setup factory: the callable of one provider, returning the merged W (written in place where
    the provider merges in place; ``copy`` returns W's copy).  ``operands``: (W, A, B) to use instead
    of fresh ones; ``timed=False`` (a correctness check) lets ``dynrank_triton`` run interpreted."""
    W, A, B = operands if operands is not None else merge_operands(case, device)
    if provider == "copy":
        dst = torch.empty_like(W)
        return lambda: dst.copy_(W)
    if provider == "unfused":
        return lambda: W + MERGE_ALPHA * (A @ B.t())
    if provider == "addmm_":
        return lambda: W.addmm_(A, B.t(), alpha=MERGE_ALPHA)
    if provider in ("dynrank", "dynrank_triton"):
        from dynrank.functional import merge_

        run = lambda: merge_(W, A, B, MERGE_ALPHA)  # noqa: E731
        return run if provider == "dynrank" else common.triton_forced(run, timed)
    raise ValueError(f"unknown provider {provider!r}")


def _timed(fn, synchronize=True):
    def run():
        with torch.no_grad():
            out = fn()
        if synchronize:
            common.sync()
        return out
    return run


def _time_merge(benchmark, provider, case, timing, config=None):
    """Time one provider's merge for ``case``, each call to its synchronize or queued, and record it."""
    queued = timing == "queued"
    run = _timed(make_merge(provider, case), synchronize=not queued)
    common.describe(benchmark, suite="merge", provider=provider, form="merge", dtype=case.dtype,
                    group=f"merge{' queued' if queued else ''} {case.id}", target=case.target, rank=case.rank,
                    shape={"out_features": case.out_features, "in_features": case.in_features}, timing=timing)
    common.time_pass(benchmark, run, timing, config)
    elt = torch.empty((), dtype=case.dtype).element_size()
    N, K, r = case.out_features, case.in_features, case.rank
    # The copy moves the same bytes but does no arithmetic.
    common.finish(benchmark, flops=None if provider == "copy" else 2.0 * N * K * r,
                  bytes_moved=(2.0 * N * K + (N + K) * r) * elt, dtype=case.dtype)


_MERGE_CASES = [pytest.param(c, id=c.id, marks=(pytest.mark.bench_target,) if c.target else ())
                for c in merge_cases(common.grid_mode())]


@pytest.mark.parametrize("case", _MERGE_CASES)
@pytest.mark.parametrize("provider", MERGE_PROVIDERS)
def test_merge(benchmark, provider, case):
    """Each merge timed to its synchronize: the host's launch time is in it (as in an epoch's inflate)."""
    _time_merge(benchmark, provider, case, "call")


@pytest.mark.parametrize("case", _MERGE_CASES)
@pytest.mark.parametrize("provider", MERGE_PROVIDERS)
def test_merge_queued(benchmark, pytestconfig, provider, case):
    """Merges queued, one synchronize per round: the device's own rate, what the bandwidth target is about."""
    _time_merge(benchmark, provider, case, "queued", pytestconfig)


# ---------------------------------------------------------------------------
# Conv-kernel merges
# ---------------------------------------------------------------------------

DECOMPOSITIONS = ("svd", "tucker", "cp", "tkd-cpd")
CONV_RANK_RATIO = 0.5


def conv_merge_kernels(grid):
    """(out_channels, in_channels, kernel) of 3×3 kernels: ResNet20 and ResNet50 widths."""
    if grid == "cpu":
        return [(32, 32, 3), (64, 64, 3)]
    kernels = [(64, 64, 3), (256, 256, 3), (512, 512, 3)]
    if grid == "full":
        kernels = [(16, 16, 3), (32, 32, 3), (128, 128, 3)] + kernels
    return kernels


def conv_merge_operands(decomposition, kernel, dtype, device=common.DEVICE):
    """W, the factors (all nonzero) and the scale of an adapter LowRankConv2d at rank ratio 0.5: the
    operands both conv-merge providers work on."""
    LowRankConv2d = common.require_module("dynrank.conv", "LowRankConv2d is being written", "LowRankConv2d")
    F_out, C, k = kernel
    layer = LowRankConv2d(C, F_out, k, decomposition=decomposition, padding=k // 2, bias=False,
                          form="adapter", rank_ratio=CONV_RANK_RATIO).to(device=device, dtype=dtype)
    factors = {name: f.detach() for name, f in layer.factors().items()}
    with torch.no_grad():
        for f in factors.values():
            f.normal_(0.0, 0.1)                   # the adapter's zeroed factor too: a real product
    return layer, layer.weight.detach().clone(), factors, float(layer.scale)


def _tensorly_reconstruct(decomposition, W, f, scale):
    """A callable W + scale·(the dense kernel of factors ``f``, rebuilt by tensorly), a new tensor.

    The layer's factors in tensorly's terms: a Tucker core with channel factors, or CP factors
    (plain matrix product for SVD); the formulas are those of ``dynrank.kernels.conv_merge``'s
    references.
    """
    import tensorly as tl

    k_h, k_w = W.shape[2:]
    eye_h, eye_w = (torch.eye(n, device=W.device, dtype=W.dtype) for n in (k_h, k_w))
    mat = lambda t: t.reshape(t.shape[0], -1)         # noqa: E731  (r, C, 1, 1) → (r, C)
    if decomposition == "svd":
        A, B = mat(f["A"]), mat(f["B"])
        return lambda: W + scale * (A @ B).view(W.shape)
    if decomposition == "tucker":
        core, channel = f["core"], [mat(f["A"]), mat(f["B"]).t(), eye_h, eye_w]
        return lambda: W + scale * tl.tucker_to_tensor((core, channel))
    if decomposition == "cp":
        weights = torch.ones(f["A"].shape[1], device=W.device, dtype=W.dtype)
        cp = [mat(f["A"]), mat(f["B"]).t(), mat(f["Kh"]).t(), mat(f["Kw"]).t()]
        return lambda: W + scale * tl.cp_to_tensor((weights, cp))
    if decomposition == "tkd-cpd":
        # Tucker-2 over channels whose (r_out, r_in, kh, kw) core is itself CP.
        weights = torch.ones(f["Kh"].shape[0], device=W.device, dtype=W.dtype)
        core_cp = [mat(f["core_out"]), mat(f["core_in"]).t(), mat(f["Kh"]).t(), mat(f["Kw"]).t()]
        channel = [mat(f["A"]), mat(f["B"]).t(), eye_h, eye_w]
        return lambda: W + scale * tl.tucker_to_tensor((tl.cp_to_tensor((weights, core_cp)), channel))
    raise ValueError(f"unknown decomposition {decomposition!r}")


def make_conv_merge(provider, decomposition, kernel, dtype, device=common.DEVICE, timed=True):
    """Setup factory: the callable of one provider, returning the merged kernel (a new tensor for
    ``tensorly``, W merged in place for ``dynrank``)."""
    if provider == "dynrank_triton":
        return common.triton_forced(make_conv_merge("dynrank", decomposition, kernel, dtype, device), timed)
    if provider not in ("tensorly", "dynrank"):
        raise ValueError(f"unknown provider {provider!r}")
    layer, W, factors, scale = conv_merge_operands(decomposition, kernel, dtype, device)
    if provider == "tensorly":
        return _tensorly_reconstruct(decomposition, W, factors, scale)
    return lambda: (layer._merge_into_(W, 1.0, factors), W)[1]


@pytest.mark.parametrize("kernel", conv_merge_kernels(common.grid_mode()),
                         ids=lambda k: f"F{k[0]}-C{k[1]}-k{k[2]}")
@pytest.mark.parametrize("decomposition", DECOMPOSITIONS)
@pytest.mark.parametrize("provider", ("tensorly", "dynrank", "dynrank_triton"))
def test_conv_merge(benchmark, provider, decomposition, kernel):
    import tensorly as tl

    dtype = torch.float32
    with tl.backend_context("pytorch"):
        run = _timed(make_conv_merge(provider, decomposition, kernel, dtype))
        F_out, C, k = kernel
        common.describe(benchmark, suite="conv_merge", provider=provider, form=decomposition, dtype=dtype,
                        group=f"conv_merge {decomposition} F{F_out}-C{C}-k{k}",
                        shape={"out_channels": F_out, "in_channels": C, "kernel_size": k},
                        rank=f"ratio {CONV_RANK_RATIO}", decomposition=decomposition)
        common.warm_up(benchmark, run)
        benchmark(run)
    common.finish(benchmark, bytes_moved=2.0 * F_out * C * k * k * torch.empty((), dtype=dtype).element_size(),
                  dtype=dtype)


# ---------------------------------------------------------------------------
# Not benchmarks: every provider does the merge its row claims
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("provider", MERGE_PROVIDERS)
def test_each_merge_provider_computes_the_merge(provider):
    """One call of each provider against W + alpha·A·Bᵀ in float64 (``copy``: W itself), so no ratio
    of the merge suite compares unequal work."""
    case = MergeCase(24, 20, 4, torch.float32)
    W, A, B = merge_operands(case)
    A, B = A * 1e3, B * 1e3                          # a product of the size of W: one the check sees
    expected = W.double() if provider == "copy" else W.double() + MERGE_ALPHA * A.double() @ B.double().t()
    with torch.no_grad():
        out = make_merge(provider, case, operands=(W.clone(), A, B), timed=False)()
    assert out.shape == W.shape
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-6


@pytest.mark.parametrize("decomposition", DECOMPOSITIONS)
@pytest.mark.parametrize("provider", ("tensorly", "dynrank", "dynrank_triton"))
def test_each_conv_merge_provider_computes_the_merge(provider, decomposition):
    """One call of each conv-merge provider against W + the float64 reference kernel of the same
    factors: the tensorly reconstruction and the layer's merge do the same work."""
    import tensorly as tl

    from dynrank.kernels.conv_merge import reference_kernel

    torch.manual_seed(0)
    _, W, factors, scale = conv_merge_operands(decomposition, (8, 6, 3), torch.float32)
    expected = W.double() + reference_kernel(decomposition, factors, scale)
    torch.manual_seed(0)
    with tl.backend_context("pytorch"), torch.no_grad():
        out = make_conv_merge(provider, decomposition, (8, 6, 3), torch.float32, timed=False)()
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-6
