"""Intervals, paired comparisons, the sign test and verdict wording on fixed numbers."""

import math

import pytest

from node_ocp.train import intervals


def test_t_interval_against_a_hand_computation():
    xs = [1.0, 2.0, 4.0]  # mean 7/3, sample variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3
    i = intervals.mean_interval(xs)
    half = 4.3027 * math.sqrt(7 / 3) / math.sqrt(3)
    assert (i.value, i.n) == (pytest.approx(7 / 3), 3)
    assert (i.lo, i.hi) == (pytest.approx(7 / 3 - half), pytest.approx(7 / 3 + half))
    one = intervals.mean_interval([5.0, math.nan])  # non-finite values are left out
    assert one.value == 5.0 and one.n == 1 and math.isnan(one.lo) and not one.excludes(0)


def test_t_quantiles_table_and_large_df():
    assert intervals.t975(1) == 12.7062 and intervals.t975(10) == 2.2281
    assert intervals.t975(60) == pytest.approx(2.0003, abs=2e-4)  # tables: 2.0003
    assert intervals.t975(1000) == pytest.approx(1.9623, abs=2e-4)


def test_paired_difference_and_ratio_pair_by_seed():
    a = {0: 1.0, 1: 2.0, 2: 4.0, 3: math.nan}
    b = {0: 0.0, 1: 0.0, 2: 0.0, 9: 1.0}
    d = intervals.paired_difference(a, b)
    assert d.n == 3 and d.value == pytest.approx(7 / 3)
    r = intervals.paired_ratio({0: 2.0, 1: 8.0, 2: math.inf}, {0: 1.0, 1: 2.0, 2: 1.0})
    logs = [math.log(2.0), math.log(4.0)]
    half = 12.7062 * abs(logs[0] - logs[1]) / math.sqrt(2) / math.sqrt(2)
    mean = sum(logs) / 2
    assert r.n == 2 and r.value == pytest.approx(math.sqrt(8.0))
    assert (r.lo, r.hi) == (
        pytest.approx(math.exp(mean - half)),
        pytest.approx(math.exp(mean + half)),
    )


def test_median_interval_with_never_and_a_fixed_seed():
    i = intervals.median_interval([1.0, 2.0, 3.0, math.inf, math.inf])
    assert i.value == 3.0 and i.lo >= 1.0 and math.isinf(i.hi)
    assert intervals.median_interval([1.0, 2.0, 3.0, 4.0]) == intervals.median_interval(
        [1.0, 2.0, 3.0, 4.0]
    )
    j = intervals.median_interval([5.0, 5.0, 5.0])
    assert (j.value, j.lo, j.hi) == (5.0, 5.0, 5.0)


def test_sign_test_exact_binomial():
    assert intervals.sign_test(6, 0) == pytest.approx(2 / 64)
    assert intervals.sign_test(5, 1) == pytest.approx(2 * 7 / 64)
    assert intervals.sign_test(3, 3) == 1.0 and intervals.sign_test(0, 0) == 1.0


def _v(test, base_test, times, base_times, higher=False):
    return intervals.verdict("ocnopt", "adam", "nll", higher, test, base_test, times, base_times)


def test_verdict_clear_win():
    v = _v(
        {0: 1.0, 1: 1.15, 2: 0.95},
        {0: 1.2, 1: 1.3, 2: 1.2},  # differences -0.2, -0.15, -0.25: mean -0.2, s = 0.05
        {0: 1.0, 1: 2.0, 2: 1.5},
        {0: 2.0, 1: 4.0, 2: 3.0},
    )
    assert v.outcome == "win"
    half = 4.3027 * 0.05 / math.sqrt(3)
    assert v.text == (
        "ocnopt reached the target in 0.5× adam's time [0.5, 0.5], 3/3 seeds (adam 3/3); "
        f"test nll lower by 0.2 ± {half:.3g}"
    )


def test_verdict_clear_loss_when_higher_is_better():
    v = _v(
        {0: 0.80, 1: 0.82, 2: 0.81},
        {0: 0.95, 1: 0.96, 2: 0.94},
        {0: math.inf, 1: math.inf, 2: 9.0},
        {0: 1.0, 1: 2.0, 2: 3.0},
        higher=True,
    )
    assert v.outcome == "loss"
    assert "test nll lower by 0.14 ±" in v.text
    assert "1/3 seeds (adam 3/3)" in v.text  # the one seed both reached: 9.0 / 3.0
    assert v.time_ratio.value == pytest.approx(3.0)


def test_verdict_no_detectable_difference():
    v = _v({0: 1.0, 1: 1.3}, {0: 1.1, 1: 1.1}, {0: math.inf, 1: math.inf}, {0: 1.0, 1: 2.0})
    assert v.outcome == "tie"
    assert v.text == (
        "ocnopt did not reach the target (adam: 2/2 seeds); "
        "test nll: no difference detected at 2 seeds (+0.05 ± 1.91)"
    )
