"""Models of the paper's experiments, written in plain torch.

- :class:`CifarResNet` / :func:`resnet20`: the CIFAR ResNet with 3×3 convs,
  16/32/64 channels and 1×1-conv + BN projection shortcuts on the first block
  of every stage (the variant whose counts match the paper: 272,762 trainable
  parameters dense, 155,170 after SVD factorization at ρ = 0.5).
- :class:`WideResNet` / :func:`wrn28_10`: pre-activation WRN-28-10 with dropout.
- :class:`ResNet50`: bottleneck ResNet-50 with a 3×3 stride-1 stem and no max
  pool, for 64×64 inputs (Tiny ImageNet).
- :class:`GPT`: a small byte-level causal transformer LM.

Every model names its layers so :data:`EXCLUDE` can list what the authors leave
dense (shortcuts, the classifier, and for WRN the stem conv).  ``width``
scales channel counts, for quick tests only.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from .._args import check_int, check_real

__all__ = ["CifarResNet", "resnet20", "WideResNet", "wrn28_10", "ResNet50", "GPT", "build_model",
           "MODELS", "EXCLUDE", "DROPOUT", "model_dropout", "count_parameters", "narrowest_strided_pointwise"]

MODELS = ("resnet20", "wrn28-10", "resnet50", "gpt")


def _check_positive(value, what, expected):
    """Refuse a ``value`` that is not a finite real number > 0: a TypeError (not a real number) or
    ValueError, each ``f"{what} must be {expected}, got ..."``."""
    check_real(value, what, expected)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be {expected}, got {value!r}")


def _scaled(channels, width):
    """``channels`` times the multiplier ``width``, rounded, at least 1.

    Raises:
        TypeError, ValueError: ``width`` is not a finite number > 0.
    """
    _check_positive(width, "width", "a finite number > 0 (a channel multiplier)")
    return max(1, round(channels * width))


def count_parameters(model, trainable_only=True):
    """Number of (trainable) parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _init_conv_bn(model):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# -- ResNet20 (CIFAR) -------------------------------------------------------------
class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, plus identity or 1×1-conv + BN shortcut, then ReLU."""

    def __init__(self, in_channels, out_channels, stride=1, projection=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = None
        if projection or stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs.

    The first block of every stage has a 1×1-conv + BN projection shortcut, the
    first stage's included (16→16, stride 1): the layout whose parameter count
    is the paper's 272,762 for ResNet20.  Convs have no bias (BN follows).

    Args:
        depth: 6n + 2 (20 for ResNet20).
        num_classes: classifier outputs.
        width: channel multiplier (1.0 → 16/32/64), a finite number > 0; channels round to at least 1.

    Shape:
        (N, 3, H, W) → (N, num_classes).

    Raises:
        ValueError: a depth that is not 6n + 2, a width that is not finite or not > 0.
        TypeError: a depth that is not an int, a width that is not a real number.
    """

    def __init__(self, depth=20, num_classes=10, width=1.0):
        super().__init__()
        check_int(num_classes, "num_classes", "a positive int", 1)
        depth = check_int(depth, "depth", "an int 6n + 2 with n ≥ 1", 8)
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n ≥ 1, got {depth}")
        blocks = (depth - 2) // 6
        widths = [_scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_channels = [], widths[0]
        for index, channels in enumerate(widths):
            layers = []
            for b in range(blocks):
                stride = 2 if (index > 0 and b == 0) else 1
                layers.append(BasicBlock(in_channels, channels, stride, projection=b == 0))
                in_channels = channels
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(in_channels, num_classes)
        _init_conv_bn(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(num_classes=10, width=1.0):
    """ResNet20 for CIFAR (see :class:`CifarResNet`)."""
    return CifarResNet(20, num_classes, width)


# -- WRN-28-10 --------------------------------------------------------------------
class WideBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3×3-BN-ReLU-dropout-conv3×3 (+ shortcut)."""

    def __init__(self, in_channels, out_channels, stride, dropout):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        # The projection reads the pre-activated input, as in the WRN paper.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-k for 32×32 inputs (pre-activation, dropout between the convs).

    Args:
        depth: 6n + 4 (28 → 4 blocks per stage).
        widen: k (10 → 160/320/640 channels), a finite number > 0; channels round to at least 1.
        num_classes, dropout: as named.  width: extra channel multiplier for tests.

    Raises:
        ValueError: a depth that is not 6n + 4, a widen or width that is not finite or not > 0.
        TypeError: a depth that is not an int, a widen or width that is not a real number.
    """

    def __init__(self, depth=28, widen=10, num_classes=100, dropout=0.3, width=1.0):
        super().__init__()
        check_int(num_classes, "num_classes", "a positive int", 1)
        depth = check_int(depth, "depth", "an int 6n + 4 with n ≥ 1", 10)
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n ≥ 1, got {depth}")
        _check_positive(widen, "widen", "a finite number > 0 (k, the widening factor)")
        blocks = (depth - 4) // 6
        stem = _scaled(16, width)
        widths = [_scaled(16 * widen, width), _scaled(32 * widen, width), _scaled(64 * widen, width)]
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        stages, in_channels = [], stem
        for index, channels in enumerate(widths):
            layers = []
            for b in range(blocks):
                stride = 2 if (index > 0 and b == 0) else 1
                layers.append(WideBlock(in_channels, channels, stride, dropout))
                in_channels = channels
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_channels)
        self.fc = nn.Linear(in_channels, num_classes)
        _init_conv_bn(self)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def wrn28_10(num_classes=100, dropout=0.3, width=1.0):
    """WRN-28-10 (see :class:`WideResNet`)."""
    return WideResNet(28, 10, num_classes, dropout, width)


# -- ResNet-50 for 64×64 ----------------------------------------------------------
class Bottleneck(nn.Module):
    """1×1 reduce - 3×3 (stride) - 1×1 expand (×4), BN after each; projection shortcut."""

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        out_channels = channels * 4
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet50(nn.Module):
    """Bottleneck ResNet-50 (3, 4, 6, 3 blocks) for small images.

    The ImageNet stem (7×7 stride 2 + max pool) would shrink 64×64 inputs to
    16×16 before the first stage; a 3×3 stride-1 stem keeps the resolution, so
    the last stage works on 8×8 maps.

    Args:
        num_classes: classifier outputs (200 for Tiny ImageNet).
        width: channel multiplier (1.0 → 64/128/256/512 bottleneck channels).
    """

    def __init__(self, num_classes=200, width=1.0):
        super().__init__()
        check_int(num_classes, "num_classes", "a positive int", 1)
        stem = _scaled(64, width)
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        stages, in_channels = [], stem
        for index, (blocks, channels) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
            channels = _scaled(channels, width)
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(in_channels, channels, 2 if (index > 0 and b == 0) else 1))
                in_channels = channels * 4
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_channels, num_classes)
        _init_conv_bn(self)
        for m in self.modules():
            # Zero the last BN of each residual branch: blocks start as identities.
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- GPT ------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Multi-head causal attention; ``dropout`` on the attention weights and on the output
    projection (the residual dropout of GPT-2's attention branch)."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, length, dim)))


class MLP(nn.Module):
    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class TransformerBlock(nn.Module):
    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Byte-level causal transformer LM (pre-LN, learned positions, untied head).

    Args:
        vocab_size: 256 for bytes.
        context: maximum sequence length.
        dim, depth, heads: width, number of blocks, attention heads (dim % heads == 0).
        dropout: dropout on the attention weights and on both residual branches of every block
            (the attention and MLP outputs, before they are added), as in GPT-2; none at 0.

    Shape:
        (N, T) int64 tokens, T ≤ context → (N, T, vocab_size) logits.

    Raises:
        ValueError: a size below 1, or dim not divisible by heads.
        TypeError: a size that is not an int.

    Example:
        >>> GPT(context=16, dim=32, depth=1, heads=2)(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 256])
    """

    def __init__(self, vocab_size=256, context=128, dim=128, depth=2, heads=4, dropout=0.0):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("context", context), ("dim", dim), ("depth", depth),
                            ("heads", heads)):
            check_int(value, name, "a positive int", 1)
        if dim % heads != 0:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.context = context
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, dropout) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                # GPT-2 style: small init, residual projections scaled by depth.
                std = 0.02 / math.sqrt(2 * depth) if name.endswith(".proj") else 0.02
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)

    def forward(self, tokens):
        if tokens.dim() != 2 or tokens.shape[1] > self.context:
            raise ValueError(f"tokens must have shape (N, T) with T ≤ {self.context}, got {tuple(tokens.shape)}")
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.ln(self.blocks(x)))


# Module-name patterns (fnmatch) the authors leave dense, per model.
EXCLUDE = {
    "resnet20": ["*shortcut*", "fc"],
    "wrn28-10": ["*shortcut*", "conv1", "fc"],
    "resnet50": ["*shortcut*", "fc"],
    "gpt": ["head"],
}


# The dropout each model trains with when none is given; None: the model has no dropout.
DROPOUT = {"resnet20": None, "wrn28-10": 0.3, "resnet50": None, "gpt": 0.0}


def model_dropout(name, dropout=None):
    """The dropout probability ``build_model(name, dropout=dropout)`` trains with: ``dropout``, or the
    model's default (:data:`DROPOUT`) where it is None; None for a model without dropout, whatever
    ``dropout`` is.

    Raises:
        ValueError: unknown name.

    Example:
        >>> model_dropout("wrn28-10"), model_dropout("gpt", 0.1), model_dropout("resnet20", 0.3)
        (0.3, 0.1, None)
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    if DROPOUT[name] is None:
        return None
    return DROPOUT[name] if dropout is None else dropout


def build_model(name, num_classes=10, width=1.0, dropout=None, context=128, dim=128, depth=2, heads=4):
    """Build a model by CLI name.

    Args:
        name: one of :data:`MODELS`.
        num_classes: classifier outputs (vision models).
        width: channel multiplier (vision models; for tests).
        dropout: WRN dropout (default 0.3) or GPT dropout (default 0.0); the other models have
            none (see :func:`model_dropout`).
        context, dim, depth, heads: GPT size.

    Raises:
        ValueError: unknown name, or a size the model refuses (see the model classes).
    """
    dropout = model_dropout(name, dropout)
    if name == "resnet20":
        return resnet20(num_classes, width)
    if name == "wrn28-10":
        return wrn28_10(num_classes, dropout, width)
    if name == "resnet50":
        return ResNet50(num_classes, width)
    return GPT(256, context, dim, depth, heads, dropout)


def narrowest_strided_pointwise(model):
    """The fewest input channels of any 1×1 conv with stride > 1 in ``model`` (a projection
    shortcut), or None where it has none: what decides whether it can train channels-last on a CPU
    (see ``dynrank.train.loop.CPU_CHANNELS_LAST_MIN_CHANNELS``)."""
    widths = [m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)
              and m.kernel_size == (1, 1) and max(m.stride) > 1]
    return min(widths) if widths else None
