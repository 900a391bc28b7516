"""benchmarks/optimizer_state_compare.py: its arguments are checked before any training."""

import pytest

from _helpers import load_script


@pytest.fixture(scope="module")
def compare():
    return load_script("benchmarks/optimizer_state_compare.py", "dynrank_optimizer_state_compare")


def _no_training(compare, monkeypatch):
    calls = []

    def fake_run(kind, opt_name, policy, seed, epochs):
        calls.append((kind, opt_name, policy, seed, epochs))
        return dict(final_loss=1.0, acc=0.5, test_loss=1.0, after_inflate=1.0, after_deflate=1.0)
    monkeypatch.setattr(compare, "run", fake_run)
    return calls


@pytest.mark.parametrize("flag, value, expected", [
    ("--models", "mpl", "a comma-separated list of mlp, cnn"),
    ("--models", "mlp,", "a comma-separated list of mlp, cnn"),
    ("--seeds", "0", "an integer ≥ 1"),
    ("--epochs", "2", "an integer ≥ 3 (lowrank, full and adapter epochs: I = E/3, D = 2E/3)"),
    ("--threads", "0", "an integer ≥ 1"),
])
def test_bad_arguments_are_refused_before_training(compare, monkeypatch, capsys, flag, value, expected):
    calls = _no_training(compare, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        compare.main([flag, value])
    assert exit_info.value.code == 2
    assert f"error: argument {flag}: expected {expected}, got {value!r}\n" in capsys.readouterr().err
    assert calls == []


def test_the_models_named_are_the_tasks_run(compare, monkeypatch, capsys):
    calls = _no_training(compare, monkeypatch)
    compare.main(["--models", "mlp", "--seeds", "2", "--epochs", "3"])
    assert {kind for kind, *_ in calls} == {"mlp"} and len(calls) == 2 * 3 * 2     # optimizers × policies × seeds
    assert "mlp/sgd: carry has the lower final train loss in 0 of 2 seeds" in capsys.readouterr().out
    for make in (compare.student, lambda kind: compare.teacher_data(kind, 0)):
        with pytest.raises(ValueError, match="kind must be one of mlp, cnn, got 'mpl'"):
            make("mpl")
