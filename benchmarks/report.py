"""Turn a pytest-benchmark JSON file into a markdown report and a PNG plot.

    pytest benchmarks/ --benchmark-only --benchmark-json=results.json
    python benchmarks/report.py results.json --out report.md --plot report.png
    python benchmarks/report.py linear.json merge.json conv.json epoch.json   # one run per suite

Every ratio is read within one group of one run (same device, same process):
a speedup column ``vs X`` is time(X) / time(row), above 1 when the row is
faster; the epoch suite's ``step / full`` is time(row) / time(full form), below
1 when the form trains faster, and ``params / full`` the share of trainable
parameters (the paper's "Comp." column); a step replayed from a CUDA graph
also gets ``graphed / eager``, its time over the same form's eager step.  Rates (TFLOP/s, GB/s) are
recomputed from the FLOP and byte counts in ``extra_info`` and the chosen
statistic; ``% peak`` / ``% copy`` are against the roofline measured in the
same session.  The last section checks the speed targets: the linear and merge ones
once per timing (each call to its synchronize, and queued: ``extra_info["timing"]``),
the GPT-2 step's on eager and on graphed steps.  They are stated for CUDA, so they are judged on the
rows whose ``extra_info["device"]`` is CUDA (where none is, on every row, for reference only), once
per device; where the files hold rows of several devices, the section names the devices judged.

A file that holds no dynrank result (the empty file a suite that selected nothing leaves, another
project's JSON) is skipped with a note; where none is left the command fails.  A malformed entry of
a file (not an object, ``stats`` or ``extra_info`` not an object, a statistic or a count that is not
a number) is skipped with a note naming the file and its index; a null object reads as an empty one.
With several files, the header lists each file's date, load average and rooflines.

matplotlib is optional: without it the plot is skipped with a note.
"""

import argparse
import json
import math
import numbers
import os
import sys
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

__all__ = ["Row", "not_a_dynrank_run", "malformed_entries", "combine_runs", "load_rows", "add_ratios",
           "evaluate_targets", "render_markdown", "plot", "main"]

STATS = ("mean", "median", "min")
# extra_info numbers the report divides by or with; each a number or absent/null.
COUNTS = ("flops", "bytes", "peak_tflops", "copy_gbps", "trainable_params")
# Entry fields the report reads as names; each a string or absent/null.
NAMES = ("group", "name")
INFO_NAMES = ("suite", "provider", "form", "pass")


@dataclass
class Row:
    """One benchmark result with the numbers the report needs."""

    group: str
    suite: str
    provider: str
    form: str
    pass_: str
    time: float  # seconds, the chosen statistic
    extra: dict
    ratios: dict = field(default_factory=OrderedDict)

    @property
    def label(self):
        redundant = not self.form or self.form in self.provider or self.form == self.suite
        return self.provider if redundant else f"{self.provider} ({self.form})"

    @property
    def device(self):
        """The device the row ran on, named as the header names one (:func:`_device_label`)."""
        return _device_label(self.extra)

    @property
    def tflops(self):
        flops = self.extra.get("flops")
        return flops / self.time / 1e12 if flops and self.time > 0 else None

    @property
    def gbps(self):
        moved = self.extra.get("bytes")
        return moved / self.time / 1e9 if moved and self.time > 0 else None


def not_a_dynrank_run(data):
    """Why the parsed JSON ``data`` is not a pytest-benchmark run of dynrank's suites, or None.

    A dynrank result is an entry of ``benchmarks`` whose ``extra_info`` names its ``suite`` (every
    suite of benchmarks/ records it); a JSON of another project has none.
    """
    if not isinstance(data, dict):
        return f"not a pytest-benchmark JSON (a JSON {type(data).__name__}, expected an object with 'benchmarks')"
    benchmarks = data.get("benchmarks")
    if not isinstance(benchmarks, list):
        found = ", ".join(map(repr, list(data)[:5])) or "nothing"
        return f"not a pytest-benchmark JSON (no 'benchmarks' list; its keys: {found})"
    if not any(isinstance(b, dict) and "suite" in (b.get("extra_info") or {}) for b in benchmarks):
        machine = "with" if "dynrank" in (data.get("machine_info") or {}) else "without"
        return (f"no dynrank result (benchmarks: {len(benchmarks)}, none with extra_info['suite']; "
                f"{machine} machine_info['dynrank'])")
    return None


def _object(value):
    """``value`` where it is a JSON object, else an empty one (a null or missing part of a JSON)."""
    return value if isinstance(value, dict) else {}


def _device_label(info):
    """The device that ``info`` (an entry's extra_info or a run's ``machine_info["dynrank"]``) names, as the
    report names one: ``NVIDIA H200 (`cuda`)``."""
    name = info.get("device_name") or info.get("device") or "unknown device"
    return f"{name} (`{info.get('device') or '?'}`)"


def _is_cuda(device):
    """Whether ``device`` (a torch device as a string: ``cuda``, ``cuda:1``, ``cpu``) is a CUDA device."""
    return "cuda" in str(device or "")


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _entry_problem(bench):
    """Why the ``benchmarks`` entry ``bench`` cannot be read, or None."""
    if not isinstance(bench, dict):
        return f"a JSON {type(bench).__name__}, expected an object"
    for key in ("stats", "extra_info"):
        if bench.get(key) is not None and not isinstance(bench[key], dict):
            return f"{key} is a JSON {type(bench[key]).__name__}, expected an object"
    stats, extra = _object(bench.get("stats")), _object(bench.get("extra_info"))
    for key in STATS:
        if key in stats and not (_is_number(stats[key]) and stats[key] > 0):
            return f"stats[{key!r}] is {stats[key]!r}, expected a positive number of seconds"
    for key in COUNTS:
        if extra.get(key) is not None and not _is_number(extra[key]):
            return f"extra_info[{key!r}] is {extra[key]!r}, expected a number"
    for where, keys in ((bench, NAMES), (extra, INFO_NAMES)):
        for key in keys:
            if where.get(key) is not None and not isinstance(where[key], str):
                field_ = key if where is bench else f"extra_info[{key!r}]"
                return f"{field_} is {where[key]!r}, expected a string"
    return None


def malformed_entries(data):
    """``(index, problem)`` of each entry of ``data["benchmarks"]`` the report cannot read (``data`` a
    pytest-benchmark JSON object: see :func:`not_a_dynrank_run`).  Null ``stats`` or ``extra_info``
    are read as empty: such an entry has no row, and is not malformed."""
    return [(index, problem) for index, bench in enumerate(data.get("benchmarks") or [])
            for problem in [_entry_problem(bench)] if problem]


def _suites(run):
    """The suites the entries of ``run`` belong to, in the report's order."""
    found = {_object(b.get("extra_info")).get("suite") for b in run.get("benchmarks") or [] if isinstance(b, dict)}
    found.discard(None)
    return [s for s in SUITE_TITLES if s in found] + sorted(found - set(SUITE_TITLES))


def _session(run, label):
    """What the header says of one file's session: its label, date and dynrank machine info."""
    return {"label": label, "datetime": run.get("datetime"),
            "machine": _object(_object(run.get("machine_info")).get("dynrank"))}


def _with_device(extra, machine):
    """``extra`` (an entry's extra_info) with the ``device`` and ``device_name`` of ``machine`` (its run's
    ``machine_info["dynrank"]``) where it records none, so that every row names the device it ran on."""
    missing = {key: machine[key] for key in ("device", "device_name")
               if extra.get(key) is None and machine.get(key) is not None}
    return {**extra, **missing} if missing else extra


def combine_runs(runs, names=None):
    """One report input from several parsed JSON files (e.g. one per suite).

    Groups never mix runs: where a group appears in several files, the last
    file's rows replace the earlier ones.  An entry whose ``extra_info`` names
    no device gets its own file's.  ``machine_info`` is the first
    file's; ``devices`` lists every device seen, so a mixed set is visible;
    ``sessions`` keeps each file's date and dynrank machine info (rooflines,
    load average) for the header, labelled by ``names`` (one per run, e.g.
    the file names; default: the suites each run holds).
    """
    if not runs:
        raise ValueError("combine_runs needs at least one run")
    for run in runs:
        if not isinstance(run, dict):
            raise TypeError(f"combine_runs takes parsed pytest-benchmark JSON objects (dicts), got a "
                            f"{type(run).__name__}")
    if names is None:
        names = [", ".join(_suites(run)) or f"run {n}" for n, run in enumerate(runs, 1)]
    elif len(names) != len(runs):
        raise ValueError(f"combine_runs takes one name per run ({len(runs)}), got {len(names)}")
    by_group = OrderedDict()
    devices = []
    for run in runs:
        machine = _object(_object(run.get("machine_info")).get("dynrank"))
        name = machine.get("device_name") or "unknown device"
        if name not in devices:
            devices.append(name)
        groups = OrderedDict()
        for bench in run.get("benchmarks") or []:
            if isinstance(bench, dict):
                if isinstance(bench.get("extra_info"), dict):
                    bench = dict(bench, extra_info=_with_device(bench["extra_info"], machine))
                groups.setdefault(bench.get("group") or bench.get("name") or "?", []).append(bench)
        by_group.update(groups)
    combined = dict(runs[0])
    combined["benchmarks"] = [b for members in by_group.values() for b in members]
    combined["devices"] = devices
    combined["sessions"] = [_session(run, label) for run, label in zip(runs, names)]
    return combined


def load_rows(data, stat="mean"):
    """Rows of a parsed pytest-benchmark JSON (dict), timed by ``stat``.  A row whose ``extra_info`` names
    no device is taken to be on the device of ``data``'s machine_info."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {', '.join(STATS)}, got {stat!r}")
    machine = _object(_object(data.get("machine_info")).get("dynrank"))
    rows = []
    for bench in data.get("benchmarks") or []:
        extra = _with_device(_object(bench.get("extra_info")), machine)
        stats = _object(bench.get("stats"))
        if stat not in stats:
            continue
        rows.append(Row(group=bench.get("group") or bench.get("name") or "?", suite=extra.get("suite") or "other",
                        provider=extra.get("provider") or bench.get("name") or "?", form=extra.get("form") or "",
                        pass_=extra.get("pass") or "", time=float(stats[stat]), extra=extra))
    return rows


# Speedup columns per suite: (column, predicate(row, candidate) selecting the reference).
REFERENCES = {
    "linear": [
        ("vs unfused", lambda r, o: o.provider == "torch_unfused" and o.form == r.form),
        ("vs compiled", lambda r, o: o.provider == "torch_compile" and o.form == r.form),
        ("vs in-place", lambda r, o: o.provider == "torch_inplace" and o.form == r.form),
        ("vs dense frozen", lambda r, o: o.provider == "dense_frozen"),
    ],
    "merge": [("vs addmm_", lambda r, o: o.provider == "addmm_"),
              ("vs unfused", lambda r, o: o.provider == "unfused")],
    "conv_merge": [("vs tensorly", lambda r, o: o.provider == "tensorly")],
    "conv": [("vs dense", lambda r, o: o.provider == "dense"),
             ("vs dense frozen", lambda r, o: o.provider == "dense_frozen")],
}


GRAPHED_GROUP_SUFFIX = " cuda-graphs"   # test_bench_epoch.py's groups of graphed steps
# extra_info["timing"] of a linear or merge result (absent: "call"), and its targets' tag.
TIMING_TAGS = (("call", ""), ("queued", " queued"))


def _groups(rows):
    groups = OrderedDict()
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    return groups


def add_ratios(rows):
    """Fill ``row.ratios`` from the other rows of its group; returns ``rows``."""
    for members in _groups(rows).values():
        for row in members:
            row.ratios.clear()
            if row.suite == "epoch":
                full = next((o for o in members if o.form == "full"), None)
                if full is not None and row is not full:
                    row.ratios["step / full"] = row.time / full.time
                    mine, theirs = row.extra.get("trainable_params"), full.extra.get("trainable_params")
                    if mine and theirs:
                        row.ratios["params / full"] = mine / theirs
                continue
            for column, is_reference in REFERENCES.get(row.suite, []):
                ref = next((o for o in members if o is not row and is_reference(row, o)), None)
                if ref is not None:
                    row.ratios[column] = ref.time / row.time
    # A graphed training step over its eager twin (same model and form, the group without graphs).
    eager = {(r.group, r.provider): r for r in rows if r.suite == "epoch" and not r.extra.get("cuda_graphs")}
    for row in rows:
        if row.suite == "epoch" and row.extra.get("cuda_graphs"):
            twin = eager.get((row.group.removesuffix(GRAPHED_GROUP_SUFFIX), row.provider))
            if twin is not None:
                row.ratios["graphed / eager"] = row.time / twin.time
    return rows


# ---------------------------------------------------------------------------
# Speed targets
# ---------------------------------------------------------------------------

def _status(value, limit, higher_is_better):
    if value is None:
        return "no data"
    met = value >= limit if higher_is_better else value <= limit
    if met:
        return "met"
    gap = (limit - value) / limit if higher_is_better else (value - limit) / limit
    return f"missed by {100 * gap:.1f} %"


def _mean(values):
    return sum(values) / len(values) if values else None


def _shapes(values):
    return "" if not values else f"{len(values)} shape{'s' if len(values) > 1 else ''}"


def _copy_fraction(row, members):
    ceiling = row.extra.get("copy_gbps")
    if not ceiling:
        copy = next((o for o in members if o.provider == "copy"), None)
        ceiling = copy.gbps if copy is not None else None
    return row.gbps / ceiling if ceiling and row.gbps else None


def evaluate_targets(rows):
    """The speed targets checked against these rows: list of dicts (target, device, required, measured,
    reading, status); ``reading`` is the measured value alone, ``measured`` adds where it came from.

    The targets are stated for CUDA: they are judged on the rows on CUDA (``extra_info["device"]``), or on
    every row where none is (a CPU run, for reference), once per device (:attr:`Row.device`), which
    ``device`` names (None where there are no rows).
    """
    by_device = OrderedDict()
    for row in rows:
        by_device.setdefault(row.device, []).append(row)
    on_cuda = OrderedDict((device, members) for device, members in by_device.items()
                          if _is_cuda(members[0].extra.get("device")))
    judged = on_cuda or by_device or {None: []}
    return [dict(target, device=device) for device, members in judged.items() for target in _device_targets(members)]


def _device_targets(rows):
    """:func:`evaluate_targets` on the rows of one device."""
    groups = _groups(rows)
    results = []

    def add(target, required, value, limit, higher_is_better, fmt, detail=""):
        reading = "—" if value is None else fmt.format(value)
        measured = reading + (f" ({detail})" if value is not None and detail else "")
        results.append({"target": target, "required": required, "measured": measured, "reading": reading,
                        "status": _status(value, limit, higher_is_better)})

    # The linear targets by each timing: every call to its synchronize (latency), and queued (throughput).
    for timing, tag in TIMING_TAGS:
        linear = [r for r in rows if r.suite == "linear" and r.provider == "dynrank"
                  and r.extra.get("timing", "call") == timing]
        headline = [r for r in linear if r.form == "adapter" and r.pass_ == "fwd+bwd" and r.extra.get("target")]
        vals = [r.ratios["vs unfused"] for r in headline if "vs unfused" in r.ratios]
        add(f"adapter fwd+bwd{tag}, target shapes: speedup over unfused torch (average)", "≥ 1.30×", _mean(vals),
            1.30, True, "{:.2f}×", _shapes(vals))
        vals = [r.ratios["vs compiled"] for r in headline if "vs compiled" in r.ratios]
        add(f"adapter fwd+bwd{tag}, target shapes: speedup over torch.compile (average)", "≥ 1.10×", _mean(vals),
            1.10, True, "{:.2f}×", _shapes(vals))
        vals = [(1.0 / r.ratios["vs dense frozen"], r.group) for r in headline if "vs dense frozen" in r.ratios]
        worst = max(vals) if vals else (None, "")
        add(f"adapter fwd+bwd{tag}, target shapes: time over dense frozen-weight linear (worst)", "≤ 1.05×",
            worst[0], 1.05, False, "{:.3f}×", worst[1])
        vals = [(r.ratios["vs unfused"], f"{r.group}, {r.form}") for r in linear
                if r.form in ("lowrank", "adapter") and "vs unfused" in r.ratios]
        worst = min(vals) if vals else (None, "")
        add(f"every linear shape and pass{tag}: speedup over unfused torch (worst)", "≥ 0.98×", worst[0], 0.98,
            True, "{:.3f}×", worst[1])
    for timing, tag in TIMING_TAGS:
        merges = [r for r in rows if r.suite == "merge" and r.provider == "dynrank"
                  and r.extra.get("timing", "call") == timing]
        vals = [(f, r.group) for r in merges for f in [_copy_fraction(r, groups[r.group])] if f is not None]
        worst = min(vals) if vals else (None, "")
        add(f"merge{tag}: share of measured copy bandwidth (worst)", "≥ 85 %", worst[0], 0.85, True, "{:.1%}",
            worst[1])
        vals = [(r.ratios["vs addmm_"], r.group) for r in merges if "vs addmm_" in r.ratios]
        worst = min(vals) if vals else (None, "")
        add(f"merge{tag}: speedup over addmm_ (worst)", "≥ 1.00×", worst[0], 1.0, True, "{:.3f}×", worst[1])
    # The step as the model runs it eagerly, and replayed from a CUDA graph (over the graphed full step).
    # Several groups (e.g. model sizes from several files) are judged by the worst, which is named.
    for graphed, tag in ((False, ""), (True, " (CUDA graphs)")):
        vals = [(r.ratios["step / full"], r.group) for r in rows if r.suite == "epoch"
                and r.extra.get("model") == "transformer" and r.form == "lowrank" and r.extra.get("rank_ratio") == 0.25
                and "step / full" in r.ratios and bool(r.extra.get("cuda_graphs")) == graphed
                and not r.extra.get("factorized_head")]
        worst = max(vals) if vals else (None, "")
        add(f"transformer training step{tag}, lowrank ρ = 0.25, over full rank", "≤ 0.60×", worst[0], 0.60, False,
            "{:.3f}×", f"worst of {len(vals)} groups: {worst[1]}" if len(vals) > 1 else "")
    return results


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

def format_time(seconds):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _num(value, fmt="{:.3g}"):
    return "—" if value is None else fmt.format(value)


PROVIDER_ORDER = ("dense", "dense_frozen", "copy", "tensorly", "unfused", "addmm_", "torch_unfused",
                  "torch_compile", "torch_inplace", "peft", "dynrank", "dynrank_triton")


def _order(row):
    key = PROVIDER_ORDER.index(row.provider) if row.provider in PROVIDER_ORDER else len(PROVIDER_ORDER)
    return (key, row.form != "full", row.form, row.provider)


def _suite_table(rows):
    present = set(c for r in rows for c in r.ratios)
    known = [c for c, _ in REFERENCES.get(rows[0].suite, [])] + ["step / full", "params / full", "graphed / eager"]
    columns = [c for c in known if c in present] + sorted(present - set(known))
    has_flops = any(r.tflops is not None for r in rows)
    has_bytes = any(r.gbps is not None for r in rows)
    header = ["group", "provider", "time"]
    if has_flops:
        header += ["TFLOP/s", "% peak"]
    if has_bytes:
        header += ["GB/s", "% copy"]
    header += columns
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, members in _groups(rows).items():
        for row in sorted(members, key=_order):
            cells = [group, row.label, format_time(row.time)]
            if has_flops:
                peak = row.extra.get("peak_tflops")
                cells += [_num(row.tflops), _num(100 * row.tflops / peak if row.tflops and peak else None, "{:.0f}")]
            if has_bytes:
                copy = row.extra.get("copy_gbps")
                cells += [_num(row.gbps), _num(100 * row.gbps / copy if row.gbps and copy else None, "{:.0f}")]
            for column in columns:
                value = row.ratios.get(column)
                cells.append("—" if value is None else f"{value:.2f}×")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


SUITE_TITLES = OrderedDict([
    ("linear", "Linear layer (per pass, shape, dtype)"),
    ("merge", "Inflate merge W += α·A·Bᵀ"),
    ("conv_merge", "Conv-kernel merges"),
    ("conv", "Conv layers"),
    ("epoch", "Training step per form"),
])


def _session_lines(session, tag):
    """The header's load-average and roofline lines of one session, ``tag`` after each line's name."""
    machine, lines = session["machine"], []
    load = machine.get("load_average_1m")
    if machine.get("device") == "cpu" and _is_number(load):
        lines.append(f"- CPU{tag}: {machine.get('num_threads')} torch threads on {machine.get('cpu_count')} cpus, "
                     f"load average {load:.1f} when the results were saved")
    for key, value in _object(machine.get("rooflines")).items():
        value = _object(value)
        peak, copy = (value.get(k) if _is_number(value.get(k)) else None for k in ("peak_tflops", "copy_gbps"))
        lines.append(f"- Roofline {key}{tag}: peak matmul {_num(peak)} TFLOP/s, copy {_num(copy)} GB/s")
    return lines


def render_markdown(data, rows, stat="mean"):
    """The whole report as markdown text (rows must have their ratios).  ``data`` is one parsed JSON
    or :func:`combine_runs`' result, whose header lists every file's date, load average and rooflines."""
    machine = _object(_object(data.get("machine_info")).get("dynrank"))
    versions = _object(machine.get("versions"))
    sessions = data.get("sessions") or [_session(data, "")]
    several = len(sessions) > 1
    lines = ["# dynrank benchmark report", ""]
    lines.append(f"- Device: {_device_label(machine)}, grid `{machine.get('grid', '?')}`")
    lines.append("- Versions: " + (", ".join(f"{k} {v}" for k, v in versions.items() if v) or "unknown"))
    dates = ", ".join(f"{s['datetime'] or 'unknown'}" + (f" ({s['label']})" if several else "") for s in sessions)
    lines.append(f"- Date: {dates}; statistic: {stat}; {len(rows)} results")
    if len(data.get("devices") or []) > 1:
        lines.append("- Warning: these results come from runs on different devices (" + ", ".join(data["devices"])
                     + "); ratios stay within one group of one run")
    for session in sessions:
        lines += _session_lines(session, f" ({session['label']})" if several else "")
    lines.append("- Speedup `vs X` = time(X) / time(row) within the group; `step / full` = time(row) / "
                 "time(full form).")
    suites = list(SUITE_TITLES) + sorted({r.suite for r in rows} - set(SUITE_TITLES))
    for suite in suites:
        members = [r for r in rows if r.suite == suite]
        if not members:
            continue
        lines += ["", f"## {SUITE_TITLES.get(suite, suite)}", ""]
        lines += _suite_table(members)
    targets = evaluate_targets(rows)
    judged = list(OrderedDict.fromkeys(t["device"] for t in targets))
    present = list(OrderedDict.fromkeys(r.device for r in rows))
    lines += ["", "## Speed targets", ""]
    if not (any(_is_cuda(r.extra.get("device")) for r in rows) if rows else _is_cuda(machine.get("device"))):
        lines += ["The targets are stated for an H100/H200 in bf16; this run is not on CUDA, so the rows below "
                  "are for reference only.", ""]
    if len(present) > 1:
        left = [d for d in present if d not in judged]
        lines += [f"Judged on the rows of {' and '.join(judged)}" + (", each device on its own" if len(judged) > 1
                  else "") + (f"; the rows of {', '.join(left)} are left out" if left else "") + ".", ""]
    # At small shapes one call's time can be bimodal (host jitter), so the other statistics' readings
    # stand beside the chosen one's; the status is the chosen statistic's.
    others = [o for o in STATS if o != stat and all(o in _object(b.get("stats")) for b in data.get("benchmarks") or [])]
    readings = {o: {(t["device"], t["target"]): t["reading"] for t in evaluate_targets(add_ratios(load_rows(data, o)))}
                for o in others}
    device_column = len(judged) > 1
    lines += ["| target | " + ("device | " if device_column else "") + "required | measured | "
              + "".join(f"by {o} | " for o in others) + "status |",
              "|---|---|---|" + "---|" * (len(others) + device_column) + "---|"]
    for item in targets:
        device = f"{item['device']} | " if device_column else ""
        cells = "".join(f"{readings[o].get((item['device'], item['target']), 'no data')} | " for o in others)
        lines.append(f"| {item['target']} | {device}{item['required']} | {item['measured']} | {cells}"
                     f"{item['status']} |")
    return "\n".join(lines) + "\n"


def _primary_ratio(row):
    """Speedup over the suite's first reference (epoch: over the full form), or None."""
    if row.suite == "epoch":
        value = row.ratios.get("step / full")
        return 1.0 / value if value else None
    references = REFERENCES.get(row.suite)
    return row.ratios.get(references[0][0]) if references else None


def plot(rows, path):
    """Dot plot of each row's speedup over its suite's first reference; returns the path or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return None
    suites = [s for s in list(SUITE_TITLES) + sorted({r.suite for r in rows} - set(SUITE_TITLES))
              if any(r.suite == s and _primary_ratio(r) is not None for r in rows)]
    if not suites:
        print("no ratios to plot", file=sys.stderr)
        return None
    heights = [max(2.0, 0.28 * len({r.group for r in rows if r.suite == s})) + 1.0 for s in suites]
    fig, axes = plt.subplots(len(suites), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, suite in zip(axes[:, 0], suites):
        members = [r for r in rows if r.suite == suite and _primary_ratio(r) is not None]
        groups = list(OrderedDict.fromkeys(r.group for r in members))
        by_label = defaultdict(list)
        for r in members:
            by_label[r.label].append((_primary_ratio(r), groups.index(r.group)))
        for label, points in sorted(by_label.items()):
            ax.scatter([p[0] for p in points], [p[1] for p in points], label=label, s=22)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_yticks(range(len(groups)))
        ax.set_yticklabels(groups, fontsize=7)
        ax.invert_yaxis()
        reference = "full form" if suite == "epoch" else REFERENCES.get(suite, [("reference",)])[0][0][3:]
        ax.set_xlabel(f"speedup over {reference}, log scale (>1: faster)")
        ax.set_title(SUITE_TITLES.get(suite, suite), fontsize=10)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Markdown table and PNG plot from a --benchmark-json file.")
    parser.add_argument("json", nargs="+", help="file(s) written by pytest --benchmark-json (one per suite is fine)")
    parser.add_argument("--out", help="markdown file to write (default: print)")
    parser.add_argument("--plot", help="PNG file to write (needs matplotlib)")
    parser.add_argument("--stat", choices=STATS, default="mean", help="statistic for times and rates")
    args = parser.parse_args(argv)
    if args.out or args.plot:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _bench_common import prepare_out      # imports torch: only where a file is written
        for flag, path in (("--out", args.out), ("--plot", args.plot)):
            if path:
                prepare_out(parser, path, flag)
    runs, names = [], []
    for path in args.json:
        try:
            with open(path, encoding="utf-8") as f:
                run = json.load(f)
        except (OSError, ValueError) as err:
            # An empty file is what a suite that selected nothing (or was stopped) leaves.
            print(f"report.py: skipping {path}: not a pytest-benchmark JSON ({err})", file=sys.stderr)
            continue
        problem = not_a_dynrank_run(run)
        if not problem:
            bad = malformed_entries(run)
            for index, why in bad:
                print(f"report.py: {path}: skipping benchmarks[{index}]: {why}", file=sys.stderr)
            if bad:
                skipped = {index for index, _ in bad}
                run = dict(run, benchmarks=[b for i, b in enumerate(run["benchmarks"]) if i not in skipped])
                problem = not_a_dynrank_run(run)
        if problem:
            print(f"report.py: skipping {path}: {problem}", file=sys.stderr)
        else:
            runs.append(run)
            names.append(path)
    if not runs:
        parser.error("none of the files is a pytest-benchmark JSON with a dynrank result "
                     "(pytest benchmarks/ --benchmark-json=FILE writes one)")
    if len({os.path.basename(name) for name in names}) == len(names):      # the header's labels
        names = [os.path.basename(name) for name in names]
    data = combine_runs(runs, names)
    rows = add_ratios(load_rows(data, args.stat))
    text = render_markdown(data, rows, args.stat)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
