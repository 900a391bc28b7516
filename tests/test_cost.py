"""The paper's Comp. ratio (Eq. 4–6) and the measured wall-clock ratio."""

import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from dynrank.conv import LowRankConv2d, adapter_costs, adapter_work
from dynrank.convert import convert_model
from dynrank.cost import (ParamCounts, comp_ratio, cost_report, epoch_times, form_epochs, layer_param_counts,
                          measured_comp_ratio, param_counts)
from dynrank.linear import FusedLowRankLinear
from dynrank.monitor import RankMonitor
from dynrank.scheduler import DynamicRankScheduler
from dynrank.schedules import finetune_schedule, midpoint_schedule, schedule_from_lr


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
    # Tucker ranks are (r_in, r_out), as LowRankConv2d's: 1×1 C→r_in, core r_in→r_out, 1×1 r_out→F.
    assert layer_param_counts((32, 16, 3, 3), rank=(8, 4), decomposition="tucker") == \
        (4608, 16 * 8 + 4 * 8 * 9 + 32 * 4)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 4\], got 5"):
        layer_param_counts((10, 4), rank=5)
    with pytest.raises(TypeError, match=r"rank must be an int, got float \(2\.5\)"):
        layer_param_counts((10, 4), rank=2.5)
    with pytest.raises(ValueError, match=r"shape must be \(out, in\) or \(F, C, kh, kw\) of positive ints, got \(10, 4, 3\)"):
        layer_param_counts((10, 4, 3))
    with pytest.raises(TypeError, match=r"shape must be a tuple \(out, in\) or \(F, C, kh, kw\), got int \(10\)"):
        layer_param_counts(10)
    with pytest.raises(ValueError, match="decomposition must be one of svd, tucker, cp, tkd-cpd for a conv shape, "
                                         "got 'lora'"):
        layer_param_counts((10, 4, 3, 3), decomposition="lora")
    with pytest.raises(ValueError, match=r"decomposition must be 'svd' for a linear shape \(out, in\), got 'tucker'"):
        layer_param_counts((10, 4), decomposition="tucker")
    with pytest.raises(ValueError, match=r"rank_ratio must be in \(0, 1\], got 0"):
        layer_param_counts((10, 4), rank_ratio=0)


CONV_RANKS = {"svd": [1, 5, 27, 32], "tucker": [1, (4, 12), (12, 4), (16, 32), 7],
              "cp": [1, 5, 30], "tkd-cpd": [1, (4, 3, 6), (6, 5, 2), 3]}


@pytest.mark.parametrize("decomposition", sorted(CONV_RANKS))
def test_layer_param_counts_match_lowrank_conv2d(decomposition):
    """Counts from a shape equal a real LowRankConv2d's parameters, in the layer's own rank convention."""
    C, F, kh, kw = 16, 32, 3, 1
    cases = [dict(rank=r) for r in CONV_RANKS[decomposition]] + [dict(rank_ratio=q) for q in (0.1, 0.5, 1.0)]
    for case in cases:
        layer = LowRankConv2d(C, F, (kh, kw), decomposition=decomposition, bias=False, **case)
        factor_params = sum(p.numel() for p in layer.parameters())
        rank = case.get("rank")
        got = layer_param_counts((F, C, kh, kw), rank=rank, rank_ratio=case.get("rank_ratio", 0.5),
                                 decomposition=decomposition)
        assert got == (F * C * kh * kw, factor_params), (decomposition, case, layer.rank)
        assert layer_param_counts((F, C, kh, kw), rank=layer.rank, decomposition=decomposition) == got
        spec = [{"shape": (F, C, kh, kw), "rank": layer.rank, "decomposition": decomposition}]
        assert (param_counts(spec).full, param_counts(spec).lowrank) == \
            (param_counts(nn.Sequential(layer)).full, param_counts(nn.Sequential(layer)).lowrank)


@pytest.mark.parametrize("decomposition,rank", [("tucker", (100, 100)), ("tucker", (2, 33)), ("svd", 145),
                                                ("cp", 10**4), ("tkd-cpd", (4, 10**4, 4)), ("tucker", (2.0, 3))])
def test_layer_param_counts_refuses_ranks_the_layer_refuses(decomposition, rank):
    with pytest.raises((TypeError, ValueError)) as layer_error:
        LowRankConv2d(4, 32, 3, rank=rank, decomposition=decomposition)
    with pytest.raises(layer_error.type, match=f"^{re.escape(str(layer_error.value))}$"):
        layer_param_counts((32, 4, 3, 3), rank=rank, decomposition=decomposition)


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
    with pytest.raises(ValueError, match="other_params is only for explicit layer lists"):
        param_counts(model, other_params=3)


def _scheduler_forms(epochs, inflate, deflate):
    """Epochs per form as DynamicRankScheduler.form_at gives them (the reference for None's meaning)."""
    model = nn.Sequential(FusedLowRankLinear(8, 8, 2))
    scheduler = DynamicRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), inflate, deflate,
                                     epochs=epochs)
    forms = [scheduler.form_at(e) for e in range(epochs)]
    return {form: forms.count(form) for form in ("lowrank", "full", "adapter")}


SCHEDULES = [
    (150, schedule_from_lr(150, milestones=[100, 130])),
    (150, schedule_from_lr(150, milestones=[100], full_rank_fraction=0.9)),        # slides back: D = E
    (40, schedule_from_lr(40, lrs=[0.5 * 0.1 * (1 + math.cos(math.pi * e / 40)) for e in range(40)])),
    (150, midpoint_schedule(150, milestones=[100])),
    (10, finetune_schedule(10)),                                                    # (None, 5)
    (5, finetune_schedule(5)),
    (3, finetune_schedule(3, deflate_fraction=0.1)),
    (20, (0, None)), (20, (7, None)),
]


@pytest.mark.parametrize("epochs,schedule", SCHEDULES)
def test_comp_ratio_reads_every_schedule_function_as_the_scheduler(epochs, schedule):
    c = ParamCounts(full=1000, lowrank=400, other=0)
    per_form = _scheduler_forms(epochs, *schedule)
    assert form_epochs(epochs, *schedule) == per_form
    expected = (per_form["full"] * 1000 + (per_form["lowrank"] + per_form["adapter"]) * 400) / (epochs * 1000)
    assert comp_ratio(c, epochs, *schedule) == pytest.approx(expected, rel=1e-15)
    assert cost_report(c, epochs, *schedule).comp_ratio == pytest.approx(expected, rel=1e-15)


def test_comp_ratio_refuses_counts_it_cannot_divide_by():
    for counts in (ParamCounts(0, 0, 0), nn.ReLU(), nn.Sequential(nn.Linear(3, 3).requires_grad_(False))):
        with pytest.raises(ValueError, match=r"counts.full \(d, the full model's trainable parameters\) must be > 0 "
                                             r"to divide by, got 0"):
            comp_ratio(counts, 10, 2, 5)
    with pytest.raises(ValueError, match=r"counts.full must be a parameter count \(int ≥ 0\), got -10"):
        comp_ratio(ParamCounts(full=-10, lowrank=1, other=0), 10, 2, 5)
    with pytest.raises(ValueError, match=r"counts.lowrank must be a parameter count \(int ≥ 0\), got -1"):
        comp_ratio(ParamCounts(full=10, lowrank=-1, other=0), 10, 2, 5)
    with pytest.raises(TypeError, match=r"counts.lowrank must be a parameter count \(int ≥ 0\), got float \(nan\)"):
        cost_report(ParamCounts(full=10, lowrank=math.nan, other=0), 10, 2, 5)
    with pytest.raises(TypeError, match=r"counts.other must be a parameter count \(int ≥ 0\), got str \('5'\)"):
        comp_ratio(ParamCounts(full=10, lowrank=1, other="5"), 10, 2, 5)
    with pytest.raises(TypeError, match=r"inflate_epoch must be an int ≥ 0, got float \(2\.5\)"):
        comp_ratio(ParamCounts(full=10, lowrank=1, other=0), 10, 2.5, 5)


def test_comp_ratio_takes_whole_parameter_counts_only():
    """A count is a number of parameters: a fraction (or a whole float) is refused as the docstring says, a numpy
    integer is one."""
    for what in ("full", "lowrank", "other", "adapter"):
        counts = dict(full=10, lowrank=5, other=1, adapter=3)
        for value in (5.25, 5.0, math.inf):
            counts[what] = value
            for call in (comp_ratio, cost_report):
                with pytest.raises(TypeError, match=re.escape(f"counts.{what} must be a parameter count (int ≥ 0), "
                                                              f"got float ({value!r})")):
                    call(ParamCounts(**counts), 10, 3, 7)
    c = ParamCounts(full=np.int64(10), lowrank=np.int32(5), other=np.int64(1), adapter=np.int64(3))
    assert comp_ratio(c, 10, 3, 7) == (3 * 5 + 4 * 10 + 3 * 3) / (10 * 10)
    assert cost_report(c, 10, 3, 7).comp_ratio == comp_ratio(c, 10, 3, 7)


def test_comp_ratio_edges_and_errors():
    c = ParamCounts(full=1000, lowrank=400, other=0)
    assert comp_ratio(c, 100, 0, 100) == 1.0                           # full-rank throughout
    assert comp_ratio(c, 100, None, None) == pytest.approx(0.4)         # low-rank throughout (no scheduler)
    assert comp_ratio(c, 100, None, 100) == 1.0                        # start full, as the scheduler's None
    assert comp_ratio(c, 100, None, 40) == pytest.approx((40 * 1000 + 60 * 400) / 100_000)
    assert comp_ratio(c, 100, 30, 30) == pytest.approx(0.4)
    assert comp_ratio(c, 100, 20, None) == pytest.approx((80 * 1000 + 20 * 400) / 100_000)
    with pytest.raises(ValueError, match="need 0 ≤ inflate_epoch ≤ deflate_epoch ≤ epochs, got I=60, D=50, E=100"):
        comp_ratio(c, 100, 60, 50)
    with pytest.raises(ValueError, match="epochs must be an int ≥ 1, got 0"):
        comp_ratio(c, 0, 0, 0)
    with pytest.raises(TypeError, match="expected an nn.Module or a list of layer specs, got str"):
        param_counts("resnet20")


@pytest.mark.parametrize("shape", [(64, 64, 3, 3), [64, 64, 3, 3], torch.Size([64, 32]), (np.int64(10), 40)])
def test_param_counts_of_one_shape_says_to_wrap_it_in_a_list(shape):
    """param_counts takes a list of layer specs; given one shape, as layer_param_counts takes it, it said
    "layer spec 0 must be a shape tuple or a dict, got int".  A list of shapes is not read as one shape."""
    dims = tuple(int(size) for size in shape)
    with pytest.raises(TypeError, match=re.escape(f"param_counts takes a list of layer specs, got one weight shape "
                                                  f"{dims}: wrap it in a list, param_counts([{dims}])")):
        param_counts(shape)
    assert param_counts([shape]).layers == [("layer0", *layer_param_counts(dims))]
    with pytest.raises(TypeError, match="layer spec 0 must be a shape tuple or a dict, got bool"):
        param_counts([True])


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
    # A plain dense run's epochs are its own t_full: its ratio is 1, as run and on a full-rank schedule.
    assert measured_comp_ratio(baseline) == pytest.approx(1.0, rel=1e-15)
    assert measured_comp_ratio(baseline, 10, 0, None) == pytest.approx(1.0, rel=1e-15)
    assert measured_comp_ratio(run, full_epoch_seconds=25.5) == pytest.approx(51.0 / (7 * 25.5))
    with pytest.raises(ValueError, match="no full-form epoch time: record full-rank epochs or pass full_epoch_seconds"):
        measured_comp_ratio(_run([("lowrank", 1.0)]))
    with pytest.raises(ValueError, match=r"the schedule needs \['adapter'\] epochs but the run recorded none "
                                         r"\(recorded: \['full', 'lowrank'\]\)"):
        measured_comp_ratio(_run([("lowrank", 1.0), ("full", 2.0)]), 10, 2, 8)


def test_skip_first_leaves_out_the_first_epochs_of_the_run_the_baseline_and_the_report():
    """skip_first drops the first epochs of each form (warm-up, compilation) wherever epoch times are read:
    in the run, in a full-rank baseline run and in the seconds a report prints beside its ratio."""
    run = _run([("lowrank", 9.0), ("lowrank", 1.0), ("full", 8.0), ("full", 2.0)])
    baseline = _run([("full", 50.0), ("full", 2.0)])
    # By hand: t_lowrank = 1, t_full = 2 once the first epoch of each form is left out.
    assert measured_comp_ratio(run, skip_first=1) == pytest.approx((1.0 + 2.0) / (2 * 2.0), rel=1e-15)
    assert measured_comp_ratio(run, 4, None, None, full_epoch_seconds=baseline, skip_first=1) == \
        pytest.approx(1.0 / 2.0, rel=1e-15)
    assert measured_comp_ratio(run, 4, None, None, full_epoch_seconds=baseline) == \
        pytest.approx(5.0 / 26.0, rel=1e-15)                                # every epoch: t = 5 over 26
    report = cost_report(ParamCounts(full=100, lowrank=50, other=0), 4, 2, 4, run=run, skip_first=1)
    assert report.measured_ratio == pytest.approx((2 * 1.0 + 2 * 2.0) / (4 * 2.0), rel=1e-15)
    assert report.epoch_seconds == {"lowrank": 1.0, "full": 2.0}
    assert str(report).splitlines()[-1] == "measured (wall-clock per epoch: full 2 s, lowrank 1 s): 0.7500"
    report = cost_report(ParamCounts(full=100, lowrank=50, other=0), 4, 2, 4, run=run)
    assert report.epoch_seconds == {"lowrank": 5.0, "full": 5.0}
    assert report.measured_ratio == pytest.approx(1.0, rel=1e-15)


def test_form_epochs_of_each_schedule():
    assert form_epochs(150, 55, 120) == {"lowrank": 55, "full": 65, "adapter": 30}
    assert form_epochs(150, None, None) == {"lowrank": 150, "full": 0, "adapter": 0}      # fixed low rank
    assert form_epochs(150, None, 75) == {"lowrank": 0, "full": 75, "adapter": 75}        # fine-tuning preset
    assert form_epochs(150, 0, None) == {"lowrank": 0, "full": 150, "adapter": 0}         # full rank
    with pytest.raises(ValueError, match="need 0 ≤ inflate_epoch ≤ deflate_epoch ≤ epochs, got I=120, D=55, E=150"):
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


def test_measured_ratio_refuses_bad_times():
    run = _run([("lowrank", 1.0), ("full", 2.0), ("adapter", 1.5)])
    for bad in (-2.0, 0.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=f"full_epoch_seconds must be a finite number > 0 \\(seconds of one "
                                             f"full-rank epoch\\), got {bad}"):
            measured_comp_ratio(run, 3, 1, 2, full_epoch_seconds=bad)
    with pytest.raises(TypeError, match="full_epoch_seconds must be seconds \\(a number\\) or a full-rank run "
                                        "\\(a RankMonitor or its records\\), got str"):
        measured_comp_ratio(run, full_epoch_seconds="20 s")
    for bad in (-1.0, math.nan, math.inf):
        records = [{"epoch": 0, "form": "full", "wall_seconds": 2.0}, {"epoch": 1, "form": "full", "wall_seconds": bad}]
        with pytest.raises(ValueError, match=f"wall_seconds must be a finite number ≥ 0 or None, got "
                                             f"{re.escape(repr(bad))} in record 1 \\(epoch 1\\)"):
            measured_comp_ratio(records)
        with pytest.raises(ValueError, match="wall_seconds must be"):
            epoch_times(records)
    # No number at all is a TypeError (a number out of range, a ValueError).
    records[1]["wall_seconds"] = "3 s"
    with pytest.raises(TypeError, match=r"wall_seconds must be a finite number ≥ 0 or None, got str \('3 s'\) in "
                                        r"record 1 \(epoch 1\)"):
        measured_comp_ratio(records)
    with pytest.raises(TypeError, match="wall_seconds must be"):
        epoch_times(records)
    # Untimed epochs (wall_seconds None) are left out; with none timed there is no ratio, not a ZeroDivisionError.
    untimed = [{"form": "full", "wall_seconds": None}]
    assert epoch_times(untimed) == {}
    with pytest.raises(ValueError, match=r"the run has no timed epochs \(no record with wall_seconds\)"):
        measured_comp_ratio(untimed, full_epoch_seconds=2.0)
    with pytest.raises(ValueError, match="the full-form epochs took 0.0 s on average; a ratio over them is undefined"):
        measured_comp_ratio(_run([("full", 0.0), ("lowrank", 1.0)]))
    with pytest.raises(TypeError, match=r"run must be a RankMonitor or its list of epoch records \(dicts\); record 0 "
                                        r"is float \(1\.0\)"):
        epoch_times([1.0, 2.0])
    with pytest.raises(TypeError, match="run must be a RankMonitor or its list of epoch records \\(dicts\\), got str"):
        measured_comp_ratio("runs/dynamic.json")
    with pytest.raises(ValueError, match="skip_first must be an int ≥ 0, got -1"):
        epoch_times(run, skip_first=-1)


def _deflate_rank_run(deflate_rank, epochs=10, inflate=3, deflate=7, with_scheduler=False):
    """A monitored dynamic-rank run of the model below; returns model, scheduler, monitor and the counts
    taken before training (given the scheduler if ``with_scheduler``)."""
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(30, 20, 4), nn.BatchNorm1d(20), FusedLowRankLinear(20, 12, 3, bias=False),
                          nn.Linear(12, 5))
    scheduler = DynamicRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), inflate, deflate,
                                     deflate_rank=deflate_rank)
    before = param_counts(model, scheduler=scheduler) if with_scheduler else param_counts(model)
    monitor = RankMonitor(model).attach(scheduler)
    for epoch in range(epochs):
        scheduler.step(epoch)
        with monitor.epoch(epoch):
            pass
    return model, scheduler, monitor, before


def test_comp_ratio_after_deflate_to_another_rank():
    """After the loop the layers are adapters at deflate_rank; the lowrank epochs still count the lowrank rank.

    By hand: other = 20 (bias 0) + 40 (BN) + 65 (classifier) = 125; d = 125 + 600 + 240 = 965;
    lowrank d_ρ = 125 + 4·50 + 3·32 = 421; adapter d_ρ at ranks 2 and 1 = 125 + 2·50 + 1·32 = 257.
    E=10, I=3, D=7: (3·421 + 4·965 + 3·257) / (10·965).
    """
    expected = (3 * 421 + 4 * 965 + 3 * 257) / (10 * 965)
    model, scheduler, monitor, _ = _deflate_rank_run({"0": 2, "2": 1})
    assert [layer.form for _, layer in scheduler.layers] == ["adapter", "adapter"]
    report = cost_report(model, 10, 3, 7, run=monitor)              # README's call, after the loop
    assert report.comp_ratio == pytest.approx(expected, rel=1e-15)
    assert (report.counts.full, report.counts.lowrank, report.counts.adapter) == (965, 421, 257)
    assert "low-rank d_rho=421, adapter d_rho=257" in str(report)
    before = _deflate_rank_run({"0": 2, "2": 1}, with_scheduler=True)[3]   # counted before training
    assert (before.full, before.lowrank, before.adapter) == (965, 421, 257)
    assert comp_ratio(before, 10, 3, 7) == pytest.approx(expected, rel=1e-15)
    assert comp_ratio(model, 10, 3, 7, lowrank_ranks={"0": 4, "2": 3}) == pytest.approx(expected, rel=1e-15)
    # The layers remember the rank they had in lowrank form: the bare call counts right too.
    assert cost_report(model, 10, 3, 7).comp_ratio == pytest.approx(expected, rel=1e-15)
    assert comp_ratio(model, 10, 3, 7, scheduler=scheduler) == pytest.approx(expected, rel=1e-15)
    # Layers that were never lowrank here (converted straight to adapter form): refused, not counted
    # at the adapter rank.
    torch.manual_seed(0)
    never = nn.Sequential(nn.Linear(30, 20), nn.BatchNorm1d(20), nn.Linear(20, 12, bias=False), nn.Linear(12, 5))
    convert_model(never, form="adapter", rank_ratio=0.25)
    message = r"layers \['0', '2'\] are in adapter form \(rank 5 for '0'\), and the rank they had in lowrank form"
    with pytest.raises(ValueError, match=message):
        cost_report(never, 10, 3, 7)
    # No lowrank epochs in the schedule: the adapter rank is all it needs, known or not.  By hand, the
    # adapters of `never` at ranks int(0.25·20) = 5 and int(0.25·12) = 3: d_ρ = 125 + 5·50 + 3·32 = 471.
    assert comp_ratio(model, 10, 0, 7) == pytest.approx((7 * 965 + 3 * 257) / (10 * 965), rel=1e-15)
    for inflate_epoch in (0, None):
        assert comp_ratio(never, 10, inflate_epoch, 7) == pytest.approx((7 * 965 + 3 * 471) / (10 * 965), rel=1e-15)
        assert cost_report(never, 10, inflate_epoch, 7).counts.lowrank == 471


def test_comp_ratio_after_deflate_at_the_same_rank():
    """deflate_rank None keeps each layer's rank: Eq. 6 with one d_ρ, from the scheduler or from the run."""
    expected = (4 * 965 + 6 * 421) / (10 * 965)
    model, scheduler, monitor, before = _deflate_rank_run(None)
    assert cost_report(model, 10, 3, 7, run=monitor).comp_ratio == pytest.approx(expected, rel=1e-15)
    assert cost_report(model, 10, 3, 7).comp_ratio == pytest.approx(expected, rel=1e-15)     # the bare call
    assert comp_ratio(before, 10, 3, 7) == pytest.approx(expected, rel=1e-15)
    assert comp_ratio(model, 10, 3, 7, scheduler=scheduler) == pytest.approx(expected, rel=1e-15)
    assert (param_counts(model, scheduler=scheduler).lowrank, param_counts(model, scheduler=scheduler).adapter) == \
        (421, None)
    assert "adapter d_rho" not in str(cost_report(model, 10, 3, 7, run=monitor))


def test_a_scheduler_keeping_the_rank_counts_adapter_layers_never_lowrank_here():
    """A run resumed into a model converted straight to adapter form: the layer was never lowrank in this
    process and no run is given, but a scheduler without deflate_rank deflated it at the rank it has.

    By hand, layer '0' at rank int(0.25·32) = 8: other = 32 (its bias) + 32·10 + 10 (classifier) = 362;
    d = 362 + 32·32 = 1386; d_ρ = 362 + 8·(32 + 32) = 874.  E=10, I=3, D=7: (3·874 + 4·1386 + 3·874) / (10·1386).
    """
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    convert_model(model, rank_ratio=0.25, form="adapter")
    assert (model[0].form, model[0].rank) == ("adapter", 8)
    assert _trainable(model) == 874                                  # the adapter epochs train d_ρ
    with pytest.raises(ValueError, match=r"layers \['0'\] are in adapter form \(rank 8 for '0'\), and the rank they "
                                         r"had in lowrank form"):
        cost_report(model, 10, 3, 7)                                 # nothing says the lowrank rank
    scheduler = DynamicRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 3, 7)
    expected = (3 * 874 + 4 * 1386 + 3 * 874) / (10 * 1386)
    counts = param_counts(model, scheduler=scheduler)
    assert (counts.full, counts.lowrank, counts.other, counts.adapter) == (1386, 874, 362, None)
    assert counts.layers == [("0", 32 * 32, 8 * 64)]
    assert comp_ratio(model, 10, 3, 7, scheduler=scheduler) == pytest.approx(expected, rel=1e-15)
    assert cost_report(model, 10, 3, 7, scheduler=scheduler).comp_ratio == pytest.approx(expected, rel=1e-15)


def test_a_load_into_another_form_forgets_the_rank_the_layer_had_in_lowrank_form():
    """A layer trained lowrank at rank 2 here, then loaded from a run's adapter checkpoint at rank 8: the
    rank 2 says nothing of the rank the saved run trained lowrank at, so a schedule with lowrank epochs
    asks for it (counted at 2, Comp. was 0.5515).

    By hand: d = 32·32 + 32 = 1056; the adapter at rank 8: d_ρ = 8·64 + 32 = 544; lowrank at the given
    rank 4: 4·64 + 32 = 288.  E=10, I=3, D=6.
    """
    saved = FusedLowRankLinear(32, 32, rank=16, form="full")
    saved.deflate(rank=8)
    model = nn.Sequential(FusedLowRankLinear(32, 32, rank=2))
    model[0].load_state_dict(saved.state_dict())
    assert (model[0].form, model[0].rank) == ("adapter", 8)
    message = r"layers \['0'\] are in adapter form \(rank 8 for '0'\), and the rank they had in lowrank form"
    with pytest.raises(ValueError, match=message):
        comp_ratio(model, 10, 3, 6)
    with pytest.raises(ValueError, match=message):
        cost_report(model, 10, 3, 6)
    assert comp_ratio(model, 10, 3, 6, lowrank_ranks={"0": 4}) == \
        pytest.approx((3 * 288 + 3 * 1056 + 4 * 544) / (10 * 1056), rel=1e-15)
    assert comp_ratio(model, 10, 0, 6) == pytest.approx((6 * 1056 + 4 * 544) / (10 * 1056), rel=1e-15)


def test_lowrank_ranks_and_scheduler_checked():
    model, scheduler, _, _ = _deflate_rank_run({"0": 2, "2": 1})
    with pytest.raises(ValueError, match=r"lowrank_ranks names unknown layers \['1'\]; the model's dynrank layers are "
                                         r"\['0', '2'\]"):
        comp_ratio(model, 10, 3, 7, lowrank_ranks={"0": 4, "1": 3})
    with pytest.raises(TypeError, match=r"lowrank_ranks must be a dict layer name → rank, got int"):
        comp_ratio(model, 10, 3, 7, lowrank_ranks=4)
    with pytest.raises(ValueError, match=r"lowrank_ranks\['0'\] is not a valid rank of the layer"):
        comp_ratio(model, 10, 3, 7, lowrank_ranks={"0": 100, "2": 3})
    with pytest.raises(TypeError, match=r"scheduler must be a DynamicRankScheduler, got str"):
        param_counts(model, scheduler="scheduler")
    other = nn.Sequential(FusedLowRankLinear(8, 8, 2))
    with pytest.raises(ValueError, match="scheduler manages none of this model's dynrank layers"):
        param_counts(other, scheduler=scheduler)
    with pytest.raises(ValueError, match="lowrank_ranks and scheduler are only for a model"):
        param_counts([(8, 8)], lowrank_ranks={"layer0": 2})
    with pytest.raises(ValueError, match="scheduler and lowrank_ranks are only for a model; counts are ParamCounts"):
        comp_ratio(ParamCounts(full=10, lowrank=5, other=0), 4, 1, 2, scheduler=scheduler)
    lowrank = nn.Sequential(FusedLowRankLinear(8, 8, 2))
    with pytest.raises(ValueError, match=r"lowrank_ranks\['0'\] is 3 but layer '0' is in lowrank form at rank 2"):
        param_counts(lowrank, lowrank_ranks={"0": 3})


@pytest.mark.parametrize("decomposition, rank, deflate_rank, adapter_factors", [
    ("tucker", (4, 8), 4, 8 * 4 + 4 * 4 * 9 + 4 * 16),            # 4 means (4, 4): U_in, core, U_out
    ("tkd-cpd", (4, 4, 8), 4, 8 * 4 + 4 * (4 + 3 + 3 + 4) + 4 * 16),
])
def test_counts_before_training_take_an_int_deflate_rank_as_the_layer_does(decomposition, rank, deflate_rank,
                                                                           adapter_factors):
    """param_counts(model, scheduler=...) before any step, the call the cost errors recommend, raised
    "cannot unpack non-iterable int object" for a Tucker or TKD-CPD conv given an int deflate_rank: the
    layer reads 4 as (4, 4), the count read it raw.  Counted before and after the deflate alike."""
    model = nn.Sequential(LowRankConv2d(8, 16, 3, rank=rank, decomposition=decomposition), nn.ReLU())
    sched = DynamicRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, 2, deflate_rank=deflate_rank)
    before = param_counts(model, scheduler=sched)
    assert before.adapter == adapter_factors + 16                   # with the bias, trainable in every form
    sched.step(0), sched.step(1), sched.step(2)
    assert model[0].form == "adapter" and param_counts(model, scheduler=sched) == before
    assert sum(p.numel() for p in model[0].factors().values()) == adapter_factors


def test_a_frozen_layer_counts_no_trainable_parameters():
    """A layer frozen with requires_grad_(False) stays frozen in every form: its weight and factors counted as
    trainable (d_ρ 1056 and d 2080 for 544 and 1056 trainable) gave Comp. of parameters nothing trains."""
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(32, 32, 8), nn.ReLU(), FusedLowRankLinear(32, 32, 8))
    model[2].requires_grad_(False)
    counts = param_counts(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts.lowrank == trainable == 8 * 64 + 32
    model[0].inflate(), model[2].inflate()
    assert counts.full == sum(p.numel() for p in model.parameters() if p.requires_grad) == 32 * 32 + 32


def test_measured_comp_ratio_refuses_a_schedule_without_its_length():
    """measured_comp_ratio(run, None, I, D) returned the run's own ratio, silently ignoring I and D."""
    run = [dict(epoch=e, form=f, wall_seconds=s) for e, (f, s) in enumerate([("lowrank", 1.0), ("lowrank", 1.0),
                                                                              ("full", 2.0), ("full", 2.0)])]
    with pytest.raises(ValueError, match="inflate_epoch and deflate_epoch need epochs"):
        measured_comp_ratio(run, None, 3, 7)
    assert measured_comp_ratio(run, skip_first=0) == pytest.approx(6.0 / (4 * 2.0))


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _monitored_run(model, scheduler, epochs):
    """Trainable parameters of ``model`` in each epoch of a run that ``scheduler`` drives."""
    monitor = RankMonitor(model, metrics_every=1000)
    for epoch in range(epochs):
        scheduler.step(epoch)
        with monitor.epoch(epoch):
            pass
    return [record["trainable_params"] for record in monitor.records]


def test_layers_a_scheduler_does_not_manage_count_in_their_form():
    """A scheduler built on the backbone leaves the low-rank head lowrank the whole run; the head was counted
    as following the schedule (dense in the full epochs): Comp. 0.5256 for the run's 0.6058, d 10,432 for the
    7,360 its full epochs train."""
    backbone = nn.Sequential(FusedLowRankLinear(32, 64, rank=8), nn.ReLU(), FusedLowRankLinear(64, 64, rank=8))
    model = nn.Sequential(backbone, nn.ReLU(), FusedLowRankLinear(64, 64, rank=8))
    scheduler = DynamicRankScheduler(backbone, torch.optim.SGD(model.parameters(), lr=0.1), 2, 4)
    head = 8 * 128 + 64
    before = param_counts(model, scheduler=scheduler)
    assert (before.full, before.lowrank) == (32 * 64 + 64 * 64 + 128 + head, 8 * 96 + 8 * 128 + 128 + head)
    assert before.layers[-1] == ("2", 8 * 128, 8 * 128)
    per_epoch = _monitored_run(model, scheduler, 6)
    assert per_epoch == [before.lowrank] * 2 + [before.full] * 2 + [before.lowrank] * 2
    expected = sum(per_epoch) / (6 * max(per_epoch))
    report = cost_report(model, 6, 2, 4, scheduler=scheduler)            # after the run: the backbone in adapter form
    assert report.counts == before
    assert report.comp_ratio == pytest.approx(expected, rel=1e-15)
    assert comp_ratio(before, 6, 2, 4) == pytest.approx(expected, rel=1e-15)
    with pytest.raises(ValueError, match=r"lowrank_ranks names layers \['2'\] that the scheduler does not manage"):
        param_counts(model, scheduler=scheduler, lowrank_ranks={"2": 4})


def test_a_partly_frozen_layer_counts_only_its_trainable_tensors():
    """LoRA-FA style, B frozen: param_counts counted B's 512 entries (d_ρ 1,738 for 1,226 trainable) and
    Comp. 0.5742 for the run's 0.5387.  A switch makes every new tensor trainable: W at the inflate, both
    adapter factors at the deflate."""
    model = nn.Sequential(FusedLowRankLinear(64, 64, rank=8), nn.ReLU(), nn.Linear(64, 10))
    model[0].B.requires_grad_(False)
    counts = param_counts(model)
    assert counts.lowrank == _trainable(model) == 8 * 64 + 64 + 650
    assert (counts.full, counts.adapter) == (64 * 64 + 64 + 650, 8 * 128 + 64 + 650)
    scheduler = DynamicRankScheduler(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                                            lr=0.1), 2, 4)
    per_epoch = _monitored_run(model, scheduler, 6)
    assert per_epoch == [counts.lowrank] * 2 + [counts.full] * 2 + [counts.adapter] * 2
    assert comp_ratio(counts, 6, 2, 4) == pytest.approx(sum(per_epoch) / (6 * counts.full), rel=1e-15)
    # In adapter form, W_f frozen and A frozen by hand: only B trains now.
    model[0].A.requires_grad_(False)
    assert param_counts(model, scheduler=scheduler).adapter == _trainable(model) == 8 * 64 + 64 + 650


def _hook_weight_norm(module, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)        # deprecated, still in use
        torch.nn.utils.weight_norm(module, name)


@pytest.mark.parametrize("form, name, reparametrize", [
    ("full", "weight", parametrizations.weight_norm), ("lowrank", "A", parametrizations.weight_norm),
    ("adapter", "B", parametrizations.weight_norm), ("lowrank", "bias", parametrizations.weight_norm),
    ("full", "weight", _hook_weight_norm), ("lowrank", "B", _hook_weight_norm),
])
def test_a_reparametrized_weight_or_factor_is_counted_once(form, name, reparametrize):
    """A weight-normed weight or factor was counted as the layer's tensor and again, through its
    originals, in ``other``: d 544 for a full layer with 288 trainable parameters."""
    layer = FusedLowRankLinear(16, 12, rank=4, form=form)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(12, 3))
    reparametrize(layer, name)
    counts = param_counts(model)
    # By hand: weight_norm over dim 0 adds a norm per output row (g) beside the direction (v).
    rows = {"weight": 12, "A": 12, "B": 16, "bias": 12}[name]
    now = {"full": 16 * 12, "lowrank": 4 * 28, "adapter": 4 * 28}[form] + rows + 12 + 39
    assert _trainable(model) == now
    assert {"full": counts.full, "lowrank": counts.lowrank, "adapter": counts.adapter}[form] == now
    assert counts.other == (12 + rows if name == "bias" else 12) + 39      # the bias (its originals) and the head


def test_adapter_costs_take_the_inputs_the_layer_takes():
    """adapter_costs on an unbatched (C, H, W) input raised "not enough values to unpack"; one with another
    channel count than the layer's was costed silently."""
    layer = LowRankConv2d(4, 8, 3, rank=2, form="adapter", padding=1)
    x = torch.randn(4, 6, 6)
    layer(x)
    (key, choice), = layer.adapter_choices.items()
    assert key[0] == (1, 4, 6, 6) and choice.seconds == adapter_costs(layer, x)
    assert adapter_work(layer, x) == adapter_work(layer, x.unsqueeze(0))
    with pytest.raises(ValueError, match=r"input must have 4 channels \(the layer's in_channels\), got 5 "
                                         r"\(shape \(2, 5, 6, 6\)\)"):
        adapter_costs(layer, torch.randn(2, 5, 6, 6))
    with pytest.raises(ValueError, match=r"input must have shape \(N, C, H, W\) or \(C, H, W\), got \(4, 36\)"):
        adapter_work(layer, torch.randn(4, 36))


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, (2, 1), "same"])
def test_adapter_costs_pad_as_the_layer_pads(padding_mode, padding):
    """With a non-zero padding mode the forward pads once and runs every conv unpadded; adapter_costs took
    the input as unpadded (a 4×4 output for the layer's 6×6), other costs than the layer's choice records."""
    layer = LowRankConv2d(4, 8, 3, rank=2, form="adapter", padding=padding, padding_mode=padding_mode)
    zeros = LowRankConv2d(4, 8, 3, rank=2, form="adapter", padding=padding)
    x = torch.randn(2, 4, 6, 6)
    for grad in (False, True):
        layer.adapter_strategy = "auto"                   # forget the choice made
        with torch.set_grad_enabled(grad):
            layer(x)
        (choice,) = layer.adapter_choices.values()
        with torch.set_grad_enabled(grad):
            assert choice.seconds == adapter_costs(layer, x)
            # The same convs as padded the zeros way: the same FLOPs (bytes: the padded input is read).
            flops = {k: v[0] for k, v in adapter_work(layer, x).items()}
            assert flops == {k: v[0] for k, v in adapter_work(zeros, x).items()}


def test_mixed_epochs_are_named_in_the_errors():
    """Epochs recorded as "mixed" (a scheduler of part of the model, recorded by every layer) were left
    unnamed: the error said to record full-rank epochs, which the run had done."""
    run = _run([("lowrank", 1.0), ("lowrank", 1.0), ("mixed", 3.0), ("mixed", 2.0)])
    advice = (r"its epochs \[2, 3\] are recorded as 'mixed' \(the watched dynrank layers in different forms, as with "
              r"a scheduler of part of the model and the rest in another form\) and count as no form: record the run "
              r"with the scheduler attached to the monitor, or with RankMonitor\(model, layers=\[the scheduled "
              r"layers\]\)")
    with pytest.raises(ValueError, match=r"no full-form epoch time: record full-rank epochs or pass "
                                         r"full_epoch_seconds; " + advice):
        cost_report(ParamCounts(full=10, lowrank=5, other=0), 6, 2, 4, run=run)
    with pytest.raises(ValueError, match=r"the schedule needs \['adapter'\] epochs but the run recorded none "
                                         r"\(recorded: \['lowrank', 'mixed'\]\); " + advice):
        measured_comp_ratio(run, 6, 2, 4, full_epoch_seconds=1.0)
    # A full-rank baseline of mixed epochs is named as the run without full epochs.
    with pytest.raises(ValueError, match=r"no full-form epoch time: .*; its epochs \[0\] are recorded as 'mixed'"):
        measured_comp_ratio(run, full_epoch_seconds=_run([("mixed", 2.0)]))
    # Without mixed epochs the messages say no more than before.
    with pytest.raises(ValueError, match=r"pass full_epoch_seconds$"):
        measured_comp_ratio(_run([("lowrank", 1.0)]))


def test_a_parameter_shared_by_two_layers_is_counted_once():
    """Two full-form layers tying one weight: d counted it once per layer (580 for the 324 that train)."""
    model = nn.Sequential(FusedLowRankLinear(16, 16, rank=4, form="full", bias=False), nn.ReLU(),
                          FusedLowRankLinear(16, 16, rank=4, form="full", bias=False), nn.Linear(16, 4))
    model[2].weight = model[0].weight
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 16 * 16 + 16 * 4 + 4
    counts = param_counts(model)
    assert counts.full == trainable
    assert counts.layers == [("0", 16 * 16, 4 * 32), ("2", 0, 4 * 32)]     # lowrank: a switch gives each its own
    assert counts.lowrank == 2 * 4 * 32 + 16 * 4 + 4
    report = cost_report(model, 10, 0, None)
    assert report.counts.full == trainable and report.lowrank_ratio == counts.lowrank / trainable
    assert "full d=324," in str(report)


def test_the_report_says_what_its_seconds_are_per():
    """A profile's per-step seconds were printed as "wall-clock per epoch"."""
    from dynrank import FormProfile
    counts = ParamCounts(full=10, lowrank=5, other=0)
    profile = FormProfile(seconds={"full": [4.0, 4.0], "lowrank": [1.0, 2.0], "adapter": [3.0]},
                          trainable={"full": 10, "lowrank": 5, "adapter": 5}, device="cpu")
    expected = (2 * 1.5 + 2 * 4.0 + 2 * 3.0) / (6 * 4.0)
    for run in (profile, profile.records):
        report = cost_report(counts, 6, 2, 4, run=run)
        assert report.per == "step" and report.measured_ratio == pytest.approx(expected, rel=1e-15)
        assert str(report).splitlines()[-1] == \
            f"measured (wall-clock per step: adapter 3 s, full 4 s, lowrank 1.5 s): {expected:.4f}"
    report = cost_report(counts, 6, 2, 4, run=_run([("lowrank", 1.5), ("full", 4.0), ("adapter", 3.0)]))
    assert report.per == "epoch"
    assert str(report).splitlines()[-1] == \
        f"measured (wall-clock per epoch: adapter 3 s, full 4 s, lowrank 1.5 s): {expected:.4f}"
    assert cost_report(counts, 6, 2, 4).per == "epoch"


def test_a_baseline_timing_another_unit_than_the_run_is_refused():
    """A lowrank run at 7.8 s per epoch (390 steps of 20 ms) over a profile's 40 ms full step gave 195.0,
    printed as the cost per epoch; the ratio is 0.5."""
    from dynrank import FormProfile
    profile = FormProfile(seconds={"full": [0.040] * 3, "lowrank": [0.020] * 3}, trainable={"full": 10, "lowrank": 5},
                          device="cpu")
    run = _run([("lowrank", 7.8)] * 3)
    per_step_over_epoch = (r"full_epoch_seconds holds seconds per step but run holds seconds per epoch: pass a "
                           r"full-rank baseline timed per epoch .*, or t_full as seconds per epoch$")
    for baseline in (profile, profile.records):
        with pytest.raises(ValueError, match=per_step_over_epoch):
            measured_comp_ratio(run, 150, None, None, full_epoch_seconds=baseline)
        with pytest.raises(ValueError, match=per_step_over_epoch):
            cost_report(ParamCounts(10, 5, 0), 150, None, None, run=run, full_epoch_seconds=baseline)
    with pytest.raises(ValueError, match=r"full_epoch_seconds holds seconds per epoch but run holds seconds per step"):
        measured_comp_ratio(profile, 150, None, None, full_epoch_seconds=_run([("full", 15.6)]))
    # Like beside like gives the ratio; an epoch time as a number is taken as it is.
    baseline = _run([("full", 15.6), ("full", 15.6)])
    assert measured_comp_ratio(run, 150, None, None, full_epoch_seconds=baseline) == pytest.approx(0.5, rel=1e-15)
    assert measured_comp_ratio(run, 150, None, None, full_epoch_seconds=15.6) == pytest.approx(0.5, rel=1e-15)
    fast = FormProfile(seconds={"full": [0.040]}, trainable={"full": 10}, device="cpu")
    slow = FormProfile(seconds={"lowrank": [0.010, 0.030]}, trainable={"lowrank": 5}, device="cpu")
    assert measured_comp_ratio(slow, 4, None, None, full_epoch_seconds=fast) == pytest.approx(0.5, rel=1e-15)


def test_a_timed_record_without_a_form_is_refused_by_name():
    """A record without "form" was grouped under None: cost_report computed, then print(report) raised
    TypeError from sorting None beside the form names."""
    run = [{"form": "lowrank", "wall_seconds": 1.0}, {"form": "full", "wall_seconds": 4.0},
           {"form": "adapter", "wall_seconds": 3.0}, {"wall_seconds": 9.0}]
    missing = re.escape("a timed record needs its 'form' (the form its seconds were timed in, e.g. 'lowrank'), "
                        "got none in record 3 (keys ['wall_seconds'])")
    for call in (lambda r: epoch_times(r), lambda r: measured_comp_ratio(r),
                 lambda r: cost_report(ParamCounts(1000, 600, 0), 10, 3, 7, run=r)):
        with pytest.raises(ValueError, match=f"^{missing}$"):
            call(run)
    run[3] = {"epoch": 5, "form": None, "wall_seconds": 9.0}
    with pytest.raises(TypeError, match=re.escape("form must be a str (the form the seconds were timed in, e.g. "
                                                  "'lowrank'), got NoneType (None) in record 3 (epoch 5)") + "$"):
        cost_report(ParamCounts(1000, 600, 0), 10, 3, 7, run=run)
    # An untimed record is left out, form or not; the report of the others prints.
    run[3] = {"epoch": 5, "wall_seconds": None}
    report = cost_report(ParamCounts(1000, 600, 0), 10, 3, 7, run=run)
    assert report.measured_ratio == pytest.approx((3 * 1.0 + 4 * 4.0 + 3 * 3.0) / (10 * 4.0), rel=1e-15)
    assert str(report).splitlines()[-1] == \
        f"measured (wall-clock per epoch: adapter 3 s, full 4 s, lowrank 1 s): {report.measured_ratio:.4f}"
