"""RankMonitor: records, scheduler hook, files written and read back, plots."""

import copy
import csv
import io
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from dynrank.checkpoint import load_training_state, training_state
from dynrank.cost import cost_report
from dynrank.linear import FusedLowRankLinear
from dynrank.monitor import RankMonitor, read_csv
from dynrank.scheduler import DynamicRankScheduler


class StandInScheduler:
    """The agreed protocol only: add_callback(fn), fn(event) after each form change."""

    def __init__(self, model):
        self.model = model
        self.callbacks = []

    def add_callback(self, fn):
        self.callbacks.append(fn)
        return fn

    def step(self, epoch, op):
        changes = []
        for name, module in self.model.named_modules():
            if isinstance(module, FusedLowRankLinear):
                old = module.form
                module.inflate() if op == "inflate" else module.deflate()
                changes.append((name, old, module.form))
        for fn in self.callbacks:
            fn({"epoch": epoch, "step": None, "changes": changes})


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(FusedLowRankLinear(12, 16, 3), nn.ReLU(), FusedLowRankLinear(16, 16, 4, alpha=8.0),
                         nn.Linear(16, 5))


def perturb(model):
    """Stand-in for an epoch of training: move every trainable tensor."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def np_ratio(matrix):
    s = np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)
    return s[0] / s[-1]


def record_run(name="dynamic I=2 D=4", epochs=6, inflate=2, deflate=4):
    model = make_model()
    scheduler = StandInScheduler(model)
    monitor = RankMonitor(model, name=name).attach(scheduler)
    for epoch in range(epochs):
        if epoch == inflate:
            scheduler.step(epoch, "inflate")
        if epoch == deflate:
            scheduler.step(epoch, "deflate")
        with monitor.epoch(epoch):
            perturb(model)
        monitor.log(loss=1.0 / (epoch + 1), accuracy=torch.tensor(50.0 + 5 * epoch))
    return model, monitor


def test_records_forms_params_and_metrics():
    model, monitor = record_run()
    assert monitor.epochs == list(range(6))
    assert [r["form"] for r in monitor.records] == ["lowrank"] * 2 + ["full"] * 2 + ["adapter"] * 2
    assert monitor.records[0]["form_mix"] == {"lowrank": 2, "full": 0, "adapter": 0}
    assert monitor.records[3]["form_mix"] == {"lowrank": 0, "full": 2, "adapter": 0}
    bias_and_plain = 16 + 16 + 16 * 5 + 5
    trainable = {"lowrank": bias_and_plain + 3 * 28 + 4 * 32, "full": bias_and_plain + 12 * 16 + 16 * 16}
    assert monitor.records[0]["trainable_params"] == trainable["lowrank"]
    assert monitor.records[2]["trainable_params"] == trainable["full"]
    assert monitor.records[5]["trainable_params"] == trainable["lowrank"]      # W_f frozen
    assert monitor.records[5]["total_params"] == trainable["full"] + 3 * 28 + 4 * 32
    assert all(r["wall_seconds"] >= 0 and r["metrics_seconds"] >= 0 for r in monitor.records)
    layers = monitor.records[0]["layers"]
    assert list(layers) == ["0", "2", "3"]
    assert layers["0"]["spectral_ratio"] == math.inf and layers["0"]["effective_rank"] == 3
    assert layers["3"]["type"] == "Linear" and layers["3"]["form"] == "dense"
    # The last epoch's values against numpy on the dense effective weights now.
    last = monitor.records[-1]["layers"]
    layer = model[2]
    dense = layer.weight.detach().double() + layer.scale * layer.A.detach().double() @ layer.B.detach().double().t()
    assert last["2"]["spectral_ratio"] == pytest.approx(np_ratio(dense), rel=1e-10)
    assert last["3"]["spectral_ratio"] == pytest.approx(np_ratio(model[3].weight.detach()), rel=1e-10)
    assert monitor.scalar("accuracy") == (list(range(6)), [50.0 + 5 * e for e in range(6)])
    assert monitor.scalar_names() == ["loss", "accuracy"]


def test_scheduler_hook_records_switches():
    _, monitor = record_run()
    assert [(s["epoch"], s["kind"], s["source"]) for s in monitor.switches] == \
        [(2, "inflate", "scheduler"), (4, "deflate", "scheduler")]
    assert monitor.switches[0]["changes"] == [["0", "lowrank", "full"], ["2", "lowrank", "full"]]
    monitor_no_epoch = RankMonitor(make_model())
    with monitor_no_epoch.epoch(7):
        monitor_no_epoch.on_switch({"epoch": None, "step": 123, "changes": [("0", "full", "adapter")]})
    assert monitor_no_epoch.switches[0]["epoch"] == 7 and monitor_no_epoch.switches[0]["step"] == 123
    with pytest.raises(TypeError, match=r"scheduler must have an add_callback\(fn\) method \(DynamicRankScheduler\), got object"):
        RankMonitor(make_model()).attach(object())
    with pytest.raises(TypeError, match=r"event must be a dict with 'changes', got \{'epoch': 1\}"):
        monitor.on_switch({"epoch": 1})


def test_a_switch_by_step_between_epochs_belongs_to_the_next_epoch():
    """A scheduler by steps, stepped at the top of each epoch before the monitor's epoch opens: its switch at
    step 4 is made before epoch 1 (whose record is full), so it is epoch 1's, not epoch 0's."""
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(8, 8, 2))
    scheduler = DynamicRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 4, None, unit="step")
    monitor = RankMonitor(model).attach(scheduler)
    steps_per_epoch = 4
    for epoch in range(3):
        scheduler.step(epoch * steps_per_epoch)
        with monitor.epoch(epoch):
            pass
    assert [(r["epoch"], r["form"]) for r in monitor.records] == [(0, "lowrank"), (1, "full"), (2, "full")]
    assert [(s["epoch"], s["step"], s["kind"], s["source"]) for s in monitor.switches] == \
        [(1, 4, "inflate", "scheduler")]
    # Before any epoch was recorded, a switch is the first epoch's.
    first = RankMonitor(make_model())
    first.on_switch({"epoch": None, "step": 0, "changes": [("0", "lowrank", "full")]})
    assert [(s["epoch"], s["step"]) for s in first.switches] == [(0, 0)]


@pytest.mark.parametrize("changes, kind", [
    ([("0", "lowrank", "full")], "inflate"),
    ([("0", "full", "adapter")], "deflate"),
    ([("0", "lowrank", "adapter")], "inflate+deflate"),          # both switches at once
    ([("0", "adapter", "lowrank")], "change"),
    ([("0", "lowrank", "adapter"), ("2", "adapter", "lowrank")], "inflate+deflate+change"),
])
def test_a_switch_s_kind_names_each_form_change(changes, kind):
    monitor = RankMonitor(make_model())
    monitor.on_switch({"epoch": 3, "changes": changes})
    assert [(s["epoch"], s["kind"]) for s in monitor.switches] == [(3, kind)]


def test_switch_detected_without_callback():
    model = make_model()
    monitor = RankMonitor(model)
    monitor.start_epoch()
    monitor.end_epoch()
    model[0].inflate()
    with monitor.epoch():
        pass
    assert [(s["epoch"], s["kind"], s["source"]) for s in monitor.switches] == [(1, "inflate", "detected")]
    assert monitor.records[1]["form"] == "mixed"


def test_an_epoch_of_a_model_without_dynrank_layers_is_dense(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    monitor = RankMonitor(model)
    with monitor.epoch(0):
        pass
    rec = monitor.records[0]
    assert rec["form"] == "dense" and rec["form_mix"] == {"lowrank": 0, "full": 0, "adapter": 0}
    assert [(name, m["form"]) for name, m in rec["layers"].items()] == [("0", "dense"), ("2", "dense")]
    assert [e["form"] for e in read_csv(monitor.save(tmp_path / "dense")["epochs"])] == ["dense"]


def test_log_and_epoch_errors():
    monitor = RankMonitor(make_model())
    with pytest.raises(RuntimeError, match=r"no epoch to log to; call start_epoch\(\)"):
        monitor.log(loss=1.0)
    with pytest.raises(RuntimeError, match=r"no open epoch; call start_epoch\(\) first"):
        monitor.end_epoch()
    monitor.start_epoch(3)
    with pytest.raises(RuntimeError, match=r"epoch 3 is still open; call end_epoch\(\) first"):
        monitor.start_epoch()
    with pytest.raises(TypeError, match="scalar 'loss' must be a number, got str"):
        monitor.log(loss="low")
    for values in ([0.5, 0.6, 0.7], []):
        with pytest.raises(ValueError, match=rf"scalar 'acc' must be a number or a 1-element tensor, got shape "
                                             rf"\({len(values)},\)"):
            monitor.log(acc=torch.tensor(values))
    with pytest.raises(ValueError, match="scalar name 'epoch' clashes with a recorded column"):
        monitor.log(epoch=1.0)
    monitor.log(lr=0.1)
    monitor.end_epoch(loss=2.0)
    assert monitor.records[0]["scalars"] == {"lr": 0.1, "loss": 2.0}
    with pytest.raises(ValueError, match="^boom$"):
        with monitor.epoch():
            raise ValueError("boom")
    assert monitor.epochs == [3]                                          # the failed epoch is not recorded
    for repeated in (3, 2):      # two records for one epoch, or a series going back, would be plotted as such
        with pytest.raises(ValueError, match=f"epoch must come after the last recorded epoch 3, got {repeated}"):
            monitor.start_epoch(repeated)
    assert monitor._open is None and monitor.epochs == [3]
    monitor.start_epoch(5)                                                # a gap is allowed (metrics_every, a resume)
    monitor.end_epoch()
    assert monitor.epochs == [3, 5]
    with pytest.raises(RuntimeError, match=r"this RankMonitor has no model \(it was loaded from files\)"):
        RankMonitor(None).start_epoch()
    with pytest.raises(ValueError, match="metrics_every must be an int ≥ 1, got 0"):
        RankMonitor(make_model(), metrics_every=0)


def test_bad_settings_fail_at_construction():
    """They used to be accepted, and the first end_epoch() raised and dropped that epoch's record."""
    model = make_model()
    with pytest.raises(TypeError, match=r"tol must be a float in \[0, 1\), got str \('x'\)"):
        RankMonitor(model, tol="x")
    with pytest.raises(ValueError, match=r"tol must be a relative tolerance in \[0, 1\), got nan"):
        RankMonitor(model, tol=math.nan)
    with pytest.raises(ValueError, match="method must be one of auto, svd, gram, got 'bogus'"):
        RankMonitor(model, method="bogus")
    with pytest.raises(ValueError, match="method must be one of auto, svd, gram, got 'bogus'"):
        RankMonitor(None, method="bogus")
    with pytest.raises(TypeError, match=r"layers must be None, module names \(a str or an iterable of str\) or a "
                                        r"predicate fn\(name, module\), got int \(3\)"):
        RankMonitor(model, layers=3)
    monitor = RankMonitor(model, layers="2", tol=1e-3, method="svd")     # one name, not the characters of one
    with monitor.epoch():
        pass
    assert list(monitor.records[0]["layers"]) == ["2"] and monitor.records[0]["layers"]["2"]["tol"] == 1e-3


def test_bad_scalar_keeps_the_epoch_open():
    model = make_model()
    monitor = RankMonitor(model)
    monitor.start_epoch(4)
    with pytest.raises(TypeError, match="scalar 'loss' must be a number, got str"):
        monitor.end_epoch(loss="low")
    assert monitor.records == []
    rec = monitor.end_epoch(loss=0.5)                                   # the epoch was not lost
    assert monitor.epochs == [4] and rec["scalars"] == {"loss": 0.5} and rec["layers"]


def test_diverged_weights_still_record_the_epoch(tmp_path):
    model, monitor = record_run(epochs=2)
    with torch.no_grad():
        model[2].A[0, 0] = math.nan                                     # still lowrank: the factored path
        model[3].weight[1, 1] = math.inf
    with pytest.warns(RuntimeWarning, match=r"layers \['2', '3'\] have NaN or infinite weights at epoch 2 \(a "
                                            r"diverged run\?\): their rank metrics are recorded as NaN"):
        with monitor.epoch():
            pass
    monitor.log(loss=math.nan)
    assert monitor.epochs == [0, 1, 2]
    rec = monitor.records[-1]
    assert rec["form"] == "lowrank" and rec["scalars"]["loss"] != rec["scalars"]["loss"]
    for name in ("2", "3"):
        assert all(math.isnan(rec["layers"][name][k]) for k in ("sigma_max", "spectral_ratio", "effective_rank"))
    # The healthy layer is measured as before, against numpy.
    dense = model[0].scale * model[0].A.detach().double() @ model[0].B.detach().double().t()
    sigma = np.linalg.svd(dense.numpy(), compute_uv=False)
    assert rec["layers"]["0"]["sigma_max"] == pytest.approx(sigma[0], rel=1e-10)
    assert rec["layers"]["0"]["effective_rank"] == 3
    loaded = RankMonitor.load(monitor.save(tmp_path / "diverged")["json"])
    assert math.isnan(loaded.records[-1]["layers"]["2"]["sigma_max"]) and loaded.epochs == [0, 1, 2]


def test_failed_measurement_keeps_the_record(monkeypatch):
    model, monitor = record_run(epochs=1)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")
    monkeypatch.setattr("dynrank.monitor.model_metrics", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        with monitor.epoch():
            pass
    assert monitor.epochs == [0, 1] and monitor.records[-1]["layers"] == {}
    assert monitor.records[-1]["wall_seconds"] >= 0


def test_load_and_read_errors(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"format": "dynrank.RankMonitor", "version": 1, "name": "x", "switches": []}))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} has no 'records' entry; it is not a complete "
                                         f"RankMonitor file$"):
        RankMonitor.load(path)
    path.write_text(json.dumps({"format": "dynrank.RankMonitor", "records": 5, "switches": []}))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: 'records' must be a list of dicts, got 5"):
        RankMonitor.load(path)
    csv_path = tmp_path / "cut.epochs.csv"
    csv_path.write_text("epoch,form\n0,lowrank\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(csv_path))} has no column \\['wall_seconds', "):
        RankMonitor.load(csv_path)
    _, monitor = record_run(epochs=2)
    with pytest.raises(ValueError, match=r"metric 'lambda' is not recorded per layer; recorded: \[.*'spectral_ratio'"):
        monitor.layer_series("lambda")
    with pytest.raises(TypeError, match=r"event\['changes'\] must be a list of \(module_name, old_form, new_form\), "
                                        r"got 5"):
        monitor.on_switch({"epoch": 1, "changes": 5})


def test_plot_arguments_checked():
    pytest.importorskip("matplotlib")
    from dynrank.plots import plot_spectral_ratio, plot_training_curves
    _, monitor = record_run(epochs=2)
    fig = plot_training_curves([monitor], keys="loss")                  # one key, not its characters
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss"]
    fig = plot_spectral_ratio(monitor, layers="3")
    assert [line.get_label() for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")][0] == "3"
    with pytest.raises(ValueError, match=r"^no run measured layers \['fc'\] \(measured: \['0', '2', '3'\]\)$"):
        plot_spectral_ratio(monitor, layers=["fc", "0"])
    with pytest.raises(ValueError, match="metric 'lambda' is not recorded per layer"):
        plot_spectral_ratio(monitor, metric="lambda")
    for metric, value in (("form", "'lowrank'"), ("shape", r"\[16, 12\]")):   # recorded, not numbers
        with pytest.raises(ValueError, match=f"metric '{metric}' is not a number per layer \\(a value is {value}\\)"):
            plot_spectral_ratio(monitor, metric=metric)
    fig = plot_spectral_ratio(monitor, metric="effective_rank")               # the message's own example
    assert fig.axes[0].get_lines()
    assert fig.axes[0].get_ylabel() == "effective rank (σ > tol·σmax) (log scale)"
    with pytest.raises(TypeError, match=r"keys must be a name \(str\) or a list of names, got int \(3\)"):
        plot_training_curves(monitor, keys=3)
    with pytest.raises(TypeError, match="runs must be a RankMonitor, a path to a saved run, or a list of them, got "
                                        "NoneType"):
        plot_training_curves(None)


def test_metrics_every():
    model = make_model()
    monitor = RankMonitor(model, metrics_every=2, layers=["0"])
    for _ in range(4):
        with monitor.epoch():
            pass
    assert [list(r["layers"]) for r in monitor.records] == [["0"], [], ["0"], []]


def test_files_written_and_read_back(tmp_path):
    _, monitor = record_run()
    paths = monitor.save(tmp_path / "runs" / "dyn")
    assert all(os.path.getsize(p) > 0 for p in paths.values())
    with open(paths["json"], encoding="utf-8") as f:                   # strict JSON: no Infinity tokens
        json.load(f, parse_constant=lambda token: pytest.fail(f"non-standard JSON constant {token}"))
    layers = read_csv(paths["layers"])
    assert len(layers) == 6 * 3
    first = layers[0]
    assert (first["epoch"], first["layer"], first["form"], first["rank"]) == (0, "0", "lowrank", 3)
    assert first["spectral_ratio"] == math.inf and (first["rows"], first["cols"]) == (16, 12)
    rec = monitor.records[0]["layers"]["0"]
    assert first["entropy_rank"] == rec["entropy_rank"]                # floats round-trip exactly
    epochs = read_csv(paths["epochs"])
    assert [e["form"] for e in epochs] == [r["form"] for r in monitor.records]
    assert [e["accuracy"] for e in epochs] == [50.0 + 5 * e for e in range(6)]
    assert [e["n_full"] for e in epochs] == [0, 0, 2, 2, 0, 0]
    switches = read_csv(paths["switches"])
    assert [(s["epoch"], s["kind"], s["layer"], s["new_form"]) for s in switches][:2] == \
        [(2, "inflate", "0", "full"), (2, "inflate", "2", "full")]
    loaded = RankMonitor.load(paths["json"])
    assert loaded.model is None and loaded.name == monitor.name
    assert loaded.records == json.loads(json.dumps(monitor.records, allow_nan=True))
    assert loaded.switches == monitor.switches
    os.remove(paths["json"])                                           # from the CSVs alone
    from_csv = RankMonitor.load(paths["epochs"])
    assert from_csv.epochs == monitor.epochs
    assert [r["form_mix"] for r in from_csv.records] == [r["form_mix"] for r in monitor.records]
    assert from_csv.layer_series("spectral_ratio") == monitor.layer_series("spectral_ratio")
    assert [(s["epoch"], s["kind"], s["changes"]) for s in from_csv.switches] == \
        [(s["epoch"], s["kind"], s["changes"]) for s in monitor.switches]
    assert from_csv.scalar("loss") == monitor.scalar("loss")
    stem = re.escape(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=f"no {stem}\\.json or {stem}\\.epochs\\.csv"):
        RankMonitor.load(tmp_path / "missing")


def test_a_scalar_of_some_epochs_only_reads_back_over_those_epochs(tmp_path):
    """An evaluation every 2 epochs: eval_loss is in epochs 1 and 3 only, in memory and read back from the
    JSON or the CSVs (where the other epochs' cells are empty)."""
    monitor = RankMonitor(make_model())
    for epoch in range(4):
        with monitor.epoch(epoch):
            pass
        monitor.log(loss=1.0 / (epoch + 1), **({"eval_loss": 2.0 - epoch} if epoch % 2 else {}))
    expected = ([1, 3], [1.0, -1.0])
    assert monitor.scalar("eval_loss") == expected
    assert monitor.scalar("loss") == ([0, 1, 2, 3], [1.0, 0.5, 1.0 / 3, 0.25])
    assert monitor.scalar("accuracy") == ([], [])
    paths = monitor.save(tmp_path / "eval_every_2")
    assert [e["eval_loss"] for e in read_csv(paths["epochs"])] == [None, 1.0, None, -1.0]
    from_json = RankMonitor.load(paths["json"])
    os.remove(paths["json"])
    from_csv = RankMonitor.load(paths["epochs"])
    for loaded in (from_json, from_csv):
        assert loaded.scalar("eval_loss") == expected
        assert [r["scalars"] for r in loaded.records] == [r["scalars"] for r in monitor.records]
        assert loaded.scalar_names() == ["loss", "eval_loss"]


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_written(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from dynrank.plots import plot_spectral_ratio, plot_training_curves
    had_pyplot = "matplotlib.pyplot" in sys.modules
    # Read the raw setting: get_backend() itself would resolve it by importing pyplot.
    backend = dict.__getitem__(matplotlib.rcParams, "backend")
    _, dynamic = record_run()
    _, late = record_run("dynamic I=3 D=5", inflate=3, deflate=5)
    saved = dynamic.save(tmp_path / "dyn")["json"]
    lam = tmp_path / "lambda.png"
    fig = plot_spectral_ratio([saved, late], lam)
    axes = fig.axes
    assert axes[0].get_yscale() == "log" and "λ" in axes[0].get_ylabel()
    assert axes[0].get_xlabel() == "epoch (from 0, as the schedule's I and D)"
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert "inflate before epoch 2" in legend and any("∞" in t for t in legend)
    # Each run's switches between the last epoch in the old form and the first in the new: epoch − ½.
    for ax, (inflate, deflate) in zip(axes, ((2, 4), (3, 5))):
        switches = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()
                    if line.get_label().startswith(("inflate", "deflate"))}
        assert switches == {f"inflate before epoch {inflate}": [inflate - 0.5] * 2,
                            f"deflate before epoch {deflate}": [deflate - 0.5] * 2}
    curves = tmp_path / "curves.png"
    fig = plot_training_curves([dynamic, late], curves, keys=["accuracy", "loss"])
    assert [ax.get_ylabel() for ax in fig.axes] == ["accuracy", "loss"]
    # One line per run, named by the run, through the values it logged.
    logged = {"accuracy": [50.0 + 5 * epoch for epoch in range(6)], "loss": [1.0 / (epoch + 1) for epoch in range(6)]}
    for ax, key in zip(fig.axes, ("accuracy", "loss")):
        lines = [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()
                 if line.get_marker() == "."]
        assert lines == [(run.name, list(range(6)), logged[key]) for run in (dynamic, late)]
    for path in (lam, curves):
        assert os.path.getsize(path) > 1000 and _is_png(path)
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    # A legend wider than its axes (long run names, as the paper summary's) is saved whole, not cut.
    late.name = ("dynamic rank with its full-rank phase between inflate epoch 3 and deflate epoch 5, "
                 "a name longer than the figure is wide, seed 0")
    wide = tmp_path / "wide.png"
    fig = plot_training_curves([dynamic, late], wide, keys=["accuracy"], dpi=100)
    legend = fig.axes[0].get_legend()
    width = legend.get_window_extent(fig.canvas.get_renderer()).width * 100 / fig.dpi
    assert width > fig.get_figwidth() * 100 and imread(wide).shape[1] >= width
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules
    with pytest.raises(ValueError, match=r"^no run logged \['bleu'\] \(logged: \['loss', 'accuracy'\]\)$"):
        plot_training_curves([dynamic], keys=["bleu"])


def test_plots_need_matplotlib_message(monkeypatch):
    from dynrank.plots import plot_spectral_ratio
    _, monitor = record_run(epochs=1)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"dynrank\[plots\]"):
        plot_spectral_ratio(monitor)


def test_import_has_no_matplotlib_side_effect():
    code = "import sys, dynrank.monitor, dynrank.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- resuming from a checkpoint ---------------------------------------------------------------------

RESUME_E, RESUME_I, RESUME_D = 7, 2, 4


def build_training(attach=True):
    """Model, optimizer, scheduler and monitor as at the start of a run (README's order), seeded."""
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = DynamicRankScheduler(model, optimizer, RESUME_I, RESUME_D)
    monitor = RankMonitor(model, name="dynamic")
    if attach:
        monitor.attach(scheduler)
    return model, optimizer, scheduler, monitor


def train_epochs(model, optimizer, scheduler, monitor, epochs):
    """Deterministic epochs: one full-batch step on a fixed batch, the loss logged."""
    x = torch.linspace(-1.0, 1.0, 8 * 12).reshape(8, 12)
    y = torch.arange(8) % 5
    for epoch in epochs:
        scheduler.step(epoch)
        with monitor.epoch(epoch):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        monitor.log(loss=loss.item())


def untimed(records):
    """Records without their timing fields, the only ones two identical runs may differ in."""
    return [{k: v for k, v in r.items() if k not in ("wall_seconds", "metrics_seconds")} for r in records]


@pytest.mark.parametrize("attach", [True, False], ids=["callback", "detected"])
@pytest.mark.parametrize("stop", [3, 5])
def test_resume_from_state_dict_continues_the_uninterrupted_run(tmp_path, attach, stop):
    """Resumed as README's Checkpoints bullet says, with the monitor's state_dict in the checkpoint, the run
    ends with the records and switches of a run never interrupted: no switch for the forms the resume
    restored, the deflate after a resume at epoch 3 still recorded (by callback, or detected without one)."""
    reference = build_training(attach)
    train_epochs(*reference, range(RESUME_E))
    ref_monitor = reference[3]
    sources = ["scheduler" if attach else "detected"] * 2
    assert [(s["epoch"], s["kind"], s["source"]) for s in ref_monitor.switches] == \
        list(zip([RESUME_I, RESUME_D], ["inflate", "deflate"], sources))

    model, optimizer, scheduler, monitor = build_training(attach)
    train_epochs(model, optimizer, scheduler, monitor, range(stop))
    buffer = io.BytesIO()
    torch.save(training_state(model, optimizer, scheduler, monitor=monitor.state_dict()), buffer)
    monitor.save(tmp_path / "dynamic")

    model, optimizer, scheduler, monitor = build_training(attach)
    buffer.seek(0)
    extra = load_training_state(torch.load(buffer), model, optimizer, scheduler)
    monitor.load_state_dict(extra["monitor"])
    assert monitor.epochs == list(range(stop))
    train_epochs(model, optimizer, scheduler, monitor, range(stop, RESUME_E))

    assert monitor.epochs == list(range(RESUME_E))
    assert untimed(monitor.records) == untimed(ref_monitor.records)
    assert monitor.switches == ref_monitor.switches
    monitor.save(tmp_path / "dynamic")
    assert RankMonitor.load(tmp_path / "dynamic").epochs == list(range(RESUME_E))
    report = cost_report(model, RESUME_E, RESUME_I, RESUME_D, run=monitor)      # full-form epochs kept
    assert report.measured_ratio is not None


@pytest.mark.parametrize("monitor_first", [True, False], ids=["monitor first", "monitor last"])
def test_a_resumes_loaded_event_is_not_recorded_again(monitor_first):
    """The scheduler's load calls its callbacks with a loaded event (its layers have new parameters): the
    monitor, whose own state holds the switch already, recorded the inflate a second time when it loaded
    before the scheduler."""
    reference = build_training()
    train_epochs(*reference, range(RESUME_E))
    model, optimizer, scheduler, monitor = build_training()
    train_epochs(model, optimizer, scheduler, monitor, range(3))
    saved = copy.deepcopy(training_state(model, optimizer, scheduler, monitor=monitor.state_dict()))

    model, optimizer, scheduler, monitor = build_training()
    events = []
    scheduler.add_callback(events.append)
    if monitor_first:
        monitor.load_state_dict(saved["monitor"])
    load_training_state(saved, model, optimizer, scheduler)
    if not monitor_first:
        monitor.load_state_dict(saved["monitor"])
    assert [(e["epoch"], e.get("loaded")) for e in events] == [(2, True)]
    assert monitor.switches == saved["monitor"]["switches"] and len(monitor.switches) == 1
    train_epochs(model, optimizer, scheduler, monitor, range(3, RESUME_E))
    assert monitor.switches == reference[3].switches
    assert untimed(monitor.records) == untimed(reference[3].records)


def test_state_dict_is_a_copy_and_carries_the_forms():
    model, monitor = record_run()
    state = monitor.state_dict()
    assert sorted(state) == ["forms", "records", "switches"]
    assert state["forms"] == {"0": "adapter", "2": "adapter"}
    assert state["records"] == monitor.records and state["switches"] == monitor.switches
    state["records"][0]["scalars"]["loss"] = -1.0
    assert monitor.records[0]["scalars"]["loss"] == 1.0
    # Loaded into a fresh monitor before its model is restored: the saved forms, not the model's now, are
    # what the next epoch compares with, so the restore's switch to adapter form is no switch.
    fresh_model = make_model()
    fresh = RankMonitor(fresh_model)
    fresh.load_state_dict(state)
    last_scalars = dict(state["records"][-1]["scalars"])
    fresh.log(eval_loss=0.25)                          # the resumed run's evaluation of its last epoch
    assert fresh.records[-1]["scalars"] == dict(last_scalars, eval_loss=0.25)
    assert state["records"][-1]["scalars"] == last_scalars
    state["switches"].clear()
    assert len(fresh.switches) == 2
    for i in (0, 2):
        fresh_model[i].inflate()
        fresh_model[i].deflate()
    with fresh.epoch():
        pass
    assert fresh.epochs == list(range(7)) and len(fresh.switches) == 2
    # Without saved forms (an older state of records and switches only), the model's forms now count.
    legacy_model = make_model()
    legacy = RankMonitor(legacy_model)
    legacy.load_state_dict({"records": monitor.records, "switches": monitor.switches})
    with legacy.epoch():
        pass
    assert len(legacy.switches) == 2
    legacy_model[0].inflate()
    with legacy.epoch():
        pass
    assert [(s["epoch"], s["kind"], s["source"]) for s in legacy.switches[2:]] == [(7, "inflate", "detected")]
    assert RankMonitor().state_dict() == {"records": [], "switches": [], "forms": None}


def test_load_state_dict_refuses_bad_states_and_other_layers():
    _, monitor = record_run(epochs=3)
    good = monitor.state_dict()
    target = RankMonitor(make_model())
    with target.epoch():
        pass
    before = (target.state_dict(), target.records, target.switches)

    def refused(error, match, state, into=target):
        with pytest.raises(error, match=match):
            into.load_state_dict(state)

    refused(TypeError, r"state must be a dict from RankMonitor.state_dict\(\), got list", [good])
    refused(ValueError, r"with keys records, switches, forms \('forms' optional\), got keys \['records'\]",
            {"records": []})
    refused(ValueError, r"got keys \['extra', 'forms', 'records', 'switches'\]", dict(good, extra=1))
    refused(TypeError, r"state\['records'\] must be a list of dicts, got str", dict(good, records="[]"))
    refused(TypeError, r"state\['switches'\]\[0\] must be a dict, got int", dict(good, switches=[3]))
    no_epoch = [{k: v for k, v in r.items() if k != "epoch"} for r in good["records"]]
    refused(ValueError, r"state\['records'\]\[0\] has no \['epoch'\]; each of records needs "
                        r"\['epoch', 'form', 'scalars', 'layers'\]", dict(good, records=no_epoch))
    str_epoch = [dict(r, epoch=str(r["epoch"])) for r in good["records"]]
    refused(TypeError, r"state\['records'\]\[0\]\['epoch'\] must be an int, got str \('0'\)",
            dict(good, records=str_epoch))
    refused(TypeError, r"state\['switches'\]\[0\]\['changes'\] must be a list, got str",
            dict(good, switches=[dict(good["switches"][0], changes="0")]))
    refused(TypeError, r"state\['forms'\] must be a dict layer name → form or None, got list",
            dict(good, forms=["full"]))
    refused(ValueError, r"state\['forms'\] must map layer names to one of lowrank, full, adapter, got "
                        r"\{'0': 'dense'\}", dict(good, forms={"0": "dense", "2": "full"}))
    # A monitor of other layers: other dynrank layers, or records of layers this monitor does not measure.
    refused(ValueError, r"state is of a monitor of other layers: dynrank layers only in the state \['9'\], only in "
                        r"this monitor's model \['2'\]", dict(good, forms={"0": "full", "9": "full"}))
    narrow = RankMonitor(make_model(), layers=["0"])
    refused(ValueError, r"state is of a monitor of other layers: its records measure \['2', '3'\], which this monitor "
                        r"does not measure \(it measures \['0'\]\)", good, into=narrow)
    other = nn.Sequential(FusedLowRankLinear(12, 16, 3), nn.ReLU(), nn.Linear(16, 5))
    refused(ValueError, r"dynrank layers only in the state \['2'\], only in this monitor's model \[\]", good,
            into=RankMonitor(other))
    assert (target.state_dict(), target.records, target.switches) == before    # nothing changed
    target.load_state_dict(good)
    assert target.epochs == [0, 1, 2]


def test_load_state_dict_discards_an_open_epoch():
    _, saved = record_run(epochs=3)
    state = saved.state_dict()
    monitor = RankMonitor(make_model())
    monitor.start_epoch()
    monitor.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"no open epoch; call start_epoch\(\) first"):
        monitor.end_epoch()
    assert monitor.epochs == [0, 1, 2] and monitor.records == state["records"]
    with monitor.epoch():                  # the next epoch follows the loaded ones
        pass
    assert monitor.epochs == [0, 1, 2, 3]


def test_a_named_layer_without_a_weight_is_refused_when_the_monitor_is_built():
    """``layers=["1"]`` naming a ReLU was accepted, and then every epoch's end raised and stored the epoch with
    no layers, though the monitor promises its arguments are checked when built."""
    model = nn.Sequential(FusedLowRankLinear(8, 8, 2), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(TypeError, match=r"layers \['1 \(ReLU\)'\] have no weight to measure"):
        RankMonitor(model, layers=["1"])
    assert list(RankMonitor(model, layers=["2", "0"]).layers) == ["2", "0"]      # weighted modules are fine


def test_attaching_the_same_scheduler_twice_records_each_switch_once():
    model = nn.Sequential(FusedLowRankLinear(8, 8, 2), nn.ReLU())
    sched = DynamicRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, None)
    monitor = RankMonitor(model, scheduler=sched)
    assert monitor.attach(sched) is monitor
    sched.step(0), sched.step(1)
    assert len(monitor.switches) == 1


# -- switches of rank growth, plot colours, CSV scalars, transformers Conv1D ---------------------------------

def _growth_event(step, grown):
    """An event as IncrementalRankScheduler sends it after a rank growth: forms unchanged, ranks grown."""
    return {"epoch": None, "step": step, "changes": [(name, "lowrank", "lowrank") for name, _, _ in grown],
            "rank_changes": list(grown)}


def test_read_csv_gives_each_cell_its_type(tmp_path):
    """An integer cell comes back an int (a rank is 3, not 3.0), a float one a float even when whole ("50.0"),
    "8x16" a list of ints, an empty cell None and "inf"/"-inf"/"nan" floats; text columns stay text, a layer
    named "10" too.  The epochs, ranks and counts of a saved run read back as ints."""
    path = tmp_path / "cells.csv"
    path.write_text("epoch,rank,accuracy,loss,lr,ranks,spectral_ratio,low,odd,layer,form,note\n"
                    "3,-2,50.0,0.125,1e-3,8x16,inf,-inf,nan,10,lowrank,\n", encoding="utf-8")
    (row,) = read_csv(path)
    assert math.isnan(row.pop("odd"))
    expected = {"epoch": 3, "rank": -2, "accuracy": 50.0, "loss": 0.125, "lr": 1e-3, "ranks": [8, 16],
                "spectral_ratio": math.inf, "low": -math.inf, "layer": "10", "form": "lowrank", "note": None}
    assert row == expected
    assert {k: type(v) for k, v in row.items()} == {k: type(v) for k, v in expected.items()}
    assert type(row["ranks"][0]) is int
    _, monitor = record_run(epochs=3)
    paths = monitor.save(tmp_path / "run")
    layers, epochs = read_csv(paths["layers"]), read_csv(paths["epochs"])
    assert len(layers) == 3 * 3 and all(type(r["epoch"]) is int and type(r["rows"]) is int for r in layers)
    assert [type(r["rank"]) for r in layers] == [int, int, type(None)] * 3          # the dense head has none
    assert [(type(e["epoch"]), type(e["n_full"]), type(e["accuracy"])) for e in epochs] == [(int, int, float)] * 3


def test_rank_growth_is_a_change_switch_with_its_ranks(tmp_path):
    """A rank growth was recorded as kind "change" (undocumented) with its ranks dropped: the switches CSV
    read "lowrank → lowrank" only."""
    monitor = RankMonitor(make_model(), name="inrank")
    with monitor.epoch(0):
        monitor.on_switch(_growth_event(1, [("0", 3, 5), ("2", 4, 6)]))
        monitor.on_switch(_growth_event(2, [("0", 5, 7)]))
    assert [(s["epoch"], s["step"], s["kind"], s["rank_changes"]) for s in monitor.switches] == \
        [(0, 1, "change", [["0", 3, 5], ["2", 4, 6]]), (0, 2, "change", [["0", 5, 7]])]
    paths = monitor.save(tmp_path / "inrank")
    rows = read_csv(paths["switches"])
    assert [(r["step"], r["layer"], r["old_form"], r["new_form"], r["old_rank"], r["new_rank"]) for r in rows] == \
        [(1, "0", "lowrank", "lowrank", 3, 5), (1, "2", "lowrank", "lowrank", 4, 6),
         (2, "0", "lowrank", "lowrank", 5, 7)]
    assert RankMonitor.load(paths["json"]).switches == monitor.switches
    os.remove(paths["json"])
    from_csv = RankMonitor.load(paths["epochs"])
    assert [(s["step"], s["kind"], s["changes"], s["rank_changes"]) for s in from_csv.switches] == \
        [(s["step"], s["kind"], s["changes"], s["rank_changes"]) for s in monitor.switches]
    # A form switch holds no ranks, in the record and in the CSV.
    _, dynamic = record_run(epochs=3)
    assert "rank_changes" not in dynamic.switches[0]
    rows = read_csv(dynamic.save(tmp_path / "dynamic")["switches"])
    assert rows and all(r["old_rank"] is None and r["new_rank"] is None for r in rows)


def test_two_switches_of_one_run_in_one_epoch_are_drawn_as_that_run_s():
    """Two rank growths of one run in one epoch were drawn as a switch shared by several runs: black,
    labelled "(inrank, inrank)"."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgba

    from dynrank.plots import plot_training_curves
    runs = []
    for name in ("inrank", "other"):
        monitor = RankMonitor(make_model(), name=name)
        for epoch in range(2):
            with monitor.epoch(epoch):
                if epoch == 1:
                    monitor.on_switch(_growth_event(1, [("0", 3, 5)]))
                    if name == "inrank":
                        monitor.on_switch(_growth_event(2, [("2", 4, 6)]))
            monitor.log(loss=1.0 / (epoch + 1))
        runs.append(monitor)
    import matplotlib
    tab10 = matplotlib.colormaps["tab10"]

    def switch_lines(fig):
        return [(line.get_label(), to_rgba(line.get_color())) for line in fig.axes[0].get_lines()
                if line.get_label().startswith("change")]

    assert switch_lines(plot_training_curves([runs[0]])) == [("change before epoch 1 (inrank)", tab10(0))]
    assert switch_lines(plot_training_curves([runs[1], runs[0]])) == \
        [("change before epoch 1 (other, inrank)", to_rgba("black"))]


def test_spectral_ratio_panels_share_the_colour_bar_s_scale():
    """Each panel spread the colours over its own layer count while the one colour bar covered the deepest
    run's: layer 11 of a 12-layer run had the colour the bar gives layer 23."""
    pytest.importorskip("matplotlib")
    import matplotlib
    from matplotlib.colors import to_rgba

    from dynrank.plots import plot_spectral_ratio
    runs = []
    for depth in (12, 24):
        torch.manual_seed(0)
        monitor = RankMonitor(nn.Sequential(*[nn.Linear(6, 6) for _ in range(depth)]), name=f"{depth} layers")
        for epoch in range(2):
            with monitor.epoch(epoch):
                pass
        runs.append(monitor)
    fig = plot_spectral_ratio(runs)
    bar = fig.axes[-1]
    assert bar.get_ylabel() == "layer index (0 = input side)" and bar.get_ylim() == (0.0, 23.0)
    viridis = matplotlib.colormaps["viridis"]
    for ax, depth in zip(fig.axes[:2], (12, 24)):
        colours = [to_rgba(line.get_color()) for line in ax.get_lines()]
        assert len(colours) == depth                                         # one line per layer, all finite
        assert colours == [viridis(i / 23) for i in range(depth)]          # the bar's colour of index i


def test_scalars_named_like_text_columns_come_back_as_numbers(tmp_path):
    """A scalar logged as "kind" (or "type", "layer", "old_form", "new_form") came back from the CSVs as a str,
    and plot_training_curves drew it on a categorical axis."""
    names = ["type", "kind", "layer", "old_form", "new_form"]
    monitor = RankMonitor(make_model(), name="run")
    for epoch in range(3):
        with monitor.epoch(epoch):
            pass
        monitor.log(**{name: (i + 1) * 10.0 ** -epoch for i, name in enumerate(names)}, loss=0.5 / (epoch + 1))
    paths = monitor.save(tmp_path / "run")
    os.remove(paths["json"])
    back = RankMonitor.load(tmp_path / "run")
    for name in names + ["loss"]:
        assert back.scalar(name) == monitor.scalar(name)
        assert all(type(v) is float for v in back.scalar(name)[1])
    assert [r["form"] for r in back.records] == ["lowrank"] * 3
    assert [list(r["layers"]) for r in back.records] == [["0", "2", "3"]] * 3
    assert back.records[0]["layers"]["3"]["type"] == "Linear"
    pytest.importorskip("matplotlib")
    from dynrank.plots import plot_training_curves
    fig = plot_training_curves([back], keys=["kind"])
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == monitor.scalar("kind")[1]      # numbers, not categories


def test_transformers_conv1d_kept_dense_is_monitored():
    """GPT-2's Conv1D layers that convert_model left dense were not measured: the monitor skipped them."""
    transformers = pytest.importorskip("transformers")
    from dynrank import convert_model
    from dynrank.metrics import layer_metrics
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=8, vocab_size=20, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    convert_model(model, rank_ratio=0.5, exclude=["transformer.h.1.*"])
    sites = [f"transformer.h.1.{s}" for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    modules = dict(model.named_modules())
    measured = RankMonitor(model).measure()
    for site in sites:
        weight = modules[site].weight.detach()                            # stored (in, out)
        m = measured[site]
        assert (m["type"], m["form"], m["rank"], m["shape"]) == ("Conv1D", "dense", None, [weight.shape[1],
                                                                                          weight.shape[0]])
        assert m["spectral_ratio"] == pytest.approx(np_ratio(weight.t()), rel=1e-10)
        assert layer_metrics(modules[site]).shape == (weight.shape[1], weight.shape[0])
    assert RankMonitor(model, layers=sites[:1]).measure().keys() == {sites[0]}


def test_the_epoch_clock_leaves_the_measurement_out(monkeypatch):
    """wall_seconds is the epoch's own time and metrics_seconds the measurement's, run after the clock
    stops: on a clock that the epoch moves by 10 s and the measurement by 3.5 s, exactly those."""
    import types

    import dynrank.monitor as monitor_module
    now = [100.0]
    monkeypatch.setattr(monitor_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    model = make_model()
    monitor = RankMonitor(model)
    measure = monitor._measure

    def slow_measure(epoch):
        now[0] += 3.5
        return measure(epoch)
    monkeypatch.setattr(monitor, "_measure", slow_measure)
    for epoch in range(2):
        monitor.start_epoch(epoch)
        now[0] += 10.0
        rec = monitor.end_epoch()
        assert (rec["wall_seconds"], rec["metrics_seconds"]) == (10.0, 3.5)
        assert rec["layers"]


# -- switches under the monitor's layer names; switches of one epoch kept apart in the CSV --------------------

def _run_epochs(monitor, step, epochs):
    for epoch in range(epochs):
        step(epoch)
        with monitor.epoch(epoch):
            pass


def _changed_layers(monitor):
    return [(s["epoch"], s["kind"], s["source"], [c[0] for c in s["changes"]]) for s in monitor.switches]


def test_switches_of_a_scheduler_on_part_of_the_model_name_the_monitor_s_layers():
    """A scheduler built on model[1] names its layer "0" (within model[1]); the monitor recorded its
    switches under "0", the monitor's name of the plain conv that never changed form."""
    from dynrank import IncrementalRankScheduler, LowRankConv2d
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(LowRankConv2d(4, 8, 3, rank=2), nn.ReLU()))
    sched = DynamicRankScheduler(model[1], torch.optim.SGD(model[1].parameters(), lr=0.1), 1, 2)
    monitor = RankMonitor(model).attach(sched)
    _run_epochs(monitor, sched.step, 3)
    assert list(monitor.records[-1]["layers"]) == ["0", "1.0"]
    assert _changed_layers(monitor) == [(1, "inflate", "scheduler", ["1.0"]), (2, "deflate", "scheduler", ["1.0"])]
    # A rank growth of a scheduler on part of the model: its rank_changes are renamed too.
    model = nn.Sequential(nn.Linear(8, 16), nn.Sequential(FusedLowRankLinear(16, 16, 8), nn.ReLU()))
    growth = IncrementalRankScheduler(model[1], torch.optim.SGD(model[1].parameters(), lr=0.1), init_rank=1,
                                      buffer=2, threshold=1 - 1e-9, warmup_steps=0, check_every=1)
    monitor = RankMonitor(model).attach(growth)
    with monitor.epoch(0):
        grown = growth.step(1)
    assert grown and [name for name, _, _ in grown] == ["0"]
    assert monitor.switches == [{"epoch": 0, "step": 1, "kind": "change", "changes": [["1.0", "lowrank", "lowrank"]],
                                 "source": "scheduler", "rank_changes": [["1.0", *grown[0][1:]]]}]
    # A scheduler of layers the monitor's model does not hold is refused, and nothing is attached.
    other = nn.Sequential(FusedLowRankLinear(8, 8, 2))
    other_sched = DynamicRankScheduler(other, torch.optim.SGD(other.parameters(), lr=0.1), 1, None)
    monitor = RankMonitor(model)
    with pytest.raises(ValueError, match=r"scheduler's dynrank layers \['0'\] are not in the monitor's model "
                                         r"\(Sequential\)"):
        monitor.attach(other_sched)
    assert other_sched._callbacks == []


def test_switches_of_a_ddp_model_name_the_monitor_s_layers():
    """README's DDP set-up, one DistributedDataParallel given to both: the scheduler named the switches "0",
    "2" (within the wrapped module), the monitor measures "module.0", "module.2"."""
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from dynrank import LowRankConv2d
    torch.manual_seed(0)
    net = nn.Sequential(LowRankConv2d(4, 8, 3, rank=2), nn.ReLU(), LowRankConv2d(8, 8, 3, rank=2))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(net)
        sched = DynamicRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, 2)
        monitor = RankMonitor(model).attach(sched)
        _run_epochs(monitor, sched.step, 3)
    finally:
        dist.destroy_process_group()
    assert list(monitor.records[-1]["layers"]) == ["module.0", "module.2"]
    assert _changed_layers(monitor) == [(1, "inflate", "scheduler", ["module.0", "module.2"]),
                                        (2, "deflate", "scheduler", ["module.0", "module.2"])]


def _without_source(switches):
    return [{k: v for k, v in s.items() if k != "source"} for s in switches]


def _drop_switch_column(path):
    """Rewrite a switches CSV as dynrank wrote it before its "switch" column; returns that column's cells."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    dropped = [row.pop("switch") for row in rows]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dropped


def test_csv_load_keeps_two_switches_of_one_epoch_apart(tmp_path):
    """Two schedulers of one model, one deflating and one inflating at epoch 3: loaded from the CSVs alone
    they became one "deflate" switch holding both changes."""
    from dynrank import LowRankConv2d
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(LowRankConv2d(c, 8, 3, rank=2, padding=1), nn.ReLU()) for c in (4, 8)))
    first = DynamicRankScheduler(model[0], torch.optim.SGD(model[0].parameters(), lr=0.1), 1, 3)
    second = DynamicRankScheduler(model[1], torch.optim.SGD(model[1].parameters(), lr=0.1), 3, 5)
    monitor = RankMonitor(model).attach(first).attach(second)
    _run_epochs(monitor, lambda epoch: (first.step(epoch), second.step(epoch)), 5)
    assert [(s["epoch"], s["kind"], s["changes"]) for s in monitor.switches] == \
        [(1, "inflate", [["0.0", "lowrank", "full"]]), (3, "deflate", [["0.0", "full", "adapter"]]),
         (3, "inflate", [["1.0", "lowrank", "full"]])]
    paths = monitor.save(tmp_path / "run")
    assert _without_source(RankMonitor.load(paths["json"]).switches) == _without_source(monitor.switches)
    os.remove(paths["json"])
    from_csv = RankMonitor.load(paths["epochs"])
    assert _without_source(from_csv.switches) == _without_source(monitor.switches)
    assert {s["source"] for s in from_csv.switches} == {"csv"}
    # A switches CSV written before the "switch" column: a new switch where epoch, step or kind change.
    assert _drop_switch_column(paths["switches"]) == ["0", "1", "2"]
    assert _without_source(RankMonitor.load(paths["epochs"]).switches) == _without_source(monitor.switches)
    # Two rank growths of one epoch at steps 1 and 2 (one kind) stay two switches in such a CSV too.
    growths = RankMonitor(make_model())
    with growths.epoch(0):
        for step, layer in ((1, "0"), (2, "2")):
            growths.on_switch({"epoch": None, "step": step, "changes": [(layer, "lowrank", "lowrank")],
                               "rank_changes": [(layer, 3, 4)]})
    paths = growths.save(tmp_path / "growths")
    os.remove(paths["json"])
    assert _drop_switch_column(paths["switches"]) == ["0", "1"]
    loaded = RankMonitor.load(paths["epochs"]).switches
    assert [(s["epoch"], s["step"], s["kind"]) for s in loaded] == [(0, 1, "change"), (0, 2, "change")]
    assert _without_source(loaded) == _without_source(growths.switches)
    # Two switches of one kind at one epoch (two schedulers inflating together) stay two switches as well.
    monitor = RankMonitor(make_model())
    with monitor.epoch(0):
        monitor.on_switch({"epoch": 0, "step": None, "changes": [("0", "lowrank", "full")]})
        monitor.on_switch({"epoch": 0, "step": None, "changes": [("2", "lowrank", "full")]})
    paths = monitor.save(tmp_path / "same_kind")
    os.remove(paths["json"])
    assert _without_source(RankMonitor.load(paths["epochs"]).switches) == _without_source(monitor.switches)


# -- the epoch's form: that of the watched layers ------------------------------------------------------------

def _backbone_and_head():
    """README's scheduler of part of a model: the backbone model[0] is scheduled, the head stays lowrank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(FusedLowRankLinear(32, 32, rank=4), nn.ReLU()),
                          FusedLowRankLinear(32, 4, rank=2))
    scheduler = DynamicRankScheduler(model[0], torch.optim.SGD(model.parameters(), lr=0.1), 2, 4, epochs=6)
    return model, scheduler


def test_a_scheduler_of_part_of_the_model_labels_each_epoch_by_the_scheduled_layers():
    """Every epoch with the backbone full or adapter was "mixed" (the lowrank head counted too), so
    cost_report(run=monitor) found no full or adapter epoch and gave no measured ratio."""
    model, scheduler = _backbone_and_head()
    x = torch.randn(3, 32)
    monitors = {"layers=": RankMonitor(model, layers=["0.0"]).attach(scheduler),
                "predicate": RankMonitor(model, layers=lambda name, m: name.startswith("0.")),
                "attached": RankMonitor(model, scheduler=scheduler),
                "head": RankMonitor(model, layers=["1"]).attach(scheduler),       # layers= wins over the scheduler
                "plain": RankMonitor(model)}                                       # no selection: every layer
    for epoch in range(6):
        scheduler.step(epoch)
        for monitor in monitors.values():
            with monitor.epoch(epoch):
                model(x).sum().backward()
    scheduled = ["lowrank"] * 2 + ["full"] * 2 + ["adapter"] * 2
    for key in ("layers=", "predicate", "attached"):
        assert [r["form"] for r in monitors[key].records] == scheduled, key
    assert [r["form"] for r in monitors["head"].records] == ["lowrank"] * 6
    assert [r["form"] for r in monitors["plain"].records] == ["lowrank"] * 2 + ["mixed"] * 4
    assert monitors["layers="].records[2]["form_mix"] == {"lowrank": 1, "full": 1, "adapter": 0}   # every layer
    # The measured ratio, by hand from the recorded epoch times.
    for key in ("layers=", "attached"):
        seconds = [r["wall_seconds"] for r in monitors[key].records]
        t_lowrank, t_full, t_adapter = (sum(seconds[i:i + 2]) / 2 for i in (0, 2, 4))
        expected = (2 * t_lowrank + 2 * t_full + 2 * t_adapter) / (6 * t_full)
        report = cost_report(model, 6, 2, 4, run=monitors[key], scheduler=scheduler)
        assert report.measured_ratio == pytest.approx(expected, rel=1e-15), key
        assert report.epoch_seconds == {"lowrank": t_lowrank, "full": t_full, "adapter": t_adapter}
    # A layers= selection without a dynrank layer labels by every dynrank layer, as without one.
    model = make_model()
    monitor = RankMonitor(model, layers=["3"])
    model[0].inflate()
    with monitor.epoch():
        pass
    assert monitor.records[0]["form"] == "mixed"


# -- a resume recorded by a monitor whose state is not loaded ------------------------------------------------

@pytest.mark.parametrize("stop", [3, 5])
def test_a_monitor_not_loaded_takes_the_forms_a_resume_restores(stop):
    """A new monitor attached before load_training_state, its own state not loaded (it records the rest of the
    run only): it dropped the scheduler's loaded event but kept the forms it was built with, so the next epoch
    detected the restored forms as a switch there (an "inflate" at epoch 3, an "inflate+deflate" at 5)."""
    reference = build_training()
    train_epochs(*reference, range(RESUME_E))
    model, optimizer, scheduler, monitor = build_training()
    train_epochs(model, optimizer, scheduler, monitor, range(stop))
    saved = copy.deepcopy(training_state(model, optimizer, scheduler))

    model, optimizer, scheduler, monitor = build_training()
    load_training_state(saved, model, optimizer, scheduler)
    train_epochs(model, optimizer, scheduler, monitor, range(stop, RESUME_E))
    assert monitor.switches == [s for s in reference[3].switches if s["epoch"] >= stop]
    assert untimed(monitor.records) == untimed(reference[3].records[stop:])


def test_a_monitor_whose_model_is_one_layer_keeps_its_name_in_the_csvs(tmp_path):
    """The one dynrank layer of a monitor given that layer is named "": loaded from the CSVs alone, the
    empty text cell came back as None, in the layer records and in the switches."""
    torch.manual_seed(0)
    layer = FusedLowRankLinear(16, 16, rank=4)
    scheduler = DynamicRankScheduler(layer, torch.optim.SGD(layer.parameters(), lr=0.1), 1, 2)
    monitor = RankMonitor(layer).attach(scheduler)
    _run_epochs(monitor, scheduler.step, 3)
    assert monitor.layer_names() == [""]
    assert [c[0] for s in monitor.switches for c in s["changes"]] == ["", ""]
    paths = monitor.save(tmp_path / "run")
    assert [row["layer"] for row in read_csv(paths["layers"])] == [""] * 3
    os.remove(paths["json"])
    from_csv = RankMonitor.load(paths["epochs"])
    assert from_csv.layer_names() == [""]
    assert [list(r["layers"]) for r in from_csv.records] == [[""]] * 3
    assert _without_source(from_csv.switches) == _without_source(monitor.switches)


def test_layers_named_inf_and_nan_keep_their_names_in_the_json(tmp_path):
    """Layers named "inf", "-inf" and "nan" (ModuleDict keys): loaded from the JSON, their names in the switches
    (a rank growth's ranks too) came back as floats, as the JSON's non-finite numbers do.  The file is written
    as before (non-finite numbers as those strings), and they still come back as numbers."""
    torch.manual_seed(0)
    names = ["inf", "-inf", "nan"]
    model = nn.ModuleDict({name: FusedLowRankLinear(8, 8, rank=2) for name in names})
    monitor = RankMonitor(model, name="nan")
    with monitor.epoch(0):
        monitor.on_switch(_growth_event(1, [("nan", 2, 3)]))
    monitor.log(loss=math.nan, accuracy=-math.inf)
    for name in names:
        model[name].inflate()
    with monitor.epoch(1):
        pass
    assert [s["changes"] for s in monitor.switches] == \
        [[["nan", "lowrank", "lowrank"]], [[name, "lowrank", "full"] for name in names]]
    paths = monitor.save(tmp_path / "run")
    with open(paths["json"], encoding="utf-8") as f:
        written = json.load(f)
    assert written["records"][0]["layers"]["inf"]["spectral_ratio"] == "inf"
    assert written["records"][0]["scalars"] == {"loss": "nan", "accuracy": "-inf"}
    loaded = RankMonitor.load(paths["json"])
    assert loaded.name == "nan"
    assert loaded.switches == monitor.switches
    assert all(type(c[0]) is str for s in loaded.switches for c in s["changes"] + s.get("rank_changes", []))
    assert loaded.layer_names() == names
    assert [r["layers"] for r in loaded.records] == [r["layers"] for r in monitor.records]
    assert [loaded.records[0]["layers"][name]["spectral_ratio"] for name in names] == [math.inf] * 3
    assert math.isnan(loaded.records[0]["scalars"]["loss"]) and loaded.records[0]["scalars"]["accuracy"] == -math.inf
    assert [r["form"] for r in loaded.records] == ["lowrank", "full"]
    assert loaded.records[1]["layers"]["nan"]["type"] == "FusedLowRankLinear"


_DAMAGED = [
    ("a switch without its kind", lambda doc: doc["switches"][0].pop("kind"),
     r"\['switches'\]\[0\] has no \['kind'\]; each of switches needs \['epoch', 'kind', 'changes'\]"),
    ("a record without its layers", lambda doc: doc["records"][1].pop("layers"),
     r"\['records'\]\[1\] has no \['layers'\]; each of records needs \['epoch', 'form', 'scalars', 'layers'\]"),
    ("a record without its scalars", lambda doc: doc["records"][0].pop("scalars"),
     r"\['records'\]\[0\] has no \['scalars'\]"),
    ("layers that are a list", lambda doc: doc["records"][0].__setitem__("layers", []),
     r"\['records'\]\[0\]\['layers'\] must be a dict, got list \(\[\]\)"),
    ("scalars that are null", lambda doc: doc["records"][2].__setitem__("scalars", None),
     r"\['records'\]\[2\]\['scalars'\] must be a dict, got NoneType \(None\)"),
]


@pytest.mark.parametrize("edit,match", [case[1:] for case in _DAMAGED], ids=[case[0] for case in _DAMAGED])
def test_load_refuses_records_and_switches_lacking_a_field_naming_the_file(tmp_path, edit, match):
    """load took a JSON whose records or switches lacked a field (or held one of the wrong type); the plots
    and save() then failed with a bare KeyError, AttributeError or TypeError naming neither file nor entry."""
    _, monitor = record_run(epochs=3)
    path = monitor.save(tmp_path / "run")["json"]
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    edit(doc)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    with pytest.raises(ValueError, match=f"^{re.escape(path)}{match}"):
        RankMonitor.load(path)
    pytest.importorskip("matplotlib")
    from dynrank.plots import plot_spectral_ratio
    with pytest.raises(ValueError, match=f"^{re.escape(path)}{match}"):
        plot_spectral_ratio(path)


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_load_of_a_json_cut_short_names_the_file(tmp_path, cut):
    """An empty or truncated JSON (it is written in place) raised json's bare "Expecting value: line 1 column 1",
    naming neither the file nor that it is a RankMonitor file."""
    _, monitor = record_run(epochs=2)
    paths = monitor.save(tmp_path / "run")
    with open(paths["json"], encoding="utf-8") as f:
        text = f.read()
    with open(paths["json"], "w", encoding="utf-8") as f:
        f.write("" if cut == "empty" else text[: len(text) // 2])
    stem = re.escape(str(tmp_path / "run"))
    with pytest.raises(ValueError, match=f"^{stem}\\.json is not valid JSON \\(.+\\); it is not a complete RankMonitor "
                                         f"file; {stem}\\.epochs\\.csv and the other CSVs beside it are read once it "
                                         f"is moved away$"):
        RankMonitor.load(paths["epochs"])
    os.replace(paths["json"], tmp_path / "moved.json")   # as the message says: the CSVs are read then
    back = RankMonitor.load(paths["epochs"])
    assert back.epochs == monitor.epochs and back.scalar("loss") == monitor.scalar("loss")
    os.replace(tmp_path / "moved.json", paths["json"])
    os.remove(paths["epochs"])                         # no CSVs beside it: the message points at none
    with pytest.raises(ValueError, match=f"^{stem}\\.json is not valid JSON \\(.+\\); it is not a complete "
                                         f"RankMonitor file$"):
        RankMonitor.load(paths["json"])


def _visible_ticks(ax):
    low, high = ax.get_xlim()
    return [float(t) for t in ax.get_xticks() if low <= t <= high]


def test_one_epoch_and_nan_values_are_drawn_with_marks():
    """A run of one epoch, or a finite value between NaNs, was a line without markers: nothing drawn, x ticks
    -0.06 … 0.06.  NaN losses and NaN λ (a diverged run) vanished without a mark."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgba

    from dynrank.plots import plot_spectral_ratio, plot_training_curves
    one = RankMonitor(make_model(), name="one epoch")
    with one.epoch(0):
        pass
    one.log(loss=2.5)
    fig = plot_training_curves(one)
    ax = fig.axes[0]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0] and list(line.get_ydata()) == [2.5]
    assert line.get_marker() not in (None, "None", "", " ")                     # one point: drawn by its mark
    assert ax.get_xlim() == (-0.5, 0.5) and _visible_ticks(ax) == [0.0]
    assert ax.get_xlabel() == "epoch (from 0, as the schedule's I and D)"

    model = make_model()
    diverged = RankMonitor(model, name="diverged")
    losses = [2.5, math.nan, 1.5, math.inf]                                # 1.5: a finite value between non-finite
    for epoch, loss in enumerate(losses):
        if epoch == 0:
            with diverged.epoch(epoch):
                pass
            first = model[3].weight.detach().clone()
        else:
            with torch.no_grad():
                model[3].weight.fill_(math.nan)                          # layer "3" diverges from epoch 1
            with pytest.warns(RuntimeWarning, match=r"layers \['3'\] have NaN or infinite weights"):
                with diverged.epoch(epoch):
                    pass
        diverged.log(loss=loss)
    fig = plot_training_curves(diverged)
    ax = fig.axes[0]
    line, crosses = ax.get_lines()
    assert line.get_marker() not in (None, "None", "", " ")
    assert [y for y in line.get_ydata() if math.isfinite(y)] == [2.5, 1.5]
    assert line.get_label() == "diverged" and list(line.get_xdata()) == [0, 1, 2, 3]
    # NaN and ∞ leave a gap in the line (an ∞ kept in it would be drawn off the axes).
    assert [math.isnan(y) for y in line.get_ydata()] == [False, True, False, True]
    assert crosses.get_marker() == "x" and list(crosses.get_xdata()) == [1, 3]
    assert crosses.get_transform() == ax.get_xaxis_transform() and list(crosses.get_ydata()) == [1.0, 1.0]
    assert to_rgba(crosses.get_color()) == to_rgba(line.get_color())
    assert ax.get_xlim() == (-0.5, 3.5) and _visible_ticks(ax) == [0.0, 1.0, 2.0, 3.0]
    assert "NaN or ±∞ (a diverged run), drawn as × on the top edge" in \
        [t.get_text() for t in ax.get_legend().get_texts()]

    lam = diverged.layer_series("spectral_ratio")
    assert lam["3"][1][0] == pytest.approx(np_ratio(first), rel=1e-10)                   # finite at epoch 0,
    assert all(math.isnan(v) for v in lam["3"][1][1:])                                      # NaN after
    fig = plot_spectral_ratio(diverged)
    ax = fig.axes[0]
    crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [1, 2, 3]
    layer_3 = next(line for line in ax.get_lines() if line.get_label() == "3")
    assert to_rgba(crosses[0].get_color()) == to_rgba(layer_3.get_color())
    assert "λ = NaN (non-finite weights), drawn as × on the top edge" in \
        [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_xlim() == (-0.5, 3.5) and ax.get_xlabel() == "epoch (from 0, as the schedule's I and D)"


def test_zero_metric_values_are_drawn_in_a_zero_band():
    """On the log axis zeros vanished (σmin of every lowrank layer is exactly 0): a lowrank run's σmin plot held
    only a legend, while ∞ had its own band."""
    pytest.importorskip("matplotlib")
    from dynrank.plots import plot_spectral_ratio
    torch.manual_seed(0)
    monitor = RankMonitor(nn.Sequential(FusedLowRankLinear(16, 16, 4), nn.Linear(16, 16)), name="lowrank")
    for epoch in range(3):
        with monitor.epoch(epoch):
            pass
    series = monitor.layer_series("sigma_min")
    reference = np.linalg.svd(monitor.model[1].weight.detach().double().numpy(), compute_uv=False)[-1]
    assert series["0"][1] == [0.0] * 3                                      # the lowrank layer: exactly 0
    assert series["1"][1][-1] == pytest.approx(reference, rel=1e-5)         # the dense one: positive
    fig = plot_spectral_ratio(monitor, metric="sigma_min")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "sigma_min (log scale)"
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_label() in ("0", "1")}
    # Zeros have no place on the log axis: a gap in the layer's line (drawn in the 0 band instead).
    assert [math.isnan(y) for y in lines["0"].get_ydata()] == [True] * 3
    assert list(lines["1"].get_ydata()) == series["1"][1]
    low, high = ax.get_ylim()
    zeros = [line for line in ax.get_lines() if line.get_marker() == "v"]
    assert len(zeros) == 1 and list(zeros[0].get_xdata()) == [0, 1, 2]
    smallest = min(series["1"][1])
    assert all(low < y < smallest / 2 for y in zeros[0].get_ydata())         # visible, below every positive value
    assert "sigma_min = 0, drawn in the grey 0 band" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.get_text() == " 0" for t in ax.texts)
