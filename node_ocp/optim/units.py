"""Which curvature unit preconditions which parameters (built once, from the model).

The variant's ``scope`` decides (see :mod:`.curvatures.base`):

- ``"layer"`` (kfac, ekfac): every tapped layer inside an ODE field is a unit of the
  variant; a tapped layer outside the blocks is one too when its group's ``outside`` is
  ``"kfac"`` (statistics from ordinary K-FAC hooks), and so is each of the two affine maps
  of a recurrent cell outside the blocks (``nn.GRUCell``, ``nn.LSTMCell``, ``nn.RNNCell``;
  see :class:`~node_ocp.capture.CellMap`), summed over the cell's uses.
- ``"block"`` (dense): every block field is one unit; tapped layers outside get
  :data:`~.curvatures.OUTSIDE` (K-FAC) under ``outside="kfac"``.
- ``"tensor"`` (identity, diagonal): every parameter tensor is a unit of the variant.

Everything else — parameters of other layer types (norms, cells inside a field), and layers
outside the blocks whose group says ``outside="diagonal"`` — gets
:data:`~.curvatures.FALLBACK`, or the identity with ``outside="sgd"`` (and everywhere under
``curvature="identity"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .._errors import bad_value
from ..capture import cell_maps, is_cell, is_tapped, tapped_modules
from .curvatures import FALLBACK, OUTSIDE, VARIANTS, CurvatureUnit, IdentityUnit


@dataclass
class UnitTable:
    """The units of one optimizer.

    Attributes:
        units: every unit, in model order.
        inside: layer units of tapped layers inside ODE fields (statistics from the capture).
        outside: layer units of tapped layers and recurrent-cell maps outside the blocks
            (statistics from hooks), by layer or :class:`~node_ocp.capture.CellMap`.
        blocks: block units (dense), by ODE block.
    """

    units: list[CurvatureUnit] = field(default_factory=list)
    inside: dict[nn.Module, CurvatureUnit] = field(default_factory=dict)
    outside: dict[nn.Module, CurvatureUnit] = field(default_factory=dict)
    blocks: dict[nn.Module, CurvatureUnit] = field(default_factory=dict)

    @property
    def needs_kronecker_capture(self) -> bool:
        return bool(self.inside)

    @property
    def needs_dense_capture(self) -> bool:
        return bool(self.blocks)


def build_units(
    model: nn.Module,
    blocks: list[nn.Module],
    variant: str,
    group_of: dict[torch.Tensor, dict],
    state,
    max_dense_params: int,
    time_joint: bool = True,
) -> UnitTable:
    """Assign every parameter in ``group_of`` to exactly one unit.

    With ``time_joint=False`` the field layers are treated like layers outside the blocks
    (ordinary K-FAC hooks, one statistic per solver evaluation)."""
    cls = VARIANTS[variant]
    in_fields = {id(m) for b in blocks for m in b.field.modules()}
    fallback = IdentityUnit if cls is IdentityUnit else FALLBACK
    table = UnitTable()
    covered: set[torch.Tensor] = set()
    ode_layers = {m for b in blocks for m in tapped_modules(b.field)} if time_joint else set()

    def unit_for(unit_cls: type[CurvatureUnit], params, module=None) -> CurvatureUnit:
        unit = unit_cls.from_group(params, state[params[0]], module, group_of[params[0]])
        table.units.append(unit)
        covered.update(params)
        return unit

    if cls.scope == "block":
        for block in blocks:
            ps = [p for p in block.field.parameters() if p.requires_grad]
            n = sum(p.numel() for p in ps)
            if n > max_dense_params:
                raise bad_value(
                    "curvature",
                    variant,
                    f"'{variant}' only for fields with at most max_dense_params="
                    f"{max_dense_params} parameters ({block.name} has {n})",
                    "Use curvature='ekfac' or 'kfac', or raise max_dense_params.",
                )
            if ps and all(p in group_of for p in ps):
                table.blocks[block] = unit_for(cls, ps, block)
    if cls.scope in ("layer", "block"):
        for module in model.modules():
            if is_cell(module) and id(module) not in in_fields:
                for cell_map in cell_maps(module):
                    ps = [p for p in (cell_map.weight, cell_map.bias) if p is not None]
                    if all(p in group_of and p not in covered for p in ps) and (
                        group_of[ps[0]]["outside"] == "kfac"
                    ):
                        unit_cls = cls if cls.scope == "layer" else OUTSIDE
                        table.outside[cell_map] = unit_for(unit_cls, ps, cell_map)
                continue
            if not is_tapped(module) or module.weight not in group_of:
                continue
            if module.weight in covered:
                continue
            ps = [p for p in (module.weight, module.bias) if p is not None and p in group_of]
            inside = module in ode_layers
            if inside and cls.scope == "layer":
                table.inside[module] = unit_for(cls, ps, module)
            elif not inside and group_of[module.weight]["outside"] == "kfac":
                unit_cls = cls if cls.scope == "layer" else OUTSIDE
                table.outside[module] = unit_for(unit_cls, ps, module)
    for p, group in group_of.items():
        if p in covered:
            continue
        rule = group["outside"]
        if cls.scope == "tensor" and rule == "kfac":
            unit_cls = cls
        elif rule == "sgd":
            unit_cls = IdentityUnit
        else:
            unit_cls = fallback
        unit_for(unit_cls, [p])
    return table
