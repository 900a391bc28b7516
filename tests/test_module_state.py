"""The layers as ordinary nn.Modules whose state users move, copy, save and load.

Deferred init (meta, ``to_empty``, ``reset_parameters``), dtype and memory-format casts, freezing,
state dicts (``strict=False``, ``assign=True``, ``keep_vars=True``, a dict of another form that lacks a
tensor or holds one torch cannot copy, a layer with a reparametrized factor), repr, deepcopy and pickling, and the input layouts
``nn.Linear``/``nn.Conv2d`` accept (0 tokens, 1-D, 4-D, non-contiguous, stride-0), each in every form
against a float64 reference.
"""

import copy
import io
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize, prune
from torch.nn.utils import spectral_norm as hook_spectral_norm
from torch.nn.utils import weight_norm as hook_weight_norm
from torch.nn.utils.parametrizations import spectral_norm

from _helpers import REL_TOL, kernel_devices, rel_err
from _scheduling import held, mlp, trainable
from dynrank import FusedLowRankLinear
from dynrank.conv import LowRankConv2d
from dynrank.kernels.conv_merge import reference_kernel
from dynrank.scheduler import DynamicRankScheduler

FORMS = ["lowrank", "full", "adapter"]
BACKENDS = ["torch"] + (["triton"] if kernel_devices() else [])
F32 = REL_TOL[torch.float32]
# (decomposition, rank, adapter strategy): a couple of each.
CONVS = [("svd", 2, "merged"), ("tucker", (2, 3), "chain"), ("cp", 3, "merged"), ("tkd-cpd", (2, 3, 2), "chain")]


@pytest.fixture(params=BACKENDS)
def device(request, monkeypatch):
    """Each engine on its device: torch on CPU; Triton on CUDA where present, else interpreted on CPU."""
    monkeypatch.setenv("DYNRANK_BACKEND", request.param)
    device = "cpu" if request.param == "torch" else kernel_devices()[0]
    if device == "cuda":   # float32 convs at full precision, as the float32 tolerance is stated for
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return device


def linear(form="lowrank", **kw):
    return FusedLowRankLinear(17, 23, rank=4, form=form, alpha=3.0, **kw)


def conv(dec="tucker", form="lowrank", **kw):
    rank, strategy = next((r, s) for d, r, s in CONVS if d == dec)
    kw.setdefault("adapter_strategy", strategy)
    return LowRankConv2d(5, 7, 3, rank=rank, decomposition=dec, stride=2, padding=1, form=form, alpha=2.0, **kw)


def randomize(layer):
    """Non-zero factors (an adapter starts with a zero one), so every term of the output counts."""
    with torch.no_grad():
        for p in layer.factors().values():
            p.normal_(0.0, 0.5)
    return layer


def effective(layer, params):
    """The layer's dense weight from float64 ``params`` (name → tensor), differentiably."""
    dense = params.get("weight")
    if layer.form == "full":
        return dense
    factors = {n: params[n] for n in layer.factors()}
    if isinstance(layer, FusedLowRankLinear):
        delta = layer.scale * factors["A"] @ factors["B"].t()
    else:
        delta = reference_kernel(layer.decomposition, factors, layer.scale, layer.groups)
    return delta if dense is None else dense + delta


def reference(layer, x):
    """float64 output of nn.Linear / nn.Conv2d with the layer's effective weight, and its leaves."""
    params = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    weight, bias = effective(layer, params), params.get("bias")
    if isinstance(layer, FusedLowRankLinear):
        y = F.linear(x64, weight, bias)
    else:
        y = F.conv2d(x64, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return y, x64, params


def check_forward_and_gradients(layer, x, tol=F32):
    """Output, input gradient and every trainable parameter's gradient against float64 autograd;
    a frozen parameter gets no gradient."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().as_strided(x.shape, x.stride()).requires_grad_()   # the same layout, a leaf
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, x64, params = reference(layer, x)
    y64.backward(dy.double())
    assert y.shape == y64.shape and y.dtype == x.dtype
    assert rel_err(y, y64) < tol
    assert rel_err(x.grad, x64.grad) < tol
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.shape == p.shape, name
            assert rel_err(p.grad, params[name].grad) < tol, name
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    return y


def state(layer):
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def assert_same_state(layer, expected):
    got = layer.state_dict()
    assert list(got) == list(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and got[k].device == v.device and torch.equal(got[k], v), k


def change_form(layer):
    """One form change from wherever the layer is: lowrank/adapter → full, full → adapter."""
    return layer.deflate(init="svd") if layer.form == "full" else layer.inflate()


def all_forms():
    return ([pytest.param(linear, form, id=f"linear-{form}") for form in FORMS]
            + [pytest.param(lambda form, dec=dec, **kw: conv(dec, form, **kw), form, id=f"{dec}-{form}")
               for dec, _, _ in CONVS for form in FORMS])


def input_for(layer, *lead, device="cpu"):
    if isinstance(layer, FusedLowRankLinear):
        return torch.randn(*lead, 17, device=device)
    return torch.randn(*lead, 5, 9, 8, device=device)


# -- deferred init: meta, to_empty, reset_parameters ------------------------------------------

@pytest.mark.parametrize("build, form", all_forms())
@pytest.mark.parametrize("how", ["context", "kwarg"])
def test_meta_then_to_empty_and_reset_parameters_is_the_eager_layer(build, form, how):
    """Built on meta (under ``torch.device`` or with ``device=``), ``to_empty`` then ``reset_parameters``
    gives the very layer an eager build draws from the same seed; the forms then work as usual."""
    torch.manual_seed(5)
    eager = build(form)
    if how == "context":
        with torch.device("meta"):
            layer = build(form)
    else:
        layer = build(form, device="meta")
    assert all(p.is_meta for p in layer.parameters())
    layer.to_empty(device="cpu")
    params = dict(layer.named_parameters())
    torch.manual_seed(5)
    layer.reset_parameters()
    assert dict(layer.named_parameters()) == params, "reset_parameters works in place"
    assert_same_state(layer, state(eager))
    assert [p.requires_grad for p in layer.parameters()] == [p.requires_grad for p in eager.parameters()]
    randomize(layer)
    x = input_for(layer, 3)
    y = check_forward_and_gradients(layer, x)
    change_form(layer)
    assert rel_err(layer(x), y.detach()) < F32


@pytest.mark.parametrize("build, form", all_forms())
def test_reset_parameters_redraws_in_place_and_keeps_what_is_frozen(build, form):
    layer = build(form, dtype=torch.float64)
    (layer.bias if form == "full" else next(iter(layer.factors().values()))).requires_grad_(False)
    before, flags, params = state(layer), [p.requires_grad for p in layer.parameters()], list(layer.parameters())
    torch.manual_seed(9)
    layer.reset_parameters()
    assert list(layer.parameters()) == params and [p.requires_grad for p in layer.parameters()] == flags
    zeroed = {"adapter": "A" if isinstance(layer, FusedLowRankLinear) else layer._dec.zero_factor}.get(form)
    assert all(not torch.equal(v, before[k]) for k, v in layer.state_dict().items() if k != zeroed)
    assert all(v.dtype == torch.float64 for v in layer.state_dict().values())
    torch.manual_seed(9)
    fresh = build(form, dtype=torch.float64)
    assert_same_state(layer, state(fresh))


# -- dtype and memory-format casts -----------------------------------------------------------

@pytest.mark.parametrize("cast, dtype", [("half", torch.float16), ("bfloat16", torch.bfloat16),
                                         ("double", torch.float64), ("to", torch.float16)])
@pytest.mark.parametrize("build, form", all_forms()[:6])      # linear and svd conv
def test_casts_match_float64_and_survive_form_changes(device, build, form, cast, dtype):
    layer = randomize(build(form, device=device))
    if cast == "to":
        layer.to(dtype)
    else:
        getattr(layer, cast)()
    assert all(p.dtype == dtype for p in layer.parameters())
    x = input_for(layer, 3, device=device).to(dtype)
    y = check_forward_and_gradients(layer, x, REL_TOL[dtype])
    change_form(layer)
    assert all(p.dtype == dtype for p in layer.parameters())
    assert rel_err(layer(x), y.detach()) < 2 * REL_TOL[dtype]
    if layer.form == "full":
        change_form(layer)                   # on to adapter form
    randomize(layer)
    assert all(p.dtype == dtype for p in layer.parameters())
    check_forward_and_gradients(layer, x, REL_TOL[dtype])


@pytest.mark.parametrize("dec", [d for d, _, _ in CONVS])
@pytest.mark.parametrize("form", FORMS)
def test_channels_last_conv_matches_float64_in_every_form(dec, form):
    layer = randomize(conv(dec, form)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 5, 9, 8).to(memory_format=torch.channels_last)
    y = check_forward_and_gradients(layer, x)
    change_form(layer)
    assert rel_err(layer(x), y.detach()) < F32
    if layer.form == "full":
        change_form(randomize(layer))
    check_forward_and_gradients(randomize(layer), x)


def _laid_out(layer, memory_format):
    return {n: p.is_contiguous(memory_format=memory_format) for n, p in layer.named_parameters() if p.dim() == 4}


@pytest.mark.parametrize("dec", [d for d, _, _ in CONVS])
@pytest.mark.parametrize("form", FORMS)
def test_form_changes_keep_a_channels_last_layer_channels_last(dec, form):
    """The W and the factors a form change creates take the layer's layout (a CP or TKD-CPD layer in
    lowrank form too, whose kernels are all 1 wide or 1 channel deep: its strides tell the layout)."""
    layer = randomize(conv(dec, form)).to(memory_format=torch.channels_last)
    assert layer._memory_format() is torch.channels_last
    for _ in range(3):
        told = layer._memory_format() is torch.channels_last
        x = torch.randn(2, 5, 9, 8).to(memory_format=torch.channels_last)
        y = layer(x).detach()
        change_form(layer)
        assert rel_err(layer(x), y) < F32
        if told:
            assert all(_laid_out(layer, torch.channels_last).values()), _laid_out(layer, torch.channels_last)
            assert layer._memory_format() is torch.channels_last
    plain = conv(dec, form)
    for _ in range(3):
        change_form(plain)
        assert all(_laid_out(plain, torch.contiguous_format).values())


# -- a frozen layer stays frozen ------------------------------------------------------------

@pytest.mark.parametrize("build, form", all_forms())
def test_a_frozen_layer_stays_frozen_through_form_changes(build, form):
    layer = randomize(build(form, dtype=torch.float64))
    layer.requires_grad_(False)
    x = input_for(layer, 2).double()
    y = layer(x)
    for _ in range(3):                       # e.g. lowrank → full → adapter → full
        change_form(layer)
        assert [n for n, p in layer.named_parameters() if p.requires_grad] == [], layer.form
        assert rel_err(layer(x), y) < REL_TOL[torch.float64] * 10
    layer.requires_grad_(True)
    change_form(layer)
    expected = {"full": ["weight"], "adapter": list(layer.factors())}[layer.form]
    assert [n for n, p in layer.named_parameters() if p.requires_grad and n != "bias"] == expected


@pytest.mark.parametrize("build", [linear, lambda form: conv("cp", form)], ids=["linear", "conv"])
def test_a_partly_frozen_layer_trains_its_new_form(build):
    """Trainable stays trainable: one frozen factor, or a frozen bias, is not a frozen layer."""
    layer = build("lowrank")
    next(iter(layer.factors().values())).requires_grad_(False)
    layer.bias.requires_grad_(False)
    layer.inflate()
    assert layer.weight.requires_grad and not layer.bias.requires_grad
    layer.deflate()
    assert all(p.requires_grad for p in layer.factors().values()) and not layer.weight.requires_grad


# (layer form, saved form) pairs where the load switches the layer (adapter ← lowrank factors would load as the
# adapter's own trained tensors), for linear and svd conv
SWITCHING_FORMS = [pytest.param(build, form, saved, id=f"{case.id}-from-{saved}")
                   for case in all_forms()[:6] for build, form in [case.values]
                   for saved in FORMS if saved != form and (form, saved) != ("adapter", "lowrank")]


@pytest.mark.parametrize("frozen", ["layer", "all but the bias"])
@pytest.mark.parametrize("build, form, saved", SWITCHING_FORMS)
def test_a_frozen_layer_stays_frozen_through_a_load_of_another_form(build, form, saved, frozen):
    """``load_state_dict`` leaves ``requires_grad`` alone: a frozen layer (a frozen backbone) that a dict of
    another form switches stays frozen, W and factors alike, a trained bias still trains, and the layer
    computes the saved one's function."""
    src = randomize(build(saved, dtype=torch.float64))
    layer = randomize(build(form, dtype=torch.float64)).requires_grad_(False)
    if frozen != "layer":
        layer.bias.requires_grad_(True)
    layer.load_state_dict(src.state_dict())
    assert (layer.form, layer.rank) == (saved, src.rank)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ([] if frozen == "layer" else ["bias"])
    x = input_for(layer, 3).double()
    assert torch.equal(layer(x), src(x))


def test_the_scheduler_keeps_a_frozen_layer_frozen_and_held():
    """A layer frozen after conversion: each switch keeps it frozen, and its new parameters take the old
    ones' place in the optimizer (SGD(model.parameters()) holds its frozen factors at first), W_f aside:
    frozen, they take no step until unfrozen."""
    model = mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
    x = torch.randn(4, 12)
    y = model[0](x)
    for epoch, form in enumerate(["lowrank", "full", "adapter"]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sched.step(epoch)
        # one warning, at the first switch of the frozen layer, naming it and not the trained one
        said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        assert len(said) == (1 if epoch == 1 else 0), said
        if said:
            assert said[0].startswith("layers '0' switched while frozen (") and "requires_grad_()" in said[0]
        assert model[0].form == form and not any(p.requires_grad for p in model[0].parameters()), epoch
        layer_params = {id(p) for p in model[0].parameters()}
        w_f = {id(model[0].weight)} if form == "adapter" else set()
        assert {id(p) for p in held(opt)} & layer_params == layer_params - w_f, epoch
        assert all(any(p is q for q in held(opt)) for p in trainable(model)), epoch
        assert rel_err(model[0](x), y) < F32


# -- state dicts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("build, form", all_forms())
def test_state_dict_round_trip_keep_vars_and_strict_false(build, form):
    src = randomize(build(form))
    x = input_for(src, 3)
    expected = src(x)
    dst = build(form)
    dst.load_state_dict(src.state_dict(keep_vars=True))
    assert all(isinstance(v, nn.Parameter) for v in src.state_dict(keep_vars=True).values())
    assert not any(p is q for p in dst.parameters() for q in src.parameters())   # copied, not shared
    assert torch.equal(dst(x), expected)
    # strict=False with a part of the dict: the rest of the layer stays as it was.
    partial = build(form)
    before = state(partial)
    result = partial.load_state_dict({"bias": src.bias.detach()}, strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == sorted(k for k in before if k != "bias")
    assert torch.equal(partial.bias, src.bias)
    assert_same_state(partial, {**before, "bias": src.bias.detach()})


@pytest.mark.parametrize("saved", FORMS)
@pytest.mark.parametrize("build, form", all_forms()[:6])      # linear and svd conv
def test_assign_onto_a_meta_layer_of_any_form(build, form, saved):
    """The deferred-load recipe: build on meta, ``load_state_dict(sd, assign=True)``: the layer takes the
    saved form and rank, the dict's tensors themselves, and its form's trainability."""
    src = randomize(build(saved, dtype=torch.float64))
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    with torch.device("meta"):
        layer = build(form)
    if (form, saved) == ("adapter", "lowrank"):      # factors alone read as an adapter's trained tensors
        with pytest.raises(RuntimeError, match='Missing key.*"weight"'):
            layer.load_state_dict(sd, assign=True)
        return
    layer.load_state_dict(sd, assign=True)
    assert layer.form == saved and layer.rank == src.rank
    assert all(p.data_ptr() == sd[n].data_ptr() for n, p in layer.named_parameters())
    assert [(n, p.requires_grad) for n, p in layer.named_parameters()] == \
           [(n, p.requires_grad) for n, p in src.named_parameters()]
    x = input_for(layer, 3).double()
    assert torch.equal(layer(x), src(x))
    change_form(layer)
    assert rel_err(layer(x), src(x)) < REL_TOL[torch.float64] * 10


@pytest.mark.parametrize("build", [linear, lambda form, **kw: conv("tucker", form, **kw)], ids=["linear", "conv"])
@pytest.mark.parametrize("rank_change", [False, True])
def test_an_adapters_trained_tensors_load_into_it_and_keep_its_frozen_weight(build, rank_change):
    """The LoRA habit: save the trained tensors only (factors, bias), load them back with strict=False.
    The layer stays an adapter with its own W_f (it switched to lowrank form and dropped W_f before);
    strict loading names the missing W_f."""
    src = randomize(build("adapter", dtype=torch.float64))
    if rank_change:
        src = build("full", dtype=torch.float64)
        src.deflate(rank=2 if isinstance(src, FusedLowRankLinear) else (2, 2))
        randomize(src)
    trained = {k: v.clone() for k, v in src.state_dict().items() if k != "weight"}
    layer = build("adapter", dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(src.weight)
    frozen = layer.weight
    result = layer.load_state_dict(trained, strict=False)
    assert result.missing_keys == ["weight"] and not result.unexpected_keys
    assert layer.form == "adapter" and layer.rank == src.rank and layer.weight is frozen
    assert not frozen.requires_grad
    x = input_for(layer, 3).double()
    assert torch.equal(layer(x), src(x))
    with pytest.raises(RuntimeError, match='Missing key.*"weight"'):
        build("adapter", dtype=torch.float64).load_state_dict(trained)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("target", ["full", "adapter-rank-3", "lowrank-rank-3"])
def test_a_dict_of_another_form_that_lacks_a_tensor_leaves_the_layer_as_it_was(target, strict):
    """Loading switches the layer to the dict's form and rank first; a dict that lacks one of that form's
    tensors would leave it uninitialized, so the load is refused (strict or not) before anything changes.
    (Factors alone read as an adapter's own where the layer is one: a new rank keeps its W_f.)"""
    form, rank = (target, 4) if "rank" not in target else (target.split("-")[0], 3)
    layer = FusedLowRankLinear(17, 23, rank=rank, form=form)
    before, params = state(layer), dict(layer.named_parameters())
    sd = FusedLowRankLinear(17, 23, rank=4, form="lowrank").state_dict()
    del sd["B"]
    read_as = "adapter" if form == "adapter" else "lowrank"
    with pytest.raises(RuntimeError, match=re.escape(f"the state dict holds this layer in {read_as} form (rank 4) but "
                                                     f"lacks B") + r".*" + re.escape(
                                               f"the layer is left as it was ({form} form, rank {rank})")):
        layer.load_state_dict(sd, strict=strict)
    assert layer.form == form and layer.rank == rank and dict(layer.named_parameters()) == params
    assert_same_state(layer, before)


@pytest.mark.parametrize("dec", [d for d, _, _ in CONVS])
def test_a_conv_dict_of_another_form_that_lacks_a_factor_is_refused(dec):
    layer = conv(dec, "full")
    before = state(layer)
    sd = conv(dec, "adapter").state_dict()
    missing = layer._dec.factor_names[-1]
    del sd[missing]
    with pytest.raises(RuntimeError, match=rf"holds this layer in adapter form.* but lacks {missing}.*left as it "
                                           rf"was \(full form"):
        layer.load_state_dict(sd, strict=False)
    assert layer.form == "full"
    assert_same_state(layer, before)


def test_a_dict_of_the_same_form_that_lacks_a_tensor_is_torchs_missing_key():
    layer = FusedLowRankLinear(17, 23, rank=4)
    before = state(layer)
    sd = FusedLowRankLinear(17, 23, rank=4).state_dict()
    del sd["B"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "B"'):
        layer.load_state_dict(sd)
    result = layer.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["B"] and torch.equal(layer.B, before["B"])


@pytest.mark.parametrize("form", ["adapter", "lowrank"])
@pytest.mark.parametrize("build", [pytest.param(linear, id="linear")] + [
    pytest.param(lambda form, dec=dec, **kw: conv(dec, form, **kw), id=dec) for dec, _, _ in CONVS])
def test_the_trained_tensors_of_a_layer_with_a_frozen_factor_load_into_it(build, form):
    """LoRA-FA freezes A and trains the other factors and the bias, which it saves alone.  Loaded back with
    strict=False into a layer of the same form and rank, they were refused ("lacks A": the rank was read from
    A).  Nothing switches: they load, and torch reports A (and an adapter's W_f) as missing.  Factors of
    another rank without A are still refused, and strict loading names A."""
    src = randomize(build(form, dtype=torch.float64))
    src.A.requires_grad_(False)
    trained = {n: p.detach().clone() for n, p in src.named_parameters() if p.requires_grad}
    layer = build(form, dtype=torch.float64)
    with torch.no_grad():
        layer.A.copy_(src.A)
        if form == "adapter":
            layer.weight.copy_(src.weight)
    params, before = dict(layer.named_parameters()), state(layer)
    x = input_for(layer, 3).double()
    assert not torch.equal(layer(x), src(x))
    other = next(n for n in layer.factors() if n != "A")
    wrong = dict(trained, **{other: trained[other][..., :-1]})
    with pytest.raises(RuntimeError, match=rf"holds this layer in {form} form but lacks A; the layer is left as "
                                           rf"it was"):
        layer.load_state_dict(wrong, strict=False)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: .*"A"'):
        build(form, dtype=torch.float64).load_state_dict(trained)
    assert_same_state(layer, before)
    result = layer.load_state_dict(trained, strict=False)
    assert sorted(result.missing_keys) == ["A"] + (["weight"] if form == "adapter" else [])
    assert not result.unexpected_keys
    assert (layer.form, layer.rank) == (form, src.rank)
    assert all(p is params[n] for n, p in layer.named_parameters()) and len(params) == len(list(layer.parameters()))
    assert torch.equal(layer(x), src(x))


def _svd_conv(form="lowrank", rank=2):
    return LowRankConv2d(5, 7, 3, rank=rank, decomposition="svd", padding=1, form=form, alpha=2.0)


# (layer to load into, the layer whose state dict is saved, the saved tensor made uncopyable)
SWITCHING_LOADS = {
    "linear-form": (lambda: linear("lowrank"), lambda: linear("full"), "weight"),
    "linear-rank": (lambda: linear("lowrank"), lambda: FusedLowRankLinear(17, 23, rank=3, alpha=3.0), "B"),
    "linear-bias": (lambda: linear("adapter"), lambda: linear("full"), "bias"),
    "conv-form": (lambda: _svd_conv("lowrank"), lambda: _svd_conv("full"), "weight"),
    "conv-rank": (lambda: _svd_conv("lowrank"), lambda: _svd_conv("lowrank", rank=3), "A"),
    # The switch keeps the full form's W as the adapter's frozen W_f: a failed copy must make it trainable again.
    "linear-freeze": (lambda: linear("full"), lambda: linear("adapter"), "A"),
    "conv-freeze": (lambda: _svd_conv("full"), lambda: _svd_conv("adapter"), "B"),
}


def _managed(layer):
    """``layer`` in a model whose scheduler's Adam holds state for every parameter, that optimizer, an input."""
    model = nn.Sequential(layer)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
    x = input_for(layer, 3)
    model(x).square().sum().backward()
    opt.step()
    return model, opt, x


def _optimizer_view(opt):
    """The optimizer's parameters by identity, group by group, and copies of their state."""
    return ([[id(p) for p in g["params"]] for g in opt.param_groups],
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def _assert_as_it_was(model, opt, params, values, optimizer):
    """The layer holds the very ``params`` (name, id) with ``values``; the optimizer is ``optimizer``."""
    layer = model[0]
    assert [(n, id(p)) for n, p in layer.named_parameters()] == params
    assert_same_state(layer, values)
    groups, state_ = _optimizer_view(opt)
    assert groups == optimizer[0] and state_.keys() == optimizer[1].keys()
    for key, entries in optimizer[1].items():
        assert all(torch.equal(state_[key][k], v) for k, v in entries.items())


def _uncopyable(kind, t):
    if kind == "meta":
        return t.to("meta")
    if kind == "sparse":
        return t.to_sparse()
    with warnings.catch_warnings():             # quantized tensors are deprecated, and still loaded
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)


@pytest.mark.parametrize("kind", ["meta", "sparse", "quantized"])
@pytest.mark.parametrize("case", SWITCHING_LOADS)
def test_a_tensor_torch_cannot_copy_in_a_dict_of_another_form_or_rank_is_refused_before_the_switch(case, kind):
    """The load switches the layer first and copies after: a saved tensor torch cannot copy (meta, sparse,
    quantized) left it switched with uninitialized parameters, and the scheduler's optimizer holding them.
    It is refused by name before anything changes."""
    build, saved, key = SWITCHING_LOADS[case]
    model, opt, x = _managed(build())
    layer = model[0]
    form, rank = layer.form, layer.rank
    params, values, optimizer = [(n, id(p)) for n, p in layer.named_parameters()], state(layer), _optimizer_view(opt)
    y = model(x).detach()
    sd = {f"0.{k}": v for k, v in saved().state_dict().items()}
    sd[f"0.{key}"] = _uncopyable(kind, sd[f"0.{key}"])
    got = {"meta": "a meta tensor", "sparse": "a sparse_coo tensor", "quantized": "a quantized tensor"}[kind]
    with pytest.raises(RuntimeError, match=rf"0: {key} must be a dense tensor with values to load .*got {got}.*"
                                           rf"the layer is left as it was \({form} form, rank {rank}\)"):
        model.load_state_dict(sd)
    assert layer.form == form and layer.rank == rank
    _assert_as_it_was(model, opt, params, values, optimizer)
    assert torch.equal(model(x), y)


@pytest.mark.parametrize("assign", [False, True])
def test_a_meta_dict_of_another_form_still_loads_into_a_meta_layer_and_by_assign(assign):
    """Meta tensors are refused only where they would be copied into values: a meta layer takes them, and
    ``assign=True`` takes the tensors themselves."""
    sd = {k: v.to("meta") for k, v in linear("full").state_dict().items()}
    with torch.device("meta"):
        layer = linear("lowrank")
    if assign:
        layer = linear("lowrank")
    layer.load_state_dict(sd, assign=assign)
    assert layer.form == "full" and layer.weight.is_meta and layer.weight.shape == (23, 17)


class _FailsToCopy(torch.Tensor):
    """A tensor whose copy into a parameter fails, though its shape and kind pass every check."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            raise RuntimeError("this tensor cannot be copied")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("case", SWITCHING_LOADS)
def test_a_copy_that_fails_after_the_switch_gives_the_layer_its_own_parameters_back(case):
    """Where torch's copy fails all the same, the layer gets its very parameters back (trainable as they
    were) and the optimizer is left alone: it follows only a load that took.  The bias, which the switch
    keeps, is torch's to load, as ``nn.Linear``'s bias is where its weight's copy fails; so is W where the
    switch keeps it (full to adapter), and it trains again though the switch had frozen it as W_f."""
    build, saved, key = SWITCHING_LOADS[case]
    model, opt, x = _managed(build())
    layer = model[0]
    form, rank = layer.form, layer.rank
    params, values, optimizer = [(n, id(p)) for n, p in layer.named_parameters()], state(layer), _optimizer_view(opt)
    grads = [p.requires_grad for p in layer.parameters()]
    lowrank_rank = layer._lowrank_rank          # the rank cost reports read for its lowrank epochs
    sd = {f"0.{k}": v for k, v in saved().state_dict().items()}
    sd[f"0.{key}"] = sd[f"0.{key}"].as_subclass(_FailsToCopy)
    with pytest.raises(RuntimeError, match=rf'While copying the parameter named "0.{key}".*this tensor cannot be '
                                           rf'copied'):
        model.load_state_dict(sd)
    assert layer.form == form and layer.rank == rank and layer._lowrank_rank == lowrank_rank
    assert [p.requires_grad for p in layer.parameters()] == grads
    kept = {"bias"} | ({"weight"} if (form, saved().form) == ("full", "adapter") else set())
    for name in kept - {key}:
        values[name] = sd[f"0.{name}"]
    _assert_as_it_was(model, opt, params, values, optimizer)
    # The same dict with the tensor made plain loads, and the optimizer follows the switch.
    sd[f"0.{key}"] = sd[f"0.{key}"].as_subclass(torch.Tensor)
    model.load_state_dict(sd)
    assert (layer.form, layer.rank) == (saved().form, saved().rank)
    assert {id(p) for p in trainable(model)} == {id(p) for p in held(opt)}


# -- a reparametrized factor's state dict --------------------------------------------------------------

class _Doubled(nn.Module):
    def forward(self, t):
        return 2.0 * t


# Each saves A under its own keys (parametrizations.A.original, A_orig/A_u/A_v, A_g/A_v, A_orig/A_mask).
REPARAMETRIZATIONS = {
    "parametrize": lambda layer, name: parametrize.register_parametrization(layer, name, _Doubled()),
    "spectral_norm": lambda layer, name: spectral_norm(layer, name),
    "hook-spectral_norm": lambda layer, name: hook_spectral_norm(layer, name),
    "hook-weight_norm": lambda layer, name: hook_weight_norm(layer, name),
    "prune": lambda layer, name: prune.l1_unstructured(layer, name, amount=0.5),
}
LINEAR_AND_SVD_CONV = [pytest.param(linear, id="linear"), pytest.param(lambda form, **kw: conv("svd", form, **kw),
                                                                         id="conv")]


def reparametrized(build, form, kind):
    """A float64 layer of ``form`` with random factors and A reparametrized by ``kind``, in eval mode
    (the spectral norms run no power iteration there: one output per state)."""
    layer = randomize(build(form, dtype=torch.float64)).eval()
    REPARAMETRIZATIONS[kind](layer, "A")
    return layer


def reparametrized_reference(layer, x):
    """float64 output of nn.Linear / nn.Conv2d with the effective weight the reparametrized factors give."""
    tensors = {n: t.detach() for n, t in layer.factors().items()}
    if layer.weight is not None:
        tensors["weight"] = layer.weight.detach()
    weight, bias = effective(layer, tensors), layer.bias.detach()
    if isinstance(layer, FusedLowRankLinear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", list(REPARAMETRIZATIONS))
@pytest.mark.parametrize("form", ["lowrank", "adapter"])
@pytest.mark.parametrize("build", LINEAR_AND_SVD_CONV)
def test_a_layer_with_a_reparametrized_factor_loads_its_own_state_dict(build, form, kind):
    """A reparametrized factor is saved under its reparametrization's keys, never as ``A``: the dict is
    the layer's own form and rank, and torch's load (strict) restores it, function included."""
    layer = reparametrized(build, form, kind)
    x = input_for(layer, 3).double()
    expected = layer(x)
    assert rel_err(expected, reparametrized_reference(layer, x)) < REL_TOL[torch.float64]
    sd = state(layer)
    assert "A" not in sd
    twin = reparametrized(build, form, kind)      # (a deepcopy refuses the hook-based ones' computed A)
    with torch.no_grad():
        for t in [*twin.parameters(), *twin.buffers()]:
            t.add_(torch.rand_like(t) + 0.5)
    assert not torch.allclose(twin(x), expected)
    twin.load_state_dict(sd)
    assert twin.form == form and twin.rank == layer.rank
    assert_same_state(twin, sd)
    assert torch.equal(twin(x), expected)
    layer.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x), expected)
    model = nn.Sequential(nn.Identity(), reparametrized(build, form, kind))     # under a prefix
    model.load_state_dict({f"1.{k}": v for k, v in sd.items()})
    assert torch.equal(model(x), expected)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", list(REPARAMETRIZATIONS))
@pytest.mark.parametrize("form", ["lowrank", "adapter"])
@pytest.mark.parametrize("build", LINEAR_AND_SVD_CONV)
def test_a_layer_with_a_reparametrized_factor_refuses_to_inflate(build, form, kind):
    """``inflate`` releases the factors: with A reparametrized it would fail halfway (or drop the
    reparametrization) and leave the layer between two forms.  Refused by name, the layer left as it was."""
    layer = reparametrized(build, form, kind)
    x = input_for(layer, 3).double()
    expected = layer(x)
    before, params = state(layer), [(n, id(p)) for n, p in layer.named_parameters()]
    with pytest.raises(RuntimeError, match=rf"\({form} form, rank .*\) cannot change form or rank: its A is "
                                           rf"reparametrized"):
        layer.inflate()
    assert layer.form == form and [(n, id(p)) for n, p in layer.named_parameters()] == params
    assert_same_state(layer, before)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("form", ["lowrank", "adapter"])
@pytest.mark.parametrize("build", LINEAR_AND_SVD_CONV)
def test_a_layer_with_a_reparametrized_factor_refuses_a_dict_of_another_form_or_rank(build, form, strict):
    """Loading would switch the layer, which would replace the reparametrized factor: refused, the layer
    left as it was."""
    layer = reparametrized(build, form, "parametrize")
    before = state(layer)
    refused = r"\(" + form + r" form, rank .*\) cannot change form or rank: its A is reparametrized"
    other_rank = build("full", dtype=torch.float64).deflate(rank=1).state_dict()
    for sd in (build("full", dtype=torch.float64).state_dict(),
               {k: v for k, v in other_rank.items() if form == "adapter" or k != "weight"}):   # lowrank: factors
        with pytest.raises(RuntimeError, match=refused):
            layer.load_state_dict(sd, strict=strict)
        assert layer.form == form
        assert_same_state(layer, before)
    # The layer's own form and rank, but B of another rank: A's parametrization is left as it was too.
    original = "parametrizations.A.original"
    sd = {**before, original: before[original] + 1.0, "B": other_rank["B"]}
    with pytest.raises(RuntimeError, match=r"B must have shape .*, got "):
        layer.load_state_dict(sd, strict=strict)
    assert_same_state(layer, before)


# -- repr -----------------------------------------------------------------------------------------

def test_repr_names_the_form_and_the_rank():
    layer = FusedLowRankLinear(17, 23, rank=4, alpha=3.0)
    assert repr(layer) == ("FusedLowRankLinear(in_features=17, out_features=23, rank=4, form='lowrank', bias=True, "
                           "alpha=3.0)")
    layer.inflate()
    assert "rank=4, form='full'" in repr(layer)
    layer.deflate(rank=2)
    assert "rank=2, form='adapter'" in repr(layer)
    c = LowRankConv2d(5, 7, 3, rank=(2, 3), decomposition="tucker", padding=1, bias=False)
    assert repr(c) == ("LowRankConv2d(5, 7, kernel_size=(3, 3), decomposition='tucker', rank=(2, 3), "
                       "form='lowrank', padding=(1, 1), bias=False)")
    c.inflate().deflate(rank=(1, 2))
    assert "rank=(1, 2), form='adapter'" in repr(c)
    assert repr(FusedLowRankLinear(17, 23, rank=4, bias=False)) == (
        "FusedLowRankLinear(in_features=17, out_features=23, rank=4, form='lowrank', bias=False)")
    c = LowRankConv2d(6, 8, 3, rank=4, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect", alpha=8.0)
    assert repr(c) == ("LowRankConv2d(6, 8, kernel_size=(3, 3), decomposition='svd', rank=4, form='lowrank', "
                       "stride=(2, 2), padding=(2, 2), dilation=(2, 2), groups=2, padding_mode='reflect', "
                       "alpha=8.0)")


# -- deepcopy and pickling ---------------------------------------------------------------------------

def _pickled(layer):
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("build, form", all_forms())
def test_a_copy_is_independent_of_its_original(build, form, how):
    layer = randomize(build(form))
    layer.bias.requires_grad_(False)
    x = input_for(layer, 2)
    y = layer(x)
    before, params = state(layer), dict(layer.named_parameters())
    twin = copy.deepcopy(layer) if how == "deepcopy" else _pickled(layer)
    assert type(twin) is type(layer) and twin.form == form and twin.rank == layer.rank
    assert repr(twin) == repr(layer)
    assert [(n, p.requires_grad) for n, p in twin.named_parameters()] == \
           [(n, p.requires_grad) for n, p in layer.named_parameters()]
    assert torch.equal(twin(x), y)
    check_forward_and_gradients(twin, x)
    for _ in range(2):
        change_form(twin)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    assert layer.form == form and dict(layer.named_parameters()) == params
    assert all(p.grad is None for p in layer.parameters())
    assert_same_state(layer, before)
    assert torch.equal(layer(x), y)


# -- inputs of every layout, both engines --------------------------------------------------------

LINEAR_INPUTS = {   # device → input
    "0 tokens": lambda d: torch.randn(0, 17, device=d),
    "0 tokens 3-d": lambda d: torch.randn(2, 0, 17, device=d),
    "1-d": lambda d: torch.randn(17, device=d),
    "4-d": lambda d: torch.randn(2, 2, 3, 17, device=d),
    "transposed": lambda d: torch.randn(17, 3, device=d).t(),
    "strided": lambda d: torch.randn(9, 40, device=d)[::3, 5::2][:, :17],
    "stride-0 rows": lambda d: torch.randn(1, 17, device=d).expand(3, 17),
    "stride-0 3-d": lambda d: torch.randn(17, device=d).expand(2, 3, 17),
}


@pytest.mark.parametrize("case", list(LINEAR_INPUTS))
@pytest.mark.parametrize("form", FORMS)
def test_linear_input_layouts_match_nn_linear(device, form, case):
    layer = randomize(linear(form, device=device))
    x = LINEAR_INPUTS[case](device)
    y = check_forward_and_gradients(layer, x)
    assert y.shape == (*x.shape[:-1], 23)
    if x.numel() == 0:                       # as nn.Linear: zero gradients, not None
        assert all(torch.count_nonzero(p.grad) == 0 for p in layer.parameters() if p.requires_grad)


CONV_INPUTS = {     # device → input
    "0 images": lambda d: torch.randn(0, 5, 9, 8, device=d),
    "unbatched": lambda d: torch.randn(5, 9, 8, device=d),
    "channels-last": lambda d: torch.randn(2, 5, 9, 8, device=d).to(memory_format=torch.channels_last),
    "transposed": lambda d: torch.randn(2, 5, 8, 9, device=d).transpose(2, 3),
    "stride-0 batch": lambda d: torch.randn(1, 5, 9, 8, device=d).expand(3, 5, 9, 8),
    "stride-0 spatial": lambda d: torch.randn(2, 5, 1, 1, device=d).expand(2, 5, 9, 8),
}


@pytest.mark.parametrize("case", list(CONV_INPUTS))
@pytest.mark.parametrize("dec, form", [("svd", "adapter"), ("tucker", "lowrank"), ("cp", "adapter"),
                                       ("tkd-cpd", "full")])
def test_conv_input_layouts_match_nn_conv2d(device, dec, form, case):
    layer = randomize(conv(dec, form, device=device))
    x = CONV_INPUTS[case](device)
    y = check_forward_and_gradients(layer, x)
    assert y.shape[-3:] == (7, 5, 4) and y.shape[:-3] == x.shape[:-3]
    if x.numel() == 0:
        assert all(torch.count_nonzero(p.grad) == 0 for p in layer.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
@pytest.mark.parametrize("frozen", ["layer", "bias"])
def test_from_dense_keeps_what_was_frozen(kind, form, frozen):
    """A frozen nn.Linear / nn.Conv2d came back trainable (weight, bias and factors); a frozen bias (LoRA
    style) too.  The bias keeps its requires_grad; a frozen weight gives frozen factors or W, as a switch
    keeps a frozen layer frozen, and adapter form trains its adapter beside the frozen W_f."""
    dense = nn.Linear(6, 5) if kind == "linear" else nn.Conv2d(3, 4, 3)
    (dense if frozen == "layer" else dense.bias).requires_grad_(False)
    layer = (FusedLowRankLinear if kind == "linear" else LowRankConv2d).from_dense(dense, 2, form=form)
    trains = {name: p.requires_grad for name, p in layer.named_parameters()}
    factors = set(layer.factors()) if form != "full" else set()
    expected = {"bias": False, "weight": frozen == "bias" and form == "full",
                **{name: frozen == "bias" or form == "adapter" for name in factors}}
    assert trains == {name: expected[name] for name in trains}
    assert set(trains) == {"bias"} | factors | ({"weight"} if form != "lowrank" else set())
