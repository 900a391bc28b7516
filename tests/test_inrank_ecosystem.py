"""IncrementalRankScheduler inside a full PyTorch training set-up.

LR schedulers, foreach / fused / L-BFGS optimizers, param groups, gradient
clipping, ``GradScaler``, averaged (EMA) copies of the model and checkpoints,
each across rank growth.  References: the same run without growth, the
for-loop optimizer in float64, a fresh L-BFGS, a hand-computed float64 EMA, an
uninterrupted run.  The data, the param groups and the training steps come from _scheduling.py, as in
test_ecosystem.py.
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler as L
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from _helpers import rel_err
from _scheduling import (amp_step, check_unscaled_gradients, data, decay_groups, ema_reference_update, held,
                         lbfgs_step, resume_whole_run, same_set, save_and_load, scaler_step, sgd_step, trainable,
                         whole_setup)
from dynrank import convert_model
from dynrank.inrank import IncrementalRankScheduler


def _mlp(form="lowrank", alpha=None, bias=True):
    """12 → 24 → 24 → 3 with the first two layers at ranks 3 and 6 (the classifier stays dense)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24, bias=bias), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    convert_model(model, rank_ratio=0.25, form=form, alpha=alpha)
    return model


ALWAYS = 1 - 1e-9


def _growth(model, opt, grow=True, init_rank=None, check_every=2, max_rank=None):
    """Growth by one component at every check (a threshold so near 1 that the top ranks never explain
    enough: even a component that started at zero output one step ago counts);
    ``grow=False``: the same scheduler whose first check never comes (the reference run)."""
    return IncrementalRankScheduler(model, opt, init_rank=init_rank, buffer=2, threshold=ALWAYS,
                                    warmup_steps=0 if grow else 10 ** 6, check_every=check_every,
                                    max_rank=max_rank)


def _factor_groups(model, lr):
    """LoRA+-style: the B factors in a group of their own with 4× the lr, the rest in another."""
    b_factors = [m.B for m in model.modules() if getattr(m, "B", None) is not None]
    rest = [p for p in model.parameters() if not any(p is b for b in b_factors)]
    return [{"params": rest}, {"params": b_factors, "lr": 4 * lr}]


# -- LR schedulers ------------------------------------------------------------------------------
LR_SCHEDULERS = {
    "step": lambda o: L.StepLR(o, 3, 0.5),
    "cosine": lambda o: L.CosineAnnealingLR(o, 10),
    "onecycle": lambda o: L.OneCycleLR(o, [0.1, 0.05], total_steps=12),
    "lambda": lambda o: L.LambdaLR(o, [lambda e: 0.9 ** e, lambda e: 1 / (e + 1)]),
    "sequential": lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.1, total_iters=3), L.ExponentialLR(o, 0.9)],
                                           milestones=[3]),
    "plateau": lambda o: L.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


def _lr_run(kind, grow, resume_step=None):
    """Per-step (lr, momentum) of both groups over 12 steps, growth checks every 2 steps; optionally
    saved and resumed into fresh objects before ``resume_step``.  Also the ranks at the end."""
    def build():
        model = _mlp()
        opt = torch.optim.SGD(decay_groups(model, lr=0.05), lr=0.1, momentum=0.9, weight_decay=1e-3)
        return model, opt, _growth(model, opt, grow), LR_SCHEDULERS[kind](opt)
    model, opt, growth, lrs = build()
    x, y = data()
    seen = []
    for step in range(12):
        if step == resume_step:
            (model, opt, growth, lrs), extra = save_and_load(build, model, opt, growth, lrs=lrs.state_dict(),
                                                              rng=torch.get_rng_state())
            lrs.load_state_dict(extra["lrs"])
            torch.set_rng_state(extra["rng"])
        seen.append([(g["lr"], g["momentum"]) for g in opt.param_groups])
        sgd_step(model, opt, x, y)
        growth.step()
        lrs.step(10.0 if step % 2 else 1.0) if kind == "plateau" else lrs.step()  # a metric free of growth
    return seen, growth.ranks


@pytest.mark.parametrize("kind", list(LR_SCHEDULERS))
def test_lr_schedulers_give_the_same_lrs_through_growth_and_a_resume(kind):
    reference, still = _lr_run(kind, grow=False)
    assert len({tuple(map(tuple, s)) for s in reference}) > 1          # the schedule does change the lr
    seen, grown = _lr_run(kind, grow=True)
    assert all(grown[name] > rank for name, rank in still.items())     # every layer grew
    assert seen == reference
    assert _lr_run(kind, grow=True, resume_step=7) == (reference, grown)


# -- optimizers -----------------------------------------------------------------------------------
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
    "adamw-amsgrad": (torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    "adagrad": (torch.optim.Adagrad, dict(lr=1e-2, initial_accumulator_value=0.1)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5, centered=True)),
}
IMPLEMENTATIONS = [(name, impl) for name in OPTIMIZERS for impl in ("foreach", "fused") if
                   impl == "foreach" or name != "rmsprop"]


def _optimizer_run(name, impl):
    """Float64 MLP in two param groups, growth every 2 steps over 6 steps; the final parameters."""
    cls, options = OPTIMIZERS[name]
    model = _mlp().double()
    opt = cls(decay_groups(model), **options, **{impl: True} if impl != "loop" else {"foreach": False})
    growth = _growth(model, opt)
    start = growth.ranks
    x, y = data(torch.float64)
    for _ in range(6):
        assert math.isfinite(sgd_step(model, opt, x, y))
        growth.step()
        assert same_set(held(opt), trainable(model))
        assert all(p.dim() >= 2 for p in opt.param_groups[0]["params"])      # grown factors stay decayed
    assert all(rank > start[name] for name, rank in growth.ranks.items())
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name, impl", IMPLEMENTATIONS, ids=[f"{n}-{i}" for n, i in IMPLEMENTATIONS])
def test_every_optimizer_implementation_steps_as_the_for_loop_through_growth(name, impl):
    expected = _optimizer_run(name, "loop")
    actual = _optimizer_run(name, impl)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and rel_err(a, e) < 1e-10


@pytest.mark.parametrize("init_rank, max_rank", [(None, 6), (1, None)], ids=["factors-first", "truncated"])
def test_lbfgs_starts_afresh_at_each_growth(init_rank, max_rank):
    # "factors-first": L-BFGS keeps its history on its first parameter, here layer 0's A, the only
    # layer to grow (layer 2 is at max_rank); growth padded that "state" into the wider A and L-BFGS
    # failed on a size mismatch.  "truncated": the constructor's truncated SVD left column-major
    # factors, whose gradients L-BFGS cannot view flat.  Reference: a fresh L-BFGS on a copy.
    model = _mlp(bias=False).double()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=4)
    assert opt.param_groups[0]["params"][0] is model[0].A
    growth = _growth(model, opt, init_rank=init_rank, check_every=1, max_rank=max_rank)
    x, y = data(torch.float64)

    grown, compared = True, 0                  # the constructor's change (or none) starts afresh too
    for _ in range(5):
        if not grown:
            lbfgs_step(model, opt, x, y)
        else:                                  # growth since the last step: the history starts afresh
            fresh_model = copy.deepcopy(model)
            fresh = torch.optim.LBFGS(fresh_model.parameters(), lr=0.5, max_iter=3, history_size=4)
            assert lbfgs_step(model, opt, x, y) == lbfgs_step(fresh_model, fresh, x, y)
            for a, e in zip(model.parameters(), fresh_model.parameters()):
                assert rel_err(a.detach(), e.detach()) < 1e-12
            compared += 1
        grown = growth.step()
    assert compared >= 4


def test_factors_in_groups_of_their_own_stay_there_with_their_lr():
    # Unlike a form change, growth replaces A and B one for one, so they may sit in different groups.
    model = _mlp().double()
    opt = torch.optim.SGD(_factor_groups(model, lr=0.01), lr=0.01)
    growth = _growth(model, opt, check_every=1)
    x, y = data(torch.float64)
    for _ in range(3):
        sgd_step(model, opt, x, y)
        assert growth.step()
        layers = [model[0], model[2]]
        assert same_set(opt.param_groups[1]["params"], [m.B for m in layers])
        assert same_set(opt.param_groups[0]["params"], [p for p in trainable(model) if
                                                        not any(p is m.B for m in layers)])
        before = {id(p): p.detach().clone() for p in trainable(model)}
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = {id(p): p.grad.clone() for p in trainable(model)}
        opt.step()                                               # plain SGD: p − lr_group·g exactly
        for lr, group in ((0.01, opt.param_groups[0]), (0.04, opt.param_groups[1])):
            for p in group["params"]:
                assert grads[id(p)].abs().max() > 0
                assert rel_err(p.detach(), before[id(p)] - lr * grads[id(p)]) < 1e-13


# -- gradients: stale gradients, clipping, GradScaler ---------------------------------------------
def test_growth_drops_the_gradients_of_the_replaced_factors_only():
    model = _mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    growth = _growth(model, opt, check_every=1)
    x, y = data(torch.float64)
    F.cross_entropy(model(x), y).backward()
    replaced = [p for m in (model[0], model[2]) for p in (m.A, m.B)]
    staying = {name: p.grad.clone() for name, p in model.named_parameters()
               if not name.endswith((".A", ".B"))}
    assert growth.step() == [("0", 3, 4), ("2", 6, 7)]
    assert all(p.grad is None for p in replaced)                 # nothing holding them sees a stale gradient
    assert all(m.A.grad is None and m.B.grad is None for m in (model[0], model[2]))
    now = dict(model.named_parameters())
    for name, grad in staying.items():
        assert torch.equal(now[name].grad, grad)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in held(opt)))
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert rel_err(total, expected) < 1e-12


def _amp_setup(**scaler_options):
    model = _mlp()
    opt = torch.optim.AdamW(_factor_groups(model, lr=1e-2), lr=1e-2)
    return model, opt, _growth(model, opt, check_every=1), torch.amp.GradScaler("cpu", **scaler_options)


def test_grad_scaler_unscales_clips_and_skips_on_the_grown_factors():
    model, opt, growth, scaler = _amp_setup(init_scale=2.0 ** 10)
    x, y = data()
    for step in range(3):
        # step 2: an overflow in a grown factor's newest column
        check_unscaled_gradients(model, opt, scaler, x, y, overflow=(model[2].B, (0, -1)) if step == 2 else None)
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        assert math.isfinite(total.item()) == (step != 2)
        changed = scaler_step(model, opt, scaler, skipped=step == 2)
        if step != 2:
            assert all(changed)
        assert growth.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# -- averaged copies --------------------------------------------------------------------------------
def _ema_run(form, alpha, with_ema, decay=0.75):
    """Float64 SGD, growth at every step after the first two; the copy checked at every step against a
    hand-computed EMA.  Returns the model's final parameters."""
    model = _mlp(form, alpha).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    growth = IncrementalRankScheduler(model, opt, init_rank=None, buffer=2, threshold=ALWAYS, warmup_steps=2,
                                      check_every=1)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay)).requires_grad_(False)
    if with_ema:
        assert growth.add_model_copy(ema) is ema
    reference, grew = {}, 0
    x, y = data(torch.float64)
    for _ in range(5):
        sgd_step(model, opt, x, y)
        if with_ema:
            ema.update_parameters(model)
            ema_reference_update(reference, model, decay)
        before = ema(x).detach()
        grown = growth.step()
        if not with_ema:
            continue
        grew += len(grown)
        if grown:
            assert rel_err(ema(x).detach(), before) < 1e-12             # the copy keeps its function
        for name, old, new in grown:
            layer, prefix = model.get_submodule(name), name + "."
            ratio = layer.scale_for(old) / layer.scale_for(new)
            for key, r in (("A", ratio), ("B", 1.0)):                   # own old columns, the model's new ones
                fresh = getattr(layer, key).detach()[:, old:]
                reference[prefix + key] = torch.cat([reference[prefix + key] * r, fresh], dim=1)
        averaged = dict(ema.module.named_parameters())
        assert sorted(averaged) == sorted(reference)
        for name, value in reference.items():
            assert rel_err(averaged[name].detach(), value) < 1e-12, name
    if with_ema:
        assert grew >= 4                                                # both layers grew, twice or more
        assert [ema.module[i].rank for i in (0, 2)] == [model[i].rank for i in (0, 2)]
        assert not any(p.requires_grad for p in ema.parameters())      # the copy stays out of autograd
        assert not any(id(p) in {id(q) for q in held(opt)} for p in ema.parameters())
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("form, alpha", [("lowrank", None), ("lowrank", 4.0), ("adapter", None)])
def test_ema_copy_grows_with_the_model(form, alpha):
    with_copy = _ema_run(form, alpha, with_ema=True)
    without = _ema_run(form, alpha, with_ema=False)                    # the copy draws no random numbers
    assert all(torch.equal(a, b) for a, b in zip(with_copy, without))


def test_model_copies_are_checked():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before_growth = copy.deepcopy(model)
    growth = _growth(model, opt, init_rank=1, check_every=1)             # layer "2": rank 6 → 3
    with pytest.raises(TypeError, match="nn.Module.*got dict"):
        growth.add_model_copy({"module": model})
    with pytest.raises(ValueError, match="shares layer '0' with the model"):
        growth.add_model_copy(model)
    shared = copy.deepcopy(model)
    shared[2].bias = model[2].bias
    with pytest.raises(ValueError, match="shares layer '2' with the model"):
        growth.add_model_copy(shared)
    with pytest.raises(ValueError, match="no dynrank layer '2'"):
        growth.add_model_copy(copy.deepcopy(model)[:2])
    with pytest.raises(ValueError, match=r"layer '2' is .*6.*the model's is .*3"):
        growth.add_model_copy(before_growth)                            # made before the constructor's change
    ema = growth.add_model_copy(AveragedModel(model))
    with pytest.raises(ValueError, match="already added"):
        growth.add_model_copy(ema)
    ranks, params = growth.ranks, held(opt)
    ema.module[2].inflate()                                            # changed behind the scheduler's back
    with pytest.raises(ValueError, match=r"layer '2' is .*'full'"):
        growth.step()
    assert growth.ranks == ranks and held(opt) == params and growth.last_step == 0   # checked before growing


# -- checkpoints ------------------------------------------------------------------------------------
def _full_run(resume_step=None, with_ema=True):
    """AdamW (LoRA+ groups) + OneCycleLR + fp16 GradScaler + clipping (+ an EMA copy), growth at steps
    2, 4, 6, 8 (new B columns drawn from the global RNG); optionally resumed before ``resume_step``."""
    def build():
        model = _mlp()
        opt = torch.optim.AdamW(_factor_groups(model, lr=1e-2), lr=1e-2, weight_decay=0.1)
        return whole_setup(model, opt, _growth(model, opt, init_rank=1), with_ema)
    model, opt, growth, lrs, scaler, ema = build()
    x, y = data()
    for step in range(8):
        if step == resume_step:
            model, opt, growth, lrs, scaler, ema = resume_whole_run(build, model, opt, growth, lrs, scaler, ema,
                                                                    with_ema)
        amp_step(model, opt, scaler, lrs, ema, x, y, with_ema)
        growth.step()
    assert growth.ranks == {"0": 7, "2": 7}                            # four growths of each layer
    return [t.detach().clone() for t in (*model.parameters(), *ema.parameters())]


@pytest.mark.parametrize("resume_step, with_ema", [(3, False), (5, True), (6, True)])
def test_resume_with_the_whole_ecosystem_is_bitwise_identical(resume_step, with_ema):
    expected = _full_run(with_ema=with_ema)
    actual = _full_run(resume_step, with_ema)
    assert len(actual) == len(expected)
    assert all(a.shape == e.shape and torch.equal(a, e) for a, e in zip(actual, expected))



def _hooked_run(resume_step=None):
    """Float64 SGD, growth at every check (steps 2, 4, 6), a callback that registers a gradient hook
    (halving the gradient) on every grown A, as per-tensor clipping or scaling would; optionally resumed
    with load_training_state (and the RNG state) before ``resume_step``.  Returns the final parameters and
    the events."""
    def build():
        model = _mlp().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        growth = _growth(model, opt, init_rank=1)
        events = []

        def rehook(event):
            events.append(event)
            for name, _, _ in event["rank_changes"]:
                model.get_submodule(name).A.register_hook(lambda grad: grad / 2)
        growth.add_callback(rehook)
        for i in (0, 2):
            model[i].A.register_hook(lambda grad: grad / 2)
        return model, opt, growth, events
    model, opt, growth, events = build()
    x, y = data(torch.float64)
    for step in range(7):
        if step == resume_step:
            (model, opt, growth, events), extra = save_and_load(build, model, opt, growth, rng=torch.get_rng_state())
            torch.set_rng_state(extra["rng"])                           # growth draws B columns from it
        sgd_step(model, opt, x, y)
        growth.step()
    assert growth.ranks == {"0": 6, "2": 6}                            # three growths of each layer
    return [p.detach().clone() for p in model.parameters()], events


@pytest.mark.parametrize("resume_step", [3, 5])
def test_a_resume_calls_the_callbacks_so_hooks_on_the_loaded_factors_come_back(resume_step):
    """The load replaced A and B with no event: the hooks a callback registers after growth were lost on a
    resume, and the resumed run trained on whole gradients."""
    expected, _ = _hooked_run()
    actual, events = _hooked_run(resume_step)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))
    loaded = {"epoch": None, "step": resume_step, "changes": [("0", "lowrank", "lowrank"), ("2", "lowrank", "lowrank")],
              "rank_changes": [("0", 3, 3 + resume_step // 2), ("2", 3, 3 + resume_step // 2)], "loaded": True}
    assert events[0] == loaded and not any("loaded" in e for e in events[1:])
    # A RankMonitor attached records the growths of the run, not the load.
    from dynrank import RankMonitor
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    growth = _growth(model, opt, init_rank=1)
    monitor = RankMonitor(model).attach(growth)
    growth.load_state_dict({**growth.state_dict(), "ranks": {"0": 5, "2": 4}, "current": {"0": 3, "2": 2},
                            "last_step": 4})
    assert growth.ranks == {"0": 5, "2": 4} and monitor.switches == []
    with monitor.epoch(0):
        sgd_step(model, opt, *data())
        assert growth.step(6) == [("0", 5, 6), ("2", 4, 5)]
    assert [s["rank_changes"] for s in monitor.switches] == [[["0", 5, 6], ["2", 4, 5]]]


# -- torch.inference_mode ----------------------------------------------------------------------------
def _grow_with_an_ema(inference):
    """One float64 SGD step and EMA update, then a growth (under inference mode if ``inference``), another
    step and EMA update through the grown factors.  Returns the model, the EMA copy, and the input."""
    model = _mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    growth = _growth(model, opt, init_rank=1, check_every=1)
    ema = growth.add_model_copy(AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.75)))
    x, y = data(torch.float64)
    sgd_step(model, opt, x, y)
    ema.update_parameters(model)
    with torch.inference_mode(inference):
        assert growth.step() == [("0", 3, 4), ("2", 3, 4)]
    sgd_step(model, opt, x, y)
    ema.update_parameters(model)
    return model, ema, x


def test_a_model_copy_grown_under_inference_mode_holds_ordinary_parameters():
    """The copy's grown A and B were inference tensors: loading the EMA's state dict, or a backward through
    the EMA, failed."""
    model, ema, x = _grow_with_an_ema(True)
    reference_model, reference, _ = _grow_with_an_ema(False)
    for name, p in ema.named_parameters():
        assert not p.is_inference() and p.requires_grad, name
    assert all(torch.equal(p, q) for p, q in zip(ema.parameters(), reference.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))
    ema.load_state_dict({k: v.clone() for k, v in reference.state_dict().items()})
    for m in (ema, reference):
        m(x).square().sum().backward()
    assert torch.equal(ema.module[0].A.grad, reference.module[0].A.grad) and ema.module[0].A.grad.abs().sum() > 0


@pytest.mark.parametrize("when", ["construction", "load"])
def test_a_truncation_under_inference_mode_gives_ordinary_parameters_that_train(when):
    """A load (or construction) that lowers a layer's rank left the model's own A and B as inference
    tensors: the next training step failed ("Inference tensors cannot be saved for backward")."""
    def truncate(inference):
        model = _mlp().double()                                         # ranks 3 and 6
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with torch.inference_mode(inference):
            growth = _growth(model, opt, init_rank=1 if when == "construction" else None)
            if when == "load":
                growth.load_state_dict({**growth.state_dict(), "ranks": {"0": 3, "2": 2}, "current": {"0": 1, "2": 1}})
        assert growth.ranks == {"0": 3, "2": 3 if when == "construction" else 2}
        x, y = data(torch.float64)
        sgd_step(model, opt, x, y)
        return model, opt
    model, opt = truncate(True)
    reference, _ = truncate(False)
    assert not any(p.is_inference() for p in model.parameters())
    assert same_set(held(opt), trainable(model))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


# -- factors the user left out of training ---------------------------------------------------------
@pytest.mark.parametrize("frozen", ["A", "B"])
def test_a_frozen_factor_stays_frozen_and_out_of_the_optimizer(frozen):
    """LoRA-FA style: one factor frozen and left out of the optimizer.  Growth keeps it frozen and out of
    the optimizer (it was made trainable and added), its old columns as they were (A rescaled with
    alpha), and the optimizer holds exactly the trainable parameters."""
    model = _mlp(alpha=4.0)
    layer = model[0]
    getattr(layer, frozen).requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    growth = _growth(model, opt, check_every=1)
    x, y = data()
    start = getattr(layer, frozen).detach().clone()
    for _ in range(4):
        sgd_step(model, opt, x, y)
        growth.step()
    assert layer.rank > start.shape[1]                                  # it grew
    factor = getattr(layer, frozen)
    assert not factor.requires_grad and all(p is not factor for p in held(opt))
    scale = layer.scale_for(start.shape[1]) / layer.scale                   # A is rescaled with alpha
    old_columns = factor.detach()[:, :start.shape[1]]
    assert rel_err(old_columns, start.double() * (scale if frozen == "A" else 1.0)) < 1e-6   # one rounding per growth
    assert same_set(held(opt), trainable(model))
