"""schedule_from_lr against the paper's settings (appendix Tables 7 and 10) and bad input."""

import math
from fractions import Fraction

import pytest
import torch

from dynrank.schedules import finetune_schedule, midpoint_schedule, regime_boundary, schedule_from_lr

PHIS = (0.1, 0.3, 0.5, 0.7, 0.9)
# Appendix Table 10: (I, D) per φ.
TABLE10_CIFAR10 = dict(zip(PHIS, [(92, 107), (75, 120), (60, 135), (45, 150), (15, 150)]))
TABLE10_CIFAR100 = dict(zip(PHIS, [(140, 160), (120, 180), (100, 200), (60, 200), (20, 200)]))


def lr_list(scheduler_factory, epochs, lr=0.1):
    """Per-epoch learning rates produced by a real torch LR scheduler."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = scheduler_factory(opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("phi", PHIS)
def test_table10_cifar100_every_phi(phi):
    assert schedule_from_lr(200, milestones=[150, 180], full_rank_fraction=phi) == TABLE10_CIFAR100[phi]


@pytest.mark.parametrize("phi", [0.1, 0.7, 0.9])
def test_table10_cifar10_unit_granularity(phi):
    assert schedule_from_lr(150, milestones=[100, 130], full_rank_fraction=phi) == TABLE10_CIFAR10[phi]


@pytest.mark.parametrize("phi", [0.3, 0.5, 0.7, 0.9])
def test_table10_cifar10_five_epoch_grid(phi):
    assert schedule_from_lr(150, milestones=[100, 130], full_rank_fraction=phi,
                            granularity=5) == TABLE10_CIFAR10[phi]


def test_table10_cifar10_documented_differences():
    # The paper snapped φ = 0.3, 0.5 to its 5-epoch grid; the exact half-split gives 2 epochs later.
    assert schedule_from_lr(150, milestones=[100, 130], full_rank_fraction=0.3) == (77, 122)
    assert schedule_from_lr(150, milestones=[100, 130], full_rank_fraction=0.5) == (62, 137)
    assert schedule_from_lr(150, milestones=[100, 130], full_rank_fraction=0.1, granularity=5) == (90, 105)


@pytest.mark.parametrize("epochs, milestones, tuned", [
    (150, [100, 130], (55, 120)),    # CIFAR-10
    (200, [150, 180], (80, 170)),    # CIFAR-100
    (100, [70, 90], (30, 80)),       # Tiny ImageNet
])
def test_table7_pairs_are_one_grid_step_from_the_regime_midpoints(epochs, milestones, tuned):
    start = midpoint_schedule(epochs, milestones=milestones)
    assert start == (milestones[0] // 2, (milestones[0] + epochs) // 2)
    assert all(abs(a - b) <= 5 for a, b in zip(start, tuned))


def test_paper_recommended_starting_point():
    assert midpoint_schedule(150, milestones=[100]) == (50, 125)        # §4.3


@pytest.mark.parametrize("epochs, boundary, expected", [
    (151, 100, (50, 125)),         # b + E = 251: D = 125.5 rounded down
    (150, 101, (50, 125)),         # odd b: I = 50.5 rounded down, and D too
    (11, 4, (2, 7)),
    (11, 5, (2, 8)),
])
def test_midpoint_schedule_rounds_odd_midpoints_down(epochs, boundary, expected):
    """I = b // 2 and D = (b + E) // 2 as documented, also where a middle falls between two epochs."""
    assert expected == (boundary // 2, (boundary + epochs) // 2)
    assert midpoint_schedule(epochs, milestones=[boundary]) == expected
    lrs = [0.1 if epoch < boundary else 0.01 for epoch in range(epochs)]
    assert midpoint_schedule(epochs, lrs=lrs) == expected


@pytest.mark.parametrize("epochs, milestones", [(150, [100, 130]), (200, [150, 180]), (90, [30, 60, 80])])
def test_step_schedule_as_lr_list_gives_the_same_pair(epochs, milestones):
    lrs = lr_list(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones, 0.1), epochs)
    assert regime_boundary(epochs, lrs=lrs) == milestones[0]
    for phi in PHIS:
        assert schedule_from_lr(epochs, lrs=lrs, full_rank_fraction=phi) == \
            schedule_from_lr(epochs, milestones=milestones, full_rank_fraction=phi)


@pytest.mark.parametrize("epochs", [50, 100, 150, 300])
def test_cosine_boundary_is_where_lr_falls_to_peak_over_sqrt10(epochs):
    lrs = lr_list(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, epochs), epochs)
    # Closed form: (1 + cos(π t/E))/2 ≤ 1/√10  ⇔  t ≥ E·acos(2/√10 − 1)/π.
    expected = math.ceil(epochs * math.acos(2 / math.sqrt(10) - 1) / math.pi - 1e-9)
    assert regime_boundary(epochs, lrs=lrs) == expected
    inflate, deflate = schedule_from_lr(epochs, lrs=lrs)
    assert deflate - inflate == round(0.5 * epochs)


def test_warmup_then_cosine_measures_from_the_peak():
    epochs, warm = 100, 10
    lrs = [0.1 * (e + 1) / warm if e < warm else
           0.05 * (1 + math.cos(math.pi * (e - warm) / (epochs - warm))) for e in range(epochs)]
    boundary = regime_boundary(epochs, lrs=lrs)
    assert lrs[boundary] <= 0.1 / math.sqrt(10) < lrs[boundary - 1]
    assert boundary > warm


@pytest.mark.parametrize("peak, low, threshold", [
    (0.7, 0.07, 0.1),                              # 0.7 · 0.1 is 0.06999999999999999 in binary
    (1.3, 1.3 * math.sqrt(10) / 10, None),         # the default 10 ** -0.5, computed another way
])
def test_an_lr_at_the_threshold_in_decimal_counts_as_reaching_it(peak, low, threshold):
    """The boundary is the first epoch after the peak at or below threshold × peak: an LR equal to that
    product but a rounding step above its binary value counts; one a millionth above does not."""
    kw = {} if threshold is None else {"threshold": threshold}
    assert low > peak * (threshold or 10 ** -0.5)  # just above the binary product
    assert regime_boundary(4, lrs=[peak, peak, low, low], **kw) == 2
    assert midpoint_schedule(4, lrs=[peak, peak, low, low], **kw) == (1, 3)
    with pytest.raises(ValueError, match=r"never falls to .* its peak"):
        regime_boundary(4, lrs=[peak, peak, low * (1 + 1e-6), low * (1 + 1e-6)], **kw)


@pytest.mark.parametrize("epochs", [10, 37, 150, 400])
@pytest.mark.parametrize("phi", [0.05, 0.25, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("where", [0.2, 0.5, 0.9])
def test_budget_and_straddle_invariants(epochs, phi, where):
    boundary = max(1, int(where * epochs))
    inflate, deflate = schedule_from_lr(epochs, milestones=[boundary], full_rank_fraction=phi)
    budget = max(1, min(epochs, math.floor(phi * epochs + 0.5)))
    assert 0 <= inflate < deflate <= epochs
    assert deflate - inflate == budget
    if 0 < inflate and deflate < epochs:                       # not pushed against an end
        assert abs((boundary - inflate) - (deflate - boundary)) <= 1
    else:
        assert inflate <= boundary <= deflate


def test_finetune_preset_matches_the_glue_settings():
    assert finetune_schedule(10) == (None, 5)                  # CoLA, RTE (Table 8)
    assert finetune_schedule(5) == (None, 2)                   # QNLI, STS-B
    assert finetune_schedule(3, deflate_fraction=0.1) == (None, 1)


def test_finetune_deflate_epoch_is_the_floor_of_the_decimal_product():
    """floor(fraction·E) in exact arithmetic: the binary product 0.29 · 100 = 28.999999999999996 gave 28."""
    for epochs in range(2, 201):
        for hundredths in range(1, 100):
            expected = max(1, math.floor(Fraction(hundredths, 100) * epochs))
            assert finetune_schedule(epochs, hundredths / 100) == (None, expected), (epochs, hundredths)
        for n in range(1, 6):                              # thirds, sixths: floats just below the fraction
            for d in (3, 6, 7):
                if n < d:
                    expected = max(1, math.floor(Fraction(n, d) * epochs))
                    assert finetune_schedule(epochs, n / d) == (None, expected), (epochs, n, d)
    for hundredths in (29, 57, 58):                        # steps rather than epochs: an absolute margin fell short
        assert finetune_schedule(10 ** 8, hundredths / 100) == (None, hundredths * 10 ** 6)
    for fraction, steps in (("0.9999", 100_000_001), ("0.99999", 100_000_001), ("0.999999", 1_000_001)):
        expected = math.floor(Fraction(fraction) * steps)  # a relative margin went past these by one
        assert finetune_schedule(steps, float(fraction)) == (None, expected), fraction


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"give exactly one of milestones \(step schedule\) or lrs \(per-epoch LR list\); "
                                         r"neither was given"):
        schedule_from_lr(100)
    with pytest.raises(ValueError, match=r"give exactly one of milestones \(step schedule\) or lrs \(per-epoch LR list\); "
                                         r"both were given"):
        schedule_from_lr(100, milestones=[50], lrs=[0.1] * 100)
    with pytest.raises(ValueError, match=r"the first milestone must be in \(0, 100\), got 100"):
        schedule_from_lr(100, milestones=[100])
    with pytest.raises(ValueError, match=r"milestones must be increasing, got \[60, 50\]"):
        schedule_from_lr(100, milestones=[60, 50])
    with pytest.raises(ValueError, match=r"lrs must have one entry per epoch \(100\), got 99"):
        schedule_from_lr(100, lrs=[0.1] * 99)
    with pytest.raises(ValueError, match=r"the learning rate never falls to 0\.316× its peak \(0\.1 at epoch 0; the lowest "
                                         r"after it is 1× at epoch 1\)"):
        schedule_from_lr(100, lrs=[0.1] * 100)
    with pytest.raises(ValueError, match=r"lrs must be finite, non-negative and not all zero, got lrs\[1\] = nan"):
        schedule_from_lr(3, lrs=[0.1, float("nan"), 0.0])
    with pytest.raises(ValueError, match=r"full_rank_fraction must be in \(0, 1\], got 0\.0"):
        schedule_from_lr(100, milestones=[50], full_rank_fraction=0.0)
    with pytest.raises(TypeError, match=r"full_rank_fraction must be a float, got str \('half'\)"):
        schedule_from_lr(100, milestones=[50], full_rank_fraction="half")
    with pytest.raises(ValueError, match="granularity must be a positive int, got 0"):
        schedule_from_lr(100, milestones=[50], granularity=0)
    with pytest.raises(ValueError, match="epochs must be >= 2, got 1"):
        schedule_from_lr(1, milestones=[1])
    with pytest.raises(TypeError, match=r"epochs must be an int, got float \(100\.0\)"):
        schedule_from_lr(100.0, milestones=[50])
    with pytest.raises(ValueError, match=r"deflate_fraction must be in \(0, 1\), got 1\.0"):
        finetune_schedule(10, deflate_fraction=1.0)


def test_bad_lr_arguments_say_what_broke():
    with pytest.raises(TypeError, match=r"^threshold must be a float in \(0, 1\), got str \('x'\)$"):
        schedule_from_lr(4, lrs=[1.0, 1.0, 0.1, 0.1], threshold="x")
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\), got nan"):
        midpoint_schedule(4, lrs=[1.0, 1.0, 0.1, 0.1], threshold=math.nan)
    for bad in (1.0, 0.0, -0.1, 1.5):              # 1.0: a constant LR would be "at" the threshold at once
        with pytest.raises(ValueError, match=rf"^threshold must be in \(0, 1\), got {bad}$"):
            regime_boundary(10, lrs=[0.1] * 10, threshold=bad)
    with pytest.raises(TypeError, match=r"^milestones must be a sequence of decay epochs \(e\.g\. \[100, 150\]\), "
                                        r"got int \(5\)$"):
        schedule_from_lr(10, milestones=5)
    with pytest.raises(TypeError, match=r"milestones must be a sequence of decay epochs .*got str \('50'\)"):
        regime_boundary(100, milestones="50")
    with pytest.raises(TypeError, match=r"^milestones\[1\] must be an int, got float \(60\.0\)$"):
        schedule_from_lr(100, milestones=[50, 60.0])
    with pytest.raises(TypeError, match=r"lrs must be a sequence of per-epoch learning rates .*got float \(0\.1\)"):
        schedule_from_lr(3, lrs=0.1)
    with pytest.raises(TypeError, match=r"lrs must hold numbers, got lrs\[2\] = '0\.01' \(str\)"):
        schedule_from_lr(3, lrs=[0.1, 0.1, "0.01"])
    for bad, at in (([0.1, 0.1, -0.01], "lrs\\[2\\] = -0.01"), ([math.inf, 0.1, 0.0], "lrs\\[0\\] = inf"),
                    ([0.0, 0.0, 0.0], "all 3 entries 0")):
        with pytest.raises(ValueError, match=f"^lrs must be finite, non-negative and not all zero, got {at}$"):
            schedule_from_lr(3, lrs=bad)
    # The lowest fraction of the peak reached after it: 0.4 at epoch 3 (a reference by hand).
    with pytest.raises(ValueError, match=r"^the learning rate never falls to 0\.316× its peak \(1 at epoch 0; the "
                                         r"lowest after it is 0\.4× at epoch 3\); there is no low-noise regime"):
        schedule_from_lr(5, lrs=[1.0, 0.5, 0.6, 0.4, 0.45])
    with pytest.raises(ValueError, match=r"never falls to 0\.5× its peak \(0\.3 at epoch 2; "
                                         r"the peak is the last epoch\)"):
        regime_boundary(3, lrs=[0.1, 0.2, 0.3], threshold=0.5)
    # Tensors and numpy arrays of LRs still work.
    assert regime_boundary(4, lrs=torch.tensor([1.0, 1.0, 0.1, 0.1])) == 2


def test_schedule_from_lr_rounds_the_exact_half_up():
    """The budget is round-half-up of φ·E read exactly: 0.29 · 50 = 14.5 is 14.499999999999998 in binary
    floating point, and came out 14 where 0.27 · 50 = 13.5 came out 14. Checked against Fraction
    arithmetic on the decimal φ for every E < 120 and φ = k/100."""
    for epochs in range(2, 120):
        for k in range(1, 101):
            phi = k / 100
            inflate, deflate = schedule_from_lr(epochs, milestones=[epochs // 2], full_rank_fraction=phi)
            budget = max(1, min(epochs, math.floor(Fraction(k, 100) * epochs + Fraction(1, 2))))
            assert deflate - inflate == budget, (epochs, phi)
    assert schedule_from_lr(50, milestones=[30], full_rank_fraction=0.29)[1] - \
        schedule_from_lr(50, milestones=[30], full_rank_fraction=0.29)[0] == 15


@pytest.mark.parametrize("phi, granularity, expected", [(0.03, 5, (100, 105)), (0.02, 5, (100, 103)),
                                                        (0.05, 10, (100, 108)), (1 / 150, 5, (100, 101))])
def test_a_coarse_grid_keeps_the_window_past_the_decay(phi, granularity, expected):
    """Rounded down to the grid, the whole window came before the decay at 100: (95, 100), (95, 98), (90, 98)."""
    assert schedule_from_lr(150, milestones=[100, 130], full_rank_fraction=phi, granularity=granularity) == expected


@pytest.mark.parametrize("granularity", [2, 5, 10, 25])
def test_with_a_grid_the_window_always_reaches_past_the_decay(granularity):
    for epochs in (30, 97, 150, 200):
        for boundary in range(1, epochs, 7):
            for hundredths in (1, 2, 3, 5, 8, 13, 30, 50, 90, 100):
                phi = hundredths / 100
                inflate, deflate = schedule_from_lr(epochs, milestones=[boundary], full_rank_fraction=phi,
                                                    granularity=granularity)
                budget = max(1, min(epochs, math.floor(Fraction(hundredths, 100) * epochs + Fraction(1, 2))))
                assert 0 <= inflate < deflate <= epochs and deflate - inflate == budget
                assert deflate > boundary, (epochs, boundary, phi)
                assert inflate % granularity == 0 or deflate == epochs, (epochs, boundary, phi)


def test_a_grid_coarser_than_the_run_is_refused():
    assert schedule_from_lr(150, milestones=[100], granularity=150) == (75, 150)
    with pytest.raises(ValueError, match=r"granularity must be at most epochs \(150\).*got 200"):
        schedule_from_lr(150, milestones=[100], granularity=200)
