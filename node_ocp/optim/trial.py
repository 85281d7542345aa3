"""Trial evaluations: the batch's loss at trial parameters, agreed across processes.

OCNOpt's step control and the per-part calibration learn from evaluating the step's own
batch again (through the user's ``closure``) at parameters the optimizer has moved. This
module owns those evaluations: the loss and the NFE of the forward solves they cost, the
Gauss–Newton curvature along the move from the change of the model outputs
(:func:`~.likelihoods.gauss_newton_quadratic`), and the mean of the measurements over the
processes of a data-parallel run, so that every process takes the same decision.

:meth:`Trials.adapt` is the trial loop of an adaptation step: the stepper
(:mod:`.steppers`) says how many trials and what is taken, each trial is evaluated and agreed
here, and its outcome (:class:`~.step_control.TrialOutcome`) adapts the damping λ
(:mod:`.damping`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import dist
from .._errors import bad_type, bad_value
from ..ode.block import SolverError
from .curvatures import Damping, dot
from .damping import LevenbergMarquardt
from .likelihoods import gauss_newton_quadratic
from .step_control import Adaptation, TrialOutcome


@dataclass
class Observed:
    """What ``backward`` learnt of this step's batch (for the step control).

    Attributes:
        loss: the batch's loss at the current parameters.
        outputs: the model outputs ``(N, ...)`` (detached) or None.
        likelihood: their likelihood, or None.
        grad_outputs: ``∂L/∂outputs`` (``"gaussian"`` only), or None.
        forward_nfe: the function evaluations of the step's own forward solves.
    """

    loss: float
    outputs: torch.Tensor | None = None
    likelihood: str | None = None
    grad_outputs: torch.Tensor | None = None
    forward_nfe: int = 0

    def watch(self, outputs: torch.Tensor | None, likelihood: str | None):
        """Keep ``outputs`` (detached) and ``likelihood`` when both are given, and for
        ``"gaussian"`` hook ``∂L/∂outputs`` of the coming backward; returns the hook's
        handle (to remove after that backward) or None."""
        if outputs is None or likelihood is None:
            return None
        self.outputs = outputs.detach()
        self.likelihood = likelihood
        if likelihood != "gaussian":
            return None

        def keep(g):
            self.grad_outputs = g.detach()

        return outputs.register_hook(keep)


class Trials:
    """Evaluations of the batch for the step control.

    Args:
        blocks: the model's ODE blocks (their forward NFE counters are read).
        reduces: ``() -> bool``: whether measurements are averaged over processes.
    """

    def __init__(self, blocks: list, reduces: Callable[[], bool]):
        self.blocks = blocks
        self.reduces = reduces

    def forward_nfe(self) -> int:
        return sum(b.nfe_forward for b in self.blocks)

    def agree(self, values: list[float]) -> list[float]:
        """The mean of ``values`` over processes (NaN if any process has NaN there)."""
        if not (self.reduces() and dist.world_size() > 1):
            return values
        finite = [v if math.isfinite(v) else 0.0 for v in values]
        bad = [0.0 if math.isfinite(v) else 1.0 for v in values]
        agreed = dist.all_reduce_sum_floats(finite + bad)
        n, k = dist.world_size(), len(values)
        return [a / n if b == 0 else float("nan") for a, b in zip(agreed[:k], agreed[k:])]

    def here(self, closure) -> Observed:
        """The batch at the current parameters (when ``backward`` did not say)."""
        mark = self.forward_nfe()
        loss, outputs = loss_and_outputs(closure())
        return Observed(float(loss), outputs, None, None, self.forward_nfe() - mark)

    def evaluate(self, closure, observed: Observed) -> tuple[float, float, int]:
        """``(trial loss, Gauss–Newton curvature along the trial or NaN, trial NFE)``."""
        mark = self.forward_nfe()
        try:
            loss, outputs = loss_and_outputs(closure())
        except SolverError:
            return float("nan"), float("nan"), self.forward_nfe() - mark
        nfe = self.forward_nfe() - mark
        loss = float(loss)
        gn = float("nan")
        if (
            outputs is not None
            and observed.outputs is not None
            and observed.likelihood is not None
            and outputs.shape == observed.outputs.shape
        ):
            delta = outputs - observed.outputs
            if bool(torch.isfinite(delta).all()):
                gn = gauss_newton_quadratic(
                    observed.likelihood,
                    observed.outputs,
                    delta,
                    observed.grad_outputs,
                    loss - observed.loss,
                )
        return loss, gn, nfe

    def adapt(
        self,
        closure: Callable,
        observed: Observed | None,
        grads: dict,
        update: dict,
        step: int,
        *,
        stepper,
        lm: LevenbergMarquardt,
        quadratic: Callable[[dict, Damping], float],
        damping: Damping,
        decay: dict | None = None,
    ) -> tuple[dict | None, float, Adaptation]:
        """The trial evaluation(s) of an adaptation step.

        Evaluates ``update`` (then smaller trials, as long as ``stepper`` asks) on the batch,
        adapts ``lm`` to the last outcome and lets the stepper settle what is taken and its
        own state (its ``control``'s ``κ``, trust region and counters). ``quadratic(v, d)``
        is the held model ``Σ s_u vᵀ(C + d)v`` (the preconditioner's), ``damping`` the
        step's. ``decay`` (parameter -> weight decay, OCNOpt's ``decay_in_model``): the
        measured change and curvature include the decay's, ``wd (θᵀδ + |δ|²/2)`` and
        ``wd |δ|²``. Returns ``(the update taken or None, the last trial's loss, the
        adaptation's record)``.
        """
        control = stepper.control
        zero = damping.without_damping()
        params = list(update)
        if observed is None:  # the loss of the batch at θ is unknown: one more evaluation
            observed = self.here(closure)
        backup = [p.detach().clone() for p in params]
        kappa = control.kappa
        trial = update
        outcome, trial_loss, trials = None, None, 0
        previous = float("nan")  # the last trial's change of the loss
        while trials < stepper.max_trials:
            trials += 1
            g_delta = float(dot([grads[p] for p in params], [trial[p] for p in params]))
            held = quadratic(trial, damping)
            damp_term = held - quadratic(trial, zero)
            decay_change, decay_curvature = decay_terms(decay, trial)
            for p in params:
                p.add_(trial[p])
            trial_loss, gn, nfe = self.evaluate(closure, observed)
            for p, b in zip(params, backup):
                p.copy_(b)
            loss0, loss1, gn, nfe, fwd = self.agree(
                [observed.loss, trial_loss, gn, nfe, observed.forward_nfe]
            )
            outcome = TrialOutcome(
                g_delta=g_delta,
                held=held,
                kappa=stepper.trial_kappa(kappa),
                damping=damp_term,
                actual=loss1 - loss0 + decay_change,
                gauss_newton=gn + decay_curvature,
                stiff=fwd > 0 and nfe > control.stiff_ratio * fwd,
                loss=abs(loss0),
                previous=previous,
                shrink=control.shrink,
            )
            if stepper.done(outcome):
                break
            previous = outcome.actual
            trial = {p: d * control.shrink for p, d in trial.items()}
        control.adaptations += 1
        rho = outcome.rho
        lm.update(rho)
        control.again = not outcome.accepted
        if not outcome.accepted:
            control.failures += 1
        update = stepper.settle(outcome, trials, trial, update, kappa, lm)
        adaptation = Adaptation(
            step=step,
            kappa=control.kappa,
            alpha=control.alpha,
            rho=float("nan") if rho is None else rho,
            damping=lm.value,
            exact=outcome.exact,
            trials=trials,
            reason="ok" if outcome.accepted else outcome.why_rejected,
        )
        return update, trial_loss, adaptation


def decay_terms(decay: dict | None, delta: dict, alpha: float = 1.0) -> tuple[float, float]:
    """``(wd (θᵀαδ + α²|δ|²/2), wd α²|δ|²)`` summed over the parameters of ``delta``: the
    weight decay's change of the objective at ``θ + αδ`` and its curvature along ``αδ``
    (``θ`` the parameters now); ``(0, 0)`` without ``decay``."""
    if not decay:
        return 0.0, 0.0
    change = curvature = 0.0
    for p, d in delta.items():
        wd = float(decay.get(p, 0.0))
        if wd:
            sq = float((d * d).sum()) * alpha * alpha
            change += wd * (alpha * float((p.detach() * d).sum()) + 0.5 * sq)
            curvature += wd * sq
    return change, curvature


class ClosureValue(NamedTuple):
    """What a step closure returns, read into its parts (tensors with their graphs).

    loss: the scalar loss of the batch.
    outputs: the outputs the likelihood handed to ``backward`` is about, or None.
    loss_inputs: a tensor the loss is computed from alone (the parameters reach the loss
        only through it), for the subspace step's exact model where the likelihood's outputs
        do not determine the loss (a latent ODE's bound: the decoded means, ``mu`` and
        ``std``), or None (then ``outputs`` serves, where the loss is computed from them).
    """

    loss: torch.Tensor
    outputs: torch.Tensor | None
    loss_inputs: torch.Tensor | None

    @property
    def exact_inputs(self) -> torch.Tensor | None:
        """The tensor an exact model of the loss is taken through."""
        return self.outputs if self.loss_inputs is None else self.loss_inputs


#: What a step closure may return, in words (for errors).
CLOSURE_RETURNS = "a closure returning loss, (loss, outputs) or (loss, outputs, loss_inputs)"


def read_closure(value) -> ClosureValue:
    """A closure's return value — ``loss``, ``(loss, outputs)`` or ``(loss, outputs,
    loss_inputs)`` — as a :class:`ClosureValue`."""
    if isinstance(value, tuple):
        if len(value) not in (2, 3):
            raise bad_value("closure", value, CLOSURE_RETURNS)
        parts = (*value, None) if len(value) == 2 else value
    else:
        parts = (value, None, None)
    loss = parts[0]
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise bad_type("closure", loss, "a closure returning a scalar loss tensor")
    for name, t in (("outputs", parts[1]), ("loss_inputs", parts[2])):
        if t is not None and not isinstance(t, torch.Tensor):
            raise bad_type("closure", t, f"a closure whose {name} is a tensor or None")
    return ClosureValue(*parts)


def loss_and_outputs(value) -> tuple[float, torch.Tensor | None]:
    """A closure's return value as ``(loss, outputs or None)``, detached."""
    v = read_closure(value)
    return float(v.loss.detach()), None if v.outputs is None else v.outputs.detach()
