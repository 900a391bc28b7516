"""What both schedulers check of the layers they manage: who manages a layer (one DynamicRankScheduler per
layer, the newest; the two kinds refuse each other's layers), whether the model still holds the layers a
scheduler was built over, and a saved state's alphas, weight shapes and conv decompositions (and, for the
IncrementalRankScheduler, which changes no form, the forms) against the model's layers; and a copied or
unpickled scheduler's registering again (:class:`_Claiming`)."""

import gc
import numbers
import weakref

from ._checks import check_same_layers, layers_are
from ._forms import FORMS

# Layer → weak reference to the DynamicRankScheduler that manages it: the last one built (or copied,
# :class:`_Claiming`) over it.  An
# earlier one still alive refuses to step or load (two schedulers stepping the same layers on different
# schedules switched them full ↔ adapter and back every epoch, dropping their optimizer state each time).
# The newest wins rather than being refused, so a scheduler built again in the place of one still referenced
# (a notebook cell run again, the Trainer callback's second train()) works; a collected one claims nothing.
_OWNERS = weakref.WeakKeyDictionary()
# Layer → the IncrementalRankSchedulers built (or copied) over it (a WeakSet: one collected claims nothing).  A
# scheduler of either kind refuses, at construction, a layer a live one of the other kind manages (_check_other_kind).
_GROWERS = weakref.WeakKeyDictionary()


class _Claiming:
    """Base of both schedulers: a scheduler copies and pickles with its model and optimizer.

    A copy (``copy.copy``, ``copy.deepcopy``) or an unpickled scheduler (``torch.save``/``torch.load``) is
    registered as one built over the model and optimizer it holds (each class's ``_claim``): the optimizer
    follows a model load that changes a layer's form or rank (:func:`~dynrank._optim.manage`), and the copy
    claims its layers (the newest DynamicRankScheduler over a layer takes it; the two kinds refuse each
    other's).  Copied or unpickled with them (``copy.deepcopy({"model": model, "optimizer": optimizer,
    "scheduler": scheduler})``, or the same dict through ``torch.save``), its model and optimizer are the
    copies, and the copied run goes on as the original would; a shallow copy holds the same ones.  The
    registries are module-level weak tables, which no copy fills in by itself.  The attributes named in
    ``_WEAK_SETS`` (weak sets of layers) go through a copy as lists: a ``WeakSet`` does not pickle, and a
    deep copy of one would hold the original's layers, not the copy's.  The ``process_group`` (None for
    the default group, see :func:`~dynrank._checks.check_sync`) goes through as a :class:`_GroupHandle`: a
    copy holds the same group, and pickling a scheduler over another group raises a TypeError."""

    _WEAK_SETS = ()

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in self._WEAK_SETS:
            state[key] = list(state[key])
        if state.get("process_group") is not None:
            state["process_group"] = _GroupHandle(state["process_group"], type(self).__name__)
        return state

    def __setstate__(self, state):
        state = dict(state)
        for key in self._WEAK_SETS:
            state[key] = weakref.WeakSet(state[key])
        if isinstance(state.get("process_group"), _GroupHandle):
            state["process_group"] = state["process_group"].group
        self.__dict__.update(state)
        self._copied = True         # named by the refusal of a scheduler a shallow copy took the layers from
        self._claim()


class _GroupHandle:
    """A scheduler's process group (other than the default) in its copied state: a deep copy keeps the group
    itself, since a ProcessGroup is a handle to a live communicator that no copy can duplicate (the copy's
    broadcasts go to the same processes), and pickling raises a TypeError that says what to do."""

    __slots__ = ("group", "owner")

    def __init__(self, group, owner):
        self.group, self.owner = group, owner

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        raise TypeError(f"cannot pickle a {self.owner} whose process_group is not the default group: a "
                        f"ProcessGroup is a handle to a live communicator (copy.deepcopy keeps it); save "
                        f"dynrank.training_state(model, optimizer, scheduler) instead, and on resume build the "
                        f"{self.owner} with the process_group again and load_training_state into it")


# The entries _layer_record adds to both schedulers' state dicts (optional on load: states saved before them
# load unchecked for them).
RECORD_KEYS = ("alphas", "shapes", "decompositions")


def _layer_record(layers):
    """The state-dict entries a load checks a model's ``layers`` (name, layer) against: each layer's ``alpha``,
    its dense weight shape (a list, as JSON keeps it), and each conv's decomposition."""
    return {"alphas": {name: layer.alpha for name, layer in layers},
            "shapes": {name: [int(n) for n in layer._dense_shape()] for name, layer in layers},
            "decompositions": {name: _decomposition(layer) for name, layer in layers
                               if _decomposition(layer) is not None}}


def _decomposition(layer):
    """A conv layer's decomposition (``"svd"``, ``"tucker"``, ...), None for a layer without one (a linear)."""
    return getattr(layer, "decomposition", None)


def _check_saved_alpha(alphas, name):
    """TypeError unless a state dict's ``alphas[name]`` (``alphas`` None: a state saved without them) is None
    or a number."""
    if alphas is None:
        return
    value = alphas[name]
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"alphas[{name!r}] must be a number or None, got {type(value).__name__} ({value!r})")


def _check_saved_shape(shapes, name):
    """TypeError unless a state dict's ``shapes[name]`` is a list (or tuple) of ints."""
    value = shapes[name]
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in value):
        raise TypeError(f"shapes[{name!r}] must be a list of ints (the layer's dense weight shape), "
                        f"got {value!r}")


def _check_saved_form(forms, name):
    """ValueError unless a state dict's ``forms[name]`` is one of :data:`FORMS`."""
    if forms[name] not in FORMS:
        raise ValueError(f"forms[{name!r}] must be one of {', '.join(FORMS)}, got {forms[name]!r}")


def _other_kind(layer, growing):
    """A live scheduler of the other kind over ``layer``, or None: for an IncrementalRankScheduler (``growing``)
    the DynamicRankScheduler that owns it, else an IncrementalRankScheduler built over it."""
    if growing:
        owner = _OWNERS.get(layer)
        return owner() if owner is not None else None
    return next(iter(_GROWERS.get(layer, ())), None)


def _check_other_kind(layers, growing):
    """ValueError naming the layers of ``layers`` (name, layer) that a live scheduler of the other kind manages
    (see :func:`_other_kind`): an IncrementalRankScheduler grows the factors a DynamicRankScheduler's inflate
    takes away, and changes the ranks its schedule deflates to and its state holds."""
    taken = [name for name, layer in layers if _other_kind(layer, growing) is not None]
    if taken:
        gc.collect()            # one the user let go of, kept only by a reference cycle, manages nothing
        taken = [name for name, layer in layers if _other_kind(layer, growing) is not None]
    if not taken:
        return
    who, other = ("IncrementalRankScheduler", "DynamicRankScheduler")[::1 if growing else -1]
    raise ValueError(f"{layers_are(taken)} managed by a live {other}: a DynamicRankScheduler and an IncrementalRankScheduler are not meant to drive "
                     f"one model (the inflate takes away the factors the growth resizes, and the growth changes the "
                     f"ranks the schedule deflates to), as a DynamicRankCallback and an IncrementalRankCallback on "
                     f"one Trainer would; let go of the {other} first (del it, and whatever holds it), or build "
                     f"the {who} over other layers")


def _check_layers_held(now, layers, who, kind, does):
    """ValueError where ``now`` (the (name, layer) the scheduler ``who`` would manage in the model as it is) are no
    longer its ``layers``: one added since would never change, one swapped out would change outside the model.  A
    layer found under another name (a wrapper put around its block since: activation checkpointing, a compiled
    submodule) is the same layer: events and the state dict keep the name it had at construction."""
    managed = {id(layer) for _, layer in layers}
    held = {id(layer) for _, layer in now}
    if held == managed:
        return
    parts = [f"{what} {', '.join(names)}" for what, names in (
        ("added", [repr(name) for name, layer in now if id(layer) not in managed]),
        ("removed", [repr(name) for name, layer in layers if id(layer) not in held])) if names]
    raise ValueError(f"the model's {kind} layers changed since this {who} was built ({'; '.join(parts)}); a "
                     f"scheduler {does} the layers it was built over: build a new {who} over the model as it is now")


def _check_saved_shapes(layers, shapes, who):
    """ValueError naming the first of ``layers`` whose dense weight shape differs from ``shapes`` (a state dict's of
    the scheduler ``who``), or TypeError/ValueError for ``shapes`` that are not a dict layer name → shape of
    these layers."""
    names = [name for name, _ in layers]
    try:
        check_same_layers(shapes, names, "shapes")
        for name in names:
            _check_saved_shape(shapes, name)
    except (TypeError, ValueError) as e:
        raise type(e)(f"invalid {who} state dict: {e}") from None
    for name, layer in layers:
        if tuple(shapes[name]) != tuple(layer._dense_shape()):
            raise ValueError(f"layer {name!r} has a {layer.weight_kind} of shape {tuple(layer._dense_shape())} "
                             f"but the checkpoint's is {tuple(shapes[name])}: the checkpoint is of a model with "
                             f"other layer sizes; build the model the saved run trained")


def _check_saved_decompositions(layers, decompositions, who):
    """ValueError naming the first of ``layers`` whose decomposition differs from ``decompositions`` (a state dict's
    of the scheduler ``who``: layer name → decomposition, of the layers that have one), or TypeError/ValueError for
    ``decompositions`` that are not that.  In every form: a full-form layer's next deflate makes an adapter of its
    own decomposition, other factors than the saved run's."""
    convs = [(name, layer) for name, layer in layers if _decomposition(layer) is not None]
    try:
        check_same_layers(decompositions, [name for name, _ in convs], "decompositions")
        for name, _ in convs:
            value = decompositions[name]
            if not isinstance(value, str):
                raise TypeError(f"decompositions[{name!r}] must be a str (the conv layer's decomposition), "
                                f"got {type(value).__name__} ({value!r})")
    except (TypeError, ValueError) as e:
        raise type(e)(f"invalid {who} state dict: {e}") from None
    for name, layer in convs:
        if decompositions[name] != layer.decomposition:
            raise ValueError(f"layer {name!r} has decomposition {layer.decomposition!r} but the checkpoint has "
                             f"{decompositions[name]!r}: the layer holds, or its next deflate makes, other factors "
                             f"than the saved run's; convert the model with the same decomposition")


def _check_saved_forms(layers, forms, who):
    """ValueError naming the first of ``layers`` whose form differs from ``forms`` (a state dict's of the scheduler
    ``who``, which changes no layer's form: layer name → form), or TypeError/ValueError for ``forms`` that are not
    that.  The Trainer loads a checkpoint non-strictly: a lowrank checkpoint's factors loaded into an adapter layer
    leave its frozen W in place, so the layer computes W + A·Bᵀ where the saved run computed A·Bᵀ."""
    names = [name for name, _ in layers]
    try:
        check_same_layers(forms, names, "forms")
        for name in names:
            _check_saved_form(forms, name)
    except (TypeError, ValueError) as e:
        raise type(e)(f"invalid {who} state dict: {e}") from None
    for name, layer in layers:
        if forms[name] != layer.form:
            raise ValueError(f"layer {name!r} is in {layer.form} form but the checkpoint has it in {forms[name]} "
                             f"form: with the saved factors it computes another function than the saved run's, "
                             f"and {who} changes no layer's form; convert the model to the saved form "
                             f"(convert_model(..., form={forms[name]!r}))")


def _check_saved_record(layers, state_dict, who):
    """``state_dict``'s (the scheduler ``who``'s) weight shapes, then conv decompositions, checked against ``layers``
    (:func:`_check_saved_shapes`, :func:`_check_saved_decompositions`), each where the state has it (one saved
    before it was kept loads unchecked for it).  The shapes first: a model of other sizes fails every later check
    as well; the decompositions before the caller's rank checks: another decomposition takes ranks of another
    kind (Tucker's a pair).  The alphas are left to the caller."""
    if "shapes" in state_dict:
        _check_saved_shapes(layers, state_dict["shapes"], who)
    if "decompositions" in state_dict:
        _check_saved_decompositions(layers, state_dict["decompositions"], who)


def _alpha_mismatch(name, layer, saved):
    """The ValueError for layer ``name`` whose ``alpha`` is not ``saved``, the checkpoint's."""
    return ValueError(f"layer {name!r} has alpha {layer.alpha} but the checkpoint has {saved} (the scale is "
                      f"alpha / rank, 1 with alpha None); convert the model with the same alpha")
