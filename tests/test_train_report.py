"""dynrank-train's reporting: the verdict line under the compare table, the table's per-run figures and the
epoch records RunMonitor keeps (dynrank/train/report.py), on results written out by hand."""

import csv
import re

import pytest
import torch

from dynrank.train.report import RunMonitor, compare_table, verdict


def _finished(key, **finals):
    """Results of a compare job whose runs ended at ``finals`` (schedule → value of ``key``)."""
    return [dict(schedule=schedule, final={key: value}) for schedule, value in finals.items()]


# Values exact in binary, so each line is known to the digit; each gap worked out by hand.
@pytest.mark.parametrize("kind,finals,line", [
    # Bits per byte: lower is better.  Closed: (2.5 - 2.125) / (2.5 - 2.0) = 0.375 / 0.5 = 75%.
    ("text", dict(full=2.0, lowrank=2.5, dynamic=2.125),
     "dynamic rank beats fixed low rank: bits per byte 2.1250 vs 2.5000 (full rank 2.0000; dynamic closes 75% "
     "of the low-rank gap)"),
    ("text", dict(lowrank=2.25, dynamic=2.5),
     "dynamic rank does not beat fixed low rank: bits per byte 2.5000 vs 2.2500"),
    ("text", dict(full=2.75, lowrank=2.5, dynamic=2.125),          # full rank no better: no gap to close
     "dynamic rank beats fixed low rank: bits per byte 2.1250 vs 2.5000 (full rank 2.7500)"),
    ("text", dict(lowrank=2.5, dynamic=2.5),
     "dynamic rank does not beat fixed low rank: bits per byte 2.5000 vs 2.5000"),
    # Accuracy: higher is better.  Closed: (0.8125 - 0.75) / (0.875 - 0.75) = 0.0625 / 0.125 = 50%.
    ("vision", dict(full=0.875, lowrank=0.75, dynamic=0.8125),
     "dynamic rank beats fixed low rank: accuracy 81.25% vs 75.00% (full rank 87.50%; dynamic closes 50% of the "
     "low-rank gap)"),
    ("vision", dict(lowrank=0.75, dynamic=0.625),
     "dynamic rank does not beat fixed low rank: accuracy 62.50% vs 75.00%"),
    ("vision", dict(full=0.5, lowrank=0.75, dynamic=0.625),
     "dynamic rank does not beat fixed low rank: accuracy 62.50% vs 75.00% (full rank 50.00%)"),
])
def test_the_verdict_says_which_way_and_how_much_of_the_gap_dynamic_closes(kind, finals, line):
    key = "val_bpb" if kind == "text" else "val_acc"
    assert verdict(_finished(key, **finals), kind) == line
    # The runs' order in the job does not matter.
    assert verdict(_finished(key, **dict(reversed(finals.items()))), kind) == line


def test_the_verdict_needs_a_finished_dynamic_and_lowrank_run():
    assert verdict(_finished("val_bpb", full=2.0, dynamic=2.125)) is None
    assert verdict(_finished("val_bpb", full=2.0, lowrank=2.5)) is None
    unfinished = [dict(schedule="full", final={"val_bpb": 2.0}), dict(schedule="lowrank", final={"val_bpb": 2.5}),
                  dict(schedule="dynamic")]
    assert verdict(unfinished) is None


def _vision_result(schedule, forms_and_params, inflate=None, deflate=None):
    history = [dict(epoch=epoch, form=form, train_time=1.0, device="cpu (1 thread)", graphed_steps=0, val_loss=1.0,
                    val_acc=0.5, trainable_params=params) for epoch, (form, params) in enumerate(forms_and_params)]
    return dict(schedule=schedule, history=history, final=history[-1], inflate_epoch=inflate, deflate_epoch=deflate,
                params=dict(dense=4000, converted=1000, rank_ratio=0.5))


def test_compare_table_gives_each_runs_last_and_mean_trainable_parameters_over_its_epochs():
    full = _vision_result("full", [("full", 4000)] * 4)
    lowrank = _vision_result("lowrank", [("lowrank", 1000)] * 4)
    # E = 4, I = 1, D = 3: one lowrank epoch, two full, one adapter (the adapter's factors alone train).
    dynamic = _vision_result("dynamic", [("lowrank", 1000), ("full", 4000), ("full", 4000), ("adapter", 1000)], 1, 3)
    lines = compare_table([full, lowrank, dynamic], kind="vision").splitlines()
    column = re.split(r"\s{2,}", lines[0]).index("trainable params (end / mean)")
    cells = [re.split(r"\s{2,}", line)[column] for line in lines[2:]]
    # (1,000 + 4,000 + 4,000 + 1,000) / 4 = 2,500
    assert cells == ["4,000 / 4,000", "1,000 / 1,000", "1,000 / 2,500"]


def test_run_monitor_records_the_training_time_of_an_epoch_without_its_evaluation(tmp_path):
    monitor = RunMonitor(torch.nn.Linear(8, 8), None, "full")
    record = dict(train_loss=1.5, train_acc=0.25, val_loss=1.25, val_acc=0.5, val_bpb=None, lr=0.1,
                  train_time=2.0, eval_time=5.0)
    monitor.record_epoch(0, record)
    monitor.record_epoch(1, dict(record, train_time=3.0, eval_time=0.5))
    records = monitor.state_dict()["records"]
    assert [r["wall_seconds"] for r in records] == [2.0, 3.0]
    assert records[0]["scalars"] == dict(train_loss=1.5, train_acc=0.25, val_loss=1.25, val_acc=0.5, lr=0.1)
    with open(monitor.finish(str(tmp_path))["epochs"], newline="", encoding="utf-8") as handle:
        assert [float(row["wall_seconds"]) for row in csv.DictReader(handle)] == [2.0, 3.0]


def test_compare_table_labels_each_row_and_gives_the_papers_comp_from_the_parameter_counts():
    # Every epoch takes 1 s, so each Comp. measured is 1.000 and the Comp. paper column cannot borrow from it.
    full = _vision_result("full", [("full", 4000)] * 4)
    lowrank = _vision_result("lowrank", [("lowrank", 1000)] * 4)
    dynamic = _vision_result("dynamic", [("lowrank", 1000), ("full", 4000), ("full", 4000), ("adapter", 1000)], 1, 3)
    lines = compare_table([full, lowrank, dynamic], kind="vision").splitlines()
    header = re.split(r"\s{2,}", lines[0])
    rows = [re.split(r"\s{2,}", line) for line in lines[2:]]
    assert [row[0] for row in rows] == ["full", "lowrank (ρ=0.5)", "dynamic (I=1, D=3)"]
    assert [row[header.index("Comp. measured")] for row in rows] == ["1.000"] * 3
    # lowrank: 1,000 / 4,000 = 0.25; dynamic: (2·4,000 + 2·1,000) / (4·4,000) = 0.625.
    assert [row[header.index("Comp. paper")] for row in rows] == ["1.000", "0.250", "0.625"]
