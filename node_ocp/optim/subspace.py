"""The subspace step (OCNOpt's ``subspace``): the held directions, cut into the model's parts,
and the previous update, combined by the exact, coupled Gauss–Newton model of the batch.

OCNOpt's held curvature is block-diagonal over layers. Where the parts of a model act on its
outputs together across time — a recurrent cell, the ODE field between observations and a
read-out head — the block-diagonal model gets the relative sizes of the parts' steps wrong,
and no single step size repairs that (``experiments/results/bench_issue21.md`` §6, §15). This
step keeps the held directions but chooses their sizes with every coupling of the batch's
exact curvature, as K-FAC chooses its step and momentum (Martens & Grosse, 2015, §7) — one
coefficient per part instead of one for all:

- the directions ``D = [d_1 … d_k, δ_prev]``: ``d_i`` is the held direction ``−u`` restricted
  to part ``i`` (``"parts"``: one per top-level child module of the model, one more for
  parameters held by the model itself; ``"whole"``: ``−u`` itself) and ``δ_prev`` the update
  of the previous step (when there is one);
- the exact model of the batch, ``m(c) = bᵀc + ½ cᵀ M c`` with ``b_i = gᵀ d_i`` and
  ``M_ij = (J d_i)ᵀ H (J d_j) + d_iᵀ W d_j`` (``J`` the Jacobian of the closure's outputs in
  the parameters, ``H`` the Hessian of the loss in the outputs, ``W`` the weight decay);
  ``J d`` by double backward through a graph of the batch built with the ODE blocks
  backpropagating through their solvers, ``H J d`` by double backward through the loss;
- the coefficients ``c = −(M + λ diag M + μ diag Q)⁻¹ b`` (Levenberg–Marquardt damping on
  the diagonal, λ adapted from the reduction ratio ρ of every step: × 2/3 above ¾, × 3/2
  below ¼; ``Q_ii`` the held model's own quadratic form along each direction,
  ``d_iᵀ s (C + damping)ᵖ d_i`` with ``C`` the held curvature, ``s`` its calibration scales
  and ``p`` OCNOpt's ``scale_power``, weighted by ``μ = held_weight``);
- the step ``δ = α D c`` is checked on the batch **every step**: α halves (up to
  ``max_trials`` evaluations) until the loss falls by the Armijo fraction of ``α bᵀc``; when
  none does, nothing moves and λ grows.

Why ``μ diag Q``: the batch's exact model is exact on the batch only. Along a direction the
batch barely constrains (a confident classifier's softmax has a near-zero Hessian) it is
nearly flat, and the coefficient ``b_i / M_ii`` grows without bound while the trial, judged on
the same batch, agrees (ρ ≈ 1, so λ falls to its floor). On the Japanese-vowels ODE-RNN the
field's coefficient swung between −17 and +40 from step to step, the parameters moved 2–7 %
of their norm per step (Adam: 0.01–0.1 %) and the validation loss rose from 0.22 to 0.37
(``bench_issue21.md`` §27). The held curvature is an average over many batches; adding a
fraction of it keeps the step along a flat direction near ``(1/μ) gᵀu_i / mᵀu_i`` held
steps (``u_i`` the held direction, ``m`` the numerator it preconditions, ``g`` the batch's
gradient: ``1/μ`` where the numerator is the gradient; with the running average of the
default it is a soft limit that still follows the batch's gradient, 3–23 held steps measured
on a small GRU model), and shrinks a step the exact model agrees with by
``M_ii / (M_ii + μ Q_ii)`` only. The trial's
reduction ratio ρ is still read against the exact model ``bᵀc + ½ cᵀMc``.

It costs per step one forward and one backward of the batch with a graph (the ``J``-products'
graph), ``k + 1`` double-backward products and at least one trial forward. It needs
``step(closure)`` with a closure returning ``(loss, outputs)`` whose loss is computed from the
outputs, or ``(loss, outputs, loss_inputs)`` whose loss is computed from ``loss_inputs`` (a
loss with terms its likelihood's outputs do not determine, as a latent ODE's bound: the
Hessian in them is the loss's own, by double backward); otherwise OCNOpt keeps its held step
(one warning). Across processes it is refused.

Tensors: ``grads``, ``directions`` and updates are dicts ``parameter -> tensor`` of the
parameter's shape; ``outputs`` any shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from .damping import exact_model_damping
from .trial import ClosureValue, decay_terms, loss_and_outputs, read_closure

#: The accepted values of OCNOpt's ``subspace`` (``"auto"``: see :func:`automatic`).
SUBSPACES: tuple[str, ...] = ("auto", "off", "parts", "whole")

#: The default weight ``μ`` of the held curvature in the subspace step's model (OCNOpt's
#: ``subspace_held``), chosen in ``experiments/results/bench_issue21.md`` §27.
HELD_WEIGHT = 0.3

#: The Armijo fraction: a trial is taken when ``L(θ + αδ) ≤ L(θ) + ARMIJO · α bᵀc``.
ARMIJO = 1e-4


def has_recurrent_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds a recurrent layer (``nn.GRUCell``, ``nn.LSTMCell``,
    ``nn.RNNCell``, ``nn.GRU``, ``nn.LSTM``, ``nn.RNN``): parameters applied at every step of
    a sequence, the case the block-diagonal curvature gets wrong."""
    return any(isinstance(m, (nn.RNNCellBase, nn.RNNBase)) for m in model.modules())


def automatic(model: nn.Module, step: str, cg_iters: int, across_processes: bool) -> str:
    """What ``subspace="auto"`` is for ``model``: ``"parts"`` where it holds a recurrent
    layer (ODE-RNNs, a user's GRU/LSTM model) and the step is OCNOpt's own
    (``step="model"``, no ``cg_iters``, one process); ``"off"`` elsewhere (CNFs, Neural
    CDEs, conv and MLP ODE models keep the held step). OCNOpt then keeps ``"parts"`` only
    where the first step's closure returns outputs its loss is computed from: a loss read
    through ``loss_inputs`` alone (the latent ODE's bound) keeps the held step, which
    measured better there. Chosen from the measurements of
    ``experiments/results/bench_issue21.md`` §20–21."""
    if step != "model" or cg_iters or across_processes:
        return "off"
    return "parts" if has_recurrent_layers(model) else "off"


def model_parts(model: nn.Module) -> dict[torch.Tensor, str]:
    """Parameter -> the name of its part: the top-level child module holding it (``""`` for
    parameters the model holds itself)."""
    return {p: (n.split(".", 1)[0] if "." in n else "") for n, p in model.named_parameters()}


class SubspaceStep:
    """The exact coupled combination of the held directions (see the module docstring).

    Args:
        model: the whole model (its top-level children are the parts).
        how: ``"parts"`` or ``"whole"``.
        state: the optimizer's per-parameter state (the previous update is kept there as
            ``subspace_prev``).
        backprop: a context factory inside which the closure's forwards build a backprop
            graph through the solvers (OCNOpt passes one for its ODE blocks).
        damping: the starting λ.
        max_trials: the most evaluations of the batch a step's trials make.
        held_weight: ``μ``, the weight of the held curvature along each direction in the
            model the coefficients are chosen from (0: the exact model alone).
    """

    def __init__(
        self,
        model: nn.Module,
        how: str,
        state,
        backprop: Callable[[], AbstractContextManager] | None = None,
        damping: float = 1.0,
        max_trials: int = 4,
        held_weight: float = 0.0,
    ):
        self.how = how
        self.held_weight = held_weight
        self.part_of = model_parts(model)
        self.state = state
        self.backprop = backprop or nullcontext
        self.damping = damping
        self.max_trials = max_trials
        self.last_reason = ""  # why the last step fell back to the held step ("" if it did not)
        self.last_rho = float("nan")
        self.last_alpha = float("nan")
        self.last_trials = 0  # evaluations of the batch the last step's trials made
        self.last_coefficients: list[float] = []

    # ------------------------------------------------------------------ the directions
    def basis(self, directions: dict) -> list[dict]:
        """The directions ``D`` (each a dict over a subset of the parameters; descent: −u)."""
        params = list(directions)
        if self.how == "whole":
            dirs = [{p: -directions[p] for p in params}]
        else:
            keys = list(dict.fromkeys(self.part_of.get(p, "") for p in params))
            dirs = [
                {p: -directions[p] for p in params if self.part_of.get(p, "") == key}
                for key in keys
            ]
        prev = {p: self.state[p].get("subspace_prev") for p in params}
        if all(v is not None and v.shape == directions[p].shape for p, v in prev.items()):
            if bool(torch.stack([v.ne(0).any() for v in prev.values()]).any()):
                dirs.append(prev)
        return dirs

    # ------------------------------------------------------------------ the exact model
    def accepts(self, closure: Callable, quiet, outputs_only: bool = False) -> bool:
        """Whether ``closure`` returns outputs (or ``loss_inputs``; not with
        ``outputs_only``) its loss is computed from (one evaluation of the batch with a
        graph; ``last_reason`` says why not)."""
        with torch.enable_grad(), quiet():
            value = read_closure(closure())
            if outputs_only:
                value = value._replace(loss_inputs=None)
            why = self._unusable(value)
            if why is None:
                (g_out,) = torch.autograd.grad(value.loss, value.exact_inputs, allow_unused=True)
                why = (
                    None
                    if g_out is not None
                    else "the closure's loss is not computed from its outputs"
                )
        self.last_reason = why or ""
        return why is None

    @staticmethod
    def _unusable(value: ClosureValue) -> str | None:
        """Why a closure's value gives no exact model, or None."""
        inputs = value.exact_inputs
        if inputs is None:
            return "the closure returned no outputs"
        if not inputs.requires_grad:
            return "the closure's outputs carry no graph"
        return None

    def model(
        self,
        closure: Callable,
        dirs: list[dict],
        grads: dict,
        weight_decay: dict,
        quiet,
        graph: tuple | None = None,
    ) -> tuple[float, torch.Tensor, torch.Tensor] | None:
        """``(L(θ), M, b)`` of the batch (float64 ``M`` of ``k × k`` and ``b`` of ``k``), or
        None (with ``last_reason``) when the closure gives no outputs the loss depends on.
        ``graph``: the step's own ``(loss, outputs, loss_inputs)`` with its graph retained,
        built with the blocks backpropagating through their solvers (OCNOpt keeps it
        between refreshes); None: the closure builds one."""
        params = list(grads)
        with torch.enable_grad(), quiet(), self.backprop():
            kept = None if graph is None else read_closure(graph)
            usable = kept is not None and self._unusable(kept) is None
            value = kept if usable else read_closure(closure())
            why = self._unusable(value)
            if why is not None:
                self.last_reason = why
                return None
            loss, outputs = value.loss, value.exact_inputs
            (g_out,) = torch.autograd.grad(loss, outputs, create_graph=True, allow_unused=True)
            if g_out is None:
                self.last_reason = "the closure's loss is not computed from its outputs"
                return None
            u = torch.zeros_like(outputs, requires_grad=True)
            jtu = torch.autograd.grad(outputs, params, u, create_graph=True, allow_unused=True)
            live = [(p, t) for p, t in zip(params, jtu) if t is not None and t.requires_grad]
            products = []
            for d in dirs:
                pairs = [(t, d[p]) for p, t in live if p in d]
                if not pairs:
                    products.append(torch.zeros_like(outputs))
                    continue
                (jd,) = torch.autograd.grad(
                    [t for t, _ in pairs], u, [v for _, v in pairs], retain_graph=True
                )
                products.append(jd.detach())
            hjd = []
            for jd in products:
                if g_out.requires_grad:
                    (h,) = torch.autograd.grad(
                        g_out, outputs, jd, retain_graph=True, allow_unused=True
                    )
                else:
                    h = None
                hjd.append(torch.zeros_like(jd) if h is None else h.detach())
        # every reduction as a tensor, read back in one transfer (no host sync per entry)
        k = len(dirs)
        pairs = [(i, j) for i in range(k) for j in range(i, k)]
        gn = [(products[i] * hjd[j]).sum() for i, j in pairs]
        decay = [
            [(dirs[i][p] * dirs[j][p]).sum() for p in dirs[i] if p in dirs[j]] for i, j in pairs
        ]
        owner = [[p for p in dirs[i] if p in dirs[j]] for i, j in pairs]
        inner = [[(grads[p] * d[p]).sum() for p in d] for d in dirs]
        flat = [
            loss.detach(),
            *gn,
            *(t for ts in decay for t in ts),
            *(t for ts in inner for t in ts),
        ]
        values = iter(torch.stack([t.reshape(()).to(torch.float64) for t in flat]).tolist())
        loss0 = next(values)
        gn_values = [next(values) for _ in pairs]
        mat = torch.zeros(k, k, dtype=torch.float64)
        for (i, j), value, ps in zip(pairs, gn_values, owner):
            value += sum(float(weight_decay.get(p, 0.0)) * next(values) for p in ps)
            mat[i, j] = mat[j, i] = value
        b = torch.tensor([sum(next(values) for _ in d) for d in dirs], dtype=torch.float64)
        return loss0, mat, b

    def coefficients(
        self, mat: torch.Tensor, b: torch.Tensor, held: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``c = −(M + λ diag M + μ diag Q)⁻¹ b`` by Cholesky (least squares where the damped
        ``M`` is not positive definite; both deterministic, unlike LAPACK's default
        ``gelsy``). ``held``: ``Q_ii`` (float64, ``k``), or None for none."""
        diag = mat.diagonal().clamp_min(1e-30)
        damped = mat + self.damping * torch.diag(diag)
        if held is not None and self.held_weight:
            damped = damped + self.held_weight * torch.diag(held)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return torch.cholesky_solve(-b[:, None], factor)[:, 0]
        return torch.linalg.lstsq(damped, -b[:, None], driver="gelsd").solution[:, 0]

    # ------------------------------------------------------------------ the step
    def step(
        self,
        grads: dict,
        directions: dict,
        closure: Callable,
        weight_decay: dict,
        quiet,
        graph: tuple | None = None,
        decay_in_trials: bool = False,
        held_quadratic: Callable[[dict], float] | None = None,
    ) -> tuple[dict | None, float | None] | None:
        """``(the update taken or None, the last trial loss)``; None (nothing evaluated
        beyond the graph, ``last_reason`` says why) where the held step should be taken.
        ``decay_in_trials``: the trials judge ``L + wd/2 |θ|²`` (OCNOpt's
        ``decay_in_model``), not the loss alone. ``held_quadratic``: the held model's
        quadratic form ``v -> vᵀ s(C + damping)ᵖ v`` for a dict of directions (``Q``; needed
        where ``held_weight`` is not 0)."""
        self.last_reason = ""
        directions = {p: d for p, d in directions.items() if p in grads}
        dirs = self.basis(directions)
        built = self.model(
            closure, dirs, {p: grads[p] for p in directions}, weight_decay, quiet, graph
        )
        if built is None:
            return None
        loss0, mat, b = built
        held = None
        if self.held_weight and held_quadratic is not None:
            held = torch.tensor([max(held_quadratic(d), 0.0) for d in dirs], dtype=torch.float64)
        c = self.coefficients(mat, b, held)
        gd = float(b @ c)
        quad = float(c @ mat @ c)  # the exact model's: ρ is read against it
        if not (math.isfinite(loss0) and math.isfinite(gd) and math.isfinite(quad) and gd < 0):
            self.last_reason = f"no descent in the subspace (bᵀc = {gd:.3g})"
            self.damping = exact_model_damping(self.damping, math.nan)
            return None, None
        self.last_coefficients = [float(x) for x in c]
        params = list(directions)
        delta = {p: torch.zeros_like(directions[p]) for p in params}
        for ci, d in zip(c.tolist(), dirs):
            for p, v in d.items():
                delta[p].add_(v, alpha=ci)
        backup = [p.detach().clone() for p in params]
        # the decay's change at θ + αδ is α·first + α²·second (0 where the trials judge the
        # loss alone)
        change1, curvature1 = decay_terms(weight_decay if decay_in_trials else None, delta)
        second = 0.5 * curvature1
        first = change1 - second
        alpha, rho, loss1, taken = 1.0, float("nan"), None, None
        try:
            for trial in range(self.max_trials):
                self.last_trials = trial + 1
                for p, bk in zip(params, backup):
                    p.copy_(bk).add_(delta[p], alpha=alpha)
                loss1 = loss_and_outputs(closure())[0]
                objective1 = loss1 + (alpha * first + alpha * alpha * second)
                if trial == 0:
                    predicted = gd + 0.5 * quad
                    rho = (objective1 - loss0) / predicted if predicted < 0 else float("nan")
                if math.isfinite(objective1) and objective1 <= loss0 + ARMIJO * alpha * gd:
                    taken = {p: delta[p] * alpha for p in params}
                    break
                alpha *= 0.5
        finally:
            for p, bk in zip(params, backup):
                p.copy_(bk)
        self.damping = exact_model_damping(self.damping, rho)
        self.last_rho, self.last_alpha = rho, alpha if taken is not None else 0.0
        for p in params:
            self.state[p]["subspace_prev"] = (
                taken[p].detach().clone() if taken is not None else torch.zeros_like(delta[p])
            )
        return taken, loss1
