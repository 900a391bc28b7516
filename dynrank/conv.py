"""LowRankConv2d: a drop-in ``nn.Conv2d`` with lowrank / full / adapter forms and four factorizations."""

import torch
from torch import nn
from torch.nn import functional as F

from ._args import check_int
from ._forms import FormLayer, _is_channels_last, check_floating_dtype, check_form
from .conv_adapter import (
    _ADAPTERS,
    ADAPTER_STRATEGIES,
    AdapterChoice,
    _chain,
    _dense_conv,
    _padded_input_costs,
    _time_strategies,
    adapter_costs,
    adapter_work,
    time_adapter_strategies,
)
from .conv_factorizations import KernelShape, get_factorization
from .conv_merging import merge_conv_
from .functional import check_floating_input, transform_active
from .linear import check_alpha, check_materialized, check_plain_computation, check_ratio

__all__ = ["LowRankConv2d", "ADAPTER_STRATEGIES", "PADDING_MODES", "AdapterChoice", "adapter_costs",
           "adapter_work", "time_adapter_strategies"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# Adapter strategies "auto" keeps per layer: the decisions for the input keys used last.  Inputs of
# ever new sizes (multi-scale training, aspect-ratio-preserving detection batches) would otherwise
# grow every adapter conv's cache for the whole adapter phase.
ADAPTER_CHOICES_KEPT = 64


# ---------------------------------------------------------------------------
# Forwards, one per form (the adapter's two strategies live in conv_adapter.py)
# ---------------------------------------------------------------------------

def _forward_full(layer, x):
    layer._check_no_factors_given()
    return _dense_conv(layer, x, layer._read("weight"), layer._read("bias"))


def _forward_lowrank(layer, x):
    if layer._read("weight") is not None:
        layer._refuse_weight()         # one torch.func.functional_call passed in: refused as an assigned one
    return _chain(layer, x, layer.factors(), layer._read("bias"))


def _forward_adapter(layer, x):
    strategy = layer._adapter_strategy_for(x)
    return _ADAPTERS[strategy](layer, x, layer._read("weight"), layer.factors(), layer._read("bias"))


_FORWARDS = {"full": _forward_full, "lowrank": _forward_lowrank, "adapter": _forward_adapter}


def _check_pair(value, name, minimum):
    """``value`` (kernel_size, stride, padding, dilation): an int ≥ ``minimum`` or a pair of them, as a pair.

    Raises:
        TypeError: neither an int nor a tuple/list, or a pair holding a non-int.
        ValueError: a tuple/list not of length 2, an int below ``minimum``.
    """
    expected = f"an int ≥ {minimum} or a pair of them"
    if not isinstance(value, (tuple, list)):
        return (check_int(value, name, expected, minimum),) * 2
    if len(value) != 2:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return tuple(check_int(v, name, expected, minimum, where=f" in {value!r}") for v in value)


def _check_padding(padding):
    """``padding``: an int ≥ 0, a pair of them, ``"valid"`` or ``"same"``; as a pair (``"valid"``: (0, 0))
    or ``"same"``.  (Whether ``"same"`` fits the stride is checked by the caller.)

    Raises:
        TypeError, ValueError: as :func:`_check_pair`; ValueError: a string other than these two.
    """
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        return (0, 0) if padding == "valid" else padding
    return _check_pair(padding, "padding", 0)


def _pad_amounts(padding, kernel_size, dilation):
    """F.pad amounts (left, right, top, bottom) of ``padding`` ((ph, pw) or ``"same"``) for a conv with
    ``kernel_size`` and ``dilation`` (pairs); ``"same"`` puts an odd pixel on the right and bottom, as torch."""
    if padding == "same":
        out = []
        for k, d in zip(kernel_size[::-1], dilation[::-1]):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = padding
    return (pw, pw, ph, ph)


def _dense_padding(conv):
    """The padding the ``nn.Conv2d`` ``conv`` applies, as :class:`LowRankConv2d` takes it: ``conv.padding``,
    except where a padding mode other than ``"zeros"`` pads by other amounts.

    Such a mode pads by ``conv._reversed_padding_repeated_twice``, which ``nn.Conv2d`` derives once, at
    construction: an edit of ``padding`` or ``dilation`` afterwards (segmentation code's
    ``_nostride_dilate``) does not reach it, and the conv goes on padding by the old amounts.  Those are
    what it computes, so where they disagree with ``conv.padding`` they are taken, as (ph, pw).

    Raises:
        TypeError, ValueError: a ``conv.padding`` the constructor refuses (:func:`_check_padding`).
        ValueError: amounts that differ between the two sides of a dimension, which ``conv.padding`` does
            not give and a (ph, pw) padding cannot hold (the message names both).
    """
    padding = conv.padding
    amounts = getattr(conv, "_reversed_padding_repeated_twice", None)
    if conv.padding_mode == "zeros" or amounts is None:
        return padding
    amounts = tuple(amounts)
    same_stride = padding != "same" or _check_pair(conv.stride, "stride", 1) == (1, 1)
    if same_stride and amounts == _pad_amounts(_check_padding(padding), _check_pair(conv.kernel_size, "kernel_size", 1),
                                               _check_pair(conv.dilation, "dilation", 1)):
        return padding
    # Otherwise the fixed amounts, as (ph, pw): "same" beside a stride edited in since too (torch pads by them
    # and never reads padding, where LowRankConv2d refuses "same" with a stride).
    left, right, top, bottom = amounts
    if left != right or top != bottom:
        raise ValueError(f"{type(conv).__name__} with padding_mode={conv.padding_mode!r} pads by {amounts} (left, "
                         f"right, top, bottom; set when it was built), not by its padding={padding!r}: expected "
                         f"the same amount on both sides of each dimension, to keep as a padding (ph, pw)")
    return (top, left)


def _check_padding_mode(padding_mode):
    """``padding_mode``, one of :data:`PADDING_MODES` (else a ValueError naming them)."""
    if not isinstance(padding_mode, str) or padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
    return padding_mode


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------

# The geometry LowRankConv2d lets users edit as nn.Conv2d's (see the class's geometry section).
_GEOMETRY = ("stride", "dilation", "padding", "padding_mode")


def _geometry(name, check, doc):
    """A geometry attribute of LowRankConv2d, settable as nn.Conv2d's: ``check`` validates a value as the
    constructor does, and what the forward reads is derived again (``_derive_padding``)."""
    attr = "_" + name

    def get(self):
        return getattr(self, attr)

    def set(self, value):
        setattr(self, attr, check(value))
        self._derive_padding()
    return property(get, set, doc=doc)


def _exporting():
    """Whether ``torch.export`` is tracing.  ``torch.compiler.is_exporting()`` itself reads True under any
    ``torch.compile`` in torch ≤ 2.11 (dynamo folds it to a constant); the flag export sets is read as
    it is.  An older torch with neither (torch 2.4) says no export: the strategy is then chosen by cost there
    too, which a dynamic batch size may refuse to trace."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is not None:
        return flag
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting()) if is_exporting is not None else False


class LowRankConv2d(FormLayer):
    """2-D convolution whose kernel is factorized, dense, or frozen-dense plus a factorized adapter.

    ============  =============================================  ====================
    form          forward                                        trainable
    ============  =============================================  ====================
    ``lowrank``   chain of small convs (s·factors), never a      factors
                  dense kernel
    ``full``      conv(x, W)                                     W
    ``adapter``   conv(x, W_f) + chain(x), or conv(x, W_f + ΔW)  factors (W_f frozen)
    ============  =============================================  ====================

    ``decomposition`` picks the factorization (details and factor shapes in
    :mod:`dynrank.conv_factorizations`):

    - ``"svd"``: k×k conv C→r (stride, padding, dilation, groups), then 1×1 r→F.
      ``rank`` is an int r; with ``groups`` g > 1 both convs are grouped, r is a
      multiple of g and each group has rank r/g (block-diagonal SVD).
    - ``"tucker"`` (Tucker-2): 1×1 C→r_in, k×k core r_in→r_out, 1×1 r_out→F.
      ``rank`` is an int r (= (r, r)) or a pair (r_in, r_out).
    - ``"cp"``: 1×1 C→r, depthwise kh×1, depthwise 1×kw, 1×1 r→F — the textbook
      CP convolution.  (The paper authors' TensorFlow code used full r×r
      middle convolutions instead, which is not a CP decomposition.)
    - ``"tkd-cpd"``: Tucker-2 whose core is itself CP: 1×1 C→r_in, 1×1 r_in→R,
      depthwise kh×1, depthwise 1×kw, 1×1 R→r_out, 1×1 r_out→F (adjacent 1×1
      convs are run as one where that saves work).  ``rank`` is an int r (=
      (r, r, r)) or a triple (r_in, R, r_out).

    Give either ``rank`` or ``rank_ratio`` ρ: as the paper's authors,
    r = max(1, int(ρ·out_channels)), then clipped to each mode's limit (and for
    svd rounded down to a multiple of groups, and at least groups: a
    depthwise conv keeps full rank).  The scale s is alpha/r_last
    (r_last: the rank entering the output 1×1 conv) when ``alpha`` is given,
    else 1.  Only svd supports groups > 1.

    ``inflate()`` merges the factors into the dense kernel with one fused pass
    (Triton or cuBLAS, see ``dynrank._backend``) and is exactly function-preserving for any stride,
    padding, padding mode, dilation and kernel size: every chain places the
    stride, padding and dilation on its spatial convs, whose neighbours are
    bias-free 1×1 convs.  ``deflate(rank, init)`` freezes W as W_f and attaches
    fresh factors whose output starts at zero: the output factor A is zeroed
    (tucker: the core, as the authors; tkd-cpd: ``core_out``), the others are
    Glorot-normal.  ``init="svd"`` moves the best fit of W in the layer's
    decomposition (truncated SVD, HOOI Tucker, ALS CP) into the factors and
    keeps W_f = W − fit, so the function is unchanged for every decomposition.
    A layer moved to ``torch.channels_last`` stays so: the W and factors a form
    change creates take its layout.  Factors that are all 1×1 or one channel
    deep (cp and tkd-cpd, tucker with r_in = 1) are contiguous in both layouts:
    theirs is read from the strides ``.to(memory_format=...)`` gives their
    size-1 dimensions, which copies, moves and casts keep.

    Adapter form, two strategies (``adapter_strategy``):

    - ``"chain"``: the frozen dense conv beside the factor chain;
    - ``"merged"``: one conv with W_f + ΔW, ΔW merged differentiably for the
      step (one kernel pass; its backward maps the kernel gradient to the
      factors with two small GEMMs);
    - ``"auto"`` (default): decided per layer and per input key (shape, dtype,
      device, grad mode) on first use and cached (the 64 keys used last; one
      used less recently is decided again when it comes back): on CUDA by timing one
      forward(+backward) of each (:func:`time_adapter_strategies`), elsewhere
      by a FLOP/byte roofline model (:func:`adapter_costs`).  The chain costs
      its extra convs in forward and backward (and the bytes of reading x again
      and adding the two paths); the merged conv costs the dense weight
      gradient in the backward.  Where FLOPs dominate (many channels, on CUDA)
      large batch·spatial sizes and cheap chains favour "chain"; where bytes
      do (a CPU) "merged" wins as batch·spatial size grows and "chain" takes
      small inputs.  :attr:`adapter_choice` and :attr:`adapter_choices` show the
      decisions and their evidence.  Under ``torch.compile`` the cost model
      decides while tracing (on CUDA too) and nothing is cached: dynamo guards
      on the decision, so one graph serves every input shape with the same
      choice (with dynamic shapes, recompiling only where the choice flips),
      and :attr:`adapter_choices` keeps the eager decisions only.
      ``torch.export`` cannot keep such a guard on a dynamic dimension: there
      "auto" takes "merged", whose cost does not grow with the batch.

    Geometry edits apply as for ``nn.Conv2d``: ``stride``, ``padding``, ``dilation`` and
    ``padding_mode`` may be set after construction (segmentation code's "_nostride_dilate"
    rewrites them in place) and take effect at the next forward, in every form, and form changes
    keep the edited function.  Each is checked when set as the constructor checks it, except that
    ``padding="same"`` beside a stride other than 1 is refused by the next forward (so the two may
    be edited in either order).

    ``torch.fx.symbolic_trace`` of a model holding the layer records it as one ``call_module`` node,
    as it does ``nn.Conv2d``: the GraphModule calls the layer itself, whose form changes it follows.
    (The layer cannot be the traced root itself: trace a module holding it, or use ``torch.export``.)

    Hooks, checkpointing, parametrizations: as for ``FusedLowRankLinear``.
    Module hooks stay through form changes; tensor hooks stay with their
    parameter, which a change may release or replace (the factors at
    ``inflate`` and ``deflate``, a new W at a lowrank layer's ``inflate``; W
    is kept through ``deflate`` and an adapter's ``inflate``): register them
    again after a change.  ``torch.utils.checkpoint`` recomputes every form
    and adapter strategy exactly; ``"auto"`` decides per input key and grad
    mode, so a non-reentrant recompute runs the choice its forward made, while
    reentrant checkpointing, whose forward runs without grad, may recompute
    with the other strategy (the same function, to rounding).  A form change
    refuses a reparametrized kernel or factor (``torch.nn.utils.parametrize``).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
        groups, bias, padding_mode: as in ``nn.Conv2d`` (padding may be an int,
            a pair, ``"valid"`` or ``"same"``).
        rank: see above.  rank_ratio: ρ > 0, instead of ``rank``.
        decomposition: ``"svd"``, ``"tucker"``, ``"cp"`` or ``"tkd-cpd"``.
        form: initial form.  ``"lowrank"`` draws the factors so the merged
            kernel has ``nn.Conv2d``'s default variance; ``"full"`` initializes
            W like ``nn.Conv2d``; ``"adapter"`` does both with a zero adapter.
        alpha: optional scale numerator.  adapter_strategy: see above.
        device, dtype: factory kwargs.

    Attributes:
        weight: W or W_f, shape (out_channels, in_channels/groups, kh, kw); None in lowrank.
        factor parameters by name (``factors()``), e.g. svd: ``B`` (r, C/g, kh, kw), ``A`` (F, r/g, 1, 1).
        bias: (out_channels,) or None.

    Shape:
        input (N, C, H, W) or (C, H, W) → output (N, F, H_out, W_out) or (F, H_out, W_out).

    Raises:
        TypeError: a channel count, ``groups``, ``kernel_size``, ``stride``, ``dilation`` or
            ``padding`` (given or set) that is not an int or a pair of ints (a float, a str, a bool,
            None; a numpy integer is an int), a rank of the wrong type, a non-number ``rank_ratio`` or
            ``alpha``, a ``dtype`` that is not floating-point.
        ValueError: a channel count or ``groups`` below 1 or not dividing the channels, a pair not
            of length 2, a kernel size, stride or dilation below 1 or padding below 0, a padding
            string other than ``"valid"`` and ``"same"`` (or ``"same"`` with a stride other than
            1, given to the constructor; set afterwards, the next forward raises ``RuntimeError``,
            as ``nn.Conv2d``'s does), a rank out of the decomposition's bounds, a ratio outside
            (0, 1], an unknown decomposition, form, padding mode or adapter strategy.

    Example:
        >>> conv = LowRankConv2d(16, 32, 3, rank=8, decomposition="tucker", padding=1)
        >>> y = conv(torch.randn(2, 16, 8, 8))          # 1×1 → 3×3 core → 1×1
        >>> conv.inflate().form
        'full'
        >>> conv.deflate(init="zeros").form              # frozen W_f + zero Tucker adapter
        'adapter'
    """

    def __init__(self, in_channels, out_channels, kernel_size, rank=None, decomposition="svd", stride=1,
                 padding=0, dilation=1, groups=1, bias=True, form="lowrank", padding_mode="zeros",
                 rank_ratio=None, alpha=None, adapter_strategy="auto", device=None, dtype=None):
        super().__init__()
        in_channels = check_int(in_channels, "in_channels", "a positive int", 1)
        out_channels = check_int(out_channels, "out_channels", "a positive int", 1)
        groups = check_int(groups, "groups", "a positive int", 1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                             f"divisible by groups ({groups})")
        self._dec = get_factorization(decomposition)
        if groups > 1 and decomposition != "svd":
            raise ValueError(f"groups > 1 is supported for decomposition='svd' only, got "
                             f"decomposition={decomposition!r} with groups={groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _check_pair(kernel_size, "kernel_size", 1)
        # The geometry is settable (see the properties below); set here all at once, then derived.
        self._stride = _check_pair(stride, "stride", 1)
        self._dilation = _check_pair(dilation, "dilation", 1)
        self._padding = _check_padding(padding)
        if self._padding == "same" and self._stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride={self._stride}")
        self._padding_mode = _check_padding_mode(padding_mode)
        self._derive_padding()
        self.decomposition = decomposition
        self.alpha = check_alpha(alpha, dtype)
        self.adapter_strategy = adapter_strategy
        self._kshape = KernelShape(self.out_channels, self.in_channels, *self.kernel_size, self.groups)
        if (rank is None) == (rank_ratio is None):
            raise ValueError(f"give exactly one of rank and rank_ratio, got rank={rank!r}, rank_ratio={rank_ratio!r}")
        if rank_ratio is not None:
            rank = self.rank_for_ratio(rank_ratio)
        self.rank_ratio = rank_ratio
        self._build_parameters(form, self._check_rank(rank), bias, device, dtype)

    # -- geometry: settable as nn.Conv2d's, applied from the next forward -----------
    # Segmentation code rewrites stride, dilation and padding of a trained backbone's convs in place
    # (torchvision's and PSPNet's "_nostride_dilate").  Each setter checks its value as the
    # constructor does and derives what the forward reads (``_pad``, ``_conv_padding``), so the
    # forward pays nothing for it.  padding="same" beside a stride other than 1 is refused by the
    # next forward (F.conv2d's RuntimeError, as for nn.Conv2d), not by the setter: the two may be
    # edited in either order.
    stride = _geometry("stride", lambda value: _check_pair(value, "stride", 1),
                       """(sh, sw); settable to an int ≥ 1 or a pair of them.""")
    dilation = _geometry("dilation", lambda value: _check_pair(value, "dilation", 1),
                         """(dh, dw); settable to an int ≥ 1 or a pair of them.""")
    padding = _geometry("padding", _check_padding,
                        """(ph, pw) or ``"same"``; settable to an int ≥ 0, a pair of them, ``"valid"`` (kept as
        (0, 0)) or ``"same"``.""")
    padding_mode = _geometry("padding_mode", _check_padding_mode,
                             """``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"`` (settable).""")

    def _derive_padding(self):
        """Set what the forward reads from the geometry: ``_pad``, the F.pad amounts of a non-zero padding
        mode (None for zeros), and ``_conv_padding``, the padding every conv of the forward gets.  The
        adapter strategies chosen so far are dropped: their costs depend on the geometry."""
        if self._padding_mode == "zeros" or (self._padding == "same" and self._stride != (1, 1)):
            # Each conv pads itself.  ("same" with a stride: F.conv2d refuses it at the next forward.)
            self._pad, self._conv_padding = None, self._padding
        else:
            # Non-zero padding modes pad once; every conv of the chain then runs unpadded.
            self._pad, self._conv_padding = self._padding_amounts(), (0, 0)
        self._adapter_choices = {}

    def __setstate__(self, state):
        # A layer pickled whole by an older dynrank holds its geometry as plain attributes.
        old = {k: state.pop(k) for k in _GEOMETRY if k in state}
        super().__setstate__(state)
        for name, value in old.items():
            self.__dict__["_" + name] = value
        if old:
            self._derive_padding()

    def _padding_amounts(self):
        """F.pad amounts (left, right, top, bottom) equivalent to ``padding``."""
        return _pad_amounts(self.padding, self.kernel_size, self.dilation)

    @property
    def adapter_strategy(self):
        """Requested adapter strategy: ``"auto"``, ``"chain"`` or ``"merged"`` (settable)."""
        return self._adapter_strategy

    @adapter_strategy.setter
    def adapter_strategy(self, value):
        if value not in ADAPTER_STRATEGIES:
            raise ValueError(f"adapter_strategy must be one of {', '.join(ADAPTER_STRATEGIES)}, got {value!r}")
        self._adapter_strategy = value
        self._adapter_choices = {}
        self._last_adapter_choice = None

    @property
    def adapter_choice(self):
        """Strategy of the latest adapter forward (the fixed one unless "auto"; None before any)."""
        if self._adapter_strategy != "auto":
            return self._adapter_strategy
        return self._last_adapter_choice

    @property
    def adapter_choices(self):
        """Dict input key (shape, dtype, device, grad mode, input needs grad) → :class:`AdapterChoice`, for
        the eager forwards (a compiled one decides while tracing and caches nothing): the
        ``ADAPTER_CHOICES_KEPT`` (64) keys used last, the least recently used first."""
        return dict(self._adapter_choices)

    def _adapter_strategy_for(self, x):
        if self._adapter_strategy != "auto":
            return self._adapter_strategy
        if torch.compiler.is_compiling():
            # Traced: the cost model decides, and the cache is left alone.  Filled (or read) inside a
            # trace, the dict changed under dynamo's guards on it: a second compile at each switch to
            # adapter form, another per new input shape or eager call's entry, and under dynamic shapes
            # (SymInt keys, SymFloat costs) a graph break and a recompile at every call.  With symbolic
            # shapes the comparison below becomes a guard: one graph per choice, for every shape.
            if _exporting():
                # torch.export refuses that guard on a dynamic dim (and strict export's dynamo shows a
                # symbolic size as an int): the strategy whose cost does not grow with the batch (one
                # merge per call), for every size the program will see.
                return "merged"
            seconds = _padded_input_costs(self, x)
            strategy = "chain" if seconds["chain"] <= seconds["merged"] else "merged"
        else:
            key = (tuple(x.shape), x.dtype, str(x.device), torch.is_grad_enabled(), x.requires_grad)
            choice = self._adapter_choices.pop(key, None)
            if choice is None:
                # (Timing runs autograd on detached copies: not under a CUDA graph's capture, nor inside a
                # torch.func transform or a jit trace, which the cost model serves.)
                if x.is_cuda and not torch.cuda.is_current_stream_capturing() and not transform_active():
                    seconds, method = _time_strategies(self, x), "timing"
                else:
                    seconds, method = _padded_input_costs(self, x), "cost model"
                choice = AdapterChoice(min(seconds, key=seconds.get), method, seconds)
                if len(self._adapter_choices) >= ADAPTER_CHOICES_KEPT:      # the least recently used goes
                    del self._adapter_choices[next(iter(self._adapter_choices))]
            self._adapter_choices[key] = choice          # re-inserted: the dict's order is the order of use
            strategy = choice.strategy
        self._last_adapter_choice = strategy
        return strategy

    def _on_form_change(self):
        self._run = _FORWARDS[self._form]
        self._adapter_choices = {}
        self._last_adapter_choice = None

    # -- factor description (FormLayer contract) ---------------------------------
    def rank_for_ratio(self, ratio):
        """Rank of this layer's decomposition at rank ratio ρ (the authors' int(ρ·out_channels), clipped)."""
        return self._dec.rank_from_ratio(check_ratio(ratio), self._kshape)

    def _init_lowrank_(self, factors, rank):
        self._dec.init_lowrank_(factors, self.scale_for(rank))

    def _check_rank(self, rank):
        return self._dec.check_rank(rank, self._kshape)

    def scale_for(self, rank):
        """Scale s of the factorized term at ``rank`` (an int, or the decomposition's tuple): alpha / r_last,
        or 1 without ``alpha``.

        Raises:
            TypeError, ValueError: a ``rank`` this layer's decomposition does not take (as the constructor's).
        """
        return self._scale_at(self._check_rank(rank))

    def _scale_at(self, rank):
        # scale_for without the check, for ranks the layer already holds or checked.
        return 1.0 if self.alpha is None else self.alpha / self._dec.inner_rank(rank)

    @property
    def scale(self):
        """Factor s multiplying the factorized term: alpha / r_last, or 1."""
        return self._scale_at(self._rank)

    def _factor_names(self, rank):
        return self._dec.factor_names

    def _dense_shape(self):
        return self._kshape.dense

    def _factor_shapes(self, rank):
        return self._dec.factor_shapes(rank, self._kshape)

    def _init_factors(self, rank, zero_output, device=None, dtype=None):
        return self._dec.init_factors(rank, self._kshape, zero_output, device, dtype)

    def _merge_into_(self, weight, alpha, factors):
        U, V = self._dec.operands(factors)
        merge_conv_(weight, U, V, alpha * self._scale_at(self._dec.rank_of(factors)), self.groups)

    weight_kind = "kernel"

    @property
    def _fit_name(self):
        return self.decomposition

    def _fit_factors(self, weight, rank):
        # On the CPU, whatever torch's default device is: the fit's code (tensorly's too) creates tensors on it.
        with torch.device("cpu"):
            fit = self._dec.fit(weight.detach().double().cpu(), rank, self.scale_for(rank), self.groups, weight.dtype)
        return {k: v.to(device=weight.device, dtype=weight.dtype) for k, v in fit.items()}

    def _rank_from_state(self, state_dict, prefix):
        return self._dec.rank_of({k: state_dict[prefix + k] for k in self._dec.factor_names})

    # -- construction from a dense layer ---------------------------------------
    @classmethod
    def from_dense(cls, conv, rank=None, decomposition="svd", form="lowrank", rank_ratio=None, alpha=None,
                   adapter_strategy="auto"):
        """Build from an ``nn.Conv2d``, keeping its geometry, padding mode and bias.

        The padding kept is the one the conv applies: with a padding mode other than ``"zeros"``,
        ``nn.Conv2d`` pads by amounts fixed when it was built, which an edit of ``padding`` or
        ``dilation`` afterwards (segmentation code's ``_nostride_dilate``) does not change; those
        amounts are taken where they differ from ``conv.padding``.

        ``form="lowrank"``: factors fitted to the dense kernel in float64 with
        tensorly (svd: truncated SVD of the (F, C/g·kh·kw) matrix per group,
        the best rank-r approximation; tucker: HOOI ``partial_tucker`` over the
        channel modes; cp: ALS ``parafac`` from an SVD start, or, where that
        start meets a singular system (a Dirac kernel, a 1×1 kernel centred in
        a 3×3), from a seeded random one at the same rank; tkd-cpd: Tucker-2,
        then ``parafac`` of the core), then cast to the kernel's dtype (the CP
        fits are deterministic and leave numpy's global RNG alone).  An
        all-zero kernel (its best fit is zero, but all-zero factors never get a
        gradient) gets the zero-output init of ``deflate(init="zeros")`` in every decomposition:
        the output-side factor zero (tucker: the core; tkd-cpd: ``core_out``),
        the others random.  So do the components a fit leaves at zero: svd's
        of singular value zero (a kernel of rank below r/g in a group, e.g. a
        depthwise conv's all-zero filter), and, where ALS meets a singular
        system from both starts at the CP rank (a kernel of lower CP rank, e.g.
        an inflated cp layer's), the components beyond the largest CP rank at
        which it runs, with a UserWarning naming the kernel's shape, the CP
        rank asked for and the one reached.  (Tucker needs
        neither: its surplus components keep orthonormal A and B columns beside
        a zero core slice, and train.)  A kernel on the meta device has no values: the
        factors get the fresh init (shapes only).  ``form="adapter"``: the
        kernel becomes W_f with a zero adapter.  ``form="full"``: W is kept.
        The bias keeps its ``requires_grad``; a frozen kernel gives frozen
        factors or a frozen W (adapter form trains its adapter beside it).

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d``, or its kernel's dtype is
                not floating-point; a subclass that overrides ``forward`` or
                ``_conv_forward`` (timm's ``StdConv2d``; see
                :func:`~dynrank.linear.own_computation`); a reparametrized or
                pruned kernel or bias (``torch.nn.utils.parametrize``, the
                hook-based ``weight_norm``/``spectral_norm``,
                ``torch.nn.utils.prune``; see
                :func:`~dynrank.linear.reparametrization`): remove it first, or
                keep the layer dense.
            ValueError: invalid rank, rank_ratio, decomposition or form; a kernel
                with NaN/inf entries (lowrank form); a CP fit (cp, tkd-cpd) that
                fails at every CP rank down to 1; an
                ``nn.LazyConv2d`` not run yet (its kernel has no shape); a padding
                mode other than ``"zeros"`` whose amounts, fixed when the conv was built,
                differ from ``conv.padding`` and between the two sides of a dimension.

        Example:
            >>> conv = nn.Conv2d(16, 32, 3, padding=1)
            >>> LowRankConv2d.from_dense(conv, rank_ratio=0.5, decomposition="cp").rank
            16
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense needs an nn.Conv2d, got {type(conv).__name__}")
        check_materialized(conv, cls.__name__)
        check_plain_computation(conv, cls.__name__)
        check_form(form)
        weight = conv.weight
        check_floating_dtype(weight.dtype, needed_by=f"from_dense needs a floating-point {cls.weight_kind}: ")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank=rank,
                    decomposition=decomposition, stride=conv.stride, padding=_dense_padding(conv),
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, form=form,
                    padding_mode=conv.padding_mode, rank_ratio=rank_ratio, alpha=alpha,
                    adapter_strategy=adapter_strategy, device=weight.device, dtype=weight.dtype)
        layer._copy_from_dense_(weight, conv.bias)
        if _is_channels_last(weight):          # a channels-last model stays so (as unconvert_model keeps it)
            layer.to(memory_format=torch.channels_last)
        return layer

    # -- forward ------------------------------------------------------------
    def forward(self, input):
        """``input`` (N, C, H, W) or (C, H, W) → (N, F, H_out, W_out) or (F, H_out, W_out) in the current
        form.  The argument is named as ``nn.Conv2d.forward``'s, so ``conv(input=x)`` works before and after
        ``convert_model``."""
        if not isinstance(input, torch.Tensor):
            if isinstance(input, torch.fx.Proxy):
                return self._fx_node(input, trace_through=False)
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in (3, 4) or input.shape[-3] != self.in_channels:
            raise ValueError(f"input must have shape (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W), "
                             f"got {tuple(input.shape)}")
        ref = self._reference_tensor()
        if input.is_meta != ref.is_meta:
            # torch's convs mix meta and real tensors silently (the result on one of them)
            self._check_input_against(input, ref)
        unbatched = input.dim() == 3
        if unbatched:
            input = input.unsqueeze(0)
        padded = self._pad is None
        try:
            if self._pad is not None:
                # Non-zero padding modes pad once; every conv of the chain then runs unpadded.
                input = F.pad(input, self._pad, mode=self._padding_mode)
                padded = True
            y = self._run(self, input)
        except RuntimeError:
            # torch's pads and convs refuse another device or dtype: name the fault; an input smaller than
            # the kernel is named with the layer's kernel, as nn.Conv2d names it, not a factor's (3 x 1)
            # (other errors, a pad's among them, pass as they came)
            self._check_input_against(input, ref)
            if padded:
                self._check_input_size(input)
            raise
        return y.squeeze(0) if unbatched else y

    def _check_input_size(self, x):
        """nn.Conv2d's RuntimeError for a (padded, where ``_pad`` applied) (N, C, H, W) input ``x`` smaller
        than the dilated kernel (with ``"same"`` padding, one with no rows or columns), or with no rows or
        columns in a batch that is not empty.  ``"same"`` beside a stride is refused first, as F.conv2d
        refuses it."""
        kernel = [d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation)]
        padding = (0, 0) if self._pad is not None else self._conv_padding
        if padding == "same" and self._stride != (1, 1):
            raise RuntimeError("padding='same' is not supported for strided convolutions")
        left, right, top, bottom = _pad_amounts(padding, self.kernel_size, self.dilation)
        size = [x.shape[-2] + top + bottom, x.shape[-1] + left + right]
        if any(n < k for n, k in zip(size, kernel)):
            raise RuntimeError(f"Calculated padded input size per channel: ({size[0]} x {size[1]}). Kernel size: "
                               f"({kernel[0]} x {kernel[1]}). Kernel size can't be greater than actual input size")
        if x.shape[0] and 0 in x.shape[-2:]:
            raise RuntimeError(f"Only zero batch or zero channel inputs are supported, but got input shape: "
                               f"{list(x.shape)}")

    def _check_input_against(self, x, ref):
        if x.device != ref.device:
            raise ValueError(f"input is on {x.device} but the layer's parameters are on {ref.device}")
        if x.dtype != ref.dtype:
            check_floating_input(x)
            if not torch.is_autocast_enabled(x.device.type):
                raise TypeError(f"input has dtype {x.dtype} but the layer's parameters have {ref.dtype}; cast one "
                                f"of them (or run under torch.autocast)")
            if torch.float64 in (x.dtype, ref.dtype):
                raise TypeError(f"input has dtype {x.dtype} but the layer's parameters have {ref.dtype}, and "
                                f"torch.autocast leaves float64 tensors as they are (as for nn.Conv2d); cast one "
                                f"of them")

    def extra_repr(self):
        parts = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}",
                 f"decomposition={self.decomposition!r}", f"rank={self._rank}", f"form={self._form!r}"]
        if self.stride != (1, 1):
            parts.append(f"stride={self.stride}")
        if self.padding != (0, 0):
            parts.append(f"padding={self.padding!r}")
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.padding_mode != "zeros":
            parts.append(f"padding_mode={self.padding_mode!r}")
        if self.bias is None:
            parts.append("bias=False")
        if self.alpha is not None:
            parts.append(f"alpha={self.alpha}")
        return ", ".join(parts)
