"""Rank metrics of layer weights: singular values, spectral ratio λ, effective ranks.

Every metric is a function of the singular values σ₁ ≥ … ≥ σ_p (p = min(m, n))
of a layer's *effective* weight as an m × n matrix:

==================  ======================================  =========================
layer               matrix                                  how σ is computed
==================  ======================================  =========================
``nn.Linear``       W (out × in)                            dense
HF ``Conv1D``       Wᵀ (out × in; stored as in × out)       dense
``nn.Conv{1,2,3}d`` W reshaped to F × (C/groups·kh·kw)       dense
FusedLowRankLinear  lowrank: s·A·Bᵀ                         σ(R_A·R_Bᵀ)·|s| from thin
                                                            QR — never dense
                    full: W;  adapter: W_f + s·A·Bᵀ          dense (the sum has no
                                                            cheaper exact form)
other FormLayer     ``layer.effective_weight()`` reshaped    dense
                    to F × rest; without that method, W0 +
                    merged factors (what ``inflate`` builds)
==================  ======================================  =========================

A lowrank product of rank k < p has p − k singular values that are exactly
zero; they are returned as zeros, so the spectral ratio of such a layer is
``math.inf`` — the paper's Table 2 reports ∞ for exactly this case.

**Tolerance.**  A singular value counts as nonzero when σ > tol·σmax; the default and
its reasoning are in :mod:`dynrank.spectra`, which holds the scalar metrics of σ.

All computation runs in float64 on the weights' device, without autograd.

**Non-finite weights.**  A weight with a NaN or infinite entry (a diverged run)
has no singular values: :func:`singular_values` raises ValueError, and
:func:`model_metrics` / :func:`layer_metrics` raise ValueError naming the layers
unless ``nonfinite="nan"``, which gives those layers :class:`LayerMetrics`
whose every number is NaN (what :class:`~dynrank.RankMonitor` records).
"""

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._args import as_names
from ._forms import FormLayer
from .linear import FusedLowRankLinear, is_transposed_linear, linear_weight
from .spectra import (_check_tol, default_tol, effective_rank, entropy_effective_rank, restricted_spectral_ratio,
                      spectral_ratio, stable_rank)

__all__ = ["LayerMetrics", "default_tol", "singular_values", "spectral_ratio", "restricted_spectral_ratio",
           "effective_rank", "entropy_effective_rank", "stable_rank", "layer_metrics", "model_metrics",
           "monitored_layers", "METHODS", "NONFINITE"]

METHODS = ("auto", "svd", "gram")
NONFINITE = ("raise", "nan")
_PLAIN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Gram eigenvalues resolve σ down to about sqrt(p·eps64)·σmax ≈ 3e-7·σmax (p = 768);
# "auto" uses them only when the tolerance sits well above that floor.
_GRAM_MIN_SIZE = 256
_GRAM_MIN_TOL = 1e-5
_BATCH_BYTES = 256 * 2 ** 20


@dataclass
class LayerMetrics:
    """Rank metrics of one layer's effective weight (an m × n matrix).

    Attributes:
        form: ``"lowrank"``, ``"full"`` or ``"adapter"``; ``"dense"`` for a plain
            ``nn.Linear``/``nn.Conv*d`` or transformers ``Conv1D``.
        rank: factor rank of a dynrank layer (an int, or a tuple for Tucker
            convs; in full form the rank ``deflate`` would use); None for plain layers.
        shape: (m, n).
        sigma_max, sigma_min: largest and smallest of the p = min(m, n) singular values.
        spectral_ratio: λ = σmax/σmin; ``math.inf`` when σmin ≤ tol·σmax.
        restricted_spectral_ratio: σ₁/σ_r over the r leading singular values,
            r the largest matrix rank the factors allow in lowrank form (the
            rank of a linear, svd or cp layer; Tucker (r_in, r_out):
            min(r_out, r_in·kh·kw); TKD-CPD (r_in, R, r_out):
            min(R, r_out, r_in·kh·kw); at most p) and p otherwise —
            finite for a healthy lowrank layer whose λ is ∞ by construction.
        effective_rank: number of σ > tol·σmax.
        entropy_rank: exp of the Shannon entropy of σ/Σσ (Roy & Vetterli 2007).
        stable_rank: ‖W‖²_F / σ²max.
        tol: the relative tolerance used.

    For a layer with non-finite weights measured with ``nonfinite="nan"``, every
    metric from sigma_max to stable_rank (effective_rank included) is ``math.nan``.
    """

    form: str
    rank: object
    shape: tuple
    sigma_max: float
    sigma_min: float
    spectral_ratio: float
    restricted_spectral_ratio: float
    effective_rank: int
    entropy_rank: float
    stable_rank: float
    tol: float

    def as_dict(self):
        """Plain dict (shape and tuple ranks as lists) for JSON/CSV."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        if isinstance(self.rank, tuple):
            out["rank"] = list(self.rank)
        return out


# -- from layers to matrices -------------------------------------------------------------

def _scale(layer):
    return float(getattr(layer, "scale", 1.0))


class _Plan:
    """How to get one layer's singular values: a (lazy) float64 matrix, padded to p."""

    def __init__(self, shape, build, p, dtype, form, rank, device):
        self.shape = tuple(shape)     # shape of the matrix ``build`` returns
        self.build = build
        self.device = device          # where ``build`` puts it: plans are batched per device
        self.p = p                    # number of singular values of the effective weight
        self.dtype = dtype            # storage dtype, for the default tolerance
        self.form = form
        self.rank = rank
        self.rank_bound = None        # a bound on the matrix rank of a merged lowrank layer, where known
        self.dense_shape = None       # (m, n) of the effective weight


def _plan(layer):
    """A _Plan for ``layer`` (or a 2-D / conv-shaped tensor)."""
    if isinstance(layer, torch.Tensor):
        if layer.dim() < 2:
            raise ValueError(f"a weight tensor must have at least 2 dims, got shape {tuple(layer.shape)}")
        if not layer.is_floating_point():
            raise TypeError(f"a weight tensor must be real floating point (singular values of a "
                            f"{'complex' if layer.is_complex() else 'non-float'} tensor are not supported), "
                            f"got {layer.dtype}")
        if layer.numel() == 0:
            raise ValueError(f"a weight tensor must have no zero-size dimension (an empty matrix has no singular "
                             f"values), got shape {tuple(layer.shape)}")
        t = layer.detach()
        m, n = t.shape[0], t[0].numel()
        plan = _Plan((m, n), lambda: t.reshape(m, n).double(), min(m, n), t.dtype, "dense", None, t.device)
        plan.dense_shape = (m, n)
        return plan
    if isinstance(layer, FusedLowRankLinear):
        return _plan_fused_linear(layer)
    if isinstance(layer, FormLayer):
        return _plan_form_layer(layer)
    if _is_plain(layer):
        return _plan(linear_weight(layer))
    effective = getattr(layer, "effective_weight", None)
    if callable(effective):
        return _plan(effective())
    raise TypeError(f"expected a dynrank layer, nn.Linear, nn.Conv1d/2d/3d, transformers Conv1D, a module with "
                    f"effective_weight() or a weight tensor, got {type(layer).__name__}")


def _plan_named(name, layer):
    """_plan for the layer ``name`` of a model, which its ValueError names (an empty layer among many)."""
    try:
        return _plan(layer)
    except ValueError as err:
        raise ValueError(f"layer {name!r}: {err}") from None


def _is_plain(module):
    """Whether ``module`` is a plain (not dynrank) layer measured by its weight: nn.Linear, nn.Conv1d/2d/3d,
    or transformers' Conv1D (GPT-2's linear layer, measured as the (out, in) transpose of its weight)."""
    return isinstance(module, _PLAIN) or is_transposed_linear(module)


def _plan_fused_linear(layer):
    m, n, p = layer.out_features, layer.in_features, min(layer.out_features, layer.in_features)
    form, rank, s = layer.form, layer.rank, _scale(layer)
    if form == "full":
        plan = _plan(layer.weight)
    elif form == "lowrank":
        A, B = layer.A.detach(), layer.B.detach()

        def core():
            # s·A·Bᵀ = Q_A (s·R_A R_Bᵀ) Q_Bᵀ with orthonormal Q's: same σ, k × k work.
            R_A = torch.linalg.qr(A.double(), mode="r").R
            R_B = torch.linalg.qr(B.double(), mode="r").R
            return (R_A @ R_B.t()) * s

        k = A.shape[1]
        plan = _Plan((k, k), core, p, A.dtype, form, rank, A.device)
    else:
        W, A, B = layer.weight.detach(), layer.A.detach(), layer.B.detach()
        plan = _Plan((m, n), lambda: torch.addmm(W.double(), A.double(), B.double().t(), alpha=s),
                     p, W.dtype, form, rank, W.device)
    plan.form, plan.rank, plan.dense_shape = form, rank, (m, n)
    return plan


def _plan_form_layer(layer):
    effective = getattr(layer, "effective_weight", None)
    storage = bound = None
    if callable(effective):
        weight = effective()
    elif layer.form == "full":
        weight = layer._dense()
    else:
        # The merge inflate() performs, in float64 (a merge in the storage dtype rounded a bf16 adapter's
        # smallest singular value 59 % off, and gave a lowrank layer's zero ones as 5e-4).
        from ._optim import _differentiable_merge
        ref, dense = layer._reference_tensor(), layer._dense()
        factors = {k: v.detach().double() for k, v in layer.factors().items()}
        merged = _differentiable_merge(layer, factors)
        if merged is None:        # a FormLayer of another kind: its own merge, into a float64 zero
            merged = torch.zeros(layer._dense_shape(), device=ref.device, dtype=torch.float64)
            layer._merge_into_(merged, 1.0, factors)
        weight = merged if dense is None else dense.detach().double() + merged
        storage, bound = ref.dtype, _merged_rank_bound(layer, factors)
    plan = _plan(weight)
    if storage is not None:
        plan.dtype = storage                      # the default tolerance follows the storage dtype
    plan.form, plan.rank, plan.rank_bound = layer.form, layer.rank, bound
    return plan


def _merged_rank_bound(layer, factors):
    """The largest matrix rank the layer's merged factors can have, the bound on both sides of the merge.

    Output side: the inner size of the output factor and of the merge U·V over the groups (Tucker
    (r_in, r_out): r_out; TKD-CPD (r_in, R, r_out): min(R, r_out)).  Input side: the chain starts with
    the input factor B, a bh×bw conv C/groups → r_in, and the rest of it spans (kh−bh+1)×(kw−bw+1)
    taps, so the kernel's matrix factors through r_in·(kh−bh+1)·(kw−bw+1) columns (svd: r; Tucker,
    CP, TKD-CPD: r_in·kh·kw, below r_out for a small r_in).  A tuple rank's largest entry does not
    bound it."""
    dec = getattr(layer, "_dec", None)
    if dec is None or not hasattr(dec, "operands"):
        return None
    U, _ = dec.operands(factors)
    B = factors["B"]
    (kh, kw), (bh, bw) = layer.kernel_size, B.shape[2:]
    input_side = B.shape[0] * (kh - bh + 1) * (kw - bw + 1)
    return min(dec.inner_rank(layer.rank), U.shape[1] * layer.groups, input_side)


def _sigma_batch(mats, method):
    """Singular values of a (b, m, n) float64 stack, descending, length min(m, n)."""
    if mats.shape[-2] < mats.shape[-1]:
        mats = mats.transpose(-2, -1)           # tall: LAPACK's QR-first path is faster
    if method == "gram":
        # The Gram matrix squares the entries: float64 weights beyond ~1e154 would overflow it (LAPACK
        # then fails to converge), below ~1e-154 underflow it (σ = 0).  Each matrix is scaled by a
        # power of two to a largest entry in [0.5, 1) and σ scaled back: exact, and harmless elsewhere.
        _, exponent = torch.frexp(mats.abs().amax(dim=(-2, -1)))
        exponent = exponent.clamp(-1022, 1022)    # 2^±1022 finite; a zero matrix keeps exponent 0
        mats = torch.ldexp(mats, -exponent[:, None, None])
        gram = mats.transpose(-2, -1) @ mats     # (b, n, n), the smaller side
        eig = torch.linalg.eigvalsh(gram).clamp_min(0.0)
        return torch.ldexp(eig.flip(-1).sqrt(), exponent[:, None])
    return torch.linalg.svdvals(mats)


def _choose(method, shape, tol):
    if method != "auto":
        return method
    return "gram" if min(shape) >= _GRAM_MIN_SIZE and tol >= _GRAM_MIN_TOL else "svd"


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def _check_not_meta(pairs, doing="measure", then=""):
    """Raise ValueError naming the layers of ``pairs`` ((name, layer or tensor)) that hold meta tensors, which
    have no values to ``doing``; ``then`` ends the message (what the caller leaves undone)."""
    def on_meta(layer):
        if isinstance(layer, torch.Tensor):
            return layer.is_meta
        if isinstance(layer, nn.Module):
            return any(t.is_meta for t in (*layer.parameters(), *layer.buffers()))
        return False                  # not a layer: _plan's TypeError
    meta = [f"{name} ({type(layer).__name__})" for name, layer in pairs if on_meta(layer)]
    if meta:
        raise ValueError(f"layers {meta} hold tensors on the meta device, which have no values to {doing}: "
                         f"materialize them first (to_empty(device=...), then reset_parameters() or "
                         f"load_state_dict()){then}")


def _check_nonfinite(nonfinite):
    if not isinstance(nonfinite, str) or nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")


def _run_plans(plans, tols, method):
    """σ (float64, descending, padded with zeros to p) for every plan, batched by shape; None for
    a plan whose matrix has a NaN or infinite entry (no singular values; LAPACK would fail on it)."""
    groups = {}
    for i, plan in enumerate(plans):
        groups.setdefault((plan.shape, plan.device, _choose(method, plan.shape, tols[i])), []).append(i)
    out = [None] * len(plans)
    for (shape, _, how), idx in groups.items():
        per_chunk = max(1, _BATCH_BYTES // (8 * shape[0] * shape[1]))
        for start in range(0, len(idx), per_chunk):
            chunk = idx[start:start + per_chunk]
            mats = torch.stack([plans[i].build() for i in chunk])
            finite = torch.isfinite(mats).flatten(1).all(1)
            if not bool(finite.all()):
                mats = torch.where(finite[:, None, None], mats, torch.zeros((), dtype=mats.dtype,
                                                                          device=mats.device))
            sig = _sigma_batch(mats, how)
            for row, i, ok in zip(sig, chunk, finite.tolist()):
                if ok:
                    pad = plans[i].p - row.numel()
                    out[i] = torch.cat([row, row.new_zeros(pad)]) if pad > 0 else row
    return out


@torch.no_grad()
def singular_values(layer, method="auto"):
    """Singular values of a layer's effective weight, float64, descending.

    Args:
        layer: a dynrank layer (any form), ``nn.Linear``, ``nn.Conv1d/2d/3d``,
            transformers ``Conv1D``, a module with ``effective_weight()``, or a
            tensor (≥ 2-D: reshaped to shape[0] × rest).
        method: ``"svd"`` (exact ``svdvals``), ``"gram"`` (eigenvalues of the
            smaller Gram matrix, float64; σ below ~1e-7·σmax are not resolved)
            or ``"auto"`` (gram for p ≥ 256 when the default tolerance is
            ≥ 1e-5, else svd).  A lowrank FusedLowRankLinear always takes its
            k × k QR path.

    Returns:
        1-D float64 tensor of length min(m, n) on the weights' device; the
        p − k exact zeros of a rank-k lowrank product included.

    Raises:
        TypeError: unsupported layer; a tensor that is not real floating point
            (integer, bool or complex).
        ValueError: unknown ``method``; a tensor with fewer than 2 dims or with
            no elements; a weight with a NaN or infinite entry; a layer or tensor
            on the meta device (no values).

    Example:
        >>> layer = FusedLowRankLinear(32, 16, rank=4)
        >>> s = singular_values(layer)
        >>> s.shape, int((s > 0).sum())
        (torch.Size([16]), 4)
    """
    _check_method(method)
    _check_not_meta([("layer", layer)])
    plan = _plan(layer)
    tol = default_tol(plan.dense_shape, plan.dtype)
    sigma = _run_plans([plan], [tol], method)[0]
    if sigma is None:
        raise ValueError("the weight has NaN or infinite entries: its singular values are undefined")
    return sigma


def _metrics_from(plan, sigma, tol):
    if sigma is None:                       # non-finite weight, nonfinite="nan"
        nan = math.nan
        return LayerMetrics(form=plan.form, rank=plan.rank, shape=tuple(plan.dense_shape), sigma_max=nan,
                            sigma_min=nan, spectral_ratio=nan, restricted_spectral_ratio=nan, effective_rank=nan,
                            entropy_rank=nan, stable_rank=nan, tol=tol)
    p = plan.p
    smax, smin = float(sigma[0]), float(sigma[-1])
    live = p
    if plan.form == "lowrank" and plan.rank is not None:
        bound = plan.rank_bound
        if bound is None:
            bound = max(plan.rank) if isinstance(plan.rank, (tuple, list)) else plan.rank
        live = max(1, min(int(bound), p))
    return LayerMetrics(
        form=plan.form, rank=plan.rank, shape=tuple(plan.dense_shape), sigma_max=smax, sigma_min=smin,
        spectral_ratio=spectral_ratio(sigma, tol), restricted_spectral_ratio=restricted_spectral_ratio(sigma, live, tol),
        effective_rank=effective_rank(sigma, tol), entropy_rank=entropy_effective_rank(sigma),
        stable_rank=stable_rank(sigma), tol=tol)


@torch.no_grad()
def layer_metrics(layer, tol=None, method="auto", nonfinite="raise"):
    """All rank metrics of one layer.

    Args:
        layer: as in :func:`singular_values`.
        tol: relative tolerance (default: :func:`default_tol` of the effective
            weight's shape and the stored dtype).
        method: as in :func:`singular_values`.
        nonfinite: a weight with NaN or infinite entries: ``"raise"`` (ValueError)
            or ``"nan"`` (every metric NaN).

    Returns:
        :class:`LayerMetrics`.

    Raises:
        TypeError: unsupported layer or ``tol``.  ValueError: ``tol`` outside [0, 1), unknown
            ``method`` or ``nonfinite``, an empty weight, a non-finite one with ``nonfinite="raise"``, a
            layer holding meta tensors (no values: ``to_empty`` and init or load it first).

    Example:
        >>> m = layer_metrics(FusedLowRankLinear(32, 16, rank=4))
        >>> m.spectral_ratio, m.effective_rank
        (inf, 4)
    """
    return model_metrics({"layer": layer}, tol=tol, method=method, nonfinite=nonfinite)["layer"]


def monitored_layers(model, layers=None):
    """(name, module) pairs whose weights rank metrics cover.

    Args:
        model: an ``nn.Module``.
        layers: None — every dynrank layer (FormLayer) and every plain
            ``nn.Linear``/``nn.Conv1d/2d/3d`` or transformers ``Conv1D`` not inside a dynrank layer;
            or module names (one str, or an iterable of str), in that order; or a
            predicate ``fn(name, module) -> bool`` applied to the default set.

    Returns:
        list of (name, module) in ``named_modules`` order (given names: in their order).

    Raises:
        TypeError: ``model`` is not a module; ``layers`` is none of the above (an ``nn.Module`` itself is
            not a predicate), or names a module with no weight to measure (an activation, say).
        ValueError: an unknown name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, FormLayer):
            inside.append(name)
            found.append((name, module))
        elif _is_plain(module):
            found.append((name, module))
    layers = check_layers(layers)
    if layers is None:
        return found
    if callable(layers):
        return [(n, m) for n, m in found if layers(n, m)]
    names = layers
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"layers {missing} are not modules of the model")
    # Checked here, so that a RankMonitor fails when built, not at every epoch's end.
    unmeasurable = [f"{n} ({type(modules[n]).__name__})" for n in names
                    if not isinstance(modules[n], FormLayer) and not _is_plain(modules[n])
                    and not callable(getattr(modules[n], "effective_weight", None))]
    if unmeasurable:
        raise TypeError(f"layers {unmeasurable} have no weight to measure: expected dynrank layers, nn.Linear, "
                        f"nn.Conv1d/2d/3d, transformers Conv1D or modules with effective_weight()")
    return [(n, modules[n]) for n in names]


def check_layers(layers):
    """``layers`` of :func:`monitored_layers` as given: None, a predicate, or a list of names.

    Raises:
        TypeError: none of these, or an ``nn.Module`` (callable, but its forward is no predicate).
    """
    if isinstance(layers, nn.Module):
        raise TypeError(f"layers must be None, module names (a str or an iterable of str) or a predicate "
                        f"fn(name, module), got a {type(layers).__name__} module: pass its name in the model")
    if layers is None or callable(layers):
        return layers
    return as_names(layers, "layers", "None, module names (a str or an iterable of str) or a predicate "
                                      "fn(name, module)", item="module names")


@torch.no_grad()
def model_metrics(model, tol=None, method="auto", layers=None, nonfinite="raise"):
    """Rank metrics of every monitored layer, with same-shape matrices batched.

    Args:
        model: an ``nn.Module`` (layers chosen by :func:`monitored_layers`), or a
            dict name → layer.
        tol: relative tolerance for every layer; default per layer (:func:`default_tol`).
        method: as in :func:`singular_values`.
        layers: passed to :func:`monitored_layers` (ignored for a dict).
        nonfinite: layers whose weight has NaN or infinite entries: ``"raise"``
            (ValueError naming them) or ``"nan"`` (their metrics are NaN).

    Returns:
        dict name → :class:`LayerMetrics`, in model order.

    Raises:
        TypeError/ValueError: as :func:`layer_metrics`, for any layer.

    Example:
        >>> model = nn.Sequential(FusedLowRankLinear(32, 32, rank=8), nn.ReLU(), nn.Linear(32, 10))
        >>> {name: m.effective_rank for name, m in model_metrics(model).items()}
        {'0': 8, '2': 10}
    """
    _check_method(method)
    _check_nonfinite(nonfinite)
    if tol is not None:
        tol = _check_tol(tol)
    pairs = list(model.items()) if isinstance(model, dict) else monitored_layers(model, layers)
    _check_not_meta(pairs)
    plans = [_plan_named(name, layer) for name, layer in pairs]
    tols = [default_tol(p.dense_shape, p.dtype) if tol is None else tol for p in plans]
    sigmas = _run_plans(plans, tols, method)
    bad = [name for (name, _), sig in zip(pairs, sigmas) if sig is None]
    if bad and nonfinite == "raise":
        raise ValueError(f"layers {bad} have NaN or infinite weights: their singular values are undefined "
                         f"(nonfinite='nan' gives them NaN metrics instead)")
    return {name: _metrics_from(plan, sig, t) for (name, _), plan, sig, t in zip(pairs, plans, sigmas, tols)}
