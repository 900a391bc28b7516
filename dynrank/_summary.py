"""The tables of what convert_model and unconvert_model did: a summary's rows, totals and text."""


class RowSummary:
    """Rows (one dict per module) and the model's parameter totals: the base of the summaries
    :func:`convert_model` and :func:`~dynrank.unconvert_model` return."""

    def __init__(self, rows, params_before, params_after):
        self.rows = rows
        self.params_before = params_before
        self.params_after = params_after

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    @staticmethod
    def _note(row):
        """The row's note, with the module's other names ("also at ...") where it is shared."""
        if not row.get("aliases"):
            return row["note"]
        return "; ".join(filter(None, [row["note"], "also at " + ", ".join(row["aliases"])]))


class ConversionSummary(RowSummary):
    """What :func:`convert_model` did, one row per nn.Linear / nn.Conv2d / transformers Conv1D found.

    Attributes:
        rows: list of dicts with keys ``name``, ``type``, ``shape`` (weight
            shape, as the module stores it: (in, out) for a Conv1D), ``rank``
            (None if kept dense), ``params_before``,
            ``params_after`` (trainable parameters of that module),
            ``converted`` (bool), ``new_type`` (the dynrank layer's class
            name, ``"FusedLowRankLinear"`` or ``"LowRankConv2d"``; None if
            kept dense), ``note`` (why it was kept dense),
            ``aliases`` (the module's other names where it is registered at
            several places; one row per module, under its first name).
        params_before, params_after: trainable parameters of the whole model.

    ``str(summary)`` is a table; ``summary.converted`` / ``summary.skipped``
    list names.
    """

    @property
    def converted(self):
        """Names of the converted modules."""
        return [r["name"] for r in self.rows if r["converted"]]

    @property
    def skipped(self):
        """(name, reason) of the modules kept dense."""
        return [(r["name"], r["note"]) for r in self.rows if not r["converted"]]

    @property
    def ratio(self):
        """Trainable parameters after / before."""
        return self.params_after / max(self.params_before, 1)

    def __str__(self):
        header = ("module", "type", "weight", "rank", "params before", "params after", "note")
        lines = [header]
        for r in self.rows:
            kind = r["type"] if not r["converted"] else f"{r['type']} → {r['new_type']}"
            lines.append((r["name"], kind, "×".join(str(s) for s in r["shape"]),
                          "-" if r["rank"] is None else str(r["rank"]), f"{r['params_before']:,}",
                          f"{r['params_after']:,}", self._note(r)))
        lines.append(("total (model)", "", "", "", f"{self.params_before:,}", f"{self.params_after:,}",
                      f"{self.ratio:.2f}× trainable, {len(self.converted)} of {len(self.rows)} converted"))
        return format_table(lines, right={3, 4, 5})

    def __repr__(self):
        return (f"ConversionSummary(converted={len(self.converted)}, skipped={len(self.skipped)}, "
                f"params {self.params_before:,} → {self.params_after:,})")


def format_table(lines, right):
    """A header row, a rule, the body rows, a rule and a total row (``lines``: tuples of str, the first
    the header, the last the total); the columns whose index is in ``right`` are right-aligned."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]

    def fmt(row):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    body = [fmt(row) for row in lines[1:-1]]
    return "\n".join([fmt(lines[0]), rule, *body, rule, fmt(lines[-1])])


def _trainable_count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
