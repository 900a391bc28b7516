"""Orthogonality regularizers that push weights back towards full effective rank.

Three loss terms from the rank-recovery literature (paper Table 6), for any
matrix W (m × n; conv kernels and conv factors reshaped to shape[0] × rest;
grouped convs below), with p = min(m, n) and G the p × p Gram matrix on the
*smaller* side (WᵀW if m ≥ n, else WWᵀ):

===========  ===================================  ====================================
name         definition                           computed as
===========  ===================================  ====================================
SO           ‖WᵀW − I‖²_F                          ‖G − I_p‖²_F
DSO          ‖WᵀW − I_n‖²_F + ‖WWᵀ − I_m‖²_F        2‖G − I_p‖²_F + |m − n|
SRIP         σmax(WᵀW − I)                         power iteration on G − I_p
===========  ===================================  ====================================

Why the smaller side is enough: WᵀW and WWᵀ share their nonzero eigenvalues
σ_i², and the larger one adds |m − n| zero eigenvalues.  So the two SO
variants differ by the constant |m − n| (same gradient; the table's SO is the
literal formula for tall W and WWᵀ for wide W), DSO is exactly
2·SO + |m − n|, and SRIP on the smaller side is max_i |σ_i² − 1| — on the
larger side the extra −1 eigenvalues would pin the norm at ≥ 1 and zero its
gradient whenever every |σ_i² − 1| < 1.

**Grouped convolutions.**  A conv with ``groups`` g > 1 (a depthwise or grouped
``nn.Conv``, a grouped svd ``LowRankConv2d`` and both its factors) computes with
the block-diagonal matrix blockdiag(W_1, …, W_g), W_i the i-th (m/g) × rest
slice of its kernel, not with the stacked kernel (whose Gram Σ_i W_iᵀW_i would
add terms between groups the layer does not have).  Its Gram is
blockdiag(G_1, …, G_g), so the penalties are those of the block-diagonal
matrix, taken per block: SO and DSO are the sums of the blocks' SO and DSO,
SRIP is the largest block's σmax(G_i − I) (the spectral norm of a
block-diagonal matrix).  The functions take ``groups``; the regularizers read
each layer's.  A CP factorization's depthwise Kh and Kw are factor matrices
(r × kh, r × kw) and are penalised as such, like every factor of a layer with
groups = 1.

**Memory.**  Each regularized tensor adds one p × p Gram (p = min side) that
autograd keeps until backward, plus a transient copy of the same size while
G − I is formed: ResNet20 in full form keeps about 4·10⁴ floats for all convs
(largest p = 64); a GPT-2-small-sized model in full form 48 × 768² ≈ 2.8·10⁷
floats (113 MB in float32), where the larger-side Gram of a 768 × 3072 layer
alone would be 3072² floats (38 MB).  Factors A (m × k), B (n × k) cost k² each;
a grouped conv g Grams of its blocks' p_i = min(m/g, rest) (a depthwise conv g
floats).

What gets regularized (:func:`regularized_tensors`): the *trainable* weights
— a dynrank layer's factors in lowrank and adapter form (never the frozen
W_f), its W in full form — and the weight of every plain ``nn.Linear`` /
``nn.Conv1d/2d/3d`` and transformers ``Conv1D`` (GPT-2's linear layer; its
weight is stored (in, out), and every penalty here is the same for Wᵀ as for
W).  Biases are never included.  A Parameter shared by several layers (tied
weights or factors) is penalised once, under its first name, as
``model.parameters()`` lists it once; a weight shared with a module the
regularizers do not act on (an ``nn.Embedding``: GPT-2's LM head, tied to the
token embedding) is left out — the penalty is on layer weights, not on an
embedding reached through a tie.  :func:`regularized_tensors` lists the tensors
a regularizer acts on, by name.  Tensors are named as in the model inside a
``DistributedDataParallel``/``DataParallel`` wrapper (``"0.A"``, never
``"module.0.A"``), as dynrank's checkpoints name its parameters: ``exclude``
names and SRIP's saved state are the same with and without the wrapper.

**FSDP2.**  A weight that ``fully_shard`` keeps sharded (a DTensor) is gathered
whole (``full_tensor()``) for its penalty, so the value is that of the layer's
matrix and the gradient reaches each rank's shard: call the regularizer on
every rank, as the loss.

**Mixed precision.**  The Grams and the power iteration run in float32 (float64
for float64 weights) with ``torch.autocast`` switched off for them: under AMP a
16-bit Gram would lose the deviation from I it measures.
"""

import math
import warnings
from collections.abc import Mapping

import torch

from ._args import as_names, check_int, check_real
from ._checks import unwrap_model
from ._forms import FormLayer
from .functional import autocast_off
from .metrics import monitored_layers

__all__ = ["gram_small", "so_penalty", "dso_penalty", "srip_penalty", "regularized_tensors",
           "OrthogonalityRegularizer", "SoftOrthogonality", "DoubleSoftOrthogonality", "SRIP"]


def _matrix(weight):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims (matrix or conv kernel), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    weight = _whole(weight)
    if weight.dtype in (torch.float16, torch.bfloat16):
        weight = weight.float()       # a 16-bit Gram loses the deviation from I it measures
    # Not reshape(m, -1): a weight with no elements has no inferable second size.
    return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))


def _whole(weight):
    """``weight`` itself, or the whole weight of a DTensor (one ``fully_shard`` keeps sharded): the penalties
    are of the layer's matrix, and the Gram of a DTensor could not meet the plain identity."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor
        if isinstance(weight, DTensor):
            return weight.full_tensor()
    return weight


def _blocks(weight, groups):
    """``weight`` as a matrix (m × n), or for ``groups`` g > 1 as its g diagonal blocks, a (g, m/g, n) batch."""
    W = _matrix(weight)
    groups = check_int(groups, "groups", "a positive int", 1)
    if groups == 1:
        return W
    if W.shape[0] % groups:
        raise ValueError(f"groups ({groups}) must divide the weight's first dim (its output channels), got "
                         f"shape {tuple(weight.shape)}")
    return W.reshape(groups, W.shape[0] // groups, W.shape[1])


def _names(exclude):
    """``exclude`` as a tuple of module names: one name (a str) or an iterable of names."""
    if exclude is None:
        return ()
    return tuple(as_names(exclude, "exclude", "a module name (str) or an iterable of module names",
                          item="module names"))


def gram_small(weight, groups=1):
    """p × p Gram matrix on the smaller side of ``weight`` viewed as shape[0] × rest.

    Args:
        weight: tensor with ≥ 2 dims; 16-bit inputs are computed in float32, also
            under ``torch.autocast``.
        groups: the conv's groups g; for g > 1 the Grams of its g diagonal blocks
            (m/g) × n (module docstring).

    Returns:
        WᵀW (n × n) if m ≥ n, else WWᵀ (m × m); differentiable.  A weight with
        no elements (m or n = 0) gives the 0 × 0 Gram.  For g > 1 a (g, p, p)
        batch, p = min(m/g, n).

    Raises:
        TypeError/ValueError: not a floating tensor with ≥ 2 dims; ``groups`` not
            a positive int that divides m.

    Example:
        >>> gram_small(torch.randn(10, 3)).shape
        torch.Size([3, 3])
        >>> gram_small(torch.randn(8, 1, 3, 3), groups=8).shape      # depthwise: 8 blocks 1 × 9
        torch.Size([8, 1, 1])
    """
    return _gram(_blocks(weight, groups))


def _gram(W):
    """Smaller-side Gram of the matrix, or of each matrix of the batch, ``W``."""
    # Under torch.autocast the matmul would run in 16 bits whatever W's dtype.
    with autocast_off(W.device.type):
        Wt = W.transpose(-2, -1)
        return Wt @ W if W.shape[-2] >= W.shape[-1] else W @ Wt


def _deviation(W):
    G = _gram(W)
    return G - torch.eye(G.shape[-1], device=G.device, dtype=G.dtype)


def so_penalty(weight, groups=1):
    """Soft orthogonality ‖G − I‖²_F with G the smaller-side Gram matrix.

    Zero exactly when W has orthonormal columns (tall) or rows (wide).

    Args:
        weight: (m, n) matrix or (F, C/g, kh, kw) kernel (viewed as F × C/g·kh·kw).
        groups: the conv's groups g: the penalty of its block-diagonal matrix,
            the sum over the g blocks (module docstring).

    Returns:
        0-d tensor, differentiable w.r.t. ``weight``; 0 for a weight with no
        elements (its Gram is 0 × 0).

    Raises:
        TypeError/ValueError: not a floating tensor with ≥ 2 dims; ``groups`` not
            a positive int that divides m.

    Example:
        >>> float(so_penalty(torch.eye(4)[:, :3]))
        0.0
    """
    return _deviation(_blocks(weight, groups)).pow(2).sum()


def dso_penalty(weight, groups=1):
    """Double soft orthogonality ‖WᵀW − I_n‖²_F + ‖WWᵀ − I_m‖²_F.

    Computed from the smaller Gram only, as 2‖G − I_p‖²_F + |m − n| (module
    docstring).  Its minimum |m − n| is reached by W with orthonormal rows or
    columns; it is 0 only for square orthogonal W.

    Args:
        weight: (m, n) matrix or conv kernel.
        groups: the conv's groups g: the penalty of its block-diagonal matrix,
            the sum over the g blocks of 2‖G_i − I‖²_F + |m/g − n|.

    Returns:
        0-d tensor, differentiable w.r.t. ``weight``; |m − n| for a weight with
        no elements (‖−I‖²_F of the non-empty side, as the literal formula).

    Raises:
        TypeError/ValueError: not a floating tensor with ≥ 2 dims; ``groups`` not
            a positive int that divides m.

    Example:
        >>> float(dso_penalty(torch.eye(4)[:, :3]))
        1.0
    """
    W = _blocks(weight, groups)
    m, n = W.shape[-2:]
    return 2.0 * _deviation(W).pow(2).sum() + (W.shape[0] if W.dim() == 3 else 1) * abs(m - n)


def _unit(v):
    """``v``, or each row of ``v``, scaled to unit norm."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def _mv(M, v):
    """M·v, or each block's M_i·v_i for a batch M (g, p, p) and v (g, p)."""
    return M @ v if v.dim() == 1 else (M @ v.unsqueeze(-1)).squeeze(-1)


def srip_penalty(weight, n_power_iterations=10, start=None, return_vector=False, groups=1):
    """SRIP: spectral norm σmax(G − I) of the smaller-side Gram deviation.

    Power iteration on the symmetric M = G − I runs without autograd; the
    value ‖M·v‖ of the final iterate v is differentiable through M (v held
    fixed), which at convergence is the gradient of the spectral norm.

    Args:
        weight: (m, n) matrix or conv kernel.
        n_power_iterations: int ≥ 1, or None for the exact value from
            ``eigvalsh`` (differentiable; slower for large p).
        start: optional real start vector of length p (warm start); default a
            fixed-seed Gaussian vector, so results are reproducible.  An
            all-zero or non-finite start (from which power iteration cannot
            move), or one on the meta device (no values), is replaced by that
            default.  For ``groups`` g > 1 a (g, p) tensor, a start per block
            (each checked on its own).
        return_vector: also return the final (detached) unit iterate, to pass as
            ``start`` next time (with ``n_power_iterations=None``, the unit
            eigenvector of M's eigenvalue of largest magnitude, per block, the
            iteration's limit; ``start`` is checked but not used).  When M·v = 0 (e.g. an exactly orthogonal W,
            M = 0) or is not finite (a weight with NaN or inf entries, whose
            value is then NaN or inf) the iterate stays v instead of collapsing
            to zero or NaN, so a later warm start from it still works.
        groups: the conv's groups g: the spectral norm of its block-diagonal
            matrix, the largest of its g blocks' (module docstring), with
            p = min(m/g, n).

    Returns:
        0-d tensor ``value``, or ``(value, v)`` with ``return_vector``; 0 for a
        weight with no elements (p = 0).

    Raises:
        TypeError: bad ``weight``, an ``n_power_iterations`` that is neither an int nor None, a
            ``start`` that is not a real tensor, ``groups`` not an int.
        ValueError: bad ``weight``, ``n_power_iterations`` below 1, ``start`` not of shape (p,) ((g, p)
            for g > 1), ``groups`` below 1 or not dividing m.

    Example:
        >>> W = torch.diag(torch.tensor([2.0, 1.0, 0.5]))
        >>> round(float(srip_penalty(W, n_power_iterations=50)), 6)     # |2² − 1|
        3.0
    """
    return _srip(_blocks(weight, groups), n_power_iterations, start, return_vector, check_start=True)


def _start_shape(W):
    """Shape of SRIP's vector for the matrix (m × n) or block batch (g, m/g, n) ``W``: (p,) or (g, p)."""
    return (*W.shape[:-2], min(W.shape[-2:]))


def _srip(W, n_power_iterations, start, return_vector, check_start):
    """srip_penalty of the matrix or block batch ``W`` (from :func:`_blocks`); ``check_start=False`` for the
    regularizer's own warm starts (unit vectors by construction), which skips the start's host-synchronizing
    degeneracy check."""
    M = _deviation(W)
    shape = _start_shape(W)
    p = shape[-1]
    if n_power_iterations is not None:
        n_power_iterations = check_int(n_power_iterations, "n_power_iterations", "an int ≥ 1 or None", 1)
    if start is not None:
        if not isinstance(start, torch.Tensor) or start.is_complex():
            got = f"a {start.dtype} tensor" if isinstance(start, torch.Tensor) else type(start).__name__
            raise TypeError(f"start must be a real tensor of shape {shape}, got {got}")
        if tuple(start.shape) != shape:
            raise ValueError(f"start must be a tensor of shape {shape}, got {tuple(start.shape)}")
        if start.is_meta:
            start = None           # no values to start from (a call on a model not yet materialized)
    if n_power_iterations is None:
        # The 0 × 0 M of an empty weight has no eigenvalue: its norm is 0.
        value = torch.linalg.eigvalsh(M).abs().max() if p else M.sum()
        if not return_vector:
            return value
        with torch.no_grad():
            if not p:
                return value, M.new_zeros(shape)
            eigenvalues, vectors = torch.linalg.eigh(M.detach())
            # Per block, the unit eigenvector of the eigenvalue of largest magnitude: power iteration's limit.
            top = eigenvalues.abs().argmax(-1)
            v = torch.take_along_dim(vectors, top[..., None, None], dim=-1).squeeze(-1)
        return value, v
    default = None
    if start is None or check_start:
        gen = torch.Generator().manual_seed(0)
        # Drawn on the CPU generator's device whatever torch's default device is.
        default = torch.randn(p, generator=gen, dtype=torch.float64, device="cpu").to(device=M.device, dtype=M.dtype)
        default = default.expand(shape)
    if start is None:
        start = default
    else:
        start = start.detach().to(device=M.device, dtype=M.dtype)
        if check_start:
            stuck = ~_moving(start)      # a degenerate start: power iteration would stay at 0 or NaN
            if stuck.any():
                start = torch.where(stuck, default, start)
    with autocast_off(M.device.type):
        with torch.no_grad():
            Md = M.detach()
            v = _unit(start)
            for _ in range(n_power_iterations):
                u = _unit(_mv(Md, v))
                # M·v = 0 (e.g. M = 0 for an orthogonal W): keep the unit v, whose value 0 is then exact,
                # rather than a zero vector that would stall every later warm-started call; M·v not
                # finite (a diverged weight): keep v too, or every later call would be NaN.
                v = torch.where(_moving(u), u, v)
        value = torch.linalg.vector_norm(_mv(M, v), dim=-1)
        if value.dim():
            value = value.amax()        # the block-diagonal M's spectral norm: its largest block's
    return (value, v) if return_vector else value


def _moving(v):
    """Per vector (row) of ``v``, whether power iteration can move from it: finite and not all zeros; shape
    (..., 1)."""
    return torch.isfinite(v).all(-1, keepdim=True) & v.any(-1, keepdim=True)


def _moves(v):
    """Whether power iteration can move from ``v`` (or from each row of ``v``)."""
    return bool(_moving(v).all())


def regularized_tensors(model, exclude=(), with_groups=False):
    """The trainable weights the regularizers act on, as (name, tensor) pairs.

    Args:
        model: an ``nn.Module``; inside a ``DistributedDataParallel``/``DataParallel``
            wrapper, the wrapped model (names and ``exclude`` are the same as without it).
        exclude: module names to skip (e.g. the first conv or the classifier):
            one name (a str) or an iterable of names.  A name skips that layer, or
            every layer inside that module (a block, a head): ``"features"`` skips
            ``features.0`` and ``features.3``.  A module used at several places of
            the model is one module: any of its names skips it.
        with_groups: also give each tensor's conv ``groups`` (1 but for a grouped
            conv's kernel or svd factors), as (name, tensor, groups) triples.

    Returns:
        list of (``"<module>.<param>"``, parameter): factors of lowrank/adapter
        dynrank layers, W of full-form ones and plain Linear/Conv/transformers
        ``Conv1D`` weights (a Conv1D's as stored, (in, out): its penalties equal
        those of the (out, in) weight); parameters with ``requires_grad=False``
        are left out.  A Parameter shared by several layers (tied weights or
        factors) is listed once, under its first name, as ``model.parameters()``
        lists it; one shared with a module the regularizers do not act on (an
        ``nn.Embedding``: GPT-2's LM head, tied to the token embedding) is left
        out: the penalties are on layer weights, not on an embedding reached
        through a tie.

    Raises:
        TypeError: ``model`` is not a module, ``exclude`` not a name or names.
        ValueError: a name in ``exclude`` that is not a module of the model, or one whose
            module holds no layer the regularizers act on (a ReLU, say: nothing would be skipped).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 10))
        >>> model[2].weight = model[0].weight             # an LM head tied to the embedding
        >>> [name for name, _ in regularized_tensors(model)]
        ['1.weight']
    """
    tensors = _regularized(model, exclude)[1]
    return tensors if with_groups else [(name, param) for name, param, _ in tensors]


def _regularized(model, exclude):
    """The layers of ``model`` that ``exclude`` leaves, as (name, module), and the tensors of theirs the
    regularizers act on, as (name, tensor, groups): :func:`regularized_tensors`."""
    if isinstance(model, torch.nn.Module):         # anything else: monitored_layers' TypeError
        model = unwrap_model(model)
    layers = monitored_layers(model)
    exclude = set(_names(exclude))
    # Every name of a module used at several places (named_modules() gives its first only).
    modules = dict(model.named_modules(remove_duplicate=False))
    unknown = sorted(n for n in exclude if n not in modules)
    if unknown:
        raise ValueError(f"exclude names {unknown} are not modules of the model")
    skipped = {e: {id(m) for m in modules[e].modules()} for e in exclude}
    empty = sorted(e for e in exclude if not any(id(layer) in skipped[e] for _, layer in layers))
    if empty:
        shown = ", ".join(repr(n) for n, _ in layers[:8]) + (", ..." if len(layers) > 8 else "")
        raise ValueError(f"exclude names {empty} hold no layer the regularizers act on "
                         f"(Linear/Conv weights, dynrank layers; the model's are: {shown or 'none'})")
    skipped = set().union(*skipped.values())
    in_layers = {id(m) for _, layer in layers for m in layer.modules()}
    # A weight tied to a module that is no layer (an nn.Embedding) is that module's: left out.
    foreign = {id(p) for m in model.modules() if id(m) not in in_layers for p in m.parameters(recurse=False)}
    kept, out, seen = [], [], set()
    for name, module in layers:
        if id(module) in skipped:
            continue
        kept.append((name, module))
        if isinstance(module, FormLayer):
            params = {module.weight_name: module._dense()} if module.form == "full" else module.factors()
        else:
            params = {"weight": module.weight}
        # A dynrank conv's factors run as convs with the layer's groups (only svd allows groups > 1).
        groups = getattr(module, "groups", 1)
        for pname, param in params.items():
            if param is None or not param.requires_grad or id(param) in foreign or id(param) in seen:
                continue
            seen.add(id(param))         # a Parameter tied between layers: penalised once, at its first name
            out.append((f"{name}.{pname}" if name else pname, param, groups))
    return kept, out


def _other_form_names(name, layer):
    """Names the trainable tensors of ``layer`` (named ``name``) take in its other forms: a dynrank layer's
    factors in full form, its W in lowrank and adapter form; none for a plain layer."""
    if not isinstance(layer, FormLayer):
        return set()
    others = layer._all_factor_names() if layer.form == "full" else {layer.weight_name}
    return {f"{name}.{n}" if name else n for n in others}


_KINDS = ("so", "dso", "srip")


class OrthogonalityRegularizer:
    """coef · Σ penalty(W) over a model's trainable weights, as a loss term.

    Works in every form: it looks up the current trainable tensors on each
    call, so it follows ``inflate``/``deflate`` without being rebuilt.  The
    tensors are those :func:`regularized_tensors` lists (call it to see them):
    a Parameter tied between layers counts once, and a weight tied to a module
    that is no layer (an embedding, as GPT-2's LM head is) not at all.

    Args:
        coef: coefficient, a finite number ≥ 0 (paper Table 9: 5e-5 for SO/DSO, 5e-4 for SRIP).
        kind: ``"so"``, ``"dso"`` or ``"srip"``.
        exclude: module names to skip (a layer, or every layer inside a module): one name (a str) or
            an iterable of names; see :func:`regularized_tensors`.
        n_power_iterations: SRIP only; iterations per call.  The last vector
            of each tensor is kept and warm-starts the next call (as
            ``torch.nn.utils.spectral_norm`` does), so a few per step suffice.

    SRIP's warm-start vectors are training state: to resume a run as it would have gone on, save
    :meth:`state_dict` with the checkpoint (``training_state(..., srip=reg.state_dict())``) and give it
    to :meth:`load_state_dict` of the regularizer built anew.  SO and DSO keep no state (theirs is empty).
    The vectors are named as the model inside a DDP/DataParallel wrapper names its tensors, so a state
    saved under the wrapper resumes without it and the other way round.

    Raises:
        TypeError: a non-number ``coef``, an ``n_power_iterations`` that is not an int,
            ``exclude`` not a name or names.
        ValueError: ``coef`` negative, NaN or infinite; unknown ``kind``; ``n_power_iterations`` below 1.

    Example:
        >>> import torch
        >>> from dynrank import FusedLowRankLinear, SoftOrthogonality
        >>> model = torch.nn.Sequential(FusedLowRankLinear(64, 32, rank=8), torch.nn.Linear(32, 10))
        >>> reg = SoftOrthogonality(5e-5)
        >>> loss = reg(model)             # add to the task loss before backward()
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, coef, kind="so", exclude=(), n_power_iterations=2):
        check_real(coef, "coef", "a finite number >= 0")
        if not 0.0 <= coef < math.inf:                  # NaN fails this too
            raise ValueError(f"coef must be a finite number >= 0, got {coef!r}")
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
        n_power_iterations = check_int(n_power_iterations, "n_power_iterations", "an int ≥ 1", 1)
        self.coef = float(coef)
        self.kind = kind
        self.exclude = _names(exclude)
        self.n_power_iterations = n_power_iterations
        self._vectors = {}
        self._loaded = None         # names load_state_dict gave, checked against the model on the next call

    def penalty(self, name, weight, groups=1):
        """Unscaled penalty of one tensor (SRIP warm-starts from the vector stored under ``name``);
        ``groups``: the conv's groups, as in :func:`so_penalty`."""
        if self.kind == "so":
            return so_penalty(weight, groups)
        if self.kind == "dso":
            return dso_penalty(weight, groups)
        W = _blocks(weight, groups)
        start = self._vectors.get(name)
        if start is not None and tuple(start.shape) != _start_shape(W):
            start = None        # the tensor changed shape (a form change); _srip moves one on another device
        value, v = _srip(W, self.n_power_iterations, start, True, check_start=False)
        # A dry run on meta weights has nothing to start from later, and an empty tensor needs no start.
        if not v.is_meta and v.numel():
            self._vectors[name] = v
        return value

    def state_dict(self):
        """The warm-start state, for a checkpoint: what :meth:`load_state_dict` needs to go on from it.

        Returns:
            dict tensor name (as in :func:`regularized_tensors`) → SRIP's last unit vector of that
            tensor (a detached 1-D tensor of length p = min side; for a conv with groups g > 1 a
            (g, p) tensor, one vector per block), copies; none for a tensor with no elements (p = 0,
            its penalty is 0); empty for SO and DSO and before the first call.
            ``torch.save``/``torch.load`` (``weights_only`` too) keep it.

        Example:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
            >>> reg = SRIP(5e-4)
            >>> _ = reg(model)
            >>> {name: tuple(v.shape) for name, v in reg.state_dict().items()}
            {'0.weight': (4,)}
        """
        return {name: v.detach().clone() for name, v in self._vectors.items()}

    def load_state_dict(self, state):
        """Go on from the warm-start vectors saved by :meth:`state_dict`; they replace this regularizer's.

        A vector is moved to its tensor's device on the next call; one whose length no longer fits its
        tensor (a form change since the save) is replaced by the default start there, as in a run.  The
        next call warns of names that match no tensor it regularizes (their vectors go unused): a name
        is no mismatch if it is that of a tensor it regularizes, or the name a form change gives the
        trainable tensors of a dynrank layer it regularizes (a form change since the save renames them).

        Args:
            state: dict from :meth:`state_dict`.

        Raises:
            TypeError: ``state`` is not a dict, a name that is not a str, a vector that is not a real
                floating tensor.
            ValueError: a vector that is neither 1-D nor 2-D (a grouped conv's), on the meta device,
                or with a vector all zeros or not finite (power iteration cannot move from it); vectors
                given to an SO or DSO regularizer, which keeps none.  Nothing changes when it raises.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict tensor name → vector from {type(self).__name__}.state_dict(), "
                            f"got {type(state).__name__}")
        for name, v in state.items():
            if not isinstance(name, str):
                raise TypeError(f"state must map tensor names (str) to vectors, got the key {name!r} "
                                f"({type(name).__name__})")
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                got = f"a {v.dtype} tensor" if isinstance(v, torch.Tensor) else type(v).__name__
                raise TypeError(f"state[{name!r}] must be a real floating-point tensor, got {got}")
            if v.dim() not in (1, 2):
                raise ValueError(f"state[{name!r}] must be a 1-D vector, or a 2-D tensor of one vector per "
                                 f"group, got shape {tuple(v.shape)}")
            if v.is_meta:
                raise ValueError(f"state[{name!r}] is on the meta device: no values to start from")
            if not _moves(v):
                raise ValueError(f"state[{name!r}] must be a finite vector that is not all zeros (power "
                                 f"iteration cannot move from it), got {v.tolist()!r:.80}")
        if state and self.kind != "srip":
            raise ValueError(f"a {self.kind!r} regularizer keeps no warm-start vectors, got vectors for "
                             f"{sorted(state)} (a state of an SRIP regularizer?)")
        self._vectors = {name: v.detach().clone() for name, v in state.items()}
        self._loaded = set(state)

    def __call__(self, model):
        """coef · Σ penalty over :func:`regularized_tensors` (0-d tensor; 0.0 tensor if none).

        Warns (the first call after :meth:`load_state_dict`) of loaded names that match no tensor it
        regularizes, in this form or another of its layer's.
        """
        layers, tensors = _regularized(model, self.exclude)
        if self._loaded:
            names = [name for name, _, _ in tensors]
            # A name a form change gives a layer's tensors is no mismatch: its vector serves after a switch back.
            known = set(names).union(*(_other_form_names(name, layer) for name, layer in layers))
            unused = sorted(self._loaded.difference(known))
            if unused:
                shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
                warnings.warn(f"{type(self).__name__}: loaded vectors {unused} match no tensor it regularizes in "
                              f"the model (its tensors: {shown or 'none'}; names are those of the model "
                              f"inside a DDP/DataParallel wrapper): they go unused", stacklevel=2)
        self._loaded = None
        total = None
        for name, weight, groups in tensors:
            term = self.penalty(name, weight, groups)
            total = term if total is None else total + term.to(total.device)
        if total is None:
            return torch.zeros(())
        return self.coef * total

    def __repr__(self):
        return f"{type(self).__name__}(coef={self.coef}, kind={self.kind!r}, exclude={list(self.exclude)})"


class SoftOrthogonality(OrthogonalityRegularizer):
    """SO loss term coef · Σ ‖G − I‖²_F (see :class:`OrthogonalityRegularizer`)."""

    def __init__(self, coef, exclude=()):
        super().__init__(coef, "so", exclude)


class DoubleSoftOrthogonality(OrthogonalityRegularizer):
    """DSO loss term coef · Σ (‖WᵀW − I‖²_F + ‖WWᵀ − I‖²_F)."""

    def __init__(self, coef, exclude=()):
        super().__init__(coef, "dso", exclude)


class SRIP(OrthogonalityRegularizer):
    """SRIP loss term coef · Σ σmax(G − I), by warm-started power iteration."""

    def __init__(self, coef, exclude=(), n_power_iterations=2):
        super().__init__(coef, "srip", exclude, n_power_iterations)
