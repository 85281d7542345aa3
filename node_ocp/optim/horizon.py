"""Integration time as a control: second-order feedback updates of an ODE block's t1.

With a penalty ``(λ/2) t1²`` and the Gauss–Newton approximation (DESIGN.md §2):

    Q_T   = ∂L/∂t1 + λ t1
    Q_TT  = (∂L/∂t1)² + λ
    Q_Tθ δθ = (∂L/∂t1) (∇_θL · δθ)

where δθ is the parameter update the main optimizer actually took this step. Running averages
(coefficient ``beta``) of ``Q_T``, ``Q_TT`` and ``Q_Tθ δθ`` give the update, applied every
``update_every`` steps:

    feedback:     δt1 = −lr (Q̄_T + Q̄_Tθδθ) / Q̄_TT
    open_loop:    δt1 = −lr Q̄_T / Q̄_TT
    first_order:  δt1 = −lr Q_T               (plain gradient descent on t1, the baseline)

and ``t1 ← clamp(t1 + δt1, t0 + min_horizon, t0 + max_horizon)``. No update is taken during the
first ``warmup`` steps, while the averages still rest on a handful of noisy batches (one large
early ∂L/∂t1 would otherwise slam t1 to its lower bound and linger in the average).

Use it next to any optimizer (OCNOpt, Adam, SGD); call its ``step()`` after the main
optimizer's ``step()``, before gradients are cleared:

    horizon = HorizonOptimizer(model.ode, model.parameters(), lr=0.5, penalty=1e-2)
    loss.backward(); opt.step(); horizon.step(); opt.zero_grad()
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import dist
from .._errors import bad_type, bad_value, check_choice
from ..ode.block import ODEBlock
from .hyper import check_hyper, check_int, value_at

HORIZON_MODES: tuple[str, ...] = ("feedback", "open_loop", "first_order")


class HorizonOptimizer:
    """Makes ``block.t[-1]`` (the end time t1) a control.

    Args:
        block: an :class:`~node_ocp.ODEBlock` with a pair time grid ``(t0, t1)``, t1 > t0.
            Its ``t`` gets ``requires_grad`` (it stays a buffer, so model optimizers built
            from ``model.parameters()`` never touch it).
        params: the parameters the main optimizer updates (for the feedback term δθ); may be
            omitted for ``open_loop`` and ``first_order``.
        lr: step size (> 0), a number or a schedule ``step -> lr``.
        penalty: λ >= 0 of the penalty (λ/2) t1².
        mode: ``"feedback"`` (default), ``"open_loop"`` or ``"first_order"``.
        update_every: apply an update every this many steps (>= 1); averages update each step.
        beta: running-average coefficient in [0, 1).
        min_horizon, max_horizon: bounds on t1 − t0 (min > 0).
        warmup: steps that only feed the running averages before the first update (>= 0).
            Default: ``ceil(1 / (1 - beta)) - 1`` for the averaged modes (9 at beta 0.9, the
            averages' memory), 0 for ``first_order``.
        distributed: average ``∂L/∂t1`` over the processes of the default torch.distributed
            group before the update, so that every process keeps the same t1 (None, the
            default: when a group with more than one process is initialised). The feedback
            term uses the parameter gradients, which DistributedDataParallel has averaged.
    """

    def __init__(
        self,
        block: ODEBlock,
        params=None,
        lr=0.1,
        penalty: float = 0.0,
        mode: str = "feedback",
        update_every: int = 1,
        beta: float = 0.9,
        min_horizon: float = 0.05,
        max_horizon: float = float("inf"),
        distributed: bool | None = None,
        warmup: int | None = None,
    ):
        if not isinstance(block, ODEBlock):
            raise bad_type("block", block, "an ODEBlock")
        if block.t.numel() != 2 or not bool(block.t[1] > block.t[0]):
            raise bad_value("block.t", block.t, "a pair (t0, t1) with t1 > t0 for horizon control")
        if isinstance(block.t, nn.Parameter):
            raise bad_value(
                "block.t",
                "an nn.Parameter",
                "a buffer (build the block with a plain pair t)",
                "A parameter t would also be updated by the model's optimizer.",
            )
        self.block = block
        if distributed is not None and not isinstance(distributed, bool):
            raise bad_type("distributed", distributed, "True, False or None (automatic)")
        self.distributed = distributed
        self.mode = check_choice("mode", mode, HORIZON_MODES)
        self.lr = check_hyper("lr", lr, 0, float("inf"), True, True, "a float > 0")
        self.penalty = float(
            check_hyper("penalty", penalty, 0, float("inf"), False, True, "a float >= 0")
        )
        self.update_every = check_int("update_every", update_every, 1)
        self.beta = float(check_hyper("beta", beta, 0, 1, False, True, "a float in [0, 1)"))
        self.min_horizon = float(
            check_hyper("min_horizon", min_horizon, 0, float("inf"), True, True, "a float > 0")
        )
        if not (max_horizon > self.min_horizon):
            raise bad_value("max_horizon", max_horizon, f"a float > min_horizon={min_horizon}")
        self.max_horizon = float(max_horizon)
        if warmup is None:
            warmup = 0 if self.mode == "first_order" else math.ceil(1 / (1 - self.beta) - 1e-9) - 1
        self.warmup = check_int("warmup", warmup, 0)
        self.params = [p for p in params] if params is not None else []
        if self.mode == "feedback" and not self.params:
            raise bad_value("params", params, "the model parameters for mode='feedback'")
        block.t.requires_grad_(True)
        self._prev = [p.detach().clone() for p in self.params]
        self.steps = 0
        self.avg = {"Q_T": 0.0, "Q_TT": 0.0, "Q_Tdtheta": 0.0}
        self.last = {}

    @property
    def t1(self) -> float:
        return float(self.block.t.detach()[-1])

    @torch.no_grad()
    def step(self) -> float:
        """Update t1 from ``block.t.grad``; returns the new t1."""
        grad = self.block.t.grad
        if grad is None:
            raise ValueError(
                f"{self.block.name}: t1 has no gradient; call backward on a loss that "
                "depends on the block output before HorizonOptimizer.step()."
            )
        if dist.is_distributed() if self.distributed is None else self.distributed:
            grad = dist.all_reduce_bucket([grad.detach()], "mean")[0]
        g = float(grad[-1])
        t0, t1 = float(self.block.t.detach()[0]), self.t1
        dot = 0.0
        if self.mode == "feedback":
            for p, prev in zip(self.params, self._prev):
                if p.grad is not None:
                    dot += float((p.grad * (p.detach() - prev)).sum())
        if not all(map(_finite, (g, dot))):
            self._snapshot()
            self.block.t.grad = None
            return t1
        q_t = g + self.penalty * t1
        q_tt = g * g + self.penalty
        q_tdtheta = g * dot
        b = self.beta if self.steps > 0 else 0.0
        for key, val in (("Q_T", q_t), ("Q_TT", q_tt), ("Q_Tdtheta", q_tdtheta)):
            self.avg[key] = b * self.avg[key] + (1 - b) * val
        lr = value_at(self.lr, self.steps)
        delta = 0.0
        if self.steps >= self.warmup and (self.steps + 1) % self.update_every == 0:
            if self.mode == "first_order":
                delta = -lr * q_t
            elif self.avg["Q_TT"] > 0:
                num = self.avg["Q_T"]
                if self.mode == "feedback":
                    num += self.avg["Q_Tdtheta"]
                delta = -lr * num / self.avg["Q_TT"]
        new_t1 = min(max(t1 + delta, t0 + self.min_horizon), t0 + self.max_horizon)
        self.block.t[-1] = new_t1
        self.last = {
            "dL_dt1": g,
            "Q_T": q_t,
            "Q_TT": q_tt,
            "Q_Tdtheta": q_tdtheta,
            "delta": new_t1 - t1,
        }
        self.steps += 1
        self._snapshot()
        self.block.t.grad = None
        return new_t1

    def skip_step(self) -> None:
        """Forget the gradient of t1 that a failed training step left (the step is skipped;
        t1 stays)."""
        self.block.t.grad = None

    def _snapshot(self) -> None:
        for prev, p in zip(self._prev, self.params):
            prev.copy_(p.detach())

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "avg": dict(self.avg),
            "t1": self.t1,
            "prev": [p.clone() for p in self._prev],
        }

    def load_state_dict(self, state: dict) -> None:
        prev = state.get("prev", [])
        if len(prev) != len(self._prev):
            raise bad_value(
                "state_dict",
                f"{len(prev)} parameter snapshots",
                f"the {len(self._prev)} parameters of this controller (another model?)",
            )
        for i, (mine, saved) in enumerate(zip(self._prev, prev)):
            if tuple(mine.shape) != tuple(saved.shape):
                raise bad_value(
                    "state_dict",
                    f"the snapshot of parameter #{i} (of params) with shape {tuple(saved.shape)}",
                    f"shape {tuple(mine.shape)} (this model's; the state comes from another "
                    "model or width)",
                )
        self.steps = int(state["steps"])
        self.avg = dict(state["avg"])
        with torch.no_grad():
            self.block.t[-1] = float(state["t1"])
            for prev, saved in zip(self._prev, state["prev"]):
                prev.copy_(saved)

    def __repr__(self) -> str:
        return (
            f"HorizonOptimizer(block={self.block.name}, t1={self.t1:.4g}, mode={self.mode!r}, "
            f"lr={self.lr}, penalty={self.penalty}, update_every={self.update_every}, "
            f"beta={self.beta}, warmup={self.warmup}, min_horizon={self.min_horizon})"
        )


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")
