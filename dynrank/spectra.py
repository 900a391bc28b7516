"""Scalar rank metrics of a singular-value vector σ₁ ≥ … ≥ σ_p, and their tolerance.

:mod:`dynrank.metrics` computes σ of a layer's effective weight and applies
these; they take any 1-D tensor (or sequence) of singular values, e.g. from
``torch.linalg.svdvals``: real, finite and ≥ 0, with values (not on the meta device), else
ValueError/TypeError.

**Tolerance.**  A singular value counts as nonzero when σ > tol·σmax.  The
default ``tol`` is the numerical-rank rule of LAPACK, numpy and
``torch.linalg.matrix_rank``: max(m, n)·eps of the dtype the weight is stored in
(float32: 768 × 3072 → 3.7e-4; 64 × 576 → 6.9e-5), capped at 1e-2 for 16-bit
dtypes where that product exceeds one.  Below it a singular value cannot be
told apart from the rounding of the stored weight.  With one tolerance for
both, λ = ∞ exactly when the effective rank is below p, so the two never
disagree.  Pass a larger ``tol`` (e.g. 1e-3) to count only singular values
that are "significantly greater than zero" in a looser sense.
"""

import math

import numpy as np
import torch

from ._args import check_int, check_real

__all__ = ["default_tol", "effective_rank", "spectral_ratio", "restricted_spectral_ratio",
           "entropy_effective_rank", "stable_rank"]


def default_tol(shape, dtype):
    """Default relative tolerance max(m, n)·eps(dtype), capped at 1e-2.

    Args:
        shape: (m, n) of the matrix, positive ints (a tuple, a list or a ``torch.Size``).
        dtype: floating dtype the weight is stored in.

    Returns:
        float in (0, 1e-2].

    Raises:
        TypeError: ``dtype`` is not a real floating dtype; ``shape`` is not a tuple, list or
            ``torch.Size``, or holds an entry that is not an int (a numpy integer is one).
        ValueError: ``shape`` not of length 2, or with an entry below 1.

    Example:
        >>> default_tol((768, 3072), torch.float32)    # doctest: +ELLIPSIS
        0.000366...
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a real floating torch.dtype (the weight's), got {dtype!r}")
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be a tuple (m, n), got {type(shape).__name__} ({shape!r})")
    expected = "(m, n) of positive ints"
    if len(shape) != 2:
        raise ValueError(f"shape must be {expected}, got {tuple(shape)!r}")
    shape = [check_int(n, "shape", expected, 1, where=f" in {tuple(shape)!r}") for n in shape]
    return min(max(shape) * torch.finfo(dtype).eps, 1e-2)


def _check_tol(tol):
    check_real(tol, "tol", "a float in [0, 1)")
    if not 0.0 <= tol < 1.0:
        raise ValueError(f"tol must be a relative tolerance in [0, 1), got {tol}")
    return float(tol)


def _given_dtype(values):
    """float64 for a list or tuple of Python numbers (a Python float is a double, which torch would make its
    default dtype), else None: a numpy array, numpy scalars or tensors keep their own dtype, whose eps the
    default tol takes."""
    if isinstance(values, (list, tuple)) and all(isinstance(x, (int, float)) for x in values):
        return torch.float64
    return None


def _as_sigma(sigma):
    if isinstance(sigma, np.ndarray):
        # torch takes no negative stride (numpy's σ reversed, s[::-1]): copied to C order where it is not.
        sigma = np.asarray(sigma, order="C")
    if not isinstance(sigma, torch.Tensor):
        try:
            sigma = torch.as_tensor(sigma, dtype=_given_dtype(sigma))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"singular values must be a 1-D tensor or sequence of numbers, got "
                            f"{type(sigma).__name__}") from exc
    if sigma.dim() != 1 or sigma.numel() == 0:
        raise ValueError(f"singular values must be a non-empty 1-D tensor, got shape {tuple(sigma.shape)}")
    if sigma.is_meta:
        raise ValueError("singular values must have values, got a tensor on the meta device (compute them "
                         "from a materialized weight)")
    if sigma.is_complex():
        raise TypeError(f"singular values must be real, got a {sigma.dtype} tensor")
    if not sigma.is_floating_point():
        sigma = sigma.double()
    sigma = sigma.detach()
    bad = ~(torch.isfinite(sigma) & (sigma >= 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"singular values must be finite and ≥ 0, got {float(sigma[i])} at index {i}")
    return sigma


def _resolve_tol(sigma, tol):
    if tol is None:
        return min(sigma.numel() * torch.finfo(sigma.dtype).eps, 1e-2)
    return _check_tol(tol)


def effective_rank(sigma, tol=None):
    """Number of singular values above ``tol``·σmax, compared in float64 whatever σ's dtype.

    Args:
        sigma: 1-D singular values (any order), length p = min(m, n) — zeros included.
        tol: relative tolerance; default p·eps(sigma.dtype), a numpy array's own dtype too
            (float64 for Python floats); use :func:`layer_metrics` for the default based on the
            stored weight's shape and dtype.

    Returns:
        int in [0, p]; 0 for the zero matrix.

    Raises:
        ValueError/TypeError: empty, non-1-D, complex or meta ``sigma``, an entry that is negative, NaN
            or infinite; ``tol`` outside [0, 1).

    Example:
        >>> effective_rank(torch.tensor([3.0, 1.0, 0.0]))
        2
    """
    sigma = _as_sigma(sigma)
    tol = _resolve_tol(sigma, tol)
    # In float64: tol·σmax rounded to σ's dtype (bf16: by up to 0.4 %) would move the threshold.
    sigma = sigma.double()
    smax = sigma.max()
    if smax <= 0:
        return 0
    return int((sigma > tol * smax).sum())


def spectral_ratio(sigma, tol=None):
    """λ = σmax / σmin (paper Eq. 1); ``math.inf`` for a rank-deficient matrix.

    The matrix counts as rank deficient when σmin ≤ tol·σmax, i.e. when
    :func:`effective_rank` < p.  Otherwise λ is the quotient in float64 whatever
    σ's dtype: about 1/tol at most, never NaN nor a 16-bit or float32 overflow.

    Args:
        sigma: all p = min(m, n) singular values, zeros included.
        tol: relative tolerance (see :func:`effective_rank`).

    Returns:
        float ≥ 1, or ``math.inf``.

    Example:
        >>> spectral_ratio(torch.tensor([4.0, 2.0])), spectral_ratio(torch.tensor([4.0, 0.0]))
        (2.0, inf)
    """
    sigma = _as_sigma(sigma)
    tol = _resolve_tol(sigma, tol)
    sigma = sigma.double()          # the threshold tol·σmax as in effective_rank
    smax, smin = sigma.max(), sigma.min()
    if smax <= 0 or smin <= tol * smax:
        return math.inf
    # In float64: a quotient in σ's dtype rounds (bf16) or overflows (fp16, fp32) where the rank is full.
    return float(smax) / float(smin)


def restricted_spectral_ratio(sigma, rank, tol=None):
    """σ₁ / σ_rank: the spectral ratio within the ``rank`` leading singular values.

    A lowrank layer of rank k < p has λ = ∞ by construction; this ratio shows
    how spread its k live singular values are (what low-rank λ curves plot).

    Args:
        sigma: singular values; rank: int in [1, len(sigma)]; tol: as in :func:`spectral_ratio`.

    Returns:
        float ≥ 1, or ``math.inf`` when σ_rank ≤ tol·σmax.

    Raises:
        TypeError: a ``rank`` that is not an int (a numpy integer is one); ``sigma`` or ``tol``
            of the wrong type.
        ValueError: ``rank`` outside [1, len(sigma)]; ``sigma`` or ``tol`` out of range.
    """
    sigma = _as_sigma(sigma)
    rank = check_int(rank, "rank", f"an int in [1, {sigma.numel()}]", 1, sigma.numel())
    top = torch.sort(sigma, descending=True).values[:rank]
    return spectral_ratio(top, _resolve_tol(sigma, tol))


def entropy_effective_rank(sigma):
    """exp(H(p)) with p_i = σ_i / Σσ and H the Shannon entropy (0·log 0 = 0).

    Equals p for equal singular values, 1 for a rank-one matrix, 0 for the zero matrix.

    Example:
        >>> entropy_effective_rank(torch.ones(5))       # doctest: +ELLIPSIS
        5.0...
    """
    sigma = _as_sigma(sigma).double()
    smax = sigma.max()
    if smax <= 0:
        return 0.0
    # Divided by σmax first: Σσ overflows (σ near 1e308) even in float64.  p = 0 is dropped after the
    # division, where a σ far below σmax (1e-200 beside 1e200) underflows to it: 0·log 0 = 0.
    q = sigma / smax
    p = q / q.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(sigma):
    """‖W‖²_F / σ²max = Σσ² / σ²max; 0 for the zero matrix.

    Example:
        >>> stable_rank(torch.tensor([2.0, 1.0, 1.0]))
        1.5
    """
    sigma = _as_sigma(sigma).double()
    smax = sigma.abs().max()
    if smax <= 0:
        return 0.0
    # Divided before squaring: σ² overflows (σ > 1e154) or underflows (σ < 1e-162) even in float64.
    return float(((sigma / smax) ** 2).sum())
