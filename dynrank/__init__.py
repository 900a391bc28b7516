"""dynrank: dynamic-rank training with fused Triton kernels.

Layers keep their weight in one of three forms — ``lowrank`` (A·Bᵀ), ``full``
(W) or ``adapter`` (frozen W_f + A·Bᵀ) — and switch between them with
``inflate()`` and ``deflate()``.
"""

from . import functional
from .linear import FusedLowRankLinear

__version__ = "0.1.0"

__all__ = ["FusedLowRankLinear", "functional", "__version__"]
