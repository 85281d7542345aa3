"""Per-iteration cost, function evaluations and peak memory of optimizers on one config.

Step times are measured on the *same* model state for every optimizer (each starts from the
same initial model with a learning rate so small that the model, and so the number of solver
steps, does not change), with their steps interleaved so that drift in the machine's speed
hits all alike; medians over the steps. OCNOpt's ordinary and refresh steps are timed
separately, as are its *adapt* steps (the step control's trial forward solve on the same
batch), and amortized over one cycle of ``update_every`` and ``adapt_every``.

Memory (see :mod:`node_ocp.train.memory`): for each optimizer, its first plain step after
its first step and its first refresh step after that (OCNOpt), each the optimizer's state
plus the step's transient peak (CUDA allocator peak; on Linux CPUs the resident high-water
mark reset at the step's start). Those steps are left out of the timing medians (unless a
step type occurred only then).
All figures are also given as ratios to the Adam baseline: the first Adam table benched, else
the config's Adam table (benched too), else a default Adam at lr 1e-3.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import torch

from ..io import atomic_write_json
from .adapters import adapter_for, build_adapter
from .config import ConfigError, OptimizerConfig, RunConfig
from .costs import STEP_TYPES, amortized_for, cycle, medians, ratio
from .errors import RunError
from .loop import prepare_out_dir, resolve_device
from .memory import FirstStepMemory, StepMemory
from .optimizers import decay_for_task
from .step import StepFailed, train_step
from .tasks import build_task

FROZEN_LR = 1e-12
FORMAT = "node-ocp bench"  # marks the JSON files bench writes (and may overwrite)


def bench(
    config: RunConfig,
    optimizers: list[str] | None = None,
    steps: int | None = None,
    device: str | None = None,
    memory: bool = True,
    out=None,
    force: bool = False,
    solver_loop: int = 0,
    solver_loop_train_steps: int = 20,
) -> dict:
    """Measure and print the figures; save them as JSON to ``out`` when given.

    ``solver_loop``: repeats of the solver-loop table (:func:`node_ocp.ode.floor.
    solver_loop_table`: time per NFE of the own adjoint against the floor and torchdiffeq's
    ``odeint_adjoint``, MLP and conv fields, dopri5 and rk4), 0 to skip it;
    ``solver_loop_train_steps``: its seeded training steps with each backend (0: none).

    ``out`` may replace an earlier ``bench`` output; any other existing file only with
    ``force``.
    """
    names = optimizers or list(config.optimizers)
    for n in names:
        config.optimizer(n, "--optimizers")
    opts = {n: config.optimizers[n] for n in names}
    baseline = next((n for n, c in opts.items() if adapter_for(c).reference), None)
    if baseline is None:  # the config's own Adam table, else a default Adam
        tables = config.optimizers.items()
        baseline = next((n for n, c in tables if adapter_for(c).reference), None)
        if baseline is not None:
            opts = {baseline: config.optimizers[baseline], **opts}
        else:
            baseline = "adam (baseline)"
            opts = {baseline: OptimizerConfig(kind="adam", lr=1e-3), **opts}
    k_max = max((cycle(c)[0] or 1 for c in opts.values()), default=1)
    steps = steps if steps is not None else max(2 * k_max + 1, 21)
    if steps < 2:
        raise ConfigError(f"--steps: received {steps}; accepted: an int >= 2")
    dev = resolve_device(device or config.train.device)
    if out is not None:
        _check_writable(Path(out), force)  # before minutes of timing, not after

    torch.manual_seed(config.train.seed)
    task = build_task(config, dev)
    base_state = copy.deepcopy(task.model.state_dict())
    gen = torch.Generator().manual_seed(config.train.seed)
    n = len(task.data.train)
    idx = torch.randperm(n, generator=gen)[: min(config.train.batch_size, n)]
    batch = task.data.train.batch(idx.to(dev))
    arms = {}
    for name, cfg in opts.items():
        t = _clone_task(task, base_state)
        arms[name] = {
            "task": t,
            "opt": build_adapter(
                decay_for_task(cfg, t), t.model, FROZEN_LR, seed=config.train.seed
            ),
            "times": {k: [] for k in STEP_TYPES},
            "measured_times": {k: [] for k in STEP_TYPES},
            "memory": {},
            "nfe": [],
        }
    for a in arms.values():
        a["meter"] = FirstStepMemory(dev, a["memory"]) if memory else None
    for i in range(steps):
        for name, a in arms.items():
            t, opt, meter = a["task"], a["opt"], a["meter"]
            step_type = opt.next_kind()
            measure = meter is not None and meter.before_step(step_type, i)
            try:
                r = train_step(
                    opt,
                    lambda t=t: t.training_terms(batch),
                    blocks=t.blocks,
                    likelihood=t.likelihood,
                    outputs_determine_loss=t.outputs_determine_loss,
                )
            except StepFailed as exc:
                raise RunError(
                    f"bench: {name}'s step {i} failed ({exc.reason}) at the initial model; "
                    "accepted: a config whose model trains (check [solver] and the data)"
                ) from None
            if measure:  # malloc_trim before it: its page faults are not a step's cost
                meter.after_step(opt.opt)
                a["measured_times"][step_type].append(r.seconds)
            else:
                a["times"][step_type].append(r.seconds)
            a["nfe"].append((r.nfe_forward, r.nfe_backward))
    rows = {}
    for name, a in arms.items():
        cfg = opts[name]
        if len(a["times"]["plain"]) > 2:  # the first plain step warms up
            a["times"]["plain"] = a["times"]["plain"][1:]
        for k, ts in a["measured_times"].items():  # a step type seen only once
            if ts and not a["times"][k]:
                a["times"][k] = ts
        cost = medians(a["times"])
        mem = a["meter"].summary() if a["meter"] is not None else {}
        k, adapt_every = cycle(cfg)
        rows[name] = {
            "kind": cfg.kind,
            "curvature": adapter_for(cfg).curvature(cfg),
            "update_every": k or 1,  # 1: every step is alike
            "adapt_every": adapt_every,
            "step_s": cost["plain"],
            "adapt_s": cost["adapt"],
            "refresh_s": cost["refresh+adapt"] or cost["refresh"],
            "amortized_s": amortized_for(cfg, cost),
            "kind_s": cost,
            "nfe_forward": statistics.mean(f for f, _ in a["nfe"]),
            "nfe_backward": statistics.mean(b for _, b in a["nfe"]),
            "step_memory_mb": mem.get("step_memory_mb"),
            "refresh_memory_mb": mem.get("refresh_memory_mb"),
            "train_memory_mb": mem.get("train_memory_mb"),
        }
    base = rows[baseline]
    for r in rows.values():
        r["step_ratio"] = ratio(r["step_s"], base["amortized_s"])
        r["adapt_ratio"] = ratio(r["adapt_s"], base["amortized_s"])
        r["refresh_ratio"] = ratio(r["refresh_s"], base["amortized_s"])
        r["amortized_ratio"] = ratio(r["amortized_s"], base["amortized_s"])
        r["memory_ratio"] = ratio(r.get("step_memory_mb"), base.get("step_memory_mb"))
        r["refresh_memory_ratio"] = ratio(r.get("refresh_memory_mb"), base.get("step_memory_mb"))
        r["nfe_ratio"] = ratio(
            r["nfe_forward"] + r["nfe_backward"], base["nfe_forward"] + base["nfe_backward"]
        )
    result = {
        "format": FORMAT,
        "source": config.source,
        "device": str(dev),
        "torch": torch.__version__,
        "batch": len(idx),
        "steps": steps,
        "baseline": baseline,
        "memory_method": StepMemory(dev).method if memory else None,
        "optimizers": rows,
    }
    if solver_loop:
        from ..ode.floor import solver_loop_table

        result["solver_loop"] = solver_loop_table(
            repeats=solver_loop, device=dev, train_steps=solver_loop_train_steps
        )
    print(format_bench(result))
    if out is not None:
        path = atomic_write_json(out, result)
        print(f"saved {path}")
    return result


def format_bench(result: dict) -> str:
    base = result["baseline"]
    lines = [
        f"{result['source']} on {result['device']}, batch {result['batch']}, "
        f"{result['steps']} interleaved steps per optimizer; ratios to {base} (plain adjoint)",
        f"{'optimizer':<16} {'step ms':>8} {'adapt ms':>8} {'refresh ms':>10} "
        f"{'amortized ms':>12} {'x base':>7} {'adapt x':>7} {'refresh x':>9} {'NFE f/b':>10} "
        f"{'NFE x':>6} {'step MB':>8} {'mem x':>6} {'refresh MB':>10} {'mem x':>6}",
    ]
    for name, r in result["optimizers"].items():
        lines.append(
            f"{name:<16} {_ms(r['step_s']):>8} {_ms(r.get('adapt_s')):>8} "
            f"{_ms(r['refresh_s']):>10} {_ms(r['amortized_s']):>12} "
            f"{_x(r['amortized_ratio']):>7} {_x(r.get('adapt_ratio')):>7} "
            f"{_x(r['refresh_ratio']):>9} "
            f"{r['nfe_forward']:>4.0f}/{r['nfe_backward']:<5.0f} {_x(r.get('nfe_ratio')):>6} "
            f"{_mb(r.get('step_memory_mb')):>8} {_x(r.get('memory_ratio')):>6} "
            f"{_mb(r.get('refresh_memory_mb')):>10} {_x(r.get('refresh_memory_ratio')):>6}"
        )
    if result.get("memory_method"):
        lines.append(
            f"memory: optimizer state + the step's transient peak ({result['memory_method']}); "
            f"ratios to {base}'s plain step"
        )
    if result.get("solver_loop"):
        from ..ode.floor import format_solver_loop

        lines += [
            "",
            "solver loop: a step's time per NFE against the floor (the field's evaluations "
            "and VJPs alone) and torchdiffeq's odeint_adjoint, interleaved",
            format_solver_loop(result["solver_loop"]),
        ]
    return "\n".join(lines)


def _check_writable(path: Path, force: bool = False) -> None:
    """Raise RunError unless the JSON file ``path`` can be written (its folder is probed):
    an existing file must be an earlier bench output, or ``force`` given."""
    if path.is_dir():
        raise RunError(f"--out: {str(path)!r} is a folder; accepted: a JSON file path")
    if path.exists() and not force and not _is_bench_output(path):
        raise RunError(
            f"--out: {str(path)!r} exists and is not a node-ocp bench output; accepted: a new "
            "path, an earlier bench output, or --force to replace it"
        )
    prepare_out_dir(path.parent)


def _is_bench_output(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _clone_task(task, state):
    t = copy.copy(task)
    t.model = copy.deepcopy(task.model)
    t.model.load_state_dict(state)
    return t


def _ms(v):
    return "-" if v is None else f"{1000 * v:.1f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}"


def _mb(v):
    return "-" if v is None else f"{v:.1f}"
