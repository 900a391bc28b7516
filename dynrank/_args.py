"""Argument checks shared by modules that take lists of module names."""

__all__ = ["as_names"]


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
