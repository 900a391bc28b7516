"""Tile configs of the GEMM engine against cuBLAS, side by side on one GPU.

The engine (``kernels/lowrank_gemm.py``) picks one tile config per problem shape without
autotuning.  This times the adapter forward, ``y = x·W_fᵀ + xbs·Aᵀ + bias`` in one launch, under
each candidate config at the adapter target shapes of issue 7 (bf16, rank 16), through the
pointer engine and through the experimental TMA-descriptor one (``kernels/lowrank_gemm_tma.py``),
beside cuBLAS's dense ``x·W_fᵀ`` (the floor) and the cuBLAS path dynrank uses by default
(``F.linear(xbs, A, bias)`` then ``addmm_``).  Each row gives the time, TFLOP/s of the dense part, and the time over
cuBLAS's dense GEMM; the config in use today is marked.  Each provider's maximum error against the
float64 result of the same operands is measured before it is timed.

    python benchmarks/sweep_tiles.py --out sweep.md          # CUDA
    python benchmarks/sweep_tiles.py --dry-run               # CPU: tiny shapes through the interpreter

Numbers are only comparable within one run on one device.
"""

import argparse
import os
import statistics
import sys

try:
    import dynrank  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))    # the suites' helpers
from _bench_common import at_least, prepare_out  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the current large-problem config first, then
# deeper pipelines, Triton's tutorial config for Hopper, and a narrower one.
CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
           (128, 64, 64, 4, 4)]
SHAPES = [(2048, 4096), (4096, 4096), (8192, 4096), (2048, 8192), (4096, 8192), (8192, 8192)]
RANK = 16


def _config(entry):
    block_m, block_n, block_k, warps, stages = entry
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=stages)


def wrong(error, tolerance):
    """Whether a row's ``error`` (None: not checked) is a wrong result: anything not below ``tolerance``,
    NaN included (a launch that writes NaN, or reads memory never written, compares False both ways)."""
    return error is not None and not error < tolerance


def _median_seconds(fn, device, repeats):
    import torch
    if device.type != "cuda":
        fn()
        return None
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def sweep(shapes, configs, device, dtype, repeats=20, log=print):
    """Rows (shape, provider, seconds, max abs error against float64) for every shape and config."""
    import torch

    from dynrank.kernels import lowrank_gemm
    from dynrank.kernels.lowrank_gemm import _native_config
    from dynrank.kernels.lowrank_gemm_tma import lowrank_gemm_tma
    rows = []
    for tokens, features in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(tokens, features, device=device, generator=gen).to(dtype)
        weight = (torch.randn(features, features, device=device, generator=gen) / features ** 0.5).to(dtype)
        A = (torch.randn(features, RANK, device=device, generator=gen) * 0.02).to(dtype)
        xbs = (torch.randn(tokens, RANK, device=device, generator=gen)).to(dtype)
        bias = torch.randn(features, device=device, generator=gen).to(dtype)

        def cublas_path():
            y = torch.nn.functional.linear(xbs, A, bias)
            return y.addmm_(x, weight.t())
        # The exact result of these (rounded) operands, so every provider's error is its own.
        expected = (x.double() @ weight.double().t() + xbs.double() @ A.double().t() + bias.double())
        shape = f"T{tokens} K=N={features}"
        rows.append((shape, "cuBLAS dense x·W_fᵀ", _median_seconds(lambda: x @ weight.t(), device, repeats), None))
        rows.append((shape, "cuBLAS path (default)", _median_seconds(cublas_path, device, repeats),
                     (cublas_path().double() - expected).abs().max().item()))
        current = _native_config(tokens, features, dtype)
        for entry in configs:
            config = _config(entry)
            name = "×".join(map(str, entry[:3])) + f" w{entry[3]} s{entry[4]}"
            engines = [("engine " + name + (" (current)" if config == current else ""),
                        lambda c=config: lowrank_gemm(x, weight.t(), xbs, A.t(), bias, config=c)),
                       ("engine+TMA " + name,
                        lambda c=config: lowrank_gemm_tma(x, weight.t(), xbs, A.t(), bias, config=c))]
            for provider, run in engines:
                try:
                    error = (run().double() - expected).abs().max().item()
                    seconds = _median_seconds(run, device, repeats)
                except Exception as err:      # a config the device cannot hold (e.g. shared memory)
                    log(f"{shape} {provider}: {type(err).__name__}: {str(err).splitlines()[0]}")
                    continue
                rows.append((shape, provider, seconds, error))
    return rows


def render(rows, title):
    lines = [f"# {title}", "", "| shape | provider | time | dense TFLOP/s | over cuBLAS dense | max abs err vs float64 |",
             "|---|---|---|---|---|---|"]
    dense = {}
    for shape, provider, seconds, error in rows:
        if provider.startswith("cuBLAS dense"):
            dense[shape] = seconds
        tokens, features = (int(v) for v in shape[1:].split(" K=N="))
        flops = 2 * tokens * features * features
        rate = f"{flops / seconds / 1e12:.0f}" if seconds else "-"
        ratio = f"{seconds / dense[shape]:.3f}×" if seconds and dense.get(shape) else "-"
        time = f"{seconds * 1e6:.0f} µs" if seconds else "-"
        err = "-" if error is None else f"{error:.3g}"
        lines.append(f"| {shape} | {provider} | {time} | {rate} | {ratio} | {err} |")
    return "\n".join(lines) + "\n"


def parse_sweep_args(doc, script, argv=None):
    """A sweep script's command line (``--out``, ``--repeats``, ``--dry-run``): (args, device, device name).

    ``--dry-run`` sets ``TRITON_INTERPRET=1`` before triton is imported (tiny shapes on the CPU);
    otherwise CUDA is required.  ``--out``'s folder is created (or the path refused) before any work.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out",
                        help="markdown file for the table, its folder created if missing (default: print only)")
    parser.add_argument("--repeats", type=at_least(1), default=20, help="timed calls per row (their median)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU through Triton's interpreter (checks the script, times nothing)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if args.out:
        prepare_out(parser, args.out)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error(f"{script} times CUDA kernels; torch sees no GPU here (--dry-run checks it on a CPU)")
    if args.dry_run:
        return args, torch.device("cpu"), "CPU dry run"
    return args, torch.device("cuda"), torch.cuda.get_device_name()


def main(argv=None):
    args, device, name = parse_sweep_args(__doc__, "sweep_tiles.py", argv)
    import torch
    import triton
    shapes = [(40, 48)] if args.dry_run else SHAPES
    configs = [(32, 32, 16, 4, 2)] if args.dry_run else CONFIGS
    title = (f"Engine tile configs, adapter forward, bf16, rank {RANK} — {name}, torch {torch.__version__}, "
             f"triton {triton.__version__}")
    rows = []
    for shape in shapes:     # the table is rewritten after every shape, so a cut-off run keeps what it has
        rows += sweep([shape], configs, device, torch.bfloat16, args.repeats)
        text = render(rows, title)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as handle:
                handle.write(text)
    print(text)
    bad = [r for r in rows if wrong(r[3], 0.5)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
