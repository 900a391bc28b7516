"""The three weight forms shared by every dynrank layer.

A layer holds its weight in one of three forms (README.md, "The three forms"):

    lowrank   y = f(x; factors)                 factors trainable, no dense weight
    full      y = f(x; W)                       W trainable, no factors
    adapter   y = f(x; W_f) + f(x; factors)     W_f frozen, factors trainable

and moves between them only through the explicit methods :meth:`inflate`
(lowrank/adapter → full: W ← W0 + merged factors) and :meth:`deflate`
(full → adapter: W_f ← W, fresh factors).  Subclasses describe their factors;
this base class owns the form bookkeeping, the form changes and loading a
state dict saved in another form (for a layer a scheduler manages, that load
also swaps the new parameters into the scheduler's optimizer:
:func:`dynrank._optim.follow_load`).
"""

import functools
import math

import torch
from torch import nn

from ._optim import follow_load, params_before
from .functional import without_autocast

__all__ = ["FORMS", "DEFLATE_INITS", "FormLayer", "check_floating_dtype"]

FORMS = ("lowrank", "full", "adapter")
DEFLATE_INITS = ("zeros", "random", "svd")
_UNSET = object()   # FormLayer._read: a name not in _parameters


def check_form(form):
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    return form


def check_floating_dtype(dtype, allow_none=False, needed_by=""):
    """``dtype`` where it is a floating-point ``torch.dtype`` (or None, with ``allow_none``).

    Raises:
        TypeError: ``f"{needed_by}dtype must be a floating-point dtype, got {dtype!r}"`` (with
            ``allow_none``: "a floating-point torch.dtype or None").  ``needed_by`` says who needs it,
            e.g. ``"from_dense needs a floating-point kernel: "``.
    """
    if dtype is None and allow_none:
        return None
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        expected = "a floating-point torch.dtype or None" if allow_none else "a floating-point dtype"
        raise TypeError(f"{needed_by}dtype must be {expected}, got {dtype!r}")
    return dtype


def _packed(t, memory_format=torch.contiguous_format):
    """``t`` itself where its elements are laid out in order (row-major, or channels-last for a 4-D
    tensor), else a row-major copy: a factor made by a transpose or a permutation (an SVD's Vᵀ, a
    Tucker core) would pass its layout on to its gradients, which L-BFGS views flat.  A 4-D ``t``
    is laid out channels-last where ``memory_format`` says so (the layer's own layout), with the
    strides that tell it (:func:`_is_channels_last`) where it is 1×1 or one channel deep."""
    if t.dim() == 4 and memory_format is torch.channels_last:
        # .contiguous() keeps a tensor that is both layouts as it is; .to() gives it channels-last strides
        if _is_channels_last(t) or t.stride() == _strides(t.shape, torch.channels_last):
            return t
        return t.to(memory_format=torch.channels_last)
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous()


def _strides(shape, memory_format):
    """The strides of a dense (N, C, H, W) tensor of ``shape`` laid out in ``memory_format``, as torch gives
    them (a dimension of size 1 or 0 counts as 1 in the products)."""
    n, c, h, w = (max(size, 1) for size in shape)
    return (c * h * w, 1, w * c, c) if memory_format is torch.channels_last else (c * h * w, h * w, w, 1)


def _is_channels_last(t):
    """A 4-D tensor laid out channels-last.  A 1×1 kernel or one with one channel is contiguous in both
    layouts; its layout is in the strides of its size-1 dimensions, which ``.to(memory_format=...)``
    sets as the layout has them (and every later copy, move or cast keeps): channels-last where they
    are channels-last's and differ from row-major ones (a 1×1 kernel with one channel has no layout)."""
    if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
        return False
    if not t.is_contiguous():
        return True
    strides = t.stride()
    return strides == _strides(t.shape, torch.channels_last) and strides != _strides(t.shape, torch.contiguous_format)


# How to undo each kind of reparametrization (torch.nn.utils.parametrize, the hook-based spectral_norm /
# weight_norm, prune), for the messages that name one (here, and dynrank.linear.reparametrization's).
HOW_TO_REMOVE = ("parametrize.remove_parametrizations(module, name), remove_spectral_norm, remove_weight_norm, "
                 "prune.remove")


def outside_inference_mode(method):
    """Run a form change (or rank growth, or a scheduler's switches) outside ``torch.inference_mode``,
    under ``no_grad``, with autocast off (``functional.without_autocast``).

    Parameters (and optimizer state) made inside inference mode are inference tensors: the next
    training step cannot use them ("Inference tensors cannot be saved for backward"), far from the
    switch that made them.  ``nn.Linear.load_state_dict`` under inference mode keeps ordinary tensors;
    so do the switches.  A layer whose parameters are inference tensors already (a model cast under
    inference mode, for serving) is switched inside inference mode, entered if need be: outside it,
    those tensors cannot be updated in place.  ``args[0]`` is the layer (or the scheduler).
    """
    @functools.wraps(method)
    @without_autocast
    def run(*args, **kwargs):
        owner = args[0] if args else None
        if isinstance(owner, nn.Module) and any(p.is_inference() for p in owner.parameters()):
            with torch.inference_mode():
                return method(*args, **kwargs)
        if not torch.is_inference_mode_enabled():
            return method(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return method(*args, **kwargs)
    return run


class FormLayer(nn.Module):
    """Base class of layers with lowrank / full / adapter forms.

    Subclasses implement:

    - ``_factor_names(rank)``: names of the factor parameters, in order;
    - ``_dense_shape()``: shape of the dense weight;
    - ``_factor_shapes(rank)``: dict name → shape;
    - ``_init_factors(rank, zero_output, device, dtype)``: dict name → tensor,
      fresh random factors; with ``zero_output`` the merged product is exactly
      zero (one factor zeroed) while gradients still reach every factor;
    - ``_merge_into_(weight, alpha, factors)``: in place
      ``weight += alpha * merged(factors)``;
    - ``_fit_factors(weight, rank)``: dict of factors whose merged product is
      the best rank-``rank`` approximation of ``weight`` (in the layer's scale;
      called through :meth:`_fit`, with finite values that are not all zero),
      where a component the fit leaves at zero has the zero-output init, so
      that it trains;
      ``_fit_name`` and ``weight_kind`` name the fit and the weight in errors;
    - ``_check_rank(rank)``: validated rank (raises ValueError/TypeError);
    - ``_rank_from_state(state_dict, prefix)``: the rank stored in a state dict;
    - ``_init_lowrank_(factors, rank)``: rescale fresh factors in place so the
      merged product has the variance of the dense layer's default init.

    Subclass ``__init__`` validates its arguments, then calls
    :meth:`_build_parameters`.
    """

    weight_name = "weight"
    weight_kind = "weight"
    _factor_param_names = ()
    # The rank the layer last had in lowrank form (None: unknown: never lowrank here, or a state dict loaded
    # it in another form), for the cost of a schedule's lowrank epochs after a deflate to another rank
    # (dynrank.cost).
    _lowrank_rank = None

    def __setattr__(self, name, value):
        # A weight assigned in lowrank form (``head.weight = emb.weight``, tying the nn.Linear way) was
        # added to A·Bᵀ by the forward and had the factors merged into it by inflate; a factor assigned in
        # full form was never read.
        self._refuse_weight_in_lowrank(name, value)
        self._refuse_factor_in_full(name, value)
        super().__setattr__(name, value)

    def register_parameter(self, name, param):
        # The same weight (or factor) registered directly reaches the forward and inflate as an assigned one.
        self._refuse_weight_in_lowrank(name, param)
        self._refuse_factor_in_full(name, param)
        super().register_parameter(name, param)

    def _refuse_weight_in_lowrank(self, name, value):
        if value is not None and name == self.weight_name and self.__dict__.get("_form") == "lowrank":
            self._refuse_weight()

    def _refuse_factor_in_full(self, name, value):
        state = self.__dict__          # __init__ may set _form before _rank
        if value is not None and state.get("_form") == "full" and name in self._factor_names(state.get("_rank")):
            self._refuse_factors((name,))

    def _refuse_weight(self):
        """Raise the ValueError for a dense weight given to a lowrank-form layer: assigned, registered
        (``register_parameter``) or passed in by ``torch.func.functional_call``, which writes ``_parameters``
        itself (the lowrank forwards check for that one)."""
        name = self.weight_name
        raise ValueError(f"{type(self).__name__} in lowrank form has no {name} (it holds "
                         f"{', '.join(self._factor_names(self._rank))}); giving it one would add it to the "
                         f"low-rank product. To give the layer a dense {name} (to tie it, say), call inflate() "
                         f"first or convert with form='full'")

    def _check_no_factors_given(self):
        """In full form: refuse factors that ``torch.func.functional_call`` wrote into the slots an inflate
        left in ``_parameters`` (the forward would drop them); one dict read per factor name."""
        params, names = self._parameters, self._factor_names(self._rank)
        for name in names:
            if params.get(name) is not None:
                self._refuse_factors([n for n in names if params.get(n) is not None])

    def _refuse_factors(self, given):
        """Raise the ValueError for factors given to a full-form layer, which its forward would leave unused,
        running on W: assigned, registered, or passed in by ``torch.func.functional_call`` (a parameter dict
        taken in lowrank or adapter form, say).  functional_call assigns a factor the layer has no slot for
        in ``_parameters`` (a layer built full), and writes the slots an inflate left itself: the full
        forwards check those, with one dict read per factor.  ``given``: the names of the factors given."""
        name = self.weight_name
        raise ValueError(f"{type(self).__name__} in full form has no factors (it holds {name}); the "
                         f"{', '.join(given)} given would go unused, the layer running on its own {name}. To run "
                         f"the layer on factors, bring it to the form they were taken in first (deflate(), or "
                         f"load_state_dict of that form), or pass the full form's {name} instead")

    def _build_parameters(self, form, rank, bias, device=None, dtype=None):
        """Create dense weight, bias and factors (in this order) for the initial ``form``, then
        :meth:`reset_parameters`."""
        check_form(form)
        check_floating_dtype(dtype, allow_none=True)
        kw = dict(device=device, dtype=dtype)
        shape = self._dense_shape()
        # The weight's slot first, so parameters() and state_dict() list weight, bias, then the factors
        # (nn.Linear's and nn.Conv2d's order in full form) in every form: optimizer states and flat
        # parameter vectors are matched by position.
        self.register_parameter(self.weight_name, None)
        self.bias = nn.Parameter(torch.empty(shape[0], **kw)) if bias else None
        weight = None if form == "lowrank" else torch.empty(shape, **kw)
        factors = {} if form == "full" else {n: torch.empty(s, **kw) for n, s in self._factor_shapes(rank).items()}
        self._become(form, weight, factors, rank)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Draw the current form's parameters afresh, in place, as construction does (as ``nn.Linear``'s).

        The dense weight (W, or W_f in adapter form) and the bias follow PyTorch's default init for Linear
        and Conv layers (Kaiming-uniform with a = √5, bias U(±1/√fan_in)); lowrank factors are drawn so the
        merged weight has that variance, an adapter's so that their product is zero.  From the same RNG
        state it gives the values a fresh layer of this form and rank gets, so a layer built on the meta
        device is initialized by ``to_empty(device=...)`` and then this.  The Parameter objects and their
        ``requires_grad`` stay as they are.
        """
        dense = self._dense()
        if dense is not None:
            nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        params = self.factors()
        if params:
            ref = next(iter(params.values()))
            fresh = self._init_factors(self._rank, self._form == "adapter", ref.device, ref.dtype)
            if self._form == "lowrank":
                self._init_lowrank_(fresh, self._rank)
            for name, value in fresh.items():
                params[name].copy_(value)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(math.prod(self._dense_shape()[1:]))
            nn.init.uniform_(self.bias, -bound, bound)

    # -- form bookkeeping ---------------------------------------------------
    @property
    def form(self):
        """Current form: ``"lowrank"``, ``"full"`` or ``"adapter"``."""
        return self._form

    @property
    def rank(self):
        """Rank of the factors (kept in full form: the rank ``deflate`` uses by default)."""
        return self._rank

    def factors(self):
        """Dict name → factor parameter (empty in full form)."""
        if self._form == "full":
            return {}
        return {name: self._read(name) for name in self._factor_names(self._rank)}

    def _read(self, name):
        """Parameter ``name`` (or None) as a forward uses it.

        Read from ``_parameters`` directly: ``nn.Module.__getattr__`` costs about
        a µs per name on every call.  Where the name is not there (a plain
        attribute, or a parametrization or hook has moved it), through ``getattr``.
        """
        value = self._parameters.get(name, _UNSET)
        return getattr(self, name, None) if value is _UNSET else value

    def _memory_format(self):
        """``torch.channels_last`` where one of the layer's 4-D parameters is laid out so (a model moved
        with ``.to(memory_format=torch.channels_last)``; a 1×1 or one-channel factor by its strides, see
        :func:`_is_channels_last`), else ``torch.contiguous_format``.  The tensors a form change creates
        (W, fresh factors) take this layout, so a channels-last model stays so."""
        if any(p is not None and _is_channels_last(p) for p in self._parameters.values()):
            return torch.channels_last
        return torch.contiguous_format

    def _set_factors(self, factors, trainable, memory_format, kept):
        """Release the old factors and install ``factors`` in ``memory_format``, each requiring grad as
        ``kept`` (name → bool) says where it names it, else where ``trainable``."""
        for name in set(self._factor_param_names) | set(self._factor_names(self._rank)):
            setattr(self, name, None)
        self._factor_param_names = tuple(factors)
        for name, value in factors.items():
            setattr(self, name, nn.Parameter(_packed(value, memory_format), requires_grad=kept.get(name, trainable)))

    def _trains(self):
        """Whether any of the layer's parameters but the bias requires grad (W, W_f, the factors).  A layer
        where none does (``requires_grad_(False)``) stays frozen through a form change."""
        dense = self._dense()
        return (dense is not None and dense.requires_grad) or any(f.requires_grad for f in self.factors().values())

    def _become(self, form, weight, factors, rank, trainable=True):
        """Install ``weight`` (tensor or None) and ``factors`` (dict) for ``form``: the form's trainable
        parameters (W in full form, the factors otherwise) require grad where ``trainable``, W_f never.
        Within the form (a rank change), each factor is as trainable as the one of its name it replaces
        (LoRA-FA's A frozen by hand stays frozen).  New tensors take the layout of the parameters they
        replace (:meth:`_memory_format`)."""
        memory_format = self._memory_format()
        # At construction there is no form yet.
        kept = ({name: f.requires_grad for name, f in self.factors().items()}
                if form == self.__dict__.get("_form") else {})
        self._form = form
        self._rank = rank
        if form == "lowrank":
            self._lowrank_rank = rank
        if weight is None:
            setattr(self, self.weight_name, None)
        else:
            trains = trainable and form == "full"
            if isinstance(weight, nn.Parameter):
                weight.requires_grad_(trains)
                setattr(self, self.weight_name, weight)
            else:
                setattr(self, self.weight_name, nn.Parameter(_packed(weight, memory_format), requires_grad=trains))
        self._set_factors(factors, trainable, memory_format, kept)
        self._on_form_change()

    def _on_form_change(self):
        """Hook for subclasses that choose their forward per form."""

    def _check_switchable(self, what=None):
        """Raise before a form change (or a rank growth) where a tensor it replaces is reparametrized.

        ``torch.nn.utils.parametrize`` (``parametrizations.spectral_norm``, ``weight_norm``,
        ``orthogonal``, ...) and the older hook-based ``spectral_norm``/``weight_norm`` move a
        parameter out of ``_parameters``.  The forward follows them (:meth:`_read`), but a form
        change releases, replaces or freezes the dense weight and the factors (a growth replaces the
        factors): it would fail halfway and leave the layer between two forms.  ``what`` names the
        layer in the message.

        Raises:
            RuntimeError: naming the reparametrized tensors and how to remove the parametrization.
        """
        moved = self._reparametrized()
        if moved:
            one = len(moved) == 1
            raise RuntimeError(
                f"{what or type(self).__name__} ({self._form} form, rank {self._rank}) cannot change form or "
                f"rank: its {', '.join(moved)} {'is' if one else 'are'} reparametrized (torch.nn.utils.parametrize, "
                f"the hook-based spectral_norm/weight_norm, or pruned), and such a change replaces "
                f"{'it' if one else 'them'}: "
                f"expected plain parameters. Remove the parametrization first ({HOW_TO_REMOVE}) "
                f"and register it again on the new form's tensors after the change")

    def _reparametrized(self):
        """Names of the current form's tensors (the dense weight, the factors) that a reparametrization
        has moved out of ``_parameters`` (see :meth:`_check_switchable`), in order."""
        names = ([self.weight_name] if self._form != "lowrank" else []) + (
            list(self._factor_names(self._rank)) if self._form != "full" else [])
        return [name for name in names if name not in self._parameters]

    def _dense(self):
        return self._read(self.weight_name)

    def _reference_tensor(self):
        ref = self._dense()
        if ref is None:
            ref = next(iter(self.factors().values()))
        return ref

    @torch.no_grad()
    def _copy_from_dense_(self, weight, bias):
        """Fill a freshly built layer from a dense weight and bias (for ``from_dense``).

        lowrank form: the factors of the best rank-``rank`` fit of ``weight``
        (``_fit_factors``); full and adapter forms: ``weight`` itself as W / W_f.
        The bias keeps its ``requires_grad``; a frozen ``weight`` gives frozen
        factors (lowrank) or a frozen W (full), as a switch keeps a frozen layer
        frozen, while adapter form trains its adapter beside the frozen W_f.
        """
        if bias is not None:
            self.bias.copy_(bias)
            self.bias.requires_grad_(bias.requires_grad)
        if not weight.requires_grad and self._form != "adapter":
            for name, param in self.named_parameters(recurse=False):
                if name != "bias":
                    param.requires_grad_(False)
        if self._form == "lowrank":
            for name, value in self._fit(weight.detach(), self._rank).items():
                getattr(self, name).copy_(value)
        else:
            self._dense().copy_(weight)
        return self

    def _fit(self, weight, rank):
        """``_fit_factors`` where there is something to fit.

        A meta weight has no values: factors of the right shapes (the fresh init).  A weight with
        NaN or inf cannot be fitted (ValueError).  An all-zero weight's best fit is zero, but
        all-zero factors never get a gradient: it gets the zero-output init of
        ``deflate(init="zeros")`` instead, exactly zero and trainable.
        """
        if weight.is_meta:
            return self._init_factors(rank, False, weight.device, weight.dtype)
        finite = torch.isfinite(weight)
        if not finite.all():
            raise ValueError(f"cannot fit {self._fit_name} factors to a {self.weight_kind} with non-finite entries "
                             f"({weight.numel() - int(finite.sum())} NaN/inf of {weight.numel()})")
        if not weight.any():
            return self._init_factors(rank, True, weight.device, weight.dtype)
        return self._fit_factors(weight, rank)

    # -- form changes -------------------------------------------------------
    @outside_inference_mode
    @torch.no_grad()
    def inflate(self):
        """lowrank/adapter → full: W ← W0 + merged factors (W0 = 0 in lowrank, W_f in adapter).

        Function-preserving up to rounding; the factors are released.  The merge
        runs through the fused merge kernel on CUDA.  W is trainable unless the
        layer was frozen: no parameter but the bias requiring grad.

        Returns:
            self

        Raises:
            RuntimeError: if the layer is already in full form, or its weight or a factor is
                reparametrized (``torch.nn.utils.parametrize``; nothing is changed).
        """
        if self._form == "full":
            raise RuntimeError(f"{type(self).__name__} is already in full form; inflate applies to "
                               f"lowrank or adapter form")
        self._check_switchable()
        ref = self._reference_tensor()
        trainable = self._trains()
        dense = self._dense()
        if dense is None:
            dense = torch.empty(self._dense_shape(), device=ref.device, dtype=ref.dtype,
                                memory_format=self._memory_format()).zero_()      # the layout it keeps
            self._merge_into_(dense, 1.0, self.factors())
        else:
            # Merge into W_f's storage and keep its Parameter object, so anything
            # keyed on it (optimizer state, hooks) follows the layer.  Not through .data:
            # the version counter must move, so that a graph which saved W_f refuses its
            # backward rather than use the merged weight.
            self._merge_into_(dense, 1.0, self.factors())
        self._become("full", dense, {}, self._rank, trainable)
        return self

    @outside_inference_mode
    @torch.no_grad()
    def deflate(self, rank=None, init="zeros"):
        """full → adapter: freeze W as W_f and attach fresh factors of ``rank``.

        The factors are trainable unless the layer was frozen (W not requiring grad):
        a frozen layer stays frozen.  For LoRA on a frozen layer, set
        ``requires_grad`` on its factors afterwards.  W's own Parameter becomes W_f
        (optimizer state and hooks keyed on it follow the layer), so a module that
        shares it (an embedding tied to this head) is frozen with it: untie first.

        Args:
            rank: factor rank (default: the layer's rank).
            init: ``"zeros"`` — the output-side factor is zero, the others random,
                so the function is unchanged and gradients flow;
                ``"random"`` — every factor random (the function changes);
                ``"svd"`` — the top-``rank`` part of W moves into the factors and
                W_f = W − merged factors (function unchanged).

        Returns:
            self

        Raises:
            RuntimeError: if the layer is not in full form, or its weight is reparametrized
                (``torch.nn.utils.parametrize``; nothing is changed).
            ValueError: unknown ``init`` or invalid ``rank``; with ``init="svd"``, a weight with
                NaN/inf entries, or a CP fit (cp, tkd-cpd) that fails at every CP rank down to 1.
        """
        if self._form != "full":
            raise RuntimeError(f"{type(self).__name__} is in {self._form} form; deflate applies to "
                               f"full form (call inflate() first)")
        if init not in DEFLATE_INITS:
            raise ValueError(f"init must be one of {', '.join(DEFLATE_INITS)}, got {init!r}")
        self._check_switchable()
        rank = self._check_rank(self._rank if rank is None else rank)
        weight = self._dense()
        trainable = self._trains()
        if init == "svd":
            factors = self._fit(weight.detach(), rank)
            self._merge_into_(weight, -1.0, factors)
        else:
            factors = self._init_factors(rank, init == "zeros", weight.device, weight.dtype)
        # W_f is frozen: a gradient W still held would count in clip_grad_norm_ and come back at inflate.
        weight.grad = None
        self._become("adapter", weight, factors, rank, trainable)
        return self

    # -- torch.fx ------------------------------------------------------------------
    def _fx_node(self, proxy, trace_through=True):
        """This layer as one ``call_module`` node of the graph ``torch.fx.symbolic_trace`` records, as
        FX records the leaf ``nn.Linear``/``nn.Conv2d``: the GraphModule calls this very layer, whose
        form changes it follows (a graph traced through the forward would keep the form it saw).

        Where the layer is the traced root it cannot be a node of its own graph: None with
        ``trace_through`` (the caller traces its forward through), else a TypeError.
        """
        tracer = proxy.tracer
        if self is tracer.root:
            if trace_through:
                return None
            raise TypeError(f"torch.fx.symbolic_trace reached the forward of {type(self).__name__} as the traced "
                            f"root: inside a traced model the layer is recorded as one call_module node (as "
                            f"nn.Conv2d is), but a root cannot be a node of its own graph; trace a module that "
                            f"holds it (e.g. nn.Sequential(layer)), or use torch.export.export")
        return tracer.create_proxy("call_module", tracer.path_of_module(self), (proxy,), {})

    # -- state dict across forms ---------------------------------------------
    def _form_in_state(self, state_dict, prefix, held=()):
        """The form a state dict holds this layer in, or None (nothing of it).  Factors without a dense
        weight read as adapter form where the layer is an adapter (the LoRA habit of saving only the
        trained tensors: W_f stays), else as lowrank form.  ``held`` names the reparametrized tensors
        the dict holds under their reparametrization's keys (:meth:`_held_reparametrized`)."""
        has_dense = prefix + self.weight_name in state_dict or self.weight_name in held
        factor_keys = [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]
                       and k[len(prefix):] in self._all_factor_names()]
        if not factor_keys and not set(held) & self._all_factor_names():
            return "full" if has_dense else None
        return "adapter" if has_dense or self._form == "adapter" else "lowrank"

    def _held_reparametrized(self, state_dict, prefix, moved):
        """Those of the reparametrized tensors ``moved`` (:meth:`_reparametrized`) that ``state_dict``
        holds.  A reparametrized tensor is saved under its reparametrization's keys, never its own name:
        ``parametrizations.A.original`` (``torch.nn.utils.parametrize``), ``A_orig`` and ``A_u``/``A_v``
        (hook-based spectral_norm), ``A_g``/``A_v`` (hook-based weight_norm), ``A_orig``/``A_mask`` (prune)."""
        if not moved:
            return []
        plain = {self.weight_name, "bias", *self._all_factor_names()}
        keys = [k for k, _ in [*self.named_parameters(), *self.named_buffers()] if k not in plain]
        return [name for name in moved
                if any(prefix + k in state_dict for k in keys if k.startswith((f"parametrizations.{name}.",
                                                                                f"{name}_")))]

    def _all_factor_names(self):
        return set(self._factor_names(self._rank))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The layer's load_state_dict pre-hooks first, as torch runs them before it reads the dict: a hook
        # that renames or transposes saved tensors decides the form and rank read below.  torch's own
        # load then runs without them, so each runs once.
        hooks = self._load_state_dict_pre_hooks
        for hook in hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self.__dict__["_load_state_dict_pre_hooks"] = {}
        try:
            self._load_own_state(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                 error_msgs)
        finally:
            self.__dict__["_load_state_dict_pre_hooks"] = hooks

    def _load_own_state(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs):
        # A reparametrized tensor cannot switch form or rank: a dict in another form is refused, one in
        # the layer's own form is torch's to load (the reparametrization's own keys load its tensors).
        moved = self._reparametrized()
        form = self._form_in_state(state_dict, prefix, self._held_reparametrized(state_dict, prefix, moved))
        if form is not None:
            rank, problem = self._rank, None
            if form == self._form or not moved:
                assign = local_metadata.get("assign_to_params_buffers", False)
                rank, problem = self._state_rank_and_problem(state_dict, prefix, form, moved, assign)
            if problem is not None:
                # Nothing of this layer is touched: torch's load_state_dict raises with the message.
                name = prefix[:-1] or type(self).__name__
                self._refuse_load(state_dict, prefix, error_msgs, f"{name}: {problem}; the layer is left as it "
                                                                  f"was ({self._form} form, rank {self._rank})")
                return
            if form != self._form or rank != self._rank:
                try:
                    self._check_switchable(f"layer {prefix[:-1]!r}" if prefix else None)
                except RuntimeError as e:     # into torch's list: the other layers load and it names them all
                    self._refuse_load(state_dict, prefix, error_msgs, str(e))
                    return
                before, held, failed = params_before(self), self._held_state(), len(error_msgs)
                self._switch_for_load(form, rank)
                try:
                    super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                  unexpected_keys, error_msgs)
                except BaseException:
                    self._restore_held_state(held)
                    raise
                # A copy torch could not make (the checks above refuse the tensors known to fail): the
                # layer gets its own parameters back, and the optimizer follows only a load that took.
                # What the switch kept (the bias, W as W_f) is torch's to load, as nn.Linear's bias is.
                if len(error_msgs) > failed:
                    self._restore_held_state(held)
                else:
                    self._follow_load(before)
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @staticmethod
    def _refuse_load(state_dict, prefix, error_msgs, message):
        """Add ``message`` to torch's errors and take the keys of the layer's submodules (a parametrization's
        ``parametrizations.A.original``) out of this load's ``state_dict``, which torch loads into them
        next: a refused load leaves all of the layer as it was."""
        error_msgs.append(message)
        for key in [k for k in state_dict if k.startswith(prefix) and "." in k[len(prefix):]]:
            del state_dict[key]

    @outside_inference_mode
    def _switch_for_load(self, form, rank):
        """Allocate ``form`` at ``rank`` for a load (:meth:`_follow_load` once its tensors are copied in).

        The rank the layer last had in lowrank form becomes the loaded factors' rank in lowrank form, and
        unknown (None) in another form, as for a layer built in that form: the rank the layer had before
        says nothing of the run that saved the dict.  A scheduler's load gives back the saved run's; without
        it :func:`~dynrank.cost.comp_ratio` asks for the rank instead of guessing."""
        self._allocate(form, rank)
        if form != "lowrank":
            self._lowrank_rank = None

    @outside_inference_mode
    def _follow_load(self, before):
        """The managing scheduler's optimizer, if any, follows a load that switched the layer (``before``:
        :func:`~dynrank._optim.params_before` of the layer before the switch)."""
        follow_load(self, before)

    # What a switch for a load changes besides the parameters: restored with them where the load fails.
    _SWITCHED = ("_form", "_rank", "_lowrank_rank", "_factor_param_names")

    def _held_state(self):
        """The layer's parameters (objects and ``requires_grad``) and form bookkeeping, for
        :meth:`_restore_held_state`."""
        params = dict(self._parameters)
        return (params, {n: p.requires_grad for n, p in params.items() if p is not None},
                {k: self.__dict__[k] for k in self._SWITCHED if k in self.__dict__})

    def _restore_held_state(self, held):
        """Put back what :meth:`_held_state` took: the very Parameter objects, in their order."""
        params, grads, attrs = held
        self._parameters.clear()
        self._parameters.update(params)
        for name, requires_grad in grads.items():
            params[name].requires_grad_(requires_grad)
        for key in self._SWITCHED:
            self.__dict__.pop(key, None)
        self.__dict__.update(attrs)
        self._on_form_change()

    def _state_rank_and_problem(self, state_dict, prefix, form, moved=(), assign=False):
        """(rank, None) when the state dict's tensors for this layer have the shapes of ``form`` at the
        rank they give, else (None, what is wrong), so a bad checkpoint never half-loads a layer.

        Where a reparametrized factor (named in ``moved``) is not in the dict under its own name (it is
        saved under its reparametrization's keys), the rank is the layer's own, and the shapes of the
        factors the dict holds under their own names are checked against it.  So is a dict in the layer's
        own form that lacks a factor the rank is read from, where the factors it holds have the shapes of
        the layer's rank (nothing switches; torch reports the others as missing).  Where the load switches
        form or rank and copies (``assign`` False), a tensor torch cannot copy into the new parameters
        (sparse, quantized, or meta beside real ones) is wrong too: the copy would fail after the switch."""
        rank = self._rank
        unnamed = [n for n in moved if n in self._all_factor_names() and prefix + n not in state_dict]
        if form != "full" and not unnamed:
            try:
                rank = self._check_rank(self._rank_from_state(state_dict, prefix))
            except (IndexError, KeyError, TypeError, ValueError, AttributeError) as e:
                lacking = [n for n in self._factor_names(self._rank) if prefix + n not in state_dict]
                if not lacking:
                    shapes = {n: tuple(state_dict[prefix + n].shape) for n in sorted(self._all_factor_names())
                              if prefix + n in state_dict and isinstance(state_dict[prefix + n], torch.Tensor)}
                    why = f" ({e})" if isinstance(e, (TypeError, ValueError)) else ""
                    return None, f"the saved factors {shapes} give no valid rank{why}"
                # The factors held do not name a rank (a linear layer's is A's width, and LoRA-FA saves its
                # trained B and bias only): where they have the layer's own form and rank, nothing switches,
                # and torch loads them and reports the rest as missing.
                if form != self._form or not self._holds_own_rank(state_dict, prefix):
                    return None, f"the state dict holds this layer in {form} form but lacks {', '.join(lacking)}"
        expected = dict(self._factor_shapes(rank)) if form != "full" else {}
        if form != "lowrank":
            expected[self.weight_name] = tuple(self._dense_shape())
        switching = (form, rank) != (self._form, self._rank)
        if switching:
            # The switch allocates these uninitialized: a dict that lacks one would leave it so.  (An
            # adapter's new rank keeps its W_f.)
            kept = {self.weight_name} if form == self._form == "adapter" else set()
            lacking = [name for name in expected if prefix + name not in state_dict and name not in kept]
            if lacking:
                where = f"{form} form" + ("" if form == "full" else f" (rank {rank})")
                return None, (f"the state dict holds this layer in {where} but lacks {', '.join(lacking)}, "
                              f"which loading it would leave uninitialized")
        if self.bias is not None:
            expected["bias"] = tuple(self.bias.shape)
        wrong = []
        for name, shape in expected.items():
            value = state_dict.get(prefix + name)
            if value is None:
                continue                     # a missing key: torch reports it under strict loading
            if not isinstance(value, torch.Tensor):
                wrong.append(f"{name} must be a tensor, got {type(value).__name__}")
            elif tuple(value.shape) != tuple(shape):
                where = f"{form} form" + ("" if form == "full" else f", rank {rank}")
                wrong.append(f"{name} must have shape {tuple(shape)} ({where}), got {tuple(value.shape)}"
                             f"{self._shape_hint(name, tuple(value.shape))}")
            elif switching and not assign and (kind := self._uncopyable(value)):
                where = f"{form} form" + ("" if form == "full" else f", rank {rank}")
                wrong.append(f"{name} must be a dense tensor with values to load ({where}), got {kind}")
        return (rank, None) if not wrong else (None, "; ".join(wrong))

    def _holds_own_rank(self, state_dict, prefix):
        """Whether ``state_dict`` holds some of this layer's factors, each a tensor of its shape at the
        layer's own rank."""
        held = {n: shape for n, shape in self._factor_shapes(self._rank).items() if prefix + n in state_dict}
        return bool(held) and all(isinstance(state_dict[prefix + n], torch.Tensor)
                                  and tuple(state_dict[prefix + n].shape) == tuple(shape) for n, shape in held.items())

    def _uncopyable(self, value):
        """What makes ``value`` a tensor torch cannot copy into the layer's parameters (a sparse or other
        non-strided layout, a quantized tensor, a meta tensor for a layer with values), else ""."""
        if value.layout != torch.strided:
            return f"a {str(value.layout).replace('torch.', '')} tensor"
        if value.is_quantized:
            return f"a quantized tensor ({value.dtype})"
        if value.is_meta and not self._reference_tensor().is_meta:
            return "a meta tensor (it has no values)"
        return ""

    def _shape_hint(self, name, shape):
        """What a state dict's wrong ``shape`` for tensor ``name`` likely means ("" where nothing is known)."""
        return ""

    @outside_inference_mode
    @torch.no_grad()
    def _allocate(self, form, rank):
        """Switch to ``form`` with uninitialized parameters of the right shapes (for loading); a frozen
        layer stays frozen, as ``load_state_dict`` leaves ``requires_grad`` alone.  A rank change within
        the form keeps each factor as trainable as the one it replaces (LoRA-FA's A frozen by hand stays
        frozen), as ``grow_rank_`` does; a form change makes the new parameters as a switch to it does."""
        self._check_switchable()
        ref = self._reference_tensor()
        trainable = self._trains()
        kw = dict(device=ref.device, dtype=ref.dtype)
        if form == "full":
            weight, factors = torch.empty(self._dense_shape(), **kw), {}
        else:
            dense = self._dense()
            weight = None
            if form == "adapter":
                weight = dense if dense is not None else torch.empty(self._dense_shape(), **kw)
            factors = {n: torch.empty(s, **kw) for n, s in self._factor_shapes(rank).items()}
        self._become(form, weight, factors, rank, trainable)
