"""benchmarks/report.py on a small synthetic pytest-benchmark JSON (no timing anywhere)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import load_script


@pytest.fixture(scope="module")
def report():
    return load_script("benchmarks/report.py", "dynrank_bench_report")


def _bench(group, suite, provider, form, pass_, mean, median=None, **extra):
    info = {"suite": suite, "provider": provider, "form": form, "pass": pass_, **extra}
    stats = {"mean": mean, "median": mean if median is None else median, "min": mean * 0.9, "rounds": 10}
    return {"group": group, "name": f"test[{provider}-{form}]", "extra_info": info, "stats": stats}


T1 = "linear fwd+bwd T2048-K4096-N4096-r16-bfloat16-target"
T1_FWD = "linear forward T2048-K4096-N4096-r16-bfloat16-target"
T2 = "linear fwd+bwd T4096-K4096-N4096-r16-bfloat16-target"
SMALL = "linear fwd+bwd T2048-K1024-N1024-r8-bfloat16"
Q1 = "linear fwd+bwd queued T2048-K4096-N4096-r16-bfloat16-target"
LR = "linear forward T4096-K4000-N4000-r16-bfloat16"
MERGE = "merge N4096-K4096-r16-bfloat16-target"
MERGE_Q = "merge queued N4096-K4096-r16-bfloat16-target"
EPOCH = "epoch transformer batch8"


@pytest.fixture
def data():
    peak = {"peak_tflops": 2.0, "copy_gbps": 1000.0}
    benchmarks = [
        # Target shape 1, its lowrank form first (as the suite runs them): 1.60× over unfused, 1.40× over
        # compiled, each against the torch baseline of its own form.
        _bench(T1, "linear", "torch_unfused", "lowrank", "fwd+bwd", 0.4e-3, target=True),
        _bench(T1, "linear", "torch_compile", "lowrank", "fwd+bwd", 0.35e-3, target=True),
        _bench(T1, "linear", "dynrank", "lowrank", "fwd+bwd", 0.25e-3, target=True),
        # Its adapter form: dynrank 1.30× over unfused, 1.10× over compiled, 0.95× of dense frozen.
        _bench(T1, "linear", "torch_unfused", "adapter", "fwd+bwd", 1.3e-3, target=True),
        _bench(T1, "linear", "torch_compile", "adapter", "fwd+bwd", 1.1e-3, target=True),
        _bench(T1, "linear", "dense_frozen", "full", "fwd+bwd", 0.95e-3, target=True),
        _bench(T1, "linear", "dynrank", "adapter", "fwd+bwd", 1.0e-3, median=2.0e-3, target=True,
               flops=1e9, **peak),
        # The Triton provider beside it, slower (0.65× of unfused): not the targets' provider.
        _bench(T1, "linear", "dynrank_triton", "adapter", "fwd+bwd", 2.0e-3, target=True),
        # Target shape 1's forward pass and a shape that is no target, fwd+bwd, both 1.00× of unfused: the
        # adapter targets are stated on the target shapes' fwd+bwd, so neither enters their average.
        _bench(T1_FWD, "linear", "torch_unfused", "adapter", "forward", 1.0e-4, target=True),
        _bench(T1_FWD, "linear", "dynrank", "adapter", "forward", 1.0e-4, target=True),
        _bench(SMALL, "linear", "torch_unfused", "adapter", "fwd+bwd", 1.0e-4),
        _bench(SMALL, "linear", "dynrank", "adapter", "fwd+bwd", 1.0e-4),
        # Target shape 2: 1.50× and 1.20×, exactly as fast as dense frozen.
        _bench(T2, "linear", "torch_unfused", "adapter", "fwd+bwd", 1.5e-3, target=True),
        _bench(T2, "linear", "torch_compile", "adapter", "fwd+bwd", 1.2e-3, target=True),
        _bench(T2, "linear", "dense_frozen", "full", "fwd+bwd", 1.0e-3, target=True),
        _bench(T2, "linear", "dynrank", "adapter", "fwd+bwd", 1.0e-3, target=True),
        # Target shape 1 queued (one synchronize per round): 1.20× over unfused, 1.02× of dense frozen.
        _bench(Q1, "linear", "torch_unfused", "adapter", "fwd+bwd", 1.2e-3, target=True, timing="queued"),
        _bench(Q1, "linear", "dense_frozen", "full", "fwd+bwd", 0.98e-3, target=True, timing="queued"),
        _bench(Q1, "linear", "dynrank", "adapter", "fwd+bwd", 1.0e-3, target=True, timing="queued"),
        # A non-target shape where dynrank's lowrank form is 5 % slower than unfused.
        _bench(LR, "linear", "torch_unfused", "lowrank", "forward", 1.0e-4),
        _bench(LR, "linear", "dynrank", "lowrank", "forward", 1.05e-4),
        # Merge: 900 GB/s of a 1000 GB/s copy, 1.25× over addmm_.
        _bench(MERGE, "merge", "copy", "merge", None, 1.5e-4, bytes=1.44e8, **peak),
        _bench(MERGE, "merge", "addmm_", "merge", None, 2.0e-4, bytes=1.44e8, **peak),
        _bench(MERGE, "merge", "dynrank", "merge", None, 1.6e-4, bytes=1.44e8, **peak),
        # The same merge queued: 1000 GB/s, 0.9× of addmm_.
        _bench(MERGE_Q, "merge", "addmm_", "merge", None, 1.296e-4, bytes=1.44e8, timing="queued", **peak),
        _bench(MERGE_Q, "merge", "dynrank", "merge", None, 1.44e-4, bytes=1.44e8, timing="queued", **peak),
        # Epoch: lowrank ρ=0.25 at half the full step time with 30 % of its parameters.
        _bench(EPOCH, "epoch", "full", "full", "step", 10e-3, model="transformer", rank_ratio=None,
               trainable_params=100),
        # The same with the LM head factorized too: beside the target, not the target's row.
        _bench(EPOCH, "epoch", "lowrank-rho0.25+head", "lowrank", "step", 3e-3, model="transformer",
               rank_ratio=0.25, trainable_params=20, factorized_head=True),
        _bench(EPOCH, "epoch", "lowrank-rho0.25", "lowrank", "step", 5e-3, model="transformer",
               rank_ratio=0.25, trainable_params=30),
        # Lowrank at ρ = 0.5, slower (0.80×): beside the target, which is stated at ρ = 0.25.
        _bench(EPOCH, "epoch", "lowrank-rho0.5", "lowrank", "step", 8e-3, model="transformer",
               rank_ratio=0.5, trainable_params=50),
        _bench(EPOCH, "epoch", "adapter-rho0.5", "adapter", "step", 12e-3, model="transformer",
               rank_ratio=0.5, trainable_params=40),
        # The same steps replayed from CUDA graphs: full 4 ms, lowrank 2.5 ms (no adapter row).
        _bench(EPOCH + " cuda-graphs", "epoch", "full", "full", "step", 4e-3, model="transformer",
               rank_ratio=None, trainable_params=100, cuda_graphs=True),
        _bench(EPOCH + " cuda-graphs", "epoch", "lowrank-rho0.25", "lowrank", "step", 2.5e-3, model="transformer",
               rank_ratio=0.25, trainable_params=30, cuda_graphs=True),
    ]
    # benchmarks/conftest.py records the load average on every device.
    machine = {"dynrank": {"device": "cuda", "device_name": "Test GPU", "grid": "targets",
                           "load_average_1m": 2.5, "num_threads": 8, "cpu_count": 16,
                           "versions": {"torch": "9.9", "triton": "9.8"},
                           "rooflines": {"cuda/bfloat16": peak}}}
    return {"machine_info": machine, "benchmarks": benchmarks, "datetime": "2030-01-01T00:00:00"}


def _row(rows, group, provider, form):
    return next(r for r in rows if r.group == group and r.provider == provider and r.form == form)


def test_ratios_within_groups(report, data):
    rows = report.add_ratios(report.load_rows(data))
    row = _row(rows, T1, "dynrank", "adapter")
    assert row.ratios["vs unfused"] == pytest.approx(1.3)
    assert row.ratios["vs compiled"] == pytest.approx(1.1)
    assert row.ratios["vs dense frozen"] == pytest.approx(0.95)
    assert row.tflops == pytest.approx(1.0)
    # A reference never compares with itself, and other forms are not references (the group's first
    # torch_unfused and torch_compile rows are the lowrank form's).
    assert "vs unfused" not in _row(rows, T1, "torch_unfused", "adapter").ratios
    assert "vs compiled" not in _row(rows, T1, "torch_compile", "adapter").ratios
    lowrank = _row(rows, T1, "dynrank", "lowrank")
    assert lowrank.ratios["vs unfused"] == pytest.approx(1.6)
    assert lowrank.ratios["vs compiled"] == pytest.approx(1.4)
    assert _row(rows, T1, "dynrank_triton", "adapter").ratios["vs unfused"] == pytest.approx(0.65)
    assert _row(rows, LR, "dynrank", "lowrank").ratios == {"vs unfused": pytest.approx(1 / 1.05)}
    merge = _row(rows, MERGE, "dynrank", "merge")
    assert merge.gbps == pytest.approx(900.0)
    assert merge.ratios["vs addmm_"] == pytest.approx(1.25)
    lowrank = _row(rows, EPOCH, "lowrank-rho0.25", "lowrank")
    assert lowrank.ratios["step / full"] == pytest.approx(0.5)
    assert lowrank.ratios["params / full"] == pytest.approx(0.3)
    assert _row(rows, EPOCH, "lowrank-rho0.5", "lowrank").ratios["step / full"] == pytest.approx(0.8)
    assert _row(rows, EPOCH, "full", "full").ratios == {}
    graphed = _row(rows, EPOCH + " cuda-graphs", "lowrank-rho0.25", "lowrank")
    assert graphed.ratios["graphed / eager"] == pytest.approx(0.5)
    assert graphed.ratios["step / full"] == pytest.approx(2.5 / 4)      # against the graphed full step
    assert _row(rows, EPOCH + " cuda-graphs", "full", "full").ratios == {"graphed / eager": pytest.approx(0.4)}


def test_statistic_is_selectable(report, data):
    rows = report.add_ratios(report.load_rows(data, stat="median"))
    assert _row(rows, T1, "dynrank", "adapter").ratios["vs unfused"] == pytest.approx(0.65)
    with pytest.raises(ValueError, match="stat must be one of"):
        report.load_rows(data, stat="p99")


def test_targets(report, data):
    rows = report.add_ratios(report.load_rows(data))
    targets = {t["target"]: t for t in report.evaluate_targets(rows)}
    unfused = targets["adapter fwd+bwd, target shapes: speedup over unfused torch (average)"]
    assert unfused["measured"].startswith("1.40×") and unfused["status"] == "met"
    compiled = targets["adapter fwd+bwd, target shapes: speedup over torch.compile (average)"]
    assert compiled["measured"].startswith("1.15×") and compiled["status"] == "met"
    frozen = targets["adapter fwd+bwd, target shapes: time over dense frozen-weight linear (worst)"]
    assert frozen["measured"].startswith("1.053×") and T1 in frozen["measured"]
    assert frozen["status"] == "missed by 0.3 %"
    every = targets["every linear shape and pass: speedup over unfused torch (worst)"]
    assert every["measured"].startswith("0.952×") and every["status"] == "missed by 2.8 %"
    assert targets["merge: share of measured copy bandwidth (worst)"]["measured"].startswith("90.0%")
    assert targets["merge: share of measured copy bandwidth (worst)"]["status"] == "met"
    assert targets["merge: speedup over addmm_ (worst)"]["status"] == "met"
    # Queued merges have targets of their own (and stay out of the per-call ones above).
    assert targets["merge queued: share of measured copy bandwidth (worst)"]["measured"].startswith("100.0%")
    queued = targets["merge queued: speedup over addmm_ (worst)"]
    assert queued["measured"].startswith("0.900×") and queued["status"] == "missed by 10.0 %"
    step = targets["transformer training step, lowrank ρ = 0.25, over full rank"]
    assert step["measured"] == "0.500×" and step["status"] == "met"
    graphed = targets["transformer training step (CUDA graphs), lowrank ρ = 0.25, over full rank"]
    assert graphed["measured"] == "0.625×" and graphed["status"] == "missed by 4.2 %"
    # Queued rows make their own targets, and never enter the per-call ones (those are the two
    # shapes above: a queued row in them would change the average and the worst case).
    queued = targets["adapter fwd+bwd queued, target shapes: speedup over unfused torch (average)"]
    assert queued["measured"] == "1.20× (1 shape)" and queued["status"] == "missed by 7.7 %"
    frozen = targets["adapter fwd+bwd queued, target shapes: time over dense frozen-weight linear (worst)"]
    assert frozen["measured"].startswith("1.020×") and Q1 in frozen["measured"] and frozen["status"] == "met"
    assert targets["adapter fwd+bwd queued, target shapes: speedup over torch.compile (average)"]["status"] == "no data"
    every = targets["every linear shape and pass queued: speedup over unfused torch (worst)"]
    assert every["measured"].startswith("1.200×") and every["status"] == "met"


def test_targets_without_data(report):
    statuses = {t["status"] for t in report.evaluate_targets([])}
    assert statuses == {"no data"}


def _targets(report, data):
    return {t["target"]: t for t in report.evaluate_targets(report.add_ratios(report.load_rows(data)))}


def test_merge_targets_take_the_worst_of_several_groups_and_name_it(report, data):
    """A second merge shape at 82 % of the copy bandwidth (just under 85 %) and 0.95× of addmm_ misses
    both merge targets, whatever the first shape reads (90 %, 1.25×)."""
    larger = "merge N8192-K8192-r16-bfloat16-target"
    peak = {"peak_tflops": 2.0, "copy_gbps": 1000.0}
    data["benchmarks"] += [_bench(larger, "merge", "addmm_", "merge", None, 1.9e-4, bytes=1.64e8, **peak),
                           _bench(larger, "merge", "dynrank", "merge", None, 2.0e-4, bytes=1.64e8, **peak)]
    targets = _targets(report, data)
    share = targets["merge: share of measured copy bandwidth (worst)"]
    assert share["measured"] == f"82.0% ({larger})" and share["status"] == "missed by 3.5 %"
    speedup = targets["merge: speedup over addmm_ (worst)"]
    assert speedup["measured"] == f"0.950× ({larger})" and speedup["status"] == "missed by 5.0 %"
    assert targets["merge queued: share of measured copy bandwidth (worst)"]["measured"] == f"100.0% ({MERGE_Q})"
    assert targets["merge queued: speedup over addmm_ (worst)"]["measured"] == f"0.900× ({MERGE_Q})"


def test_the_compile_target_is_missed_just_under_its_limit(report, data):
    """1.05× over torch.compile is under the 1.10× the target asks for."""
    data["benchmarks"].append(_bench(Q1, "linear", "torch_compile", "adapter", "fwd+bwd", 1.05e-3, target=True,
                                     timing="queued"))
    targets = _targets(report, data)
    queued = targets["adapter fwd+bwd queued, target shapes: speedup over torch.compile (average)"]
    assert queued["measured"] == "1.05× (1 shape)" and queued["status"] == "missed by 4.5 %"
    per_call = targets["adapter fwd+bwd, target shapes: speedup over torch.compile (average)"]
    assert per_call["measured"] == "1.15× (2 shapes)" and per_call["status"] == "met"


def test_a_merge_without_bytes_has_no_copy_share(report, data):
    """A merge row that records no bytes moved has no bandwidth: no share of the copy's, not a share of 0."""
    plain = "merge N1024-K1024-r8-float32"
    data["benchmarks"] += [_bench(plain, "merge", "addmm_", "merge", None, 2.0e-5, copy_gbps=1000.0),
                           _bench(plain, "merge", "dynrank", "merge", None, 1.0e-5, copy_gbps=1000.0)]
    rows = report.add_ratios(report.load_rows(data))
    share = _targets(report, data)["merge: share of measured copy bandwidth (worst)"]
    assert share["measured"] == f"90.0% ({MERGE})" and share["status"] == "met"
    assert f"| {plain} | dynrank | 10 µs | — | — | 2.00× |" in report.render_markdown(data, rows)
    alone = {t["target"]: t for t in report.evaluate_targets([r for r in rows if r.group == plain])}
    assert alone["merge: share of measured copy bandwidth (worst)"]["status"] == "no data"
    assert alone["merge: speedup over addmm_ (worst)"]["measured"] == f"2.000× ({plain})"


def test_markdown_tables(report, data):
    rows = report.add_ratios(report.load_rows(data))
    text = report.render_markdown(data, rows)
    assert "- Device: Test GPU (`cuda`), grid `targets`" in text
    assert "- Versions: torch 9.9, triton 9.8" in text
    assert "peak matmul 2 TFLOP/s, copy 1e+03 GB/s" in text
    assert f"| {T1} | dynrank (adapter) | 1 ms | 1 | 50 | 1.30× | 1.10× | 0.95× |" in text
    assert f"| {MERGE} | dynrank | 160 µs | 900 | 90 | 1.25× |" in text
    assert f"| {MERGE} | copy | 150 µs | 960 | 96 | 1.33× |" in text
    assert f"| {EPOCH} | lowrank-rho0.25 | 5 ms | 0.50× | 0.30× |" in text
    assert "| merge: speedup over addmm_ (worst) | ≥ 1.00× | 1.250× (" in text
    # The other statistics' readings stand beside the chosen one's (the fixture's median of the
    # adapter at T1 is slower: 0.65× of unfused), the status is the chosen statistic's.
    assert "| target | required | measured | by median | by min | status |" in text
    assert ("| adapter fwd+bwd, target shapes: speedup over unfused torch (average) | ≥ 1.30× | 1.40× (2 shapes) "
            "| 1.07× | 1.40× | met |") in text
    assert "for reference only" not in text  # a CUDA run
    # The load average is recorded on every device; the header states it for a CPU run only.
    assert [line for line in text.splitlines() if line.startswith("- CPU")] == []
    # Columns in the suite's order; within a group, baselines first (full form first).
    assert "| group | provider | time | TFLOP/s | % peak | vs unfused | vs compiled | vs dense frozen |" in text
    assert text.index(f"| {T1} | dense_frozen") < text.index(f"| {T1} | dynrank")
    assert text.index(f"| {EPOCH} | full |") < text.index(f"| {EPOCH} | adapter-rho0.5 |")


def test_cli_and_plot(report, data, tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "report.md"
    png = tmp_path / "report.png"
    assert report.main([str(src), "--out", str(out), "--plot", str(png)]) == 0
    assert "## Speed targets" in out.read_text(encoding="utf-8")
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_each_rows_speedup_faster_to_the_right(report, data, tmp_path, monkeypatch):
    """The plot's axis reads "speedup, >1: faster": a training step is drawn as full / step, the other
    suites' rows as their first reference's speedup."""
    rows = report.add_ratios(report.load_rows(data))
    assert report._primary_ratio(_row(rows, EPOCH, "lowrank-rho0.25", "lowrank")) == pytest.approx(2.0)
    assert report._primary_ratio(_row(rows, EPOCH, "full", "full")) is None
    assert report._primary_ratio(_row(rows, MERGE, "dynrank", "merge")) == pytest.approx(1.25)
    axes = pytest.importorskip("matplotlib.axes")
    drawn, scatter = [], axes.Axes.scatter

    def recording(self, x, y, **kwargs):
        drawn.append((kwargs.get("label"), list(x)))
        return scatter(self, x, y, **kwargs)

    monkeypatch.setattr(axes.Axes, "scatter", recording)
    assert report.plot(rows, tmp_path / "report.png") == tmp_path / "report.png"
    points = dict(drawn)
    assert len(points) == len(drawn)   # one call per label here: no label is in two suites
    # Eager then graphed: full / step = 10 / 5 and 4 / 2.5.
    assert points["lowrank-rho0.25"] == pytest.approx([2.0, 1.6])
    assert points["lowrank-rho0.5"] == pytest.approx([1.25])
    assert points["adapter-rho0.5"] == pytest.approx([10 / 12])
    assert points["dynrank (lowrank)"] == pytest.approx([1.6, 1 / 1.05])


def test_cli_skips_an_empty_file_and_refuses_when_nothing_is_left(report, data, tmp_path, capsys):
    good, empty = tmp_path / "results.json", tmp_path / "empty.json"
    good.write_text(json.dumps(data), encoding="utf-8")
    empty.write_text("", encoding="utf-8")   # what a suite that selected nothing leaves behind
    out = tmp_path / "report.md"
    assert report.main([str(empty), str(good), "--out", str(out)]) == 0
    assert "skipping" in capsys.readouterr().err and "## Speed targets" in out.read_text(encoding="utf-8")
    with pytest.raises(SystemExit):
        report.main([str(empty)])
    assert "none of the files is a pytest-benchmark JSON" in capsys.readouterr().err


@pytest.mark.parametrize("content,problem", [
    ([], "not a pytest-benchmark JSON (a JSON list, expected an object with 'benchmarks')"),
    ({}, "not a pytest-benchmark JSON (no 'benchmarks' list; its keys: nothing)"),
    ({"machine_info": {}, "version": "5.1"},
     "not a pytest-benchmark JSON (no 'benchmarks' list; its keys: 'machine_info', 'version')"),
    ({"machine_info": {"node": "x"}, "benchmarks": [{"name": "test_sort", "group": None, "extra_info": {},
                                                     "stats": {"mean": 1e-3, "median": 1e-3, "min": 1e-3}}]},
     "no dynrank result (benchmarks: 1, none with extra_info['suite']; without machine_info['dynrank'])"),
    ({"machine_info": {"dynrank": {"device": "cpu"}}, "benchmarks": []},
     "no dynrank result (benchmarks: 0, none with extra_info['suite']; with machine_info['dynrank'])"),
])
def test_cli_skips_a_file_without_a_dynrank_result(report, data, tmp_path, capsys, content, problem):
    """A JSON array, an object that is no pytest-benchmark run, or a run of another project holds no
    dynrank result: skipped with a note naming the file and what it holds, and refused when alone."""
    good, odd = tmp_path / "results.json", tmp_path / "odd.json"
    good.write_text(json.dumps(data), encoding="utf-8")
    odd.write_text(json.dumps(content), encoding="utf-8")
    out = tmp_path / "report.md"
    capsys.readouterr()
    assert report.main([str(odd), str(good), "--out", str(out)]) == 0
    assert capsys.readouterr().err == f"report.py: skipping {odd}: {problem}\n"
    assert f"; {len(data['benchmarks'])} results" in out.read_text(encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(odd)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"report.py: skipping {odd}: {problem}\n" in err
    assert ("error: none of the files is a pytest-benchmark JSON with a dynrank result "
            "(pytest benchmarks/ --benchmark-json=FILE writes one)\n") in err
    assert report.not_a_dynrank_run(content) == problem
    assert report.not_a_dynrank_run(data) is None
    with pytest.raises(TypeError, match="combine_runs takes parsed pytest-benchmark JSON objects .dicts., got a list"):
        report.combine_runs([data, []])


def test_cpu_run_is_marked_reference_only(report, data):
    data["machine_info"]["dynrank"]["device"] = "cpu"
    text = report.render_markdown(data, report.add_ratios(report.load_rows(data)))
    assert "this run is not on CUDA, so the rows below are for reference only" in text
    assert "- CPU: 8 torch threads on 16 cpus, load average 2.5 when the results were saved" in text.splitlines()



def _run_on(data, device, device_name, slower):
    """``data`` as run on another device (each row's extra_info names it, as the suites record it): its
    groups prefixed with the device's name, and dynrank's rows and the low-rank steps ``slower`` times slower."""
    run = copy.deepcopy(data)
    run["machine_info"]["dynrank"].update(device=device, device_name=device_name, rooflines={})
    for bench in run["benchmarks"]:
        bench["group"] = f"{device_name} {bench['group']}"
        bench["extra_info"].update(device=device, device_name=device_name)
        if bench["extra_info"]["provider"].startswith(("dynrank", "lowrank")):
            bench["stats"] = {key: value * slower for key, value in bench["stats"].items()}
    return run


def _target_lines(text):
    return [line for line in text.split("## Speed targets")[1].splitlines() if line.startswith("| ")]


def test_targets_are_judged_on_the_cuda_rows_whatever_the_files_order(report, data, tmp_path, capsys):
    """Joined to a CPU run, the GPU's targets were judged on the rows of both (the CPU's worst linear reading
    replaced the GPU's, its transformer step stood for the GPU's when its file came first), and the CPU file
    first marked the whole section "not on CUDA"."""
    cpu = _run_on(data, "cpu", "Test CPU", slower=2.0)
    paths = {}
    for name, run in (("gpu.json", data), ("cpu.json", cpu)):
        paths[name] = tmp_path / name
        paths[name].write_text(json.dumps(run), encoding="utf-8")

    def render(*names):
        capsys.readouterr()
        assert report.main([str(paths[name]) for name in names]) == 0
        return capsys.readouterr().out

    alone = render("gpu.json")
    cpu_alone = render("cpu.json")
    assert _target_lines(cpu_alone) != _target_lines(alone)     # the CPU rows would change the verdicts
    assert "Judged on" not in alone
    for order in (("gpu.json", "cpu.json"), ("cpu.json", "gpu.json")):
        text = render(*order)
        assert _target_lines(text) == _target_lines(alone), order
        assert "for reference only" not in text
        assert "Judged on the rows of Test GPU (`cuda`); the rows of Test CPU (`cpu`) are left out." in text
    rows = report.add_ratios(report.load_rows(report.combine_runs([cpu, data])))
    assert {t["device"] for t in report.evaluate_targets(rows)} == {"Test GPU (`cuda`)"}
    # Without a CUDA row they are judged on the CPU's, for reference.
    assert "this run is not on CUDA, so the rows below are for reference only" in cpu_alone
    assert {t["device"] for t in report.evaluate_targets(report.add_ratios(report.load_rows(cpu)))} == {
        "Test CPU (`cpu`)"}


def test_targets_are_judged_on_each_cuda_device_on_its_own(report, data):
    """Two GPUs' rows made one verdict per target (the GPT-2 step: whichever group came first)."""
    other = _run_on(data, "cuda:1", "Other GPU", slower=1.25)
    combined = report.combine_runs([data, other])
    rows = report.add_ratios(report.load_rows(combined))
    text = report.render_markdown(combined, rows)
    assert "Judged on the rows of Test GPU (`cuda`) and Other GPU (`cuda:1`), each device on its own." in text
    assert "| target | device | required | measured | by median | by min | status |" in _target_lines(text)
    assert ("| transformer training step, lowrank ρ = 0.25, over full rank | Other GPU (`cuda:1`) | ≤ 0.60× | "
            "0.625× | 0.625× | 0.625× | missed by 4.2 % |") in _target_lines(text)
    targets = report.evaluate_targets(rows)
    for device, run in (("Test GPU (`cuda`)", data), ("Other GPU (`cuda:1`)", other)):
        alone = report.evaluate_targets(report.add_ratios(report.load_rows(run)))
        assert alone and all(t["device"] == device for t in alone)
        assert [t for t in targets if t["device"] == device] == alone
    step = {t["device"]: t["measured"] for t in targets
            if t["target"] == "transformer training step, lowrank ρ = 0.25, over full rank"}
    assert step == {"Test GPU (`cuda`)": "0.500×", "Other GPU (`cuda:1`)": "0.625×"}


def test_the_transformer_step_target_takes_the_worst_of_several_groups_and_names_it(report, data):
    """With two transformer groups on one device the target took whichever came first."""
    larger = "epoch transformer batch16"
    data["benchmarks"] += [
        _bench(larger, "epoch", "full", "full", "step", 20e-3, model="transformer", rank_ratio=None),
        _bench(larger, "epoch", "lowrank-rho0.25", "lowrank", "step", 14e-3, model="transformer", rank_ratio=0.25)]
    targets = {t["target"]: t for t in report.evaluate_targets(report.add_ratios(report.load_rows(data)))}
    step = targets["transformer training step, lowrank ρ = 0.25, over full rank"]
    assert step["reading"] == "0.700×" and step["status"] == "missed by 16.7 %"
    assert step["measured"] == f"0.700× (worst of 2 groups: {larger})"

def test_combining_runs_keeps_each_group_from_one_run(report, data):
    rerun = {"machine_info": data["machine_info"],
             "benchmarks": [_bench(MERGE, "merge", "addmm_", "merge", None, 4.0e-4),
                            _bench(MERGE, "merge", "dynrank", "merge", None, 1.0e-4)]}
    combined = report.combine_runs([data, rerun])
    rows = report.add_ratios(report.load_rows(combined))
    merge_rows = [r for r in rows if r.group == MERGE]
    assert sorted(r.provider for r in merge_rows) == ["addmm_", "dynrank"]  # the rerun replaced the group
    assert _row(rows, MERGE, "dynrank", "merge").ratios["vs addmm_"] == pytest.approx(4.0)
    assert _row(rows, T1, "dynrank", "adapter").ratios["vs unfused"] == pytest.approx(1.3)  # untouched
    other = dict(rerun, machine_info={"dynrank": {"device": "cuda", "device_name": "Other GPU"}})
    text = report.render_markdown(report.combine_runs([data, other]), rows)
    assert "different devices (Test GPU, Other GPU)" in text


def test_cli_makes_the_output_folders_and_refuses_bad_ones_before_writing(report, data, tmp_path, capsys):
    """--out and --plot into a folder that did not exist crashed with FileNotFoundError (after writing the
    report, for the plot); a bad one is refused before anything is written."""
    from _helpers import bad_outs
    results = tmp_path / "results.json"
    results.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "new" / "report.md"
    for flag, (bad, message) in (("--out", bad_outs(tmp_path, "report.md")["under a file"]),
                                 ("--plot", bad_outs(tmp_path, "report.png")["folder"])):
        argv = [str(results), "--out", str(out), flag, str(bad)]
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            report.main(argv)
        assert exit_info.value.code == 2
        assert f"error: {flag} {bad}: {message}\n" in capsys.readouterr().err
        assert not out.exists()
    pytest.importorskip("matplotlib")
    plot = tmp_path / "plots" / "report.png"
    assert report.main([str(results), "--out", str(out), "--plot", str(plot)]) == 0
    assert out.read_text(encoding="utf-8").startswith("#") and plot.stat().st_size > 0


def _malformed(data, case):
    """``data`` with the one flaw ``case`` names (the file still holds dynrank results)."""
    benchmarks, dynrank = data["benchmarks"], data["machine_info"]["dynrank"]
    if case == "a non-object entry":
        benchmarks.insert(2, "oops")
    elif case == "stats null":
        benchmarks[2]["stats"] = None
    elif case == "extra_info a list":
        benchmarks[2]["extra_info"] = ["linear"]
    elif case == "a statistic that is no number":
        benchmarks[2]["stats"]["median"] = "fast"
    elif case == "a count that is no number":
        benchmarks[2]["extra_info"]["flops"] = "1e9"
    elif case == "a provider that is no string":
        benchmarks[2]["extra_info"]["provider"] = 3
    elif case == "machine_info.dynrank null":
        data["machine_info"]["dynrank"] = None
    elif case == "rooflines, versions and a roofline null":
        dynrank.update(rooflines={"cuda/bfloat16": None}, versions=None)
    elif case == "a roofline without peak_tflops":
        del dynrank["rooflines"]["cuda/bfloat16"]["peak_tflops"]
    return data


@pytest.mark.parametrize("case, note", [
    ("a non-object entry", "a JSON str, expected an object"),
    ("extra_info a list", "extra_info is a JSON list, expected an object"),
    ("a statistic that is no number", "stats['median'] is 'fast', expected a positive number of seconds"),
    ("a count that is no number", "extra_info['flops'] is '1e9', expected a number"),
    ("a provider that is no string", "extra_info['provider'] is 3, expected a string"),
])
def test_cli_skips_a_malformed_entry_naming_the_file_and_index(report, data, tmp_path, capsys, case, note):
    """One bad entry in a file that passes the dynrank check raised a raw AttributeError, TypeError or
    ValueError naming neither the file nor the entry; it is skipped, the rest reported."""
    src, out = tmp_path / "results.json", tmp_path / "report.md"
    count = len(data["benchmarks"])
    src.write_text(json.dumps(_malformed(data, case)), encoding="utf-8")
    capsys.readouterr()
    assert report.main([str(src), "--out", str(out)]) == 0
    assert capsys.readouterr().err == f"report.py: {src}: skipping benchmarks[2]: {note}\n"
    assert report.malformed_entries(json.loads(src.read_text(encoding="utf-8"))) == [(2, note)]
    kept = count if case == "a non-object entry" else count - 1
    assert f"; statistic: mean; {kept} results" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize("case, header", [
    ("stats null", ["- Device: Test GPU (`cuda`)", "- Roofline cuda/bfloat16: peak matmul 2 TFLOP/s, copy 1e+03 GB/s"]),
    ("machine_info.dynrank null", ["- Device: unknown device (`?`), grid `?`", "- Versions: unknown"]),
    ("rooflines, versions and a roofline null", ["- Versions: unknown",
                                                 "- Roofline cuda/bfloat16: peak matmul — TFLOP/s, copy — GB/s"]),
    ("a roofline without peak_tflops", ["- Roofline cuda/bfloat16: peak matmul — TFLOP/s, copy 1e+03 GB/s"]),
])
def test_cli_reads_a_null_part_as_empty(report, data, tmp_path, capsys, case, header):
    """``"stats": null`` (TypeError), ``machine_info.dynrank: null`` (AttributeError) and a roofline without
    ``peak_tflops`` (KeyError) crashed the report; a null part reads as an empty one, without a note."""
    src, out = tmp_path / "results.json", tmp_path / "report.md"
    count = len(data["benchmarks"])
    src.write_text(json.dumps(_malformed(data, case)), encoding="utf-8")
    capsys.readouterr()
    assert report.main([str(src), "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    text = out.read_text(encoding="utf-8")
    assert f"; {count - 1 if case == 'stats null' else count} results" in text    # no stats: no row
    for line in header:
        assert any(x.startswith(line) for x in text.splitlines()), line


def test_a_file_whose_every_dynrank_entry_is_malformed_is_skipped(report, data, tmp_path, capsys):
    good, bad = tmp_path / "results.json", tmp_path / "bad.json"
    good.write_text(json.dumps(data), encoding="utf-8")
    bad.write_text(json.dumps({"machine_info": {}, "benchmarks": [{"extra_info": {"suite": "merge"},
                                                                   "stats": {"mean": -1.0}}]}), encoding="utf-8")
    capsys.readouterr()
    assert report.main([str(bad), str(good), "--out", str(tmp_path / "report.md")]) == 0
    assert capsys.readouterr().err == (
        f"report.py: {bad}: skipping benchmarks[0]: stats['mean'] is -1.0, expected a positive number of seconds\n"
        f"report.py: skipping {bad}: no dynrank result (benchmarks: 0, none with extra_info['suite']; "
        "without machine_info['dynrank'])\n")


def test_a_report_of_several_files_lists_each_files_session(report, data, tmp_path):
    """One JSON per suite, each session with its own rooflines: the header listed only the first file's
    date and rooflines, so a merge row's % copy stood against a ceiling the report did not show."""
    linear = {"machine_info": data["machine_info"], "datetime": data["datetime"],
              "benchmarks": [b for b in data["benchmarks"] if b["extra_info"]["suite"] == "linear"]}
    merge_machine = {"dynrank": {"device": "cuda", "device_name": "Test GPU",
                                 "rooflines": {"cuda/float32": {"peak_tflops": 0.5, "copy_gbps": 900.0},
                                               "cuda/bfloat16": {"peak_tflops": 2.0, "copy_gbps": 950.0}}}}
    merge = {"machine_info": merge_machine, "datetime": "2030-01-01T01:00:00",
             "benchmarks": [b for b in data["benchmarks"] if b["extra_info"]["suite"] == "merge"]}
    cpu = {"machine_info": {"dynrank": {"device": "cpu", "device_name": "CPU", "load_average_1m": 1.25,
                                        "num_threads": 1, "cpu_count": 2}},
           "datetime": "2030-01-02T00:00:00",
           "benchmarks": [b for b in data["benchmarks"] if b["extra_info"]["suite"] == "epoch"]}
    paths = []
    for name, run in (("linear.json", linear), ("merge.json", merge), ("epoch.json", cpu)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(run), encoding="utf-8")
    out = tmp_path / "report.md"
    assert report.main([*map(str, paths), "--out", str(out)]) == 0
    header = out.read_text(encoding="utf-8").split("\n## ")[0].splitlines()
    assert "- Date: 2030-01-01T00:00:00 (linear.json), 2030-01-01T01:00:00 (merge.json), 2030-01-02T00:00:00 " \
           f"(epoch.json); statistic: mean; {len(data['benchmarks'])} results" in header
    assert [line for line in header if line.startswith(("- Roofline", "- CPU"))] == [
        "- Roofline cuda/bfloat16 (linear.json): peak matmul 2 TFLOP/s, copy 1e+03 GB/s",
        "- Roofline cuda/float32 (merge.json): peak matmul 0.5 TFLOP/s, copy 900 GB/s",
        "- Roofline cuda/bfloat16 (merge.json): peak matmul 2 TFLOP/s, copy 950 GB/s",
        "- CPU (epoch.json): 1 torch threads on 2 cpus, load average 1.2 when the results were saved",
    ]
    # Without names, each session is labelled by its suites; one file keeps the header as it was.
    combined = report.combine_runs([linear, merge])
    assert [s["label"] for s in combined["sessions"]] == ["linear", "merge"]
    single = report.render_markdown(report.combine_runs([data]), [])
    assert "- Date: 2030-01-01T00:00:00; statistic: mean; 0 results" in single
    assert "- Roofline cuda/bfloat16: peak matmul 2 TFLOP/s, copy 1e+03 GB/s" in single
    with pytest.raises(ValueError, match=r"combine_runs takes one name per run \(2\), got 1"):
        report.combine_runs([linear, merge], ["linear.json"])


def _collected(*selection):
    """Ids of the epoch suite's cases that ``selection`` selects (collection only: nothing runs)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_bench_epoch.py", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "-W", "error::pytest.PytestUnknownMarkWarning", *selection],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [line.split("::", 1)[1] for line in done.stdout.splitlines() if "::" in line]


def test_bench_target_selects_the_gpt2_step_target_and_its_reference():
    """``-m bench_target`` (and ``-k target``) selected no epoch case, so a session run with it left the
    transformer step target without data; it takes the full and ρ = 0.25 steps, eager and graphed (the
    target is the ρ = 0.25 step over the full one), and not the ``+head`` case beside them."""
    wanted = ["test_training_step[transformer-full-target]",
              "test_training_step[transformer-lowrank-rho0.25-target]",
              "test_training_step[transformer-full-target-cuda_graphs]",
              "test_training_step[transformer-lowrank-rho0.25-target-cuda_graphs]"]
    assert _collected("-m", "bench_target") == wanted
    assert _collected("-k", "target") == wanted
