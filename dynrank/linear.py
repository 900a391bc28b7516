"""FusedLowRankLinear: a drop-in ``nn.Linear`` with lowrank / full / adapter forms."""

import math

import torch
from torch import nn
from torch.fx import Proxy
from torch.nn import functional as F

from . import functional as DF
from ._args import check_int, check_real
from ._forms import HOW_TO_REMOVE, FormLayer, check_floating_dtype, check_form

__all__ = ["FusedLowRankLinear", "check_alpha", "check_rank", "check_ratio", "is_transposed_linear",
           "linear_weight", "own_computation", "reparametrization", "HOW_TO_REMOVE", "check_plain_computation",
           "check_materialized", "rank_from_ratio", "transformers_bases", "transformers_class"]


def transformers_bases(module):
    """The classes of ``module`` (its own and its bases) defined in Hugging Face's ``transformers``
    package, most derived first: dynrank knows them without importing transformers."""
    return [c for c in type(module).__mro__ if c.__module__.split(".")[0] == "transformers"]


def transformers_class(module, names):
    """The name among ``names`` of a class of ``module`` (its own or a base) defined in transformers, or None."""
    return next((c.__name__ for c in transformers_bases(module) if c.__name__ in names), None)


# Subclasses in transformers whose own forward computes exactly their base's x·Wᵀ + b.
_PLAIN_SUBCLASSES = ("FalconLinear",)


def own_computation(module):
    """``"Class.method"`` where the class of an ``nn.Linear``/``nn.Conv2d`` overrides the base's
    ``forward`` (or ``Conv2d._conv_forward``), else None.  Such a layer computes more than the product
    with its weight (timm's ``StdConv2d`` standardizes its kernel, a mixture-of-experts router picks its
    top k, ``Conv2dSame`` pads by the input's size), which a dynrank layer built from its weight would
    drop.  transformers' ``FalconLinear`` (x·Wᵀ + b, written out) counts as plain."""
    if isinstance(module, nn.Conv2d):
        base, methods = nn.Conv2d, ("forward", "_conv_forward")
    elif isinstance(module, nn.Linear):
        base, methods = nn.Linear, ("forward",)
    else:
        return None
    cls = type(module)
    if cls.__name__ in _PLAIN_SUBCLASSES and cls in transformers_bases(module):
        return None
    return next((f"{cls.__name__}.{m}" for m in methods if getattr(cls, m) is not getattr(base, m)), None)


def reparametrization(module):
    """What reparametrizes a tensor of ``module`` (``"weight is parametrized (_SpectralNorm)"``), else None.

    ``torch.nn.utils.parametrize`` (``parametrizations.spectral_norm``, ``weight_norm``,
    ``orthogonal``), the older hook-based ``spectral_norm``/``weight_norm`` and ``prune`` compute the
    weight from other tensors at each call.  A dynrank layer built from the weight would hold one value of it and
    drop the constraint.
    """
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(module):
        kinds = {name: ", ".join(type(p).__name__ for p in plist) for name, plist in module.parametrizations.items()}
        return "; ".join(f"{name} is parametrized ({kind})" for name, kind in kinds.items())
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    found = []
    for hook in getattr(module, "_forward_pre_hooks", {}).values():     # anything with a weight: no hooks
        if isinstance(hook, (SpectralNorm, WeightNorm)):
            found.append(f"{hook.name} is reparametrized (hook-based {type(hook).__name__})")
        elif isinstance(hook, BasePruningMethod):
            found.append(f"{hook._tensor_name} is pruned ({type(hook).__name__})")
    return "; ".join(found) or None


def check_plain_computation(module, cls_name):
    """TypeError where :func:`own_computation` finds an overriding method, or :func:`reparametrization`
    a reparametrized tensor (``from_dense`` of ``cls_name``)."""
    method = own_computation(module)
    base = "nn.Conv2d" if isinstance(module, nn.Conv2d) else "nn.Linear"
    if method is not None:
        raise TypeError(f"from_dense: {type(module).__name__} overrides {base}.{method.split('.')[1]}, so a "
                        f"{cls_name} built from its weight would not compute what it computes; keep it dense, "
                        f"or convert a plain {base}")
    reparam = reparametrization(module)
    if reparam is not None:
        raise TypeError(f"from_dense: the {base}'s {reparam}, so a {cls_name} built from its weight would hold "
                        f"one value of it and drop the parametrization; remove it first ({HOW_TO_REMOVE}), or "
                        f"keep the layer dense")


def check_materialized(module, cls_name):
    """ValueError where ``module`` still has uninitialized (lazy) parameters: an ``nn.LazyLinear`` or
    ``nn.LazyConv2d`` not run yet has no shapes to build a ``cls_name`` from (``from_dense``)."""
    params = module.parameters(recurse=False) if isinstance(module, nn.Module) else ()
    if any(nn.parameter.is_lazy(p) for p in params):
        raise ValueError(f"from_dense: the {type(module).__name__} still has uninitialized (lazy) parameters; run "
                         f"it once on a dummy batch so they get their shapes, then build the {cls_name} from it")


def is_transposed_linear(module):
    """Whether ``module`` is a Hugging Face transformers ``Conv1D`` (or a subclass): the linear layer of
    GPT-2 and OpenAI GPT, y = x·W + b with its weight stored (in, out), the transpose of nn.Linear's."""
    return transformers_class(module, ("Conv1D",)) is not None


def linear_weight(module):
    """The (out, in) weight of a linear module: ``weight`` itself, or its transposed view for a
    transformers ``Conv1D`` (see :func:`is_transposed_linear`); None where there is no tensor weight."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    return weight.t() if is_transposed_linear(module) and weight.dim() == 2 else weight


def check_rank(rank, limit, what="rank"):
    """Validate an integer rank in [1, limit]; returns it as int.

    Raises:
        TypeError: a rank that is not an int (a float, a str, a bool, None).
        ValueError: a rank outside [1, limit].
    """
    rank = check_int(rank, what, "an int")
    if not 1 <= rank <= limit:
        raise ValueError(f"{what} must be in [1, {limit}], got {rank}")
    return rank


def check_ratio(ratio, what="rank_ratio"):
    """Validate a rank ratio ρ in (0, 1]; returns it as float."""
    check_real(ratio, what, "a float in (0, 1]")
    if not 0.0 < ratio <= 1.0:                      # NaN fails this too
        raise ValueError(f"{what} must be in (0, 1], got {ratio!r}")
    return float(ratio)


def check_alpha(alpha, dtype=None):
    """Validate a scale numerator: None, or a finite number > 0 that a layer of ``dtype`` (None: the
    default dtype) can apply; returns it as float (so the scale alpha / rank is a Python float, as the
    layers' forward expects).

    torch applies a scale to float32 and 16-bit tensors in float32, so there alpha is at most float32's
    largest value (3.4e38; alpha is the scale at rank 1); a float64 layer takes any finite alpha.

    Raises:
        TypeError: an ``alpha`` that is not a number (a str, a bool, a tensor).
        ValueError: an ``alpha`` that is not a finite number > 0, or above float32's largest value for
            a ``dtype`` other than float64.
    """
    if alpha is None:
        return None
    check_real(alpha, "alpha", "a number or None")
    if not 0.0 < alpha < math.inf:                  # NaN fails this too
        raise ValueError(f"alpha must be a finite number > 0 (the scale is alpha / rank), got {alpha!r}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype != torch.float64 and alpha > DF.FLOAT32_MAX:
        raise ValueError(f"alpha must be at most {DF.FLOAT32_MAX:.6g} (float32's largest value) for a {dtype} "
                         f"layer: torch applies the scale alpha / rank in float32 (a float64 layer takes any "
                         f"finite alpha), got {alpha!r}")
    return float(alpha)


def rank_from_ratio(ratio, in_features, out_features):
    """Rank of a linear layer at rank ratio ρ: max(1, int(ρ·min(in, out))).

    ρ is a share of the largest rank the layer can have, so an expanding
    projection (768→3072) at ρ = 0.25 gets rank 192, not a full-rank 768.
    """
    return max(1, int(check_ratio(ratio) * min(in_features, out_features)))


class FusedLowRankLinear(FormLayer):
    """Linear layer whose weight is low-rank, full, or frozen-full plus a low-rank adapter.

    ============  ===================================  ================
    form          forward                              trainable
    ============  ===================================  ================
    ``lowrank``   y = s·(x·B)·Aᵀ + bias                A, B
    ``full``      y = x·Wᵀ + bias                      W
    ``adapter``   y = x·W_fᵀ + s·(x·B)·Aᵀ + bias       A, B (W_f frozen)
    ============  ===================================  ================

    Hooks, checkpointing, parametrizations: module hooks (forward, forward-pre,
    full backward, backward-pre) see the layer's input, output and their
    gradients in every form and stay through ``inflate``/``deflate`` and the
    schedulers' switches (the module is the same object).  Tensor hooks
    (``register_hook``, ``register_post_accumulate_grad_hook``) belong to the
    parameter: a change drops them with the parameters it releases or replaces
    (A and B at ``inflate``; a new W at a lowrank layer's ``inflate``; new A
    and B at ``deflate`` and at a rank growth).  The bias keeps its hooks, and
    W keeps its own through ``deflate`` (frozen as W_f, they stop firing) and an
    adapter's ``inflate`` (trained again).  Register hooks on the new
    parameters after a change, e.g. in ``DynamicRankScheduler.add_callback``.
    ``torch.utils.checkpoint`` (reentrant or not, ``checkpoint_sequential``,
    selective policies) recomputes every form exactly.  A
    ``torch.nn.utils.parametrize`` parametrization of W or a factor is used
    by the forward and backward, and the layer's state dict (which saves the
    tensor under the parametrization's keys) loads back into it; but a form
    change refuses to replace a reparametrized tensor (RuntimeError), and so
    does loading a state dict of another form or rank: remove it first,
    register it again after the change.

    s = alpha / rank when ``alpha`` is given, else 1.  ``DYNRANK_BACKEND``
    picks the engine (:mod:`dynrank._backend`): the fused Triton kernels, where
    the rank-k term lands in the dense product's accumulator, or torch (cuBLAS
    on CUDA), which the default ``auto`` takes wherever it was measured faster
    (on every shape so far).

    Args:
        in_features, out_features: sizes as in ``nn.Linear``.
        rank: factor rank, 1 ≤ rank ≤ min(in_features, out_features).
        bias: learn an additive bias.
        form: initial form.  ``"lowrank"`` draws A, B so that s·A·Bᵀ has the
            variance of ``nn.Linear``'s default weight; ``"full"`` initializes W
            like ``nn.Linear``; ``"adapter"`` does both with A = 0.
        alpha: optional scale numerator of the low-rank term.
        device, dtype: factory kwargs.

    Attributes:
        weight: W (full) or W_f (adapter), shape (out_features, in_features); None in lowrank.
        A: (out_features, rank) or None in full.  B: (in_features, rank) or None in full.
        bias: (out_features,) or None.

    Shape:
        input (..., in_features) → output (..., out_features).

    Raises:
        TypeError: a size or ``rank`` that is not an int (a float, a str, a bool, None; a numpy
            integer is an int), a non-number ``alpha``, a ``dtype`` that is not floating-point.
        ValueError: a size below 1, ``rank`` outside [1, min(in_features, out_features)],
            ``alpha`` not a finite number > 0 (or, for a ``dtype`` other than float64, above float32's
            largest value, 3.4e38), an unknown ``form``.

    Example:
        >>> layer = FusedLowRankLinear(64, 32, rank=8)
        >>> y = layer(torch.randn(4, 10, 64))           # lowrank
        >>> layer.inflate().form                         # merge A·Bᵀ into W
        'full'
        >>> layer.deflate(init="zeros").form             # freeze W, fresh adapter
        'adapter'
    """

    # The transformers Conv1D class this layer was converted from (``from_dense``), else None:
    # unconvert_model rebuilds that class.
    _dense_type = None

    def __init__(self, in_features, out_features, rank, bias=True, form="lowrank", alpha=None,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = check_int(in_features, "in_features", "a positive int", 1)
        self.out_features = check_int(out_features, "out_features", "a positive int", 1)
        self.alpha = check_alpha(alpha, dtype)
        self._build_parameters(form, self._check_rank(rank), bias, device, dtype)

    # -- factor description (FormLayer contract) ---------------------------------
    def _check_rank(self, rank):
        return check_rank(rank, min(self.in_features, self.out_features))

    def scale_for(self, rank):
        """Scale s of the low-rank term at ``rank``: alpha / rank, or 1 without ``alpha``.

        Raises:
            TypeError: a ``rank`` that is not an int (a numpy integer is one).
            ValueError: a ``rank`` below 1.
        """
        return self._scale_at(check_int(rank, "rank", "a positive int", 1))

    def _scale_at(self, rank):
        # scale_for without the check (about a µs), for the forward's own rank.
        return 1.0 if self.alpha is None else self.alpha / rank

    def rank_for_ratio(self, ratio):
        """Rank at rank ratio ρ (see :func:`rank_from_ratio`)."""
        return rank_from_ratio(ratio, self.in_features, self.out_features)

    @property
    def scale(self):
        """Factor s multiplying the low-rank term: alpha / rank, or 1."""
        return self._scale_at(self._rank)

    def _factor_names(self, rank):
        return ("A", "B")

    def _dense_shape(self):
        return (self.out_features, self.in_features)

    def _factor_shapes(self, rank):
        return {"A": (self.out_features, rank), "B": (self.in_features, rank)}

    def _init_factors(self, rank, zero_output, device=None, dtype=None):
        # Glorot-normal B so x·B keeps the input's scale; A zero (adapter: output
        # unchanged, LoRA convention) or Glorot-normal.
        B = torch.randn(self.in_features, rank, device=device, dtype=dtype) * math.sqrt(
            2.0 / (self.in_features + rank))
        if zero_output:
            A = torch.zeros(self.out_features, rank, device=device, dtype=dtype)
        else:
            A = torch.randn(self.out_features, rank, device=device, dtype=dtype) * math.sqrt(
                2.0 / (self.out_features + rank))
        return {"A": A, "B": B}

    @torch.no_grad()
    def _init_lowrank_(self, factors, rank):
        # Match nn.Linear's default weight variance 1/(3·in) for s·A·Bᵀ:
        # Var = s²·rank·Var(A)·Var(B), with Var(B) = 1/in.
        s = self.scale_for(rank)
        factors["B"].normal_(0.0, 1.0 / math.sqrt(self.in_features))
        factors["A"].normal_(0.0, 1.0 / (s * math.sqrt(3.0 * rank)))

    def _merge_into_(self, weight, alpha, factors):
        DF.merge_(weight, factors["A"], factors["B"], alpha * self.scale_for(factors["A"].shape[1]))

    _fit_name = "SVD"

    def _fit_factors(self, weight, rank):
        A, B = svd_factors(weight, rank, self.scale_for(rank),
                           fresh=lambda: self._init_factors(rank, True, weight.device, weight.dtype)["B"])
        return {"A": A, "B": B}

    def _rank_from_state(self, state_dict, prefix):
        return state_dict[prefix + "A"].shape[1]

    # -- construction from a dense layer ---------------------------------------
    @classmethod
    def from_dense(cls, linear, rank, form="lowrank", alpha=None):
        """Build from an ``nn.Linear`` (or anything with ``weight`` (out, in) and ``bias``).

        A Hugging Face transformers ``Conv1D`` (GPT-2's linear layer, weight
        stored (in, out)) is read through its transpose, so the new layer
        computes the same function; :func:`~dynrank.unconvert_model` turns
        the layer back into a ``Conv1D`` (a lowrank layer with
        ``lowrank="dense"``).

        ``form="lowrank"``: A, B from the truncated SVD of the dense weight (the
        best rank-``rank`` approximation, √σ split between A and B); a component
        of singular value zero (all of an all-zero weight's, the surplus of a
        weight of rank below ``rank``) gets an A column of 0 and a random B
        column instead (the same product, but trainable: A = B = 0 would never
        get a gradient; see :func:`svd_factors`).
        ``form="adapter"``: the dense weight becomes W_f with a zero-output adapter.
        ``form="full"``: the dense weight is kept as W.
        The bias keeps its ``requires_grad``; a frozen weight gives frozen factors or a
        frozen W (adapter form trains its adapter beside it).

        Raises:
            TypeError: ``linear`` has no 2-D weight, or its dtype is not floating-point; an
                ``nn.Linear`` subclass that overrides ``forward`` (see :func:`own_computation`);
                a reparametrized or pruned weight or bias (``torch.nn.utils.parametrize``, the
                hook-based ``weight_norm``/``spectral_norm``, ``torch.nn.utils.prune``; see
                :func:`reparametrization`): remove it first, or keep the layer dense.
            ValueError: invalid rank or form; a weight with NaN/inf entries (lowrank form); an
                ``nn.LazyLinear`` not run yet (its parameters have no shape).
        """
        check_materialized(linear, cls.__name__)
        weight = linear_weight(linear)
        if weight is None or weight.dim() != 2:
            raise TypeError(f"from_dense needs a module with a 2-D weight (nn.Linear), got {type(linear).__name__}")
        check_plain_computation(linear, cls.__name__)
        check_floating_dtype(weight.dtype, needed_by=f"from_dense needs a floating-point {cls.weight_kind}: ")
        check_form(form)
        out_features, in_features = weight.shape
        bias = getattr(linear, "bias", None)
        layer = cls(in_features, out_features, rank, bias=bias is not None, form=form, alpha=alpha,
                    device=weight.device, dtype=weight.dtype)
        layer._record_dense_type(linear)
        return layer._copy_from_dense_(weight, bias)

    def _shape_hint(self, name, shape):
        if self._dense_type is not None and name == "weight" and shape == self._dense_shape()[::-1]:
            return (f" ({self._dense_type.__name__}'s (in, out) layout: this layer stores W as (out, in); load "
                    f"such a state dict into the model before convert_model, or transpose it)")
        return ""

    def _record_dense_type(self, dense):
        """Remember that ``dense`` was a transformers ``Conv1D``, for ``unconvert_model`` to rebuild one."""
        if is_transposed_linear(dense):
            self._dense_type = type(dense)

    # -- forward ------------------------------------------------------------
    def forward(self, input):
        """``input`` (..., in_features) → (..., out_features) in the current form.  The argument is named
        as ``nn.Linear.forward``'s, so ``layer(input=h)`` works before and after ``convert_model``."""
        if isinstance(input, Proxy):
            node = self._fx_node(input)
            if node is not None:
                return node
        if self._form == "full":
            weight, bias = self._read("weight"), self._read("bias")
            self._check_no_factors_given()
            if isinstance(input, torch.Tensor) and input.is_meta != weight.is_meta:
                self._check_input(input, weight)   # torch mixes meta and real tensors silently
            try:
                return F.linear(input, weight, bias)
            except (RuntimeError, TypeError):
                self._check_input(input, weight, bias)  # names the fault where it is the input's or an operand's
                raise
        weight = self._read("weight")
        if weight is not None and self._form == "lowrank":
            self._refuse_weight()      # one torch.func.functional_call passed in: refused as an assigned one
        # lowrank_linear checks the input against the factors.
        return DF.lowrank_linear(input, weight, self._read("A"), self._read("B"), self._read("bias"),
                                 self._scale_at(self._rank))

    def _check_input(self, x, weight, bias=None):
        """Raise the error that names what is wrong with ``x`` for the full form's ``weight`` and ``bias``
        (a weight or bias of another shape: one passed in by ``torch.func.functional_call``)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if DF.last_size(x) != self.in_features:       # a nested input's too, which has no shape
            raise ValueError(f"input must have shape (..., {self.in_features}), got {DF.shape_of(x)}")
        expected = {"weight": (self.out_features, self.in_features), "bias": (self.out_features,)}
        for name, t in (("weight", weight), ("bias", bias)):
            if t is None:
                continue
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(t.shape)}")
            DF.check_matches_input(x, name, t)

    def extra_repr(self):
        alpha = "" if self.alpha is None else f", alpha={self.alpha}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self._rank}, "
                f"form={self._form!r}, bias={self.bias is not None}{alpha}")


@torch.no_grad()
def svd_factors(weight, rank, scale=1.0, fresh=None, dtype=None):
    """Best rank-``rank`` factors of a 2-D ``weight``: scale·A·Bᵀ ≈ weight.

    The SVD runs in float64; √σ goes to each side, so A and B are balanced.  A component whose
    singular value is zero (every one of an all-zero weight's, the surplus of a weight of rank below
    ``rank``) would get zero A and B columns, a saddle point that never receives a gradient: with
    ``fresh`` it gets the zero-output init instead, A column zero and B column that of ``fresh()``
    (the layer's random (in, rank) B init, called only where a component is zero, so no random
    numbers are drawn otherwise).  The product is the same up to the rounding of ``dtype``, and every
    component trains.  Zero means at most σ_max times ``dtype``'s eps, capped at float32's, plus the
    float64 SVD's own tolerance (``torch.linalg.matrix_rank``'s max(out, in)·eps): the tail of a
    rank-deficient weight held in float32 lies near 0.1·eps·σ_max.  The cap keeps a 16-bit weight's
    real components: bf16's eps is 0.8 % of σ_max, above the spectrum of most of a layer with one
    dominant direction, and a small component still trains from √σ on each side.  ``dtype`` is the
    dtype the weight is held in (default: its own; a layer's kernel upcast for the fit gives the
    layer's).

    Returns (A (out, rank), B (in, rank)) in weight's dtype and device.
    """
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    S = S[:rank]
    root = (S / scale).sqrt()
    A = (U[:, :rank] * root).to(weight.dtype)
    B = (Vh[:rank].t() * root).to(weight.dtype)
    if fresh is not None and not weight.is_meta:        # meta has no values to test
        eps = min(torch.finfo(weight.dtype if dtype is None else dtype).eps, torch.finfo(torch.float32).eps)
        dead = S <= S[0] * (eps + max(weight.shape) * torch.finfo(torch.float64).eps)
        if dead.any():
            A[:, dead] = 0
            B[:, dead] = fresh().to(B)[:, dead]
    return A, B
