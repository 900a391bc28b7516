"""A scheduler copies and pickles with its model and optimizer: a copy of a run (model, optimizer, scheduler),
deep or through torch.save/torch.load, is registered as a scheduler built over the copied model and optimizer
(its optimizer follows a model load that switches or resizes a layer, its layers refuse the other kind), and
goes on bit for bit as the original does; a shallow copy takes the layers from the original."""

import copy
import io

import pytest
import torch
from torch import nn

from _scheduling import data, held, mlp, same_set, train_steps, trainable
from dynrank.inrank import IncrementalRankScheduler
from dynrank.linear import FusedLowRankLinear
from dynrank.scheduler import DynamicRankScheduler

HOWS = ["deepcopy", "pickle", "scheduler alone"]


def _copied(run, how):
    """(model, optimizer, scheduler) of a copy of ``run``: the three deep-copied together, or saved together
    with torch.save and loaded, or the scheduler deep-copied alone (its model and optimizer come with it)."""
    model, optimizer, scheduler = run
    trio = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if how == "deepcopy":
        trio = copy.deepcopy(trio)
    elif how == "pickle":
        buffer = io.BytesIO()
        torch.save(trio, buffer)
        buffer.seek(0)
        trio = torch.load(buffer, weights_only=False)
    else:
        scheduler = copy.deepcopy(scheduler)
        return scheduler.model, scheduler.optimizer, scheduler
    assert trio["scheduler"].model is trio["model"] and trio["scheduler"].optimizer is trio["optimizer"]
    return trio["model"], trio["optimizer"], trio["scheduler"]


def _assert_identical(a, b):
    """``a`` and ``b`` (state dicts, nested) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_identical(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_identical(x, y)
    else:
        assert a == b


# -- DynamicRankScheduler ------------------------------------------------------------------------------
def _dynamic_run():
    """A float64 run at epoch 0 (lowrank), two SGD momentum steps taken; returns it and its data."""
    model = mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = DynamicRankScheduler(model, opt, 2, 4, optimizer_state="carry")
    x, y = data(torch.float64)
    scheduler.step(0)
    train_steps(model, opt, x, y, 2)
    return (model, opt, scheduler), (x, y)


def _full_form_checkpoint():
    """A model state dict of the run's layers in full form."""
    source = mlp(seed=1).double()
    for layer in (source[0], source[2]):
        layer.inflate()
    return source.state_dict()


def _go_on_dynamic(run, x, y, checkpoint, rng):
    """A model load that switches the layers to full form (the optimizer must follow), training, then the
    scheduler's deflate at epoch 4 and more training; returns the model's and the optimizer's state dicts."""
    model, opt, scheduler = run
    torch.set_rng_state(rng)
    model.load_state_dict(checkpoint)
    assert [layer.form for layer in (model[0], model[2])] == ["full", "full"]
    assert same_set(held(opt), trainable(model))
    weight = model[0].weight.detach().clone()
    train_steps(model, opt, x, y, 2)
    assert not torch.equal(model[0].weight, weight)         # the step trains the loaded W
    changes = []
    for epoch in (2, 3, 4, 5):
        changes += scheduler.step(epoch)
        train_steps(model, opt, x, y, 2)
    assert changes == [("0", "full", "adapter"), ("2", "full", "adapter")]
    assert same_set(held(opt), trainable(model))
    return model.state_dict(), opt.state_dict()


@pytest.mark.parametrize("how", HOWS)
def test_a_copied_dynamic_run_follows_a_model_load_and_goes_on_as_the_original(how):
    """The copy's optimizer held the released factors after a model load that switched the copied layers (a
    step then left W as it was); now the copied run goes on bit for bit as the original."""
    run, (x, y) = _dynamic_run()
    fork = _copied(run, how)
    checkpoint, rng = _full_form_checkpoint(), torch.get_rng_state()
    copied = _go_on_dynamic(fork, x, y, checkpoint, rng)
    _assert_identical(copied, _go_on_dynamic(run, x, y, checkpoint, rng))


@pytest.mark.parametrize("how", HOWS)
def test_a_copied_dynamic_scheduler_claims_the_copied_layers(how):
    """An IncrementalRankScheduler was accepted over the copied layers; the original keeps its own."""
    run, (x, y) = _dynamic_run()
    model, opt, scheduler = _copied(run, how)
    with pytest.raises(ValueError, match=r"layers '0', '2' are managed by a live DynamicRankScheduler"):
        IncrementalRankScheduler(model, opt, init_rank=1, buffer=1)
    assert scheduler.step(2) == run[2].step(2) == [("0", "lowrank", "full"), ("2", "lowrank", "full")]


def test_a_shallow_copy_takes_the_layers_and_the_original_refuses_naming_a_copy():
    """copy.copy holds the same model and optimizer and takes the layers, as a scheduler built over them
    would: it steps (it was refused, unregistered), and the original's refusal says a copy took them (it said
    a scheduler was built over them); once the copy is gone the original steps again."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = DynamicRankScheduler(model, opt, 1, 3)
    first.step(0)
    second = copy.copy(first)
    assert second.model is model and second.optimizer is opt
    message = (r"layer '0' is managed by another DynamicRankScheduler, a copy made after this one: a layer can "
               r"be managed by one scheduler")
    with pytest.raises(ValueError, match=message):
        first.step(1)
    assert second.step(1) == [("0", "lowrank", "full"), ("2", "lowrank", "full")]
    assert same_set(held(opt), trainable(model))
    with pytest.raises(ValueError, match=message):
        first.load_state_dict(second.state_dict())
    del second
    assert first.step(3) == [("0", "full", "adapter"), ("2", "full", "adapter")]
    assert same_set(held(opt), trainable(model))


# -- IncrementalRankScheduler ---------------------------------------------------------------------------
def _growth_run():
    """A float64 run of two grown layers and one ("4") in full form the scheduler leaves alone, one AdamW
    step and growth check taken; returns it and its data."""
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(12, 24, rank=3), nn.ReLU(), FusedLowRankLinear(24, 24, rank=6),
                          nn.ReLU(), FusedLowRankLinear(24, 3, rank=2, form="full")).double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    growth = IncrementalRankScheduler(model, opt, init_rank=1, buffer=2, warmup_steps=0, check_every=1)
    x, y = data(torch.float64)
    train_steps(model, opt, x, y, 1)
    assert growth.step() == [("0", 3, 4), ("2", 3, 4)]
    return (model, opt, growth), (x, y)


def _wider_checkpoint(model):
    """``model``'s state dict with layer "0" one component wider (a zero A column)."""
    state = {key: value.clone() for key, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    state["0.A"] = torch.cat([state["0.A"], state["0.A"].new_zeros(state["0.A"].shape[0], 1)], 1)
    state["0.B"] = torch.cat([state["0.B"], torch.randn(state["0.B"].shape[0], 1, generator=generator,
                                                        dtype=torch.float64)], 1)
    return state


def _go_on_growing(run, x, y, checkpoint, rng):
    """A model load that resizes layer "0" (the optimizer must follow), a deflate by hand of layer "4" (left to
    the scheduler's model, not one added), then training with growth; returns the state dicts."""
    model, opt, growth = run
    torch.set_rng_state(rng)
    model.load_state_dict(checkpoint)
    assert model[0].rank == 5 and same_set(held(opt), trainable(model))
    model[4].deflate()
    grown = []
    for _ in range(3):
        train_steps(model, opt, x, y, 1)
        grown += growth.step()
    assert grown                                        # the continuation grows a layer
    return model.state_dict(), opt.state_dict(), growth.state_dict()


@pytest.mark.parametrize("how", HOWS)
def test_a_copied_growth_run_follows_a_model_load_and_goes_on_as_the_original(how):
    """Pickling the scheduler raised a bare TypeError (a WeakSet); a deep copy's optimizer did not follow a
    model load that resized a copied layer, and its step refused a deflate of the copied model's layer the
    scheduler leaves alone as one "added" (it held the original model's).  Now the copied run goes on bit
    for bit as the original."""
    run, (x, y) = _growth_run()
    fork = _copied(run, how)
    checkpoint, rng = _wider_checkpoint(run[0]), torch.get_rng_state()
    copied = _go_on_growing(fork, x, y, checkpoint, rng)
    _assert_identical(copied, _go_on_growing(run, x, y, checkpoint, rng))


@pytest.mark.parametrize("how", HOWS)
def test_a_copied_growth_scheduler_claims_the_copied_layers(how):
    """A DynamicRankScheduler was accepted over the layers the copied scheduler grows."""
    run, _ = _growth_run()
    model, opt, growth = _copied(run, how)
    with pytest.raises(ValueError, match=r"layers '0', '2' are managed by a live IncrementalRankScheduler"):
        DynamicRankScheduler(model, opt, 1, 3)
    assert growth.ranks == run[2].ranks == {"0": 4, "2": 4}
