"""Argument checks shared across modules: lists of module names, real numbers."""

import numbers

__all__ = ["as_names", "check_real"]


def as_names(value, what, expected="a name (str) or an iterable of names", item="names"):
    """``value`` as a list of names: one str (a single name, not its characters) or an iterable of str.

    Raises:
        TypeError: ``f"{what} must be {expected}, got …"`` for a non-iterable, and
            ``f"{what} must hold {item} (str), got …"`` for an item that is not a str.
    """
    if isinstance(value, str):
        return [value]
    try:
        names = list(value)
    except TypeError:
        raise TypeError(f"{what} must be {expected}, got {type(value).__name__} ({value!r})") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{what} must hold {item} (str), got {bad[0]!r} ({type(bad[0]).__name__})")
    return names


def check_real(value, what, expected, where=""):
    """``value``, where it is a real number; the caller checks its range.

    The rule of every real-valued argument: a value of the wrong type (str, None, complex, bool, a
    tensor) is a TypeError, a number out of range or not finite a ValueError (the caller's).

    Raises:
        TypeError: ``f"{what} must be {expected}, got {type} ({value!r}){where}"``, e.g.
            ``check_real("0.5", "rank_ratio", "a float in (0, 1]")``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be {expected}, got {type(value).__name__} ({value!r}){where}")
    return value
