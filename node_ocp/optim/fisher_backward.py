"""The Monte-Carlo Fisher by a backward pass of its own (``factors="sampled"`` where the factor
chain cannot follow the model; ``factors="auto"``, the default, for classifiers).
The empirical rule takes the curvature statistics from the backward pass of the loss itself:
its output-gradient rows are the per-sample gradients ``∇ℓ_b``, so its ``B`` factors hold the
*empirical* Fisher ``Σ ∇ℓ_b ∇ℓ_bᵀ``. For a regression near its fit the residuals — and with
them that curvature — shrink towards zero sample by sample and the preconditioned direction
follows the few samples with the largest residuals; for a classifier it is the outer product
of the labels' gradients rather than the model's own predictive curvature (Kunstner, Hennig &
Balles, "Limitations of the empirical Fisher approximation", NeurIPS 2019). The Monte-Carlo
Fisher (Martens & Grosse, 2015, §5) replaces ``∇ℓ_b`` by a gradient drawn from the model's own
predictive distribution, whose covariance is the loss Hessian in the outputs ``H_b``: the
statistics then estimate the Gauss–Newton curvature.

Where one chain of ODE-block calls leads to the model output, the factor flow
(:mod:`.factor_flow`) carries such draws inside the backward solves. Where it cannot follow
the graph — an ODE-RNN's cell and field applied at every observation, a forecaster's head at
every query time — this module does it with one more backward pass on refresh steps: the
sampled cotangent (:func:`~.likelihoods.sampled_cotangent`) is backpropagated from the
outputs with the capture and the outside layers' statistics on, then the loss's own backward
gives the gradients with them off. Every unit (field layers, recurrent cells, heads) sees the
same draw. It costs one backward pass per refresh step (one in ``update_every`` steps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch

from ..capture import CurvatureCapture
from .likelihoods import sampled_cotangent

#: The likelihoods for which ``factors="auto"`` draws the Monte-Carlo Fisher: classifiers,
#: where it measurably sped up the first tens of steps of the ODE-RNN classifiers (3 seeds:
#: JapaneseVowels val accuracy 0.80 / 0.88 at steps 20 / 30 against 0.64 / 0.75 with the
#: empirical rule; own_series 0.72 / 0.78 at 20 / 40 against 0.61 / 0.61). Regressors keep
#: the empirical rule: on forecast_spiral the Monte-Carlo Fisher was slower (val MSE 0.0206
#: against 0.0166 at step 150) and level by step 250. Flows (``standard_normal``: the
#: log-determinant is not in the output Hessian) keep it too.
AUTO_LIKELIHOODS: tuple[str, ...] = ("categorical",)


def fisher_backward(
    loss: torch.Tensor,
    outputs: torch.Tensor,
    likelihood: str,
    generator: torch.Generator,
    params: Iterable[torch.Tensor],
    capture: CurvatureCapture | None,
    quiet: Callable[[], AbstractContextManager],
) -> None:
    """The statistics backward pass with a sampled cotangent at ``outputs``.

    Gathers into ``capture`` (the ODE blocks' backward solves) and the outside layers'
    hooks, then switches the capture off on this step's block calls, so that the loss's own
    backward pass, run by the caller inside its statistics pause, only accumulates the
    gradients. ``params``' ``.grad`` are untouched (the pass goes through
    ``torch.autograd.grad``, so a DistributedDataParallel wrapper does not synchronise it).
    ``quiet()`` pauses what must not see the sampled pass (the feedback recorder's kept
    gradients).
    """
    cotangent = sampled_cotangent(loss, outputs, likelihood, generator)
    params = [p for p in params if p.requires_grad]
    with quiet():
        # autograd.grad, not backward: nothing accumulates into .grad, and the gradient
        # hooks of DistributedDataParallel (on the accumulation) do not fire for this pass
        torch.autograd.grad(outputs, params, cotangent, retain_graph=True, allow_unused=True)
    if capture is not None:
        for record in capture.records:
            record.capture = None
