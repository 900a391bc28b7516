"""Helpers shared by the scheduler tests: a small converted MLP, its data and training steps, optimizer views."""

import io

import torch
from torch import nn
from torch.nn import functional as F

from dynrank.checkpoint import load_training_state, training_state
from dynrank.convert import convert_model


def mlp(seed=0, d_in=12, width=24):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 3))
    convert_model(model, rank_ratio=0.25)
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def held(optimizer):
    return [p for g in optimizer.param_groups for p in g["params"]]


def same_set(a, b):
    return sorted(map(id, a)) == sorted(map(id, b))


def train_steps(model, optimizer, x, y, steps=3):
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def data(dtype=torch.float32):
    return torch.randn(32, 12, dtype=dtype), torch.randint(0, 3, (32,))


def decay_groups(model, **no_decay):
    """The usual two groups: weight decay on ≥ 2-D parameters, none on biases."""
    return [{"params": [p for p in model.parameters() if p.dim() >= 2]},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0, **no_decay}]


def sgd_step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def scaled_backward(model, opt, scaler, x, y):
    """fp16 autocast forward, zero_grad, then the scaled loss's backward."""
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    scaler.scale(loss).backward()


def ema_reference_update(reference, model, decay):
    for name, p in model.named_parameters():
        reference[name] = p.detach().clone() if name not in reference else \
            decay * reference[name] + (1 - decay) * p.detach()


def lbfgs_step(net, optimizer, x, y):
    """One L-BFGS step on the cross-entropy of ``net(x)`` against ``y``; returns the loss."""
    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss
    return optimizer.step(closure).item()


def save_and_load(build, model, opt, scheduler, **extra):
    """``training_state`` through a byte buffer into the objects ``build()`` makes afresh (model, optimizer,
    scheduler first); returns them and the checkpoint's extras."""
    buffer = io.BytesIO()
    torch.save(training_state(model, opt, scheduler, **extra), buffer)
    buffer.seek(0)
    built = build()
    return built, load_training_state(torch.load(buffer), built[0], built[1], built[2])


def resume_whole_run(build, model, opt, scheduler, lrs, scaler, ema, with_ema):
    """Save and load a run with its LR scheduler's, grad scaler's, EMA copy's and RNG state (a switch or
    a growth draws fresh factors from it); returns the fresh (model, opt, scheduler, lrs, scaler, ema)."""
    built, extra = save_and_load(build, model, opt, scheduler, lrs=lrs.state_dict(), scaler=scaler.state_dict(),
                                 ema=ema.state_dict(), rng=torch.get_rng_state())
    _, _, _, lrs, scaler, ema = built
    lrs.load_state_dict(extra["lrs"])
    scaler.load_state_dict(extra["scaler"])
    if with_ema:
        ema.load_state_dict(extra["ema"])
    torch.set_rng_state(extra["rng"])
    return built


def amp_step(model, opt, scaler, lrs, ema, x, y, with_ema):
    """A mixed-precision step with clipping (active: the norms are larger than 0.05), the LR scheduler's
    step and the EMA copy's update."""
    scaled_backward(model, opt, scaler, x, y)
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    scaler.step(opt)
    scaler.update()
    lrs.step()
    if with_ema:
        ema.update_parameters(model)


def whole_setup(model, opt, scheduler, with_ema):
    """(model, opt, scheduler, OneCycleLR, fp16 GradScaler, EMA copy): the EMA copy is added to the
    scheduler ``with_ema`` only (else it is built and left alone)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    if with_ema:
        scheduler.add_model_copy(ema)
    return (model, opt, scheduler, torch.optim.lr_scheduler.OneCycleLR(opt, 0.02, total_steps=8),
            torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1), ema)


def scaler_step(model, opt, scaler, skipped):
    """``scaler.step`` and ``update``; returns, per parameter of ``model``, whether the step changed it.
    A ``skipped`` step (an inf gradient) must change none and halve the scale."""
    values = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    changed = [not torch.equal(p, v) for p, v in zip(model.parameters(), values)]
    if skipped:
        assert not any(changed) and scaler.get_scale() == scale / 2
    return changed


def check_unscaled_gradients(model, opt, scaler, x, y, overflow=None):
    """fp16 forward and GradScaler's scaled backward, then ``unscale_``: every held gradient must match the
    unscaled loss's own (up to that one's fp16 underflow).  ``overflow`` = (parameter, index) gets an inf
    gradient before unscaling and is left out of the comparison."""
    from _helpers import rel_err
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward(retain_graph=True)
    plain = [p.grad.clone() for p in held(opt)]
    opt.zero_grad()
    scaler.scale(loss).backward()
    if overflow is not None:
        overflow[0].grad[overflow[1]] = float("inf")
    scaler.unscale_(opt)
    for p, g in zip(held(opt), plain):
        assert (overflow is not None and p is overflow[0]) or rel_err(p.grad, g) < 2e-3


def kept_and_removed_copy(scheduler, model):
    """Give ``scheduler`` two copies of ``model``, an AveragedModel (kept) and a deep copy (removed at once);
    check that the removal leaves the scheduler's state dict as it was and that removing it again, or a copy
    never added, is refused.  Returns (kept, removed)."""
    import copy

    import pytest
    from torch.optim.swa_utils import AveragedModel
    kept = scheduler.add_model_copy(AveragedModel(model))
    removed = scheduler.add_model_copy(copy.deepcopy(model))
    state = scheduler.state_dict()
    assert scheduler.remove_model_copy(removed) is None
    assert scheduler.state_dict() == state
    with pytest.raises(ValueError, match=r"model copy Sequential was not added to this scheduler "
                                         r"\(add_model_copy\), or was removed already"):
        scheduler.remove_model_copy(removed)
    with pytest.raises(ValueError, match="model copy AveragedModel was not added to this scheduler"):
        scheduler.remove_model_copy(AveragedModel(model))
    return kept, removed
