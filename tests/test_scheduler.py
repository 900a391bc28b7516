"""DynamicRankScheduler: forms per epoch, in-place optimizer surgery, state carry, checkpoints."""

import copy
import io
import json
import math
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _helpers import Wrapper, rel_err
from _scheduling import data, held, kept_and_removed_copy, mlp, same_set, train_steps, trainable
from dynrank.convert import convert_model
from dynrank.linear import FusedLowRankLinear
from dynrank.checkpoint import load_training_state, training_state
from dynrank.scheduler import DynamicRankScheduler

HERE = os.path.dirname(os.path.abspath(__file__))



def test_forms_per_epoch_and_idempotent_step():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, inflate_epoch=2, deflate_epoch=4)
    expected = ["lowrank", "lowrank", "full", "full", "adapter", "adapter"]
    for epoch, form in enumerate(expected):
        changes = sched.step(epoch)
        assert set(sched.forms().values()) == {form}
        assert sched.step(epoch) == []                       # idempotent
        if epoch == 2:
            assert changes == [("0", "lowrank", "full"), ("2", "lowrank", "full")]
        elif epoch == 4:
            assert changes == [("0", "full", "adapter"), ("2", "full", "adapter")]
        else:
            assert changes == []
        assert same_set(held(opt), trainable(model))


def test_skipped_switches_reach_the_right_form():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, inflate_epoch=2, deflate_epoch=4)
    assert sched.step(7) == [("0", "lowrank", "adapter"), ("2", "lowrank", "adapter")]
    assert same_set(held(opt), trainable(model))
    assert all(layer.weight.requires_grad is False for _, layer in sched.layers)


def test_default_step_counts_from_zero():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, 1, 2)
    assert sched.step() == [] and sched.last_epoch == 0
    assert len(sched.step()) == 2 and sched.forms()["0"] == "full"


def test_new_params_join_the_old_group_in_place():
    model = mlp()
    head = list(model[4].parameters())
    converted = [p for i in (0, 2) for p in model[i].parameters()]
    opt = torch.optim.SGD([{"params": head, "lr": 0.1}, {"params": converted, "lr": 0.01, "momentum": 0.5}],
                          lr=0.1)
    groups = opt.param_groups
    group_lists = [g["params"] for g in groups]
    sched = DynamicRankScheduler(model, opt, 1, 2)
    for epoch in range(3):
        sched.step(epoch)
        assert opt.param_groups is groups and [g["params"] for g in groups] == group_lists
        assert group_lists[0] == head                        # untouched group
        layer_params = [p for i in (0, 2) for p in model[i].parameters() if p.requires_grad]
        assert same_set(group_lists[1], layer_params)
        assert groups[1]["lr"] == 0.01 and groups[1]["momentum"] == 0.5


def test_layer_left_out_of_the_optimizer_stays_out():
    """Left out, with a warning at construction: a second optimizer training it (Muon's matrices beside
    AdamW's convs) would lose it at the switch, silently."""
    model = mlp()
    opt = torch.optim.SGD(list(model[2].parameters()) + list(model[4].parameters()), lr=0.1)
    with pytest.warns(UserWarning, match=r"^layer '0' is trainable but not in the optimizer DynamicRankScheduler "
                                         r"was given: a switch leaves the new parameters out of every optimizer "
                                         r"\(one a second optimizer trains stops training\); build one "
                                         r"DynamicRankScheduler per optimizer over the part it trains") as said:
        sched = DynamicRankScheduler(model, opt, 1, 2)
    assert said[0].filename == __file__
    model[0].requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # a frozen layer out of the optimizer: nothing to say
        DynamicRankScheduler(model, opt, 1, 2)
    model[0].requires_grad_(True)
    sched.step(2)
    assert not any(p is q for p in model[0].parameters() for q in held(opt))
    assert same_set(held(opt), list(model[2].factors().values()) + [model[2].bias]
                    + list(model[4].parameters()))


def test_reset_drops_state_and_starts_empty():
    model = mlp()
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = DynamicRankScheduler(model, opt, 1, 2, optimizer_state="reset")
    sched.step(0)
    train_steps(model, opt, x, y)
    old = [p for i in (0, 2) for p in model[i].factors().values()]
    sched.step(1)
    assert all(p not in opt.state for p in old)
    assert all(model[i].weight not in opt.state for i in (0, 2))
    assert model[4].weight in opt.state                      # untouched parameters keep their state
    assert set(opt.state) <= set(held(opt))


class _EagerStateOptimizer(torch.optim.Optimizer):
    """Creates its state in ``__init__`` and fails on a parameter without it, as ``Adagrad`` did
    before torch 2.12 (``KeyError: 'sum'`` after a form change)."""

    def __init__(self, params, lr=0.05):
        super().__init__(params, dict(lr=lr))
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    total = self.state[p]["sum"]       # KeyError for a parameter it never saw
                    total += p.grad * p.grad
                    p -= group["lr"] * p.grad / (total.sqrt() + 1e-10)


@pytest.mark.parametrize("opt_factory", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    lambda p: torch.optim.AdamW(p, lr=1e-2),
    lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
    lambda p: torch.optim.Adagrad(p, lr=1e-2),
    lambda p: torch.optim.ASGD(p, lr=1e-2),
    lambda p: torch.optim.NAdam(p, lr=1e-2),
    lambda p: _EagerStateOptimizer(p),
], ids=["sgd", "adamw", "amsgrad", "rmsprop", "adagrad", "asgd", "nadam", "eager-state"])
@pytest.mark.parametrize("policy", ["reset", "carry", "fresh"])
def test_any_optimizer_through_both_switches(opt_factory, policy):
    model = mlp()
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    opt = opt_factory(model.parameters())
    sched = DynamicRankScheduler(model, opt, 1, 2, optimizer_state=policy)
    losses = []
    for epoch in range(3):
        sched.step(epoch)
        assert same_set(held(opt), trainable(model))
        losses += train_steps(model, opt, x, y)
        assert set(opt.state) <= set(held(opt))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_lr_scheduler_unchanged_by_switches():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lr_sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 5], gamma=0.1)
    sched = DynamicRankScheduler(model, opt, 2, 4)
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    seen = []
    for epoch in range(6):
        sched.step(epoch)
        seen.append(opt.param_groups[0]["lr"])
        train_steps(model, opt, x, y, steps=1)
        lr_sched.step()
    expected = [0.1 * 0.1 ** ((e >= 3) + (e >= 5)) for e in range(6)]
    assert seen == pytest.approx(expected, rel=1e-12)


def test_step_unit_and_callback_event():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, inflate_epoch=3, deflate_epoch=5, unit="step")
    events = []
    sched.add_callback(events.append)
    for step in range(7):
        sched.step(step)
    assert [e["step"] for e in events] == [3, 5] and all(e["epoch"] is None for e in events)
    assert events[0]["changes"] == [("0", "lowrank", "full"), ("2", "lowrank", "full")]


def test_deflate_rank_options():
    for spec, expected in ((2, [2, 2]), (0.5, [6, 12]), (1.0, [12, 24]), ({"0": 3}, [3, 6])):  # ρ·min(in, out)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        DynamicRankScheduler(model, opt, 0, 1, deflate_rank=spec).step(1)
        assert [model[i].rank for i in (0, 2)] == expected
        assert model[0].A.shape == (24, expected[0])


def test_finetune_preset_starts_full():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))
    convert_model(model, rank_ratio=0.25, form="full")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = DynamicRankScheduler(model, opt, None, 2)
    assert sched.step(0) == [] and sched.step(1) == []
    assert sched.step(2) == [("0", "full", "adapter")]
    assert same_set(held(opt), trainable(model))


def test_bad_arguments():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"deflate_epoch must be greater than inflate_epoch.*got I=5, D=5"):
        DynamicRankScheduler(model, opt, 5, 5)
    with pytest.raises(ValueError, match=r"deflate_epoch must be greater than inflate_epoch.*got I=5, D=3"):
        DynamicRankScheduler(model, opt, 5, 3)
    with pytest.raises(ValueError, match="inflate_epoch must be >= 0, got -1"):
        DynamicRankScheduler(model, opt, -1, 3)
    with pytest.raises(TypeError, match=r"inflate_epoch must be an int or None, got float \(1\.5\)"):
        DynamicRankScheduler(model, opt, 1.5, 3)
    with pytest.raises(ValueError, match="give inflate_epoch and/or deflate_epoch; both are None"):
        DynamicRankScheduler(model, opt, None, None)
    with pytest.raises(ValueError, match=r"deflate_epoch must be in \[0, epochs=10\], got 11"):
        DynamicRankScheduler(model, opt, 2, 11, epochs=10)
    with pytest.raises(ValueError, match="optimizer_state must be one of reset, carry, fresh, got 'keep'"):
        DynamicRankScheduler(model, opt, 1, 2, optimizer_state="keep")
    with pytest.raises(ValueError, match="deflate_init must be one of zeros, random, svd, got 'ones'"):
        DynamicRankScheduler(model, opt, 1, 2, deflate_init="ones")
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer, got list"):
        DynamicRankScheduler(model, [opt], 1, 2)
    with pytest.raises(ValueError, match=r"model has no dynrank layers \(FusedLowRankLinear, LowRankConv2d\)"):
        dense = nn.Linear(4, 4)
        DynamicRankScheduler(dense, torch.optim.SGD(dense.parameters(), lr=0.1), 1, 2)
    with pytest.raises(ValueError, match=r"deflate_rank is a float, a rank ratio, which must be in \(0, 1\], got 1\.5"):
        DynamicRankScheduler(model, opt, 1, 2, deflate_rank=1.5)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 12\], got 13"):
        DynamicRankScheduler(model, opt, 1, 2, deflate_rank=13)
    sched = DynamicRankScheduler(model, opt, 1, 2, epochs=4)
    with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
        sched.step(-1)
    with pytest.raises(ValueError, match=r"epoch must be in \[0, 4\), got 4"):
        sched.step(4)
    sched.step(3)
    with pytest.raises(ValueError, match="epochs must not go backwards: got 2 after 3"):
        sched.step(2)
    full = mlp()
    full_opt = torch.optim.SGD(full.parameters(), lr=0.1)
    DynamicRankScheduler(full, full_opt, 0, 5).step(0)
    with pytest.raises(ValueError, match=r"layer '0' is in full form and cannot be brought to lowrank form"):
        DynamicRankScheduler(full, full_opt, 2, 5).step(0)


# -- small models trained through lowrank → full → adapter --------------------------------------
class TinyTransformer(nn.Module):
    def __init__(self, vocab=16, d=32, heads=4, length=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.heads = heads

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.ff(self.norm2(x))
        return self.head(x)


def _train_through_phases(model, data_fn, loss_fn, epochs=6, inflate=2, deflate=4, lr=3e-3, steps=6):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    sched = DynamicRankScheduler(model, opt, inflate, deflate)
    epoch_losses = []
    for epoch in range(epochs):
        sched.step(epoch)
        form = "lowrank" if epoch < inflate else "full" if epoch < deflate else "adapter"
        assert set(sched.forms().values()) == {form}
        assert same_set(held(opt), trainable(model))
        expected_lr = lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_lr, rel=1e-9)
        losses = []
        for _ in range(steps):
            inputs, targets = data_fn()
            loss = loss_fn(model(inputs), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
        lr_sched.step()
    assert all(math.isfinite(v) for v in epoch_losses)
    return epoch_losses


def test_small_transformer_learns_through_all_phases():
    torch.manual_seed(0)
    model = TinyTransformer()
    summary = convert_model(model, rank_ratio=0.25)
    assert summary.converted == ["qkv", "proj", "ff.0", "ff.2"]
    g = torch.Generator().manual_seed(1)

    def data():  # copy task: predict the token one position back
        tokens = torch.randint(0, 16, (32, 8), generator=g)
        return tokens, torch.roll(tokens, 1, dims=1)

    def loss_fn(logits, targets):
        return F.cross_entropy(logits[:, 1:].reshape(-1, 16), targets[:, 1:].reshape(-1))

    losses = _train_through_phases(model, data, loss_fn, lr=2e-2, steps=16)
    assert losses[-1] < 0.3 * losses[0]


def test_small_cnn_learns_through_all_phases():
    pytest.importorskip("dynrank.conv")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    summary = convert_model(model, rank_ratio=0.5)
    assert summary.converted == ["0", "3"]
    g = torch.Generator().manual_seed(2)

    def data():  # which half of the image is brighter
        x = torch.randn(32, 3, 8, 8, generator=g)
        y = (x[..., :4].mean(dim=(1, 2, 3)) > x[..., 4:].mean(dim=(1, 2, 3))).long()
        return x + 0.5 * (2 * y.float() - 1).view(-1, 1, 1, 1) * torch.cat(
            [torch.ones(1, 1, 1, 4), -torch.ones(1, 1, 1, 4)], dim=3), y

    losses = _train_through_phases(model, data, F.cross_entropy, lr=1e-2, steps=5)
    assert losses[-1] < 0.5 * losses[0]


# -- checkpoints: resume in a new process, bitwise ---------------------------------------------------
EPOCHS, INFLATE, DEFLATE = 6, 2, 4


def _build_run(policy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    convert_model(model, rank_ratio=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    lr_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    sched = DynamicRankScheduler(model, opt, INFLATE, DEFLATE, deflate_init="random", optimizer_state=policy)
    data = torch.Generator().manual_seed(1)
    return model, opt, lr_sched, sched, data


def _train(policy, out_dir, resume_epoch=None):
    """Train to EPOCHS (saving a checkpoint after each epoch), or resume from one; save the end state."""
    model, opt, lr_sched, sched, data = _build_run(policy)
    x_all, y_all = torch.randn(256, 10, generator=data), torch.randint(0, 4, (256,), generator=data)
    start = 0
    if resume_epoch is not None:
        ckpt = torch.load(os.path.join(out_dir, f"ckpt{resume_epoch}.pt"), weights_only=False)
        extra = load_training_state(ckpt, model, opt, sched)
        lr_sched.load_state_dict(extra["lr_scheduler"])
        data.set_state(extra["data_rng"])
        torch.set_rng_state(extra["torch_rng"])
        start = resume_epoch + 1
    for epoch in range(start, EPOCHS):
        sched.step(epoch)
        perm = torch.randperm(256, generator=data)
        for i in range(0, 256, 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        lr_sched.step()
        if resume_epoch is None:
            torch.save(training_state(model, opt, sched, lr_scheduler=lr_sched.state_dict(),
                                      data_rng=data.get_state(), torch_rng=torch.get_rng_state()),
                       os.path.join(out_dir, f"ckpt{epoch}.pt"))
    name = "final.pt" if resume_epoch is None else f"resumed{resume_epoch}.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, os.path.join(out_dir, name))


def _resume_worker(policy, out_dir, resume_epochs):
    """Entry point of the new process: each resume builds everything afresh."""
    torch.set_num_threads(1)
    for epoch in resume_epochs:
        _train(policy, out_dir, epoch)


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_bitwise_equal(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("policy, resume_epochs", [("carry", (1, 3)), ("reset", (2, 4)), ("fresh", (1, 2, 3, 4))])
def test_resume_in_a_new_process_is_bitwise_identical(tmp_path, policy, resume_epochs):
    # Checkpoints after epoch 1 (before inflate), 2 (right after inflate), 3
    # (before deflate) and 4 (right after deflate): each resumed run, in a new
    # process, must end exactly where the uninterrupted run ended.
    _train(policy, tmp_path)
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    assert {"0.weight", "0.A", "3.weight", "3.A"} <= set(final["model"])       # adapter form at the end
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import test_scheduler as t; "
            f"t._resume_worker({policy!r}, {str(tmp_path)!r}, {resume_epochs!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for epoch in resume_epochs:
        resumed = torch.load(tmp_path / f"resumed{epoch}.pt", weights_only=False)
        _assert_bitwise_equal(resumed["model"], final["model"])
        _assert_bitwise_equal(resumed["optimizer"], final["optimizer"])


def test_load_state_dict_restores_forms_and_optimizer_order():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = DynamicRankScheduler(model, opt, 1, 2, deflate_rank=3)
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    for epoch in range(3):
        sched.step(epoch)
        train_steps(model, opt, x, y, steps=2)
    ckpt = training_state(model, opt, sched)
    fresh = mlp(seed=5)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = DynamicRankScheduler(fresh, fresh_opt, 1, 2)
    rng = torch.get_rng_state()
    load_training_state(ckpt, fresh, fresh_opt, fresh_sched)
    assert torch.equal(torch.get_rng_state(), rng)           # loading draws nothing
    assert fresh_sched.forms() == sched.forms() and fresh_sched.last_epoch == 2
    assert fresh[0].rank == 3 and fresh_sched.deflate_rank == 3
    assert [p.shape for p in held(fresh_opt)] == [p.shape for p in held(opt)]
    for p, q in zip(held(fresh_opt), held(opt)):
        assert torch.equal(p, q)
        assert torch.equal(fresh_opt.state[p]["exp_avg"], opt.state[q]["exp_avg"])
    other = nn.Sequential(nn.Linear(12, 24), nn.Linear(24, 3))
    convert_model(other, rank_ratio=0.25)
    other_sched = DynamicRankScheduler(other, torch.optim.SGD(other.parameters(), lr=0.1), 1, 2)
    with pytest.raises(ValueError, match=r"saved scheduler manages other layers: only in checkpoint \['2'\], only in this model \[\]"):
        other_sched.load_state_dict(sched.state_dict())


def test_load_state_dict_restores_the_saved_run_settings():
    """A scheduler built with the defaults takes the saved run's deflate_init, epochs, optimizer_state and
    deflate_rank: it deflates as that run would have (SVD at rank 2) and refuses the epochs past its end."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, 1, 3, deflate_init="svd", optimizer_state="carry", deflate_rank=2,
                                 epochs=5)
    sched.step(1)
    fresh = mlp(seed=5)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    fresh_sched = DynamicRankScheduler(fresh, fresh_opt, 1, 3)
    load_training_state(training_state(model, opt, sched), fresh, fresh_opt, fresh_sched)
    assert (fresh_sched.deflate_init, fresh_sched.epochs, fresh_sched.optimizer_state, fresh_sched.deflate_rank) \
        == ("svd", 5, "carry", 2)
    dense = {i: fresh[i].weight.detach().double().clone() for i in (0, 2)}
    assert fresh_sched.step(3) == [("0", "full", "adapter"), ("2", "full", "adapter")]
    for i, W in dense.items():
        layer = fresh[i]
        assert layer.rank == 2
        U, S, Vh = torch.linalg.svd(W)
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        delta = layer.scale * layer.A.detach().double() @ layer.B.detach().double().t()
        assert rel_err(delta, best) < 1e-5                   # top singular pairs, not zero-initialized factors
        assert rel_err(layer.weight.double() + delta, W) < 1e-6
    fresh_sched.step(4)
    with pytest.raises(ValueError, match=re.escape("epoch must be in [0, 5), got 5")):
        fresh_sched.step(5)


# -- failed calls change nothing -------------------------------------------------------------------
def _everything(model, opt, sched):
    """What a failed call must leave as it was: forms and ranks, parameter objects and values, the
    optimizer's groups (parameter objects in order, hyperparameters) and state, the scheduler's state."""
    return {"forms": {n: (m.form, m.rank) for n, m in sched.layers},
            "params": [(n, p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
            "groups": [(list(g["params"]), {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups],
            "state": [(p, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()})
                      for p, s in opt.state.items()],
            "scheduler": sched.state_dict()}


def _assert_unchanged(before, model, opt, sched):
    now = _everything(model, opt, sched)
    assert now["forms"] == before["forms"]
    assert [(n, id(p), g) for n, p, _, g in now["params"]] == [(n, id(p), g) for n, p, _, g in before["params"]]
    for (name, _, value, _), (_, _, old, _) in zip(now["params"], before["params"]):
        torch.testing.assert_close(value, old, rtol=0, atol=0, equal_nan=True, msg=name)
    assert [([id(p) for p in ps], h) for ps, h in now["groups"]] == [([id(p) for p in ps], h)
                                                                      for ps, h in before["groups"]]
    assert [id(p) for p, _ in now["state"]] == [id(p) for p, _ in before["state"]]
    for (_, s), (_, old) in zip(now["state"], before["state"]):
        _assert_bitwise_equal(s, old)
    assert now["scheduler"] == before["scheduler"]


def _trained(epochs, width=24, opt_factory=None, **kwargs):
    """An mlp trained through ``epochs`` epochs of a 1/2 (or given) schedule, the same each call."""
    model = mlp(width=width)
    opt = (opt_factory or (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)))(model.parameters())
    sched = DynamicRankScheduler(model, opt, kwargs.pop("inflate", 1), kwargs.pop("deflate", 2), **kwargs)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
    for epoch in range(epochs):
        sched.step(epoch)
        train_steps(model, opt, x, y, steps=2)
    return model, opt, sched, (x, y)


def _assert_trains_like(model, opt, sched, reference, epoch):
    """One more epoch on both runs: every parameter and the optimizer state stay bitwise equal."""
    ref_model, ref_opt, ref_sched, (x, y) = reference
    changes = [torch.manual_seed(7) and s.step(epoch) for s in (sched, ref_sched)]   # fresh factors alike
    assert changes[0] == changes[1]
    assert train_steps(model, opt, x, y, steps=2) == train_steps(ref_model, ref_opt, x, y, steps=2)
    _assert_bitwise_equal(model.state_dict(), ref_model.state_dict())
    _assert_bitwise_equal(opt.state_dict(), ref_opt.state_dict())


def _bad_state(mutate):
    state = _trained(3)[2].state_dict()          # both layers in adapter form, rank 6 and 6
    state["ranks"], state["forms"] = dict(state["ranks"]), dict(state["forms"])
    mutate(state)
    return state


@pytest.mark.parametrize("decomposition", ["tucker", "tkd-cpd"])
def test_load_training_state_with_tuple_ranks(decomposition):
    # Tucker-like convs have tuple ranks; a checkpoint of them (ranks as tuples, or as the lists
    # a JSON round trip gives) loads into a fresh model at every form.
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                              nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
        convert_model(model, rank_ratio=0.5, decomposition=decomposition)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, DynamicRankScheduler(model, opt, 1, 2)
    x, y = torch.randn(4, 4, 6, 6), torch.randint(0, 3, (4,))
    model, opt, sched = build()
    for epoch in range(3):
        sched.step(epoch)
        train_steps(model, opt, x, y, steps=1)
        ckpt = training_state(model, opt, sched)
        ckpt["scheduler"]["ranks"] = {n: list(r) for n, r in ckpt["scheduler"]["ranks"].items()}
        fresh, fresh_opt, fresh_sched = build()
        load_training_state(ckpt, fresh, fresh_opt, fresh_sched)
        assert fresh_sched.forms() == sched.forms()
        assert [fresh[i].rank for i in (0, 2)] == [model[i].rank for i in (0, 2)]
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("mutate, error, message", [
    (lambda s: s["ranks"].update({"2": 0}), ValueError, r"ranks\['2'\] is not a valid rank of layer '2': rank must "
                                                        r"be in \[1, 24\], got 0"),
    (lambda s: s["ranks"].update({"2": 1000}), ValueError, r"ranks\['2'\].*must be in \[1, 24\], got 1000"),
    (lambda s: s["ranks"].update({"2": 2.5}), TypeError, r"ranks\['2'\].*rank must be an int, got float \(2\.5\)"),
    (lambda s: s["ranks"].pop("2"), ValueError, r"manages other layers: only in checkpoint \[\], only in this "
                                                r"model \['2'\] \(in ranks\)"),
    (lambda s: s["forms"].update({"2": "dense"}), ValueError,
     r"forms\['2'\] must be one of lowrank, full, adapter, got 'dense'"),
    (lambda s: s.update(inflate_epoch="x"), TypeError, r"inflate_epoch must be an int or None, got str \('x'\)"),
    (lambda s: s.update(unit="bogus"), ValueError, "unit must be one of epoch, step, got 'bogus'"),
    (lambda s: s.update(last_epoch=-5), ValueError, "last_epoch must be >= 0, got -5"),
    (lambda s: s.update(epochs=2), ValueError, r"last_epoch must be in \[0, epochs=2\), got 2"),
    (lambda s: s.update(deflate_epoch=1), ValueError, "deflate_epoch must be greater than inflate_epoch"),
    (lambda s: s.update(deflate_init="ones"), ValueError, "deflate_init must be one of zeros, random, svd"),
    (lambda s: s.update(optimizer_state=None), ValueError, "optimizer_state must be one of reset, carry"),
    (lambda s: s.update(deflate_rank={"typo": 3}), ValueError,
     r"deflate_rank names unknown layers \['typo'\]; the layers are \['0', '2'\]"),
    (lambda s: s.update(deflate_rank=0), ValueError, r"deflate_rank for layer '0': rank must be in \[1, 12\], got 0"),
    (lambda s: s.update(extra=1), ValueError, r"not a DynamicRankScheduler state dict: unknown keys \['extra'\]"),
    (lambda s: s.pop("forms"), ValueError, "not a DynamicRankScheduler state dict: missing forms"),
    (lambda s: s.update(ranks=[6, 6]), TypeError, "ranks must be a dict layer name → value, got list"),
    (lambda s: s["alphas"].update({"2": 8.0}), ValueError, r"layer '2' has alpha None but the checkpoint has 8\.0"),
    (lambda s: s["alphas"].update({"2": "8"}), TypeError, r"alphas\['2'\] must be a number or None, got str"),
    (lambda s: s["alphas"].update({"2": True}), TypeError,
     r"alphas\['2'\] must be a number or None, got bool \(True\)"),
    (lambda s: s["alphas"].pop("2"), ValueError, r"only in this model \['2'\] \(in alphas\)"),
    (lambda s: s["shapes"].update({"2": [24, 25]}), ValueError,
     r"layer '2' has a weight of shape \(24, 24\) but the checkpoint's is \(24, 25\)"),
    (lambda s: s["shapes"].update({"2": "24x24"}), TypeError, r"shapes\['2'\] must be a list of ints"),
    (lambda s: s.update(shapes=None), TypeError, "shapes must be a dict layer name → value, got NoneType"),
], ids=["rank-0", "rank-1000", "rank-float", "rank-missing", "form", "inflate-str", "unit", "last-negative",
        "last-past-epochs", "D<=I", "deflate-init", "optimizer-state", "deflate-rank-typo", "deflate-rank-0",
        "unknown-key", "missing-key", "ranks-list", "alpha", "alpha-str", "alpha-bool", "alpha-missing", "shape", "shape-str",
        "shapes-none"])
def test_load_state_dict_checks_everything_before_changing_anything(mutate, error, message):
    state = _bad_state(mutate)
    model, opt, sched, _ = _trained(1)                         # lowrank, trained one epoch
    before = _everything(model, opt, sched)
    with pytest.raises(error, match=message):
        sched.load_state_dict(state)
    _assert_unchanged(before, model, opt, sched)
    _assert_trains_like(model, opt, sched, _trained(1), 1)     # as if the call had never been made


def test_load_state_dict_rejects_non_dicts_and_unreachable_ranks():
    model, opt, sched, _ = _trained(1)
    before = _everything(model, opt, sched)
    with pytest.raises(TypeError, match="state_dict must be a dict from DynamicRankScheduler.state_dict\\(\\), "
                                        "got NoneType"):
        sched.load_state_dict(None)
    _assert_unchanged(before, model, opt, sched)
    adapter = _trained(3)[2].state_dict()
    model, opt, sched, _ = _trained(3, deflate_rank=2)          # adapters of rank 2: rank 3 is not reachable
    before = _everything(model, opt, sched)
    with pytest.raises(ValueError, match="layer '0' has rank 2 but the checkpoint has 3"):
        sched.load_state_dict(adapter)
    _assert_unchanged(before, model, opt, sched)


def test_a_load_refused_for_a_reparametrized_layer_changes_no_setting():
    """A saved state of another schedule whose form a reparametrized layer cannot switch to: the RuntimeError
    came after the saved settings (inflate/deflate epochs, epochs, deflate_rank) had replaced the scheduler's."""
    from torch.nn.utils import parametrize
    source = mlp()
    source_sched = DynamicRankScheduler(source, torch.optim.SGD(source.parameters(), lr=0.1), 1, 3, epochs=10,
                                        deflate_rank=2)
    source_sched.step(1)
    saved = source_sched.state_dict()                                                          # full form
    model, opt, sched, _ = _trained(1, inflate=2, deflate=4)                                    # lowrank form

    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    parametrize.register_parametrization(model[0], "A", Double())
    before = _everything(model, opt, sched)
    with pytest.raises(RuntimeError, match=r"^layer '0' \(lowrank form, rank 3\) cannot change form or rank: "
                                           r"its A is reparametrized"):
        sched.load_state_dict(saved)
    assert (sched.inflate_epoch, sched.deflate_epoch, sched.epochs, sched.deflate_rank) == (2, 4, None, None)
    _assert_unchanged(before, model, opt, sched)


@pytest.mark.parametrize("init", ["svd", "zeros"])
def test_step_checks_every_layer_before_switching_any(init):
    model, opt, sched, _ = _trained(2, inflate=0, deflate=3, deflate_init=init)   # full, trained
    with torch.no_grad():
        saved = model[2].weight[1, 2].item()
        model[2].weight[1, 2] = float("nan")
    before = _everything(model, opt, sched)
    with pytest.raises(ValueError, match="layer '2' has non-finite values in weight; not switching any layer "
                                         "at epoch 3"):
        sched.step(3)
    _assert_unchanged(before, model, opt, sched)
    with torch.no_grad():
        model[2].weight[1, 2] = saved
    _assert_trains_like(model, opt, sched, _trained(2, inflate=0, deflate=3, deflate_init=init), 3)


def test_deflate_rank_names_only_known_layers():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"deflate_rank names unknown layers \['2x', 'typo'\]; the layers are "
                                         r"\['0', '2'\]"):
        DynamicRankScheduler(model, opt, 0, 1, deflate_rank={"typo": 3, "2x": 2, "0": 2})
    spec = {"0": 2}
    sched = DynamicRankScheduler(model, opt, 0, 1, deflate_rank=spec)
    spec["0"] = 100                                              # a later edit of the caller's dict is not seen
    sched.step(1)
    assert [model[i].rank for i in (0, 2)] == [2, 6]


def test_sync_ranks_and_process_group_are_checked():
    import torch.distributed as dist
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"sync_ranks must be True, False or None, got str \('no'\)"):
        DynamicRankScheduler(model, opt, 0, 1, sync_ranks="no")
    with pytest.raises(TypeError, match=r"process_group must be a torch\.distributed\.ProcessGroup or None, "
                                        r"got str \('x'\)"):
        DynamicRankScheduler(model, opt, 0, 1, process_group="x")
    assert DynamicRankScheduler(model, opt, 0, 1, sync_ranks=False).sync_ranks is False
    for flag, expected in ((np.bool_(True), True), (np.bool_(False), False), (1, True), (0, False)):
        assert DynamicRankScheduler(model, opt, 0, 1, sync_ranks=flag).sync_ranks is expected
    with pytest.raises(TypeError, match=r"sync_ranks must be True, False or None, got int \(2\)"):
        DynamicRankScheduler(model, opt, 0, 1, sync_ranks=2)
    if not dist.is_available():
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        sched = DynamicRankScheduler(model, opt, 0, 1, sync_ranks=True, process_group=group)
        assert sched.process_group is group and sched.step(1)
    finally:
        dist.destroy_process_group()


def test_remove_callback_names_what_was_not_added():
    model = mlp()
    sched = DynamicRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 0, 1)
    with pytest.raises(ValueError, match="was not added to this scheduler"):
        sched.remove_callback(print)


def test_remove_model_copy_stops_switching_the_copy_and_lets_it_go():
    """add_model_copy could not be undone: a copy the user dropped (a fresh EMA per phase) stayed alive,
    one model copy more per replacement, and was checked and switched at every step.  A removed copy is
    neither checked nor switched, keeps its forms and is freed with the scheduler alive; the copies left
    switch as before, and the scheduler's state dict is unchanged."""
    import gc
    import weakref
    from torch.optim.swa_utils import AveragedModel
    model = mlp()
    sched = DynamicRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, 2)
    state = sched.state_dict()
    kept, dropped = kept_and_removed_copy(sched, model)
    dropped[2].inflate()                           # checked, it would stop the step: it is not
    assert sched.step(1) == [("0", "lowrank", "full"), ("2", "lowrank", "full")]
    assert [kept.module[i].form for i in (0, 2)] == ["full", "full"]
    assert [dropped[i].form for i in (0, 2)] == ["lowrank", "full"]
    gone = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert gone() is None
    again = sched.add_model_copy(copy.deepcopy(model))          # a copy may be added again after a removal
    sched.step(2)
    assert [m.module[0].form if isinstance(m, AveragedModel) else m[0].form for m in (kept, again)] == \
        ["adapter", "adapter"]
    sched.remove_model_copy(kept)
    sched.remove_model_copy(again)
    assert sched.state_dict() == {**state, "last_epoch": 2, "forms": {"0": "adapter", "2": "adapter"}}


# -- load_training_state: all or nothing --------------------------------------------------------------
def _checkpoint(epochs, **kwargs):
    model, opt, sched, _ = _trained(epochs, **kwargs)
    return training_state(model, opt, sched, epoch=epochs - 1)


@pytest.mark.parametrize("source, target, error, message", [
    # another width at the same ranks, saved with the layers' shapes: refused before anything changes
    (dict(epochs=2, width=26), dict(epochs=1), ValueError,
     r"layer '0' has a weight of shape \(24, 12\) but the checkpoint's is \(26, 12\): the checkpoint is of a "
     r"model with other layer sizes"),
    # the same from a state saved without shapes: the scheduler has inflated every layer when the model's values
    # do not fit
    (dict(epochs=2, width=26, older=True), dict(epochs=1), RuntimeError, r"weight must have shape \(24, 24\)"),
    # adapter → full writes into the frozen weight in place before the model's values fail to load
    (dict(epochs=2, width=26, older=True), dict(epochs=3), RuntimeError, r"weight must have shape \(24, 24\)"),
    # another width at another rank, without shapes: a full-form layer's rank differs, refused before anything
    # changes, and the advice allows for the other sizes
    (dict(epochs=2, width=20, older=True), dict(epochs=1), ValueError,
     r"layer '2' has rank 6 but the checkpoint has 5 \(the rank its next deflate takes\); convert the model with "
     r"the same rank_ratio, or the model has other layer sizes than the saved run's"),
    # Adam given an SGD checkpoint: torch fails in optimizer.load_state_dict after model and scheduler loaded
    (dict(epochs=2), dict(epochs=1, opt_factory=lambda p: torch.optim.Adam(p, lr=1e-2)), ValueError,
     r"checkpoint\['optimizer'\] does not fit this optimizer \(KeyError: 'step'\); nothing was loaded"),
    # a bad scheduler part: checked before anything else
    (dict(epochs=2, deflate_rank=30), dict(epochs=1), ValueError, r"deflate_rank for layer '0'"),
], ids=["width", "width-lowrank", "width-adapter", "rank", "adam-given-sgd", "bad-scheduler"])
def test_failed_load_training_state_changes_nothing(source, target, error, message):
    source = dict(source)
    older = source.pop("older", False)
    if "deflate_rank" in source:
        ckpt = _checkpoint(2)
        ckpt["scheduler"]["deflate_rank"] = source["deflate_rank"]
    else:
        ckpt = _checkpoint(**source)
    if older:
        del ckpt["scheduler"]["shapes"], ckpt["scheduler"]["alphas"]        # a state saved without them
    model, opt, sched, _ = _trained(**target)
    before = _everything(model, opt, sched)
    with pytest.raises(error, match=message):
        load_training_state(ckpt, model, opt, sched)
    _assert_unchanged(before, model, opt, sched)
    _assert_trains_like(model, opt, sched, _trained(**target), target["epochs"])


def _swap_weight_and_bias_state(ckpt):
    """The optimizer part as a version that listed a full-form layer's bias before its weight saved it."""
    state = ckpt["optimizer"]["state"]
    shapes = {i: s["momentum_buffer"].shape for i, s in state.items()}
    w = next(i for i, shape in shapes.items() if len(shape) == 2)
    b = next(i for i, shape in shapes.items() if len(shape) == 1 and shape[0] == shapes[w][0])
    state[w], state[b] = state[b], state[w]


def _drop_a_param(ckpt):
    ckpt["optimizer"]["param_groups"][0]["params"].pop()


@pytest.mark.parametrize("mutate, message", [
    # Optimizer.load_state_dict matches state to parameters by position and checks no shape: the first
    # step failed ("output with shape [24] doesn't match the broadcast shape [24, 24]")
    (_swap_weight_and_bias_state, r"checkpoint\['optimizer'\] does not fit this optimizer \(the state "
                                  r"'momentum_buffer' of param_groups\[0\]\['params'\]\[\d+\] has shape "
                                  r"\(\d+,( \d+)?\), the parameter \(\d+,( \d+)?\)\); build the optimizer"),
    # torch's own message, without saying which part of the checkpoint or that nothing was loaded
    (_drop_a_param, r"checkpoint\['optimizer'\] does not fit this optimizer \(loaded state dict contains a "
                    r"parameter group that doesn't match the size of optimizer's group\); .*nothing was loaded"),
], ids=["state-of-another-shape", "group-size"])
def test_an_optimizer_part_of_other_parameters_is_refused_and_nothing_changes(mutate, message):
    ckpt = _checkpoint(2)                       # layer 0 full (inflated at 1), layer 2 lowrank
    mutate(ckpt)
    model, opt, sched, _ = _trained(1)
    before = _everything(model, opt, sched)
    with pytest.raises(ValueError, match=message):
        load_training_state(ckpt, model, opt, sched)
    _assert_unchanged(before, model, opt, sched)
    _assert_trains_like(model, opt, sched, _trained(1), 1)


def test_load_training_state_needs_a_checkpoint_and_matching_objects():
    model, opt, sched, _ = _trained(1)
    before = _everything(model, opt, sched)
    ckpt = _checkpoint(2)
    with pytest.raises(TypeError, match=r"checkpoint must be a dict from training_state\(\.\.\.\), got str"):
        load_training_state("ckpt", model, opt, sched)
    with pytest.raises(ValueError, match="checkpoint must have the keys model, optimizer and scheduler .*"
                                         "missing optimizer, scheduler"):
        load_training_state({"model": {}}, model, opt, sched)
    with pytest.raises(TypeError, match=r"checkpoint\['scheduler'\] must be a state dict, got NoneType"):
        load_training_state(dict(ckpt, scheduler=None), model, opt, sched)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        training_state("m", opt, sched)
    with pytest.raises(TypeError, match="scheduler must be a DynamicRankScheduler or IncrementalRankScheduler, "
                                        "got dict"):
        load_training_state(ckpt, model, opt, ckpt["scheduler"])
    other, other_opt, other_sched, _ = _trained(1)
    with pytest.raises(ValueError, match="scheduler was built on another model than the one given"):
        load_training_state(ckpt, other, opt, sched)
    with pytest.raises(ValueError, match="scheduler was built with another optimizer than the one given"):
        training_state(model, other_opt, sched)
    _assert_unchanged(before, model, opt, sched)
    assert load_training_state(ckpt, model, opt, sched) == {"epoch": 1}          # a good load still works
    _assert_trains_like(model, opt, sched, _trained(2), 2)


# -- tied parameters ------------------------------------------------------------------------------
def test_a_layer_tied_to_another_module_is_refused():
    """A head built as a dynrank layer and tied to the embedding (nanoGPT's wte.weight = lm_head.weight):
    the deflate froze the embedding table and an SVD deflate rewrote it, without a word."""
    from dynrank.inrank import IncrementalRankScheduler

    class TiedLM(nn.Module):
        def __init__(self, form):
            super().__init__()
            self.wte = nn.Embedding(11, 6)
            self.lm_head = FusedLowRankLinear(6, 11, rank=2, bias=False, form=form)
            if form == "full":
                self.wte.weight = self.lm_head.weight
            else:
                self.side = FusedLowRankLinear(6, 11, rank=2, bias=False)
                self.side.A = self.lm_head.A

    model = TiedLM("full")
    table = model.wte.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"layer 'lm_head' shares its weight with wte\.weight \(tied weights\): a "
                                         r"DynamicRankScheduler switching it would untie them.*untie them first"):
        DynamicRankScheduler(model, opt, inflate_epoch=0, deflate_epoch=1, deflate_init="svd")
    assert model.wte.weight.requires_grad and torch.equal(model.wte.weight, table)
    model = TiedLM("lowrank")
    with pytest.raises(ValueError, match=r"layer 'lm_head' shares its A with side\.A \(tied weights\): an? "
                                         r"IncrementalRankScheduler"):
        IncrementalRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), init_rank=1)


def test_a_full_phase_checkpoint_into_a_model_converted_at_another_rank_is_refused():
    """A full-form layer's rank is the one its next deflate takes.  A full-phase checkpoint loaded into a model
    converted at another rank was accepted, and the resumed run deflated to rank 6 where the uninterrupted
    one deflated to rank 3.  Refused as in the other forms (nothing changes); the same conversion resumes."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))

    def run(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return opt, DynamicRankScheduler(model, opt, 1, 3)

    def converted(ratio):
        model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
        convert_model(model, rank_ratio=ratio)
        return model
    model = converted(0.25)                             # ranks 3 and 6
    opt, sched = run(model)
    for epoch in range(3):
        sched.step(epoch)
        train_steps(model, opt, x, y, steps=1)
    state = training_state(model, opt, sched)
    assert sched.state_dict()["forms"]["0"] == "full"
    other = converted(0.5)                              # ranks 6 and 12
    other_opt, other_sched = run(other)
    with pytest.raises(ValueError, match=r"layer '0' has rank 6 but the checkpoint has 3 \(the rank its next "
                                         r"deflate takes\); convert the model with the same rank_ratio"):
        load_training_state(state, other, other_opt, other_sched)
    assert other[0].form == "lowrank" and other[0].rank == 6
    same = converted(0.25)
    same_opt, same_sched = run(same)
    load_training_state(state, same, same_opt, same_sched)
    sched.step(3), same_sched.step(3)
    assert [same[i].rank for i in (0, 2)] == [model[i].rank for i in (0, 2)] == [3, 6]


def test_a_callback_that_raises_does_not_keep_the_later_ones_from_the_switch():
    """The switch is done when the callbacks run, and stepping again makes none: a later callback skipped
    after one raised never got the event.  Every one gets it; the first error is raised after them."""
    model = mlp()
    sched = DynamicRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, None)
    seen = []

    def failing(event):
        seen.append("failing")
        raise RuntimeError("callback failed")
    sched.add_callback(lambda event: seen.append("first"))
    sched.add_callback(failing)
    sched.add_callback(lambda event: seen.append("last"))
    sched.step(0)
    with pytest.raises(RuntimeError, match="callback failed"):
        sched.step(1)
    assert seen == ["first", "failing", "last"] and model[0].form == "full" and sched.last_epoch == 1


# -- which parameters the optimizer holds -----------------------------------------------------------
@pytest.mark.parametrize("switch", ["step", "model load"])
def test_the_inflated_weight_joins_the_trained_factors_group(switch):
    """B frozen by hand and kept in a group of its own (lr 0.5), A trained in another (lr 0.01): the W an
    inflate (or a model load into full form) brings trains in A's group, not in the frozen B's."""
    model = mlp()
    layer = model[0]
    layer.B.requires_grad_(False)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    opt = torch.optim.SGD([{"params": frozen, "lr": 0.5}, {"params": trainable(model), "lr": 0.01}], lr=0.01)
    sched = DynamicRankScheduler(model, opt, 1, 2)
    if switch == "step":
        sched.step(1)
    else:
        full = mlp(seed=1)
        for i in (0, 2):
            full[i].inflate()
        model.load_state_dict(full.state_dict())
    assert layer.form == "full" and layer.weight.requires_grad
    assert [[p is layer.weight for p in g["params"]].count(True) for g in opt.param_groups] == [0, 1]
    assert same_set(held(opt), trainable(model))             # the frozen B left with the lowrank form


def _adapter_start(seed=0):
    """A model converted to adapter form, layer "2" then frozen whole, with AdamW given model.parameters()
    (which holds both W_f and the frozen layer), on the fine-tuning preset: full from 0, adapter from 2."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    convert_model(model, rank_ratio=0.25, form="adapter")
    model[2].requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, DynamicRankScheduler(model, opt, None, 2)


def _adapter_start_epochs(model, opt, sched, epochs, x, y):
    for epoch in epochs:
        sched.step(epoch)
        train_steps(model, opt, x, y, steps=2)


@pytest.mark.filterwarnings("ignore:layers '2' switched while frozen")
@pytest.mark.parametrize("order", ["load_training_state", ("model", "optimizer", "scheduler"),
                                   ("model", "scheduler", "optimizer"), ("scheduler", "model", "optimizer")])
@pytest.mark.parametrize("checkpoint_after", [0, 1, 2, 3])
def test_a_run_converted_to_adapter_form_resumes_bitwise(order, checkpoint_after):
    """Started in adapter form: epoch 0 inflates, epoch 2 deflates.  A checkpoint from any epoch, loaded
    into a freshly built model in adapter form in any order (Accelerate: model, optimizer, scheduler), goes
    on exactly as the uninterrupted run; the deflate had taken W_f out of the run's optimizer while the
    fresh one held it, and its optimizer.load_state_dict failed on the group size."""
    epochs = 5
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    model, opt, sched = _adapter_start()
    _adapter_start_epochs(model, opt, sched, range(checkpoint_after + 1), x, y)
    saved = dict(training_state(model, opt, sched), rng=torch.get_rng_state())
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in saved.items()}
    _adapter_start_epochs(model, opt, sched, range(checkpoint_after + 1, epochs), x, y)
    assert sched.forms() == {"0": "adapter", "2": "adapter"}
    assert not any(p is model[0].weight for p in held(opt))

    fresh, fresh_opt, fresh_sched = _adapter_start(seed=3)
    if order == "load_training_state":
        load_training_state(saved, fresh, fresh_opt, fresh_sched)
    else:
        loads = {"model": fresh.load_state_dict, "optimizer": fresh_opt.load_state_dict,
                 "scheduler": fresh_sched.load_state_dict}
        for part in order:
            loads[part](saved[part])
    torch.set_rng_state(saved["rng"])
    _adapter_start_epochs(fresh, fresh_opt, fresh_sched, range(checkpoint_after + 1, epochs), x, y)
    _assert_bitwise_equal(fresh.state_dict(), model.state_dict())
    _assert_bitwise_equal(fresh_opt.state_dict(), opt.state_dict())
    assert [[n for n, p in fresh.named_parameters() if any(p is q for q in g["params"])]
            for g in fresh_opt.param_groups] == [[n for n, p in model.named_parameters()
                                                  if any(p is q for q in g["params"])] for g in opt.param_groups]


def test_an_optimizer_built_before_convert_model_is_refused():
    """It holds the replaced nn.Linear's tensors and none of the layer's; it was accepted, and the layer
    never trained in any form."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    convert_model(model, rank_ratio=0.5)
    with pytest.raises(ValueError, match=r"the optimizer holds no trainable parameter of the dynrank layers "
                                         r"\('0'\), so they would never train \(it holds 2 tensors that are not "
                                         r"in the model.*build the optimizer after convert_model\(model\)"):
        DynamicRankScheduler(model, stale, 1, 2)
    # Still accepted: one layer left out (with a warning), layers frozen whole, and layers whose biases alone
    # train.
    model = mlp()
    with pytest.warns(UserWarning, match="layer '0' is trainable but not in the optimizer"):
        DynamicRankScheduler(model, torch.optim.SGD(model[2].parameters(), lr=0.1), 1, 2)
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    DynamicRankScheduler(model, torch.optim.SGD(model[4].parameters(), lr=0.1), 1, 2)
    model[0].bias.requires_grad_(True)
    DynamicRankScheduler(model, torch.optim.SGD([model[0].bias], lr=0.1), 1, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_load_that_deflates_a_cuda_layer_leaves_the_cuda_rng_alone():
    """The load's deflate draws its fresh factors from the CUDA generator of the layer's device."""
    device = torch.device("cuda", torch.cuda.current_device())
    model = mlp().to(device)
    sched = DynamicRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, 2)
    state = copy.deepcopy(sched.state_dict())
    state.update(last_epoch=2, forms={"0": "adapter", "2": "adapter"})
    before = torch.cuda.get_rng_state(device)
    probe = mlp().to(device)
    probe[0].inflate().deflate()
    assert not torch.equal(torch.cuda.get_rng_state(device), before)      # a deflate does draw on CUDA
    before = torch.cuda.get_rng_state(device)
    cpu_before = torch.get_rng_state()
    sched.load_state_dict(state)
    assert sched.forms() == {"0": "adapter", "2": "adapter"}
    assert torch.equal(torch.cuda.get_rng_state(device), before)
    assert torch.equal(torch.get_rng_state(), cpu_before)


def test_a_frozen_adapter_layers_factors_stay_held_and_train_once_unfrozen():
    """Built on a model converted to adapter form with one layer frozen whole, the scheduler takes only
    W_f out of the optimizer (as a deflate does), without a word: the frozen factors stay held, as a switch
    keeps a frozen layer's new ones, so unfreezing them later trains them (they used to leave with W_f,
    and unfreezing trained nothing)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    convert_model(model, rank_ratio=0.5, form="adapter", keep_last=False)
    with torch.no_grad():
        model[2].A.normal_()                    # the adapter's output depends on B too
    model[2].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DynamicRankScheduler(model, opt, None, 2)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert id(model[2].weight) not in held
    assert all(id(p) in held for p in (model[2].A, model[2].B, model[0].A, model[0].B))
    # Unfrozen, the factors train as in an optimizer built on them: one SGD step, by hand in float64.
    model[2].A.requires_grad_(True)
    model[2].B.requires_grad_(True)
    x = torch.randn(5, 12, dtype=torch.float64)
    A0, B0 = model[2].A.detach().clone(), model[2].B.detach().clone()
    model(x).square().sum().backward()
    gA, gB = model[2].A.grad.clone(), model[2].B.grad.clone()
    opt.step()
    for param, before, grad in ((model[2].A, A0, gA), (model[2].B, B0, gB)):
        torch.testing.assert_close(param.detach(), before - 0.1 * grad, rtol=1e-15, atol=1e-15)
    assert gA.abs().max() > 0 and gB.abs().max() > 0


# -- callbacks on a resume -------------------------------------------------------------------------
def _clipped_run(seed=0):
    """float64 MLP whose trainable parameters clip their gradients per tensor: hooks registered at build and,
    as the class docstring says, on the new parameters in a callback; returns the model, optimizer,
    scheduler and the events the scheduler gave."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    convert_model(model, rank_ratio=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = DynamicRankScheduler(model, opt, 1, 3)
    events = []

    def clip(event=None):
        if event is not None:
            events.append(event)
        for p in model.parameters():
            if p.requires_grad and not getattr(p, "clipped", False):
                p.register_hook(lambda grad: grad.clamp(-1e-3, 1e-3))
                p.clipped = True
    clip()
    sched.add_callback(clip)
    return model, opt, sched, events


def _clipped_epoch(model, opt, epoch):
    generator = torch.Generator().manual_seed(epoch)
    x = torch.randn(32, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=generator)
    train_steps(model, opt, x, y, steps=1)


@pytest.mark.parametrize("load", ["load_training_state", "scheduler first"])
def test_a_resume_calls_the_callbacks_so_per_parameter_hooks_come_back(load):
    """The load brings layer "0" to full form with a new weight: no callback ran, so the clipping hook the
    callback registers on it was lost and the resumed run drifted from the uninterrupted one (0.02)."""
    model, opt, sched, _ = _clipped_run()
    for epoch in range(4):
        sched.step(epoch)
        _clipped_epoch(model, opt, epoch)
        if epoch == 1:                                  # in full form, right after the inflate
            saved = copy.deepcopy(training_state(model, opt, sched, rng=torch.get_rng_state()))
    fresh, fresh_opt, fresh_sched, events = _clipped_run(seed=1)
    if load == "load_training_state":
        load_training_state(saved, fresh, fresh_opt, fresh_sched)
    else:
        fresh_sched.load_state_dict(saved["scheduler"])
        fresh.load_state_dict(saved["model"])
        fresh_opt.load_state_dict(saved["optimizer"])
    assert events == [{"epoch": 1, "step": None, "changes": [("0", "lowrank", "full")], "loaded": True}]
    assert fresh[0].weight.clipped
    torch.set_rng_state(saved["rng"])                   # the deflate draws its adapters
    for epoch in range(2, 4):
        fresh_sched.step(epoch)
        _clipped_epoch(fresh, fresh_opt, epoch)
    _assert_bitwise_equal(fresh.state_dict(), model.state_dict())
    assert [e.get("loaded", False) for e in events] == [True, False]          # the deflate at 3: a switch


def test_a_load_that_changes_nothing_calls_no_callback_and_a_failing_one_leaves_the_load_done():
    model, opt, sched, _ = _clipped_run()
    sched.step(1)
    state = sched.state_dict()
    fresh, fresh_opt, fresh_sched, events = _clipped_run(seed=1)
    fresh_sched.load_state_dict(dict(state, forms={"0": "lowrank"}, last_epoch=0))
    assert events == []
    seen = []

    def failing(event):
        seen.append("failing")
        raise RuntimeError("callback failed")
    fresh_sched.add_callback(failing)
    fresh_sched.add_callback(lambda event: seen.append(event["loaded"]))
    with pytest.raises(RuntimeError, match="callback failed"):
        fresh_sched.load_state_dict(state)
    assert seen == ["failing", True] and len(events) == 1
    assert fresh[0].form == "full" and fresh_sched.last_epoch == 1
    assert same_set(held(fresh_opt), trainable(fresh))


def test_load_training_state_calls_back_once_everything_has_loaded():
    """The callbacks ran inside the scheduler's part of load_training_state: they saw the weights before the
    model's values loaded, and a KeyError of a callback's own was reported as "checkpoint['scheduler'] does
    not fit" and the whole load undone.  They now run once the checkpoint has loaded."""
    model, opt, sched, _ = _clipped_run()
    sched.step(1)
    ckpt = copy.deepcopy(training_state(model, opt, sched))
    fresh, fresh_opt, fresh_sched, events = _clipped_run(seed=1)
    seen = []

    def reads_weights(event):
        seen.append(torch.equal(fresh[0].weight, ckpt["model"]["0.weight"]))
        raise KeyError("a key of the callback's own")
    fresh_sched.add_callback(reads_weights)
    with pytest.raises(KeyError, match="a key of the callback's own"):
        load_training_state(ckpt, fresh, fresh_opt, fresh_sched)
    assert seen == [True] and len(events) == 1 and events[0]["loaded"]
    assert fresh[0].form == "full" and fresh_sched.last_epoch == 1                 # the load stays done
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in fresh.state_dict().items())


# -- plain values in the state dict ----------------------------------------------------------------
@pytest.mark.parametrize("deflate_rank, plain", [(np.int64(2), 2), (np.float64(0.5), 0.5),
                                                 ({"0": np.int64(3), "2": np.float32(0.5)}, {"0": 3, "2": 0.5})])
def test_a_numpy_deflate_rank_is_saved_as_plain_python(deflate_rank, plain):
    """It was kept as numpy: torch.load (weights_only, its default) refused the checkpoint, json.dumps (the
    Trainer's trainer_state.json) raised."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, 1, 2, deflate_rank=deflate_rank)
    sched.step(2)
    state = sched.state_dict()
    assert state["deflate_rank"] == plain
    values = plain.values() if isinstance(plain, dict) else [plain]
    saved = state["deflate_rank"].values() if isinstance(plain, dict) else [state["deflate_rank"]]
    assert [type(v) for v in saved] == [type(v) for v in values]
    buffer = io.BytesIO()
    torch.save(training_state(model, opt, sched), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["scheduler"] == state and json.loads(json.dumps(state)) == state
    fresh = mlp(seed=1)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    load_training_state(loaded, fresh, fresh_opt, DynamicRankScheduler(fresh, fresh_opt, 1, 2))
    _assert_bitwise_equal(fresh.state_dict(), model.state_dict())


def test_a_saved_state_shares_no_dict_with_the_scheduler():
    """Editing a state dict (a fork trying another rank) leaves the running scheduler as it was."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, 0, 1, deflate_rank={"0": 2})
    saved = copy.deepcopy(sched.state_dict())
    state = sched.state_dict()
    for key in ("deflate_rank", "forms", "ranks", "lowrank_ranks"):
        state[key]["0"] = 5
    assert sched.deflate_rank == {"0": 2} and sched.state_dict() == saved
    sched.step(0)
    sched.step(1)
    assert model[0].rank == 2


# -- one scheduler per layer -----------------------------------------------------------------------
def test_a_second_scheduler_over_the_layers_takes_them_from_the_first():
    """Both stepped, s1 deflated at 4 and s2 inflated again: the layers went full ↔ adapter every epoch,
    each time dropping their optimizer state, without a word."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = DynamicRankScheduler(model, opt, 2, 4)
    first.step(0)
    second = DynamicRankScheduler(model, opt, 1, 6)
    before = _everything(model, opt, first)
    message = r"layer '0' is managed by another DynamicRankScheduler, built over it after this one: a layer can " \
              r"be managed by one scheduler"
    with pytest.raises(ValueError, match=message):
        first.step(1)
    with pytest.raises(ValueError, match=message):
        first.load_state_dict(second.state_dict())
    _assert_unchanged(before, model, opt, first)
    assert second.step(1) == [("0", "lowrank", "full"), ("2", "lowrank", "full")]
    # A part of the model counts too: its scheduler takes layer "2" from the one of the whole model.
    part = DynamicRankScheduler(model[2:], opt, 1, 3)
    with pytest.raises(ValueError, match=message.replace("'0'", "'2'")):
        second.step(2)
    # A scheduler let go of claims nothing: the one left manages the layers again.
    del part, second
    assert first.step(4) == [("0", "full", "adapter"), ("2", "full", "adapter")]
    assert same_set(held(opt), trainable(model))


def test_a_scheduler_built_again_in_place_of_one_still_referenced_works():
    """A resume in the same process, or a notebook cell run again: the new scheduler is built while the
    old one is still referenced, and steps and loads as the only one."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, 1, 3)
    sched.step(1)
    state = sched.state_dict()
    sched = DynamicRankScheduler(model, opt, 1, 3)
    sched.load_state_dict(state)
    assert sched.step(3) == [("0", "full", "adapter"), ("2", "full", "adapter")]
    assert same_set(held(opt), trainable(model))


def test_schedulers_over_disjoint_parts_share_one_optimizer():
    model = mlp()
    model[4] = FusedLowRankLinear.from_dense(model[4], rank=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    front = DynamicRankScheduler(model[:3], opt, 1, 3)
    head = DynamicRankScheduler(model[4:], opt, 2, 4)
    x, y = data()
    expected = {0: ("lowrank", "lowrank"), 1: ("full", "lowrank"), 2: ("full", "full"),
                3: ("adapter", "full"), 4: ("adapter", "adapter")}
    for epoch, (front_form, head_form) in expected.items():
        front.step(epoch)
        head.step(epoch)
        assert [model[i].form for i in (0, 2, 4)] == [front_form, front_form, head_form]
        assert same_set(held(opt), trainable(model))
        train_steps(model, opt, x, y, steps=1)


# -- warnings raised as errors ------------------------------------------------------------------------
def _frozen_first_layer():
    """A switch of a layer the user froze (its bias aside): the frozen-layer warning."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, 1, 2)
    model[0].requires_grad_(False)
    model[0].bias.requires_grad_(True)
    return model, sched, lambda: None, "switched while frozen"


def _fused_sgd_with_dampening():
    """A switch that gives new parameters a zero momentum buffer in fused SGD with dampening: its warning."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5, fused=True)
    sched = DynamicRankScheduler(model, opt, 1, 2)
    x, y = data()
    return model, sched, lambda: (sched.step(0), train_steps(model, opt, x, y, steps=1)), "dampening=0.5"


@pytest.mark.parametrize("setup", [_frozen_first_layer, _fused_sgd_with_dampening], ids=["frozen", "dampened"])
def test_a_warning_raised_as_an_error_comes_after_the_callbacks(setup):
    """Under warnings-as-errors (pytest -W error) step() raised its warning after the layers switched and
    before the callbacks ran; stepping again switches nothing, so no callback ever heard of the switch (a
    tensor hook registered there was lost).  The callbacks run first; the warning follows."""
    model, sched, before, warning = setup()
    before()
    events = []
    sched.add_callback(events.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=warning):
            sched.step(1)
    assert sched.forms() == {"0": "full", "2": "full"} and sched.last_epoch == 1
    assert events == [{"epoch": 1, "step": None, "changes": [("0", "lowrank", "full"), ("2", "lowrank", "full")]}]
    assert sched.step(1) == [] and len(events) == 1


# -- the model's layers are the ones the scheduler was built over --------------------------------------
def test_layers_added_or_swapped_after_construction_are_refused():
    """A dynrank layer put in the model after the scheduler was built never switched (it stayed lowrank through
    the run, without a word), and one swapped out still did.  A step due to switch and a load refuse, naming
    them; nothing changes.  A layer only renamed (moved by the insertion) is not named: it is the same layer."""
    message = r"the model's dynrank layers changed since this DynamicRankScheduler was built \({}\); .*build a new " \
              r"DynamicRankScheduler over the model as it is now"
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, 1, 2)
    sched.step(0)
    state = sched.state_dict()
    model.insert(0, nn.Linear(12, 12))
    convert_model(model, rank_ratio=0.5, include=["0"])
    opt.add_param_group({"params": list(model[0].parameters())})
    assert sched.step(0) == []                     # no switch due: the layers are compared where one is
    for call in (lambda: sched.step(1), lambda: sched.load_state_dict(state)):
        with pytest.raises(ValueError, match=message.format(r"added '0'")):
            call()
    assert {n: m.form for n, m in model.named_modules() if isinstance(m, FusedLowRankLinear)} == \
        {"0": "lowrank", "1": "lowrank", "3": "lowrank"} and sched.last_epoch == 0
    fresh = DynamicRankScheduler(model, opt, 1, 2)                 # the model as it is now
    assert fresh.step(1) == [("0", "lowrank", "full"), ("1", "lowrank", "full"), ("3", "lowrank", "full")]

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, 1, 2)
    old = model[2]
    model[2] = FusedLowRankLinear.from_dense(nn.Linear(24, 24), rank=6)   # swapped for another dynrank layer
    with pytest.raises(ValueError, match=message.format(r"added '2'; removed '2'")):
        sched.step(1)
    assert old.form == model[2].form == model[0].form == "lowrank"
    model[2] = nn.Linear(24, 24)                                           # swapped for a plain one
    with pytest.raises(ValueError, match=message.format(r"removed '2'")):
        sched.step(1)
    assert old.form == model[0].form == "lowrank"


def test_a_layer_wrapped_after_construction_switches_under_its_first_name():
    """A wrapper put around a layer's block after the scheduler was built (activation checkpointing, a
    compiled submodule) renames the layer in the model; it is the same layer, and switches as the
    scheduler's own, under the name it had then (a checkpoint of the run loads into a model built as
    at the start)."""

    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, 1, 2)
    sched.step(0)
    model[2] = Wrapper(model[2])
    assert sched.step(1) == [("0", "lowrank", "full"), ("2", "lowrank", "full")]
    assert model[0].form == model[2].inner.form == "full" and set(sched.state_dict()["forms"]) == {"0", "2"}


def test_a_model_unconverted_still_names_unconvert_model():
    """unconvert_model replaces every layer (the model no longer holds them): the scheduler's own message for
    that comes first, saying to train on without it."""
    from dynrank import unconvert_model
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, 1, 2)
    state = sched.state_dict()
    unconvert_model(model)
    for call in (lambda: sched.step(1), lambda: sched.load_state_dict(state)):
        with pytest.raises(RuntimeError, match=r"layer '0' was replaced by unconvert_model, so this "
                                               r"DynamicRankScheduler manages layers the model no longer holds"):
            call()


# -- alpha and layer sizes in the scheduler's state ------------------------------------------------------
def _alpha_run(alpha, epoch, deflate_epoch=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3)).double()
    convert_model(model, rank_ratio=0.25, alpha=alpha)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = DynamicRankScheduler(model, opt, inflate_epoch=2, deflate_epoch=deflate_epoch)
    for e in range(epoch + 1):
        sched.step(e)
    return model, opt, sched


@pytest.mark.parametrize("epoch, form", [(0, "lowrank"), (4, "adapter")])
def test_a_checkpoint_of_another_alpha_is_refused(epoch, form):
    """The scale alpha / rank multiplies the loaded factors, and it was in neither the layers' state dict nor
    the scheduler's: a checkpoint of a model converted with alpha=16 loaded silently into one converted
    without, which computed another function.  Refused as another rank is; the same alpha resumes exactly,
    and a state saved without alphas (an earlier version's) loads unchecked."""
    model, opt, sched = _alpha_run(16.0, epoch)
    with torch.no_grad():                                            # factors that make the scale matter
        for name, p in model.named_parameters():
            if name.endswith((".A", ".B")):
                p.add_(0.1 * torch.randn_like(p))
    assert sched.forms()["0"] == form and sched.state_dict()["alphas"] == {"0": 16.0, "2": 16.0}
    checkpoint = training_state(model, opt, sched)
    x = torch.randn(8, 12, dtype=torch.float64)
    other = _alpha_run(None, 0)
    with pytest.raises(ValueError, match=r"layer '0' has alpha None but the checkpoint has 16\.0 \(the scale is "
                                         r"alpha / rank, 1 with alpha None\); convert the model with the same alpha"):
        load_training_state(checkpoint, *other)
    assert other[2].forms() == {"0": "lowrank", "2": "lowrank"}
    with torch.no_grad():
        assert not torch.equal(other[0](x), model(x))           # the function the check keeps from loading
    same = _alpha_run(16.0, 0)
    load_training_state(checkpoint, *same)
    with torch.no_grad():
        assert torch.equal(same[0](x), model(x))
    older = copy.deepcopy(checkpoint)
    del older["scheduler"]["alphas"]
    load_training_state(older, *_alpha_run(None, 0))


def test_a_full_form_checkpoint_that_never_deflates_loads_at_another_alpha():
    """In full form the scale is used by the adapters of the next deflate only: with none ahead, alpha does
    not matter and the load goes on."""
    model, opt, sched = _alpha_run(16.0, 2, deflate_epoch=None)
    other = _alpha_run(None, 0, deflate_epoch=None)
    load_training_state(training_state(model, opt, sched), *other)
    assert other[2].forms() == {"0": "full", "2": "full"}
    deflating = _alpha_run(16.0, 2)
    with pytest.raises(ValueError, match=r"layer '0' has alpha None but the checkpoint has 16\.0"):
        load_training_state(training_state(*deflating), *_alpha_run(None, 0))


def test_a_bool_alpha_in_a_saved_state_is_refused():
    """True == 1 in Python: a state whose alphas read True (a hand-edited file, say) would load into layers
    converted with alpha=1 as if it held 1.  A bool is not taken for a number: refused, naming the entry,
    before anything changes; the same state with the numbers loads."""
    model, opt, sched = _alpha_run(1.0, 4)
    state = sched.state_dict()
    assert state["alphas"] == {"0": 1.0, "2": 1.0}
    other = _alpha_run(1.0, 0)
    before = _everything(*other)
    with pytest.raises(TypeError, match=r"alphas\['0'\] must be a number or None, got bool \(True\)"):
        other[2].load_state_dict(dict(state, alphas={name: True for name in state["alphas"]}))
    _assert_unchanged(before, *other)
    other[2].load_state_dict(state)
    assert other[2].forms() == sched.forms() == {"0": "adapter", "2": "adapter"}


def test_a_checkpoint_of_other_layer_sizes_names_the_shapes():
    """A checkpoint whose layer '2' is 24→16 loaded into a model where it is 24→32, both at rank_ratio 0.25, was
    refused with "layer '2' has rank 6 but the checkpoint has 4; convert the model with the same rank_ratio",
    which it was.  The state now keeps each layer's dense weight shape and names the shapes first; a state
    saved without them gets advice that allows for other sizes.  The shapes survive a JSON round trip."""
    def build(hidden):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        convert_model(model, rank_ratio=0.25)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, opt, DynamicRankScheduler(model, opt, 1, 2)
    checkpoint = training_state(*build(16))
    assert checkpoint["scheduler"]["shapes"] == {"0": [24, 12], "2": [16, 24]}
    with pytest.raises(ValueError, match=r"layer '2' has a weight of shape \(32, 24\) but the checkpoint's is "
                                         r"\(16, 24\): the checkpoint is of a model with other layer sizes"):
        load_training_state(checkpoint, *build(32))
    older = copy.deepcopy(checkpoint)
    del older["scheduler"]["shapes"]
    with pytest.raises(ValueError, match=r"layer '2' has rank 6 but the checkpoint has 4; convert the model with "
                                         r"the same rank_ratio, or the model has other layer sizes than the saved "
                                         r"run's"):
        load_training_state(older, *build(32))
    checkpoint["scheduler"] = json.loads(json.dumps(checkpoint["scheduler"]))
    load_training_state(checkpoint, *build(16))


def test_a_callback_that_raises_is_the_error_seen_under_warnings_as_errors():
    """The switch warnings come after the callbacks; a callback that raises skips them, so under
    warnings-as-errors its own error is the one raised (a warning raised in a finally replaced it)."""
    model = mlp()
    model[0].requires_grad_(False)               # its switch warns
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DynamicRankScheduler(model, opt, 1, 2)
    sched.step(0)

    def fails(event):
        raise KeyError("the callback's own")

    sched.add_callback(fails)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KeyError, match="the callback's own"):
            sched.step(1)


def test_a_full_form_checkpoint_of_a_run_that_never_deflates_loads_at_another_rank_ratio():
    """Its full-form rank is used by no deflate: it was refused ("has rank 6 but the checkpoint has 3 (the rank
    its next deflate takes)"), as another alpha is not.  Resumed into a model converted at ρ = 0.5, the run
    goes on exactly as the saved one, and the layers keep the saved run's lowrank ranks for its cost."""
    x, y = data(torch.float64)
    model = mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = DynamicRankScheduler(model, opt, 1, None)
    for epoch in range(2):
        sched.step(epoch)
        train_steps(model, opt, x, y, steps=2)
    saved = copy.deepcopy(training_state(model, opt, sched))
    torch.manual_seed(5)
    other = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3)).double()
    convert_model(other, rank_ratio=0.5)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.05, momentum=0.9)
    other_sched = DynamicRankScheduler(other, other_opt, 1, None)
    load_training_state(saved, other, other_opt, other_sched)
    assert other_sched.forms() == sched.forms() == {"0": "full", "2": "full"}

    def lowrank_ranks(m):
        return {name: layer._lowrank_rank for name, layer in m.named_modules() if isinstance(layer, FusedLowRankLinear)}
    assert lowrank_ranks(other) == lowrank_ranks(model) == {"0": 3, "2": 6}
    assert other[0].rank == 6                       # the fresh conversion's: no deflate reads it
    for run in ((model, opt, sched), (other, other_opt, other_sched)):
        run[2].step(2)
        train_steps(*run[:2], x, y, steps=2)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), other.state_dict().values()))
