"""OCNOpt: the second-order optimal-control optimizer for models with ODE blocks.

The recommended loop hands the optimizer the loss and outputs of the step, and a closure that
evaluates the same batch again (no backward; OCNOpt calls it at trial parameters):

    opt = node_ocp.OCNOpt(model)                   # the one default: ekfac, adaptive damping,
    for x, y in data:                              # steps from the quadratic model
        opt.zero_grad()
        logits = model(x)
        loss = loss_fn(logits, y)                  # a mean over the batch
        opt.backward(loss, outputs=logits, likelihood="categorical")
        opt.step(lambda: (loss_fn(model(x), y), model(x)))   # or return the loss alone

One step runs these stages, each owned by one part:

1. **collect** (refresh steps: step 0, ``update_every``, ...): the capture of the blocks'
   backward solves and the hooks on layers outside the blocks yield typed statistics
   records (:mod:`.statistics`); the factor source (:mod:`.factor_sources`, one class per
   ``factors``) routes them, in ``backward``, through the loss's own backward pass, factors
   carried inside the solves (:mod:`.factor_flow`) or a sampled backward pass of their own
   (:mod:`.fisher_backward`);
2. **reduce** across processes and **decompose** into each unit's eigenbasis
   (:class:`~.preconditioner.Preconditioner`, :mod:`.reduce`, the units of
   :mod:`.curvatures`);
3. **precondition**: every unit maps its gradient to ``u = (C + λ)⁻¹ g`` with the damping λ
   relative to its own curvature scale (π-balanced for kfac) or absolute (``damping_mode``),
   divided by its part's calibration scale (:mod:`.unit_scales`);
4. **plan** (a stepper of :mod:`.steppers`, one class per ``step``): ``"model"``:
   ``δ = −α u + μ δ_prev`` with ``α`` from the calibrated quadratic model inside a trust
   region (:mod:`.step_control`); ``"fixed"``: ``δ = −lr (u + μ d_prev)``;
5. **trial** every ``adapt_every`` steps (:meth:`.trial.Trials.adapt`): the batch at
   ``θ + δ`` gives the Gauss–Newton curvature along ``δ`` and the reduction ratio ρ; the
   stepper settles what is taken and its calibration κ, ρ adapts λ (Levenberg–Marquardt,
   :mod:`.damping`); ``kl_clip`` bounds the update taken;
6. **base step**: ``θ ← θ + δ``; with ``feedback`` on, applied stage by stage in one forward
   sweep that adds each stage's gain term ``K_s δx_s`` (the
   :class:`~.feedback_runner.FeedbackRunner` and its policy, one class per ``feedback``,
   :mod:`.feedback_policies`).

:class:`OCNOpt` itself keeps the parameter groups, ``backward`` and ``step`` (which call the
parts in this order), the skipping of non-finite steps (``nonfinite``, chosen once) and a
``state_dict`` assembled from the parts' own.

Which unit preconditions which parameters is decided once (:mod:`.units`): Kronecker layers
inside the fields and outside the blocks, dense blocks, and a diagonal rule on the same scale
for everything else.

Losses are taken to be means over the batch (the usual reduction); statistics are normalised
per sample (see :mod:`.statistics`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .. import dist
from .._errors import bad_type, bad_value, check_choice
from ..capture import CurvatureCapture
from ..ode.block import ODEBlock
from .curvatures import VARIANTS, Damping
from .damping import LevenbergMarquardt
from .factor_sources import EMPIRICAL, FACTOR_SOURCES_BY_NAME
from .feedback import FeedbackReport
from .feedback_policies import SweepContext
from .feedback_runner import FeedbackRunner
from .gauss_newton_cg import GaussNewtonCG
from .hyper import check_hyper, value_at
from .likelihoods import LIKELIHOODS
from .options import (  # noqa: F401  (re-exported: the public names of the options)
    CURVATURES,
    DAMPING_MODES,
    DEFAULTS,
    FACTOR_SOURCES,
    NONFINITE,
    OUTSIDE_RULES,
    RENAMED,
    OCNOptOptions,
    renamed_keys,
)
from .preconditioner import Preconditioner
from .step_control import Adaptation, StepControl
from .steppers import STEPPERS
from .subspace import SubspaceStep
from .trial import Observed, Trials
from .unit_scales import UnitCalibration, unit_groups

#: The attribute an ODE block's own ``gradient`` is kept in while OCNOpt's steps between
#: refreshes run it with ``gradient="direct"`` (:meth:`OCNOpt._set_direct`).
_OWN_GRADIENT = "_gradient_between_refreshes"

GROUP_KEYS: tuple[str, ...] = (
    "params",
    "lr",
    "momentum",
    "weight_decay",
    "ekfac_decay",
    "outside",
    "diag_beta",
)


class OCNOpt(torch.optim.Optimizer):
    """Second-order optimizer with curvature from the ODE blocks' backward solves.

    Args:
        model: the whole model (an ``nn.Module``); its ODE blocks are found by ``isinstance``.
            Horizon parameters (an ``ODEBlock.t`` that is an ``nn.Parameter``) are left out:
            control them with :class:`~node_ocp.HorizonOptimizer`.
        options: an :class:`~node_ocp.optim.options.OCNOptOptions` (None: the one default);
            the hyper-parameters below, given by keyword, override its fields
            (``OCNOpt(model, lr=0.1)`` or ``OCNOpt(model, opts, damping=1e-3)``). The ones
            in effect are ``opt.options``.
        lr: with ``step="model"``: an optional cap on the step scale η (None: no cap); with
            ``step="fixed"``: the step scale itself (required). A number or a schedule
            ``step -> value``.
        momentum: heavy-ball momentum in [0, 1) on the preconditioned directions.
        weight_decay: L2 coefficient (>= 0), added to the gradient before preconditioning.
        decay_in_model: False (default): the decay is in the gradient only; the trials
            judge the loss alone, so λ climbs and the regularised objective is not minimised
            (a ridge regression stalls; ``tests/test_decay_in_model.py``), which acts as a
            damping that regularises. True: the step models ``L + wd/2 |θ|²`` whole: the
            decay's curvature ``wd I`` is added to every unit's ``s (C + λ)``, and the trials
            of the held and the subspace step include the decay's change (ρ and κ are read
            on the objective the step models; ``cg_iters``' trials read the loss alone); it
            reaches the ridge solution, but on cnf_digits with ``wd = 1/N`` its step
            collapsed on every seed (bench_issue21.md §23), so it is not the default.
        curvature: ``"identity"``, ``"diagonal"``, ``"kfac"``, ``"ekfac"`` (default) or
            ``"dense"`` (see :mod:`node_ocp.optim.curvatures`).
        damping: the initial damping λ (> 0): relative to each unit's mean curvature
            eigenvalue (``damping_mode="relative"``, default) or absolute.
        update_every: refresh period of the curvature from the backward solves (>= 1).
        ekfac_decay: EKFAC's running-average coefficient of the eigenbasis scales in (0, 1]
            (1: K-FAC's eigenvalues; formerly ``alpha``, which still works with a
            ``DeprecationWarning``).
        sample_dt: spacing of the capture sample grid (> 0).
        factors: where the curvature statistics come from on refresh steps:
            ``"auto"`` (default): the Monte-Carlo Fisher of ``"sampled"`` when
            :meth:`backward` is handed a ``"categorical"`` likelihood (classifiers), drawn
            in a backward pass of its own (:mod:`.fisher_backward`); ``"empirical"``
            otherwise (regressors and forecasters, flows, a plain ``loss.backward()``; the
            measurements behind the rule are in :mod:`.fisher_backward`).
            ``"empirical"``: the loss's own backward pass (any loss).
            ``"sampled"``: the Monte-Carlo Fisher: factors drawn at the outputs, carried
            inside the backward solves where one chain of block calls leads to the output
            (:mod:`.factor_flow`, ``rank`` draws), else by a sampled backward pass of its own
            (one draw; every unit, outside layers included). ``"exact"``: all factors of
            the output Hessian, carried inside the backward solves (one chain of block
            calls only). ``"sampled"`` and ``"exact"`` need :meth:`backward` with
            ``outputs`` and ``likelihood`` on refresh steps. With ``feedback`` on,
            ``"auto"`` gives the stages empirical factors.
        step: ``"model"`` (default: η from the quadratic model, see
            :mod:`node_ocp.optim.step_control`) or ``"fixed"`` (η = ``lr``).
        adapt_every: a trial evaluation (through ``step(closure)``) every this many steps
            adapts η and λ (>= 1).
        adapt_damping: adapt λ from the reduction ratio (Levenberg–Marquardt).
        damping_mode: ``"relative"`` or ``"absolute"``.
        min_damping, max_damping: bounds of the adapted λ.
        kl_clip: None (default) or a float > 0: scale the update taken so that its model
            curvature ``δᵀ(C + λ)δ`` stays below ``kl_clip`` (the K-FAC safeguard).
        rank: Monte-Carlo factors per sample for ``factors="sampled"``.
        outside: rule for tapped layers and recurrent cells outside the ODE blocks (stems,
            heads, ``nn.GRUCell``/``nn.LSTMCell``/``nn.RNNCell``, each cell as its two affine
            maps): ``"kfac"`` (ordinary K-FAC statistics from the forward/backward pass,
            summed over every use of the layer in the forward, preconditioned with the
            variant), ``"diagonal"`` or ``"sgd"`` (plain gradient). Parameters of other
            layer types (norms, ...) get the diagonal rule (plain gradient with ``"sgd"``).
            May be set per group.
        diag_beta: running-average coefficient of the diagonal rule in [0, 1).
        stiff_ratio: a trial whose forward solve takes more than this many times the
            function evaluations of the step's own forward solve is treated as a failure.
        max_dense_params: ``curvature="dense"`` refuses a field with more parameters.
        nonfinite: ``"skip"`` (default: a step with a non-finite loss or gradient changes
            nothing, warns and counts in ``skipped_steps``) or ``"raise"``.
        groups: optional list of parameter-group dicts with per-group ``lr``, ``momentum``,
            ``weight_decay``, ``ekfac_decay``, ``outside``, ``diag_beta``; model parameters not
            listed go to a last, default group.
        feedback: ``"off"`` (default: every parameter takes the open-loop step),
            ``"gauss_newton"`` (feedback policies ``δθ_s = k_s + K_s δx_s`` across the
            model's stages with gains from the factor source, see :mod:`.feedback`; needs
            :meth:`backward` and ``step(closure)``) or ``"dense"`` (exact matrices and the
            backward Riccati recursion; tiny chain models, see :mod:`.feedback_dense`).
        feedback_every: a feedback sweep every this many steps (>= 1); the others are
            open-loop.
        feedback_clip: None, or the largest ratio (default 1) of a stage's gain term to its
            open-loop step in the held metric ``C + λ``; ignored by ``"dense"``.
        feedback_gain: the scale of the gain terms: ``"kappa"`` (default: the open-loop
            step's, ``1/κ`` or ``lr``) or ``"own"`` (that times ``β``, learnt from the sweep's
            loss against the open-loop trial on the steps that have both; see
            :mod:`node_ocp.optim.feedback_gain`).
        time_joint: True (default): the field layers' curvature is the time-joint one of the
            backward solves. False: the "standard EKFAC" baseline: ordinary K-FAC hooks on
            the field's layers, one statistic per solver evaluation, which needs blocks with
            ``gradient="direct"`` (backprop through the solver).
        calibrate_units: with ``step="model"`` (and a closure), one calibration scale per
            curvature unit, measured on refresh steps by one forward evaluation per unit
            (see :mod:`node_ocp.optim.unit_scales`). False: one ``κ`` for all.
        cg_iters: 0 (default: the held, block-diagonal direction) or the number of
            conjugate-gradient steps per step on the exact Gauss–Newton curvature of the whole
            model, preconditioned by the held curvature: the coupling between units that the
            held curvature leaves out (recurrent cells, fields and heads), at two forward and
            one backward evaluation of the batch per CG step (:mod:`.gauss_newton_cg`).
            Experimental; with ``curvature="identity"`` (plain CG), measured there: 4× lower
            MSE than tuned Adam at equal steps on an ODE-RNN forecaster, 15× its step time.
        cg_jv: how the ``cg_iters`` products form ``J v``: ``"central"`` (default): a
            central difference, two forward evaluations of the batch; ``"forward"``: a
            forward difference against the step's graph outputs, one forward evaluation
            (error O(ε) instead of O(ε²), ε ≈ √machine-ε; in float32 it cost progress per
            step on the ODE-RNN forecaster, ``bench_issue21.md`` §8).
        cg_graph: what the ``cg_iters`` products back-propagate ``Jᵀ`` through:
            ``"adjoint"`` (default): the blocks' own gradient (the own adjoint: one
            vector-Jacobian product per solver stage); ``"direct"``: a graph of the batch
            built with every ODE block of ``model`` backpropagating through its solver (the
            blocks' ``gradient`` is switched for the step's graph and its ``J v`` and trial
            forwards only; memory grows with the solver steps). Measured on the ODE-RNN
            forecaster: 3× cheaper backward (``bench_issue21.md`` §8).
        scale_power: ``p`` in (0, 1], or None (default: ½ on subspace steps, 1 otherwise):
            the ekfac and diagonal units divide by ``(s + λ)ᵖ`` instead of ``s + λ`` (``s``
            their diagonal in the eigenbasis; ½: Adam's square-root scaling in the Kronecker
            eigenbasis, as Shampoo/SOAP). Other curvatures accept only 1.
        numerator: ``"auto"`` (default: ``"average"`` on subspace steps, ``"gradient"``
            otherwise), ``"gradient"`` (the held directions precondition this step's
            gradient) or ``"average"`` (its bias-corrected running average with coefficient
            ``numerator_beta``, default 0.9: Adam's first moment). The units' statistics come
            from the gradient either way.
        subspace: ``"auto"`` (default: ``"parts"`` for a model with a recurrent layer —
            ``nn.GRUCell``, ``nn.LSTM``, ... — with ``step="model"``, no ``cg_iters``, one
            process and a closure whose loss is computed from its outputs; ``"off"``
            otherwise, see :func:`.subspace.automatic`), ``"off"`` (the
            held step), ``"parts"``: the held directions, one per top-level child module of
            the model, and the previous update combined by the exact, coupled Gauss–Newton
            model of the batch, the step checked on the batch every step
            (:mod:`.subspace`; needs ``step(closure)`` with a closure returning ``(loss,
            outputs)``, the loss computed from the outputs, or ``(loss, outputs,
            loss_inputs)``, else the held step is taken with one warning; one forward and
            backward with a graph through the solvers and ``k + 1`` double-backward products
            per step), or ``"whole"``: the same with the held direction whole. Measured in
            ``bench_issue21.md`` §20–21.
        subspace_held: ``μ ≥ 0``, default 0.3: the weight of the held curvature along each
            direction in the subspace step's model, ``M + λ diag M + μ diag Q`` (:mod:`.subspace`):
            it keeps the step along a direction the batch's exact model finds flat near
            ``1/μ`` held steps (with ``numerator="gradient"``; a soft limit that follows the
            batch's gradient with the default running average). 0: the exact model alone
            (the default before ``bench_issue21.md`` §27, where it is measured).
        between_refreshes: the ODE blocks' gradient on the steps that gather no curvature
            (all but every ``update_every``-th): ``"own"`` (default: the blocks' own, the own
            adjoint at O(1) memory in the solver steps) or ``"direct"`` (backprop through the
            solvers: memory grows with the solver steps, as with ``gradient="direct"``; the
            gradient costs what a first-order optimizer's does with ``gradient="direct"``,
            exact for the discretised solve). Refresh steps always run the own adjoint,
            whose backward solve gathers the time-joint curvature; a block with per-sample
            step control whose time grid needs a gradient (a horizon control) keeps it on
            every step. Subspace steps backpropagate through the solvers either way. Not
            with ``feedback`` or ``cg_iters``. Measured in ``bench_issue21.md`` §28.
        schedule: None, or a callable ``step -> factor`` that multiplies every step taken
            (warm-up, cosine decay; the step α of the model step, ``lr`` of the fixed one).
        seed: seed of the optimizer's own generator (sampled factors).
        distributed: average statistics and trial measurements over the processes of the
            default torch.distributed group (None: when a group with more than one process
            is initialised). Use it with ``DistributedDataParallel`` and equal per-process
            batches: every process then holds the same state, λ and η.
        eigh_spread_min_dim: under ``distributed``, a unit whose larger factor has at least
            this many rows is decomposed by one process and broadcast.
    """

    def __init__(
        self,
        model: nn.Module,
        options: OCNOptOptions | None = None,
        *,
        groups: list[dict] | None = None,
        schedule: Callable[[int], float] | None = None,
        **overrides,
    ):
        if not isinstance(model, nn.Module):
            raise bad_type("model", model, "an nn.Module (the whole model)")
        if options is None:
            options = OCNOptOptions()
        elif not isinstance(options, OCNOptOptions):
            raise bad_type(
                "options",
                options,
                "an OCNOptOptions (or None); hyper-parameters by keyword, OCNOpt(model, lr=...)",
            )
        o = options.replace(**overrides).checked()
        automatic = o.subspace == "auto"
        across = dist.is_distributed() if o.distributed is None else o.distributed
        o = o.resolved(model, across_processes=bool(across) and dist.world_size() > 1)
        self.options = o  # with the automatic choices made (``subspace``, ``scale_power``, ...)
        # ``subspace="auto"`` chose a subspace step: the first step checks that the closure
        # gives outputs the loss is computed from (else the run keeps the held step)
        self._auto_pending = automatic and o.subspace != "off"
        self.curvature = o.curvature
        self.factors = o.factors
        self.step_mode = o.step
        self.update_every = o.update_every
        self.rank = o.rank
        self.max_dense_params = o.max_dense_params
        self.nonfinite = o.nonfinite
        self._raise_nonfinite = o.nonfinite == "raise"
        self.sample_dt = o.sample_dt
        self.damping_mode = o.damping_mode
        self._relative = o.damping_mode == "relative"
        self.feedback = o.feedback
        self.feedback_every = o.feedback_every
        self.feedback_clip = o.feedback_clip
        self.feedback_gain = o.feedback_gain
        self.time_joint = o.time_joint
        if schedule is not None and not callable(schedule):
            raise bad_type("schedule", schedule, "None or a callable step -> factor")
        self._schedule = schedule
        self.distributed = o.distributed
        self.eigh_spread_min_dim = o.eigh_spread_min_dim
        self.kl_clip = o.kl_clip
        stepper = STEPPERS[self.step_mode]
        defaults = o.group_defaults()
        self.model = model
        self.blocks = [m for m in model.modules() if isinstance(m, ODEBlock)]
        self._set_direct(False)  # blocks an earlier optimizer of this model left direct
        _check_model(model, self.blocks, o)
        horizons = {id(b.t) for b in self.blocks if isinstance(b.t, nn.Parameter)}
        params = [p for p in model.parameters() if id(p) not in horizons]
        super().__init__(_build_groups(params, groups), defaults)
        for g in self.param_groups:
            _check_group(g, stepper.requires_lr)
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._pre = Preconditioner(
            model,
            self.curvature,
            self._group_of,
            self.state,
            max_dense_params=o.max_dense_params,
            time_joint=o.time_joint,
            sample_dt=o.sample_dt,
            eigh_spread_min_dim=o.eigh_spread_min_dim,
        )
        self._generator = torch.Generator().manual_seed(o.seed)
        self._factor_source = FACTOR_SOURCES_BY_NAME[o.factors](o.rank, self._generator)
        self._cg = (
            GaussNewtonCG(
                o.cg_iters,
                1.0,
                self.state,
                jv=o.cg_jv,
                backprop=_backprop(model) if o.cg_graph == "direct" else None,
            )
            if o.cg_iters
            else None
        )
        self._warned_fallback: set[str] = set()  # options whose fallback was warned of
        self._subspace = (
            SubspaceStep(
                model,
                o.subspace,
                self.state,
                backprop=_backprop(model),
                held_weight=o.subspace_held,
            )
            if o.subspace != "off"
            else None
        )
        self._keep_graph = False  # the coming step's backward keeps its graph (subspace)
        # the step's (loss, outputs, loss_inputs) and parameter versions, kept for subspace
        self._graph: tuple | None = None
        self._lm = LevenbergMarquardt(
            o.damping, o.min_damping, o.max_damping, enabled=o.adapt_damping
        )
        self._control = StepControl(
            self.step_mode, adapt_every=o.adapt_every, stiff_ratio=o.stiff_ratio
        )
        self._trials = Trials(self.blocks, self._reduces)
        self._stepper = self._make_stepper()
        self._calibration = UnitCalibration(enabled=o.calibrate_units and stepper.calibrates)
        self._unit_groups: list | None = None  # built at the first sweep
        self._step = 0
        self.skipped_steps = 0
        self._statistics_route = EMPIRICAL  # of the coming refresh (set by backward)
        self._observed: Observed | None = None
        self._nfe_mark = 0
        self._warned_no_closure = False
        self.last_clip = 1.0
        self.last_adaptation: Adaptation | None = None
        self._feedback_runner = FeedbackRunner(
            o.feedback,
            o.feedback_every,
            model,
            self._factor_source.stage_source,
            o.rank,
            self._generator,
            o.feedback_clip,
            o.max_dense_params,
            fixed_step=stepper.requires_lr,
            gain=o.feedback_gain,
        )
        self._arm_if_due()

    # ------------------------------------------------------------------ introspection
    def __repr__(self) -> str:
        u = self._units
        head = (
            f"OCNOpt(curvature={self.curvature!r}, factors={self.factors!r}, "
            f"step={self.step_mode!r}, update_every={self.update_every}, "
            f"adapt_every={self._control.adapt_every}, damping={self.damping:.3g} "
            f"({self.damping_mode}), kappa={self.calibration:.3g}, blocks={len(self.blocks)}, "
            f"units={len(u.units)} ({len(u.inside)} layers in ODE fields, {len(u.outside)} "
            f"outside, {len(u.blocks)} dense), step={self._step})"
        )
        lines = [head]
        for i, g in enumerate(self.param_groups):
            hp = ", ".join(f"{k}={g[k]}" for k in GROUP_KEYS[1:])
            n = sum(p.numel() for p in g["params"])
            lines.append(f"  group {i}: {len(g['params'])} tensors ({n} values), {hp}")
        return "\n".join(lines)

    @property
    def schedule(self) -> Callable[[int], float] | None:
        """None, or ``step -> factor`` multiplying every step taken (the stepper's)."""
        return self._schedule

    @schedule.setter
    def schedule(self, value: Callable[[int], float] | None) -> None:
        if value is not None and not callable(value):
            raise bad_type("schedule", value, "None or a callable step -> factor")
        self._schedule = value
        if hasattr(self, "_stepper"):
            self._stepper.schedule = value

    def _make_stepper(self):
        return STEPPERS[self.step_mode](
            self._control, self._group_of, self.state, self.schedule, self._trials.agree
        )

    @property
    def _units(self):
        return self._pre.units

    @property
    def _collector(self):
        return self._pre.collector

    @property
    def _capture(self) -> CurvatureCapture | None:
        return self._pre.capture

    @property
    def last_reduce(self) -> dict:
        """What the last refresh's reduce across processes did (:mod:`.reduce`)."""
        return self._pre.last_reduce

    @property
    def steps_taken(self) -> int:
        """Number of steps applied so far (skipped steps not counted)."""
        return self._step

    @property
    def damping(self) -> float:
        """The current damping λ (relative or absolute, see ``damping_mode``)."""
        return self._lm.value

    @property
    def step_scale(self) -> float:
        """The step α of the last update along ``u`` (``step="model"``)."""
        return self._control.alpha

    @property
    def calibration(self) -> float:
        """κ: the held curvature's calibration to the Gauss–Newton curvature (NaN before
        the first step)."""
        kappa = self._control.kappa
        return float("nan") if kappa is None else kappa

    @property
    def units(self) -> list:
        """The curvature units, in model order (see :mod:`node_ocp.optim.units`)."""
        return list(self._units.units)

    def unit_of(self, module: nn.Module):
        """The unit of a tapped layer or an ODE block, or None."""
        return self._pre.unit_of(module)

    @property
    def capture(self) -> CurvatureCapture | None:
        """The curvature capture of the coming refresh step (None between refreshes)."""
        return self._capture

    @property
    def refresh_due(self) -> bool:
        """True when the coming step gathers curvature."""
        return self._pre.armed

    @property
    def adapt_due(self) -> bool:
        """True when the coming step evaluates a trial (given a closure)."""
        return self._control.due(self._step) and self._stepper.adapts(self._lm)

    @property
    def generator(self) -> torch.Generator:
        """The CPU generator of the optimizer's own draws (sampled factors); in
        ``state_dict``. Under torch.distributed each process has its own."""
        return self._generator

    def memory_usage(self) -> dict[str, int]:
        """Bytes held by the optimizer's state: per curvature variant and the momentum
        buffers."""
        out = self._pre.memory_usage()
        buffers = 0
        for p in self._group_of:
            for key in ("direction_buffer", "previous_update"):
                buf = self.state[p].get(key)
                if buf is not None:
                    buffers += buf.numel() * buf.element_size()
        out["momentum"] = buffers
        out["total"] = sum(out.values())
        return out

    # ------------------------------------------------------------------ feedback
    @property
    def feedback_due(self) -> bool:
        """True if this step is a feedback sweep (``feedback`` on, every ``feedback_every``)."""
        return self._feedback_runner.due(self._step)

    @property
    def feedback_steps(self) -> int:
        """Feedback sweeps run so far (fallbacks to the open-loop update included)."""
        return self._feedback_runner.steps

    @property
    def feedback_failures(self) -> int:
        """Feedback sweeps that fell back to the open-loop update."""
        return self._feedback_runner.failures

    @property
    def last_feedback(self) -> FeedbackReport | None:
        """What the last feedback sweep did (:class:`~.feedback.FeedbackReport`), or None."""
        return self._feedback_runner.last

    @property
    def feedback_gain_scale(self) -> float:
        """``β``, the multiplier of the gain terms' scale (1 unless ``feedback_gain="own"``
        has learnt otherwise; :mod:`.feedback_gain`)."""
        return self._feedback_runner.gain.scale

    # ------------------------------------------------------------------ collect: arming
    def _arm_if_due(self) -> None:
        self._disarm()
        self._statistics_route = EMPIRICAL
        self._feedback_runner.arm(self._step)
        between = (
            not self._auto_pending
            and self._step % self.update_every != 0
            and self.feedback == "off"
        )
        self._set_direct(
            between and (self._subspace is not None or self.options.between_refreshes == "direct"),
            keep_graph=self._subspace is not None,
        )
        if self._step % self.update_every != 0:
            return
        self._pre.arm(carry_factors=self._factor_source.carries_factors)

    def _disarm(self) -> None:
        self._pre.disarm()

    def _versions(self) -> list[int]:
        """The parameters' in-place version counters (a kept graph is valid while they stay)."""
        return [p._version for g in self.param_groups for p in g["params"]]

    def _set_direct(self, on: bool, keep_graph: bool = True) -> None:
        """Steps between refreshes with a subspace step or ``between_refreshes="direct"``:
        the ODE blocks backpropagate through their solvers in the coming forward
        (``gradient="direct"``); with ``keep_graph`` (subspace steps) :meth:`backward` keeps
        the step's graph for the exact products (:mod:`.subspace`) instead of the step
        building one of its own. Refresh steps keep the blocks' own gradient (the own
        adjoint's time-joint curvature capture). The block's own setting is kept on the
        block (:data:`_OWN_GRADIENT`), so that a new optimizer of the same model (a resumed
        run) restores it."""
        self._keep_graph = on and keep_graph
        for b in self.blocks:
            if on and not hasattr(b, _OWN_GRADIENT) and _can_backprop(b):
                setattr(b, _OWN_GRADIENT, b.gradient)
                b.gradient = "direct"
            elif not on and hasattr(b, _OWN_GRADIENT):
                if b.gradient == "direct":  # not changed by the user since
                    b.gradient = getattr(b, _OWN_GRADIENT)
                delattr(b, _OWN_GRADIENT)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim``; also marks where this step's forward solves begin."""
        self._nfe_mark = self._trials.forward_nfe()
        super().zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ backward
    def backward(
        self,
        loss: torch.Tensor,
        outputs: torch.Tensor | None = None,
        likelihood: str | None = None,
        retain_graph: bool = False,
        loss_inputs: torch.Tensor | None = None,
    ) -> None:
        """``loss.backward()``, handing the optimizer what its stages need.

        Args:
            loss: the scalar training loss (a mean over the batch); the step control compares
                the trial loss with it.
            outputs: the model output the likelihood is about (logits, predictions, or the
                latent ``z`` of a flow). With ``likelihood`` it gives the step control the
                exact Gauss–Newton curvature along the update, and the sampled and exact
                factor sources their factors on refresh steps (needed there).
            likelihood: ``"categorical"``, ``"gaussian"`` or ``"standard_normal"``.
            retain_graph: keep the graph after the backward pass (as ``loss.backward``).
            loss_inputs: where the loss has terms ``outputs`` do not determine (a latent
                ODE's KL term), a tensor the loss is computed from alone (any shape; the
                parameters reach the loss only through it), for the subspace step's exact
                model; the step's closure then returns ``(loss, outputs, loss_inputs)``.
        """
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise bad_type("loss", loss, "a scalar tensor")
        if likelihood is not None:
            check_choice("likelihood", likelihood, LIKELIHOODS)
        if outputs is not None and (
            not isinstance(outputs, torch.Tensor) or not outputs.requires_grad
        ):
            raise bad_value(
                "outputs", outputs, "the model output tensor, part of the graph of the loss"
            )
        if loss_inputs is not None and (
            not isinstance(loss_inputs, torch.Tensor) or not loss_inputs.requires_grad
        ):
            raise bad_value(
                "loss_inputs", loss_inputs, "a tensor the loss is computed from, in its graph"
            )
        observed = Observed(
            float(loss.detach()), forward_nfe=self._trials.forward_nfe() - self._nfe_mark
        )
        self._observed = observed
        runner = self._feedback_runner
        feedback = runner.recording
        retain = retain_graph
        if feedback:
            retain = runner.end_recording() or retain
        route = EMPIRICAL  # of the refresh's statistics (:mod:`.factor_sources`)
        if self.refresh_due:
            route = self._factor_source.route(outputs, likelihood, self._capture)
        self._statistics_route = route
        retain = (
            route.before_backward(
                loss,
                outputs,
                likelihood,
                capture=self._capture,
                params=self._group_of,
                pause=self._paused,
                quiet=runner.paused,
            )
            or retain
        )
        handle = observed.watch(outputs, likelihood)  # after the flow's pull-backs
        # see :meth:`_set_direct`
        keep = self._keep_graph and (outputs is not None or loss_inputs is not None)
        try:
            with self._collector.paused() if route.pauses_collector else nullcontext():
                loss.backward(retain_graph=retain or keep)
        finally:
            if handle is not None:
                handle.remove()
        self._graph = ((loss, outputs, loss_inputs), self._versions()) if keep else None
        if feedback:
            runner.prepare(outputs, likelihood, self._stage_params)

    @contextmanager
    def _paused(self):
        """Statistics of the outside layers and kept stage gradients stop inside."""
        with self._collector.paused(), self._feedback_runner.paused():
            yield

    def _stage_params(self, module: nn.Module) -> set:
        return {p for p in module.parameters() if p in self._group_of}

    # ------------------------------------------------------------------ step
    def skip_step(self) -> None:
        """Drop the step whose backward pass failed (a solver error inside
        :meth:`backward`): its gradients, the statistics it gathered and what it handed the
        step go, the parameters and the step count stay, it is counted in
        ``skipped_steps``, and the coming forward pass is armed as this one was."""
        self.zero_grad(set_to_none=True)
        self._observed, self._graph = None, None
        self.skipped_steps += 1
        self._arm_if_due()

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """Apply one update.

        ``closure`` (optional, recommended): re-evaluates the loss of *this step's batch* at
        the model's current parameters, without backward (OCNOpt calls it under
        ``torch.no_grad`` at trial parameters every ``adapt_every`` steps), and returns the
        loss, ``(loss, outputs)`` or ``(loss, outputs, loss_inputs)`` (see :meth:`backward`;
        ``outputs`` may be None there). Returns the last trial loss, or None.
        """
        observed, self._observed = self._observed, None
        graph, self._graph = self._graph, None
        if not self._all_finite():
            return None
        if self._auto_pending:
            self._settle_auto(closure)
        step = self._step
        if self.refresh_due:
            self._factor_source.check_handed_over(step, self._capture, self._statistics_route)
            self._refresh()
        grads = self._gradients(step)
        # the decay whose curvature the held model and the trials carry (none: as without)
        decay = self._decay() if self.options.decay_in_model else {}
        self._pre.decay = {p: wd for p, wd in decay.items() if wd}
        damping = Damping(self._lm.value, self._relative, self.options.scale_power)
        # per-part calibration scales are absorbed by the subspace's per-part coefficients
        per_part = self._subspace is not None and self._subspace.how == "parts"
        if self._calibration.due(step, self.update_every) and closure is not None and not per_part:
            observed = observed or self._trials.here(closure)
            self._sweep_units(closure, observed, grads, damping)
        directions = self._pre.directions(grads, damping, self._numerator(grads))
        if self._cg is not None:
            coupled = self._coupled(grads, directions, closure, damping)
        elif self._subspace is not None:
            if graph is not None and graph[1] != self._versions():
                graph = None  # the calibration sweep moved the parameters in place
            coupled = self._subspace_step(grads, directions, closure, graph and graph[0], damping)
        else:
            coupled = None
        open_loss = None  # L(θ + δ) on the batch, where a trial evaluated the δ taken
        if coupled is not None:  # a truncated Gauss–Newton step (:mod:`.gauss_newton_cg`)
            update, trial_loss = coupled
        else:
            update, trial_loss = self._held_step(
                grads, directions, step, observed, closure, damping
            )
            open_loss = trial_loss
        if update is not None:
            if self.kl_clip is not None:
                update = self._clip(update, damping)
                open_loss = None
            update, sweep_loss = self._feedback_runner.apply(
                update, closure, step, lambda: self._sweep_context(damping), open_loss
            )
            trial_loss = trial_loss if sweep_loss is None else sweep_loss
            self._stepper.remember(update, step)
        self._feedback_runner.clear()
        self._step += 1
        self._arm_if_due()
        return trial_loss

    def _held_step(self, grads, directions, step, observed, closure, damping):
        """The stepper's update along the held directions, checked by a trial on adaptation
        steps; ``(update or None, the trial loss or None)``."""
        update = self._stepper.plan(
            grads, directions, step, observed, lambda v: self._pre.quadratic(v, damping)
        )
        trial_loss = None
        if self.adapt_due and closure is not None:
            update, trial_loss, self.last_adaptation = self._trials.adapt(
                closure,
                observed,
                grads,
                update,
                step,
                stepper=self._stepper,
                lm=self._lm,
                quadratic=self._pre.quadratic,
                damping=damping,
                decay=self._pre.decay,
            )
        elif self._stepper.needs_closure and closure is None:
            self._warn_no_closure()
        return update, trial_loss

    def _coupled(self, grads: dict, directions: dict, closure, damping: Damping):
        """``cg_iters``: a truncated Gauss–Newton step on the whole model's curvature,
        preconditioned by the held one (:mod:`.gauss_newton_cg`): ``(update or None, trial
        loss)``; None (the held step instead, with one warning) where the step has no
        closure, the closure returns no outputs, or the curvature along ``u`` is not
        positive."""
        if self._reduces() and dist.world_size() > 1:
            raise ValueError(
                "cg_iters: received a value > 0 in a run across processes; accepted: 0 there "
                "(the Gauss–Newton products are not averaged over processes yet)"
            )
        if closure is not None:
            taken = self._cg.step(
                grads,
                directions,
                lambda r: self._pre.solve(r, damping),
                closure,
                self._decay(),
                self._paused,
            )
            if self._cg.last_iters > 0:
                return taken
        why = "no closure" if closure is None else self._cg.last_reason
        self._warn_fallback("cg_iters", why, "a closure returning (loss, outputs)")
        return None

    def _numerator(self, grads: dict) -> dict | None:
        """``numerator="average"``: the bias-corrected running average of the gradients,
        ``m ← β m + (1 − β) g``, ``m / (1 − βᵗ)`` (kept per parameter as ``numerator_avg``);
        None for ``"gradient"`` (the held directions precondition ``g`` itself)."""
        if self.options.numerator == "gradient":
            return None
        beta = self.options.numerator_beta
        out = {}
        for p, g in grads.items():
            st = self.state[p]
            if "numerator_avg" not in st or st["numerator_avg"].shape != g.shape:
                st["numerator_avg"], st["numerator_t"] = torch.zeros_like(g), 0
            st["numerator_t"] += 1
            st["numerator_avg"].mul_(beta).add_(g, alpha=1.0 - beta)
            out[p] = st["numerator_avg"] / (1.0 - beta ** st["numerator_t"])
        return out

    def _settle_auto(self, closure) -> None:
        """``subspace="auto"`` chose a subspace step: keep it if ``closure`` returns
        ``(loss, outputs)`` with the loss computed from the outputs (one evaluation of the
        batch, first step only); otherwise turn it off for the run, with the held step's own
        rule (``scale_power=1``, ``numerator="gradient"``), silently (a loss alone; a bound
        read through ``loss_inputs``, where the held step measured better,
        ``bench_issue21.md`` §21)."""
        self._auto_pending = False
        if closure is not None and self._subspace.accepts(closure, self._paused, outputs_only=True):
            return
        self._subspace = None
        self._set_direct(False)
        self.options = self.options.replace(subspace="off", scale_power=1.0, numerator="gradient")

    def _subspace_step(self, grads: dict, directions: dict, closure, graph, damping: Damping):
        """``subspace``: the held directions per part and the previous update combined by the
        exact coupled model of the batch (:mod:`.subspace`): ``(update or None, trial loss)``;
        None (the held step instead, with one warning) where the step has no closure or the
        closure returns no outputs its loss is computed from."""
        if self._reduces() and dist.world_size() > 1:
            raise ValueError(
                f"subspace: received {self.options.subspace!r} in a run across processes; "
                "accepted: 'off' there (the exact products are not averaged over processes yet)"
            )
        if closure is not None:
            taken = self._subspace.step(
                grads,
                directions,
                closure,
                self._decay(),
                self._paused,
                graph,
                decay_in_trials=bool(self._pre.decay),
                held_quadratic=lambda v: self._pre.quadratic(v, damping),
            )
            if taken is not None:
                return taken
        why = "no closure" if closure is None else self._subspace.last_reason
        self._warn_fallback(
            "subspace",
            why,
            "a closure returning (loss, outputs), the loss computed from them, or "
            "(loss, outputs, loss_inputs)",
        )
        return None

    def _warn_fallback(self, option: str, why: str, needs: str) -> None:
        """One warning per option, the first time its step falls back to the held step."""
        if option in self._warned_fallback:
            return
        self._warned_fallback.add(option)
        warnings.warn(
            f"OCNOpt: {option}: {why}; the step keeps the held step ({option} needs "
            f"step(closure) with {needs}).",
            RuntimeWarning,
            stacklevel=5,
        )

    def _decay(self) -> dict:
        """Parameter -> its weight decay at this step."""
        return {
            p: value_at(g["weight_decay"], self._step)
            for g in self.param_groups
            for p in g["params"]
        }

    def _sweep_context(self, damping: Damping) -> SweepContext:
        """What a feedback sweep needs from the optimizer (``damping``: the step's)."""
        return SweepContext(
            self._units.units,
            damping,
            Damping(self._lm.value, damping.relative, damping.power),
            self._stepper.gain_scale(self._step),
            self._reduces(),
            self._stage_params,
        )

    # ------------------------------------------------------------------ stages
    def _refresh(self) -> None:
        """collect → reduce across processes → decompose (:mod:`.preconditioner`)."""
        self._pre.refresh(
            empirical=self._statistics_route.empirical,
            reduces=self._reduces(),
            keep_records=not self.feedback_due,
        )

    def _reduces(self) -> bool:
        return dist.is_distributed() if self.distributed is None else self.distributed

    def _gradients(self, step: int) -> dict[torch.Tensor, torch.Tensor]:
        grads = {}
        for group in self.param_groups:
            wd = value_at(group["weight_decay"], step)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grads[p] = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
        return grads

    def _warn_no_closure(self) -> None:
        if not self._warned_no_closure:
            self._warned_no_closure = True
            warnings.warn(
                "OCNOpt: step='model' without a closure keeps the curvature calibration "
                "and the damping where they are; pass step(closure) (see OCNOpt.step) for "
                "steps checked on the batch.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _sweep_units(self, closure, observed, grads: dict, damping: Damping) -> None:
        """Measure every unit's own calibration on the batch (:mod:`.unit_scales`)."""
        names = {p: n for n, p in self.model.named_parameters()}

        def evaluate() -> tuple[float, float]:
            loss, gn, _ = self._trials.evaluate(closure, observed)
            return loss - observed.loss, gn

        if self._unit_groups is None:
            self._unit_groups = unit_groups(self.model, self.blocks, self._units.units)
        (loss,) = self._trials.agree([observed.loss])  # the probes' size: the same everywhere
        self._calibration.sweep(
            self._unit_groups,
            grads,
            damping,
            loss,
            evaluate,
            self._trials.agree,
            label=lambda u: names.get(u.params[0], "?"),
        )

    def _clip(self, update: dict, damping: Damping) -> dict:
        """``δ ν`` with ``ν = min(1, sqrt(kl_clip / δᵀ(C + λ)δ))`` (kept in ``last_clip``)."""
        quad = self._pre.quadratic(update, damping)
        nu = min(1.0, (self.kl_clip / quad) ** 0.5) if quad > 0 else 1.0
        self.last_clip = nu
        return {p: d * nu for p, d in update.items()}

    def _all_finite(self) -> bool:
        """Whether every gradient is finite; if not, the step is skipped (``nonfinite``:
        ``"skip"``: warned, counted and this step's statistics dropped) or raises."""
        checks = [
            p.grad.isfinite().all()
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None
        ]
        if not checks or bool(torch.stack(checks).all()):
            return True
        msg = (
            f"OCNOpt: non-finite gradient at step {self._step}; the step was skipped "
            "and the optimizer state is unchanged."
        )
        if self._raise_nonfinite:
            raise FloatingPointError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        self.skipped_steps += 1
        self._pre.forget()
        self._statistics_route = EMPIRICAL  # the factors handed over went with the step
        return False

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["ocnopt"] = {
            "step": self._step,
            "skipped_steps": self.skipped_steps,
            **self._feedback_runner.state_dict(),
            "generator": self._generator.get_state(),
            "curvature": self.curvature,
            "factors": self.factors,
            "samples": self._pre.samples,
            "damping": self._lm.state_dict(),
            "control": self._control.state_dict(),
            "unit_calibration": self._calibration.state_dict(),
            "last_adaptation": None
            if self.last_adaptation is None
            else self.last_adaptation.as_dict(),
            "param_shapes": [list(p.shape) for g in self.param_groups for p in g["params"]],
        }
        if self._cg is not None:
            sd["ocnopt"]["cg_damping"] = self._cg.damping
        sd["ocnopt"]["subspace"] = self.options.subspace
        sd["ocnopt"]["auto_pending"] = self._auto_pending
        if self._subspace is not None:
            sd["ocnopt"]["subspace_damping"] = self._subspace.damping
        return sd

    def _check_shapes(self, extra: dict, state: dict) -> None:
        """The saved parameters' shapes against this model's; the first that differs named."""
        params = [p for g in self.param_groups for p in g["params"]]
        names = {p: n for n, p in self.model.named_parameters()}
        saved = extra.get("param_shapes")
        if saved is None:  # an older state dict: the param-shaped buffers tell
            saved = [None] * len(params)
            for i, st in state.get("state", {}).items():
                for key in ("direction_buffer", "previous_update"):
                    if key in st and int(i) < len(saved):
                        saved[int(i)] = list(st[key].shape)
        if len(saved) != len(params):
            raise bad_value(
                "state_dict",
                f"{len(saved)} parameters",
                f"the {len(params)} parameters of this optimizer (another model?)",
            )
        for p, shape in zip(params, saved):
            if shape is not None and list(p.shape) != list(shape):
                raise bad_value(
                    "state_dict",
                    f"parameter {names.get(p, '?')!r} of shape {tuple(shape)}",
                    f"shape {tuple(p.shape)}, this model's (the state comes from another "
                    "model or width)",
                )

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = _renamed_saved_groups(dict(state_dict))
        extra = state_dict.pop("ocnopt", None)
        if extra is None:
            raise bad_value(
                "state_dict", "a dict without 'ocnopt'", "a dict from OCNOpt.state_dict()"
            )
        if extra["curvature"] != self.curvature:
            raise bad_value(
                "state_dict",
                f"curvature={extra['curvature']!r}",
                f"the curvature of this optimizer ({self.curvature!r})",
            )
        self._check_shapes(extra, state_dict)
        super().load_state_dict(state_dict)
        self._step = int(extra["step"])
        self.skipped_steps = int(extra["skipped_steps"])
        self._feedback_runner.load_state_dict(extra)
        self._generator.set_state(extra["generator"])
        self._pre.samples = float(extra["samples"])
        self._lm.load_state_dict(extra["damping"])
        self._control.load_state_dict(extra["control"])
        self._calibration.load_state_dict(extra.get("unit_calibration", {}))
        last = extra.get("last_adaptation")
        self.last_adaptation = None if last is None else Adaptation(**last)
        if self._cg is not None:
            self._cg.state = self.state  # the loaded state (its previous CG solutions)
            self._cg.damping = float(extra.get("cg_damping", self._cg.damping))
        pending = bool(extra.get("auto_pending", False))
        if self._subspace is not None and extra.get("subspace", "off") == "off" and not pending:
            self._settle_auto(None)  # the saved run took held steps (or predates subspace)
        self._auto_pending = self._auto_pending and pending
        if self._subspace is not None:
            self._subspace.state = self.state  # the loaded state (its previous updates)
            self._subspace.damping = float(extra.get("subspace_damping", self._subspace.damping))
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._pre.build(self._group_of, self.state)
        self._stepper = self._make_stepper()
        self._unit_groups = None
        self._arm_if_due()


def _check_model(model: nn.Module, blocks: list, o: OCNOptOptions) -> None:
    """Refuse options the model's blocks cannot serve."""
    adjoint = [b.name for b in blocks if b.gradient == "adjoint"]
    if not o.time_joint and adjoint:
        raise bad_value(
            "time_joint",
            False,
            "False only for models whose ODE blocks use gradient='direct' (the ordinary "
            f"K-FAC hooks see the field only in backprop through the solver); {adjoint[0]} "
            "uses 'adjoint'",
            "Build the blocks with gradient='direct', or keep time_joint=True.",
        )
    needs = VARIANTS[o.curvature].needs
    if not blocks and (needs == "dense" or (needs is not None and o.outside != "kfac")):
        # without blocks only the layers' own hooks can hold Kronecker factors
        raise bad_value(
            "model",
            type(model).__name__,
            f"a model containing at least one ODEBlock for curvature={o.curvature!r}"
            + ("" if needs == "dense" else f" with outside={o.outside!r}"),
            "Use curvature='ekfac' or 'kfac' with outside='kfac' (Kronecker factors from "
            "the model's own layers), or curvature='identity' or 'diagonal'.",
        )


def _build_groups(params: list, groups: list[dict] | None) -> list[dict]:
    if groups is None:
        return [{"params": params}]
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise bad_type("groups", groups, "a list of dicts {'params': [...], ...}")
    listed = set()
    out = []
    for g in groups:
        if "params" not in g:
            raise bad_value("groups", g, "dicts with a 'params' entry")
        unknown = sorted(set(g) - set(GROUP_KEYS) - set(RENAMED))
        if unknown:
            raise bad_value(
                "groups[...]",
                f"keys {unknown}",
                "the keys " + ", ".join(repr(k) for k in GROUP_KEYS),
            )
        g = renamed_keys(g, "groups[...]")
        ps = list(g["params"]) if isinstance(g["params"], Iterable) else [g["params"]]
        listed.update(id(p) for p in ps)
        out.append({**g, "params": ps})
    rest = [p for p in params if id(p) not in listed]
    if rest:
        out.append({"params": rest})
    return out


def _renamed_saved_groups(state_dict: dict) -> dict:
    """A state dict saved before a group key was renamed (:data:`.options.RENAMED`): its
    groups under the new names (checkpoints written before the rename still load)."""
    if "param_groups" in state_dict:
        state_dict["param_groups"] = [
            {RENAMED.get(k, k): v for k, v in g.items()} for g in state_dict["param_groups"]
        ]
    return state_dict


def _check_group(g: dict, requires_lr: bool) -> None:
    if g["lr"] is not None or requires_lr:
        check_hyper("groups[...]['lr']", g["lr"], 0, math.inf, True, True, "a float > 0")
    check_hyper("groups[...]['momentum']", g["momentum"], 0, 1, False, True, "a float in [0, 1)")
    check_hyper(
        "groups[...]['weight_decay']", g["weight_decay"], 0, math.inf, False, True, "a float >= 0"
    )
    check_hyper(
        "groups[...]['ekfac_decay']", g["ekfac_decay"], 0, 1, True, False, "a float in (0, 1]"
    )
    check_hyper("groups[...]['diag_beta']", g["diag_beta"], 0, 1, False, True, "a float in [0, 1)")
    check_choice("groups[...]['outside']", g["outside"], OUTSIDE_RULES)


def _can_backprop(block: ODEBlock) -> bool:
    """Whether ``block`` can backpropagate through its solver in training: not with per-sample
    step control and a time grid that needs a gradient (a horizon control), which only the
    own adjoint serves."""
    return not (block.step_control == "per_sample" and block.t.requires_grad)


def _backprop(model: nn.Module):
    """A context factory: every ODE block of ``model`` with ``gradient="direct"`` inside
    (backprop through its solver), its own setting restored on leaving."""
    blocks = [m for m in model.modules() if isinstance(m, ODEBlock)]

    @contextmanager
    def direct():
        saved = [b.gradient for b in blocks]
        try:
            for b in blocks:
                b.gradient = "direct"
            yield
        finally:
            for b, g in zip(blocks, saved):
                b.gradient = g

    return direct
