"""DynamicRankScheduler: the paper's Algorithm 1 on the user's own model and training loop.

Every dynrank layer of the model goes lowrank → full at ``inflate_epoch`` (I)
and full → adapter at ``deflate_epoch`` (D).  The optimizer is edited in place
at each change (see :mod:`dynrank._optim`), so the loop, the optimizer and any
LR scheduler attached to it stay as the user built them::

    for epoch in range(epochs):
        scheduler.step(epoch)          # forms due at this epoch, optimizer follows
        train_one_epoch(model, optimizer)
        lr_scheduler.step()
"""

import numbers

import torch
from torch import nn

from ._forms import DEFLATE_INITS, FormLayer
from ._optim import pullback_state, pushforward_state, replace_params

__all__ = ["DynamicRankScheduler", "OPTIMIZER_STATES", "form_layers", "training_state",
           "load_training_state"]

OPTIMIZER_STATES = ("reset", "carry")
UNITS = ("epoch", "step")
# Chosen by benchmarks/optimizer_state_compare.py (3 seeds, MLP and CNN, SGD and
# AdamW): with SGD momentum the two tie within seed noise; with AdamW "carry"
# trained worse on the MLP in every seed (a mis-estimated second moment lingers
# for ~1/(1-beta2) steps), so the authors' "reset" stays the default.
DEFAULT_OPTIMIZER_STATE = "reset"


def unwrap_model(model):
    """The user's module inside DistributedDataParallel / DataParallel wrappers."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model


def form_layers(model):
    """List of (qualified name, layer) for every dynrank layer (FormLayer) in ``model``."""
    return [(name, m) for name, m in unwrap_model(model).named_modules() if isinstance(m, FormLayer)]


def _check_count(value, what, allow_none=True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__} ({value!r})")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)


def _trainable(layer):
    return [p for p in layer.parameters() if p.requires_grad]


class DynamicRankScheduler:
    """Switch every dynrank layer lowrank → full → adapter at epoch (or step) boundaries.

    The form each epoch requires (paper Alg. 1): ``lowrank`` before I, ``full``
    in [I, D), ``adapter`` from D on.  ``inflate_epoch=None`` starts full (the
    fine-tuning preset: pretrained model, deflate at D); ``deflate_epoch=None``
    never deflates.  :meth:`step` brings every layer to the form its epoch
    requires — also after skipped epochs (lowrank → adapter runs inflate then
    deflate) — and is idempotent for one epoch.

    Optimizer: after a change, the layer's removed parameters and their state
    leave the optimizer and the new trainable ones take their place in the same
    param group (same hyperparameters), in place; LR schedulers keep working.
    A layer the optimizer does not hold is left out of it.  Parameters that
    stay (biases, BN) are untouched.

    ``optimizer_state``:
        ``"reset"`` (default): new parameters start with empty state (the
        authors: a fresh SGD per phase).  ``"carry"``: the new parametrization starts
        from the state the old one implies — on inflate, momentum / ``exp_avg``
        m_W = s·(m_A·Bᵀ + A·m_Bᵀ) and second moments
        v_W = s²·(v_A·(B∘B)ᵀ + (A∘A)·v_Bᵀ); on deflate m_A = s·m_W·B,
        v_A = s²·v_W·(B∘B), and a zero-output factor (B when A = 0) starts
        empty; ``step`` counts are kept.  For SGD momentum this is exact to first
        order; Adam's second moment can only be approximated, and measured
        (benchmarks/optimizer_state_compare.py) "carry" ties "reset" with SGD
        and trains worse with AdamW — hence the default.  See :mod:`dynrank._optim`.

    Args:
        model: the model (or a DistributedDataParallel wrapping it) holding dynrank layers.
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters.
        inflate_epoch: I, epoch (or step) at which lowrank layers inflate; None: start full.
        deflate_epoch: D > I, epoch (or step) at which full layers deflate; None: never.
        deflate_init: ``"zeros"`` (function-preserving, the authors' choice),
            ``"random"`` or ``"svd"``; see ``FormLayer.deflate``.
        optimizer_state: ``"reset"`` or ``"carry"``.
        deflate_rank: adapter rank: None (each layer's rank), an int, a float in
            (0, 1] (a rank ratio, each layer's ``rank_for_ratio``),
            or a dict name → int/float/None.
        unit: ``"epoch"`` or ``"step"``: what I, D and :meth:`step`'s argument count.
        epochs: optional total number of epochs (steps); I and D must lie in
            [0, epochs] and :meth:`step` rejects later epochs.
        sync_ranks: broadcast fresh adapter factors from rank 0 after a deflate
            so all data-parallel ranks stay identical; default: when ``model``
            is a DistributedDataParallel.  Every rank must call :meth:`step`.
        process_group: group for that broadcast (default: the DDP wrapper's, or WORLD).

    Raises:
        TypeError: a non-optimizer, non-int epochs.
        ValueError: negative epochs, D ≤ I, both None, unknown options, or a
            model with no dynrank layers.

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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
        self.unit = unit
        self.inflate_epoch = _check_count(inflate_epoch, f"inflate_{unit}")
        self.deflate_epoch = _check_count(deflate_epoch, f"deflate_{unit}")
        self.epochs = _check_count(epochs, "epochs")
        self._check_policy()
        if deflate_init not in DEFLATE_INITS:
            raise ValueError(f"deflate_init must be one of {', '.join(DEFLATE_INITS)}, got {deflate_init!r}")
        if optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer_state must be one of {', '.join(OPTIMIZER_STATES)}, "
                             f"got {optimizer_state!r}")
        self.deflate_init = deflate_init
        self.optimizer_state = optimizer_state
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self._layers = form_layers(self.model)
        if not self._layers:
            raise ValueError("model has no dynrank layers (FusedLowRankLinear, LowRankConv2d): "
                             "convert it first with dynrank.convert_model(model)")
        self.deflate_rank = deflate_rank
        for name, layer in self._layers:
            layer._check_rank(self._deflate_rank_for(name, layer))  # a bad deflate_rank fails now, not at D
        from torch.nn.parallel import DistributedDataParallel
        is_ddp = isinstance(model, DistributedDataParallel)
        self.sync_ranks = is_ddp if sync_ranks is None else bool(sync_ranks)
        if process_group is None and is_ddp:
            process_group = model.process_group
        self.process_group = process_group
        self.last_epoch = None
        self._callbacks = []

    # -- policy -------------------------------------------------------------------
    def _check_policy(self):
        inflate, deflate, unit = self.inflate_epoch, self.deflate_epoch, self.unit
        if inflate is None and deflate is None:
            raise ValueError(f"give inflate_{unit} and/or deflate_{unit}; both are None")
        if inflate is not None and deflate is not None and deflate <= inflate:
            raise ValueError(f"deflate_{unit} must be greater than inflate_{unit} (the full-rank phase is "
                             f"[I, D)), got I={inflate}, D={deflate}")
        if self.epochs is not None:
            for what, value in ((f"inflate_{unit}", inflate), (f"deflate_{unit}", deflate)):
                if value is not None and value > self.epochs:
                    raise ValueError(f"{what} must be in [0, epochs={self.epochs}], got {value}")

    def form_at(self, epoch):
        """Form every layer has at ``epoch``: ``"lowrank"``, ``"full"`` or ``"adapter"``."""
        epoch = _check_count(epoch, self.unit, allow_none=False)
        if self.inflate_epoch is not None and epoch < self.inflate_epoch:
            return "lowrank"
        if self.deflate_epoch is not None and epoch >= self.deflate_epoch:
            return "adapter"
        return "full"

    @property
    def layers(self):
        """List of (name, layer) the scheduler manages."""
        return list(self._layers)

    def forms(self):
        """Dict name → current form."""
        return {name: layer.form for name, layer in self._layers}

    def _deflate_rank_for(self, name, layer):
        spec = self.deflate_rank
        if isinstance(spec, dict):
            spec = spec.get(name)
        if spec is None:
            return layer.rank
        if isinstance(spec, bool):
            raise TypeError(f"deflate_rank must be an int, a float ratio, a dict or None, got {spec!r}")
        if isinstance(spec, numbers.Integral):
            return int(spec)
        if isinstance(spec, numbers.Real):
            if not 0.0 < spec <= 1.0:
                raise ValueError(f"a float deflate_rank is a ratio in (0, 1], got {spec}")
            return layer.rank_for_ratio(spec)
        raise TypeError(f"deflate_rank must be an int, a float ratio, a dict or None, got {type(spec).__name__}")

    # -- callbacks --------------------------------------------------------------------
    def add_callback(self, fn):
        """Call ``fn(event)`` after every :meth:`step` that changed forms; returns ``fn``.

        ``event = {"epoch": int | None, "step": int | None,
        "changes": [(name, old_form, new_form), ...]}`` (``"step"`` is set when
        ``unit="step"``, ``"epoch"`` otherwise).
        """
        if not callable(fn):
            raise TypeError(f"callback must be callable, got {type(fn).__name__}")
        self._callbacks.append(fn)
        return fn

    def remove_callback(self, fn):
        """Stop calling ``fn``."""
        self._callbacks.remove(fn)

    # -- stepping ------------------------------------------------------------------------
    def step(self, epoch=None):
        """Perform the form changes due at ``epoch`` (call at the start of each epoch).

        Args:
            epoch: the epoch (or step, with ``unit="step"``) about to run;
                default: one after the last call (0 on the first).

        Returns:
            list of (module name, old form, new form) for the layers that changed
            (empty if none; e.g. when called twice for one epoch).

        Raises:
            ValueError: a negative epoch, one past ``epochs``, one earlier than
                the last call's, or a layer whose form cannot reach the form the
                epoch requires (a full/adapter layer before I).
        """
        if epoch is None:
            epoch = 0 if self.last_epoch is None else self.last_epoch + 1
        epoch = _check_count(epoch, self.unit, allow_none=False)
        if self.epochs is not None and epoch >= self.epochs:
            raise ValueError(f"{self.unit} must be in [0, {self.epochs}), got {epoch}")
        if self.last_epoch is not None and epoch < self.last_epoch:
            raise ValueError(f"{self.unit}s must not go backwards: got {epoch} after {self.last_epoch}; "
                             f"to resume, build a new scheduler and call load_state_dict")
        target = self.form_at(epoch)
        changes = self._bring_to({name: target for name, _ in self._layers}, carry=None)
        self.last_epoch = epoch
        if changes:
            event = {"epoch": epoch if self.unit == "epoch" else None,
                     "step": epoch if self.unit == "step" else None, "changes": list(changes)}
            for fn in list(self._callbacks):
                fn(event)
        return changes

    def _path(self, name, old, new):
        paths = {("lowrank", "full"): ("inflate",), ("lowrank", "adapter"): ("inflate", "deflate"),
                 ("full", "adapter"): ("deflate",), ("adapter", "full"): ("inflate",)}
        if (old, new) not in paths:
            raise ValueError(f"layer {name!r} is in {old} form and cannot be brought to {new} form "
                             f"(a layer never returns to lowrank); check inflate/deflate epochs and the "
                             f"form the model was converted to")
        return paths[(old, new)]

    def _bring_to(self, targets, carry, ranks=None):
        plans = []
        for name, layer in self._layers:
            old, new = layer.form, targets[name]
            if old != new:
                plans.append((name, layer, old, new, self._path(name, old, new)))
        changes = []
        for name, layer, old, new, ops in plans:
            for op in ops:
                rank = None if op == "inflate" else (
                    ranks[name] if ranks is not None else self._deflate_rank_for(name, layer))
                self._transition(layer, op, rank, carry)
            changes.append((name, old, new))
        return changes

    def _transition(self, layer, op, rank, carry):
        if carry is None:
            carry = self.optimizer_state == "carry"
        before = _trainable(layer)
        old_factors = dict(layer.factors())
        old_weight = getattr(layer, layer.weight_name)
        if op == "inflate":
            layer.inflate()
        else:
            layer.deflate(rank=rank, init=self.deflate_init)
        after = _trainable(layer)
        before_ids, after_ids = {id(p) for p in before}, {id(p) for p in after}
        removed = [p for p in before if id(p) not in after_ids]
        added = [p for p in after if id(p) not in before_ids]
        if op == "deflate" and self.sync_ranks:
            from .distributed import broadcast_params
            broadcast_params(added, group=self.process_group)
        states = None
        if carry and op == "inflate":
            weight = getattr(layer, layer.weight_name)
            states = {weight: pushforward_state(self.optimizer, layer, old_factors, weight)}
        elif carry:
            states = pullback_state(self.optimizer, layer, old_weight, layer.factors())
        replace_params(self.optimizer, removed, added, states)

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self):
        """Scheduler state: policy, last epoch, and each layer's form and rank.

        Save it with the model's and the optimizer's state dicts; restore with
        :meth:`load_state_dict` *before* loading those two (or use
        :func:`load_training_state`, which keeps that order).
        """
        return {"unit": self.unit, "last_epoch": self.last_epoch, "inflate_epoch": self.inflate_epoch,
                "deflate_epoch": self.deflate_epoch, "epochs": self.epochs,
                "deflate_init": self.deflate_init, "optimizer_state": self.optimizer_state,
                "deflate_rank": self.deflate_rank,
                "forms": {name: layer.form for name, layer in self._layers},
                "ranks": {name: layer.rank for name, layer in self._layers}}

    def load_state_dict(self, state_dict):
        """Restore the policy and bring every layer to its saved form and rank.

        The optimizer goes through the same in-place edits as in the saved run,
        so its parameter order matches the saved optimizer state.  Order::

            scheduler.load_state_dict(ckpt["scheduler"])   # forms + optimizer param groups
            model.load_state_dict(ckpt["model"])           # values (no reallocation now)
            optimizer.load_state_dict(ckpt["optimizer"])   # state, matched by position

        New parameters are only allocated here (values come from the model's
        state dict); the global RNG is left untouched, so a restored RNG state
        stays valid whichever order it is restored in.

        Raises:
            ValueError: the saved layers differ from this model's, or a saved
                form/rank cannot be reached from the current one.
        """
        missing = [k for k in ("unit", "last_epoch", "inflate_epoch", "deflate_epoch", "forms", "ranks")
                   if k not in state_dict]
        if missing:
            raise ValueError(f"not a DynamicRankScheduler state dict: missing {', '.join(missing)}")
        names = [name for name, _ in self._layers]
        saved = list(state_dict["forms"])
        if sorted(saved) != sorted(names):
            extra, absent = sorted(set(saved) - set(names)), sorted(set(names) - set(saved))
            raise ValueError(f"saved scheduler manages other layers: only in checkpoint {extra}, "
                             f"only in this model {absent}")
        for name, layer in self._layers:
            rank, form = state_dict["ranks"][name], state_dict["forms"][name]
            if layer.form == "lowrank" and form == "lowrank" and layer.rank != rank:
                raise ValueError(f"layer {name!r} has rank {layer.rank} but the checkpoint has {rank}; "
                                 f"convert the model with the same rank_ratio")
        for key in ("unit", "inflate_epoch", "deflate_epoch", "epochs", "deflate_init", "optimizer_state",
                    "deflate_rank"):
            if key in state_dict:
                setattr(self, key, state_dict[key])
        with torch.random.fork_rng(devices=[]):
            self._bring_to(state_dict["forms"], carry=False, ranks=state_dict["ranks"])
        self.last_epoch = state_dict["last_epoch"]


def training_state(model, optimizer, scheduler, **extra):
    """Checkpoint dict: model, optimizer and scheduler state dicts plus ``extra`` items."""
    state = {"model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict()}
    state.update(extra)
    return state


def load_training_state(checkpoint, model, optimizer, scheduler):
    """Load a :func:`training_state` checkpoint into a freshly built model, optimizer and scheduler.

    Runs the three loads in the only order that works: scheduler (forms and
    optimizer param groups), model (values), optimizer (state).  Returns the
    checkpoint's extra items.

    Example:
        >>> import io
        >>> import torch
        >>> from torch import nn
        >>> from dynrank import DynamicRankScheduler, convert_model, load_training_state, training_state
        >>> def build():                                   # the same model, optimizer and schedule each time
        ...     model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
        ...     _ = convert_model(model, rank_ratio=0.5)
        ...     optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ...     return model, optimizer, DynamicRankScheduler(model, optimizer, 1, 3)
        >>> model, optimizer, scheduler = build()
        >>> _ = scheduler.step(1)                            # layer "0" inflated to full
        >>> saved = io.BytesIO()
        >>> torch.save(training_state(model, optimizer, scheduler, epoch=1), saved)
        >>> model, optimizer, scheduler = build()            # a fresh start: layer "0" is lowrank
        >>> _ = saved.seek(0)
        >>> load_training_state(torch.load(saved), model, optimizer, scheduler)
        {'epoch': 1}
        >>> model[0].form
        'full'
    """
    scheduler.load_state_dict(checkpoint["scheduler"])
    unwrap_model(model).load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return {k: v for k, v in checkpoint.items() if k not in ("model", "optimizer", "scheduler")}
