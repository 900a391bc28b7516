"""unconvert_model: dynrank layers back to plain torch modules computing the same function.

Every layer is built in float64 and its own forward is the reference; the plain modules must match it
to float64 rounding, for every form, both ``lowrank`` choices, every conv decomposition and geometry.
"""

import copy
import gc
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _helpers import REL_TOL, rel_err
from dynrank import FusedLowRankLinear, LowRankConv2d, UnconversionSummary, convert_model, unconvert_model
from dynrank._forms import FormLayer

# torch's own note on an even kernel with padding="same" (the layer and nn.Conv2d alike)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

F64 = torch.float64
TOL = REL_TOL[F64]

# (decomposition, rank): tkd-cpd at (3, 4, 5) fuses its 1×1 pairs, at (1, 2, 1) runs them apart.
CONFIGS = [("svd", 4), ("tucker", (3, 4)), ("cp", 5), ("tkd-cpd", (3, 4, 5)), ("tkd-cpd", (1, 2, 1))]
CHAIN_LENGTH = {("svd", 4): 2, ("tucker", (3, 4)): 3, ("cp", 5): 4, ("tkd-cpd", (3, 4, 5)): 4,
                ("tkd-cpd", (1, 2, 1)): 6}
GEOMETRIES = {
    "stride2": dict(kernel_size=3, stride=2, padding=1),
    "dilation2": dict(kernel_size=3, padding=1, dilation=2),
    "reflect": dict(kernel_size=3, padding=(2, 1), padding_mode="reflect", stride=(1, 2)),
    "circular": dict(kernel_size=3, padding=2, dilation=2, padding_mode="circular", stride=2),
    "replicate-same": dict(kernel_size=(2, 3), padding="same", padding_mode="replicate"),
    "kernel3x1": dict(kernel_size=(3, 1), padding=(1, 0)),
    "kernel2x3-same": dict(kernel_size=(2, 3), padding="same"),
    "groups2": dict(kernel_size=3, padding=1, groups=2, padding_mode="reflect"),
}


def _cases():
    for (dec, rank) in CONFIGS:
        for geo, kw in GEOMETRIES.items():
            if kw.get("groups", 1) > 1 and dec != "svd":
                continue                             # grouped convs: svd only
            if rank == (1, 2, 1) and 1 in _pair(kw["kernel_size"]):
                continue                             # CP rank 2 exceeds a (1, 1, 3, 1) core's limit
            yield pytest.param(dec, rank, kw, id=f"{dec}-{rank}-{geo}".replace(" ", ""))


def _pair(k):
    return k if isinstance(k, tuple) else (k, k)


def conv_layer(dec, rank, form, geometry, dtype=F64, bias=True):
    """A LowRankConv2d 6→8 whose adapter is non-zero (so a merge that drops it fails)."""
    layer = LowRankConv2d(6, 8, rank=rank, decomposition=dec, form=form, alpha=2.0, bias=bias, dtype=dtype,
                          **geometry)
    with torch.no_grad():
        for f in layer.factors().values():
            f.normal_(0.0, 0.5)
    return layer


def linear_layer(form, dtype=F64, bias=True):
    layer = FusedLowRankLinear(12, 10, rank=3, form=form, alpha=6.0, bias=bias, dtype=dtype)
    with torch.no_grad():
        for f in layer.factors().values():
            f.normal_(0.0, 0.5)
    return layer


def plain_only(model):
    """Every module of ``model`` is a torch.nn one (no dynrank layer anywhere)."""
    assert not any(isinstance(m, FormLayer) for m in model.modules())
    return all(type(m).__module__.startswith("torch.nn.") for m in model.modules())


def dense_part(layer, x):
    """The output of W_f alone (adapter form): the factors must change it."""
    if isinstance(layer, FusedLowRankLinear):
        return F.linear(x, layer.weight, layer.bias)
    pad = layer._padding_amounts()
    if layer.padding_mode != "zeros":
        return F.conv2d(F.pad(x, pad, mode=layer.padding_mode), layer.weight, layer.bias, layer.stride, 0,
                        layer.dilation, layer.groups)
    return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def check_same_function(layer, lowrank, x):
    """Unconvert ``nn.Sequential(layer)``; its output equals the layer's float64 output.  Returns the new module."""
    if layer.form == "adapter":
        assert rel_err(dense_part(layer, x), layer(x)) > 1e-2        # the adapter is not a no-op
    expected = layer(x)
    model = nn.Sequential(layer)
    summary = unconvert_model(model, lowrank=lowrank)
    assert plain_only(model)
    new = model[0]
    y = model(x)
    assert y.dtype == F64 and all(p.dtype == F64 for p in new.parameters())
    assert rel_err(y, expected) < TOL
    assert summary.names == ["0"] and summary.rows[0]["form"] == layer.form
    return new


# ---------------------------------------------------------------------------
# Same function, every form and layout
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("lowrank", ["factored", "dense"])
@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_linear_every_form(form, lowrank):
    layer = linear_layer(form)
    new = check_same_function(layer, lowrank, torch.randn(5, 7, 12, dtype=F64))
    if form == "lowrank" and lowrank == "factored":
        assert [type(m) for m in new] == [nn.Linear, nn.Linear]
        assert new[0].weight.shape == (3, 12) and new[0].bias is None
        assert new[1].weight.shape == (10, 3) and new[1].bias is layer.bias
    else:
        assert type(new) is nn.Linear and new.weight.shape == (10, 12) and new.bias is layer.bias


@pytest.mark.parametrize("dec, rank, geometry", list(_cases()))
def test_conv_lowrank_factored_runs_the_chain(dec, rank, geometry):
    layer = conv_layer(dec, rank, "lowrank", geometry)
    new = check_same_function(layer, "factored", torch.randn(2, 6, 9, 10, dtype=F64))
    assert isinstance(new, nn.Sequential) and all(type(m) is nn.Conv2d for m in new)
    assert len(new) == CHAIN_LENGTH[(dec, rank)]
    assert new[-1].bias is layer.bias and all(m.bias is None for m in new[:-1])
    if geometry.get("groups", 1) > 1:
        assert new[0].groups == new[1].groups == geometry["groups"]
    # Unbatched input runs as nn.Conv2d runs it.
    x = torch.randn(6, 9, 10, dtype=F64)
    assert new(x).shape == new(x[None]).shape[1:]


@pytest.mark.parametrize("form, lowrank", [("lowrank", "dense"), ("adapter", "factored"), ("adapter", "dense")])
@pytest.mark.parametrize("dec, rank, geometry", list(_cases()))
def test_conv_dense_and_adapter_merge(dec, rank, geometry, form, lowrank):
    layer = conv_layer(dec, rank, form, geometry)
    new = check_same_function(layer, lowrank, torch.randn(2, 6, 9, 10, dtype=F64))
    assert type(new) is nn.Conv2d
    geometry = dict(geometry)
    assert new.kernel_size == _pair(geometry.pop("kernel_size"))
    for key, value in geometry.items():
        assert getattr(new, key) == (_pair(value) if key in ("stride", "padding", "dilation")
                                     and not isinstance(value, str) else value)


@pytest.mark.parametrize("geometry", list(GEOMETRIES.values()), ids=list(GEOMETRIES))
def test_conv_full_form_keeps_its_parameters(geometry):
    layer = conv_layer("svd", 4, "full", geometry, bias=False)
    weight = layer.weight
    new = check_same_function(layer, "factored", torch.randn(2, 6, 9, 10, dtype=F64))
    assert type(new) is nn.Conv2d and new.weight is weight and new.bias is None


@pytest.mark.parametrize("lowrank", ["factored", "dense"])
@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
@pytest.mark.parametrize("dec, rank", [("svd", 4), ("tucker", (3, 4))])
def test_a_channels_last_conv_unconverts_channels_last(dec, rank, form, lowrank):
    layer = conv_layer(dec, rank, form, GEOMETRIES["stride2"]).to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 9, 10, dtype=F64).to(memory_format=torch.channels_last)
    new = check_same_function(layer, lowrank, x)
    kernels = [p for p in new.parameters() if p.dim() == 4]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert any(not p.is_contiguous() for p in kernels)       # not only 1×1 kernels, alike in both layouts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "tucker", "tkd-cpd"])
def test_merge_is_inflates_merge_and_keeps_dtype(kind, dtype):
    """The merged weight is bitwise what inflate() makes (fp32-accumulated), in the layer's dtype."""
    if kind == "linear":
        layer = linear_layer("adapter", dtype)
    else:
        layer = conv_layer(kind, (3, 4) if kind == "tucker" else (3, 4, 5), "adapter", GEOMETRIES["stride2"], dtype)
    inflated = copy.deepcopy(layer).inflate().weight
    model = nn.Sequential(layer)
    unconvert_model(model)
    assert model[0].weight.dtype == dtype and model[0].weight.device == inflated.device
    assert torch.equal(model[0].weight, inflated)
    assert not model[0].weight.requires_grad                       # W_f was frozen


# ---------------------------------------------------------------------------
# Gradients, trainability, modes
# ---------------------------------------------------------------------------

def test_gradients_reach_the_factored_weights_and_match_the_layer():
    layer = linear_layer("lowrank")
    x = torch.randn(4, 12, dtype=F64, requires_grad=True)
    layer(x).square().sum().backward()
    dx, dbias = x.grad.clone(), layer.bias.grad.clone()
    x.grad = None
    layer.bias.grad = None
    model = nn.Sequential(layer)
    unconvert_model(model)
    model(x).square().sum().backward()
    assert rel_err(x.grad, dx) < TOL and rel_err(model[0][1].bias.grad, dbias) < TOL
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_frozen_parts_stay_frozen():
    # Linear: a frozen B gives a frozen first weight; the bias keeps its flag.
    layer = linear_layer("lowrank")
    layer.B.requires_grad_(False)
    layer.bias.requires_grad_(False)
    model = nn.Sequential(layer)
    unconvert_model(model)
    assert not model[0][0].weight.requires_grad and model[0][1].weight.requires_grad
    assert not model[0][1].bias.requires_grad
    # Adapter: the merged weight is as frozen as W_f was (a base the user unfroze stays trainable).
    layer = linear_layer("adapter")
    layer.weight.requires_grad_(True)
    model = nn.Sequential(layer)
    unconvert_model(model)
    assert model[0].weight.requires_grad
    # lowrank="dense": trainable where any factor was.
    layer = linear_layer("lowrank")
    layer.A.requires_grad_(False)
    model = nn.Sequential(layer)
    unconvert_model(model, lowrank="dense")
    assert model[0].weight.requires_grad


@pytest.mark.parametrize("context", ["grad", "no_grad", "inference_mode"])
def test_fused_factors_are_trainable_where_a_source_is(context):
    """tkd-cpd fuses core_in·B into one 1×1 conv: it is frozen only when both are; under no_grad or
    inference_mode the rule holds and the new parameters are ordinary tensors that train."""
    layer = conv_layer("tkd-cpd", (3, 4, 5), "lowrank", GEOMETRIES["stride2"])
    layer.core_in.requires_grad_(False)
    layer.A.requires_grad_(False)
    layer.core_out.requires_grad_(False)
    model = nn.Sequential(layer)
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[context]
    with ctx():
        unconvert_model(model)
    head, kh, kw, tail = model[0]
    assert head.weight.requires_grad                    # B is trainable
    assert not tail.weight.requires_grad                # A and core_out both frozen
    assert kh.weight.requires_grad and kw.weight.requires_grad
    assert not any(p.is_inference() for p in model.parameters())
    model(torch.randn(1, 6, 5, 5, dtype=F64)).sum().backward()
    assert head.weight.grad is not None and tail.weight.grad is None
    # A merged weight too is an ordinary tensor.
    model = nn.Sequential(linear_layer("adapter"), linear_layer("lowrank"))
    model[0].weight.requires_grad_(True)
    with ctx():
        unconvert_model(model, lowrank="dense")
    assert not any(p.is_inference() for p in model.parameters())
    assert model[0].weight.requires_grad and model[1].weight.requires_grad


def test_train_and_eval_mode_carry_over():
    model = nn.Sequential(linear_layer("lowrank"), conv_layer("cp", 5, "lowrank", GEOMETRIES["stride2"]))
    model[0].eval()
    unconvert_model(model)
    assert not any(m.training for m in model[0].modules())
    assert all(m.training for m in model[1].modules())


# ---------------------------------------------------------------------------
# Whole models: sharing, transformers, plain torch afterwards
# ---------------------------------------------------------------------------

def test_shared_layers_stay_shared():
    lin = linear_layer("lowrank")
    block = nn.Sequential(linear_layer("adapter", bias=False))
    model = nn.Sequential(lin, nn.Tanh(), nn.Linear(10, 12), block, nn.Linear(10, 12), lin, nn.Linear(10, 12),
                          block).double()
    x = torch.randn(3, 12, dtype=F64)
    expected = model(x)
    summary = unconvert_model(model)
    assert model[0] is model[5] and model[3] is model[7] and isinstance(model[0], nn.Sequential)
    assert type(model[3][0]) is nn.Linear
    assert rel_err(model(x), expected) < TOL
    assert [(r["name"], r["aliases"]) for r in summary] == [("0", ["5"]), ("3.0", ["7.0"])]
    assert "also at 5" in str(summary)


def test_convert_then_unconvert_round_trip_and_summary():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2), nn.Flatten(), nn.Linear(8 * 9, 16), nn.ReLU(),
                          nn.Linear(16, 4)).double()
    convert_model(model, rank_ratio=0.5, decomposition="tucker", min_features=2)
    model[2].inflate().deflate(init="random")           # one adapter with a non-zero update
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    expected = model(x)
    before = sum(p.numel() for p in model.parameters())
    summary = unconvert_model(model)
    assert isinstance(summary, UnconversionSummary) and plain_only(model)
    assert rel_err(model(x), expected) < TOL
    assert [(r["name"], r["form"], r["new_type"]) for r in summary] == [
        ("0", "lowrank", "Sequential(3×Conv2d)"), ("2", "adapter", "Conv2d"),
        ("4", "lowrank", "Sequential(2×Linear)")]
    assert summary.params_before == before and summary.params_after == sum(p.numel() for p in model.parameters())
    assert summary.rows[1]["params_after"] == 8 * 8 * 9 + 8
    table = str(summary)
    assert "LowRankConv2d → Sequential(3×Conv2d)" in table and "3 dynrank layers → plain torch" in table
    assert repr(summary).startswith("UnconversionSummary(layers=3")


def _count_fused_calls(monkeypatch):
    calls = []
    fused = torch._transformer_encoder_layer_fwd

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    return calls


@pytest.mark.parametrize("lowrank", ["factored", "dense"])
def test_transformer_encoder_takes_torchs_fast_path_again(lowrank, monkeypatch):
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2).eval()
    assert encoder.use_nested_tensor
    convert_model(encoder, rank_ratio=0.5, keep_last=False)
    assert not encoder.use_nested_tensor
    calls = _count_fused_calls(monkeypatch)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        expected = encoder(x)
    assert not calls                                         # the guard: converted layers run as modules
    summary = unconvert_model(encoder, lowrank=lowrank)
    assert plain_only(encoder) and encoder.use_nested_tensor
    for enc_layer in encoder.layers:
        assert type(enc_layer.linear1) is nn.Linear and type(enc_layer.linear2) is nn.Linear
        assert not enc_layer._forward_pre_hooks and not hasattr(enc_layer, "_dynrank_fast_path_off")
    if lowrank == "factored":
        assert all(r["note"].startswith("dense: TransformerEncoderLayer reads") for r in summary)
    with torch.no_grad():
        y = encoder(x)
    assert len(calls) == 2                                   # one fused call per encoder layer
    assert rel_err(y, expected) < 1e-5


def test_unconverted_model_loads_and_runs_without_dynrank(tmp_path):
    """torch.save(model) loads in a process where dynrank cannot be imported, and gives the same output."""
    torch.manual_seed(3)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                                           batch_first=True), num_layers=1)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1, padding_mode="circular"), nn.Flatten(2),
                          nn.Linear(16, 8), enc, nn.Linear(8, 8), nn.Linear(8, 2))
    convert_model(model, rank_ratio=0.5, decomposition="cp", min_features=2)
    unconvert_model(model)
    model.eval()
    x = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        expected = model(x)
    torch.save({"model": model, "x": x, "y": expected}, tmp_path / "plain.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["dynrank"] = None            # any import of dynrank now fails
        import torch
        saved = torch.load({str(tmp_path / "plain.pt")!r}, weights_only=False)
        with torch.no_grad():
            y = saved["model"](saved["x"])
        assert torch.allclose(y, saved["y"], rtol=1e-5, atol=1e-6), (y - saved["y"]).abs().max()
        assert not any("dynrank" in type(m).__module__ for m in saved["model"].modules())
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_state_dict_is_plain_and_torchscript_compiles():
    torch.manual_seed(4)
    mlp = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    convert_model(mlp, rank_ratio=0.25)
    mlp[2].inflate().deflate(init="random")
    x = torch.randn(4, 12)
    expected = mlp(x)
    unconvert_model(mlp)
    assert sorted(mlp.state_dict()) == ["0.0.weight", "0.1.bias", "0.1.weight", "2.bias", "2.weight",
                                        "4.bias", "4.weight"]
    scripted = torch.jit.script(mlp)
    assert rel_err(scripted(x), expected) < REL_TOL[torch.float32]
    conv = nn.Sequential(conv_layer("cp", 5, "lowrank", GEOMETRIES["reflect"], torch.float32))
    xc = torch.randn(1, 6, 9, 10)
    expected = conv(xc)
    unconvert_model(conv)
    assert rel_err(torch.jit.script(conv)(xc), expected) < REL_TOL[torch.float32]


def test_data_parallel_is_unwrapped():
    model = nn.DataParallel(nn.Sequential(linear_layer("lowrank")))
    assert unconvert_model(model).names == ["0"]                # named as in the module, not "module.0"
    assert isinstance(model.module[0], nn.Sequential) and plain_only(model.module)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

class OddLayer(FormLayer):
    """A FormLayer subclass unconvert_model does not know."""


def test_bad_input_raises_and_leaves_the_model_as_it_was():
    with pytest.raises(TypeError, match="must be a torch.nn.Module, got dict"):
        unconvert_model({})
    model = nn.Sequential(linear_layer("lowrank"))
    with pytest.raises(ValueError, match="lowrank must be one of 'factored', 'dense', got 'fused'"):
        unconvert_model(model, lowrank="fused")
    with pytest.raises(ValueError, match="lowrank must be one of"):
        unconvert_model(model, lowrank=["dense"])
    with pytest.raises(ValueError, match="found no dynrank layer"):
        unconvert_model(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="is itself a dynrank layer"):
        unconvert_model(linear_layer("full"))
    first = model[0]
    model.append(OddLayer())
    with pytest.raises(TypeError, match="'1' is a OddLayer.*left as it was"):
        unconvert_model(model)
    assert model[0] is first and isinstance(model[1], OddLayer)


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_a_layer_holding_state_of_its_own_is_refused(form):
    """A gate Parameter or a mask buffer registered on a dynrank layer was dropped with it: gone from the
    state dict, the moved hook then failing on the missing attribute."""
    model = nn.Sequential(linear_layer(form), conv_layer("tucker", (3, 4), form, GEOMETRIES["stride2"]))
    model[0].gate = nn.Parameter(torch.full((model[0].out_features,), 0.5, dtype=F64))
    model[0].register_buffer("prune_mask", torch.ones(model[0].out_features, dtype=F64))
    layers, state = list(model), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^unconvert_model: '0' \(FusedLowRankLinear\) holds parameter 'gate', "
                                         r"buffer 'prune_mask' of its own, beyond its weight, factors and bias, "
                                         r"which the plain module would drop; move them to another module or "
                                         r"delete them first; the model is left as it was$"):
        unconvert_model(model)
    after = model.state_dict()
    assert list(model) == layers and after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    del model[0].gate, model[0].prune_mask
    model[1].scale_net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"^unconvert_model: '1' \(LowRankConv2d\) holds module 'scale_net' of "
                                         r"its own, .* move it to another module or delete it first; the model "
                                         r"is left as it was$"):
        unconvert_model(model)
    assert list(model) == layers
    del model[1].scale_net
    unconvert_model(model)
    assert not any(isinstance(m, FormLayer) for m in model.modules())


# -- an optimizer and a scheduler around the unconverted model ---------------------------------------
def _scheduled_then_unconverted(model, opt, x, y, epoch, form, lowrank, steps):
    """``model`` trained ``steps`` steps an epoch under a DynamicRankScheduler (I=1, D=2) up to ``epoch``, where
    its first layer is in ``form``, then unconverted with ``lowrank``; returns the scheduler."""
    from _scheduling import train_steps
    from dynrank import DynamicRankScheduler
    sched = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
    for e in range(epoch + 1):
        sched.step(e)
        train_steps(model, opt, x, y, steps=steps)
    assert model[0].form == form
    unconvert_model(model, lowrank=lowrank)
    return sched


@pytest.mark.parametrize("epoch, form", [(0, "lowrank"), (1, "full"), (2, "adapter")])
@pytest.mark.parametrize("lowrank", ["factored", "dense"])
def test_the_schedulers_optimizer_trains_the_unconverted_model(epoch, form, lowrank):
    """The scheduler's optimizer is edited in place: it holds exactly the new modules' trainable
    parameters (the lowrank factors' rebuilt weights trained no more before), and every one of them
    moves at the next step.  The scheduler refuses to step layers the model no longer holds (a full
    layer's deflate froze the nn.Linear's own weight, the same Parameter, without a word)."""
    from _scheduling import data, held, mlp, same_set, trainable, train_steps
    model = mlp()
    x, y = data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = _scheduled_then_unconverted(model, opt, x, y, epoch, form, lowrank, steps=1)
    assert same_set(held(opt), trainable(model))
    before = [p.detach().clone() for p in trainable(model)]
    train_steps(model, opt, x, y, steps=1)
    assert all(not torch.equal(p, q) for p, q in zip(trainable(model), before))
    for call in (lambda: sched.step(epoch + 1), lambda: sched.load_state_dict(sched.state_dict())):
        with pytest.raises(RuntimeError, match=r"layer '0' was replaced by unconvert_model, so this "
                                               r"DynamicRankScheduler manages layers the model no longer holds"):
            call()
    assert same_set(held(opt), trainable(model))


@pytest.mark.parametrize("named", [False, True], ids=["params", "named-params"])
@pytest.mark.parametrize("epoch, form", [(0, "lowrank"), (1, "full"), (2, "adapter")])
@pytest.mark.parametrize("lowrank", ["factored", "dense"])
def test_the_kept_optimizer_lists_the_models_order_and_resumes_in_plain_torch(epoch, form, lowrank, named):
    """A switch puts an inflated W after its layer's bias in the optimizer, and unconvert_model kept that order:
    saved with the plain model and loaded into SGD(plain.parameters()), the bias's momentum landed on the
    weight and the first step failed (a factored chain's too).  The kept optimizer now lists the trainable
    parameters in model.parameters() order, so the plain-torch resume steps exactly as the kept one does."""
    import io
    from _scheduling import data, held, mlp, train_steps
    model = mlp().double()
    x, y = data(F64)
    params = model.named_parameters() if named else model.parameters()
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    _scheduled_then_unconverted(model, opt, x, y, epoch, form, lowrank, steps=2)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [id(p) for p in held(opt)] == [id(p) for _, p in trained]
    if named:
        assert opt.param_groups[0]["param_names"] == [n for n, _ in trained]
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    plain = copy.deepcopy(model)                      # plain torch modules only, as a script without dynrank builds
    plain.load_state_dict(checkpoint["model"])
    plain_opt = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    plain_opt.load_state_dict(checkpoint["optimizer"])
    assert train_steps(plain, plain_opt, x, y, steps=2) == train_steps(model, opt, x, y, steps=2)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name


def test_a_kept_lbfgs_starts_afresh_where_unconvert_reorders_its_parameters():
    """L-BFGS keeps its history flat over its parameters in order: where unconvert_model puts a full layer's
    W back before its bias, the history starts afresh, and the kept optimizer steps as a new L-BFGS over
    model.parameters() does."""
    from _scheduling import data, held
    from dynrank import DynamicRankScheduler

    def lbfgs_steps(net, optimizer, steps=2):
        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss
        for _ in range(steps):
            optimizer.step(closure)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3)).double()
    # Layer "0" stays dense: L-BFGS keeps its history on its first parameter, which then stays where it is.
    convert_model(model, rank_ratio=0.25, include=["2"])
    x, y = data(F64)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=4)
    sched = DynamicRankScheduler(model, opt, inflate_epoch=0, deflate_epoch=None)
    sched.step(0)
    lbfgs_steps(model, opt)
    unconvert_model(model)
    assert [id(p) for p in held(opt)] == [id(p) for p in model.parameters()]
    plain = copy.deepcopy(model)
    lbfgs_steps(plain, torch.optim.LBFGS(plain.parameters(), lr=0.5, max_iter=3, history_size=4))
    lbfgs_steps(model, opt)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name


def test_the_incremental_rank_scheduler_refuses_to_grow_unconverted_layers():
    from _scheduling import held, same_set, trainable
    from dynrank.inrank import IncrementalRankScheduler
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    convert_model(model, rank_ratio=0.5, keep_last=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = IncrementalRankScheduler(model, opt, init_rank=2, buffer=2, warmup_steps=0, check_every=1)
    unconvert_model(model)
    assert same_set(held(opt), trainable(model))
    with pytest.raises(RuntimeError, match=r"layer '0' was replaced by unconvert_model, so this "
                                           r"IncrementalRankScheduler"):
        sched.step(1)


# -- what the replaced layers keep alive -------------------------------------------------------------
def _tensor_refs(layers):
    """Name → weak reference for every parameter of ``layers`` and every gradient they hold."""
    refs = {}
    for i, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            refs[f"{i}.{name}"] = weakref.ref(p)
            if p.grad is not None:
                refs[f"{i}.{name}.grad"] = weakref.ref(p.grad)
    return refs


def _alive(refs):
    gc.collect()
    return {name for name, ref in refs.items() if ref() is not None}


def _refuses(layer, x):
    """The replaced ``layer`` refuses to run or change form, naming unconvert_model."""
    message = rf"this {type(layer).__name__} was replaced by unconvert_model"
    for call in (lambda: layer(x), lambda: layer.forward(x), layer.inflate, layer.deflate,
                 lambda: layer.load_state_dict({"weight": torch.zeros(layer._dense_shape(), dtype=F64)},
                                               strict=False)):
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("epoch, form", [(0, "lowrank"), (1, "full"), (2, "adapter")])
@pytest.mark.parametrize("lowrank", ["factored", "dense"])
def test_a_scheduler_keeps_no_tensor_of_the_layers_unconvert_model_replaced(epoch, form, lowrank):
    """A scheduler holds the layers it manages: after unconvert_model they kept their W_f, their factors
    and the factors' gradients alive beside the new modules (an adapter's dense weight three times over)
    for as long as the scheduler lived, though it refuses those layers.  Now only the tensors the new
    modules hold stay alive (every bias; a full layer's W, the new nn.Linear's own, and their gradients),
    the model computes the old function and trains, and the old layers refuse to run or switch."""
    from _scheduling import held, mlp, same_set, train_steps, trainable
    from dynrank import DynamicRankScheduler
    model = mlp().double()
    x, y = torch.randn(32, 12, dtype=F64), torch.randint(0, 3, (32,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
    for e in range(epoch + 1):
        sched.step(e)
        train_steps(model, opt, x, y, steps=1)
    old = [model[0], model[2]]
    assert [layer.form for layer in old] == [form, form]
    refs = _tensor_refs(old)
    shared = ["bias", "bias.grad"] + (["weight", "weight.grad"] if form == "full" else [])
    assert {f"{i}.{n}" for i in (0, 1) for n in shared} <= set(refs)
    assert form == "full" or {"0.A", "0.A.grad", "0.B", "0.B.grad"} <= set(refs)
    with torch.no_grad():
        expected = model(x)
    unconvert_model(model, lowrank=lowrank)
    assert _alive(refs) == {f"{i}.{n}" for i in (0, 1) for n in shared}
    assert rel_err(model(x), expected) < TOL
    for call in (lambda: sched.step(epoch + 1), lambda: sched.load_state_dict(sched.state_dict())):
        with pytest.raises(RuntimeError, match=r"layer '0' was replaced by unconvert_model, so this "
                                               r"DynamicRankScheduler manages layers the model no longer holds"):
            call()
    assert sched.forms() == {"0": form, "2": form}
    for layer in old:
        _refuses(layer, x)
    # The new modules train with the scheduler's optimizer.
    assert same_set(held(opt), trainable(model))
    before = [p.detach().clone() for p in trainable(model)]
    train_steps(model, opt, x, y, steps=1)
    assert all(not torch.equal(p, q) for p, q in zip(trainable(model), before))


def test_an_incremental_rank_scheduler_keeps_no_tensor_of_the_layers_unconvert_model_replaced():
    from _scheduling import train_steps
    from dynrank.inrank import IncrementalRankScheduler, grow_rank_
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    convert_model(model, rank_ratio=0.5)
    x, y = torch.randn(32, 16, dtype=F64), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    growth = IncrementalRankScheduler(model, opt, init_rank=2, buffer=2, warmup_steps=0, check_every=1)
    train_steps(model, opt, x, y, steps=2)
    old = model[0]
    refs = _tensor_refs([old])
    assert {"0.A", "0.A.grad", "0.B", "0.B.grad", "0.bias", "0.bias.grad"} <= set(refs)
    with torch.no_grad():
        expected = model(x)
    unconvert_model(model)
    assert _alive(refs) == {"0.bias", "0.bias.grad"}
    assert rel_err(model(x), expected) < TOL
    with pytest.raises(RuntimeError, match=r"layer '0' was replaced by unconvert_model, so this "
                                           r"IncrementalRankScheduler"):
        growth.step(1)
    assert growth.ranks == {"0": 4}
    _refuses(old, x)
    with pytest.raises(RuntimeError, match="this FusedLowRankLinear was replaced by unconvert_model"):
        grow_rank_(old, 5)
    before = [p.detach().clone() for p in model[0].parameters()]
    train_steps(model, opt, x, y, steps=1)
    assert all(not torch.equal(p, q) for p, q in zip(model[0].parameters(), before))


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_replaced_layer_holds_only_its_bias_and_refuses_to_run(kind, form):
    """Kept by the user, a replaced layer held all its tensors and their gradients and ran on: it now holds
    only its bias (the new module's), and a call, a load or a form change raises a RuntimeError naming
    unconvert_model, not an AttributeError on a released tensor."""
    layer = linear_layer(form) if kind == "linear" else conv_layer("tucker", (3, 4), form, GEOMETRIES["stride2"])
    x = torch.randn(2, 12, dtype=F64) if kind == "linear" else torch.randn(2, 6, 9, 10, dtype=F64)
    layer(x).square().sum().backward()
    refs = _tensor_refs([layer])
    expected = layer(x).detach()
    model = nn.Sequential(layer)
    unconvert_model(model)
    new_ids = {id(p) for p in model.parameters()} | {id(p.grad) for p in model.parameters() if p.grad is not None}
    gc.collect()
    assert {n for n, r in refs.items() if r() is not None and id(r()) not in new_ids} == set()
    assert [n for n, _ in layer.named_parameters()] == ["bias"] and any(layer.bias is p for p in model.parameters())
    assert rel_err(model(x), expected) < TOL
    _refuses(layer, x)
    assert layer.form == form and repr(layer)                  # still described, for a message or a log


def test_a_replaced_layer_and_the_scheduler_holding_it_still_save():
    """The replaced layer's refusals were closures: torch.save of it, or of a scheduler holding it, failed
    (Can't pickle local object).  Loaded back, the layer refuses as before."""
    import io
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    convert_model(model, rank_ratio=0.5, min_features=1)
    old = model[0]
    from dynrank import DynamicRankScheduler
    scheduler = DynamicRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, 2)
    unconvert_model(model)
    for thing in (old, scheduler):
        buffer = io.BytesIO()
        torch.save(thing, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        layer = loaded if thing is old else loaded._layers[0][1]
        with pytest.raises(RuntimeError, match="was replaced by unconvert_model"):
            layer(torch.randn(2, 8))
