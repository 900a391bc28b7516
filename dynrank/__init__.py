"""dynrank: dynamic-rank training with fused Triton kernels.

Layers keep their weight in one of three forms — ``lowrank`` (A·Bᵀ), ``full``
(W) or ``adapter`` (frozen W_f + A·Bᵀ) — and switch between them with
``inflate()`` and ``deflate()``; :class:`DynamicRankScheduler` runs the
paper's schedule of switches on a whole model.
"""

from . import cost, distributed, functional, metrics, regularizers
from .conv import LowRankConv2d
from .convert import ConversionSummary, convert_model
from .distributed import rewrap_ddp
from .inrank import IncrementalRankScheduler, grow_rank_
from .linear import FusedLowRankLinear
from .monitor import RankMonitor
from .regularizers import SRIP, DoubleSoftOrthogonality, SoftOrthogonality
from .scheduler import DynamicRankScheduler, load_training_state, training_state
from .schedules import finetune_schedule, midpoint_schedule, schedule_from_lr

__version__ = "0.1.0"

__all__ = [
    "FusedLowRankLinear", "LowRankConv2d",
    "convert_model", "ConversionSummary",
    "DynamicRankScheduler", "training_state", "load_training_state",
    "schedule_from_lr", "midpoint_schedule", "finetune_schedule",
    "IncrementalRankScheduler", "grow_rank_",
    "RankMonitor", "SoftOrthogonality", "DoubleSoftOrthogonality", "SRIP",
    "rewrap_ddp", "distributed", "functional", "metrics", "regularizers", "cost",
    "__version__",
]

import os as _os  # noqa: E402

# The Triton kernels live in the checkout's top-level ``kernels/`` folder, which setup.py installs as
# ``dynrank.kernels``.  Run from a source checkout (``python -m dynrank.train``, ``python -m pytest``),
# the package is this folder, without them: let ``dynrank.kernels`` resolve to that folder then.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "kernels"))
        and _os.path.isfile(_os.path.join(_checkout, "kernels", "__init__.py"))):
    __path__.append(_checkout)
