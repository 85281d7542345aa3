"""One interface between the training loop and any optimizer.

The loop, ``train_step``, ``bench``, ``compare`` and the schedules talk to an
:class:`OptimizerAdapter`, never to the optimizer's type or its config kind string:

- :class:`OptimizerAdapter` — the ``torch.optim`` contract: ``loss.backward()`` then
  ``step()``; every step is ``plain``; a schedule is a ``LambdaLR``.
- :class:`OCNOptAdapter` — :class:`~node_ocp.OCNOpt`: ``backward(loss, outputs,
  likelihood)`` then ``step(closure)`` (the closure re-evaluates the batch for its trial);
  steps are plain / adapt / refresh; it applies a schedule itself; its own random draws,
  damping, feedback gain and step scale are part of the run's state and log.

An adapter is chosen once, where the optimizer is built (:func:`adapt`: by the optimizer's
class, the most derived registered one; :func:`adapter_for`: by a config table's ``kind``,
for what is decided before an optimizer exists). A new optimizer with its own contract is
one subclass registered with :func:`register_adapter`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from .._errors import first_line
from ..ode.checked import SolverError
from ..optim import OCNOpt
from .costs import step_type

#: ``closure()`` -> ``(loss, outputs)`` of the same batch at the current parameters
Closure = Callable[[], tuple[torch.Tensor, torch.Tensor]]


class OptimizerStepFailed(RuntimeError):
    """A solve failed inside the optimizer's own step (after it took the batch's
    statistics in): the run cannot skip the step and stops. ``reason`` is one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class OptimizerAdapter:
    """A ``torch.optim.Optimizer`` (built-in or by class path) behind the loop's interface.

    Class methods answer questions about a config table (an :class:`OptimizerConfig`)
    before any optimizer exists; instances wrap a built optimizer ``opt``.
    """

    #: config kinds (``[optimizers.NAME].kind``) this adapter serves
    kinds: ClassVar[tuple[str, ...]] = ()
    #: optimizer classes this adapter wraps (and their subclasses)
    optimizer_types: ClassVar[tuple[type, ...]] = (torch.optim.Optimizer,)
    #: the reference first-order baseline of costs and comparisons (Adam)
    reference: ClassVar[bool] = False

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt

    # ------------------------------------------------------------ about a config table
    @classmethod
    def cycle(cls, table) -> tuple[int | None, int | None]:
        """``(update_every, adapt_every)``: the periods of its refresh and adapt steps
        (None: it has none); see :func:`node_ocp.train.costs.amortized`."""
        return None, None

    @classmethod
    def uncapped_lr(cls, table) -> bool:
        """Whether ``lr = inf`` is accepted (no cap on a step scale chosen otherwise)."""
        return False

    @classmethod
    def judged(cls, table) -> bool:
        """Whether comparisons judge this table as the method under test (else it is a
        baseline)."""
        return False

    @classmethod
    def curvature(cls, table) -> str | None:
        """The curvature it preconditions with (a bench column), or None."""
        return None

    @classmethod
    def check_config(cls, name: str, table, config) -> None:
        """Raise ConfigError when ``table`` (``[optimizers.name]``, checked on its own)
        does not fit the rest of the run config ``config``."""

    @classmethod
    def check_task(cls, name: str, table, config, several_times: bool) -> None:
        """Raise ConfigError when ``table`` (``[optimizers.name]``) cannot train the task
        of ``config``; ``several_times``: its loss reaches an ODE block at several times."""

    # ------------------------------------------------------------ one step
    def next_kind(self) -> str:
        """The type of the coming step (``plain``, ``adapt``, ``refresh``, ``refresh+adapt``:
        :data:`node_ocp.train.costs.STEP_TYPES`; the name keeps the older word)."""
        return "plain"

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def skip_step(self) -> None:
        """Forget a step whose backward pass failed: its gradients (and whatever the
        optimizer gathered in that pass); the parameters stay."""
        self.opt.zero_grad(set_to_none=True)

    def skipped_steps(self) -> int:
        """Steps the optimizer skipped on its own (OCNOpt: a non-finite gradient)."""
        return 0

    def backward_and_step(
        self,
        loss: torch.Tensor,
        outputs: torch.Tensor,
        likelihood: str | None,
        closure: Closure,
        loss_inputs: torch.Tensor | None = None,
    ) -> None:
        """The backward pass of ``loss`` and the optimizer's step. ``outputs`` (the model's
        outputs, shape per task), ``likelihood`` and ``loss_inputs`` (a tensor the loss is
        computed from alone, or None) are for optimizers that read them; ``closure``
        re-evaluates the batch with the step's random draws."""
        loss.backward()
        self.opt.step()

    # ------------------------------------------------------------ schedule, log, state
    def attach_schedule(self, factor: Callable[[int], float]):
        """Put the factor ``step -> factor`` on the learning rate; returns the scheduler to
        step after every optimizer step, or None."""
        return torch.optim.lr_scheduler.LambdaLR(self.opt, factor)

    def current_lr(self) -> float:
        """The step scale of the first group (its ``lr``)."""
        return float(self.opt.param_groups[0]["lr"])

    def metrics(self) -> dict:
        """What a metrics line records of the optimizer's own state."""
        return {}

    def rng_states(self) -> dict:
        """The optimizer's own random states, by checkpoint key (none here)."""
        return {}

    def set_rng_states(self, states: dict) -> None:
        """Restore what :meth:`rng_states` returned (keys it lacks are left alone)."""

    def distributed_summary(self) -> dict:
        """What a data-parallel run's summary adds about the optimizer."""
        return {}

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


class AdamAdapter(OptimizerAdapter):
    """``torch.optim.Adam``: the reference baseline."""

    kinds = ("adam",)
    optimizer_types = (torch.optim.Adam,)
    reference = True


class SGDAdapter(OptimizerAdapter):
    """``torch.optim.SGD``."""

    kinds = ("sgd",)
    optimizer_types = (torch.optim.SGD,)


class OCNOptAdapter(OptimizerAdapter):
    """:class:`~node_ocp.OCNOpt`: outputs and likelihood to its backward, a closure to its
    step; it applies a schedule inside its own step."""

    kinds = ("ocnopt",)
    optimizer_types = (OCNOpt,)
    opt: OCNOpt

    @classmethod
    def cycle(cls, table):
        adapt = table.step == "model" or table.adapt_damping
        return table.update_every, (table.adapt_every if adapt else None)

    @classmethod
    def uncapped_lr(cls, table):
        return table.step == "model"

    @classmethod
    def judged(cls, table):
        # the time-joint method is the one judged; its standard-EKFAC table
        # (time_joint = false) is a baseline like the first-order ones
        return table is None or table.time_joint

    @classmethod
    def curvature(cls, table):
        return table.curvature

    @classmethod
    def check_config(cls, name, table, config):
        from .config import ConfigError

        gradient = table.gradient or config.solver.gradient
        if gradient == "torchdiffeq":
            raise ConfigError(
                f"[optimizers.{name}].gradient: received 'torchdiffeq' (from "
                f"{'the table' if table.gradient else '[solver].gradient'}) for OCNOpt; "
                "accepted: 'adjoint' (time-joint curvature) or 'direct' with "
                "time_joint = false; torchdiffeq's odeint_adjoint is for first-order runs"
            )

    @classmethod
    def check_task(cls, name, table, config, several_times):
        from .config import ConfigError

        if table.factors == "exact" and several_times:
            raise ConfigError(
                f"[optimizers.{name}].factors: received {table.factors!r} for a "
                f"{config.model.kind} {config.task.kind} model whose loss reaches the ODE "
                "block at several times; accepted: 'auto', 'empirical', 'sampled'"
            )

    def next_kind(self):
        return step_type(self.opt.refresh_due, self.opt.adapt_due)

    def backward_and_step(self, loss, outputs, likelihood, closure, loss_inputs=None):
        self.opt.backward(loss, outputs=outputs, likelihood=likelihood, loss_inputs=loss_inputs)
        try:
            self.opt.step(closure)
        except (SolverError, FloatingPointError) as exc:
            # inside the step the optimizer has taken the batch in (its refresh, averages):
            # not a step that can be skipped
            raise OptimizerStepFailed(first_line(exc)) from exc

    def skip_step(self):
        self.opt.skip_step()

    def skipped_steps(self):
        return self.opt.skipped_steps

    def attach_schedule(self, factor):
        self.opt.schedule = factor
        return None

    def current_lr(self):
        if self.opt.step_mode == "model":  # η, the model step's scale
            return self.opt.step_scale
        return super().current_lr()

    def metrics(self):
        out = {"damping": self.opt.damping}
        if self.opt.last_feedback is not None:
            out["feedback_gain"] = self.opt.last_feedback.gain_ratio
        return out

    def rng_states(self):
        return {"ocnopt": self.opt.generator.get_state()}

    def set_rng_states(self, states):
        if states.get("ocnopt") is not None:
            self.opt.generator.set_state(states["ocnopt"].cpu())

    def distributed_summary(self):
        return {"refresh_allreduce": dict(self.opt.last_reduce)}


_BY_KIND: dict[str, type[OptimizerAdapter]] = {}
_BY_TYPE: dict[type, type[OptimizerAdapter]] = {}


def register_adapter(cls: type[OptimizerAdapter]) -> type[OptimizerAdapter]:
    """Serve ``cls.kinds`` and ``cls.optimizer_types`` with ``cls`` (a class decorator)."""
    for kind in cls.kinds:
        _BY_KIND[kind] = cls
    for tp in cls.optimizer_types:
        _BY_TYPE[tp] = cls
    return cls


for _cls in (OptimizerAdapter, AdamAdapter, SGDAdapter, OCNOptAdapter):
    register_adapter(_cls)


def adapter_for(table_or_kind) -> type[OptimizerAdapter]:
    """The adapter class of a config table (or its ``kind`` string); a class path's
    optimizer has the ``torch.optim`` contract."""
    kind = getattr(table_or_kind, "kind", table_or_kind)
    return _BY_KIND.get(kind, OptimizerAdapter)


def adapt(opt) -> OptimizerAdapter:
    """``opt`` behind its adapter (an adapter is returned as it is): the adapter of the
    most derived registered class of ``opt``."""
    if isinstance(opt, OptimizerAdapter):
        return opt
    for tp in type(opt).__mro__:
        if tp in _BY_TYPE:
            return _BY_TYPE[tp](opt)
    return OptimizerAdapter(opt)


def build_adapter(table, model, lr: float | None = None, seed: int = 0) -> OptimizerAdapter:
    """The optimizer of the config table ``table`` for ``model`` (see
    :func:`~node_ocp.train.optimizers.build_optimizer`), behind its adapter."""
    from .optimizers import build_optimizer

    return adapt(build_optimizer(table, model, lr, seed=seed))
