"""``ODEBlock(..., cuda_graph=True)``: fixed-grid solves captured in CUDA graphs and replayed.

A fixed-grid solve (``euler``, ``midpoint``, ``rk4``) of a state of fixed shape takes the
same kernels at every call: its steps, stage times and output interpolation are known on
the host before it starts (:class:`FixedPlan`), so the whole solve can be captured once in a
``torch.cuda.CUDAGraph`` and replayed, one launch per call instead of a few per stage. The
forward solve and the own adjoint's backward solve (the plain adjoint: no curvature capture,
no gradient for the time grid) are captured, each into its own graph, per state shape,
dtype, device and time grid (:class:`CudaGraphSolves` keeps :data:`MAX_GRAPHS` of them and
captures again for a new one, e.g. a smaller last batch).

What the stepping does is written once (:func:`run_fixed`, :func:`adjoint_fixed`) and runs
the same eagerly (tested on the CPU against torchdiffeq and the own adjoint) and under
capture. Requirements, checked with errors that name the option: a CUDA state, the
``adjoint`` gradient, fixed-grid methods of :data:`GRAPH_METHODS` for both solves, no
options other than ``step_size``; a field that reads values on the host (``float(t)``,
``.item()``) or changes its kernels between calls cannot be captured (the capture fails
with a :class:`CudaGraphError`). Parameters are read where they lie, so in-place optimizer
updates reach the replays; a field whose parameters are replaced by new tensors needs a new
block call shape or :meth:`CudaGraphSolves.clear`.

The semantics are torchdiffeq's: ``rk4`` its 3/8-rule variant, ``midpoint`` and ``euler``
its steps, on the grid of ``step_size`` (``arange`` from ``t0``, the last point moved to
``t1``) or of the requested times; outputs between grid points are linear interpolations;
decreasing times are integrated in ``s = -t`` with ``-f(-s, y)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction as F

import numpy as np
import torch

from .._errors import bad_value, first_line

#: Fixed-grid methods a CUDA graph can capture.
GRAPH_METHODS: tuple[str, ...] = ("euler", "midpoint", "rk4")
#: Options a captured solve implements.
GRAPH_OPTIONS = frozenset({"step_size"})
#: Captured solves kept per block (per shape, dtype, device and grid).
MAX_GRAPHS = 4
_NP = {torch.float32: np.float32, torch.float64: np.float64}

# (c, a, b): stage times, stage weights (row i: weights of stages 0..i), solution weights
_TABLEAUS = {
    "euler": ((F(0),), (), (F(1),)),
    "midpoint": ((F(0), F(1, 2)), ((F(1, 2),),), (F(0), F(1))),
    # torchdiffeq's rk4: the 3/8 rule (rk4_alt_step_func)
    "rk4": (
        (F(0), F(1, 3), F(2, 3), F(1)),
        ((F(1, 3),), (F(-1, 3), F(1)), (F(1), F(-1), F(1))),
        (F(1, 8), F(3, 8), F(3, 8), F(1, 8)),
    ),
}


class CudaGraphError(RuntimeError):
    """A solve could not be captured in a CUDA graph."""


def check_graph_settings(settings, gradient: str) -> None:
    """Raise a ``ValueError`` naming ``cuda_graph`` unless ``settings`` (a block's
    :class:`~node_ocp.ode.settings.SolveSettings`) and ``gradient`` can be captured."""
    if gradient != "adjoint":
        raise bad_value(
            "cuda_graph",
            True,
            "True only with gradient='adjoint' (backprop through a replayed graph is not "
            f"supported; this block has gradient={gradient!r})",
            "Use gradient='adjoint' or cuda_graph=False.",
        )
    for prefix, spec in (("", settings.forward), ("adjoint_", settings.backward)):
        if spec.method not in GRAPH_METHODS:
            raise bad_value(
                "cuda_graph",
                True,
                f"True only with a fixed-grid {prefix}method of {', '.join(GRAPH_METHODS)} "
                f"(received {prefix}method={spec.method!r}: an adaptive method decides its "
                "steps on the host)",
                f"Use e.g. {prefix}method='rk4' with options={{'step_size': h}}, or "
                "cuda_graph=False.",
            )
        extra = set(spec.options) - GRAPH_OPTIONS
        if extra:
            raise bad_value(
                "cuda_graph",
                True,
                f"True only with {prefix}options of {sorted(GRAPH_OPTIONS)} (received "
                f"{sorted(extra)})",
                "Drop those options or set cuda_graph=False.",
            )


@dataclass
class FixedPlan:
    """A fixed-grid solve laid out on the host.

    Attributes:
        method: a method of :data:`GRAPH_METHODS`.
        reverse: the times decrease (the steps are taken in ``s = -t``).
        steps: ``(ds, stage time indices)`` per step, in ``s``.
        times: ``(M·S,)`` every stage time of the solve in ``s``, on the state's device.
        outputs: per output time, ``(step, weight)``: the state before step ``step``
            (weight None) or the linear interpolation with weight ``w`` across it.
        nfe: evaluations of one solve.
    """

    method: str
    reverse: bool
    steps: list
    times: torch.Tensor
    outputs: list
    nfe: int


def plan_fixed(
    method: str, t: list, dtype: torch.dtype, device, step_size: float | None = None
) -> FixedPlan:
    """The :class:`FixedPlan` of a solve over the output times ``t`` (host floats, strictly
    monotone) in ``dtype`` on ``device``; the step grid is that of ``step_size`` or ``t``."""
    if method not in _TABLEAUS:
        raise bad_value("method", method, "one of " + ", ".join(map(repr, GRAPH_METHODS)))
    reverse = len(t) > 1 and t[0] > t[1]
    s_out = [-v for v in t] if reverse else list(t)
    if step_size is not None:
        # torchdiffeq's grid, computed as it does: in the grid's dtype on its device (before
        # any capture; a division by a scalar may round differently on a GPU)
        tw = torch.tensor(s_out, dtype=dtype, device=device)
        start, end = tw[0], tw[-1]
        niters = math.ceil(float((end - start) / step_size + 1))
        grid_t = torch.arange(0, niters, dtype=dtype, device=device) * step_size + start
        grid_t[-1] = tw[-1]
        grid = grid_t.tolist()
    else:
        grid = s_out
    c, _, _ = _TABLEAUS[method]
    np_dtype = _NP.get(dtype, np.float64)
    gnp = np.array(grid, dtype=np_dtype)
    cs = np.array([float(v) for v in c], dtype=np_dtype)
    ds = gnp[1:] - gnp[:-1]
    ts = gnp[:-1, None] + ds[:, None] * cs[None, :]
    ts[:, cs == 1] = gnp[1:, None]
    n_st = len(c)
    steps = [(float(ds[m]), list(range(m * n_st, (m + 1) * n_st))) for m in range(len(ds))]
    outputs: list = []
    j = 1
    for m in range(len(grid) - 1):
        t0, t1 = grid[m], grid[m + 1]
        while j < len(s_out) and t1 >= s_out[j]:
            tj = s_out[j]
            if tj == t0:
                outputs.append((m, None))
            elif tj == t1:
                outputs.append((m + 1, None))
            else:
                outputs.append((m, (tj - t0) / (t1 - t0)))
            j += 1
    times = torch.from_numpy(ts.reshape(-1).astype(np_dtype)).to(device)
    return FixedPlan(method, reverse, steps, times, outputs, n_st * len(steps))


def run_fixed(plan: FixedPlan, func, y0: torch.Tensor) -> torch.Tensor:
    """The solve of ``plan`` for ``func(t, y)`` from ``y0``: ``(T, *y0.shape)``. Only device
    work (no host reads), so that it can be captured in a CUDA graph."""
    _, a, b = _TABLEAUS[plan.method]
    times = plan.times.unbind()
    if plan.reverse:

        def f(s, y):
            return -func(-s, y)
    else:
        f = func
    states = [y0]
    y = y0
    for ds, idx in plan.steps:
        k = [f(times[idx[0]], y)]
        for i, row in enumerate(a, start=1):
            yi = y
            for w, kj in zip(row, k):
                if w:
                    yi = yi + (float(w) * ds) * kj
            k.append(f(times[idx[i]], yi))
        dy = None
        for w, kj in zip(b, k):
            if w:
                term = (float(w) * ds) * kj
                dy = term if dy is None else dy + term
        y = y + dy
        states.append(y)
    outs = [y0]
    for m, w in plan.outputs:
        outs.append(states[m] if w is None else torch.lerp(states[m], states[m + 1], w))
    return torch.stack(outs)


def adjoint_fixed(dyn, plans: list, ys: torch.Tensor, grad_ys: torch.Tensor):
    """The plain own adjoint (no factors, no curvature, no time gradient) over the grid
    intervals backward: ``dyn`` the :class:`~node_ocp.ode.adjoint.AugmentedDynamics` (not
    reversed), ``plans[k - 1]`` the plan from ``t_k`` to ``t_{k-1}``, ``ys``/``grad_ys``
    ``(T, B, *feat)``. Returns ``(grad_x0, *grad_params)``; device work only."""
    n_times = ys.shape[0]
    a = grad_ys[-1]
    acc = [torch.zeros_like(p) for p in dyn.params]
    state = dyn.pack(ys[-1], a, None, acc, None)
    for k in range(n_times - 1, 0, -1):
        sol = run_fixed(plans[k - 1], dyn, state)
        _, a, _, acc, _ = dyn.unpack(sol[-1])
        a = a + grad_ys[k - 1]
        if k > 1:
            state = dyn.pack(ys[k - 1], a, None, acc, None)
    return (a, *acc)


def _spec_key(spec) -> tuple:
    return (spec.method, spec.options.get("step_size"))


class _Captured:
    """One captured solve: static inputs, the graph, static outputs, evaluations."""

    def __init__(self, graph, inputs, outputs, nfe):
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs
        self.nfe = nfe

    def replay(self, *values):
        for static, v in zip(self.inputs, values):
            static.copy_(v)
        self.graph.replay()
        return [o.clone() for o in self.outputs]


class CudaGraphSolves:
    """The captured solves of one block (``ODEBlock(..., cuda_graph=True)``).

    Args:
        name: the block's name, for messages.

    Not copied or pickled with the block (a copy captures again).
    """

    def __init__(self, name: str):
        self.name = name
        self._graphs: OrderedDict = OrderedDict()

    def __deepcopy__(self, memo):
        return CudaGraphSolves(self.name)

    def __getstate__(self):
        return {"name": self.name}

    def __setstate__(self, state):
        self.__init__(state["name"])

    def clear(self) -> None:
        """Forget every captured solve (the next calls capture again)."""
        self._graphs.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    def check_state(self, x0: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming ``cuda_graph`` unless ``x0`` is on a CUDA device."""
        if x0.device.type != "cuda" or not torch.cuda.is_available():
            raise bad_value(
                f"{self.name}: cuda_graph",
                True,
                f"True only for states on a CUDA device (received a state on {x0.device})",
                "Move the model and data to CUDA or set cuda_graph=False.",
            )

    # ------------------------------------------------------------------ solves
    def forward(self, call, settings, x0: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """The forward solve of ``call`` (a counted field) from ``x0`` over ``grid``:
        ``(T, *x0.shape)``, replayed from its graph (captured on first use)."""
        spec = settings.forward
        times = grid.tolist()
        key = ("forward", tuple(x0.shape), x0.dtype, x0.device, tuple(times), _spec_key(spec))
        entry = self._graphs.get(key)
        if entry is None:
            plan = plan_fixed(
                spec.method, times, x0.dtype, x0.device, spec.options.get("step_size")
            )
            entry = self._capture(
                key, lambda x: (run_fixed(plan, call, x),), (x0,), plan.nfe, call, "forward"
            )
        self._graphs.move_to_end(key)
        (ys,) = entry.replay(x0)
        call.counters.forward += entry.nfe
        return ys

    def backward(self, dyn, settings, grid: torch.Tensor, ys, grad_ys):
        """The plain adjoint's backward solve (:func:`adjoint_fixed`) of ``dyn``, replayed
        from its graph. Returns ``(grad_x0, *grad_params)``."""
        spec = settings.backward
        times = grid.tolist()
        key = ("backward", tuple(ys.shape), ys.dtype, ys.device, tuple(times), _spec_key(spec))
        entry = self._graphs.get(key)
        if entry is None:
            plans = [
                plan_fixed(
                    spec.method,
                    [times[k], times[k - 1]],
                    ys.dtype,
                    ys.device,
                    spec.options.get("step_size"),
                )
                for k in range(1, len(times))
            ]
            nfe = sum(p.nfe for p in plans)
            entry = self._capture(
                key,
                lambda y, g: adjoint_fixed(dyn, plans, y, g),
                (ys, grad_ys),
                nfe,
                dyn.call,
                "backward",
            )
        self._graphs.move_to_end(key)
        out = entry.replay(ys, grad_ys)
        dyn.call.counters.backward += entry.nfe
        return out

    def _capture(self, key, fn, inputs, nfe, call, phase) -> _Captured:
        counters = call.counters
        saved = (counters.forward, counters.backward)
        static = [x.detach().clone() for x in inputs]
        try:
            side = torch.cuda.Stream(device=static[0].device)
            side.wait_stream(torch.cuda.current_stream(static[0].device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy initialisation out of the capture
                    fn(*static)
            torch.cuda.current_stream(static[0].device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = fn(*static)
        except Exception as err:
            raise CudaGraphError(
                f"{self.name}: cuda_graph=True: the {phase} solve could not be captured in a "
                f"CUDA graph ({type(err).__name__}: {first_line(err)[:300]}). A captured field "
                "must run only device work (no float(t), .item() or data-dependent Python "
                "branches) with the same kernels at every call. Set cuda_graph=False."
            ) from err
        finally:
            counters.forward, counters.backward = saved
        entry = _Captured(graph, static, list(outputs), nfe)
        self._graphs[key] = entry
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return entry
