"""Models of dynrank-train: parameter counts against the paper, one training step each."""

import numpy as np
import pytest
import torch
from torch import nn

from dynrank import FusedLowRankLinear
from dynrank.convert import convert_model
from dynrank.train.models import (
    EXCLUDE,
    GPT,
    MODELS,
    CausalSelfAttention,
    CifarResNet,
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
