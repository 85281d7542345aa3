"""The step from the quadratic model, and the safeguards on the update taken.

With ``step="model"`` OCNOpt's update is ``δ = −α u + μ δ_prev``: ``u = P⁻¹ g`` the
preconditioned gradient (``P = C + λ`` the damped curvature the optimizer holds), ``δ_prev``
the previous update, ``μ`` the group's momentum, and ``α`` the minimiser of the quadratic
model

    m(δ) = gᵀδ + ½ κ δᵀ P δ

along ``u`` (Martens & Grosse, 2015, §7, with μ fixed): ``α = 1/κ + μ gᵀδ_prev / gᵀu``,
with the momentum dropped for a step where it goes uphill (:func:`momentum_step`),
computed every step from two inner products. ``κ`` calibrates
the held curvature to the true Gauss–Newton curvature of the loss: every ``adapt_every``
steps the optimizer evaluates the loss of the same batch at the planned update, ``θ + δ``
(one extra forward solve, through ``step(closure)``), and learns:

- the curvature along ``δ``: the Gauss–Newton product from the change of the model outputs,
  ``δᵀGδ = (o(θ+δ) − o(θ))ᵀ H (o(θ+δ) − o(θ))`` with ``H`` the Hessian of the loss in the
  outputs (a secant of ``J δ``; where the outputs or their likelihood are not handed over,
  none), or the secant of the loss itself, ``2(ΔL − gᵀδ)``, where that is larger
  (Gauss–Newton misses curvature outside the output Hessian, such as a flow's
  log-determinant);
- ``κ ← (that curvature + δᵀλδ) / δᵀPδ`` (the damping's own share counted once),
  trust-region style: the step may grow (``κ`` fall) only when the model predicted the
  trial well, by at most ``max_growth`` per adaptation, and shrink by at most ``max_change``;
- the reduction ratio ``ρ = (L(θ+δ) − L(θ)) / m(δ)`` of the model that planned the trial,
  which adapts λ (:mod:`.damping`).

A trial that lowered the loss is the step taken (the step is never one the batch has not
seen); one that did not is retried at ``shrink`` times the size.

A trial that failed — non-finite loss, a solver error, or a forward solve that took more than
``stiff_ratio`` times the function evaluations of the step's own forward solve (the update
stiffened the dynamics) without the decrease the model promised (``ρ < ¼``) — or raised the
loss is retried at ``shrink`` times the size, up to ``max_trials`` times; if none is
accepted the step leaves the parameters unchanged, ``κ`` grows by ``1/shrink`` per trial, λ
grows, and the next step adapts again — unless the last two trials raised the loss in
proportion to their lengths (:attr:`TrialOutcome.first_order_rise`): then the gradient, not
the curvature, disagreed with the loss, and ``κ`` and the trust region are kept. Growing
``κ`` a thousandfold there froze the step for good (a CNF whose adjoint gradient had gone
wrong for a few steps, §24 of ``bench_issue21.md``: ``κ`` 1.1 → 1.1e7 over three steps, and
only a fourfold fall per accepted trial to come back). ``lr`` caps ``α``. Without a
closure ``κ`` stays at its last value.

Between adaptations the step is kept inside a trust region around the last accepted trial:
its model curvature ``κ δᵀPδ`` (twice the decrease the model promises) and its squared length
``‖δ‖²`` may each be at most ``radius_growth`` = 4 times those of that trial (twice its
length). A gradient that
spikes between two trials, or a direction into which the held curvature is blind, cannot
throw the parameters much further than the last checked step.

``κ`` starts (:meth:`~.steppers.ModelStep.first_kappa`) at least at 1 and where the first
step's held model promises a decrease of at most a tenth of the loss (of 1 when the loss is
smaller) and moves the parameters by at most 5% of their norm: the held curvature of a mean
loss can be orders of magnitude too small.

The next step adapts again (instead of ``adapt_every`` steps later) when an accepted trial
showed room for more: its calibration wanted the step to grow beyond ``max_growth``, or the
step had been cut to the trust region and the model predicted it well (``ρ`` above the
damping's upper threshold, first trial). Without this, a cautious first κ or a trust region
shrunk by a rejected trial took ``adapt_every`` steps per factor of 4 to recover: a GRU
sequence model's loss stayed flat for its first ~30 steps and again for ~10 steps after
each rejection (measured with per-step traces of κ, α, λ, ρ and the trust-region cut).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

STEP_MODES: tuple[str, ...] = ("model", "fixed")
#: A change of the loss below this fraction of its value is rounding, not a rise.
ROUNDING = 1e-12


def momentum_step(gu: float, g_prev: float, kappa: float) -> tuple[float, bool]:
    """``(α, keep)``: the step along ``u`` and whether the momentum term is kept.

    Args:
        gu: ``gᵀu`` (= ``uᵀPu``, > 0 for a positive definite ``P``).
        g_prev: ``gᵀ(μ δ_prev)``, the slope of the loss along the momentum term.
        kappa: the curvature calibration ``κ`` (> 0).

    While the momentum term still goes downhill (``g_prev <= 0``), ``α`` minimises
    ``m(−α u + μ δ_prev)``: ``∂m/∂α = −gᵀu + κ(α gᵀu − gᵀ(μδ_prev)) = 0`` (using ``P u = g``)
    gives ``α = 1/κ + g_prev / gᵀu``, clamped at 0 — the step along ``u`` shrinks by what the
    momentum already moves downhill. Once it goes uphill the momentum is dropped for the step
    (a gradient restart, O'Donoghue & Candès, 2015) and ``α = 1/κ``.
    """
    if not gu > 0:
        return 0.0, g_prev <= 0
    if g_prev > 0:
        return 1.0 / kappa, False
    return max(0.0, 1.0 / kappa + g_prev / gu), True


@dataclass
class TrialOutcome:
    """The measurements of one trial update ``δ`` (all agreed over processes).

    Attributes:
        g_delta: ``gᵀδ`` (< 0 for a descent step).
        held: ``δᵀPδ``, the held damped curvature along ``δ``.
        kappa: the calibration ``κ`` of the model that planned ``δ``.
        damping: ``δᵀPδ − δᵀCδ``, the damping's own share of ``held``.
        actual: ``L(θ + δ) − L(θ)``; NaN when the trial failed.
        gauss_newton: ``δᵀGδ`` from the outputs (NaN when they were not handed over).
        stiff: the trial's forward solve stiffened the dynamics.
        loss: ``|L(θ)|``, the scale below which a change is rounding (at a minimum).
        previous: the change ``actual`` of the trial before this one, ``1/shrink`` times
            longer along the same direction (NaN for a first trial).
        shrink: the ratio of this trial's length to the previous one's.
    """

    g_delta: float
    held: float
    kappa: float
    damping: float
    actual: float
    gauss_newton: float = float("nan")
    stiff: bool = False
    loss: float = 0.0
    previous: float = float("nan")
    shrink: float = float("nan")

    @property
    def exact(self) -> bool:
        return math.isfinite(self.gauss_newton)

    @property
    def predicted(self) -> float:
        """``m(δ) = gᵀδ + ½ κ δᵀPδ``: the change the optimizer's model promised."""
        return self.g_delta + 0.5 * self.kappa * self.held

    @property
    def rho(self) -> float | None:
        """``actual / predicted``: NaN for a failed trial, None when the model predicted no
        decrease (nothing to learn for λ)."""
        if not math.isfinite(self.actual):
            return float("nan")
        if self.predicted >= 0:
            return None
        return self.actual / self.predicted

    @property
    def measured(self) -> float:
        """The curvature along ``δ`` the trial showed, damping included: the larger of the
        Gauss–Newton product and the secant of the loss itself, ``2(ΔL − gᵀδ)`` (Gauss–Newton
        is blind to curvature outside the output Hessian, such as a flow's log-determinant;
        the secant alone can be negative)."""
        secant = 2.0 * (self.actual - self.g_delta)
        curvature = max(secant, self.gauss_newton) if self.exact else secant
        return max(curvature, 0.0) + self.damping

    @property
    def failed(self) -> bool:
        """Non-finite, or stiffer dynamics without the decrease the model promised."""
        if not math.isfinite(self.actual):
            return True
        rho = self.rho
        return self.stiff and (rho is None or rho < 0.25)

    @property
    def accepted(self) -> bool:
        """The trial may be taken as the step: it did not fail and lowered the loss (or
        changed it by no more than rounding, as at a minimum)."""
        return not self.failed and self.actual <= ROUNDING * self.loss

    @property
    def informative(self) -> bool:
        """The step's predicted change stands above rounding (not so at a minimum)."""
        return abs(self.g_delta) > 1e3 * ROUNDING * self.loss

    @property
    def first_order_rise(self) -> bool:
        """This trial and the one before it (``1/shrink`` times longer) both raised the loss,
        by amounts in proportion to their lengths (ratio at least ``shrink^1.5``), not to
        their squares: the loss rises along ``δ`` from the start, where the gradient
        promised a fall. No curvature explains that; the gradient disagrees with the loss
        (measured on a CNF whose adjoint had left its forward trajectory, §24 of
        ``bench_issue21.md``: rises of 0.110, 0.0102, 0.00102 for trials of 1, 0.1, 0.01)."""
        if self.failed or not (self.actual > 0 and self.previous > 0 and self.shrink > 0):
            return False
        return self.actual >= self.previous * self.shrink**1.5

    @property
    def why_rejected(self) -> str:
        if self.stiff and self.failed:
            return "stiff"
        if self.failed:
            return "failed"
        return "loss rose along the step" if self.first_order_rise else "loss rose"


@dataclass
class Adaptation:
    """What the last adaptation decided (``OCNOpt.last_adaptation``)."""

    step: int
    kappa: float
    alpha: float
    rho: float
    damping: float
    exact: bool
    trials: int
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


class StepControl:
    """The calibration ``κ`` and its adaptation (see the module docstring).

    Args:
        mode: ``"model"`` or ``"fixed"`` (the step is ``lr``; trials only adapt λ).
        adapt_every: adapt at steps that are multiples of this (>= 1).
        stiff_ratio: trial NFE / step NFE above which a trial counts as stiffening.
        shrink: factor (< 1) applied to the step after a failed trial.
        max_change: bound on the growth of ``κ`` (the shrinking of the step) in one
            adaptation.
        max_growth: bound on the growth of the step in one adaptation.
        max_trials: trials per step before the step is given up.
    """

    def __init__(
        self,
        mode: str,
        adapt_every: int = 5,
        stiff_ratio: float = 3.0,
        shrink: float = 0.1,
        max_change: float = 10.0,
        max_growth: float = 4.0,
        max_trials: int = 3,
    ):
        self.mode = mode
        self.kappa: float | None = None  # set at the first step
        self.adapt_every = adapt_every
        self.stiff_ratio = stiff_ratio
        self.shrink = shrink
        self.max_change = max_change
        self.max_growth = max_growth
        self.max_trials = max_trials
        self.again = False  # adapt at the next step (after a failure, or a capped growth)
        self.capped = False  # the last calibration wanted the step to grow beyond max_growth
        self.bounded = False  # the last planned step was cut to the trust region
        self.adaptations = 0
        self.failures = 0
        self.alpha = 0.0  # the last step's α, for logs
        # the trust region on (κ δᵀPδ, ‖δ‖²) of a step (None: none yet)
        self.radius: list[float] | None = None
        self.radius_growth = 4.0

    def due(self, step: int) -> bool:
        return self.again or step % self.adapt_every == 0

    def calibrated(self, outcome: TrialOutcome, low: float = 0.25) -> float:
        """The new ``κ`` after an accepted trial, trust-region style: the measured curvature
        over the held one, ``κ ← measured / δᵀPδ``; the step may grow (``κ`` fall) only when
        the model predicted the trial well (``ρ >= low``), by at most ``max_growth``, and
        shrinks by at most ``max_change``."""
        kappa = outcome.kappa
        self.capped = False
        if not outcome.informative or not outcome.held > 0:
            return kappa
        measured = outcome.measured / outcome.held
        rho = outcome.rho
        if rho is None or rho < low:
            measured = max(measured, kappa)
        self.capped = measured < kappa / self.max_growth
        return min(max(measured, kappa / self.max_growth), kappa * self.max_change)

    def radius_scale(self, curvature: float, length: float) -> float:
        """The factor (<= 1) that brings a step inside the trust region: its model
        curvature ``κ δᵀPδ = curvature`` and its squared length ``‖δ‖² = length`` each at
        most ``radius_growth`` times those of the last accepted trial."""
        scale = 1.0
        for value, bound in zip((curvature, length), self.radius or ()):
            if value > bound > 0:
                scale = min(scale, (bound / value) ** 0.5)
        self.bounded = scale < 1.0
        return scale

    def set_radius(self, curvature: float, length: float) -> None:
        """After an accepted trial of model curvature ``curvature`` and squared length
        ``length``: the trust region of the steps until the next adaptation."""
        if all(v > 0 and math.isfinite(v) for v in (curvature, length)):
            self.radius = [self.radius_growth * curvature, self.radius_growth * length]

    def shrink_radius(self, factor: float) -> None:
        if self.radius is not None:
            self.radius = [r * factor for r in self.radius]

    def state_dict(self) -> dict:
        return {
            "radius": self.radius,
            "kappa": self.kappa,
            "again": self.again,
            "adaptations": self.adaptations,
            "failures": self.failures,
            "alpha": self.alpha,
        }

    def load_state_dict(self, state: dict) -> None:
        self.radius = None if state["radius"] is None else [float(r) for r in state["radius"]]
        self.kappa = None if state["kappa"] is None else float(state["kappa"])
        self.again = bool(state["again"])
        self.adaptations = int(state["adaptations"])
        self.failures = int(state["failures"])
        self.alpha = float(state["alpha"])
