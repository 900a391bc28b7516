"""The layers and converted models under the module utilities users reach for: load_state_dict pre-hooks,
inference mode, weight assignment, parametrizations and pruning, eval mode, and gradients at a deflate."""

import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.parametrizations import spectral_norm

from _helpers import kernel_devices, rel_err
from dynrank import FusedLowRankLinear, LowRankConv2d, convert_model, unconvert_model
from dynrank.inrank import grow_rank_

F64 = torch.float64


def _randomized(layer):
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    return layer


# -- load_state_dict pre-hooks ----------------------------------------------------------------

def test_a_load_pre_hook_runs_before_the_form_and_rank_are_read():
    """A hook that renames a checkpoint's factors (U, V → A, B) and one that transposes an (in, out) weight
    run first, as on nn.Linear: the form and rank loaded are those of the dict they leave."""
    saved = _randomized(FusedLowRankLinear(8, 6, 3, dtype=F64))
    renamed = {"U": saved.A.detach().clone(), "V": saved.B.detach().clone(), "bias": saved.bias.detach().clone()}
    calls = []

    def rename(module, state_dict, prefix, *args):
        calls.append(prefix)
        for old, new in (("U", "A"), ("V", "B")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)

    layer = FusedLowRankLinear(8, 6, 2, dtype=F64)                          # rank 2 before the load
    layer.register_load_state_dict_pre_hook(rename)
    model = nn.Sequential(layer)
    model.load_state_dict({f"0.{k}": v for k, v in renamed.items()})
    assert calls == ["0."] and layer.rank == 3                            # ran once, before the rank was read
    x = torch.randn(4, 8, dtype=F64)
    assert torch.equal(layer(x), saved(x))

    dense = nn.Linear(8, 6, dtype=F64)
    transposed = {"weight": dense.weight.detach().t().clone(), "bias": dense.bias.detach().clone()}

    def transpose(module, state_dict, prefix, *args):
        state_dict[prefix + "weight"] = state_dict[prefix + "weight"].t()

    for target in (nn.Linear(8, 6, dtype=F64), FusedLowRankLinear(8, 6, 2, form="full", dtype=F64),
                   FusedLowRankLinear(8, 6, 2, form="lowrank", dtype=F64)):
        target.register_load_state_dict_pre_hook(transpose)
        target.load_state_dict(dict(transposed))
        assert torch.equal(target(x), dense(x)), type(target).__name__


# -- inference mode ---------------------------------------------------------------------------

def _switches():
    def inflate(layer):
        layer.inflate()

    def deflate(layer):
        layer.inflate().deflate(init="svd")

    def load(layer):
        layer.load_state_dict(FusedLowRankLinear(8, 6, 2, form="full").state_dict())

    def grow(layer):
        grow_rank_(layer, 4)
    return [inflate, deflate, load, grow]


def test_a_layer_cast_under_inference_mode_still_switches_there():
    """A model cast under inference mode (for serving) holds inference tensors, which cannot be updated in
    place outside it: its adapters still merge there, as before, for the linear and the conv."""
    torch.manual_seed(0)
    linear = _randomized(FusedLowRankLinear(8, 6, 2, form="adapter"))
    conv = _randomized(LowRankConv2d(4, 6, 3, rank=2, form="adapter", padding=1))
    for layer, x in ((linear, torch.randn(3, 8)), (conv, torch.randn(2, 4, 5, 5))):
        with torch.inference_mode():
            layer.double()
            x = x.double()
            before = layer(x)
            layer.inflate()
            assert layer.form == "full" and rel_err(layer(x), before) < 1e-12


@pytest.mark.parametrize("kind", ["linear", "conv-chain"])
@pytest.mark.parametrize("form, change", [("adapter", lambda m: m.inflate()),
                                          ("full", lambda m: m.deflate(init="svd")),
                                          ("full", lambda m: m.deflate())])
def test_a_layer_of_inference_tensors_switches_outside_inference_mode_too(kind, form, change):
    """deflate(init='svd') merges into W itself, which an inference tensor allows only inside inference
    mode: called outside it, the switch enters it rather than fail."""
    with torch.inference_mode():
        layer, x = _layer(kind, form)
        before = layer(x)
    change(layer)
    with torch.inference_mode():
        assert rel_err(layer(x), before) < 1e-12
    assert all(p.is_inference() for p in layer.parameters())


def test_a_scheduler_switch_under_inference_mode_makes_ordinary_optimizer_state():
    """The state a carry (or Adagrad's construction-time state) makes at a switch under inference mode was
    made of inference tensors: the next optimizer.step() failed with "Inplace update to inference tensor"."""
    from _scheduling import mlp, train_steps
    from dynrank import DynamicRankScheduler
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = DynamicRankScheduler(model, opt, 1, 2, optimizer_state="carry")
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    for epoch in range(3):
        with torch.inference_mode():          # an evaluation block around the epoch boundary
            sched.step(epoch)
        train_steps(model, opt, x, y, steps=2)
    assert model[0].form == "adapter"
    assert not any(t.is_inference() for state in opt.state.values() for t in state.values()
                   if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("switch", _switches(), ids=lambda f: f.__name__)
def test_a_switch_under_inference_mode_makes_ordinary_parameters(switch):
    """Parameters made inside inference mode were inference tensors: the next training step's backward
    failed ("Inference tensors cannot be saved for backward"), far from the switch."""
    layer = _randomized(FusedLowRankLinear(8, 6, 2))
    with torch.inference_mode():
        switch(layer)
    assert not any(p.is_inference() for p in layer.parameters())
    x = torch.randn(4, 8)
    layer(x).square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)


# -- a weight assigned in lowrank form --------------------------------------------------------

def test_assigning_a_weight_in_lowrank_form_is_refused():
    """``head.weight = emb.weight`` in lowrank form was added to A·Bᵀ by the forward and had the factors
    merged into the embedding by inflate.  Refused, naming what to do; in full form it ties as on nn.Linear."""
    emb = nn.Embedding(6, 8)
    head = FusedLowRankLinear(8, 6, 2)
    with pytest.raises(ValueError, match="in lowrank form has no weight.*call inflate\\(\\) first"):
        head.weight = emb.weight
    assert head.weight is None and head.form == "lowrank"
    head.inflate()
    head.weight = emb.weight
    x = torch.randn(3, 8)
    assert torch.equal(head(x), x @ emb.weight.t() + head.bias)


def _lowrank_layer_and_input(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return _randomized(FusedLowRankLinear(8, 6, 2, dtype=F64)), torch.randn(3, 8, dtype=F64)
    return _randomized(LowRankConv2d(4, 6, 3, rank=2, dtype=F64)), torch.randn(2, 4, 5, 5, dtype=F64)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_weight_given_in_lowrank_form_by_functional_call_is_refused(kind):
    """torch.func.functional_call writes ``_parameters`` itself, past the assignment's check: the linear
    layer's forward added the weight to A·Bᵀ (x·(W + A·Bᵀ)ᵀ + b, not nn.Linear's x·Wᵀ + b), the conv's
    dropped it.  Refused as an assigned weight; the layer's own parameters still run as its forward."""
    from torch.func import functional_call
    layer, x = _lowrank_layer_and_input(kind)
    params = dict(layer.named_parameters())
    assert torch.equal(functional_call(layer, params, (x,)), layer(x))
    weight = torch.randn(layer._dense_shape(), dtype=F64)
    with pytest.raises(ValueError, match="in lowrank form has no weight.*call inflate\\(\\) first"):
        functional_call(layer, {**params, "weight": weight}, (x,))
    assert layer.weight is None and layer.form == "lowrank"


@pytest.mark.parametrize("source", ["lowrank", "adapter", "built full"])
@pytest.mark.parametrize("kind", ["linear", "svd", "tucker", "cp", "tkd-cpd"])
def test_factors_given_in_full_form_by_functional_call_are_refused(kind, source):
    """The mirror of the weight's refusal: a parameter dict taken in lowrank or adapter form (fast weights
    snapshotted before a scheduler inflated the layer), given to a full-form layer by
    torch.func.functional_call, ran on the layer's own W and dropped the factors without a word.  Refused,
    naming what was given, whether the layer was inflated (functional_call fills the factors' slots in
    ``_parameters``, which the forward reads) or built full (no slots: functional_call assigns them), and
    so is a factor assigned or registered in full form.  The layer is left as it was; the full form's own
    dict still runs as the layer, and a weight given runs as x·Wᵀ + b."""
    from torch.func import functional_call

    def build(form):
        if kind == "linear":
            return _randomized(FusedLowRankLinear(8, 6, 2, form=form, dtype=F64))
        return _randomized(LowRankConv2d(4, 6, 3, rank=2, decomposition=kind, form=form, dtype=F64))

    torch.manual_seed(0)
    layer = build("lowrank" if source == "built full" else source)
    x = torch.randn(3, 8, dtype=F64) if kind == "linear" else torch.randn(2, 4, 5, 5, dtype=F64)
    snapshot = {k: v.detach().clone() for k, v in layer.named_parameters()}
    names = [n for n in snapshot if n in layer.factors()]
    if source == "built full":
        layer = build("full")
    else:
        layer.inflate()
        with torch.no_grad():
            layer.weight.add_(1.0)             # the full layer trains on: its W no longer matches the snapshot
    own = dict(layer.named_parameters())
    held = [(name, id(p)) for name, p in own.items()]
    before = layer(x)
    for given in (snapshot, {names[-1]: snapshot[names[-1]]}):
        named = [n for n in names if n in given][:1 if source == "built full" else None]
        with pytest.raises(ValueError, match=re.escape(
                f"in full form has no factors (it holds weight); the {', '.join(named)} given would go unused")):
            functional_call(layer, given, (x,))
        assert layer.form == "full" and all(getattr(layer, n) is None for n in names)
        assert [(name, id(p)) for name, p in layer.named_parameters()] == held and torch.equal(layer(x), before)
    factor = nn.Parameter(snapshot[names[0]])
    with pytest.raises(ValueError, match=re.escape(f"the {names[0]} given would go unused")):
        setattr(layer, names[0], factor)
    with pytest.raises(ValueError, match="deflate\\(\\)"):
        layer.register_parameter(names[0], factor)
    assert [(name, id(p)) for name, p in layer.named_parameters()] == held and torch.equal(layer(x), before)
    assert torch.equal(functional_call(layer, {k: v.detach().clone() for k, v in own.items()}, (x,)), before)
    weight = torch.randn(layer._dense_shape(), dtype=F64)
    expected = (x @ weight.t() + layer.bias if kind == "linear"
                else torch.nn.functional.conv2d(x, weight, layer.bias))
    assert rel_err(before, expected) > 0.1
    assert rel_err(functional_call(layer, {"weight": weight}, (x,)), expected) < 1e-12


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_weight_registered_in_lowrank_form_is_refused(kind):
    """``register_parameter("weight", P)`` bypasses ``__setattr__``: the forward then added P to the low-rank
    product and inflate merged the factors into it.  Refused, leaving the layer as it was."""
    layer, x = _lowrank_layer_and_input(kind)
    before = layer(x)
    weight = nn.Parameter(torch.randn(layer._dense_shape(), dtype=F64))
    with pytest.raises(ValueError, match="in lowrank form has no weight.*call inflate\\(\\) first"):
        layer.register_parameter("weight", weight)
    assert layer.weight is None and torch.equal(layer(x), before)
    layer.inflate()
    assert rel_err(layer(x), before) < 1e-12          # inflate merged into zeros, not into P
    layer.register_parameter("weight", weight)          # full form: registered as on nn.Linear
    assert layer.weight is weight


# -- deflate and the frozen weight's gradient ---------------------------------------------------

def test_deflate_drops_the_gradient_of_the_weight_it_freezes():
    """A manual deflate kept W's last gradient on the frozen W_f: clip_grad_norm_(model.parameters())
    counted it, and inflate revived it as W's gradient."""
    layer = _randomized(FusedLowRankLinear(8, 6, 2, form="full"))
    layer(torch.randn(4, 8)).sum().backward()
    layer.deflate()
    assert layer.weight.grad is None
    assert layer.inflate().weight.grad is None



def _layer(kind, form, dtype=torch.float64):
    """A layer of ``kind`` ("linear", or "conv-<adapter strategy>") in ``form``, and an input."""
    if kind == "linear":
        return _randomized(FusedLowRankLinear(8, 6, 2, form=form, dtype=dtype)), torch.randn(4, 8, dtype=dtype)
    layer = LowRankConv2d(4, 6, 3, rank=2, padding=1, form=form, adapter_strategy=kind.split("-")[1], dtype=dtype)
    return _randomized(layer), torch.randn(2, 4, 5, 5, dtype=dtype)


IN_PLACE_SWITCHES = {"inflate an adapter": ("adapter", lambda m: m.inflate()),
                     "deflate(init='svd')": ("full", lambda m: m.deflate(init="svd"))}


@pytest.mark.parametrize("kind, switch", [(k, s) for k in ("linear", "conv-chain") for s in IN_PLACE_SWITCHES]
                         + [("conv-merged", "deflate(init='svd')")])
def test_a_switch_that_merges_in_place_refuses_the_pending_backward(kind, switch):
    """These switches merge into the dense weight's own storage; through ``.data`` the version counter
    did not move, and a backward of a forward made before the switch used the new weight: dx was
    silently wrong (2e3 off for a conv).  Now it is torch's in-place error.  (A conv adapter of the
    "merged" strategy saves its merged kernel, not W_f: see the next test.)"""
    form, change = IN_PLACE_SWITCHES[switch]
    layer, x = _layer(kind, form)
    loss = layer(x.requires_grad_()).square().sum()
    change(layer)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.skipif(not kernel_devices(), reason="Triton kernels cannot run here")
@pytest.mark.parametrize("kind, switch", [(k, s) for k in ("linear", "conv-chain") for s in IN_PLACE_SWITCHES])
def test_the_triton_merges_refuse_the_pending_backward_too(triton_backend, kind, switch):
    """The Triton merge kernels write through the pointer: without a version bump the backward ran on
    the merged weight (dx 0.67 off for a linear layer, 0.81 for a conv)."""
    form, change = IN_PLACE_SWITCHES[switch]
    layer, x = _layer(kind, form, torch.float32)          # float64 takes the torch engine
    device = kernel_devices()[0]
    layer, x = layer.to(device), x.to(device)
    loss = layer(x.requires_grad_()).square().sum()
    change(layer)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("kind, form, change", [
    *[(k, f, c) for k in ("linear", "conv-chain") for f, c in (("lowrank", lambda m: m.inflate()),
                                                               ("full", lambda m: m.deflate()))],
    ("conv-merged", "adapter", lambda m: m.inflate())])
def test_a_switch_that_replaces_tensors_leaves_the_pending_backward_right(kind, form, change):
    """inflate from lowrank builds a new W, deflate(init='zeros') only freezes W, a merged-strategy conv
    adapter saved its own merged kernel: the graph keeps what it saved, and dx is the one of the
    function the forward computed."""
    layer, x = _layer(kind, form)
    x.requires_grad_()
    (expected,) = torch.autograd.grad(layer(x).square().sum(), x)
    loss = layer(x).square().sum()
    change(layer)
    loss.backward()
    assert rel_err(x.grad, expected) < 1e-12


# -- parametrizations, pruning --------------------------------------------------------------------

REPARAMETRIZE = {
    "spectral_norm": (lambda m: spectral_norm(m), "weight is parametrized \\(_SpectralNorm\\)"),
    "hook_weight_norm": (lambda m: nn.utils.weight_norm(m), "weight is reparametrized \\(hook-based WeightNorm\\)"),
    "prune": (lambda m: prune.l1_unstructured(m, "weight", 0.3), "weight is pruned \\(L1Unstructured\\)"),
}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("kind", list(REPARAMETRIZE))
def test_convert_keeps_a_reparametrized_layer_dense(kind):
    """A spectral-normed, weight-normed or pruned layer was converted from one value of its weight, and the
    constraint was silently gone (σ_max 1.49 → 59,281 after one step).  It stays dense with a note; named in
    ``include`` it is an error, and ``from_dense`` refuses it."""
    make, what = REPARAMETRIZE[kind]
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)        # the hook-based weight_norm is deprecated
        make(model[0])
    kept = model[0]
    summary = convert_model(model, rank_ratio=0.25)
    assert model[0] is kept and isinstance(model[2], FusedLowRankLinear)
    assert any(row["name"] == "0" and not row["converted"] and row["note"] for row in summary.rows)
    assert [row["note"] for row in summary.rows if row["name"] == "0"][0].replace("(", "\\(").replace(")", "\\)") \
        == what
    with pytest.raises(ValueError, match=f"'0' is named in include, but its {what}"):
        convert_model(_reparametrized(kind), rank_ratio=0.25, include=["0"])
    with pytest.raises(TypeError, match=f"from_dense: the nn.Linear's {what}"):
        FusedLowRankLinear.from_dense(kept, 4)


def _reparametrized(kind):
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        REPARAMETRIZE[kind][0](model[0])
    return model


@pytest.mark.parametrize("form, name", [("full", "weight"), ("lowrank", "A"), ("adapter", "bias")])
def test_unconvert_refuses_a_reparametrized_layer(form, name):
    """unconvert_model on a layer with a parametrized weight or bias failed with torch's "cannot assign
    'torch.FloatTensor' as parameter ..."; with a parametrized factor it baked the value in and dropped the
    parametrization silently.  All refuse, naming the layer and how to remove it; the model is kept."""
    model = nn.Sequential(FusedLowRankLinear(8, 6, 2, form=form), nn.ReLU())
    parametrize.register_parametrization(model[0], name, nn.Identity())
    layer = model[0]
    with pytest.raises(RuntimeError, match=f"unconvert_model: '0' cannot be unconverted: its {name} is "
                                           f"parametrized \\(Identity\\).*remove_parametrizations"):
        unconvert_model(model)
    assert model[0] is layer


def test_convert_keeps_eval_mode():
    model = _mlp().eval()
    convert_model(model, rank_ratio=0.25)
    assert not any(m.training for m in model.modules())
    conv = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    convert_model(conv, rank_ratio=0.5, keep_last=False)
    assert isinstance(conv[0], LowRankConv2d) and not conv[0].training
