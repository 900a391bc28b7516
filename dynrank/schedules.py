"""Choosing the inflate/deflate epochs (I, D) from the learning-rate schedule.

The paper's rule (§4.2–4.3, appendix Table 10): full-rank training belongs at
the *end of the high-noise regime* (Proposition 1: the rank of W_f at deflate
bounds the adapter model's rank, so the last full-rank epochs should see
large learning rates) and at the *start of the low-noise regime*
(Proposition 2: the low-rank/full-rank update gap shrinks with η, so
full-rank epochs right after the decay matter most).  A budget of
φ·E full-rank epochs therefore straddles the first large LR decay — half
before, half after — and slides back into the run when it would pass the end.

Regime boundary for a per-epoch LR list (cosine, polynomial, warm-up, ...):
the first epoch after the peak whose LR is at or below peak/√10.  A step
decay by 10× (the paper's schedules) crosses it exactly at its milestone, so
a step schedule gives the same (I, D) whether passed as milestones or as its
per-epoch LR list; for a smooth schedule it is the geometric midpoint
between the high (η₀) and low (η₀/10) noise levels the paper's regimes
refer to — for cosine annealing, epoch ≈ 0.62·E.
"""

import math
from fractions import Fraction

from ._args import check_int, check_real

__all__ = ["schedule_from_lr", "regime_boundary", "finetune_schedule", "midpoint_schedule"]

DECAY_THRESHOLD = 10 ** -0.5


def _check_epochs(epochs):
    epochs = check_int(epochs, "epochs", "an int")
    if epochs < 2:
        raise ValueError(f"epochs must be >= 2, got {epochs}")
    return epochs


def _sequence(value, what, example):
    """``value`` as a list; TypeError for a scalar, a string or anything else not iterable."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be a sequence {example}, got {type(value).__name__} ({value!r})")
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{what} must be a sequence {example}, got {type(value).__name__} ({value!r})") from None


def _check_threshold(threshold):
    check_real(threshold, "threshold", "a float in (0, 1)")
    if not 0.0 < threshold < 1.0:                 # NaN fails this too
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return float(threshold)


def _lr_values(lrs, epochs):
    values = []
    for i, v in enumerate(_sequence(lrs, "lrs", "of per-epoch learning rates (e.g. [0.1, 0.1, 0.01])")):
        if isinstance(v, (str, bytes, bool)):
            raise TypeError(f"lrs must hold numbers, got lrs[{i}] = {v!r} ({type(v).__name__})")
        try:
            values.append(float(v))
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"lrs must hold numbers, got lrs[{i}] = {v!r} ({type(v).__name__})") from None
    if len(values) != epochs:
        raise ValueError(f"lrs must have one entry per epoch ({epochs}), got {len(values)}")
    for i, v in enumerate(values):
        if not 0.0 <= v < math.inf:               # NaN fails this too
            raise ValueError(f"lrs must be finite, non-negative and not all zero, got lrs[{i}] = {v}")
    if max(values) <= 0.0:
        raise ValueError(f"lrs must be finite, non-negative and not all zero, got all {epochs} entries 0")
    return values


def regime_boundary(epochs, milestones=None, lrs=None, threshold=DECAY_THRESHOLD):
    """First epoch of the low-noise regime.

    Args:
        epochs: total epochs E.
        milestones: epochs at which a step schedule decays the LR, a sequence of
            increasing ints (the first one is used; later ones, even past E, are
            not read: a decay the run never reaches changes nothing here).
        lrs: per-epoch learning rates (a sequence of E numbers), used when
            ``milestones`` is None.
        threshold: fraction of the peak LR that marks the low-noise regime, in
            (0, 1) (default 1/√10).

    Returns:
        int in [1, E).

    Raises:
        TypeError: non-int epochs or milestones, milestones / lrs that are not
            sequences (of numbers), a non-number threshold.
        ValueError: neither or both of milestones and lrs given, an empty or
            decreasing milestones list or a first milestone out of (0, E), an LR
            list of the wrong length, a negative, NaN or infinite LR
            (the message names its index) or all zero, a threshold outside (0, 1),
            or no epoch after the peak at or below the threshold (the message gives
            the lowest fraction of the peak reached).
    """
    epochs = _check_epochs(epochs)
    threshold = _check_threshold(threshold)
    if milestones is None and lrs is None:
        raise ValueError("give exactly one of milestones (step schedule) or lrs (per-epoch LR list); "
                         "neither was given")
    if milestones is not None and lrs is not None:
        raise ValueError("give exactly one of milestones (step schedule) or lrs (per-epoch LR list); "
                         "both were given")
    if milestones is not None:
        ms = _sequence(milestones, "milestones", "of decay epochs (e.g. [100, 150])")
        if not ms:
            raise ValueError("milestones is empty")
        ms = [check_int(m, f"milestones[{i}]", "an int") for i, m in enumerate(ms)]
        if sorted(ms) != ms:
            raise ValueError(f"milestones must be increasing, got {ms}")
        if not 0 < ms[0] < epochs:
            raise ValueError(f"the first milestone must be in (0, {epochs}), got {ms[0]}")
        return ms[0]
    lrs = _lr_values(lrs, epochs)
    peak_at = max(range(epochs), key=lambda i: lrs[i])
    limit = lrs[peak_at] * threshold * (1 + 1e-9)
    for epoch in range(peak_at + 1, epochs):
        if lrs[epoch] <= limit:
            return epoch
    if peak_at == epochs - 1:
        lowest = "the peak is the last epoch"
    else:
        low_at = min(range(peak_at + 1, epochs), key=lambda i: lrs[i])
        lowest = f"the lowest after it is {lrs[low_at] / lrs[peak_at]:.3g}× at epoch {low_at}"
    raise ValueError(f"the learning rate never falls to {threshold:.3g}× its peak ({lrs[peak_at]:.3g} at epoch "
                     f"{peak_at}; {lowest}); there is no low-noise regime to place the full-rank phase around")


def schedule_from_lr(epochs, milestones=None, lrs=None, full_rank_fraction=0.5, granularity=1,
                     threshold=DECAY_THRESHOLD):
    """(I, D) by the paper's rule: φ·E full-rank epochs straddling the first large LR decay.

    With boundary b (see :func:`regime_boundary`) and budget n = round(φ·E):
    I = b − n/2 rounded down to a multiple of ``granularity``, D = I + n; a
    grid coarser than n/2 can round the window down to end at or before b
    (E = 150, b = 100, n = 5, ``granularity=5``: (95, 100)), and it then
    moves up one grid step ((100, 105)), so that D > b whenever
    ``granularity`` > 1 (with ``granularity=1`` only a one-epoch window,
    (b − 1, b), ends at b).  If D would pass E the window slides back
    (D = E, I = E − n); if I would fall below 0 it slides forward (I = 0, D = n).

    Against the paper (appendix Table 10, ResNet20/CIFAR-10 E=150, decay at
    100; WRN/CIFAR-100 E=200, decay at 150): CIFAR-100 gives the paper's pair
    for every φ ∈ {0.1, 0.3, 0.5, 0.7, 0.9}.  CIFAR-10 with ``granularity=1``
    gives φ = 0.1, 0.7, 0.9 exactly ((92, 107), (45, 150), (15, 150)) and
    (77, 122), (62, 137) for φ = 0.3, 0.5 where the paper lists (75, 120),
    (60, 135): the paper rounded those to its 5-epoch grid —
    ``granularity=5`` reproduces φ = 0.3, 0.5, 0.7, 0.9 but gives (90, 105)
    for φ = 0.1.  Table 7's tuned pairs ((55, 120), (80, 170), (30, 80))
    put unequal shares on the two sides; they came from a grid search started
    at the regime midpoints (:func:`midpoint_schedule`), which they are
    within 5 epochs of.

    Args:
        epochs: total epochs E.
        milestones: step-schedule decay epochs, or
        lrs: per-epoch learning rates (cosine, warm-up, ...).
        full_rank_fraction: φ in (0, 1]; the paper recommends 0.5 (Table 11).
        granularity: round I down to a multiple of this many epochs, at most E.
        threshold: regime boundary for ``lrs`` (fraction of the peak LR), in (0, 1).

    Returns:
        (inflate_epoch, deflate_epoch), 0 ≤ I < D ≤ E.

    Raises:
        TypeError: a ``granularity`` that is not an int, a non-number φ; as
            :func:`regime_boundary` for the other arguments.
        ValueError: ``granularity`` below 1 or above E, φ outside (0, 1]; as
            :func:`regime_boundary` for the other arguments.

    Example:
        >>> schedule_from_lr(150, milestones=[100, 130], full_rank_fraction=0.5)
        (62, 137)
        >>> schedule_from_lr(150, milestones=[100, 130], full_rank_fraction=0.5, granularity=5)
        (60, 135)
    """
    epochs = _check_epochs(epochs)
    check_real(full_rank_fraction, "full_rank_fraction", "a float")
    if not 0.0 < full_rank_fraction <= 1.0:
        raise ValueError(f"full_rank_fraction must be in (0, 1], got {full_rank_fraction}")
    granularity = check_int(granularity, "granularity", "a positive int", 1)
    if granularity > epochs:
        raise ValueError(f"granularity must be at most epochs ({epochs}): I is rounded down to a multiple of it, "
                         f"got {granularity}")
    boundary = regime_boundary(epochs, milestones, lrs, threshold)
    # Half up on the exact product (0.29 · 50 = 14.5 is 14.499999999999998 in binary floating point).
    budget = max(1, min(epochs, math.floor(_exact(full_rank_fraction) * epochs + Fraction(1, 2))))
    inflate = int(math.floor((boundary - budget / 2) / granularity)) * granularity
    if granularity > 1 and inflate + budget <= boundary:
        inflate += granularity          # rounded down so far that the window ended before the decay
    if inflate + budget > epochs:
        inflate = epochs - budget
    inflate = max(0, inflate)
    return inflate, inflate + budget


def midpoint_schedule(epochs, milestones=None, lrs=None, threshold=DECAY_THRESHOLD):
    """(I, D) at the middles of the high- and low-noise regimes (paper §4.3's starting point).

    I = b // 2 and D = (b + E) // 2 for regime boundary b: for E = 150 with a
    decay at 100 this is the paper's recommended (50, 125).

    Returns:
        (inflate_epoch, deflate_epoch).

    Raises:
        ValueError / TypeError: as :func:`regime_boundary`.
    """
    epochs = _check_epochs(epochs)
    boundary = regime_boundary(epochs, milestones, lrs, threshold)
    return boundary // 2, (boundary + epochs) // 2


def finetune_schedule(epochs, deflate_fraction=0.5):
    """Fine-tuning preset: start full (pretrained), deflate at D = max(1, floor(fraction·E)).

    The paper's GLUE runs (appendix Table 8) deflate at 5 of 10 and 2 of 5
    epochs, which is the default fraction 0.5.  Pass the result to the
    scheduler as ``DynamicRankScheduler(model, opt, *finetune_schedule(E))``
    after ``convert_model(model, form="full")``.

    Returns:
        (None, deflate_epoch).

    Raises:
        TypeError: non-int epochs, a non-number fraction.
        ValueError: epochs < 2, a fraction outside (0, 1).

    Example:
        >>> finetune_schedule(10), finetune_schedule(5)
        ((None, 5), (None, 2))
    """
    epochs = _check_epochs(epochs)
    check_real(deflate_fraction, "deflate_fraction", "a float")
    if not 0.0 < deflate_fraction < 1.0:
        raise ValueError(f"deflate_fraction must be in (0, 1), got {deflate_fraction}")
    # The product in binary floating point falls just below an integer it equals in decimal
    # (0.29 · 100 = 28.999999999999996), and a margin past that rounding goes past real fractions at
    # large step counts: the floor of the exact product of the fraction the float stands for (0.29 is
    # 29/100, 1/3 is 1/3), read as the simplest fraction that rounds to it.
    return None, max(1, math.floor(_exact(deflate_fraction) * epochs))


def _exact(value):
    """The fraction a float stands for, read as the simplest fraction that rounds to it (0.29 is 29/100,
    1/3 is 1/3): products with it fall on the integers they equal in decimal."""
    fraction = Fraction(float(value)).limit_denominator(10 ** 9)
    return fraction if float(fraction) == float(value) else Fraction(float(value))
