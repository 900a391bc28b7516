"""``torch.compile`` of a whole converted model, trained across form switches and rank growth.

The model is compiled once, before training, as ``dynrank-train --compile`` does, and trained through
DynamicRankScheduler's switches (lowrank → full → adapter) and IncrementalRankScheduler's growth.
Reference: the same run done eagerly from the same seeds, compared at every step (loss, output, every
parameter, forms and ranks): a stale compiled graph after a switch (one still reading the old factors
or running the old form) would part from it at the first step after the switch.  A counting backend
counts the compiles: one per distinct state of the model, not one per step.

Backend ``aot_eager`` (no C++ compiler needed: dynamo and AOT autograd as inductor sees them).
Inductor runs on CUDA only: on a CPU its three compiles of the smallest model take about 30 s.
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _helpers import HAS_CUDA, REL_TOL, kernel_devices, rel_err
from _scheduling import mlp
from dynrank import DynamicRankScheduler, FusedLowRankLinear, IncrementalRankScheduler, LowRankConv2d
from dynrank.conv import adapter_costs

TOL = REL_TOL[torch.float32]
ALWAYS = 1 - 1e-9           # a growth threshold the top ranks never reach: every check grows the layers


class Compiles:
    """A ``torch.compile`` backend that counts the graphs it compiled, then hands them to ``backend``
    (None: runs them as traced).  A trace that dynamo restarts inside the backend (with dynamic shapes,
    AOT autograd's pass over Python floats restarts the first trace of a frame) is not counted."""

    def __init__(self, backend="aot_eager"):
        self.backend = backend
        self.count = 0

    def __call__(self, gm, example_inputs):
        if self.backend is None:
            compiled = gm.forward
        else:
            compiled = torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)
        self.count += 1
        return compiled


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Compiled nn.Sequential models share one code object, so one cache and one recompile budget.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _use(engine, monkeypatch):
    """DYNRANK_BACKEND=engine for this test; returns the device to run on: the CPU for torch, the kernels'
    device for triton (the CPU under Triton's interpreter; skipped where the kernels cannot run)."""
    if engine == "triton" and not kernel_devices():
        pytest.skip("no device for the Triton kernels")
    monkeypatch.setenv("DYNRANK_BACKEND", engine)
    return kernel_devices()[0] if engine == "triton" else "cpu"


# -- models, data, runs --------------------------------------------------------------------------
def _convnet(first=("svd", "chain"), second=("tucker", "merged")):
    """Two LowRankConv2d (decomposition, adapter strategy), a FusedLowRankLinear, a dense classifier."""
    (dec1, strategy1), (dec2, strategy2) = first, second
    ranks = {"svd": 3, "tucker": (2, 3)}
    return nn.Sequential(
        LowRankConv2d(3, 8, 3, rank=ranks[dec1], decomposition=dec1, padding=1, adapter_strategy=strategy1),
        nn.ReLU(),
        LowRankConv2d(8, 8, 3, rank=ranks[dec2], decomposition=dec2, padding=1, bias=False,
                      adapter_strategy=strategy2),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        FusedLowRankLinear(8, 12, rank=2), nn.ReLU(), nn.Linear(12, 3))


def _deep(layers=12, width=8):
    """``layers`` converted Linear(width, width) layers (rank 2) and a dense classifier."""
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (FusedLowRankLinear(width, width, rank=2), nn.Tanh())],
                         nn.Linear(width, 3))


NETS = {"mlp": (mlp, (12,)),                                               # ranks 3 and 6, classifier dense
        "conv-svd-chain-tucker-merged": (_convnet, (3, 5, 5)),
        "conv-tucker-chain-svd-merged": (lambda: _convnet(("tucker", "chain"), ("svd", "merged")), (3, 5, 5)),
        "conv-auto": (lambda: _convnet(("svd", "auto"), ("tucker", "auto")), (3, 5, 5))}
OPTIMIZERS = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
              "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)}


def _batches(shape, sizes, device="cpu"):
    """Per epoch, a list of (x, y) with the batch sizes ``sizes[epoch]``; drawn from their own generator."""
    g = torch.Generator().manual_seed(1)
    return [[(torch.randn(n, *shape, generator=g).to(device), torch.randint(0, 3, (n,), generator=g).to(device))
             for n in epoch] for epoch in sizes]


def _state(model):
    """What the compiled run must agree on besides the values: every parameter's name, shape and whether
    it trains; every dynrank layer's form and rank."""
    return ([(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()],
            [(m.form, m.rank) for m in model.modules() if isinstance(m, (FusedLowRankLinear, LowRankConv2d))])


def _run(build, optimizer, batches, schedule="dynamic", compiled=None, device="cpu"):
    """Train a fresh ``build()`` on ``batches`` (a list per epoch) through ``schedule``: ``"dynamic"``,
    DynamicRankScheduler with I = 1, D = 2 stepped per epoch; ``"growth"``, IncrementalRankScheduler
    growing every layer at every step.  ``compiled``: keyword arguments of ``torch.compile``, which wraps
    the model once before training (None: eager).  Returns the model and, per step, (loss, output,
    parameters by name, _state).  On CUDA, cuDNN runs without TF32 and deterministically, so that the
    compiled run's convolutions compute as the eager one's."""
    torch.manual_seed(0)
    model = build().to(device)
    opt = OPTIMIZERS[optimizer](model.parameters())
    if schedule == "dynamic":
        scheduler = DynamicRankScheduler(model, opt, 1, 2)
    else:
        scheduler = IncrementalRankScheduler(model, opt, init_rank=None, buffer=2, threshold=ALWAYS,
                                             warmup_steps=0, check_every=1)
    forward = model if compiled is None else torch.compile(model, **compiled)
    steps = []
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False, deterministic=True):
        for epoch, epoch_batches in enumerate(batches):
            if schedule == "dynamic":
                scheduler.step(epoch)
            for x, y in epoch_batches:
                out = forward(x)
                loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if schedule == "growth":
                    scheduler.step()
                steps.append((loss.detach(), out.detach().clone(),
                              {n: p.detach().clone() for n, p in model.named_parameters()}, _state(model)))
    return model, steps


def _assert_same_run(actual, expected):
    assert len(actual) == len(expected)
    for step, ((loss, out, params, state), (e_loss, e_out, e_params, e_state)) in enumerate(zip(actual, expected)):
        assert state == e_state, step
        assert rel_err(loss, e_loss) < TOL and rel_err(out, e_out) < TOL, step
        for name, value in e_params.items():
            assert rel_err(params[name], value) < TOL, (step, name)


def _forms(model):
    return [m.form for m in model.modules() if isinstance(m, (FusedLowRankLinear, LowRankConv2d))]


# -- the switches: lowrank → full → adapter --------------------------------------------------------
@pytest.mark.parametrize("net, optimizer", [("mlp", "sgd"), ("mlp", "adamw"), ("conv-svd-chain-tucker-merged", "sgd"),
                                            ("conv-tucker-chain-svd-merged", "adamw")])
def test_compiled_model_trains_as_eager_through_the_switches(net, optimizer):
    build, shape = NETS[net]
    batches = _batches(shape, [[4, 4]] * 3)
    _, expected = _run(build, optimizer, batches)
    counter = Compiles()
    model, actual = _run(build, optimizer, batches, compiled=dict(backend=counter, fullgraph=True))
    _assert_same_run(actual, expected)
    assert set(_forms(model)) == {"adapter"}
    assert counter.count == 3                      # one per form, none per step


def test_compiled_model_on_the_triton_engine_trains_as_eager_through_the_switches(monkeypatch):
    # The linear layers run the dynrank::lowrank_linear custom op (and its backward op) compiled, the
    # merged conv adapter dynrank::conv_merged_kernel; eagerly, the kernels run outside both.
    device = _use("triton", monkeypatch)
    build = lambda: _convnet(("tucker", "merged"), ("svd", "chain"))
    batches = _batches((3, 4, 4), [[2, 2]] * 3, device)
    _, expected = _run(build, "adamw", batches, device=device)
    counter = Compiles()
    model, actual = _run(build, "adamw", batches, compiled=dict(backend=counter, fullgraph=True), device=device)
    _assert_same_run(actual, expected)
    assert set(_forms(model)) == {"adapter"} and counter.count == 3


@pytest.mark.parametrize("engine, net", [("torch", "mlp"), ("triton", "mlp"), ("torch", "conv-auto")])
def test_dynamic_shapes_with_batch_sizes_changing_across_the_switches(engine, net, monkeypatch):
    # dynamic=True compiles each form once for every batch size.  The conv adapter's default "auto"
    # strategy used to break the graph under it (its cost model's SymFloat costs, its cache's SymInt keys)
    # and recompile at every call: fullgraph=True failed in adapter form.
    device = _use(engine, monkeypatch)
    build, shape = NETS[net]
    batches = _batches(shape, [[7], [4], [9, 6]], device)      # none equal to a size of x's (duck sizing)
    _, expected = _run(build, "sgd", batches, device=device)
    counter = Compiles()
    model, actual = _run(build, "sgd", batches, compiled=dict(backend=counter, fullgraph=True, dynamic=True),
                         device=device)
    _assert_same_run(actual, expected)
    assert set(_forms(model)) == {"adapter"} and counter.count == 3


def test_auto_adapter_strategy_compiles_once_per_switch_beside_eager_evaluation():
    """Compiled training steps, then an evaluation batch under no_grad through the compiled model and the
    eager one (dynrank-train evaluates eagerly).  The "auto" strategy used to fill its per-shape cache
    inside the trace: a second compile at the switch to adapter form (the cache it had just filled failed
    dynamo's guard on it), and more for the entries the evaluations added."""
    build, shape = NETS["conv-auto"]
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = DynamicRankScheduler(model, opt, 1, 2)
    counter = Compiles()
    forward = torch.compile(model, backend=counter)
    train, val = _batches(shape, [[4, 4], [3]])
    for epoch in range(3):
        scheduler.step(epoch)
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            opt.step()
        with torch.no_grad():
            model.eval()
            compiled_out = forward(val[0][0])
            assert rel_err(compiled_out, model(val[0][0])) < TOL
            model.train()
    assert set(_forms(model)) == {"adapter"}
    assert counter.count == 3 * 2                 # per form: a training and an evaluation graph


def test_compiled_auto_strategy_follows_the_cost_model_and_recompiles_where_it_flips():
    # Under dynamic shapes the cost model's comparison becomes dynamo's guard: one graph per choice,
    # each serving every batch size for which the eager layer makes that choice (chain up to 6 here,
    # merged from 8).
    torch.manual_seed(0)
    layer = LowRankConv2d(16, 16, 3, rank=2, padding=1, form="adapter")
    with torch.no_grad():
        layer.A.normal_()
    counter = Compiles()
    compiled = torch.compile(layer, backend=counter, dynamic=True, fullgraph=True)
    expected_choices = set()
    for n in (2, 3, 8, 6, 12, 2):
        x = torch.randn(n, 16, 4, 4)
        y = compiled(x)
        costs = adapter_costs(layer, x)
        expected = min(costs, key=costs.get)
        expected_choices.add(expected)
        assert layer.adapter_choice == expected, n
        assert rel_err(y, layer(x)) < TOL
    assert expected_choices == {"chain", "merged"}
    assert counter.count == 2


# -- how many compiles a model with many layers costs ------------------------------------------------
def test_many_layers_cost_one_compile_per_switch():
    """12 converted layers.  DynamicRankScheduler switches them all at one step: 3 compiles in a run,
    whatever the number of layers.  Switched one at a time by hand, each switch is a new state and costs
    one compile; past torch._dynamo.config.recompile_limit states (lowered here to keep the test short)
    dynamo runs the model eagerly, still right."""
    x = torch.randn(4, 8)
    model = _deep()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = DynamicRankScheduler(model, opt, 1, 2)
    counter = Compiles(None)
    forward = torch.compile(model, backend=counter)
    for epoch in range(3):
        scheduler.step(epoch)
        for _ in range(2):
            out = forward(x)
            assert rel_err(out, model(x)) < TOL
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
    assert set(_forms(model)) == {"adapter"} and counter.count == 3

    torch._dynamo.reset()
    model = _deep()
    layers = [m for m in model.modules() if isinstance(m, FusedLowRankLinear)]
    counter = Compiles(None)
    forward = torch.compile(model, backend=counter)
    limit = 3
    with torch._dynamo.config.patch(recompile_limit=limit), torch.no_grad():
        for switched, layer in enumerate([None] + layers):
            if layer is not None:
                layer.inflate()
            assert rel_err(forward(x), model(x)) < TOL
            assert counter.count == min(switched + 1, limit)


@pytest.mark.parametrize("engine, static_params, optimizer", [("torch", True, "adamw"), ("torch", False, "sgd"),
                                                              ("triton", False, "adamw")],
                         ids=["torch-default", "dynamic-parameter-shapes", "triton-dynamic-parameter-shapes"])
def test_growth_compiled_trains_as_eager(engine, static_params, optimizer, monkeypatch):
    """Every growth changes A's and B's shapes.  dynamo keeps parameter shapes static by default: each
    growth then costs a compile, and past the recompile limit (lowered here) the model runs eagerly, with
    the same results.  With torch._dynamo.config.force_parameter_static_shapes = False the rank becomes a
    dynamic size at the first growth: two compiles in all."""
    device = _use(engine, monkeypatch)
    batches = _batches((12,), [[8] * 6], device)
    limit = 4
    with torch._dynamo.config.patch(force_parameter_static_shapes=static_params, recompile_limit=limit):
        _, expected = _run(mlp, optimizer, batches, schedule="growth", device=device)
        counter = Compiles()
        model, actual = _run(mlp, optimizer, batches, schedule="growth", compiled=dict(backend=counter),
                             device=device)
    _assert_same_run(actual, expected)
    assert [m.rank for m in model.modules() if isinstance(m, FusedLowRankLinear)] == [9, 12]    # from 3 and 6
    assert counter.count == (limit if static_params else 2)


# -- inductor ------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CUDA, reason="inductor on a CPU takes about 30 s for this model's three compiles")
def test_inductor_trains_as_eager_through_the_switches(monkeypatch):
    _use("torch", monkeypatch)
    batches = _batches((12,), [[16, 16]] * 3, "cuda")
    _, expected = _run(mlp, "sgd", batches, device="cuda")
    counter = Compiles("inductor")
    _, actual = _run(mlp, "sgd", batches, compiled=dict(backend=counter), device="cuda")
    _assert_same_run(actual, expected)
    assert counter.count == 3
