"""``feedback="dense"``: exact-matrix feedback policies for tiny chain models.

The state of stage ``s`` is the whole batch ``X_s`` (flattened, ``n_s = N·d_s``), its
parameters ``θ_s`` are shared by the batch. At the recorded forward the stage Jacobians
``A_s = ∂X_{s+1}/∂X_s`` and ``B_s = ∂X_{s+1}/∂θ_s`` are built row by row from the step's own
graph (one vector–Jacobian product per output coordinate: a backward solve for an ODE block).
From the terminal ``V_x = ∂L/∂X_S`` and ``V_xx`` = the exact Hessian of the likelihood in the
outputs (block-diagonal over samples, ``/N`` for the batch mean), the backward Riccati
recursion under Gauss–Newton (second derivatives of the stages left out) is

    Q_x = Aᵀ V_x',  Q_θ = Bᵀ V_x',  Q_xx = Aᵀ V_xx' A,  Q_θθ = Bᵀ V_xx' B,  Q_θx = Bᵀ V_xx' A,
    M = Q_θθ + λ I,  k = −M⁻¹ Q_θ,  K = −M⁻¹ Q_θx,
    V_x = Q_x + Kᵀ Q_θθ k + Kᵀ Q_θ + Q_xθ k,  V_xx = Q_xx + Kᵀ Q_θθ K + Kᵀ Q_θx + Q_xθ K,

and the sweep applies ``δθ_s = η k_s + K_s δX_s``. For affine stages and a quadratic loss the
problem is linear–quadratic, dynamic programming is exact, and with ``η = 1``, ``λ → 0`` one
step lands on the minimiser: the Newton step of the whole problem.
"""

from __future__ import annotations

import math

import torch

from .._errors import bad_value
from .likelihoods import output_factors

#: The largest batch state (N·d) of a stage the dense variant builds matrices for.
MAX_DENSE_STATE = 4096


class DenseFeedback:
    """Exact gains for a chain of stages (see the module docstring).

    Args:
        records: the stage records of the step, in call order (a chain: each stage's input
            is the previous stage's output, the last output is ``outputs``).
        outputs: the model output the likelihood is about (in the step's graph).
        likelihood: as for :meth:`OCNOpt.backward`.
        params_of: ``module -> set`` of the optimizer's parameters in it.
    """

    def __init__(self, records, outputs: torch.Tensor, likelihood: str, params_of):
        self.records = records
        self.outputs = outputs
        self.likelihood = likelihood
        why = self._not_a_chain(records, outputs)
        if why:
            raise bad_value("feedback", "dense", "a model whose stages form a chain", why)
        self.params = [
            [p for p in r.module.parameters() if p in params_of(r.module) and p.requires_grad]
            for r in records
        ]
        self.k: list[torch.Tensor] = []
        self.K: list[torch.Tensor | None] = []

    @staticmethod
    def _not_a_chain(records, outputs) -> str | None:
        for r in records:
            if r.calls != 1 or len(r.inputs) != 1 or len(r.outputs) != 1:
                return f"stage {type(r.module).__name__} takes or returns more than one tensor"
        for a, b in zip(records[:-1], records[1:]):
            if b.inputs[0] is not a.outputs[0]:
                return f"the input of {type(b.module).__name__} is not the previous output"
        if records[-1].outputs[0] is not outputs:
            return "the model output is not the last stage's output"
        return None

    # ------------------------------------------------------------------ matrices
    def _jacobians(self, rec, params) -> tuple[torch.Tensor | None, torch.Tensor]:
        out, x = rec.outputs[0], rec.inputs[0]
        wrt = ([x] if x.requires_grad else []) + list(params)
        rows_x, rows_t = [], []
        flat = out.reshape(-1)
        with torch.enable_grad():
            for j in range(flat.numel()):
                e = torch.zeros_like(flat)
                e[j] = 1
                got = torch.autograd.grad(
                    out, wrt, grad_outputs=e.view_as(out), retain_graph=True, allow_unused=True
                )
                got = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, got)]
                if x.requires_grad:
                    rows_x.append(got[0].reshape(-1))
                    got = got[1:]
                rows_t.append(torch.cat([g.reshape(-1) for g in got]))
        jx = torch.stack(rows_x) if rows_x else None
        return jx, torch.stack(rows_t)

    def _terminal(self) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.records[-1]
        out = rec.outputs[0]
        g = rec.grads.get(id(out))
        if g is None:
            raise bad_value("outputs", None, "a model output in the graph of the loss")
        y = output_factors(out, self.likelihood, "exact", 1)  # (R, N, *feat)
        n = out.shape[0]
        d = out[0].numel()
        yb = y.reshape(y.shape[0], n, d)
        blocks = torch.einsum("ibk,ibl->bkl", yb, yb) / n  # (N, d, d)
        return g.reshape(-1).clone(), torch.block_diag(*blocks)

    def prepare(self, max_params: int) -> None:
        """Jacobians of every stage and the terminal value, from the step's graph."""
        total = sum(p.numel() for ps in self.params for p in ps)
        if total > max_params:
            raise bad_value(
                "feedback",
                "dense",
                f"a model with at most max_dense_params={max_params} "
                f"parameters in its stages (it has {total})",
                "Use feedback='gauss_newton'.",
            )
        for r in self.records:
            if r.outputs[0].numel() > MAX_DENSE_STATE:
                raise bad_value(
                    "feedback",
                    "dense",
                    f"stage states of at most {MAX_DENSE_STATE} numbers "
                    f"(batch × features; {type(r.module).__name__} has {r.outputs[0].numel()})",
                    "Use feedback='gauss_newton'.",
                )
        self.terminal = self._terminal()
        self.jacobians = [self._jacobians(r, ps) for r, ps in zip(self.records, self.params)]

    def solve(self, damping: float, relative: bool) -> None:
        """The backward Riccati recursion over the stages (after :meth:`prepare`)."""
        vx, vxx = self.terminal
        ks, gains = [], []
        for a, b in reversed(self.jacobians):
            vx, vxx = vx.to(b.dtype), vxx.to(b.dtype)
            q_t = b.T @ vx
            q_tt = b.T @ vxx @ b
            n = q_tt.shape[0]
            lam = damping * (float(torch.trace(q_tt)) / max(n, 1)) if relative else damping
            m = q_tt + lam * torch.eye(n, dtype=b.dtype, device=b.device)
            k = -torch.linalg.solve(m, q_t)
            if a is None:
                ks.append(k)
                gains.append(None)
                continue
            q_x = a.T @ vx
            q_xx = a.T @ vxx @ a
            q_tx = b.T @ vxx @ a
            gain = -torch.linalg.solve(m, q_tx)
            vx = q_x + gain.T @ (q_tt @ k) + gain.T @ q_t + q_tx.T @ k
            vxx = q_xx + gain.T @ q_tt @ gain + gain.T @ q_tx + q_tx.T @ gain
            vxx = 0.5 * (vxx + vxx.T)
            ks.append(k)
            gains.append(gain)
        self.k, self.K = ks[::-1], gains[::-1]

    # ------------------------------------------------------------------ sweep
    def run(self, closure, update: dict, eta):
        """``δθ_s = η k_s + K_s δX_s`` stage by stage during one closure evaluation."""
        staged = {p for ps in self.params for p in ps}
        taken = {}
        for p, d in update.items():
            if p not in staged:
                p.add_(d)
                taken[p] = d
        index = {id(r.module): i for i, r in enumerate(self.records)}
        done = set()
        fb_sq, open_sq = [0.0], [0.0]

        def pre_hook(module, args):
            i = index.get(id(module))
            if i is None or i in done:
                return
            done.add(i)
            rec, params = self.records[i], self.params[i]
            scales = [torch.full((p.numel(),), float(eta(p))) for p in params]
            step = self.k[i] * torch.cat(scales).to(self.k[i])
            if self.K[i] is not None:
                new = args[0].detach().reshape(-1).to(step.dtype)
                old = rec.inputs[0].detach().reshape(-1).to(step.dtype)
                fb = self.K[i] @ (new - old)
                fb_sq[0] += float(fb @ fb)
                step = step + fb
            open_sq[0] += float(self.k[i] @ self.k[i])
            for p, d in zip(params, step.split([p.numel() for p in params])):
                d = d.view_as(p).to(p.dtype)
                p.add_(d)
                taken[p] = d

        handles = [r.module.register_forward_pre_hook(pre_hook) for r in self.records]
        try:
            value = closure()
        finally:
            for h in handles:
                h.remove()
        ratio = math.sqrt(fb_sq[0] / open_sq[0]) if open_sq[0] > 0 else 0.0
        return taken, value, dict(closed=len(done), open=0, gain_ratio=ratio)
