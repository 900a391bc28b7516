#!/usr/bin/env bash
# A time-limited GPU session in two back-to-back calls, each inside the device's 10-minute limit.
#
#   bash benchmarks/gpu_session.sh bench [SECONDS]    # call 1
#   bash benchmarks/gpu_session.sh collect SECONDS    # call 2, at once after call 1 (PAPER=1 only)
#
# Call 1 has the GPU to itself for the benchmark suites and the report.  Every CIFAR-10 paper run
# is complete (2026-11-27), so by default (PAPER=0) it then runs the native kernel tests in the
# same call and the session is that one call.  With PAPER=1 it starts the paper runs in their own
# process session (so they outlive the call), sharing the GPU under MPS when it starts, and runs
# the native tests beside them; call 2 gives the runs a deadline that fits its own limit, waits
# for them and packs the results (on a fresh machine it starts the runs itself).  Expects
# local/whl/tensorly-*.whl (and for PAPER=1 local/data/cifar10-jpeg.tar.gz), git-ignored and
# carried.  What comes back is under $OUT (at most 8 files): bench.tgz, report.md and, with
# PAPER=0, tests-cuda.log from call 1; summary.md, paper.tgz, paper.log, paper-checkpoints.tgz and
# tests-cuda.log from call 2.  bench.tgz holds the suite JSONs with each suite's pytest output
# (NAME.log: its failures' tracebacks), the profile, the report, the sweeps and session.json (the
# device and the call's start, so that a session whose suites all failed still folds).
#
# Time, with PAPER=0: the call's SECONDS (CALL_SECONDS) hold setup, the bench phase and the native
# tests.  The tests are kept TESTS_SECONDS (320 by default: 1562 tests at 2026-11-27-2's 0.196 s a
# test, with pytest's start), so the bench phase ends BENCH_SECONDS after it starts (225 by default,
# 270 with BENCH_ALL=1) or CALL_SECONDS - TESTS_SECONDS - 40 after the call starts, whichever comes
# first (the 40 s: a suite's 15 s grace after its stop, the report and the archive, and the 15 s the
# tests leave before the call's end).  A call of 560 s thus leaves the bench about 180 s after
# setup (the profile and the first suites), and BENCH_SECONDS above that changes nothing:
#
#   bash benchmarks/gpu_session.sh bench 560
#
# Torch must see the GPU: with DEVICE cuda (SESSION_DEVICE, the default) setup stops the call
# where it does not.
set -u
PHASE=${1:?usage: gpu_session.sh bench|collect [seconds]}
CALL_SECONDS=${2:-300}
OUT=${OUT:-/tmp/dynrank-out}
RES=${SESSION_RES:-/tmp/dynrank-res}
BENCH_DIR=$RES/bench                # emptied by each bench phase: a rerun on a warm machine packs its own files
CACHE=/tmp/dynrank-cache
RUNS=$RES/cifar10-resnet20
DEADLINE_FILE=/tmp/dynrank-paper-deadline
DEVICE=${SESSION_DEVICE:-cuda}      # cpu: a dry run of the whole script on a machine without a GPU
PAPER_ARGS=${PAPER_ARGS:-}          # e.g. "--epochs 2 --train-args --width 0.5" for a dry run
DATA=${SESSION_DATA:-local/data}
TESTS_SECONDS=${TESTS_SECONDS:-320} # the native tests' share of a PAPER=0 call (see above)
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
T0=$(date +%s)
say() { echo "[$(($(date +%s) - T0))s] $*"; }
left() { echo $((CALL_SECONDS - $(date +%s) + T0)); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

setup() {
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site local/whl/*.whl >/dev/null \
        || { echo "tensorly install failed"; exit 1; }
    export PYTHONPATH=/tmp/site
    DEVICE=$DEVICE python3 - "$RES/session.json" <<'EOF' || exit 1
import datetime, json, os, sys
import torch, triton, tensorly, dynrank, dynrank.kernels
if os.environ["DEVICE"] == "cuda" and not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device: stopping "
             "(SESSION_DEVICE=cpu runs the script on the CPU as a dry run)")
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
versions = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "tensorly": tensorly.__version__}
print("device", name, "|", " | ".join(f"{k} {v}" for k, v in versions.items()))
# The suite JSONs' layout (machine_info["dynrank"], datetime): the fold names the session from it.
with open(sys.argv[1], "w") as handle:
    json.dump({"machine_info": {"dynrank": {"device": "cuda" if torch.cuda.is_available() else "cpu",
                                            "device_name": name, "versions": versions}},
               "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat()}, handle, indent=1)
EOF
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader \
        2>/dev/null
}

decode_cifar() {   # once per machine: every run then loads the decoded tensors
    ls "$CACHE"/cifar10-*.pt >/dev/null 2>&1 && return 0
    python3 -c "from dynrank.train.data import load_vision; load_vision('cifar10', '$DATA', cache_dir='$CACHE')"
}

step_seconds() {   # step_seconds CAP: the seconds a bench step may run (CAP, or up to the bench's end); fails under 15
    local t; t=$(min "$1" $((BENCH_END - $(date +%s))))
    echo "$t"
    [ "$t" -ge 15 ]
}

suite() {   # suite NAME CAP_SECONDS PYTEST_ARGS...: one benchmark file, inside the bench phase's time
    local name=$1 cap=$2; shift 2
    local t; t=$(step_seconds "$cap") || { say "skip $name (no time left)"; return; }
    say "$name (≤ ${t}s)"
    timeout -s INT -k 15 "$t" python3 -m pytest "$@" --benchmark-only --benchmark-warmup=off --benchmark-max-time=0.15 \
        --benchmark-min-rounds=8 -q -p no:cacheprovider --benchmark-json="$BENCH_DIR/$name.json" \
        > "$BENCH_DIR/$name.log" 2>&1
    tail -n 2 "$BENCH_DIR/$name.log"
}

sweep() {   # sweep SCRIPT CAP_SECONDS OUTFILE: a tile sweep script, inside the bench phase's time
    local t; t=$(step_seconds "$2") || { say "skip $1 (no time left)"; return; }
    say "$1 (≤ ${t}s)"
    timeout "$t" python3 "benchmarks/$1" --out "$BENCH_DIR/$3" > "$BENCH_DIR/${3%.md}.log" 2>&1
    tail -n 3 "$BENCH_DIR/${3%.md}.log"
}

bench() {
    rm -rf "$BENCH_DIR"
    mkdir -p "$BENCH_DIR"
    [ "${PAPER:-0}" = 1 ] && (decode_cifar > "$RES/decode.log" 2>&1 &)
    BENCH_END=$(($(date +%s) + ${BENCH_SECONDS:-$([ "${BENCH_ALL:-0}" = 1 ] && echo 270 || echo 225)}))
    # With PAPER=0 the native tests follow in this call: their time is kept from the bench.
    [ "${PAPER:-0}" = 1 ] || BENCH_END=$(min "$BENCH_END" $((T0 + CALL_SECONDS - TESTS_SECONDS - 40)))
    # The profiler's whole output goes to a file: a pipe into `head` would close early and kill it
    # with SIGPIPE before its later sections (the GPT-2 step breakdown of 2026-11-27 was lost so).
    local t
    if ! t=$(step_seconds 100); then
        say "skip the profile (no time left)"
    else
        say "profile of the launch path and of the GPT-2-small step (≤ ${t}s)"
        timeout "$t" python3 benchmarks/profile_ops.py --out "$BENCH_DIR/profile.txt" > "$BENCH_DIR/profile.log" 2>&1
        tail -n 3 "$BENCH_DIR/profile.log"
    fi
    # Most needed first: the linear targets, the adapter's forward/backward split (v0.6 launches its
    # big GEMM first: the forward is where that shows), the targets' layers queued, the training steps (graphed too, the
    # transformer's included), the target merges (per call, then queued), the merge kernel's tile configs by GPU time.  The
    # engine diagnosis (its fault of 2026-11-26 did not recur on 2026-11-27), the conv merges, the
    # engine's tile sweep and the conv layers: only with BENCH_ALL=1.
    suite linear 120 benchmarks/test_bench_linear.py \
        -k "fwd and not (torch_compile and lowrank) and (target or not torch_compile)"
    suite linear_split 40 benchmarks/test_bench_linear.py \
        -k "(forward or backward) and target and (adapter or dense_frozen) and not torch_compile"
    # The same layers queued as a training loop runs them (one synchronize per 20 calls): throughput.
    suite linear_queued 50 benchmarks/test_bench_linear.py \
        -k "queued and (target or r512) and (unfused or peft or dense_frozen or inplace or dynrank-lowrank or dynrank-adapter)"
    suite epoch 110 benchmarks/test_bench_epoch.py
    [ "${BENCH_ALL:-0}" != 1 ] && suite merge 25 benchmarks/test_bench_merge.py -k "test_merge and target and not queued"
    [ "${BENCH_ALL:-0}" != 1 ] && suite merge_queued 20 benchmarks/test_bench_merge.py -k "test_merge_queued and target"
    sweep sweep_merge.py 60 sweep-merge.md
    if [ "${BENCH_ALL:-0}" = 1 ]; then
        if ! t=$(step_seconds 60); then
            say "engine diagnosis skipped (${t}s left of the bench)"
        else
            say "engine diagnosis (≤ ${t}s)"
            timeout "$t" python3 benchmarks/diagnose_engine.py --out "$BENCH_DIR/diagnose.md" --budget-s $((t - 20)) \
                > "$BENCH_DIR/diagnose.log" 2>&1
            tail -n 2 "$BENCH_DIR/diagnose.log"
        fi
        suite merge 60 benchmarks/test_bench_merge.py
        sweep sweep_tiles.py 50 sweep.md
        suite conv 50 benchmarks/test_bench_conv.py -k "fwd and (resnet20 or 56px)"
    fi
    python3 benchmarks/report.py "$BENCH_DIR"/*.json --out "$BENCH_DIR/report.md" --plot "$BENCH_DIR/report.png" \
        > "$BENCH_DIR/report.log" 2>&1
    cp "$RES/session.json" "$BENCH_DIR/"
    (cd "$BENCH_DIR" && tar -czf "$OUT/bench.tgz" .)
    cp "$BENCH_DIR/report.md" "$OUT/" 2>/dev/null
    say "benchmarks done"
}

conv_forms_check() {   # every decomposition through lowrank → full → adapter, on CUDA with the kernels
    timeout 120 python3 - <<'EOF'
import torch
from dynrank import LowRankConv2d
for d in ("svd", "tucker", "cp", "tkd-cpd"):
    torch.manual_seed(0)
    m = LowRankConv2d(16, 16, 3, padding=1, decomposition=d, rank_ratio=0.5, form="lowrank").cuda()
    x = torch.randn(4, 16, 8, 8, device="cuda")
    ref = m(x).detach()
    m.inflate()
    err = (m(x) - ref).abs().max().item()
    m.deflate()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    y.float().sum().backward()
    torch.cuda.synchronize()
    assert err < 1e-3, (d, err)
print("conv forms ok on", torch.cuda.get_device_name())
EOF
}

seed_runs() {   # unfinished runs resume from the checkpoints committed with the results (not in a CPU dry run)
    [ "$DEVICE" = cuda ] && [ ! -d "$RUNS" ] || return 0
    mkdir -p "$RUNS"
    cp -r benchmarks/results/cifar10-resnet20/. "$RUNS/"
    say "seeded $(find "$RUNS" -name checkpoint.pt | wc -l) checkpoints from benchmarks/results/cifar10-resnet20"
}

graphs_check() {   # real CUDA graphs train as eager steps do (fp32 and bf16): then the runs use them
    [ "${SESSION_GRAPHS:-1}" = 1 ] && [ "$DEVICE" = cuda ] || return 1
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_train_steps.py -k real_cuda 2>&1 | tail -n 1
    [ "${PIPESTATUS[0]}" = 0 ]
}

start_paper() {   # start_paper BUDGET_SECONDS: the runs, in their own session
    decode_cifar || { echo "CIFAR-10 decode failed"; return 1; }
    seed_runs
    if [ "$DEVICE" = cuda ] && ! conv_forms_check; then
        export DYNRANK_BACKEND=torch
        say "the Triton conv path failed its check: the runs use DYNRANK_BACKEND=torch"
    fi
    if graphs_check; then
        case "$PAPER_ARGS" in
            *--train-args*) PAPER_ARGS="$PAPER_ARGS --cuda-graphs" ;;
            *) PAPER_ARGS="$PAPER_ARGS --train-args --cuda-graphs" ;;
        esac
        say "CUDA graphs check passed: the runs replay graphed steps"
    else
        say "the runs take eager steps"
    fi
    # Under MPS each run is bound by its own host thread: stopping some barely speeds up the others
    # (first H200 session), so every run goes as far as it can.  Without MPS they take turns, and
    # stopping the least important ones lets the first three finish.
    local parallel=6 protect=3
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if [ "$DEVICE" = cuda ] && nvidia-cuda-mps-control -d 2>/dev/null \
        && timeout 40 python3 -c "import torch; assert torch.ones(4, device='cuda').sum().item() == 4"; then
        parallel=9; protect=9; say "MPS on"
    else
        echo quit | nvidia-cuda-mps-control 2>/dev/null
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        say "MPS unavailable: the runs take turns on the GPU"
    fi
    rm -f "$DEADLINE_FILE"
    say "paper runs: $parallel at a time, budget $1 s"
    setsid nohup python3 benchmarks/paper_cifar10.py --data-dir "$DATA" --cache-dir "$CACHE" --device "$DEVICE" \
        --out "$RUNS" --budget-s "$1" --parallel "$parallel" --protect "$protect" --deadline-file "$DEADLINE_FILE" $PAPER_ARGS \
        > "$RES/paper.log" 2>&1 < /dev/null &
    echo $! > "$RES/paper.pid"
}

# First the files whose CUDA cases KERNEL_NOTES' plan reads (real CUDA-graph steps, the Triton merges
# of test_module_use.py, the launchers' checks and fp32_precision cases, the scheduler's load under
# a CUDA generator, checkpointing's debug mode, the conv "auto" adapter under compile, the TF32 conv
# layouts, the conv export with a dynamic batch), small files before big ones: a run cut at its time
# limit loses the rest.  pytest -v names each test in tests-cuda.log as it finishes.
NATIVE_TESTS="tests/test_train_steps.py tests/test_module_use.py tests/test_kernels_linear.py tests/test_scheduler.py
    tests/test_checkpointing_hooks.py tests/test_compile_switches.py tests/test_module_state.py tests/test_conv.py
    tests/test_kernels_compile.py tests/test_linear.py tests/test_conv_kernels.py tests/test_convert.py
    tests/test_optimizer_state.py benchmarks/test_bench_linear.py::test_each_provider_computes_its_form"

native_tests() {   # compiled kernels on CUDA, beside the runs (own session: they outlive call 1)
    # One process: under pytest-xdist (-n 4, 2026-11-27) three of four workers failed to import
    # tests/_helpers.py and nothing ran; alone they took 226 s for 1151 tests on the H200 (2026-11-27-2).
    say "native tests started"
    (unset DYNRANK_BACKEND; setsid nohup timeout 500 python3 -m pytest -v -p no:xdist -p no:cacheprovider $NATIVE_TESTS \
        > "$RES/tests-cuda.log" 2>&1 < /dev/null &)
}

native_tests_now() {   # the same tests in this call, within its time left (PAPER=0)
    local t; t=$(($(left) - 15))
    [ "$t" -lt 30 ] && { say "no time left for the native tests"; return; }
    say "native tests (≤ ${t}s)"
    (unset DYNRANK_BACKEND; timeout -s INT -k 10 "$t" python3 -m pytest -v -p no:xdist -p no:cacheprovider $NATIVE_TESTS \
        > "$RES/tests-cuda.log" 2>&1 < /dev/null)
    tail -n 3 "$RES/tests-cuda.log"
    cp "$RES/tests-cuda.log" "$OUT/"
}

collect() {
    if [ ! -f "$RES/paper.pid" ]; then
        say "no runs on this machine: starting them"
        start_paper $(($(left) - 60))
    else
        echo $(($(date +%s) + $(left) - 50)) > "$DEADLINE_FILE"
    fi
    local pid; pid=$(cat "$RES/paper.pid")
    while kill -0 "$pid" 2>/dev/null; do
        sleep 5
        [ $(( ($(date +%s) - T0) % 60 )) -lt 5 ] && grep "^\[" "$RES/paper.log" | tail -n 1
    done
    cp "$RES/paper.log" "$OUT/"
    cp "$RES/tests-cuda.log" "$OUT/" 2>/dev/null && tail -n 3 "$RES/tests-cuda.log"
    cp "$RUNS/summary.md" "$OUT/" 2>/dev/null
    (cd "$RES" && tar -czf "$OUT/paper.tgz" --exclude=checkpoint.pt --exclude=model.pt cifar10-resnet20)
    local ckpts; ckpts=$(cd "$RES" && find cifar10-resnet20 -name checkpoint.pt ! -execdir test -f result.json \; -print)
    [ -n "$ckpts" ] && (cd "$RES" && tar -czf "$OUT/paper-checkpoints.tgz" $ckpts)
    grep -v "^\[" "$RES/paper.log" | tail -n 25
}

setup
say "setup done"
case "$PHASE" in
    bench) bench
        if [ "${PAPER:-0}" = 1 ]; then start_paper "${PAPER_BUDGET:-900}"; native_tests; else native_tests_now; fi ;;
    collect) collect ;;
    *) echo "unknown phase $PHASE"; exit 2 ;;
esac
say "done"
