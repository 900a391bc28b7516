"""convert_model: replace a model's nn.Linear / nn.Conv2d layers by dynrank layers, in place."""

import fnmatch

import torch
from torch import nn

from ._args import check_int
from ._checks import parameter_owners, unwrap_model
from ._forms import FORMS, FormLayer, _is_channels_last, check_floating_dtype
from ._readers import _guard_transformer_fast_path, _weight_readers
from ._summary import ConversionSummary, _trainable_count
from .functional import without_autocast
from .linear import (HOW_TO_REMOVE, FusedLowRankLinear, check_alpha, check_ratio, is_transposed_linear,
                     linear_weight, own_computation, rank_from_ratio, reparametrization)

__all__ = ["convert_model", "ConversionSummary", "DECOMPOSITIONS"]

DECOMPOSITIONS = ("svd", "tucker", "cp", "tkd-cpd")
INITS = ("dense", "fresh")
# Convolutions convert_model does not convert (named where a model holds only these).
OTHER_CONVS = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Name components of residual shortcuts (torchvision: "downsample"; CIFAR ResNets: "shortcut").
SHORTCUT_NAMES = ("shortcut", "downsample")


def _matches(patterns, names, module):
    """Whether any of ``names`` (the places of one module) matches ``patterns``."""
    if patterns is None:
        return False
    if callable(patterns):
        return any(bool(patterns(name, module)) for name in names)
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns for name in names)


def _named_exactly(patterns, names):
    if patterns is None or callable(patterns):
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(name in patterns for name in names)


def _check_patterns(value, what):
    if isinstance(value, nn.Module):       # callable, but its forward is no filter
        raise TypeError(f"{what} must be a name/glob, a list of them, a callable (name, module) -> bool or "
                        f"None, got a {type(value).__name__} module: pass its name in the model (or a "
                        f"function that picks it)")
    if value is None or callable(value) or isinstance(value, str):
        return value
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{what} must be a name/glob, a list of them, a callable or None, "
                        f"got {type(value).__name__}") from None
    if not all(isinstance(i, str) for i in items):
        raise TypeError(f"{what} must contain only strings (module names or globs), got {items!r}")
    return items


def _check_patterns_match(patterns, names, converted=()):
    """Raise a ValueError for the name/glob patterns (not callables) that match none of ``names``, saying so
    where an include pattern matches only ``converted`` (the dynrank layers an earlier call made; an exclude
    pattern that does is met: this call leaves them as they are)."""
    unmatched, done = [], []
    for what, value in patterns:
        if value is None or callable(value):
            continue
        for p in [value] if isinstance(value, str) else value:
            if _matches([p], names, None):
                continue
            hits = [n for n in converted if _matches([p], [n], None)]
            if not hits:
                unmatched.append(f"{what} {p!r}")
            elif what == "include":
                done.append(f"include {p!r}" if hits == [p] else f"include {p!r} (matching {_shown(hits)})")
    problems = []
    if unmatched:
        also = f"; converted already: {_shown(converted)}" if converted else ""
        problems.append(f"these patterns match no nn.Linear/nn.Conv2d/Conv1D of the model: {'; '.join(unmatched)} "
                        f"(patterns are full module names or fnmatch globs such as 'enc.*'; the model's are: "
                        f"{_shown(names) or 'none'}{also})")
    if done:
        one = len(done) == 1
        problems.append(f"{'; '.join(done)} {'names' if one else 'name'} only layers converted already (dynrank "
                        f"layers an earlier call made); drop {'it' if one else 'them'} from include, or call "
                        f"unconvert_model(model) first to convert those layers again with other settings")
    if problems:
        raise ValueError("convert_model: " + "; and ".join(problems))


def _shown(items, show=repr):
    """The first eight of ``items`` as ``show`` writes them (quoted names by default), joined (", ..." where
    there are more)."""
    return ", ".join(map(show, items[:8])) + (", ..." if len(items) > 8 else "")


def _candidates(module, prefix="", converted=False):
    """(name, parent, attr, child) for every place a Linear/Conv2d/Conv1D is registered, repeats included.

    Does not descend into dynrank layers (with ``converted``, they come too, as places of their own);
    the leaves inside ``nn.MultiheadAttention`` (``module`` itself one too) come with parent None.  A
    module registered at several places comes once per place.
    """
    if isinstance(module, nn.MultiheadAttention):
        # MHA reads out_proj.weight directly in F.multi_head_attention_forward.
        for sub, leaf in module.named_modules(remove_duplicate=False):
            if isinstance(leaf, (nn.Linear, nn.Conv2d)):
                yield ".".join(n for n in (prefix, sub) if n), None, None, leaf
        return
    for attr, child in module._modules.items():
        if child is None:
            continue
        name = f"{prefix}.{attr}" if prefix else attr
        if isinstance(child, FormLayer):
            if converted:
                yield name, module, attr, child
        elif isinstance(child, (nn.Linear, nn.Conv2d)) or is_transposed_linear(child):
            yield name, module, attr, child
        else:
            yield from _candidates(child, name, converted)


def _tied_to(child, owners):
    """(parameter name, other owners' names) of the first parameter of ``child`` that another module
    also holds (a tied LM head), or None."""
    for pname in ("weight", "bias"):
        p = child._parameters.get(pname)
        if p is None:
            continue
        others = [n for n, m in owners.get(id(p), []) if m is not child]
        if others:
            return pname, ", ".join(others)
    return None


def _weight_shape(child):
    return tuple(child.weight.shape)


def _matrix_sides(child):
    """(rows, cols) of the weight's matrix view: out × in (Linear, Conv1D), out × in·kh·kw (Conv2d)."""
    shape = tuple(linear_weight(child).shape)
    cols = 1
    for s in shape[1:]:
        cols *= s
    return shape[0], cols


@without_autocast
def convert_model(model, rank_ratio=0.5, decomposition="svd", form="lowrank", include=None, exclude=None,
                  min_features=8, init="dense", alpha=None, keep_last=True):
    """Replace ``nn.Linear`` and ``nn.Conv2d`` modules of ``model`` by dynrank layers, in place.

    Each converted Linear becomes a :class:`FusedLowRankLinear` of rank
    r = max(1, int(ρ·min(in_features, out_features))) — ρ of the largest rank
    the layer can have, so a 768→3072 projection at ρ = 0.25 gets rank 192
    rather than a full-rank 768 — and each Conv2d a
    ``LowRankConv2d`` with ``rank_ratio=ρ`` and ``decomposition`` (the authors'
    r = int(ρ·out_channels)).  With ``init="dense"`` the new layer starts from
    the existing weights (``from_dense``: truncated SVD/Tucker/CP in lowrank
    form, the weight itself in full form, the weight as W_f plus a zero-output
    adapter in adapter form); ``init="fresh"`` builds it with its own
    initialization.  Biases are kept.

    Hugging Face transformers' ``Conv1D`` (the linear layer of GPT-2 and
    OpenAI GPT, weight stored (in, out)) is converted as a Linear: it becomes
    a :class:`FusedLowRankLinear` with the transposed weight, computing the
    same function, and :func:`~dynrank.unconvert_model` gives back a
    ``Conv1D`` (a lowrank layer with ``lowrank="dense"``).  It is never
    taken for the final classifier (transformers' heads are ``nn.Linear``).
    dynrank recognises the class by name and package, without importing
    transformers.

    Kept dense by default (the choices of the paper's own implementation): 1×1
    convolutions inside a residual shortcut (a module named ``shortcut`` or
    ``downsample``), the model's last ``nn.Linear`` in registration order
    (the classifier / LM head; ``keep_last=False`` converts it), grouped
    convolutions, layers whose weight matrix view (out × in, or
    out × in·kh·kw) has a side smaller than ``min_features``, and the
    projections inside ``nn.MultiheadAttention`` (it reads their weights
    directly), and the layers whose weight a transformers module uses
    itself instead of calling the layer: their factors would be skipped
    silently.  These are found in the code of the transformers classes above
    a layer (``self.<path>.weight`` passed on, indexed or multiplied, outside
    methods with ``init`` in their name: WavLM's attention projections,
    LayoutLMv2/v3's relative-position biases, the Mamba mixers' projections)
    and listed in :data:`~dynrank._readers.WEIGHT_READERS` (MobileBERT's MLM head ``dense``).
    In lowrank form, where ``weight`` is None, also the layers whose
    weight's dtype or device the code of a transformers module above them
    reads (``self.<path>.weight.dtype`` in its source: ViT's and CLIP's
    patch embeddings, say); where that read is guarded by an
    ``isinstance(self.<path>.weight, torch.Tensor)`` check (T5's ``wo``),
    only if the layer's dtype differs from every other parameter of that
    module (a T5 loaded in float16 keeps ``wo`` in float32 and casts its
    input to that dtype, a cast a lowrank ``wo`` would skip).  The first
    convolution is converted.  A
    module named exactly in ``include`` is converted even when a default
    rule would keep it.

    Always kept dense (named exactly in ``include``, they raise instead): a
    layer whose class overrides ``forward`` (or ``nn.Conv2d._conv_forward``:
    timm's ``StdConv2d``, say), since it computes more than the product with
    its weight; a layer whose weight or bias is reparametrized or pruned
    (``torch.nn.utils.parametrize``, the hook-based
    ``weight_norm``/``spectral_norm``, ``torch.nn.utils.prune``), since the
    new layer would hold one value of it and drop the parametrization; a
    layer prepared for quantization (an ``activation_post_process`` observer
    from ``torch.ao.quantization.prepare``); a
    layer whose weight (or bias) Parameter is shared with another module (a
    tied LM head, ``head.weight is embedding.weight``: converting would untie
    it), and in ``"lowrank"``/``"full"`` form a frozen layer
    (``weight.requires_grad=False``), which so stays exactly as it was and out
    of the scheduler's reach.  In ``"adapter"`` form a frozen layer is
    converted: frozen W_f plus a fresh trainable adapter, i.e. LoRA on a frozen
    base.  Every converted layer's bias keeps its ``requires_grad``.
    A module registered at several places (``nn.Sequential(lin, act, lin)``)
    is converted once and the same new module put at every place, so the
    sharing is kept; its row in the summary is under its first name, its other
    names in ``aliases`` ("also at ..." in the table).  Every replacement is
    built before any is swapped in, so a call that raises leaves the model
    as it was.
    ``nn.TransformerEncoderLayer``\\ s whose linears are converted get a
    no-op forward pre-hook (and their ``nn.TransformerEncoder`` has
    ``use_nested_tensor`` turned off): torch's fused inference path reads
    ``linear1.weight`` directly and would skip the low-rank factors.  So
    convert the module that holds the encoder, not one of its layers: an
    encoder above ``model`` is out of reach and keeps nesting its input.
    Building a :class:`~dynrank.DynamicRankScheduler` applies the same guard
    to its model, which covers an encoder built around converted layers and
    dynrank layers put in by hand.
    A converted layer takes over the old one's forward and backward hooks
    (their handles still remove them); state-dict hooks stay on the old
    module, being written for its keys.  A layer holding parameters other
    than its weight and bias, buffers or modules of its own (a gate, a
    mask), or whose ``forward`` is replaced on the instance (accelerate's
    offload hooks), is kept dense: the new layer would drop them.  Only
    ``nn.Linear``, ``nn.Conv2d`` and transformers' ``Conv1D`` are converted
    (not ``nn.Conv1d``, ``nn.Conv3d`` or transposed convolutions).  A second
    call converts only the layers still dense (a layer an earlier call
    converted stays as it is); to convert again with other settings, call
    :func:`~dynrank.unconvert_model` first.  A DistributedDataParallel (or
    DataParallel) model is converted inside, and a DDP wrapper is retired as
    after a form change: re-wrap it (:func:`~dynrank.rewrap_ddp`).  Under ``torch.inference_mode``
    the new parameters are ordinary tensors, so the model still trains.

    Args:
        model: any ``nn.Module``; modified in place.
        rank_ratio: ρ in (0, 1].
        decomposition: convolutions: ``"svd"``, ``"tucker"``, ``"cp"`` or ``"tkd-cpd"``.
        form: ``"lowrank"`` (training from scratch), ``"full"`` (fine-tuning:
            deflate later) or ``"adapter"``.
        include: only modules matching these names/globs (``fnmatch``), or a
            callable ``(name, module) -> bool`` (not an ``nn.Module``); None: all.  A name/glob must
            match the full name of at least one nn.Linear/nn.Conv2d/Conv1D of
            the model still dense (a typo raises, and so does one that names
            only layers an earlier call converted, saying so); a shared module
            matches by any of its names.
        exclude: modules matching these are kept dense (same rules, except
            that naming a layer an earlier call converted is accepted: it stays
            as it is).
        min_features: smallest side of the weight's matrix view to convert.
        init: ``"dense"`` (from the existing weights) or ``"fresh"``.
        alpha: optional adapter/low-rank scale numerator (s = alpha / rank).
        keep_last: keep the model's last nn.Linear dense (True or False; a
            head converted by an earlier call is still the last one).

    Returns:
        :class:`ConversionSummary`; ``print(summary)`` shows a table.

    Raises:
        TypeError: ``model`` is not an nn.Module, a non-number ρ or ``alpha``, a
            ``min_features`` that is not an int, a ``keep_last`` that is not a
            bool, bad include/exclude types (an ``nn.Module`` among them), or
            a layer to convert whose weight is not floating-point (the message
            names the layer).
        ValueError: ρ outside (0, 1], ``alpha`` not a finite number > 0 (or
            above float32's largest value, 3.4e38, for a layer that is not
            float64: the message names the layer), ``min_features`` below 1,
            a lazy module not yet run (``nn.LazyLinear``), unknown decomposition/form/init, an
            include/exclude name or glob that matches no
            nn.Linear/nn.Conv2d/Conv1D (an include one that matches only
            layers converted already),
            a tied, (lowrank/full form) frozen or nn.MultiheadAttention layer,
            one whose class overrides ``forward``/``_conv_forward``, one
            reparametrized or pruned, one prepared for quantization, or one
            holding parameters, buffers or modules of its own (or whose
            ``forward`` is replaced on the instance), named
            exactly in ``include``, a model that is itself a layer, a fit that fails (e.g. CP on a degenerate kernel, a
            NaN weight; the message names the layer and the decomposition), a conv whose padding mode other than
            ``"zeros"`` pads by amounts no (ph, pw) padding holds (its ``padding`` or ``dilation`` edited after
            it was built; see :meth:`LowRankConv2d.from_dense`), or
            nothing to convert (the message says where the model's layers are
            all converted already, its convolutions are of a kind not
            converted, it is a TorchScript or exported module, or else which
            kinds of modules hold its parameters).  The model is unchanged
            whenever it raises.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        >>> summary = convert_model(model, rank_ratio=0.25)   # "0": rank int(0.25·64); "2" is the classifier
        >>> print(summary)                                   # one row per Linear/Conv2d + totals
        module         type                         weight  rank  params before  params after  note
        -------------  ---------------------------  ------  ----  -------------  ------------  ---------------------------------
        0              Linear → FusedLowRankLinear  128×64    16          8,320         3,200
        2              Linear                       10×128     -          1,290         1,290  final classifier
        -------------  ---------------------------  ------  ----  -------------  ------------  ---------------------------------
        total (model)                                                     9,610         4,490  0.47× trainable, 1 of 2 converted
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_ratio(rank_ratio)
    check_alpha(alpha, torch.float64)      # a layer's own dtype may limit it more: checked as each is built
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {', '.join(DECOMPOSITIONS)}, got {decomposition!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    min_features = check_int(min_features, "min_features", "a positive int", 1)
    if not isinstance(keep_last, bool):
        raise TypeError(f"keep_last must be True or False, got {type(keep_last).__name__} ({keep_last!r})")
    include = _check_patterns(include, "include")
    exclude = _check_patterns(exclude, "exclude")
    wrapper, model = model, unwrap_model(model)
    _check_materialized(model)

    if isinstance(model, (nn.Linear, nn.Conv2d, FormLayer)) or is_transposed_linear(model):
        raise ValueError(f"convert_model converts the layers inside a model, and this model is itself a "
                         f"{type(model).__name__}: build its dynrank layer with FusedLowRankLinear.from_dense(layer, "
                         f"rank) (LowRankConv2d.from_dense for a Conv2d), or convert the module that holds it")
    params_before = _trainable_count(model)
    everything = list(_candidates(model, converted=True))
    found = [place for place in everything if not isinstance(place[3], FormLayer)]
    converted = [name for name, _, _, child in everything if isinstance(child, FormLayer)]
    _check_patterns_match((("include", include), ("exclude", exclude)), [name for name, *_ in found], converted)
    # One entry per distinct module, with every place it is registered at (first place first).
    modules = {}
    for name, parent, attr, child in found:
        modules.setdefault(id(child), (child, []))[1].append((name, parent, attr))
    # The classifier is the model's last linear layer, converted already or not (a second call must not
    # take the layer before a converted head for it).
    last_linear = next((c for name, parent, _, c in reversed(everything)
                        if parent is not None and isinstance(c, (nn.Linear, FusedLowRankLinear))), None)
    owners = parameter_owners(model)
    readers = _weight_readers(model, form)

    # Build every replacement first: a failure leaves the model as it was.
    rows, plans = [], []
    for child, places in modules.values():
        names = [name for name, _, _ in places]
        row = {"name": names[0], "type": type(child).__name__, "shape": _weight_shape(child), "rank": None,
               "params_before": _trainable_count(child), "converted": False, "note": "",
               "new_type": None, "aliases": names[1:]}
        rows.append(row)
        reason = _keep_reason(names, places, child, include, exclude, min_features, last_linear, keep_last,
                              owners, form, readers)
        if reason:
            row["params_after"] = row["params_before"]
            row["note"] = reason
            continue
        try:
            with torch.inference_mode(False):       # ordinary parameters, under inference_mode too
                new = _convert_one(child, rank_ratio, decomposition, form, init, alpha)
        except (ValueError, TypeError, torch.linalg.LinAlgError) as e:
            how = f"decomposition={decomposition!r}" if isinstance(child, nn.Conv2d) else "truncated SVD"
            error = TypeError if isinstance(e, TypeError) else ValueError
            raise error(f"convert_model could not convert {names[0]!r} ({type(child).__name__}, weight "
                        f"{'×'.join(map(str, row['shape']))}, {how}, form={form!r}, init={init!r}): {e}; "
                        f"the model is left as it was") from e
        if new.bias is not None:
            new.bias.requires_grad_(child.bias.requires_grad)
        new.train(child.training)          # an eval-mode model stays in eval mode
        plans.append((places, new))
        row.update(converted=True, rank=new.rank, params_after=_trainable_count(new),
                   new_type=type(new).__name__)
        if form == "lowrank" and row["params_after"] >= row["params_before"]:
            row["note"] = "no parameter saving at this rank"
    if not rows:
        raise ValueError(_nothing_found(model, converted))
    if not plans:
        raise ValueError("convert_model found nothing to convert: no nn.Linear/nn.Conv2d/Conv1D passed the rules "
                         f"({len(rows)} candidates: " + "; ".join(f"{r['name']}: {r['note']}" for r in rows)
                         + "); adjust include/exclude/min_features/keep_last")
    swap_in(plans)
    _guard_transformer_fast_path(model)
    from .distributed import _retire_stale
    _retire_stale(wrapper, "convert_model")
    return ConversionSummary(rows, params_before, _trainable_count(model))


def _nothing_found(model, converted):
    """The message for a model with no nn.Linear/nn.Conv2d/Conv1D left to convert: its layers are dynrank
    layers already (``converted``: their names), it holds only convolutions of another kind, it is a
    TorchScript module or a graph torch.export inlined its layers into (their weights plain parameters of the
    graph), or else the kinds of modules that hold its parameters, none of which converts."""
    kind = type(model).__name__
    if converted:
        return (f"convert_model found no nn.Linear/nn.Conv2d/Conv1D left to convert in this {kind}: its layers "
                f"are dynrank layers already ({_shown(converted)}, converted by an earlier call); call "
                f"unconvert_model(model) first to convert them again with other settings")
    others = [(name, m) for name, m in model.named_modules() if isinstance(m, OTHER_CONVS)]
    if others:
        shown = _shown(others, lambda other: f"{other[0]!r} ({type(other[1]).__name__})")
        return (f"convert_model found no nn.Linear/nn.Conv2d/Conv1D module in this {kind}; its convolutions "
                f"({shown}) are of kinds it does not convert: it converts nn.Linear, nn.Conv2d and transformers' "
                f"Conv1D, not nn.Conv1d, nn.Conv3d or transposed convolutions")
    holders = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    if any(isinstance(m, torch.jit.ScriptModule) for m in (model, *holders)):
        return (f"convert_model found no nn.Linear/nn.Conv2d/Conv1D module in this {kind}: a TorchScript module "
                f"holds none (torch.jit.script and torch.jit.trace make its layers script modules); convert the "
                f"eager model before scripting or tracing it")
    if isinstance(model, torch.fx.GraphModule) and all(type(m) is nn.Module or isinstance(m, torch.fx.GraphModule)
                                                       for m in holders):
        return (f"convert_model found no nn.Linear/nn.Conv2d/Conv1D module in this {kind}: its parameters are "
                f"plain parameters of a graph (torch.export's ExportedProgram.module() inlines the layers), "
                f"which holds no layer module; convert the eager model before exporting it")
    if not holders:
        return f"convert_model found no nn.Linear/nn.Conv2d/Conv1D module in this {kind}, which holds no parameters"
    kinds = list(dict.fromkeys(type(m).__name__ for m in holders))
    return (f"convert_model found no nn.Linear/nn.Conv2d/Conv1D module in this {kind}: its parameters are in "
            f"{_shown(kinds, str)} modules, and it converts only nn.Linear, nn.Conv2d and transformers' Conv1D "
            f"modules (not a weight used directly through F.linear or F.conv2d)")


def _check_materialized(model):
    """Raise a ValueError naming the lazy modules (``nn.LazyLinear``, ...) whose parameters have no shape yet."""
    lazy = [name or type(module).__name__ for name, module in model.named_modules()
            if any(nn.parameter.is_lazy(p) for p in module._parameters.values() if p is not None)]
    if lazy:
        raise ValueError(f"convert_model: {', '.join(map(repr, lazy))} still "
                         f"{'has' if len(lazy) == 1 else 'have'} uninitialized (lazy) parameters; run the "
                         f"model once on a dummy batch so they get their shapes, then convert it")


# The hook registries of a module's calls (forward, backward); the state-dict hooks stay behind, since
# they are written for the old module's keys.
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


def _take_call_hooks(new, old):
    """Move the forward and backward hooks registered on ``old`` to ``new``: the registries themselves, so
    the handles that registered the hooks still remove them; ``old`` is left with empty ones."""
    for key in _CALL_HOOKS:
        if key in old.__dict__:
            held = old.__dict__[key]
            new.__dict__[key] = held
            old.__dict__[key] = type(held)() if isinstance(held, dict) else None


def swap_in(plans):
    """Put each new module at every place of its old one, with the old one's forward and backward hooks:
    ``plans`` is a list of (places, new), places a list of (name, parent, attr).  All or nothing: where a
    setattr raises, every place swapped so far gets its old module back."""
    olds = [places[0][1]._modules[places[0][2]] for places, _ in plans]
    swapped = []
    try:
        for places, new in plans:
            for _, parent, attr in places:         # a shared module: the same new module at every place
                swapped.append((parent, attr, parent._modules[attr]))
                setattr(parent, attr, new)
    except BaseException:
        for parent, attr, old in reversed(swapped):
            setattr(parent, attr, old)
        raise
    for (places, new), old in zip(plans, olds):
        _take_call_hooks(new, old)


def _keep_reason(names, places, child, include, exclude, min_features, last_linear, keep_last, owners, form,
                 readers):
    if any(parent is None for _, parent, _ in places):
        if _named_exactly(include, names):
            raise ValueError(f"convert_model: {names[0]!r} is named in include, but it is inside "
                             f"nn.MultiheadAttention, which reads its weight directly: a converted layer there "
                             f"would never run; drop it from include to keep it dense")
        return "inside nn.MultiheadAttention (reads weights directly)"
    if _matches(exclude, names, child):
        return "excluded"
    if include is not None and not _matches(include, names, child):
        return "not included"
    named = _named_exactly(include, names)
    method = own_computation(child)
    if method:
        if named:
            raise ValueError(f"convert_model: {names[0]!r} is named in include, but {method} overrides its base's: "
                             f"the converted layer would compute only the product with its weight; drop it from "
                             f"include to keep it dense")
        return f"own computation ({method})"
    reparam = reparametrization(child)
    if reparam:
        if named:
            raise ValueError(f"convert_model: {names[0]!r} is named in include, but its {reparam}: the converted "
                             f"layer would hold one value of it and drop the parametrization; remove it first "
                             f"({HOW_TO_REMOVE}), or drop {names[0]!r} from include to keep it dense")
        return reparam
    if getattr(child, "activation_post_process", None) is not None:
        # torch.ao.quantization.prepare's observer: its hook reads this attribute of an nn.Linear/Conv2d.
        if named:
            raise ValueError(f"convert_model: {names[0]!r} is named in include, but it is prepared for "
                             f"quantization (torch.ao.quantization.prepare put an observer on it): convert "
                             f"before preparing, or drop {names[0]!r} from include to keep it dense")
        return "prepared for quantization (observer)"
    own = _own_state(child)
    if own:
        if named:
            raise ValueError(f"convert_model: {names[0]!r} is named in include, but it {own}, which the new "
                             f"layer would drop; drop {names[0]!r} from include to keep it dense")
        return f"it {own}"
    tied = _tied_to(child, owners)
    if tied:
        if named:
            raise ValueError(f"convert_model: {names[0]!r} is named in include, but its {tied[0]} is tied to "
                             f"{tied[1]}: the new layer would hold its own copy and untie them; untie them "
                             f"first, or drop {names[0]!r} from include to keep it dense")
        return f"{tied[0]} tied to {tied[1]}"
    if form != "adapter" and not child.weight.requires_grad:
        if named:
            raise ValueError(f"convert_model: {names[0]!r} is named in include, but it is frozen "
                             f"(weight.requires_grad=False) and form={form!r} would make it trainable; "
                             f"unfreeze it first, or use form='adapter' (a trainable adapter beside the "
                             f"frozen weight)")
        return "frozen (requires_grad=False; form='adapter' trains an adapter on it)"
    if named:
        return ""
    if id(child) in readers:
        return readers[id(child)]
    if isinstance(child, nn.Conv2d):
        if child.groups != 1:
            return "grouped convolution"
        if tuple(child.kernel_size) == (1, 1) and any(p in SHORTCUT_NAMES for n in names for p in n.split(".")):
            return "1×1 shortcut"
    if keep_last and child is last_linear:
        return "final classifier"
    if min(_matrix_sides(child)) < min_features:
        return f"smaller than min_features={min_features}"
    return ""


def held_state(module, plain):
    """What is registered on ``module`` beyond its parameters named in ``plain``: ``"parameter 'gate'"``,
    ``"buffer 'mask'"``, ``"module 'm'"``, one for each other parameter, buffer and child module."""
    held = [f"parameter {n!r}" for n, p in module._parameters.items() if p is not None and n not in plain]
    held += [f"buffer {n!r}" for n, b in module._buffers.items() if b is not None]
    return held + [f"module {n!r}" for n, m in module._modules.items() if m is not None]


def _own_state(child):
    """What ``child`` holds beyond a plain layer's weight and bias that a new layer would not carry: parameters
    (a gate), buffers, modules of its own, a ``forward`` set on the instance (accelerate's hooks); None if
    nothing."""
    held = held_state(child, ("weight", "bias"))
    if held:
        return f"holds {', '.join(held)} of its own"
    if "forward" in vars(child):
        return "has its forward replaced on the instance (a hook library's wrapper)"
    return None


def _convert_one(child, rank_ratio, decomposition, form, init, alpha):
    dtype = check_floating_dtype(child.weight.dtype)
    if isinstance(child, nn.Linear) or is_transposed_linear(child):
        out_features, in_features = linear_weight(child).shape
        rank = rank_from_ratio(rank_ratio, in_features, out_features)
        if init == "dense":
            return FusedLowRankLinear.from_dense(child, rank, form=form, alpha=alpha)
        new = FusedLowRankLinear(in_features, out_features, rank, bias=child.bias is not None, form=form,
                                 alpha=alpha, device=child.weight.device, dtype=dtype)
        new._record_dense_type(child)
        return new
    from .conv import LowRankConv2d, _dense_padding
    if init == "dense":
        return LowRankConv2d.from_dense(child, decomposition=decomposition, form=form, rank_ratio=rank_ratio,
                                        alpha=alpha)
    new = LowRankConv2d(child.in_channels, child.out_channels, child.kernel_size,
                        decomposition=decomposition, stride=child.stride, padding=_dense_padding(child),
                        dilation=child.dilation, groups=child.groups, bias=child.bias is not None,
                        form=form, padding_mode=child.padding_mode, rank_ratio=rank_ratio, alpha=alpha,
                        device=child.weight.device, dtype=dtype)
    if _is_channels_last(child.weight):        # a channels-last model stays so, as from_dense keeps it
        new.to(memory_format=torch.channels_last)
    return new
