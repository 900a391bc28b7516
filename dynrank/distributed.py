"""Data-parallel training across form changes.

A form change replaces parameters, and DistributedDataParallel registers its
gradient hooks and buckets on the parameters it was built with, so after a
change the model must be wrapped again.  Two pieces keep every rank identical:

1. :class:`~dynrank.DynamicRankScheduler` given the DDP-wrapped model (or
   the bare module with ``sync_ranks=True``; without it a bare module in a
   group of several processes is refused, since they may hold different models)
   broadcasts its layers' parameters and buffers from rank 0 once when it is built
   (:func:`~dynrank.convert_model` draws some factors from each process's own RNG:
   the B columns of components of singular value zero, an adapter's B) and
   fresh adapter factors right after each deflate (before any optimizer state
   is derived from them), so each rank's optimizer holds the same parameters
   and state.
2. :func:`rewrap_ddp` removes the old wrapper's hooks and builds a new
   DistributedDataParallel with the same settings (its construction also
   broadcasts parameters, and buffers unless buffer syncing is off, from rank 0).

A forgotten re-wrap fails loudly: a change that replaces trainable parameters
(either scheduler, :func:`~dynrank.unconvert_model`) retires the wrapper the
scheduler was given or :func:`rewrap_ddp` last built — its gradient hooks are
removed and its forward raises a RuntimeError naming :func:`rewrap_ddp` —
instead of stepping once on gradients it never averaged.  A wrapper built by
hand and never passed to dynrank is not known, so not retired.

Loop::

    model = DistributedDataParallel(net)
    scheduler = DynamicRankScheduler(model, optimizer, I, D)
    for epoch in range(epochs):
        if scheduler.step(epoch):
            model = rewrap_ddp(model)
        ...

FSDP (``fully_shard``, FSDP2): a form change creates and drops parameters,
which FSDP cannot follow — it manages the parameters it found when
``fully_shard`` ran, and has no way to un-shard a unit.  Supported wrapping
(tested on CPU/gloo): shard everything else, keep the dynrank layers out of
every unit and replicated, average their gradients yourself::

    fully_shard(model.blocks[i]...)   # units that hold no dynrank layer
    fully_shard(model, ignored_params=dynrank_params(model))
    scheduler = DynamicRankScheduler(model, optimizer, I, D, sync_ranks=True)   # layers from rank 0
    for epoch ...:
        scheduler.step(epoch)         # new factors broadcast from rank 0
        loss.backward()
        allreduce_grads(model)        # dynrank layers' gradients averaged
        optimizer.step()

The scheduler's construction is what makes the replicated layers equal (nothing
else broadcasts them), so build it on every rank before any copy of the model
(an EMA).  Parameters created by later form changes are not FSDP's, so they stay plain
replicated tensors too.  Sharding the dynrank layers themselves would need
un-sharding and re-sharding a unit at each change, which FSDP2 does not
offer: both schedulers refuse sharded layers at construction (ValueError
naming them), and layers FSDP1 (``FullyShardedDataParallel``) flattened likewise;
FSDP1 with ``use_orig_params=False`` additionally cannot hold frozen W_f and
trainable factors in one flat parameter.
"""

import contextlib
import weakref

import torch

__all__ = ["rewrap_ddp", "broadcast_params", "dynrank_params", "allreduce_grads"]

_MB = 1024 * 1024
_DEFAULT_BUCKET_BYTES = 25 * _MB

# id(module) -> the DistributedDataParallel the library last saw around it (a scheduler's constructor,
# rewrap_ddp).  Kept off the module: a weakref attribute would not pickle (torch.save of the module), and a
# deepcopy would point at the original's wrapper.  A live wrapper holds its module, so the id is not reused.
_WRAPPERS = weakref.WeakValueDictionary()


def _active(group, caller):
    """Whether to communicate: False without a process group, but only for the default ``group=None``,
    and False on a process outside ``group`` (what ``new_group`` returns there), as torch's collectives.

    An explicitly passed ``group`` must be a ProcessGroup (else TypeError) and needs
    torch.distributed initialized (else RuntimeError): a wrong group never passes silently.
    """
    import torch.distributed as dist

    from ._checks import outside_group
    available = dist.is_available()
    if group is not None:
        if outside_group(group):
            return False                # this process is not in the group: torch's collectives do nothing
        if available and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"{caller}: group must be a torch.distributed.ProcessGroup or None (the default "
                            f"group), got {type(group).__name__}")
        if not (available and dist.is_initialized()):
            raise RuntimeError(f"{caller}: a process group was passed, but torch.distributed is not "
                               f"{'initialized' if available else 'available'} (call init_process_group first)")
    return available and dist.is_initialized()


def broadcast_params(params, src=0, group=None):
    """Broadcast ``params`` in place from rank ``src`` of ``group`` (no-op without a process group).

    Args:
        params: iterable of tensors/parameters, same shapes on every rank.
        src: rank within ``group`` that holds the values to keep.
        group: process group (default: WORLD; only the default is a no-op when
            torch.distributed is not initialized).  On a process outside it
            (``new_group`` returned ``GroupMember.NON_GROUP_MEMBER`` there) a
            no-op, as torch's collectives.

    Raises:
        TypeError: ``group`` is neither None nor a ProcessGroup.
        RuntimeError: ``group`` is given but torch.distributed is not initialized.
    """
    import torch.distributed as dist
    if not _active(group, "broadcast_params"):
        return
    if dist.get_world_size(group) == 1:
        return
    global_src = src if group is None else dist.get_global_rank(group, src)
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=global_src, group=group)


def dynrank_params(model):
    """Set of every parameter of the model's dynrank layers (for ``fully_shard(ignored_params=...)``)."""
    from ._checks import form_layers
    return {p for _, layer in form_layers(model) for p in layer.parameters()}


def allreduce_grads(model, group=None):
    """Average the gradients of the model's dynrank layers over ``group`` (no-op without one).

    For dynrank layers kept out of FSDP units (see the module docstring): call
    after ``backward()`` and before ``optimizer.step()``.  Every parameter that
    requires grad takes part, in the same order on every rank, so each rank
    makes the same collectives: one a rank left without a gradient (a layer its
    forward did not use, gradients zeroed with ``set_to_none=True``) counts as
    zero there and gets the average as a new ``.grad``, as under
    DistributedDataParallel; one no rank has a gradient for keeps ``None``.
    Parameters that do not require grad (frozen W_f) are skipped.  An explicit
    ``group`` is checked as in :func:`broadcast_params` (TypeError /
    RuntimeError instead of a silent no-op; a no-op on a process outside it).
    """
    import torch.distributed as dist
    if not _active(group, "allreduce_grads"):
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    from ._checks import form_layers
    params, seen = [], set()
    for _, layer in form_layers(model):
        for p in layer.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        return
    # Which parameters some rank has a gradient for: one small collective, so a parameter every rank left
    # unused keeps None (an optimizer skips it) instead of stepping on a zero gradient.
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=params[0].device)
    dist.all_reduce(used, op=dist.ReduceOp.MAX, group=group)
    for p, anywhere in zip(params, used.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(world)


def _remember_ddp(model):
    """Note ``model`` as the current wrapper of the module inside it, if it is a DistributedDataParallel."""
    from torch.nn.parallel import DistributedDataParallel
    from ._checks import wrapper_chain
    chain = wrapper_chain(model)
    ddp = next((m for m in chain if isinstance(m, DistributedDataParallel)), None)
    if ddp is not None:
        _WRAPPERS[id(chain[-1])] = ddp


def _sync_layers(layers, group=None):
    """Broadcast every parameter and buffer of ``layers`` ((name, layer) pairs) from the first rank of
    ``group``: a scheduler with ``sync_ranks`` does it once when built, since :func:`~dynrank.convert_model`
    draws some factors from each process's own RNG (the B columns of components of singular value zero, an
    adapter's B), and nothing else broadcasts layers kept out of FSDP (built from a per-process seed, their
    biases and W or W_f differ too).  Tensors on the meta device (no values yet) are left alone; a scheduler
    refuses layers FSDP sharded before it gets here."""
    broadcast_params([t for _, layer in layers for t in (*layer.parameters(), *layer.buffers()) if not t.is_meta],
                     group=group)


def _check_same_count(count, what, layers, group=None):
    """ValueError on every rank of ``group`` where its ranks passed different ``count`` (a scheduler's epoch
    with ``sync_ranks``): one rank would switch and re-wrap DDP while another does not, and the run would
    hang in the wrapper's collectives or die inside the backend.  One all_gather of an int, on the device
    of ``layers`` ((name, layer) pairs) as :func:`_sync_layers` broadcasts them (NCCL needs CUDA); a
    no-op without a process group of several processes."""
    import torch.distributed as dist
    if not _active(group, "DynamicRankScheduler.step"):
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    device = next((p.device for _, layer in layers for p in layer.parameters() if not p.is_meta),
                  torch.device("cpu"))
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    counts = [int(c) for c in gathered]
    if len(set(counts)) > 1:
        rank = dist.get_rank(group)
        others = counts[:rank] + counts[rank + 1:]
        low, high = min(others), max(others)
        passed = f"{what} {low}" if low == high else f"{what}s {low} to {high}"
        raise ValueError(f"the ranks of the process group passed different {what}s to DynamicRankScheduler.step: "
                         f"this rank (rank {rank} of {world}) passed {what} {count}, the other "
                         f"{'rank' if world == 2 else 'ranks'} {passed}; "
                         f"every rank must step with the same {what} (e.g. ranks resumed from different "
                         f"checkpoints, or each counting its own {what}s); no layer was switched")


# While load_training_state runs: the wrappers its switches make stale, retired only once the whole load has
# succeeded (a failed one puts the parameters back, so the wrapper stays the module's and keeps its hooks).
_PENDING = None


def _retire_stale(model, why):
    """Retire (:func:`_retire_ddp`) every DistributedDataParallel in ``model``'s wrapper chain and the one
    the library last saw around the module inside, after ``why`` replaced trainable parameters; inside
    :func:`_retire_when_done`, once its block has succeeded.

    A wrapper built by hand around the module and never passed to dynrank is not known here.
    """
    from torch.nn.parallel import DistributedDataParallel
    from ._checks import wrapper_chain
    chain = wrapper_chain(model)
    stale = [m for m in chain if isinstance(m, DistributedDataParallel)]
    known = _WRAPPERS.get(id(chain[-1]))
    if known is not None and all(known is not s for s in stale):
        stale.append(known)
    for ddp_model in stale:
        if _PENDING is not None:
            _PENDING.append((ddp_model, chain[-1], why))
        else:
            _retire_known(ddp_model, chain[-1], why)


def _retire_known(ddp_model, module, why):
    """:func:`_retire_ddp`, and forget ``ddp_model`` as ``module``'s wrapper if it is the one remembered."""
    if _WRAPPERS.get(id(module)) is ddp_model:
        del _WRAPPERS[id(module)]
    _retire_ddp(ddp_model, why)


@contextlib.contextmanager
def _retire_when_done():
    """Hold back the retirements :func:`_retire_stale` makes in the block: made when it succeeds, dropped
    when it raises.  The wrappers are the ones stale when the switch ran, so one built meanwhile (a
    callback's ``rewrap_ddp``) is kept."""
    global _PENDING
    outer, _PENDING = _PENDING, []
    try:
        yield
        pending = _PENDING
    finally:
        _PENDING = outer
    for ddp_model, module, why in pending:
        if outer is not None:
            outer.append((ddp_model, module, why))
        else:
            _retire_known(ddp_model, module, why)


def _retire_ddp(ddp_model, why):
    """Make a DistributedDataParallel whose module lost parameters it was built on refuse to run.

    Its reducer waits for gradients of the parameters it was built on and has no
    hooks on the new ones: trained on, it would step once on gradients that were
    never averaged (the ranks drift apart) and then fail with torch's "Expected to
    have finished reduction" message.  Its autograd hooks are removed and its
    forward raises a RuntimeError that names the cause and says to re-wrap
    (:func:`rewrap_ddp` still takes it).

    Args:
        ddp_model: the stale ``torch.nn.parallel.DistributedDataParallel``.
        why: what replaced the parameters, for the message (e.g. ``"unconvert_model"``).
            A wrapper already retired keeps its first message.
    """
    if getattr(ddp_model, "_dynrank_retired", False):
        return
    if why == "rewrap_ddp":
        message = ("this DistributedDataParallel was replaced by rewrap_ddp, which took its gradient hooks "
                   "off: train through the wrapper rewrap_ddp returned (model = rewrap_ddp(model))")
    else:
        message = (f"this DistributedDataParallel was built on parameters that {why} replaced; its gradient "
                   f"hooks are gone, so wrap the module again before training: "
                   f"model = dynrank.distributed.rewrap_ddp(model)")

    def refuse(module, args):
        raise RuntimeError(message)
    _remove_autograd_hooks(ddp_model)
    ddp_model.register_forward_pre_hook(refuse)
    ddp_model._dynrank_retired = True


def _remove_autograd_hooks(ddp_model):
    """Take the old wrapper's hooks off its module: the reducer's gradient hooks (where this torch's DDP
    can) and the forward pre-hooks its mixed precision registered (bound to the wrapper, they would feed
    its reducer from the next forward of the module under a new wrapper)."""
    remove_hooks = getattr(ddp_model, "_remove_autograd_hooks", None)
    if callable(remove_hooks):
        remove_hooks()
    for module in ddp_model.module.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "__self__", None) is ddp_model:
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


# Overrides that replace the copied entries of the same setting (torch's two buffer switches; the
# bucket size, uniform or per bucket; a device mesh, which brings its own process group).
_SAME_SETTING = {"broadcast_buffers": ("broadcast_buffers", "forward_sync_buffers"),
                 "forward_sync_buffers": ("broadcast_buffers", "forward_sync_buffers"),
                 "bucket_cap_mb": ("bucket_cap_mb", "bucket_cap_mb_list"),
                 "bucket_cap_mb_list": ("bucket_cap_mb", "bucket_cap_mb_list"),
                 "device_mesh": ("process_group",)}


def _ddp_settings(ddp_model, overrides):
    """The DistributedDataParallel keyword arguments that rebuild ``ddp_model``'s settings, ``overrides``
    applied (see :func:`rewrap_ddp`)."""
    kwargs = {"device_ids": ddp_model.device_ids, "output_device": ddp_model.output_device,
              "dim": ddp_model.dim, "process_group": ddp_model.process_group,
              "find_unused_parameters": ddp_model.find_unused_parameters,
              "gradient_as_bucket_view": ddp_model.gradient_as_bucket_view,
              "static_graph": bool(getattr(ddp_model, "static_graph", False))}
    # Buffers: torch 2.13 renamed the switch to forward_sync_buffers, but forward_sync_buffers=False still
    # broadcasts buffers at construction; broadcast_buffers=False (every version) does not, so per-process
    # buffers stay per process.
    if not getattr(ddp_model, "forward_sync_buffers", getattr(ddp_model, "broadcast_buffers", True)):
        kwargs["broadcast_buffers"] = False
    per_bucket = list(getattr(ddp_model, "bucket_bytes_cap_list", None) or ())
    if per_bucket:
        kwargs["bucket_cap_mb_list"] = [cap / _MB for cap in per_bucket]
    elif getattr(ddp_model, "bucket_bytes_cap", _DEFAULT_BUCKET_BYTES) != _DEFAULT_BUCKET_BYTES:
        kwargs["bucket_cap_mb"] = ddp_model.bucket_bytes_cap / _MB
    for name, default in (("mixed_precision", None), ("skip_all_reduce_unused_params", False),
                          ("batched_grad_copy", False)):
        value = getattr(ddp_model, name, default)      # absent where this torch has no such setting
        if value != default:
            kwargs[name] = value
    if getattr(ddp_model, "_delay_all_reduce_params", None) and "delay_all_reduce_named_params" not in overrides:
        raise ValueError("rewrap_ddp cannot carry over delay_all_reduce_named_params (the wrapper keeps "
                         "neither their names nor param_to_hook_all_reduce, and a form change may have "
                         "replaced them): pass delay_all_reduce_named_params and param_to_hook_all_reduce "
                         "to rewrap_ddp")
    for key in overrides:
        for copied in _SAME_SETTING.get(key, ()):
            kwargs.pop(copied, None)
    kwargs.update(overrides)
    return kwargs


def rewrap_ddp(ddp_model, **overrides):
    """Wrap ``ddp_model.module`` in a new DistributedDataParallel after a form change.

    The old wrapper's autograd hooks (and mixed precision's forward hooks) are
    removed, else every backward would also feed its stale reducer, and the new
    wrapper copies its settings: ``device_ids``, ``output_device``, ``dim``,
    ``process_group`` (a ``device_mesh``'s group), ``find_unused_parameters``,
    ``gradient_as_bucket_view``, ``static_graph``, ``mixed_precision``,
    ``skip_all_reduce_unused_params``, ``batched_grad_copy`` (where this torch has
    them), the bucket sizes (``bucket_cap_mb`` or ``bucket_cap_mb_list``) and
    buffer syncing: a wrapper that does not sync buffers in forward is rebuilt
    with ``broadcast_buffers=False``, which also leaves each process's buffers
    alone at construction.  Not kept by the wrapper, so not copied:
    ``init_sync`` (the new wrapper syncs at construction unless you pass
    ``init_sync=False``) and communication hooks (register them again on the
    returned wrapper).  A wrapper built with ``delay_all_reduce_named_params`` is
    refused unless that and ``param_to_hook_all_reduce`` are passed again.  Its
    construction broadcasts parameters (and, unless buffer syncing is off,
    buffers) from rank 0.  A wrapper a form change retired is accepted; the new
    one is the module's current wrapper, which the next form change retires.
    The old wrapper refuses to run afterwards, naming the returned one: trained
    on, it would average nothing (``rewrap_ddp(model)`` with the result dropped).

    Args:
        ddp_model: the current ``torch.nn.parallel.DistributedDataParallel``.
        **overrides: DistributedDataParallel keyword arguments to change; one
            replaces the copied entry of the same setting (``broadcast_buffers``
            or ``forward_sync_buffers``; ``bucket_cap_mb`` or
            ``bucket_cap_mb_list``; ``device_mesh`` replaces ``process_group``).

    Returns:
        a new DistributedDataParallel around the same module (the module and its
        parameters are not copied; the optimizer stays valid).

    Raises:
        TypeError: ``ddp_model`` is not a DistributedDataParallel (torch.compile's
            wrapper of one included: re-wrap ``compiled._orig_mod`` and compile the result).
        ValueError: ``ddp_model`` delays the all-reduce of named parameters and
            ``delay_all_reduce_named_params`` is not passed again.

    Example (in the epoch loop of each process; ``scheduler`` is the
    :class:`~dynrank.DynamicRankScheduler` of the wrapped model)::

        if scheduler.step(epoch):
            model = rewrap_ddp(model)
    """
    import warnings
    from torch.nn.parallel import DistributedDataParallel
    if not isinstance(ddp_model, DistributedDataParallel):
        inner = getattr(ddp_model, "_orig_mod", None)
        if isinstance(inner, DistributedDataParallel):
            raise TypeError("rewrap_ddp takes a DistributedDataParallel, got torch.compile's wrapper of one: "
                            "re-wrap the one inside and compile the new wrapper again "
                            "(model = torch.compile(rewrap_ddp(model._orig_mod)))")
        raise TypeError(f"rewrap_ddp takes a DistributedDataParallel, got {type(ddp_model).__name__}")
    kwargs = _ddp_settings(ddp_model, overrides)
    # Its hooks come off, and trained on it refuses to run: a `rewrap_ddp(model)` whose result was dropped
    # would otherwise average nothing.  (One a form change retired keeps its own message.)
    _retire_ddp(ddp_model, "rewrap_ddp")
    with warnings.catch_warnings():
        if "broadcast_buffers" not in overrides:     # copied, not asked for: no deprecation notice
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        new = DistributedDataParallel(ddp_model.module, **kwargs)
    _remember_ddp(new)
    return new
