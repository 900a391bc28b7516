"""Reproduce the paper's Table 4 on CIFAR-10 / ResNet20: full vs fixed low rank vs dynamic rank.

A driver around ``dynrank-train --preset cifar10-resnet20`` for a time-limited GPU session.  It
runs the listed (schedule, decomposition, seed) runs as subprocesses, up to ``--parallel`` at a
time on one GPU (a ResNet20 step at batch 128 leaves most of an H100 idle), each in its own folder
under ``--out``.  It stops runs cleanly before ``--budget-s`` runs out (SIGINT: the run checkpoints
at the exact batch, as Ctrl-C would) and resumes unfinished runs on the next call; finished runs are
skipped.  When a run is projected to miss the deadline, the lowest-priority run still going is
stopped to give the others its share of the GPU.  Then it writes ``summary.md`` and
``summary.json``: final accuracy per run and seed (stopped runs marked as such), seconds per epoch
of each form, the paper's Comp. ratio and the measured one, the paper's numbers beside them, and
the device, versions and date.

    python benchmarks/paper_cifar10.py --data-dir local/data --device cuda --budget-s 540 --parallel 9
    python benchmarks/paper_cifar10.py --summarize-only

Runs are written ``schedule:decomposition:seed``, highest priority first (default: full, lowrank
and dynamic with SVD, seed 0, then the other decompositions, dynamic before lowrank, then seed 1,
then the placement study).  A dynamic run may name its own full-rank phase as a fourth part,
``dynamic:svd:0:25-75`` (inflate at 25, deflate at 75): the paper's Table 2 / Fig. 3 study of where
the full-rank epochs go, summarized in a second table with the final λ of layers 0, 10 and 18.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # paper_summary (finds the checkout)
from paper_summary import environment, summarize  # noqa: E402  (puts the checkout on sys.path)
from _bench_common import at_least  # noqa: E402
from dynrank.convert import DECOMPOSITIONS  # noqa: E402

DEFAULT_RUNS = ([f"{s}:svd:0" for s in ("full", "lowrank", "dynamic")]
                + [f"{s}:{d}:0" for d in ("tucker", "cp", "tkd-cpd") for s in ("dynamic", "lowrank")]
                + [f"{s}:svd:1" for s in ("full", "lowrank", "dynamic")]
                + [f"dynamic:svd:0:{i}-{d}" for (i, d) in ((0, 50), (25, 75), (50, 100), (100, 150))])


def parse_run(text):
    """``schedule:decomposition:seed[:I-D]`` → (schedule, decomposition, seed, (I, D) or None).

    Raises:
        argparse.ArgumentTypeError: a spec of another form, or a decomposition other than
            dynrank's (svd, tucker, cp, tkd-cpd).
    """
    parts = text.split(":")
    placement = None
    if len(parts) == 4 and parts[0] == "dynamic":
        bounds = parts[3].split("-")
        if len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) < int(bounds[1]):
            placement = (int(bounds[0]), int(bounds[1]))
            parts = parts[:3]
    if len(parts) != 3 or parts[0] not in ("full", "lowrank", "dynamic") or not parts[2].isdigit():
        raise argparse.ArgumentTypeError(f"a run is schedule:decomposition:seed, e.g. dynamic:svd:0, or for a "
                                         f"dynamic run with its own full-rank phase dynamic:svd:0:25-75 "
                                         f"(inflate < deflate); got {text!r}")
    if parts[1] not in DECOMPOSITIONS:
        raise argparse.ArgumentTypeError(f"a run's decomposition is one of {', '.join(DECOMPOSITIONS)}, "
                                         f"got {parts[1]!r} in {text!r}")
    return parts[0], parts[1], int(parts[2]), placement


def _spec_text(spec):
    """The ``schedule:decomposition:seed[:I-D]`` of a parsed run spec (see :func:`parse_run`)."""
    schedule, decomposition, seed, placement = spec
    return f"{schedule}:{decomposition}:{seed}" + (f":{placement[0]}-{placement[1]}" if placement else "")


def run_dir(out, schedule, decomposition, seed, placement=None):
    name = "full" if schedule == "full" else f"{schedule}-{decomposition}"
    if placement is not None:
        name += f"-I{placement[0]}-D{placement[1]}"
    return os.path.join(out, f"{name}-seed{seed}")


PRESET_EPOCHS = 150


def scaled_placement(placement, epochs=None):
    """(I, D) of a placement run for a run of ``epochs`` (None: the preset's 150): the switches at
    the same fractions of the run, I < D ≤ epochs (a short dry run keeps the study's shape)."""
    if placement is None:
        return None, None
    if epochs is None or epochs == PRESET_EPOCHS:
        return placement
    inflate = min(placement[0] * epochs // PRESET_EPOCHS, epochs - 1)
    return inflate, min(max(placement[1] * epochs // PRESET_EPOCHS, inflate + 1), epochs)


# Step time of a full or adapter epoch over a lowrank one, until both are observed in this call.
FULL_OVER_LOWRANK = 1.3
ADAPTER_OVER_FULL = 1.2


class _Run:
    """One ``dynrank-train`` subprocess and the epochs it has finished so far."""

    def __init__(self, spec, priority, args):
        self.schedule, self.decomposition, self.seed, self.placement = spec
        self.priority = priority
        self.folder = run_dir(args.out, *spec)
        self.name = os.path.basename(self.folder)
        self.proc = None
        self.samples = []          # (time, epochs finished) each time the count changed
        self.cfg = None

    @property
    def result_path(self):
        return os.path.join(self.folder, self.schedule, "result.json")

    def finished(self):
        return os.path.isfile(self.result_path)

    def argv(self, args):
        threads = ["--threads", str(args.threads)] if args.device.startswith("cpu") else []
        running = ["--device", args.device] + threads + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
        if os.path.isfile(os.path.join(self.folder, "config.json")):
            # A resume keeps the run's settings; of the train args it takes how the run executes
            # (e.g. --cuda-graphs) and notes the rest as ignored.
            return ["--resume", self.folder] + running + args.train_args
        inflate, deflate = scaled_placement(self.placement, args.epochs)
        return (["--preset", "cifar10-resnet20", "--data-dir", args.data_dir, "--schedule", self.schedule,
                 "--decomposition", self.decomposition, "--seed", str(self.seed), "--out", self.folder] + running
                + (["--epochs", str(args.epochs)] if args.epochs is not None else [])
                + (["--inflate-epoch", str(inflate), "--deflate-epoch", str(deflate)]
                   if (inflate, deflate) != (None, None) else []) + args.train_args)

    def launch(self, args):
        os.makedirs(args.out, exist_ok=True)
        log = open(os.path.join(args.out, self.name + ".log"), "a", encoding="utf-8")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "dynrank.train", *self.argv(args)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.samples = [(time.monotonic(), self.epochs_done())]

    def epochs_done(self):
        path = os.path.join(self.folder, self.schedule, "metrics.csv")
        try:
            with open(path, encoding="utf-8") as handle:
                return max(0, sum(1 for _ in handle) - 1)
        except OSError:
            return 0

    @property
    def done(self):
        """Epochs finished when last polled."""
        return self.samples[-1][1]

    def poll(self):
        done = self.epochs_done()
        if done != self.done:
            self.samples.append((time.monotonic(), done))
        if self.cfg is None:
            try:
                with open(os.path.join(self.folder, "config.json"), encoding="utf-8") as handle:
                    self.cfg = json.load(handle)
            except (OSError, ValueError):
                pass

    def seconds_per_epoch(self):
        """Wall seconds per epoch over the last few epochs (None before two epochs were seen finish)."""
        seen = self.samples[1:]    # the first epoch carries start-up and cuDNN autotuning
        if len(seen) < 3:
            return None
        (t0, e0), (t1, e1) = seen[max(0, len(seen) - 4)], seen[-1]
        return (t1 - t0) / (e1 - e0)

    def seconds_left(self, full_over_lowrank):
        """Projected wall seconds to the end at the current form's recent rate (None before one is seen)."""
        rate = self.seconds_per_epoch()
        if self.cfg is None or rate is None:
            return None
        done, epochs = self.done, self.cfg["epochs"]
        if self.schedule != "dynamic":
            return rate * (epochs - done)
        inflate, deflate = self.cfg["inflate_epoch"], self.cfg["deflate_epoch"] or epochs
        low = max(0, inflate - done)
        full = max(0, deflate - max(done, inflate))
        adapter = epochs - max(done, deflate)
        per_full = rate * (full_over_lowrank if done < inflate else 1.0)
        if done >= deflate:
            per_full = rate / ADAPTER_OVER_FULL
        return rate * low + per_full * full + per_full * ADAPTER_OVER_FULL * adapter


def _full_over_lowrank(runs):
    """Observed full-epoch over lowrank-epoch time from this call's full and SVD lowrank runs."""
    rates = {r.schedule: r.seconds_per_epoch() for r in runs
             if r.proc is not None and r.proc.poll() is None and r.decomposition == "svd"}
    if rates.get("full") and rates.get("lowrank"):
        return max(1.0, rates["full"] / rates["lowrank"])
    return FULL_OVER_LOWRANK


def choose_stop(running, now, deadline, full_over_lowrank, protected=()):
    """The run to stop so that a more important one can finish by ``deadline``, or None; and the late runs.

    A run is late when its projection ends after the deadline.  Room is made only for a late run
    that could still finish with the whole GPU to itself (its projected time over the number of
    running runs): stopping others cannot save one that misses even then, and would only waste the
    GPU.  The run stopped is the lowest-priority one below such a late run, never a protected one.
    """
    late = [r for r in running if (left := r.seconds_left(full_over_lowrank)) is not None
            and now + left > deadline and now + left / len(running) <= deadline]
    if not late:
        return None, late
    first = min(r.priority for r in late)
    candidates = [r for r in running if r.priority > first and r.name not in protected]
    return (max(candidates, key=lambda r: r.priority) if candidates else None), late


def run_all(args, log=print):
    """Run ``args.runs`` as up to ``args.parallel`` concurrent subprocesses before the deadline.

    Runs start in priority order (their order on the command line).  Once
    each running run has shown its epoch rate, a run projected to miss the
    deadline makes the lowest-priority running run stop (SIGINT: it
    checkpoints at the batch and resumes on a later call), which gives the
    others its share of the GPU (see :func:`choose_stop`); the first
    ``--protect`` unfinished runs are never stopped that way.  At the deadline every run still going is stopped the
    same way.  ``orchestration.json`` records a call that started runs (a call that
    starts none keeps the record of the last one that did).  Returns 0 when every
    run finished, 1 when one failed, 3 when some are left.
    """
    started = time.monotonic()
    deadline = started + args.budget_s
    runs = [_Run(spec, i, args) for i, spec in enumerate(args.runs)]
    pending = [r for r in runs if not r.finished()]
    protected = {r.name for r in pending[:args.protect]}      # the first unfinished ones, not finished ones
    running, events, failed = [], [], []
    next_drop = last_status = 0.0
    while pending or running:
        now = time.monotonic()
        deadline = _read_deadline(args.deadline_file, deadline)
        for run in list(running):
            run.poll()
            code = run.proc.poll()
            if code is None:
                continue
            running.remove(run)
            if code not in (0, 130):
                failed.append(run.name)
                log(f"dynrank-train failed in {run.folder} (exit {code}); see {run.name}.log")
            events.append(dict(t=round(now - started, 1), run=run.name, event="exit", code=code,
                               epochs=run.done))
        rates = [rate for rate in (r.seconds_per_epoch() for r in runs) if rate]
        typical = statistics.median(rates) if rates else None
        while pending and len(running) < args.parallel and deadline - now > args.min_launch_s:
            run = pending[0]
            planned = PRESET_EPOCHS if args.epochs is None else args.epochs
            epochs = planned - run.epochs_done()   # a resumed run has fewer to go
            if typical and typical * epochs > deadline - now:
                break                         # would not finish: leave the GPU to the others
            pending.pop(0)
            run.launch(args)
            running.append(run)
            events.append(dict(t=round(now - started, 1), run=run.name, event="start"))
            log(f"[{now - started:5.0f}s] start {run.name}")
        if not running:
            break
        if now >= deadline - args.grace_s:
            for run in running:
                run.proc.send_signal(signal.SIGINT)
            _wait(running, args.grace_s)
            events.append(dict(t=round(time.monotonic() - started, 1), event="deadline",
                               stopped=[r.name for r in running]))
            running = []
            break
        victim, late = choose_stop(running, now, deadline - args.grace_s, _full_over_lowrank(runs), protected)
        if victim is not None and now >= next_drop:
            victim.proc.send_signal(signal.SIGINT)
            next_drop = now + args.drop_cooldown_s
            events.append(dict(t=round(now - started, 1), run=victim.name, event="stop",
                               late=[r.name for r in late]))
            log(f"[{now - started:5.0f}s] stop {victim.name}: {', '.join(r.name for r in late)} "
                f"would miss the deadline")
        if now - last_status > args.status_every_s:
            last_status = now
            log(f"[{now - started:5.0f}s] " + "  ".join(
                f"{r.name} {r.done}ep" + (f" {rate:.2f}s/ep" if (rate := r.seconds_per_epoch()) else "")
                for r in running))
        time.sleep(args.poll_s)
    if any(e["event"] == "start" for e in events):
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "orchestration.json"), "w", encoding="utf-8") as handle:
            # device_name uses the thread count only for a CPU, as the runs' records do.
            json.dump(dict(environment=environment(args.device, args.threads), parallel=args.parallel,
                           budget_s=args.budget_s, mps=bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")),
                           events=events, failed=failed),
                      handle, indent=1)
    if failed:
        return 1
    return 0 if all(r.finished() for r in runs) else 3


def _read_deadline(path, current):
    """A later deadline (or an earlier one) written to ``path`` as Unix time, else ``current``."""
    if not path:
        return current
    try:
        with open(path, encoding="utf-8") as handle:
            wall = float(handle.read().strip())
    except (OSError, ValueError):
        return current
    return time.monotonic() + (wall - time.time())


def _wait(running, seconds):
    end = time.monotonic() + seconds
    for run in running:
        try:
            run.proc.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="local/data", help="folder holding cifar10-jpeg.tar.gz or CIFAR-10")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "cifar10-resnet20"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run on a CPU device")
    parser.add_argument("--budget-s", type=at_least(0, float), default=540.0,
                        help="wall seconds for this call: runs still going then are stopped with a checkpoint")
    parser.add_argument("--deadline-file", default=None,
                        help="file that may hold a new deadline as Unix time, read while running "
                             "(for runs that outlive the call that started them)")
    parser.add_argument("--parallel", type=int, default=1, help="runs sharing the GPU at a time")
    parser.add_argument("--protect", type=at_least(0), default=3,
                        help="the first this many unfinished runs are never stopped to make room for the others")
    parser.add_argument("--cache-dir", default=None, help="decoded-image cache shared by the runs")
    parser.add_argument("--grace-s", type=at_least(0, float), default=25.0,
                        help="time a stopped run gets to checkpoint")
    parser.add_argument("--drop-cooldown-s", type=at_least(0, float), default=20.0,
                        help="seconds between two stops made to free the GPU")
    parser.add_argument("--min-launch-s", type=at_least(0, float), default=60.0,
                        help="start no run with less time left")
    parser.add_argument("--poll-s", type=at_least(0, float), default=2.0)
    parser.add_argument("--status-every-s", type=at_least(0, float), default=30.0)
    parser.add_argument("--epochs", type=at_least(1), default=None,
                        help="override the preset's 150 (for a dry run)")
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run(r) for r in DEFAULT_RUNS])
    parser.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                        help="further dynrank-train flags for new runs (last on the line), e.g. --batch-size 8")
    parser.add_argument("--summarize-only", action="store_true")
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error(f"--parallel must be ≥ 1, got {args.parallel}")
    if args.threads < 1:
        parser.error(f"--threads must be ≥ 1, got {args.threads}")
    folders = {}
    for spec in args.runs:     # two runs in one folder would train over each other's files
        folder = run_dir(args.out, *spec)
        if folder in folders:
            first = folders[folder]
            why = " (a full run's folder does not name its decomposition)" if first[1] != spec[1] else ""
            parser.error(f"--runs {_spec_text(first)} and {_spec_text(spec)} both run in {folder}{why}; "
                         "give each run once")
        folders[folder] = spec
    if args.summarize_only and not os.path.isdir(args.out):
        parser.error(f"--summarize-only: no run folder at {args.out}")
    code = 0 if args.summarize_only else run_all(args)
    if not os.path.isdir(args.out):
        # No run started into a new folder: a launch needs more than --min-launch-s of --budget-s left.
        print(f"no run started, so nothing to summarize in {args.out}: a run is launched only while more than "
              f"--min-launch-s {args.min_launch_s:g} s of --budget-s {args.budget_s:g} s are left")
        return 2
    summarize(args.out)
    return code


if __name__ == "__main__":
    sys.exit(main())
