"""Learning-rate schedules of a run: a linear warm-up, then constant, cosine or linear decay.

One factor function ``step -> factor`` serves every optimizer: torch optimizers (built-in
or by class path) get it through ``torch.optim.lr_scheduler.LambdaLR`` (stepped after every
optimizer step, its state saved in the checkpoint); OCNOpt multiplies every step it takes by
it (``OCNOpt(schedule=...)``), whose own step counter places it on resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._errors import check_choice

#: the schedule kinds (the config's ``schedule`` choices)
SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class ScheduleFactor:
    """The factor on the base learning rate at optimizer step ``s`` (0-based).

    Warm-up: ``(s + 1) / (warmup + 1)`` for ``s < warmup``. Then, with progress
    ``p = (s - warmup) / max(1, total - warmup)`` clipped to [0, 1]: ``constant`` 1;
    ``cosine`` ``final + (1 - final)(1 + cos πp) / 2``; ``linear`` ``1 - (1 - final) p``.
    """

    kind: str = "constant"
    total: int = 1
    warmup: int = 0
    final: float = 0.0

    def __post_init__(self):
        check_choice("kind", self.kind, SCHEDULES)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        p = min(1.0, max(0.0, (step - self.warmup) / max(1, self.total - self.warmup)))
        if self.kind == "cosine":
            return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * p))
        return 1.0 - (1.0 - self.final) * p

    @property
    def is_constant(self) -> bool:
        return self.kind == "constant" and self.warmup == 0


def attach_schedule(opt, factor: ScheduleFactor):
    """Put ``factor`` on ``opt``; returns the ``LambdaLR`` to step (None for OCNOpt, which
    applies it inside its own step, and for a constant schedule)."""
    from .adapters import adapt

    if factor.is_constant:
        return None
    return adapt(opt).attach_schedule(factor)
