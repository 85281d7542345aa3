"""The own adjoint: an ``autograd.Function`` whose backward integrates, with
``torchdiffeq.odeint``, the augmented state

    [x, a, q_1..q_R, ∫(∂f/∂θ)ᵀa dt  (, per-sample ∫(∂f/∂θ)ᵀq dt for dense curvature)]

backward in time, one interval of the time grid at a time, re-starting ``x`` from the
forward solution at each grid time. Memory is O(1) in the number of solver steps. The state
is one flat tensor (:class:`~node_ocp.ode.state.StateLayout`), so that torchdiffeq does not
slice and re-concatenate a tuple at every evaluation.

Dynamics (integrated from t_k down to t_{k-1}):
    dx/dt = f,   da/dt = -(∂f/∂x)ᵀ a,   dq_i/dt = -(∂f/∂x)ᵀ q_i,   dg/dt = -(∂f/∂θ)ᵀ a
All vector-Jacobian products at one solver stage come from one evaluation of ``f`` and one
(batched) backward through it.

The solves receive what they use, never the block: the field, the block's
:class:`~node_ocp.ode.settings.SolveSettings` and :class:`~node_ocp.ode.counters.
SolveCounters`, and the call's :class:`~node_ocp.ode.factors.SolveRecord`, whose capture is
called through the interface declared by :class:`~node_ocp.ode.backward_capture.
BackwardCapture`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .adjoint_per_sample import adjoint_backward_per_sample
from .calls import FieldCall
from .checked import check_solution, checked_solve
from .compiled import is_compile_failure
from .counters import SolveCounters
from .settings import SolveSettings
from .state import StateLayout

if TYPE_CHECKING:  # pragma: no cover
    from .factors import SolveRecord


class AugmentedDynamics:
    """Right-hand side of the backward solve, on a flat state laid out by :attr:`layout`.

    The parts, in order: ``x`` and ``a`` (each shaped like the state ``(B, *feat)``), the
    factors ``q`` ``(R, B, *feat)`` when ``rank > 0``, one accumulator per parameter (shaped
    like it), and the per-sample integrals ``(max(R, 1), B, P)`` when ``dense``.

    Args:
        call: the counted field ``f(t, x)``.
        params: the field parameters whose gradient is accumulated.
        x_shape: the shape ``(B, *feat)`` of the state.
        rank: number of attached factors R (0: plain adjoint).
        dense: integrate per-sample, per-factor parameter integrals as well.
        reverse: called with ``s = -t`` and returning the derivative in ``s`` (the solver
            then steps forward in ``s``). This is what ``torchdiffeq.odeint`` does itself for
            decreasing times, but the sign is folded into the cotangent here, saving a pass
            over the whole state at every evaluation; the steps and values are the same.
    """

    def __init__(
        self,
        call: FieldCall,
        params: tuple,
        x_shape,
        rank: int,
        dense: bool,
        reverse: bool = False,
    ):
        self.call = call
        self.reverse = reverse
        self.params = params
        self.rank = rank
        self.dense = dense
        x_shape = torch.Size(x_shape)
        shapes = [x_shape, x_shape]
        if rank:
            shapes.append((rank, *x_shape))
        shapes.extend(p.shape for p in params)
        if dense:
            n_par = sum(p.numel() for p in params)
            shapes.append((max(rank, 1), x_shape[0], n_par))
        self.layout = StateLayout(shapes)
        self.n_x = x_shape.numel()
        self.x_shape = x_shape
        self.acc_start = 2 + (rank > 0)
        self._zeros: dict[int, torch.Tensor] = {}  # flat zeros for unused parameters
        self._is_flat = tuple(p.dim() == 1 for p in params)  # gradients cat as they are

    @property
    def last_t(self):
        return self.call.last_t

    def pack(self, x, a, q, acc, dense_acc) -> torch.Tensor:
        """The parts -> one flat state ``(N,)``."""
        parts = [x, a]
        if self.rank:
            parts.append(q)
        parts.extend(acc)
        if self.dense:
            parts.append(dense_acc)
        return self.layout.join(parts)

    def unpack(self, state: torch.Tensor):
        """A flat state ``(..., N)`` -> ``(x, a, q, acc, dense_acc)`` (views)."""
        parts = self.layout.split(state)
        q = parts[2] if self.rank else None
        acc = parts[self.acc_start : self.acc_start + len(self.params)]
        return parts[0], parts[1], q, acc, parts[-1] if self.dense else None

    def norm(self, kind: str, user=None):
        """Error norm over the flat state: ``seminorm`` (x, a, q), ``state`` (x, a) or
        ``full`` (every part); ``user``, a norm of the tuple of parts, replaces it."""
        if user is not None:
            return self.layout.tuple_norm(user)
        n_parts = {"seminorm": self.acc_start, "state": 2}.get(kind, len(self.layout.shapes))
        return self.layout.rms_norm(n_parts)

    def _flat_zeros(self, p: torch.Tensor) -> torch.Tensor:
        z = self._zeros.get(id(p))
        if z is None:
            z = self._zeros[id(p)] = p.new_zeros(p.numel())
        return z

    def __call__(self, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        n = self.n_x
        x, a = state[: 2 * n].view(2, *self.x_shape).unbind(0)
        batched = self.rank > 0 or self.dense
        reverse = self.reverse
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            f = self.call(-t if reverse else t, xg)
            inputs = (xg, *self.params)
            if not f.requires_grad:
                grads = (None,) * len(inputs)
            elif not batched:
                # cotangent -a (+a in reversed time): -(∂f/∂x)ᵀa, -(∂f/∂θ)ᵀa come out signed
                grads = torch.autograd.grad(f, inputs, a if reverse else -a, allow_unused=True)
            else:
                cot = [a.unsqueeze(0)]
                if self.rank:
                    cot.append(self.layout.part(state, 2))
                if self.dense:
                    q = self.layout.part(state, 2) if self.rank else a.unsqueeze(0)
                    cot.append(_per_sample_cotangents(q))
                cot = torch.cat(cot)
                grads = torch.autograd.grad(
                    f, inputs, cot if reverse else -cot, allow_unused=True, is_grads_batched=True
                )
        n_lead = 1 + self.rank
        out = [(-f if reverse else f).reshape(-1)]
        vx = grads[0]
        if vx is None:
            out.append(state.new_zeros(n_lead * n))
        else:
            out.append((vx[:n_lead] if batched else vx).reshape(-1))
        dense_rows = []
        for p, g, is_flat in zip(self.params, grads[1:], self._is_flat):
            if g is None:
                out.append(self._flat_zeros(p))
                if self.dense:
                    rows = max(self.rank, 1) * self.x_shape[0]
                    dense_rows.append(p.new_zeros((rows, p.numel())))
            elif batched:
                out.append(g[0].reshape(-1))
                if self.dense:
                    dense_rows.append(g[n_lead:].reshape(g.shape[0] - n_lead, -1))
            else:
                out.append(g if is_flat else g.reshape(-1))
        if self.dense:
            out.append(torch.cat(dense_rows, dim=1).reshape(-1))
        return torch.cat(out)


def _per_sample_cotangents(q: torch.Tensor) -> torch.Tensor:
    """``(R, B, *feat)`` -> ``(R·B, B, *feat)``: row (i, b) holds q[i, b] at sample b only."""
    r, b = q.shape[0], q.shape[1]
    eye = torch.eye(b, dtype=q.dtype, device=q.device).reshape(1, b, b, *([1] * (q.dim() - 2)))
    return (q.unsqueeze(2) * eye).reshape(r * b, b, *q.shape[2:])


#: Solver options that hold times (torchdiffeq flips or wraps them for decreasing times).
_TIME_OPTIONS = ("step_t", "jump_t", "grid_constructor")


def forward_solve(
    field: nn.Module,
    settings: SolveSettings,
    counters: SolveCounters,
    x0: torch.Tensor,
    grid: torch.Tensor,
    run=None,
) -> torch.Tensor:
    """The forward solve of one block call: ``(T, B, *feat)`` from ``x0`` ``(B, *feat)``
    over ``grid`` ``(T,)``, evaluations counted in ``counters.forward``; ``run``: what to call
    for ``field`` (its compiled module), None: ``field``."""
    call = FieldCall(field if run is None else run, counters, settings.name)
    return checked_solve(settings, call, x0, grid, settings.forward, "forward")


def adjoint_backward(
    field: nn.Module,
    settings: SolveSettings,
    counters: SolveCounters,
    record: SolveRecord,
    grid: torch.Tensor,
    ys: torch.Tensor,
    params: tuple,
    grad_ys: torch.Tensor,
    need_t: bool,
):
    """Backward solve of one block call.

    Args:
        field: the vector field; ``params`` are its parameters that require grad.
        settings: the block's settings (``settings.backward``, ``adjoint_norm``).
        counters: the block's counters (``backward``, ``capture`` are incremented).
        record: the call's record: its ``capture`` (a
            :class:`~node_ocp.ode.backward_capture.BackwardCapture` or None) and terminal
            factors ``(R, *out.shape)`` are read, ``input_factors`` ``(R, B, *feat)`` set.
        grid: ``(T,)`` the call's time grid.
        ys: ``(T, B, *feat)`` the forward solution.
        grad_ys: ``(T, B, *feat)`` the cotangent of ``ys``.
        need_t: compute the gradient of ``grid``.

    Returns ``(grad_x0 (B, *feat), grad_grid (T,) or None, *grad_params)``.
    """
    if settings.backward.per_sample:
        return adjoint_backward_per_sample(
            field, settings, counters, record, grid, ys, params, grad_ys, need_t
        )
    n_times = grid.numel()
    capture = record.capture
    factors = record.factors_per_time(n_times)  # (R, T, B, ...) or None
    rank = record.rank
    kron = capture is not None and capture.kronecker_enabled
    dense = capture is not None and capture.dense_enabled
    # the solver's evaluations go through the call's compiled field if it has one; the
    # capture (hooks on the layers, batched products) always sees the eager field
    run = field if record.run is None else record.run
    call = FieldCall(run, counters, settings.name, backward=True)
    spec = settings.backward
    # backward in time (an increasing grid): solve forward in s = -t, like odeint would
    reverse = bool(grid[0] < grid[-1]) and not any(k in spec.options for k in _TIME_OPTIONS)
    dyn = AugmentedDynamics(call, params, ys.shape[1:], rank, dense, reverse=reverse)
    norm = dyn.norm(settings.adjoint_norm, user=spec.options.get("norm"))
    layout = dyn.layout

    grad_ys = grad_ys.to(ys.dtype)
    a = grad_ys[-1]
    q = factors[:, -1] if rank else None
    acc = [torch.zeros_like(p) for p in params]
    dense_acc = None
    if dense:
        dense_acc = ys.new_zeros(layout.shapes[-1])
    grad_t = torch.zeros_like(grid) if need_t else None
    state = dyn.pack(ys[-1], a, q, acc, dense_acc)

    for k in range(n_times - 1, 0, -1):
        if need_t:
            with torch.no_grad():
                grad_t[k] = (grad_ys[k] * call(grid[k], ys[k])).sum()
        if kron:
            samples, weight = capture.sample_grid(grid[k], grid[k - 1], like=grid)
            times = torch.cat([grid[k : k + 1], samples, grid[k - 1 : k]])
        else:
            times = grid[[k, k - 1]]
        sol = checked_solve(
            settings,
            dyn,
            state,
            times,
            spec,
            "backward",
            reverse=reverse,
            norm=norm,
            keep_grid=True,
        )
        if kron:
            inner = sol[1:-1]  # (S, N) at the sample times
            xs = layout.part(inner, 0)
            qs = layout.part(inner, 2) if rank else layout.part(inner, 1).unsqueeze(1)
            counters.capture += capture.accumulate_kronecker(field, samples, weight, xs, qs)
        _, a, q, acc, dense_acc = dyn.unpack(sol[-1])
        if need_t and k == 1:
            with torch.no_grad():
                grad_t[0] = -(a * call(grid[0], ys[0])).sum()
        a = a + grad_ys[k - 1]
        if rank:
            q = q + factors[:, k - 1]
        if k > 1:
            state = dyn.pack(ys[k - 1], a, q, acc, dense_acc)

    record.input_factors = q if rank else a.unsqueeze(0)
    if dense:
        names = [n for n, p in field.named_parameters() if p.requires_grad]
        capture.accumulate_dense(record.block, names, dense_acc)
    return (a, grad_t, *acc)


class AdjointSolve(torch.autograd.Function):
    """``ys = odeint(field, x0, grid)`` with the own adjoint as its backward.

    ``AdjointSolve.apply(field, settings, counters, record, x0, grid, *params)``: ``x0``
    ``(B, *feat)``, ``grid`` ``(T,)``, ``params`` the field's parameters that require grad;
    returns ``ys`` ``(T, B, *feat)``.
    """

    @staticmethod
    def forward(ctx, field, settings, counters, record, x0, grid, *params):
        if record.graphs is not None:
            ys = graphed_forward(field, settings, counters, record, x0, grid)
        else:
            ys = _compiled_errors(
                record, forward_solve, field, settings, counters, x0, grid, record.run
            )
        ctx.solve = (field, settings, counters, record)
        ctx.save_for_backward(grid, ys, *params)
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys):
        field, settings, counters, record = ctx.solve
        grid, ys, *params = ctx.saved_tensors
        if record.graphs is not None and record.capture is None and record.rank == 0:
            if not ctx.needs_input_grad[_GRID]:
                grads = graphed_backward(
                    field, settings, counters, record, grid, ys, tuple(params), grad_ys
                )
                return (None, None, None, None, *grads)
        grads = _compiled_errors(
            record,
            adjoint_backward,
            field,
            settings,
            counters,
            record,
            grid,
            ys,
            tuple(params),
            grad_ys,
            ctx.needs_input_grad[_GRID],
        )
        return (None, None, None, None, *grads)


def graphed_forward(field, settings, counters, record, x0, grid) -> torch.Tensor:
    """The forward solve replayed from a CUDA graph (``record.graphs``, see
    :mod:`~node_ocp.ode.graphs`): ``(T, B, *feat)``."""
    call = FieldCall(field if record.run is None else record.run, counters, settings.name)
    ys = record.graphs.forward(call, settings, x0, grid)
    if settings.check_finite:
        check_solution(settings, ys, grid, settings.forward, "forward")
    return ys


def graphed_backward(field, settings, counters, record, grid, ys, params, grad_ys):
    """The plain own adjoint's backward solve replayed from a CUDA graph (no capture, no
    factors, no time gradient): ``(grad_x0, None, *grad_params)``."""
    run = field if record.run is None else record.run
    call = FieldCall(run, counters, settings.name, backward=True)
    dyn = AugmentedDynamics(call, params, ys.shape[1:], 0, False)
    a, *acc = record.graphs.backward(dyn, settings, grid, ys, grad_ys.to(ys.dtype))
    if settings.check_finite:
        check_solution(settings, a.unsqueeze(0), grid[:1], settings.backward, "backward")
    record.input_factors = a.unsqueeze(0)
    return (a, None, *acc)


def _compiled_errors(record, solve, *args):
    """``solve(*args)``, a failure of ``torch.compile`` re-raised naming ``compile_field``."""
    if record.compiler is None:
        return solve(*args)
    try:
        return solve(*args)
    except Exception as err:
        if is_compile_failure(err):
            raise record.compiler.failure(err) from err
        raise


#: The position of ``grid`` among :meth:`AdjointSolve.forward`'s inputs (after ``ctx``).
_GRID = 5
