"""Factor sources: where a refresh step's curvature statistics come from (``factors``).

OCNOpt's ``factors`` option picks one class here, once. On a refresh step the source looks
at what :meth:`~node_ocp.OCNOpt.backward` was handed (the outputs and their likelihood) and
at the capture of the blocks' backward solves, and chooses a :class:`Route`:

- :data:`EMPIRICAL`: the statistics are read from the loss's own backward pass (its
  per-sample gradients: the empirical Fisher);
- :class:`FlowRoute`: factors of the output Hessian are drawn (or built) at the outputs and
  carried inside the backward solves (:mod:`.factor_flow`); the statistics are not those of
  a mean loss's backward pass;
- :class:`FisherRoute`: a backward pass of its own with a sampled cotangent gathers the
  statistics (:mod:`.fisher_backward`); the loss's backward then runs with the outside
  layers' collector paused and only accumulates the gradients.

The sources:

- :class:`AutoFactors` (``"auto"``, the default): the Fisher route for the likelihoods of
  :data:`~.fisher_backward.AUTO_LIKELIHOODS` (classifiers), the empirical one otherwise;
  the feedback stages get empirical factors.
- :class:`EmpiricalFactors` (``"empirical"``): always the loss's own backward pass.
- :class:`SampledFactors` (``"sampled"``): the factor flow where one chain of block calls
  leads to the outputs, else the Fisher route.
- :class:`ExactFactors` (``"exact"``): all factors of the output Hessian through the factor
  flow (one chain of block calls only); on a model without ODE blocks the Fisher route.

``"sampled"`` and ``"exact"`` need ``outputs`` and ``likelihood`` on refresh steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch

from .._errors import bad_value
from .factor_flow import FactorFlow, chain_problem
from .fisher_backward import AUTO_LIKELIHOODS, fisher_backward
from .likelihoods import LIKELIHOODS

Pause = Callable[[], AbstractContextManager]


class Route:
    """How a refresh step's statistics are gathered around the loss's backward pass.

    Attributes:
        name: ``"empirical"``, ``"flow"`` or ``"fisher"``.
        empirical: the statistics come from a backward pass of a mean loss (the empirical
            rule or a sampled cotangent), not from factors carried inside the solves (the
            preconditioner's ``refresh(empirical=...)``).
        pauses_collector: the loss's own backward runs with the outside layers' collector
            paused (the statistics were gathered before it).
        gives_factors: the route hands the refresh its factors (a refresh step whose
            source carries factors must not end on the empirical route, see
            :meth:`FactorSource.check_handed_over`).
    """

    name = "empirical"
    empirical = True
    pauses_collector = False
    gives_factors = False

    def before_backward(
        self,
        loss: torch.Tensor,
        outputs: torch.Tensor | None,
        likelihood: str | None,
        *,
        capture,
        params: Iterable[torch.Tensor],
        pause: Pause,
        quiet: Pause,
    ) -> bool:
        """Run before ``loss.backward()``; returns whether that backward must retain the
        graph. ``capture``: the armed capture (or None); ``params``: the optimizer's
        parameters; ``pause()``: outside statistics and kept stage gradients stop inside;
        ``quiet()``: only the kept stage gradients stop inside."""
        return False

    def __repr__(self) -> str:
        return f"<route {self.name}>"


#: The loss's own backward pass (stateless: one instance for every source).
EMPIRICAL = Route()


class FlowRoute(Route):
    """Factors carried inside the backward solves (:class:`~.factor_flow.FactorFlow`)."""

    name = "flow"
    empirical = False
    gives_factors = True

    def __init__(self, flow: FactorFlow):
        self.flow = flow

    def before_backward(self, loss, outputs, likelihood, *, capture, params, pause, quiet):
        return self.flow.hand_over(capture, outputs, likelihood, pause)


class FisherRoute(Route):
    """A sampled backward pass of its own (:func:`~.fisher_backward.fisher_backward`)."""

    name = "fisher"
    pauses_collector = True
    gives_factors = True

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def before_backward(self, loss, outputs, likelihood, *, capture, params, pause, quiet):
        fisher_backward(loss, outputs, likelihood, self.generator, params, capture, quiet)
        return False


class FactorSource:
    """The interface: one per choice of ``factors``.

    Args:
        rank: Monte-Carlo factors per sample (``"sampled"``).
        generator: the optimizer's generator (sampled draws, in its ``state_dict``).

    Attributes:
        name: the option's value.
        stage_source: the factors the feedback stages get (``"empirical"``, ``"sampled"``
            or ``"exact"``, see :mod:`.feedback_policies`).
        flow: the :class:`~.factor_flow.FactorFlow` of a source that carries factors inside
            the backward solves, else None (the capture is then armed on refresh steps even
            without Kronecker or dense statistics).
    """

    name = ""
    stage_source = ""

    def __init__(self, rank: int, generator: torch.Generator):
        self.rank = rank
        self.generator = generator
        self.flow: FactorFlow | None = None

    @property
    def carries_factors(self) -> bool:
        return self.flow is not None

    def route(self, outputs: torch.Tensor | None, likelihood: str | None, capture) -> Route:
        """The route of this refresh step's statistics, from what ``backward`` was handed
        and the armed ``capture`` (None: no capture this step)."""
        raise NotImplementedError

    def _require(self, outputs, likelihood) -> None:
        if outputs is None or likelihood is None:
            raise bad_value(
                "outputs/likelihood",
                (outputs if outputs is None else "tensor", likelihood),
                f"both given on refresh steps with factors={self.name!r} "
                f"(likelihood one of {', '.join(LIKELIHOODS)})",
                "Or use factors='empirical' or 'auto', which need only loss.backward().",
            )

    def check_handed_over(self, step: int, capture, route: Route) -> None:
        """At a refresh step's ``step()``: refuse a source that carries factors when none
        were handed over (``loss.backward()`` instead of ``opt.backward``)."""
        if self.flow is not None and capture is not None and not route.gives_factors:
            raise ValueError(
                f"factors={self.name!r}: step {step} is a refresh step but no factors "
                "were handed over; call opt.backward(loss, outputs=..., likelihood=...) "
                "instead of loss.backward()."
            )


class EmpiricalFactors(FactorSource):
    """The loss's own backward pass, for any loss."""

    name = "empirical"
    stage_source = "empirical"

    def route(self, outputs, likelihood, capture):
        return EMPIRICAL


class AutoFactors(FactorSource):
    """The Monte-Carlo Fisher by a backward pass of its own for the likelihoods of
    ``AUTO_LIKELIHOODS`` (classifiers); the empirical rule otherwise."""

    name = "auto"
    stage_source = "empirical"

    def __init__(self, rank, generator):
        super().__init__(rank, generator)
        self.fisher = FisherRoute(generator)

    def route(self, outputs, likelihood, capture):
        given = outputs is not None and likelihood is not None
        return self.fisher if given and likelihood in AUTO_LIKELIHOODS else EMPIRICAL


class SampledFactors(FactorSource):
    """Monte-Carlo factors carried inside the backward solves where one chain of block
    calls leads to the output, else by a sampled backward pass of its own."""

    name = "sampled"
    stage_source = "sampled"

    def __init__(self, rank, generator):
        super().__init__(rank, generator)
        self.flow = FactorFlow(self.name, rank, generator)
        self.carried = FlowRoute(self.flow)
        self.fisher = FisherRoute(generator)

    def route(self, outputs, likelihood, capture):
        self._require(outputs, likelihood)
        if capture is None:
            return self.fisher
        records = list(capture.records)
        if not records or chain_problem(records, outputs):
            return self.fisher
        return self.carried


class ExactFactors(FactorSource):
    """All factors of the output Hessian, carried inside the backward solves."""

    name = "exact"
    stage_source = "exact"

    def __init__(self, rank, generator):
        super().__init__(rank, generator)
        self.flow = FactorFlow(self.name, rank, generator)
        self.carried = FlowRoute(self.flow)
        self.fisher = FisherRoute(generator)

    def route(self, outputs, likelihood, capture):
        self._require(outputs, likelihood)
        # no capture: a model without ODE blocks (no solve to carry factors); its layers'
        # hooks read a sampled cotangent's backward pass, the unbiased estimate of the
        # Gauss-Newton statistics (the feedback stages still get the exact factors)
        return self.fisher if capture is None else self.carried


FACTOR_SOURCES_BY_NAME: dict[str, type[FactorSource]] = {
    s.name: s for s in (AutoFactors, EmpiricalFactors, SampledFactors, ExactFactors)
}
