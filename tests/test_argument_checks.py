"""One rule for real-valued arguments, and one check for a layer's floating-point dtype.

A real-valued argument of the wrong type (str, None where None means nothing, complex, bool, a
tensor) is a TypeError naming the expected type and what came; a number out of range or not finite
is a ValueError naming the range and the value.
"""

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from dynrank import IncrementalRankScheduler, LowRankConv2d, SoftOrthogonality, convert_model
from dynrank._forms import check_floating_dtype
from dynrank.cost import ParamCounts, comp_ratio, epoch_times, layer_param_counts, measured_comp_ratio
from dynrank._args import check_real
from dynrank.linear import FusedLowRankLinear, check_alpha, check_ratio
from dynrank.metrics import layer_metrics


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
    "comp_ratio counts": (lambda v: comp_ratio(ParamCounts(full=10, lowrank=v, other=0), 4, 1, 2),
                          "counts.lowrank must be a parameter count (int ≥ 0)",
                          "counts.lowrank must be a parameter count (int ≥ 0)"),
    "wall_seconds": (_timed, "wall_seconds must be a finite number ≥ 0 or None",
                     "wall_seconds must be a finite number ≥ 0 or None"),
    "regularizer coef": (SoftOrthogonality, "coef must be a finite number >= 0", "coef must be a finite number >= 0"),
    "inrank threshold": (_inrank, "threshold must be a float in (0, 1)", "threshold must be in (0, 1)"),
    "metrics tol": (lambda v: layer_metrics(nn.Linear(4, 4), tol=v), "tol must be a float in [0, 1)",
                    "tol must be a relative tolerance in [0, 1)"),
}

# Values of the wrong type; None only where it does not stand for a default.
WRONG_TYPES = ["0.5", 0.5j, True, torch.tensor(0.5)]
NONE_MEANS_NOTHING = {"convert_model rank_ratio", "layer_param_counts rank_ratio", "comp_ratio counts",
                      "regularizer coef", "inrank threshold", "linear rank_for_ratio"}
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
