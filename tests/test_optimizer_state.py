"""optimizer_state="carry": the new parametrization starts from the state the old one implies; "fresh": the
optimizer is left as a newly built one at each switch; "reset": only the new parameters start empty."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from _helpers import rel_err
from _scheduling import data, decay_groups, held, lbfgs_step, mlp, train_steps
from dynrank.convert import convert_model
from dynrank.kernels.conv_merge import reference_kernel
from dynrank.linear import FusedLowRankLinear
from dynrank.scheduler import DynamicRankScheduler


def _float64_model():
    model = mlp().double()
    return model, torch.randn(32, 12, dtype=torch.float64), torch.randint(0, 3, (32,))


def _zero_grad_step(model, opt):
    for p in held(opt):
        p.grad = torch.zeros_like(p)
    opt.step()


def _tiny_zero_grad_step(model, opt):
    for g in opt.param_groups:
        g["lr"] = 1e-6
    _zero_grad_step(model, opt)


def _assert_inflate_moves_like_the_merged_factors(model, opt, sched, layers=(0, 2)):
    """One tiny zero-gradient step after the carry-inflate (``sched.step(1)``) moves each W as the
    same step without the inflate moves the merged factors, to first order in lr."""
    lowrank, lowrank_opt = copy.deepcopy((model, opt))

    def merged():
        return [copy.deepcopy(lowrank[i]).inflate().weight.detach() for i in layers]
    before = merged()
    _tiny_zero_grad_step(lowrank, lowrank_opt)
    moved = [after - b for after, b in zip(merged(), before)]
    sched.step(1)
    weights = [model[i].weight.detach().clone() for i in layers]
    _tiny_zero_grad_step(model, opt)
    for i, w, reference in zip(layers, weights, moved):
        assert rel_err(model[i].weight.detach() - w, reference) < 1e-4


def test_carry_inflate_matches_the_lowrank_momentum_to_first_order():
    # With zero gradients, SGD moves by lr·μ·buffer.  Carried m_W must move W as
    # the factors' momentum moves s·A·Bᵀ, up to O(lr²).
    model, x, y = _float64_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = DynamicRankScheduler(model, opt, 1, 3, optimizer_state="carry")
    sched.step(0)
    train_steps(model, opt, x, y, steps=4)
    _assert_inflate_moves_like_the_merged_factors(model, opt, sched)


def _sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _trained_with_a_frozen_factor(factor, make_optimizer, steps):
    """The float64 MLP with ``factor`` ("A" or "B") of layers 0 and 2 frozen by hand, trained ``steps`` steps in
    lowrank form under a carry scheduler inflating at 1 and deflating at 3: (model, optimizer, scheduler)."""
    model, x, y = _float64_model()
    for i in (0, 2):
        getattr(model[i], factor).requires_grad_(False)
    opt = make_optimizer(model.parameters())
    sched = DynamicRankScheduler(model, opt, 1, 3, optimizer_state="carry")
    sched.step(0)
    train_steps(model, opt, x, y, steps=steps)
    return model, opt, sched


def test_carry_inflate_with_a_frozen_factor_keeps_the_trained_factors_momentum():
    # LoRA-FA: A frozen by hand, B trained.  A never moved, so W's momentum after the inflate is the part B
    # gives, s·A·m_Bᵀ (it started empty, losing the lowrank momentum); Adam's moments by the same rule.
    model, opt, sched = _trained_with_a_frozen_factor("A", _sgd_momentum, steps=4)
    assert all(model[i].A not in opt.state for i in (0, 2))
    _assert_inflate_moves_like_the_merged_factors(model, opt, sched)

    model, opt, sched = _trained_with_a_frozen_factor("A", lambda p: torch.optim.Adam(p, lr=1e-2), steps=3)
    before = {i: ({n: f.detach().clone() for n, f in model[i].factors().items()},
                  {"A": {k: torch.zeros_like(model[i].A) for k in ("exp_avg", "exp_avg_sq")},
                   "B": {k: v.clone() for k, v in opt.state[model[i].B].items()}}) for i in (0, 2)}
    sched.step(1)
    for i, (factors, states) in before.items():
        state = opt.state[model[i].weight]
        assert float(state["step"]) == 3.0
        for key in ("exp_avg", "exp_avg_sq"):
            expected = _expected_pushforward(model[i], factors, states, key)
            assert rel_err(state[key], expected) < 1e-12


def _inflate_after_training_with_b_frozen(unfreeze):
    """float64 MLP whose factors B are frozen by hand for 4 SGD-with-momentum steps in lowrank form (B gets no
    state), then unfrozen (``unfreeze``) or not just before a carry inflate; returns (model, optimizer, the
    factors and A's momentum at the switch)."""
    model, opt, sched = _trained_with_a_frozen_factor("B", _sgd_momentum, steps=4)
    assert all(model[i].B not in opt.state and opt.state[model[i].A] for i in (0, 2))
    before = {i: (model[i].scale, model[i].A.detach().clone(), model[i].B.detach().clone(),
                  opt.state[model[i].A]["momentum_buffer"].clone()) for i in (0, 2)}
    if unfreeze:
        for i in (0, 2):
            model[i].B.requires_grad_(True)
    sched.step(1)
    return model, opt, before


def test_carry_inflate_starts_empty_where_a_trainable_factor_has_no_state():
    """A factor without state counts as never moved only while it is frozen: B frozen through training keeps
    A's part of the momentum, s·m_A·Bᵀ; B unfrozen just before the inflate is a trainable factor whose momentum
    is unknown, so W starts empty (a momentum built from A alone would be a guess)."""
    model, opt, before = _inflate_after_training_with_b_frozen(unfreeze=False)
    for i, (scale, A, B, m_a) in before.items():
        assert rel_err(opt.state[model[i].weight]["momentum_buffer"], scale * m_a @ B.t()) < 1e-12
    model, opt, _ = _inflate_after_training_with_b_frozen(unfreeze=True)
    for i in (0, 2):
        assert model[i].form == "full" and model[i].weight.requires_grad
        assert not opt.state.get(model[i].weight)


def _train_full_then_deflate(model, x, y, steps):
    """Full-rank SGD steps with momentum, then a carry deflate of layers 0 and 2.

    Returns the optimizer and the layers' weight momentum just before the deflate.
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = DynamicRankScheduler(model, opt, 0, 1, optimizer_state="carry", deflate_init="random")
    sched.step(0)
    train_steps(model, opt, x, y, steps=steps)
    buffers = [opt.state[model[i].weight]["momentum_buffer"].clone() for i in (0, 2)]
    sched.step(1)
    return opt, buffers


def test_carry_deflate_pulls_the_momentum_back():
    model, x, y = _float64_model()
    opt, buffers = _train_full_then_deflate(model, x, y, steps=3)
    for i, m_w in zip((0, 2), buffers):
        layer = model[i]
        # Reference: the momentum the factors accumulate from the gradients of
        # W through W = s·A·Bᵀ (the buffer is linear in the gradients).
        reference_a = layer.scale * m_w @ layer.B.detach()
        reference_b = layer.scale * m_w.t() @ layer.A.detach()
        assert rel_err(opt.state[layer.A]["momentum_buffer"], reference_a) < 1e-12
        assert rel_err(opt.state[layer.B]["momentum_buffer"], reference_b) < 1e-12


def _conv_model(decomposition):
    pytest.importorskip("dynrank.conv")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, stride=2),
                          nn.Flatten(), nn.Linear(12 * 3 * 3, 3))
    convert_model(model, rank_ratio=0.5, decomposition=decomposition)
    model = model.double()
    return model, torch.randn(8, 4, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))


@pytest.mark.parametrize("decomposition", ["svd", "tucker", "cp", "tkd-cpd"])
def test_carry_inflate_conv_first_order(decomposition):
    model, x, y = _conv_model(decomposition)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = DynamicRankScheduler(model, opt, 1, 3, optimizer_state="carry")
    sched.step(0)
    train_steps(model, opt, x, y, steps=3)
    _assert_inflate_moves_like_the_merged_factors(model, opt, sched)


@pytest.mark.parametrize("decomposition", ["svd", "tucker", "cp", "tkd-cpd"])
def test_carry_deflate_conv_is_the_adjoint_of_the_merge(decomposition):
    # Σ_f ⟨m_f, δf⟩ = ⟨m_W, Σ_f ∂W/∂f·δf⟩ for any δf; the right side uses the
    # layer's own merge (multilinear: ∂W/∂f·δf = merge with f replaced by δf).
    model, x, y = _conv_model(decomposition)
    opt, buffers = _train_full_then_deflate(model, x, y, steps=2)
    for i, m_w in zip((0, 2), buffers):
        layer = model[i]
        factors = {n: f.detach() for n, f in layer.factors().items()}
        left, right = 0.0, 0.0
        for name, factor in factors.items():
            direction = torch.randn_like(factor)
            subs = dict(factors)
            subs[name] = direction
            tangent = torch.zeros_like(m_w)
            layer._merge_into_(tangent, 1.0, subs)
            right += (m_w * tangent).sum().item()
            left += (opt.state[layer.factors()[name]]["momentum_buffer"] * direction).sum().item()
        assert left == pytest.approx(right, rel=1e-10)


def test_carry_adam_state_after_both_switches():
    model = mlp()
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = DynamicRankScheduler(model, opt, 1, 2, optimizer_state="carry")
    sched.step(0)
    train_steps(model, opt, x, y, steps=5)
    sched.step(1)
    for i in (0, 2):
        state = opt.state[model[i].weight]
        assert float(state["step"]) == 5.0
        assert (state["exp_avg_sq"] >= 0).all() and state["exp_avg_sq"].abs().sum() > 0
        assert state["exp_avg"].shape == model[i].weight.shape
    train_steps(model, opt, x, y, steps=2)
    sched.step(2)                                            # zero-output deflate: A = 0
    for i in (0, 2):
        layer = model[i]
        assert float(opt.state[layer.A]["step"]) == 7.0 and opt.state[layer.A]["exp_avg"].abs().sum() > 0
        assert layer.B not in opt.state                      # its pullback is zero: starts empty
    assert all(math.isfinite(v) for v in train_steps(model, opt, x, y))


def _reference_merge(layer, factors, scale):
    """s·merge(factors) in float64 by the kernels' pure-torch references (not the layer's own merge)."""
    if isinstance(layer, FusedLowRankLinear):
        return scale * factors["A"] @ factors["B"].t()
    return reference_kernel(layer.decomposition, factors, scale, layer.groups)


def _expected_pushforward(layer, factors, states, key):
    """Adam's ``key`` for W after inflate: Σ_i s·merge(f_1, .., state_i, .., f_n) for exp_avg; for
    exp_avg_sq the same with every other factor squared and s² (the uncorrelated-components rule)."""
    squared = key == "exp_avg_sq"
    values = {n: f * f if squared else f for n, f in factors.items()}
    scale = layer.scale ** 2 if squared else layer.scale
    return sum(_reference_merge(layer, {**values, name: states[name][key]}, scale) for name in factors)


def _expected_pullback(layer, factors, weight_state, key):
    """Adam's ``key`` for each fresh factor after deflate: (∂W/∂f)ᵀ·m_W, and for exp_avg_sq the
    same Jacobian-transpose product at the squared factors, times s² (s·A·Bᵀ: m_A = s·m_W·B,
    v_A = s²·v_W·(B∘B))."""
    squared = key == "exp_avg_sq"
    leaves = {n: (f * f if squared else f).requires_grad_(True) for n, f in factors.items()}
    merged = _reference_merge(layer, leaves, layer.scale)
    grads = torch.autograd.grad(merged, list(leaves.values()), grad_outputs=weight_state, allow_unused=True)
    return {n: (torch.zeros_like(f) if g is None else g * (layer.scale if squared else 1.0))
            for (n, f), g in zip(factors.items(), grads)}


def _adam_model(kind):
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
        convert_model(model, rank_ratio=0.25, alpha=5.0)
        x = torch.randn(32, 12)
    else:
        model = nn.Sequential(nn.Conv2d(4, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, stride=2),
                              nn.Flatten(), nn.Linear(12 * 3 * 3, 3))
        convert_model(model, rank_ratio=0.5, decomposition=kind, alpha=5.0)
        x = torch.randn(8, 4, 8, 8)
    return model.double(), x.double(), torch.randint(0, 3, (x.shape[0],))


@pytest.mark.parametrize("kind", ["linear", "svd", "tucker", "cp", "tkd-cpd"])
def test_carry_adam_moments_follow_the_documented_rules(kind):
    # Both switches, both of Adam's moments, against the rules of dynrank._optim's docstrings
    # evaluated by the float64 reference merges; scale != 1 on both sides of each switch.
    model, x, y = _adam_model(kind)
    layers = (0, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = DynamicRankScheduler(model, opt, 1, 2, optimizer_state="carry", deflate_init="random")
    sched.step(0)
    train_steps(model, opt, x, y, steps=4)
    expected = {}
    for i in layers:
        layer = model[i]
        assert layer.scale != 1.0
        factors = {n: f.detach().clone() for n, f in layer.factors().items()}
        states = {n: opt.state[f] for n, f in layer.factors().items()}
        expected[i] = {key: _expected_pushforward(layer, factors, states, key) for key in ("exp_avg", "exp_avg_sq")}
    sched.step(1)
    for i in layers:
        state = opt.state[model[i].weight]
        assert float(state["step"]) == 4.0
        for key, reference in expected[i].items():
            assert rel_err(state[key], reference) < 1e-12, key
    train_steps(model, opt, x, y, steps=2)
    weight_states = {i: {k: opt.state[model[i].weight][k].clone() for k in ("exp_avg", "exp_avg_sq")} for i in layers}
    sched.step(2)
    for i in layers:
        layer = model[i]
        assert layer.form == "adapter" and layer.scale != 1.0
        factors = {n: f.detach().clone() for n, f in layer.factors().items()}
        for key, m_w in weight_states[i].items():
            for name, reference in _expected_pullback(layer, factors, m_w, key).items():
                state = opt.state[layer.factors()[name]]
                assert float(state["step"]) == 6.0
                assert reference.abs().sum() > 0, (name, key)
                assert rel_err(state[key], reference) < 1e-12, (name, key)


@pytest.mark.parametrize("deflate_init", ["svd", "random"])
def test_carry_deflate_gives_each_factor_a_step_count_of_its_own(deflate_init):
    """Adapters that are not zero-output: both factors get W's state, its ``step`` included.  Each has a step
    tensor of its own, so an Adam step counts once for each and the next update is the one Adam takes from the
    same states held apart (a shared count rose twice per step and skewed the bias correction)."""
    model, x, y = _float64_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = DynamicRankScheduler(model, opt, 1, 2, optimizer_state="carry", deflate_init=deflate_init)
    for epoch in (0, 1):
        sched.step(epoch)
        train_steps(model, opt, x, y, steps=3)
    sched.step(2)
    factors = [p for i in (0, 2) for p in (model[i].A, model[i].B)]
    steps = [opt.state[p]["step"] for p in factors]
    assert [float(step) for step in steps] == [6.0] * 4
    assert len({id(step) for step in steps}) == 4
    assert all(opt.state[p]["exp_avg"].abs().sum() > 0 for p in factors)
    reference = copy.deepcopy(model)
    reference_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for p, q in zip(model.parameters(), reference.parameters()):
        reference_opt.state[q] = copy.deepcopy(opt.state[p])       # one copy per parameter: nothing shared
    before = [p.detach().clone() for p in factors]
    train_steps(model, opt, x, y, steps=1)
    train_steps(reference, reference_opt, x, y, steps=1)
    assert [float(opt.state[p]["step"]) for p in factors] == [7.0] * 4
    assert all(rel_err(p.detach(), b) > 1e-6 for p, b in zip(factors, before))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-12, name


def _full_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    convert_model(model, rank_ratio=0.25, form="full")
    return model


def _run_through_a_switch(make_opt, switch, policy):
    """Parameters after 20 steps, the switch, and 20 more steps; and the switched parameters' state."""
    model = mlp() if switch == "inflate" else _full_mlp()
    opt = make_opt(model.parameters())
    sched = DynamicRankScheduler(model, opt, *((1, None) if switch == "inflate" else (None, 1)),
                                 optimizer_state=policy)
    x, y = torch.randn(32, 12, generator=torch.Generator().manual_seed(1)), torch.randint(0, 3, (32,))
    sched.step(0)
    train_steps(model, opt, x, y, steps=20)
    sched.step(1)
    switched = [model[0].weight] if switch == "inflate" else [model[0].A, model[0].B]
    states = [dict(opt.state.get(p, {})) for p in switched]
    train_steps(model, opt, x, y, steps=20)
    return [p.detach().clone() for p in model.parameters()], states


@pytest.mark.parametrize("switch", ["inflate", "deflate"])
@pytest.mark.parametrize("make_opt", [
    # Centered RMSprop steps by √(square_avg − grad_avg²); moments mapped one by one broke that (NaN
    # weights at the first step after a deflate).
    pytest.param(lambda params: torch.optim.RMSprop(params, lr=1e-3, alpha=0.9, centered=True),
                 id="centered-RMSprop"),
    # Adafactor's factored row_var / col_var have the old parameter's row and column counts; carried,
    # the next step raised a size mismatch.
    pytest.param(lambda params: torch.optim.Adafactor(params, lr=1e-2), id="Adafactor"),
])
def test_carry_starts_empty_where_the_state_cannot_be_mapped(switch, make_opt):
    """``optimizer_state="carry"`` with state it cannot map consistently: the switched parameters start
    empty, so the run is the ``"reset"`` run bit for bit, and finite."""
    carried, states = _run_through_a_switch(make_opt, switch, "carry")
    reset, _ = _run_through_a_switch(make_opt, switch, "reset")
    assert all(not state for state in states)
    assert all(torch.isfinite(p).all() for p in carried)
    assert all(torch.equal(a, b) for a, b in zip(carried, reset))


def test_carry_keeps_plain_rmsprop_state():
    """Plain (uncentered) RMSprop's square_avg is a second moment like Adam's: it is still carried."""
    _, states = _run_through_a_switch(lambda params: torch.optim.RMSprop(params, lr=1e-3), "inflate", "carry")
    assert set(states[0]) == {"step", "square_avg"} and bool((states[0]["square_avg"] > 0).any())


def test_a_zero_redundancy_optimizer_is_refused():
    """ZeroRedundancyOptimizer steps an inner, partitioned optimizer: the parameters a switch puts in its
    groups were never stepped (silently).  The scheduler and grow_rank_ refuse it before anything changes."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed")
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from dynrank.inrank import IncrementalRankScheduler, grow_rank_
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = mlp()
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1)
        A = model[0].A
        for build in (lambda: DynamicRankScheduler(model, opt, 1, 2), lambda: IncrementalRankScheduler(model, opt),
                      lambda: grow_rank_(model[0], 4, opt)):
            with pytest.raises(TypeError, match="optimizer is a ZeroRedundancyOptimizer, which dynrank cannot "
                                                "follow"):
                build()
        assert model[0].A is A and model[0].rank == 3
    finally:
        dist.destroy_process_group()


def test_the_zero_redundancy_check_imports_nothing():
    """The check imported torch.distributed.optim at every scheduler build: about 0.5 s, and a DeprecationWarning
    (torch.jit.script) that is an error under warnings-as-errors.  An instance implies the module is loaded."""
    import subprocess
    import sys
    code = ("import sys, torch; from torch import nn; from dynrank import DynamicRankScheduler, convert_model\n"
            "m = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3)); convert_model(m, keep_last=False)\n"
            "DynamicRankScheduler(m, torch.optim.SGD(m.parameters(), lr=0.1), 1, 2)\n"
            "assert 'torch.distributed.optim' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_carry_deflate_under_autocast_maps_the_momentum_in_the_parameters_dtype():
    """A float32 model switched inside a bf16 autocast region: the pulled-back momentum is computed in
    float32 (autocast cast the merge's matmul to bf16: 3e-3 off), against the float64 rule."""
    torch.manual_seed(0)
    model, x, y = _float64_model()
    model = model.float()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = DynamicRankScheduler(model, opt, 0, 1, optimizer_state="carry", deflate_init="random")
    sched.step(0)
    train_steps(model, opt, x.float(), y, steps=3)
    buffers = [opt.state[model[i].weight]["momentum_buffer"].double() for i in (0, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sched.step(1)
    for i, m_w in zip((0, 2), buffers):
        layer = model[i]
        assert opt.state[layer.A]["momentum_buffer"].dtype == torch.float32
        reference_a = layer.scale * m_w @ layer.B.detach().double()
        assert rel_err(opt.state[layer.A]["momentum_buffer"], reference_a) < 1e-6


def _sgd_through_a_carry_deflate(**impl):
    """Layer 0's factors in a param group of their own (a per-layer lr), SGD with momentum, a carry deflate
    with zero-output adapters at 1 and three steps after it; returns the parameters and, just after the
    deflate, which of group 0's parameters hold a momentum buffer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))
    convert_model(model, rank_ratio=0.25)
    model = model.double()
    own = [model[0].A, model[0].B]
    groups = [{"params": own, "lr": 0.05},
              {"params": [p for p in model.parameters() if all(p is not q for q in own)]}]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, **impl)
    sched = DynamicRankScheduler(model, opt, 0, 1, optimizer_state="carry", deflate_init="zeros")
    x, y = torch.randn(32, 12, dtype=torch.float64), torch.randint(0, 3, (32,))
    sched.step(0)
    train_steps(model, opt, x, y, steps=2)
    sched.step(1)
    buffers = [opt.state.get(p, {}).get("momentum_buffer") is not None for p in opt.param_groups[0]["params"]]
    train_steps(model, opt, x, y, steps=3)
    return [p.detach().clone() for p in model.parameters()], buffers


def test_fused_sgd_steps_a_group_of_one_layer_after_a_carry_deflate():
    """The zero deflate carries A a buffer and leaves B's (zero) empty.  In a group holding nothing but the
    layer's factors, B was given no zero buffer (only a buffer outside the new parameters counted), and fused
    SGD's first step after the deflate raised a TypeError on the mixed group.  It steps as the for-loop SGD."""
    loop, loop_buffers = _sgd_through_a_carry_deflate(foreach=False)
    fused, fused_buffers = _sgd_through_a_carry_deflate(fused=True)
    assert loop_buffers == [True, False] and fused_buffers == [True, True]
    for p, q in zip(fused, loop):
        assert rel_err(p, q) < 1e-13


# -- "fresh": a newly built optimizer per phase ------------------------------------------------------
FRESH_OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "sgd-fused": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, fused=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2)),
    "adagrad": (torch.optim.Adagrad, dict(lr=1e-2, initial_accumulator_value=0.1)),   # state made in __init__
}


@pytest.mark.parametrize("policy", ["fresh", "reset"])
@pytest.mark.parametrize("name", FRESH_OPTIMIZERS)
def test_fresh_leaves_the_optimizer_as_a_newly_built_one_at_each_switch(name, policy):
    """Right after the inflate and the deflate, the run steps bit for bit as a newly built optimizer of the
    class over copies of the same param groups (the decayed lr included) with "fresh"; with "reset" the
    parameters a switch keeps (biases, the dense classifier) keep their state, and it steps otherwise."""
    cls, options = FRESH_OPTIMIZERS[name]
    model = mlp().double()
    x, y = data(torch.float64)
    opt = cls(decay_groups(model), **options)
    lr_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched = DynamicRankScheduler(model, opt, 1, 2, optimizer_state=policy, deflate_init="random")
    sched.step(0)
    train_steps(model, opt, x, y, steps=2)
    for epoch in (1, 2):
        lr_sched.step()
        kept = {p: copy.deepcopy(opt.state[p]) for p in model[4].parameters()}
        assert all(kept.values())                                # the classifier has trained state
        assert sched.step(epoch)
        assert [g["lr"] for g in opt.param_groups] == [options["lr"] * 0.5 ** epoch] * 2
        if policy == "reset":
            for p, state in kept.items():
                assert state.keys() == opt.state[p].keys()
                assert all(torch.equal(v, opt.state[p][k]) if isinstance(v, torch.Tensor) else v == opt.state[p][k]
                           for k, v in state.items())
        reference_model, reference_params = copy.deepcopy((model, [g["params"] for g in opt.param_groups]))
        reference = cls([{**group, "params": params} for group, params in zip(opt.param_groups, reference_params)],
                        **options)
        train_steps(model, opt, x, y, steps=2)
        train_steps(reference_model, reference, x, y, steps=2)
        same = all(torch.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))
        assert same == (policy == "fresh"), epoch


def test_fresh_lbfgs_steps_as_a_newly_built_one_after_each_switch():
    model = mlp().double()
    x, y = data(torch.float64)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=4)
    sched = DynamicRankScheduler(model, opt, 1, 2, optimizer_state="fresh", deflate_init="random")
    for epoch in range(3):
        sched.step(epoch)
        reference_model, params = copy.deepcopy((model, opt.param_groups[0]["params"]))
        reference = torch.optim.LBFGS(params, lr=0.5, max_iter=3, history_size=4)
        for _ in range(2):
            assert lbfgs_step(model, opt, x, y) == lbfgs_step(reference_model, reference, x, y)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))


def test_fresh_clears_nothing_on_a_load_and_leaves_model_copies_alone():
    """A load brings the layers to their saved forms and clears no state: the optimizer's saved state, loaded
    after it, is what the run goes on with.  An EMA copy switches as with "reset"."""
    model = mlp().double()
    x, y = data(torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = DynamicRankScheduler(model, opt, 1, 2, optimizer_state="fresh")
    ema = sched.add_model_copy(copy.deepcopy(model))
    for epoch in range(3):
        sched.step(epoch)
        train_steps(model, opt, x, y)
    assert [layer.form for layer in (ema[0], ema[2])] == ["adapter", "adapter"]
    fresh_model = mlp(seed=3).double()
    fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=1e-2)
    train_steps(fresh_model, fresh_opt, x, y)                     # state a load must not clear
    fresh_sched = DynamicRankScheduler(fresh_model, fresh_opt, 1, 2, optimizer_state="fresh")
    fresh_sched.load_state_dict(sched.state_dict())
    assert fresh_opt.state[fresh_model[4].weight]["exp_avg"].abs().sum() > 0
    fresh_model.load_state_dict(model.state_dict())
    fresh_opt.load_state_dict(copy.deepcopy(opt.state_dict()))     # a copy: it would share the step tensors
    train_steps(model, opt, x, y)
    train_steps(fresh_model, fresh_opt, x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh_model.parameters()))


# -- a layer switched while frozen ---------------------------------------------------------------------
def _frozen_switch_run(case, seed=0, frozen=True):
    """float64 MLP whose layer "0" switches while frozen, with an optimizer given ``model.parameters()``
    (which holds the frozen layer, as torch allows): ``"deflate"``, a full layer and AdamW on two param
    groups, adapters wanted on a frozen base; ``"inflate"``, a lowrank layer and SGD with momentum, frozen
    for a warm-up (``frozen``: still frozen when built; the others train).  Returns (model, optimizer,
    scheduler)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    convert_model(model, rank_ratio=0.25, form="full" if case == "deflate" else "lowrank")
    model = model.double()
    if frozen:
        model[0].requires_grad_(False)
    if case == "deflate":
        opt = torch.optim.AdamW(decay_groups(model), lr=1e-2, weight_decay=0.1)
        return model, opt, DynamicRankScheduler(model, opt, None, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, DynamicRankScheduler(model, opt, 1, 5)


def _unfreeze(model, case):
    """What the switch warning advises: the factors of the deflated layer, the inflated layer whole."""
    for p in (model[0].factors().values() if case == "deflate" else model[0].parameters()):
        p.requires_grad_(True)


def _through_the_frozen_switch(case, x, y):
    """The run up to its frozen switch and the unfreezing: (model, optimizer, scheduler)."""
    model, opt, sched = _frozen_switch_run(case)
    sched.step(0)
    if case == "inflate":                      # the other layers train through the warm-up
        train_steps(model, opt, x, y, steps=2)
    with pytest.warns(UserWarning, match=r"layers '0' switched while frozen .* an optimizer that held their "
                                         r"old parameters holds the new ones in their place \(W_f aside\), so "
                                         r"requires_grad_\(\) on them trains them"):
        sched.step(1)
    return model, opt, sched


@pytest.mark.parametrize("case", ["deflate", "inflate"])
def test_a_layer_switched_while_frozen_trains_once_unfrozen(case):
    """Its new parameters take the old ones' place in the optimizer, frozen (W_f aside), so unfreezing them
    (the switch warning's advice, or staged unfreezing) trains them as the same model built in the new form
    with an optimizer holding them.  They never joined: the factors (W) got gradients and never moved."""
    x, y = data(torch.float64)
    model, opt, _ = _through_the_frozen_switch(case, x, y)
    new = list(model[0].factors().values()) if case == "deflate" else [model[0].weight]
    assert not any(p.requires_grad for p in model[0].parameters())
    # In the group the old ones sat in (the ≥ 2-D one of AdamW's two), W_f out.
    assert all(any(p is q for q in opt.param_groups[0]["params"]) for p in new)
    assert case == "inflate" or not any(model[0].weight is q for q in held(opt))
    _unfreeze(model, case)
    reference = copy.deepcopy(model)
    if case == "deflate":
        ref_opt = torch.optim.AdamW(decay_groups(reference), lr=1e-2, weight_decay=0.1)
    else:                                       # a fresh SGD, with the momentum the other layers had
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
        ref_params = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            if opt.state.get(p):
                ref_opt.state[ref_params[name]] = copy.deepcopy(opt.state[p])
    assert not any(ref_opt.state.get(p) for p in reference[0].parameters())
    before = [p.detach().clone() for p in new]
    train_steps(model, opt, x, y, steps=5)
    train_steps(reference, ref_opt, x, y, steps=5)
    assert all(rel_err(p.detach(), b) > 1e-3 for p, b in zip(new, before))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-12, name


@pytest.mark.parametrize("case, checkpoint_frozen", [("deflate", True), ("deflate", False), ("inflate", False)])
def test_a_run_through_a_frozen_switch_resumes_bitwise(case, checkpoint_frozen):
    """A checkpoint between the frozen switch and the unfreezing (a fresh model frozen as the run's was,
    unfrozen after the load) or after some training unfrozen goes on exactly as the uninterrupted run."""
    from _scheduling import save_and_load
    x, y = data(torch.float64)
    model, opt, sched = _through_the_frozen_switch(case, x, y)
    if not checkpoint_frozen:
        _unfreeze(model, case)
        train_steps(model, opt, x, y, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # the fresh model's load switches its frozen layer too
        (fresh, fresh_opt, fresh_sched), _ = save_and_load(
            lambda: _frozen_switch_run(case, seed=3, frozen=checkpoint_frozen or case == "deflate"),
            model, opt, sched)
    if checkpoint_frozen:
        _unfreeze(model, case)
    if case == "deflate":
        _unfreeze(fresh, case)                      # requires_grad is not in a state dict
    for run, run_opt, run_sched in ((model, opt, sched), (fresh, fresh_opt, fresh_sched)):
        for epoch in (2, 3):
            run_sched.step(epoch)
            train_steps(run, run_opt, x, y, steps=2)
    assert [[n for n, p in fresh.named_parameters() if any(p is q for q in g["params"])]
            for g in fresh_opt.param_groups] == [[n for n, p in model.named_parameters()
                                                  if any(p is q for q in g["params"])] for g in opt.param_groups]
    for a, b in ((fresh.state_dict(), model.state_dict()), (fresh_opt.state_dict(), opt.state_dict())):
        _assert_same(a, b)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


# -- fused SGD with dampening --------------------------------------------------------------------------
def _first_steps_after_an_inflate(impl, policy="reset"):
    """float64 MLP with SGD(momentum=0.9, dampening=0.5) trained 3 steps in lowrank form, inflated, then one
    step: (the inflated weights' steps, their gradients, the warnings of the inflate)."""
    model, x, y = _float64_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5, **{impl: True})
    sched = DynamicRankScheduler(model, opt, 1, None, optimizer_state=policy)
    sched.step(0)
    train_steps(model, opt, x, y, steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched.step(1)
    weights = [model[i].weight.detach().clone() for i in (0, 2)]
    train_steps(model, opt, x, y, steps=1)
    steps = [w - model[i].weight.detach() for i, w in zip((0, 2), weights)]
    return steps, [model[i].weight.grad for i in (0, 2)], [str(w.message) for w in caught]


def test_fused_sgd_with_dampening_warns_that_the_new_weights_first_step_is_scaled():
    """Fused SGD needs a buffer on every parameter of a group where one has it: the inflated W gets a zero one,
    and with dampening its first step is (1 − dampening)·lr·g where SGD without fused takes lr·g (an empty
    buffer).  The inflate says so, naming the scale; the README promised empty state, and nothing was said."""
    steps, grads, said = _first_steps_after_an_inflate("foreach")
    assert not [m for m in said if "dampening" in m]
    for step, g in zip(steps, grads):
        assert rel_err(step, 0.1 * g) < 1e-12
    steps, grads, said = _first_steps_after_an_inflate("fused")
    assert said == ["fused SGD with momentum and dampening=0.5: 2 parameters that joined the optimizer at this "
                    "switch start with a zero momentum buffer (fused SGD cannot step a param group where only "
                    "some parameters have one), so their first step is 0.5·lr·g, (1 − dampening)·lr·g, where SGD "
                    "without fused=True takes lr·g; use SGD without fused, dampening=0, or optimizer_state='fresh'"]
    for step, g in zip(steps, grads):
        assert rel_err(step, 0.5 * 0.1 * g) < 1e-12
    # "fresh" leaves no buffer: the first step is fused SGD's own, lr·g, and nothing is said.
    steps, grads, said = _first_steps_after_an_inflate("fused", policy="fresh")
    assert not [m for m in said if "dampening" in m]
    for step, g in zip(steps, grads):
        assert rel_err(step, 0.1 * g) < 1e-12


def _custom_named_run(seed=0):
    """The converted MLP under AdamW whose one group names its parameters p0, p1, ... (no module paths)."""
    model = mlp(seed)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": params, "param_names": [f"p{i}" for i in range(len(params))]}], lr=1e-3)
    return model, opt, DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)


def _names(opt):
    return opt.param_groups[0]["param_names"]


@pytest.mark.parametrize("resume", ["model first", "scheduler first"])
def test_names_that_are_not_module_paths_stay_on_the_parameters_a_switch_keeps(resume):
    """With custom param_names, the deflate renamed the biases it keeps ('p0' became 'p1.bias'): it read 'p1.weight',
    the name the inflate gave W, as a module path.  Kept parameters keep their names; an added one is named after
    a removed one (less that one's own name where it ends so), as a model-first resume names it."""
    model, opt, sched = _custom_named_run()
    bias = model[0].bias
    assert _names(opt) == [f"p{i}" for i in range(8)]        # layer 0: bias, A, B; layer 2: bias, A, B; the head
    sched.step(1)
    assert _names(opt) == ["p0", "p1.weight", "p3", "p4.weight", "p6", "p7"]
    sched.step(2)
    expected = ["p0", "p1.A", "p1.B", "p3", "p4.A", "p4.B", "p6", "p7"]
    assert _names(opt) == expected
    assert model[0].bias is bias and opt.param_groups[0]["params"][0] is bias
    saved = copy.deepcopy({"model": model.state_dict(), "scheduler": sched.state_dict()})
    resumed, resumed_opt, resumed_sched = _custom_named_run(1)
    if resume == "model first":
        resumed.load_state_dict(saved["model"])                # lowrank → adapter at once
        assert _names(resumed_opt) == expected
        resumed_sched.load_state_dict(saved["scheduler"])
    else:
        resumed_sched.load_state_dict(saved["scheduler"])      # through full form
        resumed.load_state_dict(saved["model"])
    assert _names(resumed_opt) == expected
    names = dict(zip(map(id, resumed_opt.param_groups[0]["params"]), _names(resumed_opt)))
    assert [names[id(p)] for p in (resumed[0].bias, resumed[0].A, resumed[0].B)] == ["p0", "p1.A", "p1.B"]
