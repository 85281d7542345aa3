"""Levenberg–Marquardt adaptation of the damping λ from the reduction ratio.

After a trial update ``Δ`` on the step's own batch the optimizer knows the actual change
``L(θ+Δ) − L(θ)`` and the change its quadratic model predicted,
``m(Δ) = gᵀΔ + ½ Δᵀ(C + λ)Δ``. Their ratio ``ρ`` says how far the model can be trusted:
λ grows by ``boost`` when ``ρ < low`` (or the trial failed) and shrinks by ``boost`` when
``ρ > high``, within ``[minimum, maximum]`` (Moré, 1978; Martens & Grosse, 2015, §6.5).
λ is relative to each unit's curvature scale unless the optimizer says otherwise.
"""

from __future__ import annotations

import math
from collections import deque


class LevenbergMarquardt:
    """The damping λ and its adaptation.

    Args:
        initial: λ before the first adaptation.
        minimum, maximum: bounds on λ.
        boost: factor (> 1) by which λ grows or shrinks.
        low, high: the thresholds on ρ.
        enabled: adapt at all (else λ stays ``initial``).
    """

    def __init__(
        self,
        initial: float,
        minimum: float = 1e-4,
        maximum: float = 1e4,
        boost: float = 1.5,
        low: float = 0.25,
        high: float = 0.75,
        enabled: bool = True,
    ):
        self.value = float(initial)
        self.minimum, self.maximum = float(minimum), float(maximum)
        self.boost, self.low, self.high = float(boost), float(low), float(high)
        self.enabled = enabled
        self.rho_history: deque[float] = deque(maxlen=50)

    def update(self, rho: float | None) -> float:
        """Adapt λ to the ratio ``rho`` (NaN for a failed trial, None: no information);
        returns the new λ."""
        if rho is None:
            return self.value
        self.rho_history.append(rho)
        if not self.enabled:
            return self.value
        if not math.isfinite(rho) or rho < self.low:
            self.value *= self.boost
        elif rho > self.high:
            self.value /= self.boost
        self.value = min(max(self.value, self.minimum), self.maximum)
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "rho_history": list(self.rho_history)}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.rho_history = deque(state["rho_history"], maxlen=self.rho_history.maxlen)


#: Bounds of the λ of the exact-model steps (:func:`exact_model_damping`).
EXACT_MIN_DAMPING, EXACT_MAX_DAMPING = 1e-8, 1e8


def exact_model_damping(value: float, rho: float) -> float:
    """The λ after a step checked against an exact quadratic model (``cg_iters``'s truncated
    Gauss–Newton step, the ``subspace`` step): × 2/3 when ``ρ > ¾``, × 3/2 when ``ρ < ¼`` or
    not finite (a failed trial), within ``[EXACT_MIN_DAMPING, EXACT_MAX_DAMPING]``. These
    steps keep their own λ, absolute and starting at 1, beside the held step's
    :class:`LevenbergMarquardt`."""
    if math.isfinite(rho) and rho > 0.75:
        return max(value * (2.0 / 3.0), EXACT_MIN_DAMPING)
    if not (math.isfinite(rho) and rho >= 0.25):
        return min(value * 1.5, EXACT_MAX_DAMPING)
    return value
