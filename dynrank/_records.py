"""The record formats of :class:`dynrank.RankMonitor`: JSON with non-finite floats as strings, typed CSV.

JSON has no ``inf`` or ``nan``, so they are written as the strings ``"inf"``,
``"-inf"`` and ``"nan"`` and read back as floats in the records' numbers
(:func:`decode_run`; a layer named ``"inf"`` stays a name); CSV cells are
written plainly (Tucker's rank pairs as ``"8x16"``) and parsed back to int,
float, list or None.
"""

import csv
import math

__all__ = ["read_csv", "encode", "decode", "decode_run", "write_csv"]


def encode(obj):
    """``obj`` (nested dicts, lists, tuples) with non-finite floats as ``"inf"``/``"-inf"``/``"nan"``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    return obj


_SPECIAL = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def decode(obj):
    """The inverse of :func:`encode` on what ``json.load`` returns: every ``"inf"``/``"-inf"``/``"nan"``
    string in ``obj`` becomes a float, so ``obj`` must hold no text (names) that may read so."""
    if isinstance(obj, str) and obj in _SPECIAL:
        return _SPECIAL[obj]
    if isinstance(obj, dict):
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def decode_run(doc):
    """A RankMonitor JSON document as ``json.load`` returns it, with the numbers of its records decoded
    (:func:`decode`): their times, counts, scalars and layer metrics.  The text stays as written, so a
    layer named ``"inf"`` or ``"nan"`` keeps its name: the records' forms and layer types, the switches
    (layer names, forms, kinds; their epochs, steps and ranks are never non-finite) and the run's name.
    Entries not of the form :meth:`RankMonitor.save` writes are left as they are (``load`` says what is
    wrong with them)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        return doc
    return dict(doc, records=[_decode_record(record) for record in doc["records"]])


def _decode_record(record):
    """A record with its numbers decoded; its form, and each layer's type and form, as written."""
    if not isinstance(record, dict):
        return record
    record = _decode_except(record, ("form", "layers"))
    if isinstance(record.get("layers"), dict):
        record["layers"] = {name: _decode_except(metrics, ("type", "form"))
                            for name, metrics in record["layers"].items()}
    return record


def _decode_except(entry, text):
    """``entry`` (a dict) with the values of its fields decoded, but for those named in ``text``."""
    if not isinstance(entry, dict):
        return entry
    return {key: value if key in text else decode(value) for key, value in entry.items()}


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)       # Tucker ranks: "8x16"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else encode(value)
    return value


def write_csv(path, columns, rows):
    """Write ``rows`` (dicts) to ``path`` with a header of ``columns``; missing values are empty cells."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])


def _parse(text):
    if text == "":
        return None
    if text in _SPECIAL:
        return _SPECIAL[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    parts = text.split("x")
    if len(parts) > 1 and all(p.isdigit() for p in parts):
        return [int(p) for p in parts]
    return text


_TEXT_COLUMNS = ("layer", "type", "form", "kind", "old_form", "new_form")


def read_csv(path, text_columns=_TEXT_COLUMNS):
    """Rows of a CSV written by :meth:`RankMonitor.save`, with typed values.

    Empty cells become None, ``inf`` becomes ``math.inf``, integers and floats
    are parsed, ``"8x16"`` becomes ``[8, 16]``; cells of ``text_columns``
    (layer names such as ``"0"`` or ``"1.10"``, forms) stay strings, an empty
    one ``""`` (the name of a model that is itself one dynrank layer).  The
    default names the text columns of all three files; for an epochs CSV whose
    logged scalars include one of those names (``"kind"``, say), pass
    ``text_columns=("form",)``, as :meth:`RankMonitor.load` does.

    Returns:
        list of dicts column → value.

    Example:
        >>> import torch
        >>> from dynrank import FusedLowRankLinear, RankMonitor
        >>> monitor = RankMonitor(torch.nn.Sequential(FusedLowRankLinear(16, 16, rank=4)))
        >>> with monitor.epoch(0):
        ...     pass                                          # train here
        >>> monitor.save("demo")
        {'json': 'demo.json', 'epochs': 'demo.epochs.csv', 'layers': 'demo.layers.csv', 'switches': 'demo.switches.csv'}
        >>> rows = read_csv("demo.layers.csv")
        >>> rows[0]["epoch"], rows[0]["layer"], rows[0]["form"], rows[0]["spectral_ratio"]
        (0, '0', 'lowrank', inf)
    """
    text = set(text_columns)
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: (v if k in text else _parse(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]
