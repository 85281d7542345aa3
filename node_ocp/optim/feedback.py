"""Feedback policies: ``δθ_s = k_s + K_s δx_s`` across the stages of a model.

Training is an optimal-control problem whose stages are the layers (stems, heads, ODE blocks,
the blocks of a multi-block CNF). Solving its Bellman equation to second order makes the
update of stage ``s`` an open-loop term plus a gain on ``δx_s``, the change of the stage's
input caused by the updates already applied to the stages before it:

    δθ_s = −M_s⁻¹ (Q_θ,s + Q_θx,s δx_s).

The open-loop term is what OCNOpt takes without feedback. This module adds the second term:

- **Stages** (:func:`find_stages`): the children of an ``nn.Sequential``, or the modules a
  model lists in ``feedback_stages()`` (the bundled models do); their order is the order of
  their first calls in the recorded forward. A stage called more than once per forward (an
  ODE-RNN's GRU cell and field over the observation intervals) has one parameter set but a
  deviation per use: the summed gain would need the factors and a local backward per use
  (one backward solve per interval); such stages take the open-loop term, and so do the
  parameters outside every stage.
- **Gains from factors** (``feedback="gauss_newton"``): under Gauss–Newton with per-sample
  output factors ``y_{i,b}`` (``Σ_i y y ᵀ = H_b``), ``Q_θx,s δx_s =
  (1/N) Σ_b Σ_i (J_θ,bᵀ y_{i,b}) (q_{i,b}(s_in) · δx_b)`` with ``q_i(s_in) = J_xᵀ y_i`` the
  factors at the stage input. The dots give per-sample, per-factor weights ``w``; one local
  vector–Jacobian product of the stage (a backward solve for an ODE block) with the cotangent
  ``(1/N) Σ_i w_i q_i(s_out)`` at its output gives the term. With the empirical source the
  factor is the per-sample loss gradient (``q = N ∂L/∂x``, read from the step's own
  backward); the sampled and exact sources pull their output factors back to every stage
  boundary, one backward pass per factor.
- **The forward sweep** (:class:`FeedbackSweep`): one evaluation of the closure with a hook
  before every stage that measures ``δx_s`` against the recorded forward, forms the gain
  term at the recorded (nominal) point — only where ``δx_s`` stands above rounding (a
  stage whose input did not move keeps its open-loop step and costs no product) —,
  preconditions it with the stage's own units (the
  same ``M_s`` as the open-loop term, calibrated like it: ``1/κ`` with the model step,
  ``lr`` with the fixed step), bounds it by ``feedback_clip`` times the stage's open-loop
  step in that metric (the linearisation behind ``K δx`` holds only near the step; without
  the bound a two-block CNF's gain terms reached 266× its open-loop step and the runs blew
  up) and applies the stage's update before the stage runs.

``feedback="dense"`` (tiny chain models) uses exact matrices instead: per-stage Jacobians of
the whole batch, the backward Riccati recursion ``V_xx = Q_xx − Q_xθ M⁻¹ Q_θx`` and the
policy ``δθ_s = η k_s + K_s δx_s``; for affine stages and a quadratic loss with ``η = 1`` this
is the Newton step of the whole problem (see :mod:`.feedback_dense`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import dist
from ..ode.block import ODEBlock

FEEDBACK_MODES: tuple[str, ...] = ("off", "gauss_newton", "dense")


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def find_stages(model: nn.Module) -> tuple[list[nn.Module], str | None]:
    """The candidate stages of ``model`` and, when there are none, why.

    ``model.feedback_stages()`` (a list of sub-modules) is used when the model defines it;
    an ``nn.Sequential`` gives its children with parameters. Anything else has no known stage
    order: ``([], reason)``.
    """
    inner = _unwrap(model)
    declare = getattr(inner, "feedback_stages", None)
    if callable(declare):
        stages = list(declare())
        if not all(isinstance(m, nn.Module) for m in stages):
            return [], f"{type(inner).__name__}.feedback_stages() did not return modules"
    elif isinstance(inner, nn.Sequential):
        stages = [m for m in inner if any(True for _ in m.parameters())]
    else:
        return [], (
            f"{type(inner).__name__} is not an nn.Sequential and defines no feedback_stages() "
            "(a list of its stage modules)"
        )
    if len(stages) < 2:
        return [], f"{type(inner).__name__} has {len(stages)} stage(s) with parameters"
    return stages, None


def _tensors(value) -> list[torch.Tensor]:
    """The tensors of a stage's arguments or result (a tensor, or a tuple/list of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _batch_dim(rec: StageRecord, tensor: torch.Tensor, n: int) -> int | None:
    """The batch dimension of a stage tensor: 1 for an ODE block's grid output ``(T, B, …)``,
    else 0; None when its size there is not the batch size ``n``."""
    grid = (
        isinstance(rec.module, ODEBlock)
        and bool(rec.inputs)
        and tensor.dim() == rec.inputs[0].dim() + 1
    )
    d = 1 if grid else 0
    return d if tensor.dim() > d and tensor.shape[d] == n else None


@dataclass
class StageRecord:
    """The recorded first call of one stage in a feedback step's forward.

    ``inputs``/``outputs`` are the call's tensors (in the graph of the loss); ``grads`` maps
    ``id(tensor)`` to ``∂L/∂tensor`` from the step's backward (the empirical factors).
    ``args``/``kwargs`` are the call's arguments, with which a gain re-calls the stage
    (``inputs`` are the positional tensors: the state a sweep compares).
    """

    module: nn.Module
    index: int
    args: tuple
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    calls: int = 1
    grads: dict[int, torch.Tensor] = field(default_factory=dict)
    kwargs: dict = field(default_factory=dict)


class StageRecorder:
    """Forward hooks on the stages that record their first call (grad enabled only)."""

    def __init__(self, stages: list[nn.Module]):
        self.stages = stages
        self.records: dict[int, StageRecord] = {}
        self._handles: list = []
        self._grad_handles: list = []
        self._paused = False
        self._order = 0

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self, keep_grads: bool) -> None:
        self.disarm()
        self.records, self._order = {}, 0
        for m in self.stages:
            hook = self._hook(keep_grads)
            self._handles.append(m.register_forward_hook(hook, with_kwargs=True))

    def disarm(self) -> None:
        """Stop recording calls (the records and their gradient hooks stay)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def stop_grads(self) -> None:
        """Stop keeping gradients (after the step's own backward)."""
        for h in self._grad_handles:
            h.remove()
        self._grad_handles = []

    def clear(self) -> None:
        self.disarm()
        self.stop_grads()
        self.records = {}

    def _hook(self, keep_grads: bool):
        def hook(module, args, kwargs, result):
            if not torch.is_grad_enabled():
                return
            rec = self.records.get(id(module))
            if rec is not None:
                rec.calls += 1
                return
            rec = StageRecord(module, self._order, args, _tensors(args), _tensors(result))
            rec.kwargs = dict(kwargs)
            self._order += 1
            self.records[id(module)] = rec
            if keep_grads:
                for t in rec.inputs + rec.outputs:
                    if t.requires_grad:
                        self._grad_handles.append(t.register_hook(self._keeper(rec.grads, id(t))))

        return hook

    def _keeper(self, store: dict, key: int):
        def keep(g):
            if not self._paused:
                store[key] = g.detach()

        return keep

    @contextmanager
    def paused(self):
        """No gradients kept inside (the factor flow's pull-backs during backward)."""
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def ordered(self) -> list[StageRecord]:
        return sorted(self.records.values(), key=lambda r: r.index)


@dataclass
class FeedbackReport:
    """What the last feedback step did.

    Attributes:
        step: the optimizer step.
        stages: stages that took a gain term (``closed``) and that stayed open-loop.
        gain_ratio: ``‖Σ_s feedback_s‖ / ‖open-loop update‖`` over the closed stages.
        clipped: closed stages whose gain term ``feedback_clip`` scaled down.
        still: closed stages whose input did not move (no gain term computed).
        gain_scale: the multiplier ``β`` of the gain terms' scale (``feedback_gain``).
        loss: the loss of the sweep (the batch at the new parameters).
        reason: "ok", or why the sweep fell back to the open-loop update.
    """

    step: int
    closed: int = 0
    open: int = 0
    gain_ratio: float = 0.0
    clipped: int = 0
    still: int = 0
    gain_scale: float = 1.0
    loss: float = float("nan")
    reason: str = "ok"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class FeedbackSweep:
    """One feedback step's forward sweep, with the factors at the stage boundaries.

    Args:
        records: the stage records of this step, in call order.
        factors: ``id(tensor) -> (R, *tensor.shape)`` factors at the recorded stage tensors
            (:func:`empirical_factors` or :func:`pulled_factors`).
        units: the optimizer's curvature units.
        damping: this step's damping.
        gain_scale: ``param -> float``: the calibration of the gain (``1/κ`` or ``lr``).
        reduce: average the gain gradients over processes.
        clip: None, or the largest ratio of a stage's gain term to its open-loop step in
            the held metric ``C + λ`` (larger gain terms are scaled down to it).
    """

    def __init__(
        self,
        records,
        factors: dict,
        units,
        damping,
        gain_scale: Callable,
        reduce: bool,
        clip: float | None = None,
    ):
        self.clip = clip
        self.records = records
        self.factors = factors  # id(tensor) -> (R, *tensor.shape)
        self.units = units
        self.damping = damping
        self.gain_scale = gain_scale
        self.reduce = reduce

    # ------------------------------------------------------------------ gains
    def closed_stages(self, params_of: Callable) -> dict[int, list]:
        """Stages that can take a gain: called once, with factors at their input and output,
        and units wholly inside them. Returns ``id(module) -> [units]``."""
        out = {}
        for rec in self.records:
            if rec.calls != 1:
                continue
            own = params_of(rec.module)
            units = [u for u in self.units if u.params and all(p in own for p in u.params)]
            if not units:
                continue
            if not any(id(t) in self.factors for t in rec.inputs):
                continue
            if not any(id(t) in self.factors for t in rec.outputs if t.requires_grad):
                continue
            out[id(rec.module)] = units
        return out

    def gain(self, rec: StageRecord, new_inputs: list[torch.Tensor], units: list) -> dict:
        """``(C + λ)⁻¹ Q_θx δx`` for one stage, per parameter (before the gain scale)."""
        n = _batch_size(rec)
        w = None
        for old, new in zip(rec.inputs, new_inputs):
            q = self.factors.get(id(old))
            if q is None or new.shape != old.shape:
                continue
            bd = _batch_dim(rec, old, n)
            if bd is None:
                continue
            delta = (new - old).detach()
            prod = q * delta.unsqueeze(0)  # (R, *shape)
            dims = [d + 1 for d in range(old.dim()) if d != bd]
            part = prod.sum(dim=dims) if dims else prod  # (R, N)
            w = part if w is None else w + part
        params = [p for u in units for p in u.params]
        if w is None:
            return {}
        outs, cots = [], []
        for t in rec.outputs:
            q = self.factors.get(id(t))
            if q is None or not t.requires_grad:
                continue
            bd = _batch_dim(rec, t, n)
            if bd is None:
                continue
            shape = [1] * (t.dim() + 1)
            shape[0], shape[bd + 1] = w.shape[0], n
            cots.append((q * w.reshape(shape)).sum(0) / n)
            outs.append(t)
        if not outs:
            return {}
        # the stage's vector-Jacobian product at the recorded (nominal) point, on a fresh
        # graph: the step's own graph saw the parameters change in place since
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in rec.args)
        kwargs = {
            k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in rec.kwargs.items()
        }
        with torch.enable_grad():
            fresh = _tensors(rec.module(*args, **kwargs))
            index = {id(t): i for i, t in enumerate(rec.outputs)}
            picked = [fresh[index[id(t)]] for t in outs]
            got = torch.autograd.grad(picked, params, grad_outputs=cots, allow_unused=True)
        h = [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]
        if self.reduce and dist.world_size() > 1:
            h = dist.all_reduce_bucket(h, op="mean")
        hp = dict(zip(params, h))
        out = {}
        for u in units:
            out.update(zip(u.params, u.solve([hp[p] for p in u.params], self.damping)))
        return out

    # ------------------------------------------------------------------ sweep
    def run(self, closure: Callable, update: dict, params_of: Callable):
        """Apply ``update`` (the open-loop δ) with the gains during one closure evaluation.

        Returns ``(taken, loss, report_fields)``: the update actually applied per parameter,
        the closure's loss at the new parameters, and the report's figures.
        """
        closed = self.closed_stages(params_of)
        in_closed = {p for units in closed.values() for u in units for p in u.params}
        taken = {}
        for p, d in update.items():  # open-loop parameters move before the sweep
            if p not in in_closed:
                p.add_(d)
                taken[p] = d
        by_module = {id(r.module): r for r in self.records if id(r.module) in closed}
        fb_sq, open_sq, clipped, still = [0.0], [0.0], [0], [0]
        done = set()

        def pre_hook(module, args):
            key = id(module)
            if key in done or key not in by_module:
                return
            done.add(key)
            rec = by_module[key]
            units = [u for u in closed[key] if all(p in update for p in u.params)]
            new_inputs = _tensors(args)
            if moved(rec.inputs, new_inputs):
                gains = self.gain(rec, new_inputs, units)
            else:
                gains = {}
                still[0] += 1
            fbs = {p: gains[p] * -self.gain_scale(p) for u in units for p in u.params if p in gains}
            nu = self._clip_factor(units, update, fbs)
            clipped[0] += nu < 1.0
            for u in units:
                for p in u.params:
                    d = update[p]
                    open_sq[0] += float((d * d).sum())
                    if p in fbs:
                        fb = fbs[p] * nu
                        fb_sq[0] += float((fb * fb).sum())
                        d = d + fb
                    p.add_(d)
                    taken[p] = d

        handles = [r.module.register_forward_pre_hook(pre_hook) for r in by_module.values()]
        try:
            value = closure()
        finally:
            for h in handles:
                h.remove()
        for p, d in update.items():  # stages the sweep did not reach
            if p not in taken:
                p.add_(d)
                taken[p] = d
        ratio = math.sqrt(fb_sq[0] / open_sq[0]) if open_sq[0] > 0 else 0.0
        fields = dict(
            closed=len(closed),
            open=len(self.records) - len(closed),
            gain_ratio=ratio,
            clipped=clipped[0],
            still=still[0],
        )
        return taken, value, fields

    def _clip_factor(self, units, update: dict, fbs: dict) -> float:
        """``ν <= 1`` so that the stage's gain term is at most ``clip`` times its open-loop
        step in the held metric ``C + λ`` (the linearisation behind ``K δx`` holds only
        near the step)."""
        if self.clip is None or not fbs:
            return 1.0
        q_open = q_fb = 0.0
        for u in units:
            q_open += float(u.quadratic([update[p] for p in u.params], self.damping))
            fb = [fbs[p] if p in fbs else torch.zeros_like(p) for p in u.params]
            q_fb += float(u.quadratic(fb, self.damping))
        if q_fb == 0 or q_fb <= self.clip**2 * q_open:
            return 1.0
        return self.clip * math.sqrt(q_open / q_fb)


def empirical_factors(records: list[StageRecord]) -> dict[int, torch.Tensor]:
    """``q = N ∂L/∂x`` at every recorded tensor (one factor: the per-sample gradient)."""
    out = {}
    for rec in records:
        for t in rec.inputs + rec.outputs:
            g = rec.grads.get(id(t))
            if g is not None:
                out[id(t)] = (g * _batch_size(rec)).unsqueeze(0)
    return out


def pulled_factors(
    records: list[StageRecord], outputs: torch.Tensor, y: torch.Tensor
) -> dict[int, torch.Tensor]:
    """The output factors ``y`` (``(R, *outputs.shape)``) pulled back to every recorded
    tensor, one backward pass of the step's graph per factor (run before the parameters
    change)."""
    tensors, seen = [], set()
    for rec in records:
        for t in rec.inputs + rec.outputs:
            if t.requires_grad and id(t) not in seen:
                seen.add(id(t))
                tensors.append(t)
    rows: dict[int, list] = {id(t): [] for t in tensors}
    with torch.enable_grad():
        for i in range(y.shape[0]):
            got = torch.autograd.grad(
                outputs, tensors, grad_outputs=y[i], retain_graph=True, allow_unused=True
            )
            for t, g in zip(tensors, got):
                rows[id(t)].append(torch.zeros_like(t) if g is None else g.detach())
    return {id(t): torch.stack(rows[id(t)]) for t in tensors}


#: A stage input changed by at most this many ulps of its norm did not move.
STILL_ULPS = 16.0


def moved(old: list[torch.Tensor], new: list[torch.Tensor]) -> bool:
    """Whether any stage input moved: ``‖new − old‖ > STILL_ULPS · eps · ‖old‖`` (``eps``
    the dtype's machine epsilon), for some pair of the same shape."""
    for a, b in zip(old, new):
        if a.shape != b.shape or not a.is_floating_point():
            continue
        eps = STILL_ULPS * torch.finfo(a.dtype).eps
        if float(torch.linalg.vector_norm(b.detach() - a.detach())) > eps * float(
            torch.linalg.vector_norm(a.detach())
        ):
            return True
    return False


def _batch_size(rec: StageRecord) -> int:
    for t in rec.inputs:
        if t.dim() > 0:
            return int(t.shape[0])
    return 1


def warn_open_loop(reason: str) -> None:
    warnings.warn(f"OCNOpt: feedback runs open-loop: {reason}.", RuntimeWarning, stacklevel=4)
