"""The amortised cost of a step from the costs of its kinds.

OCNOpt's steps come in four kinds: plain, *adapt* (with the step control's trial forward
solve), *refresh* (curvature capture and decompositions) and both at once. Over one cycle of
``lcm(update_every, adapt_every)`` steps each kind occurs a known number of times; the
amortised cost is the mean over the cycle. Adam and SGD have only plain steps.
"""

from __future__ import annotations

import math
import statistics

KINDS: tuple[str, ...] = ("plain", "adapt", "refresh", "refresh+adapt")


def step_kind(refresh: bool, adapt: bool) -> str:
    """The kind of a step."""
    if refresh and adapt:
        return "refresh+adapt"
    return "refresh" if refresh else ("adapt" if adapt else "plain")


def medians(times: dict[str, list[float]]) -> dict[str, float | None]:
    """The median time of each kind (None for a kind never seen)."""
    return {k: statistics.median(times[k]) if times.get(k) else None for k in KINDS}


def amortized(
    cost: dict[str, float | None], update_every: int = 1, adapt_every: int | None = None
) -> float | None:
    """Mean cost of a step over one cycle; a kind without a measurement takes the cost of
    the nearest measured one (refresh+adapt -> refresh -> adapt -> plain)."""
    fallback = {
        "refresh+adapt": ["refresh+adapt", "refresh", "adapt", "plain"],
        "refresh": ["refresh", "refresh+adapt", "plain", "adapt"],
        "adapt": ["adapt", "plain", "refresh+adapt", "refresh"],
        "plain": ["plain", "adapt", "refresh", "refresh+adapt"],
    }
    period = math.lcm(update_every, adapt_every or 1)
    total = 0.0
    for i in range(period):
        kind = step_kind(i % update_every == 0, adapt_every is not None and i % adapt_every == 0)
        value = next((cost[k] for k in fallback[kind] if cost.get(k) is not None), None)
        if value is None:
            return None
        total += value
    return total / period
