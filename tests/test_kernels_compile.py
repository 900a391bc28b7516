"""The Triton GEMM engine and merge kernel compile natively for NVIDIA GPUs, checked without one.

Triton's interpreter (which the rest of the suite uses on a CPU-only machine)
does not lower kernels; this test compiles every role and tile config of the
engine, and the merge kernel at each rank regime, to a cubin for sm_90 (H100/H200) in a fresh process with the
interpreter off (``python tests/_compile_for_gpu.py 80 90`` checks more targets),
specialized as a launch on contiguous tensors is, and checks with ptxas that no
variant spills registers, and that decode-sized launches keep their integer lanes apart
(the miscompile Triton 3.6 made of the fp32 adapter forward at one token, rank 1).
"""

import os
import subprocess
import sys

import pytest

from _helpers import HAS_TRITON

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not HAS_TRITON or not sys.platform.startswith("linux"), reason="needs Triton on Linux")
def test_engine_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")     # compile for real, not from a cache
    # The checkout's dynrank, installed or not (a script's own folder, tests/, is all Python adds).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(HERE), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_compile_for_gpu.py"), "90"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.endswith(" ok")]
    # dtypes × roles × tile configs, one with int64 indexing, fp32 and bf16 decode-sized adapter
    # forwards, the merge's dtypes × ranks and one with int64 indexing, and the TMA engine's
    # 2 dtypes × 2 roles × 2 configs
    assert len(lines) == 3 * 4 * 4 + 1 + 2 * 6 + 3 * 4 + 1 + 2 * 2 * 2
    assert sum(" merge rank=" in line for line in lines) == 3 * 4 + 1
    # One token at rank 1 keeps its 32-bit offsets in 32-bit registers (M is not specialized).
    assert sum("lanes=separate" in line for line in lines) == 2 * 6
    # Specialized as a real launch is, every variant keeps its accumulators and pipeline in
    # registers: a spill to local memory would cost every tile a round trip.
    spilled = [line for line in lines if "spills=None" not in line and "spills=0 " not in line]
    assert not spilled, "\n".join(spilled)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_token_count_is_never_specialized():
    """M stays a runtime int: specialized to the constant 1, Triton 3.6 miscompiled the fp32 adapter
    forward at one token and rank 1 (wrong x columns on an H200), which only a GPU with that
    compiler shows; under Triton 3.6 the compile check above fails without this.  Read from the
    compiled kernel's parameters (the interpreter's wrapper keeps them elsewhere)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from dynrank.kernels.lowrank_gemm import _lowrank_gemm_kernel as k; "
            "print(' '.join(p.name for p in k.params if p.do_not_specialize))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["M"]
