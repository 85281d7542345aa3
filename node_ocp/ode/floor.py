"""What a training step of an ODE block costs against its floor, per function evaluation.

The *floor* of one step at a given number of evaluations (NFE) is the field's own work at
the points the solves visit, with no solver around it: one ``field(t, x)`` under
``no_grad`` per forward evaluation, and one ``field(t, x)`` with a graph plus one
``torch.autograd.grad`` (w.r.t. ``x`` and the parameters, one graph per evaluation) per
backward evaluation. The points are recorded from one step of the own adjoint.

:func:`solver_loop_table` times, in one process and interleaved (each repeat runs them all
in a rotating order; medians over repeats):

- ``floor``: the loop above;
- ``solver``: torchdiffeq's own work in the own adjoint's step: its forward and backward
  solves with every evaluation replaced by the output recorded for it (the same steps, no
  field); ``floor + solver`` is the least an adjoint on unpatched torchdiffeq can cost;
- ``solver_own``: the same for the own loop (:mod:`node_ocp.ode.rk`, ``backend="own"``);
- ``own``: a step of the own adjoint over torchdiffeq (``gradient="adjoint"``: forward +
  ``loss.backward()``);
- ``own_loop``: the same step with ``backend="own"``: the own adjoint over the own loop;
- ``torchdiffeq``: the same step through ``torchdiffeq.odeint_adjoint``
  (``gradient="torchdiffeq"``),

and reports each as seconds per NFE (forward + backward evaluations of that step) and the
ratios own/floor, own/torchdiffeq, torchdiffeq/floor, (floor+solver)/floor,
own/(floor+solver), own_loop/floor, own_loop/torchdiffeq, own_loop/own and
(floor+solver_own)/floor, for the whole step and for its backward phase alone.
:func:`format_solver_loop` prints the rows. Fields: ``"mlp"`` (concat-squash MLP
2-64-64-2, softplus, batch 256) and ``"conv"`` (the vector field of
:class:`~node_ocp.models.ODEImageClassifier`, 8 channels, 8x8 images, batch 64); methods:
``"dopri5"`` (rtol 1e-3, atol 1e-4) and ``"rk4"`` (step 0.1); horizon 1; float32.

:func:`training_losses` trains one case for a few seeded steps with either backend, to show
that the own loop leaves a training run's losses unchanged within solver tolerance.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .._errors import bad_type, bad_value, check_choice
from .adjoint import AugmentedDynamics
from .block import ODEBlock
from .calls import FieldCall
from .layers import ConcatConv2d, ConcatSquashLinear, TimeSequential

#: The fields of the table: name -> (builder of the field, shape of the batch ``(B, *feat)``).
FIELDS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {}
#: The solver settings of the table: name -> ``ODEBlock`` keyword arguments.
SOLVERS: dict[str, dict] = {
    "dopri5": {"method": "dopri5", "rtol": 1e-3, "atol": 1e-4},
    "rk4": {"method": "rk4", "options": {"step_size": 0.1}},
}
#: The timed variants, in the order of a repeat's rotation.
VARIANTS: tuple[str, ...] = ("floor", "solver", "solver_own", "own", "own_loop", "torchdiffeq")
#: The variants that are steps of a block, and the block's settings.
BLOCK_VARIANTS: dict[str, dict] = {
    "own": {"gradient": "adjoint"},
    "own_loop": {"gradient": "adjoint", "backend": "own"},
    "torchdiffeq": {"gradient": "torchdiffeq"},
}
#: Optional variants (``extra=``): own adjoint over the own loop with its fixed-grid solves
#: replayed from CUDA graphs (rk4 on CUDA only), or with a ``torch.compile``d field. Their
#: first (warm-up) step, which captures or compiles, is reported as ``{v}_first_s``.
EXTRA_VARIANTS: dict[str, dict] = {
    "own_graph": {"gradient": "adjoint", "backend": "own", "cuda_graph": True},
    "own_compiled": {"gradient": "adjoint", "backend": "own", "compile_field": True},
}
#: Clocks: ``"wall"`` (``time.perf_counter``) or ``"process"`` (``time.process_time``, the
#: CPU time of this process: on a CPU shared with other jobs it leaves out the time spent
#: waiting for a core; meaningless for work queued on a GPU).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}


def mlp_field(dim: int = 2, hidden: int = 64) -> nn.Module:
    """Concat-squash MLP ``dim -> hidden -> hidden -> dim`` with softplus: ``(B, dim)``."""
    return TimeSequential(
        ConcatSquashLinear(dim, hidden),
        nn.Softplus(),
        ConcatSquashLinear(hidden, hidden),
        nn.Softplus(),
        ConcatSquashLinear(hidden, dim),
    )


def conv_field(channels: int = 8) -> nn.Module:
    """The image classifier's field (concat-conv, tanh, concat-conv): ``(B, C, H, W)``."""
    return TimeSequential(
        ConcatConv2d(channels, channels, 3, padding=1),
        nn.Tanh(),
        ConcatConv2d(channels, channels, 3, padding=1),
    )


FIELDS["mlp"] = (mlp_field, (256, 2))
FIELDS["conv"] = (conv_field, (64, 8, 8, 8))


class _Recorder(nn.Module):
    """Wraps a field and keeps the ``(t, x)`` of every call; a call with grad enabled (the
    own adjoint's backward solve) is a backward point, any other (its forward solve, run
    inside ``autograd.Function.forward``) a forward one."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field
        self.forward_points: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.backward_points: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, t, x):
        points = self.backward_points if torch.is_grad_enabled() else self.forward_points
        points.append((t.detach().clone(), x.detach().clone()))
        return self.field(t, x)


class _Replay:
    """``func(t, y)`` returning recorded outputs in order: the solver takes the same steps."""

    def __init__(self, outputs: list[torch.Tensor]):
        self.outputs = outputs
        self.calls = 0

    def __call__(self, t, y):
        out = self.outputs[self.calls]
        self.calls += 1
        return out


class _SolverOnly:
    """torchdiffeq's own work in a step of the own adjoint: its forward solve and its
    backward solve (a pair grid) with every evaluation replaced by the recorded output."""

    def __init__(self, block: ODEBlock, x0: torch.Tensor, target: torch.Tensor):
        self.block = block
        self.grid = block.t.to(x0)
        self.x0 = x0.detach()
        forward_outputs = []

        def forward_call(t, x):
            forward_outputs.append(block.field(t, x))
            return forward_outputs[-1]

        with torch.no_grad():
            ys = block.solver.integrate(forward_call, self.x0, self.grid)
        out = ys[-1].requires_grad_(True)
        (a,) = torch.autograd.grad(_loss(out, target), out)
        params = tuple(p for p in block.field.parameters() if p.requires_grad)
        settings = block.settings
        call = FieldCall(block.field, block.counters, settings.name, backward=True)
        dyn = AugmentedDynamics(call, params, x0.shape, 0, False)
        self.norm = dyn.norm(settings.adjoint_norm, user=settings.backward.options.get("norm"))
        self.state = dyn.pack(ys[-1].detach(), a, None, [torch.zeros_like(p) for p in params], None)
        backward_outputs = []

        def backward_call(t, y):
            backward_outputs.append(dyn(t, y))
            return backward_outputs[-1]

        self.backward_grid = self.grid.flip(0)
        self._backward(backward_call)
        self.outputs = (forward_outputs, backward_outputs)
        self.nfe = (len(forward_outputs), len(backward_outputs))

    def _backward(self, func) -> None:
        with torch.no_grad():
            self.block.adjoint_solver.integrate(
                func, self.state, self.backward_grid, norm=self.norm, keep_grid=True
            )

    def forward(self) -> None:
        replay = _Replay(self.outputs[0])
        with torch.no_grad():
            self.block.solver.integrate(replay, self.x0, self.grid)
        self._check(replay, 0)

    def backward(self) -> None:
        replay = _Replay(self.outputs[1])
        self._backward(replay)
        self._check(replay, 1)

    def _check(self, replay: _Replay, phase: int) -> None:
        if replay.calls != self.nfe[phase]:  # pragma: no cover - a changed solver
            raise RuntimeError(
                f"solver replay: {replay.calls} evaluations instead of {self.nfe[phase]}"
            )


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Case:
    """One (field, method): the blocks, the data and the recorded points of one step."""

    def __init__(
        self,
        field_name: str,
        method: str,
        device: torch.device,
        seed: int,
        clock=time.perf_counter,
        batch: int | None = None,
        extra: Sequence[str] = (),
    ):
        self.clock = clock
        build, shape = FIELDS[field_name]
        if batch is not None:
            shape = (batch, *shape[1:])
        torch.manual_seed(seed)
        self.field = build().to(device)
        self.params = [p for p in self.field.parameters() if p.requires_grad]
        self.x0 = torch.randn(shape, device=device).requires_grad_(True)
        self.target = torch.randn(shape, device=device)
        self.device = device
        kw = SOLVERS[method]
        variants = {**BLOCK_VARIANTS, **{v: EXTRA_VARIANTS[v] for v in extra}}
        self.blocks = {v: ODEBlock(self.field, (0.0, 1.0), **b, **kw) for v, b in variants.items()}
        recorder = _Recorder(self.field)
        _loss(ODEBlock(recorder, (0.0, 1.0), **kw)(self.x0), self.target).backward()
        self.forward_points = recorder.forward_points
        # leaves that require grad, and a cotangent per point: one graph per evaluation
        self.backward_points = [
            (t, x.requires_grad_(True), torch.randn_like(x)) for t, x in recorder.backward_points
        ]
        self.nfe = {"floor": (len(self.forward_points), len(self.backward_points))}
        self.solver_only = {
            "solver": _SolverOnly(self.blocks["own"], self.x0, self.target),
            "solver_own": _SolverOnly(self.blocks["own_loop"], self.x0, self.target),
        }
        for v, replay in self.solver_only.items():
            self.nfe[v] = replay.nfe

    def _clear(self) -> None:
        self.x0.grad = None
        for p in self.params:
            p.grad = None

    def run(self, variant: str) -> tuple[float, float]:
        """One step of ``variant``; returns the seconds of its forward and backward phases."""
        self._clear()
        _sync(self.device)
        clock = self.clock
        start = clock()
        if variant == "floor":
            field, params = self.field, self.params
            with torch.no_grad():
                for t, x in self.forward_points:
                    field(t, x)
            _sync(self.device)
            middle = clock()
            for t, x, v in self.backward_points:
                torch.autograd.grad(field(t, x), (x, *params), v)
        elif variant in self.solver_only:
            self.solver_only[variant].forward()
            _sync(self.device)
            middle = clock()
            self.solver_only[variant].backward()
        else:
            block = self.blocks[variant]
            block.reset_nfe()
            loss = _loss(block(self.x0), self.target)
            _sync(self.device)
            middle = clock()
            loss.backward()
        _sync(self.device)
        end = clock()
        if variant in self.blocks:
            self.nfe[variant] = (block.nfe_forward, block.nfe_backward)
        return middle - start, end - middle


def solver_loop_table(
    fields: Sequence[str] = ("mlp", "conv"),
    methods: Sequence[str] = ("dopri5", "rk4"),
    repeats: int = 15,
    device: str | torch.device = "cpu",
    seed: int = 0,
    clock: str = "wall",
    train_steps: int = 20,
    batch: int | None = None,
    extra: Sequence[str] = (),
) -> list[dict]:
    """Time the floor, the own adjoint and torchdiffeq's adjoint; one row per (field, method).

    Args:
        fields: names in :data:`FIELDS` (``"mlp"``, ``"conv"``).
        methods: names in :data:`SOLVERS` (``"dopri5"``, ``"rk4"``).
        repeats: timed steps of each variant (after one warm-up step of each), interleaved.
        device: where the fields run (float32).
        seed: seed of the field's initialisation and of the data.
        clock: ``"wall"`` or ``"process"`` (see :data:`CLOCKS`; ``"wall"`` on a GPU).
        batch: the batch size of every case (None: each field's own, see :data:`FIELDS`).
        extra: names of :data:`EXTRA_VARIANTS` timed as well (``"own_graph"`` only in rows
            of ``rk4`` on CUDA); the row gets their ``{v}_s``, ``{v}_s_per_nfe``,
            ``{v}_first_s`` (the warm-up step: capture or compilation) and
            ``{v}_over_torchdiffeq``, ``{v}_over_own_loop``.
        train_steps: seeded training steps of :func:`training_losses` with each backend
            (0: none); the row gets ``loss_torchdiffeq``, ``loss_own`` (the losses after
            them) and ``loss_max_rel_diff`` (the largest relative difference over the steps).

    Returns:
        A list of dicts, one per (field, method), with ``field``, ``method``, ``repeats``,
        for each variant ``v`` in :data:`VARIANTS`: ``{v}_s`` (median seconds per step),
        ``{v}_forward_s`` and ``{v}_backward_s`` (medians of its two phases: the forward
        solve, or the floor's forward evaluations; then ``loss.backward()``, or the floor's
        VJPs), ``{v}_s_per_nfe``, ``{v}_nfe_forward``, ``{v}_nfe_backward``; the ratios of
        seconds per NFE ``own_over_floor``, ``own_over_torchdiffeq``,
        ``torchdiffeq_over_floor``, ``floor_plus_solver_over_floor``,
        ``own_over_floor_plus_solver``, ``own_loop_over_floor``,
        ``own_loop_over_torchdiffeq``, ``own_loop_over_own``,
        ``floor_plus_solver_own_over_floor``; and those of the backward phase alone (per
        backward NFE), ``backward_own_over_floor``, ``backward_own_over_torchdiffeq``,
        ``backward_own_loop_over_floor`` and ``backward_own_loop_over_torchdiffeq``.
    """
    if isinstance(fields, str) or not isinstance(fields, Sequence):
        raise bad_type("fields", fields, f"a sequence of names from {tuple(FIELDS)}")
    if isinstance(methods, str) or not isinstance(methods, Sequence):
        raise bad_type("methods", methods, f"a sequence of names from {tuple(SOLVERS)}")
    for name in fields:
        check_choice("fields[...]", name, tuple(FIELDS))
    for name in methods:
        check_choice("methods[...]", name, tuple(SOLVERS))
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise bad_value("repeats", repeats, "an int >= 1")
    check_choice("clock", clock, tuple(CLOCKS))
    if isinstance(train_steps, bool) or not isinstance(train_steps, int) or train_steps < 0:
        raise bad_value("train_steps", train_steps, "an int >= 0")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise bad_value("batch", batch, "an int >= 1 or None (each field's own batch)")
    for name in extra:
        check_choice("extra[...]", name, tuple(EXTRA_VARIANTS))
    device = torch.device(device)
    if clock == "process" and device.type != "cpu":
        raise bad_value("clock", clock, "'wall' on a GPU (CPU time misses queued GPU work)")
    rows = []
    for field_name in fields:
        for method in methods:
            extras = tuple(
                v for v in extra if v != "own_graph" or (method == "rk4" and device.type == "cuda")
            )
            case = _Case(field_name, method, device, seed, CLOCKS[clock], batch, extras)
            timed = VARIANTS + extras
            times: dict[str, list[tuple[float, float]]] = {v: [] for v in timed}
            first = {v: sum(case.run(v)) for v in timed}  # warm-up
            for r in range(repeats):
                k = r % len(timed)
                for v in timed[k:] + timed[:k]:
                    times[v].append(case.run(v))
            row: dict = {
                "field": field_name,
                "method": method,
                "repeats": repeats,
                "clock": clock,
                "batch": int(case.x0.shape[0]),
            }
            per_nfe, per_bwd = {}, {}
            for v in VARIANTS:
                nf, nb = case.nfe[v]
                row[f"{v}_s"] = statistics.median(f + b for f, b in times[v])
                row[f"{v}_forward_s"] = statistics.median(f for f, _ in times[v])
                row[f"{v}_backward_s"] = statistics.median(b for _, b in times[v])
                per_nfe[v] = row[f"{v}_s"] / max(nf + nb, 1)
                per_bwd[v] = row[f"{v}_backward_s"] / max(nb, 1)
                row[f"{v}_s_per_nfe"] = per_nfe[v]
                row[f"{v}_nfe_forward"], row[f"{v}_nfe_backward"] = nf, nb
            row["own_over_floor"] = per_nfe["own"] / per_nfe["floor"]
            row["own_over_torchdiffeq"] = per_nfe["own"] / per_nfe["torchdiffeq"]
            row["torchdiffeq_over_floor"] = per_nfe["torchdiffeq"] / per_nfe["floor"]
            row["backward_own_over_floor"] = per_bwd["own"] / per_bwd["floor"]
            row["backward_own_over_torchdiffeq"] = per_bwd["own"] / per_bwd["torchdiffeq"]
            bound = per_nfe["floor"] + per_nfe["solver"]
            row["floor_plus_solver_over_floor"] = bound / per_nfe["floor"]
            row["own_over_floor_plus_solver"] = per_nfe["own"] / bound
            row["own_loop_over_floor"] = per_nfe["own_loop"] / per_nfe["floor"]
            row["own_loop_over_torchdiffeq"] = per_nfe["own_loop"] / per_nfe["torchdiffeq"]
            row["own_loop_over_own"] = per_nfe["own_loop"] / per_nfe["own"]
            row["floor_plus_solver_own_over_floor"] = (
                per_nfe["floor"] + per_nfe["solver_own"]
            ) / per_nfe["floor"]
            row["backward_own_loop_over_floor"] = per_bwd["own_loop"] / per_bwd["floor"]
            row["backward_own_loop_over_torchdiffeq"] = per_bwd["own_loop"] / per_bwd["torchdiffeq"]
            for v in extras:
                nf, nb = case.nfe[v]
                row[f"{v}_s"] = statistics.median(f + b for f, b in times[v])
                row[f"{v}_s_per_nfe"] = row[f"{v}_s"] / max(nf + nb, 1)
                row[f"{v}_nfe_forward"], row[f"{v}_nfe_backward"] = nf, nb
                row[f"{v}_first_s"] = first[v]
                row[f"{v}_over_torchdiffeq"] = row[f"{v}_s_per_nfe"] / per_nfe["torchdiffeq"]
                row[f"{v}_over_own_loop"] = row[f"{v}_s_per_nfe"] / per_nfe["own_loop"]
            if train_steps:
                losses = {
                    b: training_losses(field_name, method, b, train_steps, device, seed)
                    for b in ("torchdiffeq", "own")
                }
                row["loss_torchdiffeq"] = losses["torchdiffeq"][-1]
                row["loss_own"] = losses["own"][-1]
                row["loss_max_rel_diff"] = max(
                    abs(a - b) / abs(b) for a, b in zip(losses["own"], losses["torchdiffeq"])
                )
            rows.append(row)
    return rows


def training_losses(
    field_name: str,
    method: str,
    backend: str,
    steps: int = 20,
    device: str | torch.device = "cpu",
    seed: int = 0,
    lr: float = 1e-2,
) -> list[float]:
    """The losses of ``steps`` Adam steps (own adjoint, ``backend``) on one seeded batch of
    the table's case ``(field_name, method)``: the field, data and solver settings of
    :func:`solver_loop_table`. Returns the loss before each step."""
    build, shape = FIELDS[field_name]
    torch.manual_seed(seed)
    field = build().to(device)
    x0 = torch.randn(shape, device=device)
    target = torch.randn(shape, device=device)
    block = ODEBlock(field, (0.0, 1.0), backend=backend, **SOLVERS[method])
    opt = torch.optim.Adam(field.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(block(x0), target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def format_solver_loop(rows: list[dict]) -> str:
    """The rows of :func:`solver_loop_table` as a text table: µs per NFE of each variant,
    the ratios of the whole step and of its backward phase, and the NFE (forward+backward)."""
    names = {
        "solver": "solver",
        "solver_own": "slv_own",
        "own_loop": "own_lp",
        "torchdiffeq": "tdq",
    }
    us_head = " ".join(f"{names.get(v, v):>7}" for v in VARIANTS)
    head = (
        f"{'field':<5} {'method':<6} {us_head} "
        f"{'own/floor':>9} {'own/tdq':>7} {'tdq/floor':>9} {'(f+s)/f':>7} "
        f"{'lp/floor':>8} {'lp/tdq':>6} {'lp/own':>6} {'(f+so)/f':>8} "
        f"{'bwd own/floor':>13} {'bwd own/tdq':>11} {'bwd lp/floor':>12} {'bwd lp/tdq':>10}"
        "  nfe f+b"
    )
    lines = [f"{'':<12} {'us per NFE':^{8 * len(VARIANTS) - 1}}", head]
    for r in rows:
        nfe = " / ".join(f"{r[f'{v}_nfe_forward']}+{r[f'{v}_nfe_backward']}" for v in VARIANTS)
        nfe = nfe if len(set(nfe.split(" / "))) > 1 else nfe.split(" / ")[0]
        us = " ".join(f"{1e6 * r[f'{v}_s_per_nfe']:>7.1f}" for v in VARIANTS)
        lines.append(
            f"{r['field']:<5} {r['method']:<6} {us} "
            f"{r['own_over_floor']:>9.3f} {r['own_over_torchdiffeq']:>7.3f} "
            f"{r['torchdiffeq_over_floor']:>9.3f} {r['floor_plus_solver_over_floor']:>7.3f} "
            f"{r['own_loop_over_floor']:>8.3f} {r['own_loop_over_torchdiffeq']:>6.3f} "
            f"{r['own_loop_over_own']:>6.3f} {r['floor_plus_solver_own_over_floor']:>8.3f} "
            f"{r['backward_own_over_floor']:>13.3f} {r['backward_own_over_torchdiffeq']:>11.3f} "
            f"{r['backward_own_loop_over_floor']:>12.3f} "
            f"{r['backward_own_loop_over_torchdiffeq']:>10.3f}  {nfe}"
        )
    lines.append(
        "floor: the field's evaluations and VJPs at the same points, no solver; solver / "
        "slv_own: torchdiffeq's / the own loop's work at the same steps, the evaluations "
        "replayed; own: the own adjoint over torchdiffeq; own_lp (lp): the own adjoint over "
        "the own loop (backend='own'); tdq: torchdiffeq's odeint_adjoint; (f+s)/f, (f+so)/f: "
        "the least own/floor an adjoint on that loop reaches; nfe: one value when "
        f"{', '.join(VARIANTS)} agree."
    )
    for r in rows:
        for v in EXTRA_VARIANTS:
            if f"{v}_s" in r:
                lines.append(
                    f"  {r['field']:<5} {r['method']:<6} batch {r['batch']}: {v} "
                    f"{1e6 * r[f'{v}_s_per_nfe']:.1f} us per NFE, "
                    f"{r[f'{v}_over_torchdiffeq']:.3f}x tdq, {r[f'{v}_over_own_loop']:.3f}x "
                    f"own_lp; its first step (capture/compile) {r[f'{v}_first_s']:.2f} s; "
                    f"nfe {r[f'{v}_nfe_forward']}+{r[f'{v}_nfe_backward']}"
                )
    trained = [r for r in rows if "loss_own" in r]
    if trained:
        lines.append("losses of seeded Adam steps (own adjoint) with each backend:")
        for r in trained:
            lines.append(
                f"  {r['field']:<5} {r['method']:<6} torchdiffeq {r['loss_torchdiffeq']:.6g}  "
                f"own {r['loss_own']:.6g}  largest relative difference over the steps "
                f"{r['loss_max_rel_diff']:.2e}"
            )
    return "\n".join(lines)
