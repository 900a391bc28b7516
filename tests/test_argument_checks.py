"""One rule for real-valued and whole-number arguments, and one check for a layer's floating-point dtype.

A real-valued argument of the wrong type (str, None where None means nothing, complex, bool, a
tensor) is a TypeError naming the expected type and what came; a number out of range or not finite
is a ValueError naming the range and the value.  A whole-number argument is the same with int for
number: a float (even 4.0) is of the wrong type, a numpy integer is an int.
"""

import functools
import math
import re
import types
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from _helpers import REL_TOL, rel_err

from dynrank import (SRIP, DynamicRankScheduler, IncrementalRankScheduler, LowRankConv2d, RankMonitor,
                     SoftOrthogonality, convert_model, schedule_from_lr)
from dynrank._forms import check_floating_dtype
from dynrank.cost import (ParamCounts, comp_ratio, epoch_times, form_epochs, layer_param_counts, measured_comp_ratio,
                          param_counts)
from dynrank._args import check_int, check_real
from dynrank.linear import FusedLowRankLinear, check_alpha, check_ratio
from dynrank._checks import form_layers
from dynrank.distributed import dynrank_params
from dynrank.functional import lowrank_linear, merge_
from dynrank.metrics import layer_metrics, model_metrics, monitored_layers
from dynrank.regularizers import srip_penalty
from dynrank.spectra import restricted_spectral_ratio


def _inrank(threshold):
    model = nn.Sequential(FusedLowRankLinear(4, 4, rank=2))
    return IncrementalRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), threshold=threshold)


def _timed(seconds):
    return epoch_times([{"epoch": 0, "form": "full", "wall_seconds": seconds}])


# name → (call taking the value, expected type words, range words)
REAL_ARGUMENTS = {
    "linear alpha": (lambda v: FusedLowRankLinear(6, 9, rank=2, alpha=v), "alpha must be a number or None",
                     "alpha must be a finite number > 0 (the scale is alpha / rank)"),
    "conv alpha": (lambda v: LowRankConv2d(4, 6, 3, rank=2, alpha=v), "alpha must be a number or None",
                   "alpha must be a finite number > 0 (the scale is alpha / rank)"),
    "conv rank_ratio": (lambda v: LowRankConv2d(4, 6, 3, rank_ratio=v), "rank_ratio must be a float in (0, 1]",
                        "rank_ratio must be in (0, 1]"),
    "linear rank_for_ratio": (lambda v: FusedLowRankLinear(6, 9, rank=2).rank_for_ratio(v),
                              "rank_ratio must be a float in (0, 1]", "rank_ratio must be in (0, 1]"),
    "convert_model rank_ratio": (lambda v: convert_model(nn.Sequential(nn.Linear(8, 8)), rank_ratio=v),
                                 "rank_ratio must be a float in (0, 1]", "rank_ratio must be in (0, 1]"),
    "convert_model alpha": (lambda v: convert_model(nn.Sequential(nn.Linear(8, 8)), alpha=v),
                            "alpha must be a number or None",
                            "alpha must be a finite number > 0 (the scale is alpha / rank)"),
    "layer_param_counts rank_ratio": (lambda v: layer_param_counts((8, 8), rank_ratio=v),
                                      "rank_ratio must be a float in (0, 1]", "rank_ratio must be in (0, 1]"),
    "wall_seconds": (_timed, "wall_seconds must be a finite number ≥ 0 or None",
                     "wall_seconds must be a finite number ≥ 0 or None"),
    "regularizer coef": (SoftOrthogonality, "coef must be a finite number >= 0", "coef must be a finite number >= 0"),
    "inrank threshold": (_inrank, "threshold must be a float in (0, 1)", "threshold must be in (0, 1)"),
    "metrics tol": (lambda v: layer_metrics(nn.Linear(4, 4), tol=v), "tol must be a float in [0, 1)",
                    "tol must be a relative tolerance in [0, 1)"),
}

# Values of the wrong type; None only where it does not stand for a default.
WRONG_TYPES = ["0.5", 0.5j, True, torch.tensor(0.5)]
NONE_MEANS_NOTHING = {"convert_model rank_ratio", "layer_param_counts rank_ratio", "regularizer coef", "inrank threshold",
                      "linear rank_for_ratio"}
OUT_OF_RANGE = [-1.0, math.nan, math.inf]


def _cases(values, extra_none=False):
    for name in REAL_ARGUMENTS:
        for value in values + ([None] if extra_none and name in NONE_MEANS_NOTHING else []):
            yield pytest.param(name, value, id=f"{name}-{value!r}")


@pytest.mark.parametrize("name, value", _cases(WRONG_TYPES, extra_none=True))
def test_a_value_of_the_wrong_type_is_a_type_error(name, value):
    call, type_words, _ = REAL_ARGUMENTS[name]
    with pytest.raises(TypeError, match=re.escape(f"{type_words}, got {type(value).__name__} ({value!r})")):
        call(value)


@pytest.mark.parametrize("name, value", _cases(OUT_OF_RANGE))
def test_a_number_out_of_range_is_a_value_error(name, value):
    call, _, range_words = REAL_ARGUMENTS[name]
    with pytest.raises(ValueError, match=re.escape(f"{range_words}, got {value!r}")):
        call(value)


def test_wall_seconds_of_the_wrong_type_names_the_record():
    records = [{"epoch": 0, "form": "full", "wall_seconds": 2.0}, {"epoch": 7, "form": "full", "wall_seconds": "3 s"}]
    message = re.escape("wall_seconds must be a finite number ≥ 0 or None, got str ('3 s') in record 1 (epoch 7)")
    with pytest.raises(TypeError, match=f"^{message}$"):
        epoch_times(records)
    with pytest.raises(TypeError, match=f"^{message}$"):
        measured_comp_ratio(records)
    del records[1]["epoch"]
    with pytest.raises(TypeError, match=re.escape("got str ('3 s') in record 1") + "$"):
        epoch_times(records)
    with pytest.raises(ValueError, match=re.escape("got -1.0 in record 1") + "$"):
        epoch_times([records[0], {"form": "full", "wall_seconds": -1.0}])


def test_check_real_takes_every_real_number_and_no_bool():
    for value in (0.25, 1, np.float32(0.25), np.int64(3), Fraction(1, 4)):
        assert check_real(value, "x", "a number") is value
    with pytest.raises(TypeError, match=r"^x must be a number, got bool \(False\) in y$"):
        check_real(False, "x", "a number", " in y")
    with pytest.raises(TypeError, match=r"^x must be a number, got NoneType \(None\)$"):
        check_real(None, "x", "a number")


def test_checked_numbers_come_back_as_float_and_the_message_shows_the_value_given():
    assert type(check_ratio(np.float32(0.5))) is float and check_ratio(Fraction(1, 2)) == 0.5
    assert type(check_alpha(np.int64(4))) is float and check_alpha(None) is None
    with pytest.raises(ValueError, match=r"^rank_ratio must be in \(0, 1\], got 2$"):
        check_ratio(2)
    with pytest.raises(ValueError, match=r"^threshold must be in \(0, 1\), got 1$"):
        _inrank(1)
    assert _inrank(np.float64(0.5)).threshold == 0.5


# -- whole-number arguments ----------------------------------------------------------------

def _inrank_with(**settings):
    model = nn.Sequential(FusedLowRankLinear(8, 8, rank=4))
    return IncrementalRankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), **settings)


def _inrank_loading(last_step):
    sched = _inrank_with(init_rank=1, buffer=2)
    state = sched.state_dict()
    state["last_step"] = last_step
    sched.load_state_dict(state)
    return sched


def _two_linears():
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))


# name → (call taking the value, expected type words, range words, a value out of range, a value in range,
# whether None stands for a default)
INT_ARGUMENTS = {
    "comp_ratio counts": (lambda v: comp_ratio(ParamCounts(full=10, lowrank=v, other=0), 4, 1, 2),
                          "counts.lowrank must be a parameter count (int ≥ 0)",
                          "counts.lowrank must be a parameter count (int ≥ 0)", -1, 5, False),
    "linear in_features": (lambda v: FusedLowRankLinear(v, 9, rank=2), "in_features must be a positive int",
                           "in_features must be a positive int", 0, 6, False),
    "linear out_features": (lambda v: FusedLowRankLinear(6, v, rank=2), "out_features must be a positive int",
                            "out_features must be a positive int", 0, 9, False),
    "linear rank": (lambda v: FusedLowRankLinear(6, 9, rank=v), "rank must be an int", "rank must be in [1, 6]",
                    7, 2, False),
    "linear scale_for rank": (lambda v: FusedLowRankLinear(6, 9, rank=2, alpha=4.0).scale_for(v),
                              "rank must be a positive int", "rank must be a positive int", 0, 3, False),
    "conv in_channels": (lambda v: LowRankConv2d(v, 6, 3, rank=2), "in_channels must be a positive int",
                         "in_channels must be a positive int", 0, 4, False),
    "conv out_channels": (lambda v: LowRankConv2d(4, v, 3, rank=2), "out_channels must be a positive int",
                          "out_channels must be a positive int", 0, 6, False),
    "conv groups": (lambda v: LowRankConv2d(4, 6, 3, rank=2, groups=v), "groups must be a positive int",
                    "groups must be a positive int", 0, 2, False),
    "conv kernel_size": (lambda v: LowRankConv2d(4, 6, v, rank=2), "kernel_size must be an int ≥ 1 or a pair of them",
                         "kernel_size must be an int ≥ 1 or a pair of them", 0, 3, False),
    "conv kernel_size pair": (lambda v: LowRankConv2d(4, 6, (3, v), rank=2),
                              "kernel_size must be an int ≥ 1 or a pair of them",
                              "kernel_size must be an int ≥ 1 or a pair of them", 0, 3, False),
    "conv stride": (lambda v: LowRankConv2d(4, 6, 3, rank=2, stride=v), "stride must be an int ≥ 1 or a pair of them",
                    "stride must be an int ≥ 1 or a pair of them", 0, 2, False),
    "conv padding": (lambda v: LowRankConv2d(4, 6, 3, rank=2, padding=[v, 1]),
                     "padding must be an int ≥ 0 or a pair of them", "padding must be an int ≥ 0 or a pair of them",
                     -1, 1, False),
    "conv dilation": (lambda v: LowRankConv2d(4, 6, 3, rank=2, dilation=v),
                      "dilation must be an int ≥ 1 or a pair of them", "dilation must be an int ≥ 1 or a pair of them",
                      0, 2, False),
    "convert_model min_features": (lambda v: convert_model(_two_linears(), min_features=v),
                                   "min_features must be a positive int", "min_features must be a positive int",
                                   0, 4, False),
    "srip_penalty n_power_iterations": (lambda v: srip_penalty(torch.eye(3), n_power_iterations=v),
                                        "n_power_iterations must be an int ≥ 1 or None",
                                        "n_power_iterations must be an int ≥ 1 or None", 0, 3, True),
    "regularizer n_power_iterations": (lambda v: SRIP(1.0, n_power_iterations=v),
                                       "n_power_iterations must be an int ≥ 1", "n_power_iterations must be an int ≥ 1",
                                       0, 3, False),
    "inrank buffer": (lambda v: _inrank_with(buffer=v), "buffer must be an int >= 1", "buffer must be an int >= 1",
                      0, 2, False),
    "inrank warmup_steps": (lambda v: _inrank_with(warmup_steps=v), "warmup_steps must be an int >= 0",
                            "warmup_steps must be an int >= 0", -1, 0, False),
    "inrank check_every": (lambda v: _inrank_with(check_every=v), "check_every must be an int >= 1",
                           "check_every must be an int >= 1", 0, 5, False),
    "inrank init_rank": (lambda v: _inrank_with(init_rank=v), "init_rank must be a positive int or None",
                         "init_rank must be a positive int or None", 0, 2, True),
    "inrank max_rank": (lambda v: _inrank_with(max_rank=v), "max_rank must be an int or None", "max_rank must be >= 1",
                        0, 6, True),
    "inrank step": (lambda v: _inrank_with(warmup_steps=10).step(v), "step must be a non-negative int",
                    "step must be a non-negative int", -1, 3, True),
    "inrank last_step": (_inrank_loading, "last_step must be a non-negative int", "last_step must be a non-negative int",
                         -1, 3, False),
    "layer_param_counts shape": (lambda v: layer_param_counts((8, v)),
                                 "shape must be (out, in) or (F, C, kh, kw) of positive ints",
                                 "shape must be (out, in) or (F, C, kh, kw) of positive ints", 0, 8, False),
    "param_counts other_params": (lambda v: param_counts([(8, 8)], other_params=v), "other_params must be an int ≥ 0",
                                  "other_params must be an int ≥ 0", -1, 10, False),
    "form_epochs epochs": (lambda v: form_epochs(v, 1, 2), "epochs must be an int ≥ 1", "epochs must be an int ≥ 1",
                           0, 4, False),
    "epoch_times skip_first": (lambda v: epoch_times([], skip_first=v), "skip_first must be an int ≥ 0",
                               "skip_first must be an int ≥ 0", -1, 1, False),
    "monitor metrics_every": (lambda v: RankMonitor(_two_linears(), metrics_every=v),
                              "metrics_every must be an int ≥ 1", "metrics_every must be an int ≥ 1", 0, 2, False),
    "schedule epochs": (lambda v: schedule_from_lr(v, milestones=[50]), "epochs must be an int", "epochs must be >= 2",
                        1, 100, False),
    "schedule milestones": (lambda v: schedule_from_lr(100, milestones=[v]), "milestones[0] must be an int",
                            "the first milestone must be in (0, 100)", 0, 50, False),
    "schedule granularity": (lambda v: schedule_from_lr(150, milestones=[100, 130], granularity=v),
                             "granularity must be a positive int", "granularity must be a positive int", 0, 5, False),
    "restricted_spectral_ratio rank": (lambda v: restricted_spectral_ratio(torch.ones(3), v),
                                       "rank must be an int in [1, 3]", "rank must be an int in [1, 3]", 4, 2, False),
}

# A str padding is of the right type (for "valid" and "same"): "4" is out of range, tested below.
WRONG_INT_TYPES = ["4", 4.0, np.float64(4.0), True, np.bool_(True), torch.tensor(4), 4 + 0j]


def _int_cases(name_filter=lambda name: True):
    for name, (*_, none_is_default) in INT_ARGUMENTS.items():
        for value in WRONG_INT_TYPES + ([] if none_is_default else [None]):
            if not (name == "conv padding" and isinstance(value, str)):
                yield pytest.param(name, value, id=f"{name}-{value!r}")


@pytest.mark.parametrize("name, value", _int_cases())
def test_a_whole_number_of_the_wrong_type_is_a_type_error(name, value):
    call, type_words, *_ = INT_ARGUMENTS[name]
    with pytest.raises(TypeError, match=re.escape(f"{type_words}, got {type(value).__name__} ({value!r})")):
        call(value)


@pytest.mark.parametrize("name", INT_ARGUMENTS)
def test_a_whole_number_out_of_range_is_a_value_error(name):
    call, _, range_words, out_of_range, *_ = INT_ARGUMENTS[name]
    with pytest.raises(ValueError, match=re.escape(f"{range_words}, got {out_of_range!r}")):
        call(out_of_range)


def _snapshot(obj, seen=None):
    """Everything ``obj`` holds, down to each value's type (a tensor by its bytes), to compare two results."""
    seen = {} if seen is None else seen
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, np.generic, torch.dtype, torch.device)):
        return type(obj), repr(obj)
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return type(obj), t.dtype, tuple(t.shape), obj.requires_grad, t.numpy().tobytes()
    if id(obj) in seen:
        return "seen", seen[id(obj)]
    seen[id(obj)] = len(seen)
    if isinstance(obj, dict):
        return type(obj), [(_snapshot(k, seen), _snapshot(v, seen)) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return type(obj), [_snapshot(v, seen) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return type(obj), sorted(repr(_snapshot(v, seen)) for v in obj)
    if isinstance(obj, (types.FunctionType, types.MethodType, functools.partial, type)):
        return type(obj), getattr(obj, "__qualname__", None)
    if hasattr(obj, "__dict__"):
        return type(obj), _snapshot(vars(obj), seen)
    return type(obj), re.sub(r"0x[0-9a-f]+", "0x", repr(obj))


@pytest.mark.parametrize("name", INT_ARGUMENTS)
def test_a_numpy_integer_is_a_whole_number(name):
    """A numpy integer gives what the same int gives, down to the type of every value kept."""
    call, *_, in_range, _ = INT_ARGUMENTS[name]
    results = []
    for value in (int(in_range), np.int64(in_range), np.int32(in_range)):
        torch.manual_seed(0)
        results.append(_snapshot(call(value)))
    assert results[1] == results[0] and results[2] == results[0]


def test_checked_whole_numbers_come_back_as_int():
    layer = FusedLowRankLinear(np.int64(6), np.int32(9), rank=np.int64(2))
    assert (type(layer.in_features), type(layer.out_features), type(layer.rank)) == (int, int, int)
    conv = LowRankConv2d(np.int64(4), 6, (np.int64(3), 3), rank=2, stride=np.int16(1), groups=np.int64(2))
    assert all(type(v) is int for v in (conv.in_channels, conv.groups, *conv.kernel_size, *conv.stride))
    assert type(SRIP(1.0, n_power_iterations=np.int64(3)).n_power_iterations) is int
    sched = _inrank_with(buffer=np.int64(2), warmup_steps=np.int64(0), check_every=np.int64(5))
    assert all(type(v) is int for v in (sched.buffer, sched.warmup_steps, sched.check_every))
    sched.step(np.int64(3))
    assert type(sched.last_step) is int and sched.last_step == 3


def test_an_epoch_number_must_be_an_int():
    monitor = RankMonitor(nn.Sequential(FusedLowRankLinear(4, 4, rank=2)))
    for value in WRONG_INT_TYPES:
        with pytest.raises(TypeError, match=re.escape(f"epoch must be an int or None, got {type(value).__name__} "
                                                      f"({value!r})")):
            monitor.start_epoch(value)
    monitor.start_epoch(np.int64(3))
    assert type(monitor.end_epoch()["epoch"]) is int and monitor.epochs == [3]


def test_a_padding_string_is_of_the_right_type():
    with pytest.raises(ValueError, match=r"^padding must be an int, a pair, 'valid' or 'same', got '4'$"):
        LowRankConv2d(4, 6, 3, rank=2, padding="4")
    with pytest.raises(ValueError, match=r"^kernel_size must be an int ≥ 1 or a pair of them, got \(3, 3, 3\)$"):
        LowRankConv2d(4, 6, (3, 3, 3), rank=2)


def test_check_int_takes_every_integral_number_and_no_bool():
    for value in (3, np.int64(3), np.uint8(3)):
        assert check_int(value, "x", "an int") == 3 and type(check_int(value, "x", "an int")) is int
    assert check_int(-5, "x", "an int") == -5
    assert check_int(8, "x", "an int in [1, 8]", 1, 8) == 8
    with pytest.raises(TypeError, match=r"^x must be an int, got bool \(False\) in y$"):
        check_int(False, "x", "an int", where=" in y")
    with pytest.raises(TypeError, match=r"^x must be a positive int, got float \(2\.0\)$"):
        check_int(2.0, "x", "a positive int", 1)
    with pytest.raises(ValueError, match=r"^x must be a positive int, got 0 in y$"):
        check_int(0, "x", "a positive int", 1, where=" in y")
    with pytest.raises(ValueError, match=r"^x must be an int in \[1, 8\], got 9$"):
        check_int(9, "x", "an int in [1, 8]", 1, 8)


def test_scale_for_takes_a_positive_int_rank():
    """scale_for checked nothing: rank 0 was a ZeroDivisionError, -1 gave -4.0, 2.5 gave 1.6."""
    layer = FusedLowRankLinear(6, 9, rank=2, alpha=4.0)
    assert layer.scale_for(3) == 4.0 / 3 and layer.scale_for(np.int64(4)) == 1.0 and layer.scale == 2.0
    assert FusedLowRankLinear(6, 9, rank=2).scale_for(5) == 1.0
    for rank in (-1, 0):
        with pytest.raises(ValueError, match=rf"^rank must be a positive int, got {rank}$"):
            layer.scale_for(rank)
    for layer_alpha in (4.0, None):
        with pytest.raises(TypeError, match=r"^rank must be a positive int, got float \(2\.5\)$"):
            FusedLowRankLinear(6, 9, rank=2, alpha=layer_alpha).scale_for(2.5)


def test_a_wrong_type_in_a_state_dict_names_the_state_dict():
    with pytest.raises(TypeError, match=r"^invalid IncrementalRankScheduler state dict: last_step must be a "
                                        r"non-negative int, got float \(3\.0\)$"):
        _inrank_loading(3.0)


# -- the floating-point dtype check -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_check_floating_dtype_passes_floating_point_dtypes(dtype):
    assert check_floating_dtype(dtype) is dtype
    assert check_floating_dtype(dtype, allow_none=True) is dtype


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, "float32", None], ids=str)
def test_check_floating_dtype_refuses_the_rest(dtype):
    with pytest.raises(TypeError, match=f"^from_dense needs a floating-point kernel: dtype must be a floating-point "
                                        f"dtype, got {re.escape(repr(dtype))}$"):
        check_floating_dtype(dtype, needed_by="from_dense needs a floating-point kernel: ")
    if dtype is None:
        assert check_floating_dtype(None, allow_none=True) is None
    else:
        with pytest.raises(TypeError, match=f"^dtype must be a floating-point torch.dtype or None, got "
                                            f"{re.escape(repr(dtype))}$"):
            check_floating_dtype(dtype, allow_none=True)


@pytest.mark.parametrize("init", ["dense", "fresh"])
def test_convert_model_checks_the_dtype_before_building_a_layer(init):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    model[0].weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match=r"could not convert '0' \(Linear.*\): dtype must be a floating-point dtype, "
                                        r"got torch\.int32; the model is left as it was"):
        convert_model(model, form="adapter", init=init)


# -- a scale that float32 cannot hold -------------------------------------------------------------

F32_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, None], ids=str)
def test_an_alpha_above_float32s_range_is_refused_below_float64(dtype):
    """alpha=1e300 passed as finite: the adapter's forward then raised torch's "value cannot be converted
    to type float without overflow", the lowrank one returned inf.  torch applies a scale to float32 and
    16-bit tensors in float32."""
    message = re.escape(f"alpha must be at most {F32_MAX:.6g} (float32's largest value) for a "
                        f"{dtype or torch.float32} layer")
    with pytest.raises(ValueError, match=message + r".*got 1e\+300$"):
        FusedLowRankLinear(6, 5, rank=2, alpha=1e300, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        check_alpha(np.float64(1e39), dtype)
    assert check_alpha(F32_MAX, dtype) == F32_MAX


def test_a_float64_layer_takes_an_alpha_above_float32s_range():
    layer = FusedLowRankLinear(6, 5, rank=2, alpha=1e300, form="full", dtype=torch.float64)
    layer.deflate(init="random")
    x = torch.randn(3, 6, dtype=torch.float64)
    A, B = layer.A.detach(), layer.B.detach()
    expected = x @ layer.weight.detach().t() + 5e299 * (x @ B) @ A.t() + layer.bias.detach()
    assert torch.isfinite(expected).all() and layer.scale == 5e299
    assert rel_err(layer(x) / 1e300, expected / 1e300) < REL_TOL[torch.float64]    # norms of 1e300s overflow
    # convert_model holds alpha to each layer's dtype, and names the layer it cannot build
    convert_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).double(), alpha=1e300)
    with pytest.raises(ValueError, match=r"could not convert '0' \(Linear.*\): alpha must be at most 3\.40282e\+38 "
                                         r"\(float32's largest value\) for a torch\.float32 layer.*the model is left "
                                         r"as it was"):
        convert_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), alpha=1e300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_a_functional_scale_above_float32s_range_is_refused_below_float64(dtype):
    """functional.lowrank_linear(scale=1e300) and merge_(alpha=1e300) raised a bare RuntimeError from torch on
    float32 tensors; float64 ones compute with it."""
    x, W, A, B = (torch.randn(*shape, dtype=torch.float64) for shape in ((3, 4), (5, 4), (5, 2), (4, 2)))
    big = -1e300 if dtype == torch.float64 else -2 * F32_MAX
    if dtype == torch.float64:                        # compared at 1e300 times smaller: their norms overflow
        y = lowrank_linear(x, W, A, B, scale=big)
        assert rel_err(y / -big, (x @ W.t() + big * (x @ B) @ A.t()) / -big) < REL_TOL[dtype]
        assert rel_err(merge_(W.clone(), A, B, alpha=big) / -big, (W + big * A @ B.t()) / -big) < REL_TOL[dtype]
        return
    x, W, A, B = (t.to(dtype) for t in (x, W, A, B))
    for call, name in ((lambda v: lowrank_linear(x, W, A, B, scale=v), "scale"),
                       (lambda v: lowrank_linear(x, None, A, B, scale=torch.tensor(v, dtype=torch.float64)), "scale"),
                       (lambda v: merge_(W.clone(), A, B, alpha=v), "alpha")):
        with pytest.raises(ValueError, match=re.escape(f"{name} must be at most {F32_MAX:.6g} in magnitude (float32's "
                                                       f"largest value: torch applies it to {dtype} tensors in "
                                                       f"float32; float64 ones take any finite {name}), got {big}")):
            call(big)
    assert torch.isfinite(merge_(W.float().clone(), A.float(), B.float(), alpha=F32_MAX / 1e6)).all()


# -- what a model or a filter must be --------------------------------------------------------------

@pytest.mark.parametrize("value", [None, "model", 3, [nn.Linear(4, 4)]], ids=repr)
def test_dynrank_params_of_something_that_is_not_a_module_is_a_type_error(value):
    """form_layers (dynrank_params, allreduce_grads, the schedulers) raised an AttributeError from inside."""
    with pytest.raises(TypeError, match=rf"^model must be a torch\.nn\.Module, got {type(value).__name__}$"):
        dynrank_params(value)
    with pytest.raises(TypeError, match=rf"^model must be a torch\.nn\.Module, got {type(value).__name__}$"):
        form_layers(value)
    model = nn.Sequential(FusedLowRankLinear(4, 4, rank=2))
    assert dynrank_params(model) == set(model.parameters())


def test_a_module_is_not_a_filter():
    """A module (callable) given as include/exclude/layers was called as a predicate: "ReLU.forward() takes
    2 positional arguments but 3 were given"."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    for what in ("include", "exclude"):
        for value in (nn.ReLU(), model[2], nn.Sequential(nn.Linear(8, 8))):
            with pytest.raises(TypeError, match=re.escape(f"{what} must be a name/glob, a list of them, a callable "
                                                          f"(name, module) -> bool or None, got a "
                                                          f"{type(value).__name__} module: pass its name")):
                convert_model(model, **{what: value})
    assert all(type(m) is not FusedLowRankLinear for m in model)                  # left as it was
    converted = nn.Sequential(FusedLowRankLinear(6, 5, rank=2), nn.ReLU())
    layers = re.escape("layers must be None, module names (a str or an iterable of str) or a predicate "
                       "fn(name, module), got a ReLU module: pass its name")
    for call in (lambda v: model_metrics(converted, layers=v), lambda v: monitored_layers(converted, v),
                 lambda v: RankMonitor(converted, layers=v)):
        with pytest.raises(TypeError, match=layers):
            call(nn.ReLU())
    assert list(model_metrics(converted, layers=lambda name, m: name == "0")) == ["0"]
    convert_model(model, include=lambda name, m: name == "2")
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "FusedLowRankLinear", "Linear"]


def test_a_factor_a_second_optimizer_trains_is_named_by_the_dynamic_rank_scheduler():
    """Only a layer left out of the optimizer whole was warned of: one holding a layer's A, with its B in a
    second optimizer, passed, and after the switch the second optimizer stepped the old B.  Each such factor is
    named now, beside the warning for a whole layer left out (one of each here)."""
    torch.manual_seed(0)
    model = nn.Sequential(FusedLowRankLinear(16, 16, rank=4), nn.ReLU(), FusedLowRankLinear(16, 8, rank=2),
                          nn.ReLU(), FusedLowRankLinear(8, 2, rank=2))
    opt_main = torch.optim.SGD([model[0].A, model[2].A, *model[4].parameters()], lr=0.1)
    opt_rest = torch.optim.SGD([model[0].B, model[2].B, model[0].bias, model[2].bias], lr=0.1)
    model[2].B.requires_grad_(False)                # a frozen factor out of the optimizer: nothing to say
    with pytest.warns(UserWarning) as said:
        sched = DynamicRankScheduler(model, opt_main, 1, 2)
    assert [str(w.message) for w in said] == [
        "parameter '0.B' is trainable but not in the optimizer DynamicRankScheduler was given, though that holds "
        "others of its layer's: a switch or resize replaces it and puts the new one in no other optimizer (one a "
        "second optimizer trains stops training); put it in the optimizer DynamicRankScheduler was given, or "
        "freeze it"]
    assert said[0].filename == __file__
    model[2].B.requires_grad_(True)
    model[2].A.requires_grad_(False)                # a layer whose trainable factor is left out whole
    with pytest.warns(UserWarning) as said:
        DynamicRankScheduler(model, opt_main, 1, 2)
    assert [str(w.message)[:60] for w in said] == [
        "layer '2' is trainable but not in the optimizer DynamicRankS",
        "parameter '0.B' is trainable but not in the optimizer Dynami"]
    model[2].A.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"^parameters '0\.B', '2\.B' are trainable but not in the optimizer "
                                         r"DynamicRankScheduler was given, though that holds others of their "
                                         r"layers': a switch or resize replaces them and puts the new ones in no "
                                         r"other optimizer"):
        DynamicRankScheduler(model, opt_main, 1, 2)
    sched.step(1)                                   # inflate: what the warning is about
    assert not any(p is q for p in opt_rest.param_groups[0]["params"] for q in model.parameters() if q.dim() == 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # every trainable factor held: nothing to say
        fresh = nn.Sequential(FusedLowRankLinear(16, 16, rank=4))
        DynamicRankScheduler(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), 1, 2)
