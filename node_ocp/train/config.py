"""Typed, validated run configuration loaded from a TOML file.

A config file has these tables (``configs/*.toml`` has one per bundled task)::

    [task]        what to learn from which data          -> TaskConfig
    [model]       the model built for the task            -> ModelConfig
    [solver]      ODE solver settings of every block      -> SolverConfig
    [train]       budget, batching, evaluation, seed      -> TrainConfig
    [horizon]     optional: make t1 a control             -> HorizonConfig
    [optimizers.NAME]  one table per optimizer            -> OptimizerConfig

Unknown tables or keys and values of the wrong type or out of range raise
:class:`ConfigError`, whose message names the key (``[train].steps``), shows the value and
lists what is accepted.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

OPTIMIZER_KINDS = ("adam", "sgd", "ocnopt")
DEVICES = ("cpu", "cuda", "auto")


class ConfigError(ValueError):
    """A config file that cannot be read or holds a bad key or value."""


@dataclass
class TaskConfig:
    """``[task]``: what is learned from which data.

    kind: ``density`` | ``image_density`` | ``classification`` | ``forecast``.
    dataset: density: a 2-D toy (moons, circles, 8gaussians, pinwheel, checkerboard,
        2spirals), a scikit-learn table (digits, wine, breast_cancer, iris) or a set of
        the standard tabular suite read from ``path`` (power, gas, hepmass, miniboone,
        bsds300; see :mod:`node_ocp.data.density_suite`);
        image_density: ``digits`` (8x8 images, 17 grey levels) or ``file`` (images);
        classification: ``spirals`` (procedural 2-D), ``digits`` (8x8 images) or a
        UEA/UCR archive bundled with sktime (``JapaneseVowels``, ``BasicMotions``, ...);
        forecast: ``spiral`` or ``oscillator`` (procedural) or a bundled UEA/UCR archive.
    n_train, n_val, n_test: sizes of procedural data sets.
    drop: fraction of each series' time points removed at random (irregular sampling).
    observe: forecast with ``predict = "extrapolate"``: fraction of each series' time span
        that is observed; the model predicts the time points after it.
    predict: forecast: ``extrapolate`` (predict the future after the observed span) or
        ``interpolate`` (predict the ``drop`` fraction of time points held out inside the
        span from the rest; ``drop`` > 0).
    length: forecast: time points per procedural series.
    noise: observation noise of procedural data.
    path: with ``dataset = "file"``: the user's data file (relative paths are read from the
        config file's folder). density: a table (``.csv``, ``.npy``, ``.npz``), rows =
        samples; image_density: images (IDX, optionally gzipped, e.g. MNIST's
        ``train-images-idx3-ubyte``, or an ``.npz`` with ``x``; labels are not needed);
        classification: a table with a label column (``label_column``, default the
        last), images (``.npz`` with ``x`` and ``y``; IDX with ``labels_path``), or time
        series; forecast: time series. Series files are a long CSV (columns ``series``,
        ``time``, one per channel, optionally ``label``) or an sktime/UEA ``.ts`` file (a
        ``*_TRAIN.ts`` brings its ``*_TEST.ts`` sibling as the test split); see
        :mod:`node_ocp.data.series_files`. Split 80/10/10 (by series) with a fixed seed,
        features standardised with training statistics. With a suite set (power, gas,
        ...): the folder of the standard release's files (its ``data/`` folder, holding
        ``power/data.npy``, ...), split and normalised as the release's own code does.
    format: how ``path`` is read: ``auto``, ``table``, ``images``, ``long`` (a long CSV of
        series) or ``ts``. ``auto``: a ``.ts`` file is ``ts``; for forecast, or for
        classification with model kind ``odernn``/``cde``, a long CSV; otherwise a table or
        images as the file says. density: ``auto`` or ``table``; forecast: ``auto``,
        ``long`` or ``ts``.
    header: CSV header row of a table: ``auto`` (when every cell of the first row is
        non-numeric), ``true`` or ``false`` (a long CSV of series always has one).
    columns: a long CSV's own names of its series, time and label columns, e.g.
        ``{series = "patient", time = "hour", label = "outcome"}`` (a role not named is
        the column called ``series``, ``time`` or ``label``).
    levels: image_density: the number of grey levels L of the images (0: the data set's
        own, 17 for digits and 256 for 8-bit files; a file of floats in [0, 1] needs it:
        its values must be k / (L − 1)). Bits per dimension are of the data in these units.
    """

    kind: str = "density"
    dataset: str = "8gaussians"
    n_train: int = 4096
    n_val: int = 1024
    n_test: int = 2048
    drop: float = 0.0
    observe: float = 0.75
    predict: str = "extrapolate"
    length: int = 40
    noise: float = 0.02
    path: str = ""
    labels_path: str = ""
    header: str = "auto"
    label_column: int = -1
    format: str = "auto"
    columns: dict = field(default_factory=dict)
    levels: int = 0

    def check(self, where: str) -> None:
        from ..data.density_suite import SUITE
        from .task_kinds import ALL_FORMATS, TASKS  # the task kinds, registered there

        _choice(f"{where}.kind", self.kind, TASKS.names())
        _choice(f"{where}.header", self.header, ("auto", "true", "false"))
        _choice(f"{where}.format", self.format, ALL_FORMATS)
        if self.dataset == "file":
            if not self.path:
                raise ConfigError(
                    f"{where}.path: received nothing with dataset = 'file'; accepted: the "
                    "path of a .csv, .npy or .npz table, images (.npz, or IDX with "
                    "labels_path), or time series (a long .csv or a .ts file)"
                )
            formats = TASKS[self.kind].file_formats
            if self.format not in formats:
                raise ConfigError(
                    f"{where}.format: received {self.format!r} for kind {self.kind!r}; "
                    f"accepted: {', '.join(map(repr, formats))}"
                )
        elif self.dataset in SUITE:
            if not self.path:
                raise ConfigError(
                    f"{where}.path: received nothing with dataset {self.dataset!r}; accepted: "
                    "the folder of the standard release's files (its data/ folder, zenodo "
                    "1161203)"
                )
            if self.format != "auto":
                raise ConfigError(
                    f"{where}.format: received {self.format!r} with dataset "
                    f"{self.dataset!r}; accepted: 'auto' (the release's own formats)"
                )
        elif self.path:
            raise ConfigError(
                f"{where}.path: received {self.path!r} with dataset {self.dataset!r}; "
                "accepted: a path only with dataset = 'file' or a set of the tabular "
                f"suite ({', '.join(SUITE)})"
            )
        elif self.format != "auto":
            raise ConfigError(
                f"{where}.format: received {self.format!r} with dataset {self.dataset!r}; "
                "accepted: 'auto', or another format only with dataset = 'file'"
            )
        if self.columns:
            from ..data.series_files import ROLES

            for role, name in self.columns.items():
                if role not in ROLES or not isinstance(name, str) or not name:
                    raise ConfigError(
                        f"{where}.columns: received {role} = {name!r}; accepted: "
                        f"{', '.join(ROLES)} = the name of that column in your long CSV"
                    )
            if self.dataset != "file":
                raise ConfigError(
                    f"{where}.columns: received {self.columns!r} with dataset "
                    f"{self.dataset!r}; accepted: columns only with dataset = 'file'"
                )
        for key in ("n_train", "n_val", "n_test", "length"):
            _at_least(f"{where}.{key}", getattr(self, key), 2)
        if self.levels and self.kind != "image_density":
            raise ConfigError(
                f"{where}.levels: received {self.levels!r} for kind {self.kind!r}; accepted: "
                "levels only for kind 'image_density'"
            )
        if self.levels != 0:
            _at_least(f"{where}.levels", self.levels, 2)
        _in_range(f"{where}.drop", self.drop, 0.0, 1.0, "a fraction in [0, 1)", high_open=True)
        _in_range(f"{where}.observe", self.observe, 0.0, 1.0, "a fraction in (0, 1)", True, True)
        _in_range(f"{where}.noise", self.noise, 0.0, math.inf, "a float >= 0")
        from ..data.forecast import PREDICTS

        _choice(f"{where}.predict", self.predict, PREDICTS)
        if self.predict != "extrapolate" and self.kind != "forecast":
            raise ConfigError(
                f"{where}.predict: received {self.predict!r} for kind {self.kind!r}; "
                "accepted: 'extrapolate' (the default), or 'interpolate' for kind 'forecast'"
            )
        if self.predict == "interpolate" and self.drop <= 0:
            raise ConfigError(
                f"{where}.drop: received {self.drop} with predict = 'interpolate'; accepted: "
                "a fraction in (0, 1), the share of time points held out as targets"
            )


@dataclass
class ModelConfig:
    """``[model]``: the model built for the task.

    kind: ``cnf`` (density), ``image_cnf`` (image_density), ``ode_mlp`` (augmented Neural
        ODE on vectors), ``image`` (conv ODE classifier), ``odernn`` or ``cde`` (irregular
        series); ``mlp`` and ``cnn``: discrete classifiers without ODE blocks.
    hidden: hidden widths of the vector field's MLP (image_cnf: channel widths of its conv
        field; mlp: its hidden layers' widths; cnn: its conv stages' channels).
    width: state width: ODE-RNN / CDE hidden state, image channels, ode_mlp augmentation.
    activation: the field's activation (cnf, image_cnf); mlp, cnn: their layers'.
    blocks: chained ODE blocks (cnf; image_cnf: per scale).
    horizon: integration time t1 of the blocks (t0 = 0).
    divergence: ``exact`` or ``hutchinson`` (cnf, image_cnf).
    kinetic, jacobian: regulariser weights (cnf, image_cnf; 0 disables).
    scales: image_cnf: 1 for the single-scale flow, more for the multiscale flow (a 2x2
        squeeze and half the channels factored out between scales).
    alpha: image_cnf: the logit transform's α, ``logit(α + (1 − 2α) x)``, in (0, 0.5).
    interpolation: ``hermite`` or ``linear`` (cde).
    latent: latent_ode: size of the latent state z (``hidden`` sizes its field and its
        recognition ODE-RNN's field, ``width`` the recognition hidden state and the
        decoder's hidden layer).
    obs_std: latent_ode: σ of the Gaussian observation model.
    samples: latent_ode: posterior draws per series in training (> 1: the IWAE bound).
    kl_anneal: latent_ode: steps over which the KL weight rises linearly from 0 to 1
        (0: weight 1 from the start).
    """

    kind: str = "cnf"
    hidden: list[int] = field(default_factory=lambda: [32, 32])
    width: int = 32
    activation: str = "softplus"
    blocks: int = 1
    horizon: float = 1.0
    divergence: str = "exact"
    kinetic: float = 0.0
    jacobian: float = 0.0
    interpolation: str = "hermite"
    latent: int = 6
    obs_std: float = 0.1
    samples: int = 1
    kl_anneal: int = 0
    scales: int = 1
    alpha: float = 1e-6

    def check(self, where: str) -> None:
        from .model_kinds import MODELS  # the model kinds, registered there

        _choice(f"{where}.kind", self.kind, MODELS.names())
        if not self.hidden:
            raise ConfigError(f"{where}.hidden: received []; accepted: a non-empty list of ints")
        for h in self.hidden:
            _at_least(f"{where}.hidden[...]", h, 1)
        _at_least(f"{where}.width", self.width, 1)
        _at_least(f"{where}.blocks", self.blocks, 1)
        _in_range(f"{where}.horizon", self.horizon, 0.0, math.inf, "a float > 0", low_open=True)
        from ..models.cde import INTERPOLATIONS
        from ..models.cnf import DIVERGENCES
        from ..models.fields import ACTIVATIONS

        _choice(f"{where}.divergence", self.divergence, DIVERGENCES)
        _choice(f"{where}.interpolation", self.interpolation, INTERPOLATIONS)
        _choice(f"{where}.activation", self.activation, tuple(ACTIVATIONS))
        for key in ("kinetic", "jacobian"):
            _in_range(f"{where}.{key}", getattr(self, key), 0.0, math.inf, "a float >= 0")
        _at_least(f"{where}.latent", self.latent, 1)
        _at_least(f"{where}.samples", self.samples, 1)
        _at_least(f"{where}.kl_anneal", self.kl_anneal, 0)
        _at_least(f"{where}.scales", self.scales, 1)
        _in_range(f"{where}.alpha", self.alpha, 0.0, 0.5, "a float in (0, 0.5)", True, True)
        _in_range(f"{where}.obs_std", self.obs_std, 0.0, math.inf, "a float > 0", low_open=True)


def _block_default(key: str):
    """ODEBlock's own default for ``key`` (the library is the one source)."""
    import inspect

    from ..ode.block import ODEBlock

    return inspect.signature(ODEBlock).parameters[key].default


@dataclass
class SolverConfig:
    """``[solver]``: every ODE block's solver, with ODEBlock's defaults (dopri5, rtol 1e-4,
    atol 1e-5, the own adjoint). ``gradient``: ``adjoint`` (the own adjoint),
    ``direct`` (backprop through the solver) or ``torchdiffeq`` (torchdiffeq's
    ``odeint_adjoint``; first-order optimizers only). ``backend``: ``torchdiffeq`` or
    ``own`` (dopri5, bosh3 and rk4 stepped by node_ocp's own loop). ``compile_field``:
    ``"off"`` (default) or a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``,
    ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``) for every block's field
    (``ODEBlock(compile_field=...)``; not with ``gradient = "torchdiffeq"``).
    ``cuda_graph``: replay the fixed-grid solves (euler, midpoint, rk4) of every block from
    CUDA graphs (``ODEBlock(cuda_graph=True)``; the own adjoint, CUDA devices only).
    ``step_control``: ``batch`` (one step size for the batch) or ``per_sample`` (one per
    sample; with ``backend = "own"`` and dopri5 or bosh3, see ``ODEBlock``).
    ``adjoint_anchor``: the own adjoint's reconstruction check, a float > 1 (default 1000,
    in forward tolerances) or ``"off"`` (``ODEBlock(adjoint_anchor=...)``).
    ``adjoint_norm``: the error norm of the adaptive backward solve, ``"seminorm"``
    (default), ``"state"`` (the second-order factors out of the step-size control too) or
    ``"full"`` (``ODEBlock(adjoint_norm=...)``)."""

    method: str = field(default_factory=lambda: _block_default("method"))
    rtol: float = field(default_factory=lambda: _block_default("rtol"))
    atol: float = field(default_factory=lambda: _block_default("atol"))
    gradient: str = field(default_factory=lambda: _block_default("gradient"))
    backend: str = field(default_factory=lambda: _block_default("backend"))
    compile_field: str = "off"
    cuda_graph: bool = False
    step_control: str = field(default_factory=lambda: _block_default("step_control"))
    adjoint_anchor: float | str = field(default_factory=lambda: _block_default("adjoint_anchor"))
    adjoint_norm: str = field(default_factory=lambda: _block_default("adjoint_norm"))

    def check(self, where: str) -> None:
        from ..ode.block import GRADIENT_MODES
        from ..ode.solvers import BACKENDS, METHODS

        _choice(f"{where}.method", self.method, tuple(METHODS))
        _in_range(f"{where}.rtol", self.rtol, 0.0, math.inf, "a float > 0", low_open=True)
        _in_range(f"{where}.atol", self.atol, 0.0, math.inf, "a float > 0", low_open=True)
        _choice(f"{where}.gradient", self.gradient, GRADIENT_MODES)
        _choice(f"{where}.backend", self.backend, BACKENDS)
        from ..ode.compiled import COMPILE_MODES

        _choice(f"{where}.compile_field", self.compile_field, ("off", *COMPILE_MODES))
        if self.compile_field != "off" and self.gradient == "torchdiffeq":
            raise ConfigError(
                f"{where}.compile_field: received {self.compile_field!r} with gradient = "
                "'torchdiffeq'; accepted: 'off' there (torchdiffeq's odeint_adjoint evaluates "
                "the field itself). Use gradient = 'adjoint' or 'direct' to compile the field."
            )
        from ..ode.graphs import GRAPH_METHODS

        if self.cuda_graph and (self.gradient != "adjoint" or self.method not in GRAPH_METHODS):
            raise ConfigError(
                f"{where}.cuda_graph: received true with method = {self.method!r} and gradient "
                f"= {self.gradient!r}; accepted: true only with a fixed-grid method of "
                f"{', '.join(GRAPH_METHODS)} and gradient = 'adjoint' (an adaptive method "
                "decides its steps on the host). Set cuda_graph = false or change the method."
            )
        from ..ode.per_sample import METHODS as PER_SAMPLE_METHODS
        from ..ode.per_sample import STEP_CONTROLS
        from ..ode.settings import check_anchor

        anchor = self.adjoint_anchor
        try:  # ODEBlock's own rule
            if anchor != "off":
                check_anchor(anchor)
        except ValueError:
            raise ConfigError(
                f"{where}.adjoint_anchor: received {anchor!r}; accepted: a float > 1 or 'off'"
            ) from None
        from ..ode.settings import ADJOINT_NORMS

        _choice(f"{where}.adjoint_norm", self.adjoint_norm, ADJOINT_NORMS)
        _choice(f"{where}.step_control", self.step_control, STEP_CONTROLS)
        if self.step_control == "per_sample":
            _choice(f"{where}.backend (with step_control = 'per_sample')", self.backend, ("own",))
            _choice(
                f"{where}.method (with step_control = 'per_sample')",
                self.method,
                PER_SAMPLE_METHODS,
            )
            _choice(
                f"{where}.adjoint_norm (with step_control = 'per_sample')",
                self.adjoint_norm,
                ("seminorm", "state"),
            )
            if self.gradient == "torchdiffeq":
                raise ConfigError(
                    f"{where}.gradient: received 'torchdiffeq'; accepted with step_control = "
                    "'per_sample': 'adjoint' or 'direct' (torchdiffeq's odeint_adjoint has one "
                    "step size for the batch)"
                )


@dataclass
class TrainConfig:
    """``[train]``: budget, batching, evaluation and the default optimizer.

    optimizer: the ``[optimizers.NAME]`` table ``train`` uses unless ``--optimizer`` says.
    steps: step budget; max_seconds: training wall-clock budget (0: none; evaluation time
    is not counted). eval_every: validation period in steps; checkpoint_every: checkpoint
    period in steps (the last step is always checkpointed). eval_batch: evaluation chunk.
    target: the validation metric that counts as reached for time-to-target (None: Adam's
    final validation metric in comparisons).
    patience: early stopping: the run ends after this many scheduled evaluations without an
    improvement of the validation metric (None, the default: no early stopping; like the
    budgets, it may change when a run is resumed).
    failures_in_a_row: a step fails when its forward or backward solve fails, its loss is
        not finite or OCNOpt finds its gradient non-finite; it changes no parameter and is
        skipped (the next step draws a new batch). The run stops as diverged when this many
        steps in a row fail (default 3; 1: at the first failure). It stops at once on a
        failure inside OCNOpt's own step (its statistics have taken the batch in by then)
        and, in a data-parallel run, on a failure inside the backward pass (the other
        processes wait in its all-reduce).
    """

    optimizer: str = "ocnopt"
    steps: int = 200
    max_seconds: float = 0.0
    batch_size: int = 128
    eval_every: int = 20
    checkpoint_every: int = 50
    eval_batch: int = 1024
    seed: int = 0
    device: str = "cpu"
    target: float | None = None
    patience: int | None = None
    failures_in_a_row: int = 3

    def check(self, where: str) -> None:
        _at_least(f"{where}.steps", self.steps, 1)
        _at_least(f"{where}.failures_in_a_row", self.failures_in_a_row, 1)
        if self.patience is not None and self.patience < 1:
            raise ConfigError(
                f"{where}.patience: received {self.patience!r}; accepted: an int >= 1 "
                "(evaluations without improvement before the run stops), or no patience key "
                "(no early stopping)"
            )
        _in_range(f"{where}.max_seconds", self.max_seconds, 0.0, math.inf, "a float >= 0")
        for key in ("batch_size", "eval_every", "checkpoint_every", "eval_batch"):
            _at_least(f"{where}.{key}", getattr(self, key), 1)
        _at_least(f"{where}.seed", self.seed, 0)
        _choice(f"{where}.device", self.device, DEVICES)


def _horizon_default(key: str):
    """HorizonOptimizer's own default for ``key`` (the library is the one source)."""
    import inspect

    from ..optim.horizon import HorizonOptimizer

    return inspect.signature(HorizonOptimizer).parameters[key].default


@dataclass
class HorizonConfig:
    """``[horizon]``: t1 of the (first) ODE block as a control (see HorizonOptimizer, whose
    defaults these are; ``max_horizon = inf`` is no bound)."""

    mode: str = field(default_factory=lambda: _horizon_default("mode"))
    lr: float = field(default_factory=lambda: _horizon_default("lr"))
    penalty: float = field(default_factory=lambda: _horizon_default("penalty"))
    update_every: int = field(default_factory=lambda: _horizon_default("update_every"))
    beta: float = field(default_factory=lambda: _horizon_default("beta"))
    min_horizon: float = field(default_factory=lambda: _horizon_default("min_horizon"))
    max_horizon: float = field(default_factory=lambda: _horizon_default("max_horizon"))
    warmup: int | None = field(default_factory=lambda: _horizon_default("warmup"))

    def check(self, where: str) -> None:
        from ..optim.horizon import HORIZON_MODES

        _choice(f"{where}.mode", self.mode, HORIZON_MODES)
        _in_range(f"{where}.lr", self.lr, 0.0, math.inf, "a float > 0", low_open=True)
        _in_range(f"{where}.penalty", self.penalty, 0.0, math.inf, "a float >= 0")
        _at_least(f"{where}.update_every", self.update_every, 1)
        if self.warmup is not None:
            _at_least(f"{where}.warmup", self.warmup, 0)
        _in_range(f"{where}.beta", self.beta, 0.0, 1.0, "a float in [0, 1)", high_open=True)
        _in_range(
            f"{where}.min_horizon", self.min_horizon, 0.0, math.inf, "a float > 0", low_open=True
        )
        if not self.max_horizon > self.min_horizon:
            raise ConfigError(
                f"{where}.max_horizon: received {self.max_horizon}; "
                f"accepted: a float > min_horizon ({self.min_horizon})"
            )


#: The learning rate of a table that gives none: Adam's and SGD's usual defaults; for OCNOpt
#: no cap on its step scale (``inf``: the step comes from the quadratic model).
DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2, "ocnopt": math.inf}


def lr_label(lr) -> str:
    """A learning rate as reports print it: ``default`` for none (``inf`` or None: OCNOpt's
    step scale comes from its quadratic model, uncapped), else the number (for OCNOpt the
    cap it was given)."""
    if lr is None or (isinstance(lr, (int, float)) and math.isinf(lr)):
        return "default"
    return f"{float(lr):g}"


@dataclass
class _OptimizerTable:
    """``[optimizers.NAME]``: one optimizer.

    kind: ``adam``, ``sgd``, ``ocnopt``, or the class path of any ``torch.optim.Optimizer``
    (``"torch.optim.AdamW"``, ``"pytorch_optimizer.SOAP"``; aliases ``adamw``, ``soap``,
    ``shampoo``) whose keyword arguments go in ``args = {...}`` (checked against the class's
    signature). lr: learning rate (default: Adam 1e-3, SGD 1e-2, a class path: the class's
    own default; OCNOpt: none, its step scale comes from its quadratic model and ``lr`` only
    caps it, or is the step with ``step = "fixed"``); lr_grid: the learning rates
    ``compare --lr-grid`` tries. schedule: ``constant``, ``cosine`` or ``linear`` decay of
    every step (OCNOpt's included) to ``final_lr_factor`` times its start over the run's
    ``[train].steps``, after a linear warm-up of ``warmup`` steps.
    momentum: SGD/OCNOpt heavy-ball momentum (Adam: beta1; default 0.9).
    weight_decay: a float >= 0; ``"prior"``: ``1/N`` for the ``N`` training rows, a unit
    Gaussian prior on the parameters; ``"auto"``: that prior where the task's loss is a mean
    negative log-likelihood per row (densities, classifiers; for OCNOpt with
    ``decay_in_model = true``), none where it is a squared error. Unset: ``"auto"`` for
    OCNOpt (its default), 0 for Adam and SGD. The remaining keys
    are OCNOpt's, made from the fields of :class:`~node_ocp.optim.options.OCNOptOptions`
    (its defaults and checks; adding a field there adds the key here): a table holding only
    ``kind = "ocnopt"`` is the recommended setting. An option that OCNOpt turns off with
    None (``kl_clip``, ``feedback_clip``) is off at 0 in a table. A renamed key (``alpha``,
    now ``ekfac_decay``) is read with a ``FutureWarning``.
    ``gradient`` (any kind): ``adjoint`` or ``direct`` for this optimizer's runs, overriding
    ``[solver].gradient``; ``time_joint = false`` with ``gradient = "direct"`` is the
    standard-EKFAC baseline (K-FAC hooks per solver evaluation, not time-joint).
    """

    kind: str = "adam"
    lr: float | None = None
    lr_grid: list[float] = field(default_factory=list)
    args: dict = field(default_factory=dict)
    schedule: str = "constant"
    warmup: int = 0
    final_lr_factor: float = 0.0
    momentum: float | None = None
    weight_decay: float | str | None = None
    gradient: str | None = None

    def check(self, where: str) -> None:
        from . import classpath

        if classpath.is_class_path(self.kind):
            self._check_class_path(where)
        else:
            _choice(f"{where}.kind", self.kind, (*OPTIMIZER_KINDS, "a class path"))
            if self.args:
                raise ConfigError(
                    f"{where}.args: received {self.args!r} with kind {self.kind!r}; accepted: "
                    "args only with a class-path kind such as 'torch.optim.AdamW'"
                )
        from .schedules import SCHEDULES

        _choice(f"{where}.schedule", self.schedule, SCHEDULES)
        _at_least(f"{where}.warmup", self.warmup, 0)
        _in_range(f"{where}.final_lr_factor", self.final_lr_factor, 0.0, 1.0, "a float in [0, 1]")
        if self.lr is not None:
            _in_range(f"{where}.lr", self.lr, 0.0, math.inf, "a float > 0", low_open=True)
        for lr in self.lr_grid:
            _in_range(f"{where}.lr_grid[...]", lr, 0.0, math.inf, "floats > 0", low_open=True)
        if self.momentum is not None:
            _in_range(
                f"{where}.momentum", self.momentum, 0.0, 1.0, "a float in [0, 1)", high_open=True
            )
        if isinstance(self.weight_decay, str):
            if self.weight_decay not in DECAY_RULES:
                raise ConfigError(
                    f"{where}.weight_decay: received {self.weight_decay!r}; accepted: "
                    f"{_UNION_ACCEPTS['weight_decay']}"
                )
        elif self.weight_decay is not None:
            _in_range(
                f"{where}.weight_decay",
                self.weight_decay,
                0.0,
                math.inf,
                _UNION_ACCEPTS["weight_decay"],
            )
        _in_range(
            f"{where}.feedback_clip", self.feedback_clip, 0.0, math.inf, "a float >= 0 (0: off)"
        )
        _in_range(f"{where}.kl_clip", self.kl_clip, 0.0, math.inf, "a float >= 0 (0: off)")
        if not isinstance(self.time_joint, bool):
            raise ConfigError(
                f"{where}.time_joint: received {self.time_joint!r}; accepted: true or false"
            )
        from ..ode.block import GRADIENT_MODES

        if self.gradient is not None:
            _choice(f"{where}.gradient", self.gradient, GRADIENT_MODES)
        if self.kind == "ocnopt" and not self.time_joint and self.gradient != "direct":
            raise ConfigError(
                f"{where}.time_joint: received false without gradient = 'direct'; accepted: "
                "time_joint = false with gradient = 'direct' in the same table (the standard "
                "EKFAC baseline: K-FAC hooks per solver evaluation under backprop)"
            )
        if self.kind == "ocnopt" and self.step == "fixed" and self.lr is None:
            raise ConfigError(
                f"{where}.lr: received nothing with step = 'fixed'; accepted: a float > 0 "
                "(the step scale), or step = 'model'"
            )
        # OCNOpt's own keys: checked where their defaults live (node_ocp.optim.options)
        from .optimizers import ocnopt_options

        numeric = self
        if isinstance(self.weight_decay, str):  # a rule: a number once the data are known
            numeric = dataclasses.replace(self, weight_decay=None)
        try:
            ocnopt_options(numeric, 1.0 if self.lr is None else self.lr).checked()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}.{str(exc).rstrip('.')}") from None

    def _check_class_path(self, where: str) -> None:
        import torch

        from . import classpath

        for key in ("momentum", "weight_decay"):
            if getattr(self, key) is not None:
                raise ConfigError(
                    f"{where}.{key}: received {getattr(self, key)!r} with kind {self.kind!r}; "
                    f"accepted: a class-path optimizer's keywords in args = {{{key} = ...}}"
                )
        try:
            probe = torch.nn.Parameter(torch.zeros(2, 2))
            classpath.build(self.kind, [probe], self.lr, self.args)
        except classpath.ClassPathError as exc:
            if exc.missing:  # checked again when this optimizer is used: a config may name
                return  # an optional package's optimizer and still run the others
            raise ConfigError(f"{where}.{exc.key}: {exc}") from None

    @property
    def is_class_path(self) -> bool:
        """Whether ``kind`` names an optimizer class rather than adam / sgd / ocnopt."""
        from . import classpath

        return classpath.is_class_path(self.kind)

    @property
    def learning_rate(self) -> float:
        """``lr``, or the kind's default (``inf`` for OCNOpt: no cap; a class path: the
        class's own default, 1e-3 when it has none)."""
        if self.lr is not None:
            return self.lr
        if self.is_class_path:
            from . import classpath

            default = classpath.default_lr(self.kind)
            return 1e-3 if default is None else default
        return DEFAULT_LR[self.kind]

    @property
    def beta(self) -> float:
        """``momentum`` or its default 0.9 (heavy-ball momentum; Adam's beta1)."""
        return 0.9 if self.momentum is None else self.momentum

    @property
    def decay(self) -> float:
        """``weight_decay`` as a number (0 when unset; a rule, ``"prior"`` or ``"auto"``,
        must have been resolved by :func:`~node_ocp.train.optimizers.resolve_decay`
        first)."""
        if isinstance(self.weight_decay, str):
            raise ConfigError(
                f"weight_decay: received {self.weight_decay!r} outside a run; accepted: a "
                "float >= 0 (the prior's 1/N needs the training split and its task)"
            )
        return 0.0 if self.weight_decay is None else self.weight_decay

    @property
    def grid(self) -> list[float]:
        """The learning rates of a grid search (just the learning rate when no grid is given)."""
        return list(self.lr_grid) if self.lr_grid else [self.learning_rate]


#: ``weight_decay = "prior"``: a unit Gaussian prior on the parameters, the weight decay
#: ``1/N`` of a loss averaged over the ``N`` rows of the training split.
PRIOR_DECAY = "prior"
#: ``weight_decay = "auto"`` (OCNOpt's default where the key is unset): the prior inside
#: OCNOpt's model (``decay_in_model``) where the task's loss is a mean negative
#: log-likelihood per row (densities, classifiers), none otherwise (squared errors).
AUTO_DECAY = "auto"
#: the rules ``weight_decay`` accepts besides a number
DECAY_RULES = (PRIOR_DECAY, AUTO_DECAY)


#: What a key of several types accepts, in words (for its error).
_UNION_ACCEPTS = {
    "weight_decay": f"a float >= 0, {PRIOR_DECAY!r} or {AUTO_DECAY!r}",
    "adjoint_anchor": "a float > 1 or 'off'",
}


#: OCNOpt options that are not keys of an optimizer table: ``lr``, ``momentum`` and
#: ``weight_decay`` are every optimizer's keys; the run's seed and the processes decide
#: ``seed`` and ``distributed``.
NOT_TABLE_KEYS = ("lr", "momentum", "weight_decay", "seed", "distributed")


#: The table keys of OCNOpt options that None turns off: 0 turns them off in a table.
OFF_AT_ZERO: set[str] = set()


def _ocnopt_table_keys() -> list[tuple[str, Any, Any]]:
    """``(name, type, field)`` of every OCNOpt option a table may set, in the options' order,
    with OCNOpt's own defaults (a None-able float is a float whose 0 means off)."""
    from ..optim.options import OCNOptOptions

    hints = typing.get_type_hints(OCNOptOptions)
    keys = []
    for f in dataclasses.fields(OCNOptOptions):
        if f.name in NOT_TABLE_KEYS:
            continue
        tp, default = hints[f.name], f.default
        if typing.get_origin(tp) in (types.UnionType, typing.Union):
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = inner[0]
            default = 0.0 if default is None else default
            OFF_AT_ZERO.add(f.name)
        keys.append((f.name, tp, field(default=default)))
    return keys


OptimizerConfig = dataclasses.make_dataclass(
    "OptimizerConfig",
    _ocnopt_table_keys(),
    bases=(_OptimizerTable,),
    namespace={"__doc__": _OptimizerTable.__doc__, "__module__": __name__},
)


@dataclass
class RunConfig:
    """A whole run: task, model, solver, training, optional horizon control, optimizers."""

    task: TaskConfig
    model: ModelConfig
    solver: SolverConfig
    train: TrainConfig
    optimizers: dict[str, OptimizerConfig]
    horizon: HorizonConfig | None = None
    source: str = "<dict>"
    #: tables made from class paths named on the command line (not part of the file)
    adhoc: list[str] = field(default_factory=list)

    def check(self) -> None:
        for name in ("task", "model", "solver", "train"):
            getattr(self, name).check(f"[{name}]")
        if self.horizon is not None:
            self.horizon.check("[horizon]")
        if not self.optimizers:
            raise ConfigError(
                "[optimizers]: received no optimizer tables; accepted: at least one "
                "[optimizers.NAME] table with kind = 'adam' | 'sgd' | 'ocnopt' | a class path"
            )
        from .adapters import adapter_for

        for name, opt in self.optimizers.items():
            opt.check(f"[optimizers.{name}]")
            adapter_for(opt).check_config(name, opt, self)
        from .model_kinds import MODELS

        allowed = tuple(m.name for m in MODELS if self.task.kind in m.tasks)
        if self.model.kind not in allowed:
            raise ConfigError(
                f"[model].kind: received {self.model.kind!r} for task kind "
                f"{self.task.kind!r}; accepted: {', '.join(map(repr, allowed))}"
            )
        self.optimizer(self.train.optimizer, "[train].optimizer")

    def optimizer(self, name: str, where: str = "--optimizer") -> OptimizerConfig:
        """The ``[optimizers.NAME]`` table called ``name``, or for a name the config has no
        table for, a table of the class path or alias ``name`` with the class's defaults
        (``--optimizers adam,torch.optim.AdamW,soap``); a clear error for anything else.

        The optimizer's package must be importable (checked here, before any run).
        """
        from . import classpath

        if name not in self.optimizers and classpath.is_class_path(name):
            table = OptimizerConfig(kind=name)
            table.check(f"{where} {name}")
            self.optimizers[name] = table
            self.adhoc.append(name)
        if name not in self.optimizers:
            raise ConfigError(
                f"{where}: received {name!r}; accepted: an optimizer table of "
                f"{self.source}: {', '.join(map(repr, self.optimizers))}, or a class path "
                f"such as 'torch.optim.AdamW' (aliases: {', '.join(classpath.ALIASES)})"
            )
        table = self.optimizers[name]
        if table.is_class_path:
            try:
                classpath.resolve(table.kind)
            except classpath.ClassPathError as exc:
                raise ConfigError(f"[optimizers.{name}].kind: {exc}") from None
        return table

    def to_dict(self) -> dict:
        out = {
            k: dataclasses.asdict(getattr(self, k)) for k in ("task", "model", "solver", "train")
        }
        out["optimizers"] = {
            k: dataclasses.asdict(v) for k, v in self.optimizers.items() if k not in self.adhoc
        }
        if self.horizon is not None:
            out["horizon"] = dataclasses.asdict(self.horizon)
        return out


TABLES = {
    "task": TaskConfig,
    "model": ModelConfig,
    "solver": SolverConfig,
    "train": TrainConfig,
    "horizon": HorizonConfig,
}


def load_config(path) -> RunConfig:
    """Read and validate a TOML config file. Raises :class:`ConfigError` with a clear message."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config: {str(path)!r} is not a file; accepted: the path of a TOML config "
            "(see configs/ for one per task)"
        )
    try:
        raw = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: {str(path)!r} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config: {str(path)!r} cannot be read: {exc}") from None
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict, source: str = "<dict>") -> RunConfig:
    """Build and validate a :class:`RunConfig` from nested dicts (a parsed TOML file)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: received {type(raw).__name__}; accepted: a table")
    known = (*TABLES, "optimizers")
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{source}: unknown table [{key}]; accepted: {', '.join(f'[{k}]' for k in known)}"
            )
    parts: dict[str, Any] = {}
    for name, cls in TABLES.items():
        if name in raw:
            parts[name] = _build(cls, raw[name], f"[{name}]")
        elif name != "horizon":
            parts[name] = cls()
    opts = raw.get("optimizers", {})
    if not isinstance(opts, dict):
        raise ConfigError("[optimizers]: accepted: tables [optimizers.NAME]")
    parts["optimizers"] = {
        name: _build(
            OptimizerConfig, _renamed(table, f"[optimizers.{name}]"), f"[optimizers.{name}]"
        )
        for name, table in opts.items()
    }
    cfg = RunConfig(**parts, source=source)
    cfg.check()
    return cfg


# ---------------------------------------------------------------------- helpers
def _renamed(table, where: str):
    """An optimizer table with its renamed keys under the new names (a FutureWarning each:
    a config is a user's file, so the warning is shown)."""
    from ..optim.options import renamed_keys

    if not isinstance(table, dict):
        return table
    try:
        return renamed_keys(table, where, category=FutureWarning, stacklevel=5)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def _build(cls, table, where: str):
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: received {table!r}; accepted: a table of keys")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in table:
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}; accepted: {', '.join(names)}")
    values = {k: _coerce(f"{where}.{k}", v, hints[k]) for k, v in table.items()}
    return cls(**values)


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return {int: "an int", float: "a float", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _coerce(where: str, value, tp):
    origin = typing.get_origin(tp)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: received {value!r}; accepted: a table of keys")
        return dict(value)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        for one in inner[:-1]:  # the first type that takes the value
            try:
                return _coerce(where, value, one)
            except ConfigError:
                pass
        try:
            return _coerce(where, value, inner[-1])
        except ConfigError:
            if len(inner) == 1:
                raise
            accepted = next(
                (text for key, text in _UNION_ACCEPTS.items() if where.endswith(f".{key}")),
                _type_name(tp),
            )
            raise ConfigError(f"{where}: received {value!r}; accepted: {accepted}") from None
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: received {value!r}; accepted: {_type_name(tp)}")
        item = typing.get_args(tp)[0]
        return [_coerce(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and (isinstance(value, bool) or not isinstance(value, tp)):
        raise ConfigError(f"{where}: received {value!r}; accepted: {_type_name(tp)}")
    if tp is float and not math.isfinite(value) and not where.endswith(".max_horizon"):
        raise ConfigError(f"{where}: received {value!r}; accepted: a finite float")
    if tp in (str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: received {value!r}; accepted: {_type_name(tp)}")
    return value


def _choice(where: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(
            f"{where}: received {value!r}; accepted: one of {', '.join(map(repr, choices))}"
        )


def _at_least(where: str, value, low: int) -> None:
    if value < low:
        raise ConfigError(f"{where}: received {value!r}; accepted: an int >= {low}")


def _in_range(where, value, low, high, accepted, low_open=False, high_open=False) -> None:
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        raise ConfigError(f"{where}: received {value!r}; accepted: {accepted}")
