"""LowRankConv2d: chains against nn.Conv2d, form changes, fits, state dicts and bad input."""

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

from _helpers import REL_TOL, assert_lbfgs_step_like_the_reference, kernel_devices, rel_err
from dynrank.conv import LowRankConv2d, adapter_costs, time_adapter_strategies
from dynrank.kernels.conv_merge import reference_kernel

F64 = torch.float64
TOL = REL_TOL[F64]
RANKS = {"svd": 3, "tucker": (2, 4), "cp": 4, "tkd-cpd": (2, 3, 4)}
DECOMPOSITIONS = list(RANKS)

# (kernel_size, stride, padding, dilation, padding_mode)
GEOMETRIES = [
    (1, 1, 0, 1, "zeros"),
    (3, 1, 1, 1, "zeros"),
    (3, 2, 1, 1, "zeros"),
    (5, 2, 2, 2, "zeros"),
    ((3, 5), (2, 1), (1, 2), (2, 1), "zeros"),
    (3, 1, "same", 1, "reflect"),
    (3, 2, 1, 1, "circular"),
    (5, 1, (2, 1), 1, "replicate"),
]


def reference_conv(layer):
    """An nn.Conv2d with the layer's geometry; ``_conv_forward`` applies any given kernel."""
    kh, kw = layer.kernel_size
    return nn.Conv2d(layer.in_channels, layer.out_channels, (kh, kw), layer.stride, layer.padding,
                     layer.dilation, layer.groups, padding_mode=layer.padding_mode, dtype=F64)


def make(dec, geometry=(3, 1, 1, 1, "zeros"), form="lowrank", **kw):
    k, s, p, d, mode = geometry
    # A 1×1 tkd-cpd core (4, 2, 1, 1) has CP rank at most 2.
    kw.setdefault("rank", (2, 2, 4) if dec == "tkd-cpd" and k == 1 else RANKS[dec])
    return LowRankConv2d(5, 7, k, decomposition=dec, stride=s, padding=p, dilation=d, padding_mode=mode,
                         form=form, dtype=F64, **kw)


def randomize(layer):
    with torch.no_grad():
        for p in layer.factors().values():
            p.normal_(0.0, 0.5)


def check_against_reference(layer, x, groups=1):
    """Output and every gradient of ``layer`` equal nn.Conv2d with the merged kernel (float64)."""
    x = x.clone().requires_grad_()
    y = layer(x)
    assert y.abs().max() > 0.1, "the factorized path must change the output"
    dy = torch.randn_like(y)
    y.backward(dy)

    xr = x.detach().clone().requires_grad_()
    factors = {n: p.detach().clone().requires_grad_() for n, p in layer.factors().items()}
    bias = layer.bias.detach().clone().requires_grad_()
    kernel = reference_kernel(layer.decomposition, factors, layer.scale, groups)
    if layer.weight is not None:
        kernel = kernel + layer.weight.detach()
    yr = reference_conv(layer)._conv_forward(xr, kernel, bias)
    yr.backward(dy)
    assert y.shape == yr.shape
    assert rel_err(y, yr) < TOL
    assert rel_err(x.grad, xr.grad) < TOL
    assert rel_err(layer.bias.grad, bias.grad) < TOL
    for name, p in layer.factors().items():
        assert rel_err(p.grad, factors[name].grad) < TOL, name
    if layer.weight is not None:
        assert layer.weight.grad is None, "W_f is frozen"


# -- every chain equals nn.Conv2d with its merged kernel -----------------------------------

@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_lowrank_chain_matches_dense_conv(dec, geometry):
    layer = make(dec, geometry, alpha=3.0)
    randomize(layer)
    check_against_reference(layer, torch.randn(2, 5, 11, 8, dtype=F64))


@pytest.mark.parametrize("strategy", ["chain", "merged"])
@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_adapter_strategies_match_dense_conv(dec, strategy):
    layer = make(dec, ((3, 5), 2, (1, 2), (1, 2), "zeros"), form="adapter", alpha=2.0,
                 adapter_strategy=strategy)
    randomize(layer)
    check_against_reference(layer, torch.randn(2, 5, 13, 10, dtype=F64))
    assert layer.adapter_choice == strategy


def test_svd_groups_match_grouped_dense_conv():
    for form in ("lowrank", "adapter"):
        layer = LowRankConv2d(6, 9, 3, rank=6, groups=3, padding=1, stride=2, form=form, dtype=F64)
        randomize(layer)
        x = torch.randn(2, 6, 9, 7, dtype=F64)
        check_against_reference(layer, x, groups=3)
        expected = reference_kernel("svd", {n: p.detach() for n, p in layer.factors().items()}, groups=3)
        if form == "adapter":
            expected = expected + layer.weight.detach()
        y = layer(x)
        layer.inflate()
        assert layer.weight.shape == (9, 2, 3, 3) and rel_err(layer.weight, expected) < TOL
        assert rel_err(layer(x), y) < TOL


def test_unbatched_input():
    layer = make("cp")
    x = torch.randn(5, 6, 7, dtype=F64)
    assert torch.allclose(layer(x), layer(x[None])[0])


# -- from_dense ------------------------------------------------------------------------------

def _dense_conv(weight, **kw):
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], dtype=F64, **kw)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


def _exact_kernel(dec):
    """A (7, 5, 3, 3) kernel that is exactly of the decomposition's rank RANKS[dec]."""
    layer = make(dec)
    randomize(layer)
    return reference_kernel(dec, {n: p.detach() for n, p in layer.factors().items()})


@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_from_dense_reproduces_conv_at_full_rank(dec):
    x = torch.randn(2, 5, 9, 8, dtype=F64)
    # Full rank: svd min(F, C·kh·kw); tucker (C, F).  A CP rank that is exact
    # for every kernel is known for 1×1 kernels (matrices): min(F, C).
    k, rank = {"svd": (3, 7), "tucker": (3, (5, 7)), "cp": (1, 5), "tkd-cpd": (1, (5, 5, 7))}[dec]
    conv = _dense_conv(torch.randn(7, 5, k, k, dtype=F64), padding=1, stride=2)
    layer = LowRankConv2d.from_dense(conv, rank=rank, decomposition=dec, alpha=5.0)
    assert layer.form == "lowrank" and layer.weight is None
    assert rel_err(layer(x), conv(x)) < 1e-10
    for form in ("full", "adapter"):
        other = LowRankConv2d.from_dense(conv, rank=rank, decomposition=dec, form=form)
        assert other.form == form and rel_err(other(x), conv(x)) < TOL


def test_svd_init_is_best_rank_r_approximation():
    weight = torch.randn(8, 3, 3, 3, dtype=F64)
    conv = _dense_conv(weight)
    r = 3
    layer = LowRankConv2d.from_dense(conv, rank=r, alpha=4.0)
    merged = layer.inflate().weight.detach().reshape(8, -1).numpy()
    U, S, Vt = np.linalg.svd(weight.reshape(8, -1).numpy(), full_matrices=False)
    best = (U[:, :r] * S[:r]) @ Vt[:r]
    assert np.linalg.norm(merged - best) / np.linalg.norm(best) < TOL
    assert abs(np.linalg.norm(merged - weight.reshape(8, -1).numpy()) - np.sqrt((S[r:] ** 2).sum())) < 1e-10


@pytest.mark.parametrize("dec", ["tucker", "cp", "tkd-cpd"])
def test_low_rank_fits_recover_a_noisy_low_rank_kernel(dec):
    exact = _exact_kernel(dec)
    weight = exact + 1e-3 * torch.randn(7, 5, 3, 3, dtype=F64)
    layer = LowRankConv2d.from_dense(_dense_conv(weight), rank=RANKS[dec], decomposition=dec)
    # A fit of the right rank is about as close as the noise-free kernel.
    assert rel_err(layer.inflate().weight, weight) < 2 * rel_err(exact, weight)


@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_from_dense_of_a_zero_kernel_is_an_exact_zero_that_trains(dec):
    """A zero kernel's best fit is zero; all-zero factors would never get a gradient (and ALS raised
    "Singular matrix" for cp and tkd-cpd), so every decomposition gives the zero-output init."""
    conv = _dense_conv(torch.zeros(7, 5, 3, 3, dtype=F64), padding=1)
    layer = LowRankConv2d.from_dense(conv, rank=RANKS[dec], decomposition=dec)
    factors = {n: p.detach() for n, p in layer.factors().items()}
    assert torch.count_nonzero(reference_kernel(dec, factors)) == 0
    zero = layer._dec.zero_factor
    assert torch.count_nonzero(factors[zero]) == 0
    assert all(torch.count_nonzero(f) > 0 for n, f in factors.items() if n != zero)
    x = torch.randn(2, 5, 6, 6, dtype=F64)
    y = layer(x)
    assert torch.equal(y, conv(x))
    (y * torch.randn_like(y)).sum().backward()
    assert getattr(layer, zero).grad.abs().sum() > 0


@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_from_dense_refuses_a_kernel_it_cannot_fit(dec, monkeypatch):
    weight = torch.randn(7, 5, 3, 3, dtype=F64)
    weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"cannot fit {dec} factors to a kernel with non-finite entries "
                                         rf"\(1 NaN/inf of 315\)"):
        LowRankConv2d.from_dense(_dense_conv(weight), rank=RANKS[dec], decomposition=dec)
    assert LowRankConv2d.from_dense(_dense_conv(weight), rank=RANKS[dec], decomposition=dec, form="full").form == "full"
    if dec in ("cp", "tkd-cpd"):
        def singular(*args, **kwargs):                   # what ALS raises on a degenerate (e.g. constant) kernel
            raise np.linalg.LinAlgError("Singular matrix")
        monkeypatch.setattr("tensorly.decomposition.parafac", singular)
        with pytest.raises(ValueError, match=r"the CP fit \(ALS\) of a .* tensor at CP rank [34] failed \(Singular "
                                             r"matrix\), and at every lower rank.*use decomposition 'svd' or 'tucker'"):
            LowRankConv2d.from_dense(_dense_conv(torch.randn(7, 5, 3, 3, dtype=F64)), rank=RANKS[dec],
                                     decomposition=dec)


def _svd_components(layer, t, name):
    """Norm of each svd component k's part of ``t``, factor ``name`` or its gradient (A: group k // (r/g),
    column k % (r/g); B: row k)."""
    if name == "B":
        return t.flatten(1).norm(dim=1)
    rg, Fg = layer.rank // layer.groups, layer.out_channels // layer.groups
    return torch.stack([t[k // rg * Fg:(k // rg + 1) * Fg, k % rg].norm() for k in range(layer.rank)])


@pytest.mark.parametrize("alpha", [None, 4.0])
@pytest.mark.parametrize("case", ["depthwise, one zero filter", "4 zero filters of 8", "deflate above W's rank"])
def test_svd_fit_of_a_rank_deficient_kernel_keeps_every_component_trainable(case, alpha):
    """A component of singular value zero got A = B = 0 (or ≈1e-8 each), a saddle point without gradient, so
    the layer trained at a lower rank (a depthwise conv's zero filter never trained); it now gets the
    zero-output init (A zero, B random): the same function, every component trains."""
    torch.manual_seed(0)
    if case == "deflate above W's rank":
        layer = LowRankConv2d(8, 8, 3, rank=2, padding=1, alpha=alpha, dtype=F64)
        randomize(layer)
        conv = reference_conv(layer)
        with torch.no_grad():
            conv.weight.copy_(layer.inflate().weight)
            conv.bias.copy_(layer.bias)
        layer.deflate(rank=6, init="svd")
        dead = [2, 3, 4, 5]
    else:
        groups, rank, dead = (8, 8, [3]) if case.startswith("depthwise") else (1, 6, [4, 5])
        conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups, dtype=F64)
        with torch.no_grad():
            conv.weight[3 if groups > 1 else slice(0, 4)] = 0
        layer = LowRankConv2d.from_dense(conv, rank=rank, alpha=alpha)
    live = [k for k in range(layer.rank) if k not in dead]
    x = torch.randn(2, 8, 6, 6, dtype=F64)
    y = layer(x)
    assert rel_err(y, conv(x)) < TOL
    g_A, g_B = torch.autograd.grad((y * torch.randn_like(y)).sum(), [layer.A, layer.B])
    g_A, g_B = _svd_components(layer, g_A, "A"), _svd_components(layer, g_B, "B")
    assert g_A[dead].min() > 1e-3 * g_A[live].max()                    # every component trains
    assert torch.all(_svd_components(layer, layer.A.detach(), "A")[dead] == 0)   # the zero-output init
    assert _svd_components(layer, layer.B.detach(), "B")[dead].min() > 0.3
    assert torch.all(g_B[dead] == 0) and g_B[live].min() > 0


@pytest.mark.parametrize("dtype, case", [(torch.float32, "inflated rank-2 factors"),
                                         (torch.float32, "rank 2 and a tail"), (torch.bfloat16, "rank 2 and a tail")],
                         ids=str)
def test_svd_deflate_of_a_float32_or_16_bit_kernel_above_its_rank_gives_the_zero_output_init(dtype, case):
    """Deflating above W's rank: singular values within the kernel's rounding (float32's eps for float32 and
    16-bit kernels) count as zero, so the surplus components get A = 0 and a fresh B, not near-zero factors
    of a saddle point.  The tail is an exact 2⁻³⁰ entry in a zero filter of an integer rank-2 kernel (every
    entry exact in bfloat16), far below float32's resolution and far above float64's."""
    torch.manual_seed(0)
    layer = LowRankConv2d(8, 8, 3, rank=2, padding=1, dtype=dtype)
    if case == "inflated rank-2 factors":
        randomize(layer)
        layer.inflate()
    else:
        U, V = torch.randint(-2, 3, (8, 2), dtype=F64), torch.randint(-2, 3, (8 * 9, 2), dtype=F64)
        U[0] = 0
        kernel = (U @ V.t()).reshape(8, 8, 3, 3)
        kernel[0, 0, 0, 0] = 2.0 ** -30
        layer.inflate()
        with torch.no_grad():
            layer.weight.copy_(kernel)
        assert torch.equal(layer.weight.double(), kernel)
    conv = reference_conv(layer)
    with torch.no_grad():
        conv.weight.copy_(layer.weight)
        conv.bias.copy_(layer.bias)
    layer.deflate(rank=6, init="svd")
    dead, live = [2, 3, 4, 5], [0, 1]
    x = torch.randn(2, 8, 6, 6, dtype=F64)
    y = layer(x.to(dtype))
    assert rel_err(y, conv(x)) < REL_TOL[dtype]
    assert torch.all(_svd_components(layer, layer.A.detach(), "A")[dead] == 0)   # the zero-output init
    norms_B = _svd_components(layer, layer.B.detach().double(), "B")
    assert norms_B[dead].min() > 0.3 and norms_B[dead].max() < 3                 # Glorot: about 1
    g_A = torch.autograd.grad((y.double() * torch.randn_like(y.double())).sum(), layer.A)[0]
    g_A = _svd_components(layer, g_A.double(), "A")
    assert g_A[dead].min() > 1e-3 * g_A[live].max()                              # every component trains


def test_svd_fit_of_a_full_rank_kernel_draws_no_random_numbers():
    """Only zero components draw their B from the RNG: a seeded run's stream is as it was."""
    layer = LowRankConv2d(8, 8, 3, rank=8, groups=4, dtype=F64)
    weight = torch.randn(8, 2, 3, 3, dtype=F64)
    state = torch.get_rng_state()
    layer._fit(weight, 8)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("dec", ["tucker", "cp", "tkd-cpd"])
def test_fits_of_a_kernel_with_zero_filters_keep_every_component_trainable(dec):
    """Tucker's surplus components keep orthonormal A and B columns beside a zero core slice (tkd-cpd: a zero
    core_out row), as a zero-output init; cp's kernel has a high CP rank: no saddle to repair there."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, dtype=F64)
    with torch.no_grad():
        conv.weight[:4] = 0
    rank = {"tucker": (6, 6), "cp": 6, "tkd-cpd": (6, 6, 6)}[dec]
    layer = LowRankConv2d.from_dense(conv, rank=rank, decomposition=dec)
    x = torch.randn(2, 8, 6, 6, dtype=F64)
    y = layer(x)
    grads = torch.autograd.grad((y * torch.randn_like(y)).sum(), list(layer.factors().values()))
    g = dict(zip(layer.factors(), grads))[layer._dec.zero_factor]      # the factor a zero-output init zeroes
    for axis in (0, 1):
        per_slice = g.transpose(0, axis).flatten(1).norm(dim=1)
        assert per_slice.min() > 1e-3 * per_slice.max()


@pytest.mark.filterwarnings("ignore:the CP fit \\(ALS\\) of the .* ran at CP rank:UserWarning")   # (the next test)
@pytest.mark.parametrize("dec, small, big", [("cp", 1, 8), ("tkd-cpd", (2, 1, 2), (4, 6, 6))])
def test_deflate_svd_above_the_cp_rank_keeps_the_function(dec, small, big):
    """An inflated rank-1 cp layer deflated at rank 8 raised "CP fit (ALS) ... failed (Singular matrix)",
    though an exact fit exists; ALS now runs at the largest CP rank it can (see the next test)."""
    torch.manual_seed(0)
    layer = LowRankConv2d(6, 8, 3, rank=small, decomposition=dec, padding=1, dtype=F64)
    x = torch.randn(2, 6, 5, 5, dtype=F64)
    y0 = layer(x).detach()
    layer.inflate().deflate(rank=big, init="svd")
    assert layer.form == "adapter" and layer.rank == big
    for strategy in ("chain", "merged"):
        layer.adapter_strategy = strategy
        assert rel_err(layer(x), y0) < TOL


@pytest.mark.parametrize("dec", ["cp", "tkd-cpd"])
def test_a_cp_fit_that_fails_at_the_rank_runs_at_a_lower_one_and_pads_with_zero_output(dec, monkeypatch):
    """Where ALS meets a singular system it runs at a lower CP rank; the components beyond it get the
    zero-output init (the output-side CP factor zero, the others random), so they train."""
    import tensorly.decomposition
    parafac = tensorly.decomposition.parafac

    def singular_above_2(tensor, rank, **kwargs):
        if rank > 2:
            raise np.linalg.LinAlgError("Singular matrix")
        return parafac(tensor, rank, **kwargs)

    torch.manual_seed(0)
    conv = _dense_conv(torch.randn(7, 5, 3, 3, dtype=F64), padding=1)
    low = {"cp": 2, "tkd-cpd": (2, 2, 4)}[dec]
    reference = LowRankConv2d.from_dense(conv, rank=low, decomposition=dec)
    monkeypatch.setattr("tensorly.decomposition.parafac", singular_above_2)
    what, asked = {"cp": ("7×5×3×3 kernel", 4), "tkd-cpd": ("4×2×3×3 Tucker core of the 7×5×3×3 kernel", 3)}[dec]
    with pytest.warns(UserWarning, match=rf"CP fit \(ALS\) of the {what} at CP rank {asked} met a singular system "
                                         rf"\(Singular matrix\) .* it ran at CP rank 2, and the {asked - 2} components"):
        layer = LowRankConv2d.from_dense(conv, rank=RANKS[dec], decomposition=dec)
    x = torch.randn(2, 5, 6, 6, dtype=F64)
    assert rel_err(layer(x), reference(x)) < TOL                        # the rank-2 fit, padded with zeros
    zero, cp_names = {"cp": ("A", ["B", "Kh", "Kw"]), "tkd-cpd": ("core_out", ["core_in", "Kh", "Kw"])}[dec]
    factors = layer.factors()
    assert torch.equal(factors[zero][:, :2], reference.factors()[zero])
    assert torch.count_nonzero(factors[zero][:, 2:]) == 0
    assert all(factors[n][2:].flatten(1).norm(dim=1).min() > 0.1 for n in cp_names)
    y = layer(x)
    g, = torch.autograd.grad((y * torch.randn_like(y)).sum(), [factors[zero]])
    assert g[:, 2:].flatten(1).norm(dim=0).min() > 1e-3 * g.norm()      # the padded components train


def _dirac_conv(channels):
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False, dtype=F64)
    nn.init.dirac_(conv.weight)
    return conv


@pytest.mark.parametrize("dec, rank", [("cp", 6), ("tkd-cpd", (6, 6, 6))])
def test_a_cp_fit_whose_svd_start_fails_starts_again_at_random_at_the_same_rank(dec, rank):
    """ALS from the SVD start meets "Singular matrix" on a Dirac (identity) kernel at every CP rank above 1,
    and the fit fell silently to CP rank 1 (output error 0.896), though the kernel has CP rank 6: a seeded
    random start at the same rank fits it, deterministically, leaving numpy's global RNG alone."""
    import warnings
    conv = _dirac_conv(6)
    x = torch.randn(2, 6, 8, 8, dtype=F64)
    state = np.random.get_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                # no fall to a lower CP rank
        layer = LowRankConv2d.from_dense(conv, rank=rank, decomposition=dec)
        again = LowRankConv2d.from_dense(conv, rank=rank, decomposition=dec)
    assert rel_err(layer(x), conv(x)) < 1e-5
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), again.parameters()))
    assert all(a == b if isinstance(a, str) else np.array_equal(a, b) for a, b in zip(np.random.get_state(), state))


def test_a_cp_fit_of_a_centred_1x1_kernel_is_as_close_as_the_best_low_rank_matrix():
    """A 1×1 kernel centred in a 3×3 (as RepVGG-style merges give) is a 6×6 matrix M in the centre tap:
    its best CP rank-3 fit is M's truncated SVD.  The fit gave kernel error 0.749 against the best 0.321."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, bias=False, dtype=F64)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = torch.randn(6, 6, dtype=F64)
    layer = LowRankConv2d.from_dense(conv, rank=3, decomposition="cp")
    S = torch.linalg.svdvals(conv.weight[:, :, 1, 1].detach())
    best = (S[3:].norm() / S.norm()).item()
    assert rel_err(layer.inflate().weight, conv.weight) < best * (1 + 1e-3)


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_from_dense_on_meta_gives_the_shapes(dec, form):
    """A meta kernel has nothing to fit: the layer gets a real from_dense's parameter shapes, on meta."""
    conv = nn.Conv2d(5, 7, 3, padding=1, dtype=F64)
    expected = LowRankConv2d.from_dense(conv, rank_ratio=0.5, decomposition=dec, form=form)
    layer = LowRankConv2d.from_dense(conv.to("meta"), rank_ratio=0.5, decomposition=dec, form=form)
    assert layer.rank == expected.rank and layer.form == form
    shapes = {n: (p.shape, p.dtype, p.requires_grad) for n, p in expected.named_parameters()}
    assert {n: (p.shape, p.dtype, p.requires_grad) for n, p in layer.named_parameters()} == shapes
    assert all(p.is_meta for p in layer.parameters())


def test_from_dense_of_an_unrun_lazy_conv_says_to_run_it_first():
    """An nn.LazyConv2d not run yet has in_channels 0: from_dense said "in_channels must be a positive int,
    got 0"; it names the lazy module and what to do."""
    lazy = nn.LazyConv2d(7, 3, padding=1, dtype=F64)
    with pytest.raises(ValueError, match=re.escape("from_dense: the LazyConv2d still has uninitialized (lazy) "
                                                   "parameters; run it once on a dummy batch")):
        LowRankConv2d.from_dense(lazy, rank=3)
    x = torch.randn(2, 5, 6, 6, dtype=F64)
    lazy(x)
    layer = LowRankConv2d.from_dense(lazy, rank=3, form="full")
    assert layer.in_channels == 5 and torch.equal(layer(x), lazy(x))


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex128])
def test_from_dense_refuses_a_kernel_that_is_not_floating_point(dtype):
    conv = nn.Conv2d(5, 7, 3)
    conv.weight = nn.Parameter(torch.zeros(7, 5, 3, 3, dtype=dtype), requires_grad=False)
    with pytest.raises(TypeError, match=rf"from_dense needs a floating-point kernel: dtype must be a "
                                        rf"floating-point dtype, got {dtype}"):
        LowRankConv2d.from_dense(conv, rank=2)


@pytest.mark.parametrize("bias_trains", [False, True], ids=["frozen bias", "trained bias"])
@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_from_dense_keeps_the_bias_requires_grad(dec, form, bias_trains):
    """The bias keeps its requires_grad in every form: a frozen one gets no gradient (and stays out of an
    optimizer that takes the trainable parameters), beside a kernel that trains as its factors (lowrank),
    as W (full) or through the adapter (adapter)."""
    # Exact ranks, as in test_from_dense_reproduces_conv_at_full_rank.
    k, rank = {"svd": (3, 7), "tucker": (3, (5, 7)), "cp": (1, 5), "tkd-cpd": (1, (5, 5, 7))}[dec]
    conv = _dense_conv(torch.randn(7, 5, k, k, dtype=F64), padding=1)
    conv.bias.requires_grad_(bias_trains)
    layer = LowRankConv2d.from_dense(conv, rank=rank, decomposition=dec, form=form)
    trained = ({"weight"} if form == "full" else set(layer.factors())) | ({"bias"} if bias_trains else set())
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == trained
    assert torch.equal(layer.bias, conv.bias)
    x = torch.randn(2, 5, 6, 6, dtype=F64)
    y = layer(x)
    assert rel_err(y, conv(x)) < 1e-10
    dy = torch.randn_like(y)
    y.backward(dy)
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == trained
    if bias_trains:
        assert rel_err(layer.bias.grad, dy.sum((0, 2, 3))) < TOL


# -- form changes preserve the function ---------------------------------------------------

@pytest.mark.parametrize("init", ["zeros", "svd", "random"])
@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_inflate_and_deflate_preserve_function(dec, init):
    layer = make(dec, (3, 2, 1, 2, "zeros"), alpha=6.0)
    randomize(layer)
    x = torch.randn(2, 5, 12, 9, dtype=F64)
    y0 = layer(x)
    assert rel_err(layer.inflate()(x), y0) < TOL
    deflate_rank = {"svd": 4, "tucker": (3, 2), "cp": 5, "tkd-cpd": (3, 2, 2)}[dec]
    layer.deflate(rank=deflate_rank, init=init)
    assert layer.form == "adapter" and layer.rank == deflate_rank
    for strategy in ("chain", "merged"):
        layer.adapter_strategy = strategy
        if init == "random":
            assert rel_err(layer(x), y0) > 1e-2, "a random adapter changes the function"
        else:
            assert rel_err(layer(x), y0) < TOL
    y1 = layer(x)
    assert rel_err(layer.inflate()(x), y1) < TOL


@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_round_trip_keeps_function_and_parameters(dec):
    layer = make(dec, (3, 1, "same", 1, "circular"))
    x = torch.randn(2, 5, 7, 6, dtype=F64)
    y = layer(x)
    layer.inflate()
    W = layer.weight
    assert W.requires_grad and set(layer.factors()) == set()
    layer.deflate()
    assert layer.weight is W and not W.requires_grad
    assert set(layer.factors()) == set(layer._dec.factor_names)
    zero = layer._dec.zero_factor
    assert torch.count_nonzero(getattr(layer, zero)) == 0
    assert all(torch.count_nonzero(p) > 0 for n, p in layer.factors().items() if n != zero)
    assert rel_err(layer(x), y) < TOL
    randomize(layer)
    y2 = layer(x)
    layer.inflate()
    assert layer.weight.data_ptr() == W.data_ptr() and layer.weight.requires_grad   # merged in place
    assert rel_err(layer(x), y2) < TOL


@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_deflate_svd_gives_row_major_factors_that_lbfgs_steps(dec):
    """The fits hand over permuted or transposed tensors (Tucker's core comes with strides (9, 36, 3, 1)):
    installed with those strides a factor passes them on to its gradient, which torch.optim.LBFGS views flat
    ("view size is not compatible").  Every factor is row-major, and an L-BFGS step moves the factors and the
    bias as the same step on the float64 reference does."""
    layer = make(dec, form="full").deflate(init="svd")
    assert all(p.is_contiguous() for p in layer.factors().values())
    x, target = torch.randn(2, 5, 6, 6, dtype=F64), torch.randn(2, 7, 6, 6, dtype=F64)
    W = layer.weight.detach().clone()
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == set(layer.factors()) | {"bias"}

    def reference_forward(ref):
        kernel = W + reference_kernel(dec, {n: p for n, p in ref.items() if n != "bias"}, layer.scale)
        return reference_conv(layer)._conv_forward(x, kernel, ref["bias"])

    assert_lbfgs_step_like_the_reference(layer, lambda: layer(x), reference_forward, target, moves=1e-2)


# -- state dicts across forms -----------------------------------------------------------

@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_state_dict_across_forms(dec):
    x = torch.randn(2, 5, 8, 8, dtype=F64)
    src = make(dec)
    src.inflate()
    fresh = make(dec)
    fresh.load_state_dict(src.state_dict())
    assert fresh.form == "full" and rel_err(fresh(x), src(x)) < TOL

    rank = {"svd": 2, "tucker": (3, 3), "cp": 2, "tkd-cpd": (3, 2, 3)}[dec]
    src.deflate(rank=rank)
    randomize(src)
    fresh = make(dec)
    fresh.load_state_dict(src.state_dict())
    assert fresh.form == "adapter" and fresh.rank == rank and rel_err(fresh(x), src(x)) < TOL


@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_bad_state_dict_leaves_the_layer_as_it_was(dec):
    layer = LowRankConv2d(4, 8, 3, rank=2, decomposition=dec)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    state = LowRankConv2d(4, 8, 3, rank=3, decomposition=dec, form="adapter").state_dict()
    name = next(n for n in state if n not in ("weight", "bias"))
    state[name] = torch.randn(*state[name].shape[:-1], state[name].shape[-1] + 1)
    with pytest.raises(RuntimeError, match=rf"{name} must have shape .*got .*the layer is left as it was "
                                           rf"\(lowrank form, rank {re.escape(str(layer.rank))}\)"):
        layer.load_state_dict(state)
    after = layer.state_dict()
    assert layer.form == "lowrank" and after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# -- rank, rank_ratio and the lowrank init --------------------------------------------

def test_rank_ratio_as_the_authors():
    assert LowRankConv2d(16, 32, 3, rank_ratio=0.5).rank == 16
    assert LowRankConv2d(16, 32, 3, rank_ratio=0.5, decomposition="cp").rank == 16
    # ResNet20's first conv: 3 → 16, ρ = 0.5 → r = 8, the input mode clipped to 3.
    assert LowRankConv2d(3, 16, 3, rank_ratio=0.5, decomposition="tucker").rank == (3, 8)
    assert LowRankConv2d(3, 16, 3, rank_ratio=0.5, decomposition="tkd-cpd").rank == (3, 8, 8)
    assert LowRankConv2d(16, 16, 1, rank_ratio=0.5).rank == 8
    assert LowRankConv2d(6, 10, 3, rank_ratio=0.5, groups=2).rank == 4     # int(5) → multiple of 2
    # At least groups: a depthwise conv keeps full rank, and int(0.25·16) = 4 < 8 groups gives 8.
    assert LowRankConv2d(32, 32, 3, rank_ratio=0.25, groups=32).rank == 32
    assert LowRankConv2d(16, 16, 3, rank_ratio=0.25, groups=8).rank == 8
    # An RGB stem 3 → 64: r = 32, the core (32, 3, 3, 3) has CP rank at most 27.
    assert LowRankConv2d(3, 64, 3, rank_ratio=0.5, decomposition="tkd-cpd").rank == (3, 27, 32)
    assert LowRankConv2d(16, 16, 3, rank=5, decomposition="tucker").rank == (5, 5)


@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_lowrank_init_has_conv2d_variance(dec):
    # The merged kernel's variance is right in expectation; one draw of a CP
    # kernel scatters widely (few factor entries per term), so average 100 draws.
    # Bounds: about 5 standard errors of that mean (over 2000 draws: 1.4 % svd, 2.2 % tucker,
    # 5.4 % cp, 8.3 % tkd-cpd, every mean within 2.4 % of 1).  alpha is 4·rank (s = 4), so the output
    # factor's std must carry the 1/s: with s = 1 a missing one would not show.
    bound = {"svd": 0.07, "tucker": 0.1, "cp": 0.25, "tkd-cpd": 0.4}[dec]
    torch.manual_seed(0)
    second_moments = []
    for _ in range(100):
        layer = LowRankConv2d(12, 16, 3, rank_ratio=0.5, decomposition=dec, alpha=32.0, dtype=F64)
        assert layer.scale == 4.0
        kernel = reference_kernel(dec, {n: p.detach() for n, p in layer.factors().items()}, layer.scale)
        second_moments.append(kernel.pow(2).mean().item())
    expected = 1.0 / (3 * 12 * 9)            # nn.Conv2d's default: U(±1/sqrt(fan_in))
    assert abs(np.mean(second_moments) / expected - 1) < bound


@pytest.mark.parametrize("dec, rank", [("svd", 32), ("tucker", (32, 32)), ("cp", 256), ("tkd-cpd", (32, 256, 32))],
                         ids=DECOMPOSITIONS)
def test_deflate_random_draws_glorot_normal_factors(dec, rank):
    """deflate(init="random") draws each factor (o, i, kh, kw) from N(0, 2/((i + fan_out)·kh·kw)), fan_out = o,
    or 1 for a depthwise Kh/Kw.  Pooled over 8 draws of a 48 → 64 layer, each factor's std is estimated from
    ≥ 6144 entries (relative standard error ≤ 0.9 %), so a 5 % bound is tight yet far from the scatter."""
    torch.manual_seed(0)
    draws = {}
    for _ in range(8):
        layer = LowRankConv2d(48, 64, 3, rank=rank, decomposition=dec, form="full", dtype=F64)
        layer.deflate(init="random")
        for name, factor in layer.factors().items():
            draws.setdefault(name, []).append(factor.detach())
    for name, factors in draws.items():
        o, i, kh, kw = factors[0].shape
        fan_out = 1 if name in ("Kh", "Kw") else o
        expected = (2.0 / ((i + fan_out) * kh * kw)) ** 0.5
        entries = torch.cat([f.flatten() for f in factors])
        assert abs(entries.std().item() / expected - 1) < 0.05, name
        assert abs(entries.mean().item()) < 0.05 * expected, name


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_bias_init_is_nn_conv2ds(dec, form):
    """The bias is drawn from U(±1/√fan_in) with nn.Conv2d's fan_in, C/groups·kh·kw (a (3, 5) kernel, and
    for svd 2 groups: 4·15), in every form; in full form, from the same RNG state, the layer gets nn.Conv2d's
    very kernel and bias."""
    groups = 2 if dec == "svd" else 1
    torch.manual_seed(0)
    layer = LowRankConv2d(8, 64, (3, 5), groups=groups, rank_ratio=0.5, decomposition=dec, form=form, dtype=F64)
    bound = (8 // groups * 3 * 5) ** -0.5
    largest = layer.bias.detach().abs().max()
    # The largest of 64 draws is below 0.9·bound with probability 0.9⁶⁴ ≈ 0.1 %.
    assert 0.9 * bound < largest <= bound
    if form == "full":
        torch.manual_seed(0)
        conv = nn.Conv2d(8, 64, (3, 5), groups=groups, dtype=F64)
        assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)


# -- adapter strategy choice -----------------------------------------------------------

def test_auto_strategy_uses_cost_model_on_cpu_and_caches():
    layer = LowRankConv2d(16, 16, 3, rank=8, padding=1, form="adapter")
    assert layer.adapter_choice is None
    x = torch.randn(4, 16, 8, 8)
    layer(x).sum().backward()
    choice = layer.adapter_choice
    assert choice in ("chain", "merged")
    (key, record), = layer.adapter_choices.items()
    assert record.method == "cost model" and record.strategy == choice
    assert record.seconds == adapter_costs(layer, x)
    layer(x)
    assert len(layer.adapter_choices) == 1
    with torch.no_grad():
        layer(x)
    assert len(layer.adapter_choices) == 2
    layer.inflate()
    layer.deflate()
    assert layer.adapter_choices == {}


def test_auto_strategy_keeps_the_choices_of_the_input_keys_used_last():
    """Inputs of ever new sizes (multi-scale training) grew every adapter conv's cache without bound: it
    keeps the ADAPTER_CHOICES_KEPT keys used last, an input seen again counting as a use, and decides an
    evicted key again from its cost model."""
    from dynrank.conv import ADAPTER_CHOICES_KEPT
    assert ADAPTER_CHOICES_KEPT == 64
    layer = LowRankConv2d(4, 8, 3, rank=2, padding=1, form="adapter", dtype=F64)
    shapes = [(1, 4, 4 + i // 10, 4 + i % 10) for i in range(100)]
    key = {s: (s, F64, "cpu", False, False) for s in shapes}
    with torch.no_grad():
        for s in shapes:
            layer(torch.randn(s, dtype=F64))
            if s == shapes[0]:
                first = layer.adapter_choices[key[s]]
        assert list(layer.adapter_choices) == [key[s] for s in shapes[-64:]]
        kept = layer.adapter_choices
        layer(torch.randn(shapes[40], dtype=F64))                 # used again: now the most recent
        layer(torch.randn(1, 4, 30, 30, dtype=F64))               # a new key: the least recent one goes
    choices = layer.adapter_choices
    assert len(choices) == 64
    assert list(choices) == [key[s] for s in shapes[37:40] + shapes[41:] + [shapes[40]]] + [
        ((1, 4, 30, 30), F64, "cpu", False, False)]
    assert all(choices[k] is kept[k] for k in list(choices)[:-1])  # kept, not decided again
    with torch.no_grad():
        layer(torch.randn(shapes[0], dtype=F64))                  # evicted long ago: decided again, alike
    again = layer.adapter_choices[key[shapes[0]]]
    assert list(layer.adapter_choices)[-1] == key[shapes[0]] and len(layer.adapter_choices) == 64
    assert again is not first and (again.strategy, again.seconds) == (first.strategy, first.seconds)


def test_cost_model_follows_measured_preferences():
    # Measured on CPU (torch 2.13, one thread, forward+backward): a 512-channel
    # layer on 8×8 maps runs its CP chain in 82 ms against 131 ms merged; a
    # 16-channel layer on 32×32 maps 86 ms chained against 34 ms merged.
    wide = LowRankConv2d(512, 512, 3, rank_ratio=0.5, decomposition="cp", padding=1, form="adapter")
    costs = adapter_costs(wide, torch.empty(16, 512, 8, 8, device="meta", requires_grad=True))
    assert costs["chain"] < costs["merged"]
    narrow = LowRankConv2d(16, 16, 3, rank_ratio=0.5, decomposition="cp", padding=1, form="adapter")
    costs = adapter_costs(narrow, torch.empty(128, 16, 32, 32, device="meta", requires_grad=True))
    assert costs["merged"] < costs["chain"]


def _conv_pass(n, cin, h, w, cout, cin_per_group, kh, kw, ho, wo, elt):
    """[multiply-add FLOPs, bytes moved, ops] of one pass of a conv, counted by hand: 2 FLOPs per
    multiply-add; its input, output and kernel each moved once."""
    return np.array([2.0 * n * ho * wo * cout * cin_per_group * kh * kw,
                     elt * (n * cin * h * w + n * cout * ho * wo + cout * cin_per_group * kh * kw), 1.0])


def test_adapter_work_and_costs_match_a_hand_count():
    """adapter_work as its docstring counts it, for an svd adapter 6 → 10 (3×3, stride 2, padding 1, rank 4)
    on a float32 (2, 6, 9, 7) input, output 5×4: the frozen conv runs forward and, where x needs a
    gradient, its input-gradient pass; every conv of the chain forward, input gradient (the first one only
    where x needs it) and weight gradient; the merge, its two backward GEMMs and the dense conv's weight
    gradient.  adapter_costs is flops / throughput + bytes / bandwidth + ops · launch."""
    from dynrank.conv import adapter_work
    from dynrank.conv_adapter import _MACHINE
    layer = LowRankConv2d(6, 10, 3, rank=4, stride=2, padding=1, form="adapter")
    n, h, w, ho, wo, elt = 2, 9, 7, 5, 4, 4
    dense = _conv_pass(n, 6, h, w, 10, 6, 3, 3, ho, wo, elt)           # W_f (10, 6, 3, 3)
    conv_B = _conv_pass(n, 6, h, w, 4, 6, 3, 3, ho, wo, elt)           # B (4, 6, 3, 3), k×k 6 → 4
    conv_A = _conv_pass(n, 4, ho, wo, 10, 4, 1, 1, ho, wo, elt)        # A (10, 4, 1, 1), 1×1 4 → 10
    paths_sum = np.array([0.0, 3.0 * elt * n * 10 * ho * wo, 1.0])     # read both outputs, write the sum
    merge = np.array([2.0 * 10 * 4 * 6 * 9, elt * (2 * 10 * 6 * 9 + 10 * 4 + 4 * 6 * 9), 2.0])   # W_f + s·U·V
    expected = {
        "x needs grad": {"chain": 2 * dense + 2 * paths_sum + 3 * conv_B + 3 * conv_A,
                         "merged": 3 * merge + 3 * dense},
        "x needs no grad": {"chain": dense + 2 * paths_sum + 2 * conv_B + 3 * conv_A,
                            "merged": 3 * merge + 2 * dense},
        "no grad mode": {"chain": dense + paths_sum + conv_B + conv_A, "merged": merge + dense},
    }
    x = torch.randn(n, 6, h, w)
    works = {"x needs grad": adapter_work(layer, x.requires_grad_()),
             "x needs no grad": adapter_work(layer, x.detach())}
    with torch.no_grad():
        works["no grad mode"] = adapter_work(layer, x)
    for case, work in works.items():
        assert set(work) == {"chain", "merged"}, case
        for strategy, counted in work.items():
            assert counted == expected[case][strategy].tolist(), (case, strategy)
    # x needing a gradient adds the input-gradient passes of the convs that read x: the frozen conv's,
    # and in the chain the first factor conv's.
    for strategy, read_x in (("chain", dense + conv_B), ("merged", dense)):
        added = np.array(works["x needs grad"][strategy]) - np.array(works["x needs no grad"][strategy])
        assert added.tolist() == read_x.tolist(), strategy

    flops_per_s, bytes_per_s, launch = _MACHINE["cpu"]
    assert launch > 0
    for x_case in (x, x.detach()):
        costs = adapter_costs(layer, x_case)
        work = adapter_work(layer, x_case)
        assert set(costs) == {"chain", "merged"}
        for strategy, (flops, moved, ops) in work.items():
            assert costs[strategy] == pytest.approx(flops / flops_per_s + moved / bytes_per_s + ops * launch,
                                                    rel=1e-12, abs=0)


# case → (layer, input size (h, w), padded size the convs see (h, w), output size, the chain's convs as
# [C_in, h, w, C_out, C_in per group, kh, kw, h_out, w_out] of _conv_pass)
_COUNTED_ADAPTERS = {
    # 3×3 dilated 3 spans 7×7: 13×11 with padding 1 → 9×7.
    "dilation 3": (dict(kernel_size=3, rank=4, padding=1, dilation=3), (13, 11), (13, 11), (9, 7),
                   [(6, 13, 11, 4, 6, 3, 3, 9, 7), (4, 9, 7, 10, 4, 1, 1, 9, 7)]),
    # 9×7 reflect-padded once by 1 row and 3 columns each side to 11×13; every conv runs unpadded.
    "reflect padding (1, 3)": (dict(kernel_size=3, rank=4, padding=(1, 3), padding_mode="reflect"), (9, 7),
                               (11, 13), (9, 11),
                               [(6, 11, 13, 4, 6, 3, 3, 9, 11), (4, 9, 11, 10, 4, 1, 1, 9, 11)]),
    # cp: 1×1 6 → 4, depthwise 3×1 (stride 2, padding 1) on the height, depthwise 1×5 (padding 2, dilation 2)
    # on the width, 1×1 4 → 10: 9×12 → 5×12 → 5×8.
    "cp, (3, 5) kernel": (dict(kernel_size=(3, 5), rank=4, decomposition="cp", stride=(2, 1), padding=(1, 2),
                               dilation=(1, 2)), (9, 12), (9, 12), (5, 8),
                          [(6, 9, 12, 4, 6, 1, 1, 9, 12), (4, 9, 12, 4, 1, 3, 1, 5, 12),
                           (4, 5, 12, 4, 1, 1, 5, 5, 8), (4, 5, 8, 10, 4, 1, 1, 5, 8)]),
}


@pytest.mark.parametrize("case", list(_COUNTED_ADAPTERS))
def test_adapter_work_of_dilated_padded_and_separable_layers_matches_a_hand_count(case):
    """adapter_work as test_adapter_work_and_costs_match_a_hand_count counts it (6 → 10, rank 4, float32 batch
    of 2), for a dilated kernel, a padding mode that pads the input once (the convs see the padded size) and
    a cp chain whose depthwise convs step the height and the width apart."""
    from dynrank.conv import adapter_work
    from dynrank.conv_adapter import _MACHINE
    kwargs, (h, w), (hp, wp), (ho, wo), convs = _COUNTED_ADAPTERS[case]
    layer = LowRankConv2d(6, 10, form="adapter", **kwargs)
    n, elt, r = 2, 4, 4
    kh, kw = layer.kernel_size
    dense = _conv_pass(n, 6, hp, wp, 10, 6, kh, kw, ho, wo, elt)
    chain = [_conv_pass(n, *conv, elt) for conv in convs]
    paths_sum = np.array([0.0, 3.0 * elt * n * 10 * ho * wo, 1.0])
    merge = np.array([2.0 * 10 * r * 6 * kh * kw, elt * (2 * 10 * 6 * kh * kw + 10 * r + r * 6 * kh * kw), 2.0])
    expected = {
        "x needs grad": {"chain": 2 * dense + 2 * paths_sum + 3 * sum(chain), "merged": 3 * merge + 3 * dense},
        "x needs no grad": {"chain": dense + 2 * paths_sum + 3 * sum(chain) - chain[0],
                            "merged": 3 * merge + 2 * dense},
        "no grad mode": {"chain": dense + paths_sum + sum(chain), "merged": merge + dense},
    }
    x = torch.randn(n, 6, h, w)
    assert layer(x).shape == (n, 10, ho, wo)
    works = {"x needs grad": adapter_work(layer, x.requires_grad_()),
             "x needs no grad": adapter_work(layer, x.detach())}
    with torch.no_grad():
        works["no grad mode"] = adapter_work(layer, x)
    for grad_case, work in works.items():
        assert set(work) == {"chain", "merged"}, grad_case
        for strategy, counted in work.items():
            assert counted == pytest.approx(expected[grad_case][strategy].tolist(), rel=1e-12, abs=0), \
                (grad_case, strategy)
    flops_per_s, bytes_per_s, launch = _MACHINE["cpu"]
    flops, moved, ops = works["x needs grad"]["chain"]
    assert adapter_costs(layer, x)["chain"] == pytest.approx(flops / flops_per_s + moved / bytes_per_s + ops * launch,
                                                             rel=1e-12, abs=0)


class FakeStrategyClock:
    """conv_adapter's perf_counter, which only the strategies advance: the k-th call of strategy s takes
    ``seconds[s][k]`` seconds (the warm-up first; whole numbers, exact in binary), so the times
    :func:`time_adapter_strategies` returns are known.  ``steps`` records each call's strategy and input."""

    def __init__(self, monkeypatch, seconds):
        import types

        from dynrank import conv_adapter
        self.now, self.steps = 0.0, []
        monkeypatch.setattr(conv_adapter, "time", types.SimpleNamespace(perf_counter=lambda: self.now))
        for name, strategy in list(conv_adapter._ADAPTERS.items()):
            monkeypatch.setitem(conv_adapter._ADAPTERS, name, self._timed(name, strategy, iter(seconds[name])))

    def _timed(self, name, strategy, seconds):
        def run(layer, x, *args):
            self.steps.append((name, x.detach().clone()))
            self.now += next(seconds)
            return strategy(layer, x, *args)
        return run


def test_timing_both_strategies_leaves_gradients_alone(monkeypatch):
    """Each strategy runs a warm-up step, then ``repeats`` timed ones, of which the fastest is kept; the
    warm-up (here the fastest of all) is not timed.  No ``.grad`` of the layer's is touched."""
    clock = FakeStrategyClock(monkeypatch, {"chain": [1.0, 3.0, 2.0, 4.0], "merged": [1.0, 6.0, 5.0, 7.0]})
    layer = LowRankConv2d(8, 8, 3, rank=4, padding=1, form="adapter")
    x = torch.randn(2, 8, 6, 6)
    assert time_adapter_strategies(layer, x, repeats=3) == {"chain": 2.0, "merged": 5.0}
    assert [name for name, _ in clock.steps] == ["chain"] * 4 + ["merged"] * 4
    assert all(torch.equal(seen, x) for _, seen in clock.steps)
    assert all(p.grad is None for p in layer.parameters())


# -- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, words", [
    (dict(rank=8), ValueError, "rank must be in [1, 7]"),
    (dict(rank=(2, 2)), TypeError, "must be an int"),
    (dict(rank=(2, 9), decomposition="tucker"), ValueError, "r_out"),
    (dict(rank=(2, 2), decomposition="tkd-cpd"), ValueError, "tuple/list of 3 ints (r_in, cp_rank, r_out)"),
    (dict(rank=10_000, decomposition="cp"), ValueError, "rank must be in"),
    (dict(rank=2.5), TypeError, "must be an int"),
    (dict(rank=2, decomposition="qr"), ValueError, "decomposition must be one of"),
    (dict(rank=2, rank_ratio=0.5), ValueError, "exactly one of rank and rank_ratio"),
    (dict(), ValueError, "exactly one of rank and rank_ratio"),
    (dict(rank_ratio=-1.0), ValueError, "rank_ratio must be in (0, 1], got -1.0"),
    (dict(rank_ratio=2.5), ValueError, "rank_ratio must be in (0, 1], got 2.5"),
    (dict(rank_ratio=float("inf")), ValueError, "rank_ratio must be in (0, 1], got inf"),
    (dict(rank_ratio=float("nan")), ValueError, "rank_ratio must be in (0, 1], got nan"),
    (dict(rank_ratio="0.5"), TypeError, "rank_ratio must be a float in (0, 1], got str ('0.5')"),
    (dict(rank=2, alpha=0), ValueError, "alpha must be a finite number > 0 (the scale is alpha / rank), got 0"),
    (dict(rank=2, alpha=float("nan")), ValueError, "alpha must be a finite number > 0"),
    (dict(rank=2, alpha="8"), TypeError, "alpha must be a number or None, got str ('8')"),
    (dict(rank=2, decomposition="tucker", groups=5, in_ch=5, out_ch=10), ValueError, "groups > 1 is supported"),
    (dict(rank=3, groups=5, in_ch=5, out_ch=10), ValueError, "multiple of groups"),
    (dict(rank=2, padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
    (dict(rank=2, padding_mode="mirror"), ValueError, "padding_mode must be one of"),
    (dict(rank=2, adapter_strategy="fast"), ValueError, "adapter_strategy must be one of"),
    (dict(rank=2, form="sparse"), ValueError, "form must be one of"),
    (dict(rank=2, stride=0), ValueError, "stride must be"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, words):
    in_ch, out_ch = kwargs.pop("in_ch", 5), kwargs.pop("out_ch", 7)
    with pytest.raises(error, match=re.escape(words)):
        LowRankConv2d(in_ch, out_ch, 3, **kwargs)


# (in_channels, out_channels, kernel_size, groups, decomposition, the largest rank, a rank just past it,
#  the message's bound and the value it names)
RANK_LIMITS = [
    # svd: groups · min(out_channels/groups, in_channels/groups · kh · kw)
    (5, 7, 3, 1, "svd", 7, 8, "rank must be in [1, 7]", 8),
    (5, 7, 1, 1, "svd", 5, 6, "rank must be in [1, 5]", 6),
    (6, 9, 3, 3, "svd", 9, 12, "rank must be in [1, 9]", 12),
    # tucker: r_in ≤ in_channels, r_out ≤ out_channels
    (5, 7, 3, 1, "tucker", (5, 7), (6, 7), "r_in (input rank) must be in [1, 5]", 6),
    (5, 7, 3, 1, "tucker", (5, 7), (5, 8), "r_out (output rank) must be in [1, 7]", 8),
    # cp: prod(kernel shape) / max(kernel shape); 7·5·3·3 / 7 = 45, 7·5·1·9 / 9 = 35
    (5, 7, 3, 1, "cp", 45, 46, "rank must be in [1, 45]", 46),
    (5, 7, (1, 9), 1, "cp", 35, 36, "rank must be in [1, 35]", 36),
    # tkd-cpd: r_in ≤ in_channels, r_out ≤ out_channels, R ≤ prod(core shape) / max(core shape), the core
    # (r_out, r_in, kh, kw): 7·5·3·3 / 7 = 45, 2·2·3·3 / 3 = 12
    (5, 7, 3, 1, "tkd-cpd", (5, 1, 7), (6, 1, 7), "r_in (input rank) must be in [1, 5]", 6),
    (5, 7, 3, 1, "tkd-cpd", (5, 1, 7), (5, 1, 8), "r_out (output rank) must be in [1, 7]", 8),
    (5, 7, 3, 1, "tkd-cpd", (5, 45, 7), (5, 46, 7), "cp_rank (CP rank of the core) must be in [1, 45]", 46),
    (5, 7, 3, 1, "tkd-cpd", (2, 12, 2), (2, 13, 2), "cp_rank (CP rank of the core) must be in [1, 12]", 13),
]


@pytest.mark.parametrize("in_ch, out_ch, kernel_size, groups, dec, largest, past, bound, value", RANK_LIMITS,
                         ids=[f"{case[4]} rank {case[6]}" for case in RANK_LIMITS])
def test_each_documented_rank_limit_is_taken_and_one_past_it_refused(in_ch, out_ch, kernel_size, groups, dec,
                                                                    largest, past, bound, value):
    layer = LowRankConv2d(in_ch, out_ch, kernel_size, rank=largest, decomposition=dec, groups=groups)
    assert layer.rank == largest
    with pytest.raises(ValueError, match=rf"^{re.escape(bound)} \(at most .+\), got {value}$"):
        LowRankConv2d(in_ch, out_ch, kernel_size, rank=past, decomposition=dec, groups=groups)


@pytest.mark.parametrize("ratio, error", [(-1, ValueError), (0, ValueError), (2.5, ValueError),
                                          (float("nan"), ValueError), (True, TypeError)])
def test_rank_for_ratio_checks_the_ratio(ratio, error):
    with pytest.raises(error, match="rank_ratio must be"):
        LowRankConv2d(4, 8, 3, rank=2).rank_for_ratio(ratio)


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
@pytest.mark.parametrize("dec", ["svd", "tucker"])
def test_input_on_another_device_or_dtype_is_named(dec, form):
    """torch's convs refuse a dtype or device mismatch and mix meta with real tensors silently; either
    way the layer names the fault."""
    layer = make(dec, form=form)
    with pytest.raises(TypeError, match="input has dtype torch.float32 but the layer's parameters have torch.float64"):
        layer(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match="input is on meta but the layer's parameters are on cpu"):
        layer(torch.empty(2, 5, 8, 8, device="meta", dtype=F64))
    with pytest.raises(ValueError, match="input is on cpu but the layer's parameters are on meta"):
        layer.to("meta")(torch.randn(2, 5, 8, 8, dtype=F64))


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
@pytest.mark.parametrize("dec", ["svd", "tucker", "cp", "tkd-cpd"])
def test_float64_under_autocast_as_nn_conv2d(dec, form):
    """autocast leaves float64 alone, as for nn.Conv2d: a float64 layer and input stay float64 (checked
    against the layer outside autocast); a float32 input beside it is named, with autocast's part in it."""
    layer = make(dec, form=form)
    randomize(layer)
    x = torch.randn(2, 5, 8, 8, dtype=F64)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == F64 and torch.equal(y, expected)
        with pytest.raises(TypeError, match=re.escape(
                "input has dtype torch.float32 but the layer's parameters have torch.float64, and torch.autocast "
                "leaves float64 tensors as they are")):
            layer(x.float())


# torch.func.jvp loads its decompositions through the deprecated torch.jit.script
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if kernel_devices() else []))
@pytest.mark.parametrize("form, strategy", [("lowrank", "auto"), ("full", "auto"), ("adapter", "chain"),
                                            ("adapter", "merged")])
@pytest.mark.parametrize("dec", ["svd", "tucker", "cp", "tkd-cpd"])
def test_torch_func_transforms(monkeypatch, backend, dec, form, strategy):
    """Per-sample gradients (vmap of grad) and jvp in float32 against the float64 layer's plain autograd,
    sample by sample; the Triton merged kernel's custom op has no vmap or jvp rule and is stepped around."""
    monkeypatch.setenv("DYNRANK_BACKEND", backend)
    layer = LowRankConv2d(5, 7, 3, decomposition=dec, rank=RANKS[dec], padding=1, stride=2, form=form,
                          alpha=2.0, adapter_strategy=strategy)
    randomize(layer)
    layer64 = copy.deepcopy(layer).double()
    trainable = {n: p.detach() for n, p in layer.named_parameters() if p.requires_grad}
    x, v = torch.randn(3, 5, 7, 6), torch.randn(3, 5, 7, 6)

    def loss(params, xi):
        return (torch.func.functional_call(layer, params, (xi[None],)) ** 2).sum()

    per_sample = torch.vmap(torch.func.grad(loss), in_dims=(None, 0))(trainable, x)
    for i in range(x.shape[0]):
        layer64.zero_grad(set_to_none=True)
        (layer64(x[i:i + 1].double()) ** 2).sum().backward()
        for name, p in layer64.named_parameters():
            if p.requires_grad:
                assert rel_err(per_sample[name][i], p.grad) < REL_TOL[torch.float32], (name, i)
    _, tangent = torch.func.jvp(layer, (x,), (v,))
    _, tangent64 = torch.func.jvp(layer64, (x.double(),), (v.double(),))
    assert rel_err(tangent, tangent64) < REL_TOL[torch.float32]


def test_a_conv_error_that_is_not_the_inputs_passes_through(monkeypatch):
    layer = make("svd")

    def out_of_memory(layer, x):
        raise RuntimeError("out of memory (simulated)")
    monkeypatch.setattr(layer, "_run", out_of_memory)
    with pytest.raises(RuntimeError, match=r"out of memory \(simulated\)"):
        layer(torch.randn(2, 5, 8, 8, dtype=F64))


def test_bad_forward_and_form_calls():
    layer = make("svd")
    with pytest.raises(ValueError, match=r"input must have shape \(N, 5, H, W\)"):
        layer(torch.randn(2, 4, 8, 8, dtype=F64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        layer([1.0])
    with pytest.raises(RuntimeError, match="deflate applies to full form"):
        layer.deflate()
    with pytest.raises(ValueError, match="rank must be in"):
        layer.inflate().deflate(rank=99)
    with pytest.raises(TypeError, match="needs an nn.Conv2d"):
        LowRankConv2d.from_dense(nn.Linear(3, 3), rank=1)


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_compiles_without_graph_break(form):
    """The forward's error handling (checks after a failed op) traces whole under torch.compile."""
    torch.manual_seed(0)
    layer = make("svd", form=form)
    randomize(layer)
    x = torch.randn(2, 5, 8, 8, dtype=F64)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-12, atol=1e-12)


def test_a_torch_without_is_exporting_reads_as_no_export(monkeypatch):
    """torch 2.4 has neither torch.compiler.is_exporting nor the flag export sets: an adapter layer's
    "auto" strategy asked for it while compiling and failed with AttributeError; it is taken as no export
    (torch.compile itself reads is_exporting in this torch, so the check is made in eager)."""
    from dynrank import conv as conv_module
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True, raising=False)
    assert conv_module._exporting() is True
    monkeypatch.delattr(torch.compiler, "_is_exporting_flag", raising=False)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert conv_module._exporting() is True
    monkeypatch.delattr(torch.compiler, "is_exporting")
    assert conv_module._exporting() is False


@pytest.mark.parametrize("strategy", ["chain", "merged"])
@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
@pytest.mark.parametrize("dec", ["svd", "tucker", "cp", "tkd-cpd"])
def test_all_meta_forward_gives_the_shape(dec, form, strategy):
    """A layer and input all on meta (shape inference, a model built without memory) run every form
    and adapter strategy; the output has the shape a real forward gives."""
    real = make(dec, form=form, adapter_strategy=strategy)
    x = torch.randn(2, 5, 8, 8, dtype=F64)
    y = real.to("meta")(x.to("meta"))
    assert y.device.type == "meta" and y.shape == make(dec, form=form, adapter_strategy=strategy)(x).shape


@pytest.mark.parametrize("form", ["lowrank", "adapter"])
@pytest.mark.parametrize("dec", ["svd", "tucker"])
def test_triton_backend_leaves_meta_layers_to_torch(monkeypatch, dec, form):
    """With DYNRANK_BACKEND=triton, inflate() of a meta layer raised "the Triton backend runs on CUDA or
    (interpreted) CPU tensors, got meta": meta tensors hold no data, so torch's ops give the shapes."""
    from dynrank import _backend
    monkeypatch.setattr(_backend, "_triton_available", lambda: True)
    monkeypatch.setenv("DYNRANK_BACKEND", "triton")
    layer = make(dec, form=form, adapter_strategy="merged").float().to("meta")   # float32: the kernels take it
    y = layer(torch.empty(2, 5, 8, 8, device="meta"))
    assert y.is_meta and y.shape == (2, 7, 8, 8)
    layer.inflate()
    assert layer.form == "full" and layer.weight.is_meta and layer.weight.shape == (7, 5, 3, 3)


def test_merged_adapter_builds_its_kernel_in_the_parameters_dtype_under_autocast(monkeypatch):
    """Under bf16 autocast the merged strategy forms W_f + ΔW in fp32 and only the conv runs in bf16."""
    from dynrank import conv_adapter

    built = []
    merged_kernel = conv_adapter.merged_kernel
    monkeypatch.setattr(conv_adapter, "merged_kernel", lambda *args: built.append(merged_kernel(*args)) or built[-1])
    layer = LowRankConv2d(5, 7, 3, padding=1, rank=2, form="adapter", adapter_strategy="merged")
    randomize(layer)
    x = torch.randn(2, 5, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert [k.dtype for k in built] == [torch.float32] and y.dtype == torch.bfloat16
    # Formed at fp32 precision (bf16 products would be off by about 1e-2), against float64.
    layer64 = copy.deepcopy(layer).double()
    factors = {n: f.detach() for n, f in layer64.factors().items()}
    exact = layer64.weight.detach() + reference_kernel(layer64.decomposition, factors, layer64.scale)
    assert rel_err(built[0], exact) < REL_TOL[torch.float32]
    # The same layer in float64 without autocast (checked against nn.Conv2d by the tests above).
    ref = layer64(x.double())
    assert rel_err(y, ref) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_merge_operands_of_16_bit_factors_are_formed_in_fp32(dec, dtype, monkeypatch):
    """U and V of 16-bit factors are formed in fp32 (16-bit products of tucker, cp and tkd-cpd factors are
    off by about 1e-3), so the merged adapter's kernel W_f + s·U·V is rounded to 16 bits once."""
    from dynrank import conv_adapter

    layer = LowRankConv2d(5, 7, 3, rank=RANKS[dec], decomposition=dec, padding=1, form="adapter", alpha=3.0,
                          adapter_strategy="merged", dtype=dtype)
    randomize(layer)
    factors = layer.factors()
    U, V = layer._dec.operands(factors)
    U64, V64 = layer._dec.operands({n: p.detach().double() for n, p in factors.items()})
    assert U.dtype == V.dtype == torch.float32
    assert rel_err(U, U64) < REL_TOL[torch.float32] and rel_err(V, V64) < REL_TOL[torch.float32]
    if dtype != torch.bfloat16:
        return
    built = []
    merged_kernel = conv_adapter.merged_kernel
    monkeypatch.setattr(conv_adapter, "merged_kernel", lambda *args: built.append(merged_kernel(*args)) or built[-1])
    x = torch.randn(2, 5, 8, 8, dtype=dtype)
    y = layer(x)
    layer64 = copy.deepcopy(layer).double()
    exact = layer64.weight.detach() + reference_kernel(dec, {n: p.detach() for n, p in layer64.factors().items()},
                                                       layer64.scale)
    # Rounded once: the float64 kernel rounded to bf16, but for entries within fp32 precision of a rounding
    # boundary (bf16 operands put it about 2e-3 off that).
    assert [k.dtype for k in built] == [dtype]
    assert rel_err(built[0], exact.to(dtype)) < 1e-3
    assert rel_err(y, layer64(x.double())) < REL_TOL[dtype]


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("form", ["lowrank", "adapter", "full"])
@pytest.mark.parametrize("dec", ["svd", "tucker"])
def test_torch_export_with_a_dynamic_batch(dec, form, strict):
    """In adapter form "auto" compared the strategies' costs at the symbolic batch: a guard that torch.export
    refuses on a dynamic dim (Constraints violated), strict (dynamo) or not."""
    torch.manual_seed(0)
    layer = LowRankConv2d(4, 6, 3, rank=2 if dec == "svd" else (2, 3), decomposition=dec, padding=1, form=form)
    if form == "adapter":
        with torch.no_grad():
            for p in layer.factors().values():
                p.normal_()
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(layer, (torch.randn(3, 4, 5, 5),), dynamic_shapes=({0: batch},), strict=strict)
    x = torch.randn(7, 4, 5, 5, dtype=torch.float64)
    factors = {n: p.detach().double() for n, p in layer.factors().items()}
    kernel = reference_kernel(dec, factors, layer.scale) if factors else 0.0
    if layer.weight is not None:
        kernel = kernel + layer.weight.detach().double()
    expected = torch.nn.functional.conv2d(x, kernel, layer.bias.detach().double(), padding=1)
    assert rel_err(program.module()(x.float()), expected) < REL_TOL[torch.float32]


@pytest.mark.parametrize("decomposition, rank, r_last", [("svd", 4, 4), ("tucker", (3, 5), 5), ("cp", 4, 4),
                                                          ("tkd-cpd", (3, 6, 5), 5)])
@pytest.mark.parametrize("form", ["lowrank", "adapter"])
def test_scale_is_alpha_over_the_rank_entering_the_output_conv(decomposition, rank, r_last, form):
    """s = alpha / r_last, as documented; the other conv tests take their reference's scale from the layer
    itself, so a wrong one passed them.  The factorized term of a layer with alpha is alpha / r_last times
    that of the same factors without it (float64)."""
    torch.manual_seed(0)
    scaled = LowRankConv2d(6, 8, 3, rank=rank, decomposition=decomposition, padding=1, form=form, alpha=6.0,
                           dtype=torch.float64)
    plain = LowRankConv2d(6, 8, 3, rank=rank, decomposition=decomposition, padding=1, form=form,
                          dtype=torch.float64)
    for name, t in scaled.factors().items():            # adapters start at zero output: fill them all
        t.data.normal_()
    plain.load_state_dict(scaled.state_dict())
    assert scaled.scale == 6.0 / r_last and plain.scale == 1.0
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    base = torch.nn.functional.conv2d(x, scaled.weight, scaled.bias, padding=1) if form == "adapter" \
        else scaled.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(scaled(x) - base, 6.0 / r_last * (plain(x) - base), rtol=1e-12, atol=1e-12)


def test_merge_conv_checks_its_operands_on_the_torch_engine(monkeypatch):
    """The torch bmm took anything: an expanded kernel got the sum of every row's update, integer factors
    were truncated, a NaN alpha merged in, a groups of 0 or 3 gave ZeroDivisionError or a reshape error.
    The kernel is left as it was."""
    from dynrank.conv_merging import merge_conv_
    monkeypatch.setenv("DYNRANK_BACKEND", "torch")
    U, V = torch.randn(8, 2), torch.randn(2, 3, 3, 3)
    expanded = torch.zeros(1, 3, 3, 3).expand(8, 3, 3, 3)
    with pytest.raises(ValueError, match=r"merge_conv_ writes weight in place, so its elements must not share "
                                         r"memory"):
        merge_conv_(expanded, U, V, 1.0, 1)
    assert not expanded.any()
    W = torch.zeros(8, 3, 3, 3)
    cases = [((W.long(), U, V, 1.0, 1), TypeError, "floating-point tensors, got weight of dtype torch.int64"),
             ((W, U.long(), V, 1.0, 1), TypeError, "got U of dtype torch.int64"),
             ((W, U, V, float("nan"), 1), ValueError, "alpha must be finite, got nan"),
             ((W, U, V, 1.0, 0), ValueError, "groups must be"),
             ((W, U, V, 1.0, 3), ValueError, r"for weight \(8, 3, 3, 3\) and groups=3, U must have shape"),
             ((W, U, V[:, :2], 1.0, 1), ValueError, r"V \(1·q, 3, 3, 3\)"),
             ((W[0], U, V, 1.0, 1), ValueError, "merge_conv_ takes weight")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            merge_conv_(*args)
    assert not W.any()
    merge_conv_(W, U, V, 0.5, 1)          # and a good one merges
    torch.testing.assert_close(W, 0.5 * (U @ V.reshape(2, -1)).reshape(8, 3, 3, 3))


@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_form_changes_and_unconvert_under_autocast_keep_float32(dec):
    """inflate, deflate(init="svd") and unconvert_model made inside a bf16 autocast region compute the
    float32 kernel at float32 precision (Tucker's einsum and TKD-CPD's matmuls ran in bf16: 3e-3 off),
    against the float64 merge."""
    from dynrank import unconvert_model
    torch.manual_seed(0)
    layer = LowRankConv2d(8, 12, 3, padding=1, rank=RANKS[dec], decomposition=dec, form="adapter")
    randomize(layer)
    layer64 = copy.deepcopy(layer).double()
    factors = {n: f.detach() for n, f in layer64.factors().items()}
    exact = layer64.weight.detach() + reference_kernel(dec, factors, layer64.scale)
    exported = nn.Sequential(copy.deepcopy(layer))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.inflate()
        unconvert_model(exported)
    assert layer.weight.dtype == exported[0].weight.dtype == torch.float32
    assert rel_err(layer.weight, exact) < REL_TOL[torch.float32]
    assert rel_err(exported[0].weight, exact) < REL_TOL[torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.deflate(init="svd")
    kept = layer.weight.detach().double() + reference_kernel(
        dec, {n: f.detach().double() for n, f in layer.factors().items()}, layer.scale)
    assert rel_err(kept, exact) < REL_TOL[torch.float32]


@pytest.mark.parametrize("dec", DECOMPOSITIONS)
@pytest.mark.parametrize("geometry, size", [
    (dict(), (2, 2)), (dict(), (5, 2)), (dict(dilation=2, padding=1), (2, 6)),
    (dict(dilation=2, padding=1, padding_mode="replicate"), (1, 1)), (dict(padding=1, padding_mode="reflect"), (5, 1)),
    (dict(padding="same"), (0, 6)), (dict(padding="same"), (0, 0, 6)), (dict(padding="same", dilation=(1, 2)), (5, 0)),
    (dict(padding=(2, 0)), (0, 0, 0)), (dict(padding=2), (0, 6)), (dict(padding=(2, 0)), (0, 6)),
    (dict(padding="same", stride=2), (0, 6)),
], ids=["small", "narrow", "dilated", "replicate", "reflect-pad-refused", "same-no-rows", "same-no-rows-empty-batch",
        "same-dilated-no-columns", "no-columns-unpadded-empty-batch", "no-rows-in-a-batch",
        "no-rows-padded-in-a-batch", "same-beside-a-stride"])
def test_an_input_smaller_than_the_kernel_is_named_as_nn_conv2d_names_it(dec, geometry, size):
    """cp and tkd-cpd named a factor's (3 x 1) kernel and an intermediate size; every decomposition but svd
    named a factor's (1 x 1) kernel for an input with no rows or columns, and a "same" padding's size went
    unchecked.  ``size`` is (H, W), or (N, H, W) (N = 1 otherwise)."""
    geometry = dict(geometry)
    stride = geometry.pop("stride", 1)                    # "same" beside a stride: edited in after construction
    conv = nn.Conv2d(4, 6, 3, **geometry)
    layer = LowRankConv2d(4, 6, 3, rank=RANKS[dec], decomposition=dec, **geometry)
    conv.stride, layer.stride = (stride, stride), stride
    n, h, w = (1, *size) if len(size) == 2 else size
    x = torch.randn(n, 4, h, w)
    with pytest.raises(RuntimeError) as expected:
        conv(x)
    with pytest.raises(RuntimeError) as got:
        layer(x)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("form, strategy", [("lowrank", "auto"), ("adapter", "chain"), ("adapter", "merged"),
                                            ("full", "auto")])
@pytest.mark.parametrize("dec", DECOMPOSITIONS)
@pytest.mark.parametrize("geometry, size", [
    (dict(padding=2), (0, 0)), (dict(padding=(2, 0)), (0, 6)), (dict(padding=(0, 2)), (5, 0)),
    (dict(padding=3, dilation=2, stride=2), (0, 0)),
], ids=["no-pixels", "no-rows", "no-columns", "dilated-strided"])
def test_an_empty_batch_with_no_rows_or_columns_runs_as_nn_conv2d_runs_it(dec, form, strategy, geometry, size):
    """tucker, cp and tkd-cpd ran their leading 1×1 conv on the unpadded input, which torch refuses with no
    rows or columns ("padded input size (0 x 0). Kernel size: (1 x 1)"), where nn.Conv2d pads it and returns
    an empty batch.  The output, the input's and bias's gradients equal nn.Conv2d's, and the factors get a
    zero gradient, as nn.Conv2d's kernel does."""
    layer = LowRankConv2d(5, 7, 3, rank=RANKS[dec], decomposition=dec, form=form, adapter_strategy=strategy,
                          dtype=F64, **geometry)
    randomize(layer)
    conv = reference_conv(layer)
    x = torch.randn(0, 5, *size, dtype=F64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), conv(x_ref)
    assert y.shape == y_ref.shape and y_ref.shape[-2:] != (0, 0)
    y.sum().backward()
    y_ref.sum().backward()
    assert x.grad.shape == x_ref.grad.shape
    assert torch.equal(layer.bias.grad, conv.bias.grad)
    trained = [p for p in layer.parameters() if p.requires_grad and p is not layer.bias]
    assert trained and all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in trained)
    assert torch.equal(conv.weight.grad, torch.zeros_like(conv.weight))


@pytest.mark.parametrize("dec", DECOMPOSITIONS)
def test_scale_for_checks_the_rank_as_the_constructor_does(dec):
    """scale_for(0) divided by zero, and a negative or fractional rank gave a scale."""
    layer = LowRankConv2d(8, 8, 3, rank=RANKS[dec], decomposition=dec, alpha=4.0)
    inner = RANKS[dec] if isinstance(RANKS[dec], int) else RANKS[dec][-1]
    assert layer.scale_for(RANKS[dec]) == layer.scale == 4.0 / inner
    for bad, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError), (None, TypeError)):
        with pytest.raises(error, match="must be"):
            layer.scale_for(bad)


def test_an_alpha_past_float32s_range_is_refused_where_float32_applies_it():
    """alpha = 1e300 passed every check, and failed inside torch (or gave inf) at the first forward or merge."""
    from dynrank.conv_merging import merge_conv_
    with pytest.raises(ValueError, match="alpha must be at most 3.40282e"):
        LowRankConv2d(2, 4, 3, rank=2, alpha=1e300)
    assert LowRankConv2d(2, 4, 3, rank=2, alpha=1e300, dtype=F64).alpha == 1e300
    W, U, V = torch.zeros(4, 2, 3, 3), torch.randn(4, 2), torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="alpha must be at most 3.40282e"):
        merge_conv_(W, U, V, 1e300, 1)
    assert not W.any()
    W64 = W.double()
    merge_conv_(W64, U.double(), V.double(), 1e-300, 1)           # float64 takes any finite alpha
    assert rel_err(W64, 1e-300 * torch.einsum("fq,qchw->fchw", U.double(), V.double())) < TOL


def test_auto_adapter_on_cuda_takes_the_cost_model_inside_torch_func(monkeypatch):
    """On CUDA "auto" timed a new input key with autograd on detached copies, which a torch.func transform
    refuses (requires_grad_ inside vmap): per-sample gradients of the default layer failed at their first
    call.  CUDA is stood in for (the two things the choice reads); inside the transform the cost model
    decides, and the per-sample gradients equal the merged strategy's."""
    from torch.func import functional_call, grad, vmap

    from dynrank import conv as conv_module
    timed = []
    monkeypatch.setattr(conv_module, "_time_strategies", lambda layer, x, repeats=3: timed.append(x.shape) or
                        {"chain": 1.0, "merged": 2.0})
    layer = LowRankConv2d(3, 4, 3, padding=1, rank=2, form="adapter", dtype=F64)
    randomize(layer)
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    x = torch.randn(5, 3, 6, 6, dtype=F64)

    def per_sample(p, xi):
        return functional_call(layer, p, (xi[None],)).square().sum()

    reference = copy.deepcopy(layer)
    reference.adapter_strategy = "merged"
    expected = vmap(grad(lambda p, xi: functional_call(reference, p, (xi[None],)).square().sum()),
                    in_dims=(None, 0))(params, x)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    got = vmap(grad(per_sample), in_dims=(None, 0))(params, x)
    assert timed == [] and layer.adapter_choices[next(iter(layer.adapter_choices))].method == "cost model"
    for name in expected:
        assert rel_err(got[name], expected[name]) < TOL, name
    layer(x)                                                       # eager: timed, as before
    assert timed == [x.shape]


def test_time_adapter_strategies_pads_as_the_layer_pads_and_checks_its_arguments(monkeypatch):
    """With padding_mode="reflect" the strategies were timed on the unpadded input (4x4 outputs for the
    layer's 6x6; a 2x2 input the layer takes raised the kernel-size error); repeats=0 gave inf.  Each
    strategy runs on the input padded as the forward pads it (an unbatched one given a batch of 1)."""
    from torch.nn import functional as F
    layer = LowRankConv2d(3, 4, 3, padding=1, padding_mode="reflect", rank=2, form="adapter")
    shapes = ((2, 3, 6, 6), (1, 3, 2, 2), (3, 2, 2))
    clock = FakeStrategyClock(monkeypatch, {"chain": [1.0, 3.0] * len(shapes), "merged": [1.0, 2.0] * len(shapes)})
    for shape in shapes:
        clock.steps.clear()
        x = torch.randn(*shape)
        assert time_adapter_strategies(layer, x, repeats=1) == {"chain": 3.0, "merged": 2.0}
        padded = F.pad(x.reshape(-1, *x.shape[-3:]), (1, 1, 1, 1), mode="reflect")
        assert [name for name, _ in clock.steps] == ["chain", "chain", "merged", "merged"]
        assert all(seen.shape == padded.shape and torch.equal(seen, padded) for _, seen in clock.steps), shape
    with pytest.raises(ValueError, match="repeats must be an int >= 1, got 0"):
        time_adapter_strategies(layer, torch.randn(1, 3, 4, 4), repeats=0)
    with pytest.raises(ValueError, match="input must have 3 channels"):
        time_adapter_strategies(layer, torch.randn(1, 5, 4, 4))


# -- a dense conv whose padding was edited in place --------------------------------------

def _edited_conv(in_ch, out_ch, mode, kernel=3, padding=1, to=((2, 2), (2, 2))):
    """nn.Conv2d as segmentation code's _nostride_dilate leaves it: padding and dilation set after it was built.
    A padding mode other than zeros goes on padding by the amounts it was built with."""
    torch.manual_seed(0)
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=padding, padding_mode=mode, dtype=F64)
    conv.padding, conv.dilation = to
    return conv


@pytest.mark.parametrize("form", ["full", "adapter", "lowrank"])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_from_dense_and_convert_model_of_an_edited_padding_compute_what_the_conv_did(mode, form):
    """With a mode other than zeros, from_dense and convert_model took the edited conv.padding (2, 2), while
    the conv pads by the (1, 1) it was built with: 9x9 outputs for its 7x7."""
    import dynrank
    conv = _edited_conv(4, 6, mode)
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    expected = conv(x)
    layer = LowRankConv2d.from_dense(conv, rank=6, form=form)     # svd at full rank: the kernel itself
    assert rel_err(layer(x), expected) < TOL
    model = nn.Sequential(_edited_conv(16, 16, mode))
    expected = model(x.repeat(1, 4, 1, 1))
    dynrank.convert_model(model, rank_ratio=1.0, form=form)
    assert rel_err(model(x.repeat(1, 4, 1, 1)), expected) < TOL
    model = nn.Sequential(_edited_conv(16, 16, mode))
    dynrank.convert_model(model, rank_ratio=1.0, form=form, init="fresh")
    assert model(x.repeat(1, 4, 1, 1)).shape == expected.shape
    assert model[0].padding == ((2, 2) if mode == "zeros" else (1, 1))


def test_from_dense_of_an_edited_same_padding_takes_the_amounts_the_conv_pads_by():
    """A "same" reflect conv whose dilation is edited pads by the amounts of its old dilation; amounts that
    differ between a dimension's sides (an even kernel's) cannot be held as a padding and are refused."""
    conv = _edited_conv(4, 6, "reflect", padding="same", to=("same", (2, 2)))
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    layer = LowRankConv2d.from_dense(conv, rank=6, form="full")
    assert layer.padding == (1, 1) and layer(x).shape == (2, 6, 7, 7)
    assert rel_err(layer(x), conv(x)) < TOL
    unedited = _edited_conv(4, 6, "reflect", kernel=2, padding="same", to=("same", (1, 1)))
    assert LowRankConv2d.from_dense(unedited, rank=6, form="full").padding == "same"
    conv = _edited_conv(4, 6, "reflect", kernel=2, padding="same", to=("same", (2, 2)))
    with pytest.raises(ValueError, match=re.escape("padding_mode='reflect' pads by (0, 1, 0, 1) (left, right, top, "
                                                   "bottom; set when it was built), not by its padding='same'")):
        LowRankConv2d.from_dense(conv, rank=6, form="full")


def test_from_dense_of_a_same_padded_conv_given_a_stride_takes_the_amounts_it_pads_by():
    """A "same" reflect conv whose stride is edited to 2 pads by the amounts fixed when it was built, and
    never reads its padding: from_dense refused it ("padding='same' needs stride 1"); it takes the amounts."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect").double()
    conv.stride = (2, 2)
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    layer = LowRankConv2d.from_dense(conv, rank=6, form="full")
    assert layer.padding == (1, 1) and layer.stride == (2, 2)
    assert layer(x).shape == conv(x).shape == (2, 6, 5, 5) and rel_err(layer(x), conv(x)) < TOL


@pytest.mark.parametrize("form", ["full", "adapter", "lowrank"])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_from_dense_of_an_edited_padding_keeps_the_height_and_width_amounts_apart(mode, form):
    """A conv built with padding (1, 2), then edited to padding (0, 0), goes on padding the height by 1 and
    the width by 2: taken as (2, 1), an 8x9 input gave 10x9 outputs for the conv's 8x11."""
    conv = _edited_conv(3, 4, mode, padding=(1, 2), to=((0, 0), (1, 1)))
    x = torch.randn(2, 3, 8, 9, dtype=F64)
    expected = conv(x)
    layer = LowRankConv2d.from_dense(conv, rank=4, form=form)     # svd at full rank: the kernel itself
    assert layer.padding == (1, 2)
    assert layer(x).shape == expected.shape == (2, 4, 8, 11)
    assert rel_err(layer(x), expected) < TOL


# -- channels-last through form changes when every factor is 1×1 or one channel deep ----------

@pytest.mark.parametrize("dec, rank", [("tucker", (1, 4)), ("cp", 4), ("tkd-cpd", (1, 2, 3)), ("tkd-cpd", 2)])
def test_a_channels_last_layer_whose_factors_show_no_layout_stays_channels_last(dec, rank):
    """Tucker with r_in = 1 (core (r_out, 1, kh, kw), B and A 1×1), cp and tkd-cpd have factors contiguous in
    both layouts: inflate() and unconvert_model(lowrank="dense") gave a row-major W."""
    import dynrank
    from dynrank._forms import _is_channels_last
    cl = torch.channels_last
    x = torch.randn(2, 8, 7, 7, dtype=F64)
    for moved in (True, False):
        torch.manual_seed(0)
        layer = LowRankConv2d(8, 8, 3, rank=rank, decomposition=dec, padding=1, dtype=F64)
        randomize(layer)
        if moved:
            layer.to(memory_format=cl)
        assert all(p.is_contiguous() and p.is_contiguous(memory_format=cl) for p in layer.factors().values())
        model = nn.Sequential(copy.deepcopy(layer))
        expected = reference_conv(layer)._conv_forward(x, reference_kernel(dec, layer.factors(), layer.scale),
                                                       layer.bias)
        assert rel_err(layer(x), expected) < TOL
        layer.inflate()
        assert layer.weight.is_contiguous(memory_format=cl if moved else torch.contiguous_format)
        assert _is_channels_last(layer.weight) == moved
        assert rel_err(layer(x), expected) < TOL
        layer.deflate(rank=rank, init="svd").inflate()       # and through an adapter back to full
        assert _is_channels_last(layer.weight) == moved and rel_err(layer(x), expected) < TOL
        dynrank.unconvert_model(model, lowrank="dense")
        assert type(model[0]) is nn.Conv2d and _is_channels_last(model[0].weight) == moved
        assert rel_err(model(x), expected) < TOL


# -- the adapter cost model's arguments ---------------------------------------------------------

def test_adapter_cost_functions_name_a_layer_or_input_of_the_wrong_type():
    """A numpy input, an adapter FusedLowRankLinear or a plain nn.Conv2d gave an AttributeError."""
    from dynrank import FusedLowRankLinear
    from dynrank.conv import adapter_work
    layer = LowRankConv2d(4, 6, 3, rank=2, form="adapter")
    x = torch.randn(1, 4, 5, 5)
    for fn in (adapter_costs, adapter_work, time_adapter_strategies):
        with pytest.raises(TypeError, match=r"^input must be a torch\.Tensor, got ndarray$"):
            fn(layer, x.numpy())
        for other in (FusedLowRankLinear(4, 6, 2, form="adapter"), nn.Conv2d(4, 6, 3)):
            with pytest.raises(TypeError, match=rf"^{fn.__name__} needs a LowRankConv2d in adapter form, got "
                                                rf"{type(other).__name__}$"):
                fn(other, x)
    assert set(adapter_costs(layer, x)) == {"chain", "merged"}


# -- a rank of the wrong type for a tuple-rank decomposition --------------------------------------

@pytest.mark.parametrize("dec, rank, expected", [
    ("tucker", np.array([2, 3]), "an int or a tuple/list of 2 ints (r_in, r_out), got ndarray"),
    ("tucker", torch.tensor([2, 3]), "an int or a tuple/list of 2 ints (r_in, r_out), got Tensor"),
    ("tucker", "3", "an int or a tuple/list of 2 ints (r_in, r_out), got str ('3')"),
    ("tkd-cpd", {2, 3, 4}, "an int or a tuple/list of 3 ints (r_in, cp_rank, r_out), got set"),
])
def test_a_tuple_rank_decomposition_names_the_tuple_in_its_type_error(dec, rank, expected):
    """The message said "rank must be an int", hiding that a tuple or list is taken.  An array or a tensor is
    refused, as for every whole-number argument; its tolist() is taken."""
    with pytest.raises(TypeError, match=re.escape(f"rank for decomposition={dec!r} must be {expected}")):
        LowRankConv2d(4, 6, 3, rank=rank, decomposition=dec)
    if not isinstance(rank, (set, str)):
        assert LowRankConv2d(4, 6, 3, rank=rank.tolist(), decomposition=dec).rank == (2, 3)

