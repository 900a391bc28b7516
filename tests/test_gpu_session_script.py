"""benchmarks/gpu_session.sh, run here with stand-in commands: what one GPU call spends its time on,
what it packs, and where it stops.

The stand-ins come first on PATH: ``date +%s`` reads a simulated clock, ``timeout`` runs its command
and then moves that clock on by its whole limit (every step runs to its cap, the worst case), and
``python3`` writes what each step of the session would (suite JSONs, logs, the profile) at once.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from _helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_session.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

STAND_INS = {
    "date": """#!/bin/bash
if [ "$1" = "+%s" ]; then cat "$SIM_CLOCK"; else exec "$REAL_DATE" "$@"; fi
""",
    "timeout": """#!/bin/bash
while [ "${1#-}" != "$1" ]; do shift 2; done      # -s SIGNAL, -k SECONDS
limit=$1; shift
echo "timeout $limit $*" >> "$SIM_CALLS"
"$@"; rc=$?
echo $(( $(cat "$SIM_CLOCK") + limit )) > "$SIM_CLOCK"
exit $rc
""",
    "nvidia-smi": "#!/bin/bash\nexit 0\n",
    "python3": """#!/bin/bash
advance() { echo $(( $(cat "$SIM_CLOCK") + $1 )) > "$SIM_CLOCK"; }
out_of() { echo "$2" | grep -o -- "$1[= ][^ ]*" | head -n 1 | cut -c $((${#1} + 2))-; }
put() {     # put PATH TEXT, only under the test's folder
    case "$1" in
        "$SIM_ROOT"/*) printf '%s' "$2" > "$1" ;;
        *) echo "stand-in: refusing to write '$1'" >&2; exit 9 ;;
    esac
}
suite() {   # suite [MORE]: a suite JSON's start, with MORE before its closing brace
    printf '{"machine_info": {"dynrank": {"device": "cuda", "device_name": "H200"}}, "datetime": "%s"%s}' \\
        2026-11-29T10:00:00+00:00 "$1"
}
case "$*" in
  "-m pip "*) exit 0 ;;
  "- "*) if [ "${SIM_SETUP:-}" = real ]; then exec "$REAL_PYTHON" "$@"; fi
     cat > /dev/null; advance 20; echo "device NVIDIA H200 (stand-in)"; put "$2" "$(suite)"; exit 0 ;;
  *profile_ops.py*) put "$(out_of --out "$*")" profile; echo "profile written"; exit 0 ;;
  *report.py*) advance 5; put "$(out_of --out "$*")" report; put "$(out_of --plot "$*")" png; exit 0 ;;
  *sweep_*.py*) put "$(out_of --out "$*")" sweep; exit 0 ;;
  *--benchmark-only*) json=$(out_of --benchmark-json "$*")
     if [ "$(basename -- "$json")" = "${SIM_FAIL:-}.json" ]; then
         put "$json" ""; echo "E   RuntimeError: $SIM_FAIL failed (stand-in)"; echo "1 failed in 1.00s"; exit 1
     fi
     put "$json" "$(suite ', "benchmarks": []')"; echo "1 passed in 1.00s"; exit 0 ;;
  "-m pytest "*) echo "native $*" >> "$SIM_CALLS"; echo "1 passed in 1.00s"; exit 0 ;;
esac
echo "unexpected python3 $*" >&2; exit 9
""",
}


def _session(tmp_path, seconds, **env):
    """Run ``gpu_session.sh bench SECONDS`` with the stand-ins; returns (process, out folder, res folder, calls)."""
    bin_dir, out, res = tmp_path / "bin", tmp_path / "out", tmp_path / "res"
    bin_dir.mkdir(exist_ok=True)
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    clock, calls = tmp_path / "clock", tmp_path / "calls"
    clock.write_text("1000\n")
    calls.write_text("")
    settings = ("BENCH_SECONDS", "BENCH_ALL", "PAPER", "TESTS_SECONDS", "SESSION_DEVICE")
    env = dict({k: v for k, v in os.environ.items() if k not in settings}, PATH=f"{bin_dir}:{os.environ['PATH']}",
               SIM_CLOCK=str(clock), SIM_CALLS=str(calls), REAL_DATE=shutil.which("date"), REAL_PYTHON=sys.executable,
               OUT=str(out), SESSION_RES=str(res), SIM_ROOT=str(tmp_path), **env)
    process = subprocess.run(["bash", str(SCRIPT), "bench", str(seconds)], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
    return process, out, res, calls.read_text().splitlines()


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_a_560_s_call_keeps_the_native_tests_time_and_packs_its_own_files(tmp_path):
    """With every step running to its cap, BENCH_SECONDS=400 left the native tests 111 s of a 560 s call
    (they need about 300), and a rerun on the same machine packed the last call's JSONs; a suite's
    failures kept only its last two lines, and test_module_use.py's Triton cases never ran."""
    stale = tmp_path / "res" / "bench"
    stale.mkdir(parents=True)
    (stale / "merge_queued.json").write_text('{"left": "by the last call"}')
    process, out, res, calls = _session(tmp_path, 560, BENCH_SECONDS="400", SIM_FAIL="linear")
    assert process.returncode == 0, process.stdout + process.stderr
    said = re.findall(r"^\[(\d+)s\] (.*)$", process.stdout, re.M)
    given = [int(m) for _, what in said for m in re.findall(r"native tests \(≤ (\d+)s\)", what)]
    assert given and given[0] >= 320, process.stdout              # TESTS_SECONDS, 320 by default
    assert int(said[-1][0]) <= 560 - 15 and said[-1][1] == "done", process.stdout
    with tarfile.open(out / "bench.tgz") as tar:
        packed = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        assert "RuntimeError: linear failed (stand-in)" in tar.extractfile(packed["linear.log"]).read().decode()
    assert "merge_queued.json" not in packed                       # nothing of the last call
    assert {"profile.txt", "session.json", "linear.json", "linear.log"} <= set(packed)
    native = [line for line in calls if line.startswith("native ")]
    assert len(native) == 1 and " -v " in native[0]
    files = [arg.split("::")[0] for arg in native[0].split() if arg.endswith(".py") or "::" in arg]
    assert files[:2] == ["tests/test_train_steps.py", "tests/test_module_use.py"]
    first = {"tests/test_train_steps.py", "tests/test_module_use.py", "tests/test_kernels_linear.py",
             "tests/test_scheduler.py", "tests/test_checkpointing_hooks.py", "tests/test_compile_switches.py",
             "tests/test_module_state.py", "tests/test_conv.py"}
    assert set(files[:len(first)]) == first
    assert (out / "tests-cuda.log").is_file()
    # What came back folds, with the failed suite named as failed.
    fold = load_script("benchmarks/fold_session.py", "dynrank_fold_session_script")
    notes = []
    assert fold.fold(str(out), str(tmp_path / "results"), log=notes.append) == [str(tmp_path / "results" /
                                                                                 "gpu-h200-2026-11-29")]
    assert any("linear.json is empty or not a suite JSON (none of its benchmarks succeeded: linear.log ends "
               "'1 failed in 1.00s')" in note for note in notes), notes


def test_bench_all_keeps_the_native_tests_time_too(tmp_path):
    """With BENCH_ALL=1 the engine diagnosis ran its 60 s past the bench's end, leaving the tests 280 s of
    the 320 kept for them."""
    process, out, res, calls = _session(tmp_path, 560, BENCH_ALL="1")
    assert process.returncode == 0, process.stdout + process.stderr
    given = [int(t) for t in re.findall(r"native tests \(≤ (\d+)s\)", process.stdout)]
    assert given and given[0] >= 320, process.stdout


def test_setup_stops_where_torch_sees_no_gpu(tmp_path):
    """The call went on with torch on the CPU (setup printed "device cpu") and its numbers were folded as
    a GPU session's.  Runs setup's own check, with the GPU hidden from torch."""
    pytest.importorskip("triton")
    pytest.importorskip("tensorly")
    process, out, res, calls = _session(tmp_path, 560, SIM_SETUP="real", CUDA_VISIBLE_DEVICES="")
    assert process.returncode == 1, process.stdout + process.stderr
    assert "sees no CUDA device: stopping (SESSION_DEVICE=cpu runs the script on the CPU as a dry run)" \
        in process.stderr
    assert calls == [] and not (out / "bench.tgz").exists()
    # The dry run goes on, and records the CPU, so that its archive cannot be folded as a GPU session.
    process, out, res, calls = _session(tmp_path, 560, SIM_SETUP="real", CUDA_VISIBLE_DEVICES="",
                                        SESSION_DEVICE="cpu")
    assert process.returncode == 0, process.stdout + process.stderr
    info = json.loads((res / "session.json").read_text())
    assert info["machine_info"]["dynrank"]["device"] == "cpu"
    fold = load_script("benchmarks/fold_session.py", "dynrank_fold_session_script")
    with pytest.raises(ValueError, match=re.escape("session.json records the device 'cpu', expected cuda")):
        fold.fold(str(out), str(tmp_path / "results"), log=lambda _: None)
