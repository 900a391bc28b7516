"""InRank-style incremental rank growth: the rank rule, grow_rank_, and the scheduler."""

import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _helpers import REL_TOL, Wrapper, rel_err
from _scheduling import kept_and_removed_copy
from dynrank.convert import convert_model
from dynrank.inrank import IncrementalRankScheduler, explained_rank, grow_rank_
from dynrank.linear import FusedLowRankLinear



def reference_rank(sigma, current, buffer, threshold):
    """Straight from the definition, in numpy: smallest k in [current, current + buffer) with
    1 − var(σ − σ_top-k)/var(σ) > threshold (σ_top-k keeps the k largest values: all of σ for k ≥ its size),
    else current + buffer − 1, at most the spectrum's size (where no k explains it: zero variance)."""
    s = np.sort(np.asarray(sigma, dtype=np.float64))[::-1]
    for k in range(current, current + buffer):
        tail = np.where(np.arange(s.size) < k, 0.0, s)
        if 1.0 - tail.var() / s.var() > threshold:
            return k
    return max(current, min(current + buffer - 1, s.size))


@pytest.mark.parametrize("sigma, current, buffer", [
    ([10.0, 9.0, 8.0, 0.1, 0.1, 0.05, 0.01, 0.0], 1, 8),
    ([5.0, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.1], 2, 4),
    ([1.0] * 6 + [0.0] * 6, 1, 6),
    (list(np.linspace(3, 0, 17)), 3, 10),
    ([4.0, 3.0, 2.0, 1.0], 0, 10),                  # the window passes the spectrum's end: k = 4 explains it all
    ([4.0, 3.0, 2.0, 1.0], 3, 5),
    ([2.0, 1.0, 1.0, 0.0], 0, 4),                   # k = 1 explains exactly 0.5, not more: at 0.5 the rank is 2
])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_explained_rank_matches_definition(sigma, current, buffer, threshold):
    shuffled = torch.tensor(sigma)[torch.randperm(len(sigma))]
    assert explained_rank(shuffled, current, buffer, threshold) == reference_rank(sigma, current, buffer,
                                                                                  threshold)


@pytest.mark.parametrize("args, error, message", [
    (([3.0, 1.0], 1, 2, 0.9), TypeError, "singular_values must be a real floating-point tensor, got list"),
    ((torch.tensor([3, 1]), 1, 2, 0.9), TypeError,
     "singular_values must be a real floating-point tensor, got torch.int64"),
    ((torch.ones(3), 1.0, 2, 0.9), TypeError, "current must be an int >= 0, got float (1.0)"),
    ((torch.ones(3), -1, 2, 0.9), ValueError, "current must be an int >= 0, got -1"),
    ((torch.ones(3), 1, 0, 0.9), ValueError, "buffer must be an int >= 1, got 0"),
    ((torch.ones(3), 1, 2, "0.9"), TypeError, "threshold must be a float in (0, 1), got str ('0.9')"),
    ((torch.ones(3), 1, 2, 1.0), ValueError, "threshold must be in (0, 1), got 1.0"),
    ((torch.ones(3), 1, 2, 0.0), ValueError, "threshold must be in (0, 1), got 0.0"),
])
def test_explained_rank_checks_its_arguments(args, error, message):
    with pytest.raises(error, match=re.escape(message)):
        explained_rank(*args)


@pytest.mark.parametrize("n, current, buffer", [(8, 2, 4), (8, 0, 3), (5, 2, 10), (1, 1, 4), (12, 6, 1)])
@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_explained_rank_on_a_zero_variance_spectrum(n, current, buffer, threshold):
    """No k explains a spectrum of zero variance (0/0 or −inf in the rule): a constant nonzero σ follows the
    definition (current + buffer − 1, capped), an all-zero σ keeps ``current`` (nothing learned yet)."""
    constant = [2.5] * n
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = reference_rank(constant, current, buffer, threshold)
    assert explained_rank(torch.tensor(constant, dtype=torch.float64), current, buffer, threshold) == expected
    assert explained_rank(torch.zeros(n, dtype=torch.float64), current, buffer, threshold) == current


@pytest.mark.parametrize("current", [0, 4])
def test_explained_rank_of_an_empty_spectrum_keeps_the_current_rank_without_a_warning(current):
    """An empty σ (a layer with no rows or columns) ran torch's var on nothing, with its RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert explained_rank(torch.zeros(0, dtype=torch.float64), current, 3, 0.9) == current


def test_explained_rank_finds_a_spectral_gap():
    sigma = torch.tensor([9.0, 8.0, 7.0, 6.0, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01])
    assert explained_rank(sigma, 1, 10, 0.9) == 4


@pytest.mark.parametrize("decay", [0.7, 0.8, 0.85, 0.9])
@pytest.mark.parametrize("form", ["lowrank", "adapter"])
def test_scheduler_applies_the_rule_to_the_whole_spectrum_of_the_product(decay, form):
    """InRank's rule runs over every singular value of the out×in product, zeros included: the variance
    depends on how many entries it averages (the layer's rank nonzero ones alone found 7 instead of 6 for
    σᵢ = 0.8ⁱ, current 2, buffer 8)."""
    torch.manual_seed(0)
    layer = FusedLowRankLinear(48, 64, rank=10, form=form, alpha=4.0, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(64, 10, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(48, 10, dtype=torch.float64))
    with torch.no_grad():
        layer.A.copy_(U * decay ** torch.arange(10, dtype=torch.float64))
        layer.B.copy_(V)
    product = (layer.scale * layer.A @ layer.B.T).detach().numpy()
    expected = reference_rank(np.linalg.svd(product, compute_uv=False), 2, 8, 0.9)   # 48 values
    model = nn.Sequential(layer)
    sched = IncrementalRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.0), init_rank=None,
                                     buffer=8, threshold=0.9, warmup_steps=0, check_every=1)
    assert sched.current["0"] == 2
    sched.step()
    assert sched.current["0"] == expected and layer.rank == expected + 8


FULL_LAYER = ("layer '{}' is in full form; IncrementalRankScheduler resizes lowrank and adapter layers only: it "
              "grows their factors, which an inflate (e.g. a DynamicRankScheduler's) took away; the two schedulers "
              "are not meant to drive one model")


def test_step_refuses_a_layer_inflated_since():
    model, opt, sched = _run(4)
    model[1].inflate()
    with pytest.raises(ValueError, match=re.escape(FULL_LAYER.format("1"))):
        sched.step(5)
    assert sched.last_step == 4


OTHER_KIND = ("layer '{}' is managed by a live {}: a DynamicRankScheduler and an IncrementalRankScheduler are not "
              "meant to drive one model")


def test_the_two_schedulers_refuse_each_others_layers_at_construction():
    """Both were accepted over one model: the InRank scheduler's first check after the inflate raised (with the
    usual warmup, after a whole trained epoch), and before its first check the two resized the same layers
    without a word.  Whichever is built second refuses, naming the layers and the other scheduler, before any
    layer changes; once the first is let go of, the second is built.  Disjoint parts of one model are fine."""
    from dynrank import DynamicRankScheduler
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    convert_model(model, rank_ratio=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dynamic = DynamicRankScheduler(model[:1], opt, inflate_epoch=1, deflate_epoch=2)
    A = model[0].A
    with pytest.raises(ValueError, match=re.escape(OTHER_KIND.format("0", "DynamicRankScheduler")) + r".*let go of the "
                                         r"DynamicRankScheduler first \(del it, and whatever holds it\)"):
        IncrementalRankScheduler(model, opt, init_rank=2, buffer=2, warmup_steps=0, check_every=1)
    assert model[0].A is A and model[0].rank == model[2].rank == 16          # nothing truncated
    part = IncrementalRankScheduler(model[2:], opt, init_rank=2, buffer=2, warmup_steps=0, check_every=1)
    assert part.ranks == {"2": 4} and dynamic.step(1) == [("0", "lowrank", "full")]
    with pytest.raises(ValueError, match=r"^layer '2' is managed by a live IncrementalRankScheduler"):
        DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
    del dynamic, part
    growth = IncrementalRankScheduler(model, opt, init_rank=2, buffer=2)     # '2' ('0' is full, left alone)
    with pytest.raises(ValueError, match=re.escape(OTHER_KIND.format("2", "IncrementalRankScheduler"))):
        DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
    assert model[0].form == "full" and model[2].form == "lowrank"
    again = IncrementalRankScheduler(model, opt, init_rank=2, buffer=2)      # the same kind: as before
    assert again.ranks == growth.ranks == {"2": 4}


def test_a_dynamic_rank_scheduler_taking_its_layers_back_refuses_one_built_meanwhile():
    """A DynamicRankScheduler whose layers a newer one took manages them again once that one is gone: it must
    not take them from an IncrementalRankScheduler built in between."""
    from dynrank import DynamicRankScheduler
    model, opt, _ = _run()
    del _
    first = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
    second = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
    del second
    growth = IncrementalRankScheduler(model, opt, init_rank=1, buffer=2)
    with pytest.raises(ValueError, match=re.escape(OTHER_KIND.format("0", "IncrementalRankScheduler"))):
        first.step(1)
    assert {m.form for m in model} == {"lowrank"} and growth.ranks == {"0": 3, "1": 3}


def test_step_with_the_count_of_the_last_check_does_nothing():
    """A loop passing an optimizer-step counter after every micro-batch calls step(n) again with the same n:
    the second call ran the check again and grew the layer a second time at one step."""
    model, opt, sched = _run(4, init_rank=1, buffer=3, threshold=1 - 1e-9)
    assert sched.step(5) == [("0", 4, 6), ("1", 4, 6)]
    before = _everything(model, opt, sched)
    assert sched.step(5) == []
    _assert_unchanged(before, model, opt, sched)
    assert sched.step(6) == [] and sched.step(6) == [] and sched.last_step == 6
    assert sched.step() == [] and sched.last_step == 7                     # no argument: one more


def test_a_check_keeps_a_layer_grown_by_hand_past_the_rule():
    """A layer grown by hand past its discovered rank + buffer keeps its rank at a check (ranks never shrink
    during training): the check finds the discovered rank by the rule, grows nothing and replaces no factor."""
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(16, 16, rank=4, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = IncrementalRankScheduler(model, opt, init_rank=1, buffer=2, threshold=0.5, warmup_steps=0, check_every=1)
    grow_rank_(model[0], 10, opt)
    x = torch.randn(8, 16, dtype=torch.float64)
    _train(model, opt, x, torch.zeros(8, 16, dtype=torch.float64), 1)
    current, target = _expected_check(model[0], 1, 2, 0.5, sched.max_rank["0"])
    assert target < 10                                          # the rule alone would ask for fewer components
    A, B = model[0].A, model[0].B
    assert sched.step() == []
    assert model[0].rank == 10 and model[0].A is A and model[0].B is B
    assert sched.ranks == {"0": 10} and sched.current == {"0": current} and sched.last_step == 1


def test_step_refuses_a_layer_on_the_meta_device():
    """A meta layer has no values to test: the check failed inside the rule ("Tensor.item() cannot be called
    on meta tensors") without naming the layer."""
    model = nn.Sequential(FusedLowRankLinear(16, 8, 4), FusedLowRankLinear(8, 8, 4, device="meta"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = IncrementalRankScheduler(model, opt, init_rank=None, buffer=2, warmup_steps=0, check_every=1)
    with pytest.raises(ValueError, match=re.escape("layers ['1 (FusedLowRankLinear)'] hold tensors on the meta "
                                                   "device, which have no values to test: materialize them first")):
        sched.step()
    assert sched.last_step == 0 and sched.ranks == {"0": 4, "1": 4}
    model[1].to_empty(device="cpu").reset_parameters()
    sched.step()
    assert sched.last_step == 1


@pytest.mark.parametrize("alpha", [None, 8.0])
@pytest.mark.parametrize("form", ["lowrank", "adapter"])
def test_grow_rank_preserves_function_and_optimizer(alpha, form):
    torch.manual_seed(0)
    layer = FusedLowRankLinear(20, 17, rank=3, form=form, alpha=alpha)
    if form == "adapter":
        with torch.no_grad():
            layer.A.normal_()
    head = nn.Linear(17, 2)
    opt = torch.optim.Adam([{"params": list(head.parameters())}, {"params": list(layer.parameters()),
                                                                  "lr": 1e-3}], lr=1e-2)
    x = torch.randn(9, 20)
    for _ in range(3):
        loss = head(layer(x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = layer(x).detach()
    old_A, old_B = layer.A, layer.B
    m_A, v_A = opt.state[old_A]["exp_avg"].clone(), opt.state[old_A]["exp_avg_sq"].clone()
    m_B, v_B = opt.state[old_B]["exp_avg"].clone(), opt.state[old_B]["exp_avg_sq"].clone()
    g_A, g_B = torch.autograd.grad(head(layer(x)).square().mean(), [old_A, old_B])
    old_group = list(opt.param_groups[1]["params"])
    grow_rank_(layer, 7, opt)
    assert layer.rank == 7 and layer.A.shape == (17, 7) and layer.B.shape == (20, 7)
    assert rel_err(layer(x), before) < 1e-5
    swap = {id(old_A): layer.A, id(old_B): layer.B}
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(swap.get(id(p), p)) for p in old_group]
    assert old_A not in opt.state and old_B not in opt.state
    ratio = 1.0 if alpha is None else 7 / 3                   # old A rescaled to keep s·A·Bᵀ
    state = opt.state[layer.A]
    assert rel_err(state["exp_avg"][:, :3], m_A / ratio) < 1e-6
    assert torch.equal(state["exp_avg"][:, 3:], torch.zeros(17, 4))
    torch.testing.assert_close(state["exp_avg_sq"][:, 3:], (v_A / ratio ** 2).mean().expand(17, 4), rtol=1e-6, atol=0)
    # Why the old A moments are divided by ratio (first) and ratio² (second): the gradient of
    # the same loss with respect to the rescaled old A columns is the old gradient / ratio, and
    # B's old columns keep their gradient.
    new_g_A, new_g_B = torch.autograd.grad(head(layer(x)).square().mean(), [layer.A, layer.B])
    assert rel_err(new_g_A[:, :3], g_A / ratio) < 1e-5
    assert rel_err(new_g_B[:, :3], g_B) < 1e-5
    torch.testing.assert_close(state["exp_avg_sq"][:, :3], v_A / ratio ** 2, rtol=1e-6, atol=0)  # values ≪ 1
    if alpha is None:                                         # ratio 1: the old columns are copied
        assert torch.equal(state["exp_avg_sq"][:, :3], v_A)
    # B is not rescaled: old columns keep their moments exactly; new columns start with a zero
    # first moment and the old columns' mean second moment (grow_rank_'s docstring).
    state_B = opt.state[layer.B]
    assert state_B["exp_avg"].shape == state_B["exp_avg_sq"].shape == (20, 7)
    assert torch.equal(state_B["exp_avg"][:, :3], m_B)
    assert torch.equal(state_B["exp_avg_sq"][:, :3], v_B)
    assert torch.equal(state_B["exp_avg"][:, 3:], torch.zeros(20, 4))
    assert torch.equal(state_B["exp_avg_sq"][:, 3:], v_B.mean().expand(20, 4))
    assert float(state_B["step"]) == 3.0
    assert float(state["step"]) == 3.0
    loss = head(layer(x)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())


def test_grow_rank_to_the_current_rank_changes_nothing():
    """Between backward and the optimizer step, a grow_rank_ to the rank the layer has keeps its factors and
    their gradients: the step then moves A as it would have."""
    torch.manual_seed(0)
    layer = FusedLowRankLinear(8, 8, rank=3, dtype=torch.float64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(4, 8, dtype=torch.float64)).square().sum().backward()
    A, B, grad_A = layer.A, layer.B, layer.A.grad.clone()
    expected = A.detach() - 0.1 * grad_A
    assert grow_rank_(layer, 3, opt) is layer
    assert layer.A is A and layer.B is B and torch.equal(layer.A.grad, grad_A)
    opt.step()
    assert rel_err(layer.A, expected) < REL_TOL[torch.float64]
    assert rel_err(layer.A, expected + 0.1 * grad_A) > 1e-3        # the step moved A


def test_grow_rank_errors():
    layer = FusedLowRankLinear(8, 8, rank=4)
    with pytest.raises(ValueError, match=r"new_rank must be >= the current rank 4 \(ranks never shrink\), got 2"):
        grow_rank_(layer, 2)
    with pytest.raises(ValueError, match=r"new_rank must be an int in \[1, 8\] \(min\(in_features, out_features\)\), "
                                         r"got 9"):
        grow_rank_(layer, 9)
    with pytest.raises(TypeError, match="grow_rank_ takes a FusedLowRankLinear, got Linear"):
        grow_rank_(nn.Linear(8, 8), 2)
    with pytest.raises(ValueError, match="grow_rank_ applies to lowrank or adapter form, the layer is full"):
        grow_rank_(layer.inflate(), 6)


def test_grow_rank_warns_where_fused_sgd_with_dampening_starts_a_factor_on_a_zero_buffer():
    """Factors without a momentum buffer (frozen until now) beside a bias that has one: fused SGD needs a zero
    buffer for them, so with dampening their first step is (1 − dampening)·lr·g; grow_rank_ says so, as a
    switch does."""
    torch.manual_seed(0)
    layer = FusedLowRankLinear(8, 6, rank=2).double()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, dampening=0.5, fused=True)
    x = torch.randn(5, 8, dtype=torch.float64)
    layer.A.requires_grad_(False)
    layer.B.requires_grad_(False)
    layer(x).square().sum().backward()
    opt.step()
    layer.A.requires_grad_(True)
    layer.B.requires_grad_(True)
    with pytest.warns(UserWarning) as said:
        grow_rank_(layer, 4, opt)
    assert [str(w.message) for w in said] == [
        "fused SGD with momentum and dampening=0.5: 2 parameters that joined the optimizer at this rank growth "
        "(2 → 4) start with a zero momentum buffer (fused SGD cannot step a param group where only some "
        "parameters have one), so their first step is 0.5·lr·g, (1 − dampening)·lr·g, where SGD without "
        "fused=True takes lr·g; use SGD without fused or dampening=0"]
    assert said[0].filename == __file__             # the caller's line, not torch.no_grad's wrapper
    B = layer.B.detach().clone()
    opt.zero_grad()
    layer(x).square().sum().backward()
    expected = B - 0.5 * 0.1 * layer.B.grad
    opt.step()
    assert rel_err(layer.B.detach(), expected) < 1e-14
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # every factor has a buffer now: nothing to say
        grow_rank_(layer, 5, opt)


def teacher_task(seed=0, d=32, true_rank=6, n=512):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, true_rank, generator=g) @ torch.randn(true_rank, d, generator=g) / d ** 0.5
    x = torch.randn(n, d, generator=g)
    return x, x @ W.t()


def test_scheduler_grows_ranks_monotonically_and_learns():
    torch.manual_seed(0)
    x, y = teacher_task()
    model = nn.Sequential(nn.Linear(32, 32, bias=False), nn.Linear(32, 32))
    convert_model(model, rank_ratio=0.5, init="fresh", keep_last=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = IncrementalRankScheduler(model, opt, init_rank=1, buffer=2, threshold=0.95, warmup_steps=20,
                                     check_every=10)
    assert sched.ranks == {"0": 3, "1": 3}
    events, history, losses = [], [sched.ranks], []
    sched.add_callback(events.append)
    for step in range(1, 301):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        grown = sched.step(step)
        if grown:
            assert step >= 20 and (step - 20) % 10 == 0
        history.append(sched.ranks)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert sorted(map(id, trainable)) == sorted(id(p) for g in opt.param_groups for p in g["params"])
    for name in ("0", "1"):
        ranks = [h[name] for h in history]
        assert all(b >= a for a, b in zip(ranks, ranks[1:]))  # never shrinks
        assert ranks[-1] > ranks[0] and ranks[-1] <= 32
    assert events and all(e["rank_changes"] for e in events)
    assert all(5 <= c <= 7 for c in sched.current.values())  # near the teacher's rank 6 (5–7 over seeds)
    assert losses[-1] < 0.05 * losses[0]


def test_checks_run_at_warmup_steps_then_every_check_every_steps():
    """warmup_steps counts the steps before the first check: with warmup_steps=5 and check_every=10 the rule runs
    at steps 5, 15 and 25 (each growing both layers by the rule over the trained spectrum), and the steps between
    change nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16)).double()
    convert_model(model, rank_ratio=0.5, init="fresh", keep_last=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threshold = 1 - 1e-9
    sched = IncrementalRankScheduler(model, opt, init_rank=1, buffer=3, threshold=threshold, warmup_steps=5,
                                     check_every=10)
    x, y = (t.double() for t in teacher_task())
    current, ranks, checks = dict(sched.current), dict(sched.ranks), []
    for step in range(1, 26):
        _train(model, opt, x, y[:, :16], 1)
        if step in (5, 15, 25):
            for name, layer in sched.layers:
                current[name], target = _expected_check(layer, current[name], 3, threshold, sched.max_rank[name])
                ranks[name] = max(ranks[name], target)
        before = sched.ranks
        grown = sched.step(step)
        assert sched.current == current and sched.ranks == ranks and sched.last_step == step, step
        assert grown == [(name, before[name], ranks[name]) for name in ranks if ranks[name] > before[name]], step
        checks += [step] if grown else []
    assert checks == [5, 15, 25]
    assert {name: layer.rank for name, layer in sched.layers} == ranks


def test_state_dict_round_trip():
    torch.manual_seed(0)
    x, y = teacher_task()
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    convert_model(model, rank_ratio=0.5, init="fresh", keep_last=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = IncrementalRankScheduler(model, opt, init_rank=1, buffer=2, warmup_steps=0, check_every=5)
    for step in range(1, 41):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(step)
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    fresh = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    convert_model(fresh, rank_ratio=0.5, init="fresh", keep_last=False)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    fresh_sched = IncrementalRankScheduler(fresh, fresh_opt, init_rank=1, buffer=2, warmup_steps=0,
                                           check_every=5)
    fresh_sched.load_state_dict(saved["sched"])
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    assert fresh_sched.ranks == sched.ranks and fresh_sched.current == sched.current
    assert fresh_sched.last_step == 40
    assert torch.equal(fresh(x), model(x))
    for p, q in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(fresh_opt.state[p]["exp_avg"], opt.state[q]["exp_avg"])


def test_state_dict_is_a_snapshot_of_the_scheduler():
    """A state kept in memory (a best-so-far checkpoint) stays as it was saved while training grows the layers,
    and editing a returned state changes nothing in the scheduler."""
    import copy
    model, opt, sched = _run(threshold=1 - 1e-9, check_every=1)
    saved = sched.state_dict()
    kept = copy.deepcopy(saved)
    x, y = teacher_task()
    for step in range(1, 4):
        _train(model, opt, x, y[:, :16], 1)
        sched.step(step)
    assert sched.current != kept["current"] and sched.ranks != kept["ranks"]      # the run grew meanwhile
    assert saved == kept
    current, max_rank = dict(sched.current), dict(sched.max_rank)
    edited = sched.state_dict()
    edited["current"]["0"], edited["max_rank"]["0"], edited["ranks"]["0"] = 1, 2, 2
    assert sched.current == current and sched.max_rank == max_rank and model[0].rank == sched.ranks["0"] > 2


def test_load_state_dict_leaves_the_global_rng_alone():
    """A load that grows a layer (fresh columns) or truncates one draws from the layers' own generators: a resume
    that restored the global RNG state first goes on with the saved run's random stream."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(FusedLowRankLinear(16, 16, rank=8), FusedLowRankLinear(16, 12, rank=8))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, opt, IncrementalRankScheduler(model, opt, init_rank=1, buffer=2)
    model, opt, sched = build()
    small = sched.state_dict()                                  # ranks 3
    for layer in model:
        grow_rank_(layer, 6, opt)
    grown = sched.state_dict()
    _, _, fresh = build()
    for state, ranks in ((grown, {"0": 6, "1": 6}), (small, {"0": 3, "1": 3})):
        torch.manual_seed(1)
        rng = torch.get_rng_state()
        fresh.load_state_dict(state)
        assert fresh.ranks == ranks
        assert torch.equal(torch.get_rng_state(), rng)


def test_bad_arguments():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="model has no FusedLowRankLinear in lowrank or adapter form"):
        IncrementalRankScheduler(model, opt)
    convert_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)             # over the converted layer's factors
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\), got 1\.5"):
        IncrementalRankScheduler(model, opt, threshold=1.5)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\), got 0\.0"):
        IncrementalRankScheduler(model, opt, threshold=0.0)
    with pytest.raises(ValueError, match="buffer must be an int >= 1, got 0"):
        IncrementalRankScheduler(model, opt, buffer=0)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer, got str"):
        IncrementalRankScheduler(model, "sgd")
    sched = IncrementalRankScheduler(model, opt, init_rank=1, buffer=2)
    sched.step(5)
    with pytest.raises(ValueError, match="steps must not go backwards: got 3 after 5"):
        sched.step(3)



# -- LowRankConv2d layers: InRank grows linear layers only -----------------------------------------------
def _cnn(linear=True, decomposition="svd", form="lowrank", convs=2):
    """``convs`` 3×3 convs (8 channels), then a hidden Linear (``linear``) and a dense classifier."""
    torch.manual_seed(0)
    layers = []
    for _ in range(convs):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    layers.append(nn.Flatten())
    layers += [nn.Linear(8 * 4 * 4, 32), nn.ReLU()] if linear else []
    model = nn.Sequential(*layers, nn.Linear(32 if linear else 8 * 4 * 4, 10))
    convert_model(model, rank_ratio=0.5, decomposition=decomposition, form=form)
    return model


@pytest.mark.parametrize("form", ["lowrank", "adapter"])
def test_lowrank_convs_left_at_their_rank_are_named_in_a_warning(form):
    """The scheduler managed the Linear only; the two lowrank convs kept their ranks with no word."""
    model = _cnn(form=form)
    convs = {n: m.rank for n, m in model.named_modules() if type(m).__name__ == "LowRankConv2d"}
    assert list(convs) == ["0", "2"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"grows FusedLowRankLinear layers only: the model's 2 LowRankConv2d "
                                         r"layer\(s\) in lowrank or adapter form \('0', '2'\) keep their rank"):
        growth = IncrementalRankScheduler(model, opt, init_rank=1, buffer=2, threshold=1 - 1e-9, warmup_steps=0,
                                          check_every=1)
    x = torch.randn(4, 8, 4, 4)
    for step in range(1, 3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        assert [name for name, _, _ in growth.step(step)] == ["5"]
    assert growth.ranks == {"5": 5}
    assert {n: model.get_submodule(n).rank for n in convs} == convs
    many = _cnn(convs=7)                                                # the first five, then a count
    with pytest.warns(UserWarning, match=r"7 LowRankConv2d layer\(s\) in lowrank or adapter form \('0', '2', "
                                         r"'4', '6', '8' and 2 more\)"):
        IncrementalRankScheduler(many, torch.optim.SGD(many.parameters(), lr=0.1))
    plain = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    convert_model(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # no conv, no warning
        IncrementalRankScheduler(plain, torch.optim.SGD(plain.parameters(), lr=0.1))


@pytest.mark.parametrize("decomposition", ["svd", "tucker", "cp", "tkd-cpd"])
@pytest.mark.parametrize("form", ["lowrank", "adapter"])
def test_a_model_whose_only_lowrank_layers_are_convs_is_refused_naming_them(decomposition, form):
    """It said "convert it first with dynrank.convert_model(model)" of a model convert_model had converted."""
    model = _cnn(linear=False, decomposition=decomposition, form=form)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError) as caught:
        IncrementalRankScheduler(model, opt)
    message = str(caught.value)
    assert re.search(r"IncrementalRankScheduler grows FusedLowRankLinear layers only, and this model's "
                     r"lowrank/adapter layers are 2 LowRankConv2d \('0', '2'\)$", message), message
    assert "convert it first" not in message


# -- failed calls change nothing -------------------------------------------------------------------
def _run(steps=0, sgd=False, **kwargs):
    """Two converted layers ("0": 32→32, "1": 32→16) under a scheduler, trained ``steps`` steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16))
    convert_model(model, rank_ratio=0.5, init="fresh", keep_last=False)
    opt = (torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9) if sgd
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    settings = dict(init_rank=1, buffer=2, warmup_steps=0, check_every=5)
    settings.update(kwargs)
    sched = IncrementalRankScheduler(model, opt, **settings)
    x, y = teacher_task()
    for step in range(1, steps + 1):
        loss = F.mse_loss(model(x)[:, :16], y[:, :16])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(step)
    return model, opt, sched


def _everything(model, opt, sched):
    return {"ranks": {n: (m.form, m.rank) for n, m in sched._layers},
            "params": [(n, p, p.detach().clone()) for n, p in model.named_parameters()],
            "groups": [list(g["params"]) for g in opt.param_groups],
            "state": [(p, {k: v.clone() for k, v in s.items()}) for p, s in opt.state.items()],
            "scheduler": sched.state_dict()}


def _assert_unchanged(before, model, opt, sched):
    now = _everything(model, opt, sched)
    assert now["ranks"] == before["ranks"]
    assert [(n, id(p)) for n, p, _ in now["params"]] == [(n, id(p)) for n, p, _ in before["params"]]
    for (name, _, value), (_, _, old) in zip(now["params"], before["params"]):
        torch.testing.assert_close(value, old, rtol=0, atol=0, equal_nan=True, msg=name)
    assert [[id(p) for p in g] for g in now["groups"]] == [[id(p) for p in g] for g in before["groups"]]
    assert [id(p) for p, _ in now["state"]] == [id(p) for p, _ in before["state"]]
    for (_, s), (_, old) in zip(now["state"], before["state"]):
        assert s.keys() == old.keys() and all(torch.equal(s[k], old[k]) for k in s)
    assert now["scheduler"] == before["scheduler"]


def _with(key, name, value):
    def mutate(state):
        state[key] = dict(state[key])
        if value is None:
            del state[key][name]
        else:
            state[key][name] = value
    return mutate


@pytest.mark.parametrize("mutate, error, message", [
    (_with("ranks", "1", 0), ValueError, r"ranks\['1'\] is not a valid rank of layer '1': rank must be in "
                                         r"\[1, 16\], got 0"),
    (_with("ranks", "1", -1), ValueError, r"ranks\['1'\].*got -1"),
    (_with("ranks", "1", 2.7), TypeError, r"ranks\['1'\].*rank must be an int, got float \(2\.7\)"),
    (_with("ranks", "1", 17), ValueError, r"ranks\['1'\].*must be in \[1, 16\], got 17"),
    (_with("ranks", "1", None), ValueError, r"only in this model \['1'\] \(in ranks\)"),
    (_with("current", "0", 0), ValueError, r"current\['0'\].*got 0"),
    (_with("max_rank", "typo", 3), ValueError, r"only in checkpoint \['typo'\].*\(in max_rank\)"),
    (lambda s: s.pop("current"), ValueError, r"missing \['current'\]"),
    (lambda s: s.update(extra=1), ValueError, r"unknown keys \['extra'\]"),
    (lambda s: s.update(buffer=0), ValueError, "buffer must be an int >= 1, got 0"),
    (lambda s: s.update(threshold=2.0), ValueError, r"threshold must be in \(0, 1\), got 2\.0"),
    (lambda s: s.update(threshold="0.9"), TypeError, r"invalid IncrementalRankScheduler state dict: threshold must "
                                                     r"be a float in \(0, 1\), got str \('0\.9'\)"),
    (lambda s: s.update(last_step=-1), ValueError, "last_step must be a non-negative int, got -1"),
    (lambda s: s.update(ranks=[4, 4]), TypeError, "ranks must be a dict layer name → value, got list"),
    (_with("forms", "1", "dense"), ValueError, r"invalid IncrementalRankScheduler state dict: forms\['1'\] must be "
                                               r"one of lowrank, full, adapter, got 'dense'"),
    (_with("forms", "1", None), ValueError, r"only in this model \['1'\] \(in forms\)"),
    (_with("forms", "1", "adapter"), ValueError, r"layer '1' is in lowrank form but the checkpoint has it in adapter "
                                                 r"form"),
], ids=["rank-0", "rank-negative", "rank-float", "rank-too-big", "rank-missing", "current-0", "max-rank-typo",
        "missing-current", "unknown-key", "buffer", "threshold", "threshold-str", "last-step", "ranks-list",
        "form-unknown", "form-missing", "form-other"])
def test_load_state_dict_checks_everything_before_resizing(mutate, error, message):
    state = _run(20)[2].state_dict()
    assert state["ranks"] != _run()[2].ranks                    # loading it would resize the layers
    mutate(state)
    model, opt, sched = _run()
    before = _everything(model, opt, sched)
    with pytest.raises(error, match=message):
        sched.load_state_dict(state)
    _assert_unchanged(before, model, opt, sched)
    with pytest.raises(TypeError, match=r"state_dict must be a dict from IncrementalRankScheduler\.state_dict\(\), "
                                        r"got NoneType"):
        sched.load_state_dict(None)
    _assert_unchanged(before, model, opt, sched)


def test_step_finds_every_new_rank_before_growing_any():
    model, opt, sched = _run(4)
    reference = _run(4)
    with torch.no_grad():
        model[1].A[0, 0] = float("inf")
    before = _everything(model, opt, sched)
    with pytest.raises(ValueError, match="layer '1' has non-finite values in A; not growing any layer at step 5"):
        sched.step(5)
    _assert_unchanged(before, model, opt, sched)
    with torch.no_grad():
        model[1].A[0, 0] = reference[0][1].A[0, 0]
    torch.manual_seed(3)
    grown = sched.step(5)
    torch.manual_seed(3)
    assert grown == reference[2].step(5) and grown                # as if the failed call had not been made
    for p, q in zip(model.parameters(), reference[0].parameters()):
        assert torch.equal(p, q)


def test_constructor_refuses_a_non_finite_layer_to_truncate_before_resizing_any():
    """A layer to truncate at construction whose factors hold NaN is named before any layer is resized."""
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(16, 16, rank=8), FusedLowRankLinear(16, 16, rank=8))
    with torch.no_grad():
        model[1].A[0, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    A = model[0].A
    with pytest.raises(ValueError, match="layer '1' has non-finite values in A; not resizing any layer to its "
                                         "starting rank"):
        IncrementalRankScheduler(model, opt, init_rank=1, buffer=2)
    assert model[0].A is A and [m.rank for m in model] == [8, 8]


def test_load_state_dict_refuses_a_non_finite_layer_to_shrink_before_resizing_any():
    model, opt, sched = _run()
    state = sched.state_dict()                                  # ranks 3
    for layer in model:
        grow_rank_(layer, 8, opt)
    with torch.no_grad():
        model[1].A[0, 0] = float("nan")
    before = _everything(model, opt, sched)
    with pytest.raises(ValueError, match="layer '1' has non-finite values in A; not loading any rank"):
        sched.load_state_dict(state)
    _assert_unchanged(before, model, opt, sched)


def test_a_state_without_forms_is_refused_for_a_layer_inflated_since():
    """A state saved without forms (an earlier version's) still names a managed layer now in full form."""
    model, opt, sched = _run()
    state = {k: v for k, v in sched.state_dict().items() if k != "forms"}
    model[1].inflate()
    with pytest.raises(ValueError, match=re.escape(FULL_LAYER.format("1"))):
        sched.load_state_dict(state)
    assert model[0].rank == 3 and model[1].form == "full"


def test_grow_rank_checks_the_optimizer_first():
    layer = FusedLowRankLinear(8, 8, rank=4)
    A, B = layer.A, layer.B
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or None, got dict"):
        grow_rank_(layer, 5, {"lr": 0.1})
    assert layer.rank == 4 and layer.A is A and layer.B is B


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_rank="4"), TypeError, r"max_rank must be an int or None, got str \('4'\)"),
    (dict(max_rank=2.7), TypeError, r"max_rank must be an int or None, got float \(2\.7\)"),
    (dict(max_rank=True), TypeError, r"max_rank must be an int or None, got bool \(True\)"),
    (dict(max_rank=0), ValueError, "max_rank must be >= 1, got 0"),
    (dict(sync_ranks="no"), TypeError, r"sync_ranks must be True, False or None, got str \('no'\)"),
    (dict(process_group="x"), TypeError, r"process_group must be a torch\.distributed\.ProcessGroup or None"),
], ids=["max-rank-str", "max-rank-float", "max-rank-bool", "max-rank-0", "sync-ranks", "process-group"])
def test_constructor_checks_before_resizing(kwargs, error, message):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2))
    convert_model(model, keep_last=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    A = model[0].A
    with pytest.raises(error, match=message):
        IncrementalRankScheduler(model, opt, init_rank=1, buffer=2, **kwargs)
    assert model[0].A is A and model[0].rank == 8
    for bad in ("m", None):
        with pytest.raises(TypeError, match=f"model must be a torch.nn.Module, got {type(bad).__name__}"):
            IncrementalRankScheduler(bad, opt)
    assert IncrementalRankScheduler(model, opt, init_rank=1, buffer=2, max_rank=2).max_rank == {"0": 2}


def test_load_training_state_is_all_or_nothing_for_incremental_rank():
    from dynrank.checkpoint import load_training_state, training_state
    source = _run(20, sgd=True)
    ckpt = training_state(*source)
    model, opt, sched = _run()                                   # Adam given SGD's state: grown, then fails
    before = _everything(model, opt, sched)
    with pytest.raises(ValueError, match=r"checkpoint\['optimizer'\] does not fit this optimizer \(KeyError"):
        load_training_state(ckpt, model, opt, sched)
    _assert_unchanged(before, model, opt, sched)
    model, opt, sched = _run(sgd=True)
    assert load_training_state(ckpt, model, opt, sched) == {}
    assert sched.state_dict() == source[2].state_dict()
    for p, q in zip(model.parameters(), source[0].parameters()):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["momentum_buffer"], source[1].state[q]["momentum_buffer"])


def test_truncated_and_grown_factors_are_contiguous():
    # The truncated SVD gave column-major factors (parameters, and so gradients, laid out transposed):
    # L-BFGS, which views every gradient flat, failed on them.  Truncation happens at construction
    # (init_rank below a layer's rank) and when loading a smaller saved rank.
    model = nn.Sequential(nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 2))
    convert_model(model, rank_ratio=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = IncrementalRankScheduler(model, opt, init_rank=2, buffer=2)           # 12 → 4 components
    state = sched.state_dict()
    grow_rank_(model[0], 9, opt)
    sched.load_state_dict(state)                                                  # 9 → 4 again
    for layer in (model[0], model[2]):
        assert layer.rank == 4
        assert layer.A.is_contiguous() and layer.B.is_contiguous()
    grow_rank_(model[2], 6, opt)
    assert model[2].A.is_contiguous() and model[2].B.is_contiguous()


@pytest.mark.parametrize("name, keeps", [
    ("Adam", True),
    ("Adafactor", False),    # factored row_var / col_var kept as they were: the next step raised a size mismatch
    ("Adamax", False),
])
def test_growth_keeps_the_state_it_knows_and_starts_the_rest_afresh(name, keeps):
    """grow_rank_ pads the state entries it knows (Adam's moments); a state with any other tensor entry
    starts empty, as after a reset, and the next step runs."""
    torch.manual_seed(0)
    layer = FusedLowRankLinear(12, 10, 3)
    opt = getattr(torch.optim, name)(layer.parameters(), lr=1e-2)
    x = torch.randn(8, 12)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    grow_rank_(layer, 5, opt)
    for p in (layer.A, layer.B):
        state = opt.state.get(p, {})
        if keeps:
            assert state["exp_avg"].shape == p.shape and int(state["step"]) == 3, name
        else:
            assert not state, name
    opt.zero_grad()
    layer(x).square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in layer.parameters())


def test_an_optimizer_built_before_convert_model_is_refused():
    """It holds the replaced nn.Linear's tensors and none of the factors: the layers never trained, and
    each growth added factors to an optimizer that held none of the layer's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    convert_model(model, rank_ratio=0.5)
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, FusedLowRankLinear)}
    with pytest.raises(ValueError, match=r"the optimizer holds no trainable parameter of the dynrank layers "
                                         r"\('0'\), so they would never train \(it holds 2 tensors that are not "
                                         r"in the model.*build the optimizer after convert_model\(model\)"):
        IncrementalRankScheduler(model, stale, init_rank=2)
    assert {name: model.get_submodule(name).rank for name in ranks} == ranks       # nothing resized
    sched = IncrementalRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), init_rank=2)
    assert sched.ranks == {"0": 2 + 8}


# -- truncation at construction ---------------------------------------------------------------------
def test_a_fresh_adapter_truncated_at_construction_keeps_its_function_and_trains():
    """With the default settings the constructor truncates each layer to init_rank + buffer components by the
    SVD of s·A·Bᵀ; a fresh adapter's product is zero, and its SVD factors A = B = 0 are a saddle point that
    never gets a gradient.  The zero components get the zero-output init (A zero, B random) instead."""
    def adapter_model():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).double()
        convert_model(model, rank_ratio=0.5, form="adapter")
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 64, generator=gen, dtype=torch.float64)
    y = torch.randn(128, 10, generator=gen, dtype=torch.float64)

    def train(model, opt, steps=5):
        losses = []
        for _ in range(steps):
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    model, opt = adapter_model()
    layer = model[0]
    before = model(x).detach()
    IncrementalRankScheduler(model, opt)                                        # init_rank 2, buffer 8
    assert layer.rank == 10 and layer.form == "adapter"
    assert torch.equal(model(x), before)                                        # A = 0: same function
    assert torch.equal(layer.A, torch.zeros(64, 10, dtype=torch.float64))
    assert torch.linalg.matrix_rank(layer.B) == 10                              # every component trainable
    glorot = (64 * 10 * 2.0 / (64 + 10)) ** 0.5                                 # E‖B‖_F of the layer's init
    assert 0.75 < layer.B.norm().item() / glorot < 1.25
    losses = train(model, opt)
    reference, reference_opt = adapter_model()                                  # rank 32, no scheduler
    reference_losses = train(reference, reference_opt)
    assert layer.A.abs().max() > 0.5 * reference[0].A.abs().max() > 0
    assert losses[-1] < losses[0] and reference_losses[-1] < reference_losses[0]


@pytest.mark.parametrize("alpha", [None, 4.0])
@pytest.mark.parametrize("form", ["lowrank", "adapter"])
@pytest.mark.parametrize("product_rank", [0, 3])
def test_truncating_a_rank_deficient_product_keeps_every_component_trainable(product_rank, form, alpha):
    """A product of rank 3 truncated to 10 components: the 7 beyond its rank had singular value 0 (≈1e-16
    in float64), so their SVD factors were ≈1e-8 and never trained; they now get the zero-output init."""
    torch.manual_seed(0)
    layer = FusedLowRankLinear(48, 64, rank=16, form=form, alpha=alpha, dtype=torch.float64)
    with torch.no_grad():
        layer.A.copy_(torch.randn(64, product_rank, dtype=torch.float64) @ torch.randn(product_rank, 16,
                                                                                       dtype=torch.float64))
    x = torch.randn(32, 48, dtype=torch.float64)
    before = layer(x).detach()
    product = (layer.scale * layer.A @ layer.B.T).detach()
    model = nn.Sequential(layer)
    IncrementalRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), init_rank=2, buffer=8)
    assert layer.rank == 10
    if product_rank:
        assert rel_err(layer(x), before) < 1e-12
        assert rel_err(layer.scale * layer.A @ layer.B.T, product) < 1e-12
    else:
        assert torch.equal(layer(x), before)
    assert torch.equal(layer.A[:, product_rank:], torch.zeros(64, 10 - product_rank, dtype=torch.float64))
    assert layer.B[:, product_rank:].norm(dim=0).min() > 0.5                  # Glorot columns, ‖·‖ ≈ 1.3
    g_A, = torch.autograd.grad(layer(x).square().sum(), [layer.A])
    assert g_A[:, product_rank:].norm(dim=0).min() > 1e-3 * g_A.norm()


def test_truncating_a_rank_deficient_float32_product_finds_its_zero_components():
    """In float32 the merged product's tail lies near 0.1·eps·σ_max, under the floor eps·σ_max (plus the float64
    SVD's tolerance) the shared SVD fit (dynrank.linear.svd_factors) counts as zero."""
    torch.manual_seed(0)
    layer = FusedLowRankLinear(48, 64, rank=16)
    with torch.no_grad():
        layer.A.copy_(torch.randn(64, 3) @ torch.randn(3, 16))
    x = torch.randn(32, 48)
    before = layer(x).detach()
    model = nn.Sequential(layer)
    IncrementalRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), init_rank=2, buffer=8)
    assert layer.rank == 10
    assert rel_err(layer(x), before) < 1e-5
    assert torch.equal(layer.A[:, 3:], torch.zeros(64, 7))
    assert layer.B[:, 3:].norm(dim=0).min() > 0.5
    assert layer.A[:, :3].norm(dim=0).min() > 0.1



@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_truncating_a_rank_deficient_16_bit_product_finds_its_zero_components(dtype, tol):
    """The product is merged in float64: held in a 16-bit dtype, its rounding gave a rank-3 product a tail near
    1e-3·σ_max, whose components got noise columns (‖·‖ ≈ 0.01) instead of the zero-output init."""
    torch.manual_seed(0)
    layer = FusedLowRankLinear(48, 64, rank=16, dtype=dtype)
    with torch.no_grad():
        layer.A[:, 3:] = 0                                      # s·A·Bᵀ has rank 3 exactly
    product = (layer.scale * layer.A.double() @ layer.B.double().T).detach()
    model = nn.Sequential(layer)
    IncrementalRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), init_rank=2, buffer=8)
    assert layer.rank == 10 and layer.A.dtype == layer.B.dtype == dtype
    assert rel_err(layer.scale * layer.A.double() @ layer.B.double().T, product) < tol
    assert torch.equal(layer.A[:, 3:], torch.zeros(64, 7, dtype=dtype))
    assert layer.B[:, 3:].double().norm(dim=0).min() > 0.5                 # Glorot columns, ‖·‖ ≈ 1.3
    assert layer.A[:, :3].double().norm(dim=0).min() > 0.1

def test_max_rank_caps_the_layers_kept_with_init_rank_none():
    """init_rank=None keeps each layer's rank and starts its discovered rank at rank − buffer; max_rank was
    ignored there (a rank-16 layer trained 16 components under max_rank=4, discovered rank 14)."""
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(32, 24, rank=16, dtype=torch.float64),
                          FusedLowRankLinear(24, 24, rank=3, dtype=torch.float64))
    product = (model[0].A @ model[0].B.T).detach().numpy()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = IncrementalRankScheduler(model, opt, init_rank=None, buffer=2, max_rank=4, warmup_steps=0,
                                     check_every=1)
    assert sched.max_rank == {"0": 4, "1": 4}
    assert sched.ranks == {"0": 4, "1": 3} and sched.current == {"0": 2, "1": 1}
    U, S, Vh = np.linalg.svd(product)
    best = (U[:, :4] * S[:4]) @ Vh[:4]                                           # best rank-4 approximation
    assert rel_err(model[0].A @ model[0].B.T, torch.from_numpy(best)) < 1e-12
    assert any(p is model[0].A for g in opt.param_groups for p in g["params"])
    x = torch.randn(16, 32, dtype=torch.float64)
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sched.step()
        assert all(rank <= 4 for rank in sched.ranks.values()) and all(c <= 4 for c in sched.current.values())


@pytest.mark.parametrize("init_rank, max_rank, current, rank", [(2, 5, 2, 5), (20, 6, 6, 6)])
def test_max_rank_caps_the_starting_ranks_of_an_init_rank(init_rank, max_rank, current, rank):
    """max_rank caps every layer: init_rank + buffer past it starts the layer at max_rank (the best rank-max_rank
    approximation of its product), and an init_rank past it starts the discovered rank at max_rank; the
    scheduler's state loads into one built alike."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(FusedLowRankLinear(16, 16, rank=8, dtype=torch.float64))
        product = (model[0].A @ model[0].B.T).detach().numpy()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        return model, product, IncrementalRankScheduler(model, opt, init_rank=init_rank, buffer=8,
                                                        max_rank=max_rank)
    model, product, sched = build()
    assert sched.max_rank == {"0": max_rank}
    assert sched.current == {"0": current} and sched.ranks == {"0": rank} and model[0].rank == rank
    U, S, Vh = np.linalg.svd(product)
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    assert rel_err(model[0].A @ model[0].B.T, torch.from_numpy(best)) < 1e-12
    again = build()[2]
    again.load_state_dict(sched.state_dict())
    assert again.current == sched.current and again.ranks == sched.ranks


def test_max_rank_past_a_layer_s_width_is_capped_at_it():
    """max_rank's upper bound is min(in, out) per layer: a larger one is capped there, and the state loads."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(FusedLowRankLinear(16, 8, rank=4), FusedLowRankLinear(8, 32, rank=4))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        return IncrementalRankScheduler(model, opt, init_rank=1, buffer=2, max_rank=100)
    sched = build()
    assert sched.max_rank == {"0": 8, "1": 8} and sched.ranks == {"0": 3, "1": 3}
    again = build()
    again.load_state_dict(sched.state_dict())
    assert again.max_rank == {"0": 8, "1": 8}


def test_growth_stops_at_max_rank_where_current_plus_buffer_passes_it():
    """A check whose discovered rank + buffer passes max_rank grows the layer to max_rank and no further, at that
    check, at the later ones and after a state_dict round trip; the discovered rank still follows the rule."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).double()
        convert_model(model, rank_ratio=0.5)                  # dense init: "0" holds 16 components of its weight
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, opt, IncrementalRankScheduler(model, opt, init_rank=2, buffer=4, threshold=threshold,
                                                    warmup_steps=0, check_every=1, max_rank=7)

    threshold = 1 - 1e-9
    model, opt, sched = build()
    layer = model[0]
    assert sched.max_rank == {"0": 7} and sched.ranks == {"0": 6} and sched.current == {"0": 2}
    x, y = torch.randn(64, 32, dtype=torch.float64), torch.randn(64, 10, dtype=torch.float64)
    current, rank = 2, 6
    for step in range(1, 5):
        _train(model, opt, x, y, 1)
        if rank < 7:                                          # a layer at max_rank is checked no more
            current, rank = _expected_check(layer, current, 4, threshold, 7)
        grown = sched.step(step)
        if step == 1:
            assert grown == [("0", 6, 7)] and current + 4 > 7      # the rule asked for 9 components
        assert sched.current == {"0": current} and sched.ranks == {"0": rank} and layer.rank == rank <= 7, step
        assert layer.A.shape == (32, rank) and layer.B.shape == (32, rank)
    state = sched.state_dict()
    assert state["ranks"] == {"0": 7} and state["max_rank"] == {"0": 7}
    other_model, other_opt, other = build()
    other.load_state_dict(state)
    assert other.ranks == {"0": 7} and other_model[0].rank == 7 and other.current == sched.current
    _train(other_model, other_opt, x, y, 1)
    assert other.step(5) == [] and other.ranks == {"0": 7} and other_model[0].rank == 7


def test_remove_model_copy_stops_growing_the_copy_and_lets_it_go():
    """add_model_copy could not be undone: a copy the user dropped stayed alive and was checked and grown
    at every check.  A removed copy keeps its ranks and is freed with the scheduler alive; the copies left
    grow as before, and the scheduler's state dict is unchanged."""
    import gc
    import weakref
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    convert_model(model, rank_ratio=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    growth = IncrementalRankScheduler(model, opt, init_rank=1, buffer=3, threshold=1 - 1e-9, warmup_steps=0,
                                      check_every=1)
    kept, dropped = kept_and_removed_copy(growth, model)
    grow_rank_(dropped[0], 5)                       # checked, it would stop the step: it is not
    assert growth.step(1) == [("0", 4, 6)]
    assert kept.module[0].rank == 6 and dropped[0].rank == 5
    gone = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert gone() is None
    growth.remove_model_copy(kept)
    (name, old, new), = growth.step(2)
    assert (name, old) == ("0", 6) and model[0].rank == new > 6 and kept.module[0].rank == 6


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([float("nan"), 1.0, 0.5]), "finite and ≥ 0, got nan at index 0"),
    (torch.tensor([float("inf"), 1.0, 0.5]), "finite and ≥ 0, got inf at index 0"),
    (torch.tensor([5.0, -1.0, 0.5]), r"finite and ≥ 0, got -1.0 at index 1"),
    (torch.ones(3, 3), r"singular_values must be a 1-D tensor, got shape \(3, 3\)"),
    (torch.ones(3, device="meta"), "meta device"),
], ids=["nan", "inf", "negative", "2-D", "meta"])
def test_explained_rank_refuses_what_is_no_spectrum(bad, match):
    """A NaN, ±inf or negative σ, or a matrix, gave the largest growth (current + buffer − 1) without a word."""
    with pytest.raises(ValueError, match=match):
        explained_rank(bad, 1, 4, 0.9)


@pytest.mark.parametrize("new_rank, error", [(None, TypeError), (3.0, TypeError), (0, ValueError), (99, ValueError)])
def test_grow_rank_names_new_rank(new_rank, error):
    layer = FusedLowRankLinear(6, 5, rank=2)
    with pytest.raises(error, match=r"^new_rank must be an int in \[1, 5\]"):
        grow_rank_(layer, new_rank)
    assert layer.rank == 2


def test_layers_are_the_managed_ones_and_label_a_monitor_s_epochs():
    """IncrementalRankScheduler had no ``layers`` (DynamicRankScheduler's list of the (name, layer) it
    manages), so a RankMonitor attached to it labelled each epoch by every dynrank layer: "mixed" for a model
    whose full-form layer InRank leaves alone, where the managed layer is lowrank."""
    from dynrank.monitor import RankMonitor
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(32, 32, rank=8), nn.ReLU(),
                          FusedLowRankLinear(32, 32, rank=8, form="full"), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = IncrementalRankScheduler(model, opt, init_rank=2, buffer=2, warmup_steps=0, check_every=1)
    assert [(name, id(layer)) for name, layer in sched.layers] == [("0", id(model[0]))]
    assert list(sched.ranks) == [name for name, _ in sched.layers]
    sched.layers.clear()                                    # a copy: the scheduler's own list is kept
    assert len(sched.layers) == 1
    monitor = RankMonitor(model).attach(sched)
    for epoch in range(2):
        with monitor.epoch(epoch):
            model(torch.randn(4, 32)).sum().backward()
            opt.step()
            sched.step()
    assert [r["form"] for r in monitor.records] == ["lowrank", "lowrank"]
    assert monitor.records[0]["form_mix"] == {"lowrank": 1, "full": 1, "adapter": 0}


# -- alpha and layer sizes in the state; the layers the scheduler was built over ---------------------------
def _alpha_run(alpha, out=16, steps=6, form="lowrank"):
    """Layers "0" (32→32) and "1" (32→``out``) converted with ``alpha`` to ``form``, float64, trained ``steps``
    steps with a check every 2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, out)).double()
    convert_model(model, rank_ratio=0.5, alpha=alpha, init="fresh", keep_last=False, form=form)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = IncrementalRankScheduler(model, opt, init_rank=1, buffer=2, threshold=1 - 1e-9, warmup_steps=0,
                                     check_every=2)
    x = torch.randn(64, 32, dtype=torch.float64)
    for step in range(1, steps + 1):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(step)
    return model, opt, sched


def test_a_state_of_another_alpha_or_other_layer_sizes_is_refused():
    """The scale alpha / rank multiplies the factors, and the state kept neither it nor the layer sizes: a state
    saved with alpha=16 loaded into a model converted without alpha, which then computed another function with
    the saved weights, and a state of other layer sizes loaded its ranks.  Refused now, naming the layer and both
    values, before anything changes; the same alpha loads exactly, also after a JSON round trip, and a state
    saved without them (an earlier version's) loads unchecked."""
    import json
    from dynrank.checkpoint import load_training_state, training_state
    model, opt, sched = _alpha_run(16.0)
    state = sched.state_dict()
    assert state["alphas"] == {"0": 16.0, "1": 16.0} and state["shapes"] == {"0": [32, 32], "1": [16, 32]}
    assert state["ranks"] != _alpha_run(None, steps=0)[2].ranks                 # a load resizes the layers
    checkpoint = training_state(model, opt, sched)
    x = torch.randn(8, 32, dtype=torch.float64)
    for other, message in ((_alpha_run(None, steps=0), r"layer '0' has alpha None but the checkpoint has 16\.0 \(the "
                                                      r"scale is alpha / rank, 1 with alpha None\); convert the "
                                                      r"model with the same alpha"),
                           (_alpha_run(16.0, out=24, steps=0), r"layer '1' has a weight of shape \(24, 32\) but the "
                                                               r"checkpoint's is \(16, 32\): the checkpoint is of a "
                                                               r"model with other layer sizes")):
        before = _everything(*other)
        for load in (lambda: other[2].load_state_dict(state), lambda: load_training_state(checkpoint, *other)):
            with pytest.raises(ValueError, match=message):
                load()
            _assert_unchanged(before, *other)
    same = _alpha_run(16.0, steps=0)
    same[2].load_state_dict(json.loads(json.dumps(state)))
    same[0].load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(same[0](x), model(x))
    older = {k: v for k, v in state.items() if k not in ("alphas", "shapes")}
    unchecked = _alpha_run(None, steps=0)
    unchecked[2].load_state_dict(older)
    unchecked[0].load_state_dict(model.state_dict())
    with torch.no_grad():                                   # what the check keeps from loading
        assert rel_err(unchecked[0](x), model(x)) > 0.1


def test_a_bool_alpha_in_a_saved_state_is_refused():
    """True == 1 in Python: a state whose alphas read True (a hand-edited file, say) would load into layers
    converted with alpha=1 as if it held 1.  A bool is not taken for a number: refused, naming the entry,
    before anything changes; the same state with the numbers loads."""
    _, _, sched = _alpha_run(1.0)
    state = sched.state_dict()
    assert state["alphas"] == {"0": 1.0, "1": 1.0}
    other = _alpha_run(1.0, steps=0)
    assert other[2].ranks != sched.ranks                                     # a load resizes the layers
    before = _everything(*other)
    with pytest.raises(TypeError, match=r"alphas\['0'\] must be a number or None, got bool \(True\)"):
        other[2].load_state_dict(dict(state, alphas={name: True for name in state["alphas"]}))
    _assert_unchanged(before, *other)
    other[2].load_state_dict(state)
    assert other[2].ranks == sched.ranks


def test_a_state_of_another_form_is_refused():
    """The state kept no form: a lowrank run's state loaded into a model converted in adapter form, whose layers
    (the model's factors loaded non-strictly, as the Trainer loads a checkpoint) then computed W + A·Bᵀ where the
    saved run computed A·Bᵀ.  Refused now, naming the layer and both forms, before anything changes; the same
    form loads exactly, also after a JSON round trip, and a state saved without forms (an earlier version's)
    loads unchecked."""
    import json
    from dynrank.checkpoint import load_training_state, training_state
    model, opt, sched = _alpha_run(None)
    state = sched.state_dict()
    assert state["forms"] == {"0": "lowrank", "1": "lowrank"}
    assert state["ranks"] != _alpha_run(None, steps=0, form="adapter")[2].ranks      # a load resizes the layers
    checkpoint = training_state(model, opt, sched)
    x = torch.randn(8, 32, dtype=torch.float64)
    other = _alpha_run(None, steps=0, form="adapter")
    before = _everything(*other)
    for load in (lambda: other[2].load_state_dict(state), lambda: load_training_state(checkpoint, *other)):
        with pytest.raises(ValueError, match=r"^layer '0' is in adapter form but the checkpoint has it in lowrank "
                                             r"form: .*IncrementalRankScheduler changes no layer's form; convert the "
                                             r"model to the saved form \(convert_model\(\.\.\., form='lowrank'\)\)$"):
            load()
        _assert_unchanged(before, *other)
    same = _alpha_run(None, steps=0)
    same[2].load_state_dict(json.loads(json.dumps(state)))
    same[0].load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(same[0](x), model(x))
    older = {k: v for k, v in state.items() if k != "forms"}
    unchecked = _alpha_run(None, steps=0, form="adapter")
    unchecked[2].load_state_dict(older)
    unchecked[0].load_state_dict(model.state_dict(), strict=False)
    assert [m.form for m in unchecked[0]] == ["adapter", "adapter"]
    with torch.no_grad():                                   # what the check keeps from loading
        assert rel_err(unchecked[0](x), model(x)) > 0.1


def test_layers_added_or_swapped_after_construction_are_refused_at_a_check():
    """A FusedLowRankLinear put in the model after the scheduler was built never grew (it kept its rank through
    the run, without a word), and one swapped out still did.  A step where a check is due, and a load, refuse
    them by name; nothing changes.  A step with no check due does not walk the model.  A full-form layer added
    is none InRank would grow, and a layer only renamed (a wrapper around it) is the same layer."""
    message = r"the model's lowrank/adapter FusedLowRankLinear layers changed since this IncrementalRankScheduler " \
              r"was built \({}\); a scheduler grows the layers it was built over: build a new " \
              r"IncrementalRankScheduler over the model as it is now"
    model, opt, sched = _run(3)
    state = sched.state_dict()
    model.append(FusedLowRankLinear(16, 16, rank=4))
    opt.add_param_group({"params": list(model[2].parameters())})
    assert sched.step(4) == []                                     # no check due at step 4 (every 5)
    before = _everything(model, opt, sched)
    for call in (lambda: sched.step(5), lambda: sched.load_state_dict(state)):
        with pytest.raises(ValueError, match=message.format("added '2'")):
            call()
        _assert_unchanged(before, model, opt, sched)
    model[2] = FusedLowRankLinear(16, 16, rank=4, form="full")     # one InRank leaves alone
    assert [name for name, _, _ in sched.step(5)] == ["0", "1"]

    model, opt, sched = _run(3)
    old = model[1]
    model[1] = FusedLowRankLinear(32, 16, rank=4)
    with pytest.raises(ValueError, match=message.format("added '1'; removed '1'")):
        sched.step(5)
    model[1] = nn.Linear(32, 16)
    with pytest.raises(ValueError, match=message.format("removed '1'")):
        sched.step(5)
    assert old.rank == 3 and model[0].rank == 3

    model, opt, sched = _run(3, threshold=1 - 1e-9)
    model[1] = Wrapper(model[1])
    assert sched.step(5) == [("0", 3, 4), ("1", 3, 4)] and model[1].inner.rank == 4
    assert set(sched.state_dict()["ranks"]) == {"0", "1"}


def test_a_layer_another_scheduler_deflates_is_not_taken_as_added():
    """A DynamicRankScheduler over one part of the model (full form, deflated at epoch 2) beside an
    IncrementalRankScheduler over the whole, which grows only the other part's lowrank layer: at the deflate,
    InRank's next check took the now adapter-form layer for one added since, and stopped the run."""
    from dynrank import DynamicRankScheduler, convert_model
    torch.manual_seed(0)
    model = nn.ModuleDict({"enc": nn.Sequential(nn.Linear(32, 32)), "dec": nn.Sequential(nn.Linear(32, 32))})
    convert_model(model["enc"], form="full", keep_last=False)
    convert_model(model["dec"], rank_ratio=0.5, keep_last=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = DynamicRankScheduler(model["enc"], opt, inflate_epoch=None, deflate_epoch=2)
    growth = IncrementalRankScheduler(model, opt, warmup_steps=0, check_every=1)
    assert [name for name, _ in growth.layers] == ["dec.0"]
    for epoch in range(3):
        schedule.step(epoch)
        growth.step()
    assert model["enc"][0].form == "adapter" and [name for name, _ in growth.layers] == ["dec.0"]


def _product(layer):
    """The layer's low-rank product s·A·Bᵀ (out × in), detached."""
    return layer.scale * layer.A.detach() @ layer.B.detach().t()


def _expected_check(layer, current, buffer, threshold, max_rank):
    """A check of ``layer`` by the rule over its product's whole spectrum (:func:`reference_rank`), as the
    scheduler runs it: the discovered rank (never below ``current``) and the components it asks for,
    ``current + buffer`` capped at ``max_rank``."""
    sigma = np.linalg.svd(_product(layer).numpy(), compute_uv=False)
    current = max(current, reference_rank(sigma, current, buffer, threshold))
    return current, min(current + buffer, max_rank)


def _train(layer_or_model, opt, x, y, steps):
    """``steps`` SGD steps on the mean squared error; returns the trainable factors' gradients of the first."""
    first = None
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(layer_or_model(x), y).backward()
        if first is None:
            first = {p: p.grad.clone() for p in opt.param_groups[0]["params"] if p.grad is not None}
        opt.step()
    return first


@pytest.mark.parametrize("frozen", ["A", "B"])
@pytest.mark.parametrize("form, alpha", [("lowrank", None), ("lowrank", 3.0), ("adapter", None)])
def test_grown_components_train_beside_a_factor_frozen_by_hand(frozen, form, alpha):
    """With A frozen by hand and B trained, grow_rank_ gave the new components zero A columns that stay frozen:
    their B columns got a zero gradient forever, and the product kept its rank while layer.rank grew.  The
    zero now goes on B's side there (random A columns); with B frozen it was on A's, which trains, already."""
    torch.manual_seed(0)
    layer = FusedLowRankLinear(16, 12, rank=2, form=form, alpha=alpha, dtype=torch.float64)
    with torch.no_grad():
        layer.A.normal_()                           # an adapter starts with a zero A: give it a product
    trained = "B" if frozen == "A" else "A"
    getattr(layer, frozen).requires_grad_(False)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(64, 16, dtype=torch.float64), torch.randn(64, 12, dtype=torch.float64)
    before = layer(x).detach()
    reference = x @ _product(layer).t() + layer.bias.detach() + (x @ layer.weight.t() if form == "adapter" else 0)
    assert rel_err(before, reference) < REL_TOL[torch.float64]
    grow_rank_(layer, 6, opt)
    assert layer.rank == 6 and not getattr(layer, frozen).requires_grad and getattr(layer, trained).requires_grad
    assert rel_err(layer(x), before) < REL_TOL[torch.float64]
    assert not getattr(layer, trained)[:, 2:].any() and getattr(layer, frozen)[:, 2:].abs().amin() > 0
    assert torch.linalg.matrix_rank(_product(layer)) == 2
    grads = _train(layer, opt, x, y, 30)
    new_columns = grads[getattr(layer, trained)][:, 2:]
    assert new_columns.abs().amax(0).amin() > 1e-6              # every new component gets a gradient
    sigma = torch.linalg.svdvals(_product(layer))
    assert sigma[5] > 1e-3 * sigma[0]                           # and the product's rank rose to 6


@pytest.mark.parametrize("form", ["lowrank", "adapter"])
def test_grown_components_of_a_layer_frozen_whole_start_with_zero_A_columns(form):
    """With both factors frozen the new components are the usual init: zero A columns, random B columns."""
    torch.manual_seed(0)
    layer = FusedLowRankLinear(16, 12, rank=2, form=form, dtype=torch.float64)
    with torch.no_grad():
        layer.A.normal_()
    layer.A.requires_grad_(False)
    layer.B.requires_grad_(False)
    x = torch.randn(8, 16, dtype=torch.float64)
    before = layer(x).detach()
    grow_rank_(layer, 5)
    assert layer.rank == 5 and not layer.A.requires_grad and not layer.B.requires_grad
    assert rel_err(layer(x), before) < REL_TOL[torch.float64]
    assert not layer.A[:, 2:].any() and layer.B[:, 2:].abs().amin() > 0


@pytest.mark.parametrize("frozen", ["A", "B"])
@pytest.mark.parametrize("case", ["pad", "truncate rank-deficient", "truncate zero adapter"])
def test_scheduler_resizes_to_components_that_train_beside_a_factor_frozen_by_hand(frozen, case):
    """IncrementalRankScheduler's padding at construction (rank 2 → 6) and its truncated SVD's components of
    singular value zero (the surplus of a rank-3 product, all of a fresh adapter's) got zero A columns and
    random B columns: with A frozen by hand they never trained.  Same function, and now every component trains."""
    torch.manual_seed(0)
    rank, form = {"pad": (2, "lowrank"), "truncate rank-deficient": (8, "lowrank"),
                  "truncate zero adapter": (8, "adapter")}[case]
    layer = FusedLowRankLinear(16, 16, rank=rank, form=form, dtype=torch.float64)
    if case == "truncate rank-deficient":
        with torch.no_grad():
            layer.A[:, 3:] = 0                      # a product of rank 3
    model = nn.Sequential(layer)
    trained = "B" if frozen == "A" else "A"
    getattr(layer, frozen).requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(64, 16, dtype=torch.float64), torch.randn(64, 16, dtype=torch.float64)
    before, product = model(x).detach(), _product(layer)
    IncrementalRankScheduler(model, opt, init_rank=2, buffer=4, warmup_steps=1000)
    assert layer.rank == 6 and not getattr(layer, frozen).requires_grad and getattr(layer, trained).requires_grad
    assert rel_err(model(x), before) < REL_TOL[torch.float64]
    assert (_product(layer) - product).abs().max() <= REL_TOL[torch.float64] * max(product.abs().max(), 1.0)
    grads = _train(model, opt, x, y, 30)
    assert grads[getattr(layer, trained)].abs().amax(0).amin() > 1e-6     # every component gets a gradient
    sigma = torch.linalg.svdvals(_product(layer))
    assert sigma[5] > 1e-3 * sigma[0]


def test_a_factor_left_out_of_the_optimizer_while_the_other_is_in_is_named():
    """A held by the optimizer given, B trained by a second one (LoRA+-style): a resize replaced B and the second
    optimizer stepped the old tensor from then on, silently; only a layer left out whole was warned of.  The
    scheduler (at construction) and grow_rank_ now name the factor; growth under the scheduler says it once."""
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(16, 16, rank=4), nn.ReLU(), nn.Linear(16, 2))
    layer = model[0]
    opt_main = torch.optim.SGD([layer.A, layer.bias, *model[2].parameters()], lr=0.1)
    opt_B = torch.optim.SGD([layer.B], lr=0.1)
    with pytest.warns(UserWarning) as said:
        growth = IncrementalRankScheduler(model, opt_main, init_rank=1, buffer=2, threshold=1 - 1e-9,
                                          warmup_steps=0, check_every=1)
    assert [str(w.message) for w in said] == [
        "parameter '0.B' is trainable but not in the optimizer IncrementalRankScheduler was given, though that "
        "holds others of its layer's: a switch or resize replaces it and puts the new one in no other optimizer "
        "(one a second optimizer trains stops training); put it in the optimizer IncrementalRankScheduler was "
        "given, or freeze it"]
    assert said[0].filename == __file__
    assert not any(p is layer.B for p in opt_B.param_groups[0]["params"])      # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # growth under the scheduler: said at construction
        assert growth.step() == [("0", 3, 4)]
    layer = FusedLowRankLinear(16, 16, rank=2)
    opt_A = torch.optim.SGD([layer.A, layer.bias], lr=0.1)
    with pytest.warns(UserWarning, match=r"^parameter 'B' is trainable but not in the optimizer grow_rank_ was "
                                         r"given, though that holds others of its layer's") as said:
        grow_rank_(layer, 4, opt_A)
    assert said[0].filename == __file__
    for frozen_B in (False, True):
        layer = FusedLowRankLinear(16, 16, rank=2)
        layer.B.requires_grad_(not frozen_B)
        # Nothing to say where the optimizer holds both (B in a group of its own), or leaves out a frozen B.
        groups = [{"params": [layer.A, layer.bias]}] + ([] if frozen_B else [{"params": [layer.B], "lr": 1.0}])
        opt = torch.optim.SGD(groups, lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            grow_rank_(layer, 3, opt)
            IncrementalRankScheduler(nn.Sequential(layer), opt, init_rank=2, buffer=2)
        assert layer.rank == 4 and any(p is layer.A for p in opt.param_groups[0]["params"])
