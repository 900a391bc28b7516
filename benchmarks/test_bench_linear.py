"""Linear layer throughput: dynrank's three forms against dense and unfused LoRA.

One group per (pass, shape, dtype) holds every provider, so ratios are read
within one run:

=================  ========  =====================================================
provider           form      what runs
=================  ========  =====================================================
dense              full      ``nn.Linear``, trainable weight
dense_frozen       full      ``nn.Linear``, frozen weight (the adapter's floor)
dynrank            full      ``FusedLowRankLinear(form="full")``
torch_unfused      lowrank   x·Bᵀ then ·Aᵀ as two ``F.linear``
torch_compile      lowrank   the same function under ``torch.compile``
dynrank            lowrank   ``FusedLowRankLinear(form="lowrank")``
torch_unfused      adapter   base ``F.linear`` + (x·Bᵀ)·Aᵀ·s, separate ops (the usual LoRA)
torch_compile      adapter   the same function under ``torch.compile``
peft               adapter   ``peft.tuners.lora.Linear`` around a frozen ``nn.Linear``
dynrank            adapter   ``FusedLowRankLinear(form="adapter")``
dynrank_triton     both      the same layers with the Triton kernels forced (CUDA)
torch_inplace      adapter   addmm(bias, x·Bᵀ, Aᵀ, alpha=s), then += x·W_fᵀ in place: the same math
                             on autograd's own nodes, with no pass over a T × N tensor of its own
=================  ========  =====================================================

``test_linear`` times each call to its synchronize (latency); ``test_linear_queued``
times forward+backward with 20 calls queued per synchronize (throughput: see
``_bench_common.benchmark_queued``), in groups ``linear fwd+bwd queued …``.

FLOPs per call are the useful work of the form (same for every provider):
forward 2TKN (dense) / 2Tr(K+N) (low-rank term); backward adds dx (2TKN),
dW (2TKN, trainable dense only) and 4Tr(K+N) for the factors.
"""

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import _bench_common as common

ADAPTER_ALPHA = 16.0  # LoRA's usual alpha: the adapter term is scaled by alpha / rank


@dataclass(frozen=True)
class LinearCase:
    tokens: int
    in_features: int
    out_features: int
    rank: int
    dtype: torch.dtype
    target: bool = False

    @property
    def id(self):
        tag = "-target" if self.target else ""
        return (f"T{self.tokens}-K{self.in_features}-N{self.out_features}-r{self.rank}-"
                f"{common.dtype_name(self.dtype)}{tag}")


def linear_cases(grid):
    """Shapes of one grid (see README: cpu / targets / full)."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    if grid == "cpu":
        # Small enough for a 2-core CI run; 100 is not a multiple of 16.
        return [LinearCase(64, 64, 64, 4, f32), LinearCase(256, 192, 100, 32, f32)]
    # Speed targets: adapter fwd+bwd, K = N ∈ {4096, 8192}, rank 16, 2k–8k tokens, bf16.
    cases = [LinearCase(t, k, k, 16, bf16, target=True) for k in (4096, 8192) for t in (2048, 4096, 8192)]
    # A few representatives of the rest: a non-multiple of 128, a large rank, a small layer, fp16.
    representatives = [LinearCase(4096, 4000, 4000, 16, bf16), LinearCase(4096, 4096, 4096, 512, bf16),
                       LinearCase(2048, 1024, 1024, 8, bf16), LinearCase(4096, 4096, 4096, 16, f16)]
    if grid == "targets":
        cases += representatives
    if grid == "full":
        cases += [LinearCase(4096, 4096, 4096, r, bf16) for r in (8, 32, 64, 128, 256, 512)]
        # In/out that are not multiples of 128.
        cases += [LinearCase(4096, 4000, 4000, 16, bf16), LinearCase(4096, 1000, 3000, 64, bf16),
                  LinearCase(4096, 8000, 2000, 128, bf16), LinearCase(2048, 5000, 1100, 8, bf16)]
        cases += [LinearCase(2048, 1024, 1024, r, bf16) for r in (8, 64, 512)]
        cases += [LinearCase(16384, 4096, 4096, 16, bf16), LinearCase(16384, 8192, 8192, 16, bf16)]
        cases += [LinearCase(4096, 4096, 4096, 16, f16), LinearCase(8192, 8192, 8192, 16, f16),
                  LinearCase(4096, 4096, 4096, 16, f32), LinearCase(2048, 1024, 1024, 64, f32),
                  LinearCase(4096, 4000, 4000, 64, f16)]
    return cases


PROVIDERS = [
    ("dense", "full"), ("dense_frozen", "full"), ("dynrank", "full"),
    ("torch_unfused", "lowrank"), ("torch_compile", "lowrank"), ("dynrank", "lowrank"),
    ("torch_unfused", "adapter"), ("torch_compile", "adapter"), ("peft", "adapter"), ("dynrank", "adapter"),
    ("torch_inplace", "adapter"), ("dynrank_triton", "lowrank"), ("dynrank_triton", "adapter"),
]


def _case_params():
    params = []
    for case in linear_cases(common.grid_mode()):
        marks = (pytest.mark.bench_target,) if case.target else ()
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


def linear_flops(case, form, pass_, trainable_weight):
    """Useful FLOPs of one call (bias and elementwise work left out)."""
    T, K, N, r = case.tokens, case.in_features, case.out_features, case.rank
    dense, factors = 2.0 * T * K * N, 2.0 * T * r * (K + N)
    if form == "full":
        fwd, bwd = dense, dense * (2 if trainable_weight else 1)
    elif form == "lowrank":
        fwd, bwd = factors, 2 * factors
    else:
        fwd, bwd = dense + factors, dense + 2 * factors
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}[pass_]


def _small_(t, std=0.02):
    # Nonzero factors everywhere, so no provider meets an all-zero operand.
    with torch.no_grad():
        t.normal_(0.0, std)
    return t


def _peft_lora_kwargs(rank):
    """Arguments of ``peft.tuners.lora.Linear``; newer peft (0.21 on the GPU machine) wants a ``LoraConfig``."""
    import inspect

    from peft.tuners import lora

    settings = dict(r=rank, lora_alpha=ADAPTER_ALPHA, lora_dropout=0.0)
    if "config" in inspect.signature(lora.Linear.__init__).parameters:
        return dict(r=rank, lora_alpha=ADAPTER_ALPHA, config=lora.LoraConfig(**settings))
    return settings


def _first_call_without_donated_buffers(compiled):
    """``compiled`` (a ``torch.compile`` function), compiled at its first call with AOTAutograd's donated
    buffers off: the "backward" pass replays one graph's backward (``retain_graph=True``), which a backward
    compiled with donated buffers refuses.  Later calls run the graph compiled then."""
    config = torch._functorch.config
    if not hasattr(config, "donated_buffer"):
        return compiled
    first = [True]

    def run(*args):
        if first[0]:
            with config.patch(donated_buffer=False):
                out = compiled(*args)
            first[0] = False
            return out
        return compiled(*args)
    return run


def make_linear(provider, form, case, device=common.DEVICE, timed=True):
    """Setup factory: (forward callable of x, trainable parameters) for one provider.

    Skips (with the reason) providers that cannot run here; ``timed=False`` (a correctness check)
    lets ``dynrank_triton`` run in Triton's interpreter off CUDA.
    """
    K, N, r, dtype = case.in_features, case.out_features, case.rank, case.dtype
    kw = dict(device=device, dtype=dtype)
    scale = ADAPTER_ALPHA / r if form == "adapter" else 1.0

    if provider in ("dense", "dense_frozen"):
        layer = nn.Linear(K, N, **kw)
        layer.requires_grad_(provider == "dense")
        return layer, [p for p in layer.parameters() if p.requires_grad]

    if provider in ("dynrank", "dynrank_triton"):
        from dynrank import FusedLowRankLinear

        layer = FusedLowRankLinear(K, N, r, bias=True, form=form,
                                   alpha=ADAPTER_ALPHA if form == "adapter" else None, **kw)
        if form == "adapter":
            _small_(layer.A)
            layer.bias.requires_grad_(False)  # frozen with W_f, as in LoRA fine-tuning
        params = [p for p in layer.parameters() if p.requires_grad]
        return (layer if provider == "dynrank" else common.triton_forced(layer, timed)), params

    if provider == "torch_inplace":
        # The adapter as a careful torch user writes it (common.inplace_adapter).
        down = _small_(torch.empty(r, K, **kw)).requires_grad_()
        up = _small_(torch.empty(N, r, **kw)).requires_grad_()
        bias = torch.zeros(N, **kw)
        weight = torch.randn(N, K, **kw) / math.sqrt(K)
        return (lambda x: common.inplace_adapter(x, weight, down, up, bias, scale)), [down, up]

    if provider in ("torch_unfused", "torch_compile"):
        # The usual LoRA layout: down (r, K), up (N, r), both as nn.Linear weights.
        down = _small_(torch.empty(r, K, **kw)).requires_grad_()
        up = _small_(torch.empty(N, r, **kw)).requires_grad_()
        bias = torch.zeros(N, **kw)
        if form == "adapter":
            weight = torch.randn(N, K, **kw) / math.sqrt(K)

            def unfused(x):
                return F.linear(x, weight, bias) + F.linear(F.linear(x, down), up) * scale
            params = [down, up]
        else:
            bias.requires_grad_()

            def unfused(x):
                return F.linear(F.linear(x, down), up, bias)
            params = [down, up, bias]
        if provider == "torch_unfused":
            return unfused, params
        if not common.compile_enabled():
            pytest.skip("compile time dominates on CPU (set DYNRANK_BENCH_COMPILE=1 to run it)")
        # A fresh cache per shape: dynamo's per-code-object recompile limit
        # would otherwise fall back to eager after a few shapes.
        torch._dynamo.reset()
        return _first_call_without_donated_buffers(torch.compile(unfused, dynamic=False)), params

    if provider == "peft":
        peft_lora = common.optional_module("peft.tuners.lora")
        if peft_lora is None:
            pytest.skip("peft is not installed (optional provider)")
        base = nn.Linear(K, N, **kw)
        base.requires_grad_(False)
        layer = peft_lora.Linear(base, "default", **_peft_lora_kwargs(r))
        layer.to(device=device, dtype=dtype)
        for name, p in layer.named_parameters():
            if "lora_" in name:
                _small_(p)
        return layer, [p for p in layer.parameters() if p.requires_grad]

    raise ValueError(f"unknown provider {provider!r}")


def _time_linear(benchmark, provider, form, pass_, case, timing, pytestconfig=None):
    """Build one provider's layer for ``case``, time ``pass_`` with ``timing`` and record it."""
    fwd_layer, params = make_linear(provider, form, case)
    x = torch.randn(case.tokens, case.in_features, device=common.DEVICE, dtype=case.dtype,
                    requires_grad=True)
    queued = timing == "queued"
    run = common.make_pass(pass_, lambda: fwd_layer(x), [x, *params], synchronize=not queued)
    common.describe(
        benchmark, suite="linear", provider=provider, form=form, pass_=pass_, dtype=case.dtype,
        group=f"linear {pass_}{' queued' if queued else ''} {case.id}", target=case.target,
        shape={"tokens": case.tokens, "in_features": case.in_features, "out_features": case.out_features},
        rank=case.rank, trainable_weight=provider == "dense" or (provider == "dynrank" and form == "full"),
        timing=timing,
    )
    common.time_pass(benchmark, run, timing, pytestconfig)
    flops = linear_flops(case, form, pass_, benchmark.extra_info["trainable_weight"])
    common.finish(benchmark, flops=flops, dtype=case.dtype)


@pytest.mark.parametrize("case", _case_params())
@pytest.mark.parametrize("pass_", common.PASSES)
@pytest.mark.parametrize("provider,form", PROVIDERS, ids=[f"{p}-{f}" for p, f in PROVIDERS])
def test_linear(benchmark, provider, form, pass_, case):
    """Each call timed to its synchronize: latency, the host's time up to the first launch included."""
    _time_linear(benchmark, provider, form, pass_, case, "call")


@pytest.mark.parametrize("case", _case_params())
@pytest.mark.parametrize("provider,form", PROVIDERS, ids=[f"{p}-{f}" for p, f in PROVIDERS])
def test_linear_queued(benchmark, pytestconfig, provider, form, case):
    """Forward+backward queued as a training loop runs it (one synchronize per round): throughput."""
    _time_linear(benchmark, provider, form, "fwd+bwd", case, "queued", pytestconfig)


@pytest.mark.parametrize("provider,form", PROVIDERS, ids=[f"{p}-{f}" for p, f in PROVIDERS])
def test_each_provider_computes_its_form(provider, form):
    """Not a benchmark: every provider does the work its row claims, so no ratio compares unequal work.

    The layer's effective weight is read back by probing it with the unit vectors (it is affine in
    x) and checked in float64: full rank for ``full``; rank r for ``lowrank``; for ``adapter``, a
    frozen base plus a nonzero rank-r term (the base is what is left with the trainable factors
    zeroed).  Every parameter a provider lists as trainable gets a nonzero gradient (the frozen
    dense layer lists none).
    """
    case = LinearCase(6, 24, 20, 4, torch.float32)
    layer, params = make_linear(provider, form, case, timed=False)
    probe = torch.cat([torch.zeros(1, case.in_features), torch.eye(case.in_features)]).to(common.DEVICE)

    def effective_weight():
        with torch.no_grad():
            out = layer(probe).double().cpu()
        return (out[1:] - out[:1]).T          # (N, K)

    rank = lambda w: int(torch.linalg.matrix_rank(w, rtol=1e-4))     # noqa: E731
    weight = effective_weight()
    if form == "full":
        assert rank(weight) == min(case.in_features, case.out_features)
    elif form == "lowrank":
        assert rank(weight) == case.rank
    else:
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.zero_()
        base = effective_weight()
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
        assert rank(base) == min(case.in_features, case.out_features)
        assert rank(weight - base) == case.rank
    if provider == "dense_frozen":                 # the adapter's floor: nothing trains
        assert params == [] and not any(p.requires_grad for p in layer.parameters())
        return
    x = torch.randn(case.tokens, case.in_features, device=common.DEVICE)
    layer(x).square().sum().backward()
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

