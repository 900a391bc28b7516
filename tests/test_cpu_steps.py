"""benchmarks/cpu_steps.py: every way of stepping a ResNet20 on the CPU takes the same step."""

import json

import pytest
import torch

from _helpers import assert_out_refused_before_work, bad_outs, load_script


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
