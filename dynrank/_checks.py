"""Checks shared by the schedulers and the checkpoint helpers: the layers a model holds, its optimizer,
rank synchronization, saved layer names, finite values, param groups, and model copies (EMA / SWA)."""

import sys
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ._forms import FormLayer
from ._optim import _caller_stacklevel, optimizer_chain, optimizer_params

__all__ = ["unwrap_model", "form_layers", "check_model_and_optimizer", "check_sync", "check_layer_names",
           "check_same_layers", "check_finite", "NonFiniteError", "check_one_group", "check_trains_layers",
           "check_trains_factors", "copy_layers", "check_copy", "check_new_copy"]


def wrapper_chain(model):
    """``model`` and each module inside it through DistributedDataParallel, DataParallel and torch.compile's
    wrapper (``_orig_mod``), outermost first; the last is the user's module."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    chain = [model]
    while True:
        inner = chain[-1]
        if isinstance(inner, (DataParallel, DistributedDataParallel)):
            chain.append(inner.module)
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):
            chain.append(inner._orig_mod)
        else:
            return chain


def unwrap_model(model):
    """The user's module inside DistributedDataParallel / DataParallel / torch.compile wrappers (so layers
    are named alike in ``torch.compile(DDP(net))``, ``DDP(net)`` and ``net``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return wrapper_chain(model)[-1]


def form_layers(model):
    """List of (qualified name, layer) for every dynrank layer (FormLayer) in ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    return [(name, m) for name, m in unwrap_model(model).named_modules() if isinstance(m, FormLayer)]


def check_model_and_optimizer(model, optimizer):
    """TypeError unless ``model`` is an nn.Module and ``optimizer`` a torch optimizer a switch can edit."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_editable_optimizer(optimizer)


def check_editable_optimizer(optimizer):
    """TypeError unless ``optimizer`` is a torch optimizer whose parameters a switch can replace in place.

    ``ZeroRedundancyOptimizer`` is refused, also inside a wrapper (Accelerate's
    ``AcceleratedOptimizer`` holds it as ``.optimizer``, torch's
    ``PostLocalSGDOptimizer`` as ``.optim``): it partitions the parameters
    across ranks when it is built and steps an inner optimizer of its own, so
    the parameters a switch puts in its groups would never be stepped.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    zero = _zero_redundancy_optimizer()
    if zero is None:
        return
    held = next((o for o in optimizer_chain(optimizer) if isinstance(o, zero)), None)
    if held is not None:
        inside = "" if held is optimizer else f" (held by the {type(optimizer).__name__} given)"
        raise TypeError(f"optimizer is a ZeroRedundancyOptimizer{inside}, which dynrank cannot follow: it "
                        "partitions the parameters across ranks when built and steps an inner optimizer of its "
                        "own, so the parameters a form switch adds would never be stepped. Use a plain torch "
                        "optimizer (under DDP, or FSDP2 with the dynrank layers left out of the sharding: "
                        "README, Distributed)")


def _zero_redundancy_optimizer():
    """torch's ZeroRedundancyOptimizer class where its module is loaded, else None.

    An instance implies the module is loaded, so it is never imported here (that import costs about
    0.5 s and warns about torch.jit.script's deprecation, an error under warnings-as-errors).
    """
    module = sys.modules.get("torch.distributed.optim")
    return getattr(module, "ZeroRedundancyOptimizer", None)


def check_sync(model, sync_ranks, process_group):
    """Validated (sync_ranks, process_group) of a scheduler built on ``model``.

    ``sync_ranks``: a bool, or None: True when ``model`` is a
    DistributedDataParallel or the module inside the one dynrank last saw
    around it (``rewrap_ddp``, a scheduler's constructor), False without a
    process group of more than one process.  A bare module in such a group is a
    ValueError: whether its processes hold replicas (data parallel: the fresh
    factors must be broadcast, else each process derives optimizer state from
    its own) or different models (pipeline stages: a broadcast would overwrite
    them, or hang) cannot be told from here.  ``process_group``: None (the DDP
    wrapper's group, else WORLD) or a ``torch.distributed.ProcessGroup``; only
    None where this torch build has no ``torch.distributed``.  Returned as None
    where it is the default group (WORLD: a DDP wrapper's unless built with
    another), which None means to the broadcasts: a ProcessGroup neither copies
    nor pickles, and a scheduler does both.  A DDP model under ``torch.compile``
    or ``nn.DataParallel`` counts as one.
    """
    if sync_ranks is not None:
        # A bool, or a numpy bool / 0 / 1 read as one; not any truthy value ("no" is not False).
        if isinstance(sync_ranks, np.bool_) or (isinstance(sync_ranks, int) and sync_ranks in (0, 1)):
            sync_ranks = bool(sync_ranks)
        if not isinstance(sync_ranks, bool):
            raise TypeError(f"sync_ranks must be True, False or None, got {type(sync_ranks).__name__} "
                            f"({sync_ranks!r})")
    if process_group is not None:
        dist = torch.distributed
        if outside_group(process_group):
            raise ValueError(f"process_group: this process (global rank {dist.get_rank()}) is not a member of the "
                             f"group (torch.distributed.new_group returned GroupMember.NON_GROUP_MEMBER here): "
                             f"build the scheduler over a group this process belongs to")
        group_type = getattr(dist, "ProcessGroup", None) if dist.is_available() else None
        if group_type is None:
            raise TypeError(f"process_group must be None (this torch has no torch.distributed), "
                            f"got {type(process_group).__name__}")
        if not isinstance(process_group, group_type):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                            f"got {type(process_group).__name__} ({process_group!r})")
    wrapper, inner = _ddp_of(model)
    if process_group is None and wrapper is not None:
        process_group = wrapper.process_group
    if sync_ranks is None:
        dist = torch.distributed
        size = dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1
        if wrapper is not None:
            sync_ranks = True
        elif size > 1:
            given = (f"a bare {type(model).__name__}" if inner is model else
                     f"a {type(model).__name__} with no DistributedDataParallel inside")
            raise ValueError(f"sync_ranks: torch.distributed runs {size} processes "
                             f"and the scheduler was given {given}: pass sync_ranks=True "
                             f"where every process holds a replica of it (data parallel; or give the scheduler "
                             f"the DistributedDataParallel model), so fresh factors are broadcast from rank 0, "
                             f"or sync_ranks=False where the processes train different models or stages")
        else:
            sync_ranks = False
    dist = torch.distributed
    if process_group is not None and dist.is_initialized() and process_group is dist.group.WORLD:
        process_group = None
    return sync_ranks, process_group


def outside_group(group):
    """Whether ``group`` is what ``torch.distributed.new_group`` returns on a process outside the new group
    (``GroupMember.NON_GROUP_MEMBER``, an int), where torch's collectives do nothing."""
    dist = torch.distributed
    return (isinstance(group, int) and dist.is_available() and dist.is_initialized()
            and group == dist.GroupMember.NON_GROUP_MEMBER)


def _ddp_of(model):
    """(the DistributedDataParallel that wraps ``model``'s module, or None; the innermost module), looking
    through torch.compile's and DataParallel's wrappers, and at the wrapper dynrank last saw around a bare
    module (``rewrap_ddp``, a scheduler's constructor)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    from .distributed import _WRAPPERS
    chain = wrapper_chain(model)
    ddp = next((m for m in chain if isinstance(m, DistributedDataParallel)), None)
    if ddp is not None:
        return ddp, ddp.module
    return _WRAPPERS.get(id(chain[-1])), chain[-1]


def check_layer_names(given, names, what):
    """Raise ValueError if the mapping ``given`` names layers not in ``names`` (a list of layer names)."""
    unknown = [key for key in given if key not in names]
    if unknown:
        raise ValueError(f"{what} names unknown layers {sorted(unknown, key=repr)}; the layers are {list(names)}")


def check_same_layers(given, names, what):
    """Raise TypeError unless ``given`` (the state dict's ``what``) is a dict, ValueError unless its keys
    are exactly ``names``."""
    if not isinstance(given, Mapping):
        raise TypeError(f"{what} must be a dict layer name → value, got {type(given).__name__}")
    extra = sorted((k for k in given if k not in names), key=repr)
    absent = [n for n in names if n not in given]
    if extra or absent:
        raise ValueError(f"saved scheduler manages other layers: only in checkpoint {extra}, only in this model "
                         f"{absent} (in {what})")


class NonFiniteError(ValueError):
    """:func:`check_finite`'s refusal: layer ``layer`` (its name) holds NaN or inf in its tensor ``tensor``
    (a run that diverged); a ValueError, told from the others by its class."""

    def __init__(self, message, layer=None, tensor=None):
        super().__init__(message)
        self.layer, self.tensor = layer, tensor

    def __reduce__(self):       # pickled (a run in a process pool) and copied with its layer and tensor
        return type(self), (str(self), self.layer, self.tensor)


def check_finite(layers, what_not, frozen=True):
    """Raise :class:`NonFiniteError` (a ValueError) naming the first of ``layers`` ((name, layer) pairs)
    whose weight or factors hold NaN or inf; ``what_not`` ends the message (what was not done).
    ``frozen=False`` skips a frozen dense weight (an adapter's W_f, which training does not change).
    One host sync per device."""
    checked = []
    for name, layer in layers:
        tensors = dict(layer.factors())
        dense = layer._dense()
        if dense is not None and (frozen or dense.requires_grad):
            tensors = {layer.weight_name: dense, **tensors}
        checked += [(name, key, t.detach()) for key, t in tensors.items() if t is not None and not t.is_meta]
    by_device = {}
    for i, (_, _, t) in enumerate(checked):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        flags = torch.stack([torch.isfinite(checked[i][2]).all() for i in indices]).tolist()
        bad = [i for i, ok in zip(indices, flags) if not ok]
        if bad:
            name, key, _ = checked[min(bad)]
            raise NonFiniteError(f"layer {name!r} has non-finite values in {key}; {what_not}", name, key)


def parameter_owners(model):
    """id(parameter) → [(qualified name, owning module)], one entry per distinct owning module."""
    owners = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is None:
                continue
            entry = owners.setdefault(id(p), [])
            if not any(m is mod for _, m in entry):
                entry.append((f"{mname}.{pname}" if mname else pname, mod))
    return owners


def check_untied(model, layers, who):
    """ValueError naming the first of ``layers`` ((name, layer) pairs) with a parameter another module of
    ``model`` also holds (an LM head tied to its embedding): ``who``'s switches would untie them, freeze
    the other module's tensor (deflate) or write into it (the merges)."""
    owners = parameter_owners(model)
    for name, layer in layers:
        for pname, p in layer._parameters.items():
            others = [n for n, m in owners.get(id(p), []) if m is not layer] if p is not None else []
            if others:
                raise ValueError(f"layer {name!r} shares its {pname} with {', '.join(others)} (tied weights): "
                                 f"a {who} switching it would untie them, freeze or rewrite the other module's "
                                 f"tensor; keep that layer dense (convert_model keeps tied layers dense) or "
                                 f"untie them first")


def check_not_unconverted(layers, who):
    """RuntimeError naming the first of ``layers`` ((name, layer) pairs) that :func:`~dynrank.unconvert_model`
    replaced: ``who`` (a scheduler) would go on switching or resizing a layer the model no longer holds."""
    gone = next((name for name, layer in layers if getattr(layer, "_unconverted", False)), None)
    if gone is not None:
        raise RuntimeError(f"layer {gone!r} was replaced by unconvert_model, so this {who} manages layers the "
                           f"model no longer holds; train on without it (its optimizer holds the new modules' "
                           f"parameters), or convert the model again and build a new {who}")


def shown_names(names, limit=5):
    """``names`` quoted for a message, the first ``limit`` of them: ``"'a', 'b' and 3 more"``."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(map(repr, names[:limit])) + more


def layers_are(names):
    """``"layer 'a' is"`` or ``"layers 'a', 'b' are"``: the subject of a message naming ``names``."""
    return f"layers {shown_names(names)} are" if len(names) > 1 else f"layer {shown_names(names)} is"


def params_are(names):
    """``"parameter 'a' is"`` or ``"parameters 'a', 'b' are"``: the subject of a message naming ``names``."""
    return f"parameters {shown_names(names)} are" if len(names) > 1 else f"parameter {shown_names(names)} is"


def check_not_sharded(layers, who):
    """ValueError naming the layers of ``layers`` ((name, layer) pairs) that hold a sharded parameter (a
    DTensor: ``fully_shard`` over them without ``ignored_params``) or parameters FSDP1 flattened
    (``FullyShardedDataParallel`` over them): ``who`` (a scheduler) replaces a layer's parameters, which
    FSDP cannot follow, and its checks cannot read a sharded tensor."""
    # A DTensor implies its module is loaded: not imported here (a cost for every scheduler).
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", ())
    sharded = [name for name, layer in layers if any(isinstance(p, dtensor) for p in layer.parameters())]
    # FSDP1 (FullyShardedDataParallel) marks the parameters it flattens into a FlatParameter: the layer's
    # then hold per-process 1-D views (use_orig_params=True) or are taken from it (False).
    flattened = [name for name, layer in layers if _fsdp1_flattened(layer)]
    recipe = (f"a {who} replaces the layers' parameters, which FSDP cannot follow; keep the dynrank layers out of "
              f"the sharding, fully_shard(model, ignored_params=dynrank.distributed.dynrank_params(model)), build "
              f"the scheduler with sync_ranks=True and call dynrank.distributed.allreduce_grads(model) after "
              f"backward() (README, Distributed)")
    if flattened:
        raise ValueError(f"{layers_are(flattened)} flattened by FullyShardedDataParallel (FSDP1): {recipe}")
    if sharded:
        raise ValueError(f"{layers_are(sharded)} sharded (DTensor parameters: fully_shard over a dynrank layer): "
                         f"{recipe}")


def _fsdp1_flattened(layer):
    """Whether FSDP1 flattened ``layer``'s parameters: it marks them (use_orig_params=True, the layer keeps
    1-D views), or takes them and leaves plain tensors behind (False: no parameter left, which no form has)."""
    params = list(layer.parameters())
    return not params or any(getattr(p, "_fsdp_flattened", False) for p in params)


def check_switchable(layers):
    """RuntimeError naming the first of ``layers`` ((name, layer) pairs) with a reparametrized weight or
    factor (:meth:`FormLayer._check_switchable`), before any of them changes form or rank."""
    for name, layer in layers:
        layer._check_switchable(f"layer {name!r}")


def _switched(layer):
    """Dict name → the trainable parameters a form change of ``layer`` replaces (its factors, its dense
    weight); a frozen factor trains in no group, so where the optimizer keeps it does not matter."""
    params = {name: f for name, f in layer.factors().items() if f.requires_grad}
    dense = layer._dense()
    if dense is not None and dense.requires_grad:
        params[layer.weight_name] = dense
    return params


def check_one_group(optimizer, layers):
    """ValueError naming the first of ``layers`` ((name, layer) pairs) whose switched parameters the
    optimizer holds in more than one param group: a form change puts the layer's new parameters in one
    group (see :func:`dynrank._optim.replace_params`), and which one would be a silent guess."""
    group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    for name, layer in layers:
        where = {key: group_of[id(p)] for key, p in _switched(layer).items() if id(p) in group_of}
        if len(set(where.values())) > 1:
            held = ", ".join(f"{key} in group {g}" for key, g in where.items())
            raise ValueError(f"the optimizer holds layer {name!r}'s parameters in different param groups ({held}); "
                             f"a form change puts the layer's new parameters in one group, so give "
                             f"{', '.join(where)} the same group (a bias may sit elsewhere)")


def check_trains_layers(optimizer, layers, model, who):
    """ValueError if the optimizer holds none of the trainable parameters a form change replaces (W, the
    factors) of any of ``layers`` ((name, layer) pairs of ``model``) while some has one: an optimizer
    built before ``convert_model`` holds the replaced modules' tensors, and no layer would ever train.
    A model whose layers are frozen is fine.  A trainable layer left out of an optimizer that holds
    another's gets a warning (``who`` builds over it): its new parameters after a switch join no optimizer,
    so one that a second optimizer trains (Muon's matrices beside AdamW's convs) stops training.  So does
    a trainable factor left out of it while the optimizer holds another of its layer's
    (:func:`check_trains_factors`)."""
    per_layer = [(name, list(_switched(layer).values())) for name, layer in layers]
    switched = [p for _, params in per_layer for p in params]
    held = optimizer_params(optimizer)
    if not switched:
        return
    if any(id(p) in held for p in switched):
        left_out = [name for name, params in per_layer if params and not any(id(p) in held for p in params)]
        if left_out:
            warnings.warn(f"{layers_are(left_out)} trainable but not in the optimizer {who} was given: a "
                          f"switch leaves the new parameters out of every optimizer (one a second optimizer "
                          f"trains stops training); build one {who} per optimizer over the part it trains "
                          f"({who}(model.part, its_optimizer, ...)), or freeze them", stacklevel=3)
        check_trains_factors(optimizer, layers, who)
        return
    in_model = {id(p) for p in model.parameters()}
    strays = len(held - in_model)
    shown = shown_names([name for name, _ in layers], limit=3)
    stale = (f" (it holds {strays} tensors that are not in the model: built before convert_model replaced "
             f"them?)" if strays else "")
    raise ValueError(f"the optimizer holds no trainable parameter of the dynrank layers ({shown}), so they would "
                     f"never train{stale}; build the optimizer after convert_model(model), from "
                     f"model.parameters() or groups of them")


def check_trains_factors(optimizer, layers, who):
    """UserWarning naming each trainable parameter a form change or resize of ``layers`` ((name, layer)
    pairs; a name "" for a layer on its own) replaces that the optimizer (the one ``who`` was given) does not
    hold while it holds another of that layer's (A in it, B trained by a second optimizer): its replacement
    joins the optimizer's group or none, and the second optimizer steps the replaced tensor from then on.
    The warning names the user's line."""
    held = optimizer_params(optimizer)
    left_out = []
    for name, layer in layers:
        # A factor that is no leaf (a parametrization's output) is in no optimizer: the switch refuses it.
        params = {key: p for key, p in _switched(layer).items() if p.is_leaf}
        if any(id(p) in held for p in params.values()):
            left_out += [f"{name}.{key}" if name else key for key, p in params.items() if id(p) not in held]
    if left_out:
        it, its, new = ("it", "its layer's", "one") if len(left_out) == 1 else ("them", "their layers'", "ones")
        warnings.warn(f"{params_are(left_out)} trainable but not in the optimizer {who} was given, though that "
                      f"holds others of {its}: a switch or resize replaces {it} and puts the new {new} in no other "
                      f"optimizer (one a second optimizer trains stops training); put {it} in the optimizer "
                      f"{who} was given, or freeze {it}", stacklevel=_caller_stacklevel())


def copy_layers(model_copy):
    """Dict name → dynrank layer of ``model_copy`` (an AveragedModel is looked into); TypeError unless
    it is an nn.Module, ValueError if it holds a DistributedDataParallel."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim.swa_utils import AveragedModel
    if not isinstance(model_copy, nn.Module):
        raise TypeError(f"a model copy must be a torch.nn.Module (e.g. an AveragedModel), "
                        f"got {type(model_copy).__name__}")
    inner = model_copy.module if isinstance(model_copy, AveragedModel) else model_copy
    if isinstance(inner, DistributedDataParallel):
        # A deep copy of a DDP wrapper builds a second reducer whose hooks and buckets sit on the copy's
        # parameters as they are now; a form change replaces them and nothing can re-wrap the copy.
        raise ValueError(f"model copy {type(model_copy).__name__} holds a DistributedDataParallel (its reducer "
                         f"would keep the parameters a form change replaces); build the copy from the "
                         f"unwrapped module, AveragedModel(ddp.module), and update it with "
                         f"update_parameters(ddp) as before")
    return dict(form_layers(inner))


def check_copy(model_copy, layers, model_layers):
    """ValueError unless ``layers`` (a copy's name → layer) hold every one of ``model_layers`` ((name,
    layer) pairs a scheduler manages) under its name, with the same type, form, rank and shape, and with
    parameters of their own."""
    for name, layer in model_layers:
        twin = layers.get(name)
        if twin is None:
            # A wrapper holding the copy as .module (timm's ModelEmaV2/V3) has it there under another name.
            hint = (f" (it holds {name!r} as 'module.{name}': pass model_copy.module, the copy inside the "
                    f"wrapper)" if f"module.{name}" in layers else "")
            raise ValueError(f"model copy {type(model_copy).__name__} has no dynrank layer {name!r}{hint}; a copy "
                             f"must hold the model's dynrank layers under the same names")
        if twin is layer or any(p is q for p in twin.parameters() for q in layer.parameters()):
            raise ValueError(f"model copy {type(model_copy).__name__} shares layer {name!r} with the model; give a "
                             f"copy (AveragedModel(model) or copy.deepcopy(model)), not the model")
        ours, theirs = ((type(m).__name__, m.form, m.rank, tuple(m._dense_shape())) for m in (layer, twin))
        if ours != theirs:
            raise ValueError(f"model copy {type(model_copy).__name__}: layer {name!r} is (type, form, rank, shape) "
                             f"{theirs}, the model's is {ours}; add the copy when it is made, or load its state "
                             f"dict saved with the model's")


def remove_copy(model_copy, copies):
    """Take ``model_copy`` (the object a scheduler's ``add_model_copy`` returned) out of ``copies``, the
    (copy, layers) pairs added; ValueError if it is not there."""
    index = next((i for i, (c, _) in enumerate(copies) if c is model_copy), None)
    if index is None:
        raise ValueError(f"model copy {type(model_copy).__name__} was not added to this scheduler "
                         f"(add_model_copy), or was removed already")
    del copies[index]


def check_new_copy(model_copy, copies, model_layers):
    """``model_copy``'s layers (:func:`copy_layers`), checked for a scheduler's ``add_model_copy``:
    TypeError unless an nn.Module, ValueError if it holds a DistributedDataParallel, is in ``copies``
    ((copy, layers) pairs already added) or fails :func:`check_copy` against ``model_layers``."""
    layers = copy_layers(model_copy)
    if any(c is model_copy for c, _ in copies):
        raise ValueError("this model copy was already added to the scheduler")
    check_copy(model_copy, layers, model_layers)
    return layers


def call_back(callbacks, event):
    """Call every one of a scheduler's ``callbacks`` with ``event``.  One that raises does not keep the later
    ones from the event (the switch is done, and a step again would make none); the first error is raised
    once every callback has run."""
    error = None
    for fn in list(callbacks):
        try:
            fn(event)
        except Exception as e:          # raised below, once every callback has had the event
            error = error or e
    if error is not None:
        raise error


def cuda_devices(modules):
    """The indices of the CUDA devices holding a parameter of ``modules``, sorted."""
    return sorted({p.device.index for module in modules for p in module.parameters() if p.device.type == "cuda"})


def fork_layer_rngs(layers):
    """``torch.random.fork_rng`` of the CPU generator and of each CUDA device holding a parameter of
    ``layers`` ((name, layer) pairs): a load that draws fresh factors there leaves every generator as it
    was, so a restored RNG state stays valid whichever order it is restored in."""
    return torch.random.fork_rng(devices=cuda_devices(layer for _, layer in layers), device_type="cuda")
