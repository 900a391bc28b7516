"""Dynamic-rank schedulers inside a full PyTorch training set-up.

LR schedulers, every built-in optimizer in its for-loop / foreach / fused
implementations, param groups, gradient clipping, ``GradScaler``, averaged
(EMA / SWA) copies of the model and checkpoints, each across the switches.
References: the same run without switches, the for-loop optimizer in float64,
hand-computed averages, an uninterrupted run.
"""

import copy
import io
import math
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler as L
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from _helpers import holding_optimizer, rel_err
from _scheduling import (amp_step, check_unscaled_gradients, data, decay_groups, ema_reference_update, held,
                         lbfgs_step, mlp, resume_whole_run, same_set, scaled_backward, scaler_step, sgd_step,
                         train_steps, trainable, whole_setup)
from dynrank import (DynamicRankScheduler, FusedLowRankLinear, LowRankConv2d, convert_model, grow_rank_,
                     load_training_state, training_state)


# -- LR schedulers ------------------------------------------------------------------------------
LR_SCHEDULERS = {
    "step": lambda o: L.StepLR(o, 2, 0.5),
    "multistep": lambda o: L.MultiStepLR(o, [2, 4], 0.1),
    "cosine": lambda o: L.CosineAnnealingLR(o, 6),
    "onecycle": lambda o: L.OneCycleLR(o, [0.1, 0.05], total_steps=12),
    "lambda": lambda o: L.LambdaLR(o, [lambda e: 0.9 ** e, lambda e: 1 / (e + 1)]),
    "sequential": lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.1, total_iters=2), L.ExponentialLR(o, 0.9)],
                                           milestones=[2]),
    "chained": lambda o: L.ChainedScheduler([L.ConstantLR(o, 0.5, total_iters=3), L.ExponentialLR(o, 0.9)]),
    "plateau": lambda o: L.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "warm_restarts": lambda o: L.CosineAnnealingWarmRestarts(o, 2, 2),
}


def _lr_run(kind, switches, resume_epoch=None):
    """Per-step (lr, momentum) of both groups over 6 epochs of 2 steps; switches at 2 and 4; optionally
    saved and resumed into fresh objects at ``resume_epoch``."""
    def build():
        model = mlp()
        opt = torch.optim.SGD(decay_groups(model, lr=0.05), lr=0.1, momentum=0.9, weight_decay=1e-3)
        sched = DynamicRankScheduler(model, opt, 2, 4) if switches else None
        return model, opt, LR_SCHEDULERS[kind](opt), sched
    model, opt, lrs, sched = build()
    x, y = data()
    seen = []
    for epoch in range(6):
        if epoch == resume_epoch:
            buffer = io.BytesIO()
            torch.save(training_state(model, opt, sched, lr_scheduler=lrs.state_dict()), buffer)
            buffer.seek(0)
            model, opt, lrs, sched = build()
            lrs.load_state_dict(load_training_state(torch.load(buffer), model, opt, sched)["lr_scheduler"])
        if sched is not None:
            sched.step(epoch)
        for _ in range(2):
            seen.append([(g["lr"], g["momentum"]) for g in opt.param_groups])
            sgd_step(model, opt, x, y)
            if kind == "onecycle":
                lrs.step()
        if kind == "plateau":
            lrs.step(10.0 if epoch % 2 else 1.0)      # a metric independent of the switches
        elif kind != "onecycle":
            lrs.step()
    return seen


@pytest.mark.parametrize("kind", list(LR_SCHEDULERS))
def test_lr_schedulers_give_the_same_lrs_through_switches_and_a_resume(kind):
    reference = _lr_run(kind, switches=False)
    assert len({tuple(map(tuple, s)) for s in reference}) > 1          # the schedule does change the lr
    assert _lr_run(kind, switches=True) == reference
    assert _lr_run(kind, switches=True, resume_epoch=5) == reference   # saved after both switches


# -- optimizers -----------------------------------------------------------------------------------
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "sgd-plain": (torch.optim.SGD, dict(lr=0.05, weight_decay=1e-3)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
    "adamw-amsgrad": (torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5, centered=True)),
    "adagrad": (torch.optim.Adagrad, dict(lr=1e-2, initial_accumulator_value=0.1)),
    "adamax": (torch.optim.Adamax, dict(lr=1e-2)),
    "nadam": (torch.optim.NAdam, dict(lr=1e-2, decoupled_weight_decay=True, weight_decay=1e-3)),
    "radam": (torch.optim.RAdam, dict(lr=1e-2)),
}
IMPLEMENTATIONS = [(name, impl) for name in OPTIMIZERS for impl in ("foreach", "fused")
                   if impl == "foreach" or name.split("-")[0] in ("sgd", "adam", "adamw", "adagrad")]


def _optimizer_run(name, impl, policy):
    """Float64 MLP, two param groups, switches at 1 and 2; the final parameters and the group contents."""
    cls, options = OPTIMIZERS[name]
    model = mlp().double()
    opt = cls(decay_groups(model), **options, **{impl: True} if impl != "loop" else {"foreach": False})
    sched = DynamicRankScheduler(model, opt, 1, 2, optimizer_state=policy)
    x, y = data(torch.float64)
    for epoch in range(3):
        sched.step(epoch)
        assert same_set(held(opt), trainable(model))
        assert all(p.dim() >= 2 for p in opt.param_groups[0]["params"])      # switched params stay decayed
        assert all(p.dim() == 1 for p in opt.param_groups[1]["params"])
        for _ in range(2):
            assert math.isfinite(sgd_step(model, opt, x, y))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("policy", ["reset", "carry"])
@pytest.mark.parametrize("name, impl", IMPLEMENTATIONS, ids=[f"{n}-{i}" for n, i in IMPLEMENTATIONS])
def test_every_optimizer_implementation_steps_as_the_for_loop_through_switches(name, impl, policy):
    # fused SGD with momentum used to fail after a switch: new parameters without a momentum buffer
    # beside old ones with one ("expected Tensor as element 0 in argument 2, but got NoneType").
    expected = _optimizer_run(name, "loop", policy)
    actual = _optimizer_run(name, impl, policy)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and rel_err(a, e) < 1e-10


def test_fused_sgd_zero_buffer_steps_as_the_missing_one():
    # After the deflate the new factors of the fused optimizer get a zero momentum buffer; with
    # dampening 0 their first step must be the plain gradient step lr·g, as for a missing buffer.
    model = mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    sched = DynamicRankScheduler(model, opt, 0, 1, deflate_init="random")
    x, y = data(torch.float64)
    sched.step(0)
    sgd_step(model, opt, x, y)
    sched.step(1)
    factors = {k: v for k, v in model[0].factors().items()}
    assert all(bool((opt.state[f]["momentum_buffer"] == 0).all()) for f in factors.values())
    before = {k: v.detach().clone() for k, v in factors.items()}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {k: v.grad.clone() for k, v in factors.items()}
    opt.step()
    for k, f in factors.items():
        assert grads[k].abs().max() > 0
        assert rel_err(f.detach(), before[k] - 0.1 * grads[k]) < 1e-12


def test_fused_sgd_held_as_optim_steps_as_the_bare_one_through_switches():
    # Form changes saw through .optimizer wrappers only: inside a .optim one, the fused SGD's new factors got no
    # zero momentum buffer beside the trained parameters' and its next step failed.
    x, y = data(torch.float64)
    runs = []
    for wrap in (False, True):
        model = mlp().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
        sched = DynamicRankScheduler(model, holding_optimizer(opt, "optim") if wrap else opt, 1, 2, deflate_init="zeros")
        for epoch in range(3):
            sched.step(epoch)
            sgd_step(model, sched.optimizer, x, y)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def _tucker_net():
    torch.manual_seed(0)
    return nn.Sequential(LowRankConv2d(3, 6, 3, rank=(2, 3), decomposition="tucker", padding=1), nn.ReLU(),
                         nn.Flatten(), FusedLowRankLinear(6 * 4 * 4, 3, rank=2))


@pytest.mark.parametrize("net", ["mlp", "tucker"])
@pytest.mark.parametrize("deflate_init", ["zeros", "random", "svd"])
def test_lbfgs_starts_afresh_at_each_switch(net, deflate_init):
    # L-BFGS's history spans all parameters flattened; after a switch it used to fail on a size
    # mismatch.  deflate(init="svd") left column-major factors (the SVD's Vᵀ, a Tucker core) whose
    # gradients L-BFGS could not view flat.  Reference: a fresh L-BFGS built on a copy of the switched model.
    model = (mlp() if net == "mlp" else _tucker_net()).double()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=4)
    sched = DynamicRankScheduler(model, opt, 1, 2, deflate_init=deflate_init)
    x, y = data(torch.float64)
    if net == "tucker":
        x = torch.randn(32, 3, 4, 4, dtype=torch.float64)

    for epoch in range(3):
        sched.step(epoch)
        fresh_model = copy.deepcopy(model)
        fresh = torch.optim.LBFGS(fresh_model.parameters(), lr=0.5, max_iter=3, history_size=4)
        assert lbfgs_step(model, opt, x, y) == lbfgs_step(fresh_model, fresh, x, y)
        for a, e in zip(model.parameters(), fresh_model.parameters()):
            assert rel_err(a.detach(), e.detach()) < 1e-12


def test_factors_in_different_param_groups_are_refused():
    model = mlp()
    layer = model[0]
    others = [p for p in model.parameters() if p is not layer.B]
    opt = torch.optim.SGD([{"params": others}, {"params": [layer.B], "lr": 0.5}], lr=0.1)
    with pytest.raises(ValueError, match=r"layer '0'.*A in group 0, B in group 1"):
        DynamicRankScheduler(model, opt, 1, 2)
    biases_apart = torch.optim.SGD(decay_groups(model), lr=0.1)            # a bias elsewhere is fine
    DynamicRankScheduler(model, biases_apart, 1, 2)
    layer.B.requires_grad_(False)                                          # so is a frozen factor
    DynamicRankScheduler(model, opt, 1, 2)


def test_a_frozen_factor_the_optimizer_holds_leaves_it_with_its_layer():
    """SGD(model.parameters()) holds a frozen B too; inflate releases it, and the optimizer must let it
    go (it stayed for good: memory, and another parameter list than a freshly built optimizer's on
    resume).  Reference: the optimizer built afresh on the switched model."""
    model = mlp()
    model[0].B.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    released = model[0].B
    sched = DynamicRankScheduler(model, opt, 1, 2)
    x, y = data()
    for epoch in range(3):
        sched.step(epoch)
        sgd_step(model, opt, x, y)
        if epoch >= 1:
            assert all(p is not released for p in held(opt)) and same_set(held(opt), trainable(model))


def test_rank_growth_keeps_each_factor_in_its_own_group():
    # LoRA+-style groups (B with a larger lr): the wider B must stay in B's group.
    model = mlp()
    layer = model[2]
    others = [p for p in model.parameters() if p is not layer.B]
    opt = torch.optim.Adam([{"params": others, "lr": 1e-3}, {"params": [layer.B], "lr": 1.6e-2}])
    old_rank = layer.rank
    grow_rank_(layer, old_rank + 2, opt)                 # what IncrementalRankScheduler.step does
    assert layer.rank == old_rank + 2
    assert [p for p in opt.param_groups[1]["params"]] == [layer.B]
    assert any(p is layer.A for p in opt.param_groups[0]["params"])
    assert not any(p is layer.B for p in opt.param_groups[0]["params"])


# -- gradients: clipping, stale and pending gradients, GradScaler -----------------------------------
@pytest.mark.parametrize("set_to_none", [True, False])
def test_clip_grad_norm_over_the_model_sees_only_trained_gradients_after_a_deflate(set_to_none):
    # The weight a deflate freezes kept its last gradient, which zero_grad never clears again
    # (the optimizer no longer holds it): clip_grad_norm_(model.parameters()) counted it.
    model = mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = DynamicRankScheduler(model, opt, 0, 1)
    x, y = data(torch.float64)
    sched.step(0)
    sgd_step(model, opt, x, y)
    sched.step(1)
    for _ in range(2):
        opt.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(model(x), y).backward()
        expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in held(opt) if p.grad is not None))
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        assert rel_err(total, expected) < 1e-12
        opt.step()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_switch_drops_gradients_only_of_parameters_that_leave_training():
    # Gradient accumulation across a switch: what stays (biases, the dense classifier) keeps its
    # pending gradient; the factors an inflate releases lose theirs (there is no W gradient to make of it).
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = DynamicRankScheduler(model, opt, 1, 2)
    x, y = data()
    sched.step(0)
    F.cross_entropy(model(x), y).backward()
    released = list(model[0].factors().values())
    staying = {name: p.grad.clone() for name, p in model.named_parameters() if name.endswith("bias") or
               name.startswith("4.")}
    sched.step(1)
    assert all(p.grad is None for p in released)
    assert model[0].weight.grad is None
    now = dict(model.named_parameters())
    for name, grad in staying.items():
        assert torch.equal(now[name].grad, grad)


def _amp_model():
    model = mlp()
    opt = torch.optim.AdamW(decay_groups(model), lr=1e-2)
    sched = DynamicRankScheduler(model, opt, 1, 2)
    return model, opt, sched, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)


def test_grad_scaler_unscales_and_skips_on_the_new_parameters():
    model, opt, sched, scaler = _amp_model()
    x, y = data()
    for epoch in range(3):
        sched.step(epoch)
        # epoch 2: an overflow in a new adapter factor
        check_unscaled_gradients(model, opt, scaler, x, y, overflow=(model[0].A, (0, 0)) if epoch == 2 else None)
        changed = scaler_step(model, opt, scaler, skipped=epoch == 2)
        if epoch != 2:
            assert all(c for c, p in zip(changed, model.parameters()) if p.requires_grad)


def test_an_overflow_before_a_deflate_does_not_poison_training_after_it():
    # A skipped step (inf gradient) just before the deflate left inf in the frozen weight's .grad;
    # clip_grad_norm_(model.parameters()) then returned NaN at every adapter step and made every
    # gradient NaN after GradScaler's inf check (unscale_ runs before clipping): NaN weights.
    model, opt, sched, scaler = _amp_model()
    x, y = data()
    for epoch in range(3):
        sched.step(epoch)
        for step in range(2):
            scaled_backward(model, opt, scaler, x, y)
            if epoch == 1 and step == 1:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.unscale_(opt)
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            factor = model[0].A.detach().clone() if epoch == 2 else None
            scaler.step(opt)
            scaler.update()
            if epoch == 2:
                assert math.isfinite(total.item())
                assert not torch.equal(model[0].A.detach(), factor)
                assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# -- averaged copies --------------------------------------------------------------------------------
@pytest.mark.parametrize("deflate_init", ["zeros", "svd"])
def test_ema_copy_follows_the_switches(deflate_init):
    decay = 0.75
    model = mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = DynamicRankScheduler(model, opt, 1, 2, deflate_init=deflate_init)
    ema = sched.add_model_copy(AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay)).requires_grad_(False))
    twin = mlp().double()                    # the same run without the copy, for the random numbers drawn
    twin_sched = DynamicRankScheduler(twin, torch.optim.SGD(twin.parameters(), lr=0.1), 1, 2,
                                      deflate_init=deflate_init)
    reference = {}
    x, y = data(torch.float64)
    for epoch in range(3):
        before = ema(x).detach()
        rng = torch.get_rng_state()
        changes = sched.step(epoch)
        after = torch.get_rng_state()
        torch.set_rng_state(rng)
        assert twin_sched.step(epoch) == changes
        assert torch.equal(torch.get_rng_state(), after)              # following draws no random numbers
        if changes:
            assert rel_err(ema(x).detach(), before) < 1e-12             # the copy keeps its function
        for name, old, new in changes:
            layer, prefix = model.get_submodule(name), name + "."
            if new == "full":        # the copy merges its own averaged factors
                A, B = reference.pop(prefix + "A"), reference.pop(prefix + "B")
                reference[prefix + "weight"] = layer.scale * A @ B.t()
            else:                    # frozen averaged weight; factors start as the model's
                reference.update({prefix + k: v.detach().clone() for k, v in layer.factors().items()})
                if deflate_init == "svd":
                    reference[prefix + "weight"] = reference[prefix + "weight"] - layer.scale * \
                        layer.A.detach() @ layer.B.detach().t()
        for _ in range(2):
            sgd_step(model, opt, x, y)
            ema.update_parameters(model)
            ema_reference_update(reference, model, decay)
        averaged = dict(ema.module.named_parameters())
        assert sorted(averaged) == sorted(reference)
        for name, value in reference.items():
            assert rel_err(averaged[name].detach(), value) < 1e-12, name
    assert [ema.module[i].form for i in (0, 2)] == ["adapter", "adapter"]
    assert not any(p.requires_grad for p in ema.parameters())               # the copy stays out of autograd


def test_model_copies_are_checked():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, 1, 2)
    with pytest.raises(TypeError, match="nn.Module"):
        sched.add_model_copy({"module": model})
    with pytest.raises(ValueError, match="shares layer '0' with the model"):
        sched.add_model_copy(model)
    # A shallow copy of a layer is another module holding the very same parameters: an average of it
    # would be the model itself.
    with pytest.raises(ValueError, match="model copy Sequential shares layer '0' with the model"):
        sched.add_model_copy(nn.Sequential(*(copy.copy(m) for m in model)))
    partly = copy.deepcopy(model)
    partly[2] = copy.copy(model[2])
    with pytest.raises(ValueError, match="model copy Sequential shares layer '2' with the model"):
        sched.add_model_copy(partly)
    with pytest.raises(ValueError, match="no dynrank layer '2'"):
        sched.add_model_copy(copy.deepcopy(model)[:2])

    class EmaWrapper(nn.Module):                       # timm's ModelEmaV2/V3 hold the copy as .module
        def __init__(self, module):
            super().__init__()
            self.module = module
    with pytest.raises(ValueError, match=re.escape("model copy EmaWrapper has no dynrank layer '0' (it holds '0' as "
                                                   "'module.0': pass model_copy.module, the copy inside the "
                                                   "wrapper)")):
        sched.add_model_copy(EmaWrapper(copy.deepcopy(model)))
    late = copy.deepcopy(model)
    late[0].inflate()
    with pytest.raises(ValueError, match=r"layer '0' is .*'full'.*the model's is .*'lowrank'"):
        sched.add_model_copy(late)
    ema = sched.add_model_copy(AveragedModel(model))
    with pytest.raises(ValueError, match="already added"):
        sched.add_model_copy(ema)
    ema.module[2].inflate()                                            # changed behind the scheduler's back
    with pytest.raises(ValueError, match=r"layer '2'"):
        sched.step(1)
    assert model[0].form == "lowrank"                                  # checked before anything switched


# -- checkpoints ------------------------------------------------------------------------------------
def _full_run(resume_epoch=None, with_ema=True):
    """AdamW (two groups) + OneCycleLR + fp16 GradScaler + clipping (+ an EMA copy), switches at 1 and 2."""
    def build():
        model = mlp()
        opt = torch.optim.AdamW(decay_groups(model), lr=1e-2, weight_decay=0.1)
        return whole_setup(model, opt, DynamicRankScheduler(model, opt, 1, 2, optimizer_state="carry"), with_ema)
    model, opt, sched, lrs, scaler, ema = build()
    x, y = data()
    for epoch in range(4):
        if epoch == resume_epoch:
            model, opt, sched, lrs, scaler, ema = resume_whole_run(build, model, opt, sched, lrs, scaler, ema,
                                                                   with_ema)
        sched.step(epoch)
        for _ in range(2):
            amp_step(model, opt, scaler, lrs, ema, x, y, with_ema)
    return [t.detach().clone() for t in (*model.parameters(), *ema.parameters())]


@pytest.mark.parametrize("resume_epoch, with_ema", [(2, False), (3, False), (2, True), (3, True)])
def test_resume_with_the_whole_ecosystem_is_bitwise_identical(resume_epoch, with_ema):
    # Without the EMA copy this failed too: the uninterrupted run's clipping counted the stale
    # gradient of the weight frozen at the deflate, the resumed run (a fresh model) had none.
    expected = _full_run(with_ema=with_ema)
    actual = _full_run(resume_epoch, with_ema)
    assert len(actual) == len(expected)
    assert all(a.shape == e.shape and torch.equal(a, e) for a, e in zip(actual, expected))



def _names_match(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        assert group["param_names"] == [names[id(p)] for p in group["params"]]


def _named_optimizer(model):
    named = list(model.named_parameters())
    return torch.optim.AdamW([{"params": [(n, p) for n, p in named if p.dim() >= 2]},
                              {"params": [(n, p) for n, p in named if p.dim() < 2], "weight_decay": 0.0}], lr=1e-2)


def _tiny_cnn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 3))
    convert_model(model, rank_ratio=0.5, decomposition="tucker", min_features=1)
    return model, torch.randn(4, 3, 5, 5), torch.randint(0, 3, (4,))


@pytest.mark.parametrize("conv", [False, True])
def test_an_optimizer_built_from_named_parameters_keeps_its_names(conv):
    """torch keeps ``param_names`` in each group of an optimizer built from ``named_parameters()`` and
    saves them in its state dict: after a switch they named the removed factors ('0.A' where '0.weight'
    now sat).  Through inflate, deflate, a resume and a model load that switches, in two groups, they
    stay the model's own."""
    build = (lambda seed: _tiny_cnn(seed)[0]) if conv else mlp
    model = build(0)
    x, y = _tiny_cnn()[1:] if conv else data()
    opt = _named_optimizer(model)
    sched = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
    saved = {}
    for epoch in range(3):
        sched.step(epoch)
        _names_match(model, opt)
        train_steps(model, opt, x, y, steps=1)
        saved[epoch] = copy.deepcopy(training_state(model, opt, sched))
    assert opt.state_dict()["param_groups"][0]["param_names"] == opt.param_groups[0]["param_names"]
    again = build(4)
    again_opt = _named_optimizer(again)
    load_training_state(saved[2], again, again_opt, DynamicRankScheduler(again, again_opt, 1, 2))
    _names_match(again, again_opt)
    other = build(5)
    other_opt = _named_optimizer(other)
    DynamicRankScheduler(other, other_opt, inflate_epoch=1, deflate_epoch=2)
    other.load_state_dict(saved[1]["model"])                       # lowrank → full by the load
    _names_match(other, other_opt)


def test_rank_growth_keeps_param_names():
    model = mlp()
    opt = _named_optimizer(model)
    grow_rank_(model[0], model[0].rank + 2, opt)
    _names_match(model, opt)


@pytest.mark.parametrize("lowrank", ["factored", "dense"])
def test_param_names_follow_unconvert_model(lowrank):
    """The kept bias of a factored lowrank layer moves to the chain's last Linear ('0.1.bias'): named
    so, in its own group, as the new weights are."""
    from dynrank import unconvert_model
    model = mlp()
    opt = _named_optimizer(model)
    DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
    unconvert_model(model, lowrank=lowrank)
    _names_match(model, opt)


def test_names_that_are_not_module_paths_stay_unique():
    model = mlp()
    opt = torch.optim.SGD([(f"p{i}", p) for i, p in enumerate(model.parameters())], lr=0.1)
    sched = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
    for epoch in range(3):
        sched.step(epoch)
        names = opt.param_groups[0]["param_names"]
        assert len(set(names)) == len(names) == len(opt.param_groups[0]["params"])
