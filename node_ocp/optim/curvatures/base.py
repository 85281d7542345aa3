"""The interface every curvature variant implements: one :class:`CurvatureUnit` per unit.

A *unit* is the set of parameters one curvature block describes. Its ``scope`` says which:

- ``"tensor"``: one parameter tensor (identity, diagonal);
- ``"layer"``: an ``nn.Linear`` / ``nn.Conv2d`` layer, weight and bias together (kfac, ekfac);
- ``"block"``: all parameters of one ODE block's field (dense).

A unit holds the curvature ``C`` of its parameters as the optimizer last estimated it and
answers three questions (``grads``/``v`` are lists of tensors in the order of ``params``):

- :meth:`direction` ``(C + λ)⁻¹ g`` for this step's gradient (a unit with per-step
  statistics, such as EKFAC's diagonal, updates them here, once per step);
- :meth:`quadratic` ``vᵀ (C + λ) v``, the unit's share of the quadratic model;
- :meth:`scale`: the mean eigenvalue of ``C``, the reference of relative damping.

The damping ``λ`` of the unit comes as a :class:`Damping` (relative to :meth:`scale` or
absolute). Units whose ``C`` comes from the backward solves declare the statistics they need
(``needs = "kronecker"`` or ``"dense"``); the optimizer hands them a reduced statistics record
in :meth:`refresh`. Every tensor of a unit's state lives in ``state``, the optimizer's state
dict of ``params[0]``, so ``OCNOpt.state_dict()`` carries it.

A new variant is one module with a subclass of :class:`CurvatureUnit` and one line in
:data:`node_ocp.optim.curvatures.VARIANTS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class Damping:
    """The damping of one step: ``value`` times a unit's :meth:`~CurvatureUnit.scale`
    (``relative=True``) or ``value`` itself (``relative=False``)."""

    value: float
    relative: bool = True
    #: ``p`` of OCNOpt's ``scale_power``: units with a diagonal in their eigenbasis (ekfac,
    #: diagonal) use ``(s + λ)ᵖ`` where they would use ``s + λ`` (½: Adam's square-root
    #: scaling in the unit's eigenbasis)
    power: float = 1.0
    #: the weight decay's own curvature in this unit's units (absolute, added after λ):
    #: part of the objective, not damping, so :meth:`without_damping` keeps it (OCNOpt's
    #: ``decay_in_model``; 0 otherwise)
    decay: float = 0.0

    def of(self, scale: float) -> float:
        """The absolute shift of a unit whose curvature has mean eigenvalue ``scale``: its
        damping λ (``value`` times ``scale`` when relative) plus ``decay``."""
        return (self.value * scale if self.relative else self.value) + self.decay

    def denominator(self, s: torch.Tensor, scale: float) -> torch.Tensor:
        """``(s + λ)ᵖ`` for a diagonal ``s`` (any shape) of a unit of mean eigenvalue
        ``scale``; exactly ``s + λ`` at ``p = 1``."""
        shifted = s + self.of(scale)
        return shifted if self.power == 1.0 else shifted.pow(self.power)

    def without_damping(self) -> Damping:
        """The same rule with ``λ = 0`` (the undamped quadratic model)."""
        return Damping(0.0, self.relative, self.power, self.decay)


class CurvatureUnit(ABC):
    """Preconditioning of one unit of parameters (see the module docstring).

    Args:
        params: the unit's parameter tensors.
        state: the optimizer's per-parameter state dict of ``params[0]``.
        module: the layer (``scope = "layer"``) or ODE block (``"block"``), else None.
    """

    #: "tensor", "layer" or "block": what one unit covers.
    scope: ClassVar[str] = "tensor"
    #: None, "kronecker" or "dense": the statistics :meth:`refresh` takes.
    needs: ClassVar[str | None] = None

    def __init__(self, params: list[torch.Tensor], state: dict, module=None):
        self.params = list(params)
        self.state = state
        self.module = module

    @classmethod
    def from_group(cls, params, state: dict, module, group: dict) -> CurvatureUnit:
        """The unit for ``params`` with the hyper-parameters of their param group."""
        return cls(params, state, module)

    @property
    def ready(self) -> bool:
        """True once the unit holds a curvature estimate (else :meth:`direction` is ``g``)."""
        return True

    def refresh(self, stats) -> None:
        """Install the curvature from a reduced statistics record (units with ``needs``)."""
        raise NotImplementedError(f"{type(self).__name__} takes no statistics")

    @abstractmethod
    def scale(self) -> float:
        """Mean eigenvalue of the held curvature (1.0 before there is one)."""

    @abstractmethod
    def direction(
        self, grads: list[torch.Tensor], damping: Damping, samples: float
    ) -> list[torch.Tensor]:
        """``(C + λ)⁻¹ g`` for this step's gradient; called once per step.

        ``samples`` is the number of examples behind one gradient (the batch size of the
        last refresh), which turns a squared mean gradient into a per-sample second moment.
        """

    def observe(self, grads: list[torch.Tensor], samples: float) -> None:
        """Update the per-step statistics from this step's gradient without forming a
        direction (OCNOpt's ``numerator="average"`` then calls :meth:`solve` with the
        averaged gradient); units without per-step statistics do nothing."""
        return None

    def solve(self, v: list[torch.Tensor], damping: Damping) -> list[torch.Tensor]:
        """``(C + λ)⁻¹ v`` with the held curvature, changing nothing (the feedback gains).

        The default is :meth:`direction`, right for units whose direction keeps no running
        statistics; units that update statistics in :meth:`direction` override it.
        """
        return self.direction(v, damping, 1.0)

    @abstractmethod
    def quadratic(self, v: list[torch.Tensor], damping: Damping) -> torch.Tensor:
        """``vᵀ (C + λ) v`` as a 0-dim tensor (the damping of this step, as in direction)."""

    def memory_bytes(self) -> int:
        """Bytes of the unit's state tensors."""
        return sum(
            t.numel() * t.element_size() for t in self.state.values() if isinstance(t, torch.Tensor)
        )


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_i a_i · b_i`` over lists of tensors, as a 0-dim tensor."""
    return sum((x * y).sum() for x, y in zip(a, b))
