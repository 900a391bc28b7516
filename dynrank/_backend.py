"""Which engine runs an op: Triton kernels or plain torch (cuBLAS on CUDA).

``DYNRANK_BACKEND`` selects it, read on every call so tests and users can
switch it at run time:

- ``auto`` (default): per op, the engine measured faster on CUDA
  (:data:`AUTO_TRITON_OPS` lists the ops that take the Triton kernels there),
  torch everywhere else;
- ``torch``: always plain torch;
- ``triton``: always Triton; on CPU tensors the kernels run in Triton's
  interpreter (slow: for testing kernels without a GPU).  float64 operands and
  meta tensors (no data) take torch.
"""

import importlib.util
import os

import torch

__all__ = ["backend_for", "BACKENDS", "OPS", "AUTO_TRITON_OPS", "TRITON_DTYPES"]

BACKENDS = ("auto", "torch", "triton")
OPS = ("lowrank_linear", "merge", "conv_merge")

# Ops for which ``auto`` runs the Triton kernels on CUDA, chosen by measurement
# (benchmarks/KERNEL_NOTES.md).  On an H200 with Triton 3.6 the torch/cuBLAS
# path was faster for every op on the benchmark grid, so none is listed;
# DYNRANK_BACKEND=triton still runs the kernels for every op.
AUTO_TRITON_OPS = frozenset()

# What the kernels take (see backend_for's dtypes).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# find_spec locates the package without importing it (no import-time cost).
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def _triton_available():
    return _TRITON_AVAILABLE


def _environ_reader(name):
    """A function returning ``os.environ.get(name)`` now, at the cost of a dict lookup.

    ``os.environ.get`` of an unset name raises and catches a ``KeyError`` inside
    (about 2 µs, paid on every layer call).  CPython's ``os.environ`` keeps its
    encoded items in ``_data``, which every change made through ``os.environ``
    updates, so reading that dict sees what ``get`` would.  Where it has no such
    dict, or ``os.environ`` was replaced, or under ``torch.compile``, the reader
    falls back to ``get``.
    """
    environ = os.environ
    data = getattr(environ, "_data", None)
    encodekey = getattr(environ, "encodekey", None)
    decodevalue = getattr(environ, "decodevalue", None)
    if not (isinstance(data, dict) and callable(encodekey) and callable(decodevalue)):
        return lambda: os.environ.get(name)
    key = encodekey(name)

    def read():
        if os.environ is not environ or torch.compiler.is_compiling():
            return os.environ.get(name)
        raw = data.get(key)
        return None if raw is None else decodevalue(raw)

    return read


_read_backend_variable = _environ_reader("DYNRANK_BACKEND")


def requested_backend():
    """The ``DYNRANK_BACKEND`` setting, read now: ``"auto"``, ``"torch"`` or ``"triton"``."""
    raw = _read_backend_variable()
    if raw is None:
        return "auto"
    value = raw.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"DYNRANK_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def backend_for(device, op, *dtypes):
    """Return ``"triton"`` or ``"torch"`` for ``op`` (one of :data:`OPS`) on ``device``.

    ``dtypes`` are the operands' dtypes: one outside :data:`TRITON_DTYPES` (float64) sends the op
    to torch whatever the backend, since the kernels accumulate in fp32.  So does the meta device:
    meta tensors hold no data, so there is nothing for a kernel to run on (torch gives the shapes).

    Raises:
        ValueError: an unknown ``op`` or ``DYNRANK_BACKEND`` value.
        RuntimeError: ``DYNRANK_BACKEND=triton`` without Triton installed, or on a device other than
            CUDA, CPU and meta.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    value = requested_backend()
    if value == "auto":
        use_triton = device.type == "cuda" and op in AUTO_TRITON_OPS and _triton_available()
        value = "triton" if use_triton else "torch"
    elif value == "triton" and not _triton_available():
        raise RuntimeError("DYNRANK_BACKEND=triton but Triton is not installed; "
                           "install triton or use DYNRANK_BACKEND=torch")
    elif value == "triton" and device.type not in ("cuda", "cpu", "meta"):
        raise RuntimeError(f"the Triton backend runs on CUDA or (interpreted) CPU tensors, got {device}")
    if value == "triton" and (device.type == "meta" or any(dtype not in TRITON_DTYPES for dtype in dtypes)):
        return "torch"
    return value
