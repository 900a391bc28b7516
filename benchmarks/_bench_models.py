"""Models of the epoch-speed suite.

- :func:`resnet20`: ``dynrank.train.models.resnet20`` when that package has
  it, else :class:`CifarResNet20` below (same layout: 16/32/64 channels, 3×3
  convs, 1×1-conv + BN projection shortcuts named ``shortcut`` on the first
  block of every stage, so ``convert_model`` keeps them dense).
- :class:`TransformerLM`: a GPT-2-shaped pre-LN decoder whose four linears per
  block (qkv, attention out, MLP in, MLP out) come from a factory, so every
  form of :class:`dynrank.FusedLowRankLinear` can be dropped in directly.
  The LM head stays a dense ``nn.Linear`` (the classifier is never factorized).
"""

import torch
from torch import nn
from torch.nn import functional as F

import _bench_common as common

__all__ = ["resnet20", "CifarResNet20", "TransformerLM", "linear_factory", "rank_for"]


class _Block(nn.Module):
    def __init__(self, in_channels, out_channels, stride, projection):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = None
        if projection:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet20(nn.Module):
    """ResNet20 for 32×32 inputs: (N, 3, 32, 32) → (N, num_classes)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_channels = [], 16
        for index, channels in enumerate((16, 32, 64)):
            blocks = []
            for b in range(3):
                stride = 2 if index > 0 and b == 0 else 1
                blocks.append(_Block(in_channels, channels, stride, projection=b == 0))
                in_channels = channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(num_classes=10):
    """(model, source): the library's ResNet20 when present, else the one above."""
    models = common.optional_module("dynrank.train.models")
    if models is not None and hasattr(models, "resnet20"):
        return models.resnet20(num_classes=num_classes), "dynrank.train.models.resnet20"
    return CifarResNet20(num_classes), "benchmarks._bench_models.CifarResNet20"


def rank_for(in_features, out_features, rank_ratio):
    """Rank of a factorized linear at ρ: ρ × the smaller side.

    The smaller side keeps every rank below full rank (ρ × out_features would
    reach full rank on the 768→3072 MLP at ρ = 0.25).
    """
    return max(1, int(rank_ratio * min(in_features, out_features)))


def linear_factory(form, rank_ratio):
    """Callable (in, out) → FusedLowRankLinear in ``form`` at ρ (ρ unused for full)."""
    from dynrank import FusedLowRankLinear

    def make(in_features, out_features):
        rank = rank_for(in_features, out_features, rank_ratio or 0.5)
        return FusedLowRankLinear(in_features, out_features, rank, bias=True, form=form)
    return make


class _Attention(nn.Module):
    def __init__(self, dim, heads, make_linear):
        super().__init__()
        self.heads = heads
        self.qkv = make_linear(dim, 3 * dim)
        self.out = make_linear(dim, dim)

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


class _TransformerBlock(nn.Module):
    def __init__(self, dim, heads, make_linear):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, make_linear)
        self.ln2 = nn.LayerNorm(dim)
        self.fc_in = make_linear(dim, 4 * dim)
        self.fc_out = make_linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc_out(F.gelu(self.fc_in(self.ln2(x)), approximate="tanh"))


class TransformerLM(nn.Module):
    """GPT-2-shaped causal LM: (N, T) int64 tokens → (N, T, vocab) logits.

    GPT-2 small is ``vocab=50257, context=1024, dim=768, depth=12, heads=12``.
    """

    def __init__(self, make_linear, vocab=50257, context=1024, dim=768, depth=12, heads=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.Sequential(*[_TransformerBlock(dim, heads, make_linear) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.ln(self.blocks(x)))
