"""The Triton GEMM engine and merge kernel compile natively for NVIDIA GPUs, checked without one.

Triton's interpreter (which the rest of the suite uses on a CPU-only machine)
does not lower kernels; this test compiles every role and tile config of the
engine, and the merge kernel at each rank regime, to a cubin for sm_90 (H100/H200) in a fresh process with the
interpreter off (``python tests/_compile_for_gpu.py 80 90`` checks more targets),
specialized as a launch on contiguous tensors is, and checks with ptxas that no
variant spills registers, and that decode-sized launches keep their integer lanes apart
(the miscompile Triton 3.6 made of the fp32 adapter forward at one token, rank 1).

Below those, the ops as ``torch.compile`` and a FakeTensorMode trace them: the merges compile whole,
and a dry run on fake tensors takes the Triton engine's custom ops or torch's, never a kernel launch.
"""

import os
import subprocess
import sys

import pytest
import torch

from _helpers import HAS_TRITON, REL_TOL, rel_err
from dynrank.conv_merging import merge_conv_
from dynrank.functional import lowrank_linear, merge_

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_merge_conv_compiles_whole_on_the_torch_engine(monkeypatch, dtype, layout):
    """A float32 or float64 kernel's merge compared data pointers to tell a view from a copy, which dynamo
    refuses ("Data pointer comparison"); compiled whole it now writes what eager mode writes."""
    monkeypatch.setenv("DYNRANK_BACKEND", "torch")
    groups, alpha = 2, 0.37
    weight = torch.randn(6, 3, 3, 2, dtype=dtype)
    if layout == "channels_last":                    # no view as (groups, F/groups, -1): a copy written back
        weight = weight.contiguous(memory_format=torch.channels_last)
    U, V = torch.randn(6, 2, dtype=dtype), torch.randn(4, 3, 3, 2, dtype=dtype)
    U3, V3 = U.double().reshape(groups, 3, 2), V.double().reshape(groups, 2, -1)
    expected = weight.double() + alpha * torch.bmm(U3, V3).reshape(weight.shape)
    eager = merge_conv_(weight.clone(), U, V, alpha, groups)
    assert rel_err(eager, expected) < REL_TOL[dtype] and rel_err(weight, expected) > 1e-2
    torch._dynamo.reset()
    compiled = torch.compile(lambda w, u, v: merge_conv_(w, u, v, alpha, groups), backend="aot_eager", fullgraph=True)
    merged = weight.clone()
    out = compiled(merged, U, V)
    assert torch.equal(merged, eager) and merged.stride() == eager.stride() and torch.equal(out, eager)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_fake_tensor_run_on_the_triton_engine(monkeypatch, dtype):
    """Under a FakeTensorMode (shape or memory estimates) the Triton engine launched its kernels on fake
    tensors and failed ("Attempted to set the storage of a tensor on device "meta" ..."); it now gives what
    the torch engine gives: fake outputs and gradients of the same shapes and dtypes, merges in place."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    def dry_run(engine):
        monkeypatch.setenv("DYNRANK_BACKEND", engine)
        seen = []
        with FakeTensorMode():
            for with_weight in (False, True):
                x = torch.randn(2, 3, 5, dtype=dtype, requires_grad=True)
                A = torch.randn(4, 2, dtype=dtype, requires_grad=True)
                B = torch.randn(5, 2, dtype=dtype, requires_grad=True)
                weight = torch.randn(4, 5, dtype=dtype) if with_weight else None
                y = lowrank_linear(x, weight, A, B, torch.randn(4, dtype=dtype), 0.5)
                y.sum().backward()
                seen += [(type(t), t.shape, t.dtype) for t in (y, x.grad, A.grad, B.grad)]
            weight = torch.randn(4, 5, dtype=dtype)
            merged = merge_(weight, torch.randn(4, 2, dtype=dtype), torch.randn(5, 2, dtype=dtype), 0.5)
            seen.append((type(merged), merged.shape, merged.dtype, merged is weight))
            kernel = torch.randn(4, 2, 3, 3, dtype=dtype)
            merged = merge_conv_(kernel, torch.randn(4, 1, dtype=dtype), torch.randn(2, 2, 3, 3, dtype=dtype), 0.5, 2)
            seen.append((type(merged), merged.shape, merged.dtype, merged is kernel))
        return seen

    expected = dry_run("torch")
    assert all(entry[0] is FakeTensor for entry in expected)
    assert dry_run("triton") == expected
