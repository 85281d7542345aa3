"""Feedback policies behind one interface: how a feedback step is prepared and swept.

OCNOpt's ``feedback`` option picks one class here, once: ``"off"`` is no policy (every
parameter takes the open-loop step); :class:`GaussNewtonPolicy` gains from the factor source
at the stage boundaries (:mod:`.feedback`); :class:`DensePolicy` exact matrices and the
backward Riccati recursion on tiny chain models (:mod:`.feedback_dense`).

A policy is prepared from the step's graph after ``opt.backward`` (before any parameter
moves) and then swept by the base step: ``sweep`` applies ``δθ_s = k_s + K_s δx_s`` stage by
stage in one forward pass of the closure and returns ``(the update taken per parameter, the
closure's value, the report's fields)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._errors import bad_value
from .curvatures import Damping
from .feedback import FeedbackSweep, empirical_factors, pulled_factors
from .feedback_dense import DenseFeedback
from .likelihoods import output_factors


@dataclass
class SweepContext:
    """What a sweep needs from the optimizer at the step it is taken."""

    units: list
    damping: Damping  # the step's (planned before its trial)
    current: Damping  # after the trial's adaptation
    gain_scale: Callable[[torch.Tensor], float]
    reduces: bool
    stage_params: Callable


class FeedbackPolicy:
    """The interface. ``source``: the stages' factor source (``"empirical"``,
    ``"sampled"``, ``"exact"``)."""

    name = ""
    #: the policy's step is ``lr``-scaled (needs ``step="fixed"``)
    needs_fixed_step = False
    #: ``prepare`` refuses a model without stages (instead of warning and going open-loop)
    needs_stages = False

    def __init__(
        self,
        source: str,
        rank: int,
        generator: torch.Generator,
        clip: float | None,
        max_dense_params: int,
    ):
        self.source = source
        self.rank = rank
        self.generator = generator
        self.clip = clip
        self.max_dense_params = max_dense_params

    @property
    def needs_graph(self) -> bool:
        """Whether ``prepare`` reads the step's graph after its backward pass."""
        return self.source != "empirical"

    def _requires(self, outputs, likelihood, needs: str) -> None:
        if outputs is None or likelihood is None:
            raise bad_value(
                "outputs/likelihood",
                (outputs if outputs is None else "tensor", likelihood),
                f"both given to opt.backward on feedback steps with {needs}",
                "Or use factors='empirical' with feedback='gauss_newton'.",
            )

    def prepare(self, records, outputs, likelihood, stage_params) -> None:
        raise NotImplementedError

    def sweep(self, records, closure, update: dict, ctx: SweepContext):
        raise NotImplementedError

    def clear(self) -> None:
        """Forget the step's prepared matrices/factors."""


class GaussNewtonPolicy(FeedbackPolicy):
    """Gains from the factor source at the stage boundaries and the held curvature
    (:class:`~.feedback.FeedbackSweep`)."""

    name = "gauss_newton"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.factors: dict | None = None

    def prepare(self, records, outputs, likelihood, stage_params) -> None:
        if self.source != "empirical":
            self._requires(outputs, likelihood, f"factors={self.source!r}")
            y = output_factors(outputs, likelihood, self.source, self.rank, self.generator)
            self.factors = pulled_factors(records, outputs, y)
        else:
            self.factors = empirical_factors(records)

    def sweep(self, records, closure, update, ctx):
        sweep = FeedbackSweep(
            records,
            self.factors,
            ctx.units,
            ctx.damping,
            ctx.gain_scale,
            ctx.reduces,
            self.clip,
        )
        return sweep.run(closure, update, ctx.stage_params)

    def clear(self) -> None:
        self.factors = None


class DensePolicy(FeedbackPolicy):
    """Exact matrices and the backward Riccati recursion (:mod:`.feedback_dense`)."""

    name = "dense"
    needs_fixed_step = True
    needs_stages = True

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.dense: DenseFeedback | None = None

    @property
    def needs_graph(self) -> bool:
        return True

    def prepare(self, records, outputs, likelihood, stage_params) -> None:
        self._requires(outputs, likelihood, "feedback='dense'")
        self.dense = DenseFeedback(records, outputs, likelihood, stage_params)
        self.dense.prepare(self.max_dense_params)

    def sweep(self, records, closure, update, ctx):
        try:
            self.dense.solve(ctx.current.value, ctx.current.relative)
        except torch.linalg.LinAlgError as exc:  # the step falls back to open-loop
            raise FloatingPointError(
                f"the dense Riccati recursion is singular at damping {ctx.current.value:.3g} "
                f"({'relative' if ctx.current.relative else 'absolute'}): "
                f"{str(exc).splitlines()[0]}; use damping_mode='absolute' or a larger damping"
            ) from None
        return self.dense.run(closure, update, ctx.gain_scale)

    def clear(self) -> None:
        self.dense = None


POLICIES: dict[str, type[FeedbackPolicy]] = {p.name: p for p in (GaussNewtonPolicy, DensePolicy)}
