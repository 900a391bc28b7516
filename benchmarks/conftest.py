"""pytest configuration of the benchmark suites.

Run ``pytest benchmarks/ --benchmark-only`` to time, ``--benchmark-disable``
to run every provider once without timing (what CI does).  The header of the
run names the device, the grid and the versions; the JSON written with
``--benchmark-json`` carries them (and the measured rooflines) in
``machine_info["dynrank"]``.
"""

import os
import sys

import pytest
import torch

# The suites import their helpers as top-level modules; make that independent
# of pytest's import mode.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import _bench_common as common  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_target: a shape with a stated speed target")


def pytest_report_header(config):
    return [
        f"dynrank benchmarks: device {common.device_name()}, grid {common.grid_mode()}, "
        f"compile providers {'on' if common.compile_enabled() else 'off'}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in common.versions().items() if v),
        f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}"
        + (f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""),
    ]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["dynrank"] = {
        "device": str(common.DEVICE),
        "device_name": common.device_name(),
        "grid": common.grid_mode(),
        "versions": common.versions(),
        "rooflines": common.measured_rooflines(),
        "num_threads": torch.get_num_threads(),
        # Other work on the machine distorts CPU timings badly (thread oversubscription).
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
    }


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _cudnn_autotune():
    # cuDNN picks the fastest algorithm per conv shape, as any training run does;
    # the first (warm-up) calls of each shape pay for the search.
    if not common.ON_CUDA:
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = previous
