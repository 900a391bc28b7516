"""Conv layer throughput: LowRankConv2d per decomposition and form against nn.Conv2d.

One group per (pass, layer shape) holds every provider:

- ``dense`` / ``dense_frozen``: ``nn.Conv2d`` with a trainable / frozen kernel;
- ``dynrank`` form ``full``: ``LowRankConv2d`` in full form (one dense conv,
  whatever the decomposition, so it runs once, as SVD);
- ``dynrank`` forms ``<decomposition>/lowrank`` and ``<decomposition>/adapter``
  for SVD, Tucker, CP and TKD-CPD at ρ = 0.5 (rank = ρ × out_channels).

Shapes are the 3×3 convs of ResNet20 on CIFAR (batch 128 on CUDA, 8 on CPU)
and of ResNet50 at 64×64 (stride-1 stem, no max pool: stages at 64/32/16/8)
and at 224×224 (stages at 56/28/14/7); ResNet50 runs on CUDA only.  On CUDA
activations and kernels are channels-last in bf16, the layout cuDNN's tensor
core kernels want.  TFLOP/s is each provider's own work, counted by torch's
FlopCounterMode on the executed convolutions.  A test that is not a benchmark
checks that every provider computes the conv its row claims (against float64).
"""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import _bench_common as common

DECOMPOSITIONS = ("svd", "tucker", "cp", "tkd-cpd")
RANK_RATIO = 0.5


@dataclass(frozen=True)
class ConvCase:
    net: str
    batch: int
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    size: int  # input height = width
    dtype: torch.dtype

    @property
    def id(self):
        s = f"-s{self.stride}" if self.stride != 1 else ""
        return (f"{self.net}-B{self.batch}-C{self.in_channels}-F{self.out_channels}-k{self.kernel_size}{s}-"
                f"{self.size}px-{common.dtype_name(self.dtype)}")


def conv_cases(grid):
    """Layer shapes of one grid; ResNet50 appears on CPU as a visible CUDA-only skip."""
    if grid == "cpu":
        f32 = torch.float32
        cases = [ConvCase("resnet20", 8, 16, 16, 3, 1, 32, f32), ConvCase("resnet20", 8, 64, 64, 3, 1, 8, f32)]
        params = [pytest.param(c, id=c.id) for c in cases]
        params.append(common.cuda_only_param(None, "resnet50", "ResNet50 layer shapes run on CUDA only"))
        return params
    bf16 = torch.bfloat16

    def r20(c, f, s, size):
        return ConvCase("resnet20", 128, c, f, 3, s, size, bf16)

    def r50(px, c, size):
        return ConvCase(f"resnet50@{px}", 128 if px == 64 else 64, c, c, 3, 1, size, bf16)

    if grid == "targets":
        cases = [r20(16, 16, 1, 32), r20(32, 64, 2, 16), r20(64, 64, 1, 8),
                 r50(224, 64, 56), r50(224, 256, 14), r50(64, 64, 64), r50(64, 256, 16)]
    else:
        cases = [r20(3, 16, 1, 32), r20(16, 16, 1, 32), r20(16, 32, 2, 32), r20(32, 32, 1, 16),
                 r20(32, 64, 2, 16), r20(64, 64, 1, 8)]
        cases += [r50(224, c, s) for c, s in ((64, 56), (128, 28), (256, 14), (512, 7))]
        cases += [r50(64, c, s) for c, s in ((64, 64), (128, 32), (256, 16), (512, 8))]
    return [pytest.param(c, id=c.id) for c in cases]


PROVIDERS = [("dense", "full"), ("dense_frozen", "full"), ("dynrank", "full")]
PROVIDERS += [("dynrank", f"{d}/{form}") for d in DECOMPOSITIONS for form in ("lowrank", "adapter")]


def make_conv(provider, form, case, device=common.DEVICE):
    """Setup factory: (module, trainable parameters) for one provider."""
    padding = case.kernel_size // 2
    if provider in ("dense", "dense_frozen"):
        layer = nn.Conv2d(case.in_channels, case.out_channels, case.kernel_size, case.stride, padding, bias=False)
        layer.requires_grad_(provider == "dense")
    elif provider == "dynrank":
        LowRankConv2d = common.require_module("dynrank.conv", "LowRankConv2d is being written", "LowRankConv2d")
        decomposition, layer_form = ("svd", "full") if form == "full" else form.split("/")
        layer = LowRankConv2d(case.in_channels, case.out_channels, case.kernel_size, decomposition=decomposition,
                                   stride=case.stride, padding=padding, bias=False, form=layer_form,
                                   rank_ratio=RANK_RATIO)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    layer = layer.to(device=device, dtype=case.dtype)
    if device.type == "cuda":
        layer = layer.to(memory_format=torch.channels_last)
    return layer, [p for p in layer.parameters() if p.requires_grad]


@pytest.mark.parametrize("case", conv_cases(common.grid_mode()))
@pytest.mark.parametrize("pass_", common.PASSES)
@pytest.mark.parametrize("provider,form", PROVIDERS, ids=[f"{p}-{f.replace('/', '-')}" for p, f in PROVIDERS])
def test_conv(benchmark, provider, form, pass_, case):
    layer, params = make_conv(provider, form, case)
    x = torch.randn(case.batch, case.in_channels, case.size, case.size, device=common.DEVICE, dtype=case.dtype)
    if common.ON_CUDA:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    run = common.make_pass(pass_, lambda: layer(x), [x, *params])
    common.describe(
        benchmark, suite="conv", provider=provider, form=form, pass_=pass_, dtype=case.dtype,
        group=f"conv {pass_} {case.id}", net=case.net,
        shape={"batch": case.batch, "in_channels": case.in_channels, "out_channels": case.out_channels,
               "kernel_size": case.kernel_size, "stride": case.stride, "size": case.size},
        rank=getattr(layer, "rank", None) if provider == "dynrank" else None, rank_ratio=RANK_RATIO,
    )
    common.warm_up(benchmark, run)
    benchmark(run)
    flops = common.flops_of(run) if benchmark.enabled else None
    common.finish(benchmark, flops=flops, dtype=case.dtype)


@pytest.mark.parametrize("provider,form", PROVIDERS, ids=[f"{p}-{f.replace('/', '-')}" for p, f in PROVIDERS])
def test_each_provider_computes_its_conv(provider, form):
    """Not a benchmark: every provider is the conv its row claims (the case's stride and padding, its
    form's kernel), against ``conv2d`` in float64 with the kernel rebuilt by the kernels' reference
    merges, and trains exactly the parameters of its form."""
    from dynrank.kernels.conv_merge import reference_kernel

    case = ConvCase("check", 2, 8, 12, 3, 2, 7, torch.float32)
    torch.manual_seed(0)
    layer, params = make_conv(provider, form, case)
    if provider == "dynrank" and form != "full":
        with torch.no_grad():
            for factor in layer.factors().values():
                factor.normal_(0.0, 0.3)       # the adapter's zeroed factor too: a term the check sees
        kernel = reference_kernel(layer.decomposition, layer.factors(), layer.scale)
        if layer.form == "adapter":
            kernel = kernel + layer.weight.double()
        expected_params = list(layer.factors().values())
    else:
        kernel = layer.weight.double()
        expected_params = [] if provider == "dense_frozen" else [layer.weight]
    assert [id(p) for p in params] == [id(p) for p in expected_params]
    x = torch.randn(case.batch, case.in_channels, case.size, case.size, device=common.DEVICE)
    expected = nn.functional.conv2d(x.double().cpu(), kernel.detach().cpu(), stride=case.stride,
                                    padding=case.kernel_size // 2)
    # cuDNN's fp32 convs may use TF32 on CUDA (about 1e-4): the check wants full fp32.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out = layer(x).double().cpu()
    assert out.shape == expected.shape
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5
