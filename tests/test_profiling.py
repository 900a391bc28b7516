"""profile_forms: one copy per form, the step timed on a fake clock, the model and RNG left alone."""

import random
import re
import types

import numpy as np
import pytest
import torch
from torch import nn

import dynrank
from dynrank import profiling
from dynrank._forms import FormLayer
from dynrank.linear import FusedLowRankLinear
from dynrank.cost import cost_report, param_counts

# Seconds one step takes on the fake clock, per form of the copy's layers.
STEP_SECONDS = {"full": 4.0, "lowrank": 1.0, "adapter": 3.0}


def mlp():
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    dynrank.convert_model(model, rank_ratio=0.25, exclude=["4"])
    return model


def convnet():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Flatten(), nn.Linear(8 * 5 * 5, 3))
    dynrank.convert_model(model, rank_ratio=0.5, decomposition="tucker", exclude=["4"])
    return model


class FakeClock:
    """perf_counter for profiling: a step advances it by its form's STEP_SECONDS plus its call number / 64
    (exact in binary), so each timed value is known."""

    def __init__(self, monkeypatch):
        self.now, self.calls = 0.0, []
        monkeypatch.setattr(profiling, "time", types.SimpleNamespace(perf_counter=lambda: self.now))

    def step(self, model, x, y):
        forms = {m.form for m in model.modules() if isinstance(m, FormLayer)}
        assert len(forms) == 1
        form = forms.pop()
        self.calls.append(form)

        def run(model, optimizer):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return form, run


def timed_step(clock, x, y):
    def step(model, optimizer):
        form, run = clock.step(model, x, y)
        run(model, optimizer)
        clock.now += STEP_SECONDS[form] + len(clock.calls) / 64
    return step


@pytest.mark.parametrize("build, x", [(mlp, torch.randn(5, 12)), (convnet, torch.randn(2, 3, 5, 5))],
                         ids=["linear", "conv"])
def test_each_form_is_timed_on_its_own_copy_and_the_model_is_left_alone(monkeypatch, build, x):
    model = build()
    y = torch.tensor([0, 1, 2, 0, 1][:len(x)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forms_before = [m.form for m in model.modules() if isinstance(m, FormLayer)]
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    clock = FakeClock(monkeypatch)
    seen = []

    def optimizer(params):
        params = list(params)
        seen.append(params)
        assert not any(p is q for p in params for q in model.parameters())    # the copy's, never the model's
        return torch.optim.AdamW(params, lr=1e-2)

    lines = []
    profile = dynrank.profile_forms(model, timed_step(clock, x, y), optimizer, steps=3, warmup=2, log=lines.append)
    assert clock.calls == ["full"] * 5 + ["lowrank"] * 5 + ["adapter"] * 5
    for n, form in enumerate(["full", "lowrank", "adapter"]):
        calls = range(5 * n + 3, 5 * n + 6)          # the 3 timed calls after 2 warm-up ones (1-based)
        assert profile.seconds[form] == [STEP_SECONDS[form] + c / 64 for c in calls]
        assert len(lines) == 3 and lines[n].startswith(f"profile_forms: {form}")
    # the user's model, its forms, values and RNG are as they were
    assert [m.form for m in model.modules() if isinstance(m, FormLayer)] == forms_before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(torch.get_rng_state(), rng)
    # trainable parameters per form: the paper's d and d_rho (an adapter trains what lowrank does)
    counts = param_counts(model)
    assert profile.trainable == {"full": counts.full, "lowrank": counts.lowrank, "adapter": counts.lowrank}
    assert [sum(p.numel() for p in params) for params in seen] == list(profile.trainable.values())


def test_ratios_and_a_schedules_cost_come_from_the_means(monkeypatch):
    model = mlp()
    clock = FakeClock(monkeypatch)
    profile = dynrank.profile_forms(model, timed_step(clock, torch.randn(5, 12), torch.arange(5) % 3),
                                    steps=2, warmup=0, log=None)
    mean = {f: sum(v) / 2 for f, v in profile.seconds.items()}
    assert profile.mean("lowrank") == mean["lowrank"] and profile.relative("adapter") == mean["adapter"] / mean["full"]
    assert profile.median("full") == mean["full"]          # two values: the median is their mean
    E, I, D = 10, 3, 7
    expected = (I * mean["lowrank"] + (D - I) * mean["full"] + (E - D) * mean["adapter"]) / (E * mean["full"])
    assert profile.comp_ratio(E, I, D) == pytest.approx(expected, rel=1e-15)
    assert cost_report(model, E, I, D, run=profile).measured_ratio == pytest.approx(expected, rel=1e-15)
    table = str(profile).splitlines()
    assert table[0] == "step time per form on cpu (2 timed steps each)"
    assert [row.split()[0] for row in table[3:]] == ["full", "lowrank", "adapter"]
    assert table[4].split()[4] == f"{mean['lowrank'] / mean['full']:.3f}"


def test_ratios_are_of_means_where_the_median_differs():
    # Skewed full-form times: mean 2, median 1; the low-rank ones have mean = median = 1.
    profile = profiling.FormProfile(seconds={"full": [1.0, 1.0, 4.0], "lowrank": [1.0, 1.0, 1.0],
                                             "adapter": [0.5, 1.5, 4.0]},
                                    trainable={"full": 10, "lowrank": 5, "adapter": 5}, device="cpu")
    assert (profile.mean("full"), profile.median("full")) == (2.0, 1.0)
    assert (profile.mean("adapter"), profile.median("adapter")) == (2.0, 1.5)
    assert profile.relative("lowrank") == 0.5 and profile.relative("adapter") == 1.0
    E, I, D = 10, 3, 7
    expected = (I * 1.0 + (D - I) * 2.0 + (E - D) * 2.0) / (E * 2.0)
    assert profile.comp_ratio(E, I, D) == pytest.approx(expected, rel=1e-15)
    assert str(profile).splitlines()[4].split()[4] == "0.500"


def test_a_subset_of_forms_and_a_frozen_layer(monkeypatch):
    model = mlp()
    model[2].requires_grad_(False)
    clock = FakeClock(monkeypatch)
    profile = dynrank.profile_forms(model, timed_step(clock, torch.randn(5, 12), torch.arange(5) % 3),
                                    forms=["adapter", "full"], steps=1, warmup=0, log=None)
    assert list(profile.seconds) == ["adapter", "full"] and clock.calls == ["adapter", "full"]
    # the frozen 16 → 16 layer stays out in every form (W, factors and bias): layer 0 and the head train
    assert profile.trainable["full"] == (12 * 16 + 16) + (16 * 3 + 3)
    assert profile.trainable["adapter"] == (12 + 16) * model[0].rank + 16 + (16 * 3 + 3)
    with pytest.raises(ValueError, match="form 'lowrank' was not profiled; profiled: adapter, full"):
        profile.mean("lowrank")
    # "× full" needs the full form among those profiled
    only = dynrank.profile_forms(model, timed_step(clock, torch.randn(5, 12), torch.arange(5) % 3),
                                 forms="lowrank", steps=1, warmup=0, log=None)
    assert str(only).splitlines()[3].split()[4] == "-"


def test_a_wrapped_model_is_profiled_as_its_module(monkeypatch):
    clock = FakeClock(monkeypatch)
    profile = dynrank.profile_forms(nn.DataParallel(mlp()), timed_step(clock, torch.randn(5, 12), torch.arange(5) % 3),
                                    forms=["full"], steps=1, warmup=0, log=None)
    assert clock.calls == ["full"] and profile.device == "cpu"


def _step(model, optimizer):
    pass


@pytest.mark.parametrize("call, error, message", [
    (lambda m: dynrank.profile_forms("model", _step), TypeError, "model must be a torch.nn.Module, got str"),
    (lambda m: dynrank.profile_forms(nn.Linear(2, 2), _step), ValueError, "no dynrank layers"),
    (lambda m: dynrank.profile_forms(m, None), TypeError, "step must be callable .* got NoneType"),
    (lambda m: dynrank.profile_forms(m, _step, optimizer=0.1), TypeError, "optimizer must be callable or None, got float"),
    (lambda m: dynrank.profile_forms(m, _step, log="print"), TypeError, "log must be callable or None, got str"),
    (lambda m: dynrank.profile_forms(m, _step, forms=["dense"]), ValueError, "forms must name each of .* got \\['dense'\\]"),
    (lambda m: dynrank.profile_forms(m, _step, forms=["full", "full"]), ValueError, "at most once"),
    (lambda m: dynrank.profile_forms(m, _step, forms=[]), ValueError, "at least one, got \\[\\]"),
    (lambda m: dynrank.profile_forms(m, _step, forms=3), TypeError, "forms must be a form name or an iterable .* got int"),
    (lambda m: dynrank.profile_forms(m, _step, steps=0), ValueError, "steps must be an int ≥ 1, got 0"),
    (lambda m: dynrank.profile_forms(m, _step, steps=2.0), TypeError, "steps must be an int ≥ 1, got float"),
    (lambda m: dynrank.profile_forms(m, _step, warmup=-1), ValueError, "warmup must be an int ≥ 0, got -1"),
    (lambda m: dynrank.profile_forms(m, _step, optimizer=lambda p: list(p), log=None), TypeError,
     "optimizer\\(params\\) must return a torch.optim.Optimizer, got list"),
])
def test_bad_arguments_are_clear_errors(call, error, message):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        call(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_parameters_on_two_devices_are_refused():
    model = mlp()
    model[4].to("meta")
    with pytest.raises(ValueError, match="on one device; its parameters are on cpu, meta"):
        dynrank.profile_forms(model, _step, log=None)


@pytest.mark.parametrize("form, name", [("full", "weight"), ("lowrank", "A")])
def test_a_reparametrized_layer_is_profiled_in_its_form_only(monkeypatch, form, name):
    """A layer under weight_norm raised the copy's form-change RuntimeError, naming neither the layer nor
    the forms it can be profiled in."""
    from torch.nn.utils import parametrizations
    model = mlp()
    if form == "full":
        model[0].inflate()
        model[2].inflate()
    assert [m.form for m in model.modules() if isinstance(m, FormLayer)] == [form, form]
    parametrizations.weight_norm(model[2], name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    others = [f for f in ("full", "lowrank", "adapter") if f != form]
    with pytest.raises(ValueError, match=rf"layer '2' \(ParametrizedFusedLowRankLinear, {form} form\) has its {name} "
                                         rf"reparametrized .* cannot change form and be timed in "
                                         rf"{re.escape(repr(others))}: pass forms=\('{form}',\)"):
        dynrank.profile_forms(model, _step, log=None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    clock = FakeClock(monkeypatch)
    profile = dynrank.profile_forms(model, timed_step(clock, torch.randn(5, 12), torch.arange(5) % 3),
                                    forms=(form,), steps=1, warmup=0, log=None)
    assert clock.calls == [form] and list(profile.seconds) == [form]
    # the weight_norm's magnitude and direction train: the model's own trainable parameters
    assert profile.trainable[form] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def _hook_norm(kind, module):
    """``module`` under a hook-based reparametrization of its weight; the parameters it is computed from."""
    if kind == "weight_norm":
        torch.nn.utils.weight_norm(module)
        return ["weight_g", "weight_v"]
    if kind == "spectral_norm":
        torch.nn.utils.spectral_norm(module)
        return ["weight_orig"]
    torch.nn.utils.prune.l1_unstructured(module, "weight", amount=0.5)
    return ["weight_orig"]


@pytest.mark.filterwarnings("ignore::FutureWarning")               # torch.nn.utils.weight_norm is deprecated
@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "prune"])
def test_a_hook_based_weight_norm_on_a_plain_layer_is_copied_and_trains(monkeypatch, kind):
    """The hook-based weight_norm, spectral_norm and pruning keep the weight they compute as a module
    attribute, no graph leaf after a forward: the copy raised torch's "Only Tensors created explicitly by the
    user (graph leaves) support the deepcopy protocol".  Now the copy's hook computes it again from the
    copy's parameters, which get their gradients, and the model is left alone."""
    x, y = torch.randn(5, 12), torch.arange(5) % 3
    clock = FakeClock(monkeypatch)
    plain = dynrank.profile_forms(mlp(), timed_step(clock, x, y), steps=1, warmup=0, log=None)
    model = mlp()
    sources = _hook_norm(kind, model[4])
    nn.functional.cross_entropy(model(x), y).backward()                  # the computed weight is no leaf now
    assert model[4].weight.grad_fn is not None
    weight = model[4].weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twins = []

    def step(twin, optimizer):
        timed_step(clock, x, y)(twin, optimizer)
        twins.append(twin)

    clock.calls.clear()
    profile = dynrank.profile_forms(model, step, steps=1, warmup=0, log=None)
    assert clock.calls == ["full", "lowrank", "adapter"]
    head = sum(getattr(model[4], n).numel() for n in sources) - weight.numel()
    assert profile.trainable == {form: n + head for form, n in plain.trainable.items()}
    for twin in twins:                     # the weight was computed from the copy's parameters, which trained
        assert twin[4].weight.grad_fn is not None
        for n in sources:
            assert getattr(twin[4], n) is not getattr(model[4], n) and getattr(twin[4], n).grad is not None
    assert model[4].weight is weight and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_dynrank_layer_under_hook_based_weight_norm_is_profiled_in_its_form(monkeypatch):
    """The documented way to profile a dynrank layer under the hook-based weight_norm, forms=("full",),
    failed in the copy as on a plain layer."""
    x, y = torch.randn(5, 12), torch.arange(5) % 3
    model = mlp()
    model[0].inflate()
    model[2].inflate()
    torch.nn.utils.weight_norm(model[0])
    nn.functional.cross_entropy(model(x), y).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clock = FakeClock(monkeypatch)
    twins = []

    def step(twin, optimizer):
        timed_step(clock, x, y)(twin, optimizer)
        twins.append(twin)

    profile = dynrank.profile_forms(model, step, forms=("full",), steps=1, warmup=0, log=None)
    assert clock.calls == ["full"] and list(profile.seconds) == ["full"]
    assert profile.trainable["full"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert twins[0][0].weight_g.grad is not None and twins[0][0].weight_v.grad is not None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_an_adapter_layer_deflated_at_another_rank_is_timed_lowrank_at_its_lowrank_rank(monkeypatch):
    """A layer lowrank at rank 4, then deflated to rank 8 (a scheduler's deflate_rank), was timed in lowrank
    form at rank 8 while param_counts and cost_report count its lowrank epochs at rank 4."""
    model = mlp()                                  # layer 0: 12 → 16 at rank 3, layer 2: 16 → 16 at rank 4
    for layer, rank in ((model[0], 1), (model[2], 8)):
        layer.inflate()
        layer.deflate(rank=rank)
    x, y = torch.randn(5, 12), torch.arange(5) % 3
    clock = FakeClock(monkeypatch)
    ranks = {}

    def step(twin, optimizer):
        timed_step(clock, x, y)(twin, optimizer)
        ranks[twin[0].form] = tuple(m.rank for m in twin.modules() if isinstance(m, FormLayer))

    profile = dynrank.profile_forms(model, step, steps=1, warmup=0, log=None)
    assert ranks == {"full": (1, 8), "lowrank": (3, 4), "adapter": (1, 8)}
    head = 16 * 3 + 3
    assert profile.trainable == {"full": (12 * 16 + 16) + (16 * 16 + 16) + head,
                                 "lowrank": (3 * 28 + 16) + (4 * 32 + 16) + head,
                                 "adapter": (1 * 28 + 16) + (8 * 32 + 16) + head}
    counts = param_counts(model)
    assert (counts.full, counts.lowrank) == (profile.trainable["full"], profile.trainable["lowrank"])
    assert cost_report(model, 10, 3, 7, run=profile).counts.lowrank == profile.trainable["lowrank"]
    assert (model[0].form, model[0].rank, model[2].form, model[2].rank) == ("adapter", 1, "adapter", 8)
    # A layer that was never lowrank here (built in adapter form) is timed, and counted, at its rank.
    built = nn.Sequential(FusedLowRankLinear(12, 16, rank=2, form="adapter"), nn.ReLU(), nn.Linear(16, 3))
    ranks.clear()
    profile = dynrank.profile_forms(built, step, forms="lowrank", steps=1, warmup=0, log=None)
    assert ranks["lowrank"] == (2,)
    assert profile.trainable["lowrank"] == param_counts(built).lowrank == 2 * 28 + 16 + head

    # One loaded from an adapter-form state dict knows no more: the rank it had in lowrank form before the load
    # (4 here) is not the run's that saved the dict, which is timed, and counted, at the dict's rank as well.
    loaded = nn.Sequential(FusedLowRankLinear(12, 16, rank=4), nn.ReLU(), nn.Linear(16, 3))
    loaded.load_state_dict(built.state_dict())
    assert (loaded[0].form, loaded[0].rank) == ("adapter", 2)
    ranks.clear()
    profile = dynrank.profile_forms(loaded, step, forms="lowrank", steps=1, warmup=0, log=None)
    assert ranks["lowrank"] == (2,)
    assert profile.trainable["lowrank"] == param_counts(loaded).lowrank == 2 * 28 + 16 + head


def test_pythons_and_numpys_rng_are_put_back(monkeypatch):
    """Only torch's RNG was restored: a step drawing from random or numpy (augmentation) left a seeded run
    changed after profiling."""
    model = mlp()
    x, y = torch.randn(5, 12), torch.arange(5) % 3
    clock = FakeClock(monkeypatch)

    def step(twin, optimizer):
        noise = random.random() + float(np.random.rand())
        timed_step(clock, x + noise, y)(twin, optimizer)

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    python_rng, numpy_rng, torch_rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    dynrank.profile_forms(model, step, steps=2, warmup=1, log=None)
    assert len(clock.calls) == 9
    assert random.getstate() == python_rng and torch.equal(torch.get_rng_state(), torch_rng)
    after = np.random.get_state()
    assert after[0] == numpy_rng[0] and np.array_equal(after[1], numpy_rng[1]) and after[2:] == numpy_rng[2:]
    # and where the step raises, they are put back too
    with pytest.raises(ZeroDivisionError):
        dynrank.profile_forms(model, lambda twin, optimizer: (random.random(), np.random.rand(), 1 / 0), log=None)
    assert random.getstate() == python_rng and np.array_equal(np.random.get_state()[1], numpy_rng[1])
