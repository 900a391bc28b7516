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
