"""Task kinds: what the one training loop needs to know about density estimation (of
vectors and of images), classification and forecasting, one class each behind :class:`Task`.

A kind owns its headline metric (``nll`` nats, ``bpd`` bits per dimension, ``accuracy``,
``mse``) and whether higher is
better, the likelihood OCNOpt's factor sources read the outputs with, the training loss of
a batch, the sums an evaluation adds over chunks, and its data: the bundled data set names,
their loading and how a user's file is read. A new kind is one subclass registered with
:func:`register_task` (``TASKS``); ``[task].kind`` names it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .. import dist
from ..data import (
    PROCEDURAL,
    SUITE,
    TABULAR,
    TOYS,
    IrregularBatch,
    Split,
    TaskData,
    bundled_uea_names,
    digits_images,
    file_classification,
    file_density,
    file_image_density,
    file_series_classification,
    file_series_forecast,
    procedural_forecast,
    suite_density,
    tabular_density,
    toy_2d,
    two_spirals,
    uea_forecast,
    uea_series,
)
from ..models import bits_per_dim, standard_normal_logprob
from ..ode.block import ODEBlock, SolverError
from .config import ConfigError, RunConfig, TaskConfig
from .registry import Registry

DATA_SEED = 0  # the data set is the same for every run seed; seeds vary init and batches
#: the file formats that hold series (a long CSV, an sktime/UEA .ts file)
SERIES_FORMATS = ("long", "ts")
ALL_FORMATS = ("auto", "table", "images", *SERIES_FORMATS)

#: ``(total, count, correct, *extra)``: what one evaluation chunk adds (a loss or
#: squared-error total, the number of examples or observed entries, the correct
#: predictions, then any sums of the kind's own: added element-wise, passed on to
#: :meth:`Task.metrics`)
Sums = tuple[float, ...]


@dataclass
class Task:
    """Data, model and the kind's loss and evaluation (the loop's view of a task).

    Subclasses set the class attributes and implement :meth:`batch_loss`,
    :meth:`split_sums`, :meth:`metrics` and the data class methods.
    """

    config: RunConfig
    data: TaskData
    model: nn.Module
    train_model: nn.Module | None = None  # the model the loss runs through (DDP wrapper)

    #: the ``[task].kind`` that names this class
    name: ClassVar[str] = ""
    #: the headline metric (the key of :meth:`metrics` compared across runs)
    metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = False
    #: OCNOpt's likelihood of the outputs of :meth:`batch_loss`
    likelihood: ClassVar[str] = ""
    #: bundled data set names (without the UEA/UCR archives) and whether those serve too
    datasets: ClassVar[tuple[str, ...]] = ()
    uea_archives: ClassVar[bool] = False
    #: the ``[task].format`` values accepted with ``dataset = "file"``
    file_formats: ClassVar[tuple[str, ...]] = ("auto",)
    #: data sets read from the folder ``[task].path`` names (:meth:`read_folder`)
    folder_datasets: ClassVar[tuple[str, ...]] = ()
    #: a user's CSV is read as a long CSV of series whatever the model
    series_files: ClassVar[bool] = False
    #: the loss reaches an ODE block at several times (one loss term per query time)
    loss_at_several_times: ClassVar[bool] = False
    #: the training loss is a mean negative log-likelihood in nats per training row whose
    #: scale the data alone set (a density, a categorical likelihood), so that weight decay
    #: ``1/N`` is a unit Gaussian prior on the parameters (MAP) — OCNOpt's default
    #: ``weight_decay = "auto"`` applies it; not a squared error, whose scale is a chosen
    #: noise level (see :func:`~node_ocp.train.optimizers.resolve_decay`)
    nll_per_row: ClassVar[bool] = False

    @property
    def outputs_determine_loss(self) -> bool:
        """Whether the loss depends on the parameters through the outputs of
        :meth:`batch_loss` alone (see ``train_step``'s argument of that name)."""
        return True

    @property
    def kind(self) -> str:
        return self.name

    @property
    def blocks(self) -> list[ODEBlock]:
        return [m for m in self.model.modules() if isinstance(m, ODEBlock)]

    # ------------------------------------------------------------------ training
    def outputs_and_loss(self, batch: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs, loss)`` of a batch: outputs are what the likelihood is defined on."""
        return self.training_terms(batch)[:2]

    def training_terms(self, batch: Split) -> tuple:
        """``(outputs, loss, loss_inputs)`` of a batch, what a training step hands the
        optimizer: ``loss_inputs`` a tensor the loss is computed from alone where the
        outputs do not determine it (a latent ODE's bound), else None."""
        model = self.model if self.train_model is None else self.train_model
        return self.batch_terms(model, batch)

    def batch_terms(self, model: nn.Module, batch: Split) -> tuple:
        """``(outputs, scalar loss, loss_inputs or None)`` of ``batch`` through ``model``
        (tasks whose loss has no terms outside the outputs keep :meth:`batch_loss`)."""
        return (*self.batch_loss(model, batch), None)

    def batch_loss(self, model: nn.Module, batch: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs, scalar loss)`` of ``batch`` through ``model``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ evaluation
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
        sums = [0.0] * self.sums_size  # loss or squared-error total, count, correct, ...
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
        *sums, failed = dist.all_reduce_sum_floats([*sums, failed], device)
        total, count, correct, *extra = sums
        if failed:  # (the count may be 0: a failure in the first chunk)
            total = correct = math.nan
            extra = [math.nan] * len(extra)
        return self.metrics(total, max(count, 1.0), correct, *extra)

    @property
    def sums_size(self) -> int:
        """How many :data:`Sums` an evaluation chunk of this task adds (3, or more for a
        kind with sums of its own)."""
        return 3

    def at_step(self, step: int) -> None:
        """Called by the loop before training step ``step + 1`` (schedules of the loss)."""

    def _chunk_sums(self, part: Split) -> Sums:
        return self.split_sums(part)

    def split_sums(self, part: Split) -> Sums:
        """The :data:`Sums` of one evaluation chunk (``self.model`` in eval mode)."""
        raise NotImplementedError

    def metrics(self, total: float, count: float, correct: float) -> dict[str, float]:
        """The split's metrics from its summed :data:`Sums` (``count`` >= 1)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ data
    @classmethod
    def dataset_names(cls, archives: bool = True) -> tuple[str, ...]:
        """The data set names this kind accepts (UEA/UCR names with sktime installed and
        ``archives``)."""
        if not (archives and cls.uea_archives):
            return cls.datasets
        try:
            uea = tuple(bundled_uea_names())
        except ImportError:
            uea = ()
        return (*cls.datasets, *uea)

    @classmethod
    def plots_density(cls, dataset: str) -> bool:
        """Whether a report draws the learned density of runs on ``dataset`` (2-D data)."""
        return False

    @classmethod
    def output_size(cls, data: TaskData) -> int:
        """The width of a model's output for ``data`` (classes, channels, dimensions)."""
        raise NotImplementedError

    @classmethod
    def load(cls, t: TaskConfig) -> TaskData:
        """The bundled data set ``t.dataset`` (checked to be one of :meth:`dataset_names`)."""
        raise NotImplementedError

    @classmethod
    def read_file(cls, t: TaskConfig, path, fmt: str, header, labels_path) -> TaskData:
        """The user's file ``path`` read as ``fmt`` (``auto`` resolved for series)."""
        raise NotImplementedError

    @classmethod
    def read_folder(cls, t: TaskConfig, path) -> TaskData:
        """The set ``t.dataset`` (one of :attr:`folder_datasets`) from the folder ``path``
        (``[task].path``, resolved from the config's folder)."""
        raise NotImplementedError


def _bad_series_format(t: TaskConfig, fmt: str) -> ConfigError:
    return ConfigError(
        f"[task].format: received {fmt!r} for kind {t.kind!r}; accepted: series "
        "files for classification or forecast"
    )


def masked_mse(preds: torch.Tensor, target: IrregularBatch) -> torch.Tensor:
    """Mean squared error over observed entries: ``preds (B, Q, C)`` vs ``target.values``."""
    m = target.mask.to(preds.dtype)
    return ((preds - target.values) ** 2 * m).sum() / m.sum().clamp_min(1.0)


def _procedural_splits(t: TaskConfig, make) -> list[Split]:
    """Train, validation and test splits of sizes ``n_train, n_val, n_test`` from
    ``make(n, seed)`` (the seeds ``DATA_SEED * 3 + i``)."""
    sizes = (t.n_train, t.n_val, t.n_test)
    return [Split(*make(n, DATA_SEED * 3 + i)) for i, n in enumerate(sizes)]


TASKS: Registry[type[Task]] = Registry("[task].kind")
register_task = TASKS.register


@register_task
class DensityTask(Task):
    """Density estimation: a flow's ``(z (N, D), Δlog p (N,), regulariser (N,))``; the
    loss is the mean negative log-likelihood (nats) plus the regulariser."""

    name = "density"
    metric = "nll"
    likelihood = "standard_normal"
    nll_per_row = True
    datasets = (*TOYS, *TABULAR, *SUITE, "file")
    file_formats = ("auto", "table")
    folder_datasets = SUITE

    def batch_loss(self, model, batch):
        z, dlogp, reg = model(batch.x)
        nll = -(standard_normal_logprob(z) - dlogp).mean()
        return z, nll + reg.mean()

    def split_sums(self, part):
        return float(-self.model.log_prob(part.x).sum()), len(part), 0.0

    def metrics(self, total, count, correct):
        return {"nll": total / count}

    @classmethod
    def plots_density(cls, dataset):
        return dataset in TOYS

    @classmethod
    def output_size(cls, data):
        return data.train.x.shape[1]

    @classmethod
    def load(cls, t):
        if t.dataset in TOYS:
            parts = _procedural_splits(t, lambda n, s: (toy_2d(t.dataset, n, seed=s),))
            return TaskData(*parts, {"name": t.dataset, "dim": 2})
        return tabular_density(t.dataset, seed=DATA_SEED)

    @classmethod
    def read_file(cls, t, path, fmt, header, labels_path):
        if fmt in SERIES_FORMATS:
            raise _bad_series_format(t, fmt)
        return file_density(path, header=header, seed=DATA_SEED)

    @classmethod
    def read_folder(cls, t, path):
        return suite_density(t.dataset, path)


@register_task
class ImageDensityTask(DensityTask):
    """Density estimation of images ``(N, C, H, W)`` with ``L`` grey levels (values
    ``k / (L − 1)``): an image flow's ``(z, Δlog p, regulariser)`` as for
    :class:`DensityTask` — the training loss is the mean NLL in nats per image plus the
    regulariser —, and the headline metric is bits per dimension, ``bpd = NLL / (D ln 2)``,
    of the uniformly dequantised data in level units (see
    :mod:`node_ocp.models.image_cnf`); ``nll`` (nats per image) is logged beside it."""

    name = "image_density"
    metric = "bpd"
    datasets = ("digits", "file")
    folder_datasets = ()
    file_formats = ("auto", "images")

    def metrics(self, total, count, correct):
        nll = total / count
        dims = math.prod(self.data.info["shape"])
        return {"bpd": float(bits_per_dim(nll, dims)), "nll": nll}

    @classmethod
    def plots_density(cls, dataset):
        return False

    @classmethod
    def output_size(cls, data):
        return math.prod(data.info["shape"])

    @classmethod
    def load(cls, t):
        data = digits_images(seed=DATA_SEED)  # grey levels 0..16 as k / 16
        if t.levels not in (0, data.info["levels"]):
            raise ConfigError(
                f"[task].levels: received {t.levels} for dataset {t.dataset!r}; accepted: 0 "
                f"or {data.info['levels']} (its pixels are counts 0..16)"
            )
        return TaskData(*(Split(s.x) for s in (data.train, data.val, data.test)), data.info)

    @classmethod
    def read_file(cls, t, path, fmt, header, labels_path):
        if fmt in SERIES_FORMATS:
            raise _bad_series_format(t, fmt)
        return file_image_density(path, levels=t.levels, seed=DATA_SEED)


@register_task
class ClassificationTask(Task):
    """Classification: logits ``(N, classes)``, cross-entropy loss, accuracy."""

    name = "classification"
    metric = "accuracy"
    nll_per_row = True
    higher_is_better = True
    likelihood = "categorical"
    datasets = ("spirals", "digits", "file")
    uea_archives = True
    file_formats = ALL_FORMATS

    def batch_loss(self, model, batch):
        logits = model(batch.x)
        return logits, F.cross_entropy(logits, batch.y)

    def split_sums(self, part):
        logits = self.model(part.x)
        loss = float(F.cross_entropy(logits, part.y, reduction="sum"))
        return loss, len(part), float((logits.argmax(1) == part.y).sum())

    def metrics(self, total, count, correct):
        return {"accuracy": correct / count, "loss": total / count}

    @classmethod
    def output_size(cls, data):
        return data.info["classes"]

    @classmethod
    def load(cls, t):
        if t.dataset == "spirals":
            parts = _procedural_splits(t, lambda n, s: two_spirals(n, t.noise, seed=s))
            return TaskData(*parts, {"name": "spirals", "dim": 2, "classes": 2})
        if t.dataset == "digits":
            return digits_images(seed=DATA_SEED)
        return uea_series(t.dataset, seed=DATA_SEED, drop=t.drop)

    @classmethod
    def read_file(cls, t, path, fmt, header, labels_path):
        if fmt in SERIES_FORMATS:
            return file_series_classification(
                path, fmt, drop=t.drop, seed=DATA_SEED, columns=t.columns
            )
        return file_classification(
            path,
            header,
            t.label_column,
            labels_path=labels_path,
            seed=DATA_SEED,
            format=fmt if fmt in ("table", "images") else "auto",
        )


@register_task
class ForecastTask(Task):
    """Forecasting irregular series: predictions ``(B, Q, C)`` at the query times, the
    mean squared error over the observed entries (``[task].predict``: the future after the
    observed span, or held-out points inside it).

    A model that owns its objective (``owns_objective = True``, the latent ODE) is called
    as ``model(x, y.times, targets=y)`` in training and returns ``(outputs, −bound summed
    over series, observed values)``; the loss is the negative bound per observed value, and
    evaluation adds the metric ``elbo`` (the bound per observed value, KL weight 1).
    """

    name = "forecast"
    metric = "mse"
    likelihood = "gaussian"
    datasets = (*PROCEDURAL, "file")
    uea_archives = True
    file_formats = ("auto", *SERIES_FORMATS)
    series_files = True
    loss_at_several_times = True

    @property
    def owns_objective(self) -> bool:
        """Whether the model computes its own training objective (a bound)."""
        return bool(getattr(self.model, "owns_objective", False))

    @property
    def outputs_determine_loss(self) -> bool:
        return not self.owns_objective  # a bound's KL term is not a function of the outputs

    @property
    def sums_size(self) -> int:
        return 5 if self.owns_objective else 3

    def at_step(self, step: int) -> None:
        """KL annealing of a model with a bound: weight ``min(1, step / kl_anneal)``."""
        if self.owns_objective:
            n = self.config.model.kl_anneal
            self.model.kl_weight = 1.0 if n <= 0 else min(1.0, step / n)

    def batch_loss(self, model, batch):
        return self.batch_terms(model, batch)[:2]

    def batch_terms(self, model, batch):
        loss_inputs = None
        if self.owns_objective:
            terms = model(batch.x, batch.y.times, targets=batch.y)
            outputs, total, count = terms.outputs, terms.neg_elbo, terms.count
            loss_inputs = terms.loss_inputs
        else:
            outputs = model(batch.x, batch.y.times)
            m = batch.y.mask.to(outputs.dtype)
            total, count = ((outputs - batch.y.values) ** 2 * m).sum(), m.sum()
        if dist.world_size() == 1:
            return outputs, total / count.clamp_min(1.0), loss_inputs
        # the mean over the observed entries of the whole (global) batch, whatever their
        # split over processes: each process divides by the global count / processes
        count = dist.all_reduce_sum_floats([float(count)], outputs.device)[0]
        share = max(count, 1.0) / dist.world_size()
        return outputs, total / share, loss_inputs

    def split_sums(self, part):
        preds = self.model(part.x, part.y.times)
        m = part.y.mask
        sums = (float(((preds - part.y.values) ** 2 * m).sum()), float(m.sum()), 0.0)
        if not self.owns_objective:
            return sums
        terms = self.model(part.x, part.y.times, targets=part.y, kl_weight=1.0)
        neg_bound, count = terms.neg_elbo, terms.count
        return (*sums, float(neg_bound), float(count))

    def metrics(self, total, count, correct, neg_bound=None, bound_count=None):
        out = {"mse": total / count}
        if bound_count:
            out["elbo"] = -neg_bound / bound_count
        return out

    @classmethod
    def output_size(cls, data):
        return data.train.x.values.shape[-1]  # the observed channels, predicted ahead

    @classmethod
    def load(cls, t):
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
                predict=t.predict,
            )
        return uea_forecast(
            t.dataset, observe=t.observe, drop=t.drop, seed=DATA_SEED, predict=t.predict
        )

    @classmethod
    def read_file(cls, t, path, fmt, header, labels_path):
        if fmt not in SERIES_FORMATS:
            raise ConfigError(
                f"[task].format: received {fmt!r} for kind {t.kind!r}; accepted: "
                f"{', '.join(map(repr, cls.file_formats))}"
            )
        return file_series_forecast(
            path,
            fmt,
            observe=t.observe,
            drop=t.drop,
            seed=DATA_SEED,
            columns=t.columns,
            predict=t.predict,
        )
