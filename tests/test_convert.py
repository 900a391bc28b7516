"""convert_model: which modules are replaced, with what rank, and what the summary reports."""

import re

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


@pytest.mark.parametrize("init", ["dense", "fresh"])
def test_a_rank_that_is_not_a_whole_number_is_rounded_down(init):
    """r = max(1, int(ρ·min(in, out))) for a Linear, max(1, int(ρ·out_channels)) for a Conv2d: at ρ = 0.3 the
    16→32 and 32→16 linears and the 4→16 conv get int(4.8) = 4, not the nearest whole number 5, the 16→8 conv
    int(2.4) = 2; at ρ = 0.01 every layer gets rank 1."""
    def models():
        return (nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2)),
                nn.Sequential(nn.Conv2d(4, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3)))

    for rank_ratio, ranks in ((0.3, [4, 4, 4, 2]), (0.01, [1, 1, 1, 1])):
        linear, conv = models()
        rows = [row for model in (linear, conv)
                for row in convert_model(model, rank_ratio=rank_ratio, init=init).rows if row["converted"]]
        assert [row["name"] for row in rows] == ["0", "2", "0", "2"]
        assert [linear[0].rank, linear[2].rank, conv[0].rank, conv[2].rank] == ranks
        assert [row["rank"] for row in rows] == ranks
        r0, r2 = ranks[:2]
        assert n_params(linear[0]) == r0 * (16 + 32) + 32 and n_params(linear[2]) == r2 * (32 + 16) + 16


def test_summary_prints_a_table():
    model = mlp()
    before = n_params(model)
    text = str(convert_model(model, rank_ratio=0.25))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["module", "type", "weight"]
    assert set(lines[1]) <= {"-", " "}
    row = next(line for line in lines if line.startswith("0 "))
    assert "FusedLowRankLinear" in row and "40×24" in row and " 6 " in row    # int(0.25 · 24)
    # Trainable parameters before (40·24 + 40) and after (6·(24 + 40) + 40), in that order.
    assert row.split() == ["0", "Linear", "→", "FusedLowRankLinear", "40×24", "6", "1,000", "424"]
    assert "final classifier" in text and lines[-1].startswith("total")
    assert f"{n_params(model):,}" in lines[-1]
    # Two of the three linears converted, the classifier kept: the totals, the ratio after / before, the count.
    assert lines[-1].split()[2:] == [f"{before:,}", f"{n_params(model):,}", f"{n_params(model) / before:.2f}×",
                                     "trainable,", "2", "of", "3", "converted"]


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


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
@pytest.mark.parametrize("init", ["dense", "fresh"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_layer_without_bias_stays_without_bias(kind, init, form):
    """Trainable parameters by hand at ρ = 0.5: the linear 24→40 at rank 12 has factors 12·(24 + 40) = 768 beside
    a 40·24 = 960 weight, the 40→5 classifier 205; the 3×3 conv 4→16 at rank int(0.5·16) = 8 has factors
    8·4·9 + 16·8 = 416 beside a 16·4·9 = 576 kernel.  The adapter form trains the factors only."""
    if kind == "linear":
        model = nn.Sequential(nn.Linear(24, 40, bias=False), nn.ReLU(), nn.Linear(40, 5))
        dense, factors, rest, x = 960, 768, 205, torch.randn(3, 24)
    else:
        model = nn.Sequential(nn.Conv2d(4, 16, 3, bias=False), nn.ReLU())
        dense, factors, rest, x = 576, 416, 0, torch.randn(2, 4, 6, 6)
    summary = convert_model(model, rank_ratio=0.5, init=init, form=form)
    assert summary.converted == ["0"]
    layer = model[0]
    assert layer.form == form and layer.bias is None
    assert "bias" not in dict(layer.named_parameters())
    expected = (dense if form == "full" else factors) + rest
    assert n_params(model) == summary.params_after == expected
    model(x).square().sum().backward()
    assert sum(p.numel() for p in layer.parameters() if p.grad is not None) == expected - rest


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


def test_an_exact_name_matches_that_layer_only_not_the_names_it_begins():
    """exclude="1" on layers "0" … "11" keeps "1" dense, not "10" and "11" too; include="1" converts "1" alone;
    "enc" names no layer of a model whose layer is "enc.0" (a glob "enc.*" does)."""
    def model():
        return nn.Sequential(*(nn.Linear(16, 16) for _ in range(12)))

    names = [str(i) for i in range(12)]
    summary = convert_model(model(), exclude="1", keep_last=False)
    assert summary.skipped == [("1", "excluded")]
    assert summary.converted == [n for n in names if n != "1"]
    summary = convert_model(model(), include=["1"])
    assert summary.converted == ["1"]
    assert summary.skipped == [(n, "not included") for n in names if n != "1"]
    enc = nn.Sequential()
    enc.add_module("enc", nn.Sequential(nn.Linear(16, 16)))
    enc.add_module("head", nn.Linear(16, 2))
    before = _snapshot(enc)
    for kwargs, listed in ((dict(include="enc"), "include 'enc'"), (dict(exclude=["enc"]), "exclude 'enc'")):
        with pytest.raises(ValueError, match=rf"these patterns match no nn\.Linear/nn\.Conv2d/Conv1D of the model: "
                                             rf"{listed} \(.*the model's are: 'enc\.0', 'head'\)"):
            convert_model(enc, **kwargs)
        _assert_unchanged(enc, before)
    assert convert_model(enc, include="enc.*").converted == ["enc.0"]


def test_a_glob_in_include_leaves_the_rules_that_keep_a_layer_dense_in_force():
    """Only a layer named exactly in include overrides them: a glob that matches the classifier, a small
    layer, a 1×1 shortcut or a tied head leaves each dense, with its note, and raises nothing."""
    def model():
        m = nn.Sequential()
        m.add_module("enc", nn.Sequential(nn.Linear(32, 32), nn.Linear(4, 32), nn.Linear(32, 2)))
        return m

    for include in ("*", "enc.*", ["enc.[0-9]"]):
        summary = convert_model(model(), include=include)
        assert summary.converted == ["enc.0"]
        assert summary.skipped == [("enc.1", "smaller than min_features=8"), ("enc.2", "final classifier")]
    summary = convert_model(model(), include=["enc.0", "enc.1", "enc.2"])
    assert summary.converted == ["enc.0", "enc.1", "enc.2"]
    pytest.importorskip("dynrank.conv")
    summary = convert_model(TinyResNet(), include="*")
    assert summary.converted == ["conv1", "layer1.conv1", "layer1.conv2"]
    assert dict(summary.skipped) == {"layer1.shortcut.0": "1×1 shortcut", "fc": "final classifier"}
    summary = convert_model(TinyResNet(), include="layer1.*")
    assert summary.converted == ["layer1.conv1", "layer1.conv2"]
    assert dict(summary.skipped) == {"conv1": "not included", "layer1.shortcut.0": "1×1 shortcut",
                                     "fc": "not included"}
    emb = nn.Embedding(10, 16)
    head = nn.Linear(16, 10, bias=False)
    head.weight = emb.weight
    summary = convert_model(nn.Sequential(emb, nn.Linear(16, 16), head), include="*", keep_last=False)
    assert summary.converted == ["1"] and dict(summary.skipped) == {"2": "weight tied to 0.weight"}


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
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        convert_model("model")
    with pytest.raises(ValueError, match=r"rank_ratio must be in \(0, 1\], got 1\.5"):
        convert_model(mlp(), rank_ratio=1.5)
    with pytest.raises(TypeError, match=r"rank_ratio must be a float in \(0, 1\], got str"):
        convert_model(mlp(), rank_ratio="half")
    with pytest.raises(ValueError, match="decomposition must be one of svd, tucker, cp, tkd-cpd, got 'qr'"):
        convert_model(mlp(), decomposition="qr")
    with pytest.raises(ValueError, match="form must be one of lowrank, full, adapter, got 'sparse'"):
        convert_model(mlp(), form="sparse")
    with pytest.raises(ValueError, match="init must be one of dense, fresh, got 'zeros'"):
        convert_model(mlp(), init="zeros")
    with pytest.raises(TypeError, match=r"include must contain only strings.*got \[1, 2\]"):
        convert_model(mlp(), include=[1, 2])
    with pytest.raises(ValueError, match=r"nothing to convert.*\(1 candidates: 1: final classifier\)"):
        convert_model(nn.Sequential(nn.ReLU(), nn.Linear(8, 8)))


def test_converting_twice_finds_nothing_and_changes_nothing():
    model = mlp()
    convert_model(model)
    layers = [type(m) for m in model]
    with pytest.raises(ValueError, match=r"nothing to convert.*\(1 candidates: 4: final classifier\)"):
        convert_model(model)
    assert [type(m) for m in model] == layers


# -- a call that fails leaves the model as it was ------------------------------------------

def _snapshot(model):
    return list(model.named_modules(remove_duplicate=False)), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    modules, state = snapshot
    now = list(model.named_modules(remove_duplicate=False))
    assert [n for n, _ in now] == [n for n, _ in modules]
    assert all(a is b for (_, a), (_, b) in zip(now, modules))
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize("dec", ["cp", "tkd-cpd"])
def test_a_failing_fit_names_the_layer_and_leaves_the_model_as_it_was(dec, monkeypatch):
    import numpy as np

    def singular(*args, **kwargs):                   # what ALS raises on a degenerate kernel
        raise np.linalg.LinAlgError("Singular matrix")
    monkeypatch.setattr("tensorly.decomposition.parafac", singular)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Linear(16, 2))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"could not convert '2' \(Conv2d, weight 16×8×3×3, decomposition='{dec}'"
                                         rf".*Singular matrix.*the model is left as it was"):
        convert_model(model, decomposition=dec)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("dec", ["svd", "tucker", "cp", "tkd-cpd"])
def test_zero_layers_convert_to_an_exact_zero_that_trains(dec):
    """An all-zero Linear and Conv2d (the fuzzer's case: cp and tkd-cpd raised after the Linear was
    replaced) convert, in every decomposition, to factors whose product is exactly zero and which all
    get gradients once the zero factor has moved (all-zero factors would never train)."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(12, 12), nn.Conv2d(12, 16, 3, padding=1), nn.Flatten(), nn.Linear(960, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[1].weight.zero_()
    x = torch.randn(3, 12, 5, 12)
    expected = model(x).detach()
    convert_model(model, decomposition=dec)
    assert isinstance(model[0], FusedLowRankLinear) and type(model[1]).__name__ == "LowRankConv2d"
    assert torch.equal(model(x), expected)                                  # the product is exactly zero
    for layer, inp, zero in ((model[0], x, "A"), (model[1], model[0](x).detach(), model[1]._dec.zero_factor)):
        target = torch.randn_like(layer(inp))
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        for step in range(2):
            opt.zero_grad()
            (layer(inp) * target).sum().backward()
            if step == 0:
                assert getattr(layer, zero).grad.abs().sum() > 0, zero
            opt.step()
        assert all(p.grad.abs().sum() > 0 for p in layer.factors().values()), type(layer).__name__


# -- modules registered at several places, tied weights -------------------------------------

def test_a_shared_module_is_converted_once_and_stays_shared():
    torch.manual_seed(7)
    lin = nn.Linear(16, 16)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(16, 2))
    x = torch.randn(5, 16)
    expected = model(x).detach()
    summary = convert_model(model, rank_ratio=1.0)
    assert isinstance(model[0], FusedLowRankLinear) and model[2] is model[0]
    assert rel_err(model(x), expected) < 1e-5
    assert summary.converted == ["0"] and len(summary) == 2
    assert summary.rows[0]["aliases"] == ["2"] and summary.rows[1]["aliases"] == []
    assert "also at 2" in str(summary)
    assert summary.params_after == n_params(model)


def test_a_module_shared_between_containers_and_matched_by_any_name():
    lin = nn.Linear(16, 16)
    model = nn.Sequential()
    model.add_module("a", nn.Sequential(lin, nn.ReLU()))
    model.add_module("b", nn.Sequential(nn.Tanh(), lin))
    model.add_module("head", nn.Linear(16, 2))
    summary = convert_model(model)
    assert isinstance(model.a[0], FusedLowRankLinear) and model.b[1] is model.a[0]
    assert [(r["name"], r["aliases"]) for r in summary.rows] == [("a.0", ["b.1"]), ("head", [])]
    model = nn.Sequential()
    model.add_module("a", nn.Sequential(lin, nn.ReLU()))
    model.add_module("b", nn.Sequential(nn.Tanh(), lin))
    model.add_module("c", nn.Linear(16, 16))
    model.add_module("head", nn.Linear(16, 2))
    summary = convert_model(model, exclude=["b.1"])                       # excluding one place keeps it
    assert model.a[0] is lin and model.b[1] is lin and summary.converted == ["c"]
    assert dict(summary.skipped)["a.0"] == "excluded"


def test_a_tied_head_stays_dense_and_tied():
    emb = nn.Embedding(10, 16)
    head = nn.Linear(16, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(16, 16), head)
    summary = convert_model(model, keep_last=False)
    assert summary.converted == ["1"]
    assert type(model[2]) is nn.Linear and model[2].weight is model[0].weight
    assert dict(summary.skipped) == {"2": "weight tied to 0.weight"}
    assert "weight tied to 0.weight" in str(summary)
    model = nn.Sequential(emb, nn.Linear(16, 16), head)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'2' is named in include, but its weight is tied to 0\.weight: the new "
                                         r"layer would hold its own copy and untie them"):
        convert_model(model, include=["1", "2"])
    _assert_unchanged(model, before)


def test_layers_sharing_a_bias_stay_dense_and_tied():
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.bias = a.bias

    def model():
        return nn.Sequential(a, nn.ReLU(), b, nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))

    shared = model()
    summary = convert_model(shared)
    assert summary.converted == ["4"]
    assert dict(summary.skipped) == {"0": "bias tied to 2.bias", "2": "bias tied to 0.bias", "5": "final classifier"}
    assert shared[0] is a and shared[2] is b and shared[2].bias is shared[0].bias
    assert "bias tied to 2.bias" in str(summary)
    shared = model()
    before = _snapshot(shared)
    with pytest.raises(ValueError, match=r"'2' is named in include, but its bias is tied to 0\.bias: the new "
                                         r"layer would hold its own copy and untie them"):
        convert_model(shared, include=["2", "4"])
    _assert_unchanged(shared, before)


# -- include / exclude patterns that match nothing -----------------------------------------

@pytest.mark.parametrize("kwargs, listed", [
    (dict(exclude=["2 "]), "exclude '2 '"),
    (dict(include=["0", "nonexistent"]), "include 'nonexistent'"),
    (dict(include="enc.*", exclude=["1", "dec"]), "include 'enc.*'; exclude 'dec'"),
])
def test_patterns_that_match_nothing_raise(kwargs, listed):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 2))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"these patterns match no nn\.Linear/nn\.Conv2d/Conv1D of the model: "
                                         rf"{re.escape(listed)} \(.*the model's are: '0', '1', '2', '3'\)"):
        convert_model(model, **kwargs)
    _assert_unchanged(model, before)


def test_callables_and_attention_internals_count_as_matches():
    model = Block()
    summary = convert_model(model, exclude=["attn.out_proj", "ff.2"])      # matches a module kept anyway
    assert summary.converted == ["ff.0"]
    with pytest.raises(ValueError, match="nothing to convert"):            # a callable may match nothing
        convert_model(mlp(), include=lambda name, module: False)


# -- frozen layers --------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["lowrank", "full"])
def test_frozen_layers_stay_as_they_were_in_lowrank_and_full_form(form):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 2))
    model[0].requires_grad_(False)
    model[1].bias.requires_grad_(False)                                    # only the bias frozen
    frozen = model[0]
    summary = convert_model(model, form=form)
    assert model[0] is frozen and not frozen.weight.requires_grad and not frozen.bias.requires_grad
    assert dict(summary.skipped)["0"].startswith("frozen (requires_grad=False")
    assert summary.converted == ["1", "2"]
    assert not model[1].bias.requires_grad and model[2].bias.requires_grad
    assert all(p.requires_grad for n, p in model[1].named_parameters() if n != "bias")
    assert summary.params_after == n_params(model)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 2))
    model[0].requires_grad_(False)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"'0' is named in include, but it is frozen .*form='{form}' would make "
                                         rf"it trainable"):
        convert_model(model, form=form, include=["0", "1"])
    _assert_unchanged(model, before)


def test_adapter_form_on_a_frozen_model_is_lora():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2))
    model.requires_grad_(False)
    x = torch.randn(4, 16)
    expected = model(x).detach()
    summary = convert_model(model, rank_ratio=0.25, form="adapter")
    assert summary.converted == ["0", "2"]
    for layer in (model[0], model[2]):
        assert layer.form == "adapter" and not layer.weight.requires_grad and not layer.bias.requires_grad
        assert layer.A.requires_grad and layer.B.requires_grad
    assert rel_err(model(x), expected) < 1e-6
    assert summary.params_after == n_params(model) == 32 * 4 + 16 * 4 + 16 * 4 + 32 * 4


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
@pytest.mark.parametrize("init", ["dense", "fresh"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_frozen_bias_stays_frozen_and_a_trainable_one_trainable(kind, init, form):
    """Also with init="fresh", where the new layer builds a bias of its own rather than taking the old one."""
    if kind == "linear":
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 2))
        x = torch.randn(3, 16)
    else:
        model = nn.Sequential(nn.Conv2d(4, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
        x = torch.randn(2, 4, 6, 6)
    model[0].bias.requires_grad_(False)
    summary = convert_model(model, init=init, form=form)
    assert summary.converted == ["0", "2"]
    trainable = {"weight"} if form == "full" else {"A", "B"}
    assert {n for n, p in model[0].named_parameters() if p.requires_grad} == trainable
    assert {n for n, p in model[2].named_parameters() if p.requires_grad} == trainable | {"bias"}
    assert summary.params_after == n_params(model)
    model(x).square().sum().backward()
    assert model[0].bias.grad is None and model[2].bias.grad.abs().sum() > 0


# -- meta device and dtypes -----------------------------------------------------------------

@pytest.mark.parametrize("init", ["dense", "fresh"])
@pytest.mark.parametrize("dec", ["svd", "tucker", "cp", "tkd-cpd"])
def test_a_meta_model_converts_like_a_real_one(dec, init):
    torch.manual_seed(9)
    real = TinyResNet()
    meta = TinyResNet().to("meta")
    expected = convert_model(real, decomposition=dec, init=init)
    summary = convert_model(meta, decomposition=dec, init=init)
    assert summary.rows == expected.rows and summary.params_after == expected.params_after
    shapes = {n: (p.shape, p.requires_grad) for n, p in real.named_parameters()}
    assert {n: (p.shape, p.requires_grad) for n, p in meta.named_parameters()} == shapes
    assert all(p.is_meta for p in meta.parameters())
    assert meta(torch.empty(2, 3, 8, 8, device="meta")).shape == (2, 10)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_a_layer_that_is_not_floating_point_is_named(dtype):
    model = nn.Sequential(nn.Linear(16, 16), nn.Conv2d(4, 16, 3), nn.Linear(16, 2))
    model[1].weight = nn.Parameter(torch.zeros(16, 4, 3, 3, dtype=dtype), requires_grad=False)
    before = _snapshot(model)
    for init in ("dense", "fresh"):
        with pytest.raises(TypeError, match=rf"could not convert '1' \(Conv2d.*init='{init}'\): dtype must be a "
                                            rf"floating-point dtype, got {dtype}; the model is left as it was"):
            convert_model(model, form="adapter", init=init)
        _assert_unchanged(model, before)
    linear = nn.Linear(16, 16)
    linear.weight = nn.Parameter(torch.zeros(16, 16, dtype=dtype), requires_grad=False)
    with pytest.raises(TypeError, match=rf"from_dense needs a floating-point weight: dtype must be a "
                                        rf"floating-point dtype, got {dtype}"):
        FusedLowRankLinear.from_dense(linear, rank=4)


def test_lazy_modules_not_yet_run_are_named():
    model = nn.Sequential(nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 16), nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match=r"convert_model: '0', '3' still have uninitialized \(lazy\) parameters; "
                                         r"run the model once on a dummy batch"):
        convert_model(model, keep_last=False)
    assert isinstance(model[2], nn.Linear) and isinstance(model[0], nn.LazyLinear)
    x = torch.randn(4, 24)
    ref = model.eval()(x)                      # materializes both, as the message says
    assert convert_model(model, rank_ratio=1.0, keep_last=False).converted == ["0", "2"]
    assert rel_err(model(x), ref) < 1e-5


# -- subclasses that compute more than the product with their weight ----------------------------------
class StandardizedConv(nn.Conv2d):
    """timm's StdConv2d pattern: the kernel standardized per output channel at every call."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PaddedConv(nn.Conv2d):
    """Overrides only _conv_forward (a reflect pad of its own)."""

    def _conv_forward(self, x, weight, bias):
        return nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), weight, bias, self.stride)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


class PlainLinear(nn.Linear):            # a subclass that keeps nn.Linear's forward (as torch's MHA out_proj)
    pass


def _subclass_net():
    torch.manual_seed(0)
    return nn.Sequential(StandardizedConv(3, 16, 3, padding=1), PaddedConv(16, 16, 3), nn.Flatten(),
                         ScaledLinear(16 * 36, 32), PlainLinear(32, 32), nn.Linear(32, 4)).double()


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_subclasses_with_their_own_forward_stay_dense(form):
    """They converted as plain layers and computed without their own forward, without a word (the
    standardized conv's output changed by ~10): now each stays dense, with its method named."""
    model = _subclass_net()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    ref = model(x)
    summary = convert_model(model, form=form, rank_ratio=1.0, min_features=1)
    notes = dict(summary.skipped)
    assert notes == {"0": "own computation (StandardizedConv.forward)",
                     "1": "own computation (PaddedConv._conv_forward)",
                     "3": "own computation (ScaledLinear.forward)", "5": "final classifier"}
    assert type(model[0]) is StandardizedConv and type(model[3]) is ScaledLinear
    assert type(model[4]) is FusedLowRankLinear
    assert rel_err(model(x), ref) < 1e-12


def test_naming_such_a_subclass_or_building_from_it_is_refused():
    from dynrank import LowRankConv2d
    model = _subclass_net()
    with pytest.raises(ValueError, match=r"'3' is named in include, but ScaledLinear\.forward overrides its "
                                         r"base's: .*drop it from include to keep it dense"):
        convert_model(model, include=["3", "4"])
    assert type(model[4]) is PlainLinear                                     # nothing changed
    for module, cls, message in (
            (model[0], LowRankConv2d, r"StandardizedConv overrides nn\.Conv2d\.forward, so a LowRankConv2d"),
            (model[1], LowRankConv2d, r"PaddedConv overrides nn\.Conv2d\._conv_forward"),
            (model[3], FusedLowRankLinear, r"ScaledLinear overrides nn\.Linear\.forward, so a FusedLowRankLinear "
                                           r"built from its weight would not compute what it computes")):
        with pytest.raises(TypeError, match=message):
            cls.from_dense(module, rank=4)
    layer = FusedLowRankLinear.from_dense(model[4], rank=32, form="full")
    x = torch.randn(3, 32, dtype=torch.float64)
    assert rel_err(layer(x), model[4](x)) < 1e-12


# -- the model itself, a second call, hooks, layouts -----------------------------------------

def test_a_bare_attention_module_keeps_its_projection_and_a_bare_layer_is_pointed_to_from_dense():
    """convert_model(nn.MultiheadAttention(...)) converted out_proj, which MHA never calls: the adapter was
    never in the forward (and lowrank form crashed)."""
    mha = nn.MultiheadAttention(16, 2)
    with pytest.raises(ValueError, match=r"nothing to convert.*out_proj: inside nn\.MultiheadAttention"):
        convert_model(mha, form="adapter", keep_last=False)
    assert type(mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    for layer, cls in ((nn.Linear(8, 8), "Linear"), (nn.Conv2d(3, 8, 3), "Conv2d")):
        with pytest.raises(ValueError, match=f"this model is itself a {cls}: build its dynrank layer with "
                                             r"FusedLowRankLinear\.from_dense"):
            convert_model(layer)


def test_naming_an_attention_projection_in_include_is_refused():
    model = Block()
    with pytest.raises(ValueError, match=re.escape("'attn.out_proj' is named in include, but it is inside "
                                                   "nn.MultiheadAttention")):
        convert_model(model, include=["attn.out_proj", "ff.0"])
    assert type(model.ff[0]) is nn.Linear                             # nothing changed


def test_a_second_call_still_knows_the_converted_head_is_the_classifier():
    """The head converted first (include, form='full'), a second call took the layer before it for the
    final classifier and kept a hidden layer dense."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    convert_model(model, include=["4"], form="full", keep_last=False)
    summary = convert_model(model)
    assert summary.converted == ["0", "2"]


@pytest.mark.parametrize("value", ["False", 0, None, 1])
def test_keep_last_must_be_a_bool(value):
    model = mlp()
    with pytest.raises(TypeError, match=re.escape(f"keep_last must be True or False, got {type(value).__name__} "
                                                  f"({value!r})")):
        convert_model(model, keep_last=value)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)


@pytest.mark.parametrize("form", ["full", "adapter", "lowrank"])
def test_forward_and_backward_hooks_move_to_the_converted_layer_and_back(form):
    """They stayed on the replaced module, so a pre-hook that scaled the input was lost and form='full'
    changed the function."""
    from dynrank import unconvert_model
    torch.manual_seed(0)
    model = mlp().double()
    x = torch.randn(6, 24, dtype=torch.float64)
    seen = []
    pre = model[0].register_forward_pre_hook(lambda m, args: (2.0 * args[0],))
    post = model[2].register_forward_hook(lambda m, args, out: out + 1.0)
    back = model[2].register_full_backward_hook(lambda m, gin, gout: seen.append(type(m).__name__))
    old0 = model[0]
    reference = model(x.requires_grad_())
    reference.sum().backward()
    convert_model(model, form=form, rank_ratio=1.0)
    assert isinstance(model[0], FusedLowRankLinear) and not old0._forward_pre_hooks
    out = model(x)
    assert rel_err(out, reference) < (1e-12 if form == "lowrank" else 1e-15)
    out.sum().backward()
    assert seen == ["Linear", "FusedLowRankLinear"]
    unconvert_model(model, lowrank="dense")
    assert type(model[2]) is nn.Linear
    assert rel_err(model(x), reference) < 1e-12                       # the hooks came back with the layers
    pre.remove()
    post.remove()
    back.remove()                                                     # the handles still reach them
    assert not any(m._forward_pre_hooks or m._forward_hooks or m._backward_hooks for m in model)


@pytest.mark.parametrize("dec", ["svd", "tucker", "cp"])
@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_a_channels_last_model_stays_channels_last(dec, form):
    from dynrank.conv import LowRankConv2d
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3)).to(
        memory_format=torch.channels_last)
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    convert_model(model, form=form, decomposition=dec)
    layer = model[0]
    assert isinstance(layer, LowRankConv2d)
    four_d = [p for p in layer.parameters() if p.dim() == 4 and p.shape[1] * p.shape[2] * p.shape[3] > 1
              and p.shape[0] > 1]
    assert four_d and all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d)
    if not (dec == "cp" and form == "lowrank"):     # CP's 1×1 and depthwise factors read as either layout
        assert layer._memory_format() is torch.channels_last
    assert model(x).shape == (2, 8, 4, 4)


def test_a_layer_prepared_for_quantization_stays_dense():
    """Its observer hook reads activation_post_process, which a dynrank layer does not have: moved with the
    other hooks, it broke the first forward."""
    import warnings

    import torch.ao.quantization as quantization
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    model[2].qconfig = quantization.default_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization.prepare(model, inplace=True)
    x = torch.randn(5, 32)
    summary = convert_model(model, form="full")
    assert summary.converted == ["0"]
    assert dict(summary.skipped)["2"] == "prepared for quantization (observer)"
    assert type(model[2]) is nn.Linear and model(x).shape == (5, 4)
    assert model[2].activation_post_process.min_val.isfinite()        # the observer still sees the layer
    with pytest.raises(ValueError, match="'2' is named in include, but it is prepared for quantization"):
        convert_model(model, include=["2"])


def test_a_layer_with_state_of_its_own_stays_dense():
    """A buffer, a child module or a forward set on the instance (accelerate's offload hooks) was dropped
    with the old layer, without a word: state_dict entries and trainable parameters lost, then a moved
    forward hook failing on the missing attribute."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16),
                          nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
    model[0].register_buffer("mask", torch.ones(16))
    model[2].gate = nn.Linear(16, 1)
    plain = model[4].forward
    model[4].forward = lambda x: plain(x)
    keys = set(model.state_dict())
    summary = convert_model(model, rank_ratio=0.5)
    notes = {r["name"]: r["note"] for r in summary.rows}
    assert notes["0"] == "it holds buffer 'mask' of its own"
    assert notes["2"] == "it holds module 'gate' of its own"
    assert notes["4"] == "it has its forward replaced on the instance (a hook library's wrapper)"
    assert [type(model[i]) for i in (0, 2, 4, 6)] == [nn.Linear] * 3 + [FusedLowRankLinear]
    assert keys - set(model.state_dict()) == {"6.weight"}
    for name, kind in (("0", "buffer 'mask'"), ("2", "module 'gate'")):
        fresh = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
        fresh[0].register_buffer("mask", torch.ones(16))
        fresh[1].gate = nn.Linear(16, 1)
        index = {"0": "0", "2": "1"}[name]
        with pytest.raises(ValueError, match=rf"'{index}' is named in include, but it holds {kind} of its own"):
            convert_model(fresh, include=[index])


def test_a_layer_with_a_parameter_of_its_own_stays_dense():
    """A Parameter registered on the layer (a learnable gate a hook multiplies by) was dropped with the old
    layer: gone from state_dict and parameters(), the table counting fewer, the moved hook failing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 2)).double()
    model[0].gate = nn.Parameter(torch.rand(16, dtype=torch.float64))
    model[0].register_forward_hook(lambda module, args, out: out * module.gate)
    x = torch.randn(3, 16, dtype=torch.float64)
    expected = model(x)
    keys = set(model.state_dict())
    summary = convert_model(model, form="full")
    assert dict(summary.skipped)["0"] == "it holds parameter 'gate' of its own"
    assert type(model[0]) is nn.Linear and summary.converted == ["2"]
    assert set(model.state_dict()) == keys and summary.params_after == summary.params_before == n_params(model)
    assert torch.equal(model(x), expected)
    conv = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 1), nn.Flatten(), nn.Linear(16, 2))
    conv[0].temperature = nn.Parameter(torch.ones(()))
    summary = convert_model(conv)
    assert dict(summary.skipped)["0"] == "it holds parameter 'temperature' of its own"
    assert conv[0].temperature is not None and summary.converted == ["1"]
    before = _snapshot(model)
    with pytest.raises(ValueError, match="^convert_model: '0' is named in include, but it holds parameter 'gate' "
                                         "of its own, which the new layer would drop; drop '0' from include to "
                                         "keep it dense$"):
        convert_model(model, include=["0"])
    _assert_unchanged(model, before)


@pytest.mark.parametrize("init", ["dense", "fresh"])
@pytest.mark.parametrize("dec", ["svd", "tucker", "cp", "tkd-cpd"])
def test_conversion_does_not_depend_on_the_default_device(dec, init):
    """Under another default device (meta here; set_default_device("cuda") likewise) the tucker/cp/tkd-cpd
    fits and every fresh conv were built there: "Cannot copy out of meta tensor" for a CPU model."""
    def model():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(),
                             nn.Linear(16 * 9, 16), nn.Linear(16, 2)).double()

    expected = model()
    torch.manual_seed(4)
    convert_model(expected, decomposition=dec, init=init)
    converted = model()
    torch.manual_seed(4)
    with torch.device("meta"):
        summary = convert_model(converted, decomposition=dec, init=init)
    assert summary.converted == ["0", "2", "4"]
    assert all(p.device.type == "cpu" and p.dtype == torch.float64 for p in converted.parameters())
    state, reference = converted.state_dict(), expected.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], v) for k, v in reference.items())
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    assert torch.equal(converted(x), expected(x))


def test_a_second_call_on_a_converted_model_says_so():
    """A model whose layers were all converted was told it held none, as a TorchScript module would."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    convert_model(model, keep_last=False)
    before = _snapshot(model)
    message = ("convert_model found no nn.Linear/nn.Conv2d/Conv1D left to convert in this Sequential: its layers "
               "are dynrank layers already ('0', '2', converted by an earlier call); call unconvert_model(model) "
               "first to convert them again with other settings")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        convert_model(model, keep_last=False)
    _assert_unchanged(model, before)


def test_a_model_of_other_convolutions_is_told_which_are_converted():
    """An nn.Conv1d model was told it held no Conv1D module, as a TorchScript module would."""
    audio = nn.Sequential(nn.Conv1d(16, 32, 3), nn.ReLU(), nn.Conv3d(32, 32, 3), nn.ConvTranspose2d(4, 4, 3))
    message = ("convert_model found no nn.Linear/nn.Conv2d/Conv1D module in this Sequential; its convolutions "
               "('0' (Conv1d), '2' (Conv3d), '3' (ConvTranspose2d)) are of kinds it does not convert: it "
               "converts nn.Linear, nn.Conv2d and transformers' Conv1D, not nn.Conv1d, nn.Conv3d or "
               "transposed convolutions")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        convert_model(audio)


def test_include_naming_a_layer_converted_earlier_says_so():
    """Such a name was reported as a typo, and missing from the model's names listed."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 2))
    convert_model(model, include=["0", "1"])
    before = _snapshot(model)
    message = ("convert_model: include '0' names only layers converted already (dynrank layers an earlier call "
               "made); drop it from include, or call unconvert_model(model) first to convert those layers again "
               "with other settings")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        convert_model(model, include=["0", "2"])
    message = ("convert_model: these patterns match no nn.Linear/nn.Conv2d/Conv1D of the model: include 'x' "
               "(patterns are full module names or fnmatch globs such as 'enc.*'; the model's are: '2', '3'; "
               "converted already: '0', '1'); and include '[01]' (matching '0', '1') names only layers converted "
               "already (dynrank layers an earlier call made); drop it from include, or call "
               "unconvert_model(model) first to convert those layers again with other settings")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        convert_model(model, include=["[01]", "x", "2"])
    _assert_unchanged(model, before)
    summary = convert_model(model, exclude=["0"])     # an exclude met already: "0" stays as it is
    assert summary.converted == ["2"] and isinstance(model[0], FusedLowRankLinear)


def test_converting_under_inference_mode_gives_a_model_that_trains():
    """The replacements were inference tensors: the first backward failed far from convert_model."""
    torch.manual_seed(0)
    model = mlp()
    with torch.inference_mode():
        convert_model(model, rank_ratio=0.5)
    assert not any(p.is_inference() for p in model.parameters())
    model(torch.randn(4, model[0].in_features)).sum().backward()
    assert all(p.grad is not None for p in model[0].parameters())


@pytest.mark.parametrize("init", ["dense", "fresh"])
def test_a_channels_last_conv_stays_channels_last(init):
    conv = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    conv.to(memory_format=torch.channels_last)
    convert_model(conv, rank_ratio=0.5, init=init, form="full")
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_a_model_with_no_layer_modules_says_so():
    """A scripted model holds no nn.Linear modules: the message blamed include/exclude/min_features."""
    eager = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    for scripted in (torch.jit.script(eager), torch.jit.trace(eager, torch.randn(2, 4))):
        message = (f"convert_model found no nn.Linear/nn.Conv2d/Conv1D module in this {type(scripted).__name__}: "
                   f"a TorchScript module holds none (torch.jit.script and torch.jit.trace make its layers script "
                   f"modules); convert the eager model before scripting or tracing it")
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            convert_model(scripted)
    exported = torch.export.export(eager, (torch.randn(2, 4),)).module()
    message = ("convert_model found no nn.Linear/nn.Conv2d/Conv1D module in this GraphModule: its parameters are "
               "plain parameters of a graph (torch.export's ExportedProgram.module() inlines the layers), which "
               "holds no layer module; convert the eager model before exporting it")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        convert_model(exported)


@pytest.mark.parametrize("model, kinds", [
    (lambda: nn.Sequential(nn.Bilinear(16, 16, 16)), "Bilinear"),
    (lambda: nn.Sequential(nn.Embedding(10, 16), nn.LSTM(16, 32)), "Embedding, LSTM"),
    (lambda: torch.fx.symbolic_trace(nn.Sequential(nn.Bilinear(4, 4, 4), nn.ReLU())), "Bilinear")],
    ids=["bilinear", "embedding_lstm", "fx_traced"])
def test_an_eager_model_of_other_layers_is_told_which_it_holds(model, kinds):
    """An eager model of layers that do not convert was told that a TorchScript or exported module holds
    none, which it is not."""
    model = model()
    before = _snapshot(model)
    message = (f"convert_model found no nn.Linear/nn.Conv2d/Conv1D module in this {type(model).__name__}: its "
               f"parameters are in {kinds} modules, and it converts only nn.Linear, nn.Conv2d and transformers' "
               f"Conv1D modules (not a weight used directly through F.linear or F.conv2d)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        convert_model(model)
    _assert_unchanged(model, before)


def test_a_model_holding_no_parameters_says_so():
    with pytest.raises(ValueError, match=r"^convert_model found no nn\.Linear/nn\.Conv2d/Conv1D module in this "
                                         r"Sequential, which holds no parameters$"):
        convert_model(nn.Sequential(nn.ReLU(), nn.Flatten()))
