"""Modules that read a child layer's weight instead of calling the layer, which would skip a dynrank layer's
factors: the transformers classes that do (found in their code, or listed), whose layers convert_model keeps
dense, and the guard of torch's attention modules that convert_model and the schedulers apply."""

import functools
import inspect
import re

import torch
from torch import nn

from ._forms import FormLayer
from .linear import transformers_bases, transformers_class

def _rwkv_rescaled(module):
    """The layers whose weight RWKV's ``_rescale_layers`` divides in place (multiplies back in training) at the
    first forward after each train/eval switch, where ``config.rescale_every`` > 0: it reaches them through a
    loop over ``self.blocks``, which the search of the code does not follow."""
    if getattr(getattr(module, "config", None), "rescale_every", 0) > 0:
        for i in range(len(getattr(module, "blocks", ()))):
            yield f"blocks.{i}.attention.output"
            yield f"blocks.{i}.feed_forward.value"


# transformers modules whose own code multiplies by the weight of a layer below them instead of calling the
# layer: a converted layer's low-rank or adapter term would be skipped, silently.  Most such reads are found
# in the classes' code (``self.<path>.weight``, :func:`_weight_reads`); these are the ones that read it in a
# form the search does not see or reach it by a path it does not follow.  Class name → the names of the
# children it reads, or a function of the module giving the paths below it that it reads.
WEIGHT_READERS = {
    "MobileBertLMPredictionHead": ("dense",),             # cat([decoder.weight.t(), dense.weight]) in a matmul
    "LayoutLMv3Encoder": ("rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias"),   # bias.weight[:, buckets]
    "MambaMixer": ("x_proj", "dt_proj", "out_proj"),      # dt_proj.weight @ ...; the fused kernel takes all three
    "FalconMambaMixer": ("x_proj", "dt_proj", "out_proj"),
    "JambaMambaMixer": ("dt_proj",),
    "RwkvModel": _rwkv_rescaled,
}


def _listed_reads(module, reads):
    """(path, layer) for each layer below ``module`` that its :data:`WEIGHT_READERS` entry ``reads`` names: each
    path the entry's function gives that leads to a module (``get_submodule``), or each registered child of a
    listed name."""
    if callable(reads):
        for path in reads(module):
            try:
                yield path, module.get_submodule(path)
            except AttributeError:
                continue
    else:
        for attr in reads:
            if module._modules.get(attr) is not None:
                yield attr, module._modules[attr]


# The path of a layer below a module in its code (``self.<path>.weight``): it may index a container by a
# number (``self.convs[0].conv``); a variable index is not followed.
_PATH = r"((?:\w+(?:\[\d+\])*\.)*\w+(?:\[\d+\])*)"
# ``self.<path>.weight.dtype`` (or ``.device``) in a module's code: it reads the weight of a layer below it.
_DTYPE_READ = re.compile(rf"self\.{_PATH}\.weight\.(?:dtype|device)\b")


def _as_path(path):
    """A code path as a module path: indices as components (``convs[0].conv`` → ``convs.0.conv``)."""
    return re.sub(r"\[(\d+)\]", r".\1", path)


@functools.lru_cache(maxsize=None)
def _dtype_reads(cls):
    """The paths below a transformers class whose weight's dtype or device its own code reads (indices
    as path components: ``convs.0.conv``), except where its code also checks
    ``isinstance(self.<path>.weight, torch.Tensor)``; () where it has no source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return ()
    paths = {m.group(1) for m in _DTYPE_READ.finditer(source)}
    return tuple(sorted(_as_path(p) for p in paths if f"isinstance(self.{p}.weight, torch.Tensor)" not in source))


def _bloom_reads(module):
    # Bloom slices these weights only in its tensor-parallel emulation; its usual path calls the layer.
    return getattr(module, "pretraining_tp", 1) > 1 and bool(getattr(module, "slow_but_exact", False))


# Reads of a weight in code that runs only under a module's setting (class name → {path: whether it
# runs for this module}): the layer is kept dense only where it does.
CONDITIONAL_READS = {"BloomAttention": {"dense": _bloom_reads}, "BloomMLP": {"dense_4h_to_h": _bloom_reads}}


# ``self.<path>.weight`` in a module's code where it computes with the weight (passes it on, indexes it,
# multiplies by it): not a read of its dtype, device or shape, not an assignment to it.
_VALUE_READ = re.compile(rf"self\.{_PATH}\.weight\b"
                         r"(?!\s*\.\s*(?:dtype|device|shape|size|data|_is_hf_initialized)\b|\s*=[^=])")
_GUARD = re.compile(rf"isinstance\(\s*self\.{_PATH}\.weight\s*,")


@functools.lru_cache(maxsize=None)
def _weight_reads(cls):
    """(computed, guarded): the paths below a transformers class whose weight the methods it defines compute
    with (``self.<path>.weight`` passed to a function, indexed, multiplied; not its dtype, device or shape,
    an assignment, an ``isinstance`` check, or a method with ``init`` in its name, which runs before any
    conversion), and those it checks with ``isinstance(self.<path>.weight, ...)``."""
    computed, guarded = set(), set()
    for name, method in vars(cls).items():
        if "init" in name or not inspect.isfunction(method):
            continue
        try:
            source = inspect.getsource(method)
        except (OSError, TypeError):
            continue
        guarded.update(_as_path(m.group(1)) for m in _GUARD.finditer(source))
        computed.update(_as_path(m.group(1)) for m in _VALUE_READ.finditer(source)
                        if not source[:m.start()].rstrip().endswith("isinstance("))
    return tuple(sorted(computed)), tuple(sorted(guarded))


def _transformers_reads(model):
    """(module, its class's name, path, layer, kind) for each layer whose weight the code of a transformers
    module above it reads: kind ``"computes"`` (:data:`WEIGHT_READERS` and :func:`_weight_reads`),
    ``"dtype"`` (:func:`_dtype_reads`) or ``"guarded"`` (read only where ``isinstance`` finds a tensor)."""
    for module in model.modules():
        cls = transformers_class(module, WEIGHT_READERS)
        for path, child in _listed_reads(module, WEIGHT_READERS[cls]) if cls else ():
            yield module, cls, path, child, "computes"
        for base in transformers_bases(module):
            computed, guarded = _weight_reads(base)
            conditions = CONDITIONAL_READS.get(base.__name__, {})
            computed = tuple(p for p in computed if p not in conditions or conditions[p](module))
            for kind, paths in (("computes", computed), ("dtype", _dtype_reads(base)), ("guarded", guarded)):
                for path in paths:
                    try:
                        child = module.get_submodule(path)
                    except AttributeError:
                        continue
                    yield module, base.__name__, path, child, kind


def _weight_readers(model, form):
    """id(layer) → why it is kept dense: the layers whose weight the code of a transformers module above them
    computes with (every form; WavLM's attention, the Mamba mixers, :data:`WEIGHT_READERS`), and in lowrank
    form, where ``weight`` is None, those whose weight's dtype or device it reads (ViT's and CLIP's patch
    embeddings, say), and those it reads behind an ``isinstance`` check (T5's ``wo``) where their dtype
    differs from every other parameter of that module (T5 loaded in float16 keeps ``wo`` in float32 and
    casts its input to that dtype, a cast a lowrank ``wo`` would skip)."""
    readers = {}
    for module, owner, path, child, kind in _transformers_reads(model):
        weight = getattr(child, "weight", None)
        if kind == "computes":
            reason = f"{owner} uses {path}.weight itself (would skip the factors)"
        elif form != "lowrank":
            continue
        elif kind == "dtype":
            reason = f"{owner} reads {path}.weight.dtype (None in lowrank form)"
        elif isinstance(weight, torch.Tensor):
            own = {id(p) for p in child.parameters()}
            others = {p.dtype for p in module.parameters() if id(p) not in own}
            if not others or weight.dtype in others:
                continue
            reason = (f"{owner} casts its input to {path}.weight.dtype ({str(weight.dtype).split('.')[-1]}, "
                      f"unlike its other parameters), a cast skipped in lowrank form")
        else:
            continue
        readers.setdefault(id(child), reason)
    return readers


def _noop_pre_hook(module, args):
    return None


def guard_attention(model, who, layers=None):
    """Make torch's attention modules in ``model`` run its dynrank layers, or refuse the model, for ``who`` (the
    class name of a scheduler being built on it): its dynrank layers may have been put in by hand (``from_dense``
    on an existing layer) rather than by :func:`convert_model`, which guards the layers it converts.

    An ``nn.TransformerEncoderLayer`` with a dynrank ``linear1``/``linear2`` gets the no-op forward pre-hook
    that turns torch's fused inference path off, and an ``nn.TransformerEncoder`` holding a dynrank layer has
    ``use_nested_tensor`` turned off, as :func:`convert_model` does: that path reads ``linear1.weight``
    (W_f alone in adapter form, None in lowrank form).  An encoder above ``model`` is out of reach.

    ``layers``: the dynrank layers ``who`` manages (all of the model's where None); one it leaves alone in
    full form computes right inside an attention module.

    Raises:
        ValueError: a dynrank layer of ``layers`` inside an ``nn.MultiheadAttention`` (its ``out_proj``),
            which reads the layer's weight directly in every mode: only the full form computes there (the
            message names the layer); nothing is changed then.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            managed = None if layers is None else {id(layer) for layer in layers}
            inside = [(".".join(n for n in (name, sub) if n), m) for sub, m in module.named_modules()
                      if isinstance(m, FormLayer) and (managed is None or id(m) in managed)]
            if inside:
                path, layer = inside[0]
                raise ValueError(f"{path!r} is a {type(layer).__name__} in {layer.form} form inside "
                                 f"nn.MultiheadAttention, which reads its weight directly "
                                 f"(F.multi_head_attention_forward): in lowrank or adapter form its factors would "
                                 f"never run, so {who} cannot switch or resize it; put an nn.Linear back there "
                                 f"(convert_model keeps these projections dense)")
    _guard_transformer_fast_path(model)


def _guard_transformer_fast_path(model):
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            if any(isinstance(m, FormLayer) for m in (module.linear1, module.linear2)):
                if not getattr(module, "_dynrank_fast_path_off", False):
                    module.register_forward_pre_hook(_noop_pre_hook)
                    module._dynrank_fast_path_off = True
        if isinstance(module, nn.TransformerEncoder):
            if any(isinstance(m, FormLayer) for m in module.modules()):
                if not hasattr(module, "_dynrank_use_nested_tensor"):
                    # unconvert_model gives it back once no dynrank layer is left
                    module._dynrank_use_nested_tensor = module.use_nested_tensor
                module.use_nested_tensor = False
