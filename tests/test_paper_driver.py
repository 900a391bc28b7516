"""benchmarks/paper_cifar10.py: parallel runs, deadline projection, stopping, resuming, summary.

The runs are tiny (ResNet20 at width 0.5 on a 16-image pickled CIFAR-10) so the
driver's bookkeeping is what is tested; nothing is timed against a target.
"""

import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from _helpers import README, load_script
from test_train_cli import _write_tiny_cifar10

# Width 0.5: the narrowest projection shortcut has 8 input channels, so the runs train channels-last
# on a CPU as the full-width ones do (dynrank.train.loop.CPU_CHANNELS_LAST_MIN_CHANNELS).
TINY = ["--width", "0.5", "--batch-size", "8", "--threads", "1"]


@pytest.fixture(scope="module")
def driver():
    return load_script("benchmarks/paper_cifar10.py", "dynrank_paper_driver")


@pytest.fixture
def data_dir(tmp_path):
    _write_tiny_cifar10(str(tmp_path / "data" / "cifar-10-batches-py"), per_batch=16, test=16)
    return str(tmp_path / "data")


def _main(driver, data_dir, out, *args, runs=("full:svd:0", "dynamic:svd:0")):
    return driver.main(["--data-dir", data_dir, "--device", "cpu", "--out", str(out), "--cache-dir",
                        str(Path(data_dir).parent / "cache"), "--poll-s", "0.2", "--status-every-s", "100",
                        "--min-launch-s", "1", *args, "--runs", *runs, "--train-args", *TINY])


def test_parallel_runs_finish_and_are_summarized(driver, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _main(driver, data_dir, out, "--epochs", "3", "--parallel", "2", "--budget-s", "300") == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["schedule"], r["decomposition"]): r for r in summary["runs"]}
    assert set(rows) == {("full", None), ("dynamic", "svd")}
    assert all(r["finished"] and r["epochs"] == 3 for r in rows.values())
    assert set(rows[("dynamic", "svd")]["seconds_per_epoch"]) <= {"lowrank", "full", "adapter"}
    assert rows[("full", None)]["comp_paper_formula"] == 1.0
    assert rows[("dynamic", "svd")]["paper_accuracy"] == 92.13
    orchestration = json.loads((out / "orchestration.json").read_text())
    assert orchestration["parallel"] == 2 and orchestration["failed"] == []
    assert [e["event"] for e in orchestration["events"]].count("start") == 2
    assert summary["environment"] == orchestration["environment"]
    # The runs' epochs name the device as the summary does (one thread each, the driver's default),
    # so none is listed as run elsewhere.
    assert orchestration["environment"]["device"] == "cpu (1 thread, channels-last)"
    assert all(r["devices_elsewhere"] == {} for r in rows.values())
    # A second call finds both runs finished, starts nothing and keeps the first call's record.
    record = (out / "orchestration.json").read_text()
    assert _main(driver, data_dir, out, "--epochs", "3", "--parallel", "2", "--budget-s", "300") == 0
    assert (out / "orchestration.json").read_text() == record
    assert "| full | - | 0 | 3 |" in capsys.readouterr().out


def test_deadline_stops_with_a_checkpoint_and_the_next_call_resumes(driver, data_dir, tmp_path):
    out = tmp_path / "out"
    code = _main(driver, data_dir, out, "--epochs", "400", "--budget-s", "20", "--grace-s", "8",
                 runs=("lowrank:svd:0",))
    log = (out / "lowrank-svd-seed0.log").read_text()
    assert code == 3, log                              # some run is left for a later call
    folder = out / "lowrank-svd-seed0"
    assert (folder / "lowrank" / "checkpoint.pt").is_file()
    assert not (folder / "lowrank" / "result.json").exists()
    done = len(json.loads((folder / "lowrank" / "metrics.json").read_text()))
    assert 0 < done < 400
    assert "of 400 (stopped)" in (out / "summary.md").read_text()
    # The same budget as the first call: a slow host takes seconds to import torch before the resume.
    code = _main(driver, data_dir, out, "--budget-s", "20", "--grace-s", "8", runs=("lowrank:svd:0",))
    log = (out / "lowrank-svd-seed0.log").read_text()
    assert code == 3, log
    assert "resuming at epoch" in log, log
    assert len(json.loads((folder / "lowrank" / "metrics.json").read_text())) >= done   # nothing lost


def _run(driver, schedule, cfg, samples):
    run = driver._Run((schedule, "svd", 0, None), 0, SimpleNamespace(out="/nowhere"))
    run.cfg, run.samples = cfg, samples
    return run


def test_projection_counts_the_full_rank_epochs_of_a_dynamic_run(driver):
    cfg = dict(epochs=150, inflate_epoch=55, deflate_epoch=120)
    samples = [(0.0, 0), (5.0, 1), (7.0, 2), (9.0, 3), (11.0, 4)]
    dynamic = _run(driver, "dynamic", cfg, samples)
    assert dynamic.seconds_per_epoch() == pytest.approx(2.0)
    # 51 lowrank epochs at 2 s, 65 full at 2·1.5 s, 30 adapter at 2·1.5·1.2 s.
    assert dynamic.seconds_left(1.5) == pytest.approx(51 * 2 + 65 * 3 + 30 * 3.6)
    assert _run(driver, "lowrank", cfg, samples).seconds_left(1.5) == pytest.approx(146 * 2)
    early = _run(driver, "dynamic", cfg, samples[:2])
    assert early.seconds_per_epoch() is None and early.seconds_left(1.5) is None


def test_a_run_is_stopped_only_to_let_a_more_important_reachable_one_finish(driver):
    cfg = dict(epochs=150, inflate_epoch=55, deflate_epoch=120)

    def running(priority, rate, done):
        run = _run(driver, "lowrank", cfg, [(0.0, done)] + [(10.0 + rate * i, done + i) for i in range(1, 4)])
        run.priority, run.name = priority, f"run{priority}"
        return run
    # Each has 140 epochs to go: 140 s at 1 s/epoch, 280 s at 2 s/epoch.
    a, b, c = running(0, 2.0, 10), running(1, 1.0, 10), running(2, 1.0, 10)
    stop, late = driver.choose_stop([a, b, c], 0.0, 200.0, 1.3)
    assert late == [a] and stop is c                       # a makes it with the others' share
    assert driver.choose_stop([a, b, c], 0.0, 200.0, 1.3, protected={"run1", "run2"}) == (None, [a])
    # a is late but is itself the least important: nothing is stopped for it.
    a.priority, c.priority = 2, 0
    assert driver.choose_stop([a, b, c], 0.0, 200.0, 1.3)[0] is None
    # Hopeless: even alone on the GPU (280 s / 3 runs > 80 s) a would not finish; nothing is stopped
    # (b and c, 50 epochs from the end, finish in time).
    a.priority = 0
    b, c = running(1, 1.0, 100), running(2, 1.0, 100)
    assert driver.choose_stop([a, b, c], 0.0, 80.0, 1.3) == (None, [])
    assert driver.choose_stop([a, b, c], 0.0, 95.0, 1.3)[0] is c           # 280 / 3 ≤ 95: worth it
    assert driver.choose_stop([b, c], 0.0, 200.0, 1.3) == (None, [])      # nobody late


def test_protection_goes_to_the_first_unfinished_runs(driver, data_dir, tmp_path, monkeypatch):
    stops = []
    monkeypatch.setattr(driver, "choose_stop", lambda running, now, deadline, ratio, protected=():
                        stops.append(set(protected)) or (None, []))
    out = tmp_path / "out"
    finished = out / "full-seed0" / "full"
    finished.mkdir(parents=True)
    (finished / "result.json").write_text("{}")
    _main(driver, data_dir, out, "--epochs", "1", "--budget-s", "120", "--protect", "1",
          runs=("full:svd:0", "lowrank:svd:0", "dynamic:svd:0"))
    assert stops and stops[0] == {"lowrank-svd-seed0"}


def test_deadline_file_moves_the_deadline(driver, tmp_path):
    path = tmp_path / "deadline"
    assert driver._read_deadline(str(path), 42.0) == 42.0          # no file yet
    path.write_text(str(time.time() + 100))
    assert driver._read_deadline(str(path), 42.0) == pytest.approx(time.monotonic() + 100, abs=1.0)
    path.write_text("soon")
    assert driver._read_deadline(str(path), 42.0) == 42.0
    assert driver._read_deadline(None, 7.0) == 7.0


def test_bad_arguments(driver, capsys):
    with pytest.raises(SystemExit):
        driver.main(["--parallel", "0", "--summarize-only"])
    assert "--parallel must be ≥ 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        driver.main(["--threads", "0", "--summarize-only"])
    assert "--threads must be ≥ 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        driver.main(["--runs", "dynamic-svd-0"])
    assert "a run is schedule:decomposition:seed" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, expected", [
    ("--epochs", "0", "an integer ≥ 1"), ("--epochs", "-3", "an integer ≥ 1"),
    ("--protect", "-1", "an integer ≥ 0"),
    ("--budget-s", "-1", "a finite number ≥ 0"), ("--grace-s", "nan", "a finite number ≥ 0"),
    ("--drop-cooldown-s", "-0.5", "a finite number ≥ 0"), ("--min-launch-s", "inf", "a finite number ≥ 0"),
    ("--poll-s", "-2", "a finite number ≥ 0"), ("--status-every-s", "-1", "a finite number ≥ 0")])
def test_out_of_range_numbers_are_refused(driver, tmp_path, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exit_info:
        driver.main([flag, value, "--summarize-only", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"error: argument {flag}: expected {expected}, got {value!r}\n" in capsys.readouterr().err


def test_a_call_that_starts_nothing_keeps_the_record_and_the_runs_device(driver, tmp_path, capsys):
    out = tmp_path / "out"
    history = [dict(epoch=e, form="full", train_time=3.0, val_acc=0.9, device="GPU A") for e in range(3)]
    _write_run(out, "full-seed0", "full", dict(epochs=3, seed=0, decomposition="svd"), history,
               result=dict(params=dict(dense=100, converted=50), inflate_epoch=None, deflate_epoch=None))
    record = json.dumps(dict(environment=dict(date="2026-11-25", device="GPU A", torch="t", triton="tr"),
                             parallel=9, mps=True, events=[dict(t=0.0, run="full-seed0", event="start")], failed=[]))
    (out / "orchestration.json").write_text(record)
    # Its one run is finished: this call starts nothing, and the GPU session's record stays.
    assert driver.main(["--device", "cpu", "--out", str(out), "--runs", "full:svd:0"]) == 0
    assert (out / "orchestration.json").read_text() == record
    text = (out / "summary.md").read_text()
    assert text.startswith("# CIFAR-10 / ResNet20, ρ = 0.5 — GPU A, torch t, triton tr, 2026-11-25\n")
    assert "Up to 9 runs shared the GPU at a time (MPS on)" in text
    # A record of another machine (or none): the runs' own epochs name the device they ran on.
    (out / "orchestration.json").write_text(json.dumps(dict(
        environment=dict(date="2026-11-28", device="cpu (1 thread)", torch="c", triton=None), parallel=1, mps=False)))
    for _ in range(2):
        summary = driver.summarize(str(out))
        (row,) = summary["runs"]
        assert summary["device"] == "GPU A"
        assert row["seconds_per_epoch"] == {"full": 3.0} and row["devices_elsewhere"] == {}
        text = (out / "summary.md").read_text()
        assert text.startswith("# CIFAR-10 / ResNet20, ρ = 0.5 — GPU A\n") and "not run on" not in text
        (out / "orchestration.json").unlink(missing_ok=True)


def test_a_new_folder_with_a_budget_too_short_to_launch_says_so(driver, tmp_path, capsys):
    """Nothing started into a new --out: the summary failed with a FileNotFoundError traceback."""
    out = tmp_path / "new"
    assert driver.main(["--device", "cpu", "--out", str(out), "--runs", "full:svd:0", "--epochs", "1",
                        "--budget-s", "5"]) == 2
    assert not out.exists()
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"no run started, so nothing to summarize in {out}: a run is launched only while more than "
        f"--min-launch-s 60 s of --budget-s 5 s are left")


def test_summary_of_nothing(driver, tmp_path):
    os.makedirs(tmp_path / "empty")
    summary = driver.summarize(str(tmp_path / "empty"))
    assert summary["runs"] == [] and (tmp_path / "empty" / "summary.md").is_file()


def _write_run(out, name, schedule, config, history, result=None):
    """A run folder as the training CLI leaves it: ``config.json``, and in ``<schedule>/`` the
    ``metrics.json`` of a run still going, or (``result`` given: its other keys) a finished run's
    ``result.json``.  Returns ``<schedule>/``."""
    folder = out / name / schedule
    folder.mkdir(parents=True)
    (out / name / "config.json").write_text(json.dumps(config))
    if result is None:
        (folder / "metrics.json").write_text(json.dumps(history))
    else:
        (folder / "result.json").write_text(json.dumps(dict(result, schedule=schedule, history=history)))
    return folder


def _write_orchestration(out):
    """The driver's ``orchestration.json``: the runs ran on "GPU A", whatever this machine is."""
    (out / "orchestration.json").write_text(json.dumps(dict(
        environment=dict(date="2026-11-25", device="GPU A", torch="t", triton="tr"), parallel=1, mps=False)))


def test_a_resume_passes_the_train_args_and_graphed_epochs_are_timed_apart(driver, tmp_path):
    args = SimpleNamespace(out=str(tmp_path), device="cuda", cache_dir="/tmp/cache", train_args=["--cuda-graphs"])
    run = driver._Run(("lowrank", "tucker", 0, None), 0, args)
    # Epochs of a run resumed with graphs: eager ones before, graphed ones after, timed apart.
    history = [dict(epoch=e, form="lowrank", train_time=t, val_acc=0.5, graphed_steps=g)
               for e, (t, g) in enumerate([(9.0, 0), (4.0, 0), (4.2, None), (1.5, 388), (1.7, 388)])]
    _write_run(tmp_path, os.path.basename(run.folder), "lowrank",
               dict(epochs=150, seed=0, decomposition="tucker", inflate_epoch=55, deflate_epoch=120), history)
    assert run.argv(args) == ["--resume", run.folder, "--device", "cuda", "--cache-dir", "/tmp/cache", "--cuda-graphs"]
    on_cpu = SimpleNamespace(**{**vars(args), "device": "cpu", "threads": 2})
    assert run.argv(on_cpu) == ["--resume", run.folder, "--device", "cpu", "--threads", "2", "--cache-dir", "/tmp/cache",
                                "--cuda-graphs"]
    (row,) = driver.summarize(str(tmp_path))["runs"]
    assert row["seconds_per_epoch"] == {"lowrank": pytest.approx(4.1), "lowrank (graphs)": pytest.approx(1.6)}
    assert "lowrank 4.10, lowrank (graphs) 1.60" in (tmp_path / "summary.md").read_text()


def test_placement_runs_are_named_launched_and_tabulated(driver, tmp_path):
    assert driver.parse_run("dynamic:svd:0:25-75") == ("dynamic", "svd", 0, (25, 75))
    assert driver.parse_run("lowrank:svd:1") == ("lowrank", "svd", 1, None)
    for bad in ("dynamic:svd:0:75-25", "lowrank:svd:0:0-50", "dynamic:svd:0:a-b"):
        with pytest.raises(Exception, match="inflate < deflate"):
            driver.parse_run(bad)
    args = SimpleNamespace(out=str(tmp_path), device="cpu", threads=1, cache_dir=None, data_dir="d", epochs=None, train_args=[])
    run = driver._Run(driver.parse_run("dynamic:svd:0:0-50"), 0, args)
    assert run.folder == str(tmp_path / "dynamic-svd-I0-D50-seed0")
    argv = run.argv(args)
    assert argv[argv.index("--inflate-epoch") + 1] == "0" and argv[argv.index("--deflate-epoch") + 1] == "50"
    # A short (dry) run puts the switches at the same fractions of its epochs, I < D ≤ E.
    assert [driver.scaled_placement(p, 3) for p in ((0, 50), (25, 75), (50, 100), (100, 150))] == [
        (0, 1), (0, 1), (1, 2), (2, 3)]
    assert driver.scaled_placement((25, 75), 30) == (5, 15) and driver.scaled_placement((25, 75)) == (25, 75)
    assert driver.scaled_placement(None, 3) == (None, None)
    argv = run.argv(SimpleNamespace(**{**vars(args), "epochs": 30}))
    assert argv[argv.index("--inflate-epoch") + 1] == "0" and argv[argv.index("--deflate-epoch") + 1] == "10"

    def fake_run(name, schedule, inflate, deflate, acc, lambdas, last_device="GPU A"):
        history = [dict(epoch=e, form="lowrank", train_time=1.0, val_acc=acc, device="GPU A") for e in range(3)]
        history[-1]["device"] = last_device
        folder = _write_run(tmp_path, name, schedule,
                            dict(epochs=150, seed=0, decomposition="svd", inflate_epoch=inflate, deflate_epoch=deflate),
                            history)
        head = "epoch,layer,type,spectral_ratio\n"
        rows = [f"{e},l{i},LowRankConv2d,{lambdas(i) if e == 2 else 1.0}\n" for e in range(3) for i in range(19)]
        (folder / "monitor.layers.csv").write_text(head + "".join(rows) + "2,fc,Linear,3.0\n")
    fake_run("lowrank-svd-seed0", "lowrank", 55, 120, 0.9, lambda i: "inf")
    fake_run("dynamic-svd-seed0", "dynamic", 55, 120, 0.92, lambda i: 10.0 + i)
    fake_run("dynamic-svd-I0-D50-seed0", "dynamic", 0, 50, 0.91, lambda i: 20.0 + i, last_device="cpu")
    _write_orchestration(tmp_path)
    summary = driver.summarize(str(tmp_path))
    rows = {(r["schedule"], r["placement"]): r for r in summary["runs"]}
    assert rows[("dynamic", (0, 50))]["final_lambda"] == [20.0, 30.0, 38.0]
    assert rows[("dynamic", (0, 50))]["paper_accuracy"] == 91.26
    assert rows[("dynamic", None)]["paper_accuracy"] == 92.13
    text = (tmp_path / "summary.md").read_text()
    assert "| dynamic I=0 D=50 | svd | 0 | 3 of 150 (stopped) | 91.00 | 91.26 |" in text
    # Its epochs elsewhere are listed under the same name, not as the default dynamic run's.
    assert "dynamic I=0 D=50 svd seed 0: epoch 3 on cpu." in text and "dynamic svd seed 0: epoch" not in text
    table = text[text.index("Placement of the full-rank epochs"):]
    assert table.index("None (lowrank)") < table.index("Early") < table.index("Default: straddles")
    assert ("| Early | 0 | 50 | 0 | 3 of 150 (stopped) | 91.00 | 91.26 | 20.00, 30.00, 38.00 "
            "| 59.32, 6.02, 76.47 |") in table
    assert "| None (lowrank) | - | - | 0 | 3 of 150 (stopped) | 90.00 | 91.14 | ∞, ∞, ∞ | ∞, 7.58, ∞ |" in table


def test_measured_comp_compares_only_epochs_that_ran_the_same_way(driver, tmp_path):
    def finished(name, schedule, epochs, inflate=None, deflate=None):
        """epochs: (form, seconds, graphed steps, device) per epoch."""
        history = [dict(epoch=e, form=f, train_time=t, val_acc=0.5, graphed_steps=g, device=d)
                   for e, (f, t, g, d) in enumerate(epochs)]
        _write_run(tmp_path, name, schedule, dict(epochs=len(epochs), seed=int(name[-1]), decomposition="svd"),
                   history, result=dict(params=dict(dense=100, converted=50, rank_ratio=0.5),
                                        inflate_epoch=inflate, deflate_epoch=deflate))
    _write_orchestration(tmp_path)
    gpu = lambda form, t, g=0: (form, t, g, "GPU A")                                   # noqa: E731
    # The full-rank reference is the median epoch after the first (start-up): median(4, 6) = 5 s, not
    # median(9, 4, 6) = 6 s.
    finished("full-seed0", "full", [gpu("full", 9.0), gpu("full", 4.0), gpu("full", 6.0)])
    finished("lowrank-svd-seed0", "lowrank", [gpu("lowrank", 5.0), gpu("lowrank", 2.0), gpu("lowrank", 2.0)])
    # Eager and graphed epochs tie: the later (graphed) way has no full-rank reference.
    finished("lowrank-svd-seed1", "lowrank", [gpu("lowrank", 5.0), gpu("lowrank", 2.0), gpu("lowrank", 1.0, 300)])
    # Resumed on the CPU for its last epoch: timed apart, and left out of the measured Comp.
    finished("lowrank-svd-seed2", "lowrank", [gpu("lowrank", 5.0), gpu("lowrank", 3.0), gpu("lowrank", 3.0),
                                              ("lowrank", 90.0, 0, "cpu")])
    # Dynamic, E = 6, I = 2, D = 4; the last epoch begun on the GPU and finished on the CPU.
    finished("dynamic-svd-seed3", "dynamic", [gpu("lowrank", 9.0), gpu("lowrank", 2.0), gpu("full", 4.0),
                                              gpu("full", 6.0), gpu("adapter", 5.0),
                                              ("adapter", 80.0, 0, "GPU A+cpu")], 2, 4)
    # Left the GPU twice: its CPU stretches are listed apart, not as one span over the GPU's epochs.
    finished("lowrank-svd-seed4", "lowrank", [gpu("lowrank", 5.0), ("lowrank", 90.0, 0, "cpu"),
                                              ("lowrank", 90.0, 0, "cpu"), gpu("lowrank", 3.0),
                                              ("lowrank", 90.0, 0, "cpu")])
    rows = {r["seed"] if r["schedule"] != "full" else "full": r for r in driver.summarize(str(tmp_path))["runs"]}
    assert rows["full"]["comp_measured"] == pytest.approx(1.0)
    assert rows["full"]["seconds_per_epoch"] == {"full": 5.0}
    assert rows[0]["comp_measured"] == pytest.approx(2.0 / 5.0)
    assert rows[1]["comp_measured"] is None
    assert rows[2]["comp_measured"] == pytest.approx(3.0 / 5.0)
    assert rows[2]["seconds_per_epoch"] == {"lowrank": 3.0, "lowrank on cpu": 90.0}
    assert rows[2]["devices_elsewhere"] == {"cpu": [[4, 4]]}
    assert rows[4]["devices_elsewhere"] == {"cpu": [[2, 3], [5, 5]]}
    # Each form's mean epoch on the main way weighted by the schedule, over 6 × the full run's median.
    assert rows[3]["comp_measured"] == pytest.approx((2 * 2.0 + 2 * 5.0 + 2 * 5.0) / (6 * 5.0))
    assert rows[3]["seconds_per_epoch"] == {"lowrank": 2.0, "full": 5.0, "adapter": 5.0,
                                            "adapter on GPU A+cpu": 80.0}
    text = (tmp_path / "summary.md").read_text()
    assert "GPU A" in text.splitlines()[0]
    assert "lowrank svd seed 2: epoch 4 on cpu" in text
    assert "dynamic svd seed 3: epoch 6 on GPU A+cpu" in text
    assert "lowrank svd seed 4: epochs 2–3, 5 on cpu" in text


def _readme_table4():
    """(schedule, decomposition) → (paper acc. %, paper Comp.) from README.md's tables headed
    ``| schedule (ρ = 0.5, <decomposition>) |``."""
    decompositions = {"SVD": "svd", "Tucker": "tucker", "CP": "cp", "TKD-CPD": "tkd-cpd"}
    schedules = {"full rank": "full", "fixed low rank": "lowrank", "dynamic, (I, D) = (55, 120)": "dynamic"}
    lines = README.read_text(encoding="utf-8").splitlines()
    table = {}
    for i, line in enumerate(lines):
        head = re.match(r"\s*\| schedule \(ρ = 0\.5, ([\w-]+)\) \|", line)
        if head is None:
            continue
        columns = [c.strip() for c in line.strip().strip("|").split("|")]
        accuracy, comp = columns.index("paper acc. %"), columns.index("paper Comp.")
        for row in lines[i + 2:]:
            if not row.strip().startswith("|"):
                break
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            table[schedules[cells[0]], decompositions[head.group(1)]] = (float(cells[accuracy]), float(cells[comp]))
    return table


def test_every_run_gets_the_papers_numbers_of_its_decomposition(driver, tmp_path):
    """Table 4's accuracy and Comp. beside each run, as README.md quotes them, for every decomposition."""
    table = _readme_table4()
    assert len(table) == 9                 # full rank, and lowrank and dynamic for each of the four
    for schedule, decomposition in table:
        name = "full-seed0" if schedule == "full" else f"{schedule}-{decomposition}-seed0"
        form = "full" if schedule == "full" else "lowrank"         # a dynamic run starts low-rank
        history = [dict(epoch=e, form=form, train_time=2.0, val_acc=0.85, device="GPU A") for e in range(2)]
        _write_run(tmp_path, name, schedule, dict(epochs=150, seed=0, decomposition=decomposition), history)
    _write_orchestration(tmp_path)
    rows = driver.summarize(str(tmp_path))["runs"]
    assert len(rows) == 9
    text = (tmp_path / "summary.md").read_text()
    for row in rows:
        accuracy, comp = table[row["schedule"], row["decomposition"] or "svd"]
        assert (row["paper_accuracy"], row["paper_comp"]) == (accuracy, comp), row["folder"]
        form = "full" if row["schedule"] == "full" else "lowrank"
        assert (f"| {row['schedule']} | {row['decomposition'] or '-'} | 0 | 2 of 150 (stopped) | 85.00 | "
                f"{accuracy:.2f} | {form} 2.00 | - | - | {comp:.2f} |") in text


def test_placement_study_plots_the_accuracy_curves(driver, tmp_path):
    pytest.importorskip("matplotlib")
    from dynrank import RankMonitor, convert_model
    from dynrank.train.models import EXCLUDE, resnet20

    for name, schedule, inflate, deflate in (("lowrank-svd-seed0", "lowrank", 55, 120),
                                              ("dynamic-svd-I1-D2-seed0", "dynamic", 1, 2)):
        folder = tmp_path / name / schedule
        folder.mkdir(parents=True)
        (tmp_path / name / "config.json").write_text(json.dumps(
            dict(epochs=3, seed=0, decomposition="svd", inflate_epoch=inflate, deflate_epoch=deflate)))
        (folder / "metrics.json").write_text(json.dumps(
            [dict(epoch=e, form="lowrank", train_time=1.0, val_acc=0.3 + 0.1 * e) for e in range(3)]))
        model = resnet20(num_classes=4, width=0.25)
        convert_model(model, rank_ratio=0.5, form="lowrank", exclude=EXCLUDE["resnet20"])
        monitor = RankMonitor(model, name=schedule)
        for epoch in range(3):
            with monitor.epoch(epoch):
                pass
            monitor.log(train_loss=1.0 - 0.1 * epoch, val_loss=1.1 - 0.1 * epoch, val_acc=0.3 + 0.1 * epoch)
        monitor.save(str(folder / "monitor"))
    summary = driver.summarize(str(tmp_path))
    # λ per run and the curves of the SVD runs (here the lowrank one; the placement run is not among them).
    assert summary["plots"] == ["plots/lambda_lowrank.png", "plots/curves.png"]
    assert all((tmp_path / p).stat().st_size > 0 for p in summary["plots"])
    assert summary["placement_plot"] == "plots/placement.png"
    assert (tmp_path / "plots" / "placement.png").stat().st_size > 0
    assert "`plots/placement.png`" in (tmp_path / "summary.md").read_text()
    # Without the placement runs there is no study, so no plot.
    os.rename(tmp_path / "dynamic-svd-I1-D2-seed0", tmp_path.parent / "moved-away")
    assert driver.summarize(str(tmp_path))["placement_plot"] is None


@pytest.mark.parametrize("runs, first, second, folder, why", [
    (["full:svd:0", "lowrank:svd:0", "full:tucker:0"], "full:svd:0", "full:tucker:0", "full-seed0",
     " (a full run's folder does not name its decomposition)"),
    (["lowrank:svd:0", "lowrank:svd:0"], "lowrank:svd:0", "lowrank:svd:0", "lowrank-svd-seed0", ""),
    (["dynamic:svd:1:25-75", "dynamic:svd:01:25-75"], "dynamic:svd:1:25-75", "dynamic:svd:1:25-75",
     "dynamic-svd-I25-D75-seed1", "")])
def test_two_runs_in_one_folder_are_refused(driver, tmp_path, capsys, monkeypatch, runs, first, second, folder, why):
    """Both runs used to start at once with the same --out: one failed after training, their logs interleaved."""
    monkeypatch.setattr(driver.subprocess, "Popen", lambda *a, **k: pytest.fail("a run was started"))
    with pytest.raises(SystemExit) as exit_info:
        driver.main(["--device", "cpu", "--out", str(tmp_path), "--runs", *runs])
    assert exit_info.value.code == 2
    expected = f"error: --runs {first} and {second} both run in {tmp_path / folder}{why}; give each run once\n"
    assert expected in capsys.readouterr().err


def test_an_unknown_decomposition_is_refused(driver, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        driver.main(["--runs", "full:svd:0", "lowrank:tuker:0", "--summarize-only", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert ("error: argument --runs: a run's decomposition is one of svd, tucker, cp, tkd-cpd, "
            "got 'tuker' in 'lowrank:tuker:0'\n") in capsys.readouterr().err
