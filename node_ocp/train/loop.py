"""The one training loop: density estimation, classification and forecasting.

A run directory holds::

    config.json       the resolved configuration and the run's choices (optimizer, lr, seed)
    metrics.jsonl     one JSON line per evaluation: step, seconds (training wall-clock,
                      evaluation excluded), train_loss (mean since the previous line), the
                      validation metric, nfe_forward / nfe_backward (per step), t1, lr
    checkpoint.pt     model, optimizer (OCNOpt state included), horizon controller, RNG
                      states, batch sampler, step and the best model so far; written
                      atomically
    best.pt           the model at the scheduled evaluation with the best validation metric
                      so far (lower NLL / MSE, higher accuracy), its step and value; written
                      atomically with each checkpoint (at the end: the final model instead
                      when its off-schedule last evaluation is better still)
    summary.json      final validation and test metrics, the best model's step and test
                      metrics, early stopping, step times, NFE, peak memory

``resume=True`` continues from ``checkpoint.pt`` exactly: the metrics log is cut back to the
checkpoint's step and the run goes on as if it had never stopped (only ``seconds`` differ);
the best-so-far value, step and model are part of the checkpoint, so ``best.pt`` is the
uninterrupted run's too.

Early stopping (``[train].patience`` or ``patience=``): the run ends after that many
scheduled evaluations without a strict improvement of the validation metric; evaluations
off the schedule (a time budget's stop, a last step between evaluations) count for neither
the best model nor the patience, so that a resumed run decides as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dist
from .._errors import bad_type, bad_value, first_line
from ..io import atomic_write_json, atomic_write_text
from ..ode.block import SolverError
from .adapters import OptimizerStepFailed, adapter_for, build_adapter
from .checkpoint import CHECKPOINT_SCHEMA, BestModel, Checkpoint, RunState, improves
from .config import ConfigError, RunConfig, config_from_dict, lr_label
from .costs import amortized_for, medians
from .errors import RunError
from .memory import FirstStepMemory
from .optimizers import build_horizon, build_schedule, decay_for_task, resolve_decay
from .step import StepFailed, StepResult, train_step
from .tasks import build_task

__all__ = [
    "CHECKPOINT_SCHEMA",
    "EXIT_DIVERGED",
    "RunError",
    "RunOptions",
    "read_metrics",
    "train",
]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"

#: OCNOpt options added after runs were saved, with the value those runs took: a resumed run
#: whose saved optimizer table lacks one keeps that value (``subspace_held``: bench §27).
ADDED_OPTIONS: dict = {"subspace_held": 0.0}


@dataclass
class RunOptions:
    """The choices of one run on top of its config (CLI flags)."""

    optimizer: str | None = None
    lr: float | None = None
    seed: int | None = None
    device: str | None = None
    max_steps: int | None = None
    max_time: float | None = None
    #: early stopping: an int >= 1, "none" (off), or None (the config's [train].patience)
    patience: int | str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


#: Exit status of ``node-ocp train`` when the run diverged (non-finite loss or metric, or a
#: solver failure): its folder holds the log and the last checkpoint up to the failure.
EXIT_DIVERGED = 3

RUN_FILES = (CONFIG, METRICS, CHECKPOINT, BEST, SUMMARY)


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


def _comparable(cfg: dict) -> dict:
    """The parts of a saved config that must match to resume (budgets may change).

    The config is read again by this version first: keys added since the run was written
    take their defaults (a run of an earlier version resumes when nothing it used changed).
    """
    c = json.loads(json.dumps(cfg))
    if isinstance(c.get("config"), dict):
        try:
            c["config"] = json.loads(json.dumps(config_from_dict(c["config"]).to_dict()))
        except ConfigError:
            pass  # compared as written: the first difference is named
    c.get("config", {}).get("train", {}).pop("steps", None)
    c.get("config", {}).get("train", {}).pop("max_seconds", None)
    c.get("config", {}).get("train", {}).pop("patience", None)
    c.pop("max_steps", None)
    c.pop("max_time", None)
    c.pop("patience", None)
    c.pop("device", None)
    c.pop("world_size", None)  # a run resumes on any number of processes
    c.pop("source", None)  # the config's content matters, not where the file is
    c.pop("decay", None)  # a resumed run keeps its own (_resumed_decay)
    c.pop("kept", None)  # and the options added since it was saved (_kept_options)
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


def train(config: RunConfig, out_dir, options: RunOptions | None = None) -> dict:
    """Train one model as ``config`` and ``options`` say; returns the run summary.

    Raises :class:`RunError` (or :class:`ConfigError`) before anything is trained when the
    run cannot start.
    """
    return _Run(config, out_dir, options or RunOptions()).run()


class _Run:
    """One run: its choices, task, optimizer, state and log (see :func:`train`)."""

    def __init__(self, config: RunConfig, out_dir, o: RunOptions):
        self.config, self.options = config, o
        # --resume continues with the optimizer, lr and seed of the checkpoint unless told
        checkpoint = Checkpoint.read(Path(out_dir) / CHECKPOINT) if o.resume else None
        if o.resume and checkpoint is None:  # before anything is created
            raise RunError(
                f"--resume: no checkpoint in {str(out_dir)!r} (expected {CHECKPOINT}); "
                "accepted: the --out folder of an earlier run of this config"
            )
        if not o.resume and not o.overwrite:
            found = [f for f in RUN_FILES if (Path(out_dir) / f).exists()]
            if found:
                raise RunError(
                    f"--out: {str(out_dir)!r} already holds a run ({', '.join(found)}); "
                    "accepted: a new folder, --resume to continue that run, or --overwrite "
                    "to replace it"
                )
        self._choose(checkpoint)
        device = resolve_device(o.device or config.train.device)
        local = dist.init_from_env(device.type)
        self.device = local if local is not None else device
        self.world, self.main = dist.world_size(), dist.rank() == 0
        if config.train.batch_size % self.world != 0:
            raise ConfigError(
                f"[train].batch_size: received {config.train.batch_size} for {self.world} "
                "processes; accepted: a multiple of the number of processes (each takes an "
                "equal share)"
            )
        self.run_info = {
            "config": config.to_dict(),
            "source": config.source,
            "optimizer": self.name,
            "optimizer_kind": self.opt_cfg.kind,
            "lr": self.lr,
            "seed": self.seed,
            "device": str(self.device),
            "world_size": self.world,
            "max_steps": self.steps,
            "max_time": self.max_time,
            "patience": self.patience,
        }
        if checkpoint is not None:
            differs = _first_difference(_comparable(checkpoint.run), _comparable(self.run_info))
            if differs is not None:
                key, was, now = differs
                raise RunError(
                    f"--resume: the checkpoint in {str(out_dir)!r} was written with {key} = "
                    f"{was!r}, this run has {now!r}; accepted: the same config and choices "
                    "(budgets may change)"
                )
        self._resumed_run = checkpoint.run if checkpoint is not None else None
        self._build()  # data, model and batch checks before the folder is created
        self.run_info["decay"] = _decay_info(self.opt_cfg)  # the rule made a number
        self.run_info["kept"] = self.kept
        self.out = self._prepare(out_dir)
        self.state = RunState()
        self.history: list[dict] = []
        # the model at state.best_step (a CPU copy) and whether best.pt still lacks it
        self.best_model: dict | None = None
        self.best_unsaved = False
        self.saved_step: int | None = None
        if checkpoint is not None:
            self._restore(checkpoint)
        elif self.main:
            stale_files = (METRICS, CHECKPOINT, BEST, SUMMARY)
            for stale in (self.out / f for f in stale_files):
                if stale.exists():
                    stale.unlink()
        if self.main:
            atomic_write_json(self.out / CONFIG, self.run_info)
        self.memory = FirstStepMemory(self.device, self.state.memory)
        self.resumed = checkpoint is not None

    # ------------------------------------------------------------------ set-up
    def _choose(self, checkpoint: Checkpoint | None) -> None:
        """Optimizer, lr, seed and budgets from the options, the checkpoint and the config."""
        config, o = self.config, self.options
        before = checkpoint.run if checkpoint is not None else {}
        self.name = o.optimizer or before.get("optimizer") or config.train.optimizer
        self.opt_cfg = opt_cfg = config.optimizer(self.name)
        if o.lr is not None:
            lr = float(o.lr)
        elif self.name == before.get("optimizer"):
            lr = before.get("lr", opt_cfg.learning_rate)
        else:
            lr = opt_cfg.learning_rate
        no_cap = adapter_for(opt_cfg).uncapped_lr(opt_cfg)
        if o.lr is not None and not (lr > 0 and (math.isfinite(lr) or no_cap)):
            accepted = "a float > 0 (inf: no cap)" if no_cap else "a finite float > 0"
            raise ConfigError(f"--lr: received {lr!r}; accepted: {accepted}")
        self.lr = lr
        self.seed = int(before.get("seed", config.train.seed)) if o.seed is None else int(o.seed)
        self.steps = config.train.steps if o.max_steps is None else int(o.max_steps)
        self.max_time = config.train.max_seconds if o.max_time is None else float(o.max_time)
        if self.steps < 1:
            raise ConfigError(f"--max-steps: received {self.steps}; accepted: an int >= 1")
        if self.max_time < 0:
            raise ConfigError(
                f"--max-time: received {self.max_time}; accepted: seconds >= 0 (0: none)"
            )
        self.patience = _patience(o.patience, config.train.patience)

    def _prepare(self, out_dir) -> Path:
        """The output folder, created and probed by process 0 (every process learns)."""
        out, problem = Path(out_dir), None
        if self.main:
            try:
                out = prepare_out_dir(out_dir)
            except RunError as exc:
                problem = exc
        if dist.all_reduce_sum_floats([float(problem is not None)], self.device)[0]:
            raise problem or RunError(f"--out: process 0 cannot write to {str(out_dir)!r}")
        return out

    def _build(self) -> None:
        """Task, optimizer, schedule, horizon controller and batch sampler."""
        config, seed, world, device = self.config, self.seed, self.world, self.device
        torch.manual_seed(seed)
        self.task = task = build_task(config, device)
        if world > 1:
            task.train_model = dist.wrap_ddp(task.model, device)
            # the same model everywhere; random draws (probes, sampled factors) per process
            torch.manual_seed(seed + 1000 * dist.rank())
        # a weight-decay rule ("prior", "auto": OCNOpt's default) made a number; a resumed
        # run keeps the decay it started with
        self.opt_cfg = _resumed_decay(self.opt_cfg, task, self._resumed_run)
        # options added since a resumed run was saved keep the value it ran with
        self.kept = _kept_options(self.opt_cfg, self._resumed_run)
        self.opt_cfg = dataclasses.replace(self.opt_cfg, **self.kept)
        # the optimizer behind its adapter: the one place its contract is chosen
        self.opt = build_adapter(self.opt_cfg, task.model, self.lr, seed=seed + 1000 * dist.rank())
        self.scheduler = build_schedule(self.opt_cfg, self.opt, config.train.steps)
        self.horizon = build_horizon(config.horizon, task.model)
        n = len(task.data.train)
        if config.train.batch_size > n:
            raise ConfigError(
                f"[train].batch_size: received {config.train.batch_size} for a training split "
                f"of {n} examples; accepted: an int <= {n}"
            )
        self.sampler = BatchSampler(n, config.train.batch_size, seed)
        if self.sampler.batch % world != 0:
            raise ConfigError(
                f"[train].batch_size: the training split has {n} examples, so batches hold "
                f"{self.sampler.batch}; accepted: a multiple of the {world} processes"
            )

    def _restore(self, ckpt: Checkpoint) -> None:
        self.task.model.load_state_dict(ckpt.model)
        self.opt.load_state_dict(ckpt.optimizer)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt.scheduler)
        if self.horizon is not None:
            self.horizon.load_state_dict(ckpt.horizon)
        self.sampler.load_state_dict(ckpt.sampler)
        self.state = ckpt.state
        if ckpt.best_model is None:  # written before best-model tracking: it starts here
            s = self.state
            s.best_step, s.best_value, s.evals_since_best = None, None, 0
        else:
            self.best_model = ckpt.best_model
        if self.main:
            self._check_best_file()
        _set_rng(ckpt.rng, self.device, self.opt)
        # cut back to the checkpoint; a last line off the evaluation schedule (written when
        # the run stopped there) goes too: an uninterrupted run has no line at that step
        every = self.config.train.eval_every
        step = self.state.step
        self.history = [
            r
            for r in read_metrics(self.out)
            if r["step"] < step or (r["step"] == step and r["step"] % every == 0)
        ]
        dist.barrier()  # every process has read the log before it is cut back
        if self.main:
            atomic_write_text(
                self.out / METRICS, "".join(json.dumps(r) + "\n" for r in self.history)
            )

    def _check_best_file(self) -> None:
        """After a restore: a ``best.pt`` that is not the checkpoint's best model (written
        after the checkpoint by the run that stopped) is rewritten from the checkpoint's
        copy at the next save, or removed when the checkpoint has none."""
        path = self.out / BEST
        if self.best_model is None:
            if path.exists():
                path.unlink()
            return
        try:
            step = torch.load(path, map_location="cpu", weights_only=False)["step"]
        except Exception:  # missing, torn or foreign: written again
            step = None
        self.best_unsaved = step != self.state.best_step

    # ------------------------------------------------------------------ log and save
    def _means(self) -> tuple[float, float, float]:
        """The state's sums since the last scheduled line, as means over processes."""
        s = self.state
        sums = dist.all_reduce_sum_floats([s.loss_sum, s.nfe_f, s.nfe_b], self.device)
        return tuple(v / self.world for v in sums)

    def log(self, step: int) -> dict:
        task, s = self.task, self.state
        metric = task.metric
        val = task.evaluate(task.data.val, self.config.train.eval_batch)
        loss_sum, nfe_f, nfe_b = self._means()
        n = max(s.loss_count, 1)
        counted = s.loss_count > 0
        record = {
            "step": step,
            "seconds": s.train_clock,
            "train_loss": loss_sum / n if counted else None,
            f"val_{metric}": val[metric],
            **{f"val_{k}": v for k, v in val.items() if k != metric},
            "nfe_forward": nfe_f / n if counted else None,
            "nfe_backward": nfe_b / n if counted else None,
            "t1": self.horizon.t1 if self.horizon is not None else None,
            "lr": self.opt.current_lr(),
            **self.opt.metrics(),
        }
        if step % self.config.train.eval_every == 0:
            # a line off the schedule (the run's last step, a time budget's stop) leaves the
            # sums running, so that a resumed run logs what an uninterrupted one does; nor
            # does it count for the best model or the patience (see _final_best)
            s.reset_sums()
            if s.consider(step, val[metric], task.higher_is_better):
                self.best_model = _cpu_copy(task.model.state_dict())
                self.best_unsaved = True
        if not math.isfinite(val[metric]):
            s.fail(f"validation {metric} is {val[metric]}")  # the same on every process
        self.history.append(record)
        if self.main:
            _append_metrics(self.out / METRICS, record)
        return record

    def save(self) -> None:
        rng = _gather_rng(self.device, self.opt)
        state = dataclasses.replace(self.state)
        if self.world > 1:  # the partial sums since the last log line, as means over processes
            state.loss_sum, state.nfe_f, state.nfe_b = self._means()
        if not self.main:
            return
        Checkpoint(
            run=self.run_info,
            model=self.task.model.state_dict(),
            optimizer=self.opt.state_dict(),
            sampler=self.sampler.state_dict(),
            state=state,
            rng=rng,
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            horizon=self.horizon.state_dict() if self.horizon is not None else None,
            best_model=self.best_model,
        ).write(self.out / CHECKPOINT)
        self.saved_step = state.step
        if self.best_unsaved and self.best_model is not None:
            self._write_best(state.best_step, state.best_value, self.best_model)
            self.best_unsaved = False

    def _write_best(self, step: int, value: float, model: dict) -> None:
        BestModel(
            run=self.run_info,
            model=model,
            step=step,
            metric=self.task.metric,
            value=value,
            higher_is_better=self.task.higher_is_better,
        ).write(self.out / BEST)

    def _final_best(self) -> tuple[int, float, dict] | None:
        """``(step, value, model)`` of the run's best model. The state's (scheduled
        evaluations), or the final model when the run's last evaluation is off the schedule
        and better still: then ``best.pt`` is rewritten with it (the checkpoint keeps the
        state's, from which a resumed run goes on as an uninterrupted one)."""
        s, metric = self.state, self.task.metric
        last = self.history[-1] if self.history else None
        if (
            last is not None
            and not s.diverged
            and last["step"] == s.step
            and s.step % self.config.train.eval_every != 0
            and improves(last[f"val_{metric}"], s.best_value, self.task.higher_is_better)
        ):
            model = _cpu_copy(self.task.model.state_dict())
            if self.main:
                self._write_best(s.step, last[f"val_{metric}"], model)
            return s.step, last[f"val_{metric}"], model
        if s.best_step is None or self.best_model is None:
            return None
        return s.best_step, s.best_value, self.best_model

    def _patience_spent(self) -> bool:
        return self.patience is not None and self.state.evals_since_best >= self.patience

    # ------------------------------------------------------------------ training
    def _agree(self, failure: str | None) -> str | None:
        """Every process stops when one failed (before the backward pass)."""
        if self.world > 1:
            failed = dist.all_reduce_sum_floats([float(failure is not None)], self.device)[0]
            if failed and failure is None:
                return "another process failed (non-finite loss or solver error)"
        return failure

    def _over_time(self) -> bool:
        over = bool(self.max_time) and self.state.train_clock >= self.max_time
        if self.max_time and self.world > 1:  # every process stops at the same step
            over = dist.all_reduce_sum_floats([float(over)], self.device)[0] > 0
        return over

    def _step(self) -> StepResult | None:
        """One training step; None when it failed: then it is skipped (no parameter moved;
        the state counts it and says why), and the state is diverged once
        ``[train].failures_in_a_row`` steps in a row have failed."""
        task, world, device = self.task, self.world, self.device
        idx = self.sampler.next()[dist.rank() :: world]  # this process's share of the batch
        batch = task.data.train.batch(idx.to(device) if device.type == "cuda" else idx)
        self.memory.before_step(self.opt.next_kind(), self.state.step)
        task.at_step(self.state.step)
        start = time.perf_counter()
        skipped_before = self.opt.skipped_steps()
        try:
            result = train_step(
                self.opt,
                lambda: task.training_terms(batch),
                blocks=task.blocks,
                likelihood=task.likelihood,
                outputs_determine_loss=task.outputs_determine_loss,
                scheduler=self.scheduler,
                horizon=self.horizon,
                agree=self._agree,
            )
        except OptimizerStepFailed as exc:
            if world > 1:
                raise RunError(
                    f"process {dist.rank()}: {exc.reason} inside the optimizer's step; the "
                    "data-parallel run stops (resume from the last checkpoint)"
                ) from exc
            self.state.fail(f"{exc.reason} (inside the optimizer's step, which cannot be skipped)")
            return None
        except (SolverError, FloatingPointError) as exc:
            if world > 1 and not isinstance(exc, StepFailed):
                # A failure inside the backward pass: the other processes are waiting in
                # DDP's gradient all-reduce, so this process cannot stop on its own terms.
                raise RunError(
                    f"process {dist.rank()}: {first_line(exc)} during the backward "
                    "pass; the data-parallel run stops (resume from the last checkpoint, "
                    "e.g. with a smaller learning rate or tighter solver tolerances)"
                ) from exc
            self.opt.skip_step()
            if self.horizon is not None:
                self.horizon.skip_step()
            self._skipped(first_line(exc), time.perf_counter() - start)
            return None
        if self.opt.skipped_steps() > skipped_before:  # OCNOpt's non-finite gradient
            self._skipped("non-finite gradient (the optimizer skipped its step)", result.seconds)
            return None
        self.memory.after_step(self.opt.opt)
        r = result
        self.state.add_step(r.loss, r.kind, r.seconds, r.nfe_forward, r.nfe_backward)
        return result

    def _skipped(self, reason: str, seconds: float) -> None:
        """Count a step that failed and was skipped; warn, or diverge when it is the
        ``[train].failures_in_a_row``-th in a row."""
        in_a_row = self.config.train.failures_in_a_row
        self.state.skip_failed(reason, seconds, in_a_row)
        if not self.state.diverged:
            warnings.warn(
                f"step {self.state.step + 1} failed and was skipped (no parameter moved; "
                f"{self.state.failed_in_a_row} of [train].failures_in_a_row = {in_a_row} in "
                f"a row): {reason}",
                RuntimeWarning,
                stacklevel=3,
            )

    def run(self) -> dict:
        s, train_cfg = self.state, self.config.train
        if s.step == 0 and not self.resumed:
            self.log(0)
        bar = _progress(
            self.options.progress and self.main,
            self.steps,
            s.step,
            f"{self.name} lr={lr_label(self.lr)} seed={self.seed}",
        )
        stopped_by_time = stopped_early = False
        while s.step < self.steps and not s.diverged:
            if self._patience_spent():  # the same on every process (the same metrics)
                stopped_early = True
                break
            if self._over_time():
                stopped_by_time = True
                break
            result = self._step()
            if result is None:
                continue  # skipped; the loop stops if the state is diverged
            if bar is not None:
                post = {"loss": f"{result.loss:.4g}"}
                post["nfe"] = f"{result.nfe_forward}/{result.nfe_backward}"
                if self.horizon is not None:
                    post["t1"] = f"{self.horizon.t1:.3g}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if s.step % train_cfg.eval_every == 0 or s.step == self.steps:
                self.log(s.step)
            if s.step % train_cfg.checkpoint_every == 0 or s.step == self.steps:
                self.save()
        if bar is not None:
            bar.close()
        if not s.diverged and (not self.history or self.history[-1]["step"] != s.step):
            self.log(s.step)
            self.save()
        elif s.diverged or (stopped_early and self.saved_step != s.step):
            self.save()  # a run stopped early between checkpoints is saved where it stopped
        summary = _finish(
            self.task,
            s,
            self.out,
            self.run_info,
            self.memory,
            stopped_by_time,
            self.opt_cfg,
            self.history,
            best_model=self._final_best(),
            stopped_early=stopped_early,
        )
        extra = self.opt.distributed_summary() if self.world > 1 else {}
        if extra:
            summary.update(extra)
            if self.main:
                atomic_write_json(self.out / SUMMARY, summary)
        dist.barrier()
        return summary


def _decay_info(cfg) -> dict:
    """The weight decay a run's optimizer got (its rule made a number)."""
    return {
        "weight_decay": cfg.decay,
        "decay_in_model": bool(getattr(cfg, "decay_in_model", False)),
    }


def _resumed_decay(cfg, task, resumed_run: dict | None):
    """``cfg`` with its weight-decay rule made a number for ``task``; a resumed run keeps
    the decay it started with (``resumed_run``: its saved run info). A checkpoint written
    before the decay was recorded ran with the rule of its time: an unset key meant none."""
    saved = None if resumed_run is None else resumed_run.get("decay")
    if resumed_run is not None and saved is None:
        return resolve_decay(cfg, len(task.data.train), nll_per_row=False)
    resolved = decay_for_task(cfg, task)
    if saved is None or _decay_info(resolved) == saved:
        return resolved
    return dataclasses.replace(
        cfg, weight_decay=saved["weight_decay"], decay_in_model=saved["decay_in_model"]
    )


def _kept_options(cfg, resumed_run: dict | None) -> dict:
    """The options of :data:`ADDED_OPTIONS` a resumed run keeps: those its saved run info
    records (``"kept"``), or, for a run saved before that record, those its saved optimizer
    table lacks, at the value it ran with. Empty for a new run and for optimizers other than
    OCNOpt."""
    if resumed_run is None or cfg.kind != "ocnopt":
        return {}
    kept = resumed_run.get("kept")
    if isinstance(kept, dict):
        return {k: v for k, v in kept.items() if k in ADDED_OPTIONS}
    tables = resumed_run.get("config", {}).get("optimizers", {})
    saved = tables.get(resumed_run.get("optimizer"), {})
    return {k: v for k, v in ADDED_OPTIONS.items() if k not in saved}


def _patience(option, configured: int | None) -> int | None:
    """The run's patience: ``option`` (``--patience``: an int >= 1, or "none": off) or else
    the config's ``[train].patience``."""
    if option is None:
        return configured
    if isinstance(option, str) and option.strip().lower() == "none":
        return None
    if isinstance(option, bool) or not isinstance(option, int):
        raise bad_type("--patience", option, "an int >= 1, or 'none' (no early stopping)")
    if option < 1:
        raise bad_value(
            "--patience",
            option,
            "an int >= 1 (evaluations without improvement before the run stops), or 'none' "
            "(no early stopping)",
        )
    return option


def _cpu_copy(state_dict: dict) -> dict:
    """A copy of ``state_dict`` on the CPU that later steps do not change."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def _gather_rng(device, opt=None) -> dict:
    """This process's RNG states (torch, CUDA, the optimizer's own draws: OCNOpt's), and
    under torch.distributed every process's (in order). ``opt``: an OptimizerAdapter."""
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if opt is not None:
        mine.update(opt.rng_states())
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
    if same and opt is not None:
        opt.set_rng_states(mine)


def _finish(
    task,
    state: RunState,
    out: Path,
    run_info: dict,
    memory: FirstStepMemory,
    by_time: bool,
    opt_cfg,
    records: list[dict],
    best_model: tuple[int, float, dict] | None = None,
    stopped_early: bool = False,
) -> dict:
    metric = task.metric
    key = f"val_{metric}"
    eval_batch = task.config.train.eval_batch
    if state.diverged:
        test = {metric: float("nan")}
    else:
        test = task.evaluate(task.data.test, eval_batch)
    best_test = None
    if best_model is not None and best_model[0] == state.step and not state.diverged:
        best_test = test  # the final model is the best one
    elif best_model is not None:  # the best model's test metrics; the final model is put back
        final = _cpu_copy(task.model.state_dict())
        task.model.load_state_dict(best_model[2])
        try:
            best_test = task.evaluate(task.data.test, eval_batch)  # a failed solve: NaN
        finally:
            task.model.load_state_dict(final)
    vals = [r[key] for r in records if r.get(key) is not None and math.isfinite(r[key])]
    best = (max if task.higher_is_better else min)(vals) if vals else None
    if best_model is not None:  # best.pt's value (the same unless tracking began later)
        best = best_model[1]
    cost = medians(state.step_times)
    every = [t for ts in state.step_times.values() for t in ts]
    nfe = [(r["nfe_forward"], r["nfe_backward"]) for r in records if r["nfe_forward"] is not None]
    summary = {
        **{k2: run_info[k2] for k2 in ("optimizer", "optimizer_kind", "lr", "seed", "device")},
        "task": task.kind,
        "dataset": task.config.task.dataset,
        "metric": metric,
        "higher_is_better": task.higher_is_better,
        "steps": state.step,
        "train_seconds": state.train_clock,
        "stopped_by_time": by_time,
        "diverged": state.diverged,
        "diverged_reason": state.diverged_reason,
        "failed_steps": state.failed_steps,  # skipped ([train].failures_in_a_row)
        "last_failure": state.failure,
        "final_val": records[-1][key] if records and not state.diverged else float("nan"),
        "best_val": best,
        "test": test,
        "test_metric": test[metric],
        "best_step": best_model[0] if best_model is not None else None,
        "best_test": best_test,
        "best_test_metric": best_test[metric] if best_test is not None else None,
        "patience": run_info.get("patience"),
        "weight_decay": opt_cfg.decay,  # a rule made a number (1/N or 0)
        "stopped_early": stopped_early,
        "early_stop_step": state.step if stopped_early else None,
        "step_time_s": cost["plain"],
        "adapt_time_s": cost["adapt"],
        "refresh_time_s": cost["refresh+adapt"] or cost["refresh"],
        "amortized_step_s": amortized_for(opt_cfg, cost),
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
