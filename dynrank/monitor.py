"""RankMonitor: per-epoch rank metrics, forms, parameter counts and timings of a training run.

Typical loop::

    monitor = dynrank.RankMonitor(model, name="dynamic I=55 D=120").attach(scheduler)
    for epoch in range(epochs):
        scheduler.step(epoch)                  # switches reach the monitor by callback
        with monitor.epoch(epoch):             # times the epoch, then measures every layer
            train_one_epoch()
        monitor.log(loss=val_loss, accuracy=val_acc)
    monitor.save("runs/dynamic")               # runs/dynamic.json + .epochs/.layers/.switches.csv
    monitor.plot_spectral_ratio("runs/dynamic_lambda.png")

Resuming: save ``monitor.state_dict()`` in the checkpoint (e.g.
``training_state(model, optimizer, scheduler, monitor=monitor.state_dict())``)
and, after building model, optimizer, scheduler and monitor as at the start and
restoring them, call ``monitor.load_state_dict(checkpoint["monitor"])``: the
run goes on with its earlier records and switches, and the forms the layers had
when it was saved, so the resume's own form changes are no switch.

Each epoch record holds the epoch's wall time (the metric computation runs
after the clock stops and is reported separately), its form (the form of the
watched dynrank layers at the end of the epoch: ``lowrank``/``full``/``adapter``,
``mixed`` if they differ, ``dense`` if the model has none; see
:class:`RankMonitor` for which layers are watched), the form mix (every dynrank
layer), trainable and total parameter counts, the user's scalars and, per layer, the
metrics of :func:`dynrank.metrics.layer_metrics`.  A layer whose weights hold
NaN or inf (a diverged run) gets NaN metrics and a RuntimeWarning; the epoch is
recorded all the same.
"""

import contextlib
import copy
import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Mapping

import torch

from ._args import check_int
from ._forms import FORMS, FormLayer
from ._records import decode_run, encode, read_csv, write_csv
from .metrics import _check_method, check_layers, model_metrics, monitored_layers
from .spectra import _check_tol

__all__ = ["RankMonitor", "read_csv"]

_FORMAT = "dynrank.RankMonitor"
_EPOCH_COLUMNS = ["epoch", "form", "wall_seconds", "metrics_seconds", "trainable_params", "total_params"] + \
    [f"n_{form}" for form in FORMS]
_LAYER_COLUMNS = ["epoch", "layer", "type", "form", "rank", "rows", "cols", "sigma_max", "sigma_min",
                  "spectral_ratio", "restricted_spectral_ratio", "effective_rank", "entropy_rank", "stable_rank", "tol"]
_SWITCH_COLUMNS = ["epoch", "step", "kind", "layer", "old_form", "new_form"]
_RANK_COLUMNS = ["old_rank", "new_rank"]      # a rank growth's; absent from files of earlier versions
_SWITCH_INDEX = "switch"                      # the row's switch in ``switches``; absent from earlier files
# The columns that hold text in each CSV; every other cell is a number (a user's scalar may be named "kind").
_TEXT = {"epochs": ("form",), "layers": ("layer", "type", "form"),
         "switches": ("kind", "layer", "old_form", "new_form")}
_STATE_KEYS = ("records", "switches", "forms")
# What a record and a switch must hold for the monitor to go on from them (name → type, type name).
_RECORD_FIELDS = {"epoch": (numbers.Integral, "an int"), "form": (str, "a str"), "scalars": (Mapping, "a dict"),
                  "layers": (Mapping, "a dict")}
_SWITCH_FIELDS = {"epoch": (numbers.Integral, "an int"), "kind": (str, "a str"), "changes": ((list, tuple), "a list")}


def _kind_of(changes):
    kinds = set()
    for _, old, new in changes:
        if new == "full":
            kinds.add("inflate")
        elif old == "full" and new == "adapter":
            kinds.add("deflate")
        elif old == "lowrank" and new == "adapter":
            kinds.update(("inflate", "deflate"))
        else:
            kinds.add("change")
    return "+".join(k for k in ("inflate", "deflate", "change") if k in kinds)


class RankMonitor:
    """Records a training run epoch by epoch; saves, loads and plots it.

    Args:
        model: the ``nn.Module`` being trained (None only for loaded runs).
        name: label of the run in plots and files (default ``"run"``).
        tol: relative tolerance of the rank metrics in [0, 1) (default per layer,
            see :mod:`dynrank.metrics`).
        method: singular-value method (``"auto"``, ``"svd"``, ``"gram"``).
        layers: which layers to measure: None, module names or a predicate
            (see :func:`dynrank.metrics.monitored_layers`); the dynrank layers among them
            also label each epoch's ``form`` (see below).
        metrics_every: measure layers every this many epochs (1: every epoch).
        scheduler: optional DynamicRankScheduler to :meth:`attach` to.

    To resume a run, save :meth:`state_dict` with the checkpoint and give it to
    :meth:`load_state_dict` of the monitor built anew (see the module docstring).

    An epoch's ``form`` is that of the dynrank layers the monitor watches: those among
    ``layers=``; where it is not given (or names no dynrank layer), those of the schedulers
    attached (:meth:`attach`), so a scheduler of part of the model labels each epoch with the
    form it gives its layers and :func:`~dynrank.cost.cost_report` can use the epoch times;
    without either, every dynrank layer of the model.  ``form_mix`` counts every dynrank layer.

    Attributes:
        records: list of epoch dicts (see module docstring; ``layers`` maps
            layer name → metric dict and is empty in epochs not measured; ``form``
            as said above).
        switches: list of ``{"epoch", "step", "kind", "changes", "source"}``;
            ``changes`` lists ``[layer, old_form, new_form]``; ``kind`` is
            ``"inflate"``, ``"deflate"``, ``"change"`` (any other change: a rank
            growth of :class:`~dynrank.IncrementalRankScheduler`, whose form stays
            the same) or several of them joined by ``+``; ``source`` is
            ``"scheduler"`` (callback), ``"detected"`` (a form change the monitor
            saw between epochs without a callback) or ``"csv"`` (a run loaded from
            its CSVs alone, which do not keep the source).  A rank growth's switch
            also holds ``"rank_changes"``: ``[layer, old_rank, new_rank]`` per layer
            (the switches CSV's ``old_rank``/``new_rank`` columns).  Layer names
            are the monitor's own (``named_modules`` of ``model``), those of its
            records, whatever the scheduler's names (see :meth:`attach`).

    Raises:
        TypeError: a ``model`` that is not an nn.Module, a ``metrics_every`` that is not
            an int (a numpy integer is one), other arguments of the wrong type.
        ValueError: ``metrics_every`` below 1, other bad arguments (all checked here, so
            that no epoch's record is lost to them later).

    Example:
        >>> import torch
        >>> from dynrank import FusedLowRankLinear, RankMonitor
        >>> model = torch.nn.Sequential(FusedLowRankLinear(16, 16, rank=4))
        >>> monitor = RankMonitor(model, name="demo")
        >>> with monitor.epoch():
        ...     pass                                   # train here
        >>> monitor.log(loss=0.5)
        >>> monitor.records[0]["layers"]["0"]["spectral_ratio"]
        inf
    """

    def __init__(self, model=None, name="run", *, tol=None, method="auto", layers=None, metrics_every=1,
                 scheduler=None):
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        metrics_every = check_int(metrics_every, "metrics_every", "an int ≥ 1", 1)
        _check_method(method)
        self.model = model
        self.name = str(name)
        self.tol = None if tol is None else _check_tol(tol)
        self.method = method
        self.layers = check_layers(layers)
        self.metrics_every = metrics_every
        self.records = []
        self.switches = []
        self._scheduled = []         # the monitor's names of the attached schedulers' layers (label the epochs)
        self._open = None
        self._known_forms = self._forms() if model is not None else {}
        if model is not None:
            monitored_layers(model, layers)          # fail now on unknown layer names
        if scheduler is not None:
            self.attach(scheduler)

    # -- scheduler hook ------------------------------------------------------------------
    def attach(self, scheduler):
        """Have ``scheduler`` report its switches to :meth:`on_switch` (once per scheduler); returns self.

        A scheduler's loaded event (``"loaded": True``: its ``load_state_dict`` bringing the
        layers to their saved forms, or InRank's to their saved ranks, on a resume) is not recorded: the saved run recorded that
        switch, and this monitor's :meth:`load_state_dict` brings it back, in either order.  Nor is it
        detected at the next epoch: the loaded forms are the ones that epoch's forms are compared with, so
        a monitor whose state is not loaded records the rest of the run only.

        A scheduler names its layers within its own model (a DDP or DataParallel wrapper
        taken off, a submodule where it was built on part of the model): its events reach
        :meth:`on_switch` with each layer renamed to the monitor's name of the same module
        (``"0"`` of a scheduler of ``model[1]`` is the monitor's ``"1.0"``, ``"0"`` of one
        given ``DistributedDataParallel(net)`` is ``"module.0"`` where the monitor was given
        the wrapper too).  A scheduler with no ``model`` attribute (the bare callback
        protocol), or a monitor with no model, keeps the names as they come.  IncrementalRankScheduler's
        growth events are renamed the same way, ``rank_changes`` included.

        Where the monitor was built without ``layers=`` (or with no dynrank layer among them), the
        layers the scheduler manages label each epoch's ``form`` from then on (those of every
        scheduler attached, together): a scheduler of part of the model gives epochs of its
        layers' form, not ``"mixed"``.

        Raises:
            TypeError: ``scheduler`` has no ``add_callback``.
            ValueError: the scheduler's model holds dynrank layers that are not in the monitor's
                model (their switches would name layers the monitor neither measures nor knows
                the form of); to measure part of a model, give the monitor the whole model and
                ``layers=``.  Nothing is attached then.
        """
        add = getattr(scheduler, "add_callback", None)
        if not callable(add):
            raise TypeError(f"scheduler must have an add_callback(fn) method (DynamicRankScheduler), got "
                            f"{type(scheduler).__name__}")
        callbacks = getattr(scheduler, "_callbacks", ())
        if any(isinstance(fn, _SchedulerHook) and fn.monitor is self for fn in callbacks):
            return self                # attached already (RankMonitor(..., scheduler=s) then attach(s)): once
        names = self._names_of(scheduler)
        add(_SchedulerHook(self, names))
        managed = getattr(scheduler, "layers", None)
        managed = [n for n, _ in managed] if isinstance(managed, (list, tuple)) else list(names)
        self._scheduled += [names[n] for n in managed if n in names and names[n] not in self._scheduled]
        return self

    def _names_of(self, scheduler):
        """dict scheduler's layer name → the monitor's name of that module, by identity (empty: keep names)."""
        theirs = getattr(scheduler, "model", None)
        if self.model is None or not isinstance(theirs, torch.nn.Module):
            return {}
        ours = {id(m): name for name, m in self.model.named_modules()}
        names, unseen = {}, []
        for name, m in theirs.named_modules():
            if isinstance(m, FormLayer):
                if id(m) in ours:
                    names[name] = ours[id(m)]
                else:
                    unseen.append(name)
        if unseen:
            raise ValueError(f"scheduler's dynrank layers {unseen} are not in the monitor's model "
                             f"({type(self.model).__name__}): their switches could not be recorded under the "
                             f"monitor's layers; give the monitor the model that holds them (layers= picks "
                             f"the ones it measures)")
        return names

    def on_switch(self, event):
        """Record a form change: ``event = {"epoch", "step", "changes": [(name, old, new), ...]}``, and
        ``"rank_changes": [(name, old_rank, new_rank), ...]`` where the event has them (rank growth).

        Names are recorded as they come, so they must be the monitor's own layer names; a
        scheduler's events reach it through :meth:`attach`, which renames them."""
        if not isinstance(event, Mapping) or "changes" not in event:
            raise TypeError(f"event must be a dict with 'changes', got {event!r}")
        raw = event["changes"]
        if isinstance(raw, (str, bytes)) or not isinstance(raw, (list, tuple)) \
                or any(isinstance(c, (str, bytes)) or not isinstance(c, (list, tuple)) for c in raw):
            raise TypeError(f"event['changes'] must be a list of (module_name, old_form, new_form), got {raw!r}")
        changes = [tuple(c) for c in raw]
        if any(len(c) != 3 for c in changes):
            raise ValueError(f"each change must be (module_name, old_form, new_form), got {changes!r}")
        epoch = event.get("epoch")
        if epoch is None:
            epoch = self._open["epoch"] if self._open is not None else self._next_epoch()
        switch = {"epoch": int(epoch), "step": event.get("step"), "kind": _kind_of(changes),
                  "changes": [list(c) for c in changes], "source": "scheduler"}
        if event.get("rank_changes"):
            switch["rank_changes"] = [list(c) for c in event["rank_changes"]]
        self.switches.append(switch)
        if self.model is not None:
            self._known_forms = self._forms()

    def _loaded(self, changes):
        """A scheduler's load brought layers to their saved forms (``changes``: its loaded event's, in the
        monitor's names): no switch, but the forms the next epoch is compared with.  Where this monitor's
        state was loaded first, its forms are those saved forms already; a state loaded later replaces them."""
        for change in changes:
            if isinstance(change, (list, tuple)) and len(change) == 3 and change[0] in self._known_forms:
                self._known_forms[change[0]] = change[2]

    # -- epochs --------------------------------------------------------------------------
    def _require_model(self):
        if self.model is None:
            raise RuntimeError("this RankMonitor has no model (it was loaded from files); it can be read, "
                               "saved and plotted but not record new epochs")

    def _next_epoch(self):
        return self.records[-1]["epoch"] + 1 if self.records else 0

    def _forms(self):
        return {name: m.form for name, m in self.model.named_modules() if isinstance(m, FormLayer)}

    def _watched_forms(self):
        """Forms of the dynrank layers that label an epoch (see the class docstring), in model order."""
        watched = []
        if self.layers is not None:
            chosen = {n for n, _ in monitored_layers(self.model, self.layers)}
            watched = [n for n in self._known_forms if n in chosen]
        if not watched:
            watched = [n for n in self._known_forms if n in self._scheduled]
        return [self._known_forms[n] for n in (watched or self._known_forms)]

    def _detect(self, epoch):
        now = self._forms()
        changes = [(n, self._known_forms[n], f) for n, f in now.items()
                   if n in self._known_forms and self._known_forms[n] != f]
        if changes:
            self.switches.append({"epoch": epoch, "step": None, "kind": _kind_of(changes),
                                  "changes": [list(c) for c in changes], "source": "detected"})
        self._known_forms = now

    def _sync(self):
        if torch.cuda.is_available() and any(p.is_cuda for p in self.model.parameters()):
            torch.cuda.synchronize()     # wall time must include queued GPU work

    def _start_clock(self):
        """Start the open epoch's clock now, once the GPU work queued before has finished."""
        self._sync()
        self._open["_t0"] = time.perf_counter()

    def start_epoch(self, epoch=None):
        """Start timing an epoch (default number: previous + 1, starting at 0).

        Raises:
            RuntimeError: an epoch is already open, or no model.
            TypeError: an ``epoch`` that is neither an int nor None.
            ValueError: an ``epoch`` not after the last recorded one (a repeated number would
                give two records, and two points, for one epoch; a resume continues from
                ``load_state_dict``'s records).
        """
        self._require_model()
        if self._open is not None:
            raise RuntimeError(f"epoch {self._open['epoch']} is still open; call end_epoch() first")
        epoch = self._next_epoch() if epoch is None else check_int(epoch, "epoch", "an int or None")
        if self.records and epoch <= self.records[-1]["epoch"]:
            raise ValueError(f"epoch must come after the last recorded epoch {self.records[-1]['epoch']}, "
                             f"got {epoch}")
        self._detect(epoch)
        self._open = {"epoch": epoch, "scalars": {}}
        self._start_clock()

    def end_epoch(self, **scalars):
        """Stop the clock, measure the layers, store the record; returns it.

        The record is stored before the layers are measured: if measuring fails,
        the epoch stays recorded (with ``layers`` empty) and the error propagates.
        Layers with NaN or infinite weights get NaN metrics and a RuntimeWarning.

        Args:
            **scalars: numbers to log for this epoch (as :meth:`log`).

        Raises:
            RuntimeError: no open epoch.  TypeError/ValueError: a bad scalar (checked
                first: the epoch stays open and nothing is recorded, call again).
        """
        if self._open is None:
            raise RuntimeError("no open epoch; call start_epoch() first")
        checked = self._check_scalars(scalars)
        self._sync()
        wall = time.perf_counter() - self._open.pop("_t0")
        rec, self._open = self._open, None
        self._detect(rec["epoch"])
        forms = list(self._known_forms.values())
        mix = {form: forms.count(form) for form in FORMS}
        watched = set(self._watched_forms())
        label = "dense" if not forms else (watched.pop() if len(watched) == 1 else "mixed")
        params = list(self.model.parameters())
        rec.update(form=label, wall_seconds=wall, metrics_seconds=None, form_mix=mix,
                   trainable_params=sum(p.numel() for p in params if p.requires_grad),
                   total_params=sum(p.numel() for p in params), layers={})
        rec["scalars"].update(checked)
        measure = len(self.records) % self.metrics_every == 0
        self.records.append(rec)
        if measure:
            t0 = time.perf_counter()
            rec["layers"] = self._measure(rec["epoch"])
            rec["metrics_seconds"] = time.perf_counter() - t0
        return rec

    @contextlib.contextmanager
    def epoch(self, epoch=None):
        """Context manager: ``start_epoch`` on entry, ``end_epoch`` on normal exit.

        If the body raises, the epoch is discarded (not recorded) and the error propagates.
        """
        self.start_epoch(epoch)
        try:
            yield self
        except BaseException:
            self._open = None
            raise
        self.end_epoch()

    def measure(self):
        """Metrics of every monitored layer now: dict name → metric dict (no timing, nothing stored).

        Layers with NaN or infinite weights get NaN metrics, with a RuntimeWarning naming them.
        """
        return self._measure(None)

    def _measure(self, epoch):
        self._require_model()
        modules = dict(self.model.named_modules())
        out = {}
        for name, m in model_metrics(self.model, tol=self.tol, method=self.method, layers=self.layers,
                                     nonfinite="nan").items():
            out[name] = dict(type=type(modules[name]).__name__, **m.as_dict())
        bad = [name for name, m in out.items() if math.isnan(m["sigma_max"])]
        if bad:
            when = "" if epoch is None else f" at epoch {epoch}"
            warnings.warn(f"layers {bad} have NaN or infinite weights{when} (a diverged run?): their rank "
                          f"metrics are recorded as NaN", RuntimeWarning, stacklevel=3)
        return out

    @staticmethod
    def _check_scalars(scalars):
        out = {}
        for key, value in scalars.items():
            if key in _EPOCH_COLUMNS:
                raise ValueError(f"scalar name {key!r} clashes with a recorded column; choose another name")
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"scalar {key!r} must be a number or a 1-element tensor, got shape "
                                     f"{tuple(value.shape)}")
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"scalar {key!r} must be a number, got {type(value).__name__}")
            out[key] = float(value)
        return out

    def log(self, **scalars):
        """Attach numbers (loss, accuracy, lr, …) to the open epoch, else to the last recorded one.

        Raises:
            RuntimeError: nothing recorded yet.  TypeError/ValueError: not a number, or a reserved name.
        """
        checked = self._check_scalars(scalars)
        target = self._open if self._open is not None else (self.records[-1] if self.records else None)
        if target is None:
            raise RuntimeError("no epoch to log to; call start_epoch() (or use monitor.epoch()) first")
        target["scalars"].update(checked)

    # -- reading ---------------------------------------------------------------------------
    @property
    def epochs(self):
        """Recorded epoch numbers."""
        return [r["epoch"] for r in self.records]

    def scalar(self, key):
        """(epochs, values) of a logged scalar, over the epochs that have it."""
        pairs = [(r["epoch"], r["scalars"][key]) for r in self.records if key in r["scalars"]]
        return [e for e, _ in pairs], [v for _, v in pairs]

    def scalar_names(self):
        """Names of all logged scalars, in order of first appearance."""
        names = []
        for r in self.records:
            names += [k for k in r["scalars"] if k not in names]
        return names

    def layer_names(self):
        """Names of the measured layers, in model order."""
        names = []
        for r in self.records:
            names += [k for k in r["layers"] if k not in names]
        return names

    def layer_series(self, metric="spectral_ratio"):
        """dict layer → (epochs, values) of one per-layer metric (``math.inf`` kept).

        Raises:
            ValueError: ``metric`` is not among the recorded per-layer metrics.
        """
        out = {}
        for r in self.records:
            for name, m in r["layers"].items():
                if metric not in m:
                    known = sorted(k for k, v in m.items() if isinstance(v, numbers.Real) and not isinstance(v, bool))
                    raise ValueError(f"metric {metric!r} is not recorded per layer; recorded: {known}")
                series = out.setdefault(name, ([], []))
                series[0].append(r["epoch"])
                series[1].append(m[metric])
        return out

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self):
        """The run so far, for a checkpoint: what :meth:`load_state_dict` needs to go on from it.

        Returns:
            dict with ``"records"`` and ``"switches"`` (copies of the attributes: the
            recorded epochs, an epoch still open is not in them) and ``"forms"``: dict
            layer name → form of the dynrank layers as the monitor last saw them, which
            switch detection compares the next epoch's forms with (None without a model).
            Plain Python values: ``torch.save``/``torch.load`` (``weights_only`` too) and JSON
            keep them.
        """
        return {"records": copy.deepcopy(self.records), "switches": copy.deepcopy(self.switches),
                "forms": dict(self._known_forms) if self.model is not None else None}

    def load_state_dict(self, state):
        """Go on from a run saved by :meth:`state_dict`: its records, switches and layer forms.

        Records and switches replace this monitor's own; an open epoch is discarded.  The next
        epoch's forms are compared with the saved ``"forms"``, so the forms a resume restores
        (``load_training_state`` bringing the layers to adapter form) are no switch, and a form
        change after the save is still detected.  ``"forms"`` None (or absent: a state of
        ``records`` and ``switches`` only) takes the model's forms now: call it after the
        model is restored then.

        Args:
            state: dict from :meth:`state_dict`.

        Raises:
            TypeError: ``state`` is not a dict, or an entry, record or switch of the wrong type.
            ValueError: missing or unknown keys, a record or switch lacking a field, a form that is
                not one of lowrank/full/adapter, or a state of a monitor of other layers (its forms
                or measured layers are not this model's).  Nothing changes when it raises.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from RankMonitor.state_dict(), got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS[:2] if k not in state]
        unknown = sorted((k for k in state if k not in _STATE_KEYS), key=repr)
        if missing or unknown:
            raise ValueError(f"state must be a dict from RankMonitor.state_dict() with keys {', '.join(_STATE_KEYS)} "
                             f"('forms' optional), got keys {sorted(state, key=repr)}")
        records = _checked_entries(state["records"], "records", _RECORD_FIELDS)
        switches = _checked_entries(state["switches"], "switches", _SWITCH_FIELDS)
        forms = state.get("forms")
        if forms is not None:
            if not isinstance(forms, Mapping):
                raise TypeError(f"state['forms'] must be a dict layer name → form or None, "
                                f"got {type(forms).__name__}")
            bad = {name: form for name, form in forms.items() if not isinstance(name, str) or form not in FORMS}
            if bad:
                raise ValueError(f"state['forms'] must map layer names to one of {', '.join(FORMS)}, got {bad}")
        if self.model is not None:
            self._check_same_layers(forms, records)
        self.records, self.switches = copy.deepcopy(records), copy.deepcopy(switches)
        self._open = None
        self._known_forms = (dict(forms) if forms is not None else
                             self._forms() if self.model is not None else {})

    def _check_same_layers(self, forms, records):
        """Raise ValueError unless a saved state's layers are this model's: its forms name exactly the
        dynrank layers, its records measure only layers this monitor measures."""
        if forms is not None:
            ours = list(self._forms())
            extra, absent = [n for n in forms if n not in ours], [n for n in ours if n not in forms]
            if extra or absent:
                raise ValueError(f"state is of a monitor of other layers: dynrank layers only in the state "
                                 f"{extra}, only in this monitor's model {absent}")
        measured = [name for name, _ in monitored_layers(self.model, self.layers)]
        extra = sorted({n for r in records for n in r["layers"] if n not in measured})
        if extra:
            raise ValueError(f"state is of a monitor of other layers: its records measure {extra}, which this "
                             f"monitor does not measure (it measures {measured})")

    # -- files -----------------------------------------------------------------------------
    def save(self, path):
        """Write ``<stem>.json`` (everything) and three CSVs: ``<stem>.epochs.csv``,
        ``<stem>.layers.csv``, ``<stem>.switches.csv``.

        Args:
            path: file stem, or a path ending in ``.json``; folders are created.

        Returns:
            dict kind → path written (``json``, ``epochs``, ``layers``, ``switches``).

        The switches CSV has a row per layer of each switch; its ``switch`` column is the
        switch's index in :attr:`switches`, which keeps two switches of one epoch apart
        when the run is loaded from the CSVs alone.

        Infinite values are written as ``inf`` in the CSVs and as the string
        ``"inf"`` in the JSON (strict JSON has no infinity; NaN as ``"nan"``), which
        :meth:`load` reads back as numbers in the records only: a layer named
        ``"inf"`` or ``"nan"`` keeps its name.
        """
        stem = _stem(path)
        folder = os.path.dirname(stem)
        if folder:
            os.makedirs(folder, exist_ok=True)
        paths = {"json": stem + ".json", "epochs": stem + ".epochs.csv", "layers": stem + ".layers.csv",
                 "switches": stem + ".switches.csv"}
        doc = {"format": _FORMAT, "version": 1, "name": self.name, "records": self.records,
               "switches": self.switches}
        with open(paths["json"], "w", encoding="utf-8") as f:
            json.dump(encode(doc), f, indent=1, allow_nan=False)
        scalar_names = self.scalar_names()
        rows = []
        for r in self.records:
            row = {k: r.get(k) for k in _EPOCH_COLUMNS[:6]}
            row.update({f"n_{form}": r["form_mix"].get(form, 0) for form in FORMS})
            row.update({k: r["scalars"].get(k) for k in scalar_names})
            rows.append(row)
        write_csv(paths["epochs"], _EPOCH_COLUMNS + scalar_names, rows)
        rows = []
        for r in self.records:
            for name, m in r["layers"].items():
                row = dict(m, epoch=r["epoch"], layer=name, rows=m["shape"][0], cols=m["shape"][1])
                rows.append(row)
        write_csv(paths["layers"], _LAYER_COLUMNS, rows)
        rows = []
        for index, s in enumerate(self.switches):
            ranks = {c[0]: c[1:] for c in s.get("rank_changes", ())}
            for c in s["changes"]:
                old_rank, new_rank = ranks.get(c[0], (None, None))
                rows.append(dict(switch=index, epoch=s["epoch"], step=s["step"], kind=s["kind"], layer=c[0],
                                 old_form=c[1], new_form=c[2], old_rank=old_rank, new_rank=new_rank))
        write_csv(paths["switches"], [_SWITCH_INDEX] + _SWITCH_COLUMNS + _RANK_COLUMNS, rows)
        return paths

    @classmethod
    def load(cls, path):
        """Read a run written by :meth:`save` — from the JSON, or from the CSVs if no JSON.

        Args:
            path: the stem, the ``.json`` file, or any of the three CSVs.

        Returns:
            RankMonitor without a model (``records`` and ``switches`` filled).  Loaded
            from the CSVs, each switch's ``source`` is ``"csv"``; a switches CSV of an
            earlier version (no ``switch`` column) starts a new switch where epoch, step
            or kind change, so two switches of one kind at one epoch come back as one.

        Raises:
            FileNotFoundError: nothing to read.  ValueError: not a RankMonitor file; a JSON that is
                not valid JSON (empty or cut short: it is written in place; the CSVs beside it are
                read only once it is moved away); one missing an entry or column; a record or switch
                lacking a field or holding one of the wrong type (the message names the file and
                what is wrong).
        """
        stem = _stem(path)
        if os.path.exists(stem + ".json"):
            with open(stem + ".json", encoding="utf-8") as f:
                try:
                    doc = decode_run(json.load(f))
                except ValueError as err:           # JSONDecodeError, or bytes that are not UTF-8
                    beside = (f"; {stem}.epochs.csv and the other CSVs beside it are read once it is moved away"
                              if os.path.exists(stem + ".epochs.csv") else "")
                    raise ValueError(f"{stem}.json is not valid JSON ({err}); it is not a complete RankMonitor "
                                     f"file{beside}") from None
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise ValueError(f"{stem}.json is not a RankMonitor file")
            missing = [k for k in ("records", "switches") if k not in doc]
            if missing:
                raise ValueError(f"{stem}.json has no {' or '.join(repr(k) for k in missing)} entry; it is not a "
                                 f"complete RankMonitor file")
            for key, fields in (("records", _RECORD_FIELDS), ("switches", _SWITCH_FIELDS)):
                if not isinstance(doc[key], list) or not all(isinstance(r, dict) for r in doc[key]):
                    raise ValueError(f"{stem}.json: {key!r} must be a list of dicts, got {doc[key]!r:.80}")
                try:
                    _checked_entries(doc[key], key, fields, where=f"{stem}.json")
                except TypeError as err:            # a field of the wrong type: a damaged file
                    raise ValueError(str(err)) from None
            monitor = cls(None, name=doc.get("name", "run"))
            monitor.records, monitor.switches = doc["records"], doc["switches"]
            return monitor
        if not os.path.exists(stem + ".epochs.csv"):
            raise FileNotFoundError(f"no {stem}.json or {stem}.epochs.csv")
        return cls._from_csv(stem)

    @classmethod
    def _from_csv(cls, stem):
        monitor = cls(None, name=os.path.basename(stem))
        fixed = set(_EPOCH_COLUMNS)
        by_epoch = {}
        for row in _read_csv_with(stem + ".epochs.csv", _EPOCH_COLUMNS, _TEXT["epochs"]):
            rec = {k: row[k] for k in _EPOCH_COLUMNS[:6]}
            rec["form_mix"] = {form: row[f"n_{form}"] for form in FORMS}
            rec["scalars"] = {k: v for k, v in row.items() if k not in fixed and v is not None}
            rec["layers"] = {}
            by_epoch[rec["epoch"]] = rec
            monitor.records.append(rec)
        if os.path.exists(stem + ".layers.csv"):
            for row in _read_csv_with(stem + ".layers.csv", _LAYER_COLUMNS, _TEXT["layers"]):
                m = {k: row[k] for k in _LAYER_COLUMNS[2:] if k not in ("rows", "cols")}
                m["shape"] = [row["rows"], row["cols"]]
                if row["epoch"] not in by_epoch:
                    raise ValueError(f"{stem}.layers.csv has a row for epoch {row['epoch']!r}, which "
                                     f"{stem}.epochs.csv does not list")
                by_epoch[row["epoch"]]["layers"][row["layer"]] = m
        if os.path.exists(stem + ".switches.csv"):
            last_key = None
            for row in _read_csv_with(stem + ".switches.csv", _SWITCH_COLUMNS, _TEXT["switches"]):
                key = row[_SWITCH_INDEX] if _SWITCH_INDEX in row else (row["epoch"], row["step"], row["kind"])
                if not monitor.switches or key != last_key:
                    last = {"epoch": row["epoch"], "step": row["step"], "kind": row["kind"], "changes": [],
                            "source": "csv"}
                    monitor.switches.append(last)
                last_key = key
                last["changes"].append([row["layer"], row["old_form"], row["new_form"]])
                if row.get("old_rank") is not None:
                    last.setdefault("rank_changes", []).append([row["layer"], row["old_rank"], row["new_rank"]])
        return monitor

    # -- plots -----------------------------------------------------------------------------
    def plot_spectral_ratio(self, path=None, **kwargs):
        """λ per layer over epochs with switches marked; see :func:`dynrank.plots.plot_spectral_ratio`."""
        from .plots import plot_spectral_ratio
        return plot_spectral_ratio(self, path, **kwargs)

    def plot_curves(self, path=None, **kwargs):
        """Logged scalars over epochs; see :func:`dynrank.plots.plot_training_curves`."""
        from .plots import plot_training_curves
        return plot_training_curves([self], path, **kwargs)

    def __repr__(self):
        return (f"RankMonitor(name={self.name!r}, epochs={len(self.records)}, switches={len(self.switches)}, "
                f"model={'None' if self.model is None else type(self.model).__name__})")


# -- scheduler events, state and file helpers -------------------------------------------------

class _SchedulerHook:
    """The callback :meth:`RankMonitor.attach` gives a scheduler: renames the layers of each event (dict
    scheduler's name → monitor's, ``names``) and passes it to the monitor's :meth:`~RankMonitor.on_switch`.
    A loaded event (a scheduler's ``load_state_dict`` bringing layers to their saved forms) is no switch:
    the saved run recorded it, and the monitor's own ``load_state_dict`` brings that record back.  The
    monitor takes the loaded forms as the ones the next epoch is compared with (:meth:`RankMonitor._loaded`)."""

    def __init__(self, monitor, names):
        self.monitor, self.names = monitor, names

    def __call__(self, event):
        if isinstance(event, Mapping) and event.get("loaded"):
            changes = event.get("changes")
            if isinstance(changes, (list, tuple)):
                self.monitor._loaded([self._renamed(change) for change in changes])
            return
        if isinstance(event, Mapping) and self.names:
            event = dict(event)
            for key in ("changes", "rank_changes"):
                entries = event.get(key)
                if isinstance(entries, (list, tuple)):      # anything else: on_switch says what is wrong
                    event[key] = [self._renamed(entry) for entry in entries]
        self.monitor.on_switch(event)

    def _renamed(self, entry):
        if isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], str) and entry[0] in self.names:
            return (self.names[entry[0]], *entry[1:])
        return entry


def _checked_entries(entries, what, fields, where="state"):
    """``entries`` (``where[what]``: a state's, or a file's) as a list, after checking it is a list of dicts
    holding ``fields``."""
    if isinstance(entries, (str, bytes)) or not isinstance(entries, (list, tuple)):
        raise TypeError(f"{where}[{what!r}] must be a list of dicts, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise TypeError(f"{where}[{what!r}][{i}] must be a dict, got {type(entry).__name__} ({entry!r:.80})")
        absent = [k for k in fields if k not in entry]
        if absent:
            raise ValueError(f"{where}[{what!r}][{i}] has no {absent}; each of {what} needs {list(fields)}")
        for key, (kind, expected) in fields.items():
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise TypeError(f"{where}[{what!r}][{i}][{key!r}] must be {expected}, got {type(value).__name__} "
                                f"({value!r:.80})")
    return list(entries)


# -- file helpers ----------------------------------------------------------------------------

def _read_csv_with(path, columns, text_columns):
    """read_csv's rows (``text_columns`` kept as text), after checking that every one of ``columns`` is in
    the file."""
    rows = read_csv(path, text_columns)
    header = list(rows[0]) if rows else list(columns)
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{path} has no column {missing} (columns: {header}); it is not a RankMonitor file")
    return rows


def _stem(path):
    path = os.fspath(path)
    for suffix in (".json", ".epochs.csv", ".layers.csv", ".switches.csv"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path
