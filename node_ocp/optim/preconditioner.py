"""The preconditioner: OCNOpt's curvature, usable on its own.

It owns which unit covers which parameters (:mod:`.units`), the gathering of statistics on
refresh steps — the capture of the ODE blocks' backward solves (time-joint Kronecker
factors of the fields' layers, dense blocks) and the hooks on the layers outside the blocks
(:mod:`.statistics`) — their reduce across processes and decomposition (:mod:`.reduce`), and
the two things a step needs from the curvature: the directions ``u = (C + λ)⁻¹ g / s`` and
the held quadratic form ``Σ s vᵀ(C + λ)v`` (``s`` the calibration scale of each unit's part,
:mod:`.unit_scales`).

Used alone, like a K-FAC preconditioner under any update rule::

    pre = Preconditioner(model)
    pre.arm()                                   # before the forward pass of a refresh step
    loss = loss_fn(model(x), y); loss.backward()
    pre.refresh()                               # collect -> reduce -> decompose
    u = pre.directions({p: p.grad for p in model.parameters()}, Damping(1e-2, True))

Tensors: ``grads``, directions and ``vectors`` are dicts ``parameter -> tensor`` of the
parameter's shape.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from .. import dist
from ..capture import CurvatureCapture
from ..ode.block import ODEBlock
from .curvatures import Damping
from .options import OCNOptOptions
from .reduce import ReduceReport, decompose, reduce_statistics
from .statistics import OutsideCollector, from_capture
from .unit_scales import scale_of
from .units import build_units


class Preconditioner:
    """The curvature units of ``model`` and their statistics.

    Args:
        model: the whole model; its ODE blocks are found by ``isinstance``.
        curvature: the variant (``"ekfac"``, ``"kfac"``, ... see :mod:`.curvatures`).
        group_of: parameter -> its param group (the ``outside``, ``ekfac_decay``, ``diag_beta``
            keys); None: one default group for every parameter.
        state: per-parameter state the units keep their buffers in (an optimizer's
            ``state``); None: a dict of its own.
        max_dense_params: ``curvature="dense"`` refuses a larger field.
        time_joint: the fields' layers get the time-joint factors of the backward solves
            (False: ordinary K-FAC hooks per evaluation, blocks with ``gradient="direct"``).
        sample_dt: spacing of the capture's sample grid.
        eigh_spread_min_dim: under torch.distributed, a unit whose larger factor has at
            least this many rows is decomposed by one process and broadcast.
    """

    def __init__(
        self,
        model: nn.Module,
        curvature: str = "ekfac",
        group_of: dict | None = None,
        state=None,
        *,
        max_dense_params: int = 4096,
        time_joint: bool = True,
        sample_dt: float = 0.05,
        eigh_spread_min_dim: int = 512,
    ):
        self.model = model
        self.blocks = [m for m in model.modules() if isinstance(m, ODEBlock)]
        self.curvature = curvature
        self.max_dense_params = max_dense_params
        self.time_joint = time_joint
        self.sample_dt = sample_dt
        self.eigh_spread_min_dim = eigh_spread_min_dim
        if group_of is None:  # one group at OCNOpt's defaults
            group = OCNOptOptions().group_defaults()
            group_of = {p: group for p in model.parameters()}
        self.build(group_of, {} if state is None else state)
        self.capture: CurvatureCapture | None = None
        self.samples = 1.0  # the batch size of the last refresh (per-sample normalisation)
        #: parameter -> its weight decay, whose curvature ``wd I`` every unit's solve and
        #: quadratic add to ``s (C + λ)`` (OCNOpt's ``decay_in_model``); empty: none
        self.decay: dict = {}
        self.last_reduce = ReduceReport().as_dict()

    def build(self, group_of: dict, state) -> None:
        """(Re)build the units for these groups and this state (after a state load)."""
        if getattr(self, "collector", None) is not None:
            # the old collector's hooks would outlive it (still gathering, never paused)
            self.collector.disarm()
        self.units = build_units(
            self.model,
            self.blocks,
            self.curvature,
            group_of,
            state,
            self.max_dense_params,
            self.time_joint,
        )
        self.collector = OutsideCollector(self.units.outside)

    # ------------------------------------------------------------------ collect
    @property
    def armed(self) -> bool:
        """Whether the coming backward pass gathers statistics."""
        return self.capture is not None or self.collector.armed

    def arm(self, carry_factors: bool = False) -> None:
        """Gather statistics in the coming forward/backward pass (``carry_factors``: a
        capture is needed to carry a factor source's factors even without Kronecker or
        dense statistics; a model without ODE blocks has no capture, only the hooks of its
        layers)."""
        u = self.units
        captured = u.needs_kronecker_capture or u.needs_dense_capture or carry_factors
        if captured and self.blocks:  # a network without blocks has its layers' hooks only
            self.capture = CurvatureCapture(
                kronecker=u.needs_kronecker_capture,
                dense=u.needs_dense_capture,
                sample_dt=self.sample_dt,
            )
            self.capture.attach(self.model)
        if u.outside:
            self.collector.arm()

    def disarm(self) -> None:
        if self.capture is not None:
            self.capture.detach()
            self.capture = None
        self.collector.disarm()

    def forget(self) -> None:
        """Drop what this step gathered (a skipped step), staying armed."""
        if self.capture is not None:
            self.capture.reset()
        self.collector.clear()

    def refresh(
        self, empirical: bool = True, reduces: bool = False, keep_records: bool = True
    ) -> None:
        """collect → reduce across processes → decompose; then disarm.

        ``empirical``: the statistics came from a backward pass of a mean loss (the
        empirical rule or a sampled cotangent), not from factors carried inside the solves.
        ``keep_records=False`` stops the block calls of this step from gathering more (the
        feedback sweep's backward passes)."""
        records = []
        if self.capture is not None:
            records += from_capture(self.capture, self.units.inside, self.units.blocks, empirical)
        records += self.collector.statistics()
        report = reduce_statistics(records) if reduces else ReduceReport()
        spread = reduces and dist.world_size() > 1
        report.spread_layers = decompose(records, spread, self.eigh_spread_min_dim)
        self.last_reduce = report.as_dict()
        if records:
            self.samples = float(max(r.samples for r in records))
        if self.capture is not None and not keep_records:
            for rec in self.capture.records:
                rec.capture, rec.terminal_factors = None, None
        self.disarm()

    # ------------------------------------------------------------------ use
    def directions(self, grads: dict, damping: Damping, numerator: dict | None = None) -> dict:
        """``u = (C + λ)⁻¹ g / s`` from every unit whose parameters have gradients (the
        units' per-step statistics updated from ``g``); with ``numerator`` (a dict like
        ``grads``: OCNOpt's averaged gradient), ``u = (C + λ)⁻¹ numerator / s``, the
        statistics still updated from ``g``."""
        if numerator is None:
            return self._per_unit(
                grads,
                lambda unit, v: unit.direction(v, self._damping_of(unit, damping), self.samples),
            )
        for unit in self.units.units:
            if all(p in grads for p in unit.params):
                unit.observe([grads[p] for p in unit.params], self.samples)
        return self.solve(numerator, damping)

    def solve(self, vectors: dict, damping: Damping) -> dict:
        """``(C + λ)⁻¹ v / s`` per unit, changing no running statistics (as ``directions``
        without its updates: a preconditioner for :mod:`.gauss_newton_cg`)."""
        return self._per_unit(
            vectors, lambda unit, v: unit.solve(v, self._damping_of(unit, damping))
        )

    def _damping_of(self, unit, damping: Damping) -> Damping:
        """``damping`` with the unit's weight decay in its units: ``s (C + λ + wd / s) =
        s (C + λ) + wd`` (the largest decay among the unit's parameters)."""
        if not self.decay:
            return damping
        wd = max(float(self.decay.get(p, 0.0)) for p in unit.params)
        if wd == 0.0:
            return damping
        return replace(damping, decay=damping.decay + wd / scale_of(unit))

    def _per_unit(self, vectors: dict, apply) -> dict:
        """``apply(unit, its tensors of vectors) / s`` for every unit ``vectors`` covers."""
        out = {}
        for unit in self.units.units:
            if not all(p in vectors for p in unit.params):
                continue
            u = apply(unit, [vectors[p] for p in unit.params])
            scale = scale_of(unit)
            if scale != 1.0:
                u = [x / scale for x in u]
            out.update(zip(unit.params, u))
        return out

    def quadratic(self, vectors: dict, damping: Damping) -> float:
        """``Σ_units s_u vᵀ(C + λ)v`` over the units whose parameters ``vectors`` holds."""
        total = 0.0
        for unit in self.units.units:
            if all(p in vectors for p in unit.params):
                d = self._damping_of(unit, damping)
                quad = float(unit.quadratic([vectors[p] for p in unit.params], d))
                total += scale_of(unit) * quad
        return total

    def unit_of(self, module: nn.Module):
        """The unit of a tapped layer or an ODE block, or None."""
        u = self.units
        return u.inside.get(module) or u.outside.get(module) or u.blocks.get(module)

    def memory_usage(self) -> dict[str, int]:
        """Bytes held per curvature variant."""
        out: dict[str, int] = {}
        for unit in self.units.units:
            key = type(unit).__name__
            out[key] = out.get(key, 0) + unit.memory_bytes()
        return out
