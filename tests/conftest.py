"""Test configuration: which devices and backends the kernel tests run on.

Without CUDA, Triton kernels run through Triton's interpreter; it is enabled
here, before anything imports triton, because Triton reads the switch once at
import.  With CUDA present the kernels are compiled natively and the CPU
interpreter cases are skipped (Triton's interpreter is process-wide).
Helpers for the test modules live in ``_helpers.py``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("DYNRANK_BACKEND", "triton")


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("DYNRANK_BACKEND", "torch")


@pytest.fixture
def kernel_calls(monkeypatch):
    """The names of the Triton entry points dynrank.functional calls during the test, in order:
    ``lowrank_linear_forward``, ``lowrank_linear_backward`` (seen at ``_forward`` and ``_backward``, the entries
    it calls, which skip the shape checks it has made) and ``merge_``."""
    import dynrank.kernels as kernels
    import dynrank.kernels.lowrank_linear as linear
    calls = []
    for module, attribute, name in ((linear, "_forward", "lowrank_linear_forward"),
                                    (linear, "_backward", "lowrank_linear_backward"), (kernels, "merge_", "merge_")):
        def spy(*args, _entry=getattr(module, attribute), _name=name, **kwargs):
            calls.append(_name)
            return _entry(*args, **kwargs)
        monkeypatch.setattr(module, attribute, spy)
    return calls


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


@pytest.fixture
def one_rank(tmp_path):
    """A 1-process gloo group, for a DistributedDataParallel or fully_shard in this process."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
