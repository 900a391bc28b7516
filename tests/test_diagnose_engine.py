"""benchmarks/diagnose_engine.py on a CPU: every row is checked against float64, and a wrong kernel shows."""

import pytest

from _helpers import INTERPRETING, assert_out_refused_before_work, bad_outs, load_script

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="the CPU check runs the kernels through Triton's interpreter")


@pytest.fixture(scope="module")
def diagnose():
    return load_script("benchmarks/diagnose_engine.py", "dynrank_diagnose_engine")


def test_every_row_matches_float64(diagnose, tmp_path):
    out = tmp_path / "diagnose.md"
    assert diagnose.main(["--dry-run", "--out", str(out)]) == 0
    variants = out.read_text().split("Small shapes")[0]
    rows = [line for line in variants.splitlines() if line.startswith("| ") and "---" not in line]
    results = {line.split(" | ")[0][2:]: line.rsplit(" | ", 1)[1] for line in rows[1:]}
    assert results["the failed test's operands"] == "ok |"
    reproduction = results.pop("reproduction, not counted: M specialized to 1 (the engine before the fix)")
    assert reproduction == "ok: no fault here |"          # the interpreter has no such fault
    assert len(results) == 8 and set(results.values()) == {"ok |"}
    assert "2 of 2 grid shapes checked" in out.read_text() and "0 wrong result(s)" in out.read_text()


def test_a_wrong_kernel_is_reported(diagnose, tmp_path, monkeypatch):
    import dynrank.kernels
    real = dynrank.kernels.lowrank_gemm

    def off_by_one(*args, **kwargs):
        return real(*args, **kwargs) + 1.0
    monkeypatch.setattr(dynrank.kernels, "lowrank_gemm", off_by_one)
    out = tmp_path / "diagnose.md"
    assert diagnose.main(["--dry-run", "--out", str(out)]) == 1
    text = out.read_text()
    assert text.count("| WRONG |") == 8 and "WRONG |" in text.split("Small shapes")[1]
    assert "WRONG: the fault, reproduced |" in text


@pytest.mark.parametrize("where", ["folder", "under a file"])
def test_out_is_refused_before_the_checks(diagnose, tmp_path, monkeypatch, capsys, where):
    out, message = bad_outs(tmp_path, "diagnose.md")[where]
    assert_out_refused_before_work(diagnose, "variants", ["--dry-run"], out, message, monkeypatch, capsys)


def test_out_folder_is_created(diagnose, tmp_path):
    out = tmp_path / "new" / "diagnose.md"
    assert diagnose.main(["--dry-run", "--budget-s", "0", "--out", str(out)]) == 0
    assert out.read_text().startswith("# GEMM engine diagnosis")


def test_a_nan_result_is_counted_wrong(diagnose, tmp_path, monkeypatch):
    """A launch that writes NaN (NaN compares False both ways) is wrong in the variants, the grid and the count."""
    import dynrank.kernels
    real = dynrank.kernels.lowrank_gemm

    def writes_nan(*args, **kwargs):
        return real(*args, **kwargs) * float("nan")
    monkeypatch.setattr(dynrank.kernels, "lowrank_gemm", writes_nan)
    out = tmp_path / "diagnose.md"
    assert diagnose.main(["--dry-run", "--out", str(out)]) == 1
    variants, grid = out.read_text().split("Small shapes")
    assert variants.count("| nan | WRONG |") == 8
    assert grid.count("nan WRONG |") == 2
    assert "10 wrong result(s) in all" in grid
