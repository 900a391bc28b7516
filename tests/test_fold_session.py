"""benchmarks/fold_session.py: a GPU session's archives land where the next session resumes from."""

import io
import json
import re
import tarfile

import pytest

from _helpers import load_script


@pytest.fixture(scope="module")
def folder():
    return load_script("benchmarks/fold_session.py", "dynrank_fold_session")


def _tgz(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = content if isinstance(content, bytes) else content.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _argparse_error(capsys, excinfo, message):
    """The command exited as argparse does on a usage error (code 2), with exactly this message."""
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {message}\n" in err, err


def _run_files(name, schedule, epochs, finished):
    cfg = dict(epochs=3, seed=0, decomposition="svd", inflate_epoch=1, deflate_epoch=2)
    history = [dict(epoch=e, form="lowrank", train_time=1.0, val_acc=0.5 + 0.1 * e) for e in range(epochs)]
    files = {f"cifar10-resnet20/{name}/config.json": json.dumps(cfg),
             f"cifar10-resnet20/{name}/{schedule}/metrics.json": json.dumps(history)}
    if finished:
        files[f"cifar10-resnet20/{name}/{schedule}/result.json"] = json.dumps(
            dict(schedule=schedule, history=history, params=None, inflate_epoch=None, deflate_epoch=None,
                 monitor_records=[dict(epoch=e, layers={}) for e in range(epochs)]))
    return files


def test_a_session_is_folded_into_the_results(folder, tmp_path):
    session, results = tmp_path / "session", tmp_path / "results"
    session.mkdir()
    machine = {"dynrank": {"device_name": "NVIDIA H200", "device": "cuda"}}
    _tgz(session / "bench.tgz", {"./linear.json": json.dumps({"machine_info": machine,
                                                              "datetime": "2026-11-27T01:02:03", "benchmarks": []}),
                                 "./report.md": "# report\n"})
    (session / "tests-cuda.log").write_text("345 passed\n")
    extras = {"cifar10-resnet20/full-seed0/compare.json": "{}", "cifar10-resnet20/full-seed0/plots/curves.png": b"png",
              "cifar10-resnet20/full-seed0/full/monitor.json": "{}", "cifar10-resnet20/full-seed0/full/model.pt": b"w",
              "cifar10-resnet20/full-seed0/full/monitor.layers.csv": "epoch,layer\n"}
    _tgz(session / "paper.tgz", {**_run_files("full-seed0", "full", 3, True), **extras,
                                 **_run_files("lowrank-svd-seed0", "lowrank", 2, False)})
    _tgz(session / "paper-checkpoints.tgz", {"cifar10-resnet20/lowrank-svd-seed0/lowrank/checkpoint.pt": b"state"})
    stale = results / "cifar10-resnet20" / "full-seed0" / "full" / "checkpoint.pt"     # from an earlier session
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    assert folder.main([str(session), "--results", str(results)]) == 0
    bench = results / "gpu-h200-2026-11-27"
    assert sorted(p.name for p in bench.iterdir()) == ["linear.json", "report.md", "tests-cuda.log"]
    assert (bench / "tests-cuda.log").read_text() == "345 passed\n"
    assert not (results / ".bench-staging").exists()
    runs = results / "cifar10-resnet20"
    assert (runs / "lowrank-svd-seed0" / "lowrank" / "checkpoint.pt").read_bytes() == b"state"
    assert not stale.exists()                                     # finished: its checkpoint is dropped
    # What the repository commits of a run: no compare tables, plots, monitor.json or model files,
    # and a result.json without the monitor records its CSV tables hold.
    assert sorted(p.name for p in (runs / "full-seed0").iterdir()) == ["config.json", "full"]
    assert sorted(p.name for p in (runs / "full-seed0" / "full").iterdir()) == [
        "metrics.json", "monitor.layers.csv", "result.json"]
    result = json.loads((runs / "full-seed0" / "full" / "result.json").read_text())
    assert "monitor_records" not in result and len(result["history"]) == 3
    summary = json.loads((runs / "summary.json").read_text())
    assert {(r["schedule"], r["finished"]) for r in summary["runs"]} == {("full", True), ("lowrank", False)}


def test_names_and_refusals(folder, tmp_path, capsys):
    def bench_json(device):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps({"machine_info": {"dynrank": {"device_name": device}},
                                    "datetime": "2026-01-02T00:00:00"}))
        return str(path)
    assert folder.bench_folder_name([bench_json("NVIDIA H100 80GB HBM3")]) == "gpu-h100-2026-01-02"
    assert folder.bench_folder_name([bench_json("Some Accelerator")]) == "gpu-some-accelerator-2026-01-02"
    with pytest.raises(ValueError, match="none of the suite JSONs names its device"):
        folder.bench_folder_name([])
    evil = tmp_path / "evil.tgz"
    _tgz(evil, {"../outside.txt": "x"})
    refused = f"{evil}: refusing the path '../outside.txt' (outside the target folder)"
    with pytest.raises(ValueError, match=re.escape(refused)):
        folder._extract(str(evil), str(tmp_path / "t"))
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        folder.main([str(tmp_path / "empty"), "--results", str(tmp_path / "r")])
    _argparse_error(capsys, exit_info, f"nothing to fold in {tmp_path / 'empty'} "
                                       "(expected bench.tgz, paper.tgz or paper-checkpoints.tgz)")


def test_a_run_continued_elsewhere_folds_back_into_its_committed_folder(folder, tmp_path, capsys):
    results, copy = tmp_path / "results", tmp_path / "elsewhere"
    for root, files in ((results, _run_files("lowrank-cp-seed0", "lowrank", 2, False)),
                        (copy, _run_files("lowrank-cp-seed0", "lowrank", 3, True))):
        for name, content in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    runs = results / "cifar10-resnet20"
    committed = runs / "lowrank-cp-seed0"
    (committed / "lowrank" / "checkpoint.pt").write_bytes(b"epoch 2")
    (runs / "lowrank-cp-seed0.log").write_text("epoch 1\nepoch 2\n")
    copy = copy / "cifar10-resnet20" / "lowrank-cp-seed0"
    (copy / "lowrank" / "checkpoint.pt").write_bytes(b"epoch 3")
    (copy / "lowrank" / "model.pt").write_bytes(b"weights")
    (copy / "lowrank" / "monitor.layers.csv").write_text("epoch,layer\n")
    (copy / "plots").mkdir()
    output = tmp_path / "out.txt"
    output.write_text("epoch 3\n")
    argv = ["--run", str(copy), "--output", str(output), "--results", str(results)]
    assert folder.main(argv + ["--note", "resumed on the CPU (2 threads)"]) == 0
    assert sorted(p.name for p in (committed / "lowrank").iterdir()) == ["metrics.json", "monitor.layers.csv",
                                                                        "result.json"]  # finished: no checkpoint
    assert len(json.loads((committed / "lowrank" / "metrics.json").read_text())) == 3
    assert "monitor_records" not in json.loads((committed / "lowrank" / "result.json").read_text())
    assert not (committed / "plots").exists()
    log = (runs / "lowrank-cp-seed0.log").read_text()
    assert log == "epoch 1\nepoch 2\n\n# resumed on the CPU (2 threads)\nepoch 3\n"
    summary = json.loads((runs / "summary.json").read_text())
    assert [(r["schedule"], r["finished"], r["epochs"]) for r in summary["runs"]] == [("lowrank", True, 3)]
    # Refusals: a folder that is no committed run, and --run without its note.
    stray = tmp_path / "stray"
    (stray / "lowrank").mkdir(parents=True)
    not_committed = (f"{stray}: no run 'stray' in {runs} to fold it into "
                     "(expected a copy of a committed run, or --new for a run started elsewhere)")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        folder.main(["--run", str(stray), "--output", str(output), "--note", "x", "--results", str(results)])
    _argparse_error(capsys, exit_info, not_committed)
    with pytest.raises(ValueError, match=re.escape(not_committed)):
        folder.fold_run(str(stray), str(results), str(output), "x")
    with pytest.raises(SystemExit) as exit_info:
        folder.main(argv)
    _argparse_error(capsys, exit_info, "--run takes --output and --note and no session folder")


def test_a_run_started_elsewhere_folds_in_with_new_under_the_drivers_name(folder, tmp_path, capsys):
    results, elsewhere = tmp_path / "results", tmp_path / "elsewhere"
    name = "dynamic-svd-I1-D2-seed0"
    for file, content in _run_files(name, "dynamic", 2, False).items():
        path = elsewhere / file
        path.parent.mkdir(parents=True, exist_ok=True)
        content = json.loads(content)
        if file.endswith("config.json"):
            content["schedule"] = "dynamic"
        path.write_text(json.dumps(content))
    run = elsewhere / "cifar10-resnet20" / name
    (run / "dynamic" / "checkpoint.pt").write_bytes(b"epoch 2")
    output = tmp_path / "out.txt"
    output.write_text("epoch 1\nepoch 2\n")
    argv = ["--run", str(run), "--output", str(output), "--results", str(results), "--note", "started on the CPU"]
    # Without --new there is no committed run to continue.
    with pytest.raises(ValueError, match=re.escape(f"{run}: no run '{name}' in {results / 'cifar10-resnet20'} to fold "
                                                   "it into (expected a copy of a committed run, or --new for a run "
                                                   "started elsewhere)")):
        folder.fold_run(str(run), str(results), str(output), "x")
    assert folder.main(argv + ["--new"]) == 0
    runs = results / "cifar10-resnet20"
    assert sorted(p.name for p in (runs / name / "dynamic").iterdir()) == ["checkpoint.pt", "metrics.json"]
    assert json.loads((runs / name / "config.json").read_text())["inflate_epoch"] == 1
    assert (runs / f"{name}.log").read_text() == "\n# started on the CPU\nepoch 1\nepoch 2\n"
    # A second --new would overwrite the committed run; a folder under another name than the
    # driver's for its settings would hide it from the driver's resume.
    with pytest.raises(ValueError, match=re.escape(f"{run}: {runs / name} is already committed; "
                                                   "fold a continued copy without --new")):
        folder.fold_run(str(run), str(results), str(output), "x", new=True)
    renamed = elsewhere / "cifar10-resnet20" / "dynamic-svd-seed0"
    run.rename(renamed)
    with pytest.raises(ValueError, match=re.escape(f"{renamed}: the paper driver names this run "
                                                   "dynamic-svd-I1-D2-seed0, not 'dynamic-svd-seed0'")):
        folder.fold_run(str(renamed), str(results), str(output), "x", new=True)
    assert not (runs / "dynamic-svd-seed0").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        folder.main(["--new", str(tmp_path)])
    _argparse_error(capsys, exit_info, "--new goes with --run")


def test_a_second_session_on_the_same_day_gets_its_own_folder(folder, tmp_path):
    """Folders are named by device and day: a later session that day lands in ``-2``, and folding a
    session again replaces its own folder's files, not another session's."""
    results = tmp_path / "results"
    machine = {"dynrank": {"device_name": "NVIDIA H200", "device": "cuda"}}

    def fold(started, report):
        session = tmp_path / f"session-{started}-{report}"
        session.mkdir()
        _tgz(session / "bench.tgz", {"./linear.json": json.dumps({"machine_info": machine, "datetime": started,
                                                                  "benchmarks": []}),
                                     "./report.md": report})
        assert folder.main([str(session), "--results", str(results)]) == 0

    fold("2026-11-27T01:00:00", "first")
    fold("2026-11-27T19:00:00", "second")
    fold("2026-11-27T19:00:00", "second, folded again")
    assert sorted(p.name for p in results.iterdir()) == ["gpu-h200-2026-11-27", "gpu-h200-2026-11-27-2"]
    assert (results / "gpu-h200-2026-11-27" / "report.md").read_text() == "first"
    assert (results / "gpu-h200-2026-11-27-2" / "report.md").read_text() == "second, folded again"


def test_a_bench_archive_without_a_suite_is_refused_before_anything_is_folded(folder, tmp_path, capsys):
    """A bench.tgz in which nothing names the device (no suite JSON and no session.json, as an older
    gpu_session.sh packed a bench phase cut off before its first suite): the fold is refused, naming
    the archive and what it holds, and leaves nothing behind; the next session's fold then goes
    through completely."""
    results = tmp_path / "results"
    cut = tmp_path / "cut-off"
    cut.mkdir()
    _tgz(cut / "bench.tgz", {"./profile.txt": "x\n", "./diagnose.md": "y\n"})
    (cut / "tests-cuda.log").write_text("1 passed\n")
    _tgz(cut / "paper.tgz", _run_files("full-seed0", "full", 3, True))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        folder.main([str(cut), "--results", str(results)])
    _argparse_error(capsys, exit_info, f"{cut / 'bench.tgz'}: neither a suite JSON nor session.json in it (it "
                                       "holds diagnose.md, profile.txt); nothing was folded")
    assert list(results.iterdir()) == []                        # no staging folder, no runs
    # JSONs that name no device are refused the same way.
    nameless = tmp_path / "nameless"
    nameless.mkdir()
    _tgz(nameless / "bench.tgz", {"./linear.json": json.dumps({"machine_info": {}, "benchmarks": []})})
    with pytest.raises(ValueError, match=re.escape(f"{nameless / 'bench.tgz'}: none of linear.json names its "
                                                   "device; nothing was folded")):
        folder.fold(str(nameless), str(results), log=lambda _: None)
    assert list(results.iterdir()) == []
    session = tmp_path / "session"
    session.mkdir()
    machine = {"dynrank": {"device_name": "NVIDIA H200", "device": "cuda"}}
    _tgz(session / "bench.tgz", {"./epoch.json": json.dumps({"machine_info": machine,
                                                             "datetime": "2026-11-28T01:02:03", "benchmarks": []})})
    (session / "tests-cuda.log").write_text("345 passed\n")
    _tgz(session / "paper.tgz", _run_files("full-seed0", "full", 3, True))
    assert folder.main([str(session), "--results", str(results)]) == 0
    assert sorted(p.name for p in results.iterdir()) == ["cifar10-resnet20", "gpu-h200-2026-11-28"]
    assert sorted(p.name for p in (results / "gpu-h200-2026-11-28").iterdir()) == ["epoch.json", "tests-cuda.log"]
    summary = json.loads((results / "cifar10-resnet20" / "summary.json").read_text())
    assert [(r["schedule"], r["finished"]) for r in summary["runs"]] == [("full", True)]


def test_a_suite_cut_off_at_its_time_limit_is_left_out_and_the_rest_folded(folder, tmp_path):
    """pytest-benchmark opens its JSON at the start, so a suite cut at its cap leaves 0 bytes in bench.tgz:
    sorted first, the fold was refused (Expecting value); sorted later, a bare JSONDecodeError."""
    machine = {"dynrank": {"device_name": "NVIDIA H200", "device": "cuda"}}
    suite = json.dumps({"machine_info": machine, "datetime": "2026-11-28T01:02:03", "benchmarks": []})
    results = tmp_path / "results"
    session = tmp_path / "session"
    session.mkdir()
    _tgz(session / "bench.tgz", {"./conv.json": "", "./epoch.json": suite, "./merge.json": "", "./report.md": "r\n"})
    notes = []
    folder.fold(str(session), str(results), log=notes.append)
    assert sorted(p.name for p in (results / "gpu-h200-2026-11-28").iterdir()) == ["epoch.json", "report.md"]
    for name in ("conv", "merge"):
        assert f"{session / 'bench.tgz'}: {name}.json is empty or not a suite JSON (cut off at its time limit, " \
               f"or none of its benchmarks succeeded; no {name}.log came with it): not folded" in notes
    assert sorted(p.name for p in results.iterdir()) == ["gpu-h200-2026-11-28"]      # no staging left


def _session_info(device="cuda", name="NVIDIA H200", started="2026-11-29T10:00:00+00:00"):
    """gpu_session.sh's session.json: the device and the call's start, in the suite JSONs' layout."""
    return json.dumps({"machine_info": {"dynrank": {"device": device, "device_name": name}}, "datetime": started})


def test_an_empty_suite_json_is_explained_by_the_suites_log(folder, tmp_path):
    """Every benchmark of a suite failing leaves a 0-byte JSON too (pytest-benchmark writes nothing then):
    the fold called it a suite cut off at its time limit.  The suite's log (gpu_session.sh keeps it beside
    the JSON) tells which, and is folded with the tracebacks it holds."""
    machine = {"dynrank": {"device_name": "NVIDIA H200", "device": "cuda"}}
    suite = json.dumps({"machine_info": machine, "datetime": "2026-11-28T01:02:03", "benchmarks": []})
    logs = {"merge": "F\n___ test_merge ___\nE   RuntimeError: triton compile failed\n"
                     "FAILED benchmarks/test_bench_merge.py::test_merge[target] - RuntimeError\n3 failed in 12.34s\n",
            "linear": "...\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!! KeyboardInterrupt !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
                      "===== 3 passed in 40.10s =====\n",
            "conv": "....",                                            # killed before pytest's summary
            "linear_split": "\n=== 12 deselected in 1.02s ===\n"}
    files = {"./epoch.json": suite, **{f"./{name}.json": "" for name in logs},
             **{f"./{name}.log": text for name, text in logs.items()}}
    session, results = tmp_path / "session", tmp_path / "results"
    session.mkdir()
    _tgz(session / "bench.tgz", files)
    notes = []
    folder.fold(str(session), str(results), log=notes.append)
    held = results / "gpu-h200-2026-11-28"
    assert sorted(p.name for p in held.iterdir()) == ["conv.log", "epoch.json", "linear.log", "linear_split.log",
                                                      "merge.log"]
    assert "RuntimeError: triton compile failed" in (held / "merge.log").read_text()
    bench = session / "bench.tgz"
    assert sorted(note for note in notes if "not folded" in note) == [
        f"{bench}: conv.json is empty or not a suite JSON (cut off at its time limit: conv.log ends '....'): "
        "not folded",
        f"{bench}: linear.json is empty or not a suite JSON (cut off at its time limit: linear.log ends "
        "'3 passed in 40.10s'): not folded",
        f"{bench}: linear_split.json is empty or not a suite JSON (no benchmark ran: linear_split.log ends "
        "'12 deselected in 1.02s'): not folded",
        f"{bench}: merge.json is empty or not a suite JSON (none of its benchmarks succeeded: merge.log ends "
        "'3 failed in 12.34s'): not folded"]


def test_a_session_whose_suites_all_came_back_empty_still_folds_its_profile_and_tests(folder, tmp_path, capsys):
    """The profile and the native test log are a session's main outputs: with every suite JSON empty the
    fold refused bench.tgz, and with it moved aside as advised there was "nothing to fold".  session.json
    names the folder now; folding the session again reuses it, a later session gets its own."""
    session, results = tmp_path / "session", tmp_path / "results"
    session.mkdir()
    _tgz(session / "bench.tgz", {"./linear.json": "",
                                 "./linear.log": "E   RuntimeError: no kernel\n1 failed in 3.20s\n",
                                 "./profile.txt": "queued section\n", "./session.json": _session_info()})
    (session / "tests-cuda.log").write_text("1562 passed\n")
    assert folder.main([str(session), "--results", str(results)]) == 0
    held = results / "gpu-h200-2026-11-29"
    assert sorted(p.name for p in held.iterdir()) == ["linear.log", "profile.txt", "session.json", "tests-cuda.log"]
    assert (held / "profile.txt").read_text() == "queued section\n"
    assert (held / "tests-cuda.log").read_text() == "1562 passed\n"
    assert "none of its benchmarks succeeded: linear.log ends '1 failed in 3.20s'" in capsys.readouterr().out
    assert folder.main([str(session), "--results", str(results)]) == 0
    later = tmp_path / "later"
    later.mkdir()
    _tgz(later / "bench.tgz", {"./profile.txt": "later\n",
                               "./session.json": _session_info(started="2026-11-29T18:00:00")})
    assert folder.main([str(later), "--results", str(results)]) == 0
    assert sorted(p.name for p in results.iterdir()) == ["gpu-h200-2026-11-29", "gpu-h200-2026-11-29-2"]
    assert (results / "gpu-h200-2026-11-29-2" / "profile.txt").read_text() == "later\n"


@pytest.mark.parametrize("files, culprit, device", [
    ({"./linear.json": json.dumps({"machine_info": {"dynrank": {"device": "cpu", "device_name": "Intel Xeon"}},
                                   "datetime": "2026-11-28T01:02:03", "benchmarks": []}),
      "./session.json": _session_info()}, "linear.json", "'cpu'"),
    ({"./profile.txt": "p\n", "./session.json": _session_info(device="cpu", name="cpu")}, "session.json", "'cpu'"),
    ({"./linear.json": json.dumps({"machine_info": {"dynrank": {"device_name": "NVIDIA H200"}},
                                   "datetime": "2026-11-28T01:02:03", "benchmarks": []})}, "linear.json", "None"),
])
def test_numbers_measured_off_the_gpu_are_refused(folder, tmp_path, files, culprit, device):
    """A session where torch saw no GPU ran on the CPU, and its numbers were filed as a GPU session's
    (gpu-cpu-intel-...): a suite JSON or session.json recording another device than CUDA is refused by
    name before anything is folded."""
    session, results = tmp_path / "session", tmp_path / "results"
    session.mkdir()
    _tgz(session / "bench.tgz", files)
    (session / "tests-cuda.log").write_text("1 passed\n")
    _tgz(session / "paper.tgz", _run_files("full-seed0", "full", 3, True))
    with pytest.raises(ValueError, match=re.escape(f"{session / 'bench.tgz'}: {culprit} records the device {device}, "
                                                   "expected cuda (torch saw no GPU: not a GPU session's numbers); "
                                                   "nothing was folded")):
        folder.fold(str(session), str(results), log=lambda _: None)
    assert list(results.iterdir()) == []
    machine = {"dynrank": {"device": "cuda:0", "device_name": "NVIDIA H100"}}
    suite = {"machine_info": machine, "datetime": "2026-11-28T01:02:03", "benchmarks": []}
    _tgz(session / "bench.tgz", {"./linear.json": json.dumps(suite)})          # a device index is CUDA too
    folder.fold(str(session), str(results), log=lambda _: None)
    assert (results / "gpu-h100-2026-11-28" / "linear.json").is_file()


def test_a_folder_without_archives_folds_nothing(folder, tmp_path, capsys):
    """An empty or wrong session folder is refused and the committed runs stay as they are (no
    tidying, no dropped checkpoints, no summary written again)."""
    results, wrong = tmp_path / "results", tmp_path / "not-the-session"
    for name, content in _run_files("full-seed0", "full", 3, True).items():
        path = results / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    checkpoint = results / "cifar10-resnet20" / "full-seed0" / "full" / "checkpoint.pt"
    checkpoint.write_bytes(b"state")
    wrong.mkdir()
    (wrong / "tests-cuda.log").write_text("1 passed\n")     # no archive beside it
    before = sorted(str(p.relative_to(results)) for p in results.rglob("*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        folder.main([str(wrong), "--results", str(results)])
    _argparse_error(capsys, exit_info, f"nothing to fold in {wrong} "
                                       "(expected bench.tgz, paper.tgz or paper-checkpoints.tgz)")
    assert sorted(str(p.relative_to(results)) for p in results.rglob("*")) == before
    assert checkpoint.read_bytes() == b"state"


def _tree(root):
    """Every file under ``root`` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("broken, content, problem", [
    ("lowrank/result.json", '{"schedule": "trunc', "not valid JSON (Unterminated string starting at: line 1 column "
                                                   "14 (char 13))"),
    ("lowrank/metrics.json", "", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    ("config.json", "[]", "expected an object, got list"),
])
def test_a_copy_with_a_broken_json_is_refused_before_the_committed_run_is_touched(folder, tmp_path, capsys, broken,
                                                                                  content, problem):
    """A copy's result.json cut short used to be copied over the committed run's files before it was read:
    the committed config and metrics replaced, the broken result.json in, no log line, no summary."""
    results, elsewhere = tmp_path / "results", tmp_path / "elsewhere"
    for root, epochs in ((results, 2), (elsewhere, 3)):
        for name, text in _run_files("lowrank-cp-seed0", "lowrank", epochs, True).items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    copy = elsewhere / "cifar10-resnet20" / "lowrank-cp-seed0"
    (copy / broken).write_text(content)
    output = tmp_path / "out.txt"
    output.write_text("epoch 3\n")
    before = _tree(results)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        folder.main(["--run", str(copy), "--output", str(output), "--note", "resumed", "--results", str(results)])
    _argparse_error(capsys, exit_info, f"{copy / broken}: {problem}; nothing was folded")
    assert _tree(results) == before


def test_a_new_run_with_a_broken_config_is_refused_by_name(folder, tmp_path):
    run = tmp_path / "elsewhere" / "dynamic-svd-I1-D2-seed0"
    for file, text in _run_files("dynamic-svd-I1-D2-seed0", "dynamic", 2, False).items():
        path = tmp_path / "elsewhere" / file.split("/", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (run / "config.json").write_text('{"schedule": ')
    output = tmp_path / "out.txt"
    output.write_text("epoch 1\n")
    results = tmp_path / "results"
    (results / "cifar10-resnet20").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(f"{run / 'config.json'}: not valid JSON (Expecting value: line 1 "
                                                   "column 14 (char 13)); nothing was folded")):
        folder.fold_run(str(run), str(results), str(output), "x", new=True)
    assert list((results / "cifar10-resnet20").iterdir()) == []


def _committed_run(results):
    for name, text in _run_files("lowrank-svd-seed0", "lowrank", 2, False).items():
        path = results / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (results / "cifar10-resnet20" / "lowrank-svd-seed0" / "lowrank" / "checkpoint.pt").write_bytes(b"epoch 2")
    return _tree(results)


def test_an_archive_cut_short_or_empty_is_refused_by_name(folder, tmp_path, capsys):
    """A truncated paper-checkpoints.tgz raised a bare EOFError, an empty bench.tgz a tarfile.ReadError
    listing every compression it tried, neither naming the archive."""
    results = tmp_path / "results"
    before = _committed_run(results)
    machine = {"dynrank": {"device_name": "NVIDIA H200", "device": "cuda"}}
    suite = json.dumps({"machine_info": machine, "datetime": "2026-11-28T01:02:03", "benchmarks": []})
    session = tmp_path / "session"
    session.mkdir()
    _tgz(session / "bench.tgz", {"./epoch.json": suite})
    _tgz(session / "paper.tgz", _run_files("lowrank-svd-seed0", "lowrank", 3, True))
    archive = session / "paper-checkpoints.tgz"
    _tgz(archive, {"cifar10-resnet20/lowrank-svd-seed0/lowrank/checkpoint.pt": bytes(range(256)) * 64})
    archive.write_bytes(archive.read_bytes()[:-40])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        folder.main([str(session), "--results", str(results)])
    _argparse_error(capsys, exit_info, f"{archive}: not a complete archive (Compressed file ended before the "
                                       "end-of-stream marker was reached); nothing was folded from it")
    assert _tree(results) == before                     # neither bench.tgz nor paper.tgz was folded
    for name in ("paper.tgz", "paper-checkpoints.tgz"):
        (session / name).unlink()
    (session / "bench.tgz").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{session / 'bench.tgz'}: not a complete archive (file could not "
                                                   "be opened successfully: - method gz: ReadError('empty file')")):
        folder.fold(str(session), str(results), log=lambda _: None)
    assert _tree(results) == before


def test_a_paper_archive_with_a_broken_run_json_is_refused_before_anything_is_folded(folder, tmp_path, capsys):
    """paper.tgz unpacks over the committed runs, and its result.json files are read only after that."""
    results = tmp_path / "results"
    before = _committed_run(results)
    machine = {"dynrank": {"device_name": "NVIDIA H200", "device": "cuda"}}
    session = tmp_path / "session"
    session.mkdir()
    _tgz(session / "bench.tgz", {"./epoch.json": json.dumps({"machine_info": machine, "benchmarks": [],
                                                             "datetime": "2026-11-28T01:02:03"})})
    files = _run_files("lowrank-svd-seed0", "lowrank", 3, True)
    files["cifar10-resnet20/lowrank-svd-seed0/lowrank/result.json"] = '{"history": ['
    _tgz(session / "paper.tgz", files)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        folder.main([str(session), "--results", str(results)])
    _argparse_error(capsys, exit_info, f"{session / 'paper.tgz'}: cifar10-resnet20/lowrank-svd-seed0/lowrank/"
                                       "result.json: not valid JSON (Expecting value: line 1 column 14 (char 13)); "
                                       "nothing was folded")
    assert _tree(results) == before


def test_a_run_stopped_in_its_first_epoch_keeps_its_checkpoint(folder, tmp_path):
    """A run stopped before its first epoch ended has config.json and <schedule>/checkpoint.pt, no
    metrics.json; paper-checkpoints.tgz brings the checkpoint, which the next session resumes from."""
    session, results = tmp_path / "session", tmp_path / "results"
    session.mkdir()
    run = "cifar10-resnet20/lowrank-svd-seed0"
    config = json.dumps(dict(schedule="lowrank", decomposition="svd", seed=0, epochs=150))
    _tgz(session / "paper.tgz", {f"{run}/config.json": config, f"{run}/lowrank/monitor.json": "{}",
                                 f"{run}/stray/monitor.json": "{}"})
    _tgz(session / "paper-checkpoints.tgz", {f"{run}/lowrank/checkpoint.pt": b"epoch 0, batch 137"})
    log = []
    assert folder.fold(str(session), str(results), log=log.append) == [str(results / "cifar10-resnet20")]
    assert _tree(results / run) == {"config.json": config.encode(), "lowrank/checkpoint.pt": b"epoch 0, batch 137"}
    assert "lowrank-svd-seed0: not committed, dropped lowrank/monitor.json, stray" in log


def test_run_refuses_the_committed_folder_itself(folder, tmp_path, capsys):
    """--run takes a copy: the committed folder itself (or a link to it) was copied onto itself, a SameFileError."""
    results = tmp_path / "results"
    before = _committed_run(results)
    committed = results / "cifar10-resnet20" / "lowrank-svd-seed0"
    link = tmp_path / "link" / "lowrank-svd-seed0"
    link.parent.mkdir()
    link.symlink_to(committed)
    output = tmp_path / "out.txt"
    output.write_text("epoch 3\n")
    for run in (committed, link):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            folder.main(["--run", str(run), "--output", str(output), "--note", "resumed", "--results", str(results)])
        _argparse_error(capsys, exit_info, f"{run}: this is the committed run itself; --run takes a copy of the run, "
                                           "trained further elsewhere")
        assert _tree(results) == before
