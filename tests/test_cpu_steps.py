"""benchmarks/cpu_steps.py: every way of stepping a ResNet20 on the CPU takes the same step."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from _helpers import assert_out_refused_before_work, bad_outs, load_script
from dynrank.train.loop import _autocast_factory, build_optimizer
from dynrank.train.steps import TrainStep


@pytest.fixture(scope="module")
def cpu_steps():
    return load_script("benchmarks/cpu_steps.py", "dynrank_cpu_steps")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_ways_compute_the_same_first_step(cpu_steps):
    results = cpu_steps.measure(forms=("full", "lowrank-svd", "lowrank-tkd-cpd"), batch=2, steps=1, warmup=1,
                                repeats=1, log=lambda line: None)
    for form, by_way in results.items():
        assert set(by_way) == set(cpu_steps.WAYS)
        reference = by_way["nchw"]["loss"]
        # The same model, batch and label-smoothed loss: the layout changes only the summation order,
        # bf16 autocast the precision of the convolutions (8 bits of mantissa).
        assert by_way["channels-last"]["loss"] == pytest.approx(reference, rel=1e-5), form
        assert by_way["channels-last+bf16"]["loss"] == pytest.approx(reference, rel=2e-2), form
        assert all(r["seconds"] > 0 for r in by_way.values())


def test_a_way_keeps_the_median_step_of_its_best_round_after_the_warm_up(cpu_steps, monkeypatch):
    """A stand-in step whose clock advances by a set number of seconds per call: with steps=3, warmup=2,
    repeats=2 the timed calls are each round's 3rd to 5th.  Round 1 times (1, 3, 10) s: median 3, mean
    4.67; round 2 (4, 4, 4) s.  The way keeps round 1's 3 s and the loss of its first call."""
    durations = {0: [100.0, 100.0, 1.0, 3.0, 10.0], 1: [100.0, 100.0, 4.0, 4.0, 4.0]}   # per call, per round
    clock = {"now": 0.0}
    calls = []

    def make_step(form, way, batch, seed=0):
        round_ = len(calls)
        calls.append(0)

        def step():
            call = calls[round_]
            clock["now"] += durations[round_][call]
            calls[round_] += 1
            return 0.5 + 10 * round_ + call            # the loss names its round and call
        return step
    monkeypatch.setattr(cpu_steps, "make_step", make_step)
    monkeypatch.setattr(cpu_steps, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    results = cpu_steps.measure(forms=("full",), ways=("nchw",), steps=3, warmup=2, repeats=2,
                                log=lambda line: None)
    assert calls == [5, 5]                     # 2 warm-up calls (the first one's loss kept) and 3 timed
    assert results == {"full": {"nchw": {"seconds": 3.0, "loss": 0.5}}}


@pytest.mark.parametrize("form", ["full", "lowrank"])
def test_the_timed_step_is_the_one_dynrank_train_takes(form):
    """The benchmark's SGD decayed every parameter (BN scales and shifts, biases); dynrank-train's
    build_optimizer leaves the 1-D ones undecayed."""
    bench = load_script("benchmarks/_bench_models.py", "dynrank_bench_models")
    step, model = bench.resnet20_step(form, batch=4, channels_last=False, seed=3)
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(reference, {"optimizer": "sgd", "lr": 0.1, "weight_decay": 1e-4})
    train_step = TrainStep(reference, optimizer, reference, _autocast_factory({}, torch.device("cpu")), 0.1)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    labels = torch.randint(10, (4,), generator=torch.Generator().manual_seed(5))
    for lr in (0.1, 0.05):      # the second step applies the momentum of the first
        assert float(step(lr)) == float(train_step(images, labels, lr)[0])
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_report_and_its_refusals(cpu_steps, tmp_path, restore_threads, capsys):
    out = tmp_path / "steps.md"
    argv = ["--forms", "adapter-svd", "--batch", "2", "--steps", "1", "--warmup", "1", "--repeats", "1",
            "--threads", "1"]
    assert cpu_steps.main(argv + ["--out", str(out)]) == 0
    raw = json.loads(out.with_suffix(".json").read_text())
    assert (raw["threads"], raw["batch"], raw["torch"]) == (1, 2, torch.__version__)
    assert raw["capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"torch CPU capability: {raw['capability']}" in out.read_text()
    times = {way: r["seconds"] for way, r in raw["results"]["adapter-svd"].items()}
    row = next(line for line in out.read_text().splitlines() if line.startswith("| adapter-svd |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == [f"{times[w] * 1e3:.1f}" for w in cpu_steps.WAYS]
    assert cells[4:] == [f"{times['nchw'] / times[w]:.2f}×" for w in cpu_steps.WAYS[1:]]
    for bad, message in ((["--forms", "lowrank-qr"], "--forms takes full"), (["--steps", "0"], "--steps must be ≥ 1")):
        with pytest.raises(SystemExit):
            cpu_steps.main(bad)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("where", ["folder", "under a file", "a .json report"])
def test_out_is_refused_before_the_measurement(cpu_steps, tmp_path, monkeypatch, capsys, where):
    """A .json --out was overwritten by the JSON the script writes beside it."""
    if where == "a .json report":
        out = tmp_path / "steps.json"
        message = "the Markdown report, whose .json goes beside it; give it another extension (.md)"
    else:
        out, message = bad_outs(tmp_path, "steps.md")[where]
    assert_out_refused_before_work(cpu_steps, "measure", ["--forms", "full", "--threads", "1"], out, message,
                                   monkeypatch, capsys)


def test_a_folder_where_the_json_goes_is_refused_before_the_measurement(cpu_steps, tmp_path, monkeypatch,
                                                                          capsys):
    """It failed with IsADirectoryError after the whole measurement."""
    (tmp_path / "steps.json").mkdir()
    monkeypatch.setattr(cpu_steps, "measure", lambda *a, **k: pytest.fail("measured before --out was checked"))
    with pytest.raises(SystemExit) as exit_info:
        cpu_steps.main(["--forms", "full", "--threads", "1", "--out", str(tmp_path / "steps.md")])
    assert exit_info.value.code == 2
    assert (f"the JSON beside --out, {tmp_path / 'steps.json'}: is a folder, expected a file to write"
            in capsys.readouterr().err)
