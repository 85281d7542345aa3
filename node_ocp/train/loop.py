"""The one training loop: density estimation, classification and forecasting.

A run directory holds::

    config.json       the resolved configuration and the run's choices (optimizer, lr, seed)
    metrics.jsonl     one JSON line per evaluation: step, seconds (training wall-clock,
                      evaluation excluded), train_loss (mean since the previous line), the
                      validation metric, nfe_forward / nfe_backward (per step), t1, lr
    checkpoint.pt     model, optimizer (OCNOpt state included), horizon controller, RNG
                      states, batch sampler and step; written atomically
    summary.json      final validation and test metrics, step times, NFE, peak memory

``resume=True`` continues from ``checkpoint.pt`` exactly: the metrics log is cut back to the
checkpoint's step and the run goes on as if it had never stopped (only ``seconds`` differ).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dist
from .._errors import first_line
from ..io import atomic_write, atomic_write_json, atomic_write_text
from ..ode.block import SolverError
from ..optim import OCNOpt
from .config import ConfigError, RunConfig
from .costs import KINDS, amortized, medians, step_kind
from .memory import StepMemory, process_peak_mb, state_mb
from .optimizers import (
    build_horizon,
    build_optimizer,
    build_schedule,
    current_lr,
    optimizer_metrics,
)
from .tasks import Task, build_task

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"


class _Diverged(FloatingPointError):
    """A training failure every process agreed on before the backward pass."""


class RunError(RuntimeError):
    """A run that cannot start (bad output folder, missing checkpoint, no GPU, ...)."""


@dataclass
class RunOptions:
    """The choices of one run on top of its config (CLI flags)."""

    optimizer: str | None = None
    lr: float | None = None
    seed: int | None = None
    device: str | None = None
    max_steps: int | None = None
    max_time: float | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


#: Exit status of ``node-ocp train`` when the run diverged (non-finite loss or metric, or a
#: solver failure): its folder holds the log and the last checkpoint up to the failure.
EXIT_DIVERGED = 3

RUN_FILES = (CONFIG, METRICS, CHECKPOINT, SUMMARY)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (an error without a GPU) or ``auto`` (CUDA when visible)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError(
            "--device: received 'cuda' but no CUDA GPU is visible to PyTorch "
            f"(torch {torch.__version__}); accepted here: 'cpu' or 'auto'"
        )
    if name not in ("cpu", "cuda"):
        raise RunError(f"--device: received {name!r}; accepted: 'cpu', 'cuda' or 'auto'")
    return torch.device(name)


def prepare_out_dir(path) -> Path:
    """Create ``path`` and check it is writable; a clear :class:`RunError` otherwise."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RunError(
            f"--out: cannot write to {str(path)!r} ({exc.strerror or exc}); accepted: a "
            "writable folder"
        ) from None
    return out


class BatchSampler:
    """Shuffled epochs of mini-batch indices from a seeded generator (state is saved)."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch = n, min(batch, n)
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.generator.set_state(s["generator"])
        self.perm, self.pos = s["perm"], int(s["pos"])


class _Memory:
    """Memory of the training steps (see :mod:`node_ocp.train.memory`).

    The first step of each kind (plain, refresh, ...) after the run's first step is
    measured: the optimizer's state plus the step's transient peak. The process's peak
    (CUDA allocator peak / peak resident memory) is reported beside it.
    """

    def __init__(self, device: torch.device, measured: dict):
        self.device = device
        self.meter = StepMemory(device)
        self.measured = measured  # kind -> MB, part of the run state (survives resume)
        self.active: str | None = None

    def before_step(self, kind: str, step: int) -> None:
        self.active = None
        if step > 0 and kind not in self.measured:
            self.active = kind
            self.meter.start()

    def after_step(self, opt) -> None:
        if self.active is not None:
            self.measured[self.active] = self.meter.stop() + state_mb(opt)

    def summary(self) -> dict:
        m = self.measured
        plain = m.get("plain")
        refresh = m.get("refresh+adapt", m.get("refresh"))
        steps = [v for v in m.values() if v is not None]
        return {
            "peak_memory_mb": process_peak_mb(self.device),
            "train_memory_mb": max(steps) if steps else None,
            "step_memory_mb": plain,
            "refresh_memory_mb": refresh,
            "memory_method": self.meter.method,
        }


#: Version of the checkpoint layout (``run``, ``model``, ``optimizer``, ``scheduler``,
#: ``horizon``, ``sampler``, ``state``, ``rng``); a checkpoint of another version is refused.
CHECKPOINT_SCHEMA = 1


def _save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` through a temporary file and an atomic rename; a failed write (a full
    disk) is one :class:`RunError` line and leaves the previous checkpoint as it was."""
    try:
        atomic_write(path, lambda f: torch.save({**state, "schema": CHECKPOINT_SCHEMA}, f), True)
    except OSError as exc:
        raise RunError(
            f"checkpoint: cannot write {str(path)!r} ({exc.strerror or exc}); the previous "
            "checkpoint is kept: free space and continue with --resume"
        ) from None


def read_metrics(run_dir) -> list[dict]:
    """The records of ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _nfe(task: Task) -> tuple[int, int]:
    f = sum(b.nfe_forward for b in task.blocks)
    b = sum(b.nfe_backward for b in task.blocks)
    for blk in task.blocks:
        blk.reset_nfe()
    return f, b


def _comparable(cfg: dict) -> dict:
    """The parts of a saved config that must match to resume (budgets may change)."""
    c = json.loads(json.dumps(cfg))
    c.get("config", {}).get("train", {}).pop("steps", None)
    c.get("config", {}).get("train", {}).pop("max_seconds", None)
    c.pop("max_steps", None)
    c.pop("max_time", None)
    c.pop("device", None)
    c.pop("world_size", None)  # a run resumes on any number of processes
    c.pop("source", None)  # the config's content matters, not where the file is
    return c


def _first_difference(a, b, where: str = ""):
    """``(key path, a's value, b's value)`` of the first place ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            sub = f"{where}.{k}" if where else str(k)
            if k not in a or k not in b:
                return sub, a.get(k, "<missing>"), b.get(k, "<missing>")
            d = _first_difference(a[k], b[k], sub)
            if d is not None:
                return d
        return None
    return None if a == b else (where, a, b)


def _read_checkpoint(path: Path) -> dict | None:
    """The checkpoint at ``path`` (None when there is none), loaded onto the CPU."""
    if not path.is_file():
        return None
    # on the CPU: generator states must stay CPU tensors; load_state_dict moves the rest
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, empty, random bytes, text: torch raises many kinds
        why = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise RunError(
            f"--resume: {str(path)!r} is not a readable checkpoint ({type(exc).__name__}: "
            f"{why}); accepted: a checkpoint.pt written by node-ocp train (or --overwrite to "
            "start the run again)"
        ) from None
    keys = ("run", "model", "optimizer", "sampler", "state", "rng")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys):
        raise RunError(
            f"--resume: {str(path)!r} is not a node-ocp checkpoint (it lacks "
            f"{', '.join(k for k in keys if not isinstance(ckpt, dict) or k not in ckpt)}); "
            "accepted: a checkpoint.pt written by node-ocp train"
        )
    schema = ckpt.get("schema", 1)  # checkpoints before the field were version 1
    if schema != CHECKPOINT_SCHEMA:
        raise RunError(
            f"--resume: {str(path)!r} has checkpoint schema {schema!r}; accepted: schema "
            f"{CHECKPOINT_SCHEMA} (written by this version of node-ocp)"
        )
    return ckpt


def train(config: RunConfig, out_dir, options: RunOptions | None = None) -> dict:
    """Train one model as ``config`` and ``options`` say; returns the run summary.

    Raises :class:`RunError` (or :class:`ConfigError`) before anything is trained when the
    run cannot start.
    """
    o = options or RunOptions()
    # --resume continues with the optimizer, lr and seed of the checkpoint unless told otherwise
    checkpoint = _read_checkpoint(Path(out_dir) / CHECKPOINT) if o.resume else None
    if o.resume and checkpoint is None:  # before anything is created
        raise RunError(
            f"--resume: no checkpoint in {str(out_dir)!r} (expected {CHECKPOINT}); accepted: "
            "the --out folder of an earlier run of this config"
        )
    if not o.resume and not o.overwrite:
        found = [f for f in RUN_FILES if (Path(out_dir) / f).exists()]
        if found:
            raise RunError(
                f"--out: {str(out_dir)!r} already holds a run ({', '.join(found)}); accepted: "
                "a new folder, --resume to continue that run, or --overwrite to replace it"
            )
    before = checkpoint["run"] if checkpoint is not None else {}
    name = o.optimizer or before.get("optimizer") or config.train.optimizer
    opt_cfg = config.optimizer(name)
    if o.lr is not None:
        lr = float(o.lr)
    elif name == before.get("optimizer"):
        lr = before.get("lr", opt_cfg.learning_rate)
    else:
        lr = opt_cfg.learning_rate
    no_cap = opt_cfg.kind == "ocnopt" and opt_cfg.step == "model"
    if o.lr is not None and not (lr > 0 and (math.isfinite(lr) or no_cap)):
        accepted = "a float > 0 (inf: no cap)" if no_cap else "a finite float > 0"
        raise ConfigError(f"--lr: received {lr!r}; accepted: {accepted}")
    seed = int(before.get("seed", config.train.seed)) if o.seed is None else int(o.seed)
    steps = config.train.steps if o.max_steps is None else int(o.max_steps)
    max_time = config.train.max_seconds if o.max_time is None else float(o.max_time)
    if steps < 1:
        raise ConfigError(f"--max-steps: received {steps}; accepted: an int >= 1")
    if max_time < 0:
        raise ConfigError(f"--max-time: received {max_time}; accepted: seconds >= 0 (0: none)")
    device = resolve_device(o.device or config.train.device)
    local = dist.init_from_env(device.type)
    device = local if local is not None else device
    world, main = dist.world_size(), dist.rank() == 0
    if config.train.batch_size % world != 0:
        raise ConfigError(
            f"[train].batch_size: received {config.train.batch_size} for {world} processes; "
            "accepted: a multiple of the number of processes (each takes an equal share)"
        )
    out = Path(out_dir)
    problem = None
    if main:
        try:
            out = prepare_out_dir(out_dir)
        except RunError as exc:
            problem = exc
    if dist.all_reduce_sum_floats([float(problem is not None)], device)[0]:
        raise problem or RunError(f"--out: process 0 cannot write to {str(out_dir)!r}")
    ckpt_path, metrics_path = out / CHECKPOINT, out / METRICS
    run_info = {
        "config": config.to_dict(),
        "source": config.source,
        "optimizer": name,
        "optimizer_kind": opt_cfg.kind,
        "lr": lr,
        "seed": seed,
        "device": str(device),
        "world_size": world,
        "max_steps": steps,
        "max_time": max_time,
    }
    if o.resume:
        differs = _first_difference(_comparable(checkpoint["run"]), _comparable(run_info))
        if differs is not None:
            key, was, now = differs
            raise RunError(
                f"--resume: the checkpoint in {str(out)!r} was written with {key} = {was!r}, "
                f"this run has {now!r}; accepted: the same config and choices (budgets may "
                "change)"
            )

    torch.manual_seed(seed)
    task = build_task(config, device)
    if world > 1:
        task.train_model = dist.wrap_ddp(task.model, device)
    if world > 1:  # same model everywhere; random draws (probes, sampled factors) per process
        torch.manual_seed(seed + 1000 * dist.rank())
    opt = build_optimizer(opt_cfg, task.model, lr, seed=seed + 1000 * dist.rank())
    scheduler = build_schedule(opt_cfg, opt, config.train.steps)
    horizon = build_horizon(config.horizon, task.model)
    if config.train.batch_size > len(task.data.train):
        raise ConfigError(
            f"[train].batch_size: received {config.train.batch_size} for a training split of "
            f"{len(task.data.train)} examples; accepted: an int <= {len(task.data.train)}"
        )
    sampler = BatchSampler(len(task.data.train), config.train.batch_size, seed)
    if sampler.batch % world != 0:
        raise ConfigError(
            f"[train].batch_size: the training split has {sampler.n} examples, so batches "
            f"hold {sampler.batch}; accepted: a multiple of the {world} processes"
        )
    state = {
        "step": 0,
        "train_clock": 0.0,
        "loss_sum": 0.0,
        "loss_count": 0,
        "nfe_f": 0,
        "nfe_b": 0,
        "step_times": {k: [] for k in KINDS},
        "diverged": False,
    }
    history: list[dict] = []
    if checkpoint is not None:
        task.model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        if horizon is not None:
            horizon.load_state_dict(checkpoint["horizon"])
        sampler.load_state_dict(checkpoint["sampler"])
        state = checkpoint["state"]
        _set_rng(checkpoint["rng"], device, opt)
        # cut back to the checkpoint; a last line off the evaluation schedule (written when
        # the run stopped there) goes too: an uninterrupted run has no line at that step
        history = [
            r
            for r in read_metrics(out)
            if r["step"] < state["step"]
            or (r["step"] == state["step"] and r["step"] % config.train.eval_every == 0)
        ]
        dist.barrier()  # every process has read the log before it is cut back
        if main:
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    elif main:
        if metrics_path.exists():
            metrics_path.unlink()
        for stale in (ckpt_path, out / SUMMARY):
            if stale.exists():
                stale.unlink()
    if main:
        atomic_write_json(out / CONFIG, run_info)

    metric = task.metric
    chunk = config.train.eval_batch
    memory = _Memory(device, state.setdefault("memory", {}))

    def t1() -> float | None:
        return horizon.t1 if horizon is not None else None

    def log(step: int) -> dict:
        val = task.evaluate(task.data.val, chunk)
        _nfe(task)  # evaluation's function evaluations are not the training's
        loss_sum, nfe_f, nfe_b = (
            v / world
            for v in dist.all_reduce_sum_floats(
                [state["loss_sum"], state["nfe_f"], state["nfe_b"]], device
            )
        )
        n = max(state["loss_count"], 1)
        record = {
            "step": step,
            "seconds": state["train_clock"],
            "train_loss": loss_sum / n if state["loss_count"] else None,
            f"val_{metric}": val[metric],
            **{f"val_{k}": v for k, v in val.items() if k != metric},
            "nfe_forward": nfe_f / n if state["loss_count"] else None,
            "nfe_backward": nfe_b / n if state["loss_count"] else None,
            "t1": t1(),
            "lr": current_lr(opt),
            **optimizer_metrics(opt),
        }
        if step % config.train.eval_every == 0:
            # a line off the schedule (the run's last step, a time budget's stop) leaves the
            # sums running, so that a resumed run logs what an uninterrupted one does
            state.update(loss_sum=0.0, loss_count=0, nfe_f=0, nfe_b=0)
        if not math.isfinite(val[metric]) and not state["diverged"]:
            state["diverged"] = True  # the same on every process: metrics are all-reduced
            state["diverged_reason"] = f"validation {metric} is {val[metric]}"
        history.append(record)
        if main:
            _append_metrics(metrics_path, record)
        return record

    def save() -> None:
        rng = _gather_rng(device, opt)
        saved = dict(state)
        if world > 1:  # the partial sums since the last log line, as means over processes
            sums = dist.all_reduce_sum_floats(
                [state["loss_sum"], state["nfe_f"], state["nfe_b"]], device
            )
            saved.update(zip(("loss_sum", "nfe_f", "nfe_b"), (v / world for v in sums)))
        if not main:
            return
        _save_checkpoint(
            ckpt_path,
            {
                "run": run_info,
                "model": task.model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "horizon": horizon.state_dict() if horizon is not None else None,
                "sampler": sampler.state_dict(),
                "state": saved,
                "rng": rng,
            },
        )

    if state["step"] == 0 and checkpoint is None:
        log(0)
    bar = _progress(o.progress and main, steps, state["step"], f"{name} lr={lr:g} seed={seed}")
    stopped_by_time = False
    while state["step"] < steps and not state["diverged"]:
        over = bool(max_time) and state["train_clock"] >= max_time
        if max_time and world > 1:  # every process stops at the same step
            over = dist.all_reduce_sum_floats([float(over)], device)[0] > 0
        if over:
            stopped_by_time = True
            break
        idx = sampler.next()[dist.rank() :: world]  # this process's share of the batch
        batch = task.data.train.batch(idx.to(device) if device.type == "cuda" else idx)
        kind = step_kind(
            isinstance(opt, OCNOpt) and opt.refresh_due, isinstance(opt, OCNOpt) and opt.adapt_due
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        memory.before_step(kind, state["step"])
        t0 = time.perf_counter()
        try:
            opt.zero_grad()
            failure = None
            rng = _draw_state(device)  # the trial of OCNOpt's step control draws the same
            try:
                outputs, loss = task.outputs_and_loss(batch)
                if not torch.isfinite(loss):
                    failure = f"non-finite training loss {float(loss.detach())}"
            except SolverError as exc:
                failure = first_line(exc)
            if world > 1:  # agree before the backward pass, which synchronises gradients
                failed = dist.all_reduce_sum_floats([float(failure is not None)], device)[0]
                if failed and failure is None:
                    failure = "another process failed (non-finite loss or solver error)"
            if failure is not None:
                raise _Diverged(failure)
            if isinstance(opt, OCNOpt):
                opt.backward(loss, outputs=outputs, likelihood=task.likelihood)
                opt.step(_same_batch_closure(task, batch, rng, device))
            else:
                loss.backward()
                opt.step()
            if scheduler is not None:
                scheduler.step()
            if horizon is not None:
                horizon.step()
        except (SolverError, FloatingPointError) as exc:
            if world > 1 and not isinstance(exc, _Diverged):
                # A failure inside the backward pass: the other processes are waiting in
                # DDP's gradient all-reduce, so this process cannot stop on its own terms.
                raise RunError(
                    f"process {dist.rank()}: {first_line(exc)} during the backward "
                    "pass; the data-parallel run stops (resume from the last checkpoint, "
                    "e.g. with a smaller learning rate or tighter solver tolerances)"
                ) from exc
            state["diverged"] = True
            state["diverged_reason"] = first_line(exc)
            break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        memory.after_step(opt)
        state["train_clock"] += dt
        state["step"] += 1
        state["step_times"][kind].append(dt)
        f, b = _nfe(task)
        state["loss_sum"] += float(loss.detach())
        state["loss_count"] += 1
        state["nfe_f"] += f
        state["nfe_b"] += b
        if bar is not None:
            post = {"loss": f"{float(loss.detach()):.4g}", "nfe": f"{f}/{b}"}
            if horizon is not None:
                post["t1"] = f"{horizon.t1:.3g}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        step = state["step"]
        if step % config.train.eval_every == 0 or step == steps:
            log(step)
        if step % config.train.checkpoint_every == 0 or step == steps:
            save()
    if bar is not None:
        bar.close()
    if not state["diverged"] and (not history or history[-1]["step"] != state["step"]):
        log(state["step"])
        save()
    elif state["diverged"]:
        save()
    summary = _finish(task, state, out, run_info, memory, stopped_by_time, opt_cfg, history)
    if isinstance(opt, OCNOpt) and world > 1:
        summary["refresh_allreduce"] = dict(opt.last_reduce)
        if main:
            atomic_write_json(out / SUMMARY, summary)
    dist.barrier()
    return summary


def _draw_state(device) -> dict:
    """The random state the next forward pass draws from (Hutchinson probes, ...)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _same_batch_closure(task: Task, batch, rng: dict, device):
    """OCNOpt's closure: the loss and outputs of ``batch`` at the current parameters, with
    the draws of the step's own forward pass and the training's random stream left alone."""

    def closure():
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], device)
            outputs, loss = task.outputs_and_loss(batch)
        return loss, outputs

    return closure


def _gather_rng(device, opt=None) -> dict:
    """This process's RNG states (torch, CUDA, OCNOpt's own draws), and under
    torch.distributed every process's (in order)."""
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if isinstance(opt, OCNOpt):
        mine["ocnopt"] = opt.generator.get_state()
    if not dist.is_distributed():
        return {**mine, "per_process": [mine]}
    import torch.distributed as tdist

    every: list = [None] * dist.world_size()
    tdist.all_gather_object(every, mine)
    return {**every[0], "per_process": every}


def _set_rng(rng: dict, device, opt=None) -> None:
    """Restore this process's RNG states. With another process count: process 0's torch
    states, and OCNOpt's draws as in its state_dict (also process 0's)."""
    per = rng.get("per_process") or [rng]
    same = len(per) == dist.world_size()
    mine = per[dist.rank()] if same else per[0]
    torch.set_rng_state(mine["torch"].cpu())
    if device.type == "cuda" and mine.get("cuda") is not None:
        torch.cuda.set_rng_state(mine["cuda"].cpu(), device)
    if same and isinstance(opt, OCNOpt) and mine.get("ocnopt") is not None:
        opt.generator.set_state(mine["ocnopt"].cpu())


def _finish(
    task, state, out: Path, run_info, memory: _Memory, by_time, opt_cfg, records: list[dict]
) -> dict:
    metric = task.metric
    key = f"val_{metric}"
    if state["diverged"]:
        test = {metric: float("nan")}
    else:
        test = task.evaluate(task.data.test, task.config.train.eval_batch)
        _nfe(task)
    vals = [r[key] for r in records if r.get(key) is not None and math.isfinite(r[key])]
    best = (max if task.higher_is_better else min)(vals) if vals else None
    cost = medians(state["step_times"])
    if opt_cfg.kind == "ocnopt":
        adapt_every = (
            opt_cfg.adapt_every if opt_cfg.step == "model" or opt_cfg.adapt_damping else None
        )
        amortized_s = amortized(cost, opt_cfg.update_every, adapt_every)
    else:
        amortized_s = amortized(cost)
    every = [t for ts in state["step_times"].values() for t in ts]
    nfe = [(r["nfe_forward"], r["nfe_backward"]) for r in records if r["nfe_forward"] is not None]
    summary = {
        **{k2: run_info[k2] for k2 in ("optimizer", "optimizer_kind", "lr", "seed", "device")},
        "task": task.kind,
        "dataset": task.config.task.dataset,
        "metric": metric,
        "higher_is_better": task.higher_is_better,
        "steps": state["step"],
        "train_seconds": state["train_clock"],
        "stopped_by_time": by_time,
        "diverged": state["diverged"],
        "diverged_reason": state.get("diverged_reason"),
        "final_val": records[-1][key] if records and not state["diverged"] else float("nan"),
        "best_val": best,
        "test": test,
        "test_metric": test[metric],
        "step_time_s": cost["plain"],
        "adapt_time_s": cost["adapt"],
        "refresh_time_s": cost["refresh+adapt"] or cost["refresh"],
        "amortized_step_s": amortized_s,
        "mean_step_s": statistics.mean(every) if every else None,
        "world_size": run_info["world_size"],
        "nfe_forward": statistics.mean(f for f, _ in nfe) if nfe else None,
        "nfe_backward": statistics.mean(b for _, b in nfe) if nfe else None,
        "t1": records[-1].get("t1") if records else None,
        **memory.summary(),
    }
    if dist.rank() == 0:
        atomic_write_json(out / SUMMARY, summary)
    return summary


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
