"""convert_model: which modules are replaced, with what rank, and what the summary reports."""

import pytest
import torch
from torch import nn

from _helpers import rel_err
from dynrank.convert import ConversionSummary, convert_model
from dynrank.linear import FusedLowRankLinear



def mlp():
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 5))


def n_params(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class BasicBlock(nn.Module):
    """CIFAR ResNet block with a 1×1 projection shortcut (named like the authors' code)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = BasicBlock(16, 32, 2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_linear_model_ranks_classifier_and_counts():
    model = mlp()
    before = n_params(model)
    summary = convert_model(model, rank_ratio=0.5)
    assert isinstance(summary, ConversionSummary)
    assert isinstance(model[0], FusedLowRankLinear) and isinstance(model[2], FusedLowRankLinear)
    assert type(model[4]) is nn.Linear                       # final classifier stays dense
    assert model[0].rank == 12 and model[2].rank == 20       # int(0.5 · min(in, out))
    assert model[0].form == "lowrank"
    assert summary.converted == ["0", "2"]
    assert summary.skipped == [("4", "final classifier")]
    expected_after = (40 * 12 + 24 * 12 + 40) + (40 * 20 + 40 * 20 + 40) + (40 * 5 + 5)
    assert summary.params_before == before
    assert summary.params_after == expected_after == n_params(model)


def test_linear_rank_is_a_ratio_of_the_smaller_side():
    model = nn.Sequential(nn.Linear(12, 64), nn.Linear(64, 3))
    convert_model(model, rank_ratio=0.5)
    assert model[0].rank == 6                                 # int(0.5 · min(12, 64))
    model = nn.Sequential(nn.Linear(12, 64), nn.Linear(64, 3))
    summary = convert_model(model, rank_ratio=1.0)
    assert model[0].rank == 12
    assert summary.rows[0]["note"] == "no parameter saving at this rank"


def test_summary_prints_a_table():
    model = mlp()
    text = str(convert_model(model, rank_ratio=0.25))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["module", "type", "weight"]
    assert set(lines[1]) <= {"-", " "}
    row = next(line for line in lines if line.startswith("0 "))
    assert "FusedLowRankLinear" in row and "40×24" in row and " 6 " in row    # int(0.25 · 24)
    assert "final classifier" in text and lines[-1].startswith("total")
    assert f"{n_params(model):,}" in lines[-1]


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_dense_init_preserves_function(form):
    # ρ = 1 on square layers: the SVD factors are exact, so every form reproduces the dense model.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(7, 16)
    expected = model(x).detach()
    convert_model(model, rank_ratio=1.0, form=form)
    assert all(model[i].form == form for i in (0, 2))
    assert rel_err(model(x), expected) < 1e-5


def test_fresh_init_keeps_shapes_not_values():
    torch.manual_seed(2)
    model = mlp()
    x = torch.randn(3, 24)
    expected = model(x).detach()
    convert_model(model, rank_ratio=0.5, init="fresh")
    out = model(x)
    assert out.shape == expected.shape
    assert rel_err(out, expected) > 1e-2


def test_include_exclude_globs_and_callables():
    model = nn.Sequential()
    model.add_module("enc", nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)))
    model.add_module("dec", nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)))
    model.add_module("head", nn.Linear(32, 2))
    summary = convert_model(model, include="enc.*", exclude=["enc.1"])
    assert summary.converted == ["enc.0"]
    model2 = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    summary2 = convert_model(model2, exclude=lambda name, m: name == "0")
    assert summary2.converted == ["1"]                       # "2" is the classifier
    model3 = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    summary3 = convert_model(model3, include=["0", "1"])     # exact name overrides the classifier rule
    assert summary3.converted == ["0", "1"]


def test_min_features_and_keep_last():
    model = nn.Sequential(nn.Linear(4, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    summary = convert_model(model, min_features=8, keep_last=False)
    assert summary.converted == ["1", "2"]
    assert summary.skipped == [("0", "smaller than min_features=8")]


def test_cnn_defaults_follow_the_authors():
    pytest.importorskip("dynrank.conv")
    from dynrank.conv import LowRankConv2d
    torch.manual_seed(3)
    model = TinyResNet()
    x = torch.randn(2, 3, 8, 8)
    shape = model(x).shape
    summary = convert_model(model, rank_ratio=0.5)
    assert isinstance(model.conv1, LowRankConv2d)            # first conv converted
    assert isinstance(model.layer1.conv1, LowRankConv2d) and isinstance(model.layer1.conv2, LowRankConv2d)
    assert type(model.layer1.shortcut[0]) is nn.Conv2d        # 1×1 shortcut kept
    assert type(model.fc) is nn.Linear                        # classifier kept
    assert model.conv1.rank == 8 and model.layer1.conv2.rank == 16
    assert dict(summary.skipped) == {"layer1.shortcut.0": "1×1 shortcut", "fc": "final classifier"}
    assert model(x).shape == shape
    assert summary.params_after == n_params(model)


def test_cnn_fresh_geometry_matches():
    pytest.importorskip("dynrank.conv")
    model = TinyResNet()
    x = torch.randn(2, 3, 9, 9)
    shape = model(x).shape
    convert_model(model, rank_ratio=0.5, init="fresh", decomposition="tucker")
    assert model.layer1.conv1.stride == (2, 2) and model.layer1.conv1.decomposition == "tucker"
    assert model(x).shape == shape


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(x + self.ff(x))


def test_transformer_block_skips_attention_internals():
    torch.manual_seed(4)
    model = Block()
    x = torch.randn(2, 5, 32)
    summary = convert_model(model)
    assert summary.converted == ["ff.0", "ff.2"]
    assert dict(summary.skipped)["attn.out_proj"].startswith("inside nn.MultiheadAttention")
    assert model(x).shape == (2, 5, 3)


def test_torch_transformer_layer_fast_path_is_disabled():
    # In eval mode torch's fused encoder path reads linear1.weight directly; the
    # converted layer must run its own forward (equal to the training-mode output
    # with dropout 0).
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model = nn.Sequential(encoder, nn.Linear(32, 2))
    convert_model(model, rank_ratio=0.25)
    x = torch.randn(3, 6, 32)
    reference = model.train()(x).detach()
    with torch.no_grad():
        out = model.eval()(x)
    assert rel_err(out, reference) < 1e-5


def test_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        convert_model("model")
    with pytest.raises(ValueError, match=r"rank_ratio must be in \(0, 1\]"):
        convert_model(mlp(), rank_ratio=1.5)
    with pytest.raises(TypeError, match="rank_ratio"):
        convert_model(mlp(), rank_ratio="half")
    with pytest.raises(ValueError, match="decomposition"):
        convert_model(mlp(), decomposition="qr")
    with pytest.raises(ValueError, match="form"):
        convert_model(mlp(), form="sparse")
    with pytest.raises(ValueError, match="init"):
        convert_model(mlp(), init="zeros")
    with pytest.raises(TypeError, match="include"):
        convert_model(mlp(), include=[1, 2])
    with pytest.raises(ValueError, match="nothing to convert"):
        convert_model(nn.Sequential(nn.ReLU(), nn.Linear(8, 8)))


def test_converting_twice_finds_nothing_and_changes_nothing():
    model = mlp()
    convert_model(model)
    layers = [type(m) for m in model]
    with pytest.raises(ValueError, match="nothing to convert"):
        convert_model(model)
    assert [type(m) for m in model] == layers
