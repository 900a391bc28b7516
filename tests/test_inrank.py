"""InRank-style incremental rank growth: the rank rule, grow_rank_, and the scheduler."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _helpers import rel_err
from dynrank.convert import convert_model
from dynrank.inrank import IncrementalRankScheduler, explained_rank, grow_rank_
from dynrank.linear import FusedLowRankLinear



def reference_rank(sigma, current, buffer, threshold):
    """Straight from the definition, in numpy: smallest k with 1 − var(σ − σ_top-k)/var(σ) > threshold."""
    s = np.sort(np.asarray(sigma, dtype=np.float64))[::-1]
    upper = min(current + buffer, s.size)
    for k in range(current, upper):
        tail = np.where(np.arange(s.size) < k, 0.0, s)
        if 1.0 - tail.var() / s.var() > threshold:
            return k
    return max(current, upper - 1)


@pytest.mark.parametrize("sigma, current, buffer", [
    ([10.0, 9.0, 8.0, 0.1, 0.1, 0.05, 0.01, 0.0], 1, 8),
    ([5.0, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.1], 2, 4),
    ([1.0] * 6 + [0.0] * 6, 1, 6),
    (list(np.linspace(3, 0, 17)), 3, 10),
])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_explained_rank_matches_definition(sigma, current, buffer, threshold):
    shuffled = torch.tensor(sigma)[torch.randperm(len(sigma))]
    assert explained_rank(shuffled, current, buffer, threshold) == reference_rank(sigma, current, buffer,
                                                                                  threshold)


def test_explained_rank_finds_a_spectral_gap():
    sigma = torch.tensor([9.0, 8.0, 7.0, 6.0, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01])
    assert explained_rank(sigma, 1, 10, 0.9) == 4


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
    assert torch.allclose(state["exp_avg_sq"][:, 3:], (v_A / ratio ** 2).mean().expand(17, 4))
    assert float(state["step"]) == 3.0
    loss = head(layer(x)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())


def test_grow_rank_errors():
    layer = FusedLowRankLinear(8, 8, rank=4)
    with pytest.raises(ValueError, match="never shrink"):
        grow_rank_(layer, 2)
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        grow_rank_(layer, 9)
    with pytest.raises(TypeError, match="FusedLowRankLinear"):
        grow_rank_(nn.Linear(8, 8), 2)
    with pytest.raises(ValueError, match="full"):
        grow_rank_(layer.inflate(), 6)


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
    for step in range(1, 201):
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
    assert losses[-1] < 0.05 * losses[0]


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


def test_bad_arguments():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no FusedLowRankLinear"):
        IncrementalRankScheduler(model, opt)
    convert_model(model)
    with pytest.raises(ValueError, match="threshold"):
        IncrementalRankScheduler(model, opt, threshold=1.5)
    with pytest.raises(ValueError, match="buffer"):
        IncrementalRankScheduler(model, opt, buffer=0)
    with pytest.raises(TypeError, match="Optimizer"):
        IncrementalRankScheduler(model, "sgd")
    sched = IncrementalRankScheduler(model, opt, init_rank=1, buffer=2)
    sched.step(5)
    with pytest.raises(ValueError, match="backwards"):
        sched.step(3)
