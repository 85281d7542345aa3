"""Training: typed configs, tasks, the one training loop, comparisons and reports."""

from .checkpoint import CHECKPOINT_SCHEMA, Checkpoint, RunState
from .config import ConfigError, RunConfig, config_from_dict, load_config
from .errors import RunError
from .loop import RunOptions, read_metrics, train
from .step import StepFailed, StepResult, train_step
from .tasks import Task, build_task

__all__ = [
    "CHECKPOINT_SCHEMA",
    "Checkpoint",
    "RunState",
    "StepFailed",
    "StepResult",
    "train_step",
    "ConfigError",
    "RunConfig",
    "RunError",
    "RunOptions",
    "Task",
    "build_task",
    "config_from_dict",
    "load_config",
    "read_metrics",
    "train",
]
