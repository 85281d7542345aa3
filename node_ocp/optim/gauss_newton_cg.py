"""The coupled direction: a few preconditioned conjugate-gradient steps on the exact
Gauss–Newton curvature of the whole model (``cg_iters``).

OCNOpt's held curvature is block-diagonal: one unit per layer (or block), no coupling between
them. Where the parameters of different units act on the output together across time — a
recurrent cell, the ODE field between observations and a read-out head — the block-diagonal
direction is wrong in a way no step size repairs (measured in
``experiments/results/bench_issue21.md`` §6: Hessian-free steps with the whole model's
Gauss–Newton reach 3× lower validation MSE than tuned Adam at equal steps on the ODE-RNN
spiral forecaster; cut into cell / field / head blocks, the same curvature stays 4× above
Adam).

With ``cg_iters = k > 0`` the held curvature becomes the preconditioner of ``k`` conjugate
gradient steps on ``(G + λ) d = g`` (plus weight decay); ``curvature="identity"`` makes it
plain CG, which is what measured best:

- ``G v = Jᵀ H J v``: ``J v`` by a central difference of the step's closure outputs (its
  ``loss_inputs`` where it returns ``(loss, outputs, loss_inputs)``) at
  ``θ ± ε v`` (two forward evaluations of the batch; exact to ``O(ε²)`` for a smooth solve:
  fixed-grid solvers, or adaptive ones at tight tolerances), ``H`` the Hessian of the loss in
  the outputs applied by double backward through the loss alone, and ``Jᵀ`` by a backward
  pass (the own adjoint included) through a graph of the batch built once per step by the
  closure (the step's own graph may be gone, and the calibration sweep moves the
  parameters in place);
- the first step is the held direction ``u = (C + λ)⁻¹ g`` scaled by ``gᵀu / uᵀGu``; each
  further step adds the coupling the held curvature leaves out;
- a non-positive or non-finite curvature ``pᵀGp`` stops the iteration with what it has.

OCNOpt takes a truncated Gauss–Newton step with it (:meth:`GaussNewtonCG.step`, Martens
2010): CG on ``(G + λ I + wd) d = g`` started at 0.95 times the previous step's solution
(kept in the optimizer state as ``cg_previous``), the step ``−d`` checked on the batch and
halved until the loss falls, and λ adapted from the reduction ratio of that quadratic model
(it starts at 1). The held curvature's stepper and its trials are not used on these steps; the held
curvature is the preconditioner. :meth:`GaussNewtonCG.refine` gives the CG direction alone.

**Status: experimental, measured on one task** (``experiments/results/bench_issue21.md``
§7, the ODE-RNN spiral forecaster, 150 steps): ``cg_iters=10, curvature="identity"`` ends at
about 4× lower test MSE than tuned Adam at equal steps (0.0027–0.0031 against 0.011–0.013),
but costs about 15× Adam's step on the CPU, where Adam reaches the same MSE first in
wall-clock time. Preconditioned by the Kronecker curvature the same CG ended near Adam
(0.0118): the block-diagonal preconditioner hurts here.

It costs one forward evaluation of the batch with a graph, and ``k`` times two forward and
one backward evaluation, per step. Two options make the products cheaper (measured in §8 of
``bench_issue21.md``): ``jv="forward"`` (``cg_jv``) forms ``J v`` by a forward difference
against the graph's own outputs, one forward evaluation instead of two; ``backprop`` (OCNOpt's
``cg_graph="direct"``) builds the step's graph, and evaluates the ``J v`` and trial
forwards, with the ODE blocks backpropagating through their solver, so that ``Jᵀ`` is one
pass through a stored graph instead of the own adjoint's vector-Jacobian product per solver
stage. It needs ``step(closure)`` with a closure
returning ``(loss, outputs)``; across processes it is not supported yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from .curvatures import dot
from .damping import exact_model_damping
from .trial import loss_and_outputs, read_closure


class GaussNewtonCG:
    """Preconditioned CG on the whole model's Gauss–Newton curvature.

    Args:
        iters: conjugate-gradient steps per optimizer step (>= 1).
        damping: the starting λ; state: the optimizer's per-parameter state (the previous
            solution is kept there); decay: the warm start's factor.
        jv: ``"central"`` or ``"forward"`` difference for ``J v`` (:data:`JV_RULES`).
        backprop: None, or a context factory inside which the closure's forwards build a
            backprop graph through the solver (OCNOpt's ``cg_graph="direct"``).
    """

    def __init__(
        self,
        iters: int,
        damping: float = 0.0,
        state=None,
        decay: float = 0.95,
        jv: str = "central",
        backprop: Callable[[], AbstractContextManager] | None = None,
    ):
        self.iters = iters
        self.state = state  # per-parameter optimizer state: the previous solution, kept
        self.decay = decay  # the CG of a step starts at ``decay`` times the previous one
        self.damping = damping  # λ of ``(G + λ I)``: Levenberg–Marquardt in :meth:`step`
        if jv not in JV_RULES:
            raise ValueError(f"jv: received {jv!r}; accepted: {', '.join(JV_RULES)}")
        self.jv = jv  # ``J v``: "central" (2 forwards, O(ε²)) or "forward" (1, O(ε))
        # a context in which the closure's forwards build a backprop graph through the solver
        # (``cg_graph = "direct"``): the graph and every ``J v`` forward are evaluated in it
        self.backprop = backprop or nullcontext
        self._outputs: torch.Tensor | None = None  # the batch's outputs, with their graph
        self._grad_outputs: torch.Tensor | None = None  # ∂L/∂outputs, with its graph
        self.last_iters = 0  # the steps the last refinement took
        self.last_reason = ""
        self.last_rho = float("nan")

    def _build(self, closure: Callable, quiet: Callable) -> float | None:
        """The graph of the batch at the current parameters; returns its loss, or None (with
        ``last_reason``) if the closure gives no outputs, or a loss not computed from the
        outputs it returns."""
        self.last_iters, self.last_reason = (
            0,
            ("the closure returned no outputs, or a loss not computed from them"),
        )
        with torch.enable_grad(), quiet(), self.backprop():
            value = read_closure(closure())
            loss, outputs = value.loss, value.exact_inputs
            if outputs is None or not outputs.requires_grad:
                return None
            (g,) = torch.autograd.grad(loss, outputs, create_graph=True, allow_unused=True)
        if g is None:  # e.g. ``lambda: (loss_fn(model(x), y), model(x))``: two forwards
            return None
        self._outputs, self._grad_outputs = outputs, g
        return float(loss.detach())

    def _start(self, grads: dict) -> dict | None:
        """``decay`` times the previous step's CG solution (Martens, 2010), or None."""
        if self.state is None or self.decay == 0:
            return None
        prev = {p: self.state[p].get("cg_previous") for p in grads}
        if any(v is None or v.shape != grads[p].shape for p, v in prev.items()):
            return None
        return {p: v * self.decay for p, v in prev.items()}

    def _release(self) -> None:
        self._outputs = self._grad_outputs = None

    def product(self, v: dict, closure: Callable, weight_decay: dict, quiet: Callable) -> dict:
        """``(G + λ + wd) v`` for the parameters of ``v`` (see the module docstring)."""
        params = list(v)
        theta = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in params))
        norm = math.sqrt(sum(float(x.pow(2).sum()) for x in v.values()))
        if norm == 0.0:
            return {p: torch.zeros_like(x) for p, x in v.items()}
        dtype = params[0].dtype
        central = self.jv == "central"
        eps = torch.finfo(dtype).eps ** (1.0 / 3.0 if central else 0.5) * (1.0 + theta) / norm
        # the graph holds the parameters: they are swapped out by ``.data`` (which leaves
        # their version counters, and so the graph, valid) and the very tensors the graph
        # saw are put back
        originals = [p.data for p in params]
        outs = []
        try:
            for sign in (1.0, -1.0) if central else (1.0,):
                for p, o in zip(params, originals):
                    p.data = o.add(v[p], alpha=sign * eps)
                with torch.no_grad(), self.backprop():
                    out = read_closure(closure()).exact_inputs
                outs.append(out.detach())
        finally:
            for p, o in zip(params, originals):
                p.data = o
        if central:
            jv = (outs[0] - outs[1]) / (2.0 * eps)
        else:  # against the graph's own outputs at θ (the same closure, the same draws)
            jv = (outs[0] - self._outputs.detach()) / eps
        with torch.enable_grad(), quiet():
            (hjv,) = torch.autograd.grad(
                self._grad_outputs, self._outputs, jv, retain_graph=True, allow_unused=True
            )
            if hjv is None:  # a loss linear in the outputs: no curvature
                hjv = torch.zeros_like(jv)
            grads = torch.autograd.grad(
                self._outputs, params, hjv, retain_graph=True, allow_unused=True
            )
        out = {}
        for p, gp in zip(params, grads):
            gv = torch.zeros_like(v[p]) if gp is None else gp.detach()
            shift = weight_decay.get(p, 0.0) + self.damping
            out[p] = gv if shift == 0 else gv.add(v[p], alpha=shift)
        return out

    def refine(
        self,
        grads: dict,
        directions: dict,
        precondition: Callable[[dict], dict],
        closure: Callable,
        weight_decay: dict,
        quiet: Callable,
    ) -> dict:
        """``d ≈ (G + wd)⁻¹ g`` by ``iters`` CG steps preconditioned by the held curvature
        (``directions`` is its ``u = M⁻¹ g``); ``directions`` unchanged where the first
        curvature is not positive or the closure gives no outputs (``last_reason`` says)."""
        if self._build(closure, quiet) is None:
            return directions
        try:
            d, _ = self._solve(grads, directions, precondition, closure, weight_decay, quiet)
            return directions if d is None else {**directions, **d}
        finally:
            self._release()

    def _solve(self, grads, directions, precondition, closure, weight_decay, quiet, start=None):
        """``(d, r)``: the CG iterate and its residual ``g − A d`` (``(None, None)`` when the
        first curvature is not positive); ``start``: the first iterate (None: 0)."""
        params = [p for p in directions if p in grads]
        if start is None:
            r = {p: grads[p].clone() for p in params}
            z = {p: directions[p] for p in params}
            d = {p: torch.zeros_like(z[p]) for p in params}
        else:
            d = {p: start[p].clone() for p in params}
            ad = self.product(d, closure, weight_decay, quiet)
            r = {p: grads[p] - ad[p] for p in params}
            z = precondition(r)
        p_dir = dict(z)
        rz = _dot(r, z, params)
        self.last_iters, self.last_reason = 0, "done"
        for i in range(self.iters):
            ap = self.product(p_dir, closure, weight_decay, quiet)
            pap = _dot(p_dir, ap, params)
            if not (math.isfinite(pap) and pap > 0 and math.isfinite(rz)):
                self.last_reason = f"curvature pᵀGp = {pap:.3g} at step {i + 1}"
                break
            a = rz / pap
            for p in params:
                d[p].add_(p_dir[p], alpha=a)
                r[p].sub_(ap[p], alpha=a)
            self.last_iters = i + 1
            if i + 1 == self.iters:
                break
            z = precondition(r)
            rz_new = _dot(r, z, params)
            beta = rz_new / rz if rz != 0 else 0.0
            p_dir = {p: z[p].add(p_dir[p], alpha=beta) for p in params}
            rz = rz_new
        if self.last_iters == 0:
            return None, None
        return d, r

    def step(
        self,
        grads: dict,
        directions: dict,
        precondition: Callable[[dict], dict],
        closure: Callable,
        weight_decay: dict,
        quiet: Callable,
        max_trials: int = 4,
    ) -> tuple[dict | None, float | None]:
        """A truncated Gauss–Newton step (Martens, 2010): ``δ = −d`` with ``d`` the CG
        solution of ``(G + λ + wd) d = g``, checked on the batch and halved up to
        ``max_trials`` times until the loss falls; λ adapts from the reduction ratio ``ρ`` of
        the quadratic model (× 2/3 above ¾, × 3/2 below ¼). Returns ``(δ or None, the last
        trial loss or None)``; None when no trial lowered the loss (nothing moves)."""
        loss0 = self._build(closure, quiet)  # the batch's loss at θ, from that forward
        if loss0 is None:
            return None, None
        try:
            start = self._start(grads)
            d, r = self._solve(grads, directions, precondition, closure, weight_decay, quiet, start)
        finally:
            self._release()
        if d is None:
            self.damping = exact_model_damping(self.damping, math.nan) if self.damping else 1.0
            return None, None
        params = list(d)
        if self.state is not None:
            for p in params:
                self.state[p]["cg_previous"] = d[p].detach().clone()
        gd = _dot(grads, d, params)  # gᵀd
        dad = gd - _dot(d, r, params)  # dᵀAd
        backup = [p.detach().clone() for p in params]
        scale, rho, loss1, taken = 1.0, float("nan"), None, None
        for _ in range(max_trials):
            for p, b in zip(params, backup):
                p.copy_(b).sub_(d[p], alpha=scale)
            with self.backprop():
                loss1 = float(loss_and_outputs(closure())[0])
            predicted = -scale * gd + 0.5 * scale * scale * dad
            rho = (loss1 - loss0) / predicted if predicted < 0 else float("nan")
            if math.isfinite(loss1) and loss1 < loss0:
                taken = {p: d[p] * -scale for p in params}
                break
            scale *= 0.5
        for p, b in zip(params, backup):
            p.copy_(b)
        self.damping = exact_model_damping(self.damping, rho)
        self.last_rho = rho
        return taken, loss1


#: How :meth:`GaussNewtonCG.product` forms ``J v``: a central difference (two forward
#: evaluations, error O(ε²)) or a forward one against the step's graph outputs (one, O(ε)).
JV_RULES = ("central", "forward")


def _dot(a: dict, b: dict, params: list) -> float:
    return float(dot([a[p] for p in params], [b[p] for p in params]))
