"""Models of the epoch-speed suite.

- :func:`resnet20`: ``dynrank.train.models.resnet20`` (16/32/64 channels, 3×3
  convs, 1×1-conv + BN projection shortcuts on the first block of every stage,
  which ``convert_model`` keeps dense).
- :func:`resnet20_step`: one ResNet20 training step in a form, as
  ``dynrank-train`` takes it; the epoch suite and ``cpu_steps.py`` time it.
- :class:`TransformerLM`: a GPT-2-shaped pre-LN decoder whose four linears per
  block (qkv, attention out, MLP in, MLP out) come from a factory, so every
  form of :class:`dynrank.FusedLowRankLinear` can be dropped in directly.
  The LM head is a dense ``nn.Linear`` (the classifier is never factorized)
  unless ``make_head`` gives it another form too: the epoch suite's
  ``+head`` case, the transformer's rate once its largest GEMM shrinks as well.
"""

import torch
from torch import nn
from torch.nn import functional as F


__all__ = ["resnet20", "resnet20_step", "TransformerLM", "linear_factory"]


def resnet20(num_classes=10):
    """(model, source): the library's CIFAR ResNet20 (1×1-conv + BN shortcuts, as the authors')."""
    from dynrank.train.models import resnet20 as build
    return build(num_classes=num_classes), "dynrank.train.models.resnet20"


def resnet20_step(form="full", decomposition="svd", rank_ratio=0.5, batch=128, image_size=32, num_classes=10,
                  device="cpu", channels_last=True, amp=False, cuda_graphs=False, seed=0):
    """(step, model): ``step(lr)`` takes one ResNet20 training step on a fixed random batch, returns its loss.

    The step is ``dynrank.train.steps.TrainStep`` (forward, cross-entropy with label smoothing 0.1,
    backward, SGD with momentum 0.9 and weight decay 1e-4 on the ≥ 2-D parameters only, the optimizer
    ``dynrank.train.loop.build_optimizer`` builds), the one ``dynrank-train`` takes: low-rank
    forms through ``convert_model`` at ``rank_ratio`` (``init="fresh"``), ``amp`` bf16 autocast as
    under ``--amp`` (the same factory), ``channels_last`` the layout it gives conv nets, ``cuda_graphs``
    one replayed graph per step.  The model, batch and labels depend on ``seed`` only, so two calls
    that differ in layout or precision take the same step up to rounding.  The returned loss is the
    step's device tensor (a graph's output buffer, valid until the next call).
    """
    from dynrank.convert import convert_model
    from dynrank.train.loop import _autocast_factory, build_optimizer
    from dynrank.train.steps import TrainStep

    device = torch.device(device)
    torch.manual_seed(seed)
    model, _ = resnet20(num_classes)
    if form != "full":
        convert_model(model, rank_ratio=rank_ratio, decomposition=decomposition, form=form, init="fresh")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=layout)
    optimizer = build_optimizer(model, {"optimizer": "sgd", "lr": 0.1, "weight_decay": 1e-4})
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed + 1))
    images = images.to(device).contiguous(memory_format=layout)
    labels = torch.randint(num_classes, (batch,), generator=torch.Generator().manual_seed(seed + 2)).to(device)
    train_step = TrainStep(model, optimizer, model, _autocast_factory({"amp": amp}, device), 0.1,
                           cuda_graphs=cuda_graphs)

    def step(lr=0.1):
        return train_step(images, labels, lr)[0]
    return step, model


def linear_factory(form, rank_ratio):
    """Callable (in, out) → FusedLowRankLinear in ``form`` at ρ (ρ unused for full)."""
    from dynrank import FusedLowRankLinear
    from dynrank.linear import rank_from_ratio

    def make(in_features, out_features, bias=True):
        rank = rank_from_ratio(rank_ratio or 0.5, in_features, out_features)
        return FusedLowRankLinear(in_features, out_features, rank, bias=bias, form=form)
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
    ``make_head(dim, vocab, bias=False)`` builds the LM head (default: ``nn.Linear``).
    """

    def __init__(self, make_linear, vocab=50257, context=1024, dim=768, depth=12, heads=12, make_head=nn.Linear):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.Sequential(*[_TransformerBlock(dim, heads, make_linear) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = make_head(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.ln(self.blocks(x)))
