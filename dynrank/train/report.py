"""Monitoring glue and the side-by-side table of the runs of one job.

:class:`RunMonitor` wraps :class:`dynrank.RankMonitor` for the training loop
(epoch timing of the training part only, scalars, resumable records, files and
plots); :func:`compare_table` renders the runs of a ``--schedule compare`` job:
final loss and accuracy (bits per byte for text), trainable parameters, the
measured training time per epoch of each form, the paper's Comp. ratio (from
parameter counts) next to the measured one (from epoch times), and a summary of
the spectral ratio λ = σmax/σmin over the factorized layers.
"""

import importlib.util
import math
import os
import statistics

from ..cost import ParamCounts, comp_ratio, form_epochs
from ..monitor import RankMonitor

__all__ = ["RunMonitor", "compare_table", "verdict", "lambda_summary", "write_plots", "epoch_way", "main_way",
           "form_label", "epoch_seconds", "full_epoch_seconds", "schedule_bounds", "measured_comp", "comp_paper"]

_SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_bpb", "lr")


class RunMonitor:
    """RankMonitor driven by :func:`.loop.run_training`.

    Args:
        model: the model being trained.
        scheduler: the DynamicRankScheduler (or None).
        name: run label (the schedule).
        metrics_every: measure singular values every this many epochs.
    """

    def __init__(self, model, scheduler, name, metrics_every=1):
        self.monitor = RankMonitor(model, name=name, metrics_every=metrics_every)
        if scheduler is not None:
            self.monitor.attach(scheduler)

    def record_epoch(self, epoch, record):
        """Record a finished epoch: forms, parameters, λ of every layer, the loop's scalars.

        The epoch's wall time is the loop's own training time (evaluation left
        out, and a resumed epoch's time before the interruption included).
        """
        self.monitor.start_epoch(epoch)
        rec = self.monitor.end_epoch(**{k: record[k] for k in _SCALARS if record.get(k) is not None})
        rec["wall_seconds"] = record["train_time"]

    def state_dict(self):
        """:meth:`dynrank.RankMonitor.state_dict` of the wrapped monitor, for the checkpoint."""
        return self.monitor.state_dict()

    def load_state_dict(self, state):
        """:meth:`dynrank.RankMonitor.load_state_dict`; a state without ``"forms"`` (an older checkpoint)
        takes the model's forms now, which the resume has restored before the monitor is built."""
        self.monitor.load_state_dict(state)

    def finish(self, out_dir):
        """Save the monitor's JSON/CSV files into ``out_dir``; returns their paths."""
        return self.monitor.save(os.path.join(out_dir, "monitor"))


def _fmt_lambda(value):
    return "∞" if value is None or math.isinf(value) else f"{value:.3g}"


def lambda_summary(records, layers=None):
    """λ over the given layers at the last measured epoch: ``'median 4.1, max 37'`` or ``'∞ in 12/12'``.

    The median and max are of the finite values; layers whose λ is ∞ (σmin = 0) or NaN (a diverged
    layer) are counted apart: ``'median 4.1, max 37; ∞ in 2/12; NaN in 1/12'``.  Where that is
    not the last recorded epoch (``metrics_every`` skipped the later ones), the text names it, counted
    from 1 as the training log counts: ``'median 42.2, max 445 (epoch 3 of 4)'``.

    Args:
        records: RankMonitor records (``layers`` maps name → metric dict).
        layers: names to include (default: every measured layer).
    """
    measured = [r for r in records if r.get("layers")]
    if not measured:
        return "-"
    metrics = measured[-1]["layers"]
    last, epochs = measured[-1]["epoch"], records[-1]["epoch"] + 1
    when = "" if last == records[-1]["epoch"] else f" (epoch {last + 1} of {epochs})"
    names = [n for n in metrics if layers is None or n in layers]
    values = [float(metrics[n]["spectral_ratio"]) for n in names]
    if not values:
        return "-"
    # NaN is set aside as ∞ is: in a median or max its place in the list would decide the result.
    finite = [v for v in values if math.isfinite(v)]
    infinite = sum(map(math.isinf, values))
    undefined = sum(map(math.isnan, values))
    parts = []
    if finite:
        parts.append(f"median {_fmt_lambda(statistics.median(finite))}, max {_fmt_lambda(max(finite))}")
    if infinite:
        restricted = [float(metrics[n]["restricted_spectral_ratio"]) for n in names
                      if math.isinf(float(metrics[n]["spectral_ratio"]))]
        restricted = [v for v in restricted if math.isfinite(v)]
        text = f"∞ in {infinite}/{len(values)}"
        if restricted:
            text += f" (σ1/σk median {_fmt_lambda(statistics.median(restricted))})"
        parts.append(text)
    if undefined:
        parts.append(f"NaN in {undefined}/{len(values)}")
    return "; ".join(parts) + when


def epoch_way(rec):
    """How an epoch's steps ran: (device, replayed CUDA graphs).  Epoch times compare only within one way."""
    return rec.get("device"), bool(rec.get("graphed_steps"))


def main_way(history, skip_first=0):
    """The way most epochs of ``history[skip_first:]`` ran; on a tie, the later epochs' way."""
    ways = [epoch_way(rec) for rec in history[skip_first:]]
    return max(reversed(ways), key=ways.count) if ways else None


def form_label(rec, home=None):
    """``form``, plus `` (graphs)`` if its steps replayed CUDA graphs and `` on DEVICE`` if not on ``home``."""
    device, graphed = epoch_way(rec)
    return rec["form"] + (" (graphs)" if graphed else "") + (f" on {device}" if device not in (None, home) else "")


def epoch_seconds(history, key, skip_first=0):
    """``key(record)`` → training seconds of the epochs of ``history[skip_first:]`` with that key."""
    times = {}
    for rec in history[skip_first:]:
        times.setdefault(key(rec), []).append(rec["train_time"])
    return times


def full_epoch_seconds(history, skip_first=0, average=statistics.mean):
    """Way → ``average`` of a full-rank run's epoch times in that way (the baseline of Comp. measured)."""
    return {way: average(v) for way, v in epoch_seconds(history, epoch_way, skip_first).items()}


def schedule_bounds(result):
    """(I, D) of a run's schedule for :func:`dynrank.cost.form_epochs` / ``comp_ratio`` over its
    recorded epochs: full (0, None), lowrank (None, None), dynamic its own with D at most E."""
    epochs = len(result["history"])
    if result["schedule"] != "dynamic":
        return (0, None) if result["schedule"] == "full" else (None, None)
    inflate = min(result["inflate_epoch"], epochs)
    deflate = epochs if result["deflate_epoch"] is None else min(max(result["deflate_epoch"], inflate), epochs)
    return inflate, deflate


def measured_comp(result, full_seconds, skip_first=0):
    """The measured counterpart of the paper's Comp. for a finished run, or None.

    Each form's mean epoch time, from the epochs (after ``skip_first``) that ran the run's main way
    (:func:`main_way`), weighted by how many epochs the schedule gives that form, over E × the
    full-rank epoch time of that same way (``full_seconds``, from :func:`full_epoch_seconds`).  For
    a run that ran one way throughout this is its total epoch time over E full-rank epochs; epochs
    run elsewhere (a resume on another machine) or stepped otherwise are left out instead of mixed
    in.  None when the full-rank run has no epochs of that way or a form of the schedule has none.
    """
    history = result["history"]
    way = main_way(history, skip_first)
    t_full = full_seconds.get(way)
    if not t_full:
        return None
    counts = {form: n for form, n in form_epochs(len(history), *schedule_bounds(result)).items() if n > 0}
    times = epoch_seconds(history, lambda rec: rec["form"] if epoch_way(rec) == way else None, skip_first)
    if any(form not in times for form in counts):
        return None
    return sum(n * statistics.mean(times[form]) for form, n in counts.items()) / (len(history) * t_full)


def comp_paper(result, counts):
    """The paper's Comp. (parameters × epochs over full rank) of a run, from ``counts`` (1.0 if None)."""
    return 1.0 if counts is None else comp_ratio(counts, len(result["history"]), *schedule_bounds(result))


def compare_table(results, kind="text", converted_layers=None):
    """The side-by-side table of ``results`` (dicts from :func:`.loop.run_training`).

    Args:
        results: list of run results; the ``full`` one (if any) is the time baseline.
        kind: ``"text"`` (val loss and bits per byte) or ``"vision"`` (val loss and accuracy).
        converted_layers: names of the factorized layers, for the λ summary.

    Returns:
        str, one row per run and a header.  Without a ``full`` run the measured Comp. of a run is
        against its own full-rank epochs (a dynamic run's), and a last line says so.
    """
    by_name = {r["schedule"]: r for r in results}
    dense = next((r["params"]["dense"] for r in results if r["params"].get("dense")), None)
    lowrank = next((r["params"]["converted"] for r in results if r["params"].get("converted")), None)
    counts = ParamCounts(full=dense, lowrank=lowrank, other=0) if dense and lowrank else None
    full_seconds = full_epoch_seconds(by_name["full"]["history"]) if "full" in by_name else {}
    metric = "val bpb" if kind == "text" else "val acc"
    header = ["schedule", "val loss", metric, "trainable params (end / mean)", "s/epoch by form",
              "Comp. paper", "Comp. measured", "λ of factorized layers"]
    rows, measured_any = [header], False
    for r in results:
        history = r["history"]
        final = history[-1]
        score = f"{final['val_bpb']:.4f}" if kind == "text" else f"{100 * final['val_acc']:.2f}%"
        mean_params = statistics.mean(rec["trainable_params"] for rec in history)
        home = (main_way(history) or (None,))[0]
        times = epoch_seconds(history, lambda rec: form_label(rec, home))
        per_form = ", ".join(f"{label} {statistics.mean(t):.2f}" for label, t in times.items())
        comp = measured_comp(r, full_seconds or full_epoch_seconds([rec for rec in history if rec["form"] == "full"]))
        measured = "-" if comp is None else f"{comp:.3f}"
        measured_any |= comp is not None
        label = r["schedule"]
        if r["schedule"] == "dynamic":
            deflate = "no deflate" if r["deflate_epoch"] is None else f"D={r['deflate_epoch']}"
            label += f" (I={r['inflate_epoch']}, {deflate})"
        elif r["schedule"] == "lowrank":
            label += f" (ρ={r['params']['rank_ratio']:g})"
        rows.append([label, f"{final['val_loss']:.4f}", score,
                     f"{final['trainable_params']:,} / {mean_params:,.0f}", per_form,
                     f"{comp_paper(r, counts):.3f}", measured,
                     lambda_summary(r.get("monitor_records", []), converted_layers)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not full_seconds and measured_any:
        lines.append("Comp. measured: against this run's own full-rank epochs (no full-rank run in this job)")
    return "\n".join(lines)


def verdict(results, kind="text"):
    """One line comparing dynamic with fixed low rank (and full), or None if either is missing."""
    final = {r["schedule"]: r["final"] for r in results if r.get("final")}
    if "dynamic" not in final or "lowrank" not in final:
        return None
    if kind == "text":
        key, unit, sign, fmt = "val_bpb", "bits per byte", -1, (lambda v: f"{v:.4f}")
    else:
        key, unit, sign, fmt = "val_acc", "accuracy", 1, (lambda v: f"{100 * v:.2f}%")
    dynamic, lowrank = final["dynamic"][key], final["lowrank"][key]
    better = (dynamic - lowrank) * sign > 0
    text = (f"dynamic rank {'beats' if better else 'does not beat'} fixed low rank: {unit} "
            f"{fmt(dynamic)} vs {fmt(lowrank)}")
    if "full" in final:
        full = final["full"][key]
        text += f" (full rank {fmt(full)}"
        if (full - lowrank) * sign > 0:
            text += f"; dynamic closes {100 * (dynamic - lowrank) / (full - lowrank):.0f}% of the low-rank gap"
        text += ")"
    return text


def write_plots(monitors, out_dir, kind="text"):
    """λ curves per run and loss/accuracy curves of all runs, as PNGs under ``out_dir``.

    Args:
        monitors: RankMonitors (live or loaded), one per run.
        out_dir: folder for ``lambda_<run>.png`` and ``curves.png``.
        kind: ``"text"`` (curves of loss and bits per byte) or ``"vision"`` (loss and accuracy).

    Returns:
        (list of paths written, note or None) — the note says why plots were skipped.
    """
    if importlib.util.find_spec("matplotlib") is None:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib)"
    try:
        from ..plots import plot_training_curves
    except ImportError as err:
        return [], f"plots skipped: {err}"
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for monitor in monitors:
        path = os.path.join(out_dir, f"lambda_{monitor.name}.png")
        monitor.plot_spectral_ratio(path)
        paths.append(path)
    path = os.path.join(out_dir, "curves.png")
    keys = ["train_loss", "val_loss", "val_bpb" if kind == "text" else "val_acc"]
    plot_training_curves(monitors, path, keys=keys)
    paths.append(path)
    return paths, None
