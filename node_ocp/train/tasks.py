"""From a :class:`RunConfig` to data, a model, a loss and an evaluation.

``[task].kind`` names a task kind (:mod:`.task_kinds`: density, image_density,
classification, forecast, each owning its metric, loss, likelihood and data) and
``[model].kind`` a model kind (:mod:`.model_kinds`: each builds itself from its config).
Both are looked up once, in :func:`build_task`; the loop then sees one :class:`Task`.
Metrics: ``nll`` (nats, lower is better) for densities, ``bpd`` (bits per dimension, lower
is better) for image densities, ``accuracy`` (higher is better) for classification, ``mse``
(lower is better) for forecasts.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ..data import Split, TaskData
from .adapters import adapter_for
from .config import ConfigError, RunConfig, TaskConfig
from .model_kinds import (
    MODELS,
    AugmentedODEClassifier,
    ModelKind,
    configure_blocks,
    register_model,
)
from .task_kinds import (
    DATA_SEED,
    SERIES_FORMATS,
    TASKS,
    Task,
    masked_mse,
    register_task,
)

__all__ = [
    "DATA_SEED",
    "MODELS",
    "TASKS",
    "AugmentedODEClassifier",
    "ModelKind",
    "Task",
    "build_model",
    "build_task",
    "check_dataset",
    "dataset_names",
    "load_data",
    "masked_mse",
    "register_model",
    "register_task",
]


def dataset_names(kind: str) -> tuple[str, ...]:
    """The data set names a task kind accepts (UEA/UCR names only with sktime installed)."""
    return TASKS[kind].dataset_names()


def check_dataset(t: TaskConfig) -> None:
    """Raise :class:`ConfigError` unless ``t.dataset`` (a TaskConfig) names a data set."""
    task = TASKS[t.kind]
    static = task.dataset_names(archives=False)
    names = static if t.dataset in static else task.dataset_names()
    if t.dataset not in names:
        hint = ""
        if task.uea_archives and not any(n[0].isupper() for n in names):
            hint = " (install the 'data' extra for the UEA/UCR archives bundled with sktime)"
        raise ConfigError(
            f"[task].dataset: received {t.dataset!r} for kind {t.kind!r}; accepted: "
            f"{', '.join(names)}{hint}"
        )


def load_data(config: RunConfig) -> TaskData:
    """The :class:`TaskData` of ``config.task`` (nothing is downloaded)."""
    t = config.task
    check_dataset(t)
    if t.dataset == "file":
        return _file_data(config)
    if t.dataset in TASKS[t.kind].folder_datasets:
        with _path_errors():
            return TASKS[t.kind].read_folder(t, _resolver(config)(t.path))
    return TASKS[t.kind].load(t)


def _resolver(config: RunConfig):
    """A function from a config's path to a Path: relative ones from the config's folder."""
    base = Path(config.source).parent if Path(config.source).is_file() else Path(".")

    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    return resolve


@contextlib.contextmanager
def _path_errors():
    """A reader's OSError or ValueError as one ConfigError line naming the ``[task]`` key
    (the readers name their argument first: ``path: ...``)."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        key, _, rest = text.partition(": ")
        if key not in ("path", "label_column", "columns", "levels") or not rest:
            key, rest = "path", text
        raise ConfigError(f"[task].{key}: {rest}") from None


def _file_data(config: RunConfig) -> TaskData:
    """``[task] dataset = "file"``: the user's file, read relative to the config's folder;
    its problems are one ConfigError line naming the key.

    ``format = "auto"``: a ``.ts`` file is read as series; so is a forecast's file, and a
    classification file for a model of series (``odernn``/``cde``: a long CSV); any other
    file is a table or images."""
    t = config.task
    task, model = TASKS[t.kind], MODELS[config.model.kind]
    resolve = _resolver(config)
    fmt = t.format
    if fmt == "auto":
        if Path(t.path).suffix.lower() == ".ts":
            fmt = "ts"
        elif task.series_files or model.series_inputs:
            fmt = "long"
    if t.columns and fmt != "long":
        raise ConfigError(
            f"[task].columns: received {t.columns!r} for a {fmt if fmt != 'auto' else 'table'} "
            "file; accepted: columns only for a long CSV of series (format = 'long', or an "
            "odernn/cde model or a forecast on a .csv)"
        )
    header = {"auto": "auto", "true": True, "false": False}[t.header]
    labels = resolve(t.labels_path) if t.labels_path and fmt not in SERIES_FORMATS else None
    with _path_errors():
        return task.read_file(t, resolve(t.path), fmt, header, labels)


def build_model(config: RunConfig, data: TaskData) -> nn.Module:
    """The model of ``config.model`` sized for ``data``, its blocks set as ``[solver]`` says."""
    model = MODELS[config.model.kind].build(config, data, TASKS[config.task.kind])
    configure_blocks(model, config)
    return model


def build_task(config: RunConfig, device: torch.device | str = "cpu") -> Task:
    """Data (moved to ``device``), a freshly initialised model and the task's metric.

    Seed the global generator first for a reproducible initialisation.
    """
    data = load_data(config)
    model = build_model(config, data).to(device)
    data = TaskData(*(_split_to(s, device) for s in (data.train, data.val, data.test)), data.info)
    task = TASKS[config.task.kind](config, data, model)
    _check_combination(config, task)
    return task


def _split_to(split: Split, device) -> Split:
    def move(v):
        return None if v is None else v.to(device)

    return Split(move(split.x), move(split.y))


def _check_combination(config: RunConfig, task: Task) -> None:
    model = MODELS[config.model.kind]
    blocks = task.blocks
    if config.horizon is not None:
        if not model.horizon_control or len(blocks) != 1:
            raise ConfigError(
                f"[horizon]: a model of kind {config.model.kind!r} with {len(blocks)} ODE "
                "block(s); accepted: a model with one ODE block integrated over (0, t1) "
                "(cnf with blocks = 1, ode_mlp, image)"
            )
    several_times = model.loss_at_several_times or task.loss_at_several_times
    for name, opt in config.optimizers.items():
        adapter_for(opt).check_task(name, opt, config, several_times)
