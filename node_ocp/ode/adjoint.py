"""The own adjoint: an ``autograd.Function`` whose backward integrates, with
``torchdiffeq.odeint``, the augmented state

    [x, a, q_1..q_R, ∫(∂f/∂θ)ᵀa dt  (, per-sample ∫(∂f/∂θ)ᵀq dt for dense curvature)]

backward in time, one interval of the time grid at a time, re-starting ``x`` from the
forward solution at each grid time. Memory is O(1) in the number of solver steps.

Dynamics (integrated from t_k down to t_{k-1}):
    dx/dt = f,   da/dt = -(∂f/∂x)ᵀ a,   dq_i/dt = -(∂f/∂x)ᵀ q_i,   dg/dt = -(∂f/∂θ)ᵀ a
All vector-Jacobian products at one solver stage come from one evaluation of ``f`` and one
(batched) backward through it.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .calls import FieldCall


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt() if x.numel() else x.new_zeros(())


class AugmentedDynamics:
    """Right-hand side of the backward solve.

    Args:
        call: the counted field ``f(t, x)``.
        params: the field parameters whose gradient is accumulated.
        rank: number of attached factors R (0: plain adjoint).
        dense: integrate per-sample, per-factor parameter integrals as well.
    """

    def __init__(self, call: FieldCall, params: tuple, rank: int, dense: bool):
        self.call = call
        self.params = params
        self.rank = rank
        self.dense = dense
        self.last_t = None

    def pack(self, x, a, q, acc, dense_acc) -> tuple:
        state = [x, a]
        if self.rank:
            state.append(q)
        state.extend(acc)
        if self.dense:
            state.append(dense_acc)
        return tuple(state)

    def unpack(self, state):
        x, a = state[0], state[1]
        i = 2
        q = None
        if self.rank:
            q = state[2]
            i = 3
        acc = list(state[i : i + len(self.params)])
        dense_acc = state[-1] if self.dense else None
        return x, a, q, acc, dense_acc

    def norm(self, kind: str):
        """Error norm over the tuple state: ``seminorm``, ``state`` or ``full``."""
        keep = 2 + (self.rank > 0) if kind == "seminorm" else 2

        def _norm(state):
            parts = state if kind == "full" else state[:keep]
            return torch.stack([_rms(p) for p in parts]).max()

        return _norm

    def __call__(self, t: torch.Tensor, state: tuple) -> tuple:
        self.last_t = t
        x, a, q, acc, dense_acc = self.unpack(state)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            f = self.call(t, xg)
            inputs = (xg, *self.params)
            batched = self.rank > 0 or self.dense
            if not f.requires_grad:
                grads = (None,) * len(inputs)
            elif not batched:
                grads = torch.autograd.grad(f, inputs, a, allow_unused=True)
            else:
                cot = [a.unsqueeze(0)]
                if self.rank:
                    cot.append(q)
                if self.dense:
                    cot.append(_per_sample_cotangents(q if self.rank else a.unsqueeze(0)))
                grads = torch.autograd.grad(
                    f, inputs, torch.cat(cot), allow_unused=True, is_grads_batched=True
                )
        n_lead = 1 + self.rank
        vx = grads[0]
        if vx is None:
            vx = x.new_zeros((n_lead, *x.shape)) if batched else torch.zeros_like(x)
        if batched:
            da = -vx[0]
            dq = -vx[1:n_lead] if self.rank else None
        else:
            da = -vx
            dq = None
        dacc = []
        dense_rows = []
        for p, g in zip(self.params, grads[1:]):
            if g is None:
                dacc.append(torch.zeros_like(p))
                if self.dense:
                    rows = dense_acc.shape[0] * dense_acc.shape[1]
                    dense_rows.append(p.new_zeros((rows, p.numel())))
                continue
            if batched:
                dacc.append(-g[0])
                if self.dense:
                    dense_rows.append(-g[n_lead:].reshape(g.shape[0] - n_lead, -1))
            else:
                dacc.append(-g)
        ddense = None
        if self.dense:
            ddense = torch.cat(dense_rows, dim=1).reshape(dense_acc.shape)
        return self.pack(f, da, dq, dacc, ddense)


def _per_sample_cotangents(q: torch.Tensor) -> torch.Tensor:
    """``(R, B, *feat)`` -> ``(R·B, B, *feat)``: row (i, b) holds q[i, b] at sample b only."""
    r, b = q.shape[0], q.shape[1]
    eye = torch.eye(b, dtype=q.dtype, device=q.device).reshape(1, b, b, *([1] * (q.dim() - 2)))
    return (q.unsqueeze(2) * eye).reshape(r * b, b, *q.shape[2:])


def adjoint_backward(block, record, grid, ys, params, grad_ys, need_t: bool):
    """Backward solve of one block call. Returns ``(grad_x0, grad_t, *grad_params)``."""
    n_times = grid.numel()
    capture = record.capture
    factors = record.factors_per_time(n_times)  # (R, T, B, ...) or None
    rank = record.rank
    kron = capture is not None and capture.kronecker_enabled
    dense = capture is not None and capture.dense_enabled
    call = FieldCall(block, "nfe_backward")
    dyn = AugmentedDynamics(call, params, rank, dense)
    norm = dyn.norm(block.adjoint_norm)

    grad_ys = grad_ys.to(ys.dtype)
    a = grad_ys[-1]
    q = factors[:, -1] if rank else None
    acc = [torch.zeros_like(p) for p in params]
    dense_acc = None
    if dense:
        batch = ys.shape[1]
        n_par = sum(p.numel() for p in params)
        dense_acc = ys.new_zeros((max(rank, 1), batch, n_par))
    grad_t = torch.zeros_like(grid) if need_t else None

    for k in range(n_times - 1, 0, -1):
        x = ys[k]
        if need_t:
            with torch.no_grad():
                grad_t[k] = (grad_ys[k] * call(grid[k], x)).sum()
        if kron:
            samples, weight = capture.sample_grid(grid[k], grid[k - 1], like=grid)
            times = torch.cat([grid[k : k + 1], samples, grid[k - 1 : k]])
        else:
            times = grid[[k, k - 1]]
        state = dyn.pack(x, a, q, acc, dense_acc)
        sol = block.solve(
            dyn, state, times, block.adjoint_solver, "backward", norm=norm, keep_grid=True
        )
        if kron:
            xs = sol[0][1:-1]
            qs = sol[2][1:-1] if rank else sol[1][1:-1].unsqueeze(1)
            block.nfe_capture += capture.accumulate_kronecker(block.field, samples, weight, xs, qs)
        x, a, q, acc, dense_acc = dyn.unpack(tuple(s[-1] for s in sol))
        if need_t and k == 1:
            with torch.no_grad():
                grad_t[0] = -(a * call(grid[0], ys[0])).sum()
        a = a + grad_ys[k - 1]
        if rank:
            q = q + factors[:, k - 1]

    record.input_factors = q if rank else a.unsqueeze(0)
    if dense:
        names = [n for n, p in block.field.named_parameters() if p.requires_grad]
        capture.accumulate_dense(block, names, dense_acc)
    return (a, grad_t, *acc)


class AdjointSolve(torch.autograd.Function):
    """``ys = odeint(field, x0, grid)`` with the own adjoint as its backward."""

    @staticmethod
    def forward(ctx, record, x0, grid, *params):
        block = record.block
        ys = block.solve(FieldCall(block, "nfe_forward"), x0, grid, block.solver, "forward")
        ctx.record = record
        ctx.save_for_backward(grid, ys, *params)
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys):
        record = ctx.record
        grid, ys, *params = ctx.saved_tensors
        grads = adjoint_backward(
            record.block, record, grid, ys, tuple(params), grad_ys, ctx.needs_input_grad[2]
        )
        return (None, *grads)
