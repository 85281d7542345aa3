"""Training: typed configs, tasks, the one training loop, comparisons and reports."""

from .config import ConfigError, RunConfig, config_from_dict, load_config
from .loop import RunError, RunOptions, read_metrics, train
from .tasks import Task, build_task

__all__ = [
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
