"""benchmarks/sweep_tiles.py on a CPU: every config runs (interpreter) and matches the cuBLAS-path result."""

import pytest
import torch

from _helpers import INTERPRETING, load_script


@pytest.mark.skipif(not INTERPRETING, reason="the CPU check runs the kernels through Triton's interpreter")
def test_each_config_computes_the_adapter_forward():
    sweep = load_script("benchmarks/sweep_tiles.py", "dynrank_sweep_tiles")
    rows = sweep.sweep([(40, 48)], [(32, 32, 16, 4, 2), (16, 64, 32, 4, 2)], torch.device("cpu"), torch.bfloat16)
    providers = [r[1] for r in rows]
    assert providers[:2] == ["cuBLAS dense x·W_fᵀ", "cuBLAS path (default)"]
    assert providers[2:] == ["engine 32×32×16 w4 s2", "engine+TMA 32×32×16 w4 s2",
                             "engine 16×64×32 w4 s2", "engine+TMA 16×64×32 w4 s2"]
    # Each config against the cuBLAS path, at bf16 resolution of outputs of size ~1-3.
    assert all(error is not None and error < 0.1 for *_, error in rows[2:])
    table = sweep.render(rows, "t")
    assert "| T40 K=N=48 | engine 16×64×32 w4 s2 | - | - | - |" in table
