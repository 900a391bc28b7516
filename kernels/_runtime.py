"""Where a Triton kernel launch runs: compiled on a GPU, or in Triton's interpreter.

Triton chooses between compiled and interpreted kernels as it decorates them, at import, from
``TRITON_INTERPRET`` as it is then (its own library functions when triton is imported, these
kernels when this package is), so the choice is process-wide: with the interpreter on, every
launch runs on the CPU through numpy, CUDA tensors included.
"""

import contextlib
import math
import numbers
import os

import torch

# What the kernels take (they accumulate in fp32).  The package stays importable on its own (a
# top-level ``kernels`` found on sys.path is imported by other libraries' probes), so this is not
# imported from dynrank._backend, whose TRITON_DTYPES is the same list.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The largest finite float32: the kernels multiply their fp32 accumulators by alpha / scale / beta.
FLOAT32_MAX = torch.finfo(torch.float32).max

__all__ = ["interpreting", "check_launchable", "check_kernel_dtypes", "check_tensors", "check_scale",
           "check_no_overlap", "check_not_aliased", "check_writable", "launch_device"]

# (whether Triton made its own library functions interpreter functions, a reader of TRITON_INTERPRET as
# Triton parses it, Triton's class of compiled functions): resolved on the first launch.
_TRITON_MODE = None


def _triton_mode():
    global _TRITON_MODE
    if _TRITON_MODE is None:
        import triton
        from triton.runtime.jit import JITFunction
        knobs = getattr(triton, "knobs", None)      # Triton >= 3.4 takes "1", "true", "on", "yes"
        if knobs is not None:
            requested = lambda: knobs.runtime.interpret     # noqa: E731
        else:
            requested = lambda: os.environ.get("TRITON_INTERPRET", "0") == "1"     # noqa: E731
        # A @triton.jit function of Triton's own, decorated when triton was imported.
        _TRITON_MODE = (not isinstance(triton.language.standard.cdiv, JITFunction), requested, JITFunction)
    return _TRITON_MODE


def _mode(interpreted):
    return "interpreted" if interpreted else "compiled"


def interpreting(kernel=None):
    """True when Triton kernels in this process run in the interpreter.

    The mode Triton chose, not ``TRITON_INTERPRET`` as it is now: Triton reads the variable as it
    decorates its functions, at import.  ``kernel`` (a ``@triton.jit`` function about to be launched)
    must be of the same mode as Triton's own functions, which it calls.

    Raises:
        RuntimeError: ``TRITON_INTERPRET`` set or unset after triton was imported (the kernels keep
            the mode of the import), or changed between the imports of triton and of ``kernel``'s
            module (an interpreted kernel cannot call compiled functions, nor the reverse).
    """
    interpreted, requested, jit_function = _triton_mode()
    restart = ("TRITON_INTERPRET must be set before Python imports triton and dynrank: restart Python with it "
               "set as you want it")
    if kernel is not None and isinstance(kernel, jit_function) == interpreted:
        raise RuntimeError(f"Triton made its own functions {_mode(interpreted)} when triton was imported but "
                           f"dynrank's kernel {kernel.__name__} {_mode(not interpreted)} when its module was "
                           f"(TRITON_INTERPRET changed in between); {restart}")
    if requested() != interpreted:
        value = os.environ.get("TRITON_INTERPRET")
        raise RuntimeError(f"TRITON_INTERPRET is {'unset' if value is None else repr(value)} now, but Triton made "
                           f"its functions {_mode(interpreted)} when triton was imported (it reads the variable "
                           f"once, at import); {restart}")
    return interpreted


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


def check_tensors(op, optional=(), **tensors):
    """TypeError naming the first of ``tensors`` (name → value) that is not a tensor, ValueError for a meta
    tensor (it holds no data for a kernel to read or write).  The names in ``optional`` may be None
    (an absent operand)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            if t is None and name in optional:
                continue
            raise TypeError(f"{op} takes tensors, got {name} of type {type(t).__name__}")
        if t.is_meta:
            raise ValueError(f"{op} runs Triton kernels, which need tensors with real data, got {name} on "
                             f"the meta device")


def check_scale(op, name, value):
    """``value`` as a float, where it is a real number that float32 holds.

    The kernels multiply an fp32 accumulator by it, so NaN, ±inf and a finite value past float32's
    range (1e300) are ValueErrors; a value of the wrong type (None, str, bool, complex, a list) a
    TypeError.  A Python or numpy number, or a 0-d real tensor that needs no grad (read once, as
    ``float()`` reads it).  A nonzero value below float32's smallest subnormal (1.4e-45) in magnitude
    is taken and acts as 0 in fp32, as torch's float32 GEMMs take such an alpha (dynrank's torch
    engine takes it too, so refusing it here would make the engines disagree).
    """
    if type(value) is float and -FLOAT32_MAX <= value <= FLOAT32_MAX:     # the common case: no more checks
        return value
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise TypeError(f"{op}: {name} is read as a number, so a tensor that requires grad would get no "
                        f"gradient; pass a float (or detach it)")
    if (isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_meta
            and not value.is_complex() and value.dtype != torch.bool):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__} ({value!r})")
    try:
        number = float(value)
    except OverflowError:       # an int past float64's range
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number) and not isinstance(value, numbers.Integral):
        raise ValueError(f"{op}: {name} must be finite, got {value!r}")
    if not -FLOAT32_MAX <= number <= FLOAT32_MAX:
        raise ValueError(f"{op}: {name} must be within float32's range (magnitude at most {FLOAT32_MAX:.4g}): "
                         f"the kernels compute in fp32, got {value!r}")
    return number


def check_no_overlap(op, name, tensor):
    """ValueError where elements of ``tensor``, which ``op`` writes, share memory (an expanded view, an
    unfold's overlapping windows): each write would land on several elements.  A layout passes at once
    when, in increasing stride order, each stride steps past all that the smaller ones reach (an empty
    tensor always does); any other is checked element by element (an interleaved ``as_strided`` view's
    offsets may all differ).  dynrank's ``functional.check_no_overlap`` is the same rule: this package
    imports without dynrank."""
    if tensor.numel() == 0:
        return
    reach = 0
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape) if n > 1):
        if stride <= reach:
            break
        reach += stride * (size - 1)
    else:
        return
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(tensor.shape, tensor.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size) * stride
    if torch.unique(offsets).numel() < tensor.numel():
        raise ValueError(f"{op} writes {name}, so its elements must not share memory, got a view whose "
                         f"elements overlap (shape {tuple(tensor.shape)}, strides {tensor.stride()})")


def _byte_range(tensor):
    """[first, last + 1) bytes that ``tensor``'s elements span in memory (empty for an empty tensor)."""
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return start, start + (last + 1) * tensor.element_size()


def check_not_aliased(op, name, tensor, **operands):
    """ValueError where one of ``operands`` (name → tensor, which ``op`` reads) spans memory that
    ``tensor`` (which ``op`` writes while it reads them) spans too: a factor that is a view of the
    weight (``A = W[:, :4]``) would be read after some of its elements were written.  Ranges of
    bytes, not elements, on one device: interleaved views whose elements differ are refused too.  Meta
    tensors hold no memory (their data pointers are all 0): nothing to compare."""
    if tensor.is_meta:
        return
    start, end = _byte_range(tensor)
    for other_name, other in operands.items():
        if other.device != tensor.device:
            continue
        other_start, other_end = _byte_range(other)
        if start < other_end and other_start < end:
            raise ValueError(f"{op} writes {name} while it reads {other_name}, so they must not share memory, "
                             f"got {other_name} {tuple(other.shape)} in memory that {name} "
                             f"{tuple(tensor.shape)} spans (pass {other_name}.clone())")


def check_writable(op, name, tensor):
    """RuntimeError where ``op``, which writes ``tensor`` in place through a kernel that autograd does not
    record, is given a tensor that torch's own in-place ops would refuse or record: one that requires grad
    while grad mode is on (torch refuses a leaf there and records the write on any other, which a kernel
    cannot), or an inference tensor outside ``torch.inference_mode()``.  Under ``torch.no_grad()``
    (dynrank's own merges) the write is a plain update of the values."""
    if tensor.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{op} writes {name} in place, which autograd cannot record, got a {name} that "
                           f"requires grad with grad mode on; call it under torch.no_grad()")
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"{op} writes {name} in place, got an inference tensor (made under "
                           f"torch.inference_mode()) outside inference mode, where torch allows no in-place "
                           f"update of it; call it under torch.inference_mode() or pass {name}.clone()")


def launch_device(tensor):
    """Context for a launch that writes ``tensor``: its CUDA device made current when it is not already.

    The interpreter and a tensor on the current device need nothing (entering
    ``torch.cuda.device`` costs host time on every launch).
    """
    if interpreting() or tensor.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)
