"""Checkpoints of a dynamic-rank run: model, optimizer and scheduler saved together, loaded all or nothing.

A form change replaces parameters, so the optimizer's state loads last, after the scheduler (forms and
the optimizer's param groups) and the model (values).
"""

import copy
from collections.abc import Mapping

import torch

from ._checks import call_back, check_model_and_optimizer, form_layers, unwrap_model
from ._optim import LINEAR_STATE, SQUARED_STATE
from .distributed import _retire_when_done
from .scheduler import DynamicRankScheduler

__all__ = ["training_state", "load_training_state"]


def _check_training_objects(model, optimizer, scheduler):
    """TypeError/ValueError unless ``scheduler`` is a dynrank scheduler built on ``model`` and ``optimizer``."""
    from .inrank import IncrementalRankScheduler
    check_model_and_optimizer(model, optimizer)
    if not isinstance(scheduler, (DynamicRankScheduler, IncrementalRankScheduler)):
        raise TypeError(f"scheduler must be a DynamicRankScheduler or IncrementalRankScheduler, "
                        f"got {type(scheduler).__name__}")
    if not any(m is scheduler.model for m in unwrap_model(model).modules()):
        raise ValueError("scheduler was built on another model than the one given")
    if scheduler.optimizer is not optimizer:
        raise ValueError("scheduler was built with another optimizer than the one given")


def _check_materialized(module):
    """ValueError naming the first parameter or buffer of ``module`` on the meta device: it holds no values to
    load into, nor to put back should the load fail."""
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, tensor in named:
            if tensor.is_meta:
                raise ValueError(f"the model's {kind} {name!r} is on the meta device (no values to load into): "
                                 f"call model.to_empty(device=...) before building the optimizer and the "
                                 f"scheduler on it, then load; nothing was loaded")


def training_state(model, optimizer, scheduler, **extra):
    """Checkpoint dict: model, optimizer and scheduler state dicts plus ``extra`` items.

    Raises:
        TypeError / ValueError: not a module, an optimizer and a dynrank
            scheduler built on those two.
    """
    _check_training_objects(model, optimizer, scheduler)
    state = {"model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict()}
    state.update(extra)
    return state


class _Snapshot:
    """What :func:`load_training_state` may change, to put back exactly if it fails.

    Kept by reference: the scheduler's attributes, every dynrank layer's
    attributes and parameter objects (and their ``requires_grad``), the
    optimizer's attributes, param group dicts, parameter lists and state dicts
    (loading replaces these; it never writes into their tensors).  Copied to
    the host: the model's state dict, since a failing ``model.load_state_dict``
    has already written into some parameters and a form change can write into
    a frozen weight in place.
    """

    def __init__(self, model, optimizer, scheduler):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.scheduler_vars = dict(vars(scheduler))
        self.layers = []
        for _, layer in form_layers(model):
            params = dict(layer._parameters)
            grads = {name: p.requires_grad for name, p in params.items() if p is not None}
            self.layers.append((layer, dict(vars(layer)), layer._parameters, params, grads))
        self.values = {key: (value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor)
                             else copy.deepcopy(value)) for key, value in model.state_dict().items()}
        self.optimizer_vars = dict(vars(optimizer))
        self.groups = [(group, dict(group), group["params"], list(group["params"]))
                       for group in optimizer.param_groups]
        self.group_list = list(optimizer.param_groups)
        self.state = [(p, state, dict(state)) for p, state in optimizer.state.items()]

    def restore(self):
        """Scheduler, then the model (forms, parameter objects, values), then the optimizer."""
        vars(self.scheduler).clear()
        vars(self.scheduler).update(self.scheduler_vars)
        for layer, attributes, param_dict, params, grads in self.layers:
            vars(layer).clear()
            vars(layer).update(attributes)
            param_dict.clear()
            param_dict.update(params)
            for name, flag in grads.items():
                params[name].requires_grad_(flag)
        self.module.load_state_dict(self.values)
        vars(self.optimizer).clear()
        vars(self.optimizer).update(self.optimizer_vars)
        for group, items, param_list, params in self.groups:
            param_list[:] = params
            group.clear()
            group.update(items)
        self.optimizer.param_groups[:] = self.group_list
        self.optimizer.state.clear()
        for p, state, items in self.state:
            state.clear()
            state.update(items)
            self.optimizer.state[p] = state


# The per-element entries of torch's optimizers, each of its parameter's shape: those a switch carries
# (momentum, Adam's and RMSprop's moments, Adagrad's sum), Adadelta's acc_delta, Adamax's exp_inf, ASGD's
# ax, Rprop's prev and step_size, and Adafactor's variance (a parameter of under two dimensions).  Their
# other tensor entries are scalars (step, NAdam's mu_product, ASGD's eta and mu), factored (Adafactor's
# row_var and col_var) or span all parameters (L-BFGS's flat direction and gradient).  Other optimizers'
# entries of other names are left unchecked: they may have other shapes by design (an 8-bit optimizer's
# quantization map and block scales).
PER_ELEMENT_STATE = LINEAR_STATE | SQUARED_STATE | frozenset(
    {"acc_delta", "exp_inf", "ax", "prev", "step_size", "variance"})


def _check_state_shapes(optimizer):
    """ValueError naming the first parameter whose loaded per-element state (:data:`PER_ELEMENT_STATE`:
    momentum, Adam's moments, Rprop's step sizes, ...) has another shape than it: ``Optimizer.load_state_dict``
    matches state to parameters by position and checks no shape, so a state saved over parameters in another
    order would fail at the next step, or step with another parameter's moments where the shapes agree.
    Scalar (0-dim) entries are not compared."""
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if (key in PER_ELEMENT_STATE and isinstance(value, torch.Tensor) and value.dim() > 0
                        and value.shape != p.shape):
                    raise ValueError(f"the state {key!r} of param_groups[{g}]['params'][{i}] has shape "
                                     f"{tuple(value.shape)}, the parameter {tuple(p.shape)}")


def _group_keys(optimizer):
    """Per param group: the names of its settings (its keys among the optimizer's ``defaults``: lr, momentum,
    betas, ...) and all its keys."""
    return [({k for k in optimizer.defaults if k in group}, set(group)) for group in optimizer.param_groups]


def _check_settings(optimizer, keys_before):
    """ValueError naming the settings of this optimizer that a loaded param group lacks.

    ``Optimizer.load_state_dict`` replaces each group's settings by the saved ones and the optimizer's
    ``__setstate__`` fills in those its class added over torch versions (SGD's ``nesterov``, Adam's ``fused``,
    ...), so a group saved by another optimizer class would load and fail the next step (``KeyError:
    'momentum'``).  A setting the loaded group lacks after that is one this optimizer's step reads and the
    saved group never had.
    """
    for g, (group, (settings, keys)) in enumerate(zip(optimizer.param_groups, keys_before)):
        missing = sorted(settings - set(group))
        if missing:
            others = sorted(set(group) - keys - {"params"})
            raise ValueError(f"the saved param_groups[{g}] lacks the settings {missing} of this "
                             f"{type(optimizer).__name__}{f' and has {others} instead' if others else ''} "
                             f"(saved by another optimizer class?)")


def load_training_state(checkpoint, model, optimizer, scheduler):
    """Load a :func:`training_state` checkpoint into a freshly built model, optimizer and scheduler.

    Runs the three loads in order: scheduler (forms and optimizer param
    groups), model (values), optimizer (state).  Returns the checkpoint's
    extra items.

    All or nothing: the scheduler's part is checked in full before anything
    changes, and if the model's or the optimizer's part then fails to load,
    the layers (forms, parameter objects and values), the optimizer (param
    groups and state) and the scheduler are put back as they were before the
    exception propagates.  For that, loading holds one extra copy of the
    model's state dict on the host (CPU) while it runs.  A
    DistributedDataParallel wrapper that the load's switches make stale (see
    the scheduler's ``model`` argument) is retired only once the whole load
    has succeeded; after a failed one it trains on as before.

    Raises:
        TypeError: ``checkpoint`` (or one of its three parts) is not a dict, or
            the model/optimizer/scheduler are not what they should be.
        ValueError: a part is missing, the scheduler was built on another model
            or optimizer, the model has a parameter or buffer on the meta
            device (call ``model.to_empty(device=...)`` before building the
            optimizer and scheduler), the scheduler part is invalid for this
            model (see :meth:`DynamicRankScheduler.load_state_dict`), or the
            optimizer part does not fit this optimizer (torch's group-size
            check; a param group that lacks a setting of this optimizer, such
            as SGD's ``momentum`` in a group AdamW saved: another optimizer
            class; or a parameter's per-element state, such as momentum,
            moments or Rprop's step sizes, of another shape than it: a state
            saved over parameters in another order).  Settings of the same
            class load with their saved values (lr, momentum, ...), as
            ``torch.optim.Optimizer.load_state_dict`` loads them.
        RuntimeError: the model part does not fit the model (from
            ``torch.nn.Module.load_state_dict``).

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
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a dict from training_state(...), got {type(checkpoint).__name__}")
    parts = ("model", "optimizer", "scheduler")
    missing = [k for k in parts if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint must have the keys model, optimizer and scheduler (a training_state(...) "
                         f"dict), missing {', '.join(missing)}")
    for key in parts:
        if not isinstance(checkpoint[key], Mapping):
            raise TypeError(f"checkpoint[{key!r}] must be a state dict, got {type(checkpoint[key]).__name__}")
    _check_training_objects(model, optimizer, scheduler)
    module = unwrap_model(model)
    _check_materialized(module)
    checked = scheduler._checked_state(checkpoint["scheduler"])   # a bad scheduler part fails before any copy
    snapshot = _Snapshot(module, optimizer, scheduler)
    keys_before = _group_keys(optimizer)
    part = "scheduler"
    # A switch retires the DDP wrapper it makes stale only once everything has loaded: a failed load puts
    # the parameters back, and the wrapper with them.
    with _retire_when_done():
        try:
            event = scheduler._load_checked(checked, notify=False)
            part = "model"
            module.load_state_dict(checkpoint["model"])
            part = "optimizer"
            optimizer.load_state_dict(checkpoint["optimizer"])
            _check_settings(optimizer, keys_before)
            _check_state_shapes(optimizer)
        except (KeyError, IndexError, AttributeError, AssertionError) as e:
            snapshot.restore()
            raise ValueError(f"checkpoint[{part!r}] does not fit this {part} ({type(e).__name__}: {e}); "
                             f"nothing was loaded") from e
        except ValueError as e:
            snapshot.restore()
            if part != "optimizer":
                raise
            raise ValueError(f"checkpoint['optimizer'] does not fit this optimizer ({e}); build the optimizer the "
                             f"saved run did (its class, over its parameters in its order); nothing was loaded") from e
        except BaseException:
            snapshot.restore()
            raise
    if event:
        # Once all has loaded: a callback reads the loaded weights, and an error of its own is its own.
        call_back(scheduler._callbacks, event)
    return {k: v for k, v in checkpoint.items() if k not in parts}
