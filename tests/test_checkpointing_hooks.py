"""The layers under activation checkpointing, module and tensor hooks, and parametrizations.

``torch.utils.checkpoint`` (reentrant or not, ``checkpoint_sequential``, selective policies) around
every form of both layers on either engine, against the same model run without checkpointing (the
same ops: equal on CPU) and against a float64 reference of the math (the linear's
x·Wᵀ + s·(x·B)·Aᵀ + b, the conv's dense kernel W + s·merged factors); checkpointed blocks trained
through the scheduler's switches as the same blocks run plainly.  Module hooks see the layer's own
tensors in every form and keep firing through the switches; tensor hooks belong to the parameter a
switch may replace.  ``torch.nn.utils.parametrize`` on a factor or the weight.
"""

import contextlib
import functools
import logging
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint, checkpoint_sequential,
                                    create_selective_checkpoint_contexts)

import dynrank.conv
from _helpers import HAS_CUDA, REL_TOL, kernel_devices, rel_err
from dynrank import DynamicRankScheduler, FusedLowRankLinear, LowRankConv2d
from dynrank.conv_adapter import time_adapter_strategies
from dynrank.kernels import reference_lowrank_linear

BACKENDS = ["torch"] + (["triton"] if kernel_devices() else [])
DEVICE = kernel_devices()[0] if kernel_devices() else "cpu"
TOL = REL_TOL[torch.float32]
MODES = ["nonreentrant", "reentrant", "sequential"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("DYNRANK_BACKEND", request.param)
    return request.param


def _same(actual, expected):
    """Checkpointed against plain: the same ops, so equal on CPU (cuDNN may pick another algorithm on a GPU)."""
    if actual is None or expected is None:
        return actual is None and expected is None
    if actual.device.type == "cpu":
        return torch.equal(actual, expected)
    return rel_err(actual, expected) < TOL


# -- models and the float64 reference -----------------------------------------------------------

def _randomize_adapters(model):
    """An adapter starts with a zero factor; give every factor values so each term counts."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FusedLowRankLinear, LowRankConv2d)) and m.form == "adapter":
                for f in m.factors().values():
                    f.normal_(0.0, 0.3)


def _linear_model(form, bias=True):
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(17, 23, 4, bias=bias, form=form, alpha=6.0, device=DEVICE),
                          nn.GELU(),
                          FusedLowRankLinear(23, 11, 4, bias=bias, form=form, device=DEVICE))
    _randomize_adapters(model)
    return model, torch.randn(3, 2, 17, device=DEVICE)


def _conv_model(form, decomposition, strategy="auto"):
    torch.manual_seed(0)
    kw = dict(decomposition=decomposition, form=form, adapter_strategy=strategy, device=DEVICE)
    model = nn.Sequential(LowRankConv2d(4, 6, 3, rank=3, padding=1, alpha=4.0, **kw), nn.GELU(),
                          LowRankConv2d(6, 5, 3, rank=2, stride=2, padding=1, **kw))
    _randomize_adapters(model)
    return model, torch.randn(2, 4, 5, 5, device=DEVICE)


def _reference_module(module, prefix, leaves, h):
    """``module`` applied to the float64 ``h`` with the float64 ``leaves``, in plain torch ops."""
    def leaf(name):
        return leaves.get(f"{prefix}{name}")
    if isinstance(module, FusedLowRankLinear):
        if module.form == "full":
            return F.linear(h, leaf("weight"), leaf("bias"))
        return reference_lowrank_linear(h, leaf("weight"), leaf("A"), leaf("B"), leaf("bias"), module.scale)
    if isinstance(module, LowRankConv2d):
        kernel = leaf("weight")
        if module.form != "full":
            U, V = module._dec.operands({k: leaf(k) for k in module.factors()})
            merged = module.scale * (U @ V.reshape(V.shape[0], -1)).reshape(module._dense_shape())
            kernel = merged if kernel is None else kernel + merged
        return F.conv2d(h, kernel, leaf("bias"), module.stride, module.padding, module.dilation, module.groups)
    assert not list(module.parameters(recurse=False))
    return module(h)


def _run(model, x, upstream, mode="plain", **checkpoint_kwargs):
    """(output, input gradient, {name: gradient}) of ``sum(model(x) · upstream)``, the model run ``mode``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    if mode == "plain":
        y = model(x)
    elif mode == "sequential":
        y = checkpoint_sequential(model, 2, x, use_reentrant=False)
    else:
        y = checkpoint(model, x, use_reentrant=mode == "reentrant", **checkpoint_kwargs)
    (y * upstream).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def _run_reference(model, x, upstream):
    leaves = {n: p.detach().double().requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
    h = x.detach().double().requires_grad_(True)
    x64 = h
    for name, module in model.named_children():
        h = _reference_module(module, f"{name}.", leaves, h)
    (h * upstream.double()).sum().backward()
    return h.detach(), x64.grad, {n: t.grad for n, t in leaves.items()}


def _upstream(model, x):
    with torch.no_grad():
        shape = model(x).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _check_against_plain_and_float64(model, x, mode, **checkpoint_kwargs):
    g = _upstream(model, x)
    plain = _run(model, x, g)
    checkpointed = _run(model, x, g, mode, **checkpoint_kwargs)
    ref = _run_reference(model, x, g)
    y, dx, grads = checkpointed
    assert _same(y, plain[0]) and _same(dx, plain[1])
    assert grads.keys() == plain[2].keys() == ref[2].keys()
    for name, grad in grads.items():
        assert _same(grad, plain[2][name]), name
        assert (grad is None) == (ref[2][name] is None), name     # a frozen W_f gets no gradient
        if grad is not None:
            assert rel_err(grad, ref[2][name]) < TOL, name
    assert rel_err(y, ref[0]) < TOL and rel_err(dx, ref[1]) < TOL
    # every trained parameter got its gradient, the frozen W_f none
    assert all((grads[n] is None) == (not p.requires_grad) for n, p in model.named_parameters())


# -- checkpointing around every form ------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_checkpointed_linear_matches_plain_and_float64(backend, form, mode):
    model, x = _linear_model(form)
    _check_against_plain_and_float64(model, x, mode)


# The Triton backend changes the conv's merged adapter only (its merge kernel): the other forms run on torch.
CONV_CASES = [("torch", form, strategy) for form, strategy in (("lowrank", "auto"), ("full", "auto"),
                                                               ("adapter", "chain"), ("adapter", "merged"))]
CONV_CASES += [(b, "adapter", "merged") for b in BACKENDS if b != "torch"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("engine, form, strategy", CONV_CASES, ids=["-".join(c) for c in CONV_CASES])
@pytest.mark.parametrize("decomposition", ["svd", "tucker", "cp"])
def test_checkpointed_conv_matches_plain_and_float64(monkeypatch, decomposition, engine, form, strategy, mode):
    monkeypatch.setenv("DYNRANK_BACKEND", engine)
    model, x = _conv_model(form, decomposition, strategy)
    _check_against_plain_and_float64(model, x, mode)


@contextlib.contextmanager
def _checkpoint_debug():
    """``torch.utils.checkpoint``'s debug mode, with its op log kept from pytest's log capture.

    The debug mode logs every op to torch's "LoggingTensor" logger, which it makes non-propagating,
    with arguments that are not format arguments.  pytest 9.2 attaches its capture handlers to every
    non-propagating logger at the start of each test phase, so from the second such test on they
    would format those records and raise.  The logger gets a handler list of its own meanwhile; the
    debug mode adds and removes its own handler there."""
    logger = logging.getLogger("LoggingTensor")
    kept, logger.handlers = logger.handlers, []
    try:
        with torch.utils.checkpoint.set_checkpoint_debug_enabled(True):
            yield
    finally:
        logger.handlers = kept


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_determinism_check_passes_with_the_automatic_adapter_strategy(backend, kind):
    """Non-reentrant checkpointing compares what the recompute saves with what the forward saved
    (``determinism_check="default"``); the conv's adapter picks its strategy per input key, the same
    for both passes."""
    model, x = _linear_model("adapter") if kind == "linear" else _conv_model("adapter", "tucker")
    with _checkpoint_debug():
        _check_against_plain_and_float64(model, x, "nonreentrant", determinism_check="default")


def test_timed_adapter_choice_inside_a_checkpointed_forward(monkeypatch):
    """On CUDA, "auto" times both strategies (forward and backward of each) on the first call for an input
    key, which can be inside a checkpointed forward: the trial steps' saved tensors must not count as the
    layer's (the recompute finds the choice made and saves only its own).  Off CUDA the timing path is
    taken in place of the cost model."""
    model, x = _conv_model("adapter", "svd")
    if HAS_CUDA:
        model, x = model.cuda(), x.cuda()
    else:
        monkeypatch.setattr(dynrank.conv, "_padded_input_costs",
                            lambda layer, inp: time_adapter_strategies(layer, inp, 1))
    g = torch.randn(model(x).shape, device=x.device)
    for layer in (model[0], model[2]):
        layer.adapter_strategy = "auto"                # forget the choices the call above made
    checkpointed = _run(model, x, g, "nonreentrant", determinism_check="default")
    assert len(model[0].adapter_choices) == 1                # chosen in the checkpointed forward
    plain = _run(model, x, g)
    for a, b in zip(checkpointed[:2], plain[:2]):
        assert rel_err(a, b) < TOL


def _save_matmuls(ctx, op, *args, **kwargs):
    """A selective-checkpointing policy as large-model trainers use: keep every matmul and conv output."""
    saved = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.convolution.default)
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_selective_checkpointing_that_saves_matmuls(backend, form, bias):
    # The torch engine's adapter added its low-rank term into the dense GEMM's output in place, and
    # selective checkpointing refuses a saved tensor that changed ("Tensor cached during selective
    # activation checkpoint has been mutated").
    model, x = _linear_model(form, bias=bias)
    context_fn = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
    _check_against_plain_and_float64(model, x, "nonreentrant", context_fn=context_fn)


@pytest.mark.parametrize("strategy", ["chain", "merged"])
def test_selective_checkpointing_of_the_conv_adapter(backend, strategy):
    model, x = _conv_model("adapter", "svd", strategy)
    context_fn = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
    _check_against_plain_and_float64(model, x, "nonreentrant", context_fn=context_fn)


def test_checkpointed_double_backward_matches_plain(monkeypatch):
    """A gradient penalty (create_graph=True) through checkpointed blocks, torch engine (the Triton path
    has no double backward)."""
    monkeypatch.setenv("DYNRANK_BACKEND", "torch")
    for form in ("lowrank", "full", "adapter"):
        model, x0 = _linear_model(form)
        results = []
        for mode in ("plain", "nonreentrant"):
            model.zero_grad(set_to_none=True)
            x = x0.clone().requires_grad_(True)
            y = model(x) if mode == "plain" else checkpoint(model, x, use_reentrant=False)
            dx, = torch.autograd.grad(y.tanh().sum(), x, create_graph=True)
            dx.pow(2).sum().backward()
            results.append([x.grad] + [p.grad for p in model.parameters() if p.requires_grad])
        assert all(_same(a, b) for a, b in zip(*results))


# -- checkpointed blocks through the scheduler's switches -----------------------------------------

class _Block(nn.Module):
    def __init__(self, conv):
        super().__init__()
        if conv:
            # fixed adapter strategies: on CUDA "auto" would time them, and the plain and the checkpointed
            # run could pick apart (test_determinism_check_passes_with_the_automatic_adapter_strategy)
            self.inner = LowRankConv2d(4, 6, 3, rank=3, padding=1, adapter_strategy="merged")
            self.outer = LowRankConv2d(6, 4, 3, rank=2, padding=1, decomposition="tucker", adapter_strategy="chain")
        else:
            self.inner = FusedLowRankLinear(17, 23, 4, alpha=8.0)
            self.outer = FusedLowRankLinear(23, 17, 4)

    def forward(self, h):
        return h + self.outer(F.gelu(self.inner(h)))


class _Net(nn.Module):
    """An input projection (so every block's input needs a gradient, as reentrant checkpointing
    requires), two residual blocks, a head; ``mode`` says how the blocks run."""

    def __init__(self, conv, mode):
        super().__init__()
        self.conv, self.mode = conv, mode
        self.stem = nn.Conv2d(3, 4, 1) if conv else nn.Linear(12, 17)
        self.blocks = nn.ModuleList([_Block(conv), _Block(conv)])
        self.head = nn.Linear(4 if conv else 17, 3)

    def forward(self, x):
        h = self.stem(x)
        if self.mode == "sequential":
            h = checkpoint_sequential(nn.Sequential(*self.blocks), 2, h, use_reentrant=False)
        else:
            for block in self.blocks:
                h = block(h) if self.mode == "plain" else checkpoint(block, h, use_reentrant=self.mode == "reentrant")
        return self.head(h.mean((2, 3)) if self.conv else h)


def _train_through_switches(conv, mode):
    torch.manual_seed(0)
    model = _Net(conv, mode).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2, deflate_init="random")
    x = torch.randn(*((4, 3, 5, 5) if conv else (6, 12)), device=DEVICE)
    y = torch.randint(0, 3, (x.shape[0],), device=DEVICE)
    losses, forms = [], []
    for epoch in range(3):
        scheduler.step(epoch)
        forms.append(sorted(set(scheduler.forms().values())))
        for _ in range(2):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    return losses, forms, [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_checkpointed_blocks_train_as_plain_through_switches(backend, conv, mode):
    """lowrank → full → adapter (random adapter init, so the adapter trains from a changed function)."""
    if backend == "triton" and mode != "nonreentrant":
        pytest.skip("the interpreted kernels are slow: every mode runs on the torch engine, and each form in "
                    "every mode on the kernels in test_checkpointed_linear_matches_plain_and_float64")
    losses, forms, params = _train_through_switches(conv, "plain")
    assert forms == [["lowrank"], ["full"], ["adapter"]]
    assert len(set(float(v) for v in losses)) == len(losses)          # training moves
    c_losses, c_forms, c_params = _train_through_switches(conv, mode)
    assert c_forms == forms
    assert all(_same(a, b) for a, b in zip(c_losses, losses))
    assert len(c_params) == len(params) and all(_same(a, b) for a, b in zip(c_params, params))


# -- module hooks ---------------------------------------------------------------------------------

def _record_hooks(layer, log):
    """All four module hooks on ``layer``; each call appends what it saw to ``log``.  The forward hooks
    keep the gradients of the layer's input and output, to hold the backward hooks' tensors against."""
    def pre(module, args):
        if args[0].requires_grad:
            args[0].retain_grad()
        log.append(("pre", args[0]))

    def forward(module, args, output):
        output.retain_grad()
        log.append(("forward", args[0], output))

    return [layer.register_forward_pre_hook(pre), layer.register_forward_hook(forward),
            layer.register_full_backward_pre_hook(lambda m, grad_output: log.append(("backward_pre", grad_output))),
            layer.register_full_backward_hook(lambda m, gi, go: log.append(("backward", gi, go)))]


def _check_hook_log(log, x, y):
    """``log`` of one forward and backward of a layer taking ``x`` and returning ``y``: each hook once, in
    order, with the layer's own tensors."""
    assert [entry[0] for entry in log] == ["pre", "forward", "backward_pre", "backward"]
    (_, pre_input), (_, fwd_input, output), (_, grad_output_pre), (_, grad_input, grad_output) = log
    assert pre_input is x and torch.equal(fwd_input, x)      # (the forward hook's is x behind the backward hooks' wrap)
    assert torch.equal(output, y)
    assert len(grad_output) == len(grad_output_pre) == 1 and len(grad_input) == 1
    assert torch.equal(grad_output_pre[0], output.grad) and torch.equal(grad_output[0], output.grad)
    if x.requires_grad:
        assert torch.equal(grad_input[0], x.grad)
    else:
        assert grad_input[0] is None


def _layers_every_form():
    for form in ("lowrank", "full", "adapter"):
        yield form, lambda form=form: FusedLowRankLinear(17, 23, 4, form=form, device=DEVICE), (3, 2, 17)
    for form, strategy in (("lowrank", "auto"), ("full", "auto"), ("adapter", "chain"), ("adapter", "merged")):
        yield f"conv-{form}-{strategy}", lambda form=form, strategy=strategy: LowRankConv2d(
            5, 7, 3, rank=3, padding=1, form=form, adapter_strategy=strategy, device=DEVICE), (2, 5, 6, 6)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing when gradients are computed with respect to module")
@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "frozen-input"])
@pytest.mark.parametrize("make, shape", [(m, s) for _, m, s in _layers_every_form()],
                         ids=[name for name, _, _ in _layers_every_form()])
def test_module_hooks_see_the_layer_tensors(backend, make, shape, input_grad):
    torch.manual_seed(0)
    layer = make()
    _randomize_adapters(layer)
    log = []
    _record_hooks(layer, log)
    x = torch.randn(shape, device=DEVICE, requires_grad=input_grad)
    y = layer(x)
    y.backward(torch.randn_like(y))
    _check_hook_log(log, x, y)


@pytest.mark.parametrize("make, shape", [(m, s) for _, m, s in _layers_every_form()],
                         ids=[name for name, _, _ in _layers_every_form()])
def test_hooks_that_replace_tensors_take_effect(backend, make, shape):
    """A pre-hook's new input, a forward hook's new output and a backward hook's new input gradient are
    the ones the layer and autograd use (against the same layer without hooks, by hand)."""
    torch.manual_seed(0)
    layer = make()
    _randomize_adapters(layer)
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    g = torch.randn_like(layer(x))
    y_plain = layer(2 * x)
    dx_plain, = torch.autograd.grad(y_plain, x, g)
    layer.register_forward_pre_hook(lambda m, args: (2 * args[0],))
    layer.register_forward_hook(lambda m, args, output: output + 1.0)
    layer.register_full_backward_hook(lambda m, grad_input, grad_output: (3 * grad_input[0],))
    y = layer(x)
    dx, = torch.autograd.grad(y, x, g)
    assert _same(y, y_plain + 1.0) and _same(dx, 3 * dx_plain)


def test_module_hooks_survive_the_scheduler_switches(backend):
    """Hooks registered once, before training, on both dynrank layers of an MLP: every step of
    lowrank, full and adapter epochs fires each once with the layer's tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(12, 17, 4, device=DEVICE), nn.ReLU(),
                          FusedLowRankLinear(17, 13, 4, device=DEVICE), nn.ReLU(), nn.Linear(13, 3, device=DEVICE))
    layers = [model[0], model[2]]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2, deflate_init="random")
    logs = [[], []]
    for layer, log in zip(layers, logs):
        _record_hooks(layer, log)
    seen = {}
    model[1].register_forward_hook(lambda m, args, output: seen.__setitem__("relu", output))
    model[3].register_forward_pre_hook(lambda m, args: seen.__setitem__("after", args[0]))
    x = torch.randn(6, 12, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 3, (6,), device=DEVICE)
    for epoch in range(3):
        scheduler.step(epoch)
        assert [layer.form for layer in layers] == [["lowrank", "full", "adapter"][epoch]] * 2
        assert model[0] is layers[0] and model[2] is layers[1]
        for _ in range(2):
            for log in logs:
                log.clear()
            x.grad = None
            loss = F.cross_entropy(model(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _check_hook_log(logs[0], x, logs[0][1][2])
            _check_hook_log(logs[1], seen["relu"], logs[1][1][2])
            assert torch.equal(seen["after"], logs[1][1][2])       # the output the hook saw went on
            # and it is the layer's function of its input (float64 reference of the form's math)
            for layer, log in zip(layers, logs):
                _, inp, out = log[1]
                leaves = {n: p.detach().double() for n, p in layer.named_parameters()}
                assert rel_err(out, _reference_module(layer, "", leaves, inp.detach().double())) < TOL
            opt.step()


# -- tensor hooks on parameters a switch replaces ---------------------------------------------------

def _hook_counts(params, counts):
    """A gradient hook and a post-accumulate hook on each of ``params`` (name → parameter), counting calls
    into ``counts`` and checking that each sees the gradient that lands in ``.grad``."""
    handles = []
    for name, p in params.items():
        def grad_hook(grad, name=name, p=p):
            counts[name, "grad"] = counts.get((name, "grad"), 0) + 1
            counts[name, "value"] = grad.clone()

        def post_hook(param, name=name):
            counts[name, "post"] = counts.get((name, "post"), 0) + 1
            assert torch.equal(param.grad, counts[name, "value"])
        handles += [p.register_hook(grad_hook), p.register_post_accumulate_grad_hook(post_hook)]
    return handles


def _step(model, opt, x, target):
    loss = F.cross_entropy(model(x), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def test_tensor_hooks_belong_to_the_parameter():
    """A switch keeps the module but may replace a parameter: hooks on a released or replaced parameter
    stop firing with it, a kept one keeps its hooks (the bias always; W through a deflate, where it is
    frozen, and through an adapter's inflate, where it trains again)."""
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(12, 17, 4), nn.ReLU(), nn.Linear(17, 3))
    layer = model[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
    x, target = torch.randn(6, 12), torch.randint(0, 3, (6,))
    counts = {}
    old_A, old_B, bias = layer.A, layer.B, layer.bias
    _hook_counts({"A": old_A, "B": old_B, "bias": bias}, counts)
    _step(model, opt, x, target)
    assert all(counts[n, k] == 1 for n in ("A", "B", "bias") for k in ("grad", "post"))

    scheduler.step(1)                                    # inflate: A, B released, a new W
    assert layer.A is None and layer.bias is bias
    _step(model, opt, x, target)
    assert counts["A", "grad"] == counts["B", "grad"] == 1 and counts["bias", "grad"] == 2
    weight = layer.weight
    _hook_counts({"W": weight}, counts)
    _step(model, opt, x, target)
    assert counts["W", "grad"] == counts["W", "post"] == 1

    scheduler.step(2)                                    # deflate: W kept, frozen; new A, B without hooks
    assert layer.weight is weight and not weight.requires_grad and layer.A is not old_A
    _step(model, opt, x, target)
    assert counts["W", "grad"] == 1 and counts["bias", "grad"] == 4
    assert counts["A", "grad"] == 1

    layer.inflate()                                      # adapter → full: W_f's Parameter trains again
    assert layer.weight is weight and weight.requires_grad
    _step(model, opt, x, target)
    assert counts["W", "grad"] == counts["W", "post"] == 2


def test_hooks_registered_again_in_a_scheduler_callback_follow_the_switches():
    """The documented recipe: register tensor hooks on the new parameters in a callback.  Gradient clipping
    by hook then trains as clipping each ``.grad`` by hand after the backward."""
    def run(by_hook):
        torch.manual_seed(0)
        model = nn.Sequential(FusedLowRankLinear(12, 17, 4), nn.ReLU(), FusedLowRankLinear(17, 13, 4),
                              nn.ReLU(), nn.Linear(13, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        scheduler = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2, deflate_init="random")
        def register(event=None):
            for p in model.parameters():
                if p.requires_grad and not getattr(p, "clipped_by_hook", False):
                    p.clipped_by_hook = True          # (the bias, kept by every switch, has its hook already)
                    p.register_hook(lambda grad: grad.clamp(-0.01, 0.01))

        if by_hook:
            register()
            scheduler.add_callback(register)
        x, target = torch.randn(6, 12), torch.randint(0, 3, (6,))
        for epoch in range(3):
            scheduler.step(epoch)
            for _ in range(2):
                loss = F.cross_entropy(model(x), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if not by_hook:
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.clamp_(-0.01, 0.01)
                assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) <= 0.01
                opt.step()
        return [p.detach() for p in model.parameters()]

    by_hand = run(False)
    by_hook = run(True)
    assert len(by_hand) == len(by_hook) and all(torch.equal(a, b) for a, b in zip(by_hook, by_hand))


# -- parametrizations -------------------------------------------------------------------------------

PARAMETRIZATIONS = {
    "spectral_norm": lambda m, name: spectral_norm(m, name),
    "weight_norm": lambda m, name: weight_norm(m, name),
    "orthogonal": lambda m, name: orthogonal(m, name),
}
PARAMETRIZED = [("lowrank", "A", "spectral_norm"), ("lowrank", "B", "orthogonal"), ("adapter", "A", "weight_norm"),
                ("adapter", "B", "orthogonal"), ("full", "weight", "spectral_norm"), ("full", "weight", "weight_norm")]


@pytest.mark.parametrize("form, name, kind", PARAMETRIZED, ids=["-".join(p) for p in PARAMETRIZED])
def test_parametrized_linear_computes_with_the_parametrized_tensor(backend, form, name, kind):
    """The forward reads the parametrized value (not the original), on either engine; gradients reach the
    parametrization's own parameters as through the plain-torch math."""
    torch.manual_seed(0)
    layer = FusedLowRankLinear(17, 23, 4, form=form, alpha=6.0, device=DEVICE)
    _randomize_adapters(layer)
    PARAMETRIZATIONS[kind](layer, name)
    originals = [p for p in layer.parametrizations[name].parameters() if p.requires_grad]
    x = torch.randn(3, 17, device=DEVICE)
    g = torch.randn(3, 23, device=DEVICE)
    with parametrize.cached():        # one value of the parametrized tensor for the layer and the reference
        y = layer(x)
        tensors = {n: getattr(layer, n) for n in ("weight", "A", "B", "bias")}
        if kind != "weight_norm":                  # (weight norm starts at the original's own norms)
            assert not torch.equal(tensors[name], layer.parametrizations[name].original)
        if form == "full":
            ref = F.linear(x, tensors["weight"], tensors["bias"])
        else:
            ref = reference_lowrank_linear(x, *(tensors[n] for n in ("weight", "A", "B", "bias")), layer.scale)
        assert rel_err(y, ref) < TOL
        grads = torch.autograd.grad((y * g).sum(), originals, retain_graph=True)
        ref_grads = torch.autograd.grad((ref * g).sum(), originals)
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < TOL


@pytest.mark.parametrize("strategy", ["chain", "merged"])
def test_parametrized_conv_factor(backend, strategy):
    torch.manual_seed(0)
    layer = LowRankConv2d(5, 7, 3, rank=3, padding=1, form="adapter", adapter_strategy=strategy, device=DEVICE)
    _randomize_adapters(layer)
    weight_norm(layer, "A")
    x = torch.randn(2, 5, 6, 6, device=DEVICE)
    with parametrize.cached():
        y = layer(x)
        leaves = {n: getattr(layer, n) for n in ("weight", "A", "B", "bias")}
        ref = _reference_module(layer, "", leaves, x)
        assert rel_err(y, ref) < TOL
        originals = list(layer.parametrizations.A.parameters())
        grads = torch.autograd.grad(y.square().sum(), originals, retain_graph=True)
        ref_grads = torch.autograd.grad(ref.square().sum(), originals)
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < TOL


REFUSED = [("lowrank", "A", "parametrizations.spectral_norm"), ("adapter", "B", "parametrizations.orthogonal"),
           ("full", "weight", "parametrizations.weight_norm"), ("lowrank", "B", "hook-based weight_norm"),
           ("full", "weight", "hook-based spectral_norm")]


def _reparametrize(layer, name, kind):
    if kind == "hook-based weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)        # deprecated, still in use
            torch.nn.utils.weight_norm(layer, name)
    elif kind == "hook-based spectral_norm":
        torch.nn.utils.spectral_norm(layer, name)
    else:
        PARAMETRIZATIONS[kind.split(".")[1]](layer, name)


def _unreparametrize(layer, name, kind):
    if kind == "hook-based weight_norm":
        torch.nn.utils.remove_weight_norm(layer, name)
    elif kind == "hook-based spectral_norm":
        torch.nn.utils.remove_spectral_norm(layer, name)
    else:
        parametrize.remove_parametrizations(layer, name)


@pytest.mark.parametrize("form, name, kind", REFUSED, ids=["-".join(r).replace(" ", "_") for r in REFUSED])
def test_a_form_change_refuses_a_reparametrized_tensor_and_changes_nothing(form, name, kind):
    torch.manual_seed(0)
    layer = FusedLowRankLinear(17, 23, 4, form=form)
    _randomize_adapters(layer)
    layer.eval()                                         # spectral_norm: no power iteration per call
    _reparametrize(layer, name, kind)
    x = torch.randn(3, 17)
    before = layer(x).detach()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    change = layer.deflate if form == "full" else layer.inflate
    with pytest.raises(RuntimeError, match=rf"its {name} is reparametrized .*Remove the parametrization"):
        change()
    assert layer.form == form and layer.rank == 4
    assert state.keys() == layer.state_dict().keys()
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    assert torch.equal(layer(x), before)
    # the way out: remove the parametrization (its value stays), change form, the function is kept
    _unreparametrize(layer, name, kind)
    change()
    assert layer.form == ("adapter" if form == "full" else "full")
    assert rel_err(layer(x), before) < TOL


def test_a_cross_form_load_into_a_reparametrized_layer_is_in_torchs_error_list():
    """The refusal reaches load_state_dict's own error list, naming the layer, and that layer is left as it
    was (torch loads the other layers, as it does with any error in the list)."""
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(8, 8, 2, form="full"), FusedLowRankLinear(8, 8, 2))
    saved = nn.Sequential(FusedLowRankLinear(8, 8, 2), FusedLowRankLinear(8, 8, 2, form="full")).state_dict()
    orthogonal(model[1], "B")
    x = torch.randn(3, 8)
    before = model[1](x).detach()
    with pytest.raises(RuntimeError, match=r"Error\(s\) in loading state_dict for Sequential(.|\n)*"
                                           r"layer '1' \(lowrank form, rank 2\) cannot change form or rank: its B"):
        model.load_state_dict(saved)
    assert model[1].form == "lowrank" and torch.equal(model[1](x), before)
    assert model[0].form == "lowrank" and torch.equal(model[0].A, saved["0.A"])


def test_the_scheduler_refuses_a_reparametrized_layer_before_switching_any():
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(12, 17, 4), nn.ReLU(), FusedLowRankLinear(17, 13, 4), nn.ReLU(),
                          nn.Linear(13, 3))
    orthogonal(model[2], "B")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    held = [p for group in opt.param_groups for p in group["params"]]
    scheduler = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
    scheduler.step(0)
    with pytest.raises(RuntimeError, match=r"layer '2' .*its B is reparametrized"):
        scheduler.step(1)
    assert scheduler.forms() == {"0": "lowrank", "2": "lowrank"}
    assert [p for group in opt.param_groups for p in group["params"]] == held


def test_rank_growth_refuses_a_reparametrized_factor():
    from dynrank import grow_rank_
    torch.manual_seed(0)
    layer = FusedLowRankLinear(17, 23, 4)
    orthogonal(layer, "B")
    x = torch.randn(3, 17)
    before = layer(x).detach()
    with pytest.raises(RuntimeError, match=r"its B is reparametrized"):
        grow_rank_(layer, 6)
    assert layer.rank == 4 and layer.A.shape == (23, 4) and torch.equal(layer(x), before)


def _growth_model():
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(12, 17, 8), nn.ReLU(), FusedLowRankLinear(17, 13, 8), nn.ReLU(),
                          nn.Linear(13, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def _snapshot(model, opt):
    return ([(m.rank, {k: v.detach().clone() for k, v in m.state_dict().items()}) for m in (model[0], model[2])],
            [p for group in opt.param_groups for p in group["params"]])


def _assert_same(model, opt, snap):
    layers, held = snap
    for m, (rank, state) in zip((model[0], model[2]), layers):
        assert m.rank == rank and all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert [p for group in opt.param_groups for p in group["params"]] == held


def test_incremental_rank_scheduler_refuses_a_reparametrized_layer_before_resizing_any():
    from dynrank import IncrementalRankScheduler
    # construction: the layers are resized to their starting rank
    model, opt = _growth_model()
    orthogonal(model[2], "B")
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"layer '2' .*its B is reparametrized"):
        IncrementalRankScheduler(model, opt, init_rank=2, buffer=2)
    _assert_same(model, opt, snap)
    # a growth step: every layer due is checked before the first grows
    model, opt = _growth_model()
    growth = IncrementalRankScheduler(model, opt, init_rank=1, buffer=1, warmup_steps=0, check_every=1)
    orthogonal(model[2], "B")
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"layer '2' .*its B is reparametrized"):
        growth.step()
    _assert_same(model, opt, snap)
    assert growth.last_step == 0
    # loading ranks that shrink a layer
    model, opt = _growth_model()
    growth = IncrementalRankScheduler(model, opt, init_rank=4, buffer=2)
    saved = growth.state_dict()
    model, opt = _growth_model()
    growth = IncrementalRankScheduler(model, opt, init_rank=6, buffer=2)
    orthogonal(model[2], "A")
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"layer '2' .*its A is reparametrized"):
        growth.load_state_dict(saved)
    _assert_same(model, opt, snap)
