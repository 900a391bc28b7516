"""benchmarks/sweep_merge.py on a CPU: every config merges right (interpreter) and the table reads its rows."""

import pytest
import torch

from _helpers import INTERPRETING, assert_out_refused_before_work, bad_outs, load_script


@pytest.fixture(scope="module")
def sweep():
    return load_script("benchmarks/sweep_merge.py", "dynrank_sweep_merge")


@pytest.mark.skipif(not INTERPRETING, reason="the CPU check runs the kernel through Triton's interpreter")
@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 1e-2), (torch.float32, 1e-6)])
def test_each_config_merges_against_float64(sweep, dtype, tolerance):
    configs = sweep.CONFIGS[str(dtype).split(".")[1]][:2]
    rows = sweep.sweep([(40, 72)], configs, torch.device("cpu"), dtype)
    providers = [r[1] for r in rows]
    assert providers[:2] == ["copy of W", "addmm_ (cuBLAS)"]
    # The first config of each list is the kernel's own (kernels/merge.py's _merge_config).
    assert providers[2].endswith("(current)") and not providers[3].endswith("(current)")
    # bf16: the merged W is rounded to bf16 (relative to its largest entry); fp32: exact to rounding.
    assert all(error is not None and error < tolerance for *_, error in rows[2:])


def test_table_rates_against_the_copy(sweep):
    rows = [("4096×4096 r16", "copy of W", 20e-6, None), ("4096×4096 r16", "merge kernel 64×128 w8 s2", 40e-6, 1e-3),
            ("4096×4096 r16", "addmm_ (cuBLAS)", None, None)]
    table = sweep.render(rows, "t", element_bytes=2)
    # 2 · 4096² · 2 bytes in 20 µs is 3355 GB/s; twice the time is half the rate, 50 % of the copy.
    assert "| 4096×4096 r16 | copy of W | 20.0 µs | 3355 | 100 | - |" in table
    assert "| 4096×4096 r16 | merge kernel 64×128 w8 s2 | 40.0 µs | 1678 | 50 | 0.001 |" in table
    assert "| 4096×4096 r16 | addmm_ (cuBLAS) | - | - | - | - |" in table


def test_out_is_checked_before_any_shape_runs(sweep, tmp_path, monkeypatch, capsys):
    """A bad --out is refused before the first shape is timed; a missing folder is created."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")     # what --dry-run sets; put back afterwards
    for out, message in bad_outs(tmp_path, "sweep.md").values():
        assert_out_refused_before_work(sweep, "sweep", ["--dry-run"], out, message, monkeypatch, capsys)
    monkeypatch.setattr(sweep, "sweep", lambda shapes, *args: [(f"{shapes[0][0]}×{shapes[0][1]} r16", "copy of W",
                                                                None, None)])
    out = tmp_path / "new" / "folder" / "sweep.md"
    assert sweep.main(["--dry-run", "--out", str(out)]) == 0
    assert "| 40×72 r16 | copy of W | - | - | - | - |" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize("error, code", [(1e-6, 0), (1e-2, 1), (float("nan"), 1)])
def test_a_row_not_within_tolerance_fails_the_run(sweep, monkeypatch, capsys, error, code):
    """Exit 1 for a merge off by the dtype's tolerance or more, and for NaN (False both ways in a comparison)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")     # what --dry-run sets; put back afterwards
    monkeypatch.setattr(sweep, "sweep", lambda shapes, *args: [
        ("40×72 r16", "copy of W", None, None), ("40×72 r16", "merge kernel 64×128 w8 s2", None, error)])
    assert sweep.main(["--dry-run"]) == code
    assert f"| 40×72 r16 | merge kernel 64×128 w8 s2 | - | - | - | {error:.2g} |" in capsys.readouterr().out


def test_repeats_below_one_are_refused(sweep, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--dry-run", "--repeats", "0"])
    assert exit_info.value.code == 2
    assert "error: argument --repeats: expected an integer ≥ 1, got '0'\n" in capsys.readouterr().err
