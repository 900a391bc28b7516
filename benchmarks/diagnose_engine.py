"""Which launches of the GEMM engine compute wrong results on this device, and what changes that.

The native kernel tests of 2026-11-26 (NVIDIA H200, triton 3.6.0) failed one case out of 346:
the adapter forward of ``tests/test_kernels_linear.py`` at (tokens, in, out, rank) =
(1, 17, 5, 1) in float32, whose output was unrelated to the float64 reference (relative error
1.04), while the same shape passed in fp16 and bf16, the lowrank form (no x·W_fᵀ term) passed in
fp32, and every other fp32 shape passed.  That launch is ``y = x·W_fᵀ + xbs·Aᵀ + bias`` with
16×16×32 tiles, 4 warps, 4 stages, ``input_precision="ieee"``.  The interpreter computes it right.

The cause, read off the PTX that Triton 3.6 makes of that launch (compiled on a CPU host): with
M == 1 specialized to a constant, its LLVM packed two 32-bit lanes, ``tid << 31`` and the
column offset ``4·(tid % 8)``, into one 64-bit register, and the first lane's top bit spilled
into the second, so the x tile and its mask were read at wrong columns.  Triton 3.9 makes the
same kernel correctly.  The engine now never specializes M (``do_not_specialize``), and
``tests/_compile_for_gpu.py`` fails on packed lanes in decode-sized launches.

This script checks that on the GPU, each row against float64:

1. the failing launch with the test's own operands and with others, then with one thing
   changed: the pipeline depth, the tile sizes, the warps, each product alone, no bias,
   copies with ordinary strides, tf32 instead of ieee; and the engine as it was, with M
   specialized (a reproduction: wrong where the compiler has the fault, not counted);
2. a grid of small shapes (every size 1, odd, 16, 17; ranks 1 to 16) in fp32 and bf16 through
   the default configs, so a wrong config shows up beyond the one shape the tests hold.

Each row prints as it is done (the file is written as it goes), so a timeout still leaves
everything measured before it.  A result not within its tolerance, NaN included, counts as wrong,
and the script exits 1 when any counted row is wrong.

    python benchmarks/diagnose_engine.py --out diagnose.md            # CUDA, compiled kernels
    TRITON_INTERPRET=1 python benchmarks/diagnose_engine.py --dry-run # CPU, interpreter, tiny grid
"""

import argparse
import itertools
import os
import sys
import time

import torch

try:
    import dynrank  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import prepare_out  # noqa: E402

REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
TF32_TOL = 5e-3
FAILING = (1, 17, 5, 1)   # (M, K, N, R) of the failed case


def _operands(M, K, N, R, dtype, device, seed=0):
    """The layer's operands, made the way the kernel test makes them: x (M, K), W_f (N, K), A (N, R), B (K, R)."""
    g = torch.Generator(device=device).manual_seed(seed)
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)
    x = randn(M, K)
    weight = randn(N, K, scale=K ** -0.5)
    A = randn(N, R, scale=R ** -0.5)
    B = randn(K, R, scale=K ** -0.5)
    bias = randn(N)
    return x, weight, A, B, bias


def _rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(x=None, wt=None, u=None, vt=None, bias=None, config=None):
    """(relative error against float64, the dtype's tolerance) of one engine launch."""
    from dynrank.kernels import lowrank_gemm, reference_lowrank_gemm
    out = lowrank_gemm(x, wt, u, vt, bias, config=config)
    if out.is_cuda:
        torch.cuda.synchronize()
    return _rel_err(out, reference_lowrank_gemm(x, wt, u, vt, bias)), REL_TOL[out.dtype]


def _check_specialized_m(device, dtype=torch.float32):
    """The failing launch through a twin of the engine that lets Triton specialize M (as before the fix)."""
    import importlib

    import triton
    engine_module = importlib.import_module("dynrank.kernels.lowrank_gemm")   # the module, not its function
    fixed = engine_module._lowrank_gemm_kernel
    M, K, N, R = FAILING
    x, weight, A, B, bias = _operands(M, K, N, R, dtype, device)
    engine_module._lowrank_gemm_kernel = triton.jit(fixed.fn)
    try:
        return _check(x, weight.t(), x @ B * 0.75, A.t(), bias)
    finally:
        engine_module._lowrank_gemm_kernel = fixed


def _default_config(M, N, dtype):
    from dynrank.kernels.lowrank_gemm import _native_config
    return dict(_native_config(M, N, dtype))


def variants(device, dtype=torch.float32):
    """(name, kwargs of lowrank_gemm) for the failing launch and each single change of it."""
    M, K, N, R = FAILING
    x, weight, A, B, bias = _operands(M, K, N, R, dtype, device)
    xbs = x @ B * 0.75                     # what the forward's first launch makes: (M, R), strides (R, 1)
    base = dict(x=x, wt=weight.t(), u=xbs, vt=A.t(), bias=bias)
    compiled = device.type == "cuda"
    default = _default_config(M, N, dtype) if compiled else None
    torch.manual_seed(0)                   # the test's own operands: seeded as its conftest seeds them
    tx = torch.randn(M, K, device=device).to(dtype)
    tw = torch.randn(N, K, device=device).div(K ** 0.5).to(dtype)
    tA = torch.randn(N, R, device=device).div(R ** 0.5).to(dtype)
    tB = torch.randn(K, R, device=device).div(K ** 0.5).to(dtype)
    tbias = torch.randn(N, device=device).to(dtype)
    yield "the failed test's operands", dict(x=tx, wt=tw.t(), u=tx @ tB * 0.75, vt=tA.t(), bias=tbias), default
    yield "other operands, same shapes and strides", base, default
    if compiled:
        for stages in (1, 2, 3):
            yield f"num_stages={stages}", base, dict(default, num_stages=stages)
        for bn, bk in ((32, 32), (16, 16), (16, 64), (32, 64)):
            yield f"BLOCK_N={bn} BLOCK_K={bk}", base, dict(default, BLOCK_N=bn, BLOCK_K=bk)
        for warps in (1, 2, 8):
            yield f"num_warps={warps}", base, dict(default, num_warps=warps)
        yield "BLOCK_M=32", base, dict(default, BLOCK_M=32)
    yield "x·W_fᵀ + bias only", dict(base, u=None, vt=None), default
    yield "xbs·Aᵀ + bias only", dict(base, x=None, wt=None), default
    yield "both products, no bias", dict(base, bias=None), default
    yield "A.t() copied (strides (N, 1))", dict(base, vt=A.t().contiguous()), default
    yield "W_f.t() copied (strides (N, 1))", dict(base, wt=weight.t().contiguous()), default
    yield "xbs with strides (2, 1)", dict(base, u=torch.cat([xbs, xbs], 1)[:, :R]), default


def small_grid(dry_run):
    """(M, K, N, R, dtype) of the shape grid: sizes around the tile edges, ranks 1 to 16."""
    if dry_run:
        return [(1, 17, 5, 1, torch.float32), (3, 17, 16, 2, torch.bfloat16)]
    sizes_m, sizes_n, sizes_k, ranks = (1, 2, 9, 16, 17), (1, 5, 16, 17), (1, 17, 40), (1, 3, 16)
    return [(m, k, n, r, dt) for dt in (torch.float32, torch.bfloat16)
            for m, n, k, r in itertools.product(sizes_m, sizes_n, sizes_k, ranks)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None,
                        help="markdown file written as rows come in, its folder created if missing")
    parser.add_argument("--budget-s", type=float, default=50.0, help="stop the shape grid after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="CPU through the interpreter, two grid shapes")
    args = parser.parse_args(argv)
    if args.out:
        prepare_out(parser, args.out)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    from dynrank.kernels._runtime import interpreting
    if device.type == "cpu" and not interpreting():
        parser.error("no CUDA device: run with --dry-run and TRITON_INTERPRET=1 set (the interpreter)")
    start = time.perf_counter()
    handle = open(args.out, "w", encoding="utf-8") if args.out else None
    wrong = 0

    def emit(line):
        print(line, flush=True)
        if handle:
            handle.write(line + "\n")
            handle.flush()

    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    emit(f"# GEMM engine diagnosis: {name}, torch {torch.__version__}, triton {triton.__version__}\n")
    emit(f"Failing launch of 2026-11-26: (M, K, N, R) = {FAILING}, float32, `y = x·W_fᵀ + xbs·Aᵀ + bias`.\n")
    emit("| change | config | rel. error | result |\n|---|---|---|---|")
    for label, kwargs, config in variants(device):
        err, tol = _check(**kwargs, config=config)
        wrong += not err < tol          # not `err >= tol`: a NaN result (False both ways) is wrong too
        shown = "default" if config is None else " ".join(f"{k}={v}" for k, v in config.items() if k != "GROUP_M")
        emit(f"| {label} | {shown} | {err:.2e} | {'ok' if err < tol else 'WRONG'} |")
    err, tol = _check_specialized_m(device)
    emit(f"| reproduction, not counted: M specialized to 1 (the engine before the fix) | default | {err:.2e} | "
         f"{'ok: no fault here' if err < tol else 'WRONG: the fault, reproduced'} |")
    if device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            M, K, N, R = FAILING
            x, weight, A, B, bias = _operands(M, K, N, R, torch.float32, device)
            err, _ = _check(x, weight.t(), x @ B * 0.75, A.t(), bias)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        wrong += not err < TF32_TOL
        emit(f"| input_precision tf32 (allow_tf32) | default | {err:.2e} | {'ok' if err < TF32_TOL else 'WRONG'} |")

    emit("\nSmall shapes through the default configs (adapter forward: both products and bias):\n")
    emit("| M | K | N | R | dtype | config | rel. error |\n|---|---|---|---|---|---|---|")
    grid = small_grid(args.dry_run)
    done = 0
    for M, K, N, R, dtype in grid:
        if time.perf_counter() - start > args.budget_s:
            break
        x, weight, A, B, bias = _operands(M, K, N, R, dtype, device)
        err, tol = _check(x, weight.t(), (x @ B).to(dtype), A.t(), bias)
        done += 1
        if not err < tol:
            wrong += 1
            config = _default_config(M, N, dtype) if device.type == "cuda" else {}
            shown = " ".join(f"{k}={v}" for k, v in config.items() if k != "GROUP_M")
            emit(f"| {M} | {K} | {N} | {R} | {str(dtype)[6:]} | {shown} | {err:.2e} WRONG |")
    emit(f"\n{done} of {len(grid)} grid shapes checked in {time.perf_counter() - start:.0f} s; "
         f"{wrong} wrong result(s) in all (variants and grid).")
    if handle:
        handle.close()
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
