"""Tile configs of the merge kernel against ``addmm_`` and a copy, GPU time only.

The merge suite of 2026-11-27 (H200) had the merge kernel (``kernels/merge.py``) at 0.40–0.79× of
``addmm_``, and its timing includes the host's launch (52 µs against 19 µs for ``addmm_``).  This
times the kernels with CUDA events, so launch cost stays out. It shows whether the kernel itself
streams W at copy speed under some tile config, or what it falls short by.  Each row gives the
time, the bandwidth of W's read and write and its share of a plain copy of W in the same run.
Each config is checked against float64 before it is timed.

    python benchmarks/sweep_merge.py --out sweep-merge.md     # CUDA
    python benchmarks/sweep_merge.py --dry-run                # CPU: tiny shapes through the interpreter

Numbers are only comparable within one run on one device.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_tiles import _median_seconds, parse_sweep_args, wrong  # noqa: E402  (shared with the engine sweep)

try:
    import dynrank  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (BLOCK_N, BLOCK_K, num_warps, num_stages): today's config first (kernels/merge.py's _merge_config),
# then taller and wider tiles and other warp counts.  fp32 factors at IEEE precision take the FMA
# path, whose tiles hold one fp32 accumulator.
CONFIGS = {
    "bfloat16": [(64, 128, 8, 2), (32, 128, 4, 2), (64, 256, 8, 2), (128, 128, 8, 2), (128, 256, 8, 3),
                 (64, 128, 4, 3)],
    "float32": [(32, 128, 8, 1), (16, 128, 4, 1), (32, 256, 8, 1), (64, 128, 8, 1), (16, 256, 4, 1)],
}
SHAPES = [(4096, 4096), (8192, 8192)]
RANK = 16


def sweep(shapes, configs, device, dtype, repeats=20, log=print):
    """Rows (shape, provider, seconds, relative error against float64) for every shape and config."""
    import torch

    from dynrank.kernels import merge_, reference_merge
    from dynrank.kernels.lowrank_gemm import _fit, _input_precision
    from dynrank.kernels.merge import _merge_config
    current = _merge_config(dtype, _input_precision(dtype) == "ieee", RANK)
    rows = []
    alpha = 1e-3     # timed merges add to W again and again: keep the sums small
    for n, k in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        weight = torch.randn(n, k, device=device, generator=gen).to(dtype)
        A = torch.randn(n, RANK, device=device, generator=gen).to(dtype)
        B = torch.randn(k, RANK, device=device, generator=gen).to(dtype)
        expected = reference_merge(weight, A, B, alpha)
        scale = expected.abs().max().item()
        shape = f"{n}×{k} r{RANK}"
        target = torch.empty_like(weight)
        rows.append((shape, "copy of W", _median_seconds(lambda: target.copy_(weight), device, repeats), None))
        rows.append((shape, "addmm_ (cuBLAS)",
                     _median_seconds(lambda: target.addmm_(A, B.t(), alpha=alpha), device, repeats), None))
        for block_n, block_k, warps, stages in configs:
            config = dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_fit(RANK, 16, 64), num_warps=warps,
                          num_stages=stages)
            provider = f"merge kernel {block_n}×{block_k} w{warps} s{stages}" + (" (current)" if config == current
                                                                                else "")
            try:
                result = merge_(weight.clone(), A, B, alpha, config=config)
                error = (result.double() - expected).abs().max().item() / scale
                seconds = _median_seconds(lambda c=config: merge_(target, A, B, alpha, config=c), device, repeats)
            except Exception as err:      # a config the device cannot hold (registers, shared memory)
                log(f"{shape} {provider}: {type(err).__name__}: {str(err).splitlines()[0]}")
                continue
            rows.append((shape, provider, seconds, error))
    return rows


def render(rows, title, element_bytes):
    """Markdown table: time, GB/s of W read and written, share of the copy's GB/s, relative error."""
    lines = [f"# {title}", "", "| shape | provider | time | GB/s | % of copy | rel. error |", "|---|---|---|---|---|---|"]
    copy = {}
    for shape, provider, seconds, error in rows:
        n, k = (int(v) for v in shape.split(" ")[0].split("×"))
        rate = 2 * n * k * element_bytes / seconds / 1e9 if seconds else None
        if provider == "copy of W":
            copy[shape] = rate
        share = f"{100 * rate / copy[shape]:.0f}" if rate and copy.get(shape) else "-"
        time = f"{seconds * 1e6:.1f} µs" if seconds else "-"
        lines.append(f"| {shape} | {provider} | {time} | {f'{rate:.0f}' if rate else '-'} | {share} | "
                     f"{'-' if error is None else f'{error:.2g}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args, device, name = parse_sweep_args(__doc__, "sweep_merge.py", argv)
    import torch
    import triton
    shapes = [(40, 72)] if args.dry_run else SHAPES
    text, bad = "", []
    for dtype in (torch.bfloat16, torch.float32):
        configs = CONFIGS[str(dtype).split(".")[1]][:2 if args.dry_run else None]
        title = (f"Merge kernel tile configs, W += α·A·Bᵀ, {dtype}, rank {RANK} — {name}, torch {torch.__version__}, "
                 f"triton {triton.__version__}")
        rows = []
        for shape in shapes:     # rewritten after every shape: a cut-off run keeps what it has
            rows += sweep([shape], configs, device, dtype, args.repeats)
            table = render(rows, title, torch.finfo(dtype).bits // 8)
            if args.out:
                with open(args.out, "w", encoding="utf-8") as handle:
                    handle.write(text + table)
        text += table + "\n"
        bad += [r for r in rows if wrong(r[3], 1e-2 if dtype == torch.bfloat16 else 1e-5)]
    print(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
