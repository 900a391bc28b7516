"""The paper's Comp. ratio (Eq. 4–6) and the measured wall-clock ratio."""

import pytest
from torch import nn

from dynrank.cost import (ParamCounts, comp_ratio, cost_report, epoch_times, form_epochs, layer_param_counts,
                          measured_comp_ratio, param_counts)
from dynrank.linear import FusedLowRankLinear
from dynrank.monitor import RankMonitor


def resnet20_conv_shapes():
    """The 19 factorized 3×3 convs of ResNet20: first conv 3→16, then 3 stages × 3 blocks × 2 convs."""
    shapes, c_in = [(16, 3, 3, 3)], 16
    for c in (16, 32, 64):
        for _ in range(3):
            shapes += [(c, c_in, 3, 3), (c, c, 3, 3)]
            c_in = c
    return shapes


def test_resnet20_reproduces_paper_counts_and_ratio():
    shapes = resnet20_conv_shapes()
    assert len(shapes) == 19
    dense_convs = sum(a * b * c * d for a, b, c, d in shapes)
    assert dense_convs == 267_696
    # Unfactorized trainable parameters, counted by hand: 1×1 projection shortcuts with BN at the
    # first block of each stage (16·16 + 16·32 + 32·64 weights, 2·(16+32+64) BN), BN after every
    # 3×3 conv (2·(16 + 6·16 + 6·32 + 6·64)) and the 64→10 classifier with bias.
    other = (16 * 16 + 16 * 32 + 32 * 64) + 2 * (16 + 32 + 64) + 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64) + (64 * 10 + 10)
    counts = param_counts(shapes, rank_ratio=0.5, other_params=other)
    assert (counts.full, counts.lowrank) == (272_762, 155_170)             # the paper's §5.2 numbers
    ratio = comp_ratio(counts, epochs=150, inflate_epoch=60, deflate_epoch=135)
    assert round(ratio, 4) == 0.7844
    # Eq. 6 by hand
    assert ratio == pytest.approx((75 * 272_762 + 75 * 155_170) / (150 * 272_762), rel=1e-15)
    # Shortcut convs only at the two stage transitions: d = 272,474 → 0.7842, not the paper's figure.
    other_2 = other - 16 * 16 - 2 * 16
    assert round(comp_ratio(param_counts(shapes, other_params=other_2), 150, 60, 135), 4) == 0.7842


def test_layer_param_counts():
    assert layer_param_counts((64, 64, 3, 3)) == (36_864, 32 * 64 * 9 + 64 * 32)
    assert layer_param_counts((16, 3, 3, 3)) == (432, 8 * 27 + 16 * 8)
    assert layer_param_counts((10, 40), rank=4) == (400, 4 * 50)
    assert layer_param_counts((10, 40), rank_ratio=0.25) == (400, 2 * 50)           # int(0.25·10)
    assert layer_param_counts((4, 1, 1, 1), rank_ratio=1.0) == (4, 1 * 1 + 4 * 1)   # capped at min(out, in·kh·kw)
    assert layer_param_counts((32, 16, 3, 3), rank=(8, 4), decomposition="tucker") == \
        (4608, 16 * 4 + 8 * 4 * 9 + 32 * 8)
    with pytest.raises(ValueError, match="at most"):
        layer_param_counts((10, 4), rank=5)
    with pytest.raises(ValueError, match="shape must be"):
        layer_param_counts((10, 4, 3))
    with pytest.raises(ValueError, match="decomposition"):
        layer_param_counts((10, 4, 3, 3), decomposition="cp")
    with pytest.raises(ValueError, match="rank_ratio"):
        layer_param_counts((10, 4), rank_ratio=0)


def test_param_counts_from_model_are_form_independent():
    model = nn.Sequential(FusedLowRankLinear(30, 20, 4), nn.BatchNorm1d(20), FusedLowRankLinear(20, 12, 3, bias=False),
                          nn.Linear(12, 5))
    other = 20 + 2 * 20 + 12 * 5 + 5                                   # bias of layer 0, BN, classifier
    expected = ParamCounts(full=other + 30 * 20 + 20 * 12, lowrank=other + 4 * 50 + 3 * 32, other=other)
    for step in ("lowrank", "full", "adapter"):
        if step == "full":
            model[0].inflate(), model[2].inflate()
        if step == "adapter":
            model[0].deflate(), model[2].deflate()
        got = param_counts(model)
        assert (got.full, got.lowrank, got.other) == (expected.full, expected.lowrank, expected.other)
        assert [n for n, _, _ in got.layers] == ["0", "2"]
    trainable_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_adapter == expected.lowrank                       # adapter epochs train d_ρ parameters
    with pytest.raises(ValueError, match="other_params"):
        param_counts(model, other_params=3)


def test_comp_ratio_edges_and_errors():
    c = ParamCounts(full=1000, lowrank=400, other=0)
    assert comp_ratio(c, 100, 0, 100) == 1.0                           # full-rank throughout
    assert comp_ratio(c, 100, None, None) == pytest.approx(0.4)         # low-rank throughout
    assert comp_ratio(c, 100, 30, 30) == pytest.approx(0.4)
    assert comp_ratio(c, 100, 20, None) == pytest.approx((80 * 1000 + 20 * 400) / 100_000)
    with pytest.raises(ValueError, match="inflate_epoch ≤ deflate_epoch"):
        comp_ratio(c, 100, 60, 50)
    with pytest.raises(ValueError, match="epochs"):
        comp_ratio(c, 0, 0, 0)
    with pytest.raises(TypeError, match="layer specs"):
        param_counts("resnet20")


def _run(forms_and_seconds):
    """A RankMonitor filled with given epoch records (no model, no timing)."""
    run = RankMonitor(None, name="synthetic")
    run.records = [{"epoch": i, "form": f, "wall_seconds": t, "scalars": {}, "layers": {}}
                   for i, (f, t) in enumerate(forms_and_seconds)]
    return run


def test_measured_ratio_from_epoch_times():
    run = _run([("lowrank", 5.0), ("lowrank", 3.0), ("lowrank", 3.0), ("full", 12.0), ("full", 10.0),
                ("adapter", 9.0), ("adapter", 9.0)])
    assert epoch_times(run) == {"lowrank": [5.0, 3.0, 3.0], "full": [12.0, 10.0], "adapter": [9.0, 9.0]}
    assert epoch_times(run, skip_first=1) == {"lowrank": [3.0, 3.0], "full": [10.0], "adapter": [9.0]}
    # As run: 51 s over 7 epochs at t_full = 11 s.
    assert measured_comp_ratio(run) == pytest.approx(51.0 / (7 * 11.0))
    # Projected on E=150, I=60, D=135 with mean times 11/3, 11, 9.
    expected = (60 * 11.0 / 3 + 75 * 11.0 + 15 * 9.0) / (150 * 11.0)
    assert measured_comp_ratio(run, 150, 60, 135) == pytest.approx(expected)
    baseline = _run([("dense", 20.0), ("dense", 22.0)])
    assert measured_comp_ratio(run, full_epoch_seconds=baseline) == pytest.approx(51.0 / (7 * 21.0))
    assert measured_comp_ratio(run, full_epoch_seconds=25.5) == pytest.approx(51.0 / (7 * 25.5))
    with pytest.raises(ValueError, match="full-form epoch time"):
        measured_comp_ratio(_run([("lowrank", 1.0)]))
    with pytest.raises(ValueError, match="adapter"):
        measured_comp_ratio(_run([("lowrank", 1.0), ("full", 2.0)]), 10, 2, 8)


def test_form_epochs_of_each_schedule():
    assert form_epochs(150, 55, 120) == {"lowrank": 55, "full": 65, "adapter": 30}
    assert form_epochs(150, None, None) == {"lowrank": 150, "full": 0, "adapter": 0}      # fixed low rank
    assert form_epochs(150, 0, None) == {"lowrank": 0, "full": 150, "adapter": 0}         # full rank
    with pytest.raises(ValueError, match="inflate_epoch ≤ deflate_epoch"):
        form_epochs(150, 120, 55)


def test_cost_report_shows_both():
    counts = ParamCounts(full=272_762, lowrank=155_170, other=0)
    run = _run([("lowrank", 4.0), ("full", 10.0), ("adapter", 8.0)])
    report = cost_report(counts, 150, 60, 135, run=run)
    assert round(report.comp_ratio, 4) == 0.7844
    assert report.measured_ratio == pytest.approx((60 * 4.0 + 75 * 10.0 + 15 * 8.0) / 1500.0)
    text = str(report)
    assert "0.7844" in text and f"{report.measured_ratio:.4f}" in text and "measured" in text
    assert report.lowrank_ratio == pytest.approx(155_170 / 272_762)
