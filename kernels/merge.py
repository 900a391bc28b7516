"""Fused inflate-merge: W ← W + alpha·A·Bᵀ, in place.

Shapes: W (N, K), A (N, R), B (K, R).  Each program reads one tile of W, adds
the rank-R product accumulated in fp32, and writes the tile back: W is read
once and written once, the product A·Bᵀ never exists in memory.  A negative
alpha subtracts (the SVD deflate: W_f = W − A·Bᵀ).
"""


from .lowrank_gemm import lowrank_gemm

__all__ = ["merge_", "reference_merge"]


def merge_(weight, A, B, alpha=1.0):
    """In-place ``weight += alpha * A @ B.T`` with fp32 accumulation; returns ``weight``.

    Args:
        weight: (N, K), any strides, written in place.
        A: (N, R).  B: (K, R).  Same device as weight; any float dtypes.
        alpha: float scale.

    Raises:
        ValueError: on shape mismatch (from the GEMM engine).
    """
    return lowrank_gemm(u=A, vt=B.t(), beta=alpha, out=weight, accumulate=True)


def reference_merge(weight, A, B, alpha=1.0):
    """Float64 result of ``weight + alpha * A @ B.T`` (a new tensor)."""
    return weight.double() + alpha * (A.double() @ B.double().t())
