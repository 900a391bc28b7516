"""Step time of your own model in each form, measured side by side before training.

:func:`profile_forms` copies the model once per form, puts every dynrank layer of the copy in that
form, builds a fresh optimizer on the copy's trainable parameters and times the training step you
give it.  The result reads like a :class:`~dynrank.RankMonitor`'s records, so
:func:`~dynrank.cost.measured_comp_ratio` and :func:`~dynrank.cost.cost_report` turn it into the
wall-clock cost of a schedule before a single epoch is run.
"""

import contextlib
import copy
import gc
import random
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ._args import as_names, check_int
from ._checks import form_layers, unwrap_model
from ._forms import FORMS

__all__ = ["profile_forms", "FormProfile"]


@dataclass
class FormProfile:
    """Step times per form from :func:`profile_forms`.

    Attributes:
        seconds: form → the timed steps' wall-clock seconds, in order (warm-up steps left out).
        trainable: form → trainable parameters of the model in that form.
        device: where the model's parameters are (as ``str``), e.g. ``"cuda:0"`` or ``"cpu"``.
    """

    seconds: dict
    trainable: dict
    device: str

    @property
    def records(self):
        """One dict per timed step, ``{"form", "step", "wall_seconds"}``: what
        :func:`~dynrank.cost.measured_comp_ratio` and :func:`~dynrank.cost.cost_report` read as a run
        (``run=profile``).  Step times stand in for epoch times: a ratio is the same."""
        return [{"form": form, "step": n, "wall_seconds": t}
                for form, times in self.seconds.items() for n, t in enumerate(times)]

    def median(self, form):
        """Median seconds of one step in ``form``."""
        return statistics.median(self._times(form))

    def mean(self, form):
        """Mean seconds of one step in ``form``."""
        return statistics.fmean(self._times(form))

    def relative(self, form):
        """``form``'s mean step time over the full form's (needs ``"full"`` among the profiled forms)."""
        return self.mean(form) / self.mean("full")

    def comp_ratio(self, epochs, inflate_epoch, deflate_epoch):
        """Measured cost of a schedule (E, I, D) relative to full-rank training, from these step times:
        :func:`~dynrank.cost.measured_comp_ratio` with this profile as the run."""
        from .cost import measured_comp_ratio
        return measured_comp_ratio(self, epochs, inflate_epoch, deflate_epoch)

    def _times(self, form):
        if form not in self.seconds:
            raise ValueError(f"form {form!r} was not profiled; profiled: {', '.join(self.seconds)}")
        return self.seconds[form]

    def __str__(self):
        full = self.mean("full") if "full" in self.seconds else None
        header = ["form", "median ms", "mean ms", "min ms", "× full (mean)", "trainable params", "× full params"]
        rows = []
        for form, times in self.seconds.items():
            rows.append([form, f"{1e3 * self.median(form):.3f}", f"{1e3 * self.mean(form):.3f}",
                         f"{1e3 * min(times):.3f}",
                         f"{self.mean(form) / full:.3f}" if full else "-",
                         f"{self.trainable[form]:,}",
                         f"{self.trainable[form] / self.trainable['full']:.3f}"
                         if full and self.trainable["full"] else "-"])
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        lines = [f"step time per form on {self.device} ({len(next(iter(self.seconds.values())))} timed steps each)",
                 "  ".join(h.ljust(w) for h, w in zip(header, widths)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        return "\n".join(line.rstrip() for line in lines)


def _check_forms(forms):
    forms = as_names(forms, "forms", f"a form name or an iterable of them ({', '.join(FORMS)})", "form names")
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms or len(set(forms)) != len(forms):
        raise ValueError(f"forms must name each of {', '.join(FORMS)} at most once, at least one, got {forms!r}")
    return forms


def _check_reparametrized(model, forms):
    """Raise ValueError where a dynrank layer with a reparametrized weight or factor would change form.

    A form change replaces the tensors a parametrization is registered on (see
    ``FormLayer._check_switchable``), and the parametrization's cost is part of the step: such a
    layer can be profiled in its current form only.
    """
    for name, layer in form_layers(model):
        moved = layer._reparametrized()
        other = [form for form in forms if form != layer.form]
        if moved and other:
            raise ValueError(
                f"layer {name!r} ({type(layer).__name__}, {layer.form} form) has its {', '.join(moved)} "
                f"reparametrized (torch.nn.utils.parametrize, the hook-based spectral_norm/weight_norm, or "
                f"pruned), so it cannot change form and be timed in {other}: pass forms=({layer.form!r},) to "
                f"time the model as it is, or remove the parametrization to profile the other forms "
                f"without its cost")


def _device_of(model):
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise ValueError(f"profile_forms times a model on one device; its parameters are on "
                         f"{', '.join(sorted(map(str, devices)))}")
    return next(iter(devices), torch.device("cpu"))


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hook_computed(model):
    """``copy.deepcopy`` memo: each tensor that a hook-based ``weight_norm``, ``spectral_norm`` or pruning
    keeps as its module's attribute, mapped to a detached copy of it.

    Such a tensor is computed from the module's parameters (``weight_g``/``weight_v``, ``weight_orig``) by
    a forward pre-hook, so after a forward with grad it is no graph leaf, which ``deepcopy`` refuses; the
    hook computes it again, from the copy's parameters, at the copy's first forward.
    """
    memo = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, (WeightNorm, SpectralNorm)):
                name = hook.name
            elif isinstance(hook, BasePruningMethod):
                name = hook._tensor_name
            else:
                continue
            tensor = vars(module).get(name)
            if isinstance(tensor, torch.Tensor):
                memo[id(tensor)] = tensor.detach().clone()
    return memo


@contextlib.contextmanager
def _rng_kept(devices):
    """Put the global RNG states back on exit: Python's ``random``, numpy's and torch's (CPU and the
    CUDA ``devices``), any of which a step may draw from (augmentation, sampling)."""
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)


@torch.no_grad()
def _in_form(model, form):
    """A copy of ``model`` whose dynrank layers are all in ``form``, at their rank, freshly drawn.

    Values do not matter to a step's time, so every layer is re-allocated and drawn afresh as
    construction draws it (a frozen layer stays frozen), instead of being fitted.  The lowrank form
    of a layer in adapter form is at the rank it last had in lowrank form, where it knows it, as
    :func:`~dynrank.cost.param_counts` counts it (a deflate may have changed the rank).
    """
    twin = copy.deepcopy(model, _hook_computed(model))
    for _, layer in form_layers(twin):
        if layer.form != form:
            rank = layer.rank
            if form == "lowrank" and layer.form == "adapter" and layer._lowrank_rank is not None:
                rank = layer._lowrank_rank      # the rank it trained lowrank at, as param_counts counts it
            layer._allocate(form, rank)
        layer.reset_parameters()
    return twin


def profile_forms(model, step, optimizer=None, forms=("full", "lowrank", "adapter"), steps=10, warmup=3,
                  log=print):
    """Time one training step of ``model`` in each form, side by side in one process.

    For each form: a deep copy of ``model`` with every dynrank layer in that form (at the layer's
    rank; in lowrank form, a layer now in adapter form at the rank it last had in lowrank form
    where it knows it, as :func:`~dynrank.cost.param_counts` counts its lowrank epochs; values
    drawn afresh, the model's own weights are never touched), a fresh optimizer
    ``optimizer(params)`` over the copy's trainable parameters, ``warmup`` untimed calls of
    ``step(copy, opt)``, then ``steps`` timed ones, each up to a device synchronize.  Layers other
    than dynrank's are copied as they are (a weight that a hook-based ``weight_norm``,
    ``spectral_norm`` or pruning computes is copied detached: its hook computes it again at the
    copy's first forward).  The caller's RNG states (Python's ``random``, numpy's global one, and
    torch's on the CPU and the model's GPU) are restored afterwards, so profiling leaves a seeded
    run as it was, whatever the step draws from.  One copy is alive at a time:
    the model's memory is needed once more while it runs.

    Args:
        model: an ``nn.Module`` holding dynrank layers (e.g. after :func:`~dynrank.convert_model`),
            in any forms; a DDP/DataParallel wrapper is profiled as its module, on this process.
        step: ``step(model, optimizer)`` runs one training step on its own batch: forward,
            backward, ``optimizer.step()`` (and ``zero_grad``), under autocast if you train so.
        optimizer: ``optimizer(params)`` builds the optimizer; default SGD(lr=1e-3, momentum=0.9).
            The optimizer matters to the time (AdamW touches every trainable parameter three times).
        forms: the forms to time, any of ``"full"``, ``"lowrank"``, ``"adapter"``.
        steps, warmup: timed steps (≥ 1) and untimed ones before them (≥ 0; kernels compile and
            caches fill there).
        log: called with one progress line per form (None: quiet).

    Returns:
        :class:`FormProfile`; ``print`` it for a table, ``.relative(form)`` for one ratio,
        ``.comp_ratio(E, I, D)`` for a schedule's cost, or pass it as ``run`` to
        :func:`~dynrank.cost.cost_report`.

    Raises:
        TypeError: ``model`` is not an nn.Module, ``step``/``optimizer``/``log`` not callable, ``forms``
            not an iterable of names, ``steps``/``warmup`` not ints, ``optimizer(params)`` returned no
            torch optimizer.
        ValueError: no dynrank layer in ``model``, an unknown or repeated form, ``steps`` < 1,
            ``warmup`` < 0, parameters on more than one device; a dynrank layer whose weight or
            factor is reparametrized (``torch.nn.utils.parametrize``, the hook-based
            ``spectral_norm``/``weight_norm``, pruning) while ``forms`` asks for a form other than
            its current one: it cannot change form, so it is profiled in its current form only
            (``forms=(its form,)``), the parametrization's cost included.  Checked before any step.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import dynrank
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> _ = dynrank.convert_model(model, rank_ratio=0.25)
        >>> x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        >>> def step(model, optimizer):
        ...     loss = nn.functional.cross_entropy(model(x), y)
        ...     optimizer.zero_grad(set_to_none=True)
        ...     loss.backward()
        ...     optimizer.step()
        >>> profile = dynrank.profile_forms(model, step, steps=3, warmup=1, log=None)
        >>> sorted(profile.seconds), profile.trainable["full"], profile.trainable["lowrank"]
        (['adapter', 'full', 'lowrank'], 4810, 2762)
        >>> 0 < profile.comp_ratio(10, 3, 7) < float("inf")        # the schedule's cost, from these times
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    module = unwrap_model(model)
    if not form_layers(module):
        raise ValueError("model has no dynrank layers to profile (convert it with dynrank.convert_model first)")
    if not callable(step):
        raise TypeError(f"step must be callable (step(model, optimizer) runs one training step), got "
                        f"{type(step).__name__}")
    for name, value in (("optimizer", optimizer), ("log", log)):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable or None, got {type(value).__name__}")
    forms = _check_forms(forms)
    steps = check_int(steps, "steps", "an int ≥ 1", 1)
    warmup = check_int(warmup, "warmup", "an int ≥ 0", 0)
    _check_reparametrized(module, forms)
    make_optimizer = optimizer or (lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9))
    device = _device_of(module)
    seconds, trainable = {}, {}
    rng_devices = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with _rng_kept(rng_devices):
        for form in forms:
            twin = _in_form(module, form)
            params = [p for p in twin.parameters() if p.requires_grad]
            opt = make_optimizer(params)
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"optimizer(params) must return a torch.optim.Optimizer, got {type(opt).__name__}")
            trainable[form] = sum(p.numel() for p in params)
            times = []
            for i in range(warmup + steps):
                _synchronize(device)
                start = time.perf_counter()
                step(twin, opt)
                _synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            seconds[form] = times
            if log is not None:
                log(f"profile_forms: {form:<7} {steps} steps after {warmup} warm-up, median "
                    f"{1e3 * statistics.median(times):.3f} ms, {trainable[form]:,} trainable parameters")
            del twin, params, opt
            gc.collect()
    return FormProfile(seconds, trainable, str(device))
