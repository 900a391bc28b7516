"""DynamicRankScheduler: forms per epoch, in-place optimizer surgery, state carry, checkpoints."""

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _scheduling import held, mlp, same_set, train_steps, trainable
from dynrank.convert import convert_model
from dynrank.scheduler import DynamicRankScheduler, load_training_state, training_state

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
    model = mlp()
    opt = torch.optim.SGD(list(model[2].parameters()) + list(model[4].parameters()), lr=0.1)
    sched = DynamicRankScheduler(model, opt, 1, 2)
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
@pytest.mark.parametrize("policy", ["reset", "carry"])
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
    for spec, expected in ((2, [2, 2]), (0.5, [6, 12]), ({"0": 3}, [3, 6])):  # ρ·min(in, out)
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
    with pytest.raises(ValueError, match="greater than inflate_epoch"):
        DynamicRankScheduler(model, opt, 5, 5)
    with pytest.raises(ValueError, match="greater than inflate_epoch"):
        DynamicRankScheduler(model, opt, 5, 3)
    with pytest.raises(ValueError, match=">= 0"):
        DynamicRankScheduler(model, opt, -1, 3)
    with pytest.raises(TypeError, match="int"):
        DynamicRankScheduler(model, opt, 1.5, 3)
    with pytest.raises(ValueError, match="both are None"):
        DynamicRankScheduler(model, opt, None, None)
    with pytest.raises(ValueError, match=r"in \[0, epochs=10\]"):
        DynamicRankScheduler(model, opt, 2, 11, epochs=10)
    with pytest.raises(ValueError, match="optimizer_state"):
        DynamicRankScheduler(model, opt, 1, 2, optimizer_state="keep")
    with pytest.raises(ValueError, match="deflate_init"):
        DynamicRankScheduler(model, opt, 1, 2, deflate_init="ones")
    with pytest.raises(TypeError, match="Optimizer"):
        DynamicRankScheduler(model, [opt], 1, 2)
    with pytest.raises(ValueError, match="no dynrank layers"):
        dense = nn.Linear(4, 4)
        DynamicRankScheduler(dense, torch.optim.SGD(dense.parameters(), lr=0.1), 1, 2)
    with pytest.raises(ValueError, match="ratio"):
        DynamicRankScheduler(model, opt, 1, 2, deflate_rank=1.5)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 12\]"):
        DynamicRankScheduler(model, opt, 1, 2, deflate_rank=13)
    sched = DynamicRankScheduler(model, opt, 1, 2, epochs=4)
    with pytest.raises(ValueError, match=">= 0"):
        sched.step(-1)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        sched.step(4)
    sched.step(3)
    with pytest.raises(ValueError, match="backwards"):
        sched.step(2)
    full = mlp()
    full_opt = torch.optim.SGD(full.parameters(), lr=0.1)
    DynamicRankScheduler(full, full_opt, 0, 5).step(0)
    with pytest.raises(ValueError, match="never returns to lowrank"):
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


@pytest.mark.parametrize("policy, resume_epochs", [("carry", (1, 3)), ("reset", (2, 4))])
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
    with pytest.raises(ValueError, match="other layers"):
        other_sched.load_state_dict(sched.state_dict())
