"""benchmarks/profile_ops.py on a CPU: kernel kinds by name, a whole profile of the tiny LM, the host time per call.

Nothing is timed: the script's clock is a fake one and the profiler's op times are replaced by a fixed
value, so every number in a table is known."""

import os
import types

import pytest
import torch

from _helpers import assert_out_refused_before_work, bad_outs, load_script


@pytest.fixture(scope="module")
def profile_ops():
    return load_script("benchmarks/profile_ops.py", "dynrank_profile_ops")


class PairClock:
    """``time.perf_counter`` for profile_ops, which reads it in pairs around each timed run: run n
    (counted from 0) lasts ``seconds(n)``."""

    def __init__(self, monkeypatch, profile_ops, seconds):
        self.now, self.reads, self.seconds = 1000.0, 0, seconds
        monkeypatch.setattr(profile_ops, "time", types.SimpleNamespace(perf_counter=self.read))

    def read(self):
        if self.reads % 2:
            self.now += self.seconds(self.reads // 2)
        self.reads += 1
        return self.now


# Microseconds each profiled op takes in place of the profiler's own time.
OP_MICROSECONDS = 500.0


@pytest.fixture
def profiled_ops(profile_ops, monkeypatch):
    """The names of the profiled ops of each ``profile_steps`` call, each op given OP_MICROSECONDS."""
    events = profile_ops._device_events
    seen = []

    def fixed(prof, device):
        seen.append([(name, OP_MICROSECONDS) for name, _ in events(prof, device)])
        return seen[-1]
    monkeypatch.setattr(profile_ops, "_device_events", fixed)
    return seen


def _ms_by_kind(profile_ops, events, steps):
    kinds = dict.fromkeys(("gemm", "attention", "optimizer", "rest"), 0.0)
    for name, _ in events:
        kinds[profile_ops.kernel_kind(name)] += OP_MICROSECONDS / 1e3 / steps
    return kinds


@pytest.mark.parametrize("name,kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNN", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>", "gemm"),
    ("_lowrank_gemm_kernel", "gemm"),
    ("aten::addmm", "gemm"),
    ("aten::mm", "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("aten::_foreach_mul_", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "rest"),
    ("aten::mm_backward_helper", "rest"),            # only the GEMM ops themselves count as GEMM time
    ("aten::native_layer_norm", "rest"),
])
def test_kernel_kinds(profile_ops, name, kind):
    assert profile_ops.kernel_kind(name) == kind


def test_step_breakdown_sums_per_step(profile_ops):
    events = [("nvjet_tst_a", 300.0), ("flash_fwd_kernel", 100.0), ("multi_tensor_apply_kernel", 50.0),
              ("elementwise_kernel", 50.0), ("nvjet_tst_b", 500.0)]
    kinds, launches = profile_ops.step_breakdown(events, steps=2)
    assert kinds == {"gemm": 0.4, "attention": 0.05, "optimizer": 0.025, "rest": 0.025}
    assert launches == 2.5


def test_lm_step_profile_on_cpu(profile_ops, monkeypatch, profiled_ops):
    """Per form: the median wall time of its steps (form i's two steps last 4(2i+1) and 4(2i+2) ms),
    and its profiled ops per step by kind."""
    PairClock(monkeypatch, profile_ops, lambda n: 0.004 * (n + 1))
    lines = []
    profile_ops.profile_lm_step(lines, device="cpu", steps=2)
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:-1]}
    assert list(rows) == ["full", "lowrank-rho0.25", "lowrank-rho0.25+head"]
    assert len(profiled_ops) == 3
    for i, (name, cells) in enumerate(rows.items()):
        events = profiled_ops[i]
        kinds = _ms_by_kind(profile_ops, events, steps=2)
        assert kinds["gemm"] > 0, name
        assert [float(cell) for cell in cells] == [
            4 * (2 * i + 1.5), sum(kinds.values()), kinds["gemm"], kinds["attention"], kinds["optimizer"],
            kinds["rest"], round(len(events) / 2)], name
    # The lowrank forms run two GEMMs per linear: more GEMM ops per step than the full form.
    assert float(rows["lowrank-rho0.25"][-1]) > float(rows["full"][-1])


def test_lowrank_kernel_profile_on_cpu(profile_ops, monkeypatch, profiled_ops):
    PairClock(monkeypatch, profile_ops, lambda n: 1.0)           # the wall times are not printed
    lines = []
    profile_ops.profile_lowrank_kernels(lines, shapes=((8, 16, 2), (4, 8, 8)), device="cpu", steps=2)
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("T8", "K=N=16", "r2")] * 2 + [("T4", "K=N=8", "r8")] * 2
    assert [" ".join(r[3:-4]) for r in rows] == ["unfused, two F.linear", "dynrank lowrank"] * 2
    assert len(profiled_ops) == len(rows)
    for row, events in zip(rows, profiled_ops):
        assert events and (float(row[-4]), row[-3], float(row[-2]), row[-1]) == (
            OP_MICROSECONDS * len(events) / 2, "µs", len(events) / 2, "kernels"), row


def test_queued_profile_on_cpu(profile_ops, monkeypatch):
    """Each form against unfused torch computing the same function (checked inside), per call and queued."""
    monkeypatch.setenv("DYNRANK_BACKEND", "torch")
    # Timing g (per call, then queued, for each provider in turn) has rounds of (g+1)·(3, 1, 2) µs a call:
    # the fastest is g+1.
    PairClock(monkeypatch, profile_ops,
              lambda n: 1e-6 * (n // 3 + 1) * (3, 1, 2)[n % 3] * (3 if n // 3 % 2 else 1))
    lines = []
    profile_ops.profile_queued(lines, shapes=((8, 16, 2),), device="cpu", calls=3, rounds=3)
    assert "3 queued per synchronize" in lines[0] and "fastest of 3 rounds" in lines[0]
    rows = [line.split("  runtime: ")[0].split() for line in lines[1:]]
    assert [r[:5] for r in rows] == [["T8", "K=N=16", "r2", form, who] for form in ("lowrank", "adapter")
                                     for who in ("unfused", "dynrank")]
    for i, row in enumerate(rows):
        assert (float(row[row.index("call") + 1]), float(row[row.index("queued") + 1])) == (2 * i + 1, 2 * i + 2), row
    assert all(line.split("  runtime: ")[1] == "none" for line in lines[1:])      # no CUDA runtime on a CPU


def test_queued_profile_refuses_a_provider_that_computes_something_else(profile_ops, monkeypatch):
    from dynrank import FusedLowRankLinear
    forward = FusedLowRankLinear.forward
    monkeypatch.setattr(FusedLowRankLinear, "forward", lambda self, x: 2 * forward(self, x))
    with pytest.raises(RuntimeError, match="unfused torch and dynrank's lowrank form disagree"):
        profile_ops.profile_queued([], shapes=((8, 16, 2),), device="cpu", calls=2, rounds=1)


def test_host_time_per_call_on_cpu(profile_ops, monkeypatch):
    monkeypatch.setenv("DYNRANK_BACKEND", "auto")
    # Round r times the 14 calls and 12 forward+backwards in turn, the j-th at (j+1)·(5, 2, 1)[r] µs a call:
    # its median is 2(j+1).
    PairClock(monkeypatch, profile_ops, lambda n: 3e-6 * (n % 26 + 1) * (5, 2, 1)[n // 26])
    lines = []
    profile_ops.host_per_call(lines, tokens=4, features=8, rank=2, device="cpu", calls=3, rounds=3)
    assert "median of 3 rounds" in lines[0] and lines[0].endswith("T4 K=N=8 r2 float32 on cpu")
    labels = [line.split(" forward ")[0].strip() for line in lines[1:]]
    assert labels == ["nn.Linear", "FusedLowRankLinear full", "unfused lowrank, two F.linear", "two nn.Linear modules",
                      "FusedLowRankLinear lowrank (torch)", "unfused adapter (LoRA)", "FusedLowRankLinear adapter (torch)",
                      "in-place adapter, autograd's nodes",
                      "nn.Conv2d 8→8 3×3 on 1×8×4×4", "LowRankConv2d full (SVD, rank 2)",
                      "LowRankConv2d lowrank (SVD, rank 2)", "LowRankConv2d adapter (SVD, rank 2)",
                      "W.addmm_(A, Bᵀ), bare", "dynrank merge_ (torch)"]
    for i, line in enumerate(lines[1:-2]):
        assert [float(cell) for cell in line.split()[-3::2]] == [2 * (2 * i + 1), 2 * (2 * i + 2)], line
    for j, line in zip((24, 25), lines[-2:]):       # the merges: a call, no backward
        assert (float(line.split()[-3]), line.split()[-1]) == (2 * (j + 1), "-"), line
    # The table switches the backend per path and puts the caller's setting back.
    assert os.environ["DYNRANK_BACKEND"] == "auto"


def test_cpu_run_writes_the_host_table(profile_ops, tmp_path, monkeypatch):
    PairClock(monkeypatch, profile_ops, lambda n: 1e-3 * (n + 1))        # 1000 calls: n+1 µs a call
    out = tmp_path / "host.txt"
    assert profile_ops.main(["--device", "cpu", "--rounds", "1", "--out", str(out)]) == 0
    header, _, title, *rows = out.read_text(encoding="utf-8").splitlines()
    assert "one thread" in header and torch.__version__ in header
    assert title.startswith("host time per call (µs, mean of 1000 calls)") and len(rows) == 14
    assert [row.split()[-3::2] for row in rows] == [[f"{2 * i + 1}.0", f"{2 * i + 2}.0"] for i in range(12)] + [
        ["25.0", "-"], ["26.0", "-"]]


@pytest.mark.parametrize("flags, shape", [
    ([], dict(tokens=4, features=16, rank=2, rounds=15)),
    (["--tokens", "5", "--features", "12", "--rank", "3", "--rounds", "2"],
     dict(tokens=5, features=12, rank=3, rounds=2)),
])
def test_cpu_run_takes_the_shape_and_rounds_asked_for(profile_ops, monkeypatch, flags, shape):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)     # the test process keeps its threads
    seen = []
    monkeypatch.setattr(profile_ops, "host_per_call", lambda lines, **kwargs: seen.append(kwargs))
    assert profile_ops.main(["--device", "cpu", *flags]) == 0
    assert seen == [dict(shape, device="cpu", calls=1000)]


@pytest.mark.parametrize("flags, message", [
    (["--rounds", "0"], "argument --rounds: expected an integer ≥ 1, got '0'"),
    (["--rounds", "-1"], "argument --rounds: expected an integer ≥ 1, got '-1'"),
    (["--tokens", "0"], "argument --tokens: expected an integer ≥ 1, got '0'"),
    (["--features", "8", "--rank", "9"], "--rank must be at most the features (8), got 9"),
])
def test_bad_numbers_are_refused_before_any_section_runs(profile_ops, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(profile_ops, "host_per_call", lambda *args, **kwargs: pytest.fail("a section ran"))
    with pytest.raises(SystemExit) as exit_info:
        profile_ops.main(["--device", "cpu", *flags])
    assert exit_info.value.code == 2
    assert f"error: {message}\n" in capsys.readouterr().err


def test_out_is_checked_before_any_section_runs(profile_ops, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)     # the test process keeps its threads
    out, message = bad_outs(tmp_path, "host.txt")["under a file"]
    assert_out_refused_before_work(profile_ops, "host_per_call", ["--device", "cpu"], out, message,
                                   monkeypatch, capsys)


def test_adapter_profile_on_cpu(profile_ops, monkeypatch):
    """The adapter's profiler tables: on a CPU the torch path (one autograd node, whose Python
    backward shows in its table) and the same math in place on autograd's own nodes."""
    monkeypatch.delenv("DYNRANK_BACKEND", raising=False)
    lines = []
    profile_ops.profile_adapter(lines, tokens=4, features=16, rank=2, device="cpu", steps=2)
    titles, tables = lines[0::2], lines[1::2]
    assert titles == ["\nadapter fwd+bwd T4 K=N=16 r2 float32, DYNRANK_BACKEND=torch, 2 steps",
                      "\nadapter fwd+bwd T4 K=N=16 r2 float32, in place on autograd's nodes, 2 steps"]
    assert "_TorchAdapterLinear" in tables[0]
    assert "_TorchAdapterLinear" not in tables[1] and "aten::addmm_" in tables[1]
    assert "DYNRANK_BACKEND" not in os.environ
