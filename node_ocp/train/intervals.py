"""Small-sample statistics of comparisons: t intervals, paired differences and ratios,
bootstrap intervals of medians, the sign test, and verdicts in words.

Everything works on plain lists of floats (one value per seed); ``math.inf`` stands for
"never reached" in times to a target. No SciPy: the t quantiles come from a table.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field

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


def seeds_text(seeds) -> str:
    """``seed 2`` or ``seeds 0,1,2``: which seeds a figure is over."""
    seeds = list(seeds)
    return f"seed{'s' if len(seeds) != 1 else ''} {','.join(str(s) for s in seeds)}"


@dataclass(frozen=True)
class TimeRatio:
    """``name``'s time to the target against ``baseline``'s, seeds paired.

    ``ratio``: the geometric mean of the per-seed ratios over ``both``, the seeds where both
    reached the target (undefined, n = 0, where there is none); ``hit``/``base_hit``: the
    seeds each reached it on, of ``seeds``/``base_seeds``. The one source of the time ratio
    that the headline, the verdicts (:attr:`text`) and the table (:attr:`cell`) print.
    """

    name: str
    baseline: str
    ratio: Interval
    both: tuple
    hit: tuple
    base_hit: tuple
    seeds: int
    base_seeds: int

    @property
    def counts(self) -> str:
        """``ocnopt 2/2, adam 1/2``: how many seeds each reached the target on."""
        return (
            f"{self.name} {len(self.hit)}/{self.seeds}, "
            f"{self.baseline} {len(self.base_hit)}/{self.base_seeds}"
        )

    @property
    def text(self) -> str:
        """The time ratio in words, naming the seeds it is over."""
        if not self.both:
            return self.undefined
        return (
            f"{self.name} reached the target in {self._value()} {self.baseline}'s time "
            f"{self._where()} ({self.counts})"
        )

    @property
    def cell(self) -> str:
        """The same ratio as a table cell (the same words where it is undefined)."""
        if not self.both:
            return self.undefined
        return f"{self._value()} {self._where()}"

    @property
    def undefined(self) -> str:
        """Why there is no ratio: who never reached the target, who did and on how many."""
        name, base = self.name, self.baseline
        if self.hit and not self.base_hit:
            return (
                f"{base} never reached the target; {name} did on {len(self.hit)}/{self.seeds} seeds"
            )
        if self.base_hit and not self.hit:
            return (
                f"{name} never reached the target; {base} did on "
                f"{len(self.base_hit)}/{self.base_seeds} seeds"
            )
        if not self.hit:
            return f"neither {name} nor {base} reached the target"
        return (
            f"{name} ({seeds_text(self.hit)}) and {base} ({seeds_text(self.base_hit)}) never "
            "reached the target on the same seed: no time ratio"
        )

    def _value(self) -> str:
        r = self.ratio
        span = f" [{_g(r.lo)}, {_g(r.hi)}]" if r.n > 1 else ""
        return f"{_g(r.value)}×{span}"

    def _where(self) -> str:
        if len(self.both) == 1:
            return f"on seed {self.both[0]}, the only seed where both reached it"
        return f"over {seeds_text(self.both)}, where both reached it"


def time_ratio(name: str, baseline: str, times: dict, base_times: dict) -> TimeRatio:
    """``name``'s seconds to the target against ``baseline``'s (seed -> seconds, ``inf``:
    never), the geometric mean over the seeds where both reached it."""
    hit = tuple(sorted(s for s, t in times.items() if _ok(t)))
    base_hit = tuple(sorted(s for s, t in base_times.items() if _ok(t)))
    both = tuple(s for s in hit if s in base_hit and times[s] > 0 and base_times[s] > 0)
    ratio = paired_ratio({s: times[s] for s in both}, {s: base_times[s] for s in both})
    return TimeRatio(name, baseline, ratio, both, hit, base_hit, len(times), len(base_times))


@dataclass(frozen=True)
class MetricComparison:
    """``name``'s ``label`` (e.g. "final test nll") against ``baseline``'s, seeds paired.

    difference: the mean paired difference (name − baseline) with its t interval; better /
    worse / ties: the paired seeds on which ``name`` did better, worse, the same; outcome:
    ``win``/``loss`` when the t interval excludes 0, else ``tie`` (``loss`` too when no seed
    of ``name`` finished with a finite value and one of the baseline's did).
    """

    name: str
    baseline: str
    label: str
    higher_is_better: bool
    difference: Interval
    diffs: tuple
    better: tuple
    worse: tuple
    ties: tuple
    outcome: str

    @property
    def sign_p(self) -> float:
        """Two-sided sign-test p-value of the better against the worse seeds."""
        return sign_test(len(self.better), len(self.worse))

    @property
    def every_seed(self) -> str | None:
        """``better`` or ``worse`` when ``name`` was so on every paired seed (two or more,
        no ties), else None."""
        n = self.difference.n
        if n < 2 or self.ties:
            return None
        if len(self.better) == n:
            return "better"
        return "worse" if len(self.worse) == n else None

    @property
    def shows(self) -> bool:
        """Whether the metric shows something: an interval that excludes 0, the same sign
        on every seed, or no finished seed."""
        d = self.difference
        return d.n == 0 or d.excludes(0.0) or self.every_seed is not None

    @property
    def text(self) -> str:
        """The comparison in words."""
        d, n = self.difference, self.difference.n
        if n == 0:
            return f"{self.label}: no seed of {self.name} finished with a finite value"
        if self.every_seed:
            return self._every_seed_text()
        if d.excludes(0.0):
            return (
                f"{self.name}'s {self.label} is {self._word(d.value)} than {self.baseline}'s by "
                f"{_g(abs(d.value))} ± {_g(d.half_width)} ({self._counts()})"
            )
        if n == 1:
            return f"{self.label}: one seed ({d.value:+.3g}), no interval"
        return (
            f"{self.label}: no difference detected at {n} seeds "
            f"({d.value:+.3g} ± {_g(d.half_width)}, {self._counts()})"
        )

    def _every_seed_text(self) -> str:
        d, n = self.difference, self.difference.n
        head = (
            f"{self.name}'s {self.label} is {self._word(d.value)} than {self.baseline}'s on "
            f"every seed ({n}/{n}, sign test p = {self.sign_p:.2g})"
        )
        if d.excludes(0.0):
            return f"{head}, by {_g(abs(d.value))} ± {_g(d.half_width)}"
        size = sorted(abs(x) for x in self.diffs)
        return (
            f"{head}, by {_g(size[0])} to {_g(size[-1])} (mean {d.value:+.3g} ± "
            f"{_g(d.half_width)}: the t interval includes 0)"
        )

    def _word(self, diff: float) -> str:
        better = (diff > 0) == self.higher_is_better
        return f"{'higher' if diff > 0 else 'lower'} ({'better' if better else 'worse'})"

    def _counts(self) -> str:
        n = self.difference.n
        said = f"{self.name} better on {len(self.better)}/{n} seeds"
        return said + (f", the same on {len(self.ties)}" if self.ties else "")


def compare_metric(
    name: str, baseline: str, label: str, higher_is_better: bool, a: dict, b: dict
) -> MetricComparison:
    """``name``'s per-seed values ``a`` against ``baseline``'s ``b`` (seed -> value; NaN or
    None: none), paired over the seeds both hold finite values for."""
    seeds = sorted(s for s in a if s in b and _ok(a[s]) and _ok(b[s]))
    diffs = tuple(a[s] - b[s] for s in seeds)
    diff = mean_interval(diffs)
    up = tuple(s for s, x in zip(seeds, diffs) if x > 0)
    down = tuple(s for s, x in zip(seeds, diffs) if x < 0)
    better, worse = (up, down) if higher_is_better else (down, up)
    ties = tuple(s for s, x in zip(seeds, diffs) if x == 0)
    if diff.n == 0:
        outcome = "loss" if any(_ok(v) for v in b.values()) else "tie"
    elif diff.excludes(0.0):
        outcome = "win" if (diff.value > 0) == higher_is_better else "loss"
    else:
        outcome = "tie"
    return MetricComparison(
        name, baseline, label, higher_is_better, diff, diffs, better, worse, ties, outcome
    )


@dataclass(frozen=True)
class Side:
    """One optimizer's per-seed figures in a verdict.

    test: seed -> final model's test metric (NaN: diverged); times: seed -> training
    seconds to the target (``inf``: never); best_test: seed -> test metric of the run's
    best-validation model (None: the run has none); far_worse: seed -> ``{"final", "best",
    "best_step"}`` validation figures of the runs that ended far worse than their best
    (see :func:`node_ocp.train.compare.ended_far_worse`).
    """

    name: str
    test: dict
    times: dict
    best_test: dict = field(default_factory=dict)
    far_worse: dict = field(default_factory=dict)

    @property
    def has_best(self) -> bool:
        """Whether any run holds best-validation figures."""
        return any(_ok(v) for v in self.best_test.values())

    @property
    def best_is_final(self) -> bool:
        """Whether every finished run's best-validation model is its final one (the same
        test figure)."""
        return all(self.best_test.get(s) == v for s, v in self.test.items() if _ok(v))

    def events(self, metric: str) -> list[str]:
        """Runs that diverged or ended far worse than their best, in words."""
        n = len(self.test)
        out = []
        diverged = [s for s, v in self.test.items() if not _ok(v)]
        if diverged:
            out.append(f"{self.name} diverged on {seeds_text(diverged)} ({len(diverged)}/{n})")
        if self.far_worse:
            each = ", ".join(_fell_back(s, f) for s, f in sorted(self.far_worse.items()))
            out.append(
                f"{self.name} ended far worse than its best on {len(self.far_worse)}/{n} "
                f"seeds (final val {metric} vs best: {each})"
            )
        return out


def _fell_back(seed, f: dict) -> str:
    """``seed 0: 480 vs 30 at step 10``: a run's final and best validation figures."""
    first = " (its first evaluation)" if f["best_step"] == f.get("first_step") else ""
    return f"seed {seed}: {_g(f['final'])} vs {_g(f['best'])} at step {f['best_step']}{first}"


@dataclass(frozen=True)
class Verdict:
    """What a comparison of ``name`` with ``baseline`` showed.

    outcome: ``win``, ``loss`` or ``tie`` on the final test metric (a 95% interval of the
    paired difference that excludes 0, or not); final / best: the final models' and the
    best-validation models' test metrics compared (best None where a side has none);
    time: the paired time-to-target ratio (``time_ratio`` its interval).
    """

    name: str
    baseline: str
    outcome: str
    difference: Interval
    time_ratio: Interval
    reached: tuple[int, int]
    baseline_reached: tuple[int, int]
    text: str
    final: MetricComparison | None = None
    best: MetricComparison | None = None
    time: TimeRatio | None = None


def verdict(metric: str, higher_is_better: bool, side: Side, base: Side) -> Verdict:
    """The verdict in words of ``side`` against ``base``.

    The final models' test metric, the best-validation models' (where both have them and
    they are not the final ones on every seed: then "final (= best-val)"), the
    runs that diverged or ended far worse than their best, and the time ratio. The time
    ratio leads only when the metric shows nothing (no difference detected, signs mixed)
    and no run diverged or ended far worse; otherwise the metric leads.
    """
    name, baseline = side.name, base.name
    both_best = side.has_best and base.has_best
    same = both_best and side.best_is_final and base.best_is_final
    label = f"final {'(= best-val) ' if same else ''}test {metric}"
    final = compare_metric(name, baseline, label, higher_is_better, side.test, base.test)
    best = None
    if both_best and not same:
        best = compare_metric(
            name,
            baseline,
            f"best-val test {metric}",
            higher_is_better,
            side.best_test,
            base.best_test,
        )
    time = time_ratio(name, baseline, side.times, base.times)
    said = [final.text] + ([best.text] if best else [])
    events = side.events(metric) + base.events(metric)
    parts = said + events + [time.text]
    if not (final.shows or events):
        parts = [time.text] + said
    reached = (len(time.hit), time.seeds)
    base_reached = (len(time.base_hit), time.base_seeds)
    return Verdict(
        name,
        baseline,
        final.outcome,
        final.difference,
        time.ratio,
        reached,
        base_reached,
        "; ".join(parts),
        final,
        best,
        time,
    )
