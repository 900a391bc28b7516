"""Where a Triton kernel launch runs: compiled on a GPU, or in Triton's interpreter.

Triton chooses between compiled and interpreted kernels when it is imported
(``TRITON_INTERPRET=1``), so the choice is process-wide: with the interpreter
on, every launch runs on the CPU through numpy, CUDA tensors included.
"""

import contextlib
import os

import torch

__all__ = ["interpreting", "check_launchable", "launch_device"]


def interpreting():
    """True when Triton kernels in this process run in the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(tensor):
    """Raise a clear error where a kernel cannot run on ``tensor``'s device."""
    if tensor.device.type == "cuda" or interpreting():
        return
    raise RuntimeError(
        f"dynrank's Triton kernels need CUDA tensors, got a tensor on {tensor.device}. "
        "To run them on the CPU through Triton's interpreter, set TRITON_INTERPRET=1 before "
        "Python imports triton; otherwise use DYNRANK_BACKEND=torch (the default off CUDA).")


def launch_device(tensor):
    """Context for a launch that writes ``tensor``: its CUDA device made current when it is not already.

    The interpreter and a tensor on the current device need nothing (entering
    ``torch.cuda.device`` costs host time on every launch).
    """
    if interpreting() or tensor.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)
