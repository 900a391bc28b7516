"""dynrank: dynamic-rank training with fused Triton kernels.

Layers keep their weight in one of three forms — ``lowrank`` (A·Bᵀ), ``full``
(W) or ``adapter`` (frozen W_f + A·Bᵀ) — and switch between them with
``inflate()`` and ``deflate()``; :class:`DynamicRankScheduler` runs the
paper's schedule of switches on a whole model.
"""

from . import cost, distributed, functional, metrics, regularizers
from .checkpoint import load_training_state, training_state
from .conv import LowRankConv2d
from .convert import ConversionSummary, convert_model
from .distributed import rewrap_ddp
from .inrank import IncrementalRankScheduler, grow_rank_
from .linear import FusedLowRankLinear
from .monitor import RankMonitor
from .profiling import FormProfile, profile_forms
from .regularizers import SRIP, DoubleSoftOrthogonality, SoftOrthogonality
from .scheduler import DynamicRankScheduler
from .schedules import finetune_schedule, midpoint_schedule, schedule_from_lr
from .unconvert import UnconversionSummary, unconvert_model

__version__ = "0.1.0"

__all__ = [
    "FusedLowRankLinear", "LowRankConv2d",
    "convert_model", "ConversionSummary", "unconvert_model", "UnconversionSummary",
    "DynamicRankScheduler", "training_state", "load_training_state",
    "schedule_from_lr", "midpoint_schedule", "finetune_schedule",
    "IncrementalRankScheduler", "grow_rank_",
    "RankMonitor", "profile_forms", "FormProfile", "SoftOrthogonality", "DoubleSoftOrthogonality", "SRIP",
    "rewrap_ddp", "distributed", "functional", "metrics", "regularizers", "cost",
    "__version__",
]

import importlib.abc as _importlib_abc  # noqa: E402
import importlib.util as _importlib_util  # noqa: E402
import os as _os  # noqa: E402
import sys as _sys  # noqa: E402


class _CheckoutKernels(_importlib_abc.MetaPathFinder):
    """Finds ``dynrank.kernels`` in a source checkout's top-level ``kernels/`` folder.

    setup.py installs that folder as ``dynrank.kernels``; run from a checkout (``python -m
    dynrank.train``, ``python -m pytest``, an editable install without its finder) the package is
    ``dynrank/`` alone.  This finder answers for that one name and nothing else, so the package's
    ``__path__`` stays its own folder (tools that walk it, such as ``pkgutil.walk_packages`` or
    doc generators, see only dynrank's modules).  Nothing is imported until ``dynrank.kernels`` is.
    """

    def __init__(self, folder):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != __name__ + ".kernels":
            return None
        return _importlib_util.spec_from_file_location(fullname, _os.path.join(self.folder, "__init__.py"),
                                                       submodule_search_locations=[self.folder])


_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout_kernels = _os.path.join(_os.path.dirname(_here), "kernels")
if (not _os.path.isdir(_os.path.join(_here, "kernels"))
        and _os.path.isfile(_os.path.join(_checkout_kernels, "__init__.py"))
        and not any(isinstance(f, _CheckoutKernels) for f in _sys.meta_path)):
    _sys.meta_path.append(_CheckoutKernels(_checkout_kernels))
