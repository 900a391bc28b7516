"""The progress line as a terminal shows it: rate and ETA of a resumed epoch, redraws that leave no stale
text, clear(), and the first batch of each epoch.  A fake clock sets the time of every call, and a fake
one-row terminal applies what the line writes (``\\r`` back to column 0, each character over the one below).
The line's layout by terminal width is tested in test_train_cli.py."""

import pytest

from dynrank.train import progress
from dynrank.train.progress import ProgressLine


class Terminal:
    """One terminal row: ``\\r`` moves the cursor to column 0 and each other character replaces the one
    under the cursor, as a terminal does; ``shown`` is what the row reads, trailing blanks left out."""

    def __init__(self):
        self.row, self.column = [], 0

    def write(self, text):
        for char in text:
            if char == "\r":
                self.column = 0
                continue
            if self.column < len(self.row):
                self.row[self.column] = char
            else:
                self.row.append(char)
            self.column += 1

    def flush(self):
        pass

    def isatty(self):
        return True

    @property
    def shown(self):
        return "".join(self.row).rstrip(" ")


class Clock:
    """What ``time.perf_counter`` returns: ``now``, set by the test."""

    def __init__(self):
        self.now = 100.0


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock.now)
    monkeypatch.setenv("COLUMNS", "200")        # a terminal wide enough for the whole line
    return clock


def test_a_resumed_epoch_rates_only_the_batches_run_since_the_resume(clock):
    """Resumed at batch 300 of 500, ten batches in ten seconds are 1.0 it/s with 190 batches (3:10) to go,
    not the 31.0 it/s (ETA 0:06) of counting the 300 batches before the resume as run."""
    terminal = Terminal()
    line = ProgressLine(epochs=1, stream=terminal, interval=0.0)
    line.start_epoch(0, batches=500, first=300)
    clock.now += 10.0
    line.update(309)
    assert terminal.shown == "epoch 1/1 [██████····] batch 310/500 [████████████········] 1.0 it/s eta 3:10"
    clock.now += 30.0                               # 30 more batches in 30 s: still 1.0 it/s
    line.update(339)
    assert terminal.shown == "epoch 1/1 [███████···] batch 340/500 [██████████████······] 1.0 it/s eta 2:40"


def test_a_shorter_redraw_leaves_nothing_of_the_longer_line_before_it(clock):
    terminal = Terminal()
    line = ProgressLine(epochs=1, stream=terminal, interval=0.0)
    line.start_epoch(0, batches=10)
    clock.now += 1.0
    line.update(0, extra=lambda: "loss 123456.7890 (a long one)")
    long = "epoch 1/1 [█·········] batch 1/10 [██··················] 1.0 it/s loss 123456.7890 (a long one) eta 0:09"
    assert terminal.shown == long
    clock.now += 1.0
    line.update(1, extra=lambda: "loss 1.0")
    assert terminal.shown == "epoch 1/1 [██········] batch 2/10 [████················] 1.0 it/s loss 1.0 eta 0:08"
    clock.now += 1.0                                # longer again, then shorter again
    line.update(2, extra=lambda: "loss 123456.7890 (a long one)")
    clock.now += 1.0
    line.update(3)
    assert terminal.shown == "epoch 1/1 [████······] batch 4/10 [████████············] 1.0 it/s eta 0:06"


def test_clear_erases_the_line_and_leaves_the_cursor_at_its_start(clock):
    """A summary line printed after clear() shows alone, with nothing of the progress line after it."""
    terminal = Terminal()
    line = ProgressLine(epochs=1, stream=terminal, interval=0.0)
    line.start_epoch(0, batches=10)
    clock.now += 1.0
    line.update(0, extra=lambda: "loss 1.0")
    assert terminal.shown.startswith("epoch 1/1 ")
    line.clear()
    assert (terminal.shown, terminal.column) == ("", 0)
    terminal.write("epoch 1 done")
    assert terminal.shown == "epoch 1 done"
    line.clear()                                    # nothing drawn since: writes nothing
    assert terminal.shown == "epoch 1 done"


def test_the_first_batch_of_an_epoch_is_drawn_within_the_interval(clock):
    """The interval between redraws starts again with each epoch: its first batch is drawn even where the
    epoch before ended a moment ago."""
    terminal = Terminal()
    calls = []
    line = ProgressLine(epochs=2, stream=terminal, interval=3600.0)
    for epoch in range(2):
        line.start_epoch(epoch, batches=3)
        for batch in range(3):
            clock.now += 0.1
            line.update(batch, extra=lambda: calls.append((epoch, batch)) or "loss 1.0")
            if batch == 0:
                assert terminal.shown.startswith(f"epoch {epoch + 1}/2 [") and " batch 1/3 [" in terminal.shown
    # Each epoch's first batch and last one are drawn; the interval suppresses the one in between.
    assert calls == [(0, 0), (0, 2), (1, 0), (1, 2)]
