"""Model kinds: each builds itself from ``[model]`` and ``[solver]`` for a task's data.

A kind says which task kinds it serves, what inputs it needs and what the training side
must know of it (series inputs, whether ``[horizon]`` can control it, whether its loss
reaches an ODE block at several times). A new kind — a latent ODE, say — is one subclass of
:class:`ModelKind` registered with :func:`register_model` (``MODELS``); ``[model].kind``
names it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..data import IrregularBatch, TaskData
from ..models import (
    CNF,
    ODERNN,
    DeepMLP,
    ImageCNF,
    LatentODE,
    NeuralCDE,
    ODEImageClassifier,
    SmallCNN,
)
from ..ode.block import ODEBlock
from ..ode.layers import ConcatSquashLinear, TimeSequential
from .config import ConfigError, RunConfig
from .registry import Registry
from .task_kinds import Task


class ModelKind:
    """How one ``[model].kind`` is built; subclasses set the class attributes and
    :meth:`build`."""

    #: the ``[model].kind`` that names this class
    name: ClassVar[str] = ""
    #: the task kinds (``[task].kind``) it serves
    tasks: ClassVar[tuple[str, ...]] = ()
    #: it reads irregular series: a user's CSV is a long CSV of series
    series_inputs: ClassVar[bool] = False
    #: ``[horizon]`` may control t1 of its (single) ODE block
    horizon_control: ClassVar[bool] = True
    #: its loss reaches the ODE block at several times (a recurrent update per observation)
    loss_at_several_times: ClassVar[bool] = False
    #: a discrete network without ODE blocks (``mlp``, ``cnn``: the feedback experiments')
    discrete: ClassVar[bool] = False

    @classmethod
    def build(cls, config: RunConfig, data: TaskData, task: type[Task]) -> nn.Module:
        """The model for ``data`` of the task kind ``task`` (a ConfigError line naming
        ``[model].kind`` when the data's inputs do not fit)."""
        raise NotImplementedError


MODELS: Registry[type[ModelKind]] = Registry("[model].kind")
register_model = MODELS.register


def solver_settings(config: RunConfig) -> dict:
    """``[solver]`` as the keyword arguments of every ODE block."""
    s = config.solver
    return {
        "method": s.method,
        "rtol": s.rtol,
        "atol": s.atol,
        "gradient": s.gradient,
        "backend": s.backend,
        "step_control": s.step_control,
    }


def configure_blocks(model: nn.Module, config: RunConfig) -> None:
    """The ``[solver]`` keys that are settings of the built blocks rather than arguments of
    the models (``compile_field``, ``cuda_graph``, ``adjoint_anchor``, ``adjoint_norm``), set
    on every :class:`ODEBlock` of ``model``."""
    anchor = config.solver.adjoint_anchor
    for m in model.modules():
        if isinstance(m, ODEBlock):
            m.compile_field = config.solver.compile_field
            m.cuda_graph = config.solver.cuda_graph
            m.adjoint_anchor = None if anchor == "off" else float(anchor)
            m.adjoint_norm = config.solver.adjoint_norm


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


@register_model
class CNFModel(ModelKind):
    """A continuous normalizing flow on vectors ``(N, D)``."""

    name = "cnf"
    tasks = ("density",)

    @classmethod
    def build(cls, config, data, task):
        m = config.model
        return CNF(
            data.train.x.shape[1],
            hidden=tuple(m.hidden),
            activation=m.activation,
            blocks=m.blocks,
            horizon=m.horizon,
            divergence=m.divergence,
            kinetic=m.kinetic,
            jacobian=m.jacobian,
            **solver_settings(config),
        )


def image_inputs(config, data, kind: str, also: str = "") -> torch.Tensor:
    """The training inputs ``(N, C, H, W)`` of an image model ``kind``; a ConfigError naming
    ``[model].kind`` when the data set's inputs are not images (``also``: more to say)."""
    x = data.train.x
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ConfigError(
            f"[model].kind: {kind!r} needs image inputs (N, C, H, W); "
            f"{config.task.dataset!r} has other inputs{also}"
        )
    return x


@register_model
class ImageCNFModel(ModelKind):
    """A continuous normalizing flow on images ``(N, C, H, W)`` (single-scale, or
    multiscale with ``[model].scales`` > 1), its conv field widths from ``hidden``."""

    name = "image_cnf"
    tasks = ("image_density",)

    @classmethod
    def build(cls, config, data, task):
        m, x = config.model, image_inputs(config, data, "image_cnf")
        c, h, w = x.shape[1:]
        step = 2 ** (m.scales - 1)
        if h % step or w % step:
            raise ConfigError(
                f"[model].scales: received {m.scales} for {h}x{w} images; accepted: at most "
                f"as many scales as 2x2 squeezes allow (H and W divisible by 2^(scales - 1))"
            )
        return ImageCNF(
            (c, h, w),
            levels=data.info["levels"],
            hidden=tuple(m.hidden),
            activation=m.activation,
            scales=m.scales,
            blocks=m.blocks,
            horizon=m.horizon,
            divergence=m.divergence,
            kinetic=m.kinetic,
            jacobian=m.jacobian,
            alpha=m.alpha,
            **solver_settings(config),
        )


@register_model
class ODEMLPModel(ModelKind):
    """An augmented Neural ODE classifier on vectors ``(N, D)``."""

    name = "ode_mlp"
    tasks = ("classification",)

    @classmethod
    def build(cls, config, data, task):
        m, x = config.model, data.train.x
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ConfigError(
                f"[model].kind: 'ode_mlp' needs vector inputs (N, D); {config.task.dataset!r} "
                "has other inputs; accepted for it: 'image', 'odernn' or 'cde'"
            )
        return AugmentedODEClassifier(
            x.shape[1],
            task.output_size(data),
            m.width,
            m.hidden,
            m.horizon,
            solver_settings(config),
        )


@register_model
class ImageModel(ModelKind):
    """A convolutional ODE classifier on images ``(N, C, H, W)``."""

    name = "image"
    tasks = ("classification",)

    @classmethod
    def build(cls, config, data, task):
        m, x = config.model, image_inputs(config, data, "image")
        return ODEImageClassifier(
            x.shape[1],
            channels=m.width,
            classes=task.output_size(data),
            horizon=m.horizon,
            **solver_settings(config),
        )


@register_model
class MLPModel(ModelKind):
    """A deep fully connected network (no ODE block) on vectors ``(N, D)`` or images
    ``(N, C, H, W)`` (flattened): ``len(hidden) + 1`` linear layers, each a feedback stage."""

    name = "mlp"
    tasks = ("classification",)
    horizon_control = False
    discrete = True

    @classmethod
    def build(cls, config, data, task):
        m, x = config.model, data.train.x
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ConfigError(
                f"[model].kind: 'mlp' needs vector (N, D) or image (N, C, H, W) inputs; "
                f"{config.task.dataset!r} has other inputs; accepted for it: 'odernn' or 'cde'"
            )
        return DeepMLP(
            int(x[0].numel()), task.output_size(data), hidden=m.hidden, activation=m.activation
        )


@register_model
class CNNModel(ModelKind):
    """A small CNN (no ODE block) on images ``(N, C, H, W)``: one 3x3 conv stage per entry of
    ``hidden`` (its channels), two 2x2 max-poolings, a linear head; each layer a feedback
    stage."""

    name = "cnn"
    tasks = ("classification",)
    horizon_control = False
    discrete = True

    @classmethod
    def build(cls, config, data, task):
        m, x = config.model, data.train.x
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or min(x.shape[2:]) < 4:
            raise ConfigError(
                f"[model].kind: 'cnn' needs image inputs (N, C, H, W) of at least 4x4; "
                f"{config.task.dataset!r} has other inputs; accepted for vectors: 'mlp', "
                "'ode_mlp'"
            )
        return SmallCNN(
            x.shape[1],
            tuple(x.shape[2:]),
            task.output_size(data),
            hidden=m.hidden,
            activation=m.activation,
        )


class SeriesModel(ModelKind):
    """A model of irregular series (:class:`IrregularBatch` inputs ``(B, T, C)``)."""

    tasks = ("classification", "forecast")
    series_inputs = True
    horizon_control = False

    @classmethod
    def build(cls, config, data, task):
        x = data.train.x
        if not isinstance(x, IrregularBatch):
            raise ConfigError(
                f"[model].kind: {config.model.kind!r} needs irregular series; "
                f"{config.task.dataset!r} is not a series data set"
            )
        channels = x.values.shape[-1]
        return cls.build_series(config, channels, task.output_size(data), task.name)

    @classmethod
    def build_series(cls, config, channels: int, outputs: int, task: str) -> nn.Module:
        """The model for ``channels`` input channels and ``outputs`` outputs (per series,
        or per query time for ``task = "forecast"``)."""
        raise NotImplementedError


@register_model
class ODERNNModel(SeriesModel):
    """An ODE-RNN: a GRU update at every observation, an ODE block between them."""

    name = "odernn"
    loss_at_several_times = True

    @classmethod
    def build_series(cls, config, channels, outputs, task):
        m = config.model
        return ODERNN(
            channels,
            outputs,
            hidden=m.width,
            field_hidden=tuple(m.hidden),
            task=task,
            **solver_settings(config),
        )


@register_model
class CDEModel(SeriesModel):
    """A Neural CDE driven by the interpolated series."""

    name = "cde"

    @classmethod
    def build_series(cls, config, channels, outputs, task):
        m = config.model
        if task == "forecast" and config.task.predict == "interpolate":
            raise ConfigError(
                "[task].predict: received 'interpolate' for [model].kind 'cde'; accepted: "
                "'extrapolate' (its decoder runs from a series' last observation on), or "
                "an 'odernn' or 'latent_ode' model to interpolate"
            )
        return NeuralCDE(
            channels,
            outputs,
            hidden=m.width,
            field_hidden=tuple(m.hidden),
            interpolation=m.interpolation,
            task=task,
            **solver_settings(config),
        )


@register_model
class LatentODEModel(SeriesModel):
    """A latent ODE (ODE-RNN recognition backward in time, latent ODE, MLP decoder) trained
    on the evidence lower bound; forecasts (extrapolation or interpolation) only."""

    name = "latent_ode"
    tasks = ("forecast",)

    @classmethod
    def build_series(cls, config, channels, outputs, task):
        m = config.model
        return LatentODE(
            channels,
            latent=m.latent,
            hidden=m.width,
            encoder_hidden=tuple(m.hidden),
            field_hidden=tuple(m.hidden),
            decoder_hidden=(m.width,),
            obs_std=m.obs_std,
            samples=m.samples,
            **solver_settings(config),
        )
