"""Test configuration: which devices and backends the kernel tests run on.

Without CUDA, Triton kernels run through Triton's interpreter; it is enabled
here, before anything imports triton, because Triton reads the switch once at
import.  With CUDA present the kernels are compiled natively and the CPU
interpreter cases are skipped (Triton's interpreter is process-wide).
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_devices():
    """Devices on which the Triton kernels can run in this process."""
    if not HAS_TRITON:
        return []
    if INTERPRETING:
        return ["cpu"]
    return ["cuda"] if HAS_CUDA else []


# Per-dtype tolerances on relative error (Frobenius norm of the difference over
# the norm of the float64 reference).
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def rel_err(actual, expected):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("DYNRANK_BACKEND", "triton")


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("DYNRANK_BACKEND", "torch")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread for every test.

    The tests use tiny shapes, where one thread is fastest and unaffected by a
    busy machine, and the resume tests need the same reduction order in every
    process.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
