"""Batch vs per-sample step control on a CNF and a digits classifier: steps, NFE, time.

A synthetic case first (``pulses``: every sample hard at its own time, where per-sample
control should pay), then for each config the model (own backend, the config's solver)
takes a few seeded Adam steps with batch control, so that its field is a trained one rather
than its initialisation; then, on seeded evaluation batches of each size, the input of its
(first) ODE block is solved by:

- batch control: the own loop (:func:`node_ocp.ode.rk.odeint`), one step size for the batch;
- per-sample control: :func:`node_ocp.ode.per_sample.odeint`, one step size per sample.

Counts (independent of the machine's load): loop iterations (step attempts of the batch; each
is one evaluation of the field on the whole batch per stage), batch evaluations of the field
(NFE, counted once per evaluation of the whole batch, initial step included), accepted steps
per sample (mean, max), the row-attempts (Σ over samples of each one's attempts: what a loop
that evaluated only the unfinished samples would pay, relative to B x iterations), and the
NFE of one forward+backward training loss (own adjoint) of the model with either control.
The largest difference of the block's output between the controls is printed as a check.

``--time``: wall-clock medians of interleaved repeats of the no-grad solve and of the
forward+backward loss with either control (run it alone on the machine, ``OMP_NUM_THREADS=1``).

    OMP_NUM_THREADS=1 python experiments/per_sample_nfe.py [--configs configs/quickstart.toml
        configs/digits_classification.toml] [--train-steps 30] [--batches 32 256]
        [--time] [--repeats 7] [--no-pulses] [--out experiments/results/bench_per_sample.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from node_ocp.io import atomic_write_json
from node_ocp.ode import per_sample as ps
from node_ocp.ode import rk
from node_ocp.train import build_task, load_config
from node_ocp.train.adapters import build_adapter
from node_ocp.train.step import train_step

CONTROLS = ("batch", "per_sample")
DEFAULT_CONFIGS = ("configs/quickstart.toml", "configs/digits_classification.toml")


def trained_task(path: str, train_steps: int, seed: int = 0):
    """The config's task with the own backend, after ``train_steps`` seeded Adam steps."""
    cfg = load_config(path)
    cfg.solver.backend = "own"
    torch.manual_seed(seed)
    task = build_task(cfg, torch.device("cpu"))
    opt = build_adapter(cfg.optimizers["adam"], task.model, seed=seed)
    n = len(task.data.train)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(train_steps):
        idx = torch.randperm(n, generator=gen)[: min(cfg.train.batch_size, n)]
        batch = task.data.train.batch(idx)
        train_step(
            opt,
            lambda batch=batch: task.outputs_and_loss(batch),
            blocks=task.blocks,
            likelihood=task.likelihood,
        )
    return cfg, task


def block_input(task, batch) -> torch.Tensor:
    """The first ODE block's input on ``batch`` (a forward pre-hook; the model is run once
    without grad, which also sets a CNF's probes)."""
    block = task.blocks[0]
    seen = []
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            task.outputs_and_loss(batch)
    finally:
        handle.remove()
    return seen[0]


def set_control(task, control: str) -> None:
    for block in task.blocks:
        block.step_control = control


def solve_counts(block, x0: torch.Tensor) -> dict:
    """Steps and NFE of the block's forward solve from ``x0`` with either control."""
    spec, field, grid = block.solver, block.field, block.t.to(x0.dtype)
    opts = dict(method=spec.method, rtol=spec.rtol, atol=spec.atol, options=spec.options)
    n = x0.shape[0]
    stages = rk.TABLEAUS[spec.method].stages
    with torch.no_grad():
        bs = rk.SolveStats()
        yb = rk.odeint(field, x0, grid, stats=bs, **opts)
        pss = ps.PerSampleStats()
        yp = ps.odeint(field, x0, grid, stats=pss, **opts)
    attempts = pss.accepted + pss.rejected
    return {
        "batch": {
            "iterations": bs.accepted + bs.rejected,
            "nfe": bs.nfe,
            "accepted": bs.accepted,
            "rejected": bs.rejected,
        },
        "per_sample": {
            "iterations": pss.iterations,
            "nfe": pss.nfe,
            "accepted_mean": float(pss.accepted.double().mean()),
            "accepted_median": float(pss.accepted.double().median()),
            "accepted_max": int(pss.accepted.max()),
            "accepted_min": int(pss.accepted.min()),
            "rejected_total": int(pss.rejected.sum()),
            "active_fraction": float(attempts.sum()) / (n * max(pss.iterations, 1)),
        },
        "stages": stages,
        "max_abs_diff": float((yb[-1] - yp[-1]).abs().max()),
    }


def loss_nfe(task, batch, control: str) -> dict:
    """NFE of one forward+backward of the training loss (the model's gradient mode)."""
    set_control(task, control)
    for b in task.blocks:
        b.reset_nfe()
    _, loss = task.outputs_and_loss(batch)
    loss.backward()
    task.model.zero_grad(set_to_none=True)
    out = {
        "forward": sum(b.nfe_forward for b in task.blocks),
        "backward": sum(b.nfe_backward for b in task.blocks),
        "loss": float(loss.detach()),
    }
    set_control(task, "batch")
    return out


def timings(task, batch, x0, repeats: int) -> dict:
    """Medians (s) of interleaved repeats: the no-grad forward solve of the first block and
    one forward+backward of the loss, with either control."""
    block = task.blocks[0]
    spec, field, grid = block.solver, block.field, block.t.to(x0.dtype)
    opts = dict(method=spec.method, rtol=spec.rtol, atol=spec.atol, options=spec.options)
    solves = {c: [] for c in CONTROLS}
    steps = {c: [] for c in CONTROLS}
    for r in range(repeats + 1):  # the first round warms up
        order = CONTROLS if r % 2 == 0 else CONTROLS[::-1]
        for control in order:
            solve = rk.odeint if control == "batch" else ps.odeint
            with torch.no_grad():
                t0 = time.perf_counter()
                solve(field, x0, grid, **opts)
                t1 = time.perf_counter()
            set_control(task, control)
            t2 = time.perf_counter()
            _, loss = task.outputs_and_loss(batch)
            loss.backward()
            t3 = time.perf_counter()
            task.model.zero_grad(set_to_none=True)
            set_control(task, "batch")
            if r:
                solves[control].append(t1 - t0)
                steps[control].append(t3 - t2)
    return {
        c: {"solve_s": statistics.median(solves[c]), "loss_backward_s": statistics.median(steps[c])}
        for c in CONTROLS
    }


class Pulses(torch.nn.Module):
    """A synthetic batch whose samples are hard at different times: ``dy_b/dt = ω_b(t) J y_b``
    (a rotation of ``(B, 2)`` rows), ``ω_b(t) = 1 + A exp(-((t - τ_b)/w)²)``, each sample's
    pulse at its own ``τ_b`` (seeded, uniform in [0.1, 0.9]); ``A`` is a parameter."""

    accepts_batched_time = True

    def __init__(self, n: int, seed: int = 0, amplitude: float = 50.0, width: float = 0.03):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("tau", 0.1 + 0.8 * torch.rand(n, generator=gen, dtype=torch.float64))
        self.amplitude = torch.nn.Parameter(torch.tensor(amplitude, dtype=torch.float64))
        self.width = width

    def forward(self, t, y):
        t = t.reshape(-1).to(y.dtype)
        w = 1 + self.amplitude * torch.exp(-(((t - self.tau) / self.width) ** 2))
        return w[:, None] * torch.stack([-y[:, 1], y[:, 0]], 1)


class PulsesTask:
    """The synthetic case in the shape the counting functions use (one ODE block, a loss)."""

    def __init__(self, n: int, seed: int, rtol: float = 1e-6, atol: float = 1e-8):
        from node_ocp import ODEBlock

        self.field = Pulses(n, seed)
        block = ODEBlock(self.field, (0.0, 1.0), rtol=rtol, atol=atol, backend="own")
        self.blocks = [block]
        self.model = block
        gen = torch.Generator().manual_seed(seed + 1)
        self.x0 = torch.randn(n, 2, generator=gen, dtype=torch.float64)

    def outputs_and_loss(self, batch):
        out = self.blocks[0](self.x0)
        return out, (out**2).sum()


def run_pulses(batches, timed: bool, repeats: int, seed: int) -> dict:
    rows = {}
    for size in batches:
        task = PulsesTask(size, seed)
        block = task.blocks[0]
        row = solve_counts(block, task.x0)
        row["loss_nfe"] = {c: loss_nfe(task, None, c) for c in CONTROLS}
        if timed:
            row["time"] = timings(task, None, task.x0, repeats)
        rows[str(size)] = row
        report("pulses (synthetic, a pulse per sample)", block, size, row, timed)
    return {"model": "pulses", "batches": rows}


def report(name: str, block, size: int, row: dict, timed: bool) -> None:
    b, p = row["batch"], row["per_sample"]
    ln = row["loss_nfe"]
    s = block.solver
    print(
        f"{name} [{s.method} rtol={s.rtol} atol={s.atol}] batch {size}: iterations batch "
        f"{b['iterations']} / per-sample {p['iterations']}; NFE {b['nfe']} / {p['nfe']}; "
        f"accepted steps batch {b['accepted']} / per-sample mean {p['accepted_mean']:.1f} "
        f"median {p['accepted_median']:.0f} max {p['accepted_max']} min {p['accepted_min']}; "
        f"active rows {100 * p['active_fraction']:.0f}%; loss fwd+bwd NFE "
        f"{ln['batch']['forward']}+{ln['batch']['backward']} / "
        f"{ln['per_sample']['forward']}+{ln['per_sample']['backward']}; "
        f"max |diff| {row['max_abs_diff']:.1e}"
    )
    if timed:
        tb, tp = row["time"]["batch"], row["time"]["per_sample"]
        print(
            f"    time: solve {1e3 * tb['solve_s']:.1f} / {1e3 * tp['solve_s']:.1f} ms "
            f"(x{tp['solve_s'] / tb['solve_s']:.2f}); loss fwd+bwd "
            f"{1e3 * tb['loss_backward_s']:.1f} / {1e3 * tp['loss_backward_s']:.1f} ms "
            f"(x{tp['loss_backward_s'] / tb['loss_backward_s']:.2f})"
        )


def run(
    configs, train_steps: int, batches, timed: bool, repeats: int, seed: int = 0, pulses=True
) -> dict:
    result = {"train_steps": train_steps, "configs": {}}
    if pulses:
        result["configs"]["pulses"] = run_pulses(batches, timed, repeats, seed)
    for path in configs:
        cfg, task = trained_task(path, train_steps, seed)
        rows = {}
        for size in batches:
            n = len(task.data.train)
            gen = torch.Generator().manual_seed(seed + 1)
            idx = torch.randperm(n, generator=gen)[: min(size, n)]
            batch = task.data.train.batch(idx)
            x0 = block_input(task, batch)
            row = solve_counts(task.blocks[0], x0)
            row["loss_nfe"] = {c: loss_nfe(task, batch, c) for c in CONTROLS}
            if timed:
                row["time"] = timings(task, batch, x0, repeats)
            rows[str(size)] = row
            name = f"{path} ({cfg.model.kind}, after {train_steps} Adam steps)"
            report(name, task.blocks[0], x0.shape[0], row, timed)
        result["configs"][path] = {"model": cfg.model.kind, "batches": rows}
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", default=list(DEFAULT_CONFIGS))
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    p.add_argument("--time", action="store_true", help="wall-clock medians as well")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pulses", action="store_true", help="skip the synthetic case")
    p.add_argument("--out", default=None, help="JSON output (default: print only)")
    args = p.parse_args(argv)
    result = run(
        args.configs,
        args.train_steps,
        args.batches,
        args.time,
        args.repeats,
        args.seed,
        pulses=not args.no_pulses,
    )
    if args.out:
        print(f"saved {atomic_write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
