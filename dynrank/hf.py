"""Hugging Face transformers: :class:`DynamicRankCallback` runs a dynamic-rank schedule inside a ``Trainer``.

Import it as ``from dynrank.hf import DynamicRankCallback`` (``import dynrank`` alone never imports
transformers)::

    convert_model(model, rank_ratio=0.25)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[DynamicRankCallback(inflate_epoch=1, deflate_epoch=3)])
    trainer.train()

The callback builds a :class:`~dynrank.DynamicRankScheduler` on the Trainer's own model and optimizer
when training begins, and steps it before the first optimizer step of every epoch (or of every step,
``unit="step"``).  The Trainer's LR scheduler keeps working, since the switches edit the optimizer's
param groups in place.  Trainer checkpoints resume across the switches into a freshly converted model:
each layer takes the form of its tensors in the checkpoint, and a switch draws its random factors from
generators seeded by the run's seed and its epoch (or step), the global RNG left as it was: a deflate
draws what the uninterrupted run drew, whatever drew from the global RNG before it (an epoch-end
evaluation after a checkpoint, which a resume from that checkpoint skips).

InRank's rank growth has a callback of its own, :class:`dynrank.hf_inrank.IncrementalRankCallback`.
"""

import contextlib
import hashlib
import json
import math
import numbers
import os
import sys
import time
import uuid
import warnings
from collections.abc import Mapping

import torch

from ._args import check_int
from ._checks import cuda_devices
from ._forms import FORMS
from .monitor import _EPOCH_COLUMNS, RankMonitor
from .scheduler import (DEFAULT_OPTIMIZER_STATE, DynamicRankScheduler, _check_choices, _check_schedule,
                        check_deflate_rank_value)

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import has_length
except ImportError as e:        # pragma: no cover - exercised only without transformers
    raise ImportError("dynrank.hf needs Hugging Face transformers (pip install transformers); the rest of "
                      "dynrank works without it") from e

__all__ = ["DynamicRankCallback"]


class DynamicRankCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that runs :class:`~dynrank.DynamicRankScheduler` in a ``Trainer``.

    Convert the model first (``dynrank.convert_model``).  At ``on_train_begin``
    the callback builds the scheduler on the Trainer's model and optimizer;
    before the first optimizer step of each epoch (``unit="epoch"``: the
    Trainer loop's epoch) or of each step (``unit="step"``:
    ``state.global_step``) it calls ``scheduler.step``, which switches the
    layers due: lowrank → full at ``inflate_epoch``, full → adapter at
    ``deflate_epoch``.  A switch draws its random factors from generators
    seeded by ``args.seed`` and its epoch (or step), the global RNG left as
    it was, so a deflate draws the same fresh factors as an uninterrupted
    run, from whatever checkpoint the run resumed.

    ``resume_from_checkpoint`` works: the Trainer loads the model state dict
    (each layer of a freshly converted model takes the form its tensors
    were saved in), builds the optimizer on those parameters, loads its
    state, and the new scheduler takes the epoch from ``state``.  The
    callback keeps the scheduler's state and the steps where the epochs
    began in ``state.stateful_callbacks["dynrank"]``, so each checkpoint
    holds them in its ``trainer_state.json``; a resume, from whatever
    folder, checks the model against the checkpoint it loaded as
    :func:`~dynrank.load_training_state` does, so a model converted at
    another rank is refused, in full form too where the next deflate takes
    the layer's rank (no ``deflate_rank`` for it), and so is one converted
    with another ``alpha`` or of other layer sizes (where the checkpoint
    records them).  A checkpoint without the entry (saved by an earlier
    version) resumes unchecked.  The schedule is the one given to the callback.
    (The entry is no callback's class name, so
    ``restore_callback_states_from_checkpoint=True`` leaves this callback
    as it is, and the Trainer then logs the warning "Checkpoint included
    callbacks not included in current configuration. Ignoring. (dynrank)":
    that is expected, the callback reads the entry itself.)

    Resume into a freshly converted model.  The Trainer loads the
    checkpoint into the model, non-strictly, before any callback runs, so a
    resume into a model the schedule has already switched further is
    refused only with the checkpoint's tensors in it (an adapter layer
    keeps its frozen W_f and takes a lowrank checkpoint's factors): save a
    trained model before calling ``train(resume_from_checkpoint=...)`` on
    it.  A second ``trainer.train()`` without a checkpoint is refused
    before anything changes where the schedule has switched the model.

    The epoch is the Trainer loop's own (counted from ``on_epoch_begin``),
    so an ``IterableDataset`` with ``max_steps`` switches where its epochs
    begin; a resume of one takes its epoch from the checkpoint's saved
    epochs (``state.epoch`` counts from the Trainer's loop, which a resume
    starts again at 0, so a resumed run's checkpoints hold one behind the
    epoch).  A resume past its first epoch starts the data anew, so one
    from a checkpoint inside a later epoch (not at its end) is refused
    while a switch by epoch is still ahead: the epochs after it could not
    begin where the saved run's did (they begin earlier; a switch whose
    epoch, with passes of the last one's length, would begin at
    ``max_steps`` or later even so is not ahead: neither run reaches it).
    Save at the ends of epochs (``save_strategy="epoch"``) or run the
    schedule by steps.

    Refused at ``on_train_begin`` (ValueError), before the first step (on a
    resume, after the Trainer has loaded the checkpoint into the model):
    the resumes above, training on several processes or under DeepSpeed or
    FSDP (a switch replaces the parameters the Trainer's wrapper was built on; one device,
    or ``nn.DataParallel`` on several GPUs of one process, is fine), and
    ``load_best_model_at_end=True`` where the run has a lowrank phase and
    reaches the deflate: the Trainer loads the best checkpoint non-strictly,
    and a lowrank checkpoint's factors loaded into an adapter layer keep its
    frozen W_f (the adapter-only load), a model that is neither.  Load the
    checkpoint you choose into a freshly converted model instead.  Not
    beside an :class:`~dynrank.hf_inrank.IncrementalRankCallback` on one
    model either: whichever of the two builds its scheduler second refuses
    the layers the other's manages (the two schedulers are not meant to
    drive one model).

    With ``monitor=RankMonitor(model)``, the callback runs the monitor too:
    each epoch is timed from its first step (after its switch) to the end
    of its last step, before the Trainer logs, evaluates and saves after it
    (``on_epoch_end`` for an ``IterableDataset`` run by ``max_steps``), with
    the mean of the training losses logged for it (``loss``) and the numbers
    of each evaluation made while training runs (``eval_loss``, ...) as
    scalars; the switches reach it from the scheduler.  Training runs from
    the first step of a ``train()`` until its loop returns: the evaluation
    at its start (``eval_on_start``) and an ``evaluate()`` after it, a test
    set's, are no epoch's, also after a ``train()`` that raised (a Ctrl-C).  So
    ``monitor.records`` hold the wall time of each epoch by form, and
    ``dynrank.cost.cost_report(..., run=monitor)`` the measured cost of the
    schedule.  It is saved into each checkpoint folder
    (``rank_monitor.json`` and its CSVs, with ``rank_monitor.run.json``
    naming the run, each ``train()`` its own, and step), and a resume reads
    it back from the folder
    the Trainer loaded when that is ``<output_dir>/checkpoint-<step>`` (as
    ``resume_from_checkpoint=True`` finds it) or ``args.resume_from_checkpoint``,
    so the records of a resumed run go back to its first epoch, as the
    saved run had them at that step (also where the monitor holds more, from
    an earlier ``train()`` of this Trainer interrupted after the checkpoint).
    A ``train()`` from step 0 (a second one, or ``auto_find_batch_size``
    starting again) starts the monitor with no records.  An epoch
    cut by the checkpoint is timed from the resume on, with the losses and
    evaluations the Trainer logged in it before the checkpoint
    (``state.log_history``); so is one a run stopped by ``max_steps`` ended
    at its last step, continued with a larger ``max_steps``.  An epoch that ends only at ``on_epoch_end``
    (an ``IterableDataset``'s) is still open when the Trainer saves at its
    last step: ``rank_monitor.run.json`` keeps it as it stands, and a resume
    from there records it as it stood then (its wall time up to the save,
    its layers measured on the checkpoint's weights); the monitor's files
    of that checkpoint alone lack it.
    Files there of another
    run or step are not read (a run resumed from a checkpoint into another
    folder writes under its own name, so its checkpoints are not the first
    run's): the monitor then keeps, with a warning, the records it holds of
    the epochs before the resumed one and the switches made before the
    checkpoint's step (none, unless it was given them before ``train()``:
    ``monitor.load_state_dict(RankMonitor.load(path).state_dict())``).

    Args:
        inflate_epoch, deflate_epoch: the schedule, as for ``DynamicRankScheduler``.
        log: callable taking one line per switch (``print``, the default), or None.
        monitor: a :class:`~dynrank.RankMonitor` of the Trainer's model, or None.
        **scheduler_kwargs: ``deflate_init``, ``optimizer_state``,
            ``deflate_rank``, ``unit``, ``epochs`` of ``DynamicRankScheduler``
            (a ``deflate_rank`` is checked against the layers when training
            begins, its type and sign at construction).

    Attributes:
        scheduler: the ``DynamicRankScheduler`` (None before training begins):
            ``callback.scheduler.add_callback(fn)`` after ``on_train_begin``,
            ``form_at``, ``last_epoch``.
        changes: every switch of the run so far, as (epoch or step, layer
            name, old form, new form).  A ``train()`` keeps those made before
            the step it starts at: a resume drops the ones after its checkpoint
            (an earlier ``train()`` of this Trainer interrupted past it), and a
            ``train()`` from step 0 starts the list afresh.

    Raises:
        TypeError, ValueError: a bad schedule or option, at construction
            (the scheduler's own checks, and a ``deflate_rank`` of the wrong
            type, below 1 or a ratio past 1); at ``on_train_begin``, what the
            scheduler's constructor raises (a model with no dynrank layer,
            say) and a ValueError for each refusal above.
    """

    _KWARGS = ("deflate_init", "optimizer_state", "deflate_rank", "unit", "epochs")

    MONITOR_FILE = "rank_monitor"
    STATE_KEY = "dynrank"

    def __init__(self, inflate_epoch, deflate_epoch, log=print, monitor=None, **scheduler_kwargs):
        unknown = sorted(set(scheduler_kwargs) - set(self._KWARGS))
        if unknown:
            raise TypeError(f"DynamicRankCallback got unexpected keyword argument(s) {', '.join(unknown)}; "
                            f"it takes {', '.join(self._KWARGS)} for the scheduler, log and monitor")
        unit = scheduler_kwargs.get("unit", "epoch")
        _check_schedule(unit, inflate_epoch, deflate_epoch, scheduler_kwargs.get("epochs"))
        _check_choices(scheduler_kwargs.get("deflate_init", "zeros"),
                       scheduler_kwargs.get("optimizer_state", DEFAULT_OPTIMIZER_STATE))
        _check_deflate_rank(scheduler_kwargs.get("deflate_rank"))
        self.inflate_epoch, self.deflate_epoch = inflate_epoch, deflate_epoch
        self.unit = unit
        if log is not None and not callable(log):
            raise TypeError(f"log must be callable or None, got {type(log).__name__}")
        self.log = log
        if monitor is not None and not isinstance(monitor, RankMonitor):
            raise TypeError(f"monitor must be a dynrank.RankMonitor or None, got {type(monitor).__name__}")
        self.monitor = monitor
        self.scheduler_kwargs = scheduler_kwargs
        self.scheduler = None
        self.changes = []
        self._last = None
        self._losses = []
        self._begun, self._ended = [], False
        self._run = self._saved_run = None
        self._loop, self._stepping, self._provisional = None, False, None
        self._start = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _check_one_process(args, type(self).__name__, "a switch")
        self._check_length(args, state)
        scheduler = DynamicRankScheduler(model, optimizer, self.inflate_epoch, self.deflate_epoch,
                                         **self.scheduler_kwargs)
        self._last = self._epoch = None
        self._start = self._start_epoch(state, kwargs.get("train_dataloader"))
        start = self._count(state)
        resumed = state.global_step > 0
        self._check_start(scheduler, start, resumed)
        self._begun, self._ended = [], False
        self._run, self._saved_run, self._provisional = uuid.uuid4().hex, None, None
        if resumed:
            self._resume(state, scheduler, kwargs.get("train_dataloader"))
        self._check_best_model(args, state)
        inside = self._inside(state)
        if self.monitor is not None:
            self._start_monitor(args, state, model, scheduler, inside)
        self.scheduler = scheduler
        # The switches made before the step this train() starts at: a resume undoes the later ones (an earlier
        # train() of this Trainer interrupted after the checkpoint), and a train() from step 0 all of them.
        by_step = self.unit == "step"
        self.changes = [change for change in self.changes
                        if _made_before(state, self._start, inside, step=change[0] if by_step else None,
                                        epoch=change[0])]
        # The monitor takes logs and evaluations from this train()'s first step on (one at its start,
        # eval_on_start's, is no epoch's), and only while its loop runs (see _monitor_has_epoch).
        self._loop, self._stepping = _loop_key(), False

    def on_train_end(self, args, state, control, **kwargs):
        # An evaluation after training (a test set's) is no epoch's: it leaves the records as they are.
        self._loop, self._stepping = None, False

    def on_epoch_begin(self, args, state, control, **kwargs):
        # The loop's own epoch index: the one this train() starts in at the first epoch (0, or the resumed
        # one), then one more per epoch.  state.epoch itself lags behind it for an IterableDataset with
        # max_steps.
        self._epoch = self._loop_epoch(state) if self._epoch is None else self._epoch + 1

    def on_step_begin(self, args, state, control, **kwargs):
        self._stepping = True
        epoch = self._loop_epoch(state)
        if not self._begun or self._begun[-1][0] != epoch:
            # Where the last two epochs began: a streamed run's resume tells from them whether its
            # checkpoint ends an epoch.
            self._begun = [*self._begun[-1:], [epoch, state.global_step]]
            self._ended = False
        if self._provisional is not None:
            self._record_provisional(epoch)
        count = self._count(state)
        if count == self._last:
            return
        self._last = count
        opening = self.monitor is not None and self.monitor._open is None
        if opening:
            # The epoch opens before its switch, which the monitor then records in it (a by-step scheduler's
            # event names no epoch, and the monitor may hold no record before it: a resume whose files were
            # not found).
            self.monitor.start_epoch(epoch)
        # Seeded only where a switch is due: a step that switches nothing draws nothing, and copying the RNG
        # states at every step (unit="step") would cost for nothing.
        due = self.scheduler._switch_due(self.scheduler.form_at(count))
        with _switch_rng(args, count, self.scheduler.model) if due else contextlib.nullcontext():
            changed = self.scheduler.step(count)
        if changed:
            _warn_pending_gradients(self.scheduler.model, state, self.unit, count)
        self.changes.extend((count, *change) for change in changed)
        if changed and self.log is not None:
            moves = sorted({f"{old} → {new}" for _, old, new in changed})
            self.log(f"dynrank: {self.unit} {count}: {len(changed)} layer{'' if len(changed) == 1 else 's'} "
                     f"{', '.join(moves)}")
        if opening:
            # The epoch's clock starts at its first step, after its switch.
            self.monitor._start_clock()
            self._relog(state, epoch)

    def on_step_end(self, args, state, control, **kwargs):
        # The epoch's last step: close it now, before the Trainer logs, evaluates and saves after it, so
        # a checkpoint there holds the epoch; the run's last step ends its epoch too, cut short by
        # max_steps.  (state.epoch never gets to the end of an IterableDataset's epoch: on_epoch_end
        # closes those, and on_save keeps them as they stand.)
        last = 0 < (getattr(state, "max_steps", 0) or 0) <= state.global_step
        if self.monitor is not None and self.monitor._open is not None \
                and (last or (state.epoch or 0) + 1e-6 >= self.monitor._open["epoch"] + 1):
            self.monitor.end_epoch()
        self._keep_state(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._ended = True
        if self.monitor is not None and self.monitor._open is not None:
            self.monitor.end_epoch()
        self._keep_state(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # A training loss goes to the open epoch, else to the one just closed: the Trainer logs an
        # epoch's last loss after its last step.
        loss = (logs or {}).get("loss")
        if not _number(loss) or not self._monitor_has_epoch():
            return
        self._losses.append(loss)
        self.monitor.log(loss=sum(self._losses) / len(self._losses))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self._monitor_has_epoch():
            return
        self.monitor.log(**{k: v for k, v in (metrics or {}).items() if _number(v) and k not in _EPOCH_COLUMNS})

    def on_save(self, args, state, control, **kwargs):
        if self.monitor is not None:
            # Whose files these are: a resume reads them only for the run and step of the checkpoint it loaded.
            owner = {"run": self._run, "global_step": state.global_step}
            opened = self.monitor._open
            if opened is not None:
                # An epoch still open may end at this step (an IterableDataset's ends at on_epoch_end, after
                # the save): a resume past its end records it as it stands here.
                owner["open"] = {"epoch": opened["epoch"], "scalars": dict(opened["scalars"]),
                                 "wall_seconds": time.perf_counter() - opened["_t0"]}
            stem = os.path.join(self._checkpoint_folder(args, state), self.MONITOR_FILE)
            self.monitor.save(stem)
            with open(stem + ".run.json", "w", encoding="utf-8") as f:
                json.dump(owner, f)

    def _relog(self, state, epoch):
        """Log to the monitor what the Trainer logged in ``epoch`` before now, as it did then: on a resume in
        the middle of the epoch, the mean of the losses and the numbers of each evaluation from before the
        checkpoint (``state.log_history``).  The entries of the epoch are those after the step where it
        began (a checkpoint of an earlier dynrank tells none: those within its span of ``state.epoch``)."""
        began = self._began(epoch)
        if began is not None:
            entries = [h for h in state.log_history if h.get("step", -1) > began]
        else:
            entries = [h for h in state.log_history if epoch + 1e-6 < h.get("epoch", -1) < epoch + 1 - 1e-6]
        self._losses = [h["loss"] for h in entries if _number(h.get("loss"))]
        for h in entries:
            metrics = {k: v for k, v in h.items() if k.startswith("eval_") and _number(v)}
            if metrics:
                self.monitor.log(**metrics)
        if self._losses:
            self.monitor.log(loss=sum(self._losses) / len(self._losses))

    def _record_provisional(self, epoch):
        """At a resume's first step: the epoch left open at the checkpoint (saved by ``on_save``) ended there
        when the loop is past it now; record it as it stood at the save, measured on the checkpoint's model.
        Otherwise it goes on, reopened, and is timed from the resume."""
        saved, self._provisional = self._provisional, None
        records = self.monitor.records
        if epoch <= saved["epoch"] or self.monitor._open is not None \
                or (records and records[-1]["epoch"] >= saved["epoch"]):
            return
        self.monitor.start_epoch(saved["epoch"])
        record = self.monitor.end_epoch(**saved["scalars"])
        record["wall_seconds"] = saved["wall_seconds"]

    def _keep_state(self, state):
        """Put the scheduler's state and the epochs begun into ``state.stateful_callbacks``: the Trainer saves
        the TrainerState, with it, into each checkpoint after ``on_step_end`` or ``on_epoch_end``."""
        callbacks = getattr(state, "stateful_callbacks", None)
        if self.scheduler is not None and isinstance(callbacks, dict):
            callbacks[self.STATE_KEY] = {"scheduler": self.scheduler.state_dict(),
                                         "epochs_begun": [list(b) for b in self._begun],
                                         "epoch_ended": self._ended, "run": self._run}

    def _resume(self, state, scheduler, dataloader):
        """Check the model against the scheduler state saved in the checkpoint the Trainer loaded (its
        TrainerState), and take back the epochs begun; refuse a streamed run's resume whose later epochs
        cannot begin where the saved run's did.  Without the entry (a checkpoint saved by an earlier
        dynrank) nothing is checked."""
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(self.STATE_KEY)
        if saved is None:
            self._begun = [[self._loop_epoch(state), None]]      # where this epoch began is not known
            return
        try:
            if not isinstance(saved, Mapping) or not isinstance(saved.get("scheduler"), Mapping):
                raise ValueError("not the state DynamicRankCallback saves")
            begun, ended = saved.get("epochs_begun"), saved.get("epoch_ended")
            if not isinstance(begun, list) or not all(isinstance(b, list) and len(b) == 2 for b in begun) \
                    or not isinstance(ended, bool):
                raise ValueError("not the state DynamicRankCallback saves (epochs_begun, epoch_ended)")
            # The layers' saved forms and ranks, and their alphas, shapes, decompositions and lowrank ranks where
            # saved (checked against the model's, as load_training_state does), under the callback's own schedule.
            kept = saved["scheduler"]
            scheduler.load_state_dict(dict(scheduler.state_dict(), forms=kept.get("forms"), ranks=kept.get("ranks"),
                                           **{key: kept[key] for key in scheduler._LAYER_RECORD if key in kept}))
        except (TypeError, ValueError) as e:
            raise type(e)(f"resuming at global step {state.global_step}: the schedule's state in the checkpoint's "
                          f"trainer_state.json (stateful_callbacks[{self.STATE_KEY!r}]) does not fit this model: "
                          f"{e}. {_LOADED}") from None
        self._begun, self._ended = begun, ended
        if isinstance(saved.get("run"), str):
            # The run that saved the checkpoint, to find its monitor's files; this run writes under its own.
            self._saved_run = saved["run"]
        if not begun or self.unit != "epoch" or dataloader is None or has_length(dataloader):
            return
        (epoch, began), previous = begun[-1], (begun[-2][1] if len(begun) == 2 else None)
        ahead = [e for e in (self.inflate_epoch, self.deflate_epoch) if e is not None and e > epoch]
        max_steps = getattr(state, "max_steps", 0) or 0
        if None not in (began, previous) and max_steps:
            # With passes of the last one's length: the data starting anew, the resumed run's next epoch begins
            # at this step (or where the pass skipped into ends), earlier than the saved run's.  A switch whose
            # epoch would begin at max_steps or later even so is one neither run reaches.
            length = began - previous
            ahead = [e for e in ahead
                     if max(state.global_step, length) + (e - epoch - 1) * length < max_steps]
        whole = ended or (None not in (began, previous) and state.global_step - began == began - previous)
        if epoch > 0 and not whole and ahead:
            raise ValueError(
                f"resuming an IterableDataset run at global step {state.global_step}, inside epoch {epoch} "
                f"(begun at step {began}): the Trainer starts the data anew on a resume past the first "
                f"epoch, so the epochs after this one cannot begin where the saved run's did, and the switch "
                f"at epoch {ahead[0]} would come at another step. Resume from a checkpoint saved at the end "
                f"of an epoch (save_strategy=\"epoch\") or in the first, or run the schedule by steps "
                f"(unit=\"step\"). {_LOADED}")

    def _start_monitor(self, args, state, model, scheduler, inside):
        """Check the monitor watches the Trainer's model, give it the run's records up to where this train()
        starts (the loop's epoch ``self._start``, ``inside`` it past its first step: :meth:`_inside`), and attach
        it to ``scheduler``.

        A resume reads them back from the checkpoint folder that has them: they are the records the saved
        run had at that step, whatever the monitor holds from an earlier ``train()`` of this Trainer (one
        interrupted after the checkpoint has recorded more), less the record of an epoch the checkpoint is
        inside of (one that run ended at its last step, stopped there by ``max_steps``: this train() goes on
        with it, timed from the resume on).  Otherwise the monitor keeps what it holds from
        before this train()'s first step (:func:`_before_start`): records given before a resume, and none
        for a train() from step 0 (a second one, or ``auto_find_batch_size`` starting again)."""
        monitor = self.monitor
        if monitor.model is not model:
            raise ValueError("monitor must be a RankMonitor of the Trainer's model (RankMonitor(model)), got one of "
                             + ("no model" if monitor.model is None else f"another {type(monitor.model).__name__}"))
        start = self._start
        run = _before_start(monitor.state_dict(), state, start, inside)
        if state.global_step > 0:
            saved = self._saved_monitor(args, state, held=bool(run["records"]))
            if saved is not None:
                # Cut as well: a run stopped by max_steps inside an epoch closed that epoch at its last step,
                # and this train() goes on with it.
                run = _before_start(RankMonitor.load(saved).state_dict(), state, start, inside)
        # The files keep no forms: take the model's now, which a resume's load has switched (no "detected"
        # switch); an epoch left open by an earlier train() is dropped.
        monitor.load_state_dict(dict(run, forms=None))
        monitor.attach(scheduler)

    def _saved_monitor(self, args, state, held):
        """The stem of the monitor's files saved with the checkpoint the Trainer loaded, or None.  No
        callback hook is told which folder that was: the candidates are ``args.resume_from_checkpoint``
        and ``<output_dir>/checkpoint-<step>``, and one counts only when its ``.run.json`` names the run
        and step of the TrainerState loaded (a checkpoint of an earlier dynrank names none: the folder in
        the output folder is taken as it is).  ``held``: whether the monitor keeps records of its own
        otherwise (the warning says which)."""
        folders = [self._checkpoint_folder(args, state)]
        given = getattr(args, "resume_from_checkpoint", None)
        if isinstance(given, (str, os.PathLike)):
            folders.insert(0, os.fspath(given))
        stems = [os.path.join(folder, self.MONITOR_FILE) for folder in folders]
        if self._saved_run is None:
            return stems[-1] if os.path.exists(stems[-1] + ".json") else None
        for stem in stems:
            try:
                with open(stem + ".run.json", encoding="utf-8") as f:
                    owner = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(owner, Mapping) and owner.get("run") == self._saved_run \
                    and owner.get("global_step") == state.global_step and os.path.exists(stem + ".json"):
                self._provisional = _open_epoch(owner.get("open"))
                return stem
        kept = ("keeps the records it holds of the epochs before this one (given before train(), or an earlier "
                "train()'s)" if held else "starts with no records")
        warnings.warn(f"DynamicRankCallback: resuming at global step {state.global_step}, the monitor's records "
                      f"of the checkpoint loaded were not found ({' or '.join(stems)} hold none of this run "
                      f"and step: the checkpoint came from another folder?); the monitor {kept}. To keep "
                      f"the checkpoint's, load them into it before train(): "
                      f"monitor.load_state_dict(RankMonitor.load('<checkpoint>/{self.MONITOR_FILE}').state_dict())",
                      stacklevel=2)
        return None

    def _checkpoint_folder(self, args, state):
        """The checkpoint folder the Trainer writes at this step (and resumes from, in the output folder):
        where the monitor's files go."""
        return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    def _monitor_has_epoch(self):
        """Whether there is a monitor and, while training runs, an epoch for RankMonitor.log: the open one, or
        the last recorded.  Training runs from this train()'s first step until its loop returns: a log or
        evaluation outside the loop that called ``on_train_begin`` (``trainer.evaluate()`` after a train()
        that raised, and so never reached ``on_train_end``) is no epoch's."""
        return self.monitor is not None and self._stepping and _loop_running(self._loop) \
            and (self.monitor._open is not None or bool(self.monitor.records))

    def _loop_epoch(self, state):
        """The Trainer loop's epoch: counted from on_epoch_begin, else (before the first) the one this train()
        starts in (:meth:`_start_epoch`; state.epoch's, for hooks called without ``on_train_begin``)."""
        if self._epoch is not None:
            return self._epoch
        return self._start if self._start is not None else int((state.epoch or 0) + 1e-6)

    def _start_epoch(self, state, dataloader):
        """The loop's epoch where a train() starts: state.epoch's whole part, but on a resume of data without a
        length (an ``IterableDataset`` run by ``max_steps``) the epoch of the checkpoint's last step, as the
        callback saved it (``epochs_begun``).  The Trainer counts such a run's state.epoch as its own loop's
        index plus the steps over ``max_steps``, and its loop starts again at index 0 on a resume (skipping
        the checkpoint's steps of the data): a checkpoint of a resumed run past its first epoch holds a
        state.epoch behind the epoch, and one at step ``max_steps`` of a single pass one a whole epoch
        ahead.  A checkpoint without the entry (an earlier dynrank's) has only state.epoch."""
        epoch = int((state.epoch or 0) + 1e-6)
        if state.global_step == 0 or dataloader is None or has_length(dataloader):
            return epoch
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(self.STATE_KEY)
        begun = saved.get("epochs_begun") if isinstance(saved, Mapping) else None
        last = begun[-1] if isinstance(begun, list) and begun else None
        if isinstance(last, list) and len(last) == 2 and isinstance(last[0], int) and not isinstance(last[0], bool):
            return last[0]
        return epoch

    def _inside(self, state):
        """Whether this train() starts past the first step of the loop's epoch it starts in, where a switch by
        epoch is made: after the step where that epoch began, as the checkpoint saved it, else (a train() from
        step 0, a checkpoint of an earlier dynrank) with state.epoch past the epoch's start."""
        start = self._loop_epoch(state)
        began = self._began(start)
        if isinstance(began, int) and not isinstance(began, bool):
            return state.global_step > began
        return (state.epoch or 0) > start + 1e-6

    def _began(self, epoch):
        """The global step where ``epoch`` began, as ``self._begun`` holds it, or None where ``epoch`` is not the
        last epoch begun.  The step may be None too: not known (a resume from a checkpoint of an earlier
        dynrank)."""
        return self._begun[-1][1] if self._begun and self._begun[-1][0] == epoch else None

    def _count(self, state):
        """What ``scheduler.step`` takes now: the global step (``unit="step"``), else the loop's epoch."""
        return state.global_step if self.unit == "step" else self._loop_epoch(state)

    def _check_start(self, scheduler, start, resumed):
        """Refuse layers already past the form the schedule gives at ``start``: before anything changes,
        or, ``resumed``, after the Trainer has loaded the checkpoint into them."""
        target = scheduler.form_at(start)
        ahead = [(name, layer.form) for name, layer in scheduler.layers
                 if FORMS.index(layer.form) > FORMS.index(target)]
        if ahead and resumed:
            raise ValueError(
                f"training resumes at {self.unit} {start}, where the schedule has the layers in {target} form, "
                f"but {len(ahead)} of them are in {ahead[0][1]} form (e.g. {ahead[0][0]!r}): a resume into a "
                f"model the schedule has switched further (a trained one), or one converted to a later form "
                f"than the schedule has there. Such a model is now neither what it was nor the checkpoint (an "
                f"adapter layer keeps its frozen weight and takes a lowrank checkpoint's factors). {_LOADED}")
        if ahead:
            raise ValueError(
                f"training starts at {self.unit} {start}, where the schedule has the layers in {target} form, but "
                f"{len(ahead)} of them are in {ahead[0][1]} form already (e.g. {ahead[0][0]!r}): a second "
                f"trainer.train() (or auto_find_batch_size restarting training) on a model the schedule has "
                f"switched, or a model converted to a later form than the schedule starts with; train, or "
                f"resume with trainer.train(resume_from_checkpoint=...), on a freshly converted model")

    def _run_end(self, args, state):
        """Where the Trainer's run ends, in the scheduler's unit (0: unknown): its optimizer steps
        (``unit="step"``), else its epochs (unknown for data without a length, whose epochs the Trainer
        counts as ``sys.maxsize``, the run ending at ``max_steps``)."""
        if self.unit == "step":
            return getattr(state, "max_steps", None) or 0
        epochs = getattr(state, "num_train_epochs", None) or args.num_train_epochs
        return 0 if epochs >= sys.maxsize else math.ceil(epochs)

    def _check_length(self, args, state):
        """Refuse a run longer than the schedule's ``epochs=``: its last epochs would stop the Trainer with
        the scheduler's out-of-range error after hours of training."""
        epochs = self.scheduler_kwargs.get("epochs")
        if epochs is None:
            return
        end = self._run_end(args, state)
        if end > epochs:
            # Name the argument the Trainer took the epochs from: max_steps overrides num_train_epochs, and a
            # fractional num_train_epochs runs into one more epoch.
            by_steps = (getattr(args, "max_steps", 0) or 0) > 0
            if self.unit == "step":
                what = (f"max_steps={end} optimizer steps" if by_steps else
                        f"{end} optimizer steps (num_train_epochs={args.num_train_epochs:g})")
            elif by_steps:
                what = f"max_steps={args.max_steps} ({end} epochs)"
            else:
                what = f"num_train_epochs={args.num_train_epochs:g} ({end} epochs)"
            raise ValueError(f"DynamicRankCallback(epochs={epochs}) schedules {epochs} {self.unit}s, but this "
                             f"Trainer runs {what}; give epochs={end} or more (or leave it out)")

    def _check_best_model(self, args, state):
        """Refuse ``load_best_model_at_end`` where the best checkpoint may be lowrank and the model an adapter.

        The Trainer loads it non-strictly, and a dict of factors alone into an adapter layer is an
        adapter-only load (W_f stays): the layers would be neither the checkpoint nor the last model.
        """
        if not getattr(args, "load_best_model_at_end", False):
            return
        if self.inflate_epoch in (None, 0) or self.deflate_epoch is None:
            return                                     # no lowrank phase, or no adapter phase
        end = self._run_end(args, state)
        if end and self.deflate_epoch >= end:
            return                                     # the run ends before the deflate
        raise ValueError(
            f"load_best_model_at_end=True with this schedule (lowrank until {self.unit} {self.inflate_epoch}, "
            f"adapter from {self.deflate_epoch}) could load a checkpoint saved in lowrank form into the "
            f"adapter-form model; the Trainer loads it non-strictly, which keeps the adapter's frozen weight, "
            f"so the layers would match neither model. Set load_best_model_at_end=False and load the "
            f"checkpoint you choose into a freshly converted model (load_state_dict takes each layer's form "
            f"from it)")


_LOADED = ("The Trainer loads the checkpoint into the model before any callback runs (non-strictly: the tensors "
           "that fit), so the model now holds the checkpoint's tensors: build and convert a fresh model to resume "
           "into")


@contextlib.contextmanager
def _switch_rng(args, count, model):
    """Run a switch's random draws (a deflate's fresh factors) on the CPU and the model's CUDA devices from
    generators seeded by the run's seed and ``count``, the global RNG state put back after it: the draws
    then depend on the run and the switch alone.  From the global stream they depended on what drew
    from it before the switch, which a resumed run need not repeat: a checkpoint at an epoch's last step
    is saved before the epoch's evaluation, whose DataLoader draws its base seed, and a resume from it
    skips that evaluation."""
    digest = hashlib.sha256(f"dynrank switch {getattr(args, 'seed', 0)} {count}".encode()).digest()
    seed = int.from_bytes(digest[:8], "little") >> 1
    devices = cuda_devices([model])
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _warn_pending_gradients(model, state, unit, count):
    """Warn where a switch came inside a gradient accumulation: parameters it kept still hold gradients
    (the Trainer zeroes them after each optimizer step), which the switched layers' new parameters lack.
    An ``IterableDataset`` pass whose length is not a multiple of ``gradient_accumulation_steps`` carries
    its trailing micro-batches into the next epoch's first step, where a switch by epoch is made."""
    if any(p.grad is not None and bool(p.grad.any()) for p in model.parameters()):
        warnings.warn(f"DynamicRankCallback switched at {unit} {count} (global step {state.global_step}) while "
                      f"the model held gradients of micro-batches not yet stepped (a data pass whose length is "
                      f"not a multiple of gradient_accumulation_steps carries them into the next epoch): the "
                      f"switched layers dropped theirs, the other parameters step with them; make the pass a "
                      f"multiple of gradient_accumulation_steps", stacklevel=2)


def _check_one_process(args, who, change):
    """Refuse a Trainer that runs several processes, DeepSpeed or FSDP: their wrappers keep the parameters
    that ``change`` (what the callback ``who`` does to the layers) replaces."""
    if getattr(args, "world_size", 1) > 1:
        raise ValueError(f"{who} runs on one process (one device, or nn.DataParallel); this Trainer runs "
                         f"{args.world_size} processes, whose distributed wrapper would keep the parameters "
                         f"{change} replaces")
    engine = "DeepSpeed" if getattr(args, "deepspeed", None) else "FSDP" if getattr(args, "fsdp", None) else None
    if engine:
        raise ValueError(f"{who} cannot run under {engine}: it wraps and shards the parameters at the start of "
                         f"training, and {change} replaces them; train without it")


def _loop_key():
    """What identifies the frame that called the Trainer's callback handler for the hook now running (at
    ``on_train_begin``: the Trainer's training loop), for :func:`_loop_running`; None where no handler is on the
    stack (hooks called by hand).  Its id and code, not the frame: holding it would keep the loop's locals alive
    after a train() that raised."""
    frame, handler = sys._getframe(1), False
    while frame is not None:
        if frame.f_globals.get("__name__") == TrainerCallback.__module__:
            handler = True
        elif handler:
            return id(frame), frame.f_code
        frame = frame.f_back
    return None


def _loop_running(key):
    """Whether the frame ``key`` names (:func:`_loop_key`) is among the callers now.  An id is another live
    object's only once the frame has returned, so the code is compared too: a frame of the same code with that
    id is a new call of the Trainer's loop, a new train(), whose ``on_train_begin`` names it.  True for no
    key."""
    if key is None:
        return True
    frame = sys._getframe(1)
    while frame is not None:
        if id(frame) == key[0] and frame.f_code is key[1]:
            return True
        frame = frame.f_back
    return False


def _made_before(state, start, inside, step=None, epoch=None):
    """Whether a switch at ``step`` (by step), else at ``epoch`` (by epoch, made at the first step of its epoch),
    came before the step where a train() starts (``state.global_step``, in the loop's epoch ``start``; ``inside``:
    past that epoch's first step)."""
    if step is not None:
        return step < state.global_step
    return epoch < start or (epoch == start and inside)


def _before_start(run, state, start, inside):
    """``run`` (a :meth:`RankMonitor.state_dict`) cut to what came before the step where a train() starts
    (``state.global_step``, in the loop's epoch ``start``, ``inside`` it past its first step): the records of the
    epochs before, and the switches made before that step (:func:`_made_before`)."""
    return dict(run, records=[r for r in run["records"] if r["epoch"] < start],
                switches=[s for s in run["switches"]
                          if _made_before(state, start, inside, s.get("step"), s["epoch"])])


def _check_deflate_rank(spec):
    """TypeError/ValueError for a ``deflate_rank`` no layer takes: of the wrong type, an int below 1, a float
    ratio outside (0, 1].  The scheduler checks the rest against the layers (a rank above a layer's, an
    unknown name)."""
    values = spec.items() if isinstance(spec, Mapping) else [(None, spec)]
    for name, value in values:
        what = "deflate_rank" if name is None else f"deflate_rank[{name!r}]"
        if value is None:
            continue
        check_deflate_rank_value(value, what)
        if isinstance(value, numbers.Integral):
            check_int(value, what, "a rank >= 1 (an int) or a float ratio in (0, 1]", low=1)


def _number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _open_epoch(entry):
    """The epoch left open at a save, from ``rank_monitor.run.json``'s ``"open"``, or None (none, or not the
    form ``on_save`` writes)."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("epoch"), int) or isinstance(entry["epoch"], bool) \
            or not _number(entry.get("wall_seconds")) or not isinstance(entry.get("scalars"), Mapping) \
            or not all(isinstance(k, str) and _number(v) for k, v in entry["scalars"].items()):
        return None
    return entry
