"""Where a Triton kernel launch runs: compiled on a GPU, or in Triton's interpreter.

Triton chooses between compiled and interpreted kernels when it is imported
(``TRITON_INTERPRET=1``), so the choice is process-wide: with the interpreter
on, every launch runs on the CPU through numpy, CUDA tensors included.
"""

import contextlib
import os

import torch

# What the kernels take (they accumulate in fp32).  The package stays importable on its own (a
# top-level ``kernels`` found on sys.path is imported by other libraries' probes), so this is not
# imported from dynrank._backend, whose TRITON_DTYPES is the same list.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["interpreting", "check_launchable", "check_kernel_dtypes", "launch_device"]


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


def check_kernel_dtypes(op, **tensors):
    """TypeError naming the first of ``tensors`` (name → tensor) whose dtype the kernels do not take."""
    for name, t in tensors.items():
        if t.dtype not in TRITON_DTYPES:
            raise TypeError(f"{op} takes float32, float16 or bfloat16 tensors (fp32 accumulation), got {name} "
                            f"of dtype {t.dtype}")


def launch_device(tensor):
    """Context for a launch that writes ``tensor``: its CUDA device made current when it is not already.

    The interpreter and a tensor on the current device need nothing (entering
    ``torch.cuda.device`` costs host time on every launch).
    """
    if interpreting() or tensor.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)
