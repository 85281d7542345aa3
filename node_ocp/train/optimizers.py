"""Optimizers and the horizon controller from their config tables."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import torch
from torch import nn

from ..ode.block import ODEBlock
from ..optim import HorizonOptimizer, OCNOpt, OCNOptOptions
from . import classpath
from .config import (
    AUTO_DECAY,
    OFF_AT_ZERO,
    PRIOR_DECAY,
    ConfigError,
    HorizonConfig,
    OptimizerConfig,
)
from .schedules import ScheduleFactor, attach_schedule


def build_optimizer(cfg: OptimizerConfig, model: nn.Module, lr: float | None = None, seed=0):
    """``torch.optim.Adam`` / ``SGD``, an optimizer by class path, or
    :class:`~node_ocp.OCNOpt` for ``model``.

    ``lr`` overrides ``cfg.lr`` (grid searches). Adam uses ``momentum`` as its beta1. A table
    with ``gradient`` sets every ODE block of ``model`` to it first (an arm that backprops
    through the solver, such as the standard-EKFAC baseline, beside adjoint arms).
    """
    if cfg.gradient is not None:
        for block in model.modules():
            if isinstance(block, ODEBlock):
                block.gradient = cfg.gradient
    lr = cfg.learning_rate if lr is None else lr
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.is_class_path:
        try:
            return classpath.build(cfg.kind, params, lr, cfg.args)
        except classpath.ClassPathError as exc:
            raise ConfigError(f"[optimizers].{exc.key}: {exc}") from None
    if cfg.kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(cfg.beta, 0.999), weight_decay=cfg.decay)
    if cfg.kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.beta, weight_decay=cfg.decay)
    return OCNOpt(model, ocnopt_options(cfg, lr, seed))


def resolve_decay(cfg: OptimizerConfig, rows: int, nll_per_row: bool) -> OptimizerConfig:
    """``cfg`` with its weight-decay rule made a number for a training split of ``rows``
    rows; a table without a rule is returned as it is.

    - ``"prior"``: ``1/rows``, a unit Gaussian prior on the parameters for a loss averaged
      over the rows (MAP).
    - ``"auto"``, and an OCNOpt table without the key: where ``nll_per_row`` (the task's
      loss is a mean negative log-likelihood per row: densities, classifiers), the prior,
      inside OCNOpt's model and trials (``decay_in_model = true``, whatever the table
      says: for the prior in the gradient alone write ``weight_decay = "prior"`` with
      ``decay_in_model = false``); elsewhere none. A squared error is no likelihood in
      nats: its scale is a chosen noise level, and on the spiral forecaster the prior was
      5.3x tuned Adam's MSE, against level without it; on the small tables it turned
      OCNOpt's losses to Adam into wins or a level (``experiments/results/bench_issue21.md``
      §25, §26).
    """
    rule = cfg.weight_decay
    if rule is None and cfg.kind == "ocnopt":
        rule = AUTO_DECAY
    if rule == AUTO_DECAY:
        if not nll_per_row:
            return cfg if cfg.weight_decay is None else replace(cfg, weight_decay=None)
        prior = replace(cfg, weight_decay=1.0 / max(int(rows), 1))
        return replace(prior, decay_in_model=True) if cfg.kind == "ocnopt" else prior
    if rule == PRIOR_DECAY:
        return replace(cfg, weight_decay=1.0 / max(int(rows), 1))
    return cfg


def decay_for_task(cfg: OptimizerConfig, task) -> OptimizerConfig:
    """:func:`resolve_decay` for a built task (its training split and its loss)."""
    return resolve_decay(cfg, len(task.data.train), task.nll_per_row)


def ocnopt_options(cfg: OptimizerConfig, lr: float, seed: int = 0) -> OCNOptOptions:
    """The :class:`~node_ocp.optim.options.OCNOptOptions` of an ``ocnopt`` table: every key
    the table shares with the options, and the table's conventions (``lr = inf``: no cap;
    0 for an option that None turns off, such as ``kl_clip``: off; ``momentum``/
    ``weight_decay`` unset: the defaults)."""
    shared = {f.name for f in fields(OCNOptOptions)} & {f.name for f in fields(cfg)}
    values = {k: getattr(cfg, k) for k in sorted(shared)}
    for key in OFF_AT_ZERO & shared:
        values[key] = values[key] or None
    values.update(
        lr=None if math.isinf(lr) else lr, momentum=cfg.beta, weight_decay=cfg.decay, seed=seed
    )
    return OCNOptOptions().replace(**values)


def build_schedule(cfg: OptimizerConfig, opt, total_steps: int):
    """The table's schedule on ``opt`` over ``total_steps``; the ``LambdaLR`` to step after
    every optimizer step, or None (constant, or OCNOpt, which applies it itself)."""
    factor = ScheduleFactor(cfg.schedule, max(1, total_steps), cfg.warmup, cfg.final_lr_factor)
    return attach_schedule(opt, factor)


def build_horizon(cfg: HorizonConfig | None, model: nn.Module) -> HorizonOptimizer | None:
    """A :class:`~node_ocp.HorizonOptimizer` on the model's (single) ODE block, or None."""
    if cfg is None:
        return None
    block = next(m for m in model.modules() if isinstance(m, ODEBlock))
    return HorizonOptimizer(
        block,
        model.parameters(),
        lr=cfg.lr,
        penalty=cfg.penalty,
        mode=cfg.mode,
        update_every=cfg.update_every,
        beta=cfg.beta,
        min_horizon=cfg.min_horizon,
        max_horizon=cfg.max_horizon,
        warmup=cfg.warmup,
    )


def current_lr(opt) -> float:
    """The step scale of the first group: its ``lr`` (OCNOpt with ``step="model"``: η)."""
    from .adapters import adapt

    return adapt(opt).current_lr()


def optimizer_metrics(opt) -> dict:
    """What a metrics line records of the optimizer's own state (OCNOpt: damping λ; with
    feedback, the last sweep's gain ratio ‖Σ K δx‖ / ‖open-loop step‖)."""
    from .adapters import adapt

    return adapt(opt).metrics()
