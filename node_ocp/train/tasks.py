"""From a :class:`RunConfig` to data, a model, a loss and an evaluation.

A :class:`Task` is what the one training loop needs to know about density estimation,
classification and forecasting: how to compute the training loss of a batch (and the
outputs/likelihood OCNOpt's sampled or exact factor sources need), and how to evaluate a
split. Metrics: ``nll`` (nats, lower is better) for densities, ``accuracy`` (higher is
better) for classification, ``mse`` (lower is better) for forecasts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import dist
from ..data import (
    PROCEDURAL,
    TABULAR,
    TOYS,
    IrregularBatch,
    Split,
    TaskData,
    bundled_uea_names,
    digits_images,
    file_classification,
    file_density,
    file_series_classification,
    file_series_forecast,
    procedural_forecast,
    tabular_density,
    toy_2d,
    two_spirals,
    uea_forecast,
    uea_series,
)
from ..models import CNF, ODERNN, NeuralCDE, ODEImageClassifier, standard_normal_logprob
from ..ode.block import ODEBlock, SolverError
from ..ode.layers import ConcatSquashLinear, TimeSequential
from .config import MODEL_KINDS, ConfigError, RunConfig

METRICS = {"density": "nll", "classification": "accuracy", "forecast": "mse"}
HIGHER_IS_BETTER = {"nll": False, "accuracy": True, "mse": False}
LIKELIHOOD = {"density": "standard_normal", "classification": "categorical", "forecast": "gaussian"}
DATA_SEED = 0  # the data set is the same for every run seed; seeds vary init and batches


class AugmentedODEClassifier(nn.Module):
    """Vectors ``(N, D)`` padded with ``augment`` zeros, an ODE block, a linear head."""

    def __init__(self, dim, classes, augment, hidden, horizon, solver):
        super().__init__()
        state = dim + augment
        self.augment = augment
        layers: list[nn.Module] = []
        widths = [state, *hidden]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [ConcatSquashLinear(a, b), nn.Tanh()]
        layers.append(ConcatSquashLinear(widths[-1], state))
        self.ode = ODEBlock(TimeSequential(*layers), (0.0, horizon), **solver, name="ODE block")
        self.head = nn.Linear(state, classes)

    def feedback_stages(self) -> list[nn.Module]:
        """The stages of OCNOpt's feedback policies: ODE block, head."""
        return [self.ode, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, x.new_zeros(x.shape[0], self.augment)], dim=1)
        return self.head(self.ode(x))


@dataclass
class Task:
    """Data, model and the task's loss/evaluation. ``metric`` is the headline metric."""

    config: RunConfig
    data: TaskData
    model: nn.Module
    kind: str
    metric: str
    likelihood: str
    train_model: nn.Module | None = None  # the model the loss runs through (DDP wrapper)

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.metric]

    @property
    def blocks(self) -> list[ODEBlock]:
        return [m for m in self.model.modules() if isinstance(m, ODEBlock)]

    def outputs_and_loss(self, batch: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs, loss)`` of a batch: outputs are what the likelihood is defined on."""
        model = self.model if self.train_model is None else self.train_model
        if self.kind == "density":
            z, dlogp, reg = model(batch.x)
            nll = -(standard_normal_logprob(z) - dlogp).mean()
            return z, nll + reg.mean()
        if self.kind == "classification":
            logits = model(batch.x)
            return logits, F.cross_entropy(logits, batch.y)
        preds = model(batch.x, batch.y.times)
        if dist.world_size() == 1:
            return preds, masked_mse(preds, batch.y)
        # the mean over the observed entries of the whole (global) batch, whatever their
        # split over processes: each process divides by the global count / processes
        count = dist.all_reduce_sum_floats([float(batch.y.mask.sum())], preds.device)[0]
        m = batch.y.mask.to(preds.dtype)
        share = max(count, 1.0) / dist.world_size()
        return preds, ((preds - batch.y.values) ** 2 * m).sum() / share

    @torch.no_grad()
    def evaluate(self, split: Split, chunk: int) -> dict[str, float]:
        """Metrics over a whole split, in chunks of ``chunk`` examples.

        Under torch.distributed every process evaluates every ``world``-th example and the
        sums are added over processes: all processes get the metrics of the whole split.
        A solve that fails (a model that blew up) makes the metrics NaN on every process.
        """
        device = next(self.model.parameters()).device
        # evaluation draws (Hutchinson probes, ...) leave the training's random stream alone,
        # so that when and how often a run evaluates does not change its training
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return self._evaluate(split, chunk, device)

    def _evaluate(self, split: Split, chunk: int, device) -> dict[str, float]:
        self.model.eval()
        mine = torch.arange(dist.rank(), len(split), dist.world_size())
        sums = [0.0, 0.0, 0.0]  # loss or squared-error total, count, correct
        failed = 0.0
        try:
            for start in range(0, len(mine), chunk):
                part = split.batch(mine[start : start + chunk].to(device))
                for i, v in enumerate(self._chunk_sums(part)):
                    sums[i] += v
        except SolverError:
            failed = 1.0
        finally:
            self.model.train()
        total, count, correct, failed = dist.all_reduce_sum_floats([*sums, failed], device)
        if failed:  # (the count may be 0: a failure in the first chunk)
            total = correct = math.nan
        count = max(count, 1.0)
        if self.kind == "density":
            return {"nll": total / count}
        if self.kind == "classification":
            return {"accuracy": correct / count, "loss": total / count}
        return {"mse": total / count}

    def _chunk_sums(self, part: Split) -> tuple[float, float, float]:
        if self.kind == "density":
            return float(-self.model.log_prob(part.x).sum()), len(part), 0.0
        if self.kind == "classification":
            logits = self.model(part.x)
            loss = float(F.cross_entropy(logits, part.y, reduction="sum"))
            return loss, len(part), float((logits.argmax(1) == part.y).sum())
        preds = self.model(part.x, part.y.times)
        m = part.y.mask
        return float(((preds - part.y.values) ** 2 * m).sum()), float(m.sum()), 0.0


def masked_mse(preds: torch.Tensor, target: IrregularBatch) -> torch.Tensor:
    """Mean squared error over observed entries: ``preds (B, Q, C)`` vs ``target.values``."""
    m = target.mask.to(preds.dtype)
    return ((preds - target.values) ** 2 * m).sum() / m.sum().clamp_min(1.0)


def dataset_names(kind: str) -> tuple[str, ...]:
    """The data set names a task kind accepts (UEA/UCR names only with sktime installed)."""
    try:
        uea = tuple(bundled_uea_names())
    except ImportError:
        uea = ()
    if kind == "density":
        return (*TOYS, *TABULAR, "file")
    if kind == "classification":
        return ("spirals", "digits", "file", *uea)
    return (*PROCEDURAL, "file", *uea)


def check_dataset(t) -> None:
    """Raise :class:`ConfigError` unless ``t.dataset`` (a TaskConfig) names a data set."""
    static = {
        "density": (*TOYS, *TABULAR, "file"),
        "classification": ("spirals", "digits", "file"),
    }
    static["forecast"] = (*PROCEDURAL, "file")
    names = static[t.kind] if t.dataset in static[t.kind] else dataset_names(t.kind)
    if t.dataset not in names:
        hint = ""
        if t.kind != "density" and not any(n[0].isupper() for n in names):
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
    if t.kind == "density":
        if t.dataset in TOYS:
            parts = [
                Split(toy_2d(t.dataset, n, seed=DATA_SEED * 3 + i))
                for i, n in enumerate((t.n_train, t.n_val, t.n_test))
            ]
            return TaskData(*parts, {"name": t.dataset, "dim": 2})
        return tabular_density(t.dataset, seed=DATA_SEED)
    if t.kind == "classification":
        if t.dataset == "spirals":
            parts = [
                Split(*two_spirals(n, t.noise, seed=DATA_SEED * 3 + i))
                for i, n in enumerate((t.n_train, t.n_val, t.n_test))
            ]
            return TaskData(*parts, {"name": "spirals", "dim": 2, "classes": 2})
        if t.dataset == "digits":
            return digits_images(seed=DATA_SEED)
        return uea_series(t.dataset, seed=DATA_SEED, drop=t.drop)
    if t.dataset in PROCEDURAL:
        return procedural_forecast(
            t.dataset,
            t.n_train,
            t.n_val,
            t.n_test,
            t.length,
            t.observe,
            t.drop,
            t.noise,
            seed=DATA_SEED,
        )
    return uea_forecast(t.dataset, observe=t.observe, drop=t.drop, seed=DATA_SEED)


def _file_data(config: RunConfig) -> TaskData:
    """``[task] dataset = "file"``: the user's file, read relative to the config's folder;
    its problems are one ConfigError line naming the key.

    ``format = "auto"``: a ``.ts`` file is read as series; so is a forecast's file, and a
    classification file for an ``odernn``/``cde`` model (a long CSV); any other file is a
    table or images."""
    from pathlib import Path

    t = config.task
    base = Path(config.source).parent if Path(config.source).is_file() else Path(".")

    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    fmt = t.format
    if fmt == "auto":
        if Path(t.path).suffix.lower() == ".ts":
            fmt = "ts"
        elif t.kind == "forecast" or config.model.kind in ("odernn", "cde"):
            fmt = "long"
    if t.columns and fmt != "long":
        raise ConfigError(
            f"[task].columns: received {t.columns!r} for a {fmt if fmt != 'auto' else 'table'} "
            "file; accepted: columns only for a long CSV of series (format = 'long', or an "
            "odernn/cde model or a forecast on a .csv)"
        )
    header = {"auto": "auto", "true": True, "false": False}[t.header]
    try:
        if fmt in ("long", "ts"):
            if t.kind == "forecast":
                return file_series_forecast(
                    resolve(t.path),
                    fmt,
                    observe=t.observe,
                    drop=t.drop,
                    seed=DATA_SEED,
                    columns=t.columns,
                )
            if t.kind == "classification":
                return file_series_classification(
                    resolve(t.path), fmt, drop=t.drop, seed=DATA_SEED, columns=t.columns
                )
            raise ConfigError(
                f"[task].format: received {fmt!r} for kind {t.kind!r}; accepted: series "
                "files for classification or forecast"
            )
        if t.kind == "density":
            return file_density(resolve(t.path), header=header, seed=DATA_SEED)
        labels = resolve(t.labels_path) if t.labels_path else None
        return file_classification(
            resolve(t.path),
            header,
            t.label_column,
            labels_path=labels,
            seed=DATA_SEED,
            format=fmt if fmt in ("table", "images") else "auto",
        )
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        key, _, rest = text.partition(": ")  # the file readers name their argument first
        if key not in ("path", "label_column", "columns") or not rest:
            key, rest = "path", text
        raise ConfigError(f"[task].{key}: {rest}") from None


def build_model(config: RunConfig, data: TaskData) -> nn.Module:
    """The model of ``config.model`` sized for ``data``."""
    m, s, kind = config.model, config.solver, config.task.kind
    if m.kind not in MODEL_KINDS:
        raise _unhandled(m.kind)
    solver = {"method": s.method, "rtol": s.rtol, "atol": s.atol, "gradient": s.gradient}
    x = data.train.x
    if m.kind == "cnf":
        return CNF(
            x.shape[1],
            hidden=tuple(m.hidden),
            activation=m.activation,
            blocks=m.blocks,
            horizon=m.horizon,
            divergence=m.divergence,
            kinetic=m.kinetic,
            jacobian=m.jacobian,
            **solver,
        )
    if m.kind == "ode_mlp":
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ConfigError(
                f"[model].kind: 'ode_mlp' needs vector inputs (N, D); {config.task.dataset!r} "
                "has other inputs; accepted for it: 'image', 'odernn' or 'cde'"
            )
        return AugmentedODEClassifier(
            x.shape[1], data.info["classes"], m.width, m.hidden, m.horizon, solver
        )
    if m.kind == "image":
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ConfigError(
                f"[model].kind: 'image' needs image inputs (N, C, H, W); "
                f"{config.task.dataset!r} has other inputs"
            )
        return ODEImageClassifier(
            x.shape[1],
            channels=m.width,
            classes=data.info["classes"],
            horizon=m.horizon,
            **solver,
        )
    if not isinstance(x, IrregularBatch):
        raise ConfigError(
            f"[model].kind: {m.kind!r} needs irregular series; {config.task.dataset!r} is not "
            "a series data set"
        )
    channels = x.values.shape[-1]
    outputs = data.info["classes"] if kind == "classification" else channels
    task = "classification" if kind == "classification" else "forecast"
    if m.kind == "odernn":
        return ODERNN(
            channels, outputs, hidden=m.width, field_hidden=tuple(m.hidden), task=task, **solver
        )
    if m.kind == "cde":
        return NeuralCDE(
            channels,
            outputs,
            hidden=m.width,
            field_hidden=tuple(m.hidden),
            interpolation=m.interpolation,
            task=task,
            **solver,
        )
    raise _unhandled(m.kind)


def _unhandled(kind: str) -> ConfigError:
    return ConfigError(
        f"[model].kind: received {kind!r}, which build_model does not handle; accepted: "
        f"{', '.join(MODEL_KINDS)}"
    )


def build_task(config: RunConfig, device: torch.device | str = "cpu") -> Task:
    """Data (moved to ``device``), a freshly initialised model and the task's metric.

    Seed the global generator first for a reproducible initialisation.
    """
    data = load_data(config)
    model = build_model(config, data).to(device)
    data = TaskData(*(_split_to(s, device) for s in (data.train, data.val, data.test)), data.info)
    task = Task(
        config,
        data,
        model,
        config.task.kind,
        METRICS[config.task.kind],
        LIKELIHOOD[config.task.kind],
    )
    _check_combination(config, task)
    return task


def _split_to(split: Split, device) -> Split:
    def move(v):
        return None if v is None else v.to(device)

    return Split(move(split.x), move(split.y))


def _check_combination(config: RunConfig, task: Task) -> None:
    blocks = task.blocks
    if config.horizon is not None:
        if config.model.kind in ("odernn", "cde") or len(blocks) != 1:
            raise ConfigError(
                f"[horizon]: a model of kind {config.model.kind!r} with {len(blocks)} ODE "
                "block(s); accepted: a model with one ODE block integrated over (0, t1) "
                "(cnf with blocks = 1, ode_mlp, image)"
            )
    several_losses = config.model.kind == "odernn" or config.task.kind == "forecast"
    for name, opt in config.optimizers.items():
        if opt.kind == "ocnopt" and opt.factors == "exact" and several_losses:
            raise ConfigError(
                f"[optimizers.{name}].factors: received {opt.factors!r} for a "
                f"{config.model.kind} {config.task.kind} model whose loss reaches the ODE "
                "block at several times; accepted: 'auto', 'empirical', 'sampled'"
            )
