"""From ``opt.backward`` to the backward solves: the terminal factors of a factor source.

With ``factors="sampled"`` or ``"exact"`` the optimizer draws (or builds) factors ``y`` of
the loss Hessian at the model output (:mod:`.likelihoods`) on refresh steps, pulls them back
through the layers between the output and the last ODE block call, and sets them on that
call's output through the capture. From each block call to the one before it the factors
travel the same way: when the backward pass reaches the earlier call's output, the factors
the later call propagated to its input are pulled back to it and set there. All of it goes
through the capture's records; nothing is attached to tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from ..capture import CurvatureCapture
from ..ode.factors import SolveRecord
from .likelihoods import output_factors


class FactorFlow:
    """Terminal factors of one source for the block calls of a step.

    Args:
        source: ``"sampled"`` or ``"exact"``.
        rank: Monte-Carlo factors per sample (``"sampled"``).
        generator: the optimizer's generator (sampled draws).
    """

    def __init__(self, source: str, rank: int, generator: torch.Generator):
        self.source = source
        self.rank = rank
        self.generator = generator

    def hand_over(
        self,
        capture: CurvatureCapture,
        outputs: torch.Tensor,
        likelihood: str,
        pause: Callable[[], AbstractContextManager],
    ) -> bool:
        """Set the factors for the last block call and chain the earlier ones.

        ``pause()`` gives a context in which the outside layers' statistics stop (while
        factors are pulled back).
        Returns True when the loss's backward must retain the graph (chained calls).
        """
        records = list(capture.records)
        if not records:
            raise ValueError(
                "outputs: no ODE block was called with grad enabled since the last step; "
                f"factors={self.source!r} needs the forward pass of this step between "
                "opt.step() and opt.backward()."
            )
        _check_chain(records, outputs, self.source)
        y = output_factors(outputs, likelihood, self.source, self.rank, self.generator)
        last = records[-1]
        with pause():
            last.set_terminal_factors(pull_back(outputs, last.output, y))
        for earlier, later in zip(records[:-1], records[1:]):
            _chain(earlier, later, pause)
        return len(records) > 1


def chain_problem(records: list[SolveRecord], outputs: torch.Tensor) -> str | None:
    """Why the chain cannot follow this graph, or None when it can: the model output must
    reach the block calls only through the last one, and each call's input the earlier calls
    only through the one before it. Otherwise (an ODE-RNN's per-series last states, a
    forecast read at several query times, a state carried around a block for some rows) a
    path is missed, and the pull-backs between calls fire each other's hooks without end."""
    barriers = {r.output.grad_fn: i for i, r in enumerate(records) if r.output.grad_fn}
    last = len(records) - 1
    starts = [(outputs, last, "the model output", "the last call")]
    starts += [
        (r.input, k - 1, f"the input of call {k + 1}", f"call {k}") for k, r in enumerate(records)
    ]
    for tensor, allowed, what, via in starts:
        other = sorted(i for i in _reached(tensor, barriers) if i != allowed)
        if other:
            return (
                f"{what} depends on ODE block call {other[0] + 1} of {len(records)} other "
                f"than through {via} (the loss reads the state at several times, e.g. an "
                "ODE-RNN or a forecast)"
            )
    return None


def _check_chain(records: list[SolveRecord], outputs: torch.Tensor, source: str) -> None:
    """Refuse a graph the chain cannot follow (see :func:`chain_problem`)."""
    problem = chain_problem(records, outputs)
    if problem is not None:
        raise ValueError(
            f"factors={source!r}: {problem}, which the factor chain cannot follow; use "
            "factors='sampled' (a backward pass of its own) or 'empirical'."
        )


def _reached(tensor: torch.Tensor, barriers: dict) -> set[int]:
    """Indices of the barrier nodes that ``tensor``'s graph reaches without passing another."""
    found: set[int] = set()
    fn = tensor.grad_fn
    stack, seen = ([fn] if fn is not None else []), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in barriers:
            found.add(barriers[node])
            continue
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return found


def pull_back(outputs: torch.Tensor, target: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian products of ``outputs`` w.r.t. ``target`` with each of the R rows
    of ``y`` (``(R, *outputs.shape)`` -> ``(R, *target.shape)``)."""
    if outputs is target:
        return y
    (vjp,) = torch.autograd.grad(
        outputs,
        target,
        grad_outputs=y,
        retain_graph=True,
        is_grads_batched=True,
        allow_unused=True,
    )
    if vjp is None:
        raise ValueError(
            "outputs: the model output does not depend on the last ODE block's output; the "
            "factor source cannot provide factors for it. Use factors='empirical'."
        )
    return vjp


def _chain(
    earlier: SolveRecord, later: SolveRecord, pause: Callable[[], AbstractContextManager]
) -> None:
    """When backward reaches ``earlier``'s output, hand it ``later``'s input factors."""
    out = earlier.output

    def hook(grad):
        q = later.input_factors
        if q is not None:
            with pause():
                factors = q if later.input is out else pull_back(later.input, out, q)
            earlier.set_terminal_factors(factors)
        return grad

    out.register_hook(hook)
