"""Triton kernels of dynrank, installed as ``dynrank.kernels``.

Each op of the engine lives in its own module with its host launcher and a
plain-torch reference (``lowrank_gemm_tma``, an experimental launcher timed
beside the engine, has the engine's reference).  Users never import this
package directly: ``dynrank.functional`` dispatches to it with
``DYNRANK_BACKEND=triton`` (on CUDA, or on CPU through Triton's interpreter);
the default ``auto`` keeps cuBLAS/ATen on CUDA for every op, as measured
(README, "Kernels and dispatch").
"""

from .conv_merge import (conv_merge_, reference_conv_merge, reference_cp_kernel, reference_kernel,
                         reference_svd_kernel, reference_tkd_cpd_kernel, reference_tucker_kernel)
from .lowrank_gemm import lowrank_gemm, reference_lowrank_gemm
from .lowrank_linear import lowrank_linear_backward, lowrank_linear_forward, reference_lowrank_linear
from .merge import merge_, reference_merge

__all__ = [
    "lowrank_gemm", "reference_lowrank_gemm",
    "lowrank_linear_forward", "lowrank_linear_backward", "reference_lowrank_linear",
    "merge_", "reference_merge",
    "conv_merge_", "reference_conv_merge", "reference_svd_kernel", "reference_tucker_kernel",
    "reference_cp_kernel", "reference_tkd_cpd_kernel", "reference_kernel",
]
