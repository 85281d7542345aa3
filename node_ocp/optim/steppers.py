"""Steppers: how OCNOpt turns preconditioned directions into the update it takes.

A stepper plans the update ``δ`` of a step from the gradients ``g`` and the directions
``u = (C + λ)⁻¹ g`` (:mod:`.curvatures`), and — on adaptation steps — decides from the
outcome of a trial evaluation (:mod:`.trial`) what is taken. Each owns its state: the
calibration ``κ``, the last step ``α`` and the trust region (a
:class:`~.step_control.StepControl`), and its one momentum buffer in the optimizer's
per-parameter state.

- :class:`ModelStep` (``step="model"``, the default): ``δ = −α u + μ δ_prev`` with ``α``
  from the calibrated quadratic model (see :mod:`.step_control`); momentum buffer
  ``previous_update``.
- :class:`FixedStep` (``step="fixed"``): ``δ = −lr (u + μ d_prev)``, heavy-ball momentum on
  the directions; momentum buffer ``direction_buffer``; trials only adapt the damping.

Tensors: ``grads``, ``directions`` and updates are dicts ``parameter -> tensor`` of the
parameter's shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .curvatures import dot
from .damping import LevenbergMarquardt
from .hyper import value_at
from .step_control import StepControl, TrialOutcome, momentum_step

#: The first step's held model promises at most this fraction of the loss (κ's start)...
FIRST_DECREASE = 0.1
#: ... and moves the parameters by at most this fraction of their norm.
FIRST_LENGTH = 0.05

Vectors = dict[torch.Tensor, torch.Tensor]


class Stepper:
    """The interface (and the shared parts) of a stepper.

    Args:
        control: the step control whose ``κ``, ``α``, trust region and counters this
            stepper owns.
        group_of: parameter -> its param group (``lr``, ``momentum`` per group).
        state: the optimizer's per-parameter state (momentum buffers live there, so that
            ``state_dict`` saves them).
        schedule: None or ``step -> factor`` multiplying every step taken.
        agree: ``values -> values`` averaged over processes (identity on one process).
    """

    name = ""
    #: a buffer of ``state[p]`` this stepper keeps (for ``memory_usage``)
    buffer = ""
    #: ``lr`` is the step itself (required), not an optional cap
    requires_lr = False
    #: the per-part calibration (:mod:`.unit_scales`) scales this stepper's model
    calibrates = False

    def __init__(
        self,
        control: StepControl,
        group_of: dict,
        state,
        schedule: Callable[[int], float] | None,
        agree: Callable[[list[float]], list[float]],
    ):
        self.control = control
        self.group_of = group_of
        self.state = state
        self.schedule = schedule
        self.agree = agree

    def factor(self, step: int) -> float:
        """The schedule's factor at ``step`` (1 without a schedule)."""
        return 1.0 if self.schedule is None else float(self.schedule(step))

    # the interface -------------------------------------------------------------------
    def plan(self, grads: Vectors, directions: Vectors, step: int, observed, quadratic) -> Vectors:
        """The update of this step before any trial. ``quadratic(vectors)`` is the held
        model's ``Σ s_u vᵀ(C + λ)v``; ``observed`` the step's loss record (or None)."""
        raise NotImplementedError

    def adapts(self, lm: LevenbergMarquardt) -> bool:
        """Whether a due adaptation evaluates a trial."""
        raise NotImplementedError

    @property
    def max_trials(self) -> int:
        return 1

    def trial_kappa(self, kappa: float | None) -> float:
        """The ``κ`` of the model that planned a trial (its predicted change)."""
        return 1.0

    def done(self, outcome: TrialOutcome) -> bool:
        """Whether no further (smaller) trial is evaluated after this one."""
        return True

    def settle(
        self, outcome: TrialOutcome, trials: int, trial: Vectors, update: Vectors, kappa, lm
    ) -> Vectors | None:
        """After the trials: the update taken (None: none), and this stepper's state."""
        return update

    def remember(self, update: Vectors, step: int) -> None:
        """After the update was applied."""

    def gain_scale(self, step: int) -> Callable[[torch.Tensor], float]:
        """The scale of the feedback gains per parameter."""
        raise NotImplementedError

    @property
    def needs_closure(self) -> bool:
        """Whether steps without a closure lose something worth a warning."""
        return False


class FixedStep(Stepper):
    """``δ = −lr · factor · (u + μ d_prev)``: heavy-ball momentum on the directions."""

    name = "fixed"
    buffer = "direction_buffer"
    requires_lr = True

    def plan(self, grads, directions, step, observed, quadratic):
        update = {}
        for p, u in directions.items():
            group = self.group_of[p]
            mu = value_at(group["momentum"], step)
            if mu != 0:
                st = self.state[p]
                buf = st.get("direction_buffer")
                if buf is None:
                    buf = st["direction_buffer"] = u.detach().clone()
                else:
                    buf.mul_(mu).add_(u)
                u = buf
            update[p] = u * -(value_at(group["lr"], step) * self.factor(step))
        return update

    def adapts(self, lm):
        return lm.enabled

    def gain_scale(self, step):
        return lambda p: value_at(self.group_of[p]["lr"], step)


class ModelStep(Stepper):
    """``δ = −α u + μ δ_prev`` with ``α`` from the calibrated quadratic model, kept inside
    the trust region of the last accepted trial (:mod:`.step_control`)."""

    name = "model"
    buffer = "previous_update"
    calibrates = True

    def plan(self, grads, directions, step, observed, quadratic):
        control = self.control
        if control.kappa is None:
            control.kappa = self.first_kappa(grads, directions, observed)
        return self._update(grads, directions, step, control.kappa, quadratic)

    def first_kappa(self, grads: Vectors, directions: Vectors, observed) -> float:
        """κ of the first step: its held model promises at most ``FIRST_DECREASE`` of the
        loss, and it moves the parameters by at most ``FIRST_LENGTH`` of their norm."""
        params = list(directions)
        gu = float(dot([grads[p] for p in params], [directions[p] for p in params]))
        (loss,) = self.agree([abs(observed.loss) if observed is not None else 0.0])
        kappa = max(1.0, gu / (2.0 * FIRST_DECREASE * max(loss, 1.0)))
        u_norm = float(dot(list(directions.values()), list(directions.values()))) ** 0.5
        theta = float(dot(params, params)) ** 0.5
        if theta > 0:
            kappa = max(kappa, u_norm / (FIRST_LENGTH * theta))
        return kappa

    def _update(self, grads, directions, step, kappa, quadratic) -> Vectors:
        control = self.control
        params = list(directions)
        gu = float(dot([grads[p] for p in params], [directions[p] for p in params]))
        g_prev, prev = 0.0, {}
        for p in params:
            buf = self.state[p].get("previous_update")
            mu = value_at(self.group_of[p]["momentum"], step)
            if buf is not None and mu != 0:
                prev[p] = buf * mu
                g_prev += float((grads[p] * prev[p]).sum())
        alpha, keep = momentum_step(gu, g_prev, kappa)
        alpha *= self.factor(step)
        if not keep:
            prev, g_prev = {}, 0.0
        update = {}
        for p in params:
            cap = self.group_of[p]["lr"]
            a = alpha if cap is None else min(alpha, value_at(cap, step))
            d = directions[p] * -a
            if p in prev:
                d = d + prev[p]
            update[p] = d
        control.alpha = alpha
        curvature = kappa * quadratic(update)
        length = float(dot(list(update.values()), list(update.values())))
        scale = control.radius_scale(curvature, length)
        if scale < 1.0:
            update = {p: d * scale for p, d in update.items()}
            control.alpha = alpha * scale
        return update

    def adapts(self, lm):
        return True

    @property
    def max_trials(self) -> int:
        return self.control.max_trials

    def trial_kappa(self, kappa):
        return kappa

    def done(self, outcome):
        return outcome.accepted

    def settle(self, outcome, trials, trial, update, kappa, lm):
        control = self.control
        rho = outcome.rho
        if outcome.accepted:
            # the step taken is the trial that was checked; κ and the trust radius are set
            # for the steps until the next adaptation
            control.kappa = control.calibrated(outcome, lm.low)
            # the trial showed room for a step more than max_growth times larger, or a step
            # cut to the trust region was predicted well: check the grown step at once
            # instead of adapt_every steps later
            control.again = control.capped or (
                control.bounded and trials == 1 and rho is not None and rho > lm.high
            )
            control.set_radius(
                control.kappa * outcome.held,
                float(dot(list(trial.values()), list(trial.values()))),
            )
            control.alpha = control.alpha * control.shrink ** (trials - 1)
            return trial
        if not outcome.first_order_rise:  # curvature the model missed: a shorter step
            control.kappa = kappa / control.shrink**trials
            control.shrink_radius(control.shrink**2)
        return None

    def remember(self, update, step):
        for p, d in update.items():
            if value_at(self.group_of[p]["momentum"], step):
                self.state[p]["previous_update"] = d.detach().clone()

    def gain_scale(self, step):
        kappa = self.control.kappa or 1.0
        return lambda p: 1.0 / kappa

    @property
    def needs_closure(self) -> bool:
        return True


STEPPERS: dict[str, type[Stepper]] = {s.name: s for s in (ModelStep, FixedStep)}
