"""Training: typed configs, tasks, the one training loop, comparisons and reports.

Extension points: a task kind is a :class:`Task` subclass registered with
:func:`register_task`, a model kind a :class:`ModelKind` subclass registered with
:func:`register_model`, an optimizer with its own step contract an
:class:`OptimizerAdapter` subclass registered with :func:`register_adapter`.
"""

from .adapters import OptimizerAdapter, register_adapter
from .checkpoint import CHECKPOINT_SCHEMA, Checkpoint, RunState
from .config import ConfigError, RunConfig, config_from_dict, load_config
from .errors import RunError
from .loop import RunOptions, read_metrics, train
from .step import StepFailed, StepResult, train_step
from .tasks import ModelKind, Task, build_task, register_model, register_task

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
    "ModelKind",
    "OptimizerAdapter",
    "register_task",
    "register_model",
    "register_adapter",
    "build_task",
    "config_from_dict",
    "load_config",
    "read_metrics",
    "train",
]
