"""Where the time of dynrank's Triton path goes on a GPU: host-side launch cost and kernel time.

The first H200 run (benchmarks/KERNEL_NOTES.md) found the Triton path about 1 ms slower per
forward+backward than cuBLAS at every shape, small ones included, so the cost is per call rather
than per FLOP.  This script separates the two:

1. host time per launch (no synchronization inside the loop) of an empty Triton kernel, of the
   engine ``lowrank_gemm`` on a tiny problem and of ``torch.mm`` on the same problem, and of the
   merge kernel and ``addmm_`` on a tiny merge;
2. host time per call of the lowrank and adapter forms, forward and forward+backward, through
   the torch engine, the Triton path and unfused torch, at a shape too small to keep the GPU busy,
   and the kernel time per forward+backward of the lowrank form against unfused torch at two
   target shapes (host or GPU: where the form's gap to unfused torch is);
3. ``torch.profiler`` tables (CPU and CUDA time per op) of one adapter forward+backward through
   the Triton path and through the cuBLAS path, at a target shape;
4. where the GPT-2-small training step of the epoch suite spends its time per form (full,
   lowrank ρ = 0.25, the same with the LM head factorized): wall time per step, GPU kernel time
   per step by kind (GEMM, attention, optimizer, the rest) and kernels launched per step, so a
   lowrank step that is not faster than full rank shows whether it is host-bound or which kernels
   grew;
5. forward+backward of the lowrank and adapter forms per call and queued (20 calls per
   synchronize), with the host's CUDA runtime calls of a queued round: a call that waits for the
   queued work shows there.

    python benchmarks/profile_ops.py --out profile.txt      # needs CUDA
    python benchmarks/profile_ops.py --device cpu           # the host time per call only, on a CPU

``--tokens``, ``--features`` and ``--rank`` set the shape of section 3 on CUDA, and of the host-time
table on a CPU; on CUDA that table keeps a shape too small to keep the GPU busy.

Everything printed is also written to ``--out``.
"""

import argparse
import datetime
import os
import re
import sys
import time

import torch

try:
    import dynrank  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The suites' helpers (and test_bench_epoch's models), as the suites import them.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import at_least, cpu_model, dtype_name, inplace_adapter, prepare_out, sync  # noqa: E402


def host_microseconds(fn, calls=2000, device="cuda"):
    """Mean host time of one call, launches queued without synchronizing in between."""
    for _ in range(20):
        fn()
    sync(torch.device(device))
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls
    sync(torch.device(device))
    return 1e6 * host


def launch_costs(lines):
    import triton

    from dynrank.kernels import merge_
    from dynrank.kernels.lowrank_gemm import lowrank_gemm

    @triton.jit
    def _empty(ptr):
        pass

    one = torch.empty(1, device="cuda")
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, 16, device="cuda", dtype=torch.bfloat16)
    # The merge's own kernel binds 13 arguments where the engine binds 30.
    rows = [("empty Triton kernel", lambda: _empty[(1,)](one)),
            ("lowrank_gemm 64×64·64×16 (engine)", lambda: lowrank_gemm(x, w)),
            ("torch.mm 64×64·64×16 (cuBLAS)", lambda: torch.mm(x, w)),
            ("merge_ 64×64 += 64×16·16×64 (merge kernel)", lambda: merge_(x, w, w, 1e-3)),
            ("addmm_ 64×64 += 64×16·16×64 (cuBLAS)", lambda: x.addmm_(w, w.t(), alpha=1e-3))]
    lines.append("host time per launch (µs, mean of 2000 queued calls)")
    for name, fn in rows:
        lines.append(f"  {name:<44} {host_microseconds(fn):8.1f}")


def host_per_call(lines, tokens=64, features=256, rank=8, device="cuda", calls=500, rounds=1):
    """Host time of one forward+backward (and forward alone) per path, at a shape too small to keep the GPU busy.

    The linear suite found ``FusedLowRankLinear`` in the lowrank form 0.4–0.99× as fast as two
    ``F.linear`` on the H200 although both run the same cuBLAS GEMMs, so the gap is host time.  The
    conv layers follow, beside ``nn.Conv2d``, at a tiny image, and ``merge_`` beside a bare ``addmm_``
    (a call, no backward).  The paths take turns within each of ``rounds`` rounds and each keeps its
    median round, so a CPU host's drift reaches every path alike.  On a CPU (fp32, one thread) the time is the host's whole cost of
    a call, its tiny math included.
    """
    import statistics

    import torch.nn.functional as F
    from torch import nn

    from dynrank import FusedLowRankLinear, LowRankConv2d
    from dynrank.functional import merge_

    device = torch.device(device)
    kw = dict(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    x = torch.randn(tokens, features, requires_grad=True, **kw)
    grad = torch.randn(tokens, features, **kw)
    down = torch.randn(rank, features, requires_grad=True, **kw)
    up = torch.randn(features, rank, requires_grad=True, **kw)
    bias = torch.zeros(features, requires_grad=True, **kw)
    frozen_bias = bias.detach()   # the adapters' bias is frozen with W_f, as in the linear suite
    weight = torch.randn(features, features, **kw)
    dense = nn.Linear(features, features, **kw)
    two = nn.Sequential(nn.Linear(features, rank, bias=False, **kw), nn.Linear(rank, features, **kw))
    full = FusedLowRankLinear(features, features, rank, form="full", **kw)
    lowrank = FusedLowRankLinear(features, features, rank, form="lowrank", **kw)
    adapter = FusedLowRankLinear(features, features, rank, form="adapter", alpha=16.0, **kw)
    adapter.bias.requires_grad_(False)
    image = torch.randn(1, 8, 4, 4, requires_grad=True, **kw)
    image_grad = torch.randn(1, 8, 4, 4, **kw)
    conv = nn.Conv2d(8, 8, 3, padding=1, **kw)
    convs = {form: LowRankConv2d(8, 8, 3, rank=2, padding=1, form=form, **kw) for form in ("full", "lowrank", "adapter")}
    triton = device.type == "cuda"
    merge_target, A, B = weight.clone(), up.detach(), down.detach().t()
    # (name, backend, call, gradient of its output: None where the call has no backward)
    paths = [
        ("nn.Linear", None, lambda: dense(x), grad),
        ("FusedLowRankLinear full", None, lambda: full(x), grad),
        ("unfused lowrank, two F.linear", None, lambda: F.linear(F.linear(x, down), up, bias), grad),
        ("two nn.Linear modules", None, lambda: two(x), grad),
        ("FusedLowRankLinear lowrank", "torch", lambda: lowrank(x), grad),
        *([("FusedLowRankLinear lowrank", "triton", lambda: lowrank(x), grad)] if triton else []),
        ("unfused adapter (LoRA)", None,
         lambda: F.linear(x, weight, frozen_bias) + F.linear(F.linear(x, down), up) * 2.0,
         grad),
        ("FusedLowRankLinear adapter", "torch", lambda: adapter(x), grad),
        ("in-place adapter, autograd's nodes", None,
         lambda: inplace_adapter(x, weight, down, up, frozen_bias, 2.0), grad),
        *([("FusedLowRankLinear adapter", "triton", lambda: adapter(x), grad)] if triton else []),
        ("nn.Conv2d 8→8 3×3 on 1×8×4×4", None, lambda: conv(image), image_grad),
        *((f"LowRankConv2d {form} (SVD, rank 2)", None, lambda layer=layer: layer(image), image_grad)
          for form, layer in convs.items()),
        # The inflate-merge on the layer's weight (W += α·A·Bᵀ).
        ("W.addmm_(A, Bᵀ), bare", None, lambda: merge_target.addmm_(A, B.t(), alpha=1e-3), None),
        ("dynrank merge_", "torch", lambda: merge_(merge_target, A, B, 1e-3), None),
    ]
    times = [([], []) for _ in paths]
    saved = os.environ.pop("DYNRANK_BACKEND", None)
    try:
        for _ in range(rounds):
            for (_, backend, call, out_grad), (call_times, both_times) in zip(paths, times):
                if backend:
                    os.environ["DYNRANK_BACKEND"] = backend
                call_times.append(host_microseconds(call, calls, device))
                if out_grad is not None:
                    both_times.append(host_microseconds(
                        lambda call=call, out_grad=out_grad: call().backward(out_grad), calls, device))
                os.environ.pop("DYNRANK_BACKEND", None)
    finally:
        if saved is not None:
            os.environ["DYNRANK_BACKEND"] = saved
    what = "mean of {calls} queued calls" if device.type == "cuda" else "mean of {calls} calls"
    lines.append(f"\nhost time per call (µs, {what.format(calls=calls)}"
                 + (f", median of {rounds} rounds" if rounds > 1 else "")
                 + f"), T{tokens} K=N={features} r{rank} {dtype_name(kw['dtype'])} on {device.type}")
    for (name, backend, _, _), path_times in zip(paths, times):
        fwd, both = (f"{statistics.median(t):8.1f}" if t else f"{'-':>8}" for t in path_times)
        label = f"{name}" + (f" ({backend})" if backend else "")
        lines.append(f"  {label:<44} forward {fwd}   forward+backward {both}")


def profile_adapter(lines, tokens, features, rank, device=None, steps=10):
    """Profiler tables (ops by host time, kernels by GPU time) of the adapter's forward+backward: the
    Triton kernels (CUDA only), the torch path (one autograd node), and the same math in place on
    autograd's own nodes (the linear suite's ``torch_inplace``), which launches more kernels."""
    from torch.profiler import ProfilerActivity, profile

    from dynrank import FusedLowRankLinear

    device = torch.device(device or "cuda")
    kw = dict(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    layer = FusedLowRankLinear(features, features, rank, form="adapter", alpha=16.0, **kw)
    with torch.no_grad():
        layer.A.normal_(0, 0.02)
    layer.bias.requires_grad_(False)
    A, B, W, bias = layer.A, layer.B, layer.weight, layer.bias
    scale = layer.scale_for(rank)
    x = torch.randn(tokens, features, requires_grad=True, **kw)
    grad = torch.randn(tokens, features, **kw)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    runs = ([("DYNRANK_BACKEND=triton", "triton", lambda: layer(x))] if device.type == "cuda" else []) + [
        ("DYNRANK_BACKEND=torch", "torch", lambda: layer(x)),
        ("in place on autograd's nodes", None, lambda: inplace_adapter(x, W, B.t(), A, bias, scale)),
    ]
    for title, backend, forward in runs:
        if backend:
            os.environ["DYNRANK_BACKEND"] = backend

        def step():
            x.grad = A.grad = B.grad = None
            forward().backward(grad)
        try:
            for _ in range(5):
                step()
            sync(device)
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    step()
                sync(device)
        finally:
            os.environ.pop("DYNRANK_BACKEND", None)
        lines.append(f"\nadapter fwd+bwd T{tokens} K=N={features} r{rank} {dtype_name(kw['dtype'])}, "
                     f"{title}, {steps} steps")
        lines.append(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18))


def profile_lowrank_kernels(lines, shapes=((8192, 8192, 16), (4096, 4096, 512)), device=None, steps=5):
    """Kernel time per forward+backward of the lowrank form: dynrank's (x·B with B (in, rank), then
    ·Aᵀ) against unfused torch's two ``F.linear`` (``down`` (rank, in), then ``up``), same GEMMs.

    The linear suite of 2026-11-27 had the lowrank form at 0.64–1.16× of unfused torch on an H200
    (0.54× at rank 512). Equal kernel time here puts the gap on the host; more puts it on cuBLAS
    running B's layout slower. On a CPU the kernels are the aten ops, by their own CPU time.
    """
    import torch.nn.functional as F

    from dynrank import FusedLowRankLinear

    device = torch.device(device or "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lines.append(f"\nlowrank form forward+backward, {dtype}, {steps} steps: kernel µs per step, kernels per step")
    for tokens, features, rank in shapes:
        kw = dict(device=device, dtype=dtype)
        x = torch.randn(tokens, features, requires_grad=True, **kw)
        grad = torch.randn(tokens, features, **kw)
        layer = FusedLowRankLinear(features, features, rank, form="lowrank", **kw)
        down = layer.B.detach().t().contiguous().requires_grad_()
        up, bias = (p.detach().clone().requires_grad_() for p in (layer.A, layer.bias))
        tensors = (x, down, up, bias, *layer.parameters())
        for name, forward in (("unfused, two F.linear", lambda: F.linear(F.linear(x, down), up, bias)),
                              ("dynrank lowrank", lambda: layer(x))):
            def step():
                for t in tensors:
                    t.grad = None
                forward().backward(grad)
            kinds, launches, _ = profile_steps(step, device, steps)
            lines.append(f"  T{tokens} K=N={features} r{rank:<4} {name:<22} {1e3 * sum(kinds.values()):9.1f} µs "
                         f"{launches:6.1f} kernels")


def profile_queued(lines, shapes=((4096, 4096, 512), (8192, 8192, 16)), device=None, calls=20, rounds=3):
    """Forward+backward of the lowrank and adapter forms, each call synchronized and ``calls`` queued per
    synchronize, with the host's CUDA runtime calls of one queued round by their host time.

    The linear suite of 2026-11-27 (second H200 session) had dynrank's lowrank form slower queued
    than synchronized per call (570 against 297 µs at T4096, K = N = 4096, rank 512), where every
    other provider was as fast or faster queued.  A runtime call that waits for the queued work
    (a synchronize, a blocking copy, a stream query) would do that: it shows here as a large host
    time in the runtime rows of dynrank's table and not in unfused torch's.
    """
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from dynrank import FusedLowRankLinear

    device = torch.device(device or "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    lines.append(f"\nforward+backward per call, synchronized after each call and {calls} queued per synchronize, "
                 f"{dtype_name(dtype)}, fastest of {rounds} rounds (µs), and the host's CUDA runtime calls of one "
                 "queued round (µs of host time per call)")
    for tokens, features, rank in shapes:
        kw = dict(device=device, dtype=dtype)
        x = torch.randn(tokens, features, requires_grad=True, **kw)
        grad = torch.randn(tokens, features, **kw)
        for form in ("lowrank", "adapter"):
            layer = FusedLowRankLinear(features, features, rank, form=form, alpha=2.0 * rank, **kw)
            with torch.no_grad():
                layer.A.normal_(0, 0.02)
            up, down = (p.detach().clone().requires_grad_() for p in (layer.A, layer.B.t().contiguous()))
            scale, weight, bias = layer.scale, layer.weight, layer.bias.detach().clone().requires_grad_()

            def unfused():
                low = scale * F.linear(F.linear(x, down), up)
                return low + F.linear(x, weight, bias) if weight is not None else low + bias
            with torch.no_grad():     # the same function, or the comparison means nothing
                ref, got = unfused().float(), layer(x).float()
                if not (got - ref).norm() <= 2e-2 * ref.norm():
                    raise RuntimeError(f"profile_queued: unfused torch and dynrank's {form} form disagree "
                                       f"(relative error {((got - ref).norm() / ref.norm()).item():.2e})")
            tensors = (x, up, down, bias, *layer.parameters())
            for name, forward in (("unfused torch", unfused), ("dynrank", lambda: layer(x))):
                def step():
                    for t in tensors:
                        t.grad = None
                    forward().backward(grad)

                def timed(queue):
                    best = float("inf")
                    for _ in range(rounds):
                        sync(device)
                        start = time.perf_counter()
                        for _ in range(queue):
                            step()
                            if queue == 1:
                                sync(device)
                        sync(device)
                        best = min(best, (time.perf_counter() - start) / queue)
                    return 1e6 * best
                for _ in range(3):
                    step()
                per_call, queued = timed(1), timed(calls)
                with profile(activities=activities) as prof:
                    for _ in range(calls):
                        step()
                    sync(device)
                runtime = sorted(((e.cpu_time_total / calls, e.count / calls, e.key) for e in prof.key_averages()
                                  if re.match(r"cu[A-Z]|cuda[A-Z]", e.key)), reverse=True)
                calls_text = ", ".join(f"{key} {t:.1f} ({n:g}×)" for t, n, key in runtime[:5]) or "none"
                lines.append(f"  T{tokens} K=N={features} r{rank:<4} {form:<8} {name:<14} per call {per_call:8.1f}"
                             f"  queued {queued:8.1f}  runtime: {calls_text}")
            del layer


def profile_steps(step, device, steps, warmup=3):
    """``step`` run ``warmup`` times, then ``steps`` times under ``torch.profiler``, each timed to its
    end on ``device``: (ms per step by kernel kind, kernels per step, wall seconds per step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(warmup):
        step()
    sync(device)
    walls = []
    with profile(activities=activities) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            sync(device)
            walls.append(time.perf_counter() - start)
    kinds, launches = step_breakdown(_device_events(prof, device), steps)
    return kinds, launches, walls


# Kinds of kernels, by name: cuBLAS/CUTLASS GEMMs (and aten's mm ops on a CPU), the fused
# attention kernels, the optimizer's multi-tensor kernels; everything else is "rest".
KERNEL_KINDS = (   # in this order: attention kernels may be CUTLASS ones too
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|_lowrank_gemm|^aten::(mm|addmm|bmm|matmul|linear)$", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|_foreach", re.I)),
)


def kernel_kind(name):
    """``"gemm"``, ``"attention"``, ``"optimizer"`` or ``"rest"`` for a kernel (or CPU op) name."""
    for kind, pattern in KERNEL_KINDS:
        if pattern.search(name):
            return kind
    return "rest"


def step_breakdown(events, steps):
    """Per-step ms by kernel kind and kernels per step, from profiler events ``(name, device µs)``."""
    kinds = dict.fromkeys([kind for kind, _ in KERNEL_KINDS] + ["rest"], 0.0)
    for name, microseconds in events:
        kinds[kernel_kind(name)] += microseconds / 1e3 / steps
    return kinds, len(events) / steps


def _device_events(prof, device):
    """(name, µs) of every GPU kernel in ``prof`` (on a CPU: every aten op, by its self time)."""
    from torch.autograd import DeviceType
    if device.type == "cuda":
        # A kernel's own event: its time range is the kernel's run on the GPU.
        return [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return [(e.name, e.self_cpu_time_total) for e in prof.events() if e.name.startswith("aten::")]


def profile_lm_step(lines, device=None, steps=5):
    """The epoch suite's GPT-2-small step per form under ``torch.profiler``: where a step's time goes."""
    import statistics

    import test_bench_epoch as epoch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = epoch.model_config("transformer")
    lines.append(f"\nGPT-2-shaped training step ({', '.join(f'{k} {v}' for k, v in cfg.items())}), {steps} steps "
                 "per form; GPU kernel ms per step by kind" + ("" if device.type == "cuda" else " (CPU: aten ops)"))
    lines.append(f"  {'form':<22} {'wall ms':>8} {'kernels ms':>10} {'gemm':>7} {'attention':>9} {'optimizer':>9} "
                 f"{'rest':>7} {'launches':>8}")
    for name, form, rank_ratio, head in (("full", "full", None, False), ("lowrank-rho0.25", "lowrank", 0.25, False),
                                         ("lowrank-rho0.25+head", "lowrank", 0.25, True)):
        step, model, _ = epoch.make_transformer_step(form, rank_ratio, cfg, device=device, factorize_head=head)
        kinds, launches, walls = profile_steps(step, device, steps)
        total = sum(kinds.values())
        lines.append(f"  {name:<22} {1e3 * statistics.median(walls):8.2f} {total:10.2f} {kinds['gemm']:7.2f} "
                     f"{kinds['attention']:9.2f} {kinds['optimizer']:9.2f} {kinds['rest']:7.2f} {launches:8.0f}")
        del step, model
    lines.append("  (wall time under the profiler, which adds host time per op; kernels ms is GPU busy time: "
                 "wall far above it means the step waits on the host)")


# (tokens, features, rank) where the flags leave them: section 3's adapter on CUDA; the host-time
# table on a CPU (on CUDA that table keeps its own shape, small enough to leave the GPU idle).
SHAPE = {"cuda": (4096, 4096, 16), "cpu": (4, 16, 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="text file for the report, its folder created if missing (default: print only)")
    where = "section 3's adapter on CUDA, the host-time table with --device cpu"
    parser.add_argument("--tokens", type=at_least(1), default=None,
                        help=f"tokens T of {where} (default {SHAPE['cuda'][0]} on CUDA, {SHAPE['cpu'][0]} on the CPU)")
    parser.add_argument("--features", type=at_least(1), default=None,
                        help=f"in = out features of {where} (default {SHAPE['cuda'][1]}, {SHAPE['cpu'][1]})")
    parser.add_argument("--rank", type=at_least(1), default=None,
                        help=f"rank of {where} (default {SHAPE['cuda'][2]}, {SHAPE['cpu'][2]})")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: only the host time per call (section 2's first table), one thread")
    parser.add_argument("--rounds", type=at_least(1), default=None,
                        help="rounds of the host-time table (default 1 on CUDA, 15 on the CPU)")
    args = parser.parse_args(argv)
    tokens, features, rank = (default if value is None else value
                              for value, default in zip((args.tokens, args.features, args.rank), SHAPE[args.device]))
    if rank > features:
        parser.error(f"--rank must be at most the features ({features}), got {rank}")
    if args.out:
        prepare_out(parser, args.out)
    if args.device == "cpu":
        import platform

        torch.set_num_threads(1)
        rounds = 15 if args.rounds is None else args.rounds
        lines = [f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
                 f"Python {platform.python_version()}, one thread, {datetime.date.today().isoformat()}"]
        sections = (lambda out: host_per_call(out, tokens=tokens, features=features, rank=rank, device="cpu",
                                              calls=1000, rounds=rounds),)
    elif not torch.cuda.is_available():
        parser.error("profile_ops.py profiles CUDA launches; torch sees no GPU here (--device cpu times the host only)")
    else:
        import triton
        lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"]
        rounds = 1 if args.rounds is None else args.rounds
        sections = (launch_costs, lambda out: host_per_call(out, rounds=rounds), profile_lowrank_kernels,
                    profile_queued, lambda out: profile_adapter(out, tokens, features, rank), profile_lm_step)
    for section in sections:
        start = len(lines)
        section(lines)
        print("\n".join(lines[start:]), flush=True)
        if args.out:   # after every section: a run cut off by its time limit keeps what it measured
            with open(args.out, "w", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
