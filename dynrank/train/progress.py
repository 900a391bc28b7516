"""A one-line progress display for epochs and batches, with no dependencies.

On a terminal the line is redrawn in place (``\\r``) at most a few times per
second: ``epoch 3/10 [████······] batch 120/390 [██████····] 45.1 it/s
loss 1.234 eta 0:12``.  Anything extra shown (the running loss) is computed
only when the line is redrawn, so a GPU run syncs with the host a few times
per second rather than once per batch.  The line is kept narrower than the
terminal: a wrapped line would leave a stale row at every redraw, as ``\\r``
goes back only to the start of its last row.  Off a terminal (logs, tests)
nothing is drawn; the per-epoch summary lines are printed by the caller.
"""

import os
import sys
import time

__all__ = ["ProgressLine", "format_seconds"]


def format_seconds(seconds):
    """``75.2`` → ``'1:15'``; ``3725`` → ``'1:02:05'``."""
    seconds = round(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _bar(fraction, width):
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "█" * filled + "·" * (width - filled)


# The parts left out, in this order, where the whole line does not fit: the least useful first.
_DROP_ORDER = ("epoch_bar", "rate", "batch_bar")


def _fit(parts, width):
    """``parts`` (name → text) joined by spaces in at most ``width`` columns.

    Parts named in :data:`_DROP_ORDER` are left out one by one until the line fits; a line
    still too long is cut at ``width``.
    """
    parts = dict(parts)
    text = " ".join(parts.values())
    for name in _DROP_ORDER:
        if len(text) <= width:
            break
        parts.pop(name, None)
        text = " ".join(parts.values())
    return text[:max(width, 1)]


def _columns(stream):
    """The width of the terminal ``stream`` is on: ``COLUMNS`` where it is a positive int (read
    first, as :func:`shutil.get_terminal_size` reads it), else the stream's own terminal size, else 80.

    Not :func:`shutil.get_terminal_size` itself: it measures ``sys.__stdout__``, which is a pipe in
    ``dynrank-train | tee log`` while the line is drawn on stderr, a terminal maybe wider than 80.
    """
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):   # no fileno (io.UnsupportedOperation), closed, no terminal
        columns = 0
    return columns or 80


class ProgressLine:
    """Draw ``epoch e/E [bar] batch b/B [bar] rate extra eta`` on one terminal line.

    The line fits in the width less one column of the terminal it is drawn on: ``COLUMNS``
    where set to a positive int, else the terminal size of ``stream`` (not of stdout, which may
    be piped), 80 where ``stream`` has none.  Where the line would not fit, the epoch bar is left
    out first, then the rate, then the batch bar, and what is still too long is cut at the end.

    Args:
        epochs: total epochs E.
        stream: where to draw (default stderr).
        enabled: draw at all (default: when ``stream`` is a terminal).
        interval: minimum seconds between redraws.
    """

    def __init__(self, epochs, stream=None, enabled=None, interval=0.25):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled
        self.epochs = epochs
        self.interval = interval
        self._last = None
        self._width = 0

    def start_epoch(self, epoch, batches, first=0):
        """Begin epoch ``epoch`` (0-based) of ``batches`` batches, starting at batch ``first``."""
        self.epoch, self.batches, self.first = epoch, batches, first
        self._start = time.perf_counter()
        self._last = None

    def update(self, batch, extra=None):
        """Batch ``batch`` (0-based) is done; ``extra()`` → text, called only on redraw."""
        if not self.enabled:
            return
        now = time.perf_counter()
        done = batch + 1
        if self._last is not None and now - self._last < self.interval and done < self.batches:
            return
        self._last = now
        elapsed = now - self._start
        rate = (done - self.first) / elapsed if elapsed > 0 else 0.0
        eta = (self.batches - done) / rate if rate > 0 else 0.0
        parts = {"epoch": f"epoch {self.epoch + 1}/{self.epochs}",
                 "epoch_bar": f"[{_bar((self.epoch + done / self.batches) / self.epochs, 10)}]",
                 "batch": f"batch {done}/{self.batches}", "batch_bar": f"[{_bar(done / self.batches, 20)}]",
                 "rate": f"{rate:.1f} it/s"}
        if extra is not None:
            parts["extra"] = extra()
        parts["eta"] = f"eta {format_seconds(eta)}"
        # One column short of the width: a line that fills the last column wraps on some terminals.
        width = _columns(self.stream) - 1
        text = _fit(parts, width)
        self.stream.write("\r" + text.ljust(min(self._width, width)))
        self.stream.flush()
        self._width = len(text)

    def clear(self):
        """Erase the line (before a summary line is printed)."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
