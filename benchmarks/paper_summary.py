"""The summary of the CIFAR-10 paper runs: Table 4 beside the paper, and the placement study.

:func:`summarize` reads every run folder under a results folder (finished runs'
``result.json``, stopped runs' ``metrics.json``) and writes ``summary.json`` and
``summary.md``: accuracy per run and seed, seconds per epoch of each form
(graphed epochs, and epochs run on another device than most of the runs'
epochs, apart), the paper's Comp. and the measured ratio, the paper's numbers
beside them; λ and training curves of the SVD runs under ``plots/``; and, when the placement runs of
``benchmarks/paper_cifar10.py`` are there, the Table 2 / Fig. 3 comparison
with the final λ of the factorized convs 0, 10 and 18.
"""

import collections
import datetime
import json
import os
import platform
import re
import statistics
import sys

try:
    import dynrank  # noqa: F401
except ImportError:  # run from a checkout without installing: use the checkout's package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

__all__ = ["summarize", "environment", "PAPER", "PLACEMENT_PAPER"]

PAPER = {  # Table 4, CIFAR-10 / ResNet20, ρ = 0.5: accuracy (%) and the paper's Comp.
    ("full", "svd"): (92.15, 1.00),
    ("lowrank", "svd"): (91.19, 0.57), ("dynamic", "svd"): (92.13, 0.76),
    ("lowrank", "tucker"): (90.27, 0.41), ("dynamic", "tucker"): (92.10, 0.70),
    ("lowrank", "cp"): (88.31, 0.31), ("dynamic", "cp"): (91.33, 0.61),
    ("lowrank", "tkd-cpd"): (87.99, 0.21), ("dynamic", "tkd-cpd"): (91.24, 0.55),
}
# Table 2 (SVD, LR decay at 100 and 130): (I, D) → (name, accuracy %, λ of layers 0, 10, 18).
# "None" is the lowrank run; the paper's default (55, 120) straddles the decay.
INF = float("inf")
PLACEMENT_PAPER = {
    None: ("None (lowrank)", 91.14, (INF, 7.58, INF)),
    (0, 50): ("Early", 91.26, (59.32, 6.02, 76.47)),
    (25, 75): ("Middle", 91.82, (39.29, 4.27, 74.18)),
    (50, 100): ("Late: end of the high-noise regime", 91.87, (37.51, 4.19, 70.36)),
    (55, 120): ("Default: straddles the decay", 92.13, None),
    (100, 150): ("Low-noise regime only (Fig. 3)", None, None),
}
PLACEMENT_LAYERS = (0, 10, 18)     # indices among the 19 factorized 3×3 convs, input to output


def environment(device=None, threads=None):
    """Date, Python, torch, triton and the device the runs train on, named as their epoch records
    name it (:func:`dynrank.train.loop.device_name`, with ResNet20's layout there); ``device``
    defaults to CUDA where torch sees a GPU, else the CPU, ``threads`` to torch's current count."""
    import torch
    from dynrank.train.loop import device_name, trains_channels_last
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = dict(date=datetime.date.today().isoformat(), python=platform.python_version(), torch=torch.__version__,
                device=device_name(device, threads, channels_last=trains_channels_last("resnet20", device)))
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _load_runs(out):
    """Finished runs (result.json) and stopped ones (metrics.json so far) under ``out``."""
    runs = []
    for root, _, files in sorted(os.walk(out)):
        name = "result.json" if "result.json" in files else "metrics.json" if "metrics.json" in files else None
        if name is None:
            continue
        config_path = os.path.join(os.path.dirname(root), "config.json")
        if not os.path.isfile(config_path):
            continue
        with open(config_path, encoding="utf-8") as handle:
            cfg = json.load(handle)
        with open(os.path.join(root, name), encoding="utf-8") as handle:
            loaded = json.load(handle)
        if name == "result.json":
            loaded.update(finished=True, config=cfg, folder=root)
            runs.append(loaded)
        elif loaded:
            runs.append(dict(schedule=os.path.basename(root), history=loaded, config=cfg, finished=False,
                             params=None, inflate_epoch=cfg.get("inflate_epoch"),
                             deflate_epoch=cfg.get("deflate_epoch"), folder=root))
    return runs


def _paper_comp(r):
    """The paper's Comp. formula for a finished run (parameters × epochs relative to full)."""
    from dynrank.cost import ParamCounts
    from dynrank.train.report import comp_paper
    if r["schedule"] == "full" or not r.get("params"):
        return 1.0 if r["schedule"] == "full" else None
    return comp_paper(r, ParamCounts(full=r["params"]["dense"], lowrank=r["params"]["converted"], other=0))


def _placement(r):
    """(I, D) of a dynamic run that named its own (``dynamic:svd:0:I-D``, so its folder says so), else None."""
    match = re.search(r"-I(\d+)-D(\d+)-seed\d+$", os.path.basename(os.path.dirname(r["folder"])))
    return (int(match.group(1)), int(match.group(2))) if match and r["schedule"] == "dynamic" else None


def _final_lambdas(folder, schedule):
    """λ = σmax/σmin of the factorized convs PLACEMENT_LAYERS at the last measured epoch, or None."""
    from dynrank.monitor import read_csv
    path = os.path.join(folder, "monitor.layers.csv")
    if schedule == "full" or not os.path.isfile(path):
        return None
    rows = [row for row in read_csv(path) if row["type"] == "LowRankConv2d"]
    if not rows:
        return None
    last = [row for row in rows if row["epoch"] == rows[-1]["epoch"]]
    if len(last) <= max(PLACEMENT_LAYERS):
        return None
    return [last[i]["spectral_ratio"] for i in PLACEMENT_LAYERS]


def _epochs_cell(row):
    return str(row["epochs"]) if row["finished"] else f"{row['epochs']} of {row['planned_epochs']} (stopped)"


def _study(rows):
    """The SVD lowrank and dynamic runs, when the placement study is among them, by (I, D) then seed."""
    study = [r for r in rows if r["decomposition"] == "svd" and r["schedule"] in ("lowrank", "dynamic")]
    if not any(r["placement"] for r in study):
        return []
    return sorted(study, key=lambda r: (_where(r) or (-1, -1), r["seed"]))


def _where(row):
    """(I, D) of a dynamic run, D = the epoch count when it stays full to the end; None for lowrank."""
    if row["schedule"] != "dynamic":
        return None
    return row["inflate_epoch"], row["deflate_epoch"] or row["planned_epochs"]


def _placement_table(rows):
    """Table 2 / Fig. 3: SVD runs by where their full-rank epochs lie, with λ of layers 0, 10, 18."""
    study = _study(rows)
    if not study:
        return []
    lam = lambda v: "∞" if v == INF else f"{v:.2f}"  # noqa: E731
    lines = ["", "Placement of the full-rank epochs (the paper's Table 2 / Fig. 3; SVD, LR decay at 100 and 130):",
             "", "| setting | I | D | seed | epochs | acc. % (final) | paper acc. % | λ⁰, λ¹⁰, λ¹⁸ (final) "
             "| paper λ⁰, λ¹⁰, λ¹⁸ |", "|---|---|---|---|---|---|---|---|---|"]
    for r in study:
        name, paper_acc, paper_lam = PLACEMENT_PAPER.get(_where(r), ("-", None, None))
        i, d = _where(r) or ("-", "-")
        mine = ", ".join(map(lam, r["final_lambda"])) if r["final_lambda"] else "-"
        lines.append(f"| {name} | {i} | {d} | {r['seed']} | {_epochs_cell(r)} | {r['accuracy']:.2f} | "
                     f"{'-' if paper_acc is None else f'{paper_acc:.2f}'} | {mine} | "
                     f"{', '.join(map(lam, paper_lam)) if paper_lam else '-'} |")
    return lines


def _load_monitor(out, row):
    """The RankMonitor a run saved (``monitor.*`` in its folder), or None when it cannot be read."""
    from dynrank.monitor import RankMonitor
    try:
        return RankMonitor.load(os.path.join(out, row["folder"], "monitor"))
    except (OSError, ValueError, KeyError):
        return None


def _placement_plot(out, rows):
    """Fig. 3: validation accuracy over epochs of the study's runs, switches marked; the path, or None.

    Needs matplotlib (``dynrank[plots]``); runs without readable monitor files are left out.
    """
    study = _study(rows)
    if not study:
        return None
    try:
        from dynrank.plots import plot_training_curves
        monitors = []
        for r in study:
            monitor = _load_monitor(out, r)
            if monitor is None:
                continue
            where = _where(r)
            known = PLACEMENT_PAPER.get(where, (None,))[0]
            parts = [known.split(":")[0]] if known else []
            parts += ["(I={}, D={})".format(*where)] if where else []
            monitor.name = " ".join(parts) + f", seed {r['seed']}"
            monitors.append(monitor)
        if not monitors:
            return None
        path = os.path.join(out, "plots", "placement.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        plot_training_curves(monitors, path, keys=["val_acc"], labels={"val_acc": "validation accuracy"},
                             title="Placement of the full-rank epochs — ResNet20 / CIFAR-10, SVD ρ = 0.5")
        return os.path.relpath(path, out)
    except ImportError:
        return None


def _table4_plots(out, rows):
    """Fig. 1/5 and the curves: λ of every layer per run, and loss and accuracy of the SVD full,
    lowrank and dynamic runs of the first seed, under ``plots/``; the paths written (relative to
    ``out``).  Needs matplotlib; runs without readable monitor files are left out."""
    from dynrank.train.report import write_plots
    trio = [r for r in rows if r["decomposition"] in (None, "svd") and r["placement"] is None]
    if not trio:
        return []
    seed = min(r["seed"] for r in trio)
    order = ("full", "lowrank", "dynamic")
    monitors = []
    for r in sorted((r for r in trio if r["seed"] == seed), key=lambda r: order.index(r["schedule"])):
        monitor = _load_monitor(out, r)
        if monitor is not None:
            monitor.name = r["schedule"]
            monitors.append(monitor)
    if not monitors:
        return []
    try:
        paths, note = write_plots(monitors, os.path.join(out, "plots"), kind="vision")
    except ValueError as err:        # e.g. monitor files without the scalars to plot
        paths, note = [], f"plots skipped: {err}"
    if note:
        print(note)
    return [os.path.relpath(p, out) for p in paths]


def _schedule_name(row):
    """A summary row's schedule as the tables name it: a placement run with its own (I, D)."""
    if row["placement"] is None:
        return row["schedule"]
    return "{} I={} D={}".format(row["schedule"], *row["placement"])


def summarize(out):
    """Write ``summary.json`` and ``summary.md`` for every run under ``out`` and return the summary.

    Its ``device`` is the one most of the runs' epoch records name (the environment's where none
    names one); ``environment`` is that of the last driver call that started runs
    (``orchestration.json``), else this machine's, and the title gives its versions and date only
    when it names that device.
    """
    from dynrank.train.report import epoch_seconds, form_label, full_epoch_seconds, measured_comp
    results = _load_runs(out)
    summary = dict(environment=environment())
    orchestration = os.path.join(out, "orchestration.json")
    if os.path.isfile(orchestration):
        with open(orchestration, encoding="utf-8") as handle:
            summary["orchestration"] = json.load(handle)
        # The machine the last session that started runs ran on, not the one summarizing them.
        summary["environment"] = summary["orchestration"].get("environment") or summary["environment"]
    # The device the runs ran on: the one most of their epochs name, else that of the environment.
    devices = collections.Counter(rec["device"] for r in results for rec in r["history"] if rec.get("device"))
    home = summary["device"] = devices.most_common(1)[0][0] if devices else summary["environment"]["device"]
    # Median full-rank epoch per way of stepping (device, graphed or not), the first epoch left out.
    full_history = [rec for r in results if r["schedule"] == "full" for rec in r["history"][1:]]
    full_seconds = full_epoch_seconds(full_history, average=statistics.median)
    rows = []
    for r in results:
        cfg, history = r["config"], r["history"]
        decomposition = cfg.get("decomposition", "svd")
        # The first epoch carries start-up and cuDNN autotuning.
        forms = epoch_seconds(history, lambda rec: form_label(rec, home), skip_first=1)
        # device → [[first, last], …]: the stretches of consecutive epochs (1-based) not run on `home`
        # (a run may leave the GPU, come back and leave again).
        elsewhere = {}
        for rec in history:
            if rec.get("device") not in (None, home):
                spans, epoch = elsewhere.setdefault(rec["device"], []), rec["epoch"] + 1
                if spans and spans[-1][1] == epoch - 1:
                    spans[-1][1] = epoch
                else:
                    spans.append([epoch, epoch])
        placement = _placement(r)
        paper_acc, paper_table_comp = PAPER.get((r["schedule"], "svd" if r["schedule"] == "full" else decomposition),
                                                (None, None))
        if placement is not None:
            paper_acc, paper_table_comp = PLACEMENT_PAPER.get(placement, (None, None, None))[1], None
        rows.append(dict(schedule=r["schedule"], decomposition=None if r["schedule"] == "full" else decomposition,
                         seed=cfg.get("seed"), finished=r["finished"], epochs=len(history),
                         planned_epochs=cfg.get("epochs"), accuracy=100 * history[-1]["val_acc"],
                         best_accuracy=100 * max(rec["val_acc"] for rec in history),
                         seconds_per_epoch={k: statistics.median(v) for k, v in forms.items()},
                         comp_paper_formula=_paper_comp(r) if r["finished"] else None,
                         comp_measured=measured_comp(r, full_seconds, skip_first=1) if r["finished"] else None,
                         devices_elsewhere=elsewhere,
                         paper_accuracy=paper_acc, paper_comp=paper_table_comp,
                         inflate_epoch=r["inflate_epoch"], deflate_epoch=r["deflate_epoch"], placement=placement,
                         final_lambda=_final_lambdas(r["folder"], r["schedule"]),
                         folder=os.path.relpath(r["folder"], out)))
    summary.update(runs=rows, placement_plot=_placement_plot(out, rows), plots=_table4_plots(out, rows))
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    env = summary["environment"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    # Versions and date are those of the environment's machine: named only when the runs ran there.
    known = f", torch {env['torch']}, triton {env['triton']}, {env['date']}" if env["device"] == home else ""
    lines = [f"# CIFAR-10 / ResNet20, ρ = 0.5 — {home}{known}", "",
             "| schedule | decomposition | seed | epochs | acc. % (final) | paper acc. % | s/epoch by form "
             "| Comp. (paper formula) | Comp. measured | paper Comp. |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        per_form = ", ".join(f"{k} {v:.2f}" for k, v in row["seconds_per_epoch"].items())
        lines.append(f"| {_schedule_name(row)} | {row['decomposition'] or '-'} | {row['seed']} | {_epochs_cell(row)} | "
                     f"{row['accuracy']:.2f} | {fmt(row['paper_accuracy'], '.2f')} | {per_form} | "
                     f"{fmt(row['comp_paper_formula'], '.3f')} | {fmt(row['comp_measured'], '.3f')} | "
                     f"{fmt(row['paper_comp'], '.2f')} |")
    lines += _placement_table(rows)
    if summary["plots"]:
        lines += ["", "λ = σmax/σmin of every layer over the epochs (the paper's Fig. 1/5) and the loss and accuracy "
                      "curves of the SVD runs: " + ", ".join(f"`{p}`" for p in summary["plots"]) + "."]
    if summary["placement_plot"]:
        lines += ["", f"Validation accuracy of these runs over the epochs: `{summary['placement_plot']}`."]
    if "orchestration" in summary:
        o = summary["orchestration"]
        lines += ["", f"Up to {o['parallel']} runs shared the GPU at a time (MPS {'on' if o['mps'] else 'off'}), "
                      f"so seconds per epoch are under that load; the epoch-speed benchmark gives them alone. "
                      f"Sessions differed in how many runs shared it, so a measured Comp. whose run and "
                      f"full-rank reference ran in different sessions compares those loads too."]
    def stretches(spans):
        one_epoch = len(spans) == 1 and spans[0][0] == spans[0][1]
        return ("epoch " if one_epoch else "epochs ") + ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)
    moved = [" ".join(filter(None, (_schedule_name(row), row["decomposition"], f"seed {row['seed']}:",
                                    stretches(spans), f"on {device}")))
             for row in rows for device, spans in row["devices_elsewhere"].items()]
    if moved:
        lines += ["", f"Epochs not run on the {home} (resumed from its checkpoints elsewhere; timed apart as "
                      f"\"on DEVICE\"): " + "; ".join(moved) + "."]
    lines += ["", "Epochs that replayed CUDA graphs (`--cuda-graphs`) are timed apart as \"(graphs)\". The measured "
                  "Comp. weights the run's mean epoch time per form by its schedule, over E × the full-rank run's "
                  "median epoch; both from epochs that ran on the same device and stepped the same way (the first "
                  "epoch, with its start-up, left out)."]
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary
