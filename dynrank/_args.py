"""Argument checks shared across modules: lists of module names, real numbers, whole numbers."""

import numbers

__all__ = ["as_names", "check_int", "check_real"]


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


def _wrong_type(value, what, expected, where):
    return TypeError(f"{what} must be {expected}, got {type(value).__name__} ({value!r}){where}")


def check_real(value, what, expected, where=""):
    """``value``, where it is a real number; the caller checks its range.

    The rule of every real-valued argument: a value of the wrong type (str, None, complex, bool, a
    tensor) is a TypeError, a number out of range or not finite a ValueError (the caller's).

    Raises:
        TypeError: ``f"{what} must be {expected}, got {type} ({value!r}){where}"``, e.g.
            ``check_real("0.5", "rank_ratio", "a float in (0, 1]")``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _wrong_type(value, what, expected, where)
    return value


def check_int(value, what, expected, low=None, high=None, where=""):
    """``value`` as an int, where it is a whole number (an int or a numpy integer) in [low, high].

    The rule of every whole-number argument: a value of the wrong type (str, None, a float even when
    whole, bool, a tensor, complex) is a TypeError, an int out of range a ValueError.  ``expected``
    names the type and the range (``"a positive int"``, ``"an int in [1, 8]"``), as both messages say
    it; ``low`` and ``high`` (inclusive, None for no bound) are the range.  A caller whose range
    message has other words passes no bounds and checks the range itself.  None is the caller's to
    let through (``expected`` then ends in ``"or None"``).

    Raises:
        TypeError: ``f"{what} must be {expected}, got {type} ({value!r}){where}"``, e.g.
            ``check_int("4", "in_features", "a positive int", 1)``.
        ValueError: ``f"{what} must be {expected}, got {value!r}{where}"`` for a value below ``low``
            or above ``high``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _wrong_type(value, what, expected, where)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{what} must be {expected}, got {value!r}{where}")
    return int(value)
