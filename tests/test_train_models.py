"""Models of dynrank-train: parameter counts against the paper, forwards against functional references,
initializations, one training step each."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _helpers import REL_TOL, rel_err
from dynrank import FusedLowRankLinear
from dynrank.convert import convert_model
from dynrank.train.models import (
    EXCLUDE,
    GPT,
    MODELS,
    Bottleneck,
    CausalSelfAttention,
    CifarResNet,
    ResNet50,
    WideResNet,
    build_model,
    count_parameters,
    model_dropout,
    resnet20,
)



# Paper §5.2: "ResNet20 contains 272,762 trainable parameters and the reparameterized
# model with SVD (ρ = 0.5) has 155,170 parameters."
PAPER_RESNET20_DENSE = 272_762
PAPER_RESNET20_SVD = 155_170


def _hand_count_resnet20(rank_ratio=None):
    """ResNet20 trainable parameters counted by hand from the layer list (independent of the modules).

    3×3 convs without bias; BN (γ, β) after every conv; 1×1-conv + BN projection shortcuts in the
    first block of each stage; 64→10 classifier.  With ``rank_ratio`` each 3×3 conv C→F becomes
    a 3×3 conv C→k plus a 1×1 conv k→F, k = int(ρ·F) (the authors' SVD conv).
    """
    convs = [(3, 16)] + [(16, 16)] * 6 + [(16, 32)] + [(32, 32)] * 5 + [(32, 64)] + [(64, 64)] * 5
    shortcuts = [(16, 16), (16, 32), (32, 64)]
    total = 0
    for c, f in convs:
        if rank_ratio is None:
            total += c * f * 9
        else:
            k = int(rank_ratio * f)
            total += c * k * 9 + k * f
        total += 2 * f                               # BN after the conv
    total += sum(c * f + 2 * f for c, f in shortcuts)
    return total + 64 * 10 + 10


def test_resnet20_dense_count_is_the_papers():
    assert _hand_count_resnet20() == PAPER_RESNET20_DENSE
    assert count_parameters(resnet20()) == PAPER_RESNET20_DENSE


def test_resnet20_svd_half_rank_count_is_the_papers():
    model = resnet20()
    summary = convert_model(model, rank_ratio=0.5, decomposition="svd", exclude=EXCLUDE["resnet20"])
    assert _hand_count_resnet20(0.5) == PAPER_RESNET20_SVD
    assert summary.params_before == PAPER_RESNET20_DENSE
    assert count_parameters(model) == PAPER_RESNET20_SVD
    # The authors' exclusions: every 3×3 conv (the first included) factorized; shortcuts and fc dense.
    assert len(summary.converted) == 19 and "conv1" in summary.converted
    assert {name for name, _ in summary.skipped} == {"layer1.0.shortcut.0", "layer2.0.shortcut.0",
                                                     "layer3.0.shortcut.0", "fc"}


def test_wrn28_10_structure_and_exclusions():
    model = build_model("wrn28-10", num_classes=100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 24 + 3                  # stem, 12 blocks × 2, three 1×1 shortcuts
    # 36.5 M parameters, the figure usually quoted for WRN-28-10.
    assert 36_400_000 < count_parameters(model) < 36_600_000
    small = build_model("wrn28-10", num_classes=100, width=0.1)
    summary = convert_model(small, rank_ratio=0.5, exclude=EXCLUDE["wrn28-10"])
    skipped = {name for name, _ in summary.skipped}
    assert {"conv1", "fc", "layer1.0.shortcut", "layer2.0.shortcut", "layer3.0.shortcut"} <= skipped
    assert len(summary.converted) == 24


def test_resnet50_count():
    model = build_model("resnet50", num_classes=200)
    # torchvision's ResNet-50 has 25,557,032 with a 1000-way fc and a 7×7 stem; here a 200-way fc
    # (2048·800 fewer weights + 800 biases) and a 3×3 stem (64·3·40 fewer) are used.
    assert count_parameters(model) == 25_557_032 - 2048 * 800 - 800 - 64 * 3 * 40


def _step(model, inputs, targets, steps=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert sum(changed) == len(changed)             # gradients reach every parameter
    return logits


@pytest.mark.parametrize("name,width,size,classes,schedule", [
    ("resnet20", 0.5, 32, 10, "full"), ("resnet20", 0.5, 32, 10, "lowrank"),
    ("wrn28-10", 0.05, 32, 100, "lowrank"), ("resnet50", 0.0625, 64, 200, "lowrank")])
def test_vision_models_step(name, width, size, classes, schedule):
    torch.manual_seed(0)
    model = build_model(name, num_classes=classes, width=width)
    if schedule == "lowrank":
        summary = convert_model(model, rank_ratio=0.5, exclude=EXCLUDE[name])
        assert summary.converted
    x = torch.randn(2, 3, size, size)
    # ResNet-50 zero-initializes each block's last BN scale: its branch trains from the second step on.
    logits = _step(model.train(), x, torch.tensor([1, classes - 1]), steps=2 if name == "resnet50" else 1)
    assert tuple(logits.shape) == (2, classes)


@pytest.mark.parametrize("schedule", ["full", "lowrank"])
def test_gpt_step_and_causality(schedule):
    torch.manual_seed(0)
    model = GPT(context=12, dim=32, depth=2, heads=4)
    if schedule == "lowrank":
        summary = convert_model(model, rank_ratio=0.5, exclude=EXCLUDE["gpt"])
        assert "head" not in summary.converted
        layers = [m for m in model.modules() if isinstance(m, FusedLowRankLinear)]
        assert len(layers) == 8
        # ρ is relative to the weight's own rank min(in, out): the expanding qkv (32→96) and
        # MLP (32→128) layers get rank 16 like the others, not int(ρ·out) ≥ 32 (full rank).
        assert {m.rank for m in layers} == {16}
    tokens = torch.randint(0, 256, (3, 12))
    logits = _step(model, tokens[:, :-1], tokens[:, 1:])
    assert tuple(logits.shape) == (3, 11, 256)
    model.eval()
    with torch.no_grad():
        changed = tokens.clone()
        changed[:, 8] = (changed[:, 8] + 1) % 256
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5)    # no position sees the future
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dropout", [None, 0.0, 0.1])
def test_model_dropout_is_the_dropout_build_model_trains_with(name, dropout):
    with torch.device("meta"):
        model = build_model(name, width=0.25, dropout=dropout, context=8, dim=16, depth=1, heads=2)
    used = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    used |= {m.dropout for m in model.modules() if isinstance(m, CausalSelfAttention)}
    assert used == ({model_dropout(name, dropout)} - {None})
    assert (model_dropout(name, dropout) is None) == (name in ("resnet20", "resnet50"))
    assert model_dropout(name) == {"resnet20": None, "wrn28-10": 0.3, "resnet50": None, "gpt": 0.0}[name]
    with pytest.raises(ValueError, match="model must be one of"):
        model_dropout("vgg16")


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(depth=21)
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="divisible by heads"):
        GPT(dim=30, heads=4)
    with pytest.raises(ValueError, match="T ≤ 8"):
        GPT(context=8, dim=16, depth=1, heads=2)(torch.zeros(1, 9, dtype=torch.long))


def test_gpt_dropout_drops_both_residual_branches():
    """The attention branch's output projection was added to the residual without dropout, while
    the MLP branch's was dropped (GPT-2 drops both)."""
    torch.manual_seed(0)
    model = GPT(context=8, dim=16, depth=1, heads=2, dropout=0.5).train()
    attn = model.blocks[0].attn
    x = torch.randn(2, 8, 16)
    projected = {}
    attn.proj.register_forward_hook(lambda module, args, out: projected.__setitem__("out", out))
    out = attn(x)
    kept = out != 0
    # Inverted dropout: each output element is 0 or the projection's over (1 - p).
    torch.testing.assert_close(out, torch.where(kept, projected["out"] / 0.5, 0.0), rtol=0, atol=0)
    assert 0 < int(kept.sum()) < kept.numel()

    # In eval mode, and at dropout 0 (the default) in train mode, nothing is dropped and no random
    # number is drawn: the model computes what the dropout-free model computes.
    plain = GPT(context=8, dim=16, depth=1, heads=2)
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), plain.eval()(tokens), rtol=0, atol=0)
        rng = torch.get_rng_state()
        torch.testing.assert_close(plain.train()(tokens), plain.eval()(tokens), rtol=0, atol=0)
    assert torch.equal(rng, torch.get_rng_state())


def test_gpt_default_size_is_unchanged_by_dropout():
    # dynrank-train's GPT (context 64) has 470,784 parameters, the README's 471k; dropout adds none.
    counts = {count_parameters(build_model("gpt", context=64, dropout=p)) for p in (0.0, 0.1)}
    assert counts == {470_784}


@pytest.mark.parametrize("build,error,message", [
    # A bare ZeroDivisionError; a model that built and failed only at forward; a silent 1-channel net;
    # "cannot convert float NaN to integer".
    (lambda: GPT(dim=16, heads=0), ValueError, r"^heads must be a positive int, got 0$"),
    (lambda: GPT(dim=16, heads=-2), ValueError, r"^heads must be a positive int, got -2$"),
    (lambda: GPT(dim=0, heads=1), ValueError, r"^dim must be a positive int, got 0$"),
    (lambda: GPT(context=0), ValueError, r"^context must be a positive int, got 0$"),
    (lambda: GPT(depth=-1), ValueError, r"^depth must be a positive int, got -1$"),
    (lambda: GPT(heads=2.0), TypeError, r"^heads must be a positive int, got float \(2\.0\)$"),
    (lambda: resnet20(width=-1), ValueError, r"^width must be a finite number > 0 \(a channel multiplier\), got -1$"),
    (lambda: resnet20(width=0), ValueError, r"^width must be a finite number > 0 .*, got 0$"),
    (lambda: resnet20(width=float("nan")), ValueError, r"^width must be a finite number > 0 .*, got nan$"),
    (lambda: build_model("wrn28-10", width=float("inf")), ValueError, r"^width must be .*, got inf$"),
    (lambda: build_model("resnet50", width="0.5"), TypeError, r"^width must be .*, got str \('0\.5'\)$"),
    # torch's "Trying to create tensor with negative dimension -1", or a classifier of no outputs.
    (lambda: resnet20(num_classes=-1), ValueError, r"^num_classes must be a positive int, got -1$"),
    (lambda: build_model("wrn28-10", num_classes=0), ValueError, r"^num_classes must be a positive int, got 0$"),
    (lambda: build_model("resnet50", num_classes=2.5), TypeError, r"^num_classes must be a positive int, got float"),
])
def test_impossible_sizes_are_refused(build, error, message):
    with torch.device("meta"):
        with pytest.raises(error, match=message):
            build()


@pytest.mark.parametrize("build,error,message", [
    # A widen of 0 or below built a 1-channel net without a word.
    (lambda: WideResNet(16, 0), ValueError, r"^widen must be a finite number > 0 \(k, the widening factor\), got 0$"),
    (lambda: WideResNet(16, -10), ValueError, r"^widen must be a finite number > 0 .*, got -10$"),
    (lambda: WideResNet(16, float("nan")), ValueError, r"^widen must be a finite number > 0 .*, got nan$"),
    (lambda: WideResNet(16, "10"), TypeError, r"^widen must be a finite number > 0 .*, got str \('10'\)$"),
    # "'float' object cannot be interpreted as an integer", "unsupported operand type(s) for -".
    (lambda: CifarResNet(20.0), TypeError, r"^depth must be an int 6n \+ 2 with n ≥ 1, got float \(20\.0\)$"),
    (lambda: CifarResNet("20"), TypeError, r"^depth must be an int 6n \+ 2 with n ≥ 1, got str \('20'\)$"),
    (lambda: CifarResNet(2), ValueError, r"^depth must be an int 6n \+ 2 with n ≥ 1, got 2$"),
    (lambda: WideResNet(28.0), TypeError, r"^depth must be an int 6n \+ 4 with n ≥ 1, got float \(28\.0\)$"),
    (lambda: WideResNet(None), TypeError, r"^depth must be an int 6n \+ 4 with n ≥ 1, got NoneType \(None\)$"),
    (lambda: WideResNet(24), ValueError, r"^depth must be 6n \+ 4 with n ≥ 1, got 24$"),
])
def test_a_wide_resnets_widen_and_a_resnets_depth_are_checked(build, error, message):
    with torch.device("meta"):
        with pytest.raises(error, match=message):
            build()


def test_a_wide_resnets_widen_sets_its_channels():
    # k scales the three stages' 16/32/64 channels; a fractional k rounds, as width does.
    with torch.device("meta"):
        for widen, channels in ((1, [16, 32, 64]), (2.5, [40, 80, 160])):
            model = WideResNet(10, widen, num_classes=10, width=1.0)
            assert [stage[0].conv1.out_channels for stage in (model.layer1, model.layer2, model.layer3)] == channels
        assert WideResNet(np.int64(16), 1).layer1[0].conv1.out_channels == 16      # a numpy int depth too


def test_width_rounds_every_channel_count_to_the_nearest_int_of_at_least_one():
    # At width 0.1 rounding and truncation part: 16 · 0.1 = 1.6 is 2 channels, 128 · 0.1 = 12.8 is 13.
    with torch.device("meta"):
        model = resnet20(width=0.1)
        assert model.conv1.out_channels == 2
        assert [stage[0].conv1.out_channels for stage in (model.layer1, model.layer2, model.layer3)] == [2, 3, 6]
        model = ResNet50(width=0.1)
        assert model.conv1.out_channels == 6
        stages = (model.layer1, model.layer2, model.layer3, model.layer4)
        assert [stage[0].conv1.out_channels for stage in stages] == [6, 13, 26, 51]
        assert [stage[0].conv3.out_channels for stage in stages] == [24, 52, 104, 204]
        model = WideResNet(10, 1, width=0.1)
        assert model.conv1.out_channels == 2
        assert [stage[0].conv1.out_channels for stage in (model.layer1, model.layer2, model.layer3)] == [2, 3, 6]
        # 16 · 0.01 = 0.16 rounds to 0: at least one channel.
        assert resnet20(width=0.01).conv1.out_channels == 1


# -- forward wiring against functional references, float64 --------------------------------
def _randomize_norms(model, seed=0):
    """Draw every BatchNorm's scale, shift and running statistics, so that no norm is an identity and the
    zero-initialized last norms of ResNet-50's branches take part."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=generator))
                m.bias.copy_(0.3 * torch.randn(c, generator=generator))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
    return model


def _batch_norm(x, bn):
    """Inference BatchNorm: the running statistics, then the affine map."""
    shape = (1, -1, 1, 1)
    scale = bn.weight.view(shape) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    return (x - bn.running_mean.view(shape)) * scale + bn.bias.view(shape)


def _classify(x, fc):
    """Global average pool, then the classifier."""
    return x.mean(dim=(2, 3)) @ fc.weight.T + fc.bias


class _ReLU:
    """ReLU that records whether it clipped anything, so a reference whose ReLUs never act cannot
    stand in for one whose ReLUs sit elsewhere."""

    def __init__(self):
        self.clipped = []

    def __call__(self, x):
        self.clipped.append(bool((x < 0).any()))
        return x.clamp_min(0)


def _resnet20_reference(model, x, relu):
    """CifarResNet: ReLU(BN(conv3×3)) stem; blocks conv3×3-BN-ReLU-conv3×3-BN, plus the identity or a
    1×1-conv + BN projection (first block of each stage), ReLU after the sum; stride 2 in the first
    block of stages 2 and 3."""
    x = relu(_batch_norm(F.conv2d(x, model.conv1.weight, padding=1), model.bn1))
    for s, stage in enumerate((model.layer1, model.layer2, model.layer3)):
        for b, block in enumerate(stage):
            stride = 2 if s > 0 and b == 0 else 1
            out = relu(_batch_norm(F.conv2d(x, block.conv1.weight, stride=stride, padding=1), block.bn1))
            out = _batch_norm(F.conv2d(out, block.conv2.weight, padding=1), block.bn2)
            assert (block.shortcut is None) == (b > 0)
            shortcut = x if b > 0 else _batch_norm(F.conv2d(x, block.shortcut[0].weight, stride=stride),
                                                   block.shortcut[1])
            x = relu(out + shortcut)
    return _classify(x, model.fc)


def _wide_resnet_reference(model, x, relu):
    """WideResNet (pre-activation): conv3×3 stem; blocks BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3 plus
    the identity, or a 1×1 conv of the pre-activated input where the shape changes; then BN-ReLU."""
    x = F.conv2d(x, model.conv1.weight, padding=1)
    for s, stage in enumerate((model.layer1, model.layer2, model.layer3)):
        for b, block in enumerate(stage):
            stride = 2 if s > 0 and b == 0 else 1
            pre = relu(_batch_norm(x, block.bn1))
            out = F.conv2d(pre, block.conv1.weight, stride=stride, padding=1)
            out = F.conv2d(relu(_batch_norm(out, block.bn2)), block.conv2.weight, padding=1)
            assert (block.shortcut is None) == (b > 0)
            x = out + (x if b > 0 else F.conv2d(pre, block.shortcut.weight, stride=stride))
    return _classify(relu(_batch_norm(x, model.bn)), model.fc)



@pytest.mark.parametrize("block_index", [0, 1], ids=["projection", "identity"])
def test_a_wide_blocks_dropout_sits_between_its_convs(block_index):
    """In training, a wide block is conv2(dropout(ReLU(BN(conv1(pre))))) plus its shortcut: the dropout mask
    falls on conv2's input, not its output."""
    block = _randomize_norms(WideResNet(16, 2, num_classes=10, dropout=0.5, width=0.25)).double().layer1[block_index]
    block.eval()
    block.dropout.train()           # the running statistics, so only the dropout draws
    x = torch.randn(2, block.bn1.num_features, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    relu = _ReLU()
    with torch.no_grad():
        pre = relu(_batch_norm(x, block.bn1))
        out = F.conv2d(pre, block.conv1.weight, padding=1)
        torch.manual_seed(0)
        out = F.conv2d(F.dropout(relu(_batch_norm(out, block.bn2)), 0.5, training=True), block.conv2.weight, padding=1)
        expected = out + (x if block.shortcut is None else F.conv2d(pre, block.shortcut.weight))
        torch.manual_seed(0)
        actual = block(x)
        undropped = block.eval()(x)
    assert relu.clipped and all(relu.clipped)
    assert rel_err(undropped, expected) > 0.1                        # the dropout acts on this input
    assert rel_err(actual, expected) < REL_TOL[torch.float64]


def test_count_parameters_counts_frozen_parameters_unless_trainable_only():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))       # 8 + 3 parameters
    model[0].weight.requires_grad_(False)                        # 6 of them frozen
    assert count_parameters(model) == 5
    assert count_parameters(model, trainable_only=False) == 11

def _resnet50_reference(model, x, relu):
    """ResNet50: ReLU(BN(conv3×3)) stem; bottlenecks 1×1-BN-ReLU, 3×3 (the stride)-BN-ReLU, 1×1-BN, plus
    the identity or a 1×1-conv + BN projection, ReLU after the sum; stride 2 in the first block of
    stages 2 to 4."""
    x = relu(_batch_norm(F.conv2d(x, model.conv1.weight, padding=1), model.bn1))
    for s, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        for b, block in enumerate(stage):
            stride = 2 if s > 0 and b == 0 else 1
            out = relu(_batch_norm(F.conv2d(x, block.conv1.weight), block.bn1))
            out = relu(_batch_norm(F.conv2d(out, block.conv2.weight, stride=stride, padding=1), block.bn2))
            out = _batch_norm(F.conv2d(out, block.conv3.weight), block.bn3)
            assert (block.shortcut is None) == (b > 0)
            shortcut = x if b > 0 else _batch_norm(F.conv2d(x, block.shortcut[0].weight, stride=stride),
                                                   block.shortcut[1])
            x = relu(out + shortcut)
    return _classify(x, model.fc)


@pytest.mark.parametrize("build,reference,size", [
    (lambda: resnet20(num_classes=10, width=0.25), _resnet20_reference, 16),
    # Two blocks per stage: a projection and an identity block in each; dropout is off in eval mode.
    (lambda: WideResNet(16, 2, num_classes=10, dropout=0.3, width=0.25), _wide_resnet_reference, 8),
    (lambda: ResNet50(num_classes=10, width=0.0625), _resnet50_reference, 8),
], ids=["resnet20", "wrn", "resnet50"])
def test_vision_models_compute_their_documented_forward(build, reference, size):
    model = _randomize_norms(build()).double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    relu = _ReLU()
    with torch.no_grad():
        expected = reference(model, x, relu)
        actual = model(x)
    assert relu.clipped and all(relu.clipped)
    assert actual.dtype == torch.float64 and actual.shape == expected.shape
    assert rel_err(actual, expected) < REL_TOL[torch.float64]


def _layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _gpt_reference(model, tokens, heads):
    """Pre-LN GPT: token plus learned position embeddings; per block x + attn(LN(x)), then
    x + proj(GELU(fc(LN(x)))) with the exact (erf) GELU; causal softmax attention over heads of
    dim / heads; a final LN and the head."""
    batch, length = tokens.shape
    x = model.embed.weight[tokens] + model.pos[:length]
    dim = x.shape[-1]
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    for block in model.blocks:
        h = _layer_norm(x, block.ln1)
        q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(dim, dim=-1)
        q, k, v = (t.reshape(batch, length, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(dim // heads)).masked_fill(future, float("-inf"))
        y = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, length, dim)
        x = x + y @ block.attn.proj.weight.T + block.attn.proj.bias
        hidden = _layer_norm(x, block.ln2) @ block.mlp.fc.weight.T + block.mlp.fc.bias
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        x = x + hidden @ block.mlp.proj.weight.T + block.mlp.proj.bias
    x = _layer_norm(x, model.ln)
    return x @ model.head.weight.T + model.head.bias


def test_gpt_computes_its_documented_forward():
    model = GPT(context=12, dim=32, depth=2, heads=4, dropout=0.1).double().eval()
    # Norms that are not identities, and residual branches large enough to weigh in the logits.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks") or name.startswith("ln."):
                p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=torch.float64))
    tokens = torch.randint(0, 256, (3, 11), generator=generator)
    with torch.no_grad():
        expected = _gpt_reference(model, tokens, heads=4)
        actual = model(tokens)
    assert actual.dtype == torch.float64 and tuple(actual.shape) == (3, 11, 256)
    assert rel_err(actual, expected) < REL_TOL[torch.float64]


# -- documented initializations ---------------------------------------------------------------
def test_resnet50_blocks_start_as_identities():
    model = ResNet50(num_classes=10, width=0.0625)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 3 + 4 + 6 + 3
    for block in blocks:
        # The last BN of every residual branch starts at scale 0 (the other norms at 1): the branch adds 0.
        assert torch.equal(block.bn3.weight, torch.zeros_like(block.bn3.weight))
        assert torch.equal(block.bn3.bias, torch.zeros_like(block.bn3.bias))
        assert torch.equal(block.bn1.weight, torch.ones_like(block.bn1.weight))
        assert torch.equal(block.bn2.weight, torch.ones_like(block.bn2.weight))
    # A block without projection passes its (non-negative, post-ReLU) input through unchanged, in
    # training mode as in eval mode.
    block = model.layer1[1]
    assert block.shortcut is None
    x = torch.rand(2, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(block.train()(x), x) and torch.equal(block.eval()(x), x)


def _assert_normal_draws(values, std, what):
    """``values`` look like independent N(0, std²) draws: their mean and standard deviation lie within
    5 standard errors (std/√n and std/√(2n)) of 0 and ``std``."""
    values = values.detach().double().flatten()
    n = values.numel()
    assert abs(values.mean().item()) < 5 * std / math.sqrt(n), what
    assert abs(values.std().item() - std) < 5 * std / math.sqrt(2 * n), what


def test_gpt_initialization_is_gpt2s():
    """N(0, 0.02) for the embeddings and linear weights, zero biases; the residual projections (each
    block's attn.proj and mlp.proj) N(0, 0.02/√(2·depth))."""
    depth = 3
    model = GPT(context=64, dim=128, depth=depth, heads=4)
    _assert_normal_draws(model.embed.weight, 0.02, "embed")
    _assert_normal_draws(model.pos, 0.02, "pos")
    projections = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            residual = name.endswith(".proj")
            projections += [name] if residual else []
            _assert_normal_draws(m.weight, 0.02 / math.sqrt(2 * depth) if residual else 0.02, name)
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
    assert projections == [f"blocks.{i}.{branch}.proj" for i in range(depth) for branch in ("attn", "mlp")]
