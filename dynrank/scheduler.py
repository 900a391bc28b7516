"""DynamicRankScheduler: the paper's Algorithm 1 on the user's own model and training loop.

Every dynrank layer of the model goes lowrank → full at ``inflate_epoch`` (I)
and full → adapter at ``deflate_epoch`` (D).  The optimizer is edited in place
at each change (see :mod:`dynrank._optim`), so the loop, the optimizer and any
LR scheduler attached to it stay as the user built them::

    for epoch in range(epochs):
        scheduler.step(epoch)          # forms due at this epoch, optimizer follows
        train_one_epoch(model, optimizer)
        lr_scheduler.step()

Call :meth:`DynamicRankScheduler.step` between optimizer steps (after one
``optimizer.step()``, before the next forward): a gradient accumulated on a
parameter that a switch removes or freezes is dropped with it, and a switch
that merges into a weight's own storage (an adapter inflated, a deflate with
``init="svd"``) makes the backward of a forward made before it raise torch's
in-place error wherever that forward saved the weight.  Anything
else that holds the parameters must be told, since the switch replaces them:
an EMA or SWA copy of the model (``torch.optim.swa_utils.AveragedModel``)
switches with it once given to :meth:`DynamicRankScheduler.add_model_copy`,
and a DDP wrapper is rebuilt (:mod:`dynrank.distributed`).
"""

import gc
import numbers
import warnings
import weakref
from collections.abc import Mapping

import torch

from ._args import check_int
from ._claims import (_OWNERS, RECORD_KEYS, _Claiming, _alpha_mismatch, _check_layers_held, _check_other_kind,
                      _check_saved_alpha, _check_saved_form, _check_saved_record, _layer_record)
from ._checks import (call_back, check_copy, check_finite, check_layer_names, check_model_and_optimizer,
                      check_new_copy, check_not_sharded, check_not_unconverted, check_one_group, check_same_layers,
                      check_switchable, check_sync, check_trains_layers, check_untied, fork_layer_rngs, form_layers,
                      remove_copy, unwrap_model)
from ._forms import DEFLATE_INITS, outside_inference_mode
from ._optim import (clear_state, drop_frozen_adapter_params, manage, params_before, pullback_state,
                     pushforward_state, replace_params, switched_params, warn_dampened)
from ._readers import guard_attention
from .distributed import _check_same_count, _remember_ddp, _retire_stale, _sync_layers

__all__ = ["DynamicRankScheduler", "OPTIMIZER_STATES", "form_layers", "check_deflate_rank_value"]


def check_deflate_rank_value(value, what="deflate_rank"):
    """TypeError/ValueError for one layer's ``deflate_rank`` of a type no layer takes (not an int or a
    float, a bool) or a float ratio outside (0, 1]; an int is checked against each layer's rank range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be an int, a float ratio in (0, 1], a dict of them or None, "
                        f"got {type(value).__name__} ({value!r})")
    if not isinstance(value, numbers.Integral) and not 0.0 < value <= 1.0:
        raise ValueError(f"{what} is a float, a rank ratio, which must be in (0, 1], got {value!r}")

OPTIMIZER_STATES = ("reset", "carry", "fresh")
UNITS = ("epoch", "step")
# Chosen by benchmarks/optimizer_state_compare.py (3 seeds, MLP and CNN, SGD and
# AdamW): with SGD momentum the two tie within seed noise; with AdamW "carry"
# trained worse on the MLP in every seed (a mis-estimated second moment lingers
# for ~1/(1-beta2) steps), so "reset" stays the default.  "fresh" (every
# parameter's state cleared) tied "reset" within seed noise in all four settings.
DEFAULT_OPTIMIZER_STATE = "reset"
_OWN = object()   # DynamicRankScheduler._deflate_rank_for: the scheduler's own deflate_rank


def _check_count(value, what, allow_none=True):
    if value is None and allow_none:
        return None
    value = check_int(value, what, "an int or None" if allow_none else "an int")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


def _check_schedule(unit, inflate, deflate, epochs):
    """Validated (unit, I, D, epochs), as the constructor takes them."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    inflate = _check_count(inflate, f"inflate_{unit}")
    deflate = _check_count(deflate, f"deflate_{unit}")
    epochs = _check_count(epochs, "epochs")
    if inflate is None and deflate is None:
        raise ValueError(f"give inflate_{unit} and/or deflate_{unit}; both are None")
    if inflate is not None and deflate is not None and deflate <= inflate:
        raise ValueError(f"deflate_{unit} must be greater than inflate_{unit} (the full-rank phase is "
                         f"[I, D)), got I={inflate}, D={deflate}")
    if epochs is not None:
        for what, value in ((f"inflate_{unit}", inflate), (f"deflate_{unit}", deflate)):
            if value is not None and value > epochs:
                raise ValueError(f"{what} must be in [0, epochs={epochs}], got {value}")
    return unit, inflate, deflate, epochs


def _check_choices(deflate_init, optimizer_state):
    if deflate_init not in DEFLATE_INITS:
        raise ValueError(f"deflate_init must be one of {', '.join(DEFLATE_INITS)}, got {deflate_init!r}")
    if optimizer_state not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer_state must be one of {', '.join(OPTIMIZER_STATES)}, "
                         f"got {optimizer_state!r}")
    return deflate_init, optimizer_state


def _plain(value):
    """A checked ``deflate_rank`` value (None, an int, a float) as a Python int or float."""
    if value is None:
        return None
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _trainable(layer):
    return [p for p in layer.parameters() if p.requires_grad]


@torch.no_grad()
def _follow(copy_layer, layer, op, init):
    """Take ``copy_layer`` through the change ``op`` that ``layer`` just went through, drawing no random
    numbers (the run's RNG stream is the same with or without copies).  Inflate merges the copy's own
    factors, so it keeps computing its averaged function; deflate freezes its dense weight and starts its
    factors as the model's, as the model's deflate would have on the copy's weight.  A copy kept out of
    autograd (every parameter ``requires_grad=False``) stays out."""
    frozen = not any(p.requires_grad for p in copy_layer.parameters())
    if op == "inflate":
        copy_layer.inflate()
    else:
        copy_layer._allocate("adapter", layer.rank)
        factors = copy_layer.factors()
        for key, value in layer.factors().items():
            factors[key].copy_(value)
        if init == "svd":
            copy_layer._merge_into_(copy_layer._dense().data, -1.0, factors)
    if frozen:
        copy_layer.requires_grad_(False)


class DynamicRankScheduler(_Claiming):
    """Switch every dynrank layer lowrank → full → adapter at epoch (or step) boundaries.

    The form each epoch requires (paper Alg. 1): ``lowrank`` before I, ``full``
    in [I, D), ``adapter`` from D on.  ``inflate_epoch=None`` starts full (the
    fine-tuning preset: pretrained model, deflate at D); ``deflate_epoch=None``
    never deflates.  :meth:`step` brings every layer to the form its epoch
    requires — also after skipped epochs (lowrank → adapter runs inflate then
    deflate) — and is idempotent for one epoch.

    Optimizer: after a change, the layer's removed parameters and their state
    leave the optimizer and the new ones take their place in the same
    param group (same hyperparameters), in place; LR schedulers (their
    ``state_dict`` too) and a ``GradScaler`` keep working.  A layer the
    optimizer does not hold is left out of it; an optimizer that holds no
    layer at all (built before ``convert_model``) is refused.  A layer
    switched while frozen (``requires_grad_(False)``; an optimizer given
    ``model.parameters()`` holds it) gets frozen new parameters, which take
    the old ones' place all the same: they take no step until unfrozen, as
    torch treats a frozen parameter it holds.  New parameters
    join the group of the trainable ones they replace, never that of a frozen
    factor kept apart.  A frozen dense weight W_f leaves the optimizer: at a
    deflate, and at construction for a layer already in adapter form (its
    factors stay, frozen or not), so a run converted with
    ``form="adapter"`` resumes from any checkpoint.  Parameters that stay
    (biases, BN) are untouched.  A parameter that leaves training (factors
    released by inflate, the dense weight frozen by deflate) loses its
    ``.grad``, which would otherwise linger in
    ``clip_grad_norm_(model.parameters())``.

    Hooks: a switch keeps every layer module, so module hooks (forward,
    backward) keep firing; it replaces parameters, and a hook registered on a
    parameter (``Tensor.register_hook``, ``register_post_accumulate_grad_hook``:
    per-tensor gradient clipping, an optimizer step in the backward) leaves
    with it, or stops firing with a weight frozen as W_f.  Register such hooks
    on the new trainable parameters in a callback (:meth:`add_callback`: it
    runs after the switch, before the next forward).  A resume switches layers
    too: :meth:`load_state_dict` (and :func:`~dynrank.checkpoint.load_training_state`)
    calls the callbacks with a loaded event (``"loaded": True``) when it
    changes a layer's form, so the same callback gives a resumed run its
    hooks.  A model loaded on its own (``model.load_state_dict`` before the
    scheduler's load, as Accelerate's ``load_state`` does) replaces the
    parameters with no event, and the scheduler's load then has nothing to
    change: there, register the hooks after loading.  A layer whose weight or
    factor is reparametrized (``torch.nn.utils.parametrize``) is refused
    before any layer switches.

    torch's transformer modules: building the scheduler guards them as
    :func:`~dynrank.convert_model` does, for dynrank layers put in by hand
    (``from_dense`` on an existing layer) or wrapped in an encoder after
    conversion.  An ``nn.TransformerEncoderLayer`` with a dynrank ``linear1``
    or ``linear2`` gets a no-op forward pre-hook and an
    ``nn.TransformerEncoder`` holding a dynrank layer has
    ``use_nested_tensor`` turned off, since torch's fused inference path
    reads ``linear1.weight`` (W_f alone in adapter form, None in lowrank
    form); build the scheduler on the module that holds the encoder, not on
    one of its layers.  A dynrank layer inside an ``nn.MultiheadAttention``
    (its ``out_proj``) is refused: that module reads the weight directly, so
    only the full form computes there.

    One scheduler per layer: building a second one over a layer (the same
    model, or part of it) takes the layer from the first, which from then on
    refuses to step or load while it lives (two would switch the layer back
    and forth on their two schedules, dropping its optimizer state each time).
    So a scheduler built again in place of one (a resume in the same process)
    works whether or not the old one is still referenced.  Schedulers over
    disjoint parts of one model may share its optimizer.  A layer that a live
    :class:`~dynrank.IncrementalRankScheduler` manages is refused at
    construction, naming it (and an IncrementalRankScheduler refuses this
    scheduler's layers): the inflate takes away the factors InRank grows, so
    the two are not meant to drive one model; let go of the one first.  A
    scheduler manages the dynrank layers its model holds when it is built,
    under the names they have then: a dynrank layer added to the model
    since, or one removed or swapped for another, makes a :meth:`step` due to
    switch layers, and a load, raise a ValueError naming them; build a new scheduler over the
    model as it is.  A layer only renamed (a wrapper put around its block,
    a module inserted before it in an ``nn.Sequential``) is the same layer,
    switched and saved under the name it had then.  (A layer :func:`~dynrank.unconvert_model` replaced
    gives its own RuntimeError.)

    Copies: a scheduler copies and pickles with its model and optimizer.
    ``copy.deepcopy({"model": model, "optimizer": optimizer, "scheduler":
    scheduler})`` (a forked run), or that dict through ``torch.save`` and
    ``torch.load(..., weights_only=False)``, gives a scheduler over the copied
    model and optimizer that acts as one built over them: a model load that
    switches a copied layer edits the copied optimizer, its layers refuse an
    IncrementalRankScheduler, and the copied run goes on as the original
    would.  A scheduler copied alone brings copies of its model and optimizer
    (its ``model`` and ``optimizer``).  A shallow copy (``copy.copy``) holds
    the same model and optimizer, and takes the layers from the original as
    a scheduler built over them would: the original then refuses to step or
    load while the copy lives.

    ``optimizer_state``:
        ``"reset"`` (default): the new parameters start with empty state; the
        others (biases, BN, layers left dense) keep theirs.  Fused SGD with
        momentum steps a param group only where every parameter has a momentum
        buffer or none has: a new parameter joining a group where others have
        one gets a zero buffer, which steps as an empty one unless
        ``dampening`` is set, where its first step is (1 − dampening)·lr·g
        instead of lr·g (SGD without ``fused`` takes lr·g); :meth:`step` warns
        where that happens.  ``"fresh"`` leaves no buffer, so it does not.

        ``"fresh"``: the authors' fresh SGD per phase.  At a switch made by
        :meth:`step`, once the parameters are replaced, every parameter's
        state is cleared: the optimizer is then as a newly built one of its
        class over the same param groups (lr and the other settings kept, so
        LR schedulers go on).  State a class creates at construction
        (``Adagrad``'s ``sum``) is given anew; fused SGD starts without
        momentum buffers, L-BFGS without history.  The whole optimizer is
        cleared, the state of parameters outside the scheduler's layers too
        (a scheduler over another part of the model sharing it).  A load
        (:meth:`load_state_dict`) clears nothing: the saved optimizer state
        is loaded after it.

        ``"carry"``: the new parametrization starts
        from the state the old one implies — on inflate, momentum / ``exp_avg``
        m_W = s·(m_A·Bᵀ + A·m_Bᵀ) and second moments
        v_W = s²·(v_A·(B∘B)ᵀ + (A∘A)·v_Bᵀ); on deflate m_A = s·m_W·B,
        v_A = s²·v_W·(B∘B), and a zero-output factor (B when A = 0) starts
        empty; ``step`` counts are kept.  For SGD momentum this is exact to first
        order; Adam's second moment can only be approximated, and measured
        (benchmarks/optimizer_state_compare.py) "carry" ties "reset" with SGD
        and trains worse with AdamW — hence the default.  See :mod:`dynrank._optim`.

    ``torch.compile``: a model compiled once before training (``torch.compile(model)``, as
    ``dynrank-train --compile`` does) follows the switches.  dynamo guards on each layer's form and
    parameters, so the first call after a switch compiles the model anew and no graph of an earlier
    form runs again.  Every layer switches at the same step, so a run costs one compile per phase
    (3 for lowrank → full → adapter; a compiled evaluation under ``no_grad`` has graphs of its own),
    whatever the number of layers.  Layers switched one at a time (by hand, or by several schedulers
    on parts of the model) make one state each: past ``torch._dynamo.config.recompile_limit`` (8;
    ``cache_size_limit`` in torch before 2.7) states dynamo runs the model eagerly from then on (it warns
    once), so raise the limit there.

    Args:
        model: the model (or a DistributedDataParallel wrapping it) holding dynrank layers.
            A switch that replaces trainable parameters (:meth:`step`,
            :meth:`load_state_dict`) retires the wrapper given here, or the
            last one :func:`~dynrank.distributed.rewrap_ddp` built: its gradient
            hooks are removed and its forward raises a RuntimeError saying to
            re-wrap, instead of stepping on gradients it never averaged.  A
            wrapper built by hand and never passed to dynrank is left alone.
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters.
        inflate_epoch: I, epoch (or step) at which lowrank layers inflate; None: start full.
        deflate_epoch: D > I, epoch (or step) at which full layers deflate; None: never.
        deflate_init: ``"zeros"`` (function-preserving, the authors' choice),
            ``"random"`` or ``"svd"``; see ``FormLayer.deflate``.
        optimizer_state: ``"reset"``, ``"carry"`` or ``"fresh"``.
        deflate_rank: adapter rank: None (each layer's rank), an int, a float in
            (0, 1] (a rank ratio, each layer's ``rank_for_ratio``),
            or a dict name → int/float/None (names of layers the scheduler
            manages; a layer left out keeps its rank).
        unit: ``"epoch"`` or ``"step"``: what I, D and :meth:`step`'s argument count.
        epochs: optional total number of epochs (steps); I and D must lie in
            [0, epochs] and :meth:`step` rejects later epochs.
        sync_ranks: True/False: broadcast the layers' parameters and buffers from
            rank 0 once here (:func:`~dynrank.convert_model` draws some factors from
            each process's own RNG, and under FSDP2 nothing else broadcasts the layers
            kept out of it) and
            fresh adapter factors after each deflate, so all data-parallel ranks stay
            identical; default (None): True when ``model`` is a
            DistributedDataParallel (or the module inside the one ``rewrap_ddp``
            last built), False without a group of several processes; a bare module in
            such a group must say which (ValueError: replicas, or different models).
            Every rank must build the scheduler and call :meth:`step` with the same
            epoch (compared across the ranks where ``unit="epoch"``, see :meth:`step`).
        process_group: a ``torch.distributed.ProcessGroup`` for that broadcast,
            or None (the DDP wrapper's, or WORLD); on a process outside it
            (``new_group`` returned ``GroupMember.NON_GROUP_MEMBER``), a ValueError.  The default group is kept as
            None, so the scheduler copies and pickles; another group is kept by
            a deep copy, and refused (TypeError) by pickling.

    Raises:
        TypeError: a non-module model, a non-optimizer, non-int epochs, a
            non-bool ``sync_ranks``, a ``process_group`` that is not a ProcessGroup.
        ValueError: negative epochs, D ≤ I, both None, unknown options, a
            ``deflate_rank`` invalid for a layer or naming an unknown layer,
            a model with no dynrank layers, an optimizer holding one layer's
            factors in different param groups, one holding no trainable
            parameter of any layer (built before ``convert_model``), a
            dynrank layer inside an ``nn.MultiheadAttention`` (the message names it),
            layers a live ``IncrementalRankScheduler`` manages (named), or layers
            FSDP sharded (named: keep them out, ``fully_shard(model,
            ignored_params=dynrank.distributed.dynrank_params(model))``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynrank import DynamicRankScheduler, convert_model
        >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
        >>> _ = convert_model(model, rank_ratio=0.5)        # "0" lowrank; "2" is the classifier
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> scheduler = DynamicRankScheduler(model, optimizer, inflate_epoch=2, deflate_epoch=4)
        >>> for epoch in range(5):
        ...     changes = scheduler.step(epoch)          # before the epoch's first batch
        ...     if changes:
        ...         print(epoch, changes)
        ...     # train one epoch with optimizer here: it holds the trainable tensors of each form
        2 [('0', 'lowrank', 'full')]
        4 [('0', 'full', 'adapter')]
    """

    def __init__(self, model, optimizer, inflate_epoch, deflate_epoch, deflate_init="zeros",
                 optimizer_state=DEFAULT_OPTIMIZER_STATE, deflate_rank=None, unit="epoch",
                 epochs=None, sync_ranks=None, process_group=None):
        check_model_and_optimizer(model, optimizer)
        self.unit, self.inflate_epoch, self.deflate_epoch, self.epochs = _check_schedule(
            unit, inflate_epoch, deflate_epoch, epochs)
        self.deflate_init, self.optimizer_state = _check_choices(deflate_init, optimizer_state)
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self._layers = form_layers(self.model)
        if not self._layers:
            raise ValueError("model has no dynrank layers (FusedLowRankLinear, LowRankConv2d): "
                             "convert it first with dynrank.convert_model(model)")
        check_not_sharded(self._layers, type(self).__name__)
        self.deflate_rank = self._check_deflate_rank(deflate_rank)  # a bad deflate_rank fails now, not at D
        self.sync_ranks, self.process_group = check_sync(model, sync_ranks, process_group)
        check_one_group(optimizer, self._layers)
        check_trains_layers(optimizer, self._layers, self.model, "DynamicRankScheduler")
        check_untied(self.model, self._layers, type(self).__name__)
        _check_other_kind(self._layers, growing=False)
        guard_attention(self.model, type(self).__name__)
        _remember_ddp(model)
        if self.sync_ranks:
            _sync_layers(self._layers, group=self.process_group)
        for _, layer in self._layers:
            drop_frozen_adapter_params(optimizer, layer)
        self._claim()
        self.last_epoch = None
        self._callbacks = []
        self._warned_frozen = set()
        self._copies = []

    # -- policy -------------------------------------------------------------------
    def form_at(self, epoch):
        """Form every layer has at ``epoch``: ``"lowrank"``, ``"full"`` or ``"adapter"``."""
        epoch = _check_count(epoch, self.unit, allow_none=False)
        if self.inflate_epoch is not None and epoch < self.inflate_epoch:
            return "lowrank"
        if self.deflate_epoch is not None and epoch >= self.deflate_epoch:
            return "adapter"
        return "full"

    def _switch_due(self, target):
        """Whether a layer is not in ``target`` form (:meth:`form_at`), so :meth:`step` would switch it."""
        return any(layer.form != target for _, layer in self._layers)

    @property
    def layers(self):
        """List of (name, layer) the scheduler manages."""
        return list(self._layers)

    def forms(self):
        """Dict name → current form."""
        return {name: layer.form for name, layer in self._layers}

    def _claim(self):
        """Register the scheduler over its layers, at construction and in a copy (:class:`_Claiming`): its
        optimizer follows a model load that switches one, and it takes them from any other
        DynamicRankScheduler."""
        manage([layer for _, layer in self._layers], self.optimizer, self.model)
        for _, layer in self._layers:
            _OWNERS[layer] = weakref.ref(self)

    def _check_owner(self):
        """ValueError naming the first layer a DynamicRankScheduler built or copied after this one manages (one
        still alive); a layer no live scheduler holds is this one's again."""
        for name, layer in self._layers:
            owner = _OWNERS.get(layer)
            owner = owner() if owner is not None else None
            if owner is not None and owner is not self:
                gc.collect()            # one the user let go of, kept only by a reference cycle, claims nothing
                owner = _OWNERS[layer]()
            if owner is None:
                _check_other_kind([(name, layer)], growing=False)    # one built while a newer scheduler held it
                _OWNERS[layer] = weakref.ref(self)
            elif owner is not self:
                newer = "a copy made" if getattr(owner, "_copied", False) else "built over it"
                raise ValueError(f"layer {name!r} is managed by another DynamicRankScheduler, {newer} after this "
                                 f"one: a layer can be managed by one scheduler (two switch it back and forth, "
                                 f"dropping its optimizer state each time); step the newer scheduler, or build "
                                 f"the schedulers of one model over disjoint parts of it")

    def _check_model_layers(self):
        """ValueError where the model's dynrank layers are no longer those this scheduler was built over (see
        :func:`_check_layers_held`: a layer only renamed is the same layer)."""
        _check_layers_held(form_layers(self.model), self._layers, type(self).__name__, "dynrank", "switches")

    def _deflate_rank_for(self, name, layer, spec=_OWN):
        spec = self.deflate_rank if spec is _OWN else spec
        if isinstance(spec, dict):
            spec = spec.get(name)
        if spec is None:
            return layer.rank
        check_deflate_rank_value(spec)
        return int(spec) if isinstance(spec, numbers.Integral) else layer.rank_for_ratio(spec)

    def _check_deflate_rank(self, spec):
        """``spec`` validated against every layer, as plain Python (a dict copied; a numpy int or float, a
        dict's values too, made an int or a float, so that ``state_dict()`` loads with
        ``torch.load(weights_only=True)`` and goes into JSON); raises TypeError/ValueError."""
        if isinstance(spec, Mapping):
            check_layer_names(spec, [name for name, _ in self._layers], "deflate_rank")
            spec = dict(spec)
        for name, layer in self._layers:
            try:
                layer._check_rank(self._deflate_rank_for(name, layer, spec))
            except (TypeError, ValueError) as e:
                raise type(e)(f"deflate_rank for layer {name!r}: {e}") from None
        if isinstance(spec, dict):
            return {str(name): _plain(value) for name, value in spec.items()}
        return _plain(spec)

    # -- callbacks --------------------------------------------------------------------
    def add_callback(self, fn):
        """Call ``fn(event)`` after every :meth:`step`, or load, that changed forms; returns ``fn``.

        ``event = {"epoch": int | None, "step": int | None,
        "changes": [(name, old_form, new_form), ...]}`` (``"step"`` is set when
        ``unit="step"``, ``"epoch"`` otherwise).

        A loaded event comes from :meth:`load_state_dict` (or
        :func:`~dynrank.checkpoint.load_training_state`) bringing layers to
        their saved forms: it has ``"loaded": True`` besides, the saved last
        epoch (None if the saved run had not stepped) and the changes the load
        made.  It is no switch of the schedule (the saved run had that one; a
        :class:`~dynrank.RankMonitor` records none), but the layers hold new
        parameters, on which a callback registers its tensor hooks again.
        From :meth:`load_state_dict` it comes before the model's and the
        optimizer's values are loaded (read no weight there); from
        ``load_training_state``, once all three parts have.  A model loaded on its own (``model.load_state_dict``
        without the scheduler) replaces parameters with no event; register
        such hooks after loading it.

        Callbacks run in the order added; one that raises does not keep the
        later ones from the event, and :meth:`step` or :meth:`load_state_dict`
        raises the first error once they have all run, its switches done
        (as does :func:`~dynrank.checkpoint.load_training_state`, the whole
        checkpoint loaded).
        """
        if not callable(fn):
            raise TypeError(f"callback must be callable, got {type(fn).__name__}")
        self._callbacks.append(fn)
        return fn

    def remove_callback(self, fn):
        """Stop calling ``fn``; ValueError if it was not added."""
        if fn not in self._callbacks:
            raise ValueError(f"callback {fn!r} was not added to this scheduler")
        self._callbacks.remove(fn)

    # -- copies of the model --------------------------------------------------------------
    def add_model_copy(self, model_copy):
        """Switch ``model_copy`` (an EMA or SWA copy of the model) with the model from now on; returns it.

        An averaged copy (``torch.optim.swa_utils.AveragedModel``, or a
        ``copy.deepcopy`` of the model updated by hand) pairs its parameters
        with the model's by position, and a switch changes the model's
        parameter list: its updates then fail on a shape mismatch or, where
        shapes happen to agree, silently average the wrong tensors.  A copy
        given here changes form with the model, at the same :meth:`step`:
        inflate merges the copy's averaged factors into its dense weight (its
        function is kept); deflate freezes the copy's dense weight and starts
        its factors as the model's (no random numbers are drawn).
        :meth:`step` checks every copy's layers against the model's first.
        The scheduler holds the copy until :meth:`remove_model_copy`.

        Checkpoints: save ``model_copy.state_dict()`` beside :func:`~dynrank.checkpoint.training_state`;
        :meth:`load_state_dict` leaves copies alone, and loading the copy's
        own state dict gives its layers the saved forms.

        Args:
            model_copy: an ``nn.Module`` holding the model's dynrank layers under
                the same names (an ``AveragedModel`` is looked into), in the
                same forms and ranks, with parameters of its own.

        Raises:
            TypeError: not an ``nn.Module``.
            ValueError: the model itself, a copy already added, one whose
                layers differ from the model's, or one holding a
                DistributedDataParallel (under DDP, copy the module:
                ``AveragedModel(ddp.module)``, updated with ``update_parameters(ddp)``).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            >>> from dynrank import DynamicRankScheduler, convert_model
            >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
            >>> _ = convert_model(model, rank_ratio=0.5)
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> scheduler = DynamicRankScheduler(model, optimizer, inflate_epoch=1, deflate_epoch=2)
            >>> ema = scheduler.add_model_copy(AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99)))
            >>> _ = scheduler.step(1)
            >>> model[0].form, ema.module[0].form
            ('full', 'full')
        """
        layers = check_new_copy(model_copy, self._copies, self._layers)
        self._copies.append((model_copy, layers))
        return model_copy

    def remove_model_copy(self, model_copy):
        """Stop switching ``model_copy``, a copy given to :meth:`add_model_copy` (the object it returned).

        The scheduler lets go of the copy: from the next :meth:`step` on it is
        neither checked nor switched, and it keeps the forms it has.  Drop an
        EMA or SWA copy here when replacing it (a fresh EMA per phase), else
        the scheduler keeps it alive and switches it for the rest of the run.

        Raises:
            ValueError: ``model_copy`` was not added to this scheduler (or was removed already).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from torch.optim.swa_utils import AveragedModel
            >>> from dynrank import DynamicRankScheduler, convert_model
            >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
            >>> _ = convert_model(model, rank_ratio=0.5)
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> scheduler = DynamicRankScheduler(model, optimizer, inflate_epoch=1, deflate_epoch=2)
            >>> swa = scheduler.add_model_copy(AveragedModel(model))
            >>> scheduler.remove_model_copy(swa)
            >>> _ = scheduler.step(1)
            >>> model[0].form, swa.module[0].form
            ('full', 'lowrank')
        """
        remove_copy(model_copy, self._copies)

    # -- stepping ------------------------------------------------------------------------
    def step(self, epoch=None):
        """Perform the form changes due at ``epoch`` (call at the start of each epoch).

        With ``optimizer_state="fresh"``, a call that changes a form then clears the optimizer's state
        (before the callbacks run).

        With ``sync_ranks``, every rank of the process group must pass the same epoch: for
        ``unit="epoch"`` the ranks compare theirs first (one all_gather of an int) and all raise
        where they differ, since a rank that switched alone would re-wrap DDP while the others do not,
        and the run would hang or die inside the backend.  For ``unit="step"`` nothing is compared
        (a collective at every training step would cost a host sync each): the ranks must agree on
        the count themselves.

        Args:
            epoch: the epoch (or step, with ``unit="step"``) about to run;
                default: one after the last call (0 on the first).

        Returns:
            list of (module name, old form, new form) for the layers that changed
            (empty if none; e.g. when called twice for one epoch).

        Raises:
            TypeError: a non-int epoch.
            ValueError: ranks of the process group that passed different epochs
                (``sync_ranks`` and ``unit="epoch"``; raised on every rank, naming
                this rank's epoch and the range of the others'), a negative epoch,
                one past ``epochs``, one earlier than the last call's, a layer
                whose form cannot reach the form the
                epoch requires (a full/adapter layer before I), dynrank
                layers added to the model or removed from it
                since the scheduler was built (checked where a switch is due;
                build a new scheduler), a layer due
                to switch whose weight or factors hold NaN/inf, a model copy
                whose layers no longer match the model's, or a layer that a
                scheduler built or copied after this one manages (once that one is gone,
                one a live IncrementalRankScheduler built meanwhile manages).
                Every check runs before the first layer switches, so a failed
                call changes nothing.
            RuntimeError: a layer due to switch whose weight or a factor is
                reparametrized (``torch.nn.utils.parametrize``; checked with the
                others, before any switch).
            Exception: the first one a callback raised (see :meth:`add_callback`).
        """
        check_not_unconverted(self._layers, type(self).__name__)
        self._check_owner()
        if epoch is None:
            epoch = 0 if self.last_epoch is None else self.last_epoch + 1
        epoch = _check_count(epoch, self.unit, allow_none=False)
        if self.sync_ranks and self.unit == "epoch":
            # Before the checks that read the epoch: a rank refusing its epoch alone would leave the others
            # waiting in the collective.
            _check_same_count(epoch, self.unit, self._layers, group=self.process_group)
        if self.epochs is not None and epoch >= self.epochs:
            raise ValueError(f"{self.unit} must be in [0, {self.epochs}), got {epoch}")
        if self.last_epoch is not None and epoch < self.last_epoch:
            raise ValueError(f"{self.unit}s must not go backwards: got {epoch} after {self.last_epoch}; "
                             f"to resume, build a new scheduler and call load_state_dict")
        target = self.form_at(epoch)
        if self._switch_due(target):
            # Only where a switch is due: a step that switches nothing acts on no layer, and walking the whole
            # model costs about as much as such a step does.
            self._check_model_layers()
        for model_copy, layers in self._copies:
            check_copy(model_copy, layers, self._layers)
        zero_filled = []
        changes = self._bring_to({name: target for name, _ in self._layers}, carry=None,
                                 finite=f"not switching any layer at {self.unit} {epoch}", follow=True,
                                 zero_filled=zero_filled)
        if changes and self.optimizer_state == "fresh":
            clear_state(self.optimizer)
            zero_filled = []             # no buffer left: each parameter's first step is a first step
        self.last_epoch = epoch
        # The callbacks first: under warnings-as-errors (pytest -W error) a warning raised before them would
        # keep them from a switch already made, and stepping again switches nothing.  A callback that raises
        # skips the warnings, so its own error is the one seen.
        if changes:
            call_back(self._callbacks, self._event(epoch, changes))
        self._warn_frozen(changes)
        warn_dampened(zero_filled, "at this switch", "optimizer_state='fresh'")
        return changes

    def _warn_frozen(self, changes):
        """Warn once per layer that switched while frozen: it stays frozen in its new form (a deflate gives
        it frozen factors), which a user who froze a backbone to train adapters on it may not expect."""
        layers = dict(self._layers)
        frozen = [name for name, _, _ in changes
                  if not layers[name]._trains() and name not in self._warned_frozen]
        if frozen:
            self._warned_frozen.update(frozen)
            warnings.warn(f"layers {', '.join(map(repr, frozen))} switched while frozen (no parameter but the bias "
                          f"requires grad) and stay frozen in their new form; an optimizer that held their old "
                          f"parameters holds the new ones in their place (W_f aside), so requires_grad_() on "
                          f"them trains them (on the layers' factors after the deflate, to train adapters on a "
                          f"frozen base); one that did not hold them must be given them "
                          f"(optimizer.add_param_group)", stacklevel=3)

    def _path(self, name, old, new):
        paths = {("lowrank", "full"): ("inflate",), ("lowrank", "adapter"): ("inflate", "deflate"),
                 ("full", "adapter"): ("deflate",), ("adapter", "full"): ("inflate",)}
        if (old, new) not in paths:
            raise ValueError(f"layer {name!r} is in {old} form and cannot be brought to {new} form "
                             f"(a layer never returns to lowrank); check inflate/deflate epochs and the "
                             f"form the model was converted to")
        return paths[(old, new)]

    @outside_inference_mode
    def _bring_to(self, targets, carry, ranks=None, init=None, finite=None, follow=False, zero_filled=None):
        """Switch every layer to ``targets[name]`` (with ``follow``, the model copies' layers too).  All plans
        are made (and, with ``finite`` set, every switching layer checked for NaN/inf) before the first switch.
        ``zero_filled``: a list given the dampening of each parameter fused SGD now steps on a zero momentum
        buffer (:func:`~dynrank._optim.replace_params`)."""
        plans = []
        for name, layer in self._layers:
            old, new = layer.form, targets[name]
            if old != new:
                plans.append((name, layer, old, new, self._path(name, old, new)))
        switching = [(name, layer) for name, layer, *_ in plans]
        check_switchable(switching)
        if finite is not None:
            check_finite(switching, finite)
        changes, replaced = [], False
        for name, layer, old, new, ops in plans:
            for op in ops:
                rank = None if op == "inflate" else (
                    ranks[name] if ranks is not None else self._deflate_rank_for(name, layer))
                copies = [layers[name] for _, layers in self._copies] if follow else []
                replaced |= self._transition(layer, op, rank, carry, init, copies, zero_filled)
            changes.append((name, old, new))
        if replaced:
            _retire_stale(self.model, "a DynamicRankScheduler form change")
        return changes

    def _transition(self, layer, op, rank, carry, init=None, copies=(), zero_filled=None):
        if carry is None:
            carry = self.optimizer_state == "carry"
        init = self.deflate_init if init is None else init
        before = params_before(layer)
        old_factors = dict(layer.factors())
        old_weight = getattr(layer, layer.weight_name)
        if op == "inflate":
            layer.inflate()
        else:
            layer.deflate(rank=rank, init=init)
        removed, added = switched_params(layer, before)
        if op == "deflate" and self.sync_ranks:
            from .distributed import broadcast_params
            # Every fresh factor, a frozen layer's too (it may be unfrozen for LoRA later).
            broadcast_params(list(layer.factors().values()), group=self.process_group)
        for copy_layer in copies:
            _follow(copy_layer, layer, op, init)
        after_ids = {id(p) for p in _trainable(layer)}
        for p in before.trainable:
            if id(p) not in after_ids:
                p.grad = None
        states = None
        if carry and op == "inflate":
            weight = getattr(layer, layer.weight_name)
            states = {weight: pushforward_state(self.optimizer, layer, old_factors, weight)}
        elif carry:
            states = pullback_state(self.optimizer, layer, old_weight, layer.factors())
        replace_params(self.optimizer, removed, added, states, owner=layer, old_names=before.names,
                       zero_filled=zero_filled)
        return bool(removed or added)

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self):
        """Scheduler state: policy, last epoch, and each layer's form, rank, ``alpha``, dense weight shape,
        decomposition (a conv's) and the rank it last had in lowrank form (None: never lowrank in this
        process), which a load gives the layer back, so that :func:`~dynrank.cost.comp_ratio` counts a
        resumed run's lowrank epochs at the saved run's rank.

        Save it with the model's and the optimizer's state dicts; restore with
        :meth:`load_state_dict`, before or after loading those two (or use
        :func:`load_training_state`): whichever of the scheduler and the model
        loads first switches the layers and edits the optimizer in place.  The
        optimizer's own state must load after the model: it is matched to the
        parameters by position, and a switch drops the state of the parameters
        it replaces.
        """
        return {"unit": self.unit, "last_epoch": self.last_epoch, "inflate_epoch": self.inflate_epoch,
                "deflate_epoch": self.deflate_epoch, "epochs": self.epochs,
                "deflate_init": self.deflate_init, "optimizer_state": self.optimizer_state,
                "deflate_rank": dict(self.deflate_rank) if isinstance(self.deflate_rank, dict) else self.deflate_rank,
                "forms": {name: layer.form for name, layer in self._layers},
                "ranks": {name: layer.rank for name, layer in self._layers},
                "lowrank_ranks": {name: layer._lowrank_rank for name, layer in self._layers},
                **_layer_record(self._layers)}

    _STATE_KEYS = ("unit", "last_epoch", "inflate_epoch", "deflate_epoch", "forms", "ranks")
    # A state saved before "alphas", "shapes" and "decompositions" were kept loads with those unchecked, and one
    # saved before "lowrank_ranks" leaves the layers' own.
    # Each layer's entries besides its form and rank (the Trainer callback passes them through too).
    _LAYER_RECORD = RECORD_KEYS + ("lowrank_ranks",)
    _OPTIONAL_STATE_KEYS = ("epochs", "deflate_init", "optimizer_state", "deflate_rank") + _LAYER_RECORD
    _LAYER_KEYS = ("forms", "ranks") + _LAYER_RECORD

    def _checked_state(self, state_dict):
        """The policy settings of ``state_dict``, validated as the constructor does, and every layer's
        form, rank, alpha, shape and decomposition checked against this model; raises before anything is
        changed."""
        check_not_unconverted(self._layers, type(self).__name__)
        self._check_owner()
        self._check_model_layers()
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict from DynamicRankScheduler.state_dict(), "
                            f"got {type(state_dict).__name__}")
        missing = [k for k in self._STATE_KEYS if k not in state_dict]
        if missing:
            raise ValueError(f"not a DynamicRankScheduler state dict: missing {', '.join(missing)}")
        known = self._STATE_KEYS + self._OPTIONAL_STATE_KEYS
        unknown = sorted((k for k in state_dict if k not in known), key=repr)
        if unknown:
            raise ValueError(f"not a DynamicRankScheduler state dict: unknown keys {unknown}; "
                             f"expected {', '.join(known)}")
        names = [name for name, _ in self._layers]
        layers = dict(self._layers)
        _check_saved_record(self._layers, state_dict, "DynamicRankScheduler")
        shapes = state_dict.get("shapes")
        try:
            settings = {key: state_dict.get(key, getattr(self, key)) for key in known
                        if key not in self._LAYER_KEYS + ("last_epoch",)}
            (settings["unit"], settings["inflate_epoch"], settings["deflate_epoch"],
             settings["epochs"]) = _check_schedule(settings["unit"], settings["inflate_epoch"],
                                                   settings["deflate_epoch"], settings["epochs"])
            settings["deflate_init"], settings["optimizer_state"] = _check_choices(
                settings["deflate_init"], settings["optimizer_state"])
            settings["deflate_rank"] = self._check_deflate_rank(settings["deflate_rank"])
            last = _check_count(state_dict["last_epoch"], "last_epoch")
            if last is not None and settings["epochs"] is not None and last >= settings["epochs"]:
                raise ValueError(f"last_epoch must be in [0, epochs={settings['epochs']}), got {last}")
            settings["last_epoch"] = last
            forms, ranks = state_dict["forms"], state_dict["ranks"]
            alphas, lowrank_ranks = state_dict.get("alphas"), state_dict.get("lowrank_ranks")
            for what in ("forms", "ranks", "alphas", "lowrank_ranks"):
                if what in state_dict:
                    check_same_layers(state_dict[what], names, what)
            checked, lowrank_checked = {}, {}
            for name in names:
                _check_saved_form(forms, name)
                try:
                    # an int, or a tuple for Tucker-like convs (a saved list comes back as the tuple)
                    checked[name] = layers[name]._check_rank(ranks[name])
                except (TypeError, ValueError) as e:
                    raise type(e)(f"ranks[{name!r}] is not a valid rank of layer {name!r}: {e}") from None
                _check_saved_alpha(alphas, name)
                if lowrank_ranks is not None:
                    try:
                        lowrank_checked[name] = (None if lowrank_ranks[name] is None
                                                 else layers[name]._check_rank(lowrank_ranks[name]))
                    except (TypeError, ValueError) as e:
                        raise type(e)(f"lowrank_ranks[{name!r}] is not a valid rank of layer {name!r} or None: "
                                      f"{e}") from None
        except (TypeError, ValueError) as e:
            raise type(e)(f"invalid DynamicRankScheduler state dict: {e}") from None
        spec = settings["deflate_rank"]
        for name, layer in self._layers:
            rank, form = checked[name], forms[name]
            # Compared as saved: a Tucker-like conv reads an int r as (r, r), a rank only another kind of layer
            # saves (a list from JSON is the tuple).
            saved_rank = rank if isinstance(ranks[name], (list, tuple)) else ranks[name]
            if layer.form != form:
                self._path(name, layer.form, form)          # raises if the saved form cannot be reached
            # The switches keep the rank except a deflate, which takes the saved one.  In full form the rank
            # is the one the next deflate takes where deflate_rank gives the layer none: a model converted at
            # another rank would deflate differently from the saved run, so it is refused too.  With a
            # deflate_rank for the layer its full-form rank is never used (a run rolled back from its adapters,
            # of that rank, to a full-form checkpoint).
            # Nor where the saved schedule never deflates (a run that ends in full form).
            own_rank = (spec.get(name) if isinstance(spec, dict) else spec) is None and \
                settings["deflate_epoch"] is not None
            if layer.rank != saved_rank and (form == "lowrank" or (form == "full" and own_rank)
                                             or (form == "adapter" and layer.form == "adapter")):
                how = ("build the scheduler with the saved deflate_rank, or deflate the layer to that rank"
                       if form == "adapter" else "convert the model with the same rank_ratio")
                if shapes is None:                  # a state saved without shapes cannot tell the two apart
                    how += ", or the model has other layer sizes than the saved run's"
                if isinstance(saved_rank, tuple) != isinstance(layer.rank, tuple):
                    how += ", or with the saved run's decomposition"
                raise ValueError(f"layer {name!r} has rank {layer.rank} but the checkpoint has {saved_rank}"
                                 f"{' (the rank its next deflate takes)' if form == 'full' else ''}; {how}")
            # The scale alpha / rank multiplies the loaded factors (lowrank, adapter) or the adapters the next
            # deflate makes: another alpha computes another function, or trains other adapters.
            if alphas is not None and alphas[name] != layer.alpha and (
                    form != "full" or settings["deflate_epoch"] is not None):
                raise _alpha_mismatch(name, layer, alphas[name])
        # A layer the load switches must be switchable (the RuntimeError _bring_to raises), before the
        # settings are applied.
        check_switchable([(name, layer) for name, layer in self._layers if layer.form != forms[name]])
        return settings, dict(forms), checked, lowrank_checked

    def load_state_dict(self, state_dict):
        """Restore the policy and bring every layer to its saved form and rank.

        The optimizer goes through the same in-place edits as in the saved run,
        so its parameter order matches the saved optimizer state.  Order::

            scheduler.load_state_dict(ckpt["scheduler"])   # forms + optimizer param groups
            model.load_state_dict(ckpt["model"])           # values (no reallocation now)
            optimizer.load_state_dict(ckpt["optimizer"])   # state, matched by position

        The model may also load first (Accelerate's ``load_state`` loads the
        scheduler last): a model load that changes a layer this scheduler
        manages edits its optimizer the same way, and this call then finds
        every layer in its saved form.

        New parameters are only allocated here (values come from the model's
        state dict: a deflate here draws zero-output adapters whatever
        ``deflate_init``); the global RNG (the CPU's, and that of each CUDA
        device holding a layer) is left untouched, so a restored RNG state
        stays valid whichever order it is restored in.  The whole state
        dict is checked before anything changes: a call that raises leaves the
        layers, the optimizer and the scheduler as they were (but for an error
        a callback raised once the load was done).  Model copies
        (:meth:`add_model_copy`) are left alone: load their own state dicts.

        Each layer gets back the rank it last had in lowrank form in the saved
        run (None where it never was), which the cost of the lowrank epochs
        reads (:func:`~dynrank.cost.comp_ratio`), also in a model converted at
        another ``rank_ratio``; a state saved before it was kept leaves the
        layer's own.

        A load that changes a layer's form calls the callbacks with a loaded
        event (``"loaded": True``, see :meth:`add_callback`): the layer's
        parameters are new, and a callback registers its tensor hooks on them.

        Raises:
            TypeError: not a dict, or a value of the wrong type (e.g. a float
                epoch or rank).
            ValueError: missing or unknown keys, settings the constructor would
                reject, the saved layers differ from this model's, a rank out
                of a layer's range, or a saved form/rank that cannot be reached
                from the current one.  A layer saved in full form is held to
                its saved rank only where the next deflate takes it (the saved
                ``deflate_rank`` gives the layer none); else it keeps its own.
                A layer whose dense weight shape differs from the saved one
                (a model of other layer sizes; checked first), or whose
                ``alpha`` does (in full form only where the saved schedule
                deflates), or whose decomposition does (a conv, in every
                form); a state saved before shapes, alphas and
                decompositions were kept loads unchecked for them.  Dynrank layers added to the
                model or removed since this scheduler was built.
                A layer that a scheduler built or copied after this one manages (once that one
                is gone, one a live IncrementalRankScheduler built meanwhile manages).
            RuntimeError: a layer the load switches to another form has a
                reparametrized weight or factor (``torch.nn.utils.parametrize``).
            Exception: the first one a callback raised, the load done.
        """
        self._load_checked(self._checked_state(state_dict))

    def _load_checked(self, checked, notify=True):
        """Apply what :meth:`_checked_state` returned (nothing left to check); returns the loaded event (None
        where no form changed), which the callbacks get now, or, ``notify=False``, from the caller
        (:func:`~dynrank.checkpoint.load_training_state`, once everything has loaded)."""
        settings, forms, ranks, lowrank_ranks = checked
        last_epoch = settings.pop("last_epoch")
        for key, value in settings.items():
            setattr(self, key, value)
        # A deflate draws its fresh factors on the layer's device: fork that device's generator too.
        with fork_layer_rngs(self._layers):
            changes = self._bring_to(forms, carry=False, ranks=ranks, init="zeros")
        # The saved run's lowrank rank, which the cost of its lowrank epochs reads: a model converted at another
        # rank_ratio (an adapter-form checkpoint loads into it) knows its own conversion's.
        for name, layer in self._layers:
            if name in lowrank_ranks:
                layer._lowrank_rank = lowrank_ranks[name]
        self.last_epoch = last_epoch
        # The layers have new parameters: hooks registered on them in a callback must be registered again.
        event = self._event(last_epoch, changes, loaded=True) if changes else None
        if event and notify:
            call_back(self._callbacks, event)
        return event

    def _event(self, epoch, changes, loaded=False):
        """What the callbacks get (see :meth:`add_callback`)."""
        event = {"epoch": epoch if self.unit == "epoch" else None,
                 "step": epoch if self.unit == "step" else None, "changes": list(changes)}
        if loaded:
            event["loaded"] = True
        return event
