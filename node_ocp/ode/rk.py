"""Own stepping for the explicit Runge–Kutta methods ``dopri5``, ``bosh3`` and ``rk4``.

:func:`odeint` has the call and the results of ``torchdiffeq.odeint`` for these three methods
(torchdiffeq stays the reference the tests compare against, and the implementation of every
other method and option). It differs in how the work is laid out:

- the state is one flat vector ``(N,)``; the stage derivatives lie in one preallocated
  tensor ``K`` ``(S, N)``, and every stage input, the solution, the error estimate and every
  dense output is one ``torch.addmv`` of ``K`` with a row of weights (the tableau scaled by
  the step, one ``torch.mul`` per step) — no per-stage Python lists of tensors;
- times and the step-size control are Python floats (IEEE double, torchdiffeq's float64
  time arithmetic); the one quantity the host needs from the device is the error ratio of
  an adaptive step attempt. Host syncs (counted in :class:`SolveStats` and checked by
  ``tests/test_host_syncs.py``): one per adaptive step attempt (the ratio decides accept or
  reject, the next step, which outputs the step emits and whether the solve has ended, so
  keeping the control on the device would not remove it: the loop's end condition needs
  it), one for the output grid and one for the initial step (``d0``, ``d1``, ``h0``,
  ``d2`` read together) per solve; fixed-grid solves make none per step (one per solve,
  three with ``step_size``, whose grid is computed on the device as torchdiffeq does).
  Stage times and dense-output weights go to the device without waiting for it
  (``non_blocking``: a blocking copy to a GPU is a stream sync of its own);
- the dense output of an adaptive step is not fitted per step: torchdiffeq's quartic
  through ``y0, y1, y(t0 + dt/2), f0, f1`` is a linear combination of ``y0`` and the
  stages, so an output time costs one ``addmv`` and steps with no output cost nothing.

Semantics matched with torchdiffeq (0.2.x), so that steps and NFE agree and values agree to
rounding (fixed grid) or far inside the tolerance (adaptive):

- adaptive (``dopri5``: Dormand–Prince 5(4) with Shampine's error weights and mid-point
  dense output; ``bosh3``: Bogacki–Shampine 3(2) with its quartic dense output): the initial
  step of Hairer, Nørsett & Wanner (II.4), computed in the state's dtype; the error ratio
  ``norm(err / (atol + rtol·max(|y0|, |y1|)))`` with the RMS norm or the caller's ``norm``
  (called on the flat error, like torchdiffeq with a tensor state); accept when ≤ 1; the
  next step ``dt·min(ifactor, max(safety·ratio^(-1/order), dfactor))`` (``dfactor`` only
  after a rejection, ``ifactor`` when the ratio is 0), clamped to ``[min_step, max_step]``;
  FSAL; steps are not shortened to hit output times (outputs are interpolated, so extra
  output times never change the steps); stages at ``t1`` see the time just below it, as
  torchdiffeq's ``Perturb.PREV``; stage times computed in the state's dtype;
- ``rk4`` is torchdiffeq's ``rk4``: the 3/8-rule variant (``rk4_alt_step_func``), on the grid
  of ``step_size`` (``arange`` from ``t0``, the last point moved to ``t1``), of a
  ``grid_constructor``, or of the requested times; outputs between grid points are linear
  interpolations.

Decreasing times are integrated in ``s = -t`` with ``-f(-s, y)``, as torchdiffeq does.

Options handled here: adaptive ``norm``, ``first_step``, ``min_step``, ``max_step``,
``safety``, ``ifactor``, ``dfactor``, ``max_num_steps``; fixed ``step_size``,
``grid_constructor``, ``interp="linear"``, ``perturb=False`` (and ``norm``, ignored).
:func:`supports` says whether a solve can be done here; anything else (``step_t``,
``jump_t``, cubic interpolation, ``perturb=True``, a time dtype, states other than float32 /
float64, a time grid that needs a gradient under backprop) goes to torchdiffeq.

Backprop through the loop (``gradient="direct"``) works: with grad enabled the weights of a
step are a fresh tensor and the error control runs under ``no_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction as F

import numpy as np
import torch

#: Methods with an own stepping path.
OWN_METHODS: tuple[str, ...] = ("dopri5", "bosh3", "rk4")
#: Options the own loop implements, by kind of method.
ADAPTIVE_OPTIONS = frozenset(
    {"norm", "first_step", "min_step", "max_step", "safety", "ifactor", "dfactor", "max_num_steps"}
)
FIXED_OPTIONS = frozenset({"norm", "step_size", "grid_constructor", "interp", "perturb"})
_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
#: Sizes (method, numel, dtype, device) whose stage buffers are kept between solves.
_POOL_KEYS = 16


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge–Kutta method.

    Attributes:
        c: ``(S,)`` stage times as fractions of the step.
        a: ``S - 1`` rows, row ``i`` the ``i + 1`` weights of stage ``i + 1``'s input.
        b: ``(S,)`` solution weights.
        b_err: ``(S,)`` error weights (solution minus embedded solution); None: fixed step.
        mid: ``(S,)`` weights of ``y(t0 + dt/2)`` for the dense output; None: fixed step.
        order: the exponent of the step-size controller is ``1 / order``.
    """

    c: tuple
    a: tuple
    b: tuple
    b_err: tuple | None = None
    mid: tuple | None = None
    order: int = 4
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None

    @property
    def fsal(self) -> bool:
        """The solution is the last stage's input and the last stage is at ``t1``."""
        return self.c[-1] == 1 and tuple(self.a[-1]) + (0,) == tuple(self.b)

    def rows(self) -> np.ndarray:
        """float64 ``(R, S)``: the stage rows, then the solution row (fixed step) or the
        error row and the four rows of the dense output's powers ``x, x², x³, x⁴``
        (computed once, in exact fractions)."""
        rows = self._cache.get("rows")
        if rows is None:
            rows = self._cache["rows"] = self._rows()
        return rows

    def nodes(self, np_dtype) -> np.ndarray:
        """``c`` as an array of ``np_dtype`` (cached)."""
        c = self._cache.get(np_dtype)
        if c is None:
            c = self._cache[np_dtype] = np.array([float(v) for v in self.c], dtype=np_dtype)
        return c

    def _rows(self) -> np.ndarray:
        s = self.stages
        out = [list(r) + [0] * (s - len(r)) for r in self.a]
        if not self.adaptive:
            out.append(list(self.b))
        else:
            out.append(list(self.b_err))
            out.extend(self.dense_rows())
        return np.array([[float(v) for v in r] for r in out], dtype=np.float64)

    def dense_rows(self) -> list[list]:
        """torchdiffeq's quartic ``p(x) = y0 + d x + c x² + b x³ + a x⁴`` through ``y0``,
        ``y1``, ``y_mid`` with slopes ``f0``, ``f1`` at the ends, written as weights of the
        stages (times ``dt``): with ``y1 = y0 + dt B·K``, ``y_mid = y0 + dt M·K``,
        ``f0 = K_0``, ``f1 = K_last`` (FSAL), the ``y0`` terms cancel in ``d, c, b, a``."""
        s = self.stages
        e0 = [F(1) if i == 0 else F(0) for i in range(s)]
        el = [F(1) if i == s - 1 else F(0) for i in range(s)]
        bb, mm = [F(v) for v in self.b], [F(v) for v in self.mid]

        def comb(ce0, cel, cb, cm):
            return [ce0 * e0[i] + cel * el[i] + cb * bb[i] + cm * mm[i] for i in range(s)]

        return [
            comb(1, 0, 0, 0),  # x
            comb(-4, 1, -5, 16),  # x²
            comb(5, -3, 14, -32),  # x³
            comb(-2, 2, -8, 16),  # x⁴
        ]

    def weights(self, dtype: torch.dtype, device) -> torch.Tensor:
        """:meth:`rows` as a tensor, cached per dtype and device."""
        key = (dtype, str(device))
        w = self._cache.get(key)
        if w is None:
            w = self._cache[key] = torch.tensor(self.rows(), dtype=dtype, device=device)
        return w


def _dp5() -> Tableau:
    a = (
        (F(1, 5),),
        (F(3, 40), F(9, 40)),
        (F(44, 45), F(-56, 15), F(32, 9)),
        (F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729)),
        (F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656)),
        (F(35, 384), F(0), F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84)),
    )
    b = (*a[-1], F(0))
    # Shampine's (1986) embedded 4th-order weights, the error estimate torchdiffeq uses
    b_hat = (
        F(1951, 21600),
        F(0),
        F(22642, 50085),
        F(451, 720),
        F(-12231, 42400),
        F(649, 6300),
        F(1, 60),
    )
    # y(t0 + dt/2) of Shampine's dense output
    mid = (
        F(6025192743, 30085553152) / 2,
        F(0),
        F(51252292925, 65400821598) / 2,
        F(-2691868925, 45128329728) / 2,
        F(187940372067, 1594534317056) / 2,
        F(-1776094331, 19743644256) / 2,
        F(11237099, 235043384) / 2,
    )
    c = (F(0), F(1, 5), F(3, 10), F(4, 5), F(8, 9), F(1), F(1))
    return Tableau(c, a, b, tuple(x - y for x, y in zip(b, b_hat)), mid, order=5)


def _bs3() -> Tableau:
    a = ((F(1, 2),), (F(0), F(3, 4)), (F(2, 9), F(1, 3), F(4, 9)))
    b = (*a[-1], F(0))
    b_hat = (F(7, 24), F(1, 4), F(1, 3), F(1, 8))
    mid = (F(0), F(1, 2), F(0), F(0))
    c = (F(0), F(1, 2), F(3, 4), F(1))
    return Tableau(c, a, b, tuple(x - y for x, y in zip(b, b_hat)), mid, order=3)


def _rk4_38() -> Tableau:
    a = ((F(1, 3),), (F(-1, 3), F(1)), (F(1), F(-1), F(1)))
    return Tableau((F(0), F(1, 3), F(2, 3), F(1)), a, (F(1, 8), F(3, 8), F(3, 8), F(1, 8)))


TABLEAUS: dict[str, Tableau] = {"dopri5": _dp5(), "bosh3": _bs3(), "rk4": _rk4_38()}


def supports(method: str, options: dict, y0: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether :func:`odeint` can do this solve (else it is torchdiffeq's)."""
    tab = TABLEAUS.get(method)
    if tab is None or not isinstance(y0, torch.Tensor) or y0.dtype not in _NP_DTYPES:
        return False
    if torch.is_grad_enabled() and t.requires_grad:
        return False  # the time grid's own gradient (steps, interpolation) is torchdiffeq's
    allowed = ADAPTIVE_OPTIONS if tab.adaptive else FIXED_OPTIONS
    if not set(options) <= allowed:
        return False
    return options.get("interp", "linear") == "linear" and not options.get("perturb", False)


@dataclass
class SolveStats:
    """What one :func:`odeint` call did: ``accepted`` and ``rejected`` steps, evaluations
    ``nfe`` and ``host_syncs`` (values the host read from the state's device)."""

    accepted: int = 0
    rejected: int = 0
    nfe: int = 0
    host_syncs: int = 0


def odeint(
    func: Callable,
    y0: torch.Tensor,
    t: torch.Tensor,
    *,
    method: str,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    options: dict | None = None,
    stats: SolveStats | None = None,
) -> torch.Tensor:
    """``torchdiffeq.odeint(func, y0, t, rtol=, atol=, method=, options=)`` for the methods
    in :data:`OWN_METHODS` (check :func:`supports` first).

    Args:
        func: ``func(t, y)`` with ``t`` a 0-dim tensor (the state's dtype and device) and
            ``y`` shaped like ``y0``; returns a tensor shaped like ``y``.
        y0: the initial state, any shape, float32 or float64.
        t: ``(T,)`` strictly monotone output times, ``T >= 2``.
        stats: filled in when given (steps, evaluations, host syncs).

    Returns ``(T, *y0.shape)``.
    """
    tab = TABLEAUS[method]
    options = dict(options or {})
    stats = SolveStats() if stats is None else stats
    shape = y0.shape
    t_work = t.detach()
    times = t_work.tolist()  # the one read of the output grid (direction and values)
    stats.host_syncs += 1
    reverse = len(times) > 1 and times[0] > times[1]
    if reverse:
        t_work = -t_work
        times = [-v for v in times]
        gc = options.get("grid_constructor")
        if gc is not None:
            options["grid_constructor"] = lambda f, y, s, gc=gc: -gc(f, y, -s)

    def f(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        stats.nfe += 1
        if reverse:
            return -func(-s, y.view(shape)).reshape(-1)
        return func(s, y.view(shape)).reshape(-1)

    y = y0.reshape(-1)
    st = _Stages.acquire(tab, y, torch.is_grad_enabled())
    try:
        if tab.adaptive:
            outs = _adaptive(f, y, times, tab, rtol, atol, options, st, stats)
        else:
            outs = _fixed(f, y, t_work, times, tab, options, st, stats)
    finally:
        st.release()
    return torch.stack(outs).view(len(times), *shape)


class _Stages:
    """The stage derivatives ``K`` ``(S, N)`` and the weights of the current step.

    Without grad the views ``K[:i]ᵀ`` and the rows of the scaled weights are made once and
    the weights are rescaled in place, and the record is kept for the next solve of the same
    method, size, dtype and device (:meth:`acquire`, :meth:`release`: a solve nested in a
    field gets its own); with grad (backprop through the loop) they are fresh tensors, so
    that autograd's saved tensors are never overwritten. No output of a solve is a view of
    ``K`` or of the weights.
    """

    _pool: dict[tuple, list[_Stages]] = {}

    @classmethod
    def acquire(cls, tab: Tableau, y: torch.Tensor, graph: bool) -> _Stages:
        if graph:
            return cls(tab, y, graph)
        key = (id(tab), y.numel(), y.dtype, y.device)
        if key not in cls._pool and len(cls._pool) >= _POOL_KEYS:
            cls._pool.clear()  # many sizes seen: let the old buffers go
        free = cls._pool.setdefault(key, [])
        st = free.pop() if free else cls(tab, y, graph)
        st.key = key
        return st

    def release(self) -> None:
        if not self.graph:
            self._pool.setdefault(self.key, []).append(self)

    def __init__(self, tab: Tableau, y: torch.Tensor, graph: bool):
        self.graph = graph
        self.w = tab.weights(y.dtype, y.device)
        self.k = y.new_empty(tab.stages, y.numel())
        self.s = tab.stages
        self.dt = None
        self.key = None
        if not graph:
            self.wdt = torch.empty_like(self.w)
            self.kt = [self.k[:i].t() for i in range(self.s + 1)]
            self.rows = [self.wdt[r, : min(r + 1, self.s)] for r in range(self.w.shape[0])]

    def scale(self, dt: float) -> None:
        """Weights for a step ``dt`` (kept when ``dt`` has not changed)."""
        if dt == self.dt:
            return
        self.dt = dt
        if self.graph:
            self.wdt = self.w * dt
        else:
            torch.mul(self.w, dt, out=self.wdt)

    def row(self, r: int) -> torch.Tensor:
        """Row ``r`` of the scaled weights, on the stages it uses."""
        if self.graph:
            return self.wdt[r, : min(r + 1, self.s)]
        return self.rows[r]

    def combine(self, y: torch.Tensor, r: int) -> torch.Tensor:
        """``y + Σ_j wdt[r, j] K_j`` over the stages ``j <= r`` (``y`` ``(N,)``)."""
        n = min(r + 1, self.s)
        kt = self.k[:n].t() if self.graph else self.kt[n]
        return torch.addmv(y, kt, self.row(r))

    def mv(self, r: int) -> torch.Tensor:
        """``Σ_j wdt[r, j] K_j`` over every stage."""
        return torch.mv(self.k.t() if self.graph else self.kt[self.s], self.row(r))

    def combine_all(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``y + Σ_j w_j K_j`` over every stage (``w`` ``(S,)``)."""
        return torch.addmv(y, self.k.t() if self.graph else self.kt[self.s], w)


def _adaptive(f, y, times, tab: Tableau, rtol, atol, options, st: _Stages, stats) -> list:
    dtype, device = y.dtype, y.device
    np_dtype = _NP_DTYPES[dtype]
    norm = options.get("norm")
    n = y.numel()
    min_step = float(options.get("min_step", 0.0))
    max_step = float(options.get("max_step", math.inf))
    safety = float(options.get("safety", 0.9))
    ifactor = float(options.get("ifactor", 10.0))
    dfactor = float(options.get("dfactor", 0.2))
    max_num_steps = int(options.get("max_num_steps", 2**31 - 1))
    s = tab.stages
    c = tab.nodes(np_dtype)
    at_end = c == 1
    err_row = s - 1
    dense = tab.rows()[s:]  # (4, S): powers x..x⁴

    t = times[0]
    f0 = f(_to_device(np.array(t, dtype=np_dtype), device), y)
    st.k[0] = f0
    if options.get("first_step") is not None:
        dt = float(options["first_step"])
    else:
        dt = _initial_step(f, t, y, f0, tab.order - 1, rtol, atol, norm, np_dtype, stats)
    outs = [y]
    j, n_steps, t_end = 1, 0, len(times)
    while j < t_end:
        if n_steps >= max_num_steps:
            raise AssertionError(f"max_num_steps exceeded ({n_steps}>={max_num_steps})")
        if not math.isfinite(dt):
            dt = min_step
        dt = min(max(dt, min_step), max_step)
        t1 = t + dt
        if not t1 > t:
            raise AssertionError(f"underflow in dt {dt}")
        st.scale(dt)
        # stage times as torchdiffeq computes them: t0 + c·dt in the state's dtype, the
        # stages at c = 1 just below t1 (its Perturb.PREV)
        ts = np_dtype(t) + c * np_dtype(dt)
        ts[at_end] = np.nextafter(np_dtype(t1), np_dtype(-np.inf))
        tt = _to_device(ts, device).unbind()
        yi = y
        for i in range(1, s):
            yi = st.combine(y, i - 1)
            st.k[i] = f(tt[i], yi)
        y1 = yi
        with torch.no_grad():
            err = st.mv(err_row)
            tol = torch.maximum(y.abs(), y1.abs()).mul_(rtol).add_(atol)
            err = err.div_(tol)
            if norm is None:
                ratio = float(torch.linalg.vector_norm(err)) / math.sqrt(max(n, 1))
            else:
                ratio = abs(float(norm(err)))
        stats.host_syncs += 1
        n_steps += 1
        if math.isnan(ratio):
            raise AssertionError(
                f"non-finite values in the error estimate of a step from t={t} (dt={dt})"
            )
        accept = ratio <= 1 or dt <= min_step
        if accept:
            stats.accepted += 1
            emitted = False
            while j < t_end and times[j] <= t1:
                outs.append(_dense(st, y, y1, t, t1, dt, times[j], dense, np_dtype, device))
                j += 1
                emitted = True
            if emitted:
                n_steps = 0
            y, t = y1, t1
            st.k[0] = st.k[s - 1]  # FSAL
        else:
            stats.rejected += 1
        if ratio == 0:
            factor = ifactor
        else:
            low = 1.0 if ratio < 1 else dfactor
            factor = min(ifactor, max(safety / ratio ** (1.0 / tab.order), low))
        dt = min(max(dt * factor, min_step), max_step)
    return outs


def _dense(st: _Stages, y0, y1, t0: float, t1: float, dt: float, t: float, dense, np_dtype, device):
    """The state at ``t`` in ``(t0, t1]`` from the step's quartic."""
    if t == t1:
        return y1
    x = (t - t0) / (t1 - t0)
    w = (dense.T @ np.array([x, x * x, x**3, x**4])) * dt
    return st.combine_all(y0, _to_device(w.astype(np_dtype), device))


def _to_device(a: np.ndarray, device) -> torch.Tensor:
    """A host array on ``device`` without waiting for the device (a blocking copy to a GPU
    would wait for the stream: a host round-trip; the array is staged at once, so it may be
    freed after the call)."""
    return torch.from_numpy(a).to(device, non_blocking=True)


def _initial_step(f, t0: float, y0, f0, order: int, rtol, atol, norm, np_dtype, stats) -> float:
    """Hairer, Nørsett & Wanner's initial step, in the state's dtype like torchdiffeq's.

    ``d0``, ``d1``, the first guess ``h0`` and ``d2`` are computed on the device (the same
    IEEE operations in the state's dtype as on the host) and read together: one host sync."""
    rms = norm if norm is not None else (lambda v: v.pow(2).mean().sqrt())
    dtype, device = y0.dtype, y0.device

    def scalar(v) -> torch.Tensor:
        return torch.as_tensor(v, device=device).abs().to(dtype)

    with torch.no_grad():
        scale = y0.abs().mul(rtol).add_(atol)
        d0, d1 = scalar(rms(y0 / scale)), scalar(rms(f0 / scale))
        guess = d0 * torch.full((), 0.01, dtype=dtype, device=device) / d1
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(guess, 1e-6), guess)
        y1 = y0 + h0 * f0
        # the time t0 + h0 in float64 (torchdiffeq's time arithmetic), then the state's dtype
        t1 = (torch.full((), t0, dtype=torch.float64, device=device) + h0.double()).to(dtype)
    f1 = f(t1, y1)
    with torch.no_grad():
        d2 = scalar(rms((f1 - f0) / scale)) / h0
        d0, d1, d2, h0 = (np_dtype(v) for v in torch.stack([d0, d1, d2, h0]).tolist())
    stats.host_syncs += 1
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(np_dtype(1e-6), h0 * np_dtype(1e-3))
    else:
        h1 = (np_dtype(0.01) / max(d1, d2)) ** np_dtype(1.0 / (order + 1))
    return float(min(np_dtype(100) * h0, h1))


def _fixed(f, y, t_work: torch.Tensor, times, tab: Tableau, options, st: _Stages, stats) -> list:
    dtype, device = y.dtype, y.device
    np_dtype = _NP_DTYPES[dtype]
    step_size = options.get("step_size")
    gc = options.get("grid_constructor")
    if step_size is not None and gc is not None:
        raise ValueError("step_size and grid_constructor are mutually exclusive arguments.")
    if step_size is not None:
        start, end = t_work[0], t_work[-1]
        niters = math.ceil(float((end - start) / step_size + 1))  # computed as torchdiffeq does
        stats.host_syncs += 1
        grid_t = torch.arange(0, niters, dtype=t_work.dtype, device=t_work.device) * step_size
        grid_t = grid_t + start
        grid_t[-1] = t_work[-1]
    elif gc is not None:
        grid_t = gc(f, y, t_work)
    else:
        grid_t = t_work
    if grid_t is t_work:
        grid = times  # already read
    else:
        grid = grid_t.tolist()
        stats.host_syncs += 1
    if grid[0] != times[0] or grid[-1] != times[-1]:
        raise AssertionError("the step grid must start and end at the first and last time")
    g_dtype = _NP_DTYPES.get(grid_t.dtype, np.float64)
    s = tab.stages
    c = tab.nodes(g_dtype)
    gnp = np.array(grid, dtype=g_dtype)
    dts = gnp[1:] - gnp[:-1]
    ts = gnp[:-1, None] + dts[:, None] * c[None, :]
    ts[:, c == 1] = gnp[1:, None]
    # one tensor of every stage time of the solve, one 0-dim view per stage
    tt = _to_device(ts.astype(np_dtype), device).reshape(-1).unbind()
    outs = [y]
    j, t_end = 1, len(times)
    for m in range(len(grid) - 1):
        t0, t1 = grid[m], grid[m + 1]
        st.scale(float(dts[m]))
        st.k[0] = f(tt[m * s], y)
        for i in range(1, s):
            st.k[i] = f(tt[m * s + i], st.combine(y, i - 1))
        y1 = st.combine(y, s - 1)
        stats.accepted += 1
        while j < t_end and t1 >= times[j]:
            tj = times[j]
            if tj == t0:
                outs.append(y)
            elif tj == t1:
                outs.append(y1)
            else:
                outs.append(torch.lerp(y, y1, (tj - t0) / (t1 - t0)))
            j += 1
        y = y1
    return outs
