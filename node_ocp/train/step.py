"""One training step: the same code for ``node-ocp train``, ``node-ocp bench`` and the
experiments.

A step is: zero the gradients, the forward pass of one batch, a check that the loss is
finite (and, under torch.distributed, that every process agrees), the backward pass with
what the optimizer needs (OCNOpt: the outputs and likelihood of its factor sources and step
control), the optimizer's step (OCNOpt: with a closure that evaluates the same batch again
with the same random draws, for its trial), the learning-rate schedule's step and the
horizon controller's step. Its wall-clock time (CUDA synchronised) and the function
evaluations of the ODE blocks are measured. How the optimizer takes the backward pass and
the step is its :class:`~node_ocp.train.adapters.OptimizerAdapter`'s business.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .._errors import first_line
from ..ode.block import ODEBlock, SolverError
from .adapters import OptimizerAdapter, adapt
from .costs import take_nfe

#: ``forward()`` -> ``(outputs, loss)``: the batch's model outputs (what the likelihood is
#: about: logits, predictions, a flow's latent ``z``) and its scalar training loss; or
#: ``(outputs, loss, loss_inputs)`` with a tensor the loss is computed from alone, where the
#: outputs do not determine it (a latent ODE's bound, see :class:`~node_ocp.OCNOpt`).
Forward = Callable[[], tuple]


class StepFailed(FloatingPointError):
    """The forward pass failed (a non-finite loss or a solver error) before the backward
    pass; the parameters are unchanged. ``reason`` is one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class StepResult:
    """What one step measured.

    loss: the batch's training loss at the parameters before the step.
    kind: the step's type: ``plain``, ``adapt``, ``refresh`` or ``refresh+adapt`` (see
        :mod:`.costs`; not a config ``kind``).
    seconds: the step's wall-clock time (CUDA synchronised at both ends).
    nfe_forward, nfe_backward: function evaluations of the blocks during the step (forward
        solves, the step control's trial included; backward solves).
    nfe_capture: batched field evaluations of curvature capture during the step (0 on
        steps without capture).
    splits: intervals the blocks' own adjoint split in the step because its reconstruction
        of the state left the forward solution (``ODEBlock(adjoint_anchor=...)``).
    reconstruction: the largest reconstruction error the own adjoint measured in the step,
        in units of the forward tolerance (0 where none was measured).
    """

    loss: float
    kind: str
    seconds: float
    nfe_forward: int
    nfe_backward: int
    nfe_capture: int = 0
    splits: int = 0
    reconstruction: float = 0.0


def kind_of(opt: torch.optim.Optimizer | OptimizerAdapter) -> str:
    """The type of ``opt``'s coming step (``plain`` for every optimizer but OCNOpt)."""
    return adapt(opt).next_kind()


def train_step(
    opt: torch.optim.Optimizer | OptimizerAdapter,
    forward: Forward,
    *,
    blocks: Sequence[ODEBlock] = (),
    likelihood: str | None = None,
    scheduler=None,
    horizon=None,
    agree: Callable[[str | None], str | None] | None = None,
    outputs_determine_loss: bool = True,
) -> StepResult:
    """One step of ``opt`` on the batch ``forward`` evaluates.

    Args:
        opt: any ``torch.optim.Optimizer``, :class:`~node_ocp.OCNOpt`, or either behind
            its :class:`~node_ocp.train.adapters.OptimizerAdapter` (which says how it takes
            the backward pass and the step).
        forward: the batch's ``(outputs, loss)`` or ``(outputs, loss, loss_inputs)`` at the
            current parameters.
        blocks: the model's ODE blocks, whose NFE counters are read (and reset: counts made
            before the step, by an evaluation say, are not the step's).
        likelihood: the likelihood of ``outputs`` (``categorical``, ``gaussian``,
            ``standard_normal``) or None.
        scheduler: a learning-rate schedule stepped after the optimizer, or None.
        horizon: a :class:`~node_ocp.HorizonOptimizer` stepped after the optimizer, or None.
        agree: called with this process's failure (one line, or None) before the backward
            pass; returns the failure every process acts on (data-parallel runs must all stop
            or all go on, since the backward pass synchronises gradients).
        outputs_determine_loss: False where the loss has terms the outputs do not determine
            (a latent ODE's KL term): OCNOpt's trial evaluations then get the loss only, so
            that no Gauss–Newton curvature is read from the change of the outputs (its
            formula for ``"gaussian"``, ``2(ΔL − ∇_o L · Δo)``, would count the other
            terms' first-order change as curvature) and ``cg_iters`` keeps the held step.

    Raises:
        StepFailed: a non-finite loss or a solver error in the forward pass (nothing stepped).
    """
    step = adapt(opt)
    device = _device(step.opt)
    take_nfe(blocks)
    step_type = step.next_kind()
    _sync(device)
    t0 = time.perf_counter()
    step.zero_grad()
    draws = _draw_state(device)  # OCNOpt's trial evaluates the batch with the same draws
    failure = None
    try:
        outputs, loss, loss_inputs = _terms(forward())
        if not torch.isfinite(loss):
            failure = f"non-finite training loss {float(loss.detach())}"
    except SolverError as exc:
        failure = first_line(exc)
    if agree is not None:  # a local failure stands whatever the others say
        failure = agree(failure) or failure
    if failure is not None:
        raise StepFailed(failure)
    closure = _same_draws(forward, draws, device, outputs_determine_loss)
    step.backward_and_step(loss, outputs, likelihood, closure, loss_inputs)
    if scheduler is not None:
        scheduler.step()
    if horizon is not None:
        horizon.step()
    _sync(device)
    seconds = time.perf_counter() - t0
    nfe_capture = sum(b.nfe_capture for b in blocks)
    splits = sum(b.counters.splits for b in blocks)
    reconstruction = max((b.counters.reconstruction for b in blocks), default=0.0)
    nfe_forward, nfe_backward = take_nfe(blocks)
    return StepResult(
        float(loss.detach()),
        step_type,
        seconds,
        nfe_forward,
        nfe_backward,
        nfe_capture,
        splits,
        reconstruction,
    )


def _device(opt: torch.optim.Optimizer) -> torch.device:
    for group in opt.param_groups:
        for p in group["params"]:
            return p.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _draw_state(device: torch.device) -> dict:
    """The random state the coming forward pass draws from (Hutchinson probes, ...)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _terms(value) -> tuple:
    """A forward's ``(outputs, loss)`` or ``(outputs, loss, loss_inputs)`` as a triple."""
    return (*value, None) if len(value) == 2 else tuple(value)


def _same_draws(forward: Forward, draws: dict, device: torch.device, with_outputs: bool = True):
    """The trial closure of the batch at the current parameters, with the draws of the
    step's own forward pass (the training's random stream is left alone): ``(loss,
    outputs)`` (``with_outputs``, else the loss only), or ``(loss, outputs or None,
    loss_inputs)`` where the forward gives ``loss_inputs``."""

    def closure():
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(draws["cpu"])
            if "cuda" in draws:
                torch.cuda.set_rng_state(draws["cuda"], device)
            outputs, loss, loss_inputs = _terms(forward())
        if loss_inputs is not None:
            return loss, outputs if with_outputs else None, loss_inputs
        return (loss, outputs) if with_outputs else loss

    return closure
