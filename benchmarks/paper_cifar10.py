"""Reproduce the paper's Table 4 on CIFAR-10 / ResNet20: full vs fixed low rank vs dynamic rank.

A driver around ``dynrank-train --preset cifar10-resnet20`` for a time-limited GPU session: it runs
the listed (schedule, decomposition, seed) runs one after another, each in its own folder under
``--out``, stops cleanly before ``--budget-s`` runs out (the run checkpoints at the exact batch, as
Ctrl-C would), and resumes unfinished runs on the next call.  Finished runs are skipped.  Then it
writes ``summary.md`` and ``summary.json`` beside them: final accuracy per run and seed, measured
seconds per epoch of each form, the paper's Comp. ratio and the measured one, the paper's numbers
beside them, and the device, versions and date.

    python benchmarks/paper_cifar10.py --data-dir local/data --device cuda --budget-s 540
    python benchmarks/paper_cifar10.py --summarize-only

Runs are written ``schedule:decomposition:seed`` (default: full, lowrank and dynamic with SVD,
seed 0, then the other decompositions, then seed 1).
"""

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import time

PAPER = {  # Table 4, CIFAR-10 / ResNet20, ρ = 0.5: accuracy (%) and the paper's Comp.
    ("full", "svd"): (92.15, 1.00),
    ("lowrank", "svd"): (91.19, 0.57), ("dynamic", "svd"): (92.13, 0.76),
    ("lowrank", "tucker"): (90.27, 0.41), ("dynamic", "tucker"): (92.10, 0.70),
    ("lowrank", "cp"): (88.31, 0.31), ("dynamic", "cp"): (91.33, 0.61),
    ("lowrank", "tkd-cpd"): (87.99, 0.21), ("dynamic", "tkd-cpd"): (91.24, 0.55),
}
DEFAULT_RUNS = ([f"{s}:svd:0" for s in ("full", "lowrank", "dynamic")]
                + [f"{s}:{d}:0" for d in ("tucker", "cp", "tkd-cpd") for s in ("lowrank", "dynamic")]
                + [f"{s}:svd:1" for s in ("full", "lowrank", "dynamic")])


def parse_run(text):
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in ("full", "lowrank", "dynamic") or not parts[2].isdigit():
        raise argparse.ArgumentTypeError(f"a run is schedule:decomposition:seed, e.g. dynamic:svd:0; got {text!r}")
    return parts[0], parts[1], int(parts[2])


def run_dir(out, schedule, decomposition, seed):
    name = "full" if schedule == "full" else f"{schedule}-{decomposition}"
    return os.path.join(out, f"{name}-seed{seed}")


def _stop_after(seconds):
    """Deliver SIGINT after ``seconds``: dynrank-train saves a checkpoint at the batch and returns."""
    signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))


def run_all(args):
    from dynrank.train.cli import main as train
    deadline = time.monotonic() + args.budget_s
    for schedule, decomposition, seed in args.runs:
        folder = run_dir(args.out, schedule, decomposition, seed)
        if os.path.isfile(os.path.join(folder, schedule, "result.json")):   # dynrank-train: <out>/<schedule>/
            continue
        left = deadline - time.monotonic()
        if left < 30:
            print(f"budget spent; next time resumes at {folder}", flush=True)
            return 3
        if os.path.isfile(os.path.join(folder, "config.json")):
            argv = ["--resume", folder, "--device", args.device]
        else:
            argv = ["--preset", "cifar10-resnet20", "--data-dir", args.data_dir, "--schedule", schedule,
                    "--decomposition", decomposition, "--seed", str(seed), "--out", folder,
                    "--device", args.device] + (["--epochs", str(args.epochs)] if args.epochs else []) + args.train_args
        print(f"== {folder} ({left:.0f} s left)", flush=True)
        _stop_after(left - 20)
        try:
            code = train(argv)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if code == 130:
            print(f"stopped inside {folder}; the next call resumes it", flush=True)
            return 3
        if code != 0:
            print(f"dynrank-train failed in {folder} (exit {code})", flush=True)
            return code
    return 0


def _environment():
    import torch
    info = dict(date=datetime.date.today().isoformat(), python=platform.python_version(), torch=torch.__version__,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu")
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def summarize(out):
    from dynrank.cost import ParamCounts, comp_ratio, measured_comp_ratio
    results = []
    for root, _, files in sorted(os.walk(out)):
        if "result.json" not in files:
            continue
        with open(os.path.join(root, "result.json"), encoding="utf-8") as handle:
            result = json.load(handle)
        with open(os.path.join(os.path.dirname(root), "config.json"), encoding="utf-8") as handle:
            result["config"] = json.load(handle)
        results.append(result)
    full_times = [rec["train_time"] for r in results if r["schedule"] == "full" for rec in r["history"][1:]]
    full_epoch = statistics.median(full_times) if full_times else None
    rows = []
    for r in results:
        cfg, history = r["config"], r["history"]
        decomposition = cfg.get("decomposition", "svd")
        forms = {}
        for rec in history[1:]:          # the first epoch carries compilation and cuDNN autotuning
            forms.setdefault(rec["form"], []).append(rec["train_time"])
        dense, converted = r["params"]["dense"], r["params"]["converted"]
        paper_comp = 1.0
        if r["schedule"] != "full" and dense and converted:
            counts = ParamCounts(full=dense, lowrank=converted, other=0)
            epochs = len(history)
            paper_comp = (comp_ratio(counts, epochs, None, None) if r["schedule"] == "lowrank" else
                          comp_ratio(counts, epochs, r["inflate_epoch"], min(r["deflate_epoch"] or epochs, epochs)))
        measured = None
        if full_epoch:
            records = [{"form": rec["form"], "wall_seconds": rec["train_time"]} for rec in history]
            measured = measured_comp_ratio(records, full_epoch_seconds=full_epoch)
        paper_acc, paper_table_comp = PAPER.get((r["schedule"], "svd" if r["schedule"] == "full" else decomposition),
                                                (None, None))
        rows.append(dict(schedule=r["schedule"], decomposition=None if r["schedule"] == "full" else decomposition,
                         seed=cfg.get("seed"), epochs=len(history), accuracy=100 * history[-1]["val_acc"],
                         best_accuracy=100 * max(rec["val_acc"] for rec in history),
                         seconds_per_epoch={k: statistics.median(v) for k, v in forms.items()},
                         comp_paper_formula=paper_comp, comp_measured=measured,
                         paper_accuracy=paper_acc, paper_comp=paper_table_comp,
                         inflate_epoch=r["inflate_epoch"], deflate_epoch=r["deflate_epoch"]))
    summary = dict(environment=_environment(), runs=rows)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    env = summary["environment"]
    lines = [f"# CIFAR-10 / ResNet20, ρ = 0.5 — {env['device']}, torch {env['torch']}, triton {env['triton']}, "
             f"{env['date']}", "",
             "| schedule | decomposition | seed | epochs | acc. % (final) | paper acc. % | s/epoch by form "
             "| Comp. (paper formula) | Comp. measured | paper Comp. |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        per_form = ", ".join(f"{k} {v:.2f}" for k, v in row["seconds_per_epoch"].items())
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {row['schedule']} | {row['decomposition'] or '-'} | {row['seed']} | {row['epochs']} | "
                     f"{row['accuracy']:.2f} | {fmt(row['paper_accuracy'], '.2f')} | {per_form} | "
                     f"{row['comp_paper_formula']:.3f} | {fmt(row['comp_measured'], '.3f')} | "
                     f"{fmt(row['paper_comp'], '.2f')} |")
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="local/data", help="folder holding cifar10-jpeg.tar.gz or CIFAR-10")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "cifar10-resnet20"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop launching and checkpoint before this")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's 150 (for a dry run)")
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run(r) for r in DEFAULT_RUNS])
    parser.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                        help="further dynrank-train flags for new runs (last on the line), e.g. --batch-size 8")
    parser.add_argument("--summarize-only", action="store_true")
    args = parser.parse_args(argv)
    code = 0 if args.summarize_only else run_all(args)
    summarize(args.out)
    return code


if __name__ == "__main__":
    sys.exit(main())
