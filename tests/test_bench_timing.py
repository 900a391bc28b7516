"""The benchmarks' queued timing (``_bench_common.benchmark_queued``) under the real pytest-benchmark.

A pytest run in a subprocess times a stand-in pass whose clock is the number of calls made so far
(``--benchmark-timer``), so each recorded time says how many calls its round held, and nothing is
timed for real.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _helpers import load_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

INNER = '''
import json
import sys

sys.path.insert(0, {benchmarks!r})
import _bench_common as common
import callclock


def test_queued(benchmark, pytestconfig):
    events = []
    common.sync = lambda device=common.DEVICE: events.append("sync")

    def run():
        callclock.CALLS += 1
        events.append("call")

    rounds = common.benchmark_queued(benchmark, run, pytestconfig, calls=4)
    with open("events.json", "w") as handle:
        json.dump({{"rounds": rounds, "events": events, "data": list(benchmark.stats.stats.data)}}, handle)
'''


def _run_inner(tmp_path, *options, timed=True):
    """Run INNER under pytest with ``options``; returns what its test wrote."""
    inner = INNER if timed else INNER.replace('"data": list(benchmark.stats.stats.data)', '"data": None')
    (tmp_path / "callclock.py").write_text("CALLS = 0\n\n\ndef clock():\n    return float(CALLS)\n")
    (tmp_path / "test_inner.py").write_text(inner.format(benchmarks=str(BENCHMARKS)))
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py",
                           "--benchmark-timer=callclock.clock", *options],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((tmp_path / "events.json").read_text())


def test_each_round_queues_its_calls_and_synchronizes_once(tmp_path):
    out = _run_inner(tmp_path, "--benchmark-only", "--benchmark-max-time=0", "--benchmark-min-rounds=3")
    # An untimed first round, three timed rounds, pedantic's untimed result call and a last synchronize.
    assert out["rounds"] == 3
    one_round = ["call"] * 4 + ["sync"]
    assert out["events"] == one_round * 4 + ["call", "sync"]
    # The clock counts calls: every round held four, and the time recorded is per call.
    assert out["data"] == [1.0, 1.0, 1.0]


def test_disabled_benchmark_calls_once(tmp_path):
    out = _run_inner(tmp_path, "--benchmark-disable", timed=False)
    assert out == {"rounds": 0, "events": ["call", "sync"], "data": None}


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return load_script("benchmarks/_bench_common.py", "dynrank_bench_common")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("calls, error", [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError),
                                          ("4", TypeError)])
def test_queued_calls_must_be_a_positive_int(common, calls, error):
    came = re.escape(repr(calls)) if error is ValueError else re.escape(f"{type(calls).__name__} ({calls!r})")
    with pytest.raises(error, match=f"^calls must be a positive int, got {came}$"):
        common.benchmark_queued(None, lambda: None, None, calls=calls)


def test_make_pass_synchronizes_only_when_asked(common, monkeypatch):
    import torch

    syncs = []
    monkeypatch.setattr(common, "sync", lambda device=None: syncs.append(device))
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)
    for pass_ in common.PASSES:
        syncs.clear()
        common.make_pass(pass_, lambda: x @ w, [w], synchronize=False)()
        assert syncs == [], pass_
        common.make_pass(pass_, lambda: x @ w, [w])()
        assert len(syncs) == 1, pass_
    with pytest.raises(ValueError, match="pass must be one of forward, backward, fwd\\+bwd, got 'both'"):
        common.make_pass("both", lambda: x @ w, [w])


@pytest.mark.parametrize("pass_", ["backward", "fwd+bwd"])
def test_timed_backwards_do_not_accumulate_into_the_leaves(common, pass_):
    """Every call's backward starts from no gradient, as after ``zero_grad(set_to_none=True)``: after
    several calls, and after a stale gradient left from outside, each leaf holds one backward's gradient."""
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    run = common.make_pass(pass_, lambda: x @ w, [x, w], synchronize=False)
    run()
    once = [x.grad.clone(), w.grad.clone()]
    assert all(g.abs().sum() > 0 for g in once)
    x.grad, w.grad = torch.full_like(x, 7.0), torch.full_like(w, 7.0)
    for _ in range(3):
        run()
    assert torch.equal(x.grad, once[0]) and torch.equal(w.grad, once[1])


def test_roofline_counts_a_gemms_flops_and_a_copys_read_and_write(common, monkeypatch):
    """With the clock stubbed: an n × n GEMM is 2·n³ FLOPs (n = 1024 on the CPU), and a copy of 64 MiB moves
    its bytes twice, read and written."""
    timed = []

    def best_seconds(fn, device, repeats):
        timed.append(repeats)
        return (0.01, 0.004)[len(timed) - 1]       # the GEMM first, then the copy
    monkeypatch.setattr(common, "_best_seconds", best_seconds)
    ceilings = common.roofline.__wrapped__(torch.device("cpu"), torch.float32)    # not the session's cache
    assert timed == [10, 10]
    assert (ceilings["matmul_n"], ceilings["copy_bytes"]) == (1024, 64 << 20)
    assert ceilings["peak_tflops"] == pytest.approx(2 * 1024 ** 3 / 0.01 / 1e12, rel=1e-12)
    assert ceilings["copy_gbps"] == pytest.approx(2 * (64 << 20) / 0.004 / 1e9, rel=1e-12)


def test_finish_records_the_rates_and_their_share_of_the_roofline(common, monkeypatch):
    """1 GFLOP and 50 MB in a mean 1 ms call: 1 TFLOP/s of a 4 TFLOP/s peak (25 %), 50 GB/s of a
    100 GB/s copy (50 %)."""
    ceilings = {"peak_tflops": 4.0, "copy_gbps": 100.0}
    monkeypatch.setattr(common, "roofline", lambda device, dtype: ceilings)
    monkeypatch.setattr(common, "_ROOFLINE_SEEN", {})
    timed = SimpleNamespace(extra_info={}, disabled=False, stats=SimpleNamespace(stats=SimpleNamespace(mean=1e-3)))
    assert common.finish(timed, flops=1e9, bytes_moved=5e7, dtype=torch.float32, device=torch.device("cpu")) == 1e-3
    info = timed.extra_info
    assert info == pytest.approx(dict(flops=1e9, bytes=5e7, peak_tflops=4.0, copy_gbps=100.0, tflops=1.0,
                                      pct_of_peak_tflops=25.0, gbps=50.0, pct_of_copy_gbps=50.0), rel=1e-12)
    assert common.measured_rooflines() == {"cpu/float32": ceilings}
    # A disabled benchmark records the work only.
    untimed = SimpleNamespace(extra_info={}, disabled=True, stats=None)
    assert common.finish(untimed, flops=1e9, bytes_moved=5e7) is None
    assert untimed.extra_info == {"flops": 1e9, "bytes": 5e7}


def test_time_pass_names_an_unknown_timing(common):
    with pytest.raises(ValueError, match="timing must be one of call, queued, got 'async'"):
        common.time_pass(None, lambda: None, "async")


def test_queued_timing_asks_for_pytests_config(common):
    with pytest.raises(ValueError, match="queued timing needs pytest's config"):
        common.benchmark_queued(None, lambda: None, None)


def test_flops_of_counts_the_adapters_in_place_products(common):
    import torch

    from dynrank import FusedLowRankLinear

    T, K, N, r = 7, 17, 11, 3
    layer = FusedLowRankLinear(K, N, r, form="adapter", alpha=4.0)
    with torch.no_grad():
        layer.A.normal_()
    x = torch.randn(T, K, requires_grad=True)
    dense, factors = 2 * T * K * N, 2 * T * r * (K + N)
    # Forward: x·W_fᵀ, s·x·B, then += (s·x·B)·Aᵀ in place (addmm_).
    assert common.flops_of(lambda: layer(x)) == dense + factors
    # Backward: dy·W_f, s·dy·A, += (s·dy·A)·Bᵀ in place, dA and dB (W_f is frozen: no dW).
    run = common.make_pass("fwd+bwd", lambda: layer(x), [x, *layer.factors().values()])
    assert common.flops_of(run) == (dense + factors) + (dense + 2 * factors)


def test_flops_of_counts_in_place_batched_products(common):
    import torch

    b, m, k, n = 3, 5, 2, 7
    w, u, v = torch.randn(b, m, n), torch.randn(b, m, k), torch.randn(b, k, n)
    assert common.flops_of(lambda: w.baddbmm_(u, v, alpha=0.5)) == 2 * b * m * k * n
    assert common.flops_of(lambda: w[0].addmm_(u[0], v[0])) == 2 * m * k * n


@pytest.mark.parametrize("groups", [1, 4, 12])
@pytest.mark.parametrize("transposed", [False, True])
def test_flops_of_counts_a_grouped_convolution_by_hand(common, groups, transposed):
    """Forward, input gradient and weight gradient each cost 2·N·H·W·F·(C / groups)·k²: torch's own table
    counts the weight gradient over every channel pair, ``groups`` times too much."""
    import torch
    from torch.nn import functional as F

    N, C, F_out, H, W, k = 3, 12, 24, 9, 7, 3
    x = torch.randn(N, C, H, W, requires_grad=True)
    if transposed:
        weight = torch.randn(C, F_out // groups, k, k, requires_grad=True)
        conv = lambda: F.conv_transpose2d(x, weight, padding=1, groups=groups)       # noqa: E731
    else:
        weight = torch.randn(F_out, C // groups, k, k, requires_grad=True)
        conv = lambda: F.conv2d(x, weight, padding=1, groups=groups)                 # noqa: E731
    one_pass = 2 * N * H * W * F_out * (C // groups) * k * k      # stride 1, padding 1: H × W out
    assert common.flops_of(conv) == one_pass
    assert common.flops_of(common.make_pass("fwd+bwd", conv, [x, weight])) == 3 * one_pass
    x.requires_grad_(False)           # the weight gradient alone
    assert common.flops_of(common.make_pass("backward", conv, [weight])) == one_pass


def test_flops_of_counts_a_depthwise_factor_as_the_conv_suite_runs_it(common):
    """A CP factor's (r, 1, 3, 1) depthwise convolution over N × r × H × W: dW is 2·N·H·W·r·3."""
    import torch

    N, r, H, W = 8, 32, 8, 8
    x = torch.randn(N, r, H, W)
    weight = torch.randn(r, 1, 3, 1, requires_grad=True)
    conv = lambda: torch.nn.functional.conv2d(x, weight, padding=(1, 0), groups=r)  # noqa: E731
    assert common.flops_of(common.make_pass("backward", conv, [weight])) == 2 * N * H * W * r * 3


def test_flops_of_counts_the_cpus_fused_attention_as_cuda_flash(common):
    """SDPA on the CPU runs ``_scaled_dot_product_flash_attention_for_cpu``: QKᵀ and the weighted sum of V
    are 4·B·H·L·S·D forward, and the backward five such products (scores again, dV, dP, dQ, dK): 2.5×,
    as FlopCounterMode counts the CUDA flash kernels.  Causal masking is not subtracted, there either."""
    import torch
    from torch.nn import functional as F

    B, heads, L, S, D = 2, 3, 24, 40, 16
    q = torch.randn(B, heads, L, D, requires_grad=True)
    k = torch.randn(B, heads, S, D, requires_grad=True)
    v = torch.randn(B, heads, S, D, requires_grad=True)
    forward = 4 * B * heads * L * S * D
    for causal in (False, True):
        attend = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
        assert common.flops_of(attend) == forward
        assert common.flops_of(common.make_pass("fwd+bwd", attend, [q, k, v])) == forward + 5 * forward // 2


def test_versions_record_the_timed_optional_packages(common):
    """The conv-merge suite times tensorly's reconstruction: its version is recorded beside torch's (it was not;
    peft's was)."""
    from importlib.metadata import version
    import tensorly
    recorded = common.versions()
    assert recorded["tensorly"] == version("tensorly") == tensorly.__version__
    assert recorded["torch"] == torch.__version__
