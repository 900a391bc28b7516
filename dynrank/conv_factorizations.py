"""The four factorizations of a convolution kernel behind :class:`dynrank.LowRankConv2d`.

A dense kernel W has shape (F, C/g, kh, kw).  Each factorization stores its
factors as the kernels of a chain of small convolutions, so the lowrank
forward never rebuilds W (notation: s is the scale alpha/rank or 1):

=========  =====================================================  ==========================
name       chain of convolutions (factor: kernel shape)            rank
=========  =====================================================  ==========================
svd        B: (r, C/g, kh, kw) k×k conv C→r (stride, padding,      int r, a multiple of g
           dilation, groups g), A: (F, r/g, 1, 1) 1×1 r→F
tucker     B: (r_in, C, 1, 1) 1×1 C→r_in, core: (r_out, r_in,      int r = (r, r) or a pair
           kh, kw) k×k r_in→r_out, A: (F, r_out, 1, 1) 1×1         (r_in, r_out)
cp         B: (r, C, 1, 1) 1×1 C→r, Kh: (r, 1, kh, 1) depthwise   int r
           kh×1, Kw: (r, 1, 1, kw) depthwise 1×kw, A: (F, r, 1,
           1) 1×1 r→F
tkd-cpd    B: (r_in, C, 1, 1), core_in: (R, r_in, 1, 1), Kh:      int r = (r, r, r) or a
           (R, 1, kh, 1), Kw: (R, 1, 1, kw), core_out: (r_out, R,  triple (r_in, R, r_out)
           1, 1), A: (F, r_out, 1, 1) — Tucker-2 whose core is
           the CP tensor of core_out, Kh, Kw, core_in
=========  =====================================================  ==========================

``cp`` is the textbook CP convolution (Lebedev et al.): the two spatial
factors are depthwise.  The paper authors' TensorFlow code used full r×r
(kh×1) and (1×kw) convolutions there, which is a different, larger model.

Every factorization merges into the dense kernel as one product
W[g] = s·U[g]·V[g] over the kernel's columns (``operands``): U (F, q/g) is the
output-side factor, V (q, C/g, kh, kw) is formed from the input-side factors
and is small.  The merge runs in ``dynrank.conv_merging`` (dispatch and
autograd) on ``dynrank.kernels.conv_merge`` (the Triton pass).
"""

import contextlib
import math
import warnings

import torch
from torch.nn import functional as F

from ._args import check_int
from .linear import svd_factors

__all__ = ["DECOMPOSITIONS", "KernelShape", "get_factorization", "run_chain"]

DECOMPOSITIONS = ("svd", "tucker", "cp", "tkd-cpd")


class KernelShape:
    """Shape of a dense kernel: out_channels F, in_channels C, kh, kw, groups g."""

    def __init__(self, out_channels, in_channels, kh, kw, groups=1):
        self.out_channels, self.in_channels = out_channels, in_channels
        self.kh, self.kw, self.groups = kh, kw, groups

    @property
    def dense(self):
        return (self.out_channels, self.in_channels // self.groups, self.kh, self.kw)


def _int_rank(value, what):
    return check_int(value, what, "an int")


def _bounded(value, limit, what, why):
    if not 1 <= value <= limit:
        raise ValueError(f"{what} must be in [1, {limit}] ({why}), got {value}")
    return value


def _rank_tuple(rank, size, decomposition, names):
    """An int r → (r,)·size; a tuple/list of ``size`` ints as is.  Anything else (an array, a tensor, a
    set) is a TypeError, as a tensor is for every whole-number argument (:func:`~dynrank._args.check_int`)."""
    expected = f"an int or a tuple/list of {size} ints ({', '.join(names)})"
    if isinstance(rank, (tuple, list)):
        if len(rank) != size:
            raise ValueError(f"rank for decomposition={decomposition!r} must be {expected}, got {tuple(rank)!r}")
        return tuple(_int_rank(r, f"rank[{i}] ({names[i]})") for i, r in enumerate(rank))
    return (check_int(rank, f"rank for decomposition={decomposition!r}", expected),) * size


def cp_rank_limit(dims):
    """Largest useful CP rank of a tensor with sizes ``dims``: prod(dims) / max(dims).

    Every tensor has an exact CP decomposition of that rank (its slices along
    the largest mode), so a larger rank only adds redundant terms.
    """
    return math.prod(dims) // max(dims)


def _matrix(t):
    """(n, m, 1, 1) 1×1 kernel → (n, m) matrix view."""
    return t.reshape(t.shape[0], t.shape[1])


def _work(t):
    """Operands of a merge are formed in fp32 when the factors are 16-bit."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _glorot(shape, out_per_group, device, dtype):
    area = shape[2] * shape[3]
    std = math.sqrt(2.0 / (shape[1] * area + out_per_group * area))
    return torch.randn(shape, device=device, dtype=dtype) * std


@contextlib.contextmanager
def _tensorly_numpy():
    """tensorly on its numpy backend whatever the user's global backend, without its rank warnings."""
    import tensorly
    with tensorly.backend_context("numpy"), warnings.catch_warnings():
        # A rank above a mode's unfolded size is normal here (CP ranks, Tucker
        # ranks of 1×1 kernels); tensorly fills those columns itself.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        yield


def _parafac(tensor, rank, what):
    """CP of a float64 numpy tensor: (weights (r,), [factor (dim, r) per mode]), r ≤ ``rank``.

    ALS starts from the tensor's SVDs.  That start fails (numpy's ``LinAlgError``,
    "Singular matrix") on kernels whose modes have low rank although the CP rank
    is not low: a Dirac (identity) kernel, a 1×1 kernel centred in a 3×3.  ALS
    is then run again at the same rank from a random start (seeded, so the fit
    is deterministic; no global RNG is drawn from).  Only where both fail, as for a
    tensor with too few independent terms for ``rank`` (an inflated lowrank cp
    layer's kernel, a constant or one-hot kernel), is the fit run at rank − 1,
    rank − 2, ..., and r is the first rank at which one of the two starts
    succeeds; a UserWarning naming ``what`` (e.g. "6×6×3×3 kernel") says so.
    The caller gives the rank − r components it lacks the zero-output init
    (:func:`_pad_cp`).  Each failed try is an ALS run cut short where it met
    the singular system.

    Raises:
        ValueError: ALS failed at every CP rank from ``rank`` down to 1.
    """
    import numpy as np
    from tensorly.decomposition import parafac
    for r in range(rank, 0, -1):
        for init in ("svd", "random"):
            try:
                with _tensorly_numpy():
                    # Line search: ALS on kernels swamps (slow error decrease); it buys a
                    # better fit per second here (kernel 64×64×3×3, rank 32: 0.879 vs 0.881
                    # relative error, 1.8 s vs 1.2 s).
                    cp = parafac(tensor, rank=r, init=init, normalize_factors=True, n_iter_max=100, tol=1e-10,
                                 linesearch=True, random_state=0)
            except np.linalg.LinAlgError as e:
                error = e
                continue
            if r < rank:
                warnings.warn(f"the CP fit (ALS) of the {what} at CP rank {rank} met a singular system ({error}) "
                              f"from both an SVD and a random start at every CP rank above {r}: it ran at CP "
                              f"rank {r}, and the {rank - r} components beyond it get the zero-output init",
                              UserWarning, stacklevel=2)
            return cp.weights, cp.factors
    raise ValueError(f"the CP fit (ALS) of a {'×'.join(map(str, tensor.shape))} tensor at CP rank {rank} "
                     f"failed ({error}), and at every lower rank: the tensor is too degenerate for a CP fit; "
                     f"use decomposition 'svd' or 'tucker', or a fresh init") from error


def _pad_cp(factors, fresh):
    """The CP factors (dim, r) of a fit at a CP rank r below the layer's (:func:`_parafac`), completed
    with the components r.. of ``fresh``: the layer's zero-output init of the same factors, as its
    kernels (the output-side one first, (dim, rank, 1, 1) and zero; the others (rank, ...)), so that
    every component trains."""
    r = factors[0].shape[1]
    columns = [_matrix(fresh[0])] + [g.reshape(g.shape[0], -1).t() for g in fresh[1:]]
    return [torch.cat([f, g[:, r:]], dim=1) for f, g in zip(factors, columns)]


def _partial_tucker(tensor, r_out, r_in):
    """Tucker-2 over the channel modes: (core (r_out, r_in, kh, kw), U_out (F, r_out), U_in (C, r_in))."""
    from tensorly.decomposition import partial_tucker
    with _tensorly_numpy():
        (core, (u_out, u_in)), _ = partial_tucker(tensor, rank=[r_out, r_in], modes=[0, 1], init="svd",
                                                  tol=1e-10, random_state=0)
    return core, u_out, u_in


def _spread_cp(weights, factors, scale):
    """Share |λ/scale| equally among the CP factors (balanced norms); the sign goes to the first."""
    lam = torch.as_tensor(weights, dtype=torch.float64) / scale
    root = lam.abs() ** (1.0 / len(factors))
    out = [torch.as_tensor(f, dtype=torch.float64) * root for f in factors]
    out[0] = out[0] * torch.where(lam < 0, -1.0, 1.0).to(torch.float64)
    return out


class Factorization:
    """One way of factorizing a convolution kernel (stateless; see the module docstring)."""

    name = None
    factor_names = ()
    output_factor = "A"      # the factor with the output channels; the lowrank init sizes it
    zero_factor = "A"        # zeroed by deflate(init="zeros") so the adapter starts at zero
    spatial_factors = ()     # depthwise factors (their fan-out is their own kernel area)

    def check_rank(self, rank, shape):
        raise NotImplementedError

    def rank_from_ratio(self, ratio, shape):
        raise NotImplementedError

    def inner_rank(self, rank):
        """The rank that divides alpha in the scale alpha/rank (inner size of the output factor)."""
        return rank if isinstance(rank, int) else rank[-1]

    def factor_shapes(self, rank, shape):
        raise NotImplementedError

    def rank_of(self, factors):
        raise NotImplementedError

    def _out_per_group(self, name, tensor_shape, shape):
        if name in self.spatial_factors:
            return 1
        return tensor_shape[0]

    def init_factors(self, rank, shape, zero_output, device=None, dtype=None):
        """Glorot-normal factors; with ``zero_output`` the ``zero_factor`` is zero."""
        out = {}
        for name, s in self.factor_shapes(rank, shape).items():
            if zero_output and name == self.zero_factor:
                out[name] = torch.zeros(s, device=device, dtype=dtype)
            else:
                out[name] = _glorot(s, self._out_per_group(name, s, shape), device, dtype)
        return out

    @torch.no_grad()
    def init_lowrank_(self, factors, scale):
        """Redraw factors so that the merged kernel has nn.Conv2d's default variance 1/(3·fan_in).

        Each factor but the output one is N(0, 1/fan_in) (fan_in = its kernel's
        in_channels·kh·kw), so every conv of the chain keeps its input's scale;
        the output factor is N(0, 1/(3·s²·fan_in)).  The merged kernel is a sum
        of prod(contracted sizes) products of independent factors, whose
        variance multiplies out to 1/(3·C/g·kh·kw).
        """
        for name, t in factors.items():
            fan_in = t.shape[1] * t.shape[2] * t.shape[3]
            std = 1.0 / math.sqrt(fan_in)
            if name == self.output_factor:
                std = 1.0 / (scale * math.sqrt(3.0 * fan_in))
            t.normal_(0.0, std)

    def operands(self, factors):
        """(U (F, q/g), V (q, C/g, kh, kw)) with merged kernel = s·U·V per group; differentiable."""
        raise NotImplementedError

    def steps(self, factors, scale, groups):
        """The chain as a list of (kernel, kind, groups); kind is pointwise/spatial/h/w."""
        raise NotImplementedError

    def fit(self, weight, rank, scale, groups, dtype=None):
        """Factors (float64, CPU) fitted to the float64 CPU kernel ``weight``.

        ``dtype`` is the dtype the layer holds the kernel in (default float64): its rounding bounds the
        singular values the svd fit counts as zero.  A component the fit leaves at zero (svd: of
        singular value zero; cp, tkd-cpd: beyond the CP rank ALS ran at, see :func:`_parafac`) gets
        the zero-output init (``init_factors``), so that it trains.
        """
        raise NotImplementedError


class SVDConv(Factorization):
    name = "svd"
    factor_names = ("B", "A")

    def check_rank(self, rank, shape):
        if isinstance(rank, (tuple, list)):
            raise TypeError(f"rank for decomposition='svd' must be an int, got {type(rank).__name__} "
                            f"{tuple(rank)!r} (tuple ranks are for 'tucker' and 'tkd-cpd')")
        rank = _int_rank(rank, "rank")
        g = shape.groups
        F_out, Cg = shape.out_channels, shape.in_channels // g
        limit = g * min(F_out // g, Cg * shape.kh * shape.kw)
        _bounded(rank, limit, "rank", f"at most min(out_channels/groups, in_channels/groups·kh·kw) "
                                      f"per group × groups={g}")
        if rank % g:
            raise ValueError(f"rank must be a multiple of groups={g} (each group gets rank/groups), got {rank}")
        return rank

    def rank_from_ratio(self, ratio, shape):
        g = shape.groups
        limit = g * min(shape.out_channels // g, shape.in_channels // g * shape.kh * shape.kw)
        r = min(max(1, int(ratio * shape.out_channels)), limit)
        return max(g, r // g * g)

    def factor_shapes(self, rank, shape):
        F_out, Cg, kh, kw = shape.dense
        return {"B": (rank, Cg, kh, kw), "A": (F_out, rank // shape.groups, 1, 1)}

    def _out_per_group(self, name, tensor_shape, shape):
        return tensor_shape[0] // shape.groups

    def rank_of(self, factors):
        return int(factors["B"].shape[0])

    def operands(self, factors):
        A = factors["A"]
        return _work(A).reshape(A.shape[0], A.shape[1]), _work(factors["B"])

    def steps(self, factors, scale, groups):
        A = factors["A"] if scale == 1.0 else factors["A"] * scale
        return [(factors["B"], "spatial", groups), (A, "pointwise", groups)]

    def fit(self, weight, rank, scale, groups, dtype=None):
        F_out, Cg, kh, kw = weight.shape
        Fg, rg = F_out // groups, rank // groups

        def fresh():      # a group's B columns of the zero-output init (init_factors' B, for one group)
            return _glorot((rg, Cg, kh, kw), rg, weight.device, weight.dtype).reshape(rg, -1).t()

        As, Bs = [], []
        for g in range(groups):
            A, B = svd_factors(weight[g * Fg:(g + 1) * Fg].reshape(Fg, -1), rg, scale, fresh, dtype)
            As.append(A)
            Bs.append(B.t())
        return {"B": torch.cat(Bs).reshape(rank, Cg, kh, kw), "A": torch.cat(As).reshape(F_out, rg, 1, 1)}


class TuckerConv(Factorization):
    name = "tucker"
    factor_names = ("B", "core", "A")
    zero_factor = "core"     # as the authors: the adapter's core starts at zero

    def check_rank(self, rank, shape):
        r_in, r_out = _rank_tuple(rank, 2, self.name, ("r_in", "r_out"))
        _bounded(r_in, shape.in_channels, "r_in (input rank)", "at most in_channels")
        _bounded(r_out, shape.out_channels, "r_out (output rank)", "at most out_channels")
        return (r_in, r_out)

    def rank_from_ratio(self, ratio, shape):
        r = max(1, int(ratio * shape.out_channels))
        return (min(r, shape.in_channels), min(r, shape.out_channels))

    def factor_shapes(self, rank, shape):
        (r_in, r_out), (F_out, C, kh, kw) = rank, shape.dense
        return {"B": (r_in, C, 1, 1), "core": (r_out, r_in, kh, kw), "A": (F_out, r_out, 1, 1)}

    def rank_of(self, factors):
        return (int(factors["B"].shape[0]), int(factors["A"].shape[1]))

    def operands(self, factors):
        A, core, B = (_work(factors[n]) for n in ("A", "core", "B"))
        return _matrix(A), torch.einsum("pqij,qc->pcij", core, _matrix(B))

    def steps(self, factors, scale, groups):
        A = factors["A"] if scale == 1.0 else factors["A"] * scale
        return [(factors["B"], "pointwise", 1), (factors["core"], "spatial", 1), (A, "pointwise", 1)]

    def fit(self, weight, rank, scale, groups, dtype=None):
        r_in, r_out = rank
        core, u_out, u_in = _partial_tucker(weight.numpy(), r_out, r_in)
        u_out, u_in = torch.as_tensor(u_out), torch.as_tensor(u_in)
        return {"B": u_in.t().reshape(r_in, -1, 1, 1).contiguous(),
                "core": torch.as_tensor(core) / scale,
                "A": u_out.reshape(u_out.shape[0], r_out, 1, 1).contiguous()}


class CPConv(Factorization):
    name = "cp"
    factor_names = ("B", "Kh", "Kw", "A")
    spatial_factors = ("Kh", "Kw")

    def check_rank(self, rank, shape):
        if isinstance(rank, (tuple, list)):
            raise TypeError(f"rank for decomposition='cp' must be an int, got {type(rank).__name__} "
                            f"{tuple(rank)!r} (tuple ranks are for 'tucker' and 'tkd-cpd')")
        limit = cp_rank_limit(shape.dense)
        return _bounded(_int_rank(rank, "rank"), limit, "rank",
                        "at most prod(kernel shape) / max(kernel shape)")

    def rank_from_ratio(self, ratio, shape):
        return min(max(1, int(ratio * shape.out_channels)), cp_rank_limit(shape.dense))

    def factor_shapes(self, rank, shape):
        F_out, C, kh, kw = shape.dense
        return {"B": (rank, C, 1, 1), "Kh": (rank, 1, kh, 1), "Kw": (rank, 1, 1, kw), "A": (F_out, rank, 1, 1)}

    def rank_of(self, factors):
        return int(factors["B"].shape[0])

    def operands(self, factors):
        A, B, Kh, Kw = (_work(factors[n]) for n in ("A", "B", "Kh", "Kw"))
        V = _matrix(B)[:, :, None, None] * Kh[:, 0, :, 0][:, None, :, None] * Kw[:, 0, 0, :][:, None, None, :]
        return _matrix(A), V

    def steps(self, factors, scale, groups):
        A = factors["A"] if scale == 1.0 else factors["A"] * scale
        return [(factors["B"], "pointwise", 1), (factors["Kh"], "h", factors["Kh"].shape[0]),
                (factors["Kw"], "w", factors["Kw"].shape[0]), (A, "pointwise", 1)]

    def fit(self, weight, rank, scale, groups, dtype=None):
        weights, cp = _parafac(weight.numpy(), rank, f"{'×'.join(map(str, weight.shape))} kernel")
        A, B, Kh, Kw = _spread_cp(weights, cp, scale)
        if len(weights) < rank:
            fresh = self.init_factors(rank, KernelShape(*weight.shape), True, weight.device, weight.dtype)
            A, B, Kh, Kw = _pad_cp([A, B, Kh, Kw], [fresh[n] for n in ("A", "B", "Kh", "Kw")])
        return {"B": B.t().reshape(rank, -1, 1, 1).contiguous(), "Kh": Kh.t().reshape(rank, 1, -1, 1).contiguous(),
                "Kw": Kw.t().reshape(rank, 1, 1, -1).contiguous(), "A": A.reshape(-1, rank, 1, 1).contiguous()}


class TKDCPDConv(Factorization):
    name = "tkd-cpd"
    factor_names = ("B", "core_in", "Kh", "Kw", "core_out", "A")
    zero_factor = "core_out"     # the CP core's output factor: the Tucker core starts at zero
    spatial_factors = ("Kh", "Kw")

    def check_rank(self, rank, shape):
        r_in, R, r_out = _rank_tuple(rank, 3, self.name, ("r_in", "cp_rank", "r_out"))
        _bounded(r_in, shape.in_channels, "r_in (input rank)", "at most in_channels")
        _bounded(r_out, shape.out_channels, "r_out (output rank)", "at most out_channels")
        limit = cp_rank_limit((r_out, r_in, shape.kh, shape.kw))
        _bounded(R, limit, "cp_rank (CP rank of the core)", "at most prod(core shape) / max(core shape)")
        return (r_in, R, r_out)

    def rank_from_ratio(self, ratio, shape):
        r = max(1, int(ratio * shape.out_channels))
        r_in, r_out = min(r, shape.in_channels), min(r, shape.out_channels)
        return (r_in, min(r, cp_rank_limit((r_out, r_in, shape.kh, shape.kw))), r_out)

    def factor_shapes(self, rank, shape):
        (r_in, R, r_out), (F_out, C, kh, kw) = rank, shape.dense
        return {"B": (r_in, C, 1, 1), "core_in": (R, r_in, 1, 1), "Kh": (R, 1, kh, 1), "Kw": (R, 1, 1, kw),
                "core_out": (r_out, R, 1, 1), "A": (F_out, r_out, 1, 1)}

    def rank_of(self, factors):
        return (int(factors["B"].shape[0]), int(factors["core_in"].shape[0]), int(factors["A"].shape[1]))

    def operands(self, factors):
        B, ci, Kh, Kw, co, A = (_work(factors[n]) for n in self.factor_names)
        G = _matrix(ci) @ _matrix(B)                                   # (R, C)
        V = G[:, :, None, None] * Kh[:, 0, :, 0][:, None, :, None] * Kw[:, 0, 0, :][:, None, None, :]
        return _matrix(A) @ _matrix(co), V

    def steps(self, factors, scale, groups):
        B, ci, Kh, Kw, co, A = (factors[n] for n in self.factor_names)
        r_in, C = B.shape[:2]
        R, r_out, F_out = ci.shape[0], co.shape[0], A.shape[0]
        # Two 1×1 convs in a row are one 1×1 conv with the product kernel; fuse
        # them where that costs fewer multiply-adds per pixel (same function).
        if C * R <= r_in * (C + R):
            head = [((_matrix(ci) @ _matrix(B)).reshape(R, C, 1, 1), "pointwise", 1)]
        else:
            head = [(B, "pointwise", 1), (ci, "pointwise", 1)]
        A = A if scale == 1.0 else A * scale
        if R * F_out <= r_out * (R + F_out):
            tail = [((_matrix(A) @ _matrix(co)).reshape(F_out, R, 1, 1), "pointwise", 1)]
        else:
            tail = [(co, "pointwise", 1), (A, "pointwise", 1)]
        return head + [(Kh, "h", R), (Kw, "w", R)] + tail

    def fit(self, weight, rank, scale, groups, dtype=None):
        r_in, R, r_out = rank
        core, u_out, u_in = _partial_tucker(weight.numpy(), r_out, r_in)
        weights, cp = _parafac(core, R, f"{'×'.join(map(str, core.shape))} Tucker core of the "
                                        f"{'×'.join(map(str, weight.shape))} kernel")
        co, ci, Kh, Kw = _spread_cp(weights, cp, scale)
        if len(weights) < R:
            fresh = self.init_factors(rank, KernelShape(*weight.shape), True, weight.device, weight.dtype)
            co, ci, Kh, Kw = _pad_cp([co, ci, Kh, Kw], [fresh[n] for n in ("core_out", "core_in", "Kh", "Kw")])
        u_out, u_in = torch.as_tensor(u_out), torch.as_tensor(u_in)
        return {"B": u_in.t().reshape(r_in, -1, 1, 1).contiguous(),
                "core_in": ci.t().reshape(R, r_in, 1, 1).contiguous(),
                "Kh": Kh.t().reshape(R, 1, -1, 1).contiguous(), "Kw": Kw.t().reshape(R, 1, 1, -1).contiguous(),
                "core_out": co.reshape(r_out, R, 1, 1).contiguous(),
                "A": u_out.reshape(-1, r_out, 1, 1).contiguous()}


_FACTORIZATIONS = {f.name: f for f in (SVDConv(), TuckerConv(), CPConv(), TKDCPDConv())}


def get_factorization(decomposition):
    """The :class:`Factorization` named ``decomposition`` (one of :data:`DECOMPOSITIONS`)."""
    if not isinstance(decomposition, str) or decomposition not in _FACTORIZATIONS:
        raise ValueError(f"decomposition must be one of {', '.join(DECOMPOSITIONS)}, got {decomposition!r}")
    return _FACTORIZATIONS[decomposition]


def _axis(value, axis, neutral):
    """The (h, w) pair of a step that acts along one axis only: the other axis gets ``neutral``."""
    if isinstance(value, str):
        return value
    return (value[0], neutral) if axis == 0 else (neutral, value[1])


def run_chain(x, steps, bias, stride, padding, dilation):
    """Run the chain of convolutions ``steps`` (from ``Factorization.steps``) on ``x``.

    The spatial step carries stride, padding and dilation; a kh×1 (``h``) or
    1×kw (``w``) depthwise step carries their part along its own axis.  Inner
    steps have no bias, so zero padding commutes with the 1×1 steps before
    the spatial ones: the chain equals one convolution with the merged kernel.
    ``bias`` is added by the last step.

    An empty batch with no rows or no columns is zero-padded first and the
    chain run unpadded: torch's conv takes it where the padding gives it the
    kernel's size, which a 1×1 step (or a kh×1 step, on no columns) pads to
    none of.  (torch refuses such an input in a batch that is not empty, and
    with ``"same"`` padding at any batch size, too small for the kernel: the
    chain raises there, as ``nn.Conv2d`` does.)
    """
    if x.shape[0] == 0 and 0 in x.shape[-2:] and not isinstance(padding, str):
        ph, pw = padding
        x, padding = F.pad(x, (pw, pw, ph, ph)), (0, 0)
    last = len(steps) - 1
    for n, (kernel, kind, groups) in enumerate(steps):
        b = bias if n == last else None
        if kind == "pointwise":
            x = F.conv2d(x, kernel, b, 1, 0, 1, groups)
        elif kind == "spatial":
            x = F.conv2d(x, kernel, b, stride, padding, dilation, groups)
        else:
            axis = 0 if kind == "h" else 1
            x = F.conv2d(x, kernel, b, _axis(stride, axis, 1), _axis(padding, axis, 0),
                         _axis(dilation, axis, 1), groups)
    return x
