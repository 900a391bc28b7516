"""unconvert_model: turn a model's dynrank layers back into plain torch modules, in place."""

import torch
from torch import nn

from ._checks import unwrap_model
from ._forms import FormLayer
from ._optim import follow_unconvert
from ._readers import _noop_pre_hook, _transformers_reads
from ._summary import RowSummary, format_table
from .functional import without_autocast
from .conv import LowRankConv2d
from .conv_factorizations import _axis
from .convert import held_state, swap_in
from .linear import HOW_TO_REMOVE, FusedLowRankLinear, reparametrization

__all__ = ["unconvert_model", "UnconversionSummary", "LOWRANK_CHOICES"]

LOWRANK_CHOICES = ("factored", "dense")
# Places whose parent reads the weight itself (torch's fused paths): they get one dense module.
_READS_WEIGHT = {nn.TransformerEncoderLayer: ("linear1", "linear2"), nn.MultiheadAttention: ("out_proj",)}


class UnconversionSummary(RowSummary):
    """What :func:`unconvert_model` did, one row per dynrank layer.

    Attributes:
        rows: list of dicts with keys ``name``, ``type`` (the dynrank layer's
            class), ``form``, ``shape`` (the dense weight's shape), ``rank``
            (None in full form), ``new_type`` (what it became, e.g.
            ``"Linear"``, ``"Sequential(3×Conv2d)"``), ``params_before``,
            ``params_after`` (all parameters of that module, trainable or
            not), ``note`` and ``aliases`` (its other names where it is
            registered at several places).
        params_before, params_after: parameters of the whole model (all).

    ``str(summary)`` is a table; ``summary.names`` lists the layers replaced.
    """

    @property
    def names(self):
        """Names of the replaced dynrank layers (the first name of a shared one)."""
        return [r["name"] for r in self.rows]

    def __str__(self):
        lines = [("module", "form", "type", "weight", "rank", "params before", "params after", "note")]
        for r in self.rows:
            rank = "-" if r["rank"] is None else str(r["rank"])
            lines.append((r["name"], r["form"], f"{r['type']} → {r['new_type']}", "×".join(map(str, r["shape"])),
                          rank, f"{r['params_before']:,}", f"{r['params_after']:,}", self._note(r)))
        lines.append(("total (model)", "", "", "", "", f"{self.params_before:,}", f"{self.params_after:,}",
                      f"{len(self.rows)} dynrank layer{'' if len(self.rows) == 1 else 's'} → plain torch"))
        return format_table(lines, right={4, 5, 6})

    def __repr__(self):
        return (f"UnconversionSummary(layers={len(self.rows)}, "
                f"params {self.params_before:,} → {self.params_after:,})")


def _places(module, prefix=""):
    """(name, parent, attr, layer) for every place a dynrank layer is registered, repeats included."""
    for attr, child in module._modules.items():
        if child is None:
            continue
        name = f"{prefix}.{attr}" if prefix else attr
        if isinstance(child, FormLayer):
            yield name, module, attr, child
        else:
            yield from _places(child, name)


def _param(tensor):
    """A new Parameter holding a contiguous copy of ``tensor``, trainable where ``tensor`` requires grad
    (a factor, or a product of factors any of which is trainable)."""
    return nn.Parameter(tensor.detach().clone(memory_format=torch.contiguous_format),
                        requires_grad=tensor.requires_grad)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _plain(in_size, out_size, kernel_size=None, groups=1, bias=None, **geometry):
    """An empty nn.Linear (``kernel_size`` None) or nn.Conv2d, with a bias where ``bias`` is not None;
    :func:`_with_params` puts the weight and bias in.  Built on the meta device: nothing is allocated."""
    if kernel_size is None:
        return nn.Linear(in_size, out_size, bias=bias is not None, device="meta")
    return nn.Conv2d(in_size, out_size, kernel_size, groups=groups, bias=bias is not None, device="meta",
                     **geometry)


def _with_params(module, weight, bias):
    module.weight = weight
    if bias is not None:
        module.bias = bias
    return module


@torch.no_grad()
def _dense_weight(layer):
    """W (full form: the layer's own Parameter), W_f + s·ΔW (adapter: a new Parameter, as frozen as W_f)
    or s·ΔW (lowrank: trainable where a factor is), merged as ``inflate()`` merges, into a copy."""
    dense = layer._dense()
    if layer.form == "full":
        return dense
    factors = layer.factors()
    if dense is None:
        ref = next(iter(factors.values()))
        merged = torch.zeros(layer._dense_shape(), device=ref.device, dtype=ref.dtype)
        trainable = any(f.requires_grad for f in factors.values())
    else:
        merged = dense.detach().clone(memory_format=torch.contiguous_format)
        trainable = dense.requires_grad
    layer._merge_into_(merged, 1.0, factors)
    return nn.Parameter(merged, requires_grad=trainable)


def _dense_module(layer):
    """One nn.Linear / nn.Conv2d computing ``layer``'s function; the transformers ``Conv1D`` it was
    converted from for a layer that was one (its weight (in, out): a transposed copy of W)."""
    if isinstance(layer, FusedLowRankLinear) and layer._dense_type is not None:
        with torch.device("meta"):          # nothing is allocated: the parameters are put in below
            new = layer._dense_type(layer.out_features, layer.in_features)
        weight = _param(_dense_weight(layer).t())
        # Conv1D's forward always adds its bias: a layer without one gets a frozen zero bias.
        bias = layer.bias if layer.bias is not None else nn.Parameter(
            torch.zeros(layer.out_features, device=weight.device, dtype=weight.dtype), requires_grad=False)
        return _with_params(new, weight, bias)
    if isinstance(layer, FusedLowRankLinear):
        new = _plain(layer.in_features, layer.out_features, bias=layer.bias)
    else:
        new = _plain(layer.in_channels, layer.out_channels, layer.kernel_size, layer.groups, layer.bias,
                     stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                     padding_mode=layer.padding_mode)
    return _with_params(new, _dense_weight(layer), layer.bias)


def _factored_linear(layer):
    """nn.Linear(in, r, bias=False) → nn.Linear(r, out) with the bias; the scale goes into the second."""
    A, B = layer.A, layer.B
    scale = layer.scale_for(layer.rank)
    first = _with_params(_plain(layer.in_features, layer.rank), _param(B.t()), None)
    second = _plain(layer.rank, layer.out_features, bias=layer.bias)
    return nn.Sequential(first, _with_params(second, _param(A if scale == 1.0 else A * scale), layer.bias))


def _factored_conv(layer):
    """The layer's chain of convolutions (``Factorization.steps``) as nn.Conv2d's, run as ``run_chain``
    runs it: 1×1 steps unpadded and bias-free (the last carries the bias); the spatial step carries
    stride, padding, dilation and groups; a depthwise kh×1 or 1×kw step carries their part along its
    axis.  A padding mode other than "zeros" goes with the padding onto those spatial steps: the layer
    pads once before the chain, but that padding commutes with the bias-free 1×1 steps before them,
    and its width part with the kh×1 step (which acts on each column alone)."""
    factors = layer.factors()
    steps = layer._dec.steps(factors, layer.scale_for(layer._dec.rank_of(factors)), layer.groups)
    convs = []
    for n, (kernel, kind, groups) in enumerate(steps):
        bias = layer.bias if n == len(steps) - 1 else None
        out_channels, in_per_group, kh, kw = kernel.shape
        if kind == "pointwise":
            geometry = {}
        elif kind == "spatial":
            geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                            padding_mode=layer.padding_mode)
        else:
            axis = 0 if kind == "h" else 1
            geometry = dict(stride=_axis(layer.stride, axis, 1), padding=_axis(layer.padding, axis, 0),
                            dilation=_axis(layer.dilation, axis, 1), padding_mode=layer.padding_mode)
        conv = _plain(in_per_group * groups, out_channels, (kh, kw), groups, bias, **geometry)
        convs.append(_with_params(conv, _param(kernel), bias))
    return nn.Sequential(*convs)


def _describe(module):
    if not isinstance(module, nn.Sequential):
        return type(module).__name__
    kinds = [type(m).__name__ for m in module]
    if len(set(kinds)) == 1:
        return f"Sequential({len(kinds)}×{kinds[0]})"
    return f"Sequential({', '.join(kinds)})"


def _own_state(layer):
    """The parameters, buffers and modules a user registered on ``layer`` (``"parameter 'gate'"``): those
    beyond its weight, bias and current factors, which a dynrank layer alone never holds."""
    return held_state(layer, {layer.weight_name, "bias", *layer._all_factor_names()})


def _replacement(layer, names, places, lowrank, readers):
    """(plain module, note) for ``layer``; ``readers``: id(layer) → which transformers module reads its weight."""
    if not isinstance(layer, (FusedLowRankLinear, LowRankConv2d)):
        raise TypeError(f"unconvert_model: {names[0]!r} is a {type(layer).__name__}, a dynrank layer with no "
                        f"plain equivalent known here (FusedLowRankLinear and LowRankConv2d have one); the "
                        f"model is left as it was")
    # A parametrized or pruned tensor (spectral_norm, weight_norm, ...; the weight, a factor or the bias)
    # would be baked in and its constraint dropped, or fail with torch's own message: refused, naming it.
    reparam = reparametrization(layer)
    if reparam is not None:
        raise RuntimeError(f"unconvert_model: {names[0]!r} cannot be unconverted: its {reparam}, and the plain "
                           f"module would hold one value of it; remove it first ({HOW_TO_REMOVE}) and register "
                           f"it again on the new module; the model is left as it was")
    extra = _own_state(layer)
    if extra:
        them = "it" if len(extra) == 1 else "them"
        raise ValueError(f"unconvert_model: {names[0]!r} ({type(layer).__name__}) holds {', '.join(extra)} of its "
                         f"own, beyond its weight, factors and bias, which the plain module would drop; move "
                         f"{them} to another module or delete {them} first; the model is left as it was")
    reader = next((f"{type(parent).__name__} reads {attr}.weight" for _, parent, attr in places
                   if any(isinstance(parent, t) and attr in a for t, a in _READS_WEIGHT.items())),
                  readers.get(id(layer)))
    dense = layer.form != "lowrank" or lowrank == "dense" or reader is not None
    note = f"dense: {reader}" if reader and layer.form == "lowrank" and lowrank == "factored" else ""
    if not dense and getattr(layer, "_dense_type", None) is not None:
        note = f"was a {layer._dense_type.__name__}: lowrank='dense' gives one back"
    # New parameters are ordinary tensors even when the call runs under inference_mode.  The chains'
    # kernels are made with autograd on (inference_mode(False) turns grad mode on, under no_grad too),
    # so each one requires grad exactly where a factor it is made from does.
    with torch.inference_mode(False):
        if dense:
            new = _dense_module(layer)
        elif isinstance(layer, FusedLowRankLinear):
            new = _factored_linear(layer)
        else:
            new = _factored_conv(layer)
        if layer._memory_format() is torch.channels_last:     # a channels-last model stays so
            new.to(memory_format=torch.channels_last)
    return new.train(layer.training), note


def _unguard_transformer_fast_path(model):
    """Undo ``convert_model``'s guard: no dynrank layer is left, so torch's fused encoder path is right."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and hasattr(module, "_dynrank_fast_path_off"):
            for key, hook in list(module._forward_pre_hooks.items()):
                if hook is _noop_pre_hook:
                    del module._forward_pre_hooks[key]
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
            del module._dynrank_fast_path_off
        if isinstance(module, nn.TransformerEncoder) and hasattr(module, "_dynrank_use_nested_tensor"):
            module.use_nested_tensor = module._dynrank_use_nested_tensor
            del module._dynrank_use_nested_tensor


def _trained(model):
    return {id(p) for p in model.parameters() if p.requires_grad}


@without_autocast
def unconvert_model(model, lowrank="factored"):
    """Replace every dynrank layer of ``model`` by plain torch modules computing the same function, in place.

    The inverse of :func:`~dynrank.convert_model` (PEFT's ``merge_and_unload``):
    the result holds only torch modules, so it runs, saves and loads without
    dynrank, takes torch's own fast paths, and goes through standard
    quantization and export tooling.  Per layer, by form:

    - ``full``: an ``nn.Linear`` / ``nn.Conv2d`` (same stride, padding,
      dilation, groups and padding mode) holding the layer's own W and bias
      Parameters (the same objects: an optimizer holding them keeps working).
      A layer ``convert_model`` or ``from_dense`` made from a transformers
      ``Conv1D`` becomes a ``Conv1D`` again (in full and adapter form, and
      in lowrank form with ``lowrank="dense"``), so the model loads into its
      transformers class (``save_pretrained``/``from_pretrained``); its
      weight is a new Parameter, Wᵀ as a contiguous copy, trainable where W
      was (an optimizer needs it added), the bias the layer's own (a frozen
      zero bias where the layer has none: Conv1D always adds one).  A
      lowrank layer's default factored chain is two ``nn.Linear``, which
      the transformers class cannot load.
    - ``adapter``: the same with the merged weight W_f + s·ΔW, computed as
      ``inflate()`` computes it (fp32-accumulated for 16-bit weights) into a
      copy; it is frozen where W_f was (a frozen base stays frozen, as PEFT's
      merge does).
    - ``lowrank`` with ``lowrank="factored"``: an ``nn.Sequential`` running the
      layer's chain — Linear: ``nn.Linear(in, r, bias=False)`` (weight Bᵀ),
      then ``nn.Linear(r, out)`` (weight s·A, the bias); Conv2d: the
      decomposition's convs as ``LowRankConv2d`` runs them (svd: k×k, 1×1;
      tucker: 1×1, k×k, 1×1; cp: 1×1, depthwise kh×1, depthwise 1×kw, 1×1;
      tkd-cpd: the same with its 1×1 pairs fused where the layer fuses them),
      the spatial convs carrying stride, padding, dilation, groups and padding
      mode, the last one the bias (so a chain that starts with a 1×1 conv,
      tucker's, cp's, tkd-cpd's, refuses an empty batch with no rows or
      columns, which ``nn.Conv2d`` and the layer take: padding it first would
      cost every input the 1×1 convs' work over the border).  A layer that torch reads the weight of
      directly (``linear1``/``linear2`` of an ``nn.TransformerEncoderLayer``,
      ``out_proj`` of an ``nn.MultiheadAttention``), or that the code of a
      transformers module above it reads the weight of (T5's ``wo``, whose
      feed-forward checks ``isinstance(self.wo.weight, torch.Tensor)``; the
      layers ``convert_model`` keeps dense for such reads), gets one dense
      module instead (noted in the summary).  With ``lowrank="dense"``: one
      ``nn.Linear`` / ``nn.Conv2d`` with the rebuilt weight s·ΔW.

    New weights keep the layer's dtype and device and require grad where a
    factor they are made from did; biases are the layer's own Parameters.
    Each module's train/eval mode is the layer's.  A layer registered at
    several places gets one replacement, put at every place; a Parameter
    shared by two different dynrank layers is shared no more where their
    new weights are built (lowrank and adapter forms: each gets its own).  A
    dynrank layer holding parameters, buffers or modules of its own (a gate
    or a mask registered on it) is refused (ValueError): the plain module
    would drop them.  Every
    replacement is built before any is swapped in, so a call that raises
    leaves the model as it was.  The guard ``convert_model`` put on
    ``nn.TransformerEncoderLayer``\\ s (a no-op forward pre-hook) is removed
    and their ``nn.TransformerEncoder``'s ``use_nested_tensor`` set back, so
    torch's fused inference path runs again.  The forward and backward hooks
    set on a dynrank layer move to its replacement (a factored lowrank layer's
    ``nn.Sequential``); state-dict hooks stay behind.  The optimizer of a scheduler that managed a
    layer is edited in place: it trains the new module's parameters where the
    layer's sat (new weights start with fresh state), in the new module's
    parameter order (weight before bias), so that its ``state_dict()`` loads
    into a plain torch optimizer built over the model's trainable parameters
    in ``model.parameters()`` order (torch matches state by position; a
    switch puts an inflated weight after its bias), and that scheduler then
    refuses to step (RuntimeError); any other optimizer built before this call
    still holds the lowrank factors: build it again.  A replaced dynrank layer
    lets go of its dense weight and factors, and of the gradients of those the
    new module does not hold (it keeps its bias, the new module's), so a
    scheduler or a reference kept to it holds no second copy of the weights;
    calling it, loading into it or changing its form raises a RuntimeError
    naming unconvert_model from then on.  A ``DistributedDataParallel`` or
    ``DataParallel`` model is unwrapped and its module changed; before
    training further, wrap it again: ``model = rewrap_ddp(model)``
    (:func:`dynrank.distributed.rewrap_ddp`).  A DistributedDataParallel
    given here whose trainable parameters changed (any layer not in full
    form) has its gradient hooks removed and refuses to run from then on
    (RuntimeError naming the cause), instead of stepping once on gradients
    it never averaged; so does the last wrapper ``rewrap_ddp`` or a
    scheduler's constructor saw around the module.  One built by hand and
    never passed to dynrank cannot be reached: re-wrap it too.

    Args:
        model: an ``nn.Module`` holding dynrank layers; modified in place.
        lowrank: ``"factored"`` (keep a lowrank layer's chain: fewer
            parameters and FLOPs) or ``"dense"`` (one module per layer).

    Returns:
        :class:`UnconversionSummary`; ``print(summary)`` shows a table.

    Raises:
        TypeError: ``model`` is not an nn.Module, or holds a dynrank layer
            (a FormLayer) other than FusedLowRankLinear / LowRankConv2d.
        ValueError: ``lowrank`` is not ``"factored"`` or ``"dense"``; ``model``
            holds no dynrank layer (nothing to do is more likely the wrong
            model than a no-op to pass quietly); ``model`` is itself a
            dynrank layer (it cannot replace itself: ``layer.inflate()``
            leaves it dense, or wrap it in an ``nn.Sequential`` first); a
            dynrank layer holds parameters, buffers or modules of its own
            beyond its weight, factors and bias (a gate, a mask registered on
            it: the plain module would drop them; the message names the layer
            and them).
        RuntimeError: a dynrank layer's weight, factor or bias is
            reparametrized or pruned (``torch.nn.utils.parametrize``, the
            hook-based ``spectral_norm``/``weight_norm``, ``prune``).

        The model is unchanged whenever it raises.

    Example:
        >>> from dynrank import convert_model
        >>> model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        >>> _ = convert_model(model, rank_ratio=0.25)
        >>> print(unconvert_model(model))       # "0" becomes Linear(64→16) → Linear(16→128)
        module         form     type                                       weight  rank  params before  params after  note
        -------------  -------  -----------------------------------------  ------  ----  -------------  ------------  -----------------------------
        0              lowrank  FusedLowRankLinear → Sequential(2×Linear)  128×64    16          3,200         3,200
        -------------  -------  -----------------------------------------  ------  ----  -------------  ------------  -----------------------------
        total (model)                                                                            4,490         4,490  1 dynrank layer → plain torch
        >>> model[0]
        Sequential(
          (0): Linear(in_features=64, out_features=16, bias=False)
          (1): Linear(in_features=16, out_features=128, bias=True)
        )
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(lowrank, str) or lowrank not in LOWRANK_CHOICES:
        raise ValueError(f"lowrank must be one of {', '.join(map(repr, LOWRANK_CHOICES))}, got {lowrank!r}")
    wrapper, model = model, unwrap_model(model)
    if isinstance(model, FormLayer):
        raise ValueError(f"model is itself a dynrank layer ({type(model).__name__}) and cannot replace itself; "
                         f"wrap it (nn.Sequential(layer)) and unconvert that, or call layer.inflate()")
    layers = {}
    for name, parent, attr, layer in _places(model):
        layers.setdefault(id(layer), (layer, []))[1].append((name, parent, attr))
    if not layers:
        raise ValueError(f"unconvert_model found no dynrank layer (FusedLowRankLinear, LowRankConv2d) in this "
                         f"{type(model).__name__}: it is plain torch already, or not the converted model")
    params_before = _count(model)
    trained_before = _trained(model)
    # A factored chain is an nn.Sequential, which has no weight for a transformers parent to read.
    readers = {}
    for _, owner, path, layer, _ in _transformers_reads(model):
        readers.setdefault(id(layer), f"{owner} reads {path}.weight")

    # Build every replacement first: a failure leaves the model as it was.
    rows, plans = [], []
    for layer, places in layers.values():
        names = [name for name, _, _ in places]
        new, note = _replacement(layer, names, places, lowrank, readers)
        plans.append((places, new))
        rows.append({"name": names[0], "type": type(layer).__name__, "form": layer.form,
                     "shape": tuple(layer._dense_shape()), "rank": None if layer.form == "full" else layer.rank,
                     "new_type": _describe(new), "params_before": _count(layer), "params_after": _count(new),
                     "note": note, "aliases": names[1:]})
    swap_in(plans)
    for layer, (_, new) in zip((layer for layer, _ in layers.values()), plans):
        follow_unconvert(layer, new)
    _unguard_transformer_fast_path(model)
    if _trained(model) != trained_before:
        from .distributed import _retire_stale
        _retire_stale(wrapper, "unconvert_model")
    return UnconversionSummary(rows, params_before, _count(model))
