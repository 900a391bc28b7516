"""Drop-in behaviour of the layers: parameter order, geometry edits after construction, the input passed
by keyword (``input=``), torch.fx symbolic tracing, the message for an input that is not floating-point, and
dynrank layers inside torch's transformer modules."""

import copy
import io
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _helpers import REL_TOL, rel_err
from dynrank import DynamicRankScheduler, FusedLowRankLinear, IncrementalRankScheduler, convert_model
from dynrank.conv import LowRankConv2d
from dynrank.functional import lowrank_linear
from dynrank.kernels.conv_merge import reference_kernel

F64 = torch.float64
TOL = REL_TOL[F64]
RANKS = {"svd": 3, "tucker": (2, 3), "cp": 3, "tkd-cpd": (2, 3, 3)}
DECOMPOSITIONS = list(RANKS)
PADDING_MODES = ["zeros", "reflect", "circular", "replicate"]

# Every form, with every decomposition's factor chain: (form, decomposition, adapter strategy).
CONFIGS = ([("lowrank", dec, "auto") for dec in DECOMPOSITIONS] + [("full", "svd", "auto")]
           + [("adapter", dec, strategy) for dec in DECOMPOSITIONS for strategy in ("chain", "merged", "auto")])
CONFIG_IDS = ["-".join(c) for c in CONFIGS]


def make_conv(config, kernel_size=(3, 2), **geometry):
    form, dec, strategy = config
    layer = LowRankConv2d(4, 5, kernel_size, rank=RANKS[dec], decomposition=dec, form=form,
                          adapter_strategy=strategy, dtype=F64, **geometry)
    with torch.no_grad():
        for p in layer.factors().values():          # an adapter's chain contributes too
            p.normal_(0.0, 0.5)
    return layer


def effective_kernel(layer):
    """The dense kernel the layer computes with: W, the merged factors, or W_f plus them."""
    kernel = None if layer.weight is None else layer.weight.detach()
    if layer.form != "full":
        merged = reference_kernel(layer.decomposition, {n: p.detach() for n, p in layer.factors().items()},
                                  layer.scale, layer.groups)
        kernel = merged if kernel is None else kernel + merged
    return kernel


def expected_output(layer, x):
    """F.conv2d with the effective kernel and the layer's current geometry, padded as nn.Conv2d pads."""
    kernel, bias = effective_kernel(layer), layer.bias.detach()
    padding = layer.padding
    if layer.padding_mode == "zeros":
        return F.conv2d(x, kernel, bias, layer.stride, padding, layer.dilation, layer.groups)
    if padding == "same":
        amounts = []
        for k, d in zip(reversed(layer.kernel_size), reversed(layer.dilation)):
            total = d * (k - 1)
            amounts += [total // 2, total - total // 2]
    else:
        amounts = [padding[1], padding[1], padding[0], padding[0]]
    x = F.pad(x, amounts, mode=layer.padding_mode)
    return F.conv2d(x, kernel, bias, layer.stride, 0, layer.dilation, layer.groups)


def check_output(layer, x):
    y = layer(x)
    expected = expected_output(layer, x)
    assert y.shape == expected.shape, (tuple(y.shape), tuple(expected.shape))
    assert rel_err(y, expected) < TOL
    return y


def check_form_changes_keep_function(layer, x):
    """inflate/deflate(init="zeros") in the order the form allows: each keeps the (edited) function."""
    before = check_output(layer, x)
    steps = {"lowrank": ["inflate", "deflate"], "full": ["deflate", "inflate"], "adapter": ["inflate", "deflate"]}
    for step in steps[layer.form]:
        if step == "inflate":
            layer.inflate()
        else:
            layer.deflate(init="zeros")
        after = check_output(layer, x)
        assert rel_err(after, before) < TOL, step



# -- parameter order ---------------------------------------------------------------------------------

def test_full_form_lists_parameters_as_the_plain_model_and_resumes_its_optimizer():
    """Optimizers and flat parameter vectors match parameters by position.  Full form listed (bias, weight)
    where nn.Linear/nn.Conv2d list (weight, bias): an optimizer state saved with the plain model put each
    layer's weight moments on its bias (RuntimeError at the first step).  Now it resumes as the plain one."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.ReLU(),
                          nn.Linear(6, 5)).double()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    optimizer = torch.optim.Adam(plain.parameters(), lr=0.1)
    plain(x).square().sum().backward()
    optimizer.step()
    converted = copy.deepcopy(plain)
    convert_model(converted, form="full", min_features=1, keep_last=False)
    assert [type(m) for m in converted if m._parameters] == [LowRankConv2d, FusedLowRankLinear, FusedLowRankLinear]
    assert [n for n, _ in converted.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(converted.state_dict()) == list(plain.state_dict())
    resumed = torch.optim.Adam(converted.parameters(), lr=0.1)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))      # as from a checkpoint: its own moments
    for model, opt in ((plain, optimizer), (converted, resumed)):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    after = dict(converted.named_parameters())
    for name, p in plain.named_parameters():
        assert rel_err(after[name], p) < TOL, name
    assert rel_err(converted(x), plain(x)) < TOL


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_parameter_order_is_weight_bias_factors_in_every_form(kind, bias):
    """weight, bias, then the factors, whichever form the layer was built in and through every switch."""
    def build(form):
        if kind == "linear":
            return FusedLowRankLinear(6, 5, 2, bias=bias, form=form)
        return LowRankConv2d(4, 5, 3, rank=RANKS["tucker"], decomposition="tucker", bias=bias, form=form)

    def expected(layer):
        names = ["weight"] if layer.form != "lowrank" else []
        names += ["bias"] if bias else []
        return names + (list(layer._factor_names(layer.rank)) if layer.form != "full" else [])

    for form in ("lowrank", "full", "adapter"):
        layer = build(form)
        for switch in ([] if form == "full" else ["inflate"]) + ["deflate", "inflate", "deflate"]:
            names = [n for n, _ in layer.named_parameters()]
            assert names == expected(layer) and list(layer.state_dict()) == names, (form, layer.form, names)
            getattr(layer, switch)()

# -- geometry edits apply at the next forward, as nn.Conv2d's -------------------------------------

PADDING_EDITS = [("padding", 2), ("padding", (0, 1)), ("padding", [2, 0]), ("padding", "same"),
                 ("padding", "valid"), ("padding_mode", "reflect"), ("padding_mode", "circular"),
                 ("padding_mode", "replicate"), ("padding_mode", "zeros")]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("attr, value", PADDING_EDITS, ids=[f"{a}={v}" for a, v in PADDING_EDITS])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_padding_edits_apply_at_the_next_forward(config, attr, value):
    """An edit of ``padding`` or ``padding_mode`` changes the next forward in every form and adapter
    strategy, and inflate/deflate afterwards keep the edited function."""
    mode = "circular" if (attr, value) == ("padding_mode", "zeros") else "zeros"
    layer = make_conv(config, padding=(2, 1), padding_mode=mode)
    x = torch.randn(2, 4, 6, 7, dtype=F64)
    check_output(layer, x)
    setattr(layer, attr, value)
    check_form_changes_keep_function(layer, x)


NOSTRIDE_DILATE = [
    # (geometry at construction, edits in the order segmentation code makes them)
    (dict(stride=2, padding=1), dict(stride=(1, 1), dilation=(2, 2), padding=(2, 2))),
    (dict(stride=2, padding=1, padding_mode="reflect"), dict(stride=(1, 1), dilation=(2, 2), padding=(2, 2))),
    (dict(stride=(2, 1), padding=(1, 0), padding_mode="replicate"), dict(stride=1, dilation=(2, 1), padding=(2, 1))),
    (dict(padding="same", padding_mode="circular"), dict(dilation=(2, 3))),     # "same" follows the dilation
    (dict(stride=2), dict(stride=1, padding="same")),
]


@pytest.mark.parametrize("built, edits", NOSTRIDE_DILATE, ids=[str(i) for i in range(len(NOSTRIDE_DILATE))])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_nostride_dilate_edits_apply_at_the_next_forward(config, built, edits):
    """torchvision's / PSPNet's "_nostride_dilate": stride, dilation and padding rewritten in place."""
    layer = make_conv(config, kernel_size=3, **built)
    x = torch.randn(2, 4, 9, 8, dtype=F64)
    check_output(layer, x)
    for attr, value in edits.items():
        setattr(layer, attr, value)
    check_form_changes_keep_function(layer, x)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_same_padding_with_a_stride_is_refused_by_the_forward(config):
    """padding="same" beside a stride other than 1 is refused, in every padding mode, by the next forward
    (as nn.Conv2d's is), so the two may be edited in either order."""
    x = torch.randn(1, 4, 6, 7, dtype=F64)
    for mode in PADDING_MODES:
        layer = make_conv(config, padding="same", padding_mode=mode)
        layer.stride = 2                                   # allowed: the padding may come next
        with pytest.raises(RuntimeError, match="padding='same' is not supported for strided convolutions"):
            layer(x)
        layer.padding = 1
        check_output(layer, x)
        layer.padding = "same"                             # and back, in the other order
        with pytest.raises(RuntimeError, match="padding='same'"):
            layer(x)
        layer.stride = (1, 1)
        check_output(layer, x)


BAD_EDITS = [
    ("padding", -1, ValueError, "padding must be an int ≥ 0 or a pair of them, got -1"),
    ("padding", (1, 2, 3), ValueError, "padding must be an int ≥ 0 or a pair of them, got (1, 2, 3)"),
    ("padding", 1.5, TypeError, "padding must be an int ≥ 0 or a pair of them"),
    ("padding", "full", ValueError, "padding must be an int, a pair, 'valid' or 'same', got 'full'"),
    ("padding_mode", "mirror", ValueError,
     "padding_mode must be one of zeros, reflect, replicate, circular, got 'mirror'"),
    ("padding_mode", None, ValueError, "padding_mode must be one of"),
    ("stride", 0, ValueError, "stride must be an int ≥ 1 or a pair of them, got 0"),
    ("stride", (1, "2"), TypeError, "stride must be an int ≥ 1 or a pair of them"),
    ("dilation", (1, 0), ValueError, "dilation must be an int ≥ 1 or a pair of them"),
    ("dilation", None, TypeError, "dilation must be an int ≥ 1 or a pair of them"),
]


@pytest.mark.parametrize("attr, value, error, words", BAD_EDITS, ids=[f"{a}={v!r}" for a, v, _, _ in BAD_EDITS])
def test_bad_geometry_edits_are_refused_and_change_nothing(attr, value, error, words):
    layer = make_conv(("lowrank", "svd", "auto"), stride=(1, 2), padding=(2, 1), padding_mode="reflect")
    before = (layer.stride, layer.padding, layer.dilation, layer.padding_mode)
    x = torch.randn(1, 4, 6, 7, dtype=F64)
    y = layer(x)
    with pytest.raises(error, match=re.escape(words)):
        setattr(layer, attr, value)
    assert (layer.stride, layer.padding, layer.dilation, layer.padding_mode) == before
    assert torch.equal(layer(x), y)


def test_edited_values_are_normalized_as_the_constructors():
    layer = make_conv(("full", "svd", "auto"))
    layer.stride, layer.dilation, layer.padding = 2, [1, 2], "valid"
    assert (layer.stride, layer.dilation, layer.padding) == ((2, 2), (1, 2), (0, 0))
    layer.stride, layer.padding = (1, 1), 1
    assert layer.padding == (1, 1) and "padding=(1, 1)" in repr(layer) and "stride" not in repr(layer)


def test_edited_geometry_survives_copies_and_pickling():
    """deepcopy and a whole-layer pickle keep the edited geometry, and a layer pickled whole by an older
    dynrank (its geometry as plain attributes) loads and runs."""
    layer = make_conv(("adapter", "tucker", "chain"), stride=2, padding=1)
    x = torch.randn(2, 4, 9, 8, dtype=F64)
    layer.stride, layer.dilation, layer.padding, layer.padding_mode = 1, 2, (2, 1), "reflect"
    expected = check_output(layer, x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        assert torch.equal(clone(x), expected)
    old = copy.deepcopy(layer)
    state = old.__getstate__()
    for name in ("stride", "dilation", "padding", "padding_mode"):
        state[name] = state.pop("_" + name)
    state["_pad"], state["_conv_padding"] = None, (0, 0)           # stale, as an old layer may hold them
    fresh = LowRankConv2d.__new__(LowRankConv2d)
    fresh.__setstate__(state)
    assert fresh.padding == (2, 1) and torch.equal(fresh(x), expected)


# -- torch.fx.symbolic_trace -----------------------------------------------------------------------

def traced_matches(model, x):
    gm = torch.fx.symbolic_trace(model)
    y = gm(x)
    assert rel_err(y, model(x)) < TOL
    return gm, y


def call_module_targets(gm):
    return [node.target for node in gm.graph.nodes if node.op == "call_module"]


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_fx_records_the_conv_as_one_call_module_node(config):
    """As nn.Conv2d: one call_module node calling the layer itself, which it follows through form changes
    and geometry edits; gradients reach the layer's parameters."""
    model = nn.Sequential(nn.Identity(), nn.Sequential(make_conv(config, padding=1), nn.ReLU()))
    layer = model[1][0]
    x = torch.randn(2, 4, 6, 7, dtype=F64)
    gm, y = traced_matches(model, x)
    assert "1.0" in call_module_targets(gm) and gm.get_submodule("1.0") is layer
    y.sum().backward()
    trained = [p for p in layer.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    assert gm(x[0]).shape == model(x[0]).shape                   # unbatched input: the layer's own forward
    if layer.form == "full":
        layer.deflate(init="svd")
    else:
        layer.inflate()
    layer.padding_mode = "circular"
    assert rel_err(gm(x), model(x)) < TOL


def test_fx_traces_the_linear_layer_in_every_form():
    """FusedLowRankLinear inside a traced model is one call_module node, as nn.Linear is, so the graph
    follows its form changes; as the traced root it is traced through (F.linear in full form, one
    dynrank.functional.lowrank_linear call otherwise)."""
    x = torch.randn(3, 2, 6, dtype=F64)
    for form in ("lowrank", "full", "adapter"):
        layer = FusedLowRankLinear(6, 5, 2, form=form, dtype=F64)
        with torch.no_grad():
            for p in layer.factors().values():
                p.normal_()
        model = nn.Sequential(layer, nn.ReLU())
        gm, y = traced_matches(model, x)
        assert "0" in call_module_targets(gm) and gm.get_submodule("0") is layer
        y.sum().backward()
        assert all(p.grad is not None for p in layer.parameters() if p.requires_grad), form
        if form == "full":
            layer.deflate(init="svd")
            with torch.no_grad():
                layer.A.normal_()
        else:
            layer.inflate()
        assert rel_err(gm(x), model(x)) < TOL, form
        root, _ = traced_matches(layer, x)
        targets = [node.target for node in root.graph.nodes if node.op == "call_function"]
        assert (F.linear in targets) if layer.form == "full" else (lowrank_linear in targets), form


def test_fx_traces_lowrank_linear_given_traced_operands():
    """A model passing its own parameters (FX proxies) to the functional op beside a constant input."""
    const = torch.randn(3, 6, dtype=F64)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.A = nn.Parameter(torch.randn(5, 2, dtype=F64))
            self.B = nn.Parameter(torch.randn(6, 2, dtype=F64))

        def forward(self, scale):
            return lowrank_linear(const, None, self.A, self.B) * scale

    traced_matches(Model(), torch.tensor(2.0, dtype=F64))


def test_fx_tracing_the_conv_itself_says_how_to_proceed():
    layer = make_conv(("lowrank", "svd", "auto"))
    with pytest.raises(TypeError, match=re.escape(
            "torch.fx.symbolic_trace reached the forward of LowRankConv2d as the traced root")) as info:
        torch.fx.symbolic_trace(layer)
    assert "nn.Sequential(layer)" in str(info.value) and "torch.export" in str(info.value)


# -- the input by keyword -------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_the_input_passes_by_keyword_as_to_nn_linear_and_nn_conv2d(form):
    """``nn.Linear.forward`` and ``nn.Conv2d.forward`` name their argument ``input``: ``layer(input=x)``
    computes what ``layer(x)`` does, in every form."""
    linear = FusedLowRankLinear(6, 5, 2, form=form, dtype=F64)
    with torch.no_grad():
        for p in linear.factors().values():
            p.normal_()
    x = torch.randn(3, 6, dtype=F64)
    weight = linear.weight if form != "lowrank" else torch.zeros(5, 6, dtype=F64)
    if form != "full":
        weight = weight + linear.scale * linear.A @ linear.B.t()
    assert rel_err(linear(x), F.linear(x, weight.detach(), linear.bias.detach())) < TOL
    assert torch.equal(linear(input=x), linear(x))
    for dec in DECOMPOSITIONS:
        conv = make_conv((form, dec, "chain" if form == "adapter" else "auto"), padding=1)
        image = torch.randn(2, 4, 5, 6, dtype=F64)
        assert torch.equal(conv(input=image), check_output(conv, image)), dec
        assert torch.equal(conv(input=image[0]), conv(image[0])), dec          # unbatched


class _CallsByKeyword(nn.Module):
    """Calls its layers as ``self.proj(input=h)``, as public models do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, keyword=True):
        if not keyword:
            return self.head(self.proj(self.conv(x).mean((2, 3))))
        h = self.conv(input=x).mean((2, 3))
        return self.head(input=self.proj(input=h))


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_a_model_calling_its_layers_by_keyword_runs_after_convert_model(form):
    torch.manual_seed(0)
    plain = _CallsByKeyword().double()
    x = torch.randn(2, 4, 5, 6, dtype=F64)
    expected = plain(x)
    converted = copy.deepcopy(plain)
    convert_model(converted, rank_ratio=0.5, form=form, min_features=1, keep_last=False)
    assert [type(m) for m in converted.children()] == [LowRankConv2d, FusedLowRankLinear, FusedLowRankLinear]
    y = converted(x)
    assert torch.equal(y, converted(x, keyword=False))
    if form != "lowrank":                       # full and adapter (zero-output adapter) keep the function
        assert rel_err(y, expected) < TOL


# -- an input that is not floating-point -----------------------------------------------------------

NOT_FLOATING = [torch.int64, torch.bool, torch.complex128]


def check_not_floating_message(layer, x):
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with pytest.raises(TypeError) as info:
                layer(x)
        message = str(info.value)
        assert message == f"input must be a floating-point tensor, got {x.dtype}", (autocast, message)


@pytest.mark.parametrize("dtype", NOT_FLOATING)
def test_linear_says_the_input_must_be_floating_point_in_every_form(dtype):
    for form in ("lowrank", "full", "adapter"):
        check_not_floating_message(FusedLowRankLinear(6, 5, 2, form=form), torch.ones(3, 6, dtype=dtype))


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("dtype", NOT_FLOATING)
@pytest.mark.parametrize("config", [("lowrank", "svd", "auto"), ("lowrank", "cp", "auto"), ("full", "svd", "auto"),
                                    ("adapter", "tucker", "chain"), ("adapter", "tucker", "merged"),
                                    ("adapter", "svd", "auto")], ids="-".join)
def test_conv_says_the_input_must_be_floating_point(config, dtype, mode):
    layer = make_conv(config, padding=1, padding_mode=mode).float()
    check_not_floating_message(layer, torch.ones(1, 4, 5, 5, dtype=dtype))


# -- forward-mode AD ---------------------------------------------------------------------------------

def _tangent(layer, x, t):
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        return fwAD.unpack_dual(layer(fwAD.make_dual(x, t))).tangent


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_forward_mode_ad_through_the_linear_layer(form):
    """The adapter form's fused node has no jvp: forward-mode AD on a trained adapter raised torch's
    "You must implement the jvp function".  Under a dual level the layer runs autograd's own ops."""
    torch.manual_seed(0)
    layer = FusedLowRankLinear(5, 4, rank=2, form=form, dtype=F64)
    with torch.no_grad():
        for p in layer.factors().values():
            p.normal_()
    x, t = torch.randn(3, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    weight = layer.weight if form != "lowrank" else torch.zeros(4, 5, dtype=F64)
    if form != "full":
        weight = weight + layer.scale * layer.A @ layer.B.t()
    assert rel_err(_tangent(layer, x, t), t @ weight.detach().t()) < TOL
    jac = torch.autograd.functional.jacobian(layer, x, vectorize=True, strategy="forward-mode")
    assert rel_err(jac, torch.autograd.functional.jacobian(layer, x)) < TOL


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_forward_mode_ad_through_the_conv_layer(config):
    layer = make_conv(config, padding=1)
    x, t = torch.randn(2, 4, 5, 6, dtype=F64), torch.randn(2, 4, 5, 6, dtype=F64)
    expected = F.conv2d(t, effective_kernel(layer), None, layer.stride, layer.padding, layer.dilation)
    assert rel_err(_tangent(layer, x, t), expected) < TOL


# -- dynrank layers inside torch's transformer modules ---------------------------------------------

def _scheduler(model, form, kind="dynamic"):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if kind == "inrank":
        return IncrementalRankScheduler(model, optimizer)
    return DynamicRankScheduler(model, optimizer, inflate_epoch=1 if form == "lowrank" else None, deflate_epoch=2)


def _without_fast_path(model, *args, **kwargs):
    """The model's output with torch's fused transformer path off: each layer calls its linears."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@pytest.mark.parametrize("kind", ["dynamic", "inrank"])
@pytest.mark.parametrize("built", ["by hand", "by hand, in an encoder", "convert_model, then an encoder"])
@pytest.mark.parametrize("form", ["lowrank", "adapter"])
def test_the_scheduler_keeps_torch_encoders_off_their_fused_path(form, built, kind):
    # The fused path and the encoder's nested tensors read linear1.weight: W_f alone in adapter form, None in
    # lowrank form.  convert_model turns them off for the layers it converts; the scheduler does for the rest.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, dtype=F64)
    if built.startswith("convert_model"):
        convert_model(layer, form=form, keep_last=False)
    else:
        layer.linear1 = FusedLowRankLinear.from_dense(layer.linear1, rank=4, form=form)
        layer.linear2 = FusedLowRankLinear.from_dense(layer.linear2, rank=4, form=form)
    with torch.no_grad():
        for linear in (layer.linear1, layer.linear2):
            linear.A.normal_()                  # an adapter that changes the output
    model = layer if built == "by hand" else nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    _scheduler(model, form, kind)
    model.eval()
    x = torch.randn(3, 5, 16, dtype=F64)
    pads = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    with torch.no_grad():
        for kwargs in ({}, {"src_key_padding_mask": pads}):
            expected = _without_fast_path(model, x, **kwargs)
            if form == "adapter":
                plain = copy.deepcopy(model)
                for linear in plain.modules():
                    if isinstance(linear, FusedLowRankLinear):
                        linear.A.zero_()
                assert rel_err(expected, _without_fast_path(plain, x, **kwargs)) > 1e-2
            assert rel_err(model(x, **kwargs), expected) < TOL


@pytest.mark.parametrize("kind", ["dynamic", "inrank"])
@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_the_scheduler_refuses_a_dynrank_layer_inside_multihead_attention(form, kind):
    # nn.MultiheadAttention computes with out_proj.weight itself: no factor of out_proj would ever run.
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True))
    attention = model[0].self_attn
    attention.out_proj = FusedLowRankLinear.from_dense(attention.out_proj, rank=4, form=form)
    # InRank manages lowrank and adapter layers only: a full out_proj beside one it manages is left alone, and
    # computes right (the full form is the one that does there).
    managed = "lowrank" if kind == "inrank" and form == "full" else form
    model[0].linear1 = FusedLowRankLinear.from_dense(model[0].linear1, rank=4, form=managed)
    if kind == "inrank" and form == "full":
        growth = _scheduler(model, managed, kind)
        assert [name for name, _ in growth.layers] == ["0.linear1"]
        return
    with pytest.raises(ValueError, match=rf"'0\.self_attn\.out_proj' is a FusedLowRankLinear in {form} form inside "
                                         rf"nn\.MultiheadAttention, which reads its weight directly"):
        _scheduler(model, managed, kind)
    assert not model[0]._forward_pre_hooks      # refused before the encoder layer is guarded
