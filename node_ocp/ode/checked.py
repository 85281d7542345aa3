"""Solves whose failures come out as :class:`SolverError`, named after the block.

:func:`checked_solve` wraps ``SolverSpec.integrate`` for the forward and backward solves of
a block: torchdiffeq's ``AssertionError`` (step-size underflow, too many steps) becomes a
:class:`SolverError` saying which block, which phase, which settings, where it stopped and
what to try; with ``settings.check_finite`` a non-finite solution is refused the same way.
"""

from __future__ import annotations

import torch

from .._errors import describe
from .settings import SolveSettings
from .solvers import SolverSpec


class SolverError(RuntimeError):
    """An integration failed (step-size underflow, too many steps, non-finite state)."""


def checked_solve(
    settings: SolveSettings,
    func,
    y0: torch.Tensor,
    grid: torch.Tensor,
    spec: SolverSpec,
    phase: str,
    reverse: bool = False,
    **kw,
) -> torch.Tensor:
    """``spec.integrate(func, y0, grid, **kw)`` with failures turned into :class:`SolverError`.

    Args:
        settings: the block's settings (its ``name`` and ``check_finite`` are used).
        func: the right-hand side ``func(t, y)``; its ``last_t`` (if any) is the time named
            in a failure message.
        y0: the initial state, any shape.
        grid: ``(T,)`` output times.
        spec: ``settings.forward`` or ``settings.backward``.
        phase: ``"forward"`` or ``"backward"``, for messages.
        reverse: integrate over ``-grid`` (``func`` takes ``s = -t`` and returns the
            derivative in ``s``); messages name the times of ``grid``.

    Returns ``(T, *y0.shape)``.
    """
    try:
        ys = spec.integrate(func, y0, -grid if reverse else grid, **kw)
    except AssertionError as err:
        raise solver_error(settings, err, func, grid, spec, phase) from err
    if settings.check_finite:
        check_solution(settings, ys, grid, spec, phase)
    return ys


def solver_error(
    settings: SolveSettings, err: Exception, func, grid: torch.Tensor, spec: SolverSpec, phase: str
) -> SolverError:
    """The :class:`SolverError` for torchdiffeq's ``err`` in a ``phase`` solve over ``grid``."""
    text = str(err)
    if "underflow" in text:
        what = "the step size underflowed"
    elif "max_num_steps" in text:
        what = "the maximum number of steps was exceeded"
    elif "non-finite" in text:
        what = "the state became non-finite"
    else:
        what = f"the solver stopped ({text[:120]})"
    reached = getattr(func, "last_t", None)
    if reached is None:
        reached = "unknown"
    elif reached.numel() == 1:
        reached = f"{float(reached):.6g}"
    else:  # one time per sample (per-sample step control): the earliest
        reached = f"{float(reached.min()):.6g} (the earliest sample)"
    return SolverError(
        f"{settings.name}: in the {phase} solve with method={spec.method!r} (rtol={spec.rtol}, "
        f"atol={spec.atol}) over [{float(grid[0]):.6g}, {float(grid[-1]):.6g}], {what} at "
        f"t={reached}. Remedies: lower the learning rate, loosen rtol/atol, regularise the "
        "field (e.g. kinetic energy), shorten the horizon, or use a fixed-step method."
    )


def check_solution(
    settings: SolveSettings, ys, grid: torch.Tensor, spec: SolverSpec, phase: str
) -> None:
    """Raise :class:`SolverError` at the first grid time where ``ys`` (``(T, ...)`` or a
    tuple of such) is non-finite."""
    parts = ys if isinstance(ys, tuple) else (ys,)
    for part in parts:
        finite = torch.isfinite(part.reshape(part.shape[0], -1)).all(dim=1)
        if not finite.all():
            first = int((~finite).nonzero()[0, 0])
            raise SolverError(
                f"{settings.name}: in the {phase} solve with method={spec.method!r} the state "
                f"became non-finite; first bad output at t={float(grid[first]):.6g} "
                f"(grid {describe(grid)}). Remedies: lower the learning rate, tighten "
                "rtol/atol or use smaller fixed steps, regularise the field."
            )
