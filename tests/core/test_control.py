"""The distillation coefficient's controller (jackpot.core.control) on sequences worked by hand.

coef' = clip(coef * exp(rate * clip(log(kl / target), -1, 1)), low, high). With target 0.1 and rate 0.1, a gap
twice the target multiplies the coefficient by exp(0.1 log 2) = 2^0.1 = 1.0717735, half the target by
2^-0.1 = 0.9330330; a gap 100x the target counts as e (log 100 = 4.6 clipped to 1): x e^0.1 = 1.1051709.
"""

from __future__ import annotations

import math

import pytest

from jackpot.core.control import LOG_ERROR_CLIP, kl_controlled_coef, log_kl_error

RULE = dict(target=0.1, rate=0.1, low=0.01, high=100.0)


def _run(coef: float, kls: list[float], **rule) -> list[float]:
    out = []
    for kl in kls:
        coef = kl_controlled_coef(coef, kl, **{**RULE, **rule})
        out.append(coef)
    return out


def test_above_below_and_at_the_target():
    # 2x the target twice, on target, then half the target: 2^0.1, 2^0.2, 2^0.2 (unchanged), 2^0.1
    assert _run(1.0, [0.2, 0.2, 0.1, 0.05]) == pytest.approx([1.0717735, 1.1486984, 1.1486984, 1.0717735],
                                                             rel=1e-7, abs=0)
    assert kl_controlled_coef(0.37, 0.1, **RULE) == 0.37  # exactly on target: bit for bit unchanged
    # 2x above and 2x below move the coefficient by the same factor (the error is a log-ratio)
    up, down = kl_controlled_coef(1.0, 0.2, **RULE), kl_controlled_coef(1.0, 0.05, **RULE)
    assert up * down == pytest.approx(1.0, abs=1e-12)


def test_one_outlier_batch_moves_the_coefficient_by_at_most_e_to_the_rate():
    assert LOG_ERROR_CLIP == 1.0
    assert kl_controlled_coef(1.0, 10.0, **RULE) == pytest.approx(1.1051709, rel=1e-7)  # log(100) = 4.6 -> 1
    assert kl_controlled_coef(1.0, math.inf, **RULE) == pytest.approx(1.1051709, rel=1e-7)
    assert kl_controlled_coef(1.0, 0.0, **RULE) == pytest.approx(0.9048374, rel=1e-7)  # identical models: -1
    assert kl_controlled_coef(1.0, 1e-9, **RULE) == pytest.approx(0.9048374, rel=1e-7)
    assert kl_controlled_coef(2.0, math.nan, **RULE) == 2.0  # no information: unchanged
    assert log_kl_error(0.2, 0.1) == pytest.approx(math.log(2), abs=1e-15)


def test_the_bounds_hold_and_do_not_wind_up():
    # far above the target from 1 with high = 1.2: e^0.1 = 1.105, then 1.221 -> 1.2, then held at 1.2
    assert _run(1.0, [10.0, 10.0, 10.0], high=1.2) == pytest.approx([1.1051709, 1.2, 1.2], rel=1e-7)
    # the gap falls below the target: the coefficient leaves the bound at the next step (log(coef) is stored
    # clipped, so no error accumulated while it was held): 1.2 * 2^-0.1 = 1.1196396
    assert kl_controlled_coef(1.2, 0.05, **{**RULE, "high": 1.2}) == pytest.approx(1.1196396, rel=1e-7)
    # far below from 1 with low = 0.85: e^-0.1 = 0.905, 0.819 -> 0.85, held
    assert _run(1.0, [0.0, 0.0, 0.0], low=0.85) == pytest.approx([0.9048374, 0.85, 0.85], rel=1e-7)
    # a long run far above reaches the upper bound after ceil(ln(100) / 0.1) = 47 steps and stays there
    trace = _run(1.0, [1.0] * 60)
    assert trace[45] < 100.0 and trace[46] == 100.0 and trace[-1] == 100.0


def test_the_gain_scales_the_step_in_log_space():
    assert math.log(kl_controlled_coef(1.0, 0.2, **{**RULE, "rate": 0.5})) == pytest.approx(0.5 * math.log(2),
                                                                                            abs=1e-12)


@pytest.mark.parametrize("kwargs", [dict(target=0.0), dict(target=-1.0), dict(rate=0.0), dict(low=2.0, high=1.0)])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        kl_controlled_coef(1.0, 0.2, **{**RULE, **kwargs})
