"""benchmarks/profile_ops.py on a CPU: kernel kinds by name, a whole profile of the tiny LM, the host time per call."""

import os

import pytest
import torch

from _helpers import assert_out_refused_before_work, bad_outs, load_script


@pytest.fixture(scope="module")
def profile_ops():
    return load_script("benchmarks/profile_ops.py", "dynrank_profile_ops")


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


def test_lm_step_profile_on_cpu(profile_ops):
    lines = []
    profile_ops.profile_lm_step(lines, device="cpu", steps=2)
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:-1]}
    assert set(rows) == {"full", "lowrank-rho0.25", "lowrank-rho0.25+head"}
    for name, cells in rows.items():
        wall, kernels, gemm, attention, optimizer, rest, launches = map(float, cells)
        assert wall > 0 and gemm > 0 and launches > 0, name
        assert kernels == pytest.approx(gemm + attention + optimizer + rest, abs=0.02)
    # The lowrank forms run two GEMMs per linear: more GEMM ops per step than the full form.
    assert float(rows["lowrank-rho0.25"][-1]) > float(rows["full"][-1])


def test_lowrank_kernel_profile_on_cpu(profile_ops):
    lines = []
    profile_ops.profile_lowrank_kernels(lines, shapes=((8, 16, 2), (4, 8, 8)), device="cpu", steps=2)
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("T8", "K=N=16", "r2")] * 2 + [("T4", "K=N=8", "r8")] * 2
    assert [" ".join(r[3:-4]) for r in rows] == ["unfused, two F.linear", "dynrank lowrank"] * 2
    for row in rows:
        assert float(row[-4]) > 0 and float(row[-2]) > 0, row


def test_queued_profile_on_cpu(profile_ops, monkeypatch):
    """Each form against unfused torch computing the same function (checked inside), per call and queued."""
    monkeypatch.setenv("DYNRANK_BACKEND", "torch")
    lines = []
    profile_ops.profile_queued(lines, shapes=((8, 16, 2),), device="cpu", calls=3, rounds=2)
    assert "3 queued per synchronize" in lines[0] and "fastest of 2 rounds" in lines[0]
    rows = [line.split("  runtime: ")[0].split() for line in lines[1:]]
    assert [r[:5] for r in rows] == [["T8", "K=N=16", "r2", form, who] for form in ("lowrank", "adapter")
                                     for who in ("unfused", "dynrank")]
    for row in rows:
        assert float(row[row.index("call") + 1]) > 0 and float(row[row.index("queued") + 1]) > 0, row
    assert all(line.split("  runtime: ")[1] == "none" for line in lines[1:])      # no CUDA runtime on a CPU


def test_queued_profile_refuses_a_provider_that_computes_something_else(profile_ops, monkeypatch):
    from dynrank import FusedLowRankLinear
    forward = FusedLowRankLinear.forward
    monkeypatch.setattr(FusedLowRankLinear, "forward", lambda self, x: 2 * forward(self, x))
    with pytest.raises(RuntimeError, match="unfused torch and dynrank's lowrank form disagree"):
        profile_ops.profile_queued([], shapes=((8, 16, 2),), device="cpu", calls=2, rounds=1)


def test_host_time_per_call_on_cpu(profile_ops, monkeypatch):
    monkeypatch.setenv("DYNRANK_BACKEND", "auto")
    lines = []
    profile_ops.host_per_call(lines, tokens=4, features=8, rank=2, device="cpu", calls=3, rounds=2)
    assert "median of 2 rounds" in lines[0] and lines[0].endswith("T4 K=N=8 r2 float32 on cpu")
    labels = [line.split(" forward ")[0].strip() for line in lines[1:]]
    assert labels == ["nn.Linear", "FusedLowRankLinear full", "unfused lowrank, two F.linear", "two nn.Linear modules",
                      "FusedLowRankLinear lowrank (torch)", "unfused adapter (LoRA)", "FusedLowRankLinear adapter (torch)",
                      "in-place adapter, autograd's nodes",
                      "nn.Conv2d 8→8 3×3 on 1×8×4×4", "LowRankConv2d full (SVD, rank 2)",
                      "LowRankConv2d lowrank (SVD, rank 2)", "LowRankConv2d adapter (SVD, rank 2)",
                      "W.addmm_(A, Bᵀ), bare", "dynrank merge_ (torch)"]
    for line in lines[1:-2]:
        forward, both = (float(cell) for cell in line.split()[-3::2])
        assert forward > 0 and both > 0, line
    for line in lines[-2:]:       # the merges: a call, no backward
        assert float(line.split()[-3]) > 0 and line.split()[-1] == "-", line
    # The table switches the backend per path and puts the caller's setting back.
    assert os.environ["DYNRANK_BACKEND"] == "auto"


def test_cpu_run_writes_the_host_table(profile_ops, tmp_path):
    out = tmp_path / "host.txt"
    assert profile_ops.main(["--device", "cpu", "--rounds", "1", "--out", str(out)]) == 0
    header, _, title, *rows = out.read_text(encoding="utf-8").splitlines()
    assert "one thread" in header and torch.__version__ in header
    assert title.startswith("host time per call") and len(rows) == 14


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
