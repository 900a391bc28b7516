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
- ``tensorly``: the dense kernel reconstructed with ``tensorly.tucker_to_tensor``
  / ``cp_to_tensor`` (plain matrix product for SVD), then added to W.

Conv GB/s counts the dense kernel's read and write.
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


def make_merge(provider, case, device=common.DEVICE):
    """Setup factory: the callable of one provider (W is modified in place where it applies)."""
    kw = dict(device=device, dtype=case.dtype)
    W = torch.randn(case.out_features, case.in_features, **kw)
    # Small factors: thousands of timed in-place merges must not overflow fp16.
    A = torch.randn(case.out_features, case.rank, **kw) * 1e-3
    B = torch.randn(case.in_features, case.rank, **kw) * 1e-3
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
        return run if provider == "dynrank" else common.triton_forced(run)
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


def _tensorly_reconstruct(decomposition, F_out, C, k, rank, kw):
    """Factors of the given decomposition and a callable W + reconstruct(factors)."""
    import tensorly as tl

    W = torch.randn(F_out, C, k, k, **kw)
    eye = torch.eye(k, **kw)
    if decomposition == "svd":
        U = torch.randn(F_out, rank, **kw) * 0.1
        V = torch.randn(rank, C * k * k, **kw) * 0.1
        return lambda: W + (U @ V).view(W.shape)
    if decomposition == "tucker":
        core = torch.randn(rank, rank, k, k, **kw) * 0.1
        factors = [torch.randn(F_out, rank, **kw) * 0.1, torch.randn(C, rank, **kw) * 0.1, eye, eye]
        return lambda: W + tl.tucker_to_tensor((core, factors))
    if decomposition == "cp":
        weights = torch.ones(rank, **kw)
        factors = [torch.randn(n, rank, **kw) * 0.1 for n in (F_out, C, k, k)]
        return lambda: W + tl.cp_to_tensor((weights, factors))
    if decomposition == "tkd-cpd":
        # Tucker-2 over channels whose (r_out, r_in, k, k) core is itself CP.
        weights = torch.ones(rank, **kw)
        core_factors = [torch.randn(n, rank, **kw) * 0.1 for n in (rank, rank, k, k)]
        factors = [torch.randn(F_out, rank, **kw) * 0.1, torch.randn(C, rank, **kw) * 0.1, eye, eye]
        return lambda: W + tl.tucker_to_tensor((tl.cp_to_tensor((weights, core_factors)), factors))
    raise ValueError(f"unknown decomposition {decomposition!r}")


def make_conv_merge(provider, decomposition, kernel, dtype, device=common.DEVICE):
    F_out, C, k = kernel
    kw = dict(device=device, dtype=dtype)
    if provider == "tensorly":
        return _tensorly_reconstruct(decomposition, F_out, C, k, max(1, int(CONV_RANK_RATIO * F_out)), kw)
    if provider == "dynrank":
        LowRankConv2d = common.require_module("dynrank.conv", "LowRankConv2d is being written", "LowRankConv2d")
        layer = LowRankConv2d(C, F_out, k, decomposition=decomposition, padding=k // 2, bias=False,
                                   form="adapter", rank_ratio=CONV_RANK_RATIO).to(**kw)
        W = layer.weight.detach().clone()
        factors = {name: f.detach() for name, f in layer.factors().items()}
        return lambda: layer._merge_into_(W, 1.0, factors)
    if provider == "dynrank_triton":
        return common.triton_forced(make_conv_merge("dynrank", decomposition, kernel, dtype, device))
    raise ValueError(f"unknown provider {provider!r}")


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
