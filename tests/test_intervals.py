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


def _v(test, base_test, times, base_times, higher=False, **extra):
    """ocnopt against adam on nll; ``extra``: best_test / far_worse of each side
    (``best_test=(ocnopt's, adam's)``)."""
    side = {k: v[0] for k, v in extra.items()}
    base = {k: v[1] for k, v in extra.items()}
    return intervals.verdict(
        "nll",
        higher,
        intervals.Side("ocnopt", test, times, **side),
        intervals.Side("adam", base_test, base_times, **base),
    )


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
        "ocnopt's final test nll is lower (better) than adam's on every seed (3/3, sign test "
        f"p = 0.25), by 0.2 ± {half:.3g}; ocnopt reached the target in 0.5× [0.5, 0.5] "
        "adam's time over seeds 0,1,2, where both reached it (ocnopt 3/3, adam 3/3)"
    )


def test_verdict_clear_loss_when_higher_is_better():
    v = _v(
        {0: 0.80, 1: 0.82, 2: 0.81},
        {0: 0.95, 1: 0.96, 2: 0.94},
        {0: math.inf, 1: math.inf, 2: 9.0},
        {0: 1.0, 1: 2.0, 2: 3.0},
        higher=True,
    )
    assert v.outcome == "loss" and v.final.every_seed == "worse"
    assert v.text.startswith("ocnopt's final test nll is lower (worse) than adam's on every seed")
    assert "by 0.14 ±" in v.text
    # the one seed both reached: 9.0 / 3.0, and which seed that is
    assert v.text.endswith(
        "ocnopt reached the target in 3× adam's time on seed 2, the only seed where both "
        "reached it (ocnopt 1/3, adam 3/3)"
    )
    assert v.time_ratio.value == pytest.approx(3.0) and v.time.both == (2,)


def test_verdict_no_detectable_difference():
    v = _v({0: 1.0, 1: 1.3}, {0: 1.1, 1: 1.1}, {0: math.inf, 1: math.inf}, {0: 1.0, 1: 2.0})
    assert v.outcome == "tie" and v.final.every_seed is None
    assert v.text == (
        "ocnopt never reached the target; adam did on 2/2 seeds; "
        "final test nll: no difference detected at 2 seeds (+0.05 ± 1.91, ocnopt better on "
        "1/2 seeds)"
    )


# ------------------------------------------- issue 23: reports that agree with themselves
def test_time_ratio_names_the_one_seed_it_is_over():
    """The baseline reached the target on 1/2 seeds, ocnopt on 2/2: the ratio is over seed 0
    alone, and the headline and the table cell say so (once: '1.15×, 2/2 seeds')."""
    t = intervals.time_ratio("ocnopt", "adam", {0: 2.3, 1: 1.0}, {0: 2.0, 1: math.inf})
    assert t.both == (0,) and t.ratio.value == pytest.approx(1.15) and t.ratio.n == 1
    assert t.text == (
        "ocnopt reached the target in 1.15× adam's time on seed 0, the only seed where both "
        "reached it (ocnopt 2/2, adam 1/2)"
    )
    assert t.cell == "1.15× on seed 0, the only seed where both reached it"


def test_time_ratio_is_undefined_when_one_never_reached_the_target():
    t = intervals.time_ratio("ocnopt", "adam", {0: 2.3, 1: 1.0}, {0: math.inf, 1: math.inf})
    assert t.ratio.n == 0 and t.both == ()
    assert t.text == t.cell == "adam never reached the target; ocnopt did on 2/2 seeds"
    t = intervals.time_ratio("ocnopt", "adam", {0: math.inf}, {0: 4.0})
    assert t.text == "ocnopt never reached the target; adam did on 1/1 seeds"
    t = intervals.time_ratio("ocnopt", "adam", {0: math.inf}, {0: math.inf})
    assert t.cell == "neither ocnopt nor adam reached the target"
    t = intervals.time_ratio("ocnopt", "adam", {0: 1.0, 1: math.inf}, {0: math.inf, 1: 2.0})
    assert t.cell == (
        "ocnopt (seed 0) and adam (seed 1) never reached the target on the same seed: no time ratio"
    )


def test_a_loss_on_every_seed_leads_and_is_not_called_no_difference():
    """The small tabular CNF of issue 23: ocnopt ends 40-130x worse than adam on every seed
    and touched the target once, early; the t interval includes 0 (three seeds)."""
    adam = {0: 12.0, 1: 10.0, 2: 11.0}
    ocn = {0: 480.0, 1: 1300.0, 2: 1430.0}  # 40x, 130x, 130x
    v = _v(ocn, adam, {0: math.inf, 1: math.inf, 2: 0.35}, {0: 2.0, 1: 3.0, 2: 3.0})
    assert v.outcome == "tie" and not v.difference.excludes(0.0)  # the interval: no call
    assert v.final.every_seed == "worse" and v.final.sign_p == pytest.approx(0.25)
    assert "no difference" not in v.text
    assert v.text.startswith(
        "ocnopt's final test nll is higher (worse) than adam's on every seed (3/3, sign test "
        "p = 0.25), by 468 to 1.42e+03 (mean +1.06e+03 ± "
    )
    assert "the t interval includes 0" in v.text.split(";")[0]
    assert v.text.endswith(
        "ocnopt reached the target in 0.117× adam's time on seed 2, the only seed where both "
        "reached it (ocnopt 1/3, adam 3/3)"
    )


def test_a_run_that_ended_far_worse_than_its_best_is_said_and_leads():
    far = {1: {"first": 20.0, "first_step": 0, "best": 9.0, "best_step": 40, "final": 15.0}}
    v = _v(
        {0: 1.0, 1: 1.3},
        {0: 1.1, 1: 1.1},  # mixed signs: the metric alone would not lead
        {0: 1.0, 1: 1.0},
        {0: 2.0, 1: 2.0},
        far_worse=({**far}, {}),
    )
    parts = v.text.split("; ")
    assert parts[0].startswith("final test nll: no difference detected at 2 seeds")
    assert parts[1] == (
        "ocnopt ended far worse than its best on 1/2 seeds (final val nll vs best: seed 1: 15 vs "
        "9 at step 40)"
    )
    assert parts[2].startswith("ocnopt reached the target in 0.5× [0.5, 0.5] adam's time")


def test_diverged_seeds_and_best_val_figures_are_named():
    v = _v(
        {0: 1.0, 1: math.nan, 2: 1.2},
        {0: 1.1, 1: 1.0, 2: 1.0},
        {0: 1.0, 1: math.inf, 2: 1.0},
        {0: 2.0, 1: 2.0, 2: 2.0},
        best_test=({0: 0.9, 1: None, 2: 0.8}, {0: 1.0, 1: 1.0, 2: 1.0}),
    )
    assert "final test nll: no difference detected at 2 seeds" in v.text
    # the best-validation models: lower on both finished seeds
    assert "ocnopt's best-val test nll is lower (better) than adam's on every seed (2/2" in v.text
    assert "ocnopt diverged on seed 1 (1/3)" in v.text
    assert v.text.index("final test nll") < v.text.index("best-val test nll")


def test_verdict_says_nothing_is_consistent_for_one_seed():
    v = _v({0: 1.0}, {0: 2.0}, {0: 1.0}, {0: 1.0})
    assert v.final.every_seed is None  # one seed is no 'every seed'
    assert v.text == (
        "ocnopt reached the target in 1× adam's time on seed 0, the only seed where both "
        "reached it (ocnopt 1/1, adam 1/1); final test nll: one seed (-1), no interval"
    )


def test_best_val_models_that_are_the_final_ones_are_said_once():
    v = _v(
        {0: 1.0, 1: 1.2},
        {0: 1.1, 1: 1.0},
        {0: 1.0, 1: 1.0},
        {0: 2.0, 1: 2.0},
        best_test=({0: 1.0, 1: 1.2}, {0: 1.1, 1: 1.0}),
    )
    assert v.best is None and "best-val test nll" not in v.text
    assert "final (= best-val) test nll: no difference detected at 2 seeds" in v.text
