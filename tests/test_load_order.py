"""A model load that changes a managed layer's form or rank edits the scheduler's optimizer, so the
scheduler may load before or after the model, the optimizer's state after the model (Accelerate's
``load_state`` loads the model, the optimizer, then the scheduler).  Before, the model's load gave the layers new parameters while the
optimizer kept stepping the old ones: the factors stopped training without a word."""

import copy
import gc
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _scheduling import data, decay_groups, held, mlp, same_set, trainable
from dynrank import DynamicRankScheduler, convert_model, load_training_state, training_state
from dynrank.checkpoint import PER_ELEMENT_STATE
from dynrank.cost import comp_ratio, param_counts
from dynrank.inrank import IncrementalRankScheduler
from dynrank.linear import FusedLowRankLinear

EPOCHS, STEPS = 4, 2


def _build(seed=0):
    model = mlp(seed)
    opt = torch.optim.AdamW(decay_groups(model), lr=1e-2)
    return model, opt, DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)


def _epoch(model, opt, sched, epoch, x, y):
    sched.step(epoch)
    for _ in range(STEPS):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _state(model, opt):
    return [t.detach().clone() for t in model.parameters()], copy.deepcopy(opt.state_dict())


def _same(a, b):
    (params_a, opt_a), (params_b, opt_b) = a, b
    assert len(params_a) == len(params_b)
    assert all(p.shape == q.shape and torch.equal(p, q) for p, q in zip(params_a, params_b))
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for key, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][key][name]), (key, name)


def _uninterrupted(x, y, checkpoint_after=None):
    torch.manual_seed(1)
    model, opt, sched = _build()
    saved = None
    for epoch in range(EPOCHS):
        _epoch(model, opt, sched, epoch, x, y)
        if epoch == checkpoint_after:
            saved = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "rng": torch.get_rng_state()})
    return _state(model, opt), saved


@pytest.mark.parametrize("order", [("model", "optimizer", "scheduler"), ("model", "scheduler", "optimizer"),
                                   ("scheduler", "model", "optimizer")])
@pytest.mark.parametrize("checkpoint_after", [0, 1, 2])
def test_any_load_order_resumes_bitwise(order, checkpoint_after):
    """Checkpoints in lowrank form (after epoch 0), full (1) and adapter (2), loaded into a fresh lowrank
    model: whichever part loads first, the run ends exactly where the uninterrupted one ends."""
    x, y = data()
    expected, saved = _uninterrupted(x, y, checkpoint_after)
    model, opt, sched = _build(seed=3)
    loads = {"model": model.load_state_dict, "optimizer": opt.load_state_dict,
             "scheduler": sched.load_state_dict}
    for part in order:
        loads[part](saved[part])
        if part == "model":
            # The optimizer holds the layers' new parameters at once, in the old ones' groups.
            assert same_set(held(opt), trainable(model))
            assert same_set(opt.param_groups[0]["params"], [p for p in trainable(model) if p.dim() >= 2])
    torch.set_rng_state(saved["rng"])
    for epoch in range(checkpoint_after + 1, EPOCHS):
        _epoch(model, opt, sched, epoch, x, y)
    _same(_state(model, opt), expected)


def test_accelerate_save_state_and_load_state_resume_bitwise(tmp_path):
    """Accelerate's checkpointing with the scheduler registered: it loads the model, then the
    optimizer, then the scheduler (custom objects last), and restores the RNG itself."""
    accelerate = pytest.importorskip("accelerate")
    x, y = data()

    def run(save_after=None, resume=False):
        accelerator = accelerate.Accelerator(cpu=True)
        torch.manual_seed(1)
        model, opt, _ = _build()
        model, opt = accelerator.prepare(model, opt)
        sched = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
        accelerator.register_for_checkpointing(sched)
        start = 0
        if resume:
            accelerator.load_state(str(tmp_path / "ckpt"))
            start = sched.last_epoch + 1
            assert sched.forms()["0"] == "adapter" and same_set(held(opt), trainable(model))
        for epoch in range(start, EPOCHS):
            _epoch(model, opt, sched, epoch, x, y)
            if epoch == save_after:
                accelerator.save_state(str(tmp_path / "ckpt"))
        return _state(model, opt)

    expected = run(save_after=2)
    _same(run(resume=True), expected)


def test_a_model_load_moves_the_optimizer_along_every_form_change():
    """Into full, back to lowrank (a load may go where a schedule never goes), then adapter: each time the
    optimizer holds exactly the trainable parameters, the new ones where the old ones sat, with no state
    (the optimizer's own load fills it); the old ones' state is gone."""
    model, opt, sched = _build()
    x, y = data()
    _epoch(model, opt, sched, 0, x, y)
    lowrank = copy.deepcopy(model.state_dict())
    source, source_opt, source_sched = _build(seed=2)
    source_sched.step(1)
    full = copy.deepcopy(source.state_dict())
    source_sched.step(2)
    adapter = copy.deepcopy(source.state_dict())
    for state, form in ((full, "full"), (lowrank, "lowrank"), (adapter, "adapter")):
        old = {id(p) for p in model[0].parameters()}
        position = [id(p) for p in opt.param_groups[0]["params"]].index(
            next(id(p) for p in held(opt) if id(p) in old))
        model.load_state_dict(state)
        assert model[0].form == form
        assert same_set(held(opt), trainable(model))
        new = [p for p in trainable(model[0]) if p.dim() >= 2]
        assert any(opt.param_groups[0]["params"][position] is p for p in new)
        assert not any(p in opt.state for p in new)
        assert not any(id(p) in old for p in opt.state if p.dim() >= 2)
        before = [p.detach().clone() for p in new]
        loss = F.cross_entropy(model(x), y)                                # trains what the model holds
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert all(opt.state[p] and not torch.equal(p, q) for p, q in zip(new, before))


def test_copies_and_unmanaged_layers_leave_optimizers_alone():
    """A copy of the model (an EMA) loads switched dicts without touching the optimizer; once the
    scheduler and its optimizer are gone the layers load as before; a newer scheduler on the same model
    is the one whose optimizer follows."""
    model, opt, sched = _build()
    source, _, source_sched = _build(seed=2)
    source_sched.step(1)
    full = copy.deepcopy(source.state_dict())
    groups = [list(g["params"]) for g in opt.param_groups]
    ema = copy.deepcopy(model)
    ema.load_state_dict(full)
    assert ema[0].form == "full" and [list(g["params"]) for g in opt.param_groups] == groups

    newer_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    newer = DynamicRankScheduler(model, newer_opt, inflate_epoch=1, deflate_epoch=2)
    model.load_state_dict(full)
    assert same_set(held(newer_opt), trainable(model))
    assert [list(g["params"]) for g in opt.param_groups] == groups           # the older one: untouched

    model2, opt2, sched2 = _build()
    del opt2, sched2
    gc.collect()
    model2.load_state_dict(full)
    assert model2[0].form == "full"
    del newer


def test_incremental_rank_model_load_first_resizes_the_optimizer():
    """IncrementalRankScheduler: a model load with other ranks swaps the resized factors into the
    optimizer; the optimizer's and the scheduler's loads after it then resume bitwise."""
    def run(steps, state=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 16))
        from dynrank import convert_model
        convert_model(model, rank_ratio=0.5, init="fresh", keep_last=False)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = IncrementalRankScheduler(model, opt, init_rank=1, buffer=2, warmup_steps=0, check_every=5)
        start = 1
        if state is not None:
            model.load_state_dict(state["model"])
            assert same_set(held(opt), trainable(model))
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start = sched.last_step + 1
            torch.set_rng_state(state["rng"])             # growth draws new B columns from it
        gen = torch.Generator().manual_seed(4)
        x = torch.randn(64, 32, generator=gen)
        y = torch.randn(64, 16, generator=gen)
        for step in range(start, steps + 1):
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step(step)
        return model, opt, sched

    model, opt, sched = run(12)
    assert any(isinstance(m, FusedLowRankLinear) and m.rank > 3 for m in model)  # it grew
    state = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "rng": torch.get_rng_state()})
    expected = _state(*run(20)[:2])
    resumed = run(20, state)
    assert [m.rank for m in resumed[0]] == [m.rank for m in run(20)[0]]
    _same(_state(*resumed[:2]), expected)


# -- load_training_state: every per-element state entry is checked against its parameter ----------------
def _build_for(make_opt, seed=0, bias_first=False):
    """Model, ``make_opt`` over its parameters and a scheduler inflating at 0; with ``bias_first`` the optimizer
    lists the classifier's bias before its weight (as dynrank 0.1.0 listed a full-form layer's)."""
    model = mlp(seed)
    params = list(model.parameters())
    if bias_first:
        params = params[:-2] + params[-2:][::-1]
    opt = make_opt(params)
    return model, opt, DynamicRankScheduler(model, opt, inflate_epoch=0, deflate_epoch=2)


@pytest.mark.parametrize("make_opt, key", [
    (lambda p: torch.optim.Rprop(p, lr=1e-2), "prev"),
    (lambda p: torch.optim.ASGD(p, lr=1e-2), "ax"),
    (lambda p: torch.optim.Adafactor(p, lr=1e-2), "variance"),
], ids=["Rprop", "ASGD", "Adafactor"])
def test_a_state_saved_in_another_order_is_refused_by_any_per_element_entry(make_opt, key):
    """Only momentum and Adam-style moments were compared: Rprop's, ASGD's and Adafactor's state saved over
    the parameters in another order loaded without a word, and the next step failed with a bare size mismatch
    ("The size of tensor a (12) must match the size of tensor b (3)").  Now refused, and the run goes on as
    if the load had never been tried."""
    _refused_load_leaves_the_run_as_it_was(
        _build_for(make_opt, bias_first=True), make_opt,
        rf"checkpoint\['optimizer'\] does not fit this optimizer \(the state '{key}' of param_groups\[0\]\['params'\]"
        rf"\[\d+\] has shape \(3,\), the parameter \(3, 24\)\); build the optimizer .*nothing was loaded")


def _refused_load_leaves_the_run_as_it_was(source, make_opt, message):
    """``source``'s checkpoint after an epoch, loaded into a run of ``make_opt`` one epoch in: refused with
    ``message``, and the run goes on exactly as a twin never given the checkpoint."""
    x, y = data()
    _epoch(*source, 0, x, y)
    ckpt = copy.deepcopy(training_state(*source))
    target, twin = _build_for(make_opt, seed=3), _build_for(make_opt, seed=3)
    for run in (target, twin):
        _epoch(*run, 0, x, y)
    scheduler_state = target[2].state_dict()
    with pytest.raises(ValueError, match=message):
        load_training_state(ckpt, *target)
    assert target[2].state_dict() == scheduler_state
    _same(_state(*target[:2]), _state(*twin[:2]))
    for run in (target, twin):
        torch.manual_seed(1)                            # the deflate at 2 draws fresh factors
        for epoch in range(1, EPOCHS):
            _epoch(*run, epoch, x, y)
    _same(_state(*target[:2]), _state(*twin[:2]))


def test_the_per_element_state_names_cover_torchs_optimizers():
    """Every tensor entry of dim ≥ 1 that a torch optimizer keeps is per-element (in PER_ELEMENT_STATE, of its
    parameter's shape), or one of the documented exceptions: Adafactor's factored row_var / col_var, L-BFGS's
    history over all parameters (kept on the first)."""
    factored = {"row_var", "col_var"}
    classes = [c for c in vars(torch.optim).values()
               if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer]
    assert {torch.optim.Rprop, torch.optim.ASGD, torch.optim.Adafactor, torch.optim.LBFGS} <= set(classes)
    for cls in classes:
        if cls is torch.optim.SparseAdam:              # sparse gradients only; its state is Adam's
            continue
        torch.manual_seed(0)
        shapes = [(4, 3)] if cls.__name__ == "Muon" else [(4, 3), (5,), (2, 3, 4, 5), ()]
        params = [nn.Parameter(torch.randn(shape)) for shape in shapes]
        options = {"SGD": dict(momentum=0.9), "RMSprop": dict(momentum=0.9, centered=True),
                   "Adam": dict(amsgrad=True)}.get(cls.__name__, {})
        opt = cls(params, lr=1e-2, **options)

        def closure():
            opt.zero_grad()
            loss = sum((p * p).sum() for p in params)
            loss.backward()
            return loss
        for _ in range(2):
            opt.step(closure)
        for i, p in enumerate(params):
            for name, value in opt.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor) or value.dim() == 0:
                    continue
                if cls is torch.optim.LBFGS:
                    assert i == 0 and name not in PER_ELEMENT_STATE, name
                elif name in factored:
                    assert cls is torch.optim.Adafactor and value.shape != p.shape, name
                else:
                    assert name in PER_ELEMENT_STATE and value.shape == p.shape, (cls.__name__, name)


# -- a full-form checkpoint's rank matters only where the next deflate takes it -------------------------
def _deflating_run(deflate_rank, rank_ratio=0.25):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    convert_model(model, rank_ratio=rank_ratio)
    opt = torch.optim.AdamW(decay_groups(model), lr=1e-2)
    return model, opt, DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2, deflate_rank=deflate_rank)


@pytest.mark.parametrize("deflate_rank", [1, 0.5, {"0": 1}], ids=["int", "ratio", "one-layer"])
def test_a_run_rolls_back_from_its_adapters_to_a_full_form_checkpoint(deflate_rank):
    """With deflate_rank set the adapters' rank is not the conversion rank, and the rollback was refused:
    "layer '0' has rank 1 but the checkpoint has 3 (the rank its next deflate takes); convert the model with
    the same rank_ratio", though it was (and the next deflate takes deflate_rank).  Loaded into the live
    objects, the full-form checkpoint of epoch 1 now trains on exactly as the run did from there."""
    x, y = data()
    run = _deflating_run(deflate_rank)
    for epoch in range(EPOCHS):
        _epoch(*run, epoch, x, y)
        if epoch == 1:
            saved = copy.deepcopy(training_state(*run, rng=torch.get_rng_state()))
    assert run[0][0].rank != saved["scheduler"]["ranks"]["0"]            # the adapter's rank is deflate_rank's
    expected = _state(*run[:2])
    torch.set_rng_state(load_training_state(saved, *run)["rng"])
    assert run[2].forms() == {"0": "full", "2": "full"} and run[2].last_epoch == 1
    for epoch in range(2, EPOCHS):
        _epoch(*run, epoch, x, y)
    _same(_state(*run[:2]), expected)


def test_a_full_form_checkpoint_at_another_rank_is_refused_where_the_deflate_takes_the_layers_rank():
    """A model converted at another rank_ratio: layer "0", deflated to deflate_rank's 1, loads; layer "2",
    which deflate_rank leaves out, would deflate at its own rank, other than the saved run's: refused."""
    x, y = data()
    source = _deflating_run({"0": 1})
    for epoch in range(2):
        _epoch(*source, epoch, x, y)
    saved = training_state(*source)
    target = _deflating_run({"0": 1}, rank_ratio=0.5)
    ranks = [target[0][i].rank for i in (0, 2)]
    assert ranks != [source[0][i].rank for i in (0, 2)]
    with pytest.raises(ValueError, match=rf"layer '2' has rank {ranks[1]} but the checkpoint has "
                                         rf"{source[0][2].rank} \(the rank its next deflate takes\); convert the "
                                         rf"model with the same rank_ratio"):
        load_training_state(saved, *target)
    assert target[2].forms() == {"0": "lowrank", "2": "lowrank"} and [target[0][i].rank for i in (0, 2)] == ranks
    saved["scheduler"]["deflate_rank"] = {"0": 1, "2": 2}                  # every layer deflates to a given rank
    load_training_state(saved, *target)
    assert target[2].forms() == {"0": "full", "2": "full"}


# -- a conv's decomposition, and the rank a layer last had in lowrank form ------------------------------
def _conv_run(decomposition, rank_ratio=0.5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 4))
    convert_model(model, rank_ratio=rank_ratio, decomposition=decomposition)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)


def _conv_checkpoints(decomposition="svd"):
    """The run's training_state after epochs 0 (lowrank), 1 (full) and 2 (adapter)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 8, 4, 4, generator=gen), torch.randint(0, 4, (4,), generator=gen)
    run, saved = _conv_run(decomposition), {}
    for epoch in range(3):
        _epoch(*run, epoch, x, y)
        saved[run[0][0].form] = copy.deepcopy(training_state(*run))
    return saved


@pytest.mark.parametrize("other", ["cp", "tucker", "tkd-cpd"])
@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_a_checkpoint_of_another_conv_decomposition_is_refused_in_every_form(form, other):
    """A full-form checkpoint of an svd run loaded into a cp or Tucker model: its state dict holds only the
    weight and the bias, and the rank check passed (a Tucker layer reads the saved 8 as its own (8, 8)), so the
    resumed run's deflate made a cp/Tucker adapter where the saved run made an svd one.  The scheduler's state
    names each conv's decomposition, and a load refuses another by name, before anything changes."""
    saved = _conv_checkpoints()[form]
    assert saved["scheduler"]["decompositions"] == {"0": "svd"}
    model, opt, sched = _conv_run(other)
    before = list(model.parameters())
    message = rf"layer '0' has decomposition '{other}' but the checkpoint has 'svd'.*same decomposition"
    with pytest.raises(ValueError, match=message):
        sched.load_state_dict(saved["scheduler"])
    with pytest.raises(ValueError, match=message):
        load_training_state(saved, model, opt, sched)
    assert sched.forms() == {"0": "lowrank"} and all(p is q for p, q in zip(model.parameters(), before))
    assert len(list(model.parameters())) == len(before)


def test_a_saved_int_rank_is_not_a_tucker_layers_pair():
    """A state saved before the decompositions were kept loads unchecked for them, but its ranks are compared as
    saved: an svd run's rank 8 is not a Tucker layer's (8, 8), which it reads the int as.  A Tucker run's own
    state loads, its ranks a pair or (through JSON) a list."""
    saved = _conv_checkpoints()["full"]
    del saved["scheduler"]["decompositions"]
    for other, rank in (("tucker", (8, 8)), ("tkd-cpd", (8, 8, 8))):
        model, opt, sched = _conv_run(other)
        with pytest.raises(ValueError, match=rf"layer '0' has rank {re.escape(str(rank))} but the checkpoint has "
                                             rf"8 \(the rank its next deflate takes\); convert the model with the "
                                             rf"same rank_ratio, or with the saved run's decomposition"):
            load_training_state(saved, model, opt, sched)
        assert sched.forms() == {"0": "lowrank"}
    own = _conv_checkpoints("tucker")["full"]
    assert own["scheduler"]["ranks"] == {"0": (8, 8)}
    own["scheduler"]["ranks"] = {"0": [8, 8]}
    model, opt, sched = _conv_run("tucker")
    load_training_state(own, model, opt, sched)
    assert sched.forms() == {"0": "full"} and model[0].rank == (8, 8)


def _adapter_run(rank_ratio):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    convert_model(model, rank_ratio=rank_ratio)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt, DynamicRankScheduler(model, opt, 2, 4, deflate_rank=2)


@pytest.mark.parametrize("order", ["scheduler first", "model first", "load_training_state"])
def test_a_run_resumed_into_another_rank_ratio_counts_its_lowrank_epochs_at_its_own_rank(order):
    """An adapter-form checkpoint loads into a model converted at another rank_ratio (the deflate takes the saved
    ranks), but comp_ratio counted the run's lowrank epochs at the fresh conversion's rank (0.5817 for the saved
    run's 0.7338).  The scheduler's state keeps the rank each layer last had in lowrank form, and the load gives
    it back."""
    E, I, D = 6, 2, 4
    model, opt, sched = _adapter_run(0.5)
    expected = comp_ratio(model, E, I, D, scheduler=sched)                # counted before training
    for epoch in range(E):
        sched.step(epoch)
    assert comp_ratio(model, E, I, D) == expected
    saved = copy.deepcopy(training_state(model, opt, sched))
    assert saved["scheduler"]["lowrank_ranks"] == {"0": 16, "2": 16}
    resumed, resumed_opt, resumed_sched = _adapter_run(0.25)
    assert [resumed[i]._lowrank_rank for i in (0, 2)] == [8, 8]
    _resume(order, saved, resumed, resumed_opt, resumed_sched)
    assert [resumed[i]._lowrank_rank for i in (0, 2)] == [16, 16]
    assert comp_ratio(resumed, E, I, D) == expected
    assert param_counts(resumed).lowrank == param_counts(model).lowrank
    # A state saved before the lowrank ranks were kept leaves the layers' own; a wrong one is refused by name.
    older, older_opt, older_sched = _adapter_run(0.25)
    state = {k: v for k, v in saved["scheduler"].items() if k != "lowrank_ranks"}
    older_sched.load_state_dict(state)
    assert [older[i]._lowrank_rank for i in (0, 2)] == [8, 8]
    with pytest.raises(TypeError, match=r"lowrank_ranks\['2'\] is not a valid rank of layer '2' or None: "):
        older_sched.load_state_dict(dict(state, lowrank_ranks={"0": 16, "2": 16.0}))


def _resume(order, saved, model, optimizer, scheduler):
    """Load ``saved`` (a training_state) the way ``order`` names: the model alone, the model or the scheduler
    first, or through load_training_state."""
    if order == "model only":
        model.load_state_dict(saved["model"])
    elif order == "model first":
        model.load_state_dict(saved["model"])
        scheduler.load_state_dict(saved["scheduler"])
    elif order == "scheduler first":
        scheduler.load_state_dict(saved["scheduler"])
        model.load_state_dict(saved["model"])
    else:
        load_training_state(saved, model, optimizer, scheduler)


def _classifier(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _classifier_run(seed, rank_ratio=0.5, form="lowrank"):
    model = _classifier(seed)
    convert_model(model, rank_ratio=rank_ratio, form=form)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, DynamicRankScheduler(model, opt, 3, 7)


@pytest.mark.parametrize("resume", ["model only", "model first", "scheduler first", "load_training_state"])
def test_a_model_only_load_into_another_form_leaves_the_lowrank_rank_unknown(resume):
    """A run converted at ρ = 0.25 (layer '0' lowrank at rank 16; E=10, I=3, D=7) saves its adapter-form model.
    Loaded alone into a model freshly converted at ρ = 0.5, comp_ratio counted the lowrank epochs at the fresh
    conversion's rank 32 (0.8723 for the run's 0.7445), where a model converted in adapter form refuses to
    guess.  The load makes the rank unknown, so the cost asks for it; a scheduler's state gives it back."""
    # By hand: other = 64 (layer 0's bias) + 650 (the classifier, left dense) = 714; d = 714 + 64·64 = 4810;
    # d_ρ = 714 + 16·(64 + 64) = 2762.  (3 + 3) lowrank and adapter epochs, 4 full ones.
    expected = (6 * 2762 + 4 * 4810) / (10 * 4810)
    model, opt, sched = _classifier_run(0, rank_ratio=0.25)
    for epoch in range(10):
        sched.step(epoch)
    assert comp_ratio(model, 10, 3, 7) == pytest.approx(expected, rel=1e-15)
    saved = copy.deepcopy(training_state(model, opt, sched))
    resumed, resumed_opt, resumed_sched = _classifier_run(1)
    assert resumed[0].rank == 32
    _resume(resume, saved, resumed, resumed_opt, resumed_sched)
    assert (resumed[0].form, resumed[0].rank) == ("adapter", 16)
    if resume == "model only":
        assert resumed[0]._lowrank_rank is None
        with pytest.raises(ValueError, match=r"layers \['0'\] are in adapter form \(rank 16 for '0'\), and the rank "
                                             r"they had in lowrank form.* is not known"):
            comp_ratio(resumed, 10, 3, 7)
        assert comp_ratio(resumed, 10, 3, 7, lowrank_ranks={"0": 16}) == pytest.approx(expected, rel=1e-15)
    else:
        assert resumed[0]._lowrank_rank == 16
        assert comp_ratio(resumed, 10, 3, 7) == pytest.approx(expected, rel=1e-15)


def test_a_load_in_lowrank_form_gives_the_loaded_rank():
    """A model converted in full form knows no lowrank rank; a lowrank-form dict loaded into it gives the
    rank of its factors, which the cost of the lowrank epochs reads after a deflate to another rank."""
    lowrank = _classifier(0)
    convert_model(lowrank, rank_ratio=0.25)
    model = _classifier(1)
    convert_model(model, form="full")
    assert model[0]._lowrank_rank is None
    model.load_state_dict(lowrank.state_dict())
    assert (model[0].form, model[0].rank, model[0]._lowrank_rank) == ("lowrank", 16, 16)
    model[0].inflate().deflate(rank=8)
    # By hand as above, the adapter epochs at rank 8: 714 + 8·128 = 1738.
    assert comp_ratio(model, 10, 3, 7) == pytest.approx((3 * 2762 + 4 * 4810 + 3 * 1738) / (10 * 4810), rel=1e-15)


# -- load_training_state: the optimizer's settings, and a model on the meta device ----------------------
def _sgd(lr=1e-2):
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9)


def _adam(lr=1e-2):
    return lambda p: torch.optim.Adam(p, lr=lr)


def _adamw(lr=1e-2):
    return lambda p: torch.optim.AdamW(p, lr=lr)


@pytest.mark.parametrize("saved_by, make_opt, missing, other", [
    (_adamw(), _sgd(), "'dampening', 'momentum'", "'betas'"),
    (_adam(), lambda p: torch.optim.RMSprop(p, lr=1e-2), "'alpha'", "'betas'"),
    (lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9), _sgd(), "'dampening'", "'alpha'"),
], ids=["AdamW-into-SGD", "Adam-into-RMSprop", "RMSprop-into-SGD"])
def test_an_optimizer_part_saved_by_another_class_is_refused_and_nothing_changes(saved_by, make_opt, missing,
                                                                                  other):
    """torch's load replaces each param group's settings by the saved ones: an AdamW checkpoint loaded into
    an SGD optimizer without a word, its groups carrying betas and eps and no momentum, and the next step
    failed with KeyError: 'momentum' (the load itself having "succeeded", nothing could roll it back)."""
    name = type(make_opt(nn.Linear(1, 1).parameters())).__name__
    _refused_load_leaves_the_run_as_it_was(
        _build_for(saved_by), make_opt,
        rf"^checkpoint\['optimizer'\] does not fit this optimizer \(the saved param_groups\[0\] lacks the settings "
        rf"\[{missing}\] of this {name} and has \[[^]]*{other}[^]]*\] instead \(saved by another optimizer class\?\)\); "
        rf"build the optimizer the saved run did .*nothing was loaded$")


# The settings each class's __setstate__ fills in where a group lacks them (ones torch added over versions).
_FILLED = {torch.optim.SGD: ("nesterov", "maximize", "foreach", "differentiable", "fused"),
           torch.optim.Adam: ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused"),
           torch.optim.AdamW: ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
                               "decoupled_weight_decay")}


@pytest.mark.parametrize("make_opt", [_sgd, _adam, _adamw], ids=["SGD", "Adam", "AdamW"])
def test_an_optimizer_part_of_the_same_class_loads_with_its_settings(make_opt):
    """The settings check refuses only a setting torch's own load leaves missing: a group saved before torch
    added a setting (its class fills in the default), another lr (the saved one loads, as torch loads it), an
    LR scheduler's initial_lr on the live groups and not the saved ones.  The resumed run goes on bit for bit
    as the saved one."""
    x, y = data()
    source = _build_for(make_opt())
    _epoch(*source, 0, x, y)
    ckpt = copy.deepcopy(training_state(*source))
    cls = type(source[1])
    for group in ckpt["optimizer"]["param_groups"]:
        for key in _FILLED[cls]:
            group.pop(key, None)
    target = _build_for(make_opt(lr=5e-2), seed=3)
    torch.optim.lr_scheduler.StepLR(target[1], step_size=10)             # adds initial_lr to the live groups
    load_training_state(ckpt, *target)
    assert type(target[1]) is cls and target[1].param_groups[0]["lr"] == 1e-2
    assert target[1].param_groups[0].keys() - {"params", "param_names"} == set(target[1].defaults)
    for run in (source, target):
        torch.manual_seed(1)
        for epoch in range(1, EPOCHS):
            _epoch(*run, epoch, x, y)
    resumed, expected = _state(*target[:2]), _state(*source[:2])
    for _, opt_state in (resumed, expected):                  # the filled-in defaults may differ (SGD's fused)
        for group in opt_state["param_groups"]:
            for key in (*_FILLED[cls], "initial_lr"):
                group.pop(key, None)
    _same(resumed, expected)


def test_a_model_on_the_meta_device_is_refused_by_name():
    """The rollback snapshot copied the model's state dict first: a bare NotImplementedError "Cannot copy out of
    meta tensor; no data!" naming neither the model nor what to do."""
    x, y = data()
    source = _build()
    _epoch(*source, 0, x, y)
    ckpt = training_state(*source)
    with torch.device("meta"):
        target = _build()
    with pytest.raises(ValueError, match=r"^the model's parameter '0\.bias' is on the meta device \(no values to "
                                         r"load into\): call model\.to_empty\(device=\.\.\.\) before building the "
                                         r"optimizer and the scheduler on it, then load; nothing was loaded$"):
        load_training_state(ckpt, *target)
    assert target[2].forms() == {"0": "lowrank", "2": "lowrank"} and not target[1].state
    model = mlp()
    model.to("meta").to_empty(device="cpu")                                # materialized, then built on
    opt = torch.optim.AdamW(decay_groups(model), lr=1e-2)
    load_training_state(ckpt, model, opt, DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2))
    _same(_state(model, opt), _state(*source[:2]))


# -- a model load that changes a layer's form or rank, before the scheduler's: the run the scheduler's own
# switches give (factors frozen by hand, groups of the user's making, the group's order) ------------------
def _snapshot(model, opt):
    """What must agree bit for bit, by parameter name: values, ``requires_grad``, the names each param group
    holds (and its settings), each held parameter's optimizer state."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [([names.get(id(p), "<not in the model>") for p in g["params"]],
               {k: v for k, v in g.items() if k not in ("params", "param_names")}) for g in opt.param_groups]
    state = {names.get(id(p), "<not in the model>"): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in opt.state.items()}
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()}, groups, state)


def _alike(a, b):
    (values_a, grads_a, groups_a, state_a), (values_b, grads_b, groups_b, state_b) = a, b
    assert grads_a == grads_b
    assert groups_a == groups_b
    assert values_a.keys() == values_b.keys()
    assert all(values_a[n].shape == values_b[n].shape and torch.equal(values_a[n], values_b[n]) for n in values_a)
    assert state_a.keys() == state_b.keys()
    for name, entries in state_a.items():
        assert entries.keys() == state_b[name].keys(), name
        for key, value in entries.items():
            assert torch.equal(value, state_b[name][key]) if torch.is_tensor(value) else value == state_b[name][key], \
                (name, key)


def _resumes_alike(build, train, saved_at, end):
    """``build(seed)`` → (model, opt, scheduler); ``train(run, start, stop)`` trains steps or epochs
    [start, stop).  The run saved after ``saved_at`` resumes model first (Accelerate's order: model,
    optimizer, scheduler) and scheduler first into a fresh build: both are the run at the save, and end
    where the uninterrupted run ends.  Returns the run's model at the save."""
    torch.manual_seed(1)
    run = build(0)
    train(run, 0, saved_at + 1)
    at_save = _snapshot(*run[:2])
    saved = copy.deepcopy({"model": run[0].state_dict(), "optimizer": run[1].state_dict(),
                           "scheduler": run[2].state_dict(), "rng": torch.get_rng_state()})
    saved_model = copy.deepcopy(run[0])
    train(run, saved_at + 1, end)
    expected = _snapshot(*run[:2])
    for order in (("model", "optimizer", "scheduler"), ("scheduler", "model", "optimizer")):
        resumed = build(3)
        for part in order:
            # A copy: torch's optimizer load keeps the saved tensors, which the resumed run steps in place.
            {"model": resumed[0], "optimizer": resumed[1], "scheduler": resumed[2]}[part].load_state_dict(
                copy.deepcopy(saved[part]))
        _alike(_snapshot(*resumed[:2]), at_save)
        torch.set_rng_state(saved["rng"])
        train(resumed, saved_at + 1, end)
        _alike(_snapshot(*resumed[:2]), expected)
    return saved_model


def _lora_fa_growing(layout):
    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        convert_model(model, rank_ratio=0.5)
        model.double()
        model[0].A.requires_grad_(False)                                   # LoRA-FA
        if layout == "trainable":
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        else:
            rest = [p for n, p in model.named_parameters() if n not in ("0.A", "0.B")]
            opt = torch.optim.Adam([{"params": rest}, {"params": [model[0].A], "lr": 1e-3},
                                    {"params": [model[0].B], "lr": 1e-1}], lr=1e-2)
        return model, opt, IncrementalRankScheduler(model, opt, init_rank=1, buffer=2, warmup_steps=0, check_every=1)

    def train(run, start, stop):
        model, opt, sched = run
        gen = torch.Generator().manual_seed(4)
        x, y = torch.randn(32, 16, generator=gen, dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen)
        for step in range(start + 1, stop + 1):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step(step)
    return build, train


@pytest.mark.parametrize("layout", ["trainable", "groups"])
def test_a_model_first_load_that_grows_a_lora_fa_layer_keeps_a_frozen_and_each_factor_in_its_group(layout):
    """A frozen by hand (LoRA-FA), the checkpoint at a grown rank.  The model load's resize gave the new A
    ``requires_grad=True`` (grow_rank_ keeps it frozen), and the optimizer swapped the factors by position in
    a list ordered B, A against A, B: over the trainable parameters it trained A with B's Adam state and left
    B out; with A and B in groups of their own (lr 1e-3 and 1e-1) it put each in the other's group.  Now the
    model-first resume is the scheduler-first one and the uninterrupted run, bit for bit."""
    build, train = _lora_fa_growing(layout)
    saved = _resumes_alike(build, train, saved_at=3, end=6)
    assert saved[0].rank > build(0)[0][0].rank                            # the load resizes the layer
    assert not saved[0].A.requires_grad


def _adapter_checkpoint(layout):
    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        convert_model(model, rank_ratio=0.25)
        model.double()
        if layout == "A's, then B's":
            named = sorted(model.named_parameters(), key=lambda item: (item[0].split(".")[-1], item[0]))
            opt = torch.optim.Adam([p for _, p in named], lr=1e-2)
        else:
            model[0].A.requires_grad_(False)                               # LoRA-FA
            if layout == "lora-fa":
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            else:                                                          # A kept in a group of its own, lr 0
                rest = [p for n, p in model.named_parameters() if n != "0.A"]
                opt = torch.optim.AdamW([{"params": rest}, {"params": [model[0].A], "lr": 0.0}], lr=1e-2)
        return model, opt, DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)

    def train(run, start, stop):
        gen = torch.Generator().manual_seed(4)
        x, y = torch.randn(32, 16, generator=gen, dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen)
        for epoch in range(start, stop):
            _epoch(*run, epoch, x, y)
    return build, train


@pytest.mark.parametrize("layout", ["lora-fa", "lora-fa, A in an lr=0 group", "A's, then B's"])
def test_a_model_first_load_into_adapter_form_orders_the_optimizer_as_the_schedulers_switches(layout):
    """An adapter-form checkpoint loaded model first into a lowrank model: the load's lowrank → adapter
    switch swapped the factors one for one in place, where the run's inflate + deflate put the new A, B side
    by side where W sat.  LoRA-FA: the new B went into A's place (left out of the optimizer, whose load then
    failed on a group's size, or into A's lr=0 group); a group of all A's, then all B's: the new factors sat
    in another order and the optimizer's load gave one layer's Adam moments to another's factor.  Now the
    model-first resume is the scheduler-first one and the uninterrupted run, bit for bit."""
    build, train = _adapter_checkpoint(layout)
    saved = _resumes_alike(build, train, saved_at=2, end=EPOCHS)
    assert saved[0].form == "adapter" and saved[0].A.requires_grad          # a switch trains all new factors
