"""Which engine runs an op: Triton kernels or plain torch.

``DYNRANK_BACKEND`` selects it, read on every call so tests and users can
switch it at run time:

- ``auto`` (default): Triton for CUDA tensors when Triton is installed, torch
  everywhere else;
- ``torch``: always plain torch;
- ``triton``: always Triton; on CPU tensors the kernels run in Triton's
  interpreter (slow: for testing kernels without a GPU).
"""

import importlib.util
import os

__all__ = ["backend_for", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")


# find_spec locates the package without importing it (no import-time cost).
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def _triton_available():
    return _TRITON_AVAILABLE


def requested_backend():
    value = os.environ.get("DYNRANK_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"DYNRANK_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def backend_for(device):
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device``."""
    value = requested_backend()
    if value == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if value == "triton" and not _triton_available():
        raise RuntimeError("DYNRANK_BACKEND=triton but Triton is not installed; "
                           "install triton or use DYNRANK_BACKEND=torch")
    if value == "triton" and device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"the Triton backend runs on CUDA or (interpreted) CPU tensors, got {device}")
    return value
