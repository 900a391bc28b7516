"""Fold what a GPU session returned into the repository's results.

``benchmarks/gpu_session.sh`` returns up to five archives (see benchmarks/README.md).  This puts
them where the repository keeps results, so the next session resumes from them:

- ``bench.tgz`` (suite JSONs, report, profile, tile sweep, engine diagnosis) →
  ``benchmarks/results/gpu-<device>-<date>/``, named from the JSONs' machine info, with the
  session's ``tests-cuda.log`` (the native test run) beside them;
- ``paper.tgz`` (run folders without checkpoints) and ``paper-checkpoints.tgz`` (unfinished runs'
  checkpoints) → over ``benchmarks/results/cifar10-resnet20/``; a run that has finished drops
  its old checkpoint;
- then the paper summary is written again from every run folder.

    python benchmarks/fold_session.py DIR_WITH_THE_ARCHIVES [--results benchmarks/results]
"""

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paper_summary import summarize  # noqa: E402

PAPER_FOLDER = "cifar10-resnet20"


def _extract(archive, target):
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
        for member in members:
            parts = os.path.normpath(member.name).split(os.sep)
            if os.path.isabs(member.name) or ".." in parts:
                raise ValueError(f"{archive}: refusing the path {member.name!r} (outside the target folder)")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(target, members=members, **safe)
    return [m.name for m in members if m.isfile()]


def bench_folder_name(jsons):
    """``gpu-<device>-<date>`` from the first suite JSON that names its device (e.g. gpu-h200-2026-11-25)."""
    for path in jsons:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        device = ((data.get("machine_info") or {}).get("dynrank") or {}).get("device_name")
        if device:
            model = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", device)
            slug = (model.group(1) if model else re.sub(r"[^A-Za-z0-9]+", "-", device)).lower().strip("-")
            date = (data.get("datetime") or datetime.date.today().isoformat())[:10]
            return f"gpu-{slug}-{date}"
    raise ValueError(f"none of {', '.join(map(os.path.basename, jsons)) or 'the suite JSONs'} names its device")


def fold(session_dir, results_dir, log=print):
    """Fold the archives found in ``session_dir`` into ``results_dir``; returns the folders written."""
    written = []
    bench = os.path.join(session_dir, "bench.tgz")
    if os.path.isfile(bench):
        staging = os.path.join(results_dir, ".bench-staging")
        names = _extract(bench, staging)
        jsons = sorted(os.path.join(staging, n) for n in names if n.endswith(".json"))
        target = os.path.join(results_dir, bench_folder_name(jsons))
        os.makedirs(target, exist_ok=True)
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(target, os.path.basename(name)))
        for root, dirs, _ in os.walk(staging, topdown=False):
            for d in dirs:
                os.rmdir(os.path.join(root, d))
        os.rmdir(staging)
        log(f"benchmarks: {len(names)} files → {target}")
        written.append(target)
        tests_log = os.path.join(session_dir, "tests-cuda.log")
        if os.path.isfile(tests_log):       # the native test run of the same session, kept beside its numbers
            shutil.copyfile(tests_log, os.path.join(target, "tests-cuda.log"))
            log(f"tests-cuda.log → {target}")
    runs = os.path.join(results_dir, PAPER_FOLDER)
    for name in ("paper.tgz", "paper-checkpoints.tgz"):
        archive = os.path.join(session_dir, name)
        if os.path.isfile(archive):
            names = _extract(archive, results_dir)
            log(f"{name}: {len(names)} files → {results_dir}")
    if os.path.isdir(runs):
        for root, _, files in os.walk(runs):
            if "result.json" in files and "checkpoint.pt" in files:
                os.remove(os.path.join(root, "checkpoint.pt"))
                log(f"finished: dropped {os.path.join(root, 'checkpoint.pt')}")
        summarize(runs)
        written.append(runs)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("session_dir", help="folder holding bench.tgz, paper.tgz, paper-checkpoints.tgz")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if not os.path.isdir(args.session_dir):
        parser.error(f"no folder {args.session_dir}")
    if not fold(args.session_dir, args.results):
        parser.error(f"nothing to fold in {args.session_dir} (expected bench.tgz, paper.tgz or paper-checkpoints.tgz)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
