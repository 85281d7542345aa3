"""The one registry of ODE methods and the normalisation of solver inputs.

Everything the user passes about *how* to integrate (method, tolerances, options, the time
grid) is checked here once, at the boundary, and turned into a :class:`SolverSpec` that the
rest of the package uses without re-checking. The integration is ``torchdiffeq.odeint``
(public API, never patched) unless ``backend="own"``: then ``dopri5``, ``bosh3`` and ``rk4``
step through the own loop of :mod:`node_ocp.ode.rk` (same semantics, less overhead), and
every other method, and every option the own loop does not implement, stays torchdiffeq's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torchdiffeq import odeint

from .._errors import bad_type, bad_value, check_choice, check_positive
from . import per_sample, rk

#: Methods with error control; they take ``rtol``/``atol`` and choose their own steps.
ADAPTIVE_METHODS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
#: Fixed-grid methods; ``options={"step_size": h}`` sets the step (default: one step per
#: interval of the requested time grid).
FIXED_METHODS: tuple[str, ...] = (
    "euler",
    "midpoint",
    "heun2",
    "heun3",
    "rk4",
    "explicit_adams",
    "implicit_adams",
)
METHODS: tuple[str, ...] = ADAPTIVE_METHODS + FIXED_METHODS
#: Who steps the solves: ``"torchdiffeq"`` (``torchdiffeq.odeint``) or ``"own"`` (the own
#: loop of :mod:`node_ocp.ode.rk` for :data:`OWN_METHODS`, torchdiffeq for the rest).
BACKENDS: tuple[str, ...] = ("torchdiffeq", "own")
#: Methods the ``"own"`` backend steps itself.
OWN_METHODS: tuple[str, ...] = rk.OWN_METHODS


@dataclass(frozen=True)
class SolverSpec:
    """Validated settings for one direction of integration (forward or backward).

    ``backend``: ``"torchdiffeq"`` or ``"own"`` (see :data:`BACKENDS`). ``step_control``:
    ``"batch"`` (one step size for the batch) or ``"per_sample"`` (one per row of the state,
    :mod:`node_ocp.ode.per_sample`; own backend, ``dopri5``/``bosh3``)."""

    method: str
    rtol: float
    atol: float
    options: dict[str, Any] = field(default_factory=dict)
    backend: str = "torchdiffeq"
    step_control: str = "batch"

    @property
    def per_sample(self) -> bool:
        return self.step_control == "per_sample"

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS

    def odeint_options(self, norm: Callable | None = None, keep_grid: bool = False) -> dict:
        """Options for ``torchdiffeq.odeint``.

        ``norm`` replaces the error norm of adaptive methods (and any ``norm`` in the
        options: the backward solve passes one for its flat state, built from the user's
        norm of the tuple of parts where one was given). ``keep_grid``
        asks a fixed-grid method without a ``step_size`` to step only between the first and
        last requested time, so that extra output times (the curvature sample grid) are
        interpolated and never change the steps taken.
        """
        opts = dict(self.options)
        if self.adaptive and norm is not None:
            opts["norm"] = norm
        if (
            keep_grid
            and not self.adaptive
            and "step_size" not in opts
            and "grid_constructor" not in opts
        ):
            opts["grid_constructor"] = _endpoints_grid
        return opts

    def uses_own_loop(self, y0: torch.Tensor, t: torch.Tensor, options: dict) -> bool:
        """Whether a solve of ``y0`` over ``t`` with ``options`` steps through the own loop."""
        return self.backend == "own" and rk.supports(self.method, options, y0, t)

    def integrate(self, func, y0, t: torch.Tensor, norm=None, keep_grid: bool = False):
        """``torchdiffeq.odeint(func, y0, t)`` with these settings, or the same solve by the
        own loop (:func:`node_ocp.ode.rk.odeint`) where :meth:`uses_own_loop`."""
        if self.per_sample:
            return self.integrate_per_sample(func, y0, t)
        options = self.odeint_options(norm=norm, keep_grid=keep_grid)
        solve = rk.odeint if self.uses_own_loop(y0, t, options) else odeint
        return solve(
            func, y0, t, rtol=self.rtol, atol=self.atol, method=self.method, options=options
        )

    def integrate_per_sample(self, func, y0, t: torch.Tensor, norm=None, shared=None, stats=None):
        """The solve with one step size per row of ``y0``
        (:func:`node_ocp.ode.per_sample.odeint`; ``func`` gets ``t`` of shape ``(B,)``)."""
        return per_sample.odeint(
            func,
            y0,
            t,
            method=self.method,
            rtol=self.rtol,
            atol=self.atol,
            options=self.options,
            norm=norm,
            shared=shared,
            stats=stats,
        )


def _endpoints_grid(func, y0, t: torch.Tensor) -> torch.Tensor:
    return t[[0, -1]]


def make_spec(
    method: Any,
    rtol: Any,
    atol: Any,
    options: Any,
    prefix: str = "",
    backend: Any = "torchdiffeq",
    step_control: Any = "batch",
) -> SolverSpec:
    """Check user inputs and build a :class:`SolverSpec`.

    ``prefix`` is prepended to argument names in error messages (``"adjoint_"``).
    """
    check_backend(backend)
    per_sample.check_step_control(step_control)
    check_choice(f"{prefix}method", method, METHODS)
    rtol = check_positive(f"{prefix}rtol", rtol)
    atol = check_positive(f"{prefix}atol", atol)
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise bad_type(f"{prefix}options", options, "a dict of torchdiffeq solver options or None")
    options = dict(options)
    if "step_size" in options:
        options["step_size"] = check_positive(f"{prefix}options['step_size']", options["step_size"])
        if method in ADAPTIVE_METHODS:
            raise bad_value(
                f"{prefix}options",
                options,
                f"'step_size' only with a fixed-grid method ({', '.join(FIXED_METHODS)})",
                "Use 'first_step' or 'max_step' to guide an adaptive method.",
            )
    if step_control == "per_sample":
        per_sample.check_per_sample(method, options, backend, prefix)
    return SolverSpec(
        method=method,
        rtol=rtol,
        atol=atol,
        options=options,
        backend=backend,
        step_control=step_control,
    )


def check_backend(backend: Any) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS`, else raise a ``ValueError``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise bad_value(
            "backend",
            backend,
            "one of " + ", ".join(repr(b) for b in BACKENDS),
            f"'own' steps {', '.join(OWN_METHODS)} through node_ocp's own loop and every "
            "other method through torchdiffeq; 'torchdiffeq' steps every method there.",
        )
    return backend


def as_time_grid(t: Any, name: str = "t") -> torch.Tensor:
    """Turn ``t`` into a 1-D floating tensor of >= 2 strictly monotone, finite times.

    Accepts a pair or sequence of numbers, or a 1-D tensor (kept as is, so a tensor that
    requires grad stays in the graph).
    """
    if isinstance(t, torch.Tensor):
        grid = t
        if not grid.is_floating_point():
            grid = grid.to(torch.get_default_dtype())
    elif isinstance(t, (list, tuple)) and all(
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        or (isinstance(v, torch.Tensor) and v.numel() == 1)
        for v in t
    ):
        # float64, so that a horizon like 0.7 is not rounded to float32 before a float64 solve.
        grid = torch.tensor([float(v) for v in t], dtype=torch.float64)
    else:
        raise bad_type(name, t, "a pair (t0, t1) or a 1-D sequence/tensor of times")
    if grid.dim() != 1 or grid.numel() < 2:
        raise bad_value(
            name,
            t,
            "a 1-D time grid with at least 2 points",
            "Pass (t0, t1) for the end state or a longer grid for states at every time.",
        )
    with torch.no_grad():
        if not torch.isfinite(grid).all():
            raise bad_value(name, t, "finite times")
        diff = grid[1:] - grid[:-1]
        if not ((diff > 0).all() or (diff < 0).all()):
            raise bad_value(
                name,
                t,
                "strictly increasing or strictly decreasing times",
                "Remove repeated times and sort the grid.",
            )
    return grid
