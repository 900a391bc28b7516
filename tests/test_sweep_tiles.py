"""benchmarks/sweep_tiles.py on a CPU: every config runs (interpreter) and is within one rounding of the float64 result."""

import pytest
import torch

from _helpers import INTERPRETING, assert_out_refused_before_work, bad_outs, load_script


@pytest.mark.skipif(not INTERPRETING, reason="the CPU check runs the kernels through Triton's interpreter")
def test_each_config_computes_the_adapter_forward():
    sweep = load_script("benchmarks/sweep_tiles.py", "dynrank_sweep_tiles")
    rows = sweep.sweep([(40, 48)], [(32, 32, 16, 4, 2), (16, 64, 32, 4, 2)], torch.device("cpu"), torch.bfloat16)
    providers = [r[1] for r in rows]
    assert providers[:2] == ["cuBLAS dense x·W_fᵀ", "cuBLAS path (default)"]
    assert providers[2:] == ["engine 32×32×16 w4 s2", "engine+TMA 32×32×16 w4 s2",
                             "engine 16×64×32 w4 s2", "engine+TMA 16×64×32 w4 s2"]
    # Errors are against the float64 result of the same bf16 operands.  The engine accumulates in
    # fp32 and converts once to bf16, which Triton's interpreter does by truncation (every error here
    # points toward zero): under one bf16 ulp, < 2⁻⁷·|y| (fp32 accumulation adds far less).  The cuBLAS
    # path rounds to nearest twice (the small product with the bias, then the sum): ≤ 2·2⁻⁹·|y|.
    largest = reference_largest_output(sweep)
    assert rows[1][3] <= 2 * 2.0 ** -9 * largest
    assert all(error is not None and error < 2.0 ** -7 * largest for *_, error in rows[2:])
    table = sweep.render(rows, "t")
    assert "| T40 K=N=48 | engine 16×64×32 w4 s2 | - | - | - |" in table


def reference_largest_output(sweep):
    """max |y| of the sweep's 40 × 48 operands, rebuilt as it builds them, in float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 48, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(48, 48, generator=gen) / 48 ** 0.5).to(torch.bfloat16)
    A = (torch.randn(48, sweep.RANK, generator=gen) * 0.02).to(torch.bfloat16)
    xbs = torch.randn(40, sweep.RANK, generator=gen).to(torch.bfloat16)
    bias = torch.randn(48, generator=gen).to(torch.bfloat16)
    y = x.double() @ weight.double().t() + xbs.double() @ A.double().t() + bias.double()
    return y.abs().max().item()


def test_out_is_checked_before_any_shape_runs(tmp_path, monkeypatch, capsys):
    sweep = load_script("benchmarks/sweep_tiles.py", "dynrank_sweep_tiles")
    monkeypatch.setenv("TRITON_INTERPRET", "1")     # what --dry-run sets; put back afterwards
    out, message = bad_outs(tmp_path, "sweep.md")["under a file"]
    assert_out_refused_before_work(sweep, "sweep", ["--dry-run"], out, message,
                                   monkeypatch, capsys)


@pytest.mark.parametrize("error, code", [(0.0, 0), (0.49, 0), (0.5, 1), (3.0, 1), (float("nan"), 1)])
def test_a_row_not_within_tolerance_fails_the_run(tmp_path, monkeypatch, error, code):
    """Exit 1 for an error of 0.5 or more, and for NaN (a launch that writes NaN compares False both ways)."""
    sweep = load_script("benchmarks/sweep_tiles.py", "dynrank_sweep_tiles")
    monkeypatch.setenv("TRITON_INTERPRET", "1")     # what --dry-run sets; put back afterwards
    monkeypatch.setattr(sweep, "sweep", lambda shapes, *args: [
        ("T40 K=N=48", "cuBLAS dense x·W_fᵀ", None, None), ("T40 K=N=48", "engine 32×32×16 w4 s2", None, error)])
    out = tmp_path / "sweep.md"
    assert sweep.main(["--dry-run", "--out", str(out)]) == code
    assert f"| T40 K=N=48 | engine 32×32×16 w4 s2 | - | - | - | {error:.3g} |" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize("repeats", ["0", "-3"])
def test_repeats_below_one_are_refused(capsys, repeats):
    sweep = load_script("benchmarks/sweep_tiles.py", "dynrank_sweep_tiles")
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_sweep_args(sweep.__doc__, "sweep_tiles.py", ["--dry-run", "--repeats", repeats])
    assert exit_info.value.code == 2
    assert f"error: argument --repeats: expected an integer ≥ 1, got {repeats!r}\n" in capsys.readouterr().err
