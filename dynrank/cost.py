"""Cost of a dynamic-rank schedule: the paper's parameter-count proxy and the measured ratio.

**The paper's Comp. ratio (§5.2, Eq. 4–6).**  With d the number of trainable
parameters of the full model and d_ρ that of the model whose factorized
layers are in lowrank form (rank ratio ρ):

    T_F  = E·d                                   (4)
    T_ρ  = E·d_ρ                                 (5)
    T_DR = (D − I)·d + (E − (D − I))·d_ρ          (6)
    Comp. = T_DR / T_F

Adapter epochs count as d_ρ: only the factors train, W_f is frozen.  A scheduler's
``deflate_rank`` other than the lowrank rank gives them a d_ρ of their own
(:attr:`ParamCounts.adapter`): T_DR = I·d_ρ + (D − I)·d + (E − D)·d_ρ,adapter.  d and d_ρ
count *every* trainable parameter — BN, biases, the unfactorized shortcut
convs and classifier — which only changes through the factorized layers:
d − d_ρ = Σ over factorized layers of (dense weight − factor) parameters.

For the paper's ResNet20 example (d = 272,762, d_ρ = 155,170) the 19
factorized 3×3 convs with k = int(0.5·out_channels), SVD factors k×C×3×3 and
F×k×1×1, give exactly d − d_ρ = 117,592.  The remaining 5,066 parameters are
matched exactly by 1×1 projection shortcuts with BN in the first block of
*each* of the three stages (16→16, 16→32, 32→64: 2,816 + 224), BN after every
3×3 conv (1,376) and the 64→10 classifier with bias (650).  A ResNet20 with
shortcut convs only at the two stage transitions has d = 272,474 and gives
0.7842 instead of 0.7844.

**Measured ratio.**  Parameter counts ignore that an adapter epoch still runs
the dense W_f forward and backward, and that small low-rank GEMMs run below
peak.  :func:`measured_comp_ratio` uses the per-form wall-clock epoch times
that :class:`~dynrank.RankMonitor` records instead (or the step times of
:func:`~dynrank.profile_forms`, before training).
"""

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._args import check_int, check_real
from ._forms import FormLayer
from .conv_factorizations import DECOMPOSITIONS, KernelShape, get_factorization
from .linear import check_rank, check_ratio, rank_from_ratio

__all__ = ["ParamCounts", "CostReport", "layer_param_counts", "param_counts", "comp_ratio", "form_epochs",
           "epoch_times", "measured_comp_ratio", "cost_report"]


@dataclass
class ParamCounts:
    """Trainable-parameter counts of a model with every factorized layer dense or factored.

    Attributes:
        full: d — factorized layers dense (full form).
        lowrank: d_ρ — factorized layers as factors (lowrank or adapter form).
        other: trainable parameters outside the factorized weights (in both).
        layers: list of (name, dense_params, factor_params) per factorized layer.  Counted from a
            model: the trainable parameters the layer has in that form (see :func:`param_counts`).
        adapter: d_ρ of the adapter epochs where it differs from ``lowrank`` (a
            scheduler's ``deflate_rank`` other than the layers' lowrank rank); None:
            the same as ``lowrank``.
    """

    full: int
    lowrank: int
    other: int
    layers: list = field(default_factory=list)
    adapter: Optional[int] = None


def _count(shape):
    return int(math.prod(int(s) for s in shape))


def _int(value, what, minimum=0):
    return check_int(value, what, f"an int ≥ {minimum}", minimum)


def layer_param_counts(shape, rank=None, rank_ratio=0.5, decomposition="svd"):
    """(dense, factor) parameter counts of one layer from its weight shape.

    Conv counts are those of a :class:`~dynrank.LowRankConv2d` (groups=1) with the
    same kernel shape, rank and decomposition: its own rank check and factor shapes.

    Args:
        shape: (out, in) for a linear layer or (F, C, kh, kw) for a conv
            (C per group is not modelled: pass groups=1 shapes).
        rank: factor rank, in the layer's convention: an int for ``"svd"`` and
            ``"cp"``; for ``"tucker"`` an int r = (r, r) or (r_in, r_out); for
            ``"tkd-cpd"`` an int or (r_in, cp_rank, r_out).  Default from
            ``rank_ratio`` as the layers pick it: linear ``max(1, int(ρ·min(out, in)))``
            (as ``convert_model``), conv ``LowRankConv2d.rank_for_ratio`` (for svd
            ``min(max(1, int(ρ·F)), min(F, C·kh·kw))``, the authors' k = int(ρ·out_channels)).
        rank_ratio: ρ in (0, 1], used when ``rank`` is None.
        decomposition: ``"svd"`` — linear k·(out + in); conv k×C×kh×kw then
            F×k×1×1: k·C·kh·kw + F·k.  Conv only: ``"tucker"`` — 1×1 C→r_in,
            kh×kw core r_in→r_out, 1×1 r_out→F: C·r_in + r_out·r_in·kh·kw + F·r_out;
            ``"cp"`` and ``"tkd-cpd"`` — the factors listed in
            :mod:`dynrank.conv_factorizations`.

    Returns:
        (dense_params, factor_params); biases are not included (they do not change).

    Raises:
        TypeError: a shape that is not a tuple/list, a non-int rank or shape entry (a numpy
            integer is an int), a non-number ratio.
        ValueError: a shape not of length 2 or 4 or with an entry below 1, a rank out of the
            layer's bounds, a bad ratio or decomposition.

    Example:
        >>> layer_param_counts((64, 64, 3, 3))          # k = 32
        (36864, 20480)
    """
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be a tuple (out, in) or (F, C, kh, kw), got {type(shape).__name__} ({shape!r})")
    shape = tuple(shape)
    expected = "(out, in) or (F, C, kh, kw) of positive ints"
    if len(shape) not in (2, 4):
        raise ValueError(f"shape must be {expected}, got {shape!r}")
    shape = tuple(check_int(s, "shape", expected, 1, where=f" in {shape!r}") for s in shape)
    dense = _count(shape)
    if len(shape) == 2:
        if decomposition != "svd":
            raise ValueError(f"decomposition must be 'svd' for a linear shape (out, in), got {decomposition!r}")
        out, fan_in = shape
        if rank is None:
            rank = rank_from_ratio(check_ratio(rank_ratio), fan_in, out)
        k = check_rank(rank, min(out, fan_in))
        return dense, k * (fan_in + out)
    if not isinstance(decomposition, str) or decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {', '.join(DECOMPOSITIONS)} for a conv shape, got "
                         f"{decomposition!r}")
    factorization, kshape = get_factorization(decomposition), KernelShape(*shape)
    if rank is None:
        rank = factorization.rank_from_ratio(check_ratio(rank_ratio), kshape)
    rank = factorization.check_rank(rank, kshape)
    return dense, sum(_count(s) for s in factorization.factor_shapes(rank, kshape).values())


def _from_model(model, lowrank_ranks=None, scheduler=None, run=None):
    """Per-layer counts of ``model``: (layers at the lowrank rank, adapter factor counts, other, unknown).

    A layer's lowrank rank is its rank unless it is in adapter form; then it comes from
    ``lowrank_ranks``, a ``scheduler`` whose deflate_rank kept the layer's rank, the last lowrank
    epoch ``run`` measured, or the rank the layer itself last had in lowrank form (a layer converted
    or built lowrank in this process, and not loaded into another form since: a scheduler's load gives
    it the saved run's); ``unknown`` lists the adapter layers none of them covers
    (counted at their rank).  The adapter rank is an adapter layer's rank, else the scheduler's deflate rank.

    The layer's current form counts its real Parameters that require grad (a factor frozen by hand
    counts nothing; a reparametrized tensor counts the Parameters it is computed from; a Parameter
    shared with an earlier layer, as tied full-form weights are, counts at that layer only); the other
    forms count their shapes, all trainable, as a switch leaves them.  A layer ``scheduler`` does not
    manage keeps its form: its current count in every form.
    """
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, FormLayer)]
    given = _given_ranks(lowrank_ranks, modules)
    deflate = _deflate_ranks(scheduler, modules)
    unmanaged = [name for name, _ in modules if name not in deflate] if scheduler is not None else []
    stray = [name for name in given if name in unmanaged]
    if stray:
        raise ValueError(f"lowrank_ranks names layers {stray} that the scheduler does not manage; they keep "
                         f"their form and are counted in it (the scheduler manages {list(deflate)})")
    seen = _lowrank_ranks_seen(run, dict(modules)) if run is not None else {}
    layers, adapter, unknown, factorized_ids = [], [], [], set()
    for name, module in modules:
        bias = {id(p) for p in _params_behind(module, "bias")}
        weights = [p for p in module.parameters() if id(p) not in bias]
        # A Parameter shared with a layer before (tied in full form) trains once: counted at its first layer.
        now = sum(p.numel() for p in weights if p.requires_grad and id(p) not in factorized_ids)
        factorized_ids.update(id(p) for p in weights)
        if not module._trains():                       # frozen (requires_grad_(False)): it stays so in every form
            layers.append((name, 0, 0))
            adapter.append(0)
            continue
        if name in unmanaged:
            layers.append((name, now, now))
            adapter.append(now)
            continue
        lowrank_rank = adapter_rank = module.rank
        if module.form == "adapter":
            if name in given:
                lowrank_rank = given[name]
            elif name in deflate and deflate[name] is None:
                pass                                   # the scheduler deflated at the rank the layer had
            elif name in seen:
                lowrank_rank = seen[name]
            elif module._lowrank_rank is not None:
                lowrank_rank = module._lowrank_rank            # the layer was lowrank at that rank here
            else:
                unknown.append(name)
        else:
            if module.form == "lowrank" and name in given and given[name] != module.rank:
                raise ValueError(f"lowrank_ranks[{name!r}] is {given[name]!r} but layer {name!r} is in lowrank form "
                                 f"at rank {module.rank!r}")
            lowrank_rank = given.get(name, module.rank)
            if deflate.get(name) is not None:
                adapter_rank = deflate[name]
        counts = {"full": _count(module._dense_shape()),
                  "lowrank": sum(_count(s) for s in module._factor_shapes(lowrank_rank).values()),
                  "adapter": sum(_count(s) for s in module._factor_shapes(adapter_rank).values())}
        counts[module.form] = now
        layers.append((name, counts["full"], counts["lowrank"]))
        adapter.append(counts["adapter"])
    other = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in factorized_ids)
    return layers, adapter, other, unknown


def _params_behind(module, name):
    """The Parameters ``module``'s tensor ``name`` is: itself, or the ones a reparametrization computes it
    from (``torch.nn.utils.parametrize``'s originals, the hook-based weight_norm's ``name_g`` and ``name_v``,
    spectral_norm's and prune's ``name_orig``)."""
    if module._parameters.get(name) is not None:
        return [module._parameters[name]]
    if parametrize.is_parametrized(module, name):
        return list(module.parametrizations[name].parameters())
    return [module._parameters[n] for n in (f"{name}_g", f"{name}_v", f"{name}_orig")
            if module._parameters.get(n) is not None]


def _checked_rank(layer, rank, what):
    try:
        return layer._check_rank(tuple(rank) if isinstance(rank, list) else rank)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{what} is not a valid rank of the layer: {e}") from None


def _given_ranks(lowrank_ranks, modules):
    """``lowrank_ranks`` checked: a dict layer name → rank of this model's dynrank layers, or None."""
    if lowrank_ranks is None:
        return {}
    if not isinstance(lowrank_ranks, Mapping):
        raise TypeError(f"lowrank_ranks must be a dict layer name → rank, got {type(lowrank_ranks).__name__}")
    layers = dict(modules)
    unknown = [n for n in lowrank_ranks if n not in layers]
    if unknown:
        raise ValueError(f"lowrank_ranks names unknown layers {unknown}; the model's dynrank layers are {list(layers)}")
    return {n: _checked_rank(layers[n], r, f"lowrank_ranks[{n!r}]") for n, r in lowrank_ranks.items()}


def _deflate_ranks(scheduler, modules):
    """Layer name → rank the scheduler deflates it to (None: the layer's rank at the deflate), for the layers
    it manages."""
    if scheduler is None:
        return {}
    from .scheduler import DynamicRankScheduler
    if not isinstance(scheduler, DynamicRankScheduler):
        raise TypeError(f"scheduler must be a DynamicRankScheduler, got {type(scheduler).__name__}")
    names = {id(m): name for name, m in modules}
    out = {}
    for own_name, layer in scheduler.layers:
        if id(layer) in names:
            spec = scheduler.deflate_rank
            spec = spec.get(own_name) if isinstance(spec, Mapping) else spec
            # As the layer's deflate reads it: an int for a Tucker or TKD-CPD conv is a tuple rank.
            out[names[id(layer)]] = None if spec is None else layer._check_rank(
                scheduler._deflate_rank_for(own_name, layer))
    if modules and not out:
        raise ValueError("scheduler manages none of this model's dynrank layers; pass the scheduler built on it")
    return out


def _lowrank_ranks_seen(run, layers):
    """Layer name → rank in the last lowrank-form epoch where ``run`` (a RankMonitor) measured it."""
    seen = {}
    for i, rec in enumerate(_records(run)):
        measured = rec.get("layers")
        for name, m in (measured.items() if isinstance(measured, Mapping) else ()):
            if name in layers and isinstance(m, Mapping) and m.get("form") == "lowrank" and "rank" in m:
                seen[name] = _checked_rank(layers[name], m["rank"], f"the rank of layer {name!r} in run record {i}")
    return seen


def _from_specs(specs, rank_ratio):
    layers = []
    for i, spec in enumerate(specs):
        name = f"layer{i}"
        if isinstance(spec, dict):
            name = spec.get("name", name)
            if "dense" in spec and "factored" in spec:
                dense, factored = _int(spec["dense"], "dense"), _int(spec["factored"], "factored")
            elif "shape" in spec:
                dense, factored = layer_param_counts(spec["shape"], spec.get("rank"),
                                                     spec.get("rank_ratio", rank_ratio),
                                                     spec.get("decomposition", "svd"))
            else:
                raise ValueError(f"layer spec {i} must have 'shape' or both 'dense' and 'factored', got keys "
                                 f"{sorted(spec)}")
        elif isinstance(spec, (tuple, list, torch.Size)):
            dense, factored = layer_param_counts(spec, rank_ratio=rank_ratio)
        else:
            raise TypeError(f"layer spec {i} must be a shape tuple or a dict, got {type(spec).__name__}")
        layers.append((name, dense, factored))
    return layers


def param_counts(model_or_layers, rank_ratio=0.5, other_params=0, *, lowrank_ranks=None, scheduler=None):
    """d and d_ρ of Eq. 4–6 from a model or from explicit layer shapes.

    Args:
        model_or_layers: an ``nn.Module`` whose factorized layers are dynrank
            layers (their own dense weights and factors are counted, at their
            current rank, as under Returns; every other trainable parameter, and
            their biases, go to ``other``); or a list of layer specs: a weight shape tuple (rank from
            ``rank_ratio``), a dict ``{"shape", "rank"?, "decomposition"?, "name"?}``,
            or ``{"dense": int, "factored": int}``.
        rank_ratio: ρ for shape specs without a rank.
        other_params: trainable parameters outside the listed layers (BN,
            biases, unfactorized layers); added to both counts.  Must be 0 for a model.
        lowrank_ranks: model only: dict layer name → the rank it has in lowrank form,
            for layers now in adapter form at another rank (a scheduler's ``deflate_rank``).
        scheduler: model only: the model's DynamicRankScheduler; adapter epochs are
            counted at its ``deflate_rank`` (``ParamCounts.adapter``), and an adapter
            layer it deflated at the layer's own rank has that rank in lowrank form.
            A dynrank layer it does not manage (a scheduler of part of the model)
            keeps its form through the run: it counts its current trainable
            parameters in every form.  Without it, every layer follows the schedule,
            and layers not in adapter form count their adapter epochs at their rank.

    Returns:
        :class:`ParamCounts`.  A layer's current form counts the Parameters it has that
        require grad: a factor frozen by hand (``B.requires_grad_(False)``) counts
        nothing, a reparametrized weight or factor (``torch.nn.utils.parametrize``,
        the hook-based ``weight_norm``) the Parameters it is computed from, and a
        Parameter shared by several layers (weights tied in full form) counts once, at
        the first of them in ``named_modules`` order, as it trains once.  Its other
        forms count their shapes, all trainable, as a switch leaves them (a switch
        makes every new tensor trainable unless the whole layer is frozen); a layer
        frozen whole (``requires_grad_(False)``) counts 0 in every form.  An
        adapter-form layer whose lowrank rank neither argument gives counts at its
        current rank here; :func:`comp_ratio` and :func:`cost_report` refuse such a
        model instead.

    Raises:
        TypeError/ValueError: bad specs, counts, ``lowrank_ranks`` (unknown layers,
            invalid ranks, layers ``scheduler`` does not manage) or ``scheduler`` (not
            one of this model).  One weight shape instead of a list of specs
            (``param_counts((64, 64, 3, 3))``) is a TypeError that says to wrap it in a
            list: :func:`layer_param_counts` counts one layer.

    Example:
        >>> c = param_counts([(64, 64, 3, 3)], other_params=100)
        >>> c.full, c.lowrank
        (36964, 20580)
    """
    other_params = _int(other_params, "other_params")
    if isinstance(model_or_layers, nn.Module):
        if other_params:
            raise ValueError("other_params is only for explicit layer lists; a model's other parameters are "
                             "counted from the model")
        return _model_counts(model_or_layers, lowrank_ranks, scheduler)[0]
    if lowrank_ranks is not None or scheduler is not None:
        raise ValueError("lowrank_ranks and scheduler are only for a model; give a spec's rank in the spec")
    if isinstance(model_or_layers, (list, tuple)):
        if model_or_layers and all(isinstance(size, numbers.Integral) and not isinstance(size, bool)
                                    for size in model_or_layers):
            # One weight shape, not a list of them: each size would read as a layer spec.
            shape = tuple(int(size) for size in model_or_layers)
            raise TypeError(f"param_counts takes a list of layer specs, got one weight shape {shape}: wrap it "
                            f"in a list, param_counts([{shape}]) (layer_param_counts({shape}) counts one layer)")
        layers = _from_specs(model_or_layers, rank_ratio)
    else:
        raise TypeError(f"expected an nn.Module or a list of layer specs, got {type(model_or_layers).__name__}")
    return _param_counts(layers, None, other_params)


def _param_counts(layers, adapter_factors, other):
    full = other + sum(d for _, d, _ in layers)
    lowrank = other + sum(f for _, _, f in layers)
    adapter = None if adapter_factors is None else other + sum(adapter_factors)
    return ParamCounts(full=full, lowrank=lowrank, other=other, layers=layers,
                       adapter=None if adapter == lowrank else adapter)


def _model_counts(model, lowrank_ranks=None, scheduler=None, run=None):
    """(ParamCounts, names of adapter layers whose lowrank rank is unknown) of a model."""
    layers, adapter, other, unknown = _from_model(model, lowrank_ranks, scheduler, run)
    return _param_counts(layers, adapter, other), unknown


def _schedule(epochs, inflate_epoch, deflate_epoch):
    E = _int(epochs, "epochs", 1)
    D = E if deflate_epoch is None else _int(deflate_epoch, "deflate_epoch")
    if inflate_epoch is None:
        # DynamicRankScheduler's meaning: start full (I = 0).  Both None is no scheduler at all:
        # plain low-rank training (I = D = E).
        I = E if deflate_epoch is None else 0
    else:
        I = _int(inflate_epoch, "inflate_epoch")
    if not I <= D <= E:
        raise ValueError(f"need 0 ≤ inflate_epoch ≤ deflate_epoch ≤ epochs, got I={inflate_epoch}, "
                         f"D={deflate_epoch}, E={epochs}")
    return E, I, D


def form_epochs(epochs, inflate_epoch, deflate_epoch):
    """Epochs a schedule spends in each form: {"lowrank": I, "full": D − I, "adapter": E − D}.

    None means what it means to :class:`~dynrank.DynamicRankScheduler`: ``inflate_epoch``
    None starts full (I = 0, e.g. :func:`~dynrank.finetune_schedule`'s (None, D));
    ``deflate_epoch`` None stays full to the end (D = E); so (0, None) is full-rank
    training.  Both None (which the scheduler refuses) is plain low-rank training, as (E, E).

    Raises:
        TypeError: non-int epochs.  ValueError: unless 0 ≤ I ≤ D ≤ E.
    """
    E, I, D = _schedule(epochs, inflate_epoch, deflate_epoch)
    return {"lowrank": I, "full": D - I, "adapter": E - D}


def _counts(counts, lowrank_epochs=0, scheduler=None, lowrank_ranks=None, run=None):
    """Checked ParamCounts of ``counts`` for a schedule with ``lowrank_epochs`` lowrank epochs."""
    if isinstance(counts, nn.Module):
        c, unknown = _model_counts(counts, lowrank_ranks, scheduler, run)
        if unknown and lowrank_epochs:
            layers = dict(counts.named_modules())
            raise ValueError(
                f"layers {unknown} are in adapter form (rank {layers[unknown[0]].rank!r} for {unknown[0]!r}), and the "
                f"rank they had in lowrank form, which the schedule's {lowrank_epochs} lowrank epochs count, is not "
                f"known (a scheduler's deflate_rank may have changed it, or a state dict loaded the layer in "
                f"another form); pass run=monitor (a RankMonitor that measured a lowrank epoch), "
                f"lowrank_ranks={{name: rank}}, or the scheduler where its deflate_rank kept each layer's rank; or "
                f"count before training: param_counts(model, scheduler=scheduler)")
    elif scheduler is not None or lowrank_ranks is not None:
        raise ValueError("scheduler and lowrank_ranks are only for a model; counts are "
                         f"{type(counts).__name__}")
    else:
        c = counts if isinstance(counts, ParamCounts) else param_counts(counts)
    # As ints (a numpy integer's ratio would be a numpy float).
    c = replace(c, **{what: check_int(getattr(c, what), f"counts.{what}", "a parameter count (int ≥ 0)", 0)
                      for what in ("full", "lowrank", "other") + (("adapter",) if c.adapter is not None else ())})
    if c.full <= 0:
        raise ValueError(f"counts.full (d, the full model's trainable parameters) must be > 0 to divide by, got "
                         f"{c.full} (a model without trainable parameters has no cost ratio)")
    return c


def comp_ratio(counts, epochs, inflate_epoch, deflate_epoch, *, scheduler=None, lowrank_ranks=None):
    """The paper's Comp. = T_DR / T_F = ((D − I)·d + (E − (D − I))·d_ρ) / (E·d).

    Where the adapter epochs train another d_ρ than the lowrank ones (``counts.adapter``,
    a scheduler's ``deflate_rank``): (I·d_ρ + (D − I)·d + (E − D)·d_ρ,adapter) / (E·d).

    Args:
        counts: :class:`ParamCounts`, or a model / layer list for :func:`param_counts`.
            A model is counted with each layer's lowrank rank for the lowrank
            epochs and its adapter rank for the adapter epochs; after a deflate to
            another rank its lowrank rank must come from ``lowrank_ranks`` or
            ``scheduler`` (see :func:`param_counts`), else this raises.
        epochs: E.  inflate_epoch: I (None: start full, as the scheduler reads it).
        deflate_epoch: D (None: stay full to the end); I and D both None: plain
            low-rank training (see :func:`form_epochs`).  Takes the (I, D) of
            :func:`~dynrank.schedule_from_lr`, :func:`~dynrank.midpoint_schedule`
            and :func:`~dynrank.finetune_schedule` as they come.

        scheduler, lowrank_ranks: for a model, see :func:`param_counts`.

    Returns:
        float ≥ 0; at most 1 unless d_ρ > d (a rank so high that the factors outweigh W).

    Raises:
        TypeError: non-int epochs or counts.  ValueError: unless 0 ≤ I ≤ D ≤ E; negative
            counts, or d = 0 (nothing to divide by); a model with adapter-form layers
            whose lowrank rank is unknown while the schedule has lowrank epochs.

    Example:
        >>> comp_ratio(ParamCounts(full=272762, lowrank=155170, other=0), 150, 60, 135)   # doctest: +ELLIPSIS
        0.7844...
    """
    E, I, D = _schedule(epochs, inflate_epoch, deflate_epoch)
    return _comp(_counts(counts, I, scheduler, lowrank_ranks), E, I, D)


def _comp(c, E, I, D):
    adapter = c.lowrank if c.adapter is None else c.adapter
    return (I * c.lowrank + (D - I) * c.full + (E - D) * adapter) / (E * c.full)


def _records(run, what="run"):
    records = run.records if hasattr(run, "records") else run
    if not isinstance(records, (list, tuple)):
        raise TypeError(f"{what} must be a RankMonitor or its list of epoch records (dicts), got "
                        f"{type(run).__name__}")
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise TypeError(f"{what} must be a RankMonitor or its list of epoch records (dicts); record {i} is "
                            f"{type(rec).__name__} ({rec!r})")
    return list(records)


def _where(rec, i):
    return f" in record {i}" + (f" (epoch {rec['epoch']!r})" if "epoch" in rec else "")


def _seconds(rec, i):
    """The record's wall_seconds: None (not timed), else a finite number ≥ 0."""
    seconds = rec.get("wall_seconds")
    if seconds is None:
        return None
    where = _where(rec, i)
    check_real(seconds, "wall_seconds", "a finite number ≥ 0 or None", where)
    if not 0.0 <= seconds < math.inf:
        raise ValueError(f"wall_seconds must be a finite number ≥ 0 or None, got {seconds!r}{where}")
    return float(seconds)


def _form(rec, i):
    """A timed record's form: a str (its seconds are grouped and reported under it)."""
    if "form" not in rec:
        raise ValueError(f"a timed record needs its 'form' (the form its seconds were timed in, e.g. 'lowrank'), "
                         f"got none{_where(rec, i)} (keys {sorted(map(str, rec))})")
    form = rec["form"]
    if not isinstance(form, str):
        raise TypeError(f"form must be a str (the form the seconds were timed in, e.g. 'lowrank'), got "
                        f"{type(form).__name__} ({form!r}){_where(rec, i)}")
    return form


def epoch_times(run, skip_first=0):
    """Wall-clock seconds of the recorded epochs, grouped by the epoch's form.

    Args:
        run: a :class:`~dynrank.RankMonitor` (live or loaded) or its ``records``
            (dicts with ``"form"`` and ``"wall_seconds"``; epochs whose
            ``wall_seconds`` is None are left out, the others need a ``form``).
        skip_first: drop this many epochs after each change of form (warm-up,
            kernel compilation); 0 keeps every epoch (the real cost).

    Returns:
        dict form → list of seconds; forms are ``"lowrank"``, ``"full"``,
        ``"adapter"``, ``"dense"`` (no dynrank layers) or ``"mixed"`` (the watched
        dynrank layers in different forms, see :class:`~dynrank.RankMonitor`).

    Raises:
        TypeError: ``run`` is not a RankMonitor or a list of record dicts; a non-int ``skip_first``; a
            ``wall_seconds`` that is not a number (nor None); a timed record's ``form`` that is not a str.
        ValueError: a negative ``skip_first``; a ``wall_seconds`` that is negative, NaN or infinite; a
            timed record without ``form``.  Each error names the record.
    """
    skip_first = _int(skip_first, "skip_first")
    out, last, since = {}, None, 0
    for i, rec in enumerate(_records(run)):
        form = rec.get("form")
        since = since + 1 if form == last else 1
        last = form
        seconds = _seconds(rec, i)
        if seconds is None:
            continue
        form = _form(rec, i)
        if since <= skip_first:
            continue
        out.setdefault(form, []).append(seconds)
    return out


def _mixed_note(run):
    """What an error about a missing form adds where ``run`` has epochs recorded as ``"mixed"``."""
    mixed = [rec.get("epoch", i) for i, rec in enumerate(_records(run)) if rec.get("form") == "mixed"]
    if not mixed:
        return ""
    return (f"; its epochs {mixed} are recorded as 'mixed' (the watched dynrank layers in different forms, "
            f"as with a scheduler of part of the model and the rest in another form) and count as no form: "
            f"record the run with the scheduler attached to the monitor, or with RankMonitor(model, layers=[the "
            f"scheduled layers]), so that each epoch has its scheduled layers' form; in records made already, "
            f"set those epochs' 'form' to the form the scheduled layers had")


def measured_comp_ratio(run, epochs=None, inflate_epoch=None, deflate_epoch=None, full_epoch_seconds=None,
                        skip_first=0):
    """Wall-clock counterpart of :func:`comp_ratio`, from per-form epoch times.

    With a schedule (``epochs`` given): (I·t_lowrank + (D − I)·t_full +
    (E − D)·t_adapter) / (E·t_full), using the mean epoch time t of each form
    in ``run`` (a form not needed by the schedule may be missing).  Without
    one: Σ recorded epoch times / (number of epochs · t_full) — the run as
    it happened.

    Args:
        run: RankMonitor or its records.
        epochs, inflate_epoch, deflate_epoch: optional schedule E, I, D (None as
            in :func:`form_epochs`).
        full_epoch_seconds: t_full from a separate full-rank run (a finite number
            > 0, or its RankMonitor); default: this run's full-form epochs.  A run
            given here must time what ``run`` times: epochs (a RankMonitor) or steps
            (a :class:`~dynrank.FormProfile`).
        skip_first: see :func:`epoch_times`.

    Returns:
        float (can exceed 1 when low-rank epochs are slower than full ones).

    Raises:
        TypeError: ``run`` / ``full_epoch_seconds`` of the wrong type; a ``wall_seconds`` that is not a
            number (see :func:`epoch_times`).
        ValueError: no full-form epoch time (or one of 0 s), a ``full_epoch_seconds``
            that is not a finite number > 0 or is a run timing steps where ``run`` times
            epochs (or the other way round), a negative, NaN or infinite ``wall_seconds``,
            no timed epoch, a needed form has no recorded epoch, a bad schedule, or
            ``inflate_epoch``/``deflate_epoch`` without ``epochs``.  Epochs recorded as
            ``"mixed"`` stand for no form; where a needed form is missing and the run has
            them, the message says how to record each epoch under its scheduled form.
    """
    if epochs is None and (inflate_epoch is not None or deflate_epoch is not None):
        # Without E the ratio is the run's own, and I and D would be ignored silently.
        raise ValueError(f"inflate_epoch and deflate_epoch need epochs (the schedule's E), got epochs=None with "
                         f"inflate_epoch={inflate_epoch!r}, deflate_epoch={deflate_epoch!r}")
    times = epoch_times(run, skip_first)
    mean = {form: sum(v) / len(v) for form, v in times.items() if v}
    if full_epoch_seconds is None:
        t_full = mean.get("full", mean.get("dense"))
    elif isinstance(full_epoch_seconds, numbers.Real) and not isinstance(full_epoch_seconds, bool):
        if not 0.0 < full_epoch_seconds < math.inf:
            raise ValueError(f"full_epoch_seconds must be a finite number > 0 (seconds of one full-rank epoch), "
                             f"got {full_epoch_seconds!r}")
        t_full = float(full_epoch_seconds)
    else:
        if not hasattr(full_epoch_seconds, "records") and not isinstance(full_epoch_seconds, (list, tuple)):
            raise TypeError(f"full_epoch_seconds must be seconds (a number) or a full-rank run (a RankMonitor or "
                            f"its records), got {type(full_epoch_seconds).__name__}")
        run_unit, base_unit = _time_unit(run), _time_unit(_records(full_epoch_seconds, "full_epoch_seconds"))
        if _records(run) and run_unit != base_unit:
            # Seconds per step over seconds per epoch: off by the steps per epoch.
            raise ValueError(f"full_epoch_seconds holds seconds per {base_unit} but run holds seconds per "
                             f"{run_unit}: pass a full-rank baseline timed per {run_unit} (profile_forms' step "
                             f"times beside a profile, a RankMonitor's epoch times beside a monitor), or t_full as "
                             f"seconds per {run_unit}")
        base = {form: sum(v) / len(v)
                for form, v in epoch_times(_records(full_epoch_seconds, "full_epoch_seconds"), skip_first).items()
                if v}
        t_full = base.get("full", base.get("dense"))
    if t_full is None:
        base_run = run if full_epoch_seconds is None else full_epoch_seconds
        raise ValueError(f"no full-form epoch time: record full-rank epochs or pass full_epoch_seconds"
                         f"{_mixed_note(base_run)}")
    if t_full <= 0.0:
        raise ValueError(f"the full-form epochs took {t_full} s on average; a ratio over them is undefined")
    if epochs is None:
        count = sum(len(v) for v in times.values())
        if not count:
            raise ValueError("the run has no timed epochs (no record with wall_seconds)")
        return sum(sum(v) for v in times.values()) / (count * t_full)
    need = form_epochs(epochs, inflate_epoch, deflate_epoch)
    t = dict(mean, full=t_full)
    missing = [form for form, n in need.items() if n > 0 and form not in t]
    if missing:
        raise ValueError(f"the schedule needs {missing} epochs but the run recorded none (recorded: {sorted(mean)})"
                         f"{_mixed_note(run)}")
    return sum(n * t[form] for form, n in need.items() if n > 0) / (sum(need.values()) * t_full)


@dataclass
class CostReport:
    """The paper's proxy and (optionally) the measured cost of one schedule.

    Attributes:
        epochs, inflate_epoch, deflate_epoch: the schedule E, I, D.
        counts: the :class:`ParamCounts` behind the ratios.
        comp_ratio: the paper's Comp. (:func:`comp_ratio`); lowrank_ratio: d_ρ / d.
        measured_ratio: :func:`measured_comp_ratio` of the run, None without one.
        epoch_seconds: form → mean wall-clock seconds of the run's records in that form:
            of one epoch for a :class:`~dynrank.RankMonitor`'s, of one step for a
            :class:`~dynrank.FormProfile` (``per`` says which).
        per: ``"epoch"`` or ``"step"``, what one of ``epoch_seconds`` times.
    """

    epochs: int
    inflate_epoch: int
    deflate_epoch: int
    counts: ParamCounts
    comp_ratio: float
    lowrank_ratio: float
    measured_ratio: Optional[float] = None
    epoch_seconds: dict = field(default_factory=dict)
    per: str = "epoch"

    def __str__(self):
        adapter = "" if self.counts.adapter is None else f", adapter d_rho={self.counts.adapter:,}"
        lines = [f"schedule E={self.epochs}, I={self.inflate_epoch}, D={self.deflate_epoch}",
                 f"trainable parameters: full d={self.counts.full:,}, low-rank d_rho={self.counts.lowrank:,}{adapter}",
                 f"Comp. (paper, parameter counts): {self.comp_ratio:.4f}   (low-rank only: {self.lowrank_ratio:.4f})"]
        if self.measured_ratio is not None:
            per = ", ".join(f"{k} {v:.3g} s" for k, v in sorted(self.epoch_seconds.items()))
            lines.append(f"measured (wall-clock per {self.per}: {per}): {self.measured_ratio:.4f}")
        return "\n".join(lines)


def cost_report(counts, epochs, inflate_epoch, deflate_epoch, run=None, full_epoch_seconds=None, skip_first=0, *,
                scheduler=None, lowrank_ranks=None):
    """Both ratios side by side for one schedule.

    Args:
        counts: :class:`ParamCounts`, a model, or a layer list.  A model after its
            deflate (as after the training loop) is counted as in :func:`comp_ratio`:
            the rank each layer had in lowrank form comes from ``lowrank_ranks``,
            ``scheduler`` or the lowrank epochs ``run`` measured.
        epochs, inflate_epoch, deflate_epoch: E, I, D.
        run: optional RankMonitor whose epoch times give the measured ratio, or a
            :class:`~dynrank.FormProfile` whose step times do (the report then gives
            seconds per step).
        full_epoch_seconds, skip_first: see :func:`measured_comp_ratio`.
        scheduler, lowrank_ranks: for a model, see :func:`param_counts`.

    Returns:
        :class:`CostReport` (``print`` it for a summary).

    Raises:
        TypeError/ValueError: as :func:`comp_ratio` and :func:`measured_comp_ratio`.

    Example:
        >>> c = ParamCounts(full=272762, lowrank=155170, other=0)
        >>> print(cost_report(c, 150, 60, 135))          # doctest: +NORMALIZE_WHITESPACE
        schedule E=150, I=60, D=135
        trainable parameters: full d=272,762, low-rank d_rho=155,170
        Comp. (paper, parameter counts): 0.7844   (low-rank only: 0.5689)
    """
    E, I, D = _schedule(epochs, inflate_epoch, deflate_epoch)
    c = _counts(counts, I, scheduler, lowrank_ranks, run)
    report = CostReport(E, I, D, c, _comp(c, E, I, D), c.lowrank / c.full)
    if run is not None:
        report.measured_ratio = measured_comp_ratio(run, E, I, D, full_epoch_seconds, skip_first)
        report.epoch_seconds = {k: sum(v) / len(v) for k, v in epoch_times(run, skip_first).items() if v}
        report.per = _time_unit(run)
    return report


def _time_unit(run):
    """``"step"`` for :func:`~dynrank.profile_forms`' step times (a FormProfile or its records: ``step``,
    no ``epoch``), else ``"epoch"``."""
    records = _records(run)
    return "step" if records and all("step" in r and "epoch" not in r for r in records) else "epoch"
