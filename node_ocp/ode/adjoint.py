"""The own adjoint: an ``autograd.Function`` whose backward integrates, with
``torchdiffeq.odeint``, the augmented state

    [x, a, q_1..q_R, ∫(∂f/∂θ)ᵀa dt  (, per-sample ∫(∂f/∂θ)ᵀq dt for dense curvature)]

backward in time, one interval of the time grid at a time, re-starting ``x`` from the
forward solution at each grid time. Memory is O(1) in the number of solver steps. The state
the backward solve reconstructs at the bottom of an interval is checked against the forward
solution there; an interval whose reconstruction departed (a flow that contracts strongly
forward in time) is solved again in pieces, each from its own anchor (:class:`_Interval`,
``ODEBlock(adjoint_anchor=...)``). The state
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

import math
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .adjoint_per_sample import adjoint_backward_per_sample
from .calls import FieldCall
from .checked import SolverError, check_solution, checked_solve
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

    # the re-solves to a split's midpoint are evaluations of the backward pass
    resolve = FieldCall(run, counters, settings.name, backward=True)
    interval = _Interval(settings, dyn, norm, reverse, counters, capture if kron else None, resolve)
    for k in range(n_times - 1, 0, -1):
        if need_t:
            with torch.no_grad():
                grad_t[k] = (grad_ys[k] * call(grid[k], ys[k])).sum()
        end = interval.solve(grid[k], grid[k - 1], state, ys[k - 1], grid, field)
        _, a, q, acc, dense_acc = dyn.unpack(end)
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


#: Without an anchor, a reconstruction error beyond this (in forward tolerances) is warned of.
WARN_RECONSTRUCTION = 1000.0
#: A reconstruction within this fraction of the state's RMS size is never split or warned of.
RELATIVE_FLOOR = 1e-2


def _warn_reconstruction(name: str) -> None:
    """Warn (once per block name and process, the text being constant) that the plain
    adjoint's reconstruction left the forward trajectory."""
    warnings.warn(
        f"{name}: the own adjoint's backward solve reconstructed the state more than "
        f"{WARN_RECONSTRUCTION:g} forward tolerances away from the forward solution "
        "(block.counters.reconstruction); its gradient may be wrong. Remedies: "
        "adjoint_anchor=1000 (re-solve such intervals in anchored pieces; [solver] "
        "adjoint_anchor), tighter rtol/atol, or a regularised field (kinetic energy).",
        RuntimeWarning,
        stacklevel=2,
    )


#: Levels of re-anchoring within one grid interval (a piece that still fails is split again).
MAX_DEPTH = 2
#: Pieces one failing interval (or piece) is split into, at most.
MAX_PIECES = 16


def pieces_for(error: float, anchor: float) -> int:
    """How many equal pieces bring a reconstruction error ``error`` (> ``anchor`` > 1) under
    ``anchor``: the error grows exponentially along the interval, so ``n`` pieces leave
    about ``error^(1/n)`` each; ``n = ⌈ln error / ln anchor⌉``, 2 to :data:`MAX_PIECES`."""
    n = math.ceil(math.log(error) / math.log(anchor)) if math.isfinite(error) else MAX_PIECES
    return min(MAX_PIECES, max(2, n))


class _Interval:
    """The backward solve of one grid interval, with the reconstruction check.

    The backward solve re-solves ``x`` from its anchor at the top of an interval. Where the
    flow contracts strongly forward in time, that reconstruction departs from the forward
    solution exponentially, and the adjoint and the gradient with it (measured on a CNF of
    the digits table: reconstruction errors of 10³–10⁷ forward tolerances, and gradients
    up to 10⁵ times too long, at cosine −0.05 to 0.1 with backprop through the same forward
    solve). The state at the bottom of the interval is known (the forward solution). Where
    the backward solve's arrives more than ``settings.anchor`` tolerances, and more than
    :data:`RELATIVE_FLOOR` of the state's size, away from it, the interval is cut into
    :func:`pieces_for` equal pieces, the states at their ends re-solved forward from the
    bottom's (one solve), and each piece solved backward from its own anchor (a piece that
    fails again is cut again, :data:`MAX_DEPTH` levels in all).
    """

    def __init__(self, settings, dyn, norm, reverse, counters, capture, forward_call):
        self.settings = settings
        self.dyn = dyn
        self.norm = norm
        self.reverse = reverse
        self.counters = counters
        self.capture = capture  # None: no Kronecker sampling
        spec = settings.forward
        # measured for every adaptive solve (one norm per interval); split only with an anchor
        self.check = spec.adaptive and not spec.per_sample
        self.forward_call = forward_call

    def error(self, x_hat: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
        """``(RMS of (x̂ − x) / (atol + rtol |x|), RMS(x̂ − x) / (RMS(x) + atol))``: the
        error in the forward solve's tolerances, and relative to the state's size."""
        spec = self.settings.forward
        diff = x_hat - x
        scaled = diff / (spec.atol + spec.rtol * x.abs())
        values = torch.stack(
            [scaled.square().mean().sqrt(), diff.square().mean().sqrt(), x.square().mean().sqrt()]
        ).tolist()  # one read of the device
        return values[0], values[1] / (values[2] + spec.atol)

    def departed(self, err: float, rel: float, limit: float) -> bool:
        """More than ``limit`` tolerances *and* :data:`RELATIVE_FLOOR` of the state's size
        away (NaN counts as away): a low-order method at a tight tolerance keeps a global
        error of thousands of tolerances that is still tiny (bosh3 at rtol 1e-8 on a plain
        MLP field: 2.5e3–1.9e4 tolerances, 2e-4 of the state), and is left alone."""
        return not err <= limit and not rel <= RELATIVE_FLOOR

    def solve(self, t_top, t_bottom, state, x_bottom, like, field):
        """The augmented state ``(N,)`` at ``t_bottom`` from ``state`` (its ``x`` anchored)
        at ``t_top``; ``x_bottom`` ``(B, *feat)`` the forward solution at ``t_bottom``. The
        capture's statistics of the solves kept are handed over at the end, in order."""
        self.pending: list[tuple] = []
        end = self._solve(t_top, t_bottom, state, x_bottom, like, field, 0, None)
        for samples, xs, qs in self.pending:
            self.counters.capture += self.capture.accumulate_kronecker(
                field, samples, self.weight, xs, qs
            )
        return end

    def _solve(self, t_top, t_bottom, state, x_bottom, like, field, depth, samples):
        """:meth:`solve` of a piece ``depth`` splits deep. ``samples``: the capture's
        sample times inside the piece (drawn for the whole interval at ``depth == 0``), so
        that a split changes where the states are measured, never which times are
        sampled. Where the pieces cannot be integrated (the solver's step underflows on
        the true trajectory), this solve is kept, as without the check
        (``counters.unanchored``)."""
        capture, dyn = self.capture, self.dyn
        if capture is not None and depth == 0:
            samples, self.weight = capture.sample_grid(t_top, t_bottom, like=like)
        if samples is not None:
            times = torch.cat([t_top.reshape(1), samples, t_bottom.reshape(1)])
        else:
            times = torch.stack([t_top, t_bottom])
        sol = checked_solve(
            self.settings,
            dyn,
            state,
            times,
            self.settings.backward,
            "backward",
            reverse=self.reverse,
            norm=self.norm,
            keep_grid=True,
        )
        end = sol[-1]
        if self.check:
            err, rel = self.error(end[: dyn.n_x].view(dyn.x_shape), x_bottom)
            anchor = self.settings.anchor
            if depth == 0:
                self.counters.reconstruction = max(self.counters.reconstruction, err)
                if anchor is None and self.departed(err, rel, WARN_RECONSTRUCTION):
                    _warn_reconstruction(self.settings.name)
            if anchor is not None and self.departed(err, rel, anchor) and depth < MAX_DEPTH:
                mark = len(self.pending)
                try:
                    return self._pieces(
                        t_top, t_bottom, state, x_bottom, like, field, depth, err, samples
                    )
                except SolverError:
                    del self.pending[mark:]
                    self.counters.unanchored += 1
        if samples is not None and samples.numel():
            inner = sol[1:-1]  # (S, N) at the sample times
            xs = dyn.layout.part(inner, 0)
            qs = dyn.layout.part(inner, 2) if dyn.rank else dyn.layout.part(inner, 1).unsqueeze(1)
            self.pending.append((samples, xs, qs))
        return end

    def _pieces(self, t_top, t_bottom, state, x_bottom, like, field, depth, err, samples):
        """:meth:`solve` over equal pieces, each from its own anchor (the solve of the whole
        interval is discarded, its capture statistics never taken); a piece's end that
        would fall on a sample time moves halfway to the next sample below."""
        n = pieces_for(err, self.settings.anchor)
        self.counters.splits += 1
        frac = torch.linspace(0, 1, n + 1, dtype=like.dtype, device=like.device)
        ends = t_bottom + (t_top - t_bottom) * frac  # bottom to top
        if samples is not None and samples.numel():
            ends = _off_samples(ends, samples)
        with torch.no_grad():
            anchors = checked_solve(
                self.settings,
                self.forward_call,
                x_bottom,
                ends[:-1],
                self.settings.forward,
                "forward",
            )  # (n, B, *feat): the forward solution at the pieces' lower ends
        dyn = self.dyn
        for j in range(n, 0, -1):  # the piece [ends[j-1], ends[j]], the top one first
            hi, lo = ends[j], ends[j - 1]
            inside = None
            if samples is not None:
                inside = samples[(samples - lo) * (hi - samples) > 0]
            state = self._solve(hi, lo, state, anchors[j - 1], like, field, depth + 1, inside)
            if j > 1:
                _, a, q, acc, dense_acc = dyn.unpack(state)
                state = dyn.pack(anchors[j - 1], a, q, acc, dense_acc)
        return state


def _off_samples(ends: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """``ends`` ``(n+1,)`` (bottom to top) with every inner end that coincides with a time
    of ``samples`` ``(S,)`` moved halfway towards the next sample (or the bottom) below."""
    points = sorted(float(v) for v in samples)
    bottom, top = float(ends[0]), float(ends[-1])
    scale = abs(top - bottom)
    out = [float(v) for v in ends]
    for j in range(1, len(out) - 1):
        e = out[j]
        if any(abs(e - p) <= 1e-9 * scale for p in points):
            below = [p for p in points if (p - bottom) * (e - p) > 1e-9 * scale**2] + [bottom]
            nearest = min(below, key=lambda p: abs(e - p))
            out[j] = 0.5 * (e + nearest)
    return torch.tensor(out, dtype=ends.dtype, device=ends.device)


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
