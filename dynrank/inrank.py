"""InRank-style incremental rank: low-rank layers whose rank grows when their spectrum asks for it.

An alternative to the inflate/deflate schedule with no full-rank phase
(reference: Zhao et al., *InRank: Incremental Low-Rank Learning*).  Each
managed layer keeps a *discovered* rank r and trains r + ``buffer``
components.  Every ``check_every`` steps after ``warmup_steps``, the singular
values σ of the layer's low-rank product s·A·Bᵀ (the whole weight in lowrank
form, the cumulative update in adapter form) are tested: the new r is the
smallest k in [r, r + buffer) whose top-k spectrum explains the spectrum,

    1 − var(σ − σ_top-k) / var(σ) > threshold,

else r + buffer − 1; the layer then grows to r + buffer components.  Ranks
never shrink during training.  Growth appends components whose A columns are
zero and B columns random (B columns zero and A columns random where A is
frozen by hand and B trains, so that they train), so the layer's function is
unchanged at the switch (with ``alpha`` set, the old A is rescaled to keep
s·A·Bᵀ fixed) and the optimizer keeps the old components' state (SGD's
momentum, Adam's, RMSprop's and Adagrad's entries; other optimizers' state
starts afresh).

Growth replaces A and B (one for one, each in its own param group), so
whatever else holds them must follow: an EMA or SWA copy of the model grows
with it once given to :meth:`IncrementalRankScheduler.add_model_copy`, and a
DDP wrapper is rebuilt (:mod:`dynrank.distributed`).
"""

import warnings
import weakref
from collections.abc import Mapping

import torch

from ._args import check_int, check_real
from ._claims import (_GROWERS, RECORD_KEYS, _Claiming, _alpha_mismatch, _check_layers_held, _check_other_kind,
                      _check_saved_alpha, _check_saved_forms, _check_saved_record, _layer_record)
from ._checks import (call_back, check_copy, check_editable_optimizer, check_finite, check_model_and_optimizer,
                      check_new_copy, check_not_sharded, check_not_unconverted, check_same_layers, check_switchable,
                      check_sync, check_trains_factors, check_trains_layers, check_untied, fork_layer_rngs,
                      remove_copy, shown_names, unwrap_model)
from ._forms import outside_inference_mode
from ._optim import SQUARED_STATE, _split_state, manage, replace_params, warn_dampened
from ._readers import guard_attention
from .conv import LowRankConv2d
from .distributed import _remember_ddp, _retire_stale, _sync_layers
from .linear import FusedLowRankLinear, svd_factors
from .metrics import _check_not_meta
from .spectra import _as_sigma

__all__ = ["IncrementalRankScheduler", "grow_rank_", "explained_rank"]


def explained_rank(singular_values, current, buffer, threshold):
    """InRank's rank rule: smallest k in [current, current+buffer) explaining more than ``threshold`` of the spectrum.

    Args:
        singular_values: 1-D tensor σ (any order; sorted descending here).
        current: discovered rank so far.
        buffer: how far past ``current`` to look.
        threshold: explained-variance level in (0, 1).

    With ``buffer=1`` the only candidate is ``current`` itself: the rank never grows.

    A spectrum of zero variance has no k explaining it (1 − var(σ − σ_top-k)/var(σ) is 0/0 or −inf):
    a constant nonzero σ gives ``current + buffer − 1`` as the rule says, but an all-zero σ (nothing
    learned yet, e.g. a fresh adapter's zero product) gives ``current``: there is nothing to grow for.

    Returns:
        int: the new discovered rank (≥ ``current``; ``current + buffer − 1``, capped at the number of
        singular values but never below ``current``, if none explains enough; ``current`` for an
        all-zero or empty spectrum).

    Raises:
        TypeError: ``singular_values`` not a real floating-point tensor, ``current`` or ``buffer`` not
            an int, ``threshold`` not a number.
        ValueError: ``singular_values`` not 1-D, on the meta device, or holding a NaN, ±inf or
            negative value; ``current`` below 0, ``buffer`` below 1, ``threshold`` outside (0, 1).
    """
    if not isinstance(singular_values, torch.Tensor) or not singular_values.is_floating_point():
        came = singular_values.dtype if isinstance(singular_values, torch.Tensor) else type(singular_values).__name__
        raise TypeError(f"singular_values must be a real floating-point tensor, got {came}")
    if singular_values.dim() != 1:
        raise ValueError(f"singular_values must be a 1-D tensor, got shape {tuple(singular_values.shape)}")
    if singular_values.numel():
        _as_sigma(singular_values)                  # values: not meta, finite, ≥ 0
    current = check_int(current, "current", "an int >= 0", 0)
    buffer, threshold, _, _ = _check_settings(buffer, threshold, 0, 1)
    sigma = torch.sort(singular_values.detach().double().flatten(), descending=True).values
    if not sigma.numel():                           # a layer with no rows or columns: nothing to explain
        return current
    total = sigma.var(unbiased=False)
    # The candidates k run to current + buffer − 1; past the n singular values every k explains all of σ as
    # k = n does (σ − σ_top-k is zero), so n is the last one tried.
    n = sigma.numel()
    fallback = max(current, min(current + buffer - 1, n))
    if total <= 0:                                  # no k explains a zero-variance spectrum
        return current if not sigma.any() else fallback
    for k in range(current, min(current + buffer, n + 1)):
        tail = sigma.clone()
        tail[:k] = 0.0
        if 1.0 - (tail.var(unbiased=False) / total).item() > threshold:
            return k
    return fallback


def _lowrank_singular_values(layer):
    """All min(out, in) singular values of the layer's product scale·A·Bᵀ, its zeros included.

    InRank's rule is a variance over the whole spectrum of the active product (the authors' code takes
    the svdvals of the out×in product), and a variance depends on how many entries it averages: the
    rank nonzero values alone gave another rank (7 instead of 6 for σᵢ = 0.8ⁱ, current 2, buffer 8).
    The nonzero ones come from the rank×rank core of the QR factors, the rest are exact zeros.
    """
    A, B = layer.A.detach().double(), layer.B.detach().double()
    _, ra = torch.linalg.qr(A)
    _, rb = torch.linalg.qr(B)
    sigma = torch.linalg.svdvals(layer.scale * (ra @ rb.t()))
    return torch.cat([sigma, sigma.new_zeros(min(A.shape[0], B.shape[0]) - sigma.numel())])


def _pad_state(state, param, extra, ratio):
    """The state of a factor grown by ``extra`` columns, or None (it starts empty).

    Only entries dynrank knows the meaning of are padded (first moments with zeros, second moments
    with the old mean); a state with any other tensor entry (Adamax's ``exp_inf``, Adadelta's
    ``acc_delta``, Rprop's ``step_size``, Adafactor's factored ``row_var``/``col_var``) starts empty,
    as after a reset, rather than with values the optimizer would not have made: the entries a switch
    carries (:func:`dynrank._optim._split_state`).
    """
    split = _split_state(state, param.shape)
    if split is None:
        return None
    tensors, out = split
    for key, value in tensors.items():
        if key in SQUARED_STATE:
            value = value / (ratio * ratio)
            fill = value.mean().expand(value.shape[0], extra)
        else:                                   # LINEAR_STATE
            value = value / ratio
            fill = torch.zeros(value.shape[0], extra, dtype=value.dtype, device=value.device)
        out[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
    return out


def _zeros_A(layer):
    """Whether new components of ``layer`` get their zero in A (the layer's zero-output init): all but where A is
    frozen and B trains, since a zero A column that stays frozen gives its B column a zero gradient forever.
    With both frozen nothing trains either way: the usual init."""
    return layer.A.requires_grad or not layer.B.requires_grad


def _zero_output_init(layer, rank, device, dtype):
    """Dict A, B of ``rank`` new components of ``layer`` with a zero product that train: the layer's
    zero-output init (A columns zero, B columns Glorot-normal), or where A is frozen and B trains the other
    way round (A columns Glorot-normal, B columns zero); see :func:`_zeros_A`."""
    if _zeros_A(layer):
        return layer._init_factors(rank, True, device=device, dtype=dtype)
    A = layer._init_factors(rank, False, device=device, dtype=dtype)["A"]
    return {"A": A, "B": torch.zeros(layer.in_features, rank, device=device, dtype=dtype)}


def grow_rank_(layer, new_rank, optimizer=None):
    """Grow a FusedLowRankLinear (lowrank or adapter form) to ``new_rank`` components, in place.

    New components: A columns zero, B columns Glorot-normal (the layer's own
    zero-output init), so the output is unchanged; with ``alpha`` set the old
    A is multiplied by new_rank/old_rank to keep s·A·Bᵀ fixed.  A factor frozen
    by hand stays frozen; where that is A and B trains, the zero goes to B
    instead (B columns zero, A columns Glorot-normal), since a zero A column
    kept frozen would give its B column a zero gradient forever: the new
    components train and the output is unchanged.  With both factors frozen
    the new components train no more than the old ones.  If
    ``optimizer`` is given, the new A and B replace the old ones in place and
    keep their state: old columns as they were (rescaled with A), new columns
    with zero first moments and second moments at the old mean (so Adam's
    first steps on them are not inflated by a late ``step`` count).  That is
    SGD's momentum, Adam's, RMSprop's and Adagrad's entries; any other state
    (Adamax, Adadelta, Rprop, ASGD, Adafactor) starts afresh, as after a
    reset, and L-BFGS starts its history afresh.  The replaced A and B lose their ``.grad``
    (call it between optimizer steps: a pending gradient is dropped with them).  Fused SGD with
    ``dampening`` gives a factor without a momentum buffer, in a group where others have one, a zero
    buffer (it cannot step the group otherwise), so its first step is (1 − dampening)·lr·g: a warning
    says so.  A trainable factor the optimizer leaves out while it holds the other (B trained by a
    second optimizer) gets a warning naming it: its replacement joins no optimizer, and the second
    one steps the old tensor from then on.

    Args:
        layer: FusedLowRankLinear in lowrank or adapter form.
        new_rank: int, layer.rank ≤ new_rank ≤ min(in, out).
        optimizer: optional ``torch.optim.Optimizer`` holding A and B.

    Returns:
        the layer.

    Raises:
        TypeError: not a FusedLowRankLinear, a non-int ``new_rank``, or an
            ``optimizer`` that is neither a ``torch.optim.Optimizer`` nor None.
        ValueError: full form, or ``new_rank`` below the current rank or above the limit.
            Arguments are checked before the layer changes.

    Example:
        >>> import torch
        >>> from dynrank import FusedLowRankLinear, grow_rank_
        >>> layer = FusedLowRankLinear(32, 32, rank=4)
        >>> optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        >>> x = torch.randn(8, 32)
        >>> before = layer(x)
        >>> layer = grow_rank_(layer, layer.rank + 4, optimizer)
        >>> layer.rank, tuple(layer.A.shape), torch.allclose(layer(x), before, atol=1e-6)
        (8, (32, 8), True)
        >>> params = optimizer.param_groups[0]["params"]            # the optimizer trains the new factors
        >>> any(p is layer.A for p in params) and any(p is layer.B for p in params)
        True
    """
    return _grow_rank_(layer, new_rank, optimizer, "grow_rank_")


@outside_inference_mode
@torch.no_grad()
def _grow_rank_(layer, new_rank, optimizer, who):
    """:func:`grow_rank_`; ``who`` names the caller in the warning of a factor the optimizer leaves out, None
    for a scheduler (it warned when it was built, :func:`~dynrank._checks.check_trains_layers`)."""
    if not isinstance(layer, FusedLowRankLinear):
        raise TypeError(f"grow_rank_ takes a FusedLowRankLinear, got {type(layer).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if optimizer is not None:
        check_editable_optimizer(optimizer)
    if layer.form == "full":
        raise ValueError("grow_rank_ applies to lowrank or adapter form, the layer is full")
    layer._check_switchable()
    old_rank, limit = layer.rank, min(layer.in_features, layer.out_features)
    new_rank = check_int(new_rank, "new_rank", f"an int in [1, {limit}] (min(in_features, out_features))", 1, limit)
    if new_rank < old_rank:
        raise ValueError(f"new_rank must be >= the current rank {old_rank} (ranks never shrink), got {new_rank}")
    if new_rank == old_rank:
        return layer
    if optimizer is not None and who is not None:
        check_trains_factors(optimizer, [("", layer)], who)
    extra = new_rank - old_rank
    old_A, old_B = layer.A, layer.B
    ratio = layer.scale_for(old_rank) / layer.scale_for(new_rank)
    fresh = _zero_output_init(layer, extra, old_A.device, old_A.dtype)
    A = torch.cat([old_A.detach() * ratio, fresh["A"]], dim=1)
    B = torch.cat([old_B.detach(), fresh["B"]], dim=1)
    _install(layer, A, B, new_rank)
    if optimizer is not None:
        states = {}
        for old, new, r in ((old_A, layer.A, ratio), (old_B, layer.B, 1.0)):
            state = optimizer.state.get(old)
            if state:
                padded = _pad_state(state, old, extra, r)
                if padded is not None:
                    states[new] = padded
        zero_filled = []
        replace_params(optimizer, [old_A, old_B], [layer.A, layer.B], states, owner=layer,
                       old_names=dict(zip(map(id, (old_A, old_B)), "AB")), zero_filled=zero_filled)
        warn_dampened(zero_filled, f"at this rank growth ({old_rank} → {new_rank})", None)
    old_A.grad = old_B.grad = None
    return layer


def _install(layer, A, B, rank):
    """Make ``A``, ``B`` the layer's factors at ``rank``, each as trainable as the one it replaces (a
    factor the user froze stays frozen: :meth:`~dynrank._forms.FormLayer._become`)."""
    layer._become(layer.form, layer.weight, {"A": A, "B": B}, rank)


@outside_inference_mode
@torch.no_grad()
def _follow_growth(copy_layer, layer):
    """Grow ``copy_layer`` (a model copy's) to ``layer``'s new rank as ``layer`` just grew, drawing no
    random numbers (the run's RNG stream is the same with or without copies).

    The copy's old columns stay its own (A rescaled as the model's was), so it keeps computing its
    averaged function; its new columns are the model's new ones (one factor's zero, the other's fresh),
    as the average of a component that exists from now on starts at its value.  Parameter names and
    order are kept, so an AveragedModel pairs the wider A, B with the model's.  A copy kept out of
    autograd stays out.  Run outside ``torch.inference_mode``
    (:func:`~dynrank._forms.outside_inference_mode`), as ``grow_rank_``: the copy's new A and B are
    ordinary tensors that load and train.
    """
    old_rank, new_rank = copy_layer.rank, layer.rank
    ratio = copy_layer.scale_for(old_rank) / copy_layer.scale_for(new_rank)
    old, wide = (copy_layer.A, copy_layer.B), []
    for ours, theirs, r in zip(old, (layer.A, layer.B), (ratio, 1.0)):
        wide.append(torch.cat([ours.detach() * r, theirs.detach()[:, old_rank:].to(ours)], dim=1))
    _install(copy_layer, *wide, new_rank)


@outside_inference_mode
@torch.no_grad()
def _truncate_rank_(layer, rank, optimizer=None):
    """Best rank-``rank`` factors of the current product (construction / loading only).

    A component whose singular value is zero (every one of a fresh adapter's zero product, the surplus
    of a rank-deficient one) would get zero A and B columns, a saddle point that never receives a
    gradient: it gets the layer's zero-output init instead (A column zero, B column random; where A is
    frozen by hand and B trains, B column zero and A column random, as :func:`grow_rank_` gives), so the
    product is the same (up to the rounding of the layer's dtype) and every component trains.  The
    SVD fit and its test for zero are :func:`~dynrank.linear.svd_factors`, which ``from_dense`` and
    ``deflate(init="svd")`` use too.  The product is built in float64, and zero is judged by the layer's
    dtype: held in a 16-bit dtype, a rank-deficient product's rounding would turn its surplus components
    into noise ones.  Runs outside ``torch.inference_mode``, as ``grow_rank_``: the new factors are
    ordinary parameters that train.
    """
    layer._check_switchable()
    old = [layer.A, layer.B]
    merged = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64, device=layer.A.device)
    layer._merge_into_(merged, 1.0, layer.factors())
    scale, dtype = layer.scale_for(rank), layer.A.dtype
    if _zeros_A(layer):
        A, B = svd_factors(merged, rank, scale, dtype=dtype,
                           fresh=lambda: _zero_output_init(layer, rank, merged.device, dtype)["B"])
    else:
        # svd_factors zeroes the first factor's column of a zero component: fit the transpose B·Aᵀ to zero B's.
        B, A = svd_factors(merged.t(), rank, scale, dtype=dtype,
                           fresh=lambda: _zero_output_init(layer, rank, merged.device, dtype)["A"])
    _install(layer, A.to(old[0].dtype), B.to(old[1].dtype), rank)
    if optimizer is not None:
        replace_params(optimizer, old, [layer.A, layer.B], owner=layer, old_names=dict(zip(map(id, old), "AB")))
    for p in old:
        p.grad = None


def _check_settings(buffer, threshold, warmup_steps, check_every):
    """Validated (buffer, threshold, warmup_steps, check_every) of an IncrementalRankScheduler."""
    buffer = check_int(buffer, "buffer", "an int >= 1", 1)
    warmup_steps = check_int(warmup_steps, "warmup_steps", "an int >= 0", 0)
    check_every = check_int(check_every, "check_every", "an int >= 1", 1)
    check_real(threshold, "threshold", "a float in (0, 1)")
    if not 0 < threshold < 1:                       # NaN fails this too
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    return buffer, float(threshold), warmup_steps, check_every


def _check_ranks(init_rank, max_rank):
    """Validated (init_rank, max_rank) of an IncrementalRankScheduler: each a positive int or None."""
    if init_rank is not None:
        init_rank = check_int(init_rank, "init_rank", "a positive int or None", 1)
    if max_rank is not None:
        max_rank = check_int(max_rank, "max_rank", "an int or None")
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    return init_rank, max_rank


class IncrementalRankScheduler(_Claiming):
    """Grow the rank of low-rank layers during training by InRank's explained-variance rule.

    Manages every :class:`FusedLowRankLinear` of the model in lowrank or adapter
    form: linear layers only.  A :class:`~dynrank.LowRankConv2d` in lowrank or
    adapter form (``convert_model`` makes them of a CNN's convolutions) keeps
    its rank for the whole run, and the constructor warns (``UserWarning``)
    naming such layers.

    At construction each layer is set to ``init_rank + buffer``
    components (truncated SVD of its current product when that is fewer, zero-
    output padding when more); with ``init_rank=None`` each layer keeps its
    rank (truncated to ``max_rank`` when above it) and its discovered rank
    starts at that rank − buffer (at least 1).  In the truncated SVD,
    components of singular value zero (all of a fresh adapter's, whose
    product is zero) get the zero-output init rather than zero factors: same
    product, but they train.  Their zero columns, as those of padded and grown
    components, are A's, or B's where A is frozen by hand and B trains (see
    :func:`grow_rank_`).  Call :meth:`step` after every optimizer step (before
    the next forward).

    With ``buffer=1`` nothing ever grows: the rule's only candidate is the
    discovered rank itself (:func:`explained_rank`).

    The layers must stay in lowrank or adapter form: a check that meets a
    layer in full form (inflated since, by hand) raises a ValueError.  The
    two schedulers are not meant to drive one model: a layer that a live
    :class:`~dynrank.DynamicRankScheduler` manages is refused at construction,
    naming it (and a DynamicRankScheduler refuses this scheduler's layers);
    let go of the one first.  A scheduler grows the layers the model holds
    in lowrank or adapter form when it is built, under the names they have
    then: such a layer added to the model since, or one swapped out, makes
    the next check (a :meth:`step` where one is due) and a load raise a
    ValueError naming them; a layer only renamed (a wrapper put around its
    block) is the same layer.

    Copies: as a DynamicRankScheduler's (see there), a scheduler copies and
    pickles with its model and optimizer and acts as one built over the
    copies: a model load that resizes a copied layer edits the copied
    optimizer, the copied layers refuse a DynamicRankScheduler, the copied
    model's other layers are left to it, and the copied run grows as the
    original would.

    Growth edits the optimizer in place: each wider factor takes the old one's
    place in its own param group (a B kept in a group of its own, LoRA+-style,
    stays there), its state padded (see :func:`grow_rank_`), so LR schedulers,
    a ``GradScaler``, clipping and foreach, fused and L-BFGS optimizers keep
    working.  An EMA or SWA copy of the model grows with it once given to
    :meth:`add_model_copy`.

    ``torch.compile``: a compiled model follows the growth (same results as eager), but growth
    changes A's and B's shapes, and dynamo keeps parameter shapes static by default: every step that
    grows a layer compiles the model anew, and past ``torch._dynamo.config.recompile_limit`` (8) such
    steps dynamo runs it eagerly from then on (it warns once).  Set
    ``torch._dynamo.config.force_parameter_static_shapes = False`` before the first compiled call:
    the first growth then makes the ranks dynamic sizes, and later growth reuses that graph (two
    compiles in all).  With ``alpha`` set, the scale alpha/rank is a constant of each graph and every
    growth still recompiles: raise ``recompile_limit`` to the number of growth steps instead (torch
    before 2.7 names it ``cache_size_limit``, a name later versions keep as an alias).

    Args:
        model: the model (or a DistributedDataParallel around it).  A resize
            (construction, a :meth:`step` that grows, :meth:`load_state_dict`)
            retires the wrapper given here, or the last one
            :func:`~dynrank.distributed.rewrap_ddp` built, as
            :class:`~dynrank.DynamicRankScheduler` does; a wrapper built by
            hand and never passed to dynrank is left alone.
        optimizer: the ``torch.optim.Optimizer`` training it; edited in place.
        init_rank: discovered rank to start from (InRank: 2), or None (each
            layer's rank − buffer, see above).
        buffer: components trained beyond the discovered rank (InRank: 100;
            scale it to your layer widths).
        threshold: explained-variance level in (0, 1) (InRank: 0.9).
        warmup_steps: steps before the first check (InRank: 200).
        check_every: steps between checks (InRank: 25).
        max_rank: int cap on the trained components (default and upper bound min(in, out));
            a layer above it is truncated to it at construction, also with ``init_rank=None``.
        sync_ranks, process_group: broadcast the layers' parameters and buffers from
            rank 0 here and new components at each growth under data parallelism:
            True/False (default None: when ``model`` is a DistributedDataParallel;
            a bare module in a group of several processes must say which) and a
            ``torch.distributed.ProcessGroup`` or None, as for
            :class:`~dynrank.DynamicRankScheduler`.  Every rank must build the
            scheduler and call :meth:`step`.

    Raises:
        TypeError: a non-module model, a non-optimizer, an ``init_rank``, ``buffer``,
            ``warmup_steps``, ``check_every`` or ``max_rank`` that is not an int (None
            allowed for ``init_rank`` and ``max_rank``; a numpy integer is an int), a
            non-number ``threshold``, a non-bool ``sync_ranks``, a ``process_group`` that
            is not a ProcessGroup.
        ValueError: an int setting out of range (``warmup_steps`` below 0, the others
            below 1), ``threshold`` outside (0, 1), no FusedLowRankLinear in
            lowrank/adapter form (the message names the LowRankConv2d layers of
            a model whose only lowrank/adapter layers are convolutions), an
            optimizer holding no trainable factor of any layer (built before
            ``convert_model``), layers a live ``DynamicRankScheduler`` manages
            (named), layers FSDP sharded (named: keep them out, ``fully_shard(
            model, ignored_params=dynrank.distributed.dynrank_params(model))``),
            or (``init_rank`` below a layer's rank) a layer whose factors hold
            NaN/inf.  All checks run before any layer is resized.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynrank import IncrementalRankScheduler, convert_model
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> _ = convert_model(model, rank_ratio=0.5)            # layer "0": rank 32; "2" stays dense
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        >>> growth = IncrementalRankScheduler(model, optimizer, init_rank=2, buffer=4, warmup_steps=0,
        ...                                   check_every=1)
        >>> model[0].rank                                        # init_rank + buffer components
        6
        >>> for step in range(3):
        ...     loss = model(torch.randn(32, 64)).square().mean()
        ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
        ...     grown = growth.step()                            # [(name, old rank, new rank), ...]
        >>> 6 <= model[0].rank <= 32
        True
    """

    def __init__(self, model, optimizer, init_rank=2, buffer=8, threshold=0.9, warmup_steps=200,
                 check_every=25, max_rank=None, sync_ranks=None, process_group=None):
        check_model_and_optimizer(model, optimizer)
        buffer, threshold, warmup_steps, check_every = _check_settings(buffer, threshold, warmup_steps,
                                                                       check_every)
        init_rank, max_rank = _check_ranks(init_rank, max_rank)
        sync_ranks, process_group = check_sync(model, sync_ranks, process_group)
        _remember_ddp(model)
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self.buffer, self.threshold, self.warmup_steps, self.check_every = buffer, threshold, warmup_steps, check_every
        self._layers = [(n, m) for n, m in self.model.named_modules()
                        if isinstance(m, FusedLowRankLinear) and m.form != "full"]
        convs = [n for n, m in self.model.named_modules() if isinstance(m, LowRankConv2d) and m.form != "full"]
        if not self._layers and convs:
            raise ValueError(f"model has no FusedLowRankLinear in lowrank or adapter form: IncrementalRankScheduler "
                             f"grows FusedLowRankLinear layers only, and this model's lowrank/adapter layers are "
                             f"{len(convs)} LowRankConv2d ({shown_names(convs)})")
        if not self._layers:
            raise ValueError("model has no FusedLowRankLinear in lowrank or adapter form; "
                             "convert it first with dynrank.convert_model(model)")
        check_not_sharded(self._layers, type(self).__name__)
        self.max_rank = {}
        for name, layer in self._layers:
            limit = min(layer.in_features, layer.out_features)
            self.max_rank[name] = limit if max_rank is None else min(max_rank, limit)
        check_untied(self.model, self._layers, type(self).__name__)
        check_trains_layers(optimizer, self._layers, self.model, "IncrementalRankScheduler")
        _check_other_kind(self._layers, growing=True)
        guard_attention(self.model, type(self).__name__, [layer for _, layer in self._layers])
        self.sync_ranks, self.process_group = sync_ranks, process_group
        self.current, targets = {}, {}
        for name, layer in self._layers:
            if init_rank is None:
                self.current[name] = max(1, min(layer.rank, self.max_rank[name]) - self.buffer)
                if layer.rank > self.max_rank[name]:
                    targets[name] = self.max_rank[name]
            else:
                self.current[name] = min(init_rank, self.max_rank[name])
                targets[name] = min(self.current[name] + self.buffer, self.max_rank[name])
        check_switchable(self._layers)          # every managed layer: its factors get replaced
        check_finite([(n, m) for n, m in self._layers if targets.get(n, m.rank) < m.rank],
                     "not resizing any layer to its starting rank")
        if self.sync_ranks:
            # convert_model drew some factors from each process's own RNG (a resize below broadcasts the
            # factors it draws, but not a bias or W_f, which a per-process seed set apart).
            _sync_layers(self._layers, group=self.process_group)
        for name, layer in self._layers:
            if name in targets:
                self._resize(layer, targets[name])
        self._claim()
        self.last_step = 0
        self._callbacks = []
        self._copies = []
        # The model's other FusedLowRankLinear layers (full form now, or another scheduler's), which a deflate
        # may bring to adapter form later: never this scheduler's, and not "added" since (_check_model_layers).
        grown = {id(layer) for _, layer in self._layers}
        self._others = weakref.WeakSet(m for m in self.model.modules()
                                       if isinstance(m, FusedLowRankLinear) and id(m) not in grown)
        if convs:
            warnings.warn(f"IncrementalRankScheduler grows FusedLowRankLinear layers only: the model's {len(convs)} "
                          f"LowRankConv2d layer(s) in lowrank or adapter form ({shown_names(convs)}) keep their rank",
                          stacklevel=2)

    _WEAK_SETS = ("_others",)

    def _claim(self):
        """Register the scheduler over its layers, at construction and in a copy (:class:`_Claiming`): its
        optimizer follows a model load that resizes one, and a DynamicRankScheduler refuses them."""
        manage([layer for _, layer in self._layers], self.optimizer, self.model)
        for _, layer in self._layers:
            _GROWERS.setdefault(layer, weakref.WeakSet()).add(self)

    @property
    def layers(self):
        """List of (name, layer) the scheduler manages."""
        return list(self._layers)

    @property
    def ranks(self):
        """Dict name → trained components (discovered rank + buffer, capped)."""
        return {name: layer.rank for name, layer in self._layers}

    def add_callback(self, fn):
        """Call ``fn(event)`` after a :meth:`step` that grew ranks, or a load that resized layers; returns ``fn``.

        ``event = {"epoch": None, "step": int, "changes": [(name, form, form), ...],
        "rank_changes": [(name, old_rank, new_rank), ...]}``, as for
        :meth:`DynamicRankScheduler.add_callback` plus the rank changes.

        A loaded event comes from :meth:`load_state_dict` (or
        :func:`~dynrank.checkpoint.load_training_state`) bringing layers to
        their saved ranks: it has ``"loaded": True`` besides, the saved step
        count and the resizes the load made (a rank may go down there).  It is
        no growth (the saved run had it; a :class:`~dynrank.RankMonitor`
        records none), but the layers hold new A and B, on which a callback
        registers its tensor hooks again.  From :meth:`load_state_dict` it
        comes before the model's and the optimizer's values are loaded (read no
        weight there); from ``load_training_state``, once all three parts have.

        Callbacks run in the order added; one that raises does not keep the
        later ones from the event, and :meth:`step` or :meth:`load_state_dict`
        raises the first error once they have all run, its resizes done
        (as does :func:`~dynrank.checkpoint.load_training_state`, the whole
        checkpoint loaded).
        """
        if not callable(fn):
            raise TypeError(f"callback must be callable, got {type(fn).__name__}")
        self._callbacks.append(fn)
        return fn

    def add_model_copy(self, model_copy):
        """Grow ``model_copy`` (an EMA or SWA copy of the model) with the model from now on; returns it.

        An averaged copy (``torch.optim.swa_utils.AveragedModel``, or a
        ``copy.deepcopy`` of the model updated by hand) pairs its parameters
        with the model's by position, and growth replaces the model's A and B
        with wider ones: its updates then fail on a shape mismatch.  A copy
        given here grows with the model, at the same :meth:`step`: its old
        components stay its own averages (A rescaled with the model's when
        ``alpha`` is set), so its function is unchanged, and its new
        components start as the model's (one factor's columns zero, the
        other's the model's fresh ones); no random numbers are drawn.  At
        each check :meth:`step` checks every copy's layers against the
        model's before any layer grows.  The scheduler holds the copy until
        :meth:`remove_model_copy`.

        Checkpoints: save ``model_copy.state_dict()`` beside
        :func:`~dynrank.checkpoint.training_state`; :meth:`load_state_dict`
        leaves copies alone, and loading the copy's own state dict gives its
        layers the saved ranks.

        Args:
            model_copy: an ``nn.Module`` holding the model's managed layers under
                the same names (an ``AveragedModel`` is looked into), in the same
                forms and ranks, with parameters of its own.

        Raises:
            TypeError: not an ``nn.Module``.
            ValueError: the model itself (or a copy sharing its layers' parameters),
                a copy already added, one whose layers differ from the model's
                (missing, or of another type, form, rank or shape), or one holding a
                DistributedDataParallel (under DDP, copy the module:
                ``AveragedModel(ddp.module)``, updated with ``update_parameters(ddp)``).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            >>> from dynrank import IncrementalRankScheduler, convert_model
            >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
            >>> _ = convert_model(model, rank_ratio=0.5)
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> growth = IncrementalRankScheduler(model, optimizer, init_rank=2, buffer=2, warmup_steps=0,
            ...                                   check_every=1)
            >>> ema = growth.add_model_copy(AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99)))
            >>> x = torch.randn(8, 32)
            >>> def train_step():
            ...     optimizer.zero_grad(); model(x).square().mean().backward(); optimizer.step()
            ...     ema.update_parameters(model)
            >>> train_step()
            >>> before = ema(x)
            >>> growth.step()                                    # [(name, old rank, new rank)]
            [('0', 4, 5)]
            >>> ema.module[0].rank, torch.allclose(ema(x), before, atol=1e-6)   # same averaged function
            (5, True)
            >>> train_step()                                     # the EMA pairs the wider factors
        """
        layers = check_new_copy(model_copy, self._copies, self._layers)
        self._copies.append((model_copy, layers))
        return model_copy

    def remove_model_copy(self, model_copy):
        """Stop growing ``model_copy``, a copy given to :meth:`add_model_copy` (the object it returned).

        The scheduler lets go of the copy: from the next :meth:`step` on it is
        neither checked nor grown, and it keeps the ranks it has.  Drop an EMA
        or SWA copy here when replacing it, else the scheduler keeps it alive
        and grows it for the rest of the run.

        Raises:
            ValueError: ``model_copy`` was not added to this scheduler (or was removed already).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from torch.optim.swa_utils import AveragedModel
            >>> from dynrank import IncrementalRankScheduler, convert_model
            >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
            >>> _ = convert_model(model, rank_ratio=0.5)
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> growth = IncrementalRankScheduler(model, optimizer, init_rank=2, buffer=2, warmup_steps=0,
            ...                                   check_every=1)
            >>> swa = growth.add_model_copy(AveragedModel(model))
            >>> growth.remove_model_copy(swa)
            >>> growth.step()
            [('0', 4, 5)]
            >>> model[0].rank, swa.module[0].rank
            (5, 4)
        """
        remove_copy(model_copy, self._copies)

    def _resize(self, layer, rank, copies=()):
        if rank == layer.rank:
            return
        if rank > layer.rank:
            _grow_rank_(layer, rank, self.optimizer, None)
            self._sync(layer)
            for copy_layer in copies:
                _follow_growth(copy_layer, layer)
        else:
            _truncate_rank_(layer, rank, self.optimizer)
            self._sync(layer)                   # zero components drew fresh columns
        if layer.A.requires_grad or layer.B.requires_grad:   # a DDP wrapper reduces the old ones
            _retire_stale(self.model, "an IncrementalRankScheduler rank change")

    def _sync(self, layer):
        if self.sync_ranks:
            from .distributed import broadcast_params
            broadcast_params([layer.A, layer.B], group=self.process_group)

    def step(self, step=None):
        """Count one optimizer step (or set the count) and grow ranks when a check is due.

        A ``step`` equal to the last count does nothing and returns ``[]``: the
        check for that count has run (or was not due), so a loop may pass an
        optimizer-step counter after every micro-batch of gradient accumulation.
        The count starts at 0, so ``step(0)`` on a new scheduler does nothing.

        Args:
            step: number of optimizer steps done so far (default: last + 1).

        Returns:
            list of (name, old_rank, new_rank) for the layers that grew.

        Raises:
            TypeError: a step that is not an int (a float, a str, a bool).
            ValueError: a negative step, one earlier than the last, or (at a
                check) a FusedLowRankLinear in lowrank or adapter form added to
                the model or a managed layer swapped out of it since the
                scheduler was built, a managed layer now in full form, a layer
                whose factors hold NaN/inf or are on the meta device (no values
                to test), or a model copy whose layers no longer match the
                model's; every check runs and every layer's new rank is found
                before the first one grows, so a failed call changes nothing.
        """
        check_not_unconverted(self._layers, type(self).__name__)
        step = self.last_step + 1 if step is None else check_int(step, "step", "a non-negative int", 0)
        if step < self.last_step:
            raise ValueError(f"steps must not go backwards: got {step} after {self.last_step}")
        if step == self.last_step:                  # this count's check has run already
            return []
        if step < self.warmup_steps or (step - self.warmup_steps) % self.check_every != 0:
            self.last_step = step
            return []
        # Only where a check is due: most steps check nothing, and walking the model would cost more than they do.
        self._check_model_layers()
        for model_copy, layers in self._copies:
            check_copy(model_copy, layers, self._layers)
        self._check_none_full()
        due = [(name, layer) for name, layer in self._layers if layer.rank < self.max_rank[name]]
        check_switchable(due)
        _check_not_meta(due, "test", f"; not growing any layer at step {step}")
        check_finite(due, f"not growing any layer at step {step}", frozen=False)   # growth reads A, B only
        plans = []
        for name, layer in due:
            new_current = explained_rank(_lowrank_singular_values(layer), self.current[name],
                                         self.buffer, self.threshold)
            current = max(self.current[name], new_current)
            plans.append((name, layer, current, min(current + self.buffer, self.max_rank[name])))
        self.last_step = step
        grown = []
        for name, layer, current, target in plans:
            self.current[name] = current
            if target > layer.rank:
                old = layer.rank
                self._resize(layer, target, [twins[name] for _, twins in self._copies])
                grown.append((name, old, target))
        if grown:
            call_back(self._callbacks, self._event(grown))
        return grown

    def state_dict(self):
        """Discovered and trained ranks, the step count, the settings, and each layer's form, ``alpha`` and dense
        weight shape (which a load checks against the model's; the conv decompositions the record shared with
        DynamicRankScheduler holds are none here: every layer is a linear)."""
        return {"last_step": self.last_step, "current": dict(self.current), "ranks": self.ranks,
                "forms": {name: layer.form for name, layer in self._layers},
                "buffer": self.buffer, "threshold": self.threshold, "warmup_steps": self.warmup_steps,
                "check_every": self.check_every, "max_rank": dict(self.max_rank),
                **_layer_record(self._layers)}

    _STATE_KEYS = ("last_step", "current", "ranks", "buffer", "threshold", "warmup_steps", "check_every",
                   "max_rank")
    # Each layer's entries a load checks against the model's layers (the Trainer callback passes them through
    # too).  A state saved before "forms", "alphas", "shapes" and "decompositions" were kept loads with those
    # unchecked.
    _LAYER_RECORD = RECORD_KEYS + ("forms",)
    _OPTIONAL_STATE_KEYS = _LAYER_RECORD

    def _checked_state(self, state_dict):
        """``state_dict``'s values validated against this model (each layer's form, alpha and dense weight shape
        too, where the state has them); raises before anything is changed."""
        check_not_unconverted(self._layers, type(self).__name__)
        self._check_model_layers()
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict from IncrementalRankScheduler.state_dict(), "
                            f"got {type(state_dict).__name__}")
        known = self._STATE_KEYS + self._OPTIONAL_STATE_KEYS
        missing = [k for k in self._STATE_KEYS if k not in state_dict]
        unknown = sorted((k for k in state_dict if k not in known), key=repr)
        if missing or unknown:
            raise ValueError(f"not an IncrementalRankScheduler state dict: missing {missing}, unknown keys "
                             f"{unknown}; expected {', '.join(known)}")
        names = [name for name, _ in self._layers]
        _check_saved_record(self._layers, state_dict, "IncrementalRankScheduler")
        alphas = state_dict.get("alphas")
        try:
            settings = dict(zip(("buffer", "threshold", "warmup_steps", "check_every"), _check_settings(
                state_dict["buffer"], state_dict["threshold"], state_dict["warmup_steps"],
                state_dict["check_every"])))
            settings["last_step"] = check_int(state_dict["last_step"], "last_step", "a non-negative int", 0)
            for key in ("ranks", "current", "max_rank"):
                values = state_dict[key]
                check_same_layers(values, names, key)
                checked = {}
                for name, layer in self._layers:
                    try:
                        checked[name] = layer._check_rank(values[name])
                    except (TypeError, ValueError) as e:
                        raise type(e)(f"{key}[{name!r}] is not a valid rank of layer {name!r}: {e}") from None
                settings[key] = checked
            if alphas is not None:
                check_same_layers(alphas, names, "alphas")
                for name in names:
                    _check_saved_alpha(alphas, name)
        except (TypeError, ValueError) as e:
            raise type(e)(f"invalid IncrementalRankScheduler state dict: {e}") from None
        # The scale alpha / rank multiplies the factors: another alpha computes another function.
        for name, layer in self._layers:
            if alphas is not None and alphas[name] != layer.alpha:
                raise _alpha_mismatch(name, layer, alphas[name])
        self._check_none_full()
        if "forms" in state_dict:
            _check_saved_forms(self._layers, state_dict["forms"], type(self).__name__)
        return settings

    def _check_model_layers(self):
        """ValueError where the model's FusedLowRankLinear layers in lowrank or adapter form are no longer those
        this scheduler was built over (one added since never grows, one swapped out grows outside the model).  A
        managed layer inflated since is still the scheduler's (:meth:`_check_none_full` names it), and one only
        renamed is the same layer.  A layer the model held when it was built and it left alone (in full form
        then, or another scheduler's) is not added by a deflate since."""
        managed = {id(layer) for _, layer in self._layers}
        now = [(name, m) for name, m in self.model.named_modules() if isinstance(m, FusedLowRankLinear)
               and ((m.form != "full" and m not in self._others) or id(m) in managed)]
        _check_layers_held(now, self._layers, type(self).__name__, "lowrank/adapter FusedLowRankLinear", "grows")

    def _check_none_full(self):
        """ValueError naming the first managed layer inflated since (its factors are gone)."""
        for name, layer in self._layers:
            if layer.form == "full":
                raise ValueError(f"layer {name!r} is in full form; IncrementalRankScheduler resizes lowrank "
                                 f"and adapter layers only: it grows their factors, which an inflate (e.g. a "
                                 f"DynamicRankScheduler's) took away; the two schedulers are not meant to drive "
                                 f"one model")

    def load_state_dict(self, state_dict):
        """Resize every layer to its saved rank (optimizer edited in place), then restore the counters.

        Call it before ``model.load_state_dict`` and ``optimizer.load_state_dict``
        (same order as :meth:`DynamicRankScheduler.load_state_dict`), or after
        them: a model load that changes a managed layer's rank edits the
        optimizer in place just as this call would.  The whole
        state dict is checked before any layer is resized: a call that raises
        leaves the layers, the optimizer and the scheduler as they were (but for
        an error a callback raised once the load was done).

        A load that resizes a layer calls the callbacks with a loaded event
        (``"loaded": True``, see :meth:`add_callback`): the layer's A and B are
        new, and a callback registers its tensor hooks on them.

        Raises:
            TypeError: not a dict, or a value of the wrong type (e.g. a float rank).
            ValueError: missing or unknown keys, settings the constructor would
                reject, other layers than this model's, a rank outside
                [1, min(in, out)], a layer whose dense weight shape (checked
                first), ``alpha`` or form differs from the saved one (a state
                saved before they were kept loads unchecked for them), a
                FusedLowRankLinear in lowrank or adapter form added to the model
                or a managed layer swapped out of it since the scheduler was
                built, a managed layer now in full form, or a layer to shrink
                whose factors hold NaN/inf.
            Exception: the first one a callback raised, the load done.
        """
        self._load_checked(self._checked_state(state_dict))

    def _load_checked(self, settings, notify=True):
        """Apply what :meth:`_checked_state` returned; a layer to shrink must still be finite.  Returns the
        loaded event (None where no rank changed), which the callbacks get now or, ``notify=False``, from
        the caller (:func:`~dynrank.checkpoint.load_training_state`, once everything has loaded)."""
        ranks = settings["ranks"]
        check_switchable([(n, m) for n, m in self._layers if ranks[n] != m.rank])
        check_finite([(n, m) for n, m in self._layers if ranks[n] < m.rank], "not loading any rank")
        resized = [(name, layer.rank, ranks[name]) for name, layer in self._layers if ranks[name] != layer.rank]
        with fork_layer_rngs(self._layers):             # a truncation draws fresh columns on the layer's device
            for name, layer in self._layers:
                self._resize(layer, ranks[name])
        del settings["ranks"]
        for key, value in settings.items():
            setattr(self, key, value)
        # The layers have new A and B: hooks registered on them in a callback must be registered again.
        event = self._event(resized, loaded=True) if resized else None
        if event and notify:
            call_back(self._callbacks, event)
        return event

    def _event(self, rank_changes, loaded=False):
        """What the callbacks get (see :meth:`add_callback`)."""
        forms = dict(self._layers)
        event = {"epoch": None, "step": self.last_step,
                 "changes": [(n, forms[n].form, forms[n].form) for n, _, _ in rank_changes],
                 "rank_changes": list(rank_changes)}
        if loaded:
            event["loaded"] = True
        return event
