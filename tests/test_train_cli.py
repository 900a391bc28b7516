"""dynrank-train end to end at a tiny size: schedules, compare table, files, resume, data errors."""

import csv
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from dynrank.schedules import schedule_from_lr
from dynrank.train import cli, runs
from dynrank.train import config as train_config
from dynrank.train.corpus import TextData



# A GPT small enough that a whole 3-schedule job takes seconds.
TINY_GPT = ["--dim", "16", "--depth", "1", "--heads", "2", "--context", "16", "--batch-size", "4",
            "--steps-per-epoch", "3", "--warmup-steps", "0", "--metrics-every", "1", "--threads", "1"]


def _config(argv):
    return cli.config_from_args(cli.build_parser().parse_args(argv))


# -- configuration -------------------------------------------------------------------------------
def test_no_arguments_is_the_main_job():
    cfg = _config([])
    assert (cfg["model"], cfg["data"], cfg["schedule"]) == ("gpt", "stdlib", "compare")
    # The main job's (I, D) follow the paper's rule: half the epochs at full rank around the first decay.
    assert (cfg["inflate_epoch"], cfg["deflate_epoch"]) == schedule_from_lr(cfg["epochs"], cfg["milestones"])


@pytest.mark.parametrize("argv,schedule", [
    (["--epochs", "2"], "compare"), (["--model", "gpt"], "compare"), (["--data", "stdlib", "--seed", "1"], "compare"),
    (["--model", "resnet20"], "dynamic"), (["--data", "cifar100"], "dynamic"), (["--model", "resnet50"], "dynamic"),
    (["--epochs", "2", "--schedule", "dynamic"], "dynamic"),
])
def test_the_default_schedule_is_compare_on_stdlib_and_dynamic_for_the_vision_models(argv, schedule):
    """As the README's training command says: every run from the main job's settings compares."""
    assert _config(argv)["schedule"] == schedule


@pytest.mark.parametrize("preset,expected", [
    ("cifar10-resnet20", dict(model="resnet20", data="cifar10", batch_size=128, lr=0.1, epochs=150,
                              milestones=[100, 130], inflate_epoch=55, deflate_epoch=120, weight_decay=1e-4,
                              rank_ratio=0.5, label_smoothing=0.1)),
    ("cifar100-wrn28-10", dict(model="wrn28-10", data="cifar100", batch_size=128, lr=0.1, epochs=200,
                               milestones=[150, 180], inflate_epoch=80, deflate_epoch=170, weight_decay=5e-4,
                               rank_ratio=0.5, dropout=0.3)),
    ("tiny-imagenet-resnet50", dict(model="resnet50", data="tiny-imagenet", batch_size=64, lr=0.1, epochs=100,
                                    milestones=[70, 90], inflate_epoch=30, deflate_epoch=80, weight_decay=5e-4,
                                    rank_ratio=0.5)),
])
def test_presets_are_table_7(preset, expected):
    cfg = _config(["--preset", preset])
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["optimizer"] == "sgd" and cfg["schedule"] == "dynamic"


@pytest.mark.parametrize("argv,dropout", [
    (["--model", "resnet20", "--data", "cifar100"], None),        # the data set's row is the WRN's
    (["--preset", "cifar100-wrn28-10", "--model", "resnet20"], None),
    (["--model", "resnet50"], None),
    (["--model", "wrn28-10", "--data", "cifar10"], 0.3),          # build_model's default
    (["--model", "wrn28-10", "--dropout", "0.1"], 0.1),
    (["--preset", "cifar100-wrn28-10"], 0.3),
    ([], 0.0),
    (["--dropout", "0.2"], 0.2),
])
def test_the_config_records_the_dropout_the_model_trains_with(argv, dropout):
    from dynrank.train.loop import _build
    from dynrank.train.models import CausalSelfAttention
    cfg = _config(argv)
    assert cfg["dropout"] == dropout
    with torch.device("meta"):
        model = _build(cfg, 10)
    used = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    used |= {m.dropout for m in model.modules() if isinstance(m, CausalSelfAttention)}
    assert used == (set() if dropout is None else {dropout})


@pytest.mark.parametrize("schedule", ["full", "lowrank"])
def test_a_one_epoch_single_form_run_needs_no_decay(schedule):
    # No milestone fits in one epoch; a run without a switch needs none, a dynamic run does.
    cfg = _config(["--epochs", "1", "--schedule", schedule])
    assert cfg["epochs"] == 1 and cfg["milestones"] == [] and cfg["schedule"] == schedule
    with pytest.raises(ValueError, match="without LR milestones there is no decay to place the full-rank phase "
                                         "around; give --inflate-epoch and --deflate-epoch"):
        _config(["--epochs", "1", "--schedule", "dynamic"])


def test_flags_override_a_preset_and_the_schedule_follows():
    cfg = _config(["--preset", "cifar10-resnet20", "--epochs", "30", "--lr", "0.2"])
    assert cfg["lr"] == 0.2 and cfg["milestones"] == [20, 26]          # decays kept at 100/150, 130/150
    assert (cfg["inflate_epoch"], cfg["deflate_epoch"]) == schedule_from_lr(30, [20, 26])
    cfg = _config(["--preset", "cifar10-resnet20", "--milestones", "50,100"])     # Table 7's I/D sit around 100, 130
    assert (cfg["inflate_epoch"], cfg["deflate_epoch"]) == schedule_from_lr(150, [50, 100]) != (55, 120)
    cfg = _config(["--preset", "cifar10-resnet20", "--epochs", "4"])   # 100/150 and 130/150 of 4 both round to 3
    assert cfg["milestones"] == [3]
    cfg = _config(["--data", "cifar10", "--full-rank-fraction", "0.3"])
    assert (cfg["inflate_epoch"], cfg["deflate_epoch"]) == schedule_from_lr(150, [100, 130], full_rank_fraction=0.3)
    cfg = _config(["--model", "wrn28-10", "--inflate-epoch", "10", "--deflate-epoch", "20"])
    assert cfg["data"] == "cifar100" and (cfg["inflate_epoch"], cfg["deflate_epoch"]) == (10, 20)


def test_compile_mode_implies_compile():
    assert (_config([])["compile"], _config([])["compile_mode"]) == (False, "default")
    cfg = _config(["--compile-mode", "reduce-overhead"])
    assert cfg["compile"] is True and cfg["compile_mode"] == "reduce-overhead"
    assert _config(["--no-compile", "--compile-mode", "max-autotune"])["compile"] is False


def test_compile_mode_reaches_torch_compile_and_a_resume_may_change_it(tmp_path, monkeypatch, capsys):
    modes = []

    def fake_compile(model, mode=None):
        modes.append(mode)
        return model
    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "run"
    argv = ["--schedule", "full", "--epochs", "1", "--milestones", "", "--inflate-epoch", "0",
            "--deflate-epoch", "1", "--out", str(out)] + TINY_GPT
    assert cli.main(argv + ["--compile-mode", "reduce-overhead"]) == 0
    assert modes == ["reduce-overhead"]
    assert "compile=True, compile_mode=reduce-overhead" in capsys.readouterr().out
    os.remove(out / "full" / "result.json")          # as if stopped before the end
    assert cli.main(["--resume", str(out), "--compile-mode", "default", "--cache-dir", str(tmp_path / "c")]) == 0
    assert modes == ["reduce-overhead", None]
    assert "ignoring" not in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["cache_dir"] == str(tmp_path / "c")


def test_compile_mode_on_a_resume_compiles_a_run_begun_without_compile(tmp_path, monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: (modes.append(mode), model)[1])
    out = _finished_run(tmp_path / "run")
    os.remove(out / "full" / "result.json")          # as if stopped before the end
    assert modes == []
    assert cli.main(["--resume", str(out), "--compile-mode", "reduce-overhead"]) == 0
    assert modes == ["reduce-overhead"]
    config = json.loads((out / "config.json").read_text())
    assert (config["compile"], config["compile_mode"]) == (True, "reduce-overhead")


@pytest.mark.parametrize("argv,message", [
    (["--inflate-epoch", "5", "--deflate-epoch", "3"], "inflate epoch < deflate epoch"),
    (["--rank-ratio", "1.5"], "rank-ratio must be in"),
    (["--epochs", "10", "--milestones", "12"], "milestones must lie in"),
    (["--model", "gpt", "--data", "cifar10"], "cannot train on --data cifar10"),
    (["--epochs", "10", "--milestones", ""], "give --inflate-epoch and --deflate-epoch"),
])
def test_bad_settings_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--out", "unused"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# -- end to end -------------------------------------------------------------------------------
def test_compare_job_prints_table_and_writes_files(tmp_path, capsys):
    out = tmp_path / "job"
    code = cli.main(["--schedule", "compare", "--epochs", "3", "--milestones", "2", "--out", str(out)] + TINY_GPT)
    assert code == 0
    text = capsys.readouterr().out
    assert f"output in {out}" in text and f"outputs in {out}" in text
    table = (out / "compare.txt").read_text()
    assert table.strip() in text
    rows = table.splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["full", "lowrank", "dynamic"]
    assert "Comp. paper" in table and "val bpb" in table and "λ" in table
    assert "fixed low rank: bits per byte" in text and "factorized 4 of 5 layers" in text
    epochs = [line.split()[1] for line in text.splitlines() if line.startswith("epoch ")]
    assert epochs == ["1/3", "2/3", "3/3"] * 3
    results = json.loads((out / "compare.json").read_text())
    full, lowrank, dynamic = results
    assert lowrank["final"]["trainable_params"] < full["final"]["trainable_params"]
    assert dynamic["final"]["form"] == "full" and dynamic["history"][0]["form"] == "lowrank"
    for schedule in ("full", "lowrank", "dynamic"):
        folder = out / schedule
        for name in ("checkpoint.pt", "metrics.csv", "metrics.json", "model.pt", "result.json",
                     "monitor.json", "monitor.epochs.csv", "monitor.layers.csv"):
            assert (folder / name).is_file(), name
        assert len((folder / "metrics.csv").read_text().splitlines()) == 1 + 3
    assert (out / "lowrank" / "conversion.txt").read_text().count("FusedLowRankLinear") == 4
    pytest.importorskip("matplotlib")
    assert sorted(os.listdir(out / "plots")) == ["curves.png", "lambda_dynamic.png", "lambda_full.png",
                                                 "lambda_lowrank.png"]


def test_a_dynamic_run_that_never_deflates_says_so_in_the_table(tmp_path, capsys):
    # D = epochs: the run stays full to its end; the table read "D=None".
    out = tmp_path / "run"
    assert cli.main(["--schedule", "dynamic", "--epochs", "2", "--milestones", "", "--inflate-epoch", "1",
                     "--deflate-epoch", "2", "--out", str(out)] + TINY_GPT) == 0
    assert "dynamic (I=1, no deflate)" in (out / "compare.txt").read_text()


def test_a_full_run_alone_summarizes_lambda_over_the_layers_a_compare_job_factorizes(tmp_path):
    """The λ column covers the layers the converted runs factorize; a full run's row says the same
    with or without them in its job (alone it used to take every layer, the dense head included)."""
    from dynrank.train.loop import factorized_layers
    argv = ["--epochs", "2", "--milestones", "1", "--inflate-epoch", "0", "--deflate-epoch", "1"] + TINY_GPT
    assert cli.main(argv + ["--schedule", "compare", "--out", str(tmp_path / "compare")]) == 0
    assert cli.main(argv + ["--schedule", "full", "--out", str(tmp_path / "alone")]) == 0
    converted = json.loads((tmp_path / "compare" / "compare.json").read_text())[1]["converted_layers"]
    assert converted == factorized_layers(_config(argv), 256) and "head" not in converted and len(converted) == 4

    def full_row(folder):
        rows = (folder / "compare.txt").read_text().splitlines()
        return next(re.split(r"\s{2,}", row) for row in rows if row.startswith("full "))
    compared, alone = full_row(tmp_path / "compare"), full_row(tmp_path / "alone")
    assert compared[1] == alone[1]                      # the same run: the same val loss
    assert alone[-1].startswith("median ") and alone[-1] == compared[-1]


def test_the_lambda_column_names_the_epoch_it_measured_where_that_is_not_the_last(tmp_path):
    """With --metrics-every 2 and 4 epochs, the dynamic row showed epoch 3's full-rank λ as the run's,
    its final adapter weights never measured, without a word."""
    from dynrank.train.report import lambda_summary
    out = tmp_path / "run"
    assert cli.main(["--schedule", "dynamic", "--epochs", "4", "--milestones", "2", "--inflate-epoch", "1",
                     "--deflate-epoch", "3", "--out", str(out)] + TINY_GPT + ["--metrics-every", "2"]) == 0
    result = json.loads((out / "dynamic" / "result.json").read_text())
    records, layers = result["monitor_records"], result["converted_layers"]
    assert [(r["epoch"], r["form"], bool(r["layers"])) for r in records] == [
        (0, "lowrank", True), (1, "full", False), (2, "full", True), (3, "adapter", False)]
    at_epoch_3 = lambda_summary(records[:3], layers)             # epoch 3 of 3: the last, no epoch named
    assert at_epoch_3.startswith("median ") and "epoch" not in at_epoch_3
    row = (out / "compare.txt").read_text().splitlines()[2]
    assert row.endswith(f"  {at_epoch_3} (epoch 3 of 4)")
    every = [dict(r, layers=records[2]["layers"]) for r in records]     # the last epoch measured too
    assert lambda_summary(every, layers) == at_epoch_3


def test_compare_table_times_each_way_of_stepping_apart():
    from dynrank.train.report import compare_table

    def result(schedule, epochs, inflate=None, deflate=None):
        history = [dict(epoch=e, form=f, train_time=t, device=d, graphed_steps=g, val_loss=1.0, val_acc=0.5,
                        trainable_params=10) for e, (f, t, d, g) in enumerate(epochs)]
        return dict(schedule=schedule, history=history, final=history[-1], inflate_epoch=inflate,
                    deflate_epoch=deflate, params=dict(dense=100, converted=50, rank_ratio=0.5))
    full = result("full", [("full", 4.0, "GPU", 0), ("full", 6.0, "GPU", 0)])
    lowrank = result("lowrank", [("lowrank", 3.0, "GPU", 0), ("lowrank", 2.0, "GPU", 0)])
    # Dynamic, E = 5, I = 1, D = 3, resumed on the CPU for its last epoch: that epoch is timed apart
    # and the adapter form's time comes from its GPU epoch only.
    dynamic = result("dynamic", [("lowrank", 2.0, "GPU", 0), ("full", 4.0, "GPU", 0), ("full", 6.0, "GPU", 0),
                                 ("adapter", 7.0, "GPU", 0), ("adapter", 90.0, "cpu", 0)], 1, 3)
    rows = {line.split()[0]: line for line in compare_table([full, lowrank, dynamic], kind="vision").splitlines()}
    assert "full 5.00" in rows["full"] and " 1.000 " in rows["full"]
    assert "lowrank 2.50" in rows["lowrank"] and f" {2.5 / 5.0:.3f} " in rows["lowrank"]
    assert "lowrank 2.00, full 5.00, adapter 7.00, adapter on cpu 90.00" in rows["dynamic"]
    assert f" {(1 * 2.0 + 2 * 5.0 + 2 * 7.0) / (5 * 5.0):.3f} " in rows["dynamic"]
    assert "own full-rank epochs" not in compare_table([full, lowrank, dynamic], kind="vision")
    # A dynamic run alone is measured against its own full-rank epochs, and the table says so.
    alone = compare_table([dynamic], kind="vision").splitlines()
    assert f" {(1 * 2.0 + 2 * 5.0 + 2 * 7.0) / (5 * 5.0):.3f} " in alone[2]
    assert alone[3] == "Comp. measured: against this run's own full-rank epochs (no full-rank run in this job)"
    # Graphed epochs are labelled, and against an eager-only full run there is no measured Comp.
    graphed = result("lowrank", [("lowrank", 1.0, "GPU", 300), ("lowrank", 1.0, "GPU", 300)])
    row = compare_table([full, graphed], kind="vision").splitlines()[-1]
    assert "lowrank (graphs) 1.00" in row and " - " in row


def _write_tiny_cifar10(folder, per_batch=8, test=8):
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = test if name == "test_batch" else per_batch
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)


@pytest.mark.parametrize("decomposition", ["svd", "tucker", "cp", "tkd-cpd"])
def test_vision_dynamic_run_on_pickled_cifar(tmp_path, capsys, decomposition):
    _write_tiny_cifar10(str(tmp_path / "data" / "cifar-10-batches-py"))
    out = tmp_path / "run"
    code = cli.main(["--preset", "cifar10-resnet20", "--width", "0.5", "--data-dir", str(tmp_path / "data"),
                     "--epochs", "3", "--inflate-epoch", "1", "--deflate-epoch", "2", "--batch-size", "8",
                     "--decomposition", decomposition,
                     "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    history = json.loads((out / "dynamic" / "metrics.json").read_text())
    assert [h["form"] for h in history] == ["lowrank", "full", "adapter"]
    assert history[0]["trainable_params"] == history[2]["trainable_params"] < history[1]["trainable_params"]
    assert "val acc" in text and "dynamic (I=1, D=2)" in text and f"ρ=0.5, {decomposition}" in text


def test_vision_run_trains_channels_last_on_the_cpu_and_resumes_after_a_switch_to_the_same_state(
        tmp_path, monkeypatch):
    from dynrank.train.augment import VisionData
    _write_tiny_cifar10(str(tmp_path / "data" / "cifar-10-batches-py"))
    # Width 0.5: its narrowest strided 1×1 conv has 8 input channels, enough to train channels-last.
    argv = ["--preset", "cifar10-resnet20", "--width", "0.5", "--data-dir", str(tmp_path / "data"), "--epochs", "3",
            "--inflate-epoch", "1", "--deflate-epoch", "2", "--batch-size", "8", "--decomposition", "tucker",
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    assert cli.main(argv + ["--out", str(tmp_path / "straight")]) == 0
    original = _ctrl_c_after(monkeypatch, 2, 1, VisionData)      # Ctrl-C in the adapter epoch
    out = tmp_path / "interrupted"
    assert cli.main(argv + ["--out", str(out)]) == 130
    monkeypatch.setattr(VisionData, "train_batches", original)
    assert cli.main(["--resume", str(out)]) == 0
    # The restored adapters train channels-last as the uninterrupted run's did: the same end state,
    # and the same layout (a saved tensor keeps its strides).
    straight, resumed = _state(tmp_path / "straight"), _state(out)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    layout = lambda state: {k: v.is_contiguous(memory_format=torch.channels_last) for k, v in state.items()
                            if v.dim() == 4}
    assert all(layout(straight).values()) and layout(resumed) == layout(straight)
    history = json.loads((out / "dynamic" / "metrics.json").read_text())
    assert [r["form"] for r in history] == ["lowrank", "full", "adapter"]
    assert {r["device"] for r in history} == {"cpu (1 thread, channels-last)"}
    assert json.loads((out / "config.json").read_text())["channels_last"] is True


@pytest.mark.parametrize("model,width,expected", [("resnet20", 1.0, True), ("resnet20", 0.5, True),
                                                  ("resnet20", 0.25, False), ("wrn28-10", 0.125, True),
                                                  ("resnet50", 0.125, True), ("gpt", 1.0, False)])
def test_narrow_conv_nets_train_nchw_on_the_cpu(model, width, expected, restore_threads):
    from dynrank.train.models import build_model, narrowest_strided_pointwise
    # ResNet20 at width 0.25 has a 4-channel stride-2 projection shortcut, whose channels-last backward
    # crashed torch 2.13's CPU build on an AVX2 host; the others' narrowest have 8 channels or more.
    with torch.device("meta"):
        narrowest = narrowest_strided_pointwise(build_model(model, width=width))
    assert narrowest == {("resnet20", 1.0): 16, ("resnet20", 0.5): 8, ("resnet20", 0.25): 4,
                         ("wrn28-10", 0.125): 20, ("resnet50", 0.125): 32, ("gpt", 1.0): None}[model, width]
    cfg = dict(model=model, width=width, device="cpu", amp=None, threads=1, cuda_graphs=False, compile=False,
               optimizer="sgd")
    assert cli._resolve_device(cfg)["channels_last"] is expected
    from dynrank.train.loop import trains_channels_last
    assert trains_channels_last(model, "cpu", width) is expected
    assert trains_channels_last(model, "cuda:0", width) is (model != "gpt")   # the rule is the CPU's only


def test_a_narrow_conv_net_says_it_trains_nchw_on_the_cpu(tmp_path, capsys, restore_threads):
    _write_tiny_cifar10(str(tmp_path / "data" / "cifar-10-batches-py"))
    out = tmp_path / "run"
    assert cli.main(["--preset", "cifar10-resnet20", "--width", "0.25", "--data-dir", str(tmp_path / "data"),
                     "--schedule", "full", "--epochs", "2", "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"),
                     "--threads", "1", "--out", str(out)]) == 0
    assert "note: training NCHW, not channels-last" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["channels_last"] is False
    state = _state(out, "full")
    assert not any(v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous()
                   for v in state.values() if v.dim() == 4)
    assert {r["device"] for r in json.loads((out / "full" / "metrics.json").read_text())} == {"cpu (1 thread)"}


def test_missing_data_gives_the_clear_message(tmp_path, capsys):
    code = cli.main(["--data", "cifar10", "--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "cifar-10-batches-py" in err and "--download" in err


@pytest.mark.parametrize("wrong", ["absent", "a-file", "unreadable"])
def test_data_that_fails_to_load_leaves_out_free_for_the_corrected_command(tmp_path, capsys, monkeypatch,
                                                                          wrong, restore_threads):
    """The data set is loaded before --out is claimed: a wrong --data-dir leaves no config.json there, so
    the same command with the right --data-dir runs (before, --out then 'held a run', and a --resume
    ignored the new --data-dir)."""
    from dynrank.train import data as data_module
    (tmp_path / "a-file").write_text("not a folder")
    _write_tiny_cifar10(str(tmp_path / "data" / "cifar-10-batches-py"))
    load_vision = data_module.load_vision
    locked = str(tmp_path / "unreadable" / "data_batch_1")

    def permission_denied(name, root, cache_dir=None):     # as for a file its owner alone may read
        if root.endswith("unreadable"):
            raise PermissionError(13, "Permission denied", locked)
        return load_vision(name, root, cache_dir)
    monkeypatch.setattr(data_module, "load_vision", permission_denied)
    jobs = []

    def no_training(cfg, out_dir, resume=False, log=print, data=None):    # run_job, stopped before training
        jobs.append(data)
        if data is None:
            cli.load_data(cfg, log)
        return "", [], []
    monkeypatch.setattr(cli, "run_job", no_training)
    out = tmp_path / "run"
    argv = ["--model", "resnet20", "--width", "0.5", "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"),
            "--threads", "1", "--out", str(out)]
    assert cli.main(argv + ["--data-dir", str(tmp_path / wrong)]) == 2
    err = capsys.readouterr().err
    assert {"absent": f"data folder {tmp_path / wrong} does not exist.\ncifar10 not found",
            "a-file": f"data folder {tmp_path / wrong} is not a directory.\ncifar10 not found",
            "unreadable": f"could not load cifar10: [Errno 13] Permission denied: '{locked}'"}[wrong] in err
    assert "Traceback" not in err
    assert not out.exists()
    assert cli.main(argv + ["--data-dir", str(tmp_path / "data")]) == 0
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(tmp_path / "data")
    assert jobs[-1].kind == "vision"            # the data loaded before the claim, not loaded again


def _state(folder, schedule="dynamic"):
    return torch.load(os.path.join(folder, schedule, "model.pt"))


def _ctrl_c_after(monkeypatch, epoch, step, data=TextData):
    """Make ``data.train_batches`` raise SIGINT after batch ``step`` of ``epoch``; returns the original."""
    original = data.train_batches

    def interrupted(self, at_epoch, start=0):
        for at_step, batch in enumerate(original(self, at_epoch, start), start):
            yield batch
            if (at_epoch, at_step) == (epoch, step):
                signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(data, "train_batches", interrupted)
    return original


def test_interrupted_run_resumes_to_the_same_final_state(tmp_path, monkeypatch, capsys):
    argv = ["--schedule", "dynamic", "--epochs", "4", "--milestones", "2", "--inflate-epoch", "1",
            "--deflate-epoch", "3", "--dropout", "0.1"] + TINY_GPT
    assert cli.main(argv + ["--out", str(tmp_path / "straight")]) == 0

    original = _ctrl_c_after(monkeypatch, 1, 0)          # Ctrl-C during the full-rank phase
    out = tmp_path / "interrupted"
    assert cli.main(argv + ["--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"dynrank-train --resume {out}" in err
    checkpoint = torch.load(out / "dynamic" / "checkpoint.pt", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 2)   # stopped after the batch in flight
    monkeypatch.setattr(TextData, "train_batches", original)

    assert cli.main(["--resume", str(out)]) == 0
    straight, resumed = _state(tmp_path / "straight"), _state(out)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    a = json.loads((tmp_path / "straight" / "dynamic" / "metrics.json").read_text())
    b = json.loads((out / "dynamic" / "metrics.json").read_text())
    assert [(r["form"], r["train_loss"], r["val_loss"]) for r in a] == [(r["form"], r["train_loss"], r["val_loss"])
                                                                       for r in b]
    # The RankMonitor goes on from the checkpoint's: the epoch before the Ctrl-C and the switch into it
    # stay on record, in result.json and monitor.json alike (the clocks aside).
    from dynrank import RankMonitor
    untimed = lambda records: [{k: v for k, v in r.items() if k not in ("wall_seconds", "metrics_seconds")}
                               for r in records]
    monitors = {}
    for run in (tmp_path / "straight", out):
        records = json.loads((run / "dynamic" / "result.json").read_text())["monitor_records"]
        monitors[run] = RankMonitor.load(str(run / "dynamic" / "monitor.json"))
        assert [r["epoch"] for r in records] == [r["epoch"] for r in monitors[run].records] == [0, 1, 2, 3]
        assert untimed(records) == untimed(monitors[run].records)
    straight_monitor, resumed_monitor = monitors[tmp_path / "straight"], monitors[out]
    assert untimed(resumed_monitor.records) == untimed(straight_monitor.records)
    assert [(s["epoch"], s["kind"]) for s in resumed_monitor.switches] == [(1, "inflate"), (3, "deflate")]
    assert resumed_monitor.switches == straight_monitor.switches
    # A finished run is not trained again.
    assert cli.main(["--resume", str(out)]) == 0
    assert "already finished" in capsys.readouterr().out


@pytest.mark.parametrize("schedule", ["lowrank", "full"])
def test_an_interrupted_single_form_run_resumes_to_the_same_final_state(tmp_path, monkeypatch, schedule):
    argv = ["--schedule", schedule, "--epochs", "3", "--milestones", "2"] + TINY_GPT
    assert cli.main(argv + ["--out", str(tmp_path / "straight")]) == 0
    original = _ctrl_c_after(monkeypatch, 1, 0)
    out = tmp_path / "interrupted"
    assert cli.main(argv + ["--out", str(out)]) == 130
    monkeypatch.setattr(TextData, "train_batches", original)
    assert cli.main(["--resume", str(out)]) == 0
    straight, resumed = _state(tmp_path / "straight", schedule), _state(out, schedule)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_resumed_epoch_counts_the_training_time_before_the_stop(tmp_path, monkeypatch):
    original = _ctrl_c_after(monkeypatch, 1, 0)
    out = tmp_path / "run"
    assert cli.main(["--schedule", "full", "--epochs", "2", "--milestones", "", "--inflate-epoch", "0",
                     "--deflate-epoch", "2", *TINY_GPT, "--out", str(out)]) == 130
    monkeypatch.setattr(TextData, "train_batches", original)
    path = out / "full" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["partial"]["time"] = 1000.0           # as if the first half of the epoch had run for that long
    torch.save(checkpoint, path)
    assert cli.main(["--resume", str(out)]) == 0
    history = json.loads((out / "full" / "metrics.json").read_text())
    assert history[0]["train_time"] < 1000.0 <= history[1]["train_time"]


@pytest.mark.filterwarnings("ignore:layers .* have NaN or infinite weights:RuntimeWarning")
@pytest.mark.parametrize("schedule", ["dynamic", "compare"])
def test_a_dynamic_run_that_diverges_is_a_one_line_error_and_keeps_its_checkpoint(tmp_path, capsys, schedule,
                                                                                restore_threads):
    """The scheduler refuses to switch NaN weights (a ValueError): at lr 1e6 the inflate ended the run, and
    every --resume, in a traceback; the full and lowrank runs of a compare job finish with NaN."""
    out = tmp_path / "run"
    argv = TINY_GPT + ["--schedule", schedule, "--epochs", "3", "--milestones", "2", "--inflate-epoch", "1",
                       "--deflate-epoch", "2", "--lr", "1e6", "--out", str(out)]
    message = re.compile(r"dynrank-train: error: the dynamic run diverged by epoch 1 \(train loss nan\): layer "
                         r"'blocks\.0\.[a-z.]+' has non-finite values in [A-Za-z]+; it cannot switch forms at "
                         r"epoch 2\. Start a new run \(--out\) with a lower --lr than 1e\+06; a --resume stops "
                         r"here again\n")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message.search(err) and "Traceback" not in err
    checkpoint = (out / "dynamic" / "checkpoint.pt").read_bytes()
    assert torch.load(out / "dynamic" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert cli.main(["--resume", str(out)]) == 2
    assert message.search(capsys.readouterr().err)
    assert (out / "dynamic" / "checkpoint.pt").read_bytes() == checkpoint
    if schedule == "compare":           # the dense and fixed low-rank runs finished, with NaN
        for finished in ("full", "lowrank"):
            result = json.loads((out / finished / "result.json").read_text())
            assert np.isnan(result["final"]["train_loss"])


def test_only_a_layer_due_to_switch_with_nan_weights_is_a_divergence():
    from dynrank import DynamicRankScheduler, convert_model
    from dynrank.train.loop import Diverged, _switch

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
        convert_model(model, rank_ratio=0.5, form="lowrank", keep_last=False)
        return model, DynamicRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, 2, epochs=3)

    cfg = dict(lr=0.1)
    model, scheduler = build()
    assert [c[0] for c in _switch(scheduler, 1, "dynamic", cfg, [])] == ["0", "1"]     # finite: it switches
    model, scheduler = build()
    with torch.no_grad():
        model[1].A[0, 0] = float("nan")
    assert _switch(scheduler, 0, "dynamic", cfg, []) == []          # no layer switches at epoch 0
    with pytest.raises(Diverged, match=r"^the dynamic run diverged: layer '1' has non-finite values in A; it "
                                       r"cannot switch forms at epoch 2\. Start a new run \(--out\) with a "
                                       r"lower --lr than 0\.1; a --resume stops here again$"):
        _switch(scheduler, 1, "dynamic", cfg, [])
    assert scheduler.forms() == {"0": "lowrank", "1": "lowrank"}


@pytest.mark.parametrize("saved", ["named", "older"])
def test_a_run_resumed_elsewhere_names_the_device_of_each_epoch(tmp_path, monkeypatch, saved, capsys):
    original = _ctrl_c_after(monkeypatch, 1, 0)
    out = tmp_path / "run"
    assert cli.main(["--schedule", "lowrank", "--epochs", "3", *TINY_GPT, "--out", str(out)]) == 130
    monkeypatch.setattr(TextData, "train_batches", original)
    path = out / "lowrank" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=False)
    cpu = "cpu (1 thread)"                                              # TINY_GPT's --threads 1
    assert checkpoint["device"] == cpu and checkpoint["partial"]["device"] == cpu
    assert [r["device"] for r in checkpoint["history"]] == [cpu]
    # As if the first epoch and a half had run on a GPU: a checkpoint naming it, or an older one
    # that names no device, whose records then take the device of its saved settings.
    if saved == "named":
        checkpoint["device"] = checkpoint["partial"]["device"] = checkpoint["history"][0]["device"] = "GPU A"
        before = "GPU A"
    else:
        del checkpoint["device"], checkpoint["partial"]["device"], checkpoint["history"][0]["device"]
        checkpoint["config"]["device"] = before = "cuda"
    torch.save(checkpoint, path)
    config = json.loads((out / "config.json").read_text())
    assert "resumes" not in config
    config.update(device="cuda", amp=True, channels_last=True)        # as the run began
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert cli.main(["--resume", str(out), "--device", "cpu"]) == 0
    # The GPU's AMP default gives way to the CPU's, with a note.
    assert ("note: the run trained with --amp on cuda; on cpu it goes on with that device's default, --no-amp "
            "(give --amp to keep the run's)\n") in capsys.readouterr().out
    history = json.loads((out / "lowrank" / "metrics.json").read_text())
    assert [r["device"] for r in history] == [before, f"{before}+{cpu}", cpu]
    (resume,) = json.loads((out / "config.json").read_text())["resumes"]
    assert resume["changed"] == {"device": ["cuda", "cpu"], "amp": [True, False], "channels_last": [True, False]}


def test_metrics_csv_quotes_a_device_name_with_a_comma(tmp_path):
    from dynrank.train.loop import write_metrics
    history = [dict(epoch=0, form="full", lr=0.1, val_bpb=None, device="cpu (1 thread, bf16)"),
               dict(epoch=1, form="full", lr=0.01, val_bpb=2.5, device="cpu (2 threads, channels-last, bf16)")]
    write_metrics(str(tmp_path), history)
    with open(tmp_path / "metrics.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["epoch", "form", "lr", "val_bpb", "device"],
                    ["0", "full", "0.1", "", "cpu (1 thread, bf16)"],
                    ["1", "full", "0.01", "2.5", "cpu (2 threads, channels-last, bf16)"]]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cpu_epochs_name_their_thread_count_and_are_timed_apart(tmp_path, monkeypatch, restore_threads):
    from dynrank.train.report import epoch_seconds, epoch_way
    original = _ctrl_c_after(monkeypatch, 1, 0)
    out = tmp_path / "run"
    assert cli.main(["--schedule", "lowrank", "--epochs", "3", *TINY_GPT, "--out", str(out)]) == 130
    monkeypatch.setattr(TextData, "train_batches", original)
    assert cli.main(["--resume", str(out), "--threads", "2"]) == 0
    history = json.loads((out / "lowrank" / "metrics.json").read_text())
    one, two = "cpu (1 thread)", "cpu (2 threads)"
    # The epoch begun with one thread and finished with two names both: its time is neither's.
    assert [r["device"] for r in history] == [one, f"{one}+{two}", two]
    times = epoch_seconds(history, epoch_way)
    assert sorted(times) == sorted([(one, False), (f"{one}+{two}", False), (two, False)])
    assert [len(v) for v in times.values()] == [1, 1, 1]


def test_cpu_epochs_under_bf16_autocast_say_so(tmp_path, restore_threads, monkeypatch, capsys):
    from dynrank.train import loop
    from dynrank.train.loop import device_name
    out = tmp_path / "run"
    monkeypatch.setattr(loop, "cpu_bf16_native", lambda: False)    # an AVX2-only host: bf16 is emulated
    assert cli.main(["--schedule", "lowrank", "--epochs", "2", *TINY_GPT, "--amp", "--out", str(out)]) == 0
    assert "--amp on a CPU without native bf16" in capsys.readouterr().out
    monkeypatch.setattr(loop, "cpu_bf16_native", lambda: True)
    assert cli.main(["--schedule", "lowrank", "--epochs", "2", *TINY_GPT, "--amp", "--out", str(tmp_path / "b")]) == 0
    assert "without native bf16" not in capsys.readouterr().out
    history = json.loads((out / "lowrank" / "metrics.json").read_text())
    assert [r["device"] for r in history] == ["cpu (1 thread, bf16)"] * 2
    with open(out / "lowrank" / "metrics.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["device"], None in r) for r in rows] == [("cpu (1 thread, bf16)", False)] * 2
    assert json.loads((out / "config.json").read_text())["amp"] is True
    assert device_name("cpu", 2, channels_last=True, bf16=True) == "cpu (2 threads, channels-last, bf16)"
    assert device_name("cpu", 2) == "cpu (2 threads)"


def test_gpu_epochs_without_bf16_autocast_say_so(monkeypatch):
    from dynrank.train.loop import device_name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    # bf16 autocast is the GPU default: the records of every GPU run so far name the GPU alone.
    assert device_name("cuda", channels_last=True, bf16=True) == "Test GPU"
    assert device_name("cuda") == "Test GPU"
    assert device_name("cuda", channels_last=True, bf16=False) == "Test GPU (fp32)"


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "dynrank.train", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0
    for flag in ("--preset", "--schedule", "--rank-ratio", "--full-rank-fraction", "--resume", "--download"):
        assert flag in done.stdout


def test_the_help_gives_the_gpts_default_steps_per_epoch():
    # It said "one pass" (844 batches at the main job's size); the GPT takes the main job's 120.
    help_text = " ".join(cli.build_parser().format_help().split())
    steps = _config(["--model", "gpt"])["steps_per_epoch"]
    assert steps == cli.MAIN_JOB["steps_per_epoch"] == 120
    assert f"batches per epoch, ≥ 1 (default: {steps}, the main job's)" in help_text


def test_a_source_checkout_finds_its_kernels_without_an_install():
    # As `python -m ...` from the checkout with nothing installed: install-time finders removed.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            f"sys.path.insert(0, {root!r}); import pkgutil, dynrank, dynrank.kernels.merge; "
            "print(dynrank.__file__); print(dynrank.kernels.__file__); print(*dynrank.__path__, sep='|'); "
            "print(*sorted({m.name.split('.')[1] for m in pkgutil.walk_packages(dynrank.__path__, 'dynrank.')}), "
            "sep='|')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    package, kernels, path, walked = done.stdout.split()
    assert package == os.path.join(root, "dynrank", "__init__.py")
    assert kernels == os.path.join(root, "kernels", "__init__.py")
    # The package's path is its own folder only: walking it finds dynrank's modules, not the checkout's.
    assert path == os.path.join(root, "dynrank")
    assert {"linear", "scheduler", "train"} <= set(walked.split("|"))
    assert not {"dynrank", "tests", "benchmarks", "setup", "kernels"} & set(walked.split("|"))


def test_progress_line_draws_both_bars_and_calls_extra_only_on_redraw(monkeypatch):
    import io

    from dynrank.train.progress import ProgressLine, format_seconds
    monkeypatch.setenv("COLUMNS", "200")        # a terminal wide enough for the whole line
    stream = io.StringIO()
    calls = []
    line = ProgressLine(epochs=2, stream=stream, enabled=True, interval=3600.0)
    line.start_epoch(1, batches=4)
    for batch in range(4):
        line.update(batch, extra=lambda: calls.append(1) or "loss 1.0")
    # The first batch and the last one are drawn; the interval suppresses the two in between.
    assert len(calls) == 2
    last = stream.getvalue().split("\r")[-1]
    assert last.startswith("epoch 2/2 [" + "█" * 10 + "] batch 4/4 [" + "█" * 20 + "]")
    assert "loss 1.0" in last
    line.clear()
    assert stream.getvalue().endswith("\r")
    silent = io.StringIO()
    ProgressLine(epochs=1, stream=silent).update(0)        # a StringIO is no terminal: nothing drawn
    assert silent.getvalue() == "" and format_seconds(3725) == "1:02:05"


_CIFAR_LINES = {       # the CIFAR-10 preset's line at batch 120 of 390 in the last epoch, by terminal width
    200: "epoch 150/150 [██████████] batch 120/390 [██████··············] 8.0 it/s loss 1.2345 eta 0:34",
    90: "epoch 150/150 batch 120/390 [██████··············] 8.0 it/s loss 1.2345 eta 0:34",
    80: "epoch 150/150 batch 120/390 [██████··············] loss 1.2345 eta 0:34",
    60: "epoch 150/150 batch 120/390 loss 1.2345 eta 0:34",
    40: "epoch 150/150 batch 120/390 loss 1.2345",
}


def _draw_cifar_line(monkeypatch, stream):
    """What a ProgressLine draws on ``stream`` for the line of :data:`_CIFAR_LINES`."""
    from dynrank.train import progress
    clock = iter([100.0, 115.0])            # start_epoch, then 120 batches in 15 s: 8.0 it/s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    line = progress.ProgressLine(epochs=150, stream=stream, enabled=True, interval=0.0)
    line.start_epoch(149, batches=390)
    line.update(119, extra=lambda: "loss 1.2345")
    return stream.getvalue()


@pytest.mark.parametrize("columns,expected", _CIFAR_LINES.items())
def test_progress_line_fits_a_narrow_terminal(monkeypatch, columns, expected):
    """The CIFAR-10 preset's line was 97 columns: on an 80-column terminal it wrapped, and as "\\r" goes back
    only to the start of the last row, every redraw left a stale row.  The line now stays one column
    short of the width, leaving out the epoch bar first, then the rate, then the batch bar."""
    import io

    monkeypatch.setenv("COLUMNS", str(columns))      # read before the stream's own terminal size
    assert _draw_cifar_line(monkeypatch, io.StringIO()) == "\r" + expected and len(expected) <= columns - 1


def test_progress_line_measures_the_terminal_it_draws_on(monkeypatch):
    """The width was read from stdout (shutil.get_terminal_size): with stdout piped (dynrank-train | tee log)
    the line drawn on a 200-column terminal's stderr was cut to 80 columns.  A stream with no terminal
    size (no fileno, or not a terminal) still gets 80."""
    import io

    class OnFd(io.StringIO):
        def __init__(self, fd):
            super().__init__()
            self.fd = fd

        def fileno(self):
            return self.fd

    def terminal_size(fd):
        if fd != 2:                                  # stdout (1) is a pipe
            raise OSError("not a terminal")
        return os.terminal_size((200, 50))
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(os, "get_terminal_size", terminal_size)
    assert _draw_cifar_line(monkeypatch, OnFd(2)) == "\r" + _CIFAR_LINES[200]
    assert _draw_cifar_line(monkeypatch, OnFd(1)) == "\r" + _CIFAR_LINES[80]
    assert _draw_cifar_line(monkeypatch, io.StringIO()) == "\r" + _CIFAR_LINES[80]


# -- run state: output folders, resumes, damaged files ----------------------------------------------
_TINY_RUN = ["--schedule", "full", "--epochs", "2", "--milestones", "1", "--dim", "16", "--depth", "1", "--heads", "2",
             "--context", "16", "--batch-size", "4", "--steps-per-epoch", "2", "--warmup-steps", "0"]


def _finished_run(folder, *extra):
    assert cli.main(_TINY_RUN + ["--out", str(folder), *extra]) == 0
    return folder


def _exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    return err


@pytest.mark.parametrize("holds", ["config.json", "dynamic/checkpoint.pt"])
def test_out_refuses_a_folder_that_holds_a_run(tmp_path, capsys, holds):
    out = tmp_path / "run"
    (out / os.path.dirname(holds)).mkdir(parents=True, exist_ok=True)
    (out / holds).write_bytes(b"precious")
    err = _exit_2(_TINY_RUN + ["--out", str(out)], capsys)
    assert f"--out {out} already holds a run" in err and f"--resume {out}" in err
    assert (out / holds).read_bytes() == b"precious"


@pytest.mark.parametrize("out,message", [
    ("a-file", "--out {tmp}/a-file is a file, not a directory; choose another --out"),
    ("a-file/run", "--out {tmp}/a-file/run cannot be made: {tmp}/a-file is a file, not a directory"),
    (None, "the default output folder runs/<timestamp> cannot be made: {tmp}/runs is a file, not a directory; "
           "give --out"),
])
def test_an_out_that_cannot_be_a_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch, out, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ("runs" if out is None else "a-file")).write_text("precious")

    def no_work(*args, **kwargs):
        raise AssertionError("the data set was loaded")
    monkeypatch.setattr(cli, "load_data", no_work)
    err = _exit_2(_TINY_RUN + (["--out", str(tmp_path / out)] if out else []), capsys)
    assert message.format(tmp=tmp_path) in err
    assert sorted(os.listdir(tmp_path)) == ["runs" if out is None else "a-file"]
    assert (tmp_path / ("runs" if out is None else "a-file")).read_text() == "precious"


def test_out_is_claimed_exclusively(tmp_path, capsys, monkeypatch):
    """Two runs started together on one --out both pass the holds-a-run check; the one that comes second
    to creating config.json stops before writing anything."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_bytes(b"the other run's")
    monkeypatch.setattr(cli, "_holds_run", lambda folder: None)     # the check ran before the other run's claim
    err = _exit_2(_TINY_RUN + ["--out", str(out)], capsys)
    assert f"--out {out} was just taken by another run" in err
    assert (out / "config.json").read_bytes() == b"the other run's" and os.listdir(out) == ["config.json"]


def test_out_is_released_when_its_config_cannot_be_written(tmp_path, capsys, monkeypatch):
    """A run that claims --out and then fails to write config.json (a full disk, say) leaves no empty
    config.json behind: a retry on the same --out runs, instead of being told the folder holds a run that
    --resume then calls damaged."""
    from dynrank.train import loop
    out = tmp_path / "run"
    write_json = loop.write_json

    def full_disk(path, obj):
        if os.path.basename(path) == "config.json":
            raise OSError(28, "No space left on device")
        write_json(path, obj)

    monkeypatch.setattr(loop, "write_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        cli.main(_TINY_RUN + ["--out", str(out)])
    assert not (out / "config.json").exists() and runs._holds_run(str(out)) is None
    monkeypatch.setattr(loop, "write_json", write_json)
    assert cli.main(_TINY_RUN + ["--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["schedule"] == "full"


@pytest.mark.parametrize("given_out", [True, False])
def test_ctrl_c_while_the_config_is_written_offers_no_resume(tmp_path, capsys, monkeypatch, given_out):
    """Nothing can be resumed before config.json is written: the message must not offer --resume, and
    the folder the run made (or claimed) is left as a retry can use it."""
    from dynrank.train import loop
    monkeypatch.chdir(tmp_path)
    write_json = loop.write_json

    def ctrl_c(path, obj):
        if os.path.basename(path) == "config.json":
            raise KeyboardInterrupt
        write_json(path, obj)

    monkeypatch.setattr(loop, "write_json", ctrl_c)
    out = tmp_path / "run"
    assert cli.main(_TINY_RUN + (["--out", str(out)] if given_out else [])) == 130
    err = capsys.readouterr().err
    assert "dynrank-train: aborted" in err and "--resume" not in err
    if given_out:
        assert os.listdir(out) == [] and runs._holds_run(str(out)) is None
    else:
        assert os.listdir(tmp_path / "runs") == []


def test_default_run_folders_are_unique_within_a_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs.time, "strftime", lambda fmt, *a: "20250101-120000")
    folders = [runs._new_run_dir() for _ in range(3)]
    assert folders == [os.path.join("runs", "20250101-120000" + s) for s in ("", "-2", "-3")]
    assert all(os.path.isdir(f) and not os.listdir(f) for f in folders)


def test_resume_refuses_a_config_edited_against_the_checkpoint(tmp_path, capsys):
    out = _finished_run(tmp_path / "run")
    os.remove(out / "full" / "result.json")                       # as if interrupted
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "lr": 1.0, "epochs": 5}))
    err = _exit_2(["--resume", str(out)], capsys)
    assert "config.json differs from the settings" in err and "in epochs, lr;" in err
    # What a resume may change (how the run executes) passes.
    (out / "config.json").write_text(json.dumps({**config, "cache_dir": "elsewhere", "device": "cpu"}))
    assert cli.main(["--resume", str(out)]) == 0


# What a resume may find changed in config.json: the flags it takes (--device and the overrides) and what
# it records or re-derives (the AMP default and memory layout of a device, the resumes list, --download).
_RESUME_MAY_CHANGE = {"device", "amp", "threads", "compile", "compile_mode", "cuda_graphs", "cache_dir", "data_dir",
                      "channels_last", "resumes", "download"}
# Every other setting of a _TINY_RUN's config.json, each with another value its check takes.
_EDITED_SETTINGS = dict(
    model="resnet20", data="cifar10", schedule="compare", rank_ratio=0.25, decomposition="tucker", inflate_epoch=1,
    deflate_epoch=None, deflate_init="svd", optimizer_state="carry", epochs=3, milestones=[], lr=0.01, lr_decay=0.5,
    optimizer="sgd", batch_size=2, weight_decay=0.0, label_smoothing=0.1, seed=1, metrics_every=2, context=8,
    dim=8, depth=2, heads=4, warmup_steps=5, dropout=0.1, width=0.5, steps_per_epoch=3, alpha=16.0,
    out="elsewhere")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A _TINY_RUN stopped after its last checkpoint (result.json removed), shared: a refused resume
    writes nothing, and each test edits a copy."""
    threads = torch.get_num_threads()
    try:
        out = _finished_run(tmp_path_factory.mktemp("stopped") / "run", "--threads", "1")
    finally:
        torch.set_num_threads(threads)
    os.remove(out / "full" / "result.json")
    return out


def test_the_settings_a_resume_may_find_changed_are_how_the_run_executes(stopped_run):
    config = json.loads((stopped_run / "config.json").read_text())
    assert set(runs.RESUME_BOOKKEEPING) == _RESUME_MAY_CHANGE
    assert set(config) - _RESUME_MAY_CHANGE == set(_EDITED_SETTINGS)         # each edit below, no setting left out


@pytest.mark.parametrize("key", sorted(_EDITED_SETTINGS))
def test_resume_refuses_a_config_edited_in_any_setting_the_run_trained_with(tmp_path, capsys, stopped_run, key):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    config = json.loads((out / "config.json").read_text())
    assert config[key] != _EDITED_SETTINGS[key]
    (out / "config.json").write_text(json.dumps({**config, key: _EDITED_SETTINGS[key]}))
    err = _exit_2(["--resume", str(out)], capsys)
    named = "dropout, model" if key == "model" else key         # a ResNet20 trains without the GPT's dropout 0.0
    assert (f"config.json differs from the settings the full run trained with ({out / 'full' / 'checkpoint.pt'}) "
            f"in {named}; only --device, --amp, --threads, --compile, --compile-mode, --cuda-graphs, --cache-dir, "
            f"--data-dir may change on a resume") in err
    assert not (out / "full" / "result.json").exists()


@pytest.mark.parametrize("schedule", ["lowrank", "dynamic"])
def test_resume_refuses_a_config_edited_to_a_schedule_the_folder_has_not_run(tmp_path, capsys, stopped_run, schedule):
    """The full run's saved settings are checked too when the edited config names another schedule, which has
    no files of its own to compare: a resume would start that run beside the stopped one."""
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "schedule": schedule}))
    err = _exit_2(["--resume", str(out)], capsys)
    assert (f"config.json differs from the settings the full run trained with ({out / 'full' / 'checkpoint.pt'}) "
            f"in schedule;") in err
    assert sorted(os.listdir(out)) == sorted(os.listdir(stopped_run))


def test_each_resume_that_changes_how_the_run_executes_adds_its_record(tmp_path, stopped_run, restore_threads):
    """config.json goes on with the latest settings; ``resumes`` keeps every earlier change, so how the run
    began stays on record."""
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    assert json.loads((out / "config.json").read_text())["threads"] == 1
    assert cli.main(["--resume", str(out), "--threads", "2"]) == 0
    os.remove(out / "full" / "result.json")
    assert cli.main(["--resume", str(out), "--threads", "3", "--cache-dir", str(tmp_path / "cache")]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["threads"], config["cache_dir"]) == (3, str(tmp_path / "cache"))
    assert [r["changed"] for r in config["resumes"]] == [
        {"threads": [1, 2]}, {"threads": [2, 3], "cache_dir": [None, str(tmp_path / "cache")]}]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", r["date"]) for r in config["resumes"])


def test_a_finished_runs_config_is_not_rewritten_on_resume(tmp_path):
    out = _finished_run(tmp_path / "run")
    before = (out / "config.json").read_text()
    assert cli.main(["--resume", str(out), "--threads", "2", "--cache-dir", "x"]) == 0
    assert (out / "config.json").read_text() == before


@pytest.mark.parametrize("device", ["nonsense", "CPU", "meta", ""])
def test_a_bad_device_is_refused_before_anything_is_written(tmp_path, capsys, device):
    err = _exit_2(_TINY_RUN + ["--device", device, "--out", str(tmp_path / "fresh")], capsys)
    assert f"--device must be cpu, cuda or cuda:N (lower case), got {device!r}" in err
    assert not (tmp_path / "fresh").exists()
    out = _finished_run(tmp_path / "run")
    os.remove(out / "full" / "result.json")
    before = (out / "config.json").read_text()
    assert "--device must be" in _exit_2(["--resume", str(out), "--device", device], capsys)
    assert (out / "config.json").read_text() == before
    assert cli.main(["--resume", str(out)]) == 0                    # the run still resumes


@pytest.mark.parametrize("name", ["config.json", "full/result.json", "full/checkpoint.pt"])
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_damaged_run_file_is_a_one_line_error_naming_it(tmp_path, capsys, name, damage):
    out = _finished_run(tmp_path / "run")
    if name.endswith("checkpoint.pt"):
        (out / "full" / "result.json").unlink()   # unfinished: the resume trains from the checkpoint
    path = out / name
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "garbage": b"\x80garbage{"}[damage])
    err = _exit_2(["--resume", str(out)], capsys)
    assert str(path) in err and "damaged" in err


def test_a_checkpoint_that_loads_but_is_not_a_runs_is_a_one_line_error_naming_it(tmp_path, capsys):
    out = _finished_run(tmp_path / "run")
    (out / "full" / "result.json").unlink()
    path = out / "full" / "checkpoint.pt"
    shutil.copy(out / "full" / "model.pt", path)      # a state dict: it loads, but holds no epoch
    err = _exit_2(["--resume", str(out)], capsys)
    assert f"{path} is damaged and cannot be resumed from (not a dynrank-train checkpoint)" in err
    assert "Traceback" not in err


def test_a_finished_schedules_checkpoint_is_not_read_on_resume(tmp_path, capsys):
    out = _finished_run(tmp_path / "run")
    (out / "full" / "checkpoint.pt").write_bytes(b"")
    assert cli.main(["--resume", str(out)]) == 0
    assert "already finished" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_finished_run_whose_monitor_files_are_damaged_resumes_without_plots(tmp_path, capsys, damage):
    """The RankMonitor files are written in place; a resume whose files were gone or half written ended in
    a traceback after compare.txt was written again.  Only the plots read them (and the table's λ where a
    result.json holds no monitor_records)."""
    out = _finished_run(tmp_path / "run")
    table = (out / "compare.txt").read_text()
    stem = out / "full" / "monitor"
    if damage == "missing":
        for name in os.listdir(out / "full"):
            if name.startswith("monitor."):
                os.remove(out / "full" / name)
    else:
        text = (out / "full" / "monitor.json").read_text()
        (out / "full" / "monitor.json").write_text(text[:len(text) // 2])
    capsys.readouterr()
    assert cli.main(["--resume", str(out)]) == 0
    captured = capsys.readouterr()
    note = f"plots skipped: the full run's RankMonitor file {stem}.json (or {stem}.epochs.csv) cannot be read ("
    assert note in captured.out and "Traceback" not in captured.err
    assert table.strip() in captured.out and (out / "compare.txt").read_text() == table


@pytest.mark.parametrize("monitor_from", ["json", "csv"])
def test_a_result_without_monitor_records_takes_lambda_from_its_monitor_files(tmp_path, capsys, monitor_from):
    """A result.json slimmed of its monitor_records (as benchmarks/fold_session.py leaves them) showed λ as
    "-" on a resume, although the RankMonitor files beside it hold the same records and the resume read
    them for the plots."""
    out = _finished_run(tmp_path / "run", "--schedule", "compare")
    table = (out / "compare.txt").read_text()
    lambdas = [re.split(r"\s{2,}", row)[-1] for row in table.splitlines()[2:]]
    assert len(lambdas) == 3 and all(cell.startswith(("median ", "∞ in ")) for cell in lambdas)
    for schedule in ("full", "lowrank", "dynamic"):
        path = out / schedule / "result.json"
        result = json.loads(path.read_text())
        del result["monitor_records"]
        path.write_text(json.dumps(result))
        if monitor_from == "csv":
            os.remove(out / schedule / "monitor.json")
    capsys.readouterr()
    assert cli.main(["--resume", str(out)]) == 0
    assert table.strip() in capsys.readouterr().out
    assert (out / "compare.txt").read_text() == table


def test_a_finished_vision_run_resumes_without_its_data_set(tmp_path, capsys, restore_threads):
    """Nothing is left to train: the table and plots come from the run's files, and the data set (loaded
    first, to no use) was required."""
    data = tmp_path / "data"
    _write_tiny_cifar10(str(data / "cifar-10-batches-py"))
    out = tmp_path / "run"
    assert cli.main(["--model", "resnet20", "--width", "0.5", "--schedule", "lowrank", "--epochs", "1",
                     "--batch-size", "8", "--data-dir", str(data), "--cache-dir", str(tmp_path / "cache"),
                     "--threads", "1", "--out", str(out)]) == 0
    table = (out / "compare.txt").read_text()
    shutil.rmtree(data)
    shutil.rmtree(tmp_path / "cache")
    capsys.readouterr()
    assert cli.main(["--resume", str(out)]) == 0
    text = capsys.readouterr().out
    assert "already finished" in text and "val acc" in text and "data:" not in text
    assert (out / "compare.txt").read_text() == table


def test_a_resume_after_ctrl_c_in_the_last_epoch_says_only_the_results_are_left(tmp_path, monkeypatch, capsys):
    """The resume said "resuming at epoch 3, batch 1" of a 2-epoch run."""
    original = _ctrl_c_after(monkeypatch, 1, 1)          # the last batch of the last epoch: the epoch ends
    out = tmp_path / "run"
    assert cli.main(_TINY_RUN + ["--out", str(out)]) == 130
    assert torch.load(out / "full" / "checkpoint.pt", weights_only=False)["epoch"] == 2
    monkeypatch.setattr(TextData, "train_batches", original)
    capsys.readouterr()
    assert cli.main(["--resume", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"[full] all 2 epochs trained ({out / 'full' / 'checkpoint.pt'}); writing the results" in text
    assert "resuming at" not in text and (out / "full" / "result.json").is_file()


@pytest.mark.parametrize("result", ["with settings", "older"])
def test_resume_refuses_a_config_edited_after_a_finished_schedule(tmp_path, capsys, result):
    """A compare job stopped before lowrank's first checkpoint: an edited config.json was compared with
    no checkpoint and taken, and the table then set full at one lr beside the others at another."""
    out = tmp_path / "run"
    assert cli.main(["--schedule", "compare", "--epochs", "2", "--milestones", "1", "--inflate-epoch", "0",
                     "--deflate-epoch", "1", "--out", str(out)] + TINY_GPT) == 0
    shutil.rmtree(out / "lowrank")
    shutil.rmtree(out / "dynamic")
    if result == "older":                   # written before result.json held the settings: the checkpoint's
        finished = json.loads((out / "full" / "result.json").read_text())
        finished.pop("config", None)
        (out / "full" / "result.json").write_text(json.dumps(finished))
    source = out / "full" / ("result.json" if result == "with settings" else "checkpoint.pt")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "lr": 0.3, "rank_ratio": 0.25}))
    err = _exit_2(["--resume", str(out)], capsys)
    assert f"config.json differs from the settings the full run trained with ({source}) in lr, rank_ratio;" in err
    assert not (out / "lowrank").exists()
    (out / "config.json").write_text(json.dumps(config))
    assert cli.main(["--resume", str(out)]) == 0
    rows = (out / "compare.txt").read_text().splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["full", "lowrank", "dynamic"]


@pytest.mark.parametrize("edit, message", [
    (lambda r: {k: v for k, v in r.items() if k != "schedule"}, "is damaged ('schedule' must be a string, missing)"),
    (lambda r: {**r, "config": 5}, "is damaged ('config' must be an object, got int)"),
    (lambda r: {**r, "history": []}, "is damaged ('history' must be a non-empty list of epoch records)"),
    (lambda r: {**r, "params": None}, "is damaged ('params' must be an object, got NoneType)"),
], ids=["no schedule", "config 5", "no history", "params null"])
def test_a_finished_result_json_of_another_shape_is_a_one_line_error(tmp_path, capsys, edit, message):
    """A result.json that parsed but lacked 'schedule' trained the other schedules, then died at the table
    (KeyError); one whose 'config' was no object let an edited config.json through."""
    out = _finished_run(tmp_path / "run")
    result = out / "full" / "result.json"
    result.write_text(json.dumps(edit(json.loads(result.read_text()))))
    err = _exit_2(["--resume", str(out)], capsys)
    assert f"{result} {message}" in err


@pytest.mark.parametrize("edit,message", [
    (lambda c: {"schedule": "full"}, "is damaged (missing 'model')"),
    (lambda c: {k: v for k, v in c.items() if k != "lr"}, "is damaged (missing 'lr')"),
    (lambda c: {k: v for k, v in c.items() if k != "heads"}, "is damaged (missing 'heads')"),
    (lambda c: {**c, "epochs": "2"}, """is damaged ('epochs' must be an integer, got "2")"""),
    (lambda c: {**c, "epochs": True}, "is damaged ('epochs' must be an integer, got true)"),
    (lambda c: {**c, "lr": None}, "is damaged ('lr' must be a number, got null)"),
    (lambda c: {**c, "milestones": 1}, "is damaged ('milestones' must be a list of integers, got 1)"),
    (lambda c: {**c, "dropout": "0.1"}, """is damaged ('dropout' must be a number or null, got "0.1")"""),
    (lambda c: {**c, "model": "vgg16"}, """is damaged ('model' must be one of resnet20, wrn28-10, resnet50, gpt, got "vgg16")"""),
])
def test_a_config_json_missing_a_setting_or_holding_a_wrong_type_is_a_one_line_error(tmp_path, capsys, edit,
                                                                                    message):
    out = _finished_run(tmp_path / "run")
    shutil.rmtree(out / "full")                                    # as if stopped before its first checkpoint
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(edit(config)))
    err = _exit_2(["--resume", str(out)], capsys)
    assert f"--resume {out}: {out / 'config.json'} {message}\n" in err
    # Settings read only where present (written before they existed) may be missing.
    old = {k: v for k, v in config.items() if k not in ("compile_mode", "cuda_graphs", "warmup_steps", "threads")}
    (out / "config.json").write_text(json.dumps(old))
    assert cli.main(["--resume", str(out)]) == 0


@pytest.mark.parametrize("edit,message", [
    ({"inflate_epoch": 5, "deflate_epoch": 1},
     "'s inflate_epoch and deflate_epoch need 0 ≤ inflate epoch < deflate epoch ≤ epochs, got I=5, D=1, epochs=2"),
    ({"inflate_epoch": 2, "deflate_epoch": None},
     "'s inflate_epoch and deflate_epoch need 0 ≤ inflate epoch < deflate epoch ≤ epochs, got I=2, D=null, "
     "epochs=2"),
    ({"model": "resnet20"}, "'s model resnet20 cannot train on its data stdlib: the GPT reads the stdlib text"),
    ({"milestones": [7]}, "'s milestones must lie in (0, epochs=2), got [7]"),
    ({"milestones": [1, 1], "epochs": 3}, "'s milestones must be increasing, each epoch once"),
    ({"heads": 3}, "'s dim must be divisible by its heads, got dim=16, heads=3"),
    ({"metrics_every": 0}, "'s metrics_every must be ≥ 1, got 0"),         # not "--metrics-every", never given
    ({"lr": -0.1}, "'s lr must be a finite number > 0, got -0.1"),
])
def test_a_config_json_whose_settings_do_not_fit_together_is_refused_on_resume(tmp_path, capsys, edit, message):
    """Before the first checkpoint nothing holds the settings to compare config.json with: a resume checked
    its types and ranges, and an I after D, a model on another's data or a milestone past the last epoch
    ended in a traceback or was taken."""
    out = _finished_run(tmp_path / "run")
    shutil.rmtree(out / "full")                                    # as if stopped before its first checkpoint
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **edit}))
    err = _exit_2(["--resume", str(out)], capsys)
    assert f"error: --resume {out}: {out / 'config.json'}{message}" in err
    assert not (out / "full").exists()
    (out / "config.json").write_text(json.dumps(config))
    assert cli.main(["--resume", str(out)]) == 0


def test_a_run_saved_on_a_gpu_says_how_to_resume_it_on_the_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = _finished_run(tmp_path / "run")
    os.remove(out / "full" / "result.json")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "device": "cuda", "amp": True}))
    err = _exit_2(["--resume", str(out)], capsys)
    assert (f"error: the run was saved with device cuda, but torch sees no GPU (torch {torch.__version__}); "
            f"continue it on the CPU with --resume {out} --device cpu\n") in err
    assert "--device cuda asked" not in err
    # The flag, given, is named as before.
    assert "error: --device cuda asked for CUDA, but torch sees no GPU" in _exit_2(
        ["--resume", str(out), "--device", "cuda"], capsys)
    assert cli.main(["--resume", str(out), "--device", "cpu"]) == 0


@pytest.mark.parametrize("argv,size", [
    (["--dim", "4", "--heads", "2"], "--dim 4"),                                  # the main job: compare
    (["--dim", "4", "--heads", "2", "--schedule", "lowrank"], "--dim 4"),
    (["--dim", "4", "--heads", "2", "--schedule", "dynamic"], "--dim 4"),
    (["--data", "cifar10", "--width", "0.1", "--schedule", "compare"], "--width 0.1"),
    (["--data", "cifar10", "--width", "0.01"], "--width 0.01"),                    # dynamic
])
def test_a_size_that_leaves_no_layer_to_factorize_is_refused_before_out_is_claimed(tmp_path, capsys, argv, size):
    """convert_model found nothing to convert only when lowrank started: a compare job had trained full
    by then, and died with a traceback (a --resume the same way)."""
    out = tmp_path / "run"
    err = _exit_2(argv + ["--out", str(out)], capsys)
    model = "gpt" if size == "--dim 4" else "resnet20"
    assert (f"error: {size} leaves no layer of {model} whose weight has both sides ≥ convert_model's "
            f"min_features=8, so --schedule ") in err
    assert f"has nothing to factorize; use --schedule full or a larger {size.split()[0]}\n" in err
    assert not out.exists()
    if model == "gpt":                      # the dense model factorizes nothing, and trains at that size
        assert cli.main(TINY_GPT + argv + ["--schedule", "full", "--epochs", "1", "--milestones", "",
                                           "--out", str(out)]) == 0


@pytest.mark.parametrize("argv,got", [
    (["--model", "resnet20", "--width", "1e12"], "--width must leave every weight of resnet20 small enough for "
                                                 "torch to build (under 2**63 bytes), got 1e+12; use a smaller "
                                                 "--width\n"),
    (["--model", "resnet50", "--width", "1e30", "--schedule", "full"], "got 1e+30; use a smaller --width\n"),
    (["--model", "wrn28-10", "--width", "1.7e308"], "got 1.7e+308; use a smaller --width\n"),
    (["--dim", str(10 ** 12), "--heads", "1"], "--dim and --context must leave every weight of gpt small enough "
                                               "for torch to build (under 2**63 bytes), got dim=1000000000000, "
                                               "context=64; use a smaller --dim or --context\n"),
    (["--dim", str(2 ** 62), "--heads", "1", "--schedule", "full"], f"got dim={2 ** 62}, context=64"),
    (["--context", str(2 ** 63 - 1), "--schedule", "full"], f"got dim=128, context={2 ** 63 - 1}"),
])
def test_a_size_too_large_to_build_is_refused_before_out_is_claimed(tmp_path, capsys, argv, got):
    """Built on the meta device to find the layers to factorize, such a model ended in torch's traceback
    (RuntimeError, TypeError); with --schedule full, after --out was claimed."""
    out = tmp_path / "run"
    err = _exit_2(argv + ["--data-dir", str(tmp_path / "absent"), "--out", str(out)], capsys)
    assert f"dynrank-train: error: --" in err and got in err
    assert not out.exists()


def test_a_run_saved_with_nothing_to_factorize_is_refused_on_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = TINY_GPT + ["--dim", "4", "--schedule", "compare", "--epochs", "2", "--milestones", "1",
                       "--inflate-epoch", "0", "--deflate-epoch", "1", "--out", str(out)]
    # As a run from before the check left it: full trained, then lowrank died in convert_model.
    monkeypatch.setattr(train_config, "_check_factorizable", lambda cfg, resume=False: None)
    with pytest.raises(ValueError, match="convert_model found nothing to convert"):
        cli.main(argv)
    monkeypatch.undo()
    assert (out / "full" / "result.json").is_file()
    err = _exit_2(["--resume", str(out)], capsys)
    assert (f"error: --resume {out}: --dim 4 leaves no layer of gpt whose weight has both sides ≥ convert_model's "
            f"min_features=8, so --schedule compare has nothing to factorize; start a new run (--out) with "
            f"--schedule full or a larger --dim\n") in err


def test_a_run_that_recorded_another_models_dropout_resumes_and_records_its_own(tmp_path, restore_threads):
    """config.json used to record the data set's dropout, not the model's (0.3 for a ResNet20 on CIFAR-100,
    which has none; None for the WRN, which trains at 0.3). Such a run resumes as it trained, is not
    refused against its checkpoints' copies, and goes on with the record corrected."""
    _write_tiny_cifar10(str(tmp_path / "data" / "cifar-10-batches-py"))
    out = tmp_path / "run"
    assert cli.main(["--model", "resnet20", "--width", "0.5", "--schedule", "compare", "--epochs", "1",
                     "--milestones", "", "--inflate-epoch", "0", "--deflate-epoch", "1", "--batch-size", "8",
                     "--data-dir", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"),
                     "--threads", "1", "--out", str(out)]) == 0
    straight = _state(out)

    def as_saved_before(path):
        if path.suffix == ".json":
            record = json.loads(path.read_text())
            if path.name == "config.json":
                record["dropout"] = 0.3
            else:
                record.pop("config", None)              # result.json did not hold the settings
            path.write_text(json.dumps(record))
        else:
            checkpoint = torch.load(path, weights_only=False)
            checkpoint["config"]["dropout"] = 0.3
            torch.save(checkpoint, path)
    for name in ("config.json", "full/result.json", "full/checkpoint.pt", "lowrank/checkpoint.pt"):
        as_saved_before(out / name)
    os.remove(out / "lowrank" / "result.json")          # stopped after lowrank's last epoch, before dynamic
    shutil.rmtree(out / "dynamic")
    assert json.loads((out / "config.json").read_text())["dropout"] == 0.3
    assert cli.main(["--resume", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dropout"] is None and "resumes" not in config
    resumed = _state(out)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    # Once more, against the finished full run's checkpoint that still says 0.3.
    os.remove(out / "dynamic" / "result.json")
    assert cli.main(["--resume", str(out)]) == 0


def test_json_files_are_written_by_temp_file_and_rename(tmp_path, monkeypatch):
    from dynrank.train import loop
    path = str(tmp_path / "result.json")
    loop.write_json(path, {"a": 1})

    def broken_dump(obj, handle, **kw):
        handle.write('{"a": ')
        raise OSError("disk full")
    monkeypatch.setattr(loop.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        loop.write_json(path, {"a": 2})
    assert json.loads(open(path).read()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["result.json"]          # no temp file left behind


def test_the_gpts_own_decomposition_may_be_named():
    assert _config(["--model", "gpt", "--decomposition", "svd"])["decomposition"] == "svd"
    with pytest.raises(ValueError, match=r"--decomposition is used by the vision models .* only, not by --model gpt"):
        _config(["--model", "gpt", "--decomposition", "tucker"])


def test_resume_on_the_cpu_keeps_the_saved_thread_count(tmp_path, monkeypatch, restore_threads):
    original = _ctrl_c_after(monkeypatch, 1, 0)
    out = tmp_path / "run"
    argv = ["--schedule", "lowrank", "--epochs", "3", *TINY_GPT[:-2], "--threads", "2", "--device", "cpu",
            "--out", str(out)]                         # on a CPU from the start, on a GPU machine too
    assert cli.main(argv) == 130
    monkeypatch.setattr(TextData, "train_batches", original)
    assert cli.main(["--resume", str(out), "--device", "cpu"]) == 0
    history = json.loads((out / "lowrank" / "metrics.json").read_text())
    assert {r["device"] for r in history} == {"cpu (2 threads)"}
    assert json.loads((out / "config.json").read_text())["threads"] == 2


def test_a_resume_on_the_same_device_type_keeps_the_runs_amp(tmp_path, monkeypatch, capsys, restore_threads):
    from dynrank.train import loop
    monkeypatch.setattr(loop, "cpu_bf16_native", lambda: True)
    original = _ctrl_c_after(monkeypatch, 1, 0)
    out = tmp_path / "run"
    assert cli.main(["--schedule", "full", "--epochs", "3", *TINY_GPT, "--amp", "--device", "cpu",
                     "--out", str(out)]) == 130
    monkeypatch.setattr(TextData, "train_batches", original)
    capsys.readouterr()
    assert cli.main(["--resume", str(out), "--device", "cpu"]) == 0
    assert "note: the run trained with" not in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["amp"] is True and "resumes" not in config
    history = json.loads((out / "full" / "metrics.json").read_text())
    assert [r["device"] for r in history] == ["cpu (1 thread, bf16)"] * 3
    # --no-amp on the resume turns it off, and is recorded.
    os.remove(out / "full" / "result.json")
    assert cli.main(["--resume", str(out), "--device", "cpu", "--no-amp"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["amp"] is False and config["resumes"][-1]["changed"] == {"amp": [True, False]}


def test_a_run_without_threads_trains_on_one_thread(tmp_path, restore_threads):
    torch.set_num_threads(2)
    out = tmp_path / "run"
    argv = ["--schedule", "full", "--epochs", "1", "--milestones", "", "--inflate-epoch", "0", "--deflate-epoch", "1",
            *TINY_GPT[:-2], "--device", "cpu", "--out", str(out)]
    assert "--threads" not in argv
    assert cli.main(argv) == 0
    assert torch.get_num_threads() == 1
    assert json.loads((out / "config.json").read_text())["threads"] == 1
    assert [r["device"] for r in json.loads((out / "full" / "metrics.json").read_text())] == ["cpu (1 thread)"]


def test_amp_given_on_a_resume_moved_from_a_gpu_to_the_cpu_stays_on(tmp_path, monkeypatch, capsys, restore_threads):
    from dynrank.train import loop
    monkeypatch.setattr(loop, "cpu_bf16_native", lambda: True)
    out = _finished_run(tmp_path / "run")
    os.remove(out / "full" / "result.json")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, device="cuda", amp=True)))    # as if begun on a GPU
    capsys.readouterr()
    assert cli.main(["--resume", str(out), "--device", "cpu", "--amp"]) == 0
    text = capsys.readouterr().out
    assert "note: the run trained with" not in text and "ignoring" not in text
    assert json.loads((out / "config.json").read_text())["amp"] is True


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_a_resume_range_checks_its_flags_as_a_new_run_does(tmp_path, capsys, threads, restore_threads):
    out = _finished_run(tmp_path / "run")
    os.remove(out / "full" / "result.json")
    before = (out / "config.json").read_text()
    err = _exit_2(["--resume", str(out), "--threads", threads], capsys)
    assert f"--resume {out}: --threads must be ≥ 1, got {threads}" in err
    assert (out / "config.json").read_text() == before


def test_the_largest_seed_trains(tmp_path, restore_threads):
    # seed * 100_003 + epoch overflowed torch's manual_seed at the first batch, after --out was claimed.
    out = _finished_run(tmp_path / "run", "--seed", str(2 ** 63 - 1))
    assert json.loads((out / "config.json").read_text())["seed"] == 2 ** 63 - 1
    assert len(json.loads((out / "full" / "metrics.json").read_text())) == 2


def test_a_relative_data_dir_resumes_from_anywhere_and_a_resume_may_say_where_the_data_moved(
        tmp_path, monkeypatch, restore_threads):
    from dynrank.train.augment import VisionData
    first, second = tmp_path / "first", tmp_path / "second"
    _write_tiny_cifar10(str(first / "data" / "cifar-10-batches-py"))
    second.mkdir()
    monkeypatch.chdir(first)
    out = tmp_path / "run"
    original = _ctrl_c_after(monkeypatch, 0, 0, VisionData)
    assert cli.main(["--model", "resnet20", "--width", "0.5", "--schedule", "full", "--epochs", "3",
                     "--batch-size", "8", "--data-dir", "data", "--cache-dir", "cache", "--threads", "1",
                     "--out", str(out)]) == 130
    config = json.loads((out / "config.json").read_text())
    assert (config["data_dir"], config["cache_dir"]) == (str(first / "data"), str(first / "cache"))
    # The data moves; a resume from another folder gives its new place (relative to that folder).
    os.rename(first / "data", second / "moved")
    monkeypatch.chdir(second)
    monkeypatch.setattr(VisionData, "train_batches", original)
    _ctrl_c_after(monkeypatch, 1, 0, VisionData)
    assert cli.main(["--resume", str(out), "--data-dir", "moved"]) == 130
    config = json.loads((out / "config.json").read_text())
    assert config["data_dir"] == str(second / "moved")
    assert config["resumes"] == [dict(date=config["resumes"][0]["date"],
                                      changed={"data_dir": [str(first / "data"), str(second / "moved")]})]
    # From anywhere else, with no flags: the saved absolute path.
    monkeypatch.setattr(VisionData, "train_batches", original)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--resume", str(out)]) == 0
    assert [r["epoch"] for r in json.loads((out / "full" / "metrics.json").read_text())] == [0, 1, 2]


# -- numeric flags and flags a model or schedule would ignore ----------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--epochs", "4", "--milestones", "2,2"], "--milestones must be increasing"),
    (["--epochs", "4", "--milestones", "3,2"], "--milestones must be increasing"),
    (["--lr-decay", "0"], "--lr-decay must be a factor in (0, 1]"),
    (["--lr-decay", "10"], "--lr-decay must be a factor in (0, 1]"),
    (["--lr-decay", "nan"], "--lr-decay must be"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number ≥ 0"),
    (["--weight-decay", "nan"], "--weight-decay must be"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1)"),
    (["--warmup-steps", "-1"], "--warmup-steps must be ≥ 0"),
    (["--steps-per-epoch", "0"], "--steps-per-epoch must be ≥ 1"),
    (["--threads", "0"], "--threads must be ≥ 1"),
    (["--metrics-every", "0"], "--metrics-every must be ≥ 1"),
    (["--model", "resnet20", "--width", "0"], "--width must be a finite number > 0"),
    (["--model", "resnet20", "--width", "nan"], "--width must be"),
    (["--depth", "0"], "--depth must be ≥ 1"),
    (["--dim", "0"], "--dim must be ≥ 1"),
    (["--heads", "0"], "--heads must be ≥ 1"),
    (["--context", "0"], "--context must be ≥ 1"),
    (["--dim", "10", "--heads", "4"], "--dim must be divisible by --heads"),
    (["--seed", "-1"], "--seed must be in [0, 2**63)"),
    (["--seed", str(2 ** 63)], "--seed must be in [0, 2**63)"),
    (["--full-rank-fraction", "0"], "--full-rank-fraction must be in (0, 1]"),
    (["--rank-ratio", "0"], "--rank-ratio must be in (0, 1]"),
    (["--epochs", "10", "--milestones", "0,5"], "--milestones must lie in"),
    (["--alpha", "0"], "--alpha must be a finite number > 0"),
    (["--alpha", "-1"], "--alpha must be a finite number > 0"),
    (["--alpha", "nan"], "--alpha must be a finite number > 0"),
    (["--alpha", "inf"], "--alpha must be a finite number > 0"),
    (["--alpha", "1e39"], "--alpha must be a finite number > 0 (at most float32's largest"),
    (["--model", "resnet20", "--dim", "8"], "--dim is used by --model gpt only"),
    (["--model", "resnet20", "--steps-per-epoch", "8"], "--steps-per-epoch is used by --model gpt only"),
    (["--model", "resnet50", "--dropout", "0.1"], "--dropout is used by --model wrn28-10 and gpt only"),
    (["--width", "0.5"], "--width is used by the vision models"),
    (["--decomposition", "cp"], "--decomposition is used by the vision models"),
    (["--full-rank-fraction", "0.3", "--inflate-epoch", "1", "--deflate-epoch", "5"], "give one or the other"),
    (["--epochs", "4", "--inflate-epoch", "3"],
     "got I=3, D=3, epochs=4 (D=3 derived by the paper's rule from epochs=4, milestones=[2]; give --deflate-epoch)"),
])
def test_out_of_range_and_unused_flags_are_clear_errors(argv, message):
    with pytest.raises(ValueError) as info:
        _config(argv)
    assert message in str(info.value)


def test_the_ends_of_the_documented_ranges_are_accepted():
    cfg = _config(["--epochs", "10", "--milestones", "5", "--full-rank-fraction", "1", "--rank-ratio", "1"])
    assert cfg["full_rank_fraction"] == 1 and cfg["rank_ratio"] == 1
    assert schedule_from_lr(10, [5], full_rank_fraction=1) == (0, 10)
    assert (cfg["inflate_epoch"], cfg["deflate_epoch"]) == (0, None)        # full rank throughout, never deflated


def test_flags_a_single_form_run_or_no_compile_ignores_are_noted():
    notes = []
    args = cli.build_parser().parse_args(["--schedule", "full", "--inflate-epoch", "1", "--deflate-epoch", "4",
                                          "--no-compile", "--compile-mode", "max-autotune"])
    cli.config_from_args(args, notes)
    assert notes == ["note: --schedule full does not switch forms; ignoring --inflate-epoch, --deflate-epoch",
                     "note: --no-compile; ignoring --compile-mode max-autotune"]


@pytest.mark.parametrize("argv,note", [
    (["--data-dir", "d", "--download", "--cache-dir", "c"],
     "note: --data stdlib reads Python's own sources (no data folder, no download); ignoring --data-dir d, "
     "--download, --cache-dir c"),
    (["--model", "gpt", "--download"],
     "note: --data stdlib reads Python's own sources (no data folder, no download); ignoring --download"),
    (["--schedule", "lowrank", "--deflate-init", "svd", "--optimizer-state", "carry"],
     "note: --schedule lowrank does not switch forms; ignoring --deflate-init svd, --optimizer-state carry"),
    (["--schedule", "full", "--inflate-epoch", "0", "--deflate-epoch", "2", "--optimizer-state", "reset"],
     "note: --schedule full does not switch forms; ignoring --inflate-epoch, --deflate-epoch, --optimizer-state reset"),
    (["--schedule", "full", "--rank-ratio", "0.25", "--decomposition", "svd"],
     "note: --schedule full trains the dense model (no layer is factorized); ignoring --rank-ratio, "
     "--decomposition svd"),
    (["--model", "resnet20", "--schedule", "full", "--decomposition", "tucker"],
     "note: --schedule full trains the dense model (no layer is factorized); ignoring --decomposition tucker"),
    (["--schedule", "full", "--alpha", "16"],
     "note: --schedule full trains the dense model (no layer is factorized); ignoring --alpha"),
    (["--schedule", "full", "--optimizer-state", "fresh"],
     "note: --schedule full does not switch forms; ignoring --optimizer-state fresh"),
    # Used: no note.
    (["--data", "cifar10", "--data-dir", "d", "--download", "--cache-dir", "c"], None),
    (["--schedule", "dynamic", "--deflate-init", "svd", "--optimizer-state", "carry"], None),
    (["--deflate-init", "random"], None),                           # the main job compares, dynamic among them
    (["--schedule", "lowrank", "--rank-ratio", "0.25", "--decomposition", "svd"], None),
    (["--schedule", "lowrank", "--alpha", "16"], None),
    (["--schedule", "compare", "--alpha", "16", "--optimizer-state", "fresh"], None),
])
def test_data_and_form_change_flags_a_run_ignores_are_noted(argv, note):
    notes = []
    cli.config_from_args(cli.build_parser().parse_args(argv), notes)
    assert notes == ([note] if note else [])


def test_the_cli_prints_the_notes(tmp_path, capsys):
    # --device meta stops the run after the notes, before anything is loaded or written.
    with pytest.raises(SystemExit):
        cli.main(_TINY_RUN + ["--data-dir", "d", "--download", "--deflate-init", "svd", "--device", "meta",
                              "--out", str(tmp_path / "run")])
    text = capsys.readouterr().out
    assert "; ignoring --data-dir d, --download\n" in text and "; ignoring --deflate-init svd\n" in text


def test_plot_training_curves_with_empty_keys_says_so():
    """keys=[] said that no scalars were logged, though they were."""
    pytest.importorskip("matplotlib")
    from dynrank import FusedLowRankLinear, RankMonitor
    from dynrank.plots import plot_training_curves
    run = RankMonitor(torch.nn.Sequential(FusedLowRankLinear(16, 16, rank=4)), name="r")
    with run.epoch(0):
        pass
    run.log(loss=1.0)
    with pytest.raises(ValueError, match=re.escape("keys is empty; give the scalars to plot (logged: ['loss']), "
                                                   "or None for all of them")):
        plot_training_curves([run], keys=[])
    silent = RankMonitor(torch.nn.Sequential(FusedLowRankLinear(16, 16, rank=4)), name="silent")
    with silent.epoch(0):
        pass
    for keys in (None, []):
        with pytest.raises(ValueError, match="no logged scalars to plot"):
            plot_training_curves([silent], keys=keys)


def test_a_gpt_batch_larger_than_the_texts_windows_is_a_data_error():
    from dynrank.train.data import DataError
    text = torch.zeros(40, dtype=torch.uint8)
    with pytest.raises(DataError, match="--batch-size 30 is larger than the 24 windows"):
        TextData(text, text, 16, 30)
    assert len(TextData(text, text, 16, 23, steps=1)) == 1


def test_a_resume_may_download_the_data_again(tmp_path, monkeypatch, restore_threads):
    """--download on a resume was dropped without a word, and the data-not-found error then said to pass it."""
    from dynrank.train import data as train_data
    from dynrank.train.augment import VisionData
    first, moved = tmp_path / "first", tmp_path / "moved"
    _write_tiny_cifar10(str(first / "cifar-10-batches-py"))
    out = tmp_path / "run"
    original = _ctrl_c_after(monkeypatch, 0, 0, VisionData)
    assert cli.main(["--model", "resnet20", "--width", "0.5", "--schedule", "full", "--epochs", "2",
                     "--batch-size", "8", "--data-dir", str(first), "--cache-dir", str(tmp_path / "cache"),
                     "--threads", "1", "--out", str(out)]) == 130
    fetched = []

    def fake_download(name, root):
        fetched.append((name, root))
        os.makedirs(root, exist_ok=True)
        if not (moved / "cifar-10-batches-py").exists():
            os.rename(first / "cifar-10-batches-py", moved / "cifar-10-batches-py")
    monkeypatch.setattr(train_data, "download", fake_download)
    monkeypatch.setattr(VisionData, "train_batches", original)
    # A resume given --download that dies before its first checkpoint leaves config.json saying so: the
    # next plain resume was refused ("config.json differs ... in download").
    def lost(self, at_epoch, start=0):
        raise RuntimeError("machine lost")
        yield
    monkeypatch.setattr(VisionData, "train_batches", lost)
    with pytest.raises(RuntimeError, match="machine lost"):
        cli.main(["--resume", str(out), "--data-dir", str(moved), "--download"])
    assert fetched == [("cifar10", str(moved))]
    monkeypatch.setattr(VisionData, "train_batches", original)
    assert cli.main(["--resume", str(out)]) == 0
    assert len(fetched) == 1                                # the data set is there now: nothing to fetch
    assert [r["epoch"] for r in json.loads((out / "full" / "metrics.json").read_text())] == [0, 1]


def test_a_run_begun_with_download_resumes_offline_with_its_data_present(tmp_path, monkeypatch, capsys,
                                                                         restore_threads):
    """The saved --download fetched the archive again on every resume: with the data set extracted (or
    moved with --data-dir) and no network, the run could not be resumed, and no flag turned it off."""
    from dynrank.train import data as train_data
    from dynrank.train.augment import VisionData
    from dynrank.train.data import DataError
    root, out = tmp_path / "data", tmp_path / "run"
    fetched = []

    def online(name, root):             # the fetch, as the data set extracted from it
        fetched.append(root)
        _write_tiny_cifar10(os.path.join(root, "cifar-10-batches-py"))

    def offline(name, root):
        raise DataError("could not download (Network is unreachable)")
    monkeypatch.setattr(train_data, "download", online)
    original = _ctrl_c_after(monkeypatch, 0, 0, VisionData)
    assert cli.main(["--model", "resnet20", "--width", "0.5", "--schedule", "full", "--epochs", "2",
                     "--batch-size", "8", "--data-dir", str(root), "--cache-dir", str(tmp_path / "cache"),
                     "--threads", "1", "--download", "--out", str(out)]) == 130
    assert fetched == [str(root)] and json.loads((out / "config.json").read_text())["download"] is True
    monkeypatch.setattr(VisionData, "train_batches", original)
    monkeypatch.setattr(train_data, "download", offline)
    capsys.readouterr()
    assert cli.main(["--resume", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"--download: cifar10 is in {root / 'cifar-10-batches-py'} already; nothing to fetch" in text
    assert [r["epoch"] for r in json.loads((out / "full" / "metrics.json").read_text())] == [0, 1]


def test_download_fetches_only_where_the_data_set_is_not_found_but_as_its_official_archive(tmp_path):
    """The official archive is left to download(), which checks its MD5 (and fetches a damaged one again)."""
    from dynrank.train.data import DATASETS
    root = tmp_path / "data"
    assert cli._found_elsewhere("cifar10", str(root)) is None                  # no folder yet
    root.mkdir()
    assert cli._found_elsewhere("cifar10", str(root)) is None                  # an empty one
    (root / DATASETS["cifar10"]["archive"]).write_bytes(b"damaged")
    assert cli._found_elsewhere("cifar10", str(root)) is None                  # the archive: download() checks it
    _write_tiny_cifar10(str(root / "cifar-10-batches-py"))
    assert cli._found_elsewhere("cifar10", str(root)) == str(root / "cifar-10-batches-py")
    assert cli._found_elsewhere("cifar100", str(root)) is None                 # another data set's
    # An image tree at the top may be another data set's: cifar100's archive is fetched beside a CIFAR-10
    # tree there (and read before it), as before --download looked; a tree named after it counts as found.
    top = tmp_path / "top"
    for split in ("train", "test"):
        (top / split / "cat").mkdir(parents=True)
    assert cli._found_elsewhere("cifar100", str(top)) is None
    (top / "cifar100-images.tar.gz").write_bytes(b"")
    assert cli._found_elsewhere("cifar100", str(top)) == str(top / "cifar100-images.tar.gz")


# -- the adapter scale alpha and the optimizer-state policy -------------------------------------------
@pytest.mark.parametrize("alpha", [None, 16.0])
def test_alpha_reaches_the_converted_layers_and_the_config(tmp_path, alpha):
    """The authors' adapters are scaled by alpha/rank (16 with SVD); --alpha sets it for every factorized
    layer of a lowrank or dynamic run, and config.json records it (null: scale 1)."""
    from dynrank import FusedLowRankLinear, LowRankConv2d
    from dynrank.train.loop import prepare_model
    given = [] if alpha is None else ["--alpha", "16"]
    for argv, classes, layer_type in ((["--model", "gpt"] + TINY_GPT, 256, FusedLowRankLinear),
                                      (["--preset", "cifar10-resnet20", "--width", "0.25"], 10, LowRankConv2d)):
        cfg = _config(argv + given)
        assert cfg["alpha"] == alpha
        model, summary = prepare_model(cfg, "dynamic", classes, torch.device("cpu"))
        layers = [m for m in model.modules() if isinstance(m, layer_type)]
        assert len(layers) == len(summary.converted) > 0
        for layer in layers:
            assert layer.alpha == alpha
            layer.inflate().deflate()
            inner = layer.rank if layer_type is FusedLowRankLinear else layer._dec.inner_rank(layer.rank)
            assert layer.scale == (1.0 if alpha is None else 16.0 / inner)
    out = tmp_path / "run"
    assert cli.main(["--schedule", "dynamic", "--epochs", "2", "--milestones", "1", "--inflate-epoch", "0",
                     "--deflate-epoch", "1", "--optimizer-state", "fresh", "--out", str(out)] + TINY_GPT + given) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["alpha"] == alpha and config["optimizer_state"] == "fresh"
    assert json.loads((out / "dynamic" / "result.json").read_text())["config"]["alpha"] == alpha


@pytest.mark.parametrize("alpha", ["0", "-1", "nan", "inf"])
def test_a_bad_alpha_is_refused_before_any_work(tmp_path, capsys, alpha):
    err = _exit_2(["--schedule", "compare", "--alpha", alpha, "--out", str(tmp_path / "run")] + TINY_GPT, capsys)
    assert f"--alpha must be a finite number > 0 (at most float32's largest, 3.4e38: the scale at rank 1), " \
           f"got {float(alpha)}" in err
    assert not (tmp_path / "run").exists()


def test_an_alpha_edited_into_a_config_is_refused_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--schedule", "lowrank", "--epochs", "2", "--milestones", "1", "--out", str(out)] + TINY_GPT
    assert cli.main(argv) == 0
    os.remove(out / "lowrank" / "result.json")                    # as if interrupted
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "alpha": 16}))
    assert "config.json differs from the settings the lowrank run trained with" in _exit_2(["--resume", str(out)],
                                                                                            capsys)


def test_a_run_saved_before_alpha_was_a_setting_resumes_at_scale_one(tmp_path):
    """config.json, result.json and checkpoints written before --alpha existed have no "alpha": such a run
    resumes with alpha None (scale 1, as it trained), to the state of a run that never stopped, and is not
    refused against its finished schedules' records once its config.json names alpha."""
    argv = ["--schedule", "compare", "--epochs", "2", "--milestones", "1", "--inflate-epoch", "0",
            "--deflate-epoch", "1"] + TINY_GPT
    assert cli.main(argv + ["--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "run"
    assert cli.main(argv + ["--out", str(out)]) == 0
    os.remove(out / "lowrank" / "result.json")          # stopped after lowrank's last epoch, before dynamic
    shutil.rmtree(out / "dynamic")
    for name in ("config.json", "full/result.json", "full/checkpoint.pt", "lowrank/checkpoint.pt"):
        path = out / name
        if path.suffix == ".json":
            record = json.loads(path.read_text())
            (record if name == "config.json" else record["config"]).pop("alpha")
            path.write_text(json.dumps(record))
        else:
            checkpoint = torch.load(path, weights_only=False)
            checkpoint["config"].pop("alpha")
            torch.save(checkpoint, path)
    assert "alpha" not in json.loads((out / "config.json").read_text())
    assert cli.main(["--resume", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["alpha"] is None and "resumes" not in config
    for schedule in ("lowrank", "dynamic"):
        straight, resumed = _state(tmp_path / "straight", schedule), _state(out, schedule)
        assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    os.remove(out / "dynamic" / "result.json")          # once more, against records that still lack alpha
    assert cli.main(["--resume", str(out)]) == 0


def test_the_committed_runs_resume_without_an_alpha():
    """The committed CIFAR-10 runs were saved before --alpha existed: each is read as alpha None, and its
    config.json passes the resume checks against its schedules' records (read only, nothing written)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results",
                        "cifar10-resnet20")
    folders = sorted(f for f in os.listdir(root) if os.path.isfile(os.path.join(root, f, "config.json")))
    assert folders
    for folder in folders:
        path = os.path.join(root, folder, "config.json")
        with open(path, encoding="utf-8") as handle:
            cfg = json.load(handle)
        assert "alpha" not in cfg
        runs._check_saved(cfg, path)
        runs._check_resume(os.path.join(root, folder), cfg)
        train_config._check_settings(cfg, path)
        assert runs._as_trained(cfg)["alpha"] is None


def test_the_optimizer_state_flag_takes_fresh():
    assert _config(["--optimizer-state", "fresh"])["optimizer_state"] == "fresh"
    assert _config([])["optimizer_state"] == "reset"


@pytest.mark.parametrize("flag,message", [("--resume", "--resume needs a run folder, got ''"),
                                          ("--out", "--out needs a folder, got ''")])
def test_an_empty_resume_or_out_is_refused(tmp_path, capsys, monkeypatch, flag, message):
    """--resume "$RUN" with RUN unset started a new run, and --out "" wrote to runs/<timestamp>."""
    monkeypatch.chdir(tmp_path)
    err = _exit_2(_TINY_RUN + [flag, ""], capsys)
    assert message in err and os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv,switch,ignored", [
    (["--schedule", "full"], ["--inflate-epoch", "9"], "--inflate-epoch"),
    (["--schedule", "lowrank"], ["--deflate-epoch", "2"], "--deflate-epoch"),
    (["--schedule", "lowrank"], ["--inflate-epoch", "-1", "--deflate-epoch", "99"], "--inflate-epoch, --deflate-epoch"),
    (["--preset", "cifar10-resnet20", "--schedule", "full", "--epochs", "10"],
     ["--inflate-epoch", "55", "--deflate-epoch", "120"], "--inflate-epoch, --deflate-epoch"),
])
def test_a_single_form_runs_switch_epochs_are_noted_not_range_checked(argv, switch, ignored):
    """The I and D a full or lowrank run does not use were range-checked, so the run was refused before
    its "ignoring" note was printed; it now has the I and D it has without them."""
    notes = []
    cfg = cli.config_from_args(cli.build_parser().parse_args(argv + switch), notes)
    assert notes == [f"note: --schedule {cfg['schedule']} does not switch forms; ignoring {ignored}"]
    assert cfg == _config(argv)
    train_config._check_settings(cfg)        # what a resume checks config.json with


def test_the_cli_prints_the_note_on_a_single_form_runs_switch_epochs(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_TINY_RUN + ["--inflate-epoch", "5", "--out", str(out)]) == 0
    assert "note: --schedule full does not switch forms; ignoring --inflate-epoch\n" in capsys.readouterr().out
    assert cli.main(["--resume", str(out)]) == 0


def test_the_lambda_column_sets_nan_aside_as_it_does_infinity():
    """NaN λ (a diverged layer) went into the median and max, which then depended on the layers' order."""
    import itertools
    from dynrank.train.report import lambda_summary

    def records(values, restricted):
        layers = {f"l{i}": dict(spectral_ratio=v, restricted_spectral_ratio=r)
                  for i, (v, r) in enumerate(zip(values, restricted))}
        return [dict(epoch=0, layers=layers)]
    for order in itertools.permutations([3.0, 5.0, float("nan")]):
        assert lambda_summary(records(order, order)) == "median 4, max 5; NaN in 1/3"
    inf, nan = float("inf"), float("nan")
    values, restricted = [nan, 3.0, inf, 5.0, inf, inf], [nan, 3.0, nan, 5.0, 8.0, 2.0]
    for order in itertools.permutations(range(6)):
        summary = lambda_summary(records([values[i] for i in order], [restricted[i] for i in order]))
        assert summary == "median 4, max 5; ∞ in 3/6 (σ1/σk median 5); NaN in 1/6"
    assert lambda_summary(records([nan, nan], [nan, nan])) == "NaN in 2/2"


def test_monitors_read_back_from_their_csv_files_keep_their_schedules_name(tmp_path, capsys):
    """With monitor.json gone, every run read from its CSVs was named "monitor": the λ plots of a job
    overwrote each other in lambda_monitor.png."""
    out = _finished_run(tmp_path / "run", "--schedule", "compare")
    for schedule in ("full", "lowrank", "dynamic"):
        os.remove(out / schedule / "monitor.json")
    monitors, note = cli._saved_monitors(str(out), ("full", "lowrank", "dynamic"))
    assert note is None and [m.name for m in monitors] == ["full", "lowrank", "dynamic"]
    assert all(m.records for m in monitors)
    pytest.importorskip("matplotlib")
    shutil.rmtree(out / "plots")
    assert cli.main(["--resume", str(out)]) == 0
    assert sorted(os.listdir(out / "plots")) == ["curves.png", "lambda_dynamic.png", "lambda_full.png",
                                                 "lambda_lowrank.png"]


@pytest.mark.parametrize("damage", ["entry the plots cannot read", "switch without kind", "empty csv files"])
def test_a_finished_run_whose_monitor_files_load_but_are_damaged_resumes_without_plots(tmp_path, capsys,
                                                                                        monkeypatch, damage):
    """A file that loads but holds a damaged entry ended the resume in a traceback (KeyError 'kind';
    ValueError, no spectral_ratio recorded) before the table was printed."""
    pytest.importorskip("matplotlib")
    from dynrank import RankMonitor
    out = _finished_run(tmp_path / "run", "--schedule", "dynamic", "--inflate-epoch", "1", "--deflate-epoch", "2")
    table = (out / "compare.txt").read_text()
    stem = out / "dynamic" / "monitor"
    if damage == "entry the plots cannot read":     # whatever RankMonitor.load lets through
        def unreadable(self, *args, **kwargs):
            raise KeyError("kind")
        monkeypatch.setattr(RankMonitor, "plot_spectral_ratio", unreadable)
    elif damage == "switch without kind":
        doc = json.loads((out / "dynamic" / "monitor.json").read_text())
        assert doc["switches"]
        for switch in doc["switches"]:
            del switch["kind"]
        (out / "dynamic" / "monitor.json").write_text(json.dumps(doc))
    else:
        os.remove(out / "dynamic" / "monitor.json")
        for suffix in (".epochs.csv", ".layers.csv"):
            (out / "dynamic" / ("monitor" + suffix)).write_text("")
    capsys.readouterr()
    assert cli.main(["--resume", str(out)]) == 0
    captured = capsys.readouterr()
    note = f"plots skipped: the dynamic run's RankMonitor file {stem}.json (or {stem}.epochs.csv) cannot be "
    assert note in captured.out and "Traceback" not in captured.err
    assert captured.out.index(table.strip()) < captured.out.index(note)
    assert (out / "compare.txt").read_text() == table


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_files_written_by_temp_file_and_rename_get_the_mode_open_gives(tmp_path, umask):
    """The temp file came from mkstemp, mode 0o600 whatever the umask, and the rename kept it: checkpoint.pt
    and the JSON files were readable by their owner only, model.pt beside them by everyone."""
    from dynrank.train import loop
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w", encoding="utf-8") as handle:
            handle.write("x")
        loop.write_json(str(tmp_path / "result.json"), {"a": 1})
        loop.write_json(str(tmp_path / "result.json"), {"a": 2})           # onto an existing file too
        loop.write_atomic(str(tmp_path / "checkpoint.pt"), lambda tmp: torch.save({"x": 1}, tmp))
    finally:
        os.umask(old)
    mode = lambda name: oct(os.stat(tmp_path / name).st_mode & 0o777)
    assert mode("plain") == oct(0o666 & ~umask)
    assert mode("result.json") == mode("checkpoint.pt") == mode("plain")
    assert json.loads((tmp_path / "result.json").read_text()) == {"a": 2}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "plain", "result.json"]
