"""Optimizer surgery for form changes: swap parameters in place, carry their state.

A form change replaces a layer's trainable parameters (A, B → W on inflate,
W → A, B on deflate, A, B → wider A, B on rank growth).  The optimizer must
follow without being rebuilt, so that everything attached to it (an LR
scheduler, a grad scaler, the user's own references) keeps working:

- :func:`replace_params` removes the old parameters and their state from the
  param group they were in and inserts the new ones at the same position, so
  they share that group's hyperparameters and a freshly built optimizer that
  goes through the same changes ends up with the same parameter order (which
  is what makes ``optimizer.load_state_dict`` work after a resume).  A
  one-for-one replacement (rank growth: A, B → wider A, B) gives each new
  parameter the group and position of the old one of its name, so factors
  kept in groups of their own (a higher lr for B) stay there.  Fused SGD with
  momentum cannot step a group where some parameters have a momentum buffer and others none; a new
  parameter joining such a group (one where any parameter has a buffer, a new
  one's carried buffer included) starts with a zero buffer, which is what an
  empty one means unless ``dampening`` is set (then its first step is
  (1 − dampening)·g instead of g: :func:`replace_params` lists such
  parameters, and ``DynamicRankScheduler.step`` warns).  L-BFGS keeps one
  history over all parameters flattened together; a form change starts it
  afresh.
- :func:`pushforward_state` / :func:`pullback_state` derive the new
  parameters' state from the old ones (``optimizer_state="carry"``).
- :func:`clear_state` leaves the optimizer as a newly built one over its
  current param groups (``optimizer_state="fresh"``).

State entries are carried by kind.  Entries that are linear in the gradient
(SGD's ``momentum_buffer``, Adam's ``exp_avg``, RMSprop's ``grad_avg``) map
like velocities (inflate) or gradients (deflate).  Entries that are
elementwise second moments (``exp_avg_sq``, ``max_exp_avg_sq``,
``square_avg``, Adagrad's ``sum``) map under the assumption that the rank
components are uncorrelated: (Σ_k a_k b_k)² is replaced by Σ_k a_k² b_k²,
which keeps them non-negative and of the right scale.  Scalars (``step``)
are copied.  A state holding any other tensor (another parameter-shaped entry, or
Adafactor's factored ``row_var``/``col_var``) cannot be mapped and the new parameter starts
empty, as with ``"reset"``; so does centered RMSprop's (its step takes √(square_avg −
grad_avg²), which moments mapped one by one do not keep real).
"""

import collections
import os
import sys
import warnings
import weakref
from typing import NamedTuple

import torch

__all__ = ["replace_params", "warn_dampened", "optimizer_params", "pushforward_state", "pullback_state",
           "LINEAR_STATE", "SQUARED_STATE", "manage", "drop_frozen_adapter_params", "params_before",
           "switched_params", "follow_load", "follow_unconvert", "clear_state", "optimizer_chain"]

LINEAR_STATE = frozenset({"momentum_buffer", "exp_avg", "grad_avg"})
SQUARED_STATE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})
# Centered RMSprop steps by √(square_avg − grad_avg²): moments mapped one by one do not keep that real
# (the first step after a switch was NaN), so its state is not carried.
CENTERED_PAIR = frozenset({"grad_avg", "square_avg"})


def optimizer_params(optimizer):
    """Set of ``id``s of every parameter held by ``optimizer``."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _locate(optimizer, params):
    """(group index, position) of the first of ``params``, in their order, that the optimizer holds, or None.

    The order is the caller's: :func:`switched_params` lists the parameters that trained first, so new
    parameters join a trained one's group, not that of a frozen one kept in a group of its own.
    """
    where = {id(p): (g, i) for g, group in enumerate(optimizer.param_groups) for i, p in enumerate(group["params"])}
    return next((where[id(p)] for p in params if id(p) in where), None)


def replace_params(optimizer, removed, added, states=None, owner=None, old_names=None, zero_filled=None,
                   in_place=True):
    """Swap ``removed`` for ``added`` in ``optimizer``, in place.

    The removed parameters leave every param group and their state is dropped;
    the added ones are inserted where the first of ``removed`` (in its order)
    that the optimizer holds sat, in the same group (same lr, weight decay,
    ...).  When as many are added as removed and ``in_place``, each added one
    takes the place of its counterpart in ``removed`` instead, in its group (the
    one of the same name, ``old_names`` against ``owner``'s names, where every
    one has one; else ``removed[i]`` for ``added[i]``), and one whose
    counterpart the optimizer does not hold stays out (a factor the user left
    out of it).  If the optimizer holds none of the removed parameters (the
    user left that layer out of it), nothing is added.

    Args:
        optimizer: a ``torch.optim.Optimizer``.
        removed: parameters leaving the optimizer, those that trained first (the
            first one held decides where ``added`` go).
        added: parameters joining it, in order.
        states: optional dict ``param → state dict`` installed for added parameters
            (ignored for L-BFGS, which starts afresh).
        owner: the module holding ``added`` where ``removed`` were held (the layer, or
            what replaces it).  An optimizer built from ``named_parameters()`` keeps
            ``param_names`` in its groups: ``owner``'s parameters are named after the
            module (a held name less that parameter's own name in ``old_names``) and
            their own name in ``owner``, so the names stay those of
            ``model.named_parameters()``.  Names that are not module paths (each
            held name of the module's parameters less its own name must give one
            module) stay as they are, and an added parameter gets a removed one's
            name, less that one's own name where it ends so, and its own: ``'p1'``
            (A) gives W ``'p1.weight'``, which gives A ``'p1.A'``.
        old_names: dict id(param) → its name in the module before the change.
        zero_filled: optional list given ``dampening`` for each added parameter that fused SGD with
            ``dampening`` set now steps on a zero momentum buffer (:func:`_match_fused_momentum`): its first
            step is (1 − dampening)·lr·g, where a missing buffer (SGD without ``fused``) gives lr·g.
        in_place: False to insert ``added`` where the first held of ``removed`` sat even one for one, as a
            form change does (lowrank → adapter through full form puts A, B where W sat).

    Returns:
        True if the optimizer was edited.
    """
    where = _locate(optimizer, removed)
    if where is None:
        return False
    if _forget_history(optimizer):
        states = None                  # L-BFGS's "state" is the history just forgotten: none carries
    held = optimizer_params(optimizer)
    removed_ids = {id(p) for p in removed}
    own = {id(p): n for n, p in owner.named_parameters()} if owner is not None else {}
    names = _names_before(optimizer, removed, own, old_names)
    fresh = [p for p in added if id(p) not in held or id(p) in removed_ids]
    if in_place and len(fresh) == len(added) == len(removed) == len(removed_ids):        # one for one
        swap = {id(old): new for old, new in _counterparts(removed, added, own, old_names) if id(old) in held}
        groups = [g for g, group in enumerate(optimizer.param_groups)
                  if any(id(p) in swap for p in group["params"])]
        for g in groups:
            params = optimizer.param_groups[g]["params"]
            params[:] = [swap.get(id(p), p) for p in params]
    else:
        group_index, position = where
        groups = [group_index]
        for g, group in enumerate(optimizer.param_groups):
            params = group["params"]
            if g == group_index:
                before = [p for p in params[:position] if id(p) not in removed_ids]
                after = [p for p in params[position:] if id(p) not in removed_ids]
                params[:] = before + fresh + after
            elif any(id(p) in removed_ids for p in params):
                params[:] = [p for p in params if id(p) not in removed_ids]
    for group, name_of in names:
        group["param_names"] = [name_of.get(id(p), "") for p in group["params"]]
    for p in removed:
        optimizer.state.pop(p, None)
    for g in groups:
        group = optimizer.param_groups[g]
        joined = [p for p in added if any(p is q for q in group["params"])]
        for p in joined:
            if states is not None and states.get(p) is not None:
                optimizer.state[p] = states[p]
            elif not optimizer.state.get(p):
                initial = _initial_state(optimizer, g, p)
                if initial:
                    optimizer.state[p] = initial
        filled = _match_fused_momentum(optimizer, group, joined)
        if zero_filled is not None and group.get("dampening"):
            zero_filled.extend(group["dampening"] for _ in filled)
    return True


def _counterparts(removed, added, own, old_names):
    """[(removed one, added one)] for a one-for-one replacement: paired by name (``old_names`` against
    ``own``, id(param) → name of the owner's parameters) where each name pairs one with one, else by
    position.  :func:`switched_params` lists the removed ones that trained first, the added ones in module
    order: a frozen A before a trained B would swap them by position."""
    if own and old_names:
        new_of = {own[id(p)]: p for p in added if id(p) in own}
        pairs = [(old, new_of.get(old_names.get(id(old)))) for old in removed]
        paired = {id(new) for _, new in pairs if new is not None}
        if len(new_of) == len(paired) == len(added) == len(pairs):
            return pairs
    return list(zip(removed, added))


def _caller_stacklevel():
    """``warnings.warn``'s stacklevel, for a call in the function that calls this, that names the first frame
    outside dynrank and torch (whose decorators, ``torch.no_grad()``, add frames of their own): the user's
    line, however deep the call came from."""
    internal = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


def warn_dampened(zero_filled, when, remedy):
    """Warn where fused SGD with ``dampening`` steps parameters that just joined it on a zero momentum
    buffer (``zero_filled``: the dampening of each, from :func:`replace_params`): their first step is
    scaled by 1 − dampening.  ``when`` names the change ("at this switch"), ``remedy`` a way out besides
    SGD without ``fused`` or ``dampening=0`` (or None).  The warning names the user's line that led to it."""
    others = f", or {remedy}" if remedy else ""
    for dampening, count in collections.Counter(zero_filled).items():
        warnings.warn(f"fused SGD with momentum and dampening={dampening:g}: {count} "
                      f"{'parameter that joined' if count == 1 else 'parameters that joined'} the optimizer "
                      f"{when} start with a zero momentum buffer (fused SGD cannot step a param "
                      f"group where only some parameters have one), so their first step is "
                      f"{1 - dampening:g}·lr·g, (1 − dampening)·lr·g, where SGD without fused=True takes "
                      f"lr·g; use SGD without fused{',' if remedy else ' or'} dampening=0{others}",
                      stacklevel=_caller_stacklevel())


def _names_before(optimizer, removed, own, old_names):
    """[(group, id(param) → name)] for the groups that keep ``param_names``: every name they hold now,
    with the owner's parameters (``own``: id(param) → name in the owner) renamed (see :func:`replace_params`)."""
    groups = [g for g in optimizer.param_groups if "param_names" in g]
    named = {id(p): n for g in groups for p, n in zip(g["params"], g["param_names"])}
    old_names = old_names or {}
    # The module's name: each name the optimizer holds for the old module's parameters, less that parameter's
    # own name there, where they all give the same.  Custom names ('p0' for the bias beside 'p1.weight', which
    # a switch gave W) are no module paths: only the added parameters are named then.
    modules = {_module_of(named[i], attr) for i, attr in old_names.items() if i in named}
    module = next(iter(modules)) if len(modules) == 1 else None
    # An added parameter's custom name: the first held removed one's, less that one's own name in the module
    # where it ends so (a name an earlier switch gave), and its own: 'p1' (A) gives W 'p1.weight', which gives
    # A 'p1.A', as a load that goes from lowrank to adapter form at once names it.
    custom, attr = next(((named[id(p)], old_names.get(id(p))) for p in removed if id(p) in named), (None, None))
    if custom is not None and attr is not None and custom.endswith("." + attr):
        custom = custom[:-len(attr) - 1]
    result = []
    for group in groups:
        name_of = {id(p): n for p, n in zip(group["params"], group["param_names"])}
        for i, n in own.items():
            if module is not None:
                name_of[i] = f"{module}.{n}" if module else n
            elif custom is not None and i not in name_of:     # names that are not module paths
                name_of[i] = f"{custom}.{n}"
        result.append((group, name_of))
    return result


def _module_of(name, attr):
    """The module path of a parameter held as ``name`` whose own name in its module is ``attr`` (``"0"`` for
    ``"0.bias"``, ``""`` for ``"bias"``), or None where ``name`` is no such path."""
    if name == attr or name.endswith("." + attr):
        return name[:len(name) - len(attr)].rstrip(".")
    return None


class ParamsBefore(NamedTuple):
    """A module's parameters before a form or rank change (:func:`params_before`)."""
    trainable: list      # those that require grad
    every: list          # all of them
    names: dict          # id(param) → its name in the module
    trains: bool         # whether the layer trained: a parameter but the bias required grad
    frozen_dense: object  # its frozen W_f (adapter form), or None
    form: object         # its form ("lowrank", "full", "adapter"), or None for another module


def drop_frozen_adapter_params(optimizer, layer):
    """Take out of ``optimizer``, for ``layer`` already in adapter form, its frozen W_f (a deflate takes W
    out as it freezes it).  An optimizer given ``model.parameters()`` of a model converted with
    ``form="adapter"`` then holds no W_f, as after a deflate, so a checkpoint of such a run loads into a
    freshly built one.  Its factors stay where they are, frozen or not, as a switch leaves a frozen
    layer's new ones (:func:`switched_params`): unfrozen later, they train.  A frozen parameter takes no
    step, so training is unchanged."""
    dense = _frozen_dense(layer)
    if dense is not None:
        replace_params(optimizer, [dense], [])


def _frozen_dense(module):
    """``module``'s W_f where it is a dynrank layer in adapter form and W_f is frozen (as a deflate leaves
    it), else None: frozen by the form itself, the one parameter of a layer no switch puts in an optimizer."""
    if getattr(module, "form", None) != "adapter" or not callable(getattr(module, "_dense", None)):
        return None
    dense = module._dense()
    return dense if dense is not None and not dense.requires_grad else None


def params_before(layer):
    """What :func:`switched_params` and :func:`replace_params` need of ``layer``, taken before it changes."""
    named = list(layer.named_parameters())
    return ParamsBefore([p for _, p in named if p.requires_grad], [p for _, p in named],
                        {id(p): n for n, p in named}, layer._trains(), _frozen_dense(layer),
                        getattr(layer, "form", None))


def switched_params(layer, before):
    """(removed, added): what a form or rank change of ``layer`` takes out of the optimizer and puts in.

    ``before`` is :func:`params_before` of the layer before the change; ``layer`` holds the parameters
    after it (the layer itself, or the module that replaced it).  An optimizer may hold every parameter
    of a layer but a frozen W_f: after the change, those that train, the ones it kept, and, in a layer
    that did not train (frozen whole, ``requires_grad_(False)``), every new one but W_f, frozen, as torch
    keeps a frozen parameter it was given (it takes no step, and trains once unfrozen).  A new parameter
    frozen in a layer that trained is frozen by the form (W_f; an unconverted adapter's merged weight)
    and stays out, unless it replaces a factor of its name frozen by hand (a rank change keeps LoRA-FA's
    A frozen): it may take that one's place.  Leaving: what it may hold no more, those that trained
    first, so the new parameters join the group of one that trained (:func:`replace_params`); a W_f the
    layer still holds as its W_f is left as it is.  Joining: what it may hold now and could not before.
    """
    form_frozen = _frozen_dense(layer)
    before_ids = {id(p) for p in before.every}
    by_hand = {before.names[id(p)] for p in before.every if not p.requires_grad and p is not before.frozen_dense}
    after = [p for n, p in layer.named_parameters() if p is not form_frozen
             and (p.requires_grad or not before.trains or id(p) in before_ids or n in by_hand)]
    after_ids, trained = {id(p) for p in after}, {id(p) for p in before.trainable}
    kept = {id(p) for p in layer.parameters()}
    removed = [p for p in before.trainable if id(p) not in after_ids] + [
        p for p in before.every if id(p) not in trained and id(p) not in after_ids
        and (p is not before.frozen_dense or id(p) not in kept)]
    could = {id(p) for p in before.every if p is not before.frozen_dense}
    return removed, [p for p in after if id(p) not in could]


# Layer → weak references to (optimizer, model) of the scheduler that manages it (the last one built
# for it).  A state-dict load that changes a managed layer's form or rank goes through
# :func:`follow_load`, so the optimizer follows whether a training framework loads the scheduler before
# or after the model (Accelerate's load_state loads it last).  The optimizer's state must still load
# after the model: loaded before, it would sit on parameters the model's load then replaces.
_MANAGED = weakref.WeakKeyDictionary()


def manage(layers, optimizer, model):
    """Record that ``optimizer`` trains ``layers`` of ``model`` under a scheduler (see :func:`follow_load`)."""
    entry = (weakref.ref(optimizer), weakref.ref(model))
    for layer in layers:
        _MANAGED[layer] = entry


def follow_load(layer, before):
    """Edit the managing optimizer, if any, after a state-dict load gave ``layer`` new parameters
    (``before``: :func:`params_before` of the layer before the load).

    The new ones take the old ones' place (:func:`replace_params`) with no state:
    the optimizer's own ``load_state_dict`` fills it, matched by position as
    after the scheduler's switches.  A rank change swaps each factor for the new
    one of its name; a form change inserts the new parameters where the first
    held old one sat, as the scheduler's switches do (lowrank → adapter goes
    through full form: A, B where W sat), so the group's order is the one a
    scheduler-first load or the uninterrupted run has.  A DistributedDataParallel
    around the model is retired as after a scheduler's switch.
    """
    entry = _MANAGED.get(layer)
    optimizer = entry[0]() if entry is not None else None
    if optimizer is None:
        return
    removed, added = switched_params(layer, before)
    if replace_params(optimizer, removed, added, owner=layer, old_names=before.names,
                      in_place=before.form == layer.form):
        model = entry[1]()
        if model is not None:
            from .distributed import _retire_stale
            _retire_stale(model, "a state-dict load that changed a layer's form or rank")


def follow_unconvert(layer, new):
    """After :func:`~dynrank.unconvert_model` put ``new`` in place of ``layer``: the managing optimizer, if
    any, trains ``new``'s parameters where the layer's sat (fresh state for new ones), in ``new.parameters()``
    order (:func:`_in_module_order`), and the layer is managed no more (a scheduler refuses to step it:
    ``_unconverted``).

    The layer then lets go of its weight and factors (:func:`_release_unconverted`): a scheduler, a
    callback or the user may keep it, and it would otherwise keep W_f, the factors and their gradients
    alive beside the new module's copies of them."""
    layer._unconverted = True
    entry = _MANAGED.pop(layer, None)
    optimizer = entry[0]() if entry is not None else None
    if optimizer is not None:
        before = params_before(layer)
        removed, added = switched_params(new, before)
        replace_params(optimizer, removed, added, owner=new, old_names=before.names)
        _in_module_order(optimizer, new)
    _release_unconverted(layer, new)


def _in_module_order(optimizer, module):
    """Put ``module``'s parameters in each param group of ``optimizer`` in ``module.parameters()`` order, in the
    places they hold there (``param_names`` follow them, state stays with them).

    A switch inserts new parameters where the old ones sat, so an inflated W follows its layer's bias.  Runs
    under a scheduler replay the same edits and agree on that order, but an optimizer kept after
    :func:`~dynrank.unconvert_model` is saved for plain torch, whose optimizer over ``model.parameters()``
    matches state by position and would put the bias's momentum on the weight.  L-BFGS's history, flat in
    parameter order, starts afresh where a parameter moves."""
    order = {id(p): i for i, p in enumerate(module.parameters())}
    moved = False
    for group in optimizer.param_groups:
        params, names = group["params"], group.get("param_names")
        slots = [i for i, p in enumerate(params) if id(p) in order]
        ordered = sorted(slots, key=lambda i: order[id(params[i])])
        if ordered == slots:
            continue
        moved = True
        taken = [params[i] for i in ordered]
        named = [names[i] for i in ordered] if names is not None else None
        for k, i in enumerate(slots):
            params[i] = taken[k]
            if named is not None:
                names[i] = named[k]
    if moved:
        _forget_history(optimizer)


# What a layer unconvert_model replaced refuses from then on: running, loading a state dict, drawing its
# released tensors afresh, and every form or rank change (inflate, deflate; _check_switchable opens the
# others, grow_rank_'s among them).
_REFUSED_AFTER_UNCONVERT = ("forward", "inflate", "deflate", "_check_switchable", "_load_from_state_dict",
                            "reset_parameters")


def _release_unconverted(layer, new):
    """Drop ``layer``'s references to its dense weight and factors, and the gradients of those ``new``
    does not hold, so only tensors ``new`` (or the user) still holds stay alive; its bias, which ``new``
    holds, stays.  Running the layer, loading into it or changing its form raises a RuntimeError naming
    unconvert_model from then on, rather than failing on a released tensor."""
    kept = {id(p) for p in new.parameters()}
    names = [layer.weight_name, *layer._factor_param_names, *layer._factor_names(layer.rank)]
    for name in dict.fromkeys(names):
        param = layer._parameters.get(name)
        if param is None:
            continue
        if id(param) not in kept:
            param.grad = None
        layer._parameters[name] = None
    refuse = _Refusal(f"this {type(layer).__name__} was replaced by unconvert_model (by a {type(new).__name__}) "
                      f"and holds no weight or factors any more; use the module the model holds now in its place")
    for method in _REFUSED_AFTER_UNCONVERT:
        layer.__dict__[method] = refuse


class _Refusal:
    """A method of a layer unconvert_model replaced: raises its RuntimeError.  A class, not a closure, so
    the layer (and a scheduler holding it) still pickles."""

    def __init__(self, message):
        self.message = message

    def __call__(self, *args, **kwargs):
        raise RuntimeError(self.message)


def optimizer_chain(optimizer):
    """``optimizer`` and each torch optimizer inside it, outermost first: a wrapper holds the one it steps
    as ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``, which the Trainer hands its callbacks) or
    ``.optim`` (torch's ``PostLocalSGDOptimizer``; a ``ZeroRedundancyOptimizer``'s local one)."""
    chain = [optimizer]
    while True:
        inner = next((held for held in (getattr(chain[-1], name, None) for name in ("optimizer", "optim"))
                      if isinstance(held, torch.optim.Optimizer)), None)
        if inner is None or any(inner is o for o in chain):
            return chain
        chain.append(inner)


def _inner(optimizer):
    """The innermost torch optimizer of ``optimizer`` (:func:`optimizer_chain`): the one whose class says
    how it steps."""
    return optimizer_chain(optimizer)[-1]


def _forget_history(optimizer):
    """Start L-BFGS afresh: its history (directions, the last flat gradient) and its cached element
    count span all parameters flattened together, which a form change reshapes; no part of it carries.
    Returns True for an L-BFGS optimizer."""
    optimizer = _inner(optimizer)
    if not isinstance(optimizer, torch.optim.LBFGS):
        return False
    for p in optimizer.param_groups[0]["params"][:1]:
        optimizer.state.pop(p, None)
    optimizer._numel_cache = None
    return True


def clear_state(optimizer):
    """Give ``optimizer`` the state a newly built optimizer of its class over its current param groups has.

    Every parameter's state is dropped; a class that creates state at construction (see
    :func:`_initial_state`) gets it again for each parameter, and L-BFGS forgets its history.  The param
    groups are kept as they are (lr, momentum, weight decay, an LR scheduler's edits), so an LR
    scheduler goes on.  No momentum buffer is left, so fused SGD takes its next step as a first one.

    Args:
        optimizer: a ``torch.optim.Optimizer`` (or a wrapper holding one as ``.optimizer``).
    """
    optimizer = _inner(optimizer)
    _forget_history(optimizer)
    optimizer.state.clear()
    for group_index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            initial = _initial_state(optimizer, group_index, p)
            if initial:
                optimizer.state[p] = initial


def _match_fused_momentum(optimizer, group, joined):
    """Give ``joined`` parameters a zero momentum buffer where fused SGD needs one.

    Fused SGD decides once per group whether this is the first step (every
    buffer missing) and fails on a group where only some are missing, as after
    a form change in a trained group, or after a carried deflate in a group of
    the layer's own (one factor's pulled-back buffer is zero and it starts
    without one, the other carries one).  So any buffer in the group, a joined
    parameter's included, gives the joined ones without one a zero buffer.
    With ``dampening`` 0 a zero buffer steps exactly as a missing one.  Returns the parameters given one.
    """
    if not (isinstance(_inner(optimizer), torch.optim.SGD) and group.get("fused") and group.get("momentum")):
        return []
    if not any(optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in group["params"]):
        return []
    filled = []
    for p in joined:
        state = optimizer.state[p]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(p)
            filled.append(p)
    return filled


def _initial_state(optimizer, group_index, param):
    """The state ``optimizer``'s class gives a parameter at construction, or None.

    Most optimizers create state lazily in ``step``; some create it in
    ``__init__`` and fail on a parameter without it (``Adagrad`` before
    torch 2.12 keeps ``sum`` and ``step`` that way).  A throwaway instance of
    the same class with the group's hyperparameters shows which: first on a
    one-element probe, then, only for such a class, on one of ``param``'s shape.
    """
    optimizer = _inner(optimizer)
    hyper = {k: v for k, v in optimizer.param_groups[group_index].items() if k != "params"}

    def probe(shape):
        dummy = torch.nn.Parameter(torch.zeros(shape, device=param.device, dtype=param.dtype))
        try:
            return type(optimizer)([{"params": [dummy], **hyper}], **optimizer.defaults).state.get(dummy)
        except Exception:  # a class that cannot be rebuilt this way: leave its state to its step
            return None

    if not probe((1,) * max(param.dim(), 1)):
        return None
    return dict(probe(param.shape))


# -- carrying state --------------------------------------------------------------
def _split_state(state, shape):
    """Return (tensor entries by name, scalar entries) or None if not carryable.

    A tensor entry of another shape than the parameter's (Adafactor's factored ``row_var`` and
    ``col_var``) is not carryable: the new parameter has another shape, so it starts empty.
    """
    tensors, scalars = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape != shape or (key not in LINEAR_STATE and key not in SQUARED_STATE):
                return None
            tensors[key] = value
        elif isinstance(value, torch.Tensor):
            scalars[key] = value.clone()
        else:
            scalars[key] = value
    return tensors, scalars


def _old_states(optimizer, params):
    """Per-name split states of ``params`` (dict name → param), in their order; None if a trainable one's
    is missing or any is odd, or none has state.

    A frozen parameter without state (LoRA-FA's A) never moved: it is left out, its moments zero, so W's
    momentum after an inflate is the part the trained factors give, s·A·m_Bᵀ."""
    out = {}
    for name, p in params.items():
        state = optimizer.state.get(p)
        if not state:
            if p.requires_grad:
                return None
            continue
        split = _split_state(state, p.shape)
        if split is None:
            return None
        out[name] = split
    if not out:
        return None
    keys = {frozenset(t) for t, _ in out.values()}
    if len(keys) != 1 or CENTERED_PAIR <= next(iter(keys)):
        return None
    return out


def _differentiable_merge(layer, factors):
    """s·merge(factors) in the dense weight's shape, through autograd; None if unknown layer type."""
    from .linear import FusedLowRankLinear
    if isinstance(layer, FusedLowRankLinear):
        return layer.scale * (factors["A"] @ factors["B"].t())
    dec = getattr(layer, "_dec", None)
    if dec is None or not hasattr(dec, "operands"):
        return None
    # LowRankConv2d: merged kernel = s·U·V per group (see dynrank.conv_merging).
    U, V = dec.operands(factors)
    groups = layer.groups
    U3 = U.reshape(groups, U.shape[0] // groups, U.shape[1])
    V3 = V.reshape(groups, U.shape[1], -1)
    return layer.scale * torch.bmm(U3, V3).reshape(layer._dense_shape())


@torch.no_grad()
def pushforward_state(optimizer, layer, old_factors, new_param):
    """State for the dense weight after inflate, derived from the factors' state.

    With W = W0 + s·merge(factors) multilinear in the factors, a factor update
    δf_i moves W by s·merge(.., δf_i, ..) to first order.  Linear entries
    (momentum, ``exp_avg``) are pushed forward the same way — inflate of an
    SVD layer gives m_W = s·(m_A·Bᵀ + A·m_Bᵀ), so SGD's next step moves W
    exactly as the low-rank momentum would have.  Second moments use the
    uncorrelated-components rule: v_W = s²·(v_A·(B∘B)ᵀ + (A∘A)·v_Bᵀ).

    Args:
        optimizer: the optimizer holding the factors' state.
        layer: the FormLayer (provides ``_merge_into_``, any multilinear merge works).
        old_factors: dict name → factor parameter, values at the switch.
        new_param: the dense weight parameter.

    Returns:
        a state dict for ``new_param``, or None (start empty).
    """
    old = _old_states(optimizer, old_factors)
    if old is None:
        return None
    scale = float(layer.scale)  # inflate keeps the rank, so this is the factors' scale
    first = next(iter(old.values()))
    state = dict(first[1])
    values = {n: f.detach() for n, f in old_factors.items()}
    squares = {n: f * f for n, f in values.items()}
    for key in first[0]:
        out = torch.zeros_like(new_param)
        squared = key in SQUARED_STATE
        for name in old:        # a frozen factor without state adds nothing
            subs = dict(squares if squared else values)
            subs[name] = old[name][0][key]
            layer._merge_into_(out, scale if squared else 1.0, subs)
        if squared:
            out.clamp_(min=0.0)
        state[key] = out
    return state


def _pullback(layer, weight_state, squared, factors):
    """(∂W/∂f)ᵀ·m for each factor f (squared: the uncorrelated-components rule); None if unsupported."""
    leaves = {n: (f.detach() * f.detach() if squared else f.detach()).requires_grad_(True)
              for n, f in factors.items()}
    with torch.enable_grad():
        merged = _differentiable_merge(layer, leaves)
        if merged is None:
            return None
        grads = torch.autograd.grad(merged, list(leaves.values()), grad_outputs=weight_state.to(merged.dtype),
                                    allow_unused=True)
    scale = layer.scale if squared else 1.0
    return {n: (torch.zeros_like(f) if g is None else (g * scale).to(f.dtype))
            for (n, f), g in zip(factors.items(), grads)}


@torch.no_grad()
def pullback_state(optimizer, layer, old_weight, new_factors):
    """States for fresh adapter factors after deflate, derived from the dense weight's state.

    The factors' gradients are the pullback of W's gradient through the merge
    (g_A = s·g_W·B, g_B = s·g_Wᵀ·A), so linear entries map the same way:
    m_A = s·m_W·B, m_B = s·m_Wᵀ·A — what the factors' momentum would be had
    they been trained with the other factor held at its fresh value.  Second
    moments: v_A = s²·v_W·(B∘B), v_B = s²·v_Wᵀ·(A∘A).  A factor whose mapped
    state is all zero (B after a zero-output deflate, where A = 0) starts
    empty rather than with a late ``step`` count and zero moments, which would
    make Adam's first bias-corrected steps about 3× too large.

    The pullback runs through autograd of the merge (FusedLowRankLinear:
    s·A·Bᵀ; LowRankConv2d: its decomposition's s·U·V); factors of other
    layer types start empty.

    Returns:
        dict factor parameter → state dict (absent: start empty).
    """
    old = _old_states(optimizer, {"W": old_weight})
    if old is None:
        return {}
    tensors, scalars = old["W"]
    per_factor = {name: dict(scalars) for name in new_factors}
    for key, value in tensors.items():
        mapped = _pullback(layer, value, key in SQUARED_STATE, new_factors)
        if mapped is None:
            return {}
        for name, tensor in mapped.items():
            per_factor[name][key] = tensor.clamp_(min=0.0) if key in SQUARED_STATE else tensor
    states = {}
    for name, state in per_factor.items():
        moments = [v for k, v in state.items() if k in tensors]
        if moments and all(bool((m == 0).all()) for m in moments):
            continue
        states[new_factors[name]] = {k: (v.clone() if isinstance(v, torch.Tensor) and k not in tensors else v)
                                     for k, v in state.items()}
    return states
