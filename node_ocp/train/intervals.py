"""Small-sample statistics of comparisons: t intervals, paired differences and ratios,
bootstrap intervals of medians, the sign test, and verdicts in words.

Everything works on plain lists of floats (one value per seed); ``math.inf`` stands for
"never reached" in times to a target. No SciPy: the t quantiles come from a table.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

#: Two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t975(df: int) -> float:
    """``t_{0.975, df}``: the table for df <= 30, a Cornish–Fisher expansion above."""
    if df < 1:
        raise ValueError(f"df: received {df}; accepted: an int >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a 95% interval over ``n`` values (``lo``/``hi`` NaN if n < 2)."""

    value: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def excludes(self, x: float) -> bool:
        """Whether the interval lies wholly on one side of ``x`` (False when undefined)."""
        return math.isfinite(self.lo) and (self.lo > x or self.hi < x)


def finite(xs) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(x)]


def mean_interval(xs) -> Interval:
    """Mean of the finite values with the t interval ``mean ± t_{0.975,n-1} s / √n``."""
    xs = finite(xs)
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = statistics.fmean(xs)
    if n < 2:
        return Interval(m, math.nan, math.nan, 1)
    h = t975(n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return Interval(m, m - h, m + h, n)


def paired_difference(a: dict, b: dict) -> Interval:
    """Mean of ``a[s] - b[s]`` over the seeds ``s`` both hold finite values for, with its t
    interval (``a``, ``b``: seed -> value)."""
    seeds = sorted(s for s in a if s in b and _ok(a[s]) and _ok(b[s]))
    return mean_interval([a[s] - b[s] for s in seeds])


def paired_ratio(a: dict, b: dict) -> Interval:
    """Geometric mean of ``a[s] / b[s]`` over the seeds both hold finite positive values for,
    with the t interval of the mean log ratio mapped back (``exp``)."""
    seeds = sorted(s for s in a if s in b and _ok(a[s]) and _ok(b[s]) and a[s] > 0 and b[s] > 0)
    logs = mean_interval([math.log(a[s] / b[s]) for s in seeds])
    back = [math.exp(v) if math.isfinite(v) else v for v in (logs.value, logs.lo, logs.hi)]
    return Interval(*back, logs.n)


def median_interval(xs, resamples: int = 2000, seed: int = 0) -> Interval:
    """Median of ``xs`` (``inf`` allowed: "never") with a 95% percentile-bootstrap interval
    (a fixed seed: the same numbers give the same interval)."""
    xs = [float(x) for x in xs if x is not None and not math.isnan(x)]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    med = statistics.median(xs)
    if n < 2:
        return Interval(med, math.nan, math.nan, 1)
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=n)) for _ in range(resamples))
    lo = meds[int(0.025 * resamples)]
    hi = meds[min(resamples - 1, int(math.ceil(0.975 * resamples)) - 1)]
    return Interval(med, lo, hi, n)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign-test p-value of ``wins`` against ``losses`` (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _ok(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _g(v: float) -> str:
    return f"{v:.3g}"


@dataclass(frozen=True)
class Verdict:
    """What a comparison of ``name`` with ``baseline`` showed.

    outcome: ``win``, ``loss`` or ``tie`` on the test metric (a 95% interval of the paired
    difference that excludes 0, or not); time: the paired time-to-target ratio.
    """

    name: str
    baseline: str
    outcome: str
    difference: Interval
    time_ratio: Interval
    reached: tuple[int, int]
    baseline_reached: tuple[int, int]
    text: str


def verdict(
    name: str,
    baseline: str,
    metric: str,
    higher_is_better: bool,
    test: dict,
    base_test: dict,
    times: dict,
    base_times: dict,
) -> Verdict:
    """The verdict in words of ``name`` against ``baseline``.

    ``test``/``base_test``: seed -> final test metric (NaN: diverged); ``times``/
    ``base_times``: seed -> training seconds to the target (``inf``: never reached).
    """
    diff = paired_difference(test, base_test)
    ratio = paired_ratio(times, base_times)
    reached = (sum(_ok(t) for t in times.values()), len(times))
    base_reached = (sum(_ok(t) for t in base_times.values()), len(base_times))
    parts = []
    if reached[0] and ratio.n:
        span = f" [{_g(ratio.lo)}, {_g(ratio.hi)}]" if ratio.n > 1 else ""
        parts.append(
            f"{name} reached the target in {_g(ratio.value)}× {baseline}'s time{span}, "
            f"{reached[0]}/{reached[1]} seeds ({baseline} {base_reached[0]}/{base_reached[1]})"
        )
    elif reached[0]:
        parts.append(
            f"{name} reached the target in {reached[0]}/{reached[1]} seeds, {baseline} in "
            f"{base_reached[0]}/{base_reached[1]}"
        )
    else:
        parts.append(
            f"{name} did not reach the target ({baseline}: {base_reached[0]}/"
            f"{base_reached[1]} seeds)"
        )
    if diff.n == 0:
        outcome = "loss" if any(_ok(v) for v in base_test.values()) else "tie"
        parts.append(f"test {metric}: no seed of {name} finished with a finite value")
    elif diff.excludes(0.0):
        better = (diff.value > 0) == higher_is_better
        outcome = "win" if better else "loss"
        word = "higher" if diff.value > 0 else "lower"
        parts.append(f"test {metric} {word} by {_g(abs(diff.value))} ± {_g(diff.half_width)}")
    else:
        outcome = "tie"
        spread = f" ({diff.value:+.3g} ± {_g(diff.half_width)})" if diff.n > 1 else ""
        parts.append(
            f"test {metric}: no difference detected at {diff.n} seed"
            f"{'s' if diff.n != 1 else ''}{spread}"
        )
    return Verdict(name, baseline, outcome, diff, ratio, reached, base_reached, "; ".join(parts))
