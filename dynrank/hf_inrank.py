"""Hugging Face transformers: :class:`IncrementalRankCallback` runs InRank's rank growth inside a ``Trainer``.

Import it as ``from dynrank.hf_inrank import IncrementalRankCallback`` (``import dynrank`` alone never
imports transformers)::

    convert_model(model, rank_ratio=0.5)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[IncrementalRankCallback(init_rank=2, buffer=8, warmup_steps=200)])
    trainer.train()
"""

import warnings
from collections.abc import Mapping

from .hf import _LOADED, TrainerCallback, _check_one_process
from .inrank import IncrementalRankScheduler, _check_ranks, _check_settings

__all__ = ["IncrementalRankCallback"]


class IncrementalRankCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that runs :class:`~dynrank.IncrementalRankScheduler` in a ``Trainer``.

    Convert the model first (``dynrank.convert_model``).  At ``on_train_begin`` the callback builds the
    scheduler on the Trainer's model and optimizer (each managed layer set to ``init_rank + buffer``
    components), and after every optimizer step (``on_step_end``) it calls ``scheduler.step`` with
    ``state.global_step``, so ``warmup_steps`` and ``check_every`` count optimizer steps (gradient
    accumulation's micro-batches are not steps).  The Trainer's LR scheduler keeps working: growth
    edits the optimizer's param groups in place.

    ``resume_from_checkpoint`` works, bit for bit: the callback keeps the scheduler's state (discovered
    and trained ranks, the step count) in ``state.stateful_callbacks["dynrank_inrank"]``, so each
    checkpoint holds it in its ``trainer_state.json``.  The Trainer loads the checkpoint into the model
    before any callback runs (each layer of a freshly converted model takes the rank of its tensors)
    and builds the optimizer on it; the resumed scheduler keeps those ranks, where a new one would cut
    them back to ``init_rank + buffer``, and takes the saved discovered ranks and step count.  The
    settings are the ones given to the callback.  Refused: a layer whose rank is not the saved one (a
    model of other layers), a layer converted with another ``alpha``, of another shape or in another form
    than the saved one (where the checkpoint records them: a layer converted in adapter form keeps its
    frozen weight beside a lowrank run's factors loaded into it), and a layer whose rank is above the
    ``max_rank`` given (ranks never shrink in a run, and cutting it would make another run than the saved
    one).  A checkpoint without the entry (a run without this callback) starts InRank at the resume, with
    a warning: each layer cut to ``init_rank + buffer`` components, or with ``init_rank=None`` keeping the
    rank it loaded.  (The entry is no callback's class name, so
    ``restore_callback_states_from_checkpoint=True`` leaves this callback as it is, and the Trainer then
    logs the warning "Checkpoint included callbacks not included in current configuration. Ignoring.
    (dynrank_inrank)": that is expected, the callback reads the entry itself.)

    Not beside a :class:`~dynrank.hf.DynamicRankCallback` on one model: whichever of the two builds its
    scheduler second at ``on_train_begin`` refuses the layers the other's manages (ValueError), before
    the first step.

    A ``train()`` from step 0 (a second one, or ``auto_find_batch_size`` starting again) starts InRank
    afresh on the model as it is: each layer back to ``init_rank + buffer`` components, by truncated SVD.

    Args:
        log: callable taking one line per step that grew layers (``print``, the default), or None.
        **scheduler_kwargs: ``init_rank``, ``buffer``, ``threshold``, ``warmup_steps``, ``check_every``,
            ``max_rank`` of ``IncrementalRankScheduler`` (its defaults where left out).

    Attributes:
        scheduler: the ``IncrementalRankScheduler`` (None before training begins):
            ``callback.scheduler.add_callback(fn)`` or ``add_model_copy`` after ``on_train_begin``, ``ranks``.
        changes: every growth of the run so far, as (global step, layer name, old rank, new rank).  A
            ``train()`` keeps those up to the step it starts at: a resume drops the ones after its
            checkpoint (an earlier ``train()`` of this Trainer interrupted past it), and a ``train()`` from
            step 0 starts the list afresh.

    Raises:
        TypeError, ValueError: an unknown keyword or a setting the scheduler refuses, at construction;
            at ``on_train_begin``, what the scheduler's constructor raises (a model with no
            FusedLowRankLinear in lowrank or adapter form, or layers a DynamicRankCallback's scheduler
            manages, say), the refused resumes above, and training on several processes or under
            DeepSpeed or FSDP (growth replaces the parameters the Trainer's wrapper was built on).

    Example::

        from transformers import Trainer, TrainingArguments
        from dynrank import convert_model
        from dynrank.hf_inrank import IncrementalRankCallback

        convert_model(model, rank_ratio=0.5)
        growth = IncrementalRankCallback(init_rank=2, buffer=8, warmup_steps=200, check_every=25)
        trainer = Trainer(model=model, args=TrainingArguments("out", save_strategy="steps", save_steps=500),
                          train_dataset=data, callbacks=[growth])
        trainer.train()                                   # growth.changes: (step, layer, old rank, new rank)
        trainer.train(resume_from_checkpoint=True)        # later, into a freshly converted model
    """

    _KWARGS = ("init_rank", "buffer", "threshold", "warmup_steps", "check_every", "max_rank")

    STATE_KEY = "dynrank_inrank"

    def __init__(self, log=print, **scheduler_kwargs):
        unknown = sorted(set(scheduler_kwargs) - set(self._KWARGS))
        if unknown:
            raise TypeError(f"IncrementalRankCallback got unexpected keyword argument(s) {', '.join(unknown)}; "
                            f"it takes {', '.join(self._KWARGS)} for the scheduler, and log")
        # The scheduler's own checks, now rather than when training begins (valid stand-ins for the settings
        # left out, whose defaults are the scheduler's).
        given = scheduler_kwargs.get
        _check_settings(given("buffer", 1), given("threshold", 0.5), given("warmup_steps", 0), given("check_every", 1))
        _check_ranks(given("init_rank"), given("max_rank"))
        if log is not None and not callable(log):
            raise TypeError(f"log must be callable or None, got {type(log).__name__}")
        self.log = log
        self.scheduler_kwargs = scheduler_kwargs
        self.scheduler = None
        self.changes = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _check_one_process(args, type(self).__name__, "a growth")
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(self.STATE_KEY)
        if state.global_step > 0 and saved is not None:
            self.scheduler = self._resume(state, saved, model, optimizer)
        else:
            if state.global_step > 0:
                settings = self.scheduler_kwargs
                if "init_rank" in settings and settings["init_rank"] is None:
                    cap = settings.get("max_rank")
                    start = ("each layer keeps the rank it loaded"
                             + ("" if cap is None else f" (cut to max_rank={cap} where above it)")
                             + ", its discovered rank at that rank − buffer")
                else:
                    start = "each layer cut to init_rank + buffer components"
                warnings.warn(f"IncrementalRankCallback: resuming at global step {state.global_step} from a "
                              f"checkpoint without its state (stateful_callbacks[{self.STATE_KEY!r}] of "
                              f"trainer_state.json): InRank starts here, {start}", stacklevel=2)
            self.scheduler = IncrementalRankScheduler(model, optimizer, **self.scheduler_kwargs)
        # The growth before the step this train() starts at: a resume undoes the later (an earlier train() of this
        # Trainer interrupted after the checkpoint), and a train() from step 0 all of it.
        self.changes = [change for change in self.changes if change[0] <= state.global_step]
        self._keep_state(state)

    def on_step_end(self, args, state, control, **kwargs):
        # After the optimizer step, before the Trainer saves at this step: the checkpoint holds the growth.
        grown = self.scheduler.step(state.global_step)
        self.changes.extend((state.global_step, *change) for change in grown)
        if grown and self.log is not None:
            moves = ", ".join(sorted({f"{old} → {new}" for _, old, new in grown}))
            self.log(f"dynrank: step {state.global_step}: {len(grown)} layer{'' if len(grown) == 1 else 's'} "
                     f"grew, rank {moves}")
        self._keep_state(state)

    def _resume(self, state, saved, model, optimizer):
        """The scheduler of a resume: built keeping the ranks the Trainer loaded into the layers (no
        ``init_rank``, no cap to cut them by), then given the checkpoint's discovered ranks and step count
        under the callback's own settings, and its layers' forms, alphas and shapes (where saved) to check.  A
        layer above the callback's ``max_rank`` is refused: cutting it would make another run than the saved one."""
        scheduler = IncrementalRankScheduler(model, optimizer,
                                             **dict(self.scheduler_kwargs, init_rank=None, max_rank=None))
        cap = self.scheduler_kwargs.get("max_rank")
        above = [(name, rank) for name, rank in scheduler.ranks.items() if cap is not None and rank > cap]
        if above:
            name, rank = above[0]
            raise ValueError(f"resuming at global step {state.global_step}: layer {name!r} has rank {rank} in the "
                             f"checkpoint, above the max_rank={cap} given to IncrementalRankCallback "
                             f"({len(above)} layer{'s' if len(above) > 1 else ''} above it); ranks never shrink in a "
                             f"run, and cutting them would make another run than the saved one: resume with "
                             f"max_rank={max(rank for _, rank in above)} or more, or None. {_LOADED}")
        try:
            if not isinstance(saved, Mapping):
                raise TypeError(f"not the state IncrementalRankCallback saves (a dict), got {type(saved).__name__}")
            if saved.get("ranks") != scheduler.ranks:
                raise ValueError(f"it has the layers at ranks {saved.get('ranks')}, the model at {scheduler.ranks}")
            own = scheduler.state_dict()
            scheduler.load_state_dict(dict(
                own, last_step=saved.get("last_step"), current=saved.get("current"), ranks=saved["ranks"],
                max_rank={name: own["max_rank"][name] if cap is None else min(cap, own["max_rank"][name])
                          for name in own["max_rank"]},
                **{key: saved[key] for key in scheduler._LAYER_RECORD if key in saved}))
        except (TypeError, ValueError) as e:
            raise type(e)(f"resuming at global step {state.global_step}: the InRank state in the checkpoint's "
                          f"trainer_state.json (stateful_callbacks[{self.STATE_KEY!r}]) does not fit this model: "
                          f"{e}. {_LOADED}") from None
        return scheduler

    def _keep_state(self, state):
        """Put the scheduler's state into ``state.stateful_callbacks``: the Trainer saves the TrainerState, with
        it, into each checkpoint after ``on_step_end``."""
        callbacks = getattr(state, "stateful_callbacks", None)
        if isinstance(callbacks, dict):
            callbacks[self.STATE_KEY] = self.scheduler.state_dict()
