"""Shared pieces of the benchmark suites: device, versions, roofline, grids, bookkeeping.

Every suite follows the same pattern:

1. a setup factory builds one provider's callable for one shape (untimed);
2. :func:`make_pass` turns it into the timed function of one pass (forward,
   backward or forward+backward), which synchronizes CUDA before returning;
3. :func:`describe` fills ``benchmark.extra_info`` and ``benchmark.group``
   before the run, :func:`finish` adds the derived rates after it.

Nothing here runs at import time: the roofline is measured lazily, once per
(device, dtype) per session, and only when benchmarks are actually timed.
"""

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import itertools
import math
import os
import platform
import time

import torch

from dynrank._args import check_int

__all__ = [
    "DEVICE", "ON_CUDA", "PASSES", "grid_mode", "sync", "cpu_model", "device_name", "versions", "roofline",
    "describe", "finish", "make_pass", "warm_up", "TIMINGS", "QUEUED_CALLS", "benchmark_queued", "time_pass",
    "optional_module", "require_module",
    "compile_enabled", "dtype_name", "flops_of", "env_override", "cuda_only_param", "measured_rooflines",
    "RESULTS", "triton_forced", "inplace_adapter", "prepare_out", "at_least",
]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
PASSES = ("forward", "backward", "fwd+bwd")
# How a pass is timed: ``call`` synchronizes after every call (latency: the host's time up to the
# first launch counts); ``queued`` queues QUEUED_CALLS calls and synchronizes once (throughput).
TIMINGS = ("call", "queued")
QUEUED_CALLS = 20
GRIDS = ("cpu", "targets", "full")

# Results of finished benchmarks in this session, by group (the epoch suite
# keeps (mean, trainable params) of the full form for the later forms' ratios).
RESULTS = {}


def grid_mode():
    """Shape grid of this session: ``cpu``, ``targets`` or ``full``.

    ``DYNRANK_BENCH_GRID`` selects between ``targets`` (default on CUDA: the
    shapes the speed targets are stated on, plus a few representatives)
    and ``full`` (every shape).  Without CUDA the small ``cpu`` grid always
    runs: the GPU shapes would take hours on a CPU.
    """
    if not ON_CUDA:
        return "cpu"
    value = os.environ.get("DYNRANK_BENCH_GRID", "targets").strip().lower() or "targets"
    if value not in GRIDS[1:]:
        raise ValueError(f"DYNRANK_BENCH_GRID must be 'targets' or 'full', got {value!r}")
    return value


def compile_enabled():
    """Whether torch.compile providers run: on CUDA, or on CPU with DYNRANK_BENCH_COMPILE=1."""
    return ON_CUDA or os.environ.get("DYNRANK_BENCH_COMPILE", "0") == "1"


def sync(device=DEVICE):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def cpu_model():
    """The CPU's model name where the system tells it (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def device_name(device=DEVICE):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({torch.get_num_threads()} threads)"


def _dist_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def versions():
    """Versions that decide the numbers; triton's is read without importing it."""
    info = {
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "dynrank": _dist_version("dynrank"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if ON_CUDA else None,
    }
    for optional in ("peft", "tensorly"):          # timed providers where installed (LoRA; the conv merges)
        version = _dist_version(optional)
        if version:
            info[optional] = version
    return info


def optional_module(name):
    """Import ``name`` or return None (modules other sessions may not have written yet)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def require_module(name, why, attr=None):
    """Import ``name`` (and return its ``attr`` when given) or skip the calling test with a reason."""
    import pytest

    module = optional_module(name)
    if module is None:
        pytest.skip(f"{name} is not importable: {why}")
    if attr is None:
        return module
    if not hasattr(module, attr):
        pytest.skip(f"{name} has no {attr} yet: {why}")
    return getattr(module, attr)


def at_least(low, kind=int, why=""):
    """An argparse type: a ``kind`` (int, or a finite float) ≥ ``low``; argparse names the flag, ``why``
    follows the bound in the message."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a finite number'} "
                                             f"≥ {low}{why}, got {text!r}")
        return value
    return parse


def prepare_out(parser, path, flag="--out"):
    """Make ``path`` (a script's ``--out`` file, or the file of another ``flag``) writable before any
    work: its folder is created; a path that is a folder, or whose folder is a file or cannot be made,
    is refused with ``parser.error``.  Scripts that write their table after each section would
    otherwise spend the first one's (GPU) time and then fail to open the file."""
    if os.path.isdir(path):
        parser.error(f"{flag} {path}: is a folder, expected a file to write")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        parser.error(f"{flag} {path}: {folder} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        parser.error(f"{flag} {path}: cannot create its folder {folder} ({err.strerror})")
    if not os.access(folder, os.W_OK):
        parser.error(f"{flag} {path}: its folder {folder} is not writable")


@contextlib.contextmanager
def env_override(**values):
    """Temporarily set environment variables (dynrank reads DYNRANK_BACKEND per call)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def triton_forced(fn, timed=True):
    """``fn`` with dynrank's Triton kernels forced (``DYNRANK_BACKEND=triton``) for each call.

    The provider ``dynrank_triton`` times the kernels beside ``dynrank`` (the
    ``auto`` choice) on CUDA; the backward of a call follows its forward's
    choice.  Skips off CUDA, where the kernels only run interpreted; with
    ``timed=False`` (a correctness check, not a timing) it runs them there in
    Triton's interpreter when ``TRITON_INTERPRET=1`` is set.
    """
    import pytest

    if not ON_CUDA and (timed or os.environ.get("TRITON_INTERPRET", "0") != "1"):
        pytest.skip("the Triton kernels are timed on CUDA (off it they only run in the interpreter)" if timed
                    else "off CUDA the Triton kernels need TRITON_INTERPRET=1 (set before triton is imported)")

    def run(*args, **kwargs):
        with env_override(DYNRANK_BACKEND="triton"):
            return fn(*args, **kwargs)
    return run


def inplace_adapter(x, weight, down, up, bias, scale):
    """The adapter's math as plain torch ops at their best: ``addmm(bias, x·downᵀ, upᵀ, alpha=scale)``,
    then ``x·weightᵀ`` added in place (no pass over a T × N tensor of its own; autograd's nodes run its
    backward: 8 kernels, against dynrank's node's 5).  ``down`` is (rank, in), ``up`` (out, rank)."""
    return torch.addmm(bias, torch.nn.functional.linear(x, down), up.t(), alpha=scale).addmm_(x, weight.t())


def cuda_only_param(values, id_, reason):
    """A parameter that exists in every grid but runs only on CUDA (visible skip elsewhere)."""
    import pytest

    marks = () if ON_CUDA else (pytest.mark.skip(reason=reason),)
    return pytest.param(values, id=id_, marks=marks)


# ---------------------------------------------------------------------------
# Roofline: measured once per (device, dtype) and session
# ---------------------------------------------------------------------------

def _best_seconds(fn, device, repeats):
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def roofline(device=DEVICE, dtype=torch.float32):
    """Measured ceilings on ``device``: peak matmul TFLOP/s in ``dtype`` and copy GB/s.

    Peak matmul: best of ten square GEMMs (8192² on CUDA, 1024² on CPU).
    Copy: best of ten ``dst.copy_(src)`` of 1 GiB on CUDA (64 MiB on CPU),
    counting the read and the write.  Small CPU shapes that stay in cache can
    exceed this copy rate.  fp32 on CUDA follows
    ``torch.backends.cuda.matmul.allow_tf32`` at measurement time.

    Returns:
        dict with ``peak_tflops``, ``copy_gbps`` and the sizes used.
    """
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _best_seconds(lambda: torch.mm(a, b), device, 10)
    peak_tflops = 2.0 * n ** 3 / seconds / 1e12
    numel = (1 << 30) // 4 if device.type == "cuda" else (64 << 20) // 4
    src = torch.empty(numel, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), device, 10)
    copy_gbps = 2.0 * numel * 4 / seconds / 1e9
    result = {"peak_tflops": peak_tflops, "copy_gbps": copy_gbps, "matmul_n": n, "copy_bytes": numel * 4}
    if device.type == "cuda" and dtype == torch.float32:
        from dynrank.kernels.lowrank_gemm import _tf32_matmul     # either of torch's two settings
        result["tf32"] = bool(_tf32_matmul())
    return result


# (device, dtype) → ceilings measured in this session, for the JSON's machine_info.
_ROOFLINE_SEEN = {}


def measured_rooflines():
    """Every roofline measured so far in this session, keyed ``device/dtype``."""
    return {f"{device}/{dtype_name(dtype)}": value for (device, dtype), value in _ROOFLINE_SEEN.items()}


# ---------------------------------------------------------------------------
# Timed passes
# ---------------------------------------------------------------------------

def make_pass(pass_, forward, leaves, device=DEVICE, synchronize=True):
    """The timed function of one pass.

    Args:
        pass_: ``"forward"``, ``"backward"`` or ``"fwd+bwd"``.
        forward: callable () → output tensor (builds the autograd graph).
        leaves: tensors whose ``.grad`` a backward fills (input and trainable
            parameters); set to None before each backward, like
            ``zero_grad(set_to_none=True)``, so no timed backward accumulates.
        synchronize: end every call with a CUDA synchronize (``call`` timing);
            :func:`benchmark_queued` takes a pass made with False.

    The backward pass runs the forward once, untimed, and replays the backward
    of that graph (``retain_graph=True``) on every call.
    """
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {', '.join(PASSES)}, got {pass_!r}")
    finish_call = (lambda: sync(device)) if synchronize else (lambda: None)
    if pass_ == "forward":
        def run():
            out = forward()
            finish_call()
            return out
        return run
    if pass_ == "backward":
        out = forward()
        grad_out = torch.randn_like(out)

        def run():
            for leaf in leaves:
                leaf.grad = None
            out.backward(grad_out, retain_graph=True)
            finish_call()
        return run
    grad_out = torch.randn_like(forward().detach())

    def run():
        for leaf in leaves:
            leaf.grad = None
        forward().backward(grad_out)
        finish_call()
    return run


def benchmark_queued(benchmark, run, config, calls=QUEUED_CALLS, device=DEVICE):
    """Time ``run`` (a pass made with ``synchronize=False``) as a training loop runs it: queued.

    Each round queues ``calls`` calls back to back and synchronizes once, at its
    end; pytest-benchmark records the round's time over ``calls``.  On a GPU the
    host then prepares the next calls while the device works, so a call costs
    about the larger of its host time and its device time, where ``call`` timing
    (a synchronize after each call) adds the host's time up to the first launch
    to every call.  The first round is untimed (allocator, autotuning) and sizes
    the rest to ``--benchmark-max-time``, with at least ``--benchmark-min-rounds``.

    Args:
        config: pytest's config (the ``pytestconfig`` fixture), for those two options.
        calls: calls per round, at least 1.

    Returns:
        the rounds timed (0 with ``--benchmark-disable``, where ``run`` is called once).
    """
    calls = check_int(calls, "calls", "a positive int", 1)
    if config is None or not hasattr(config, "getoption"):
        raise ValueError(f"queued timing needs pytest's config (the pytestconfig fixture), got {config!r}")
    if not benchmark.enabled:
        benchmark(run)                # disabled: one plain call (through the fixture, which marks it used)
        sync(device)
        return 0
    count = itertools.count(1)

    def queued():
        run()
        if next(count) % calls == 0:
            sync(device)

    start = time.perf_counter()
    for _ in range(calls):
        queued()
    round_seconds = time.perf_counter() - start
    max_time = float(config.getoption("benchmark_max_time"))
    min_rounds = int(config.getoption("benchmark_min_rounds"))
    rounds = max(min_rounds, min(1000, int(max_time / max(round_seconds, 1e-9))))
    benchmark.pedantic(queued, rounds=rounds, iterations=calls)
    # pedantic calls once more for a result after its rounds: that call is not timed.
    sync(device)
    return rounds


def time_pass(benchmark, run, timing="call", config=None):
    """Warm ``run`` up and time it by ``timing`` (one of :data:`TIMINGS`).

    ``call``: pytest-benchmark's own loop, ``run`` synchronizing every call itself.  ``queued``:
    :func:`benchmark_queued` (``run`` made without a synchronize; ``config`` is pytest's), and
    ``extra_info["calls_per_round"]`` says how many calls a round queued.
    """
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {', '.join(TIMINGS)}, got {timing!r}")
    warm_up(benchmark, run)
    if timing == "queued":
        benchmark.extra_info["calls_per_round"] = QUEUED_CALLS
        benchmark_queued(benchmark, run, config)
    else:
        benchmark(run)


def warm_up(benchmark, fn, calls=3):
    """Run ``fn`` untimed (compilation, autotuning, allocator) when timing is on."""
    if benchmark.enabled:
        for _ in range(calls):
            fn()


# ---------------------------------------------------------------------------
# extra_info bookkeeping
# ---------------------------------------------------------------------------

def _plain(value):
    """``value`` as something json can write (the JSON is dumped at the end of the session)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def describe(benchmark, *, suite, group, provider, form=None, pass_=None, dtype, shape, rank=None,
             target=False, device=DEVICE, **more):
    """Set ``benchmark.group`` and the descriptive part of ``benchmark.extra_info``."""
    benchmark.group = group
    info = benchmark.extra_info
    rank, shape, more = _plain(rank), _plain(shape), _plain(more)
    info.update({"suite": suite, "provider": provider, "form": form, "pass": pass_})
    info.update(device=str(device),
                device_name=device_name(device), dtype=dtype_name(dtype), shape=dict(shape), rank=rank,
                target=bool(target), grid=grid_mode(), **versions())
    info.update(more)


def finish(benchmark, *, flops=None, bytes_moved=None, dtype=torch.float32, device=DEVICE):
    """Record the work done per call and, when timed, the derived rates and ceilings.

    ``flops`` / ``bytes_moved`` are the work of one call: the useful work of
    the provider's form (the same for every provider of one form; a frozen
    dense weight's backward has no dW), or the FLOPs :func:`flops_of` counts
    (conv and epoch suites).  A group can hold several forms, whose work
    differs.  Rates use the mean time; ``report.py`` can recompute them from
    any statistic.
    """
    info = benchmark.extra_info
    if flops is not None:
        info["flops"] = float(flops)
    if bytes_moved is not None:
        info["bytes"] = float(bytes_moved)
    if benchmark.disabled or benchmark.stats is None:
        return
    mean = benchmark.stats.stats.mean
    ceilings = roofline(device, dtype)
    _ROOFLINE_SEEN[(str(device), dtype)] = ceilings
    info["peak_tflops"] = ceilings["peak_tflops"]
    info["copy_gbps"] = ceilings["copy_gbps"]
    if flops:
        info["tflops"] = flops / mean / 1e12
        info["pct_of_peak_tflops"] = 100.0 * info["tflops"] / ceilings["peak_tflops"]
    if bytes_moved:
        info["gbps"] = bytes_moved / mean / 1e9
        info["pct_of_copy_gbps"] = 100.0 * info["gbps"] / ceilings["copy_gbps"]
    return mean


def _same_work_as(packet):
    """A FlopCounterMode formula that counts an op as ``packet`` does (``addmm_`` as ``aten.addmm``): both
    take the same leading arguments."""
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry[packet]

    def count(*args, **kwargs):
        return formula(*args, **kwargs)
    count._get_raw = True          # ``formula`` reads the shapes itself
    return count


def _grouped_conv_backward():
    """FlopCounterMode's formula for ``convolution_backward`` with the weight gradient divided by ``groups``.

    Torch's formula counts the input gradient right for a grouped convolution (its channel product comes
    from the weight, C_out · C_in / groups), but the weight gradient as a convolution of the input with
    the output gradient over all C_in · C_out channel pairs: ``groups`` times the true work, 32× for a
    depthwise convolution over 32 channels.  Each term's count is torch's own, so groups = 1 is unchanged.
    """
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry[torch.ops.aten.convolution_backward]

    def count(grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
              output_mask, out_val=None):
        args = (grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups)
        grad_input = formula(*args, [output_mask[0], False], out_val=out_val)
        grad_weight = formula(*args, [False, output_mask[1]], out_val=out_val)
        return grad_input + grad_weight // groups
    count._get_raw = True          # ``formula`` reads the shapes itself
    return count


def flops_of(fn, device=DEVICE):
    """FLOPs of one call of ``fn`` counted by torch's FlopCounterMode.

    dynrank's fused Triton ops are opaque to the counter, so the count runs on
    dynrank's torch path (same math), selected through DYNRANK_BACKEND.  Where
    the counter's own table is wrong or has no entry, these count instead:

    - the in-place products that path (and a merge) runs, ``addmm_`` and
      ``baddbmm_``, count as ``addmm`` and ``baddbmm``;
    - a grouped convolution's backward counts its weight gradient once per group,
      not ``groups`` times (:func:`_grouped_conv_backward`; CP and TKD-CPD run
      depthwise convolutions);
    - the CPU's fused attention, ``_scaled_dot_product_flash_attention_for_cpu``
      and its backward, count as the CUDA flash kernels do: 4·B·H·L·S·D forward
      (QKᵀ and the weighted sum of V, causal masking not subtracted), 2.5× that
      backward, so CPU and GPU rows count one step alike.
    """
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {
        aten.addmm_: _same_work_as(aten.addmm),
        aten.baddbmm_: _same_work_as(aten.baddbmm),
        aten.convolution_backward: _grouped_conv_backward(),
        aten._scaled_dot_product_flash_attention_for_cpu: _same_work_as(aten._scaled_dot_product_flash_attention),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            _same_work_as(aten._scaled_dot_product_flash_attention_backward),
    }
    with env_override(DYNRANK_BACKEND="torch"), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    sync(device)
    return counter.get_total_flops()
