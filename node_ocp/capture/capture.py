"""Curvature capture: statistics gathered during the backward solve of ODE blocks.

A consumer (the optimizer) creates a :class:`CurvatureCapture`, attaches it to a model for
the steps where it wants curvature, and reads the statistics after ``backward``:

    capture = CurvatureCapture(sample_dt=0.01)
    with capture.active(model):          # every ODEBlock inside `model`
        loss = criterion(model(x), y)
        loss.backward()                  # gradients as usual, plus statistics
    capture.kronecker[layer].A, capture.kronecker[layer].B
    capture.reset()                      # only when the consumer asks

Kronecker statistics (for every tapped layer of a block's field, see :mod:`.taps`), summed
over every backward solve while attached (several blocks, or one block called on many
intervals):

    A = Σ_solves Σ_j w_j Σ_{b,l} ū ūᵀ          ū: layer input row (+1 for the bias)
    B = Σ_solves Σ_j w_j Σ_i Σ_{b,l} g_i g_iᵀ   g_i = ∂(q_i · f)/∂o at the layer output

at sample times t_j: the midpoints of ``ceil(|interval| / sample_dt)`` equal cells of every
interval of the time grid, with weights ``w_j`` the cell length (midpoint rule, so Σ_j w_j is
the horizon length). ``q_i`` are the terminal factors the consumer set for the block output
(:meth:`CurvatureCapture.set_terminal_factors`), propagated backward; with none set the
adjoint ``a`` is the one factor per sample (the empirical source). Sums are raw: the
consumer chooses the normalisation (batch size, horizon, locations) from the counters.

Second-order factors: while attached, the capture keeps a :class:`~node_ocp.ode.factors.
SolveRecord` of every block call made with grad enabled (``records``, in forward order). A
consumer sets terminal factors for a call's output before ``backward`` and reads the factors
the backward solve propagated to the call's input afterwards:

    with capture.active(block):
        out = block(x0)
        capture.set_terminal_factors(out, y)      # y: (R, *out.shape)
        loss.backward()
        q0 = capture.propagated_factors(out)      # (R, *x0.shape)

With ``kronecker=False, dense=False`` the capture only carries factors (no statistics).

Dense statistics (``dense=True``, tiny fields): per block, per factor and per sample,
``p_{i,b} = ∫ (∂f_b/∂θ)ᵀ q_{i,b} dt`` integrated exactly inside the backward solve, so that
``Σ_{i,b} p p ᵀ`` is the Gauss–Newton matrix of the block's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .._errors import bad_type, bad_value, check_positive
from ..ode.backward_capture import BackwardCapture
from ..ode.factors import SolveRecord
from .taps import input_rows, output_rows, tapped_modules


@dataclass
class KroneckerFactors:
    """Raw Kronecker statistics of one layer.

    Attributes:
        module: the ``nn.Linear`` / ``nn.Conv2d`` layer.
        A: ``(K, K)`` with ``K = d_in (+1)`` (Linear) or ``C_in·kh·kw (+1)`` (Conv2d).
        B: ``(d_out, d_out)``.
        time: Σ of the quadrature weights that contributed (total integrated horizon).
        rows: Σ over solves of the batch size times the locations per sample (each counted
            once per solve, not per time point).
        samples: Σ over solves of the batch size.
        rank: number of factors per sample in the last solve (1 for the empirical source).
        solves: number of backward solves (intervals) that contributed.
    """

    module: nn.Module
    A: torch.Tensor
    B: torch.Tensor
    time: float = 0.0
    rows: int = 0
    samples: int = 0
    rank: int = 0
    solves: int = 0


@dataclass
class DenseFactors:
    """Per-sample, per-factor parameter integrals of one ODE block.

    Attributes:
        names: names of the field parameters, in the order of the flattened last dimension.
        p: ``(R, B, P)`` summed over every solve of the block with that shape (several
            consecutive intervals of the same batch add up).
    """

    names: list[str]
    p: torch.Tensor
    solves: int = 0

    def gauss_newton(self) -> torch.Tensor:
        """``Σ_{i,b} p_{i,b} p_{i,b}ᵀ`` as a ``(P, P)`` matrix."""
        flat = self.p.reshape(-1, self.p.shape[-1])
        return flat.T @ flat


class CurvatureCapture(BackwardCapture):
    """Collects curvature during the backward solves of the ODE blocks it is attached to.

    Implements :class:`~node_ocp.ode.backward_capture.BackwardCapture`, the interface the
    blocks' forward and backward solves call (``record_call``, ``sample_grid``,
    ``accumulate_kronecker``, ``accumulate_dense``, ``kronecker_enabled``,
    ``dense_enabled``); the rest (attaching, factors, statistics) is for consumers.

    Args:
        kronecker: gather Kronecker factors A, B for tapped layers at the sample grid.
        dense: integrate per-sample parameter integrals p (tiny fields only). With both
            False the capture only carries second-order factors through the blocks.
        sample_dt: spacing Δ of the sample grid (> 0). About 100 points on a unit horizon
            with the default 0.01.
        max_rows: at most this many rows (sample times × batch) go into one batched field
            evaluation, which bounds the memory of capture; ``None`` evaluates all sample
            times of an interval at once.
    """

    def __init__(
        self,
        kronecker: bool = True,
        dense: bool = False,
        sample_dt: float = 0.01,
        max_rows: int | None = 16384,
    ):
        if not isinstance(kronecker, bool):
            raise bad_type("kronecker", kronecker, "True or False")
        if not isinstance(dense, bool):
            raise bad_type("dense", dense, "True or False")
        self.kronecker_enabled = kronecker
        self.dense_enabled = dense
        self.sample_dt = check_positive("sample_dt", sample_dt)
        if max_rows is not None and (
            isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1
        ):
            raise bad_value("max_rows", max_rows, "an int >= 1 or None")
        self.max_rows = max_rows
        self.kronecker: dict[nn.Module, KroneckerFactors] = {}
        self.dense: dict[nn.Module, DenseFactors] = {}
        self._records: list[SolveRecord] = []
        self._blocks: list[nn.Module] = []

    def __repr__(self) -> str:
        return (
            f"CurvatureCapture(kronecker={self.kronecker_enabled}, dense={self.dense_enabled}, "
            f"sample_dt={self.sample_dt}, layers={len(self.kronecker)}, "
            f"blocks={len(self._blocks)})"
        )

    # ------------------------------------------------------------------ attaching
    def attach(self, model: nn.Module) -> list[nn.Module]:
        """Attach to every ODE block inside ``model`` (found by ``isinstance``).

        Returns the blocks. Raises if there is none, or if a block uses ``gradient='direct'``
        (capture is part of the own adjoint's backward solve).
        """
        from ..ode.block import ODEBlock

        if not isinstance(model, nn.Module):
            raise bad_type("model", model, "an nn.Module containing ODEBlock layers")
        blocks = [m for m in model.modules() if isinstance(m, ODEBlock)]
        if not blocks:
            raise bad_value(
                "model", type(model).__name__, "a module containing at least one ODEBlock"
            )
        for block in blocks:
            if block.gradient != "adjoint":
                raise bad_value(
                    f"model ({block.name}).gradient",
                    block.gradient,
                    "'adjoint' for curvature capture",
                    "Build the block with gradient='adjoint'.",
                )
        for block in blocks:
            block.attach_capture(self)
        self._blocks = blocks
        return blocks

    def detach(self) -> None:
        """Switch capture off on the blocks it was attached to.

        Statistics are kept; the records of the block calls (which hold the calls' input and
        output tensors, and so their graphs) are dropped.
        """
        for block in self._blocks:
            block.detach_capture(self)
        self._blocks = []
        self._records.clear()

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[CurvatureCapture]:
        """``with capture.active(model): ...`` attaches for the duration of the block."""
        self.attach(model)
        try:
            yield self
        finally:
            self.detach()

    def reset(self) -> None:
        """Forget all statistics and recorded block calls."""
        self.kronecker.clear()
        self.dense.clear()
        self._records.clear()

    # ------------------------------------------------------------------ factors
    def record_call(self, record: SolveRecord, x0: torch.Tensor, out: torch.Tensor) -> None:
        """Keep the record of a block call (called by :meth:`ODEBlock.forward`)."""
        record.input = x0
        record.output = out
        self._records.append(record)

    @property
    def records(self) -> tuple[SolveRecord, ...]:
        """The records of the block calls made with grad enabled while attached, in forward
        order (cleared by :meth:`reset` and :meth:`detach`)."""
        return tuple(self._records)

    def record_of(self, output: torch.Tensor, name: str = "output") -> SolveRecord:
        """The record of the call that returned ``output`` (the very tensor, not a view)."""
        if not isinstance(output, torch.Tensor):
            raise bad_type(name, output, "the tensor returned by an ODEBlock")
        for record in reversed(self._records):
            if record.output is output:
                return record
        raise bad_value(
            name,
            output,
            "the tensor an ODEBlock returned while this capture was attached (grad enabled)",
            "Set factors on the block output itself, not on a tensor computed from it.",
        )

    def set_terminal_factors(self, output: torch.Tensor, factors: torch.Tensor | None) -> None:
        """Set terminal Hessian factors ``factors`` (``(R, *output.shape)``) for a block
        output; ``None`` removes them. They are consumed by the next backward pass through
        the block and must not require grad (they are detached)."""
        self.record_of(output).set_terminal_factors(factors)

    def propagated_factors(self, output: torch.Tensor) -> torch.Tensor:
        """The factors ``q_i(t0)`` (``(R, *x0.shape)``) after backward through the block
        call that returned ``output``; with no factors set, the adjoint ``a(t0)`` as a single
        factor ``(1, *x0.shape)`` (the empirical source)."""
        record = self.record_of(output)
        if record.input_factors is None:
            raise ValueError(
                "output: no propagated factors yet; the backward pass through this block "
                "output has not run. Call backward on a loss that depends on it first."
            )
        return record.input_factors

    # ------------------------------------------------------------------ sample grid
    def sample_grid(
        self, t_start: torch.Tensor | float, t_end: torch.Tensor | float, like: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """Midpoint sample times from ``t_start`` towards ``t_end`` and their weights.

        Returns ``(times (S,), weight)``; times are strictly between the endpoints, ordered
        from ``t_start``; every time has the same weight ``|t_end - t_start| / S``.
        """
        length = float(t_end - t_start)
        n = max(1, math.ceil(abs(length) / self.sample_dt - 1e-9))
        frac = (torch.arange(n, dtype=like.dtype, device=like.device) + 0.5) / n
        return t_start + frac * length, abs(length) / n

    # ------------------------------------------------------------------ accumulation
    def accumulate_kronecker(
        self,
        field: nn.Module,
        times: torch.Tensor,
        weight: float,
        states: torch.Tensor,
        factors: torch.Tensor,
    ) -> int:
        """Add the statistics of one interval.

        Args:
            field: the vector field ``f(t, x)``.
            times: ``(S,)`` sample times.
            weight: quadrature weight of each sample time.
            states: ``(S, B, *feat)`` states ``x(t_j)``.
            factors: ``(S, R, B, *feat)`` factors ``q_i(t_j)`` (the adjoint when R = 1 and no
                factors were attached).

        Returns the number of field evaluations made.
        """
        s_total, batch = states.shape[0], states.shape[1]
        rank = factors.shape[1]
        batched = bool(getattr(field, "accepts_batched_time", False))
        chunk = s_total if batched else 1
        if self.max_rows is not None:
            chunk = max(1, min(chunk, self.max_rows // batch))
        calls = 0
        seen: set[nn.Module] = set()
        for start in range(0, s_total, chunk):
            stop = min(start + chunk, s_total)
            n = (stop - start) * batch
            x = states[start:stop].reshape(n, *states.shape[2:])
            if batched:
                t = times[start:stop].repeat_interleave(batch)
            else:
                t = times[start]
            # (R, n, *feat): factor i of sample b at time j sits at row j*B + b.
            cot = factors[start:stop].transpose(0, 1).reshape(rank, n, *factors.shape[3:])
            calls += 1
            for module, u, g in _layer_io_grads(field, t, x, cot):
                rows_u = input_rows(module, u)  # (n, L, K)
                rows_g = output_rows(module, g, lead=1)  # (R, n, L, d_out)
                flat_u = rows_u.reshape(-1, rows_u.shape[-1])
                flat_g = rows_g.reshape(-1, rows_g.shape[-1])
                a_mat = (flat_u.T @ flat_u).mul_(weight)
                b_mat = (flat_g.T @ flat_g).mul_(weight)
                stats = self.kronecker.get(module)
                if stats is None:
                    stats = KroneckerFactors(
                        module, torch.zeros_like(a_mat), torch.zeros_like(b_mat)
                    )
                    self.kronecker[module] = stats
                stats.A.add_(a_mat)
                stats.B.add_(b_mat)
                if module not in seen:
                    seen.add(module)
                    stats.time += weight * s_total
                    stats.rows += batch * rows_u.shape[1]
                    stats.samples += batch
                    stats.rank = rank
                    stats.solves += 1
        return calls

    def accumulate_dense(self, block: nn.Module, names: list[str], p: torch.Tensor) -> None:
        """Add per-sample parameter integrals ``p`` (``(R, B, P)``) of ``block``."""
        stats = self.dense.get(block)
        if stats is None or stats.p.shape != p.shape:
            if stats is not None:
                raise ValueError(
                    f"{getattr(block, 'name', 'ODEBlock')}: dense curvature got integrals of "
                    f"shape {tuple(p.shape)} after {tuple(stats.p.shape)} in the same step; "
                    "every solve of a block in one step must use the same batch and number of "
                    "factors. Call capture.reset() between steps."
                )
            self.dense[block] = DenseFactors(list(names), p.clone(), solves=1)
            return
        stats.p.add_(p)
        stats.solves += 1


def _layer_io_grads(field: nn.Module, t, x: torch.Tensor, cot: torch.Tensor):
    """Evaluate ``field(t, x)`` once with taps on its layers.

    Yields ``(module, input (n, ...), grad wrt output (R, n, ...))`` for every tapped-layer
    call, the gradients being vector-Jacobian products of ``f`` with the ``R`` cotangents in
    ``cot`` (``(R, n, *feat)``), all from one (batched) backward.
    """
    taps = tapped_modules(field)
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(module, inputs, output):
        calls.append((module, inputs[0].detach(), output))

    handles = [m.register_forward_hook(hook) for m in taps]
    try:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            f = field(t, xg)
            outs = [o for _, _, o in calls if o.requires_grad]
            if not outs:
                return
            if cot.shape[0] == 1:
                grads = torch.autograd.grad(f, outs, cot[0], allow_unused=True)
                grads = [None if g is None else g.unsqueeze(0) for g in grads]
            else:
                grads = torch.autograd.grad(f, outs, cot, allow_unused=True, is_grads_batched=True)
    finally:
        for h in handles:
            h.remove()
    it = iter(grads)
    for module, u, o in calls:
        if not o.requires_grad:
            continue
        g = next(it)
        if g is not None:
            yield module, u, g.detach()
