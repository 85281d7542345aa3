"""One calibration per part of the model: its parts' held curvatures set against each other.

The step control calibrates the held model with one scalar ``κ`` (see :mod:`.step_control`).
That is enough when every unit's curvature is off by the same factor. On recurrent models it
is not: measured along each unit's own direction (``experiments/unit_calibration.py``), the
factor a unit alone needs spreads 5–350× across the units of an ODE-RNN (its GRU maps and the
field's first layer 100–300×, its head 10×): their statistics come from different sources (a
cell's uses, the time-joint capture of a field, a head's one use), and one ``κ`` set by the
worst of them leaves the others stepping at a small fraction of their own Newton step.

So the units are grouped by the part of the model that owns them (:func:`unit_groups`:
each ODE block's field, each recurrent cell, each other layer), and every unit holds a scale
``s_u`` (in its optimizer state, key ``"unit_scale"``; 1 until measured): its held curvature
is ``s_u (C_u + λ)``, its direction ``(C_u + λ)⁻¹ g_u / s_u``. On step 0 and a few steps
after every curvature refresh the optimizer *sweeps* the groups: for each group it evaluates
the batch once with only that group moved along its own direction, by a step whose
first-order decrease is ``PROBE_DECREASE`` of the loss, and measures the curvature along it
as the trial measures it for the whole step (Gauss–Newton from the change of the outputs, or
the secant of the loss, whichever is larger, plus the damping's share; see
:class:`~.step_control.TrialOutcome`). ``κ_g`` = that curvature over the group's held one;
its units' scale is ``κ_g`` over the geometric mean of the groups', so that ``κ`` keeps the
overall level and the scales only set the parts against each other. Price: one forward
evaluation per group on those steps; none for a model of one part (a CNF's field).

Why groups and not units: one scale per unit inside a field (measured on the 2-D CNFs) left
the field's layers at scales 30× apart, the coupled step then needed κ ≈ 1500 and the NLL
stalled (cnf_8gaussians 4.15 against 2.97); within one field the Kronecker factors share
their source and are already on one scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..capture import is_cell
from .curvatures import CurvatureUnit, Damping, dot
from .step_control import TrialOutcome

SCALE_KEY = "unit_scale"
#: A probe moves its unit by the step whose first-order decrease is this fraction of the loss.
PROBE_DECREASE = 0.01


def unit_groups(model: nn.Module, blocks: list, units: list[CurvatureUnit]) -> list[list]:
    """The units, grouped by the part of the model that owns their parameters: every ODE
    block's field is one group, every recurrent cell one, every other layer one."""
    owner: dict[torch.Tensor, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(p, module)
    for module in model.modules():
        if is_cell(module):
            for p in module.parameters():
                owner[p] = module
    for block in blocks:
        for p in block.field.parameters():
            owner[p] = block
    groups: dict[int, list] = {}
    for unit in units:
        key = owner.get(unit.params[0])
        groups.setdefault(id(key) if key is not None else id(unit), []).append(unit)
    return list(groups.values())


def scale_of(unit: CurvatureUnit) -> float:
    """The unit's calibration scale ``s_u`` (1.0 until measured)."""
    return float(unit.state.get(SCALE_KEY, 1.0))


class UnitCalibration:
    """The sweep of the units' probes and their scales (see the module docstring).

    Args:
        enabled: sweep at all (False: every scale stays 1).
        delay: the sweep comes this many steps after each refresh (and on step 0).
        bounds: bounds on a scale relative to the geometric mean of the swept units.
    """

    def __init__(
        self,
        enabled: bool = True,
        delay: int = 5,
        bounds: tuple[float, float] = (1e-3, 1e3),
    ):
        self.enabled = enabled
        self.delay = delay
        self.bounds = bounds
        self.sweeps = 0
        self.last: dict[str, float] = {}  # κ_g of the last sweep, by the label of its first unit

    def due(self, step: int, update_every: int) -> bool:
        """True on the step ``delay`` steps after each curvature refresh (once EKFAC's
        diagonal has moved from the Kronecker eigenvalues towards the gradients' moments,
        which changes a unit's scale within a few steps); on step 0 too."""
        if not self.enabled:
            return False
        return step % update_every == min(self.delay, update_every - 1) or step == 0

    def sweep(
        self,
        groups: list[list[CurvatureUnit]],
        grads: dict,
        damping: Damping,
        loss: float,
        evaluate: Callable[[], tuple[float, float]],
        agree: Callable[[list[float]], list[float]],
        label: Callable[[CurvatureUnit], str] = lambda u: str(id(u)),
    ) -> None:
        """Probe every group whose parameters all have gradients and set the scales.

        Args:
            groups: the optimizer's units, grouped (:func:`unit_groups`).
            grads: this step's gradients, by parameter.
            damping: this step's damping.
            loss: the batch's loss at the current parameters.
            evaluate: ``() -> (loss change, Gauss–Newton curvature along the move or NaN)``
                at the parameters as they are (called with one group moved).
            agree: averages a list of floats over processes (identity on one process).
            label: a name for each group (of its first unit) in :attr:`last`.
        """
        if len(groups) < 2:  # one group: its scale is the geometric mean, 1
            return
        zero = damping.without_damping()
        kappas: dict[int, float] = {}
        for index, group in enumerate(groups):
            params = [p for unit in group for p in unit.params]
            if not all(p in grads for p in params):
                continue
            moves, gu = [], 0.0
            for unit in group:
                g = [grads[p] for p in unit.params]
                u = unit.solve(g, damping)
                moves.append(u)
                gu += float(dot(g, u))
            (gu,) = agree([gu])
            if not gu > 0:
                continue
            size = PROBE_DECREASE * max(abs(loss), 1e-8) / gu
            moves = [[x * -size for x in u] for u in moves]
            held = sum(float(unit.quadratic(m, damping)) for unit, m in zip(group, moves))
            undamped = sum(float(unit.quadratic(m, zero)) for unit, m in zip(group, moves))
            with torch.no_grad():
                backup = [p.detach().clone() for p in params]
                for unit, m in zip(group, moves):
                    for p, d in zip(unit.params, m):
                        p.add_(d)
                try:
                    actual, gn = evaluate()
                finally:
                    for p, b in zip(params, backup):
                        p.copy_(b)
            held, undamped, actual, gn = agree([held, undamped, actual, gn])
            probe = TrialOutcome(
                g_delta=-size * gu,
                held=held,
                kappa=1.0,
                damping=held - undamped,
                actual=actual,
                gauss_newton=gn,
                loss=abs(loss),
            )
            if math.isfinite(actual) and probe.informative and held > 0:
                kappa = probe.measured / held
                if kappa > 0 and math.isfinite(kappa):
                    kappas[index] = kappa
        if not kappas:
            return
        self.sweeps += 1
        mean = math.exp(sum(math.log(k) for k in kappas.values()) / len(kappas))
        low, high = self.bounds
        for index, group in enumerate(groups):
            ratio = kappas.get(index, mean) / mean
            for unit in group:
                unit.state[SCALE_KEY] = min(max(ratio, low), high)
        self.last = {label(groups[i][0]): k for i, k in kappas.items()}

    def state_dict(self) -> dict:
        return {"sweeps": self.sweeps}

    def load_state_dict(self, state: dict) -> None:
        self.sweeps = int(state.get("sweeps", 0))
