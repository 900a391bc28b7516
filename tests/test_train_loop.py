"""dynrank-train's training loop: LR schedule, optimizer, the loss it trains and evaluates, what a run records."""

import contextlib
import copy
import json
import math
import re
import signal
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from _helpers import REL_TOL
from dynrank.train import cli, corpus, loop
from dynrank.train.corpus import TextData
from dynrank.train.loop import build_optimizer, evaluate, lr_at, prepare_model, run_training
from dynrank.train.models import build_model, count_parameters
from dynrank.train.report import compare_table
from test_train_cli import TINY_GPT, _config


def _tiny_run_config(*argv):
    """A TINY_GPT run's settings on the CPU (3 batches an epoch unless ``argv`` says otherwise)."""
    return cli._resolve_device(_config([*TINY_GPT, "--device", "cpu", *argv]))


def _tiny_text(cfg):
    """Random bytes as the text, cut into ``cfg``'s batches."""
    text = torch.randint(0, 256, (400,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return TextData(text[:300], text[300:], cfg["context"], cfg["batch_size"], steps=cfg["steps_per_epoch"])


def _smoothed_cross_entropy(logits, targets, smoothing):
    """Cross-entropy against (1 - ε)·one-hot + ε/K, written out: (1 - ε)·(−log p_y) + ε·mean_k(−log p_k)."""
    log_p = F.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)
    nll = -log_p.gather(1, targets.reshape(-1, 1)).squeeze(1)
    return ((1 - smoothing) * nll + smoothing * -log_p.mean(-1)).mean()


# -- the LR schedule ------------------------------------------------------------------------------
def test_the_lr_is_multiplied_by_lr_decay_at_each_milestone_epoch():
    # The decays of --milestones 2,3 apply from those epochs on (epochs count from 0), not one epoch later.
    cfg = dict(lr=0.1, lr_decay=0.1, milestones=[2, 3], warmup_steps=0)
    assert [lr_at(cfg, epoch) for epoch in range(5)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001], rel=1e-12)
    assert [lr_at(dict(cfg, lr_decay=0.5), epoch) for epoch in range(5)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.025, 0.025], rel=1e-12)


def test_the_warm_up_rises_linearly_over_warmup_steps_across_epochs():
    # --warmup-steps 5 at 3 batches an epoch: the LR at global step g is lr·min(1, (g + 1)/5), into the
    # second epoch; the decay at epoch 2 multiplies whatever the warm-up gives.
    cfg = dict(lr=0.4, lr_decay=0.1, milestones=[2], warmup_steps=5)
    lrs = [lr_at(cfg, epoch, step, 3) for epoch in range(3) for step in range(3)]
    assert lrs == pytest.approx([0.08, 0.16, 0.24, 0.32, 0.4, 0.4, 0.04, 0.04, 0.04], rel=1e-12)
    # A warm-up still under way at a milestone is decayed too: 1/10 at epoch 1's first step, then 2/10, 3/10.
    cfg = dict(lr=1.0, lr_decay=0.5, milestones=[1], warmup_steps=10)
    assert [lr_at(cfg, 1, step, 3) for step in range(3)] == pytest.approx([0.2, 0.25, 0.3], rel=1e-12)


# -- the optimizer --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,kind,settings", [
    # README: the presets are "SGD momentum 0.9, lr 0.1" with "wd 1e-4" for CIFAR-10/ResNet20.
    (["--preset", "cifar10-resnet20"], torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0, nesterov=False)),
    # README: the main job trains "with AdamW"; betas (0.9, 0.95), the GPT-3 paper's (Brown et al., 2020).
    ([], torch.optim.AdamW, dict(lr=3e-3, betas=(0.9, 0.95))),
])
def test_build_optimizer_gives_the_documented_optimizer_and_decays_only_matrices(argv, kind, settings):
    cfg = _config(argv)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))
    model[2].weight.requires_grad_(False)       # frozen: in no group
    optimizer = build_optimizer(model, cfg)
    assert type(optimizer) is kind
    decayed, undecayed = optimizer.param_groups
    assert [id(p) for p in decayed["params"]] == [id(model[0].weight)]
    assert [id(p) for p in undecayed["params"]] == [id(p) for p in (model[0].bias, model[1].weight, model[1].bias,
                                                                    model[2].bias)]
    assert (decayed["weight_decay"], undecayed["weight_decay"]) == (cfg["weight_decay"], 0.0)
    assert cfg["weight_decay"] == (1e-4 if kind is torch.optim.SGD else 0.1)
    for group in (decayed, undecayed):
        assert {key: group[key] for key in settings} == settings


# -- the loss -------------------------------------------------------------------------------------
@pytest.mark.parametrize("smoothing", [0.0, 0.5])
def test_the_train_loss_is_the_label_smoothed_cross_entropy(tmp_path, smoothing):
    # One batch, one epoch: the epoch's train loss is the loss of the initial weights on that batch.
    cfg = _tiny_run_config("--schedule", "full", "--epochs", "1", "--milestones", "", "--steps-per-epoch", "1",
                           "--label-smoothing", str(smoothing))
    data = _tiny_text(cfg)
    result = run_training(cfg, "full", data, str(tmp_path), log=lambda *a: None)
    model, _ = prepare_model(cfg, "full", data.num_classes, "cpu")     # the same seeded initial weights
    inputs, targets = next(data.train_batches(0))
    with torch.no_grad():
        logits = model.double()(inputs)
    expected = _smoothed_cross_entropy(logits, targets, smoothing).item()
    # The smoothing moves the loss by far more than the tolerance, so a loss without it cannot pass.
    assert abs(_smoothed_cross_entropy(logits, targets, 0.5).item()
               - _smoothed_cross_entropy(logits, targets, 0.0).item()) > 100 * REL_TOL[torch.float32] * expected
    assert result["history"][0]["train_loss"] == pytest.approx(expected, rel=REL_TOL[torch.float32])


@pytest.mark.parametrize("name,kwargs", [("resnet20", dict(width=0.25)),                 # BatchNorm
                                         ("wrn28-10", dict(width=0.05, dropout=0.5))])   # BatchNorm and dropout
def test_evaluate_uses_eval_mode_and_leaves_the_running_statistics_alone(name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():           # running statistics of other data than the validation batches
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8, generator=gen) * 0.5)
    val = [(torch.randn(8, 3, 8, 8, generator=gen) * 3 + 1, torch.randint(0, 10, (8,), generator=gen))
           for _ in range(2)]
    buffers = {key: value.clone() for key, value in model.named_buffers()}
    reference = copy.deepcopy(model).double()
    model.train()                   # as the training loop leaves it
    data = SimpleNamespace(device=torch.device("cpu"), val_batches=lambda: iter(val))
    loss, accuracy = evaluate(model, data, contextlib.nullcontext)

    inputs, targets = torch.cat([x for x, _ in val]).double(), torch.cat([y for _, y in val])
    with torch.no_grad():
        logits = reference.eval()(inputs)
        torch.manual_seed(0)
        train_mode_loss = F.cross_entropy(copy.deepcopy(reference).train()(inputs), targets).item()
    expected = F.cross_entropy(logits, targets).item()
    assert abs(train_mode_loss - expected) > 0.01 * expected        # the two modes differ on these batches
    assert loss == pytest.approx(expected, rel=REL_TOL[torch.float32])
    assert accuracy == (logits.argmax(-1) == targets).double().mean().item()
    assert all(torch.equal(buffer, buffers[key]) for key, buffer in model.named_buffers())


# -- what a run records ---------------------------------------------------------------------------
@pytest.mark.parametrize("schedule,rank_ratio", [("full", 1.0), ("lowrank", 0.5)])
def test_a_run_steps_and_records_the_lr_of_the_schedule_and_its_rank_ratio(tmp_path, monkeypatch, schedule,
                                                                            rank_ratio):
    """Each step trains at lr·min(1, (g + 1)/warmup)·decay; an epoch records the LR of its last step; a full
    run trains the dense model, so it records ρ = 1 whatever --rank-ratio says."""
    seen = []

    class Recording(loop.TrainStep):
        def __call__(self, inputs, targets, lr):
            seen.append(lr)
            return super().__call__(inputs, targets, lr)
    monkeypatch.setattr(loop, "TrainStep", Recording)
    cfg = _tiny_run_config("--schedule", schedule, "--epochs", "3", "--milestones", "2", "--lr", "0.4",
                           "--warmup-steps", "5")
    assert (cfg["steps_per_epoch"], cfg["rank_ratio"]) == (3, 0.5)
    result = run_training(cfg, schedule, _tiny_text(cfg), str(tmp_path), log=lambda *a: None)
    assert seen == pytest.approx([0.08, 0.16, 0.24, 0.32, 0.4, 0.4, 0.04, 0.04, 0.04], rel=1e-12)
    recorded = json.loads((tmp_path / "metrics.json").read_text())
    for history in (result["history"], recorded):
        assert [record["lr"] for record in history] == pytest.approx([0.24, 0.4, 0.04], rel=1e-12)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert result["params"]["rank_ratio"] == saved["params"]["rank_ratio"] == rank_ratio


@pytest.mark.parametrize("schedule", ["lowrank", "dynamic"])
def test_a_converted_run_records_the_dense_count_and_bits_per_byte(tmp_path, schedule):
    """A lowrank or dynamic run on its own records the dense model's count (what Comp. paper divides by), and
    bits per byte as the validation loss in nats over ln 2, in its records and the table."""
    cfg = _tiny_run_config("--schedule", schedule, "--epochs", "2", "--milestones", "1", "--steps-per-epoch", "1")
    result = run_training(cfg, schedule, _tiny_text(cfg), str(tmp_path), log=lambda *a: None)
    dense = count_parameters(prepare_model(cfg, "full", 256, "cpu")[0])
    assert result["params"]["dense"] == dense > result["params"]["converted"]
    for record in result["history"]:
        assert record["val_bpb"] == pytest.approx(record["val_loss"] / math.log(2), rel=1e-12)
    lines = compare_table([result], kind="text").splitlines()
    header = re.split(r"\s{2,}", lines[0])
    row = re.split(r"\s{2,}", lines[2])
    assert row[header.index("val bpb")] == f"{result['history'][-1]['val_loss'] / math.log(2):.4f}"


def test_different_seeds_give_different_initial_weights_and_batch_orders(monkeypatch):
    cfg = dict(_tiny_run_config("--schedule", "full"), seed=5)
    weights = {seed: prepare_model(dict(cfg, seed=seed), "full", 256, "cpu")[0].state_dict() for seed in (0, 5)}
    assert torch.equal(prepare_model(cfg, "full", 256, "cpu")[0].state_dict()["embed.weight"],
                       weights[5]["embed.weight"])                                   # seeded: repeatable
    assert not torch.equal(weights[0]["embed.weight"], weights[5]["embed.weight"])
    text = torch.randint(0, 256, (400,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(corpus, "load_stdlib_corpus", lambda *a, **k: (text[:300], text[300:], []))
    first = {seed: next(cli.load_data(dict(cfg, seed=seed), log=lambda *a: None).train_batches(0))[0]
             for seed in (0, 5, 5)}
    assert torch.equal(first[5], next(cli.load_data(cfg, log=lambda *a: None).train_batches(0))[0])
    assert not torch.equal(first[0], first[5])


def test_a_second_ctrl_c_aborts_and_the_handler_is_restored_after_a_run(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    with loop._StopFlag() as flag:
        signal.raise_signal(signal.SIGINT)
        assert flag.stop                                    # the first asks for a stop between batches
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    cfg = _tiny_run_config("--schedule", "full", "--epochs", "1", "--milestones", "", "--steps-per-epoch", "1")
    run_training(cfg, "full", _tiny_text(cfg), str(tmp_path), log=lambda *a: None)
    assert signal.getsignal(signal.SIGINT) is before


# -- derived settings -----------------------------------------------------------------------------
def test_a_deflate_epoch_at_the_end_of_the_run_is_recorded_as_none():
    # D = E: the layers stay full to the end, which the settings record as deflate_epoch None (never).
    argv = ["--schedule", "dynamic", "--epochs", "4", "--milestones", "2", "--inflate-epoch", "1"]
    assert _config(argv + ["--deflate-epoch", "4"])["deflate_epoch"] is None
    assert _config(argv + ["--deflate-epoch", "3"])["deflate_epoch"] == 3
