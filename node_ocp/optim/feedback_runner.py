"""The feedback part of OCNOpt: recording the stages, preparing the policy, the sweep.

With ``feedback`` on, a feedback step (every ``feedback_every`` steps) goes through three
moments, each one call of :class:`FeedbackRunner` from the optimizer:

1. :meth:`~FeedbackRunner.arm` (when the step before ends): the stage recorder
   (:class:`~.feedback.StageRecorder`) records the first call of every stage in the coming
   forward pass and keeps the gradients at the stage boundaries;
2. around ``opt.backward``: :meth:`~FeedbackRunner.end_recording` before the loss's backward
   (whether it must retain the graph for the policy), :meth:`~FeedbackRunner.prepare` after
   it (the policy's factors or matrices, taken before any parameter moves);
3. :meth:`~FeedbackRunner.apply` in ``step``: ``θ ← θ + δ`` through the policy's forward
   sweep (:mod:`.feedback_policies`), or open-loop — with a warning, once — when the step
   cannot sweep, and back to the open-loop update when the sweep fails (a solver error, a
   non-finite loss). It counts the sweeps and their failures and keeps the last report;
   with ``feedback_gain="own"`` it learns the gain terms' scale from the sweep's loss
   against the step's open-loop trial (:mod:`.feedback_gain`).

``feedback="off"`` (or a model without stages) has no recorder: every step is open-loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import nullcontext

from torch import nn

from .._errors import bad_value
from ..ode.block import SolverError
from .feedback import FeedbackReport, StageRecorder, find_stages, warn_open_loop
from .feedback_gain import GainCalibration
from .feedback_policies import POLICIES, FeedbackPolicy, SweepContext
from .trial import loss_and_outputs


class FeedbackRunner:
    """The stage recorder, the feedback policy and their counters.

    Args:
        mode: the ``feedback`` option (``"off"``, ``"gauss_newton"``, ``"dense"``).
        every: ``feedback_every``.
        model: the whole model (its stages, :func:`~.feedback.find_stages`).
        stage_source: the factors the stages get (the factor source's ``stage_source``).
        rank, generator, clip, max_dense_params: the policy's (:mod:`.feedback_policies`).
        fixed_step: the optimizer's stepper takes ``lr`` as its step (``step="fixed"``).
        gain: the ``feedback_gain`` rule (``"kappa"`` or ``"own"``, :mod:`.feedback_gain`).

    Attributes:
        steps: feedback sweeps run (fallbacks included).
        failures: sweeps that fell back to the open-loop update.
        last: the :class:`~.feedback.FeedbackReport` of the last sweep, or None.
        gain: the gain terms' scale ``β`` (:class:`~.feedback_gain.GainCalibration`).
    """

    def __init__(
        self,
        mode: str,
        every: int,
        model: nn.Module,
        stage_source: str,
        rank: int,
        generator,
        clip: float | None,
        max_dense_params: int,
        fixed_step: bool,
        gain: str = "kappa",
    ):
        self.mode = mode
        self.gain = GainCalibration(gain)
        self.every = every
        self.recorder: StageRecorder | None = None
        self.policy: FeedbackPolicy | None = None
        self.ready = False  # the policy was prepared from this step's opt.backward
        self.warned = False
        self.steps = 0
        self.failures = 0
        self.last: FeedbackReport | None = None
        policy = POLICIES.get(mode)
        if policy is None:  # "off"
            return
        if policy.needs_fixed_step and not fixed_step:
            raise bad_value(
                "feedback",
                mode,
                "'dense' with step='fixed' (its step is the policy η k + K δx with η = lr)",
                "Or use feedback='gauss_newton'.",
            )
        stages, reason = find_stages(model)
        if not stages:
            if policy.needs_stages:
                raise bad_value("model", type(model).__name__, "stages", reason)
            warn_open_loop(reason)
            return
        self.recorder = StageRecorder(stages)
        self.policy = policy(stage_source, rank, generator, clip, max_dense_params)

    def due(self, step: int) -> bool:
        """Whether ``step`` is a feedback sweep."""
        return self.recorder is not None and step % self.every == 0

    # ------------------------------------------------------------------ recording
    def arm(self, step: int) -> None:
        """Forget the last step's records; record the coming forward if ``step`` is due."""
        self.ready = False
        if self.recorder is not None:
            self.recorder.clear()
            if self.due(step):
                self.recorder.arm(keep_grads=True)

    @property
    def recording(self) -> bool:
        """Whether this step's forward recorded stage calls."""
        return self.recorder is not None and bool(self.recorder.records)

    def end_recording(self) -> bool:
        """Stop recording calls (before the loss's backward); returns whether that backward
        must retain the graph (the policy reads it afterwards)."""
        self.recorder.disarm()
        return self.policy.needs_graph

    def paused(self):
        """A context in which no stage gradients are kept (sampled or pulled-back passes)."""
        return self.recorder.paused() if self.recorder is not None else nullcontext()

    def prepare(self, outputs, likelihood, stage_params: Callable) -> None:
        """After the loss's backward: stop keeping gradients and take what the sweep needs
        from this step's graph, before any parameter moves (the factors at the stage
        boundaries, or the dense policy's Jacobians)."""
        self.recorder.stop_grads()
        self.policy.clear()
        self.policy.prepare(self.recorder.ordered(), outputs, likelihood, stage_params)
        self.ready = True

    def clear(self) -> None:
        """The step is over: drop its records and prepared factors."""
        if self.recorder is not None:
            self.recorder.clear()
        if self.policy is not None:
            self.policy.clear()

    # ------------------------------------------------------------------ base step
    def apply(
        self,
        update: dict,
        closure,
        step: int,
        context: Callable[[], SweepContext],
        open_loss: float | None = None,
    ) -> tuple[dict, float | None]:
        """``θ ← θ + δ``, through the feedback sweep on feedback steps.

        ``context()`` gives the sweep what it needs from the optimizer (called only when it
        sweeps). ``open_loss``: ``L(θ + δ)`` on this step's batch when the step's trial
        evaluated exactly ``δ`` (else None); the gain's own calibration learns from it.
        Returns ``(the update taken per parameter, the sweep's loss or None)``.
        """
        due = self.due(step)
        records = self.recorder.ordered() if due else []
        reason = None
        if due:
            if not records:
                reason = "no stage was called with grad enabled in this step's forward"
            elif not self.ready:
                reason = "the step's backward was not opt.backward(loss, ...)"
            elif closure is None:
                reason = "step() got no closure"
            if reason is not None and not self.warned:
                self.warned = True
                warn_open_loop(reason)
        if not records or reason is not None:
            for p, d in update.items():
                p.add_(d)
            return update, None
        backup = {p: p.detach().clone() for p in update}
        beta = self.gain.scale
        report = FeedbackReport(step=step, gain_scale=beta)
        ctx = context()
        if beta != 1.0:
            scale = ctx.gain_scale
            ctx = dataclasses.replace(ctx, gain_scale=lambda p: beta * scale(p))
        try:
            taken, value, fields = self.policy.sweep(records, closure, update, ctx)
            loss, _ = loss_and_outputs(value)
            report.__dict__.update(fields, loss=loss)
            if not math.isfinite(loss):
                raise FloatingPointError("the sweep's loss is not finite")
        except (SolverError, FloatingPointError) as exc:
            for p, b in backup.items():
                p.copy_(b).add_(update[p])
            report.reason = f"fell back to open-loop: {exc}".split("\n")[0]
            taken, loss = update, None
        self.steps += 1
        if report.reason != "ok":
            self.failures += 1
        self.gain.learn(open_loss, loss)
        self.last = report
        return taken, loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The keys OCNOpt's ``state_dict`` saves for feedback (flat, under ``"ocnopt"``)."""
        return {
            "feedback": self.mode,
            "feedback_every": self.every,
            "feedback_steps": self.steps,
            "feedback_failures": self.failures,
            "last_feedback": None if self.last is None else self.last.as_dict(),
            "feedback_gain": self.gain.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`'s keys (absent in older checkpoints: feedback off,
        no sweeps); refuses another ``feedback`` mode."""
        if state.get("feedback", "off") != self.mode:
            raise bad_value(
                "state_dict",
                f"feedback={state.get('feedback', 'off')!r}",
                f"the feedback of this optimizer ({self.mode!r})",
            )
        self.steps = int(state.get("feedback_steps", 0))
        self.failures = int(state.get("feedback_failures", 0))
        self.gain.load_state_dict(state.get("feedback_gain", {}))
        last = state.get("last_feedback")
        self.last = None if last is None else FeedbackReport(**last)
