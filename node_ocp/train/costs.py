"""The amortised cost of a step from the costs of its types.

OCNOpt's steps come in four types: plain, *adapt* (with the step control's trial forward
solve), *refresh* (curvature capture and decompositions) and both at once. Over one cycle of
``lcm(update_every, adapt_every)`` steps each type occurs a known number of times; the
amortised cost is the mean over the cycle. Adam and SGD have only plain steps.

(A step's type was called its "kind", a word the configs use for what a table names:
``[task].kind``, ``[model].kind``, ``[optimizers.NAME].kind``. Public names keep it:
:attr:`StepResult.kind <node_ocp.train.step.StepResult>`,
:meth:`OptimizerAdapter.next_kind <node_ocp.train.adapters.OptimizerAdapter.next_kind>`,
the ``kind_s`` column of ``node-ocp bench``.)

This module is the one place where function evaluations are read (:func:`take_nfe`),
where an optimizer table's cycle (:func:`cycle`) and amortised cost are worked out, and
where costs become ratios to a baseline (:func:`ratio`).
"""

from __future__ import annotations

import math
import statistics

#: The types of step, in the order of the tables.
STEP_TYPES: tuple[str, ...] = ("plain", "adapt", "refresh", "refresh+adapt")


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, the form of every cost figure against a baseline (None when either is
    missing or ``b`` is 0)."""
    return None if a is None or b is None or b == 0 else a / b


def take_nfe(blocks) -> tuple[int, int]:
    """``(forward, backward)`` function evaluations the ODE ``blocks`` counted since their
    last reset, summed; the counters are reset."""
    f = sum(b.nfe_forward for b in blocks)
    b = sum(b.nfe_backward for b in blocks)
    for block in blocks:
        block.reset_nfe()
    return f, b


def cycle(table) -> tuple[int | None, int | None]:
    """``(update_every, adapt_every)`` of an optimizer table (an :class:`OptimizerConfig`):
    OCNOpt refreshes every ``update_every`` steps and runs a trial every ``adapt_every``
    steps when its step comes from the quadratic model or its damping adapts; every other
    optimizer has only plain steps, ``(None, None)`` (the table's adapter says which)."""
    from .adapters import adapter_for

    return adapter_for(table).cycle(table)


def amortized_for(table, cost: dict[str, float | None]) -> float | None:
    """:func:`amortized` over the cycle of the optimizer table ``table``."""
    return amortized(cost, *cycle(table))


def step_type(refresh: bool, adapt: bool) -> str:
    """The type of a step that refreshes the curvature and/or adapts (runs a trial)."""
    if refresh and adapt:
        return "refresh+adapt"
    return "refresh" if refresh else ("adapt" if adapt else "plain")


def medians(times: dict[str, list[float]]) -> dict[str, float | None]:
    """The median time of each step type (None for a type never seen)."""
    return {k: statistics.median(times[k]) if times.get(k) else None for k in STEP_TYPES}


def amortized(
    cost: dict[str, float | None], update_every: int | None = None, adapt_every: int | None = None
) -> float | None:
    """Mean cost of a step over one cycle (``update_every`` None: no refresh steps,
    ``adapt_every`` None: no adapt steps); a step type without a measurement takes the cost of
    the nearest measured one (refresh+adapt -> refresh -> adapt -> plain)."""
    fallback = {
        "refresh+adapt": ["refresh+adapt", "refresh", "adapt", "plain"],
        "refresh": ["refresh", "refresh+adapt", "plain", "adapt"],
        "adapt": ["adapt", "plain", "refresh+adapt", "refresh"],
        "plain": ["plain", "adapt", "refresh", "refresh+adapt"],
    }
    period = math.lcm(update_every or 1, adapt_every or 1)
    total = 0.0
    for i in range(period):
        refresh = update_every is not None and i % update_every == 0
        which = step_type(refresh, adapt_every is not None and i % adapt_every == 0)
        value = next((cost[k] for k in fallback[which] if cost.get(k) is not None), None)
        if value is None:
            return None
        total += value
    return total / period
