"""The run state and the checkpoint: one typed schema, written atomically, read with checks.

``checkpoint.pt`` is ``torch.save`` of :meth:`Checkpoint.to_dict`: plain dicts and tensors,
so that ``torch.load`` reads it without node-ocp. Its layout is versioned by
:data:`CHECKPOINT_SCHEMA`; a checkpoint of another version, a damaged file or a file that
is not a node-ocp checkpoint is refused with one :class:`RunError` line naming the file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write
from .costs import STEP_TYPES
from .errors import RunError

#: Version of the checkpoint layout (the fields of :class:`Checkpoint` and of
#: :class:`RunState`); a checkpoint of another version is refused.
CHECKPOINT_SCHEMA = 1


def improves(value, best: float | None, higher_is_better: bool) -> bool:
    """Whether the finite ``value`` is strictly better than ``best`` (None: nothing yet)."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if higher_is_better else value < best


@dataclass
class RunState:
    """Where a run stands: what a resumed run needs besides the model and optimizer.

    step: steps taken. train_clock: training seconds so far (evaluation excluded).
    loss_sum, loss_count, nfe_f, nfe_b: sums since the last scheduled metrics line (the
    mean training loss and NFE per step of the next line are made of them).
    step_times: seconds of every step, by step type (``plain``, ``adapt``, ``refresh``,
    ``refresh+adapt``). diverged, diverged_reason: whether and why the run stopped on a
    failure. memory: MB of the first measured step of each type.
    best_step, best_value: the scheduled evaluation with the best validation metric so far
    (None before the first); evals_since_best: scheduled evaluations since it (early
    stopping's count). failed_steps: steps that failed and were skipped (``[train]
    failures_in_a_row``); failed_in_a_row: those since the last step that did not fail;
    failure: the last failure's reason. Fields added after the first version have
    defaults, so that the states of earlier checkpoints still load.
    """

    step: int = 0
    train_clock: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    nfe_f: float = 0.0
    nfe_b: float = 0.0
    step_times: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in STEP_TYPES})
    diverged: bool = False
    diverged_reason: str | None = None
    memory: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    best_value: float | None = None
    evals_since_best: int = 0
    failed_steps: int = 0
    failed_in_a_row: int = 0
    failure: str | None = None

    def add_step(self, loss: float, kind: str, seconds: float, nfe_f: int, nfe_b: int) -> None:
        """Count one step."""
        self.step += 1
        self.train_clock += seconds
        self.step_times[kind].append(seconds)
        self.loss_sum += loss
        self.loss_count += 1
        self.nfe_f += nfe_f
        self.nfe_b += nfe_b
        self.failed_in_a_row = 0

    def skip_failed(self, reason: str, seconds: float, in_a_row: int) -> None:
        """Count a step that failed (``reason``, one line) after ``seconds`` of training
        time; the run is diverged once ``in_a_row`` steps in a row have failed."""
        self.train_clock += seconds
        self.failed_steps += 1
        self.failed_in_a_row += 1
        self.failure = reason
        if self.failed_in_a_row >= in_a_row:
            tail = f" ({self.failed_in_a_row} steps in a row failed)" if in_a_row > 1 else ""
            self.fail(reason + tail)

    def reset_sums(self) -> None:
        """Start the sums of the next metrics line."""
        self.loss_sum, self.loss_count, self.nfe_f, self.nfe_b = 0.0, 0, 0.0, 0.0

    def fail(self, reason: str) -> None:
        """Mark the run diverged (the first reason is kept)."""
        if not self.diverged:
            self.diverged, self.diverged_reason = True, reason

    def consider(self, step: int, value: float, higher_is_better: bool) -> bool:
        """Count a scheduled evaluation of the validation metric; True when ``value`` is
        strictly better than the best so far (it becomes the best)."""
        if improves(value, self.best_value, higher_is_better):
            self.best_step, self.best_value, self.evals_since_best = step, float(value), 0
            return True
        self.evals_since_best += 1
        return False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    #: fields every saved state has (the others came later and have defaults)
    REQUIRED = ("step", "train_clock", "step_times")

    @classmethod
    def from_dict(cls, d: dict, where: str = "state") -> RunState:
        """The state saved by :meth:`to_dict`: an unknown field, a missing one of
        :attr:`REQUIRED` or a value of the wrong kind is a ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r}; accepted: {sorted(names)}")
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{where}: no field {missing[0]!r}")
        if not isinstance(d["step"], int) or not isinstance(d["step_times"], dict):
            raise ValueError(
                f"{where}: step {d['step']!r} and step_times of type "
                f"{type(d['step_times']).__name__}; accepted: an int and a dict of lists"
            )
        state = cls(**d)
        for k in STEP_TYPES:
            state.step_times.setdefault(k, [])
        return state


@dataclass
class Checkpoint:
    """Everything a run resumes from.

    run: the run's ``config.json`` (config and choices). model, optimizer, scheduler,
    horizon, sampler: the ``state_dict()`` of each (None where the run has none).
    state: the :class:`RunState`. rng: the random states of every process.
    best_model: the model's ``state_dict()`` at ``state.best_step`` (what ``best.pt``
    holds), so that a resumed run's best model is the uninterrupted run's; None before the
    first evaluation and in checkpoints written before best-model tracking.
    """

    run: dict
    model: dict
    optimizer: dict
    sampler: dict
    state: RunState
    rng: dict
    scheduler: dict | None = None
    horizon: dict | None = None
    best_model: dict | None = None

    REQUIRED = ("run", "model", "optimizer", "sampler", "state", "rng")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["state"] = self.state.to_dict()
        out["schema"] = CHECKPOINT_SCHEMA
        return out

    def write(self, path) -> None:
        """``torch.save`` through a temporary file and an atomic rename; a failed write (a
        full disk) is one :class:`RunError` line and leaves the previous checkpoint as it
        was."""
        _save(
            self.to_dict(),
            path,
            "checkpoint",
            "the previous checkpoint is kept: free space and continue with --resume",
        )

    @classmethod
    def read(cls, path) -> Checkpoint | None:
        """The checkpoint at ``path`` (None when there is none), loaded onto the CPU
        (generator states must stay CPU tensors; ``load_state_dict`` moves the rest)."""
        path = Path(path)
        if not path.is_file():
            return None
        try:
            raw = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # truncated, empty, random bytes, text: torch raises many
            text = str(exc).strip()
            why = text.splitlines()[0][:120] if text else type(exc).__name__
            raise RunError(
                f"--resume: {str(path)!r} is not a readable checkpoint "
                f"({type(exc).__name__}: {why}); accepted: a checkpoint.pt written by "
                "node-ocp train (or --overwrite to start the run again)"
            ) from None
        missing = [k for k in cls.REQUIRED if not isinstance(raw, dict) or k not in raw]
        if missing:
            raise RunError(
                f"--resume: {str(path)!r} is not a node-ocp checkpoint (it lacks "
                f"{', '.join(missing)}); accepted: a checkpoint.pt written by node-ocp train"
            )
        schema = raw.get("schema", 1)  # checkpoints before the field were version 1
        if schema != CHECKPOINT_SCHEMA:
            raise RunError(
                f"--resume: {str(path)!r} has checkpoint schema {schema!r}; accepted: schema "
                f"{CHECKPOINT_SCHEMA} (written by this version of node-ocp)"
            )
        try:
            state = RunState.from_dict(dict(raw["state"]))
        except (TypeError, ValueError, AttributeError) as exc:
            raise RunError(
                f"--resume: {str(path)!r} has a damaged run state ({exc}); accepted: a "
                "checkpoint.pt written by node-ocp train"
            ) from None
        return cls(
            run=raw["run"],
            model=raw["model"],
            optimizer=raw["optimizer"],
            sampler=raw["sampler"],
            state=state,
            rng=raw["rng"],
            scheduler=raw.get("scheduler"),
            horizon=raw.get("horizon"),
            best_model=raw.get("best_model"),
        )


@dataclass
class BestModel:
    """``best.pt``: the model at the evaluation with the best validation metric.

    run: the run's ``config.json``. model: the model's ``state_dict()``. step: the step of
    that evaluation. metric, value: the validation metric's name and value there.
    higher_is_better: the metric's direction. Like ``checkpoint.pt``, ``torch.load`` reads
    it without node-ocp (``torch.load("best.pt")["model"]``).
    """

    run: dict
    model: dict
    step: int
    metric: str
    value: float
    higher_is_better: bool

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["schema"] = CHECKPOINT_SCHEMA
        return out

    def write(self, path) -> None:
        """``torch.save`` through a temporary file and an atomic rename; a failed write is
        one :class:`RunError` line and leaves the previous ``best.pt`` as it was."""
        _save(
            self.to_dict(),
            path,
            "best model",
            "the previous best.pt is kept and checkpoint.pt holds the best model too: free "
            "space and continue with --resume",
        )


def _save(data: dict, path, what: str, kept: str) -> None:
    """``torch.save`` through a temporary file and an atomic rename; an ``OSError`` is one
    :class:`RunError` line naming ``what`` and what was ``kept``."""
    try:
        atomic_write(Path(path), lambda f: torch.save(data, f), True)
    except OSError as exc:
        raise RunError(
            f"{what}: cannot write {str(path)!r} ({exc.strerror or exc}); {kept}"
        ) from None
