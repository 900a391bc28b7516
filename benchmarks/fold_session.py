"""Fold what a GPU session returned into the repository's results.

``benchmarks/gpu_session.sh`` returns up to five archives (see benchmarks/README.md).  This puts
them where the repository keeps results, so the next session resumes from them:

- ``bench.tgz`` (suite JSONs and their pytest logs, report, profile, tile sweeps, engine diagnosis,
  session.json) → ``benchmarks/results/gpu-<device>-<date>/``, named from the JSONs' machine info
  or, where no suite JSON came back, from session.json (the device and start gpu_session.sh
  records; ``-2``, ``-3`` for a later session on the same device and day), with the session's
  ``tests-cuda.log`` (the native test run) beside them;
- ``paper.tgz`` (run folders without checkpoints) and ``paper-checkpoints.tgz`` (unfinished runs'
  checkpoints) → over ``benchmarks/results/cifar10-resnet20/``; a run that has finished drops
  its old checkpoint, and every run folder keeps only what the repository commits: config.json,
  metrics, the monitor's CSV tables and result.json without its monitor records (the CSV tables
  hold them), no compare tables, plots or monitor.json;
- with either of them, the paper summary is written again from every run folder.

An empty suite JSON (a suite cut off at its time limit, or one whose benchmarks all failed) is left out
with a note saying which, as the suite's log tells.  A ``bench.tgz`` in which neither a suite JSON nor
session.json names the device is refused before anything is folded; so is one holding numbers measured
on another device than CUDA (torch saw no GPU), a folder holding none of the archives, an archive cut
short (an interrupted copy), and a paper archive whose config.json, metrics.json or result.json is not
valid JSON.  Each refusal names the archive (and the file in it).

A run continued elsewhere from a copy of its committed folder (``dynrank-train --resume COPY
--device cpu ...``) folds back with ``--run COPY``: its settings, epoch records, monitor files,
result and checkpoint replace the committed ones, its console output (``--output``) is appended to
the run's ``.log`` under a ``--note`` line saying where and how it ran, and the summary is written
again.  Every JSON it would copy is read first: one that is not valid JSON is refused, named, before
anything committed is touched.  A run started elsewhere that the repository does not hold yet
(``dynrank-train --preset cifar10-resnet20 --out FOLDER ...`` with the driver's settings) folds in
the same way with ``--new``; its folder must carry the driver's name for the run its ``config.json``
describes.

    python benchmarks/fold_session.py DIR_WITH_THE_ARCHIVES [--results benchmarks/results]
    python benchmarks/fold_session.py --run COPY --output OUT.txt --note "resumed on ..."
    python benchmarks/fold_session.py --run FOLDER --new --output OUT.txt --note "started on ..."
"""

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paper_summary import summarize  # noqa: E402  (before dynrank: it finds the checkout's)
from paper_cifar10 import run_dir  # noqa: E402

from dynrank.train.cli import PRESETS  # noqa: E402

PAPER_FOLDER = "cifar10-resnet20"
# gpu_session.sh's record of the device and the call's start, in the suite JSONs' layout: no suite.
SESSION_INFO = "session.json"
# What a run folder keeps in the repository, per schedule (no model.pt, plots or compare tables).
RUN_FILES = ("metrics.csv", "metrics.json", "result.json", "checkpoint.pt")
# The JSONs a committed run folder keeps, with the type each holds: read before anything is folded.
RUN_JSONS = {"config.json": dict, "metrics.json": list, "result.json": dict}


def _kept(file):
    """Whether a schedule folder's ``file`` is committed: RUN_FILES and the monitor's CSV tables."""
    return file in RUN_FILES or (file.startswith("monitor.") and file.endswith(".csv"))


def _parse_json(text, name, expected):
    """``text`` parsed as JSON holding an ``expected`` (dict or list); ValueError naming ``name`` otherwise."""
    try:
        value = json.loads(text)
    except ValueError as err:           # JSONDecodeError, and UnicodeDecodeError of bytes
        raise ValueError(f"{name}: not valid JSON ({err})") from None
    if not isinstance(value, expected):
        kind = "an object" if expected is dict else "a list"
        raise ValueError(f"{name}: expected {kind}, got {type(value).__name__}")
    return value


def _read_json(path, expected=dict):
    """The JSON file at ``path`` (see :func:`_parse_json`); errors name the file."""
    with open(path, "rb") as handle:
        return _parse_json(handle.read(), path, expected)


def _slim_result(path):
    """Drop ``monitor_records`` from the result.json at ``path``: the monitor's CSV tables beside it
    hold the same records, and they were most of the file (1.3 of 1.7 MB per ResNet20 run)."""
    result = _read_json(path)
    if "monitor_records" in result:
        del result["monitor_records"]
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)


def _tidy_runs(runs, log):
    """Keep in each run folder under ``runs`` what the repository commits: config.json and the
    schedule folders' kept files (compare tables, plots, monitor.json and model files go), with
    slim result.json files.  A schedule folder is one holding metrics.json or checkpoint.pt: a run
    stopped during its first epoch has only its checkpoint, which the next session resumes from."""
    for name in sorted(os.listdir(runs)):
        run = os.path.join(runs, name)
        if name == "plots" or not os.path.isfile(os.path.join(run, "config.json")):
            continue
        dropped = []
        for entry in sorted(os.listdir(run)):
            path = os.path.join(run, entry)
            if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                           for f in ("metrics.json", "checkpoint.pt")):
                for file in sorted(os.listdir(path)):
                    if not _kept(file):
                        os.remove(os.path.join(path, file))
                        dropped.append(f"{entry}/{file}")
                if os.path.isfile(os.path.join(path, "result.json")):
                    _slim_result(os.path.join(path, "result.json"))
            elif entry != "config.json":
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                dropped.append(entry)
        if dropped:
            log(f"{name}: not committed, dropped {', '.join(dropped)}")


def _open_archive(archive):
    """``archive`` opened, with its file and folder members, each path checked.  getmembers() reads the
    whole archive, so one cut short (an interrupted copy) or no archive at all is refused here, before
    anything is taken from it: ValueError naming the archive."""
    try:
        tar = tarfile.open(archive)
        try:
            members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
        except BaseException:
            tar.close()
            raise
    except (tarfile.TarError, EOFError, zlib.error) as err:
        why = " ".join(str(err).split()) or type(err).__name__     # tarfile lists each method it tried
        raise ValueError(f"{archive}: not a complete archive ({why}); nothing was folded from it") from None
    for member in members:
        parts = os.path.normpath(member.name).split(os.sep)
        if os.path.isabs(member.name) or ".." in parts:
            tar.close()
            raise ValueError(f"{archive}: refusing the path {member.name!r} (outside the target folder)")
    return tar, members


def _extract(archive, target):
    """Unpack ``archive`` into ``target``; returns the names of its files (see :func:`_open_archive`)."""
    tar, members = _open_archive(archive)
    with tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(target, members=members, **safe)
    return [m.name for m in members if m.isfile()]


def _check_paper_archive(archive):
    """Refuse ``archive`` (paper.tgz, paper-checkpoints.tgz) before anything is folded where it is cut
    short or a run folder's JSON in it is not valid: it is unpacked over the committed runs."""
    tar, members = _open_archive(archive)
    with tar:
        for member in members:
            expected = RUN_JSONS.get(os.path.basename(member.name))
            if member.isfile() and expected is not None:
                try:
                    _parse_json(tar.extractfile(member).read(), f"{archive}: {member.name}", expected)
                except ValueError as err:
                    raise ValueError(f"{err}; nothing was folded") from None


def _read_suite(path):
    """The suite JSON at ``path`` as a dict, or None where it is empty or not one: pytest-benchmark opens
    its ``--benchmark-json`` file at the start, so a suite killed at its time limit leaves 0 bytes, and
    so does one whose benchmarks all failed (see :func:`_why_empty`)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _why_empty(suite_json):
    """Why the suite that left ``suite_json`` empty wrote nothing, as its pytest log (NAME.log beside
    it, which gpu_session.sh writes) tells: stopped at its time limit (KeyboardInterrupt, or no final
    summary line: killed), failed (pytest-benchmark writes nothing when no benchmark succeeded), or
    no benchmark ran.  Quotes the log's last line."""
    log = os.path.splitext(suite_json)[0] + ".log"
    name = os.path.basename(log)
    if not os.path.isfile(log):
        return f"cut off at its time limit, or none of its benchmarks succeeded; no {name} came with it"
    with open(log, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    lines = [line.strip(" =") for line in text.splitlines() if line.strip(" =")]
    last = lines[-1] if lines else ""
    if "KeyboardInterrupt" in text or not re.search(r"\bin \d+(\.\d+)?s\b", last):
        why = "cut off at its time limit"
    elif re.search(r"\b\d+ (failed|errors?)\b", last):
        why = "none of its benchmarks succeeded"
    else:
        why = "no benchmark ran"
    return f"{why}: {name} ends {last!r}"


def _check_cuda(path):
    """Refuse (ValueError) the suite JSON or session.json at ``path`` unless it records a CUDA device:
    numbers measured on the CPU (torch saw no GPU) are no GPU session's."""
    device = ((_read_suite(path).get("machine_info") or {}).get("dynrank") or {}).get("device")
    if not (isinstance(device, str) and device.split(":")[0] == "cuda"):
        raise ValueError(f"{os.path.basename(path)} records the device {device!r}, expected cuda "
                         "(torch saw no GPU: not a GPU session's numbers)")


def bench_folder_name(jsons):
    """``gpu-<device>-<date>`` from the first suite JSON that names its device (e.g. gpu-h200-2026-11-25)."""
    for path in jsons:
        data = _read_suite(path)
        if data is None:
            continue
        device = ((data.get("machine_info") or {}).get("dynrank") or {}).get("device_name")
        if device:
            model = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", device)
            slug = (model.group(1) if model else re.sub(r"[^A-Za-z0-9]+", "-", device)).lower().strip("-")
            date = (data.get("datetime") or datetime.date.today().isoformat())[:10]
            return f"gpu-{slug}-{date}"
    raise ValueError(f"none of {', '.join(map(os.path.basename, jsons)) or 'the suite JSONs'} names its device")


def _session_started(jsons):
    """The set of start times (``datetime``) the suite JSONs record: one per session."""
    return {data.get("datetime") for data in map(_read_suite, jsons) if data is not None}


def _session_folder(results_dir, name, jsons):
    """``results_dir/name``, or ``name-2``, ``name-3``, ... where that folder holds another session's
    suites: a second session on the same device and day must not overwrite the first one's numbers.
    Folding the same session again reuses its folder."""
    started, n = _session_started(jsons), 1
    while True:
        target = os.path.join(results_dir, name if n == 1 else f"{name}-{n}")
        held = [os.path.join(target, f) for f in os.listdir(target) if f.endswith(".json")] \
            if os.path.isdir(target) else []
        if not held or _session_started(held) & started:
            return target
        n += 1


def _fold_bench(bench, results_dir, log):
    """Move the files of ``bench`` (bench.tgz) into their session folder under ``results_dir``;
    returns that folder.  The archive is unpacked into a temporary folder first, so one in which
    neither a suite JSON nor session.json names the device, or one holding numbers of another
    device than CUDA, is refused (ValueError) before anything is moved.  Without a suite JSON the
    session's other files (profile, sweeps, logs) are folded under session.json's name."""
    os.makedirs(results_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".bench-staging-", dir=results_dir)   # same file system: os.replace
    try:
        names = _extract(bench, staging)
        paths = [os.path.join(staging, n) for n in names]
        jsons = sorted(p for p in paths if p.endswith(".json") and os.path.basename(p) != SESSION_INFO)
        cut = [path for path in jsons if _read_suite(path) is None]
        for path in cut:
            log(f"{bench}: {os.path.basename(path)} is empty or not a suite JSON ({_why_empty(path)}): not folded")
        names = [n for n in names if os.path.join(staging, n) not in cut]
        jsons = [path for path in jsons if path not in cut]
        described = jsons + [p for p in paths if os.path.basename(p) == SESSION_INFO and _read_suite(p) is not None]
        if not described:
            found = ", ".join(sorted(map(os.path.basename, names))) or "nothing"
            raise ValueError(f"{bench}: neither a suite JSON nor {SESSION_INFO} in it (it holds {found}); "
                             "nothing was folded")
        try:
            name = bench_folder_name(described)
            for path in described:
                _check_cuda(path)
        except ValueError as err:
            raise ValueError(f"{bench}: {err}; nothing was folded") from None
        target = _session_folder(results_dir, name, described)
        os.makedirs(target, exist_ok=True)
        for member in names:
            os.replace(os.path.join(staging, member), os.path.join(target, os.path.basename(member)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"benchmarks: {len(names)} files → {target}")
    return target


def fold(session_dir, results_dir, log=print):
    """Fold the archives found in ``session_dir`` into ``results_dir``; returns the folders written,
    none where the folder holds no archive of a session (nothing is touched then).  A bench.tgz in
    which nothing names the device or with numbers of another device than CUDA, an archive cut
    short, or a paper archive with a run's JSON that is not valid raises ValueError naming it before
    anything is folded."""
    written = []
    bench = os.path.join(session_dir, "bench.tgz")
    papers = [os.path.join(session_dir, name) for name in ("paper.tgz", "paper-checkpoints.tgz")]
    papers = [archive for archive in papers if os.path.isfile(archive)]
    for archive in papers:
        _check_paper_archive(archive)
    if os.path.isfile(bench):
        target = _fold_bench(bench, results_dir, log)
        written.append(target)
        tests_log = os.path.join(session_dir, "tests-cuda.log")
        if os.path.isfile(tests_log):       # the native test run of the same session, kept beside its numbers
            shutil.copyfile(tests_log, os.path.join(target, "tests-cuda.log"))
            log(f"tests-cuda.log → {target}")
    runs = os.path.join(results_dir, PAPER_FOLDER)
    for archive in papers:
        names = _extract(archive, results_dir)
        log(f"{os.path.basename(archive)}: {len(names)} files → {results_dir}")
    if papers and os.path.isdir(runs):      # the run folders are tidied and summarized only when runs came in
        _tidy_runs(runs, log)
        _summarize(runs, log)
        written.append(runs)
    return written


def _summarize(runs, log):
    """Drop finished runs' checkpoints under ``runs`` and write the paper summary again."""
    for root, _, files in os.walk(runs):
        if "result.json" in files and "checkpoint.pt" in files:
            os.remove(os.path.join(root, "checkpoint.pt"))
            log(f"finished: dropped {os.path.join(root, 'checkpoint.pt')}")
    summarize(runs)


def _driver_names(config):
    """The folder names the paper driver gives the run ``config`` describes: a dynamic run's name
    carries its own full-rank phase (I, D), and may leave out the preset's."""
    schedule, decomposition, seed = config.get("schedule"), config.get("decomposition"), config.get("seed")
    plain = os.path.basename(run_dir("", schedule, decomposition, seed))
    if schedule != "dynamic":
        return {plain}
    placement = (config.get("inflate_epoch"), config.get("deflate_epoch"))
    names = {os.path.basename(run_dir("", schedule, decomposition, seed, placement))}
    preset = PRESETS["cifar10-resnet20"]
    return names | {plain} if placement == (preset["inflate_epoch"], preset["deflate_epoch"]) else names


def fold_run(source, results_dir, output, note, new=False, log=print):
    """Fold ``source``, a copy of a committed run folder trained further elsewhere (or with
    ``new``, a run started elsewhere that is not committed yet), into ``results_dir``; its console
    ``output`` (a file) goes to the run's log under ``# note``.  Returns the committed folder.

    Raises:
        ValueError: naming the file or folder, before anything committed is touched: ``source`` is the
            committed folder itself, no committed run to continue (or, with ``new``, one already there),
            no dynrank-train output folder, a config.json, metrics.json or result.json that is not
            valid JSON (a copy cut short), or with ``new`` a folder name other than the driver's.
    """
    name = os.path.basename(os.path.normpath(source))
    runs = os.path.join(results_dir, PAPER_FOLDER)
    target = os.path.join(runs, name)
    if os.path.realpath(source) == os.path.realpath(target):
        raise ValueError(f"{source}: this is the committed run itself; --run takes a copy of the run, "
                         "trained further elsewhere")
    if new and os.path.exists(target):
        raise ValueError(f"{source}: {target} is already committed; fold a continued copy without --new")
    if not new and not os.path.isdir(target):
        raise ValueError(f"{source}: no run {name!r} in {runs} to fold it into (expected a copy of a committed "
                         "run, or --new for a run started elsewhere)")
    schedules = sorted(d for d in os.listdir(source) if os.path.isfile(os.path.join(source, d, "metrics.json")))
    if not os.path.isfile(os.path.join(source, "config.json")) or not schedules:
        raise ValueError(f"{source}: expected config.json and a schedule folder with metrics.json "
                         "(a dynrank-train output folder)")
    try:
        config = _read_json(os.path.join(source, "config.json"))
        for schedule in schedules:
            for file in sorted(os.listdir(os.path.join(source, schedule))):
                if _kept(file) and file in RUN_JSONS:
                    _read_json(os.path.join(source, schedule, file), RUN_JSONS[file])
    except ValueError as err:
        raise ValueError(f"{err}; nothing was folded") from None
    if new:
        expected = _driver_names(config)
        if name not in expected:
            raise ValueError(f"{source}: the paper driver names this run {' or '.join(sorted(expected))}, "
                             f"not {name!r}; rename the folder")
        os.makedirs(target)
    with open(output, encoding="utf-8") as handle:
        text = handle.read()
    shutil.copyfile(os.path.join(source, "config.json"), os.path.join(target, "config.json"))
    for schedule in schedules:
        folder, dest = os.path.join(source, schedule), os.path.join(target, schedule)
        os.makedirs(dest, exist_ok=True)
        for file in sorted(os.listdir(folder)):
            if _kept(file):
                shutil.copyfile(os.path.join(folder, file), os.path.join(dest, file))
        if os.path.isfile(os.path.join(dest, "result.json")):
            _slim_result(os.path.join(dest, "result.json"))
        log(f"{name}/{schedule} → {dest}")
    with open(target + ".log", "a", encoding="utf-8") as handle:
        handle.write(f"\n# {note.lstrip('# ')}\n{text}" + ("" if text.endswith("\n") else "\n"))
    _summarize(runs, log)
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("session_dir", nargs="?", help="folder holding bench.tgz, paper.tgz, paper-checkpoints.tgz")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--run", help="a copy of a committed run folder, trained further elsewhere, to fold back")
    parser.add_argument("--new", action="store_true",
                        help="with --run: the run was started elsewhere and is not committed yet")
    parser.add_argument("--output", help="with --run: the file holding its console output, for the run's log")
    parser.add_argument("--note", help="with --run: the log's line on where and how it ran (device, threads, epochs)")
    args = parser.parse_args(argv)
    if args.run is not None:
        if args.session_dir is not None or not args.output or not args.note:
            parser.error("--run takes --output and --note and no session folder")
        if not os.path.isdir(args.run):
            parser.error(f"--run {args.run}: no such folder")
        if not os.path.isfile(args.output):
            parser.error(f"--output {args.output}: no such file")
        try:
            fold_run(args.run, args.results, args.output, args.note, new=args.new)
        except ValueError as err:
            parser.error(str(err))
        return 0
    if args.new:
        parser.error("--new goes with --run")
    if args.session_dir is None:
        parser.error("give a session folder, or --run with --output and --note")
    if not os.path.isdir(args.session_dir):
        parser.error(f"no folder {args.session_dir}")
    try:
        written = fold(args.session_dir, args.results)
    except ValueError as err:
        parser.error(str(err))
    if not written:
        parser.error(f"nothing to fold in {args.session_dir} (expected bench.tgz, paper.tgz or paper-checkpoints.tgz)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
