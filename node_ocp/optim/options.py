"""OCNOpt's options: every hyper-parameter, its default and its check, in one place.

:class:`OCNOptOptions` is what :class:`~node_ocp.OCNOpt` is built from (its keyword
arguments override the fields of an options object), what the configs' ``[optimizers.*]``
tables fill in (:mod:`node_ocp.train.config` takes its defaults and checks from here), and
what ``DEFAULTS`` lists. Adding a hyper-parameter is a field here (with its check in
:meth:`OCNOptOptions.checked`) plus its use.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

from .._errors import bad_type, bad_value, check_choice, check_positive
from .curvatures import VARIANTS
from .factor_sources import FACTOR_SOURCES_BY_NAME
from .feedback import FEEDBACK_MODES
from .feedback_gain import FEEDBACK_GAINS
from .hyper import Schedule, check_hyper, check_int
from .step_control import STEP_MODES
from .subspace import HELD_WEIGHT, SUBSPACES, automatic

#: The accepted values of OCNOpt's ``between_refreshes``: the ODE blocks' gradient on the
#: steps that gather no curvature (``"own"``: the blocks' own; ``"direct"``: backprop through
#: the solvers).
BETWEEN_REFRESHES: tuple[str, ...] = ("own", "direct")

CURVATURES: tuple[str, ...] = tuple(VARIANTS)
FACTOR_SOURCES: tuple[str, ...] = tuple(FACTOR_SOURCES_BY_NAME)  # "auto", "empirical", ...
OUTSIDE_RULES: tuple[str, ...] = ("kfac", "diagonal", "sgd")
NONFINITE: tuple[str, ...] = ("skip", "raise")
DAMPING_MODES: tuple[str, ...] = ("relative", "absolute")
CG_JV: tuple[str, ...] = ("central", "forward")  # see gauss_newton_cg.JV_RULES
CG_GRAPHS: tuple[str, ...] = ("adjoint", "direct")
NUMERATORS: tuple[str, ...] = ("auto", "gradient", "average")
#: the curvatures ``scale_power != 1`` applies to (a diagonal in the unit's eigenbasis)
POWER_CURVATURES: tuple[str, ...] = ("ekfac", "diagonal", "identity")

#: Hyper-parameters that were renamed: old name -> new name. The old names keep working
#: (keywords, parameter-group keys, config keys, saved parameter groups) with a
#: ``DeprecationWarning``. ``alpha`` was both the EKFAC decay and the step size α.
RENAMED: dict[str, str] = {"alpha": "ekfac_decay"}


def renamed_keys(
    values: dict, where: str, stacklevel: int = 4, category: type[Warning] = DeprecationWarning
) -> dict:
    """``values`` with every renamed key (:data:`RENAMED`) under its new name, warning once
    per key; both names given at once is refused."""
    out = dict(values)
    for old, new in RENAMED.items():
        if old not in out:
            continue
        if new in out:
            raise TypeError(
                f"{where}: received both {old!r} (deprecated) and {new!r}; accepted: only {new!r}"
            )
        warnings.warn(
            f"{where}: {old!r} is deprecated; it is now called {new!r} ({old!r} will be "
            "removed in a later release)",
            category,
            stacklevel=stacklevel,
        )
        out[new] = out.pop(old)
    return out


@dataclass(frozen=True)
class OCNOptOptions:
    """The hyper-parameters of :class:`~node_ocp.OCNOpt` (see its docstring for each).

    Numbers may be schedules (callables ``step -> value``) where OCNOpt says so (``lr``,
    ``momentum``, ``weight_decay``). ``OCNOptOptions()`` is the one default.
    """

    lr: Schedule | None = None
    momentum: Schedule = 0.9
    weight_decay: Schedule = 0.0
    decay_in_model: bool = False
    curvature: str = "ekfac"
    damping: float = 1e-2
    update_every: int = 50
    ekfac_decay: float = 0.75
    sample_dt: float = 0.05
    factors: str = "auto"
    step: str = "model"
    adapt_every: int = 5
    adapt_damping: bool = True
    damping_mode: str = "relative"
    min_damping: float = 1e-4
    max_damping: float = 1e4
    kl_clip: float | None = None
    rank: int = 1
    outside: str = "kfac"
    diag_beta: float = 0.95
    stiff_ratio: float = 3.0
    max_dense_params: int = 4096
    nonfinite: str = "skip"
    feedback: str = "off"
    feedback_every: int = 1
    feedback_clip: float | None = 1.0
    feedback_gain: str = "kappa"
    time_joint: bool = True
    calibrate_units: bool = True
    cg_iters: int = 0
    cg_jv: str = "central"
    cg_graph: str = "adjoint"
    scale_power: float | None = None
    numerator: str = "auto"
    numerator_beta: float = 0.9
    subspace: str = "auto"
    subspace_held: float = HELD_WEIGHT
    between_refreshes: str = "own"
    seed: int = 0
    distributed: bool | None = None
    eigh_spread_min_dim: int = 512

    def replace(self, **changes) -> OCNOptOptions:
        """A copy with ``changes``; an unknown name is refused in one line (a renamed one is
        taken with a ``DeprecationWarning``, see :data:`RENAMED`)."""
        changes = renamed_keys(changes, "OCNOpt")
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(f"OCNOpt: unknown option {unknown[0]!r}; accepted: " + ", ".join(names))
        return dataclasses.replace(self, **changes)

    def checked(self) -> OCNOptOptions:
        """Every field checked (the first bad one raises, naming it, what it received and
        what it accepts); returns the options with numbers as floats where OCNOpt keeps
        floats."""
        check_choice("curvature", self.curvature, CURVATURES)
        check_choice("factors", self.factors, FACTOR_SOURCES)
        check_choice("step", self.step, STEP_MODES)
        check_int("update_every", self.update_every, 1)
        check_int("rank", self.rank, 1)
        check_int("max_dense_params", self.max_dense_params, 1)
        check_choice("nonfinite", self.nonfinite, NONFINITE)
        sample_dt = check_positive("sample_dt", self.sample_dt)
        check_choice("damping_mode", self.damping_mode, DAMPING_MODES)
        check_choice("feedback", self.feedback, FEEDBACK_MODES)
        check_int("feedback_every", self.feedback_every, 1)
        check_choice("feedback_gain", self.feedback_gain, FEEDBACK_GAINS)
        feedback_clip = (
            None
            if self.feedback_clip is None
            else check_positive("feedback_clip", self.feedback_clip)
        )
        for name in ("time_joint", "calibrate_units", "decay_in_model"):
            if not isinstance(getattr(self, name), bool):
                raise bad_type(name, getattr(self, name), "True or False")
        if not isinstance(self.adapt_damping, bool):
            raise bad_type("adapt_damping", self.adapt_damping, "True or False")
        if self.distributed is not None and not isinstance(self.distributed, bool):
            raise bad_type("distributed", self.distributed, "True, False or None (automatic)")
        check_int("eigh_spread_min_dim", self.eigh_spread_min_dim, 1)
        kl_clip = None if self.kl_clip is None else check_positive("kl_clip", self.kl_clip)
        low = check_positive("min_damping", self.min_damping)
        high = check_positive("max_damping", self.max_damping)
        damping = check_positive("damping", self.damping)
        if not low <= damping <= high:
            raise bad_value(
                "damping", damping, f"a float in [min_damping, max_damping] = [{low}, {high}]"
            )
        if self.step == "fixed" and self.lr is None:
            raise bad_value(
                "lr",
                self.lr,
                "a float > 0 with step='fixed' (the step scale)",
                "Or use step='model'.",
            )
        lr = (
            None
            if self.lr is None
            else check_hyper("lr", self.lr, 0, math.inf, True, True, "a float > 0")
        )
        momentum = check_hyper("momentum", self.momentum, 0, 1, False, True, "a float in [0, 1)")
        weight_decay = check_hyper(
            "weight_decay", self.weight_decay, 0, math.inf, False, True, "a float >= 0"
        )
        ekfac_decay = float(
            check_hyper("ekfac_decay", self.ekfac_decay, 0, 1, True, False, "a float in (0, 1]")
        )
        check_choice("outside", self.outside, OUTSIDE_RULES)
        diag_beta = float(
            check_hyper("diag_beta", self.diag_beta, 0, 1, False, True, "a float in [0, 1)")
        )
        stiff_ratio = check_positive("stiff_ratio", self.stiff_ratio)
        check_int("adapt_every", self.adapt_every, 1)
        check_int("cg_iters", self.cg_iters, 0)
        check_choice("cg_jv", self.cg_jv, CG_JV)
        check_choice("cg_graph", self.cg_graph, CG_GRAPHS)
        scale_power = (
            None
            if self.scale_power is None
            else _number("scale_power", self.scale_power, 0, 1, True, False, "(0, 1]")
        )
        if scale_power not in (None, 1.0) and self.curvature not in POWER_CURVATURES:
            raise bad_value(
                "scale_power",
                self.scale_power,
                f"1 with curvature={self.curvature!r}; another power needs a curvature with a "
                f"diagonal in its eigenbasis: {', '.join(POWER_CURVATURES)}",
            )
        check_choice("numerator", self.numerator, NUMERATORS)
        numerator_beta = _number("numerator_beta", self.numerator_beta, 0, 1, False, True, "[0, 1)")
        check_choice("subspace", self.subspace, SUBSPACES)
        check_choice("between_refreshes", self.between_refreshes, BETWEEN_REFRESHES)
        subspace_held = _number(
            "subspace_held", self.subspace_held, 0, math.inf, False, True, "[0, inf)"
        )
        if self.subspace not in ("off", "auto") and self.cg_iters:
            raise bad_value(
                "subspace",
                self.subspace,
                "'off' or 'auto' with cg_iters > 0 (both replace the held step; choose one)",
            )
        if self.between_refreshes == "direct" and (self.feedback != "off" or self.cg_iters):
            raise bad_value(
                "between_refreshes",
                self.between_refreshes,
                "'own' with feedback != 'off' or cg_iters > 0 (feedback sweeps need the own "
                "adjoint on every step; cg_graph decides where the CG products run)",
            )
        return dataclasses.replace(
            self,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            sample_dt=sample_dt,
            feedback_clip=feedback_clip,
            kl_clip=kl_clip,
            min_damping=low,
            max_damping=high,
            damping=damping,
            ekfac_decay=ekfac_decay,
            diag_beta=diag_beta,
            stiff_ratio=stiff_ratio,
            scale_power=scale_power,
            numerator_beta=numerator_beta,
            subspace_held=subspace_held,
        )

    def resolved(self, model, across_processes: bool = False) -> OCNOptOptions:
        """The options with their automatic values made concrete for ``model``:
        ``subspace="auto"`` (:func:`.subspace.automatic`), then ``scale_power=None`` (½ with
        a subspace step and a curvature of :data:`POWER_CURVATURES`, else 1) and
        ``numerator="auto"`` (``"average"`` with a subspace step, else ``"gradient"``)."""
        subspace = self.subspace
        if subspace == "auto":
            subspace = automatic(model, self.step, self.cg_iters, across_processes)
        on = subspace != "off"
        power = self.scale_power
        if power is None:
            power = 0.5 if on and self.curvature in POWER_CURVATURES else 1.0
        numerator = self.numerator
        if numerator == "auto":
            numerator = "average" if on else "gradient"
        return dataclasses.replace(self, subspace=subspace, scale_power=power, numerator=numerator)

    def group_defaults(self) -> dict:
        """The per-parameter-group hyper-parameters (``torch.optim`` defaults)."""
        return dict(
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            ekfac_decay=self.ekfac_decay,
            outside=self.outside,
            diag_beta=self.diag_beta,
        )


def _number(name: str, value, low, high, low_open, high_open, interval: str) -> float:
    """A plain number (no schedule) in ``interval``, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):  # schedules too
        raise bad_type(name, value, f"a float in {interval} (not a schedule)")
    return float(check_hyper(name, value, low, high, low_open, high_open, f"a float in {interval}"))


#: The one default of OCNOpt as a dict (the fields a config table may set among them).
DEFAULTS: dict = {
    f.name: f.default for f in dataclasses.fields(OCNOptOptions) if f.name not in ("seed",)
}
