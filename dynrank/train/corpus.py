"""The embedded text corpus: Python's own standard-library source, as bytes.

Every CPython install ships these files, so the main job needs no download.
The corpus is a fixed, sorted list of pure-Python modules that exist in every
CPython from 3.9 on (looked up under ``sysconfig``'s stdlib path, never through
the import system, so a same-named file in the working directory cannot
shadow them).  Each file is split by position: its first 90 % goes to the
training stream, its last 10 % to validation — deterministic, and both
streams see every file's style.

The text differs between Python versions, so numbers are reproducible per
installation, not across versions.
"""

import os
import sysconfig

import torch

from .._args import check_int, check_real
from .augment import epoch_generator
from .data import DataError

__all__ = ["STDLIB_MODULES", "stdlib_files", "load_stdlib_corpus", "TextData"]

# Pure-Python modules present (as a file or a package __init__) in CPython 3.9+.
STDLIB_MODULES = (
    "argparse", "ast", "calendar", "configparser", "contextlib", "csv", "dataclasses", "difflib",
    "enum", "fractions", "ftplib", "functools", "gettext", "gzip", "heapq", "inspect", "ipaddress",
    "mailbox", "optparse", "pdb", "pickle", "pprint", "random", "shutil", "smtplib", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize", "traceback",
    "typing", "uuid", "warnings", "weakref",
)

VAL_FRACTION = 0.1
_MIN_BYTES = 200_000
_SEPARATOR = b"\n\n"
_MIN_PER_FILE = 64          # bytes of each file kept under ``max_bytes``


def stdlib_files(stdlib_dir=None):
    """Sorted list of existing source paths of :data:`STDLIB_MODULES`."""
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    found = []
    for name in sorted(STDLIB_MODULES):
        for candidate in (os.path.join(root, name + ".py"), os.path.join(root, name, "__init__.py")):
            if os.path.isfile(candidate):
                found.append(candidate)
                break
    return found


def load_stdlib_corpus(stdlib_dir=None, val_fraction=VAL_FRACTION, max_bytes=None):
    """Read the corpus and split it: returns ``(train, val, files)``.

    ``train`` and ``val`` are 1-D uint8 tensors (bytes); files are joined with
    a blank line.  ``max_bytes`` (for tests) truncates every file to one length
    so that the total, ``len(train) + len(val)`` with the blank lines, is at
    most ``max_bytes``; at least 64 bytes of each file are kept.  ``val_fraction``, in (0, 1), is
    the share of each file's end held out for validation.

    Raises:
        TypeError: ``val_fraction`` is not a real number, or ``max_bytes`` not an int or None.
        ValueError: ``val_fraction`` is not in (0, 1), or ``max_bytes`` is below 68 bytes (64 and
            the blank lines) per file.
        DataError: the standard-library sources are missing (e.g. a stripped
            install that ships only .pyc files).
    """
    check_real(val_fraction, "val_fraction", "a float in (0, 1)")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a float in (0, 1), got {val_fraction!r}")
    if max_bytes is not None:
        max_bytes = check_int(max_bytes, "max_bytes", "a positive int or None", 1)
    files = stdlib_files(stdlib_dir)
    per_file = None
    if max_bytes is not None and files:
        # Each file adds a blank line to both streams.
        per_file = max_bytes // len(files) - 2 * len(_SEPARATOR)
        if per_file < _MIN_PER_FILE:
            minimum = len(files) * (_MIN_PER_FILE + 2 * len(_SEPARATOR))
            raise ValueError(f"max_bytes must be at least {minimum} ({_MIN_PER_FILE} bytes of each of the "
                             f"{len(files)} files and their blank lines), got {max_bytes}")
    train_parts, val_parts, total = [], [], 0
    for path in files:
        with open(path, "rb") as handle:
            text = handle.read(per_file) if per_file else handle.read()
        cut = int(len(text) * (1.0 - val_fraction))
        train_parts.append(text[:cut] + _SEPARATOR)
        val_parts.append(text[cut:] + _SEPARATOR)
        total += len(text)
    minimum = _MIN_BYTES if max_bytes is None else 0
    if total <= minimum or not files:
        root = stdlib_dir or sysconfig.get_paths()["stdlib"]
        raise DataError(f"the standard-library sources under {root} are missing or too small "
                        f"({len(files)} of {len(STDLIB_MODULES)} modules, {total} bytes); this Python "
                        f"install ships no .py sources. Use --data cifar10 with --data-dir instead.")
    to_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
    return to_tensor(train_parts), to_tensor(val_parts), files


class TextData:
    """Byte streams for next-byte prediction, resident on one device.

    An epoch is ``steps`` batches of random windows of ``context + 1`` bytes from
    the training stream (any of its ``len(train) - context`` windows, the last
    one ending at its last byte); the window starts come from a generator seeded by
    (seed, epoch), made on the host once per epoch, so an epoch is the same
    whether or not the run was resumed.  Validation uses up to ``val_windows``
    fixed, non-overlapping windows of the validation stream.

    Args:
        train, val: 1-D uint8 tensors.
        context: window length fed to the model (≥ 1).
        batch_size: windows per batch (≥ 1).
        steps: batches per epoch (≥ 1; None: one pass over the train bytes).
        device: where the streams live.
        val_windows: at most this many validation windows (≥ 1).  eval_batch_size: windows per eval
            batch (≥ 1).
        seed: base seed of the per-epoch window draws.

    Raises:
        TypeError: ``context``, ``batch_size``, ``val_windows``, ``eval_batch_size`` or ``steps`` (where
            given) is not an int.
        ValueError: one of them is below 1.
        DataError: a stream shorter than ``context + 1`` bytes, or fewer training windows than
            ``batch_size``.
    """

    kind = "text"
    num_classes = 256

    def __init__(self, train, val, context, batch_size, steps=None, device="cpu", val_windows=512,
                 seed=0, eval_batch_size=128):
        context = check_int(context, "context", "a positive int", 1)
        batch_size = check_int(batch_size, "batch_size", "a positive int", 1)
        val_windows = check_int(val_windows, "val_windows", "a positive int", 1)
        eval_batch_size = check_int(eval_batch_size, "eval_batch_size", "a positive int", 1)
        if steps is not None:
            steps = check_int(steps, "steps", "a positive int or None", 1)
        if len(train) < context + 1 or len(val) < context + 1:
            raise DataError(f"text streams must hold at least context + 1 = {context + 1} bytes, got "
                            f"train {len(train)}, val {len(val)}")
        windows = len(train) - context             # starts 0..len - context - 1: the last ends at the last byte
        if batch_size > windows:
            raise DataError(f"--batch-size {batch_size} is larger than the {windows} windows of context + 1 = "
                            f"{context + 1} bytes in the {len(train)}-byte training text; use a smaller "
                            f"--batch-size or --context")
        self.context = context
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.train = train.to(self.device)
        self.val = val.to(self.device)
        self.steps = steps if steps is not None else max(1, len(train) // (batch_size * context))
        count = min(val_windows, (len(val) - 1) // context)
        starts = torch.arange(count) * ((len(val) - 1 - context) // max(1, count - 1) if count > 1 else 0)
        self._val_index = (starts[:, None] + torch.arange(context + 1)).to(self.device)
        self._offsets = torch.arange(context + 1, device=self.device)

    def __len__(self):
        return self.steps

    def train_batches(self, epoch, start=0):
        """Yield ``(inputs, targets)`` for batches ``start..steps-1`` of ``epoch``."""
        generator = epoch_generator(self.seed, epoch)
        starts = torch.randint(0, len(self.train) - self.context, (self.steps, self.batch_size),
                               generator=generator).to(self.device, non_blocking=True)
        for step in range(start, self.steps):
            window = self.train[starts[step, :, None] + self._offsets].long()
            yield window[:, :-1], window[:, 1:]

    def val_batches(self):
        """Yield ``(inputs, targets)`` over the fixed validation windows."""
        for first in range(0, len(self._val_index), self.eval_batch_size):
            window = self.val[self._val_index[first:first + self.eval_batch_size]].long()
            yield window[:, :-1], window[:, 1:]

    def describe(self):
        return (f"stdlib text: {len(self.train):,} train / {len(self.val):,} val bytes, "
                f"{self.steps} batches of {self.batch_size}×{self.context} per epoch")
