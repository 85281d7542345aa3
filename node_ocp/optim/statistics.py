"""Collecting curvature statistics: the first stage of a refresh.

A refresh step produces one typed record per unit that takes statistics:

- :class:`KroneckerStatistics` — ``A`` and ``B`` of one layer, normalised per sample;
- :class:`DenseStatistics` — the Gauss–Newton matrix ``G`` of one block's field.

Layers inside ODE fields get theirs from the :class:`~node_ocp.CurvatureCapture` of the
backward solves (:func:`from_capture`); layers outside the blocks (stems, heads) from
ordinary K-FAC hooks on the forward and backward pass (:class:`OutsideCollector`).

Normalisation (losses are means over the batch): with ``n`` samples per solve, ``A / n``
estimates ``E[∫ ū ūᵀ dt]``. ``B`` is built from the factors the backward solve carried: the
empirical source carries the adjoint of the *mean* loss (each sample's gradient divided by
``n``), so ``B · n`` estimates the per-sample ``E[∫ g gᵀ dt]``; the sampled and exact sources
carry per-sample factors, so ``B / n``. Convolutions also divide ``B`` by the output
locations per sample (the KFC approximation, Grosse & Martens, 2016).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import CellMap, CurvatureCapture, cell_forward, input_rows, output_rows
from .curvatures import CurvatureUnit


@dataclass
class KroneckerStatistics:
    """Per-sample Kronecker factors of one layer unit: ``A`` ``(K, K)``, ``B`` ``(d, d)``."""

    unit: CurvatureUnit
    A: torch.Tensor
    B: torch.Tensor
    samples: float

    def tensors(self) -> list[torch.Tensor]:
        return [self.A, self.B]

    def replace(self, tensors: list[torch.Tensor], samples: float) -> None:
        self.A, self.B = tensors
        self.samples = samples

    @property
    def size(self) -> int:
        """Rows of the larger factor (what decides whether a decomposition is spread)."""
        return max(self.A.shape[0], self.B.shape[0])


@dataclass
class DenseStatistics:
    """The per-sample Gauss–Newton matrix ``G`` ``(P, P)`` of one block's field."""

    unit: CurvatureUnit
    G: torch.Tensor
    samples: float

    def tensors(self) -> list[torch.Tensor]:
        return [self.G]

    def replace(self, tensors: list[torch.Tensor], samples: float) -> None:
        (self.G,) = tensors
        self.samples = samples

    @property
    def size(self) -> int:
        return self.G.shape[0]


Statistics = KroneckerStatistics | DenseStatistics


def from_capture(
    capture: CurvatureCapture,
    layer_units: dict[nn.Module, CurvatureUnit],
    block_units: dict[nn.Module, CurvatureUnit],
    empirical: bool,
) -> list[Statistics]:
    """The normalised records of the units whose statistics the backward solves gathered."""
    out: list[Statistics] = []
    for module, stats in capture.kronecker.items():
        unit = layer_units.get(module)
        if unit is None or stats.samples == 0:
            continue
        n = stats.samples / stats.solves
        locations = stats.rows / stats.samples  # 1 for linear layers
        b_scale = (n if empirical else 1.0 / n) / locations
        out.append(KroneckerStatistics(unit, stats.A / n, stats.B * b_scale, n))
    for block, unit in block_units.items():
        stats = capture.dense.get(block)
        if stats is None:
            continue
        n = stats.p.shape[1]
        scale = n if empirical else 1.0 / n
        out.append(DenseStatistics(unit, stats.gauss_newton() * scale, n))
    return out


class _LayerSums:
    """Raw K-FAC sums of one layer (or cell map) outside the blocks, over its uses.

    A use is one call of the layer whose output gradient arrived. Rows whose output gradient
    is exactly zero (a cell or head applied to the whole batch and masked afterwards) are
    not uses of that sample and add nothing to ``A`` either.
    """

    def __init__(self):
        self.A = None
        self.B = None
        self.batch = 0  # the largest batch of one use
        self.rows = 0  # live rows (times locations) that went into A
        self.samples = 0  # live samples that went into A
        self.uses = 0

    def add(self, module, u: torch.Tensor, g: torch.Tensor) -> None:
        """One use: inputs ``u`` ``(N, ...)`` and the gradient ``g`` at the output."""
        rows_g = output_rows(module, g.detach())  # (N, L, d_out)
        live = rows_g.flatten(1).ne(0).any(1)
        self.batch = max(self.batch, u.shape[0])
        self.uses += 1
        if not bool(live.any()):
            return
        rows_u = input_rows(module, u.detach())[live]
        rows_g = rows_g[live]
        flat_u = rows_u.reshape(-1, rows_u.shape[-1])
        flat_g = rows_g.reshape(-1, rows_g.shape[-1])
        a_mat, b_mat = flat_u.T @ flat_u, flat_g.T @ flat_g
        self.A = a_mat if self.A is None else self.A + a_mat
        self.B = b_mat if self.B is None else self.B + b_mat
        self.samples += rows_u.shape[0]
        self.rows += flat_u.shape[0]


class OutsideCollector:
    """Ordinary K-FAC statistics for the layers outside the ODE blocks.

    While armed, a forward hook on each layer keeps its input and a hook on its output adds
    the input rows to ``A`` and the gradient rows that reach it to ``B``. A fused recurrent
    cell (``nn.GRUCell``, ``nn.LSTMCell``, ``nn.RNNCell``) has two units, one per affine map
    (:class:`~node_ocp.capture.CellMap`); its forward hook recomputes the cell from the
    two maps (:func:`~node_ocp.capture.cell_forward`, the same values) so that the
    gradients at both maps' outputs can be hooked. :meth:`paused` stops the gradient hooks
    for backward passes that are not the loss's (pulling factors back through a head).

    A layer applied several times in one forward pass (a cell at every observation, a head
    at every query time) adds every use, as the ODE blocks' capture adds every instant of
    the time-joint integral: ``A = Σ_uses Σ_b ū ūᵀ / n`` and ``B = n Σ_uses Σ_b g gᵀ`` with
    ``n`` the batch of one use; the gradient is that of the mean loss, so ``B`` is scaled by
    ``n`` (as for the empirical source). Convolutions divide ``B`` by their locations.

    Args:
        units: the layer units outside the blocks, by layer or cell map.
    """

    def __init__(self, units: dict):
        self.units = units
        self._sums: dict = {}
        self._handles: list = []
        self._paused = False

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        self.disarm()
        cells: dict[nn.Module, dict[str, _LayerSums]] = {}
        for module in self.units:
            sums = _LayerSums()
            self._sums[module] = sums
            if isinstance(module, CellMap):
                cells.setdefault(module.cell, {})[module.which] = (module, sums)
            else:
                self._handles.append(module.register_forward_hook(self._layer_hook(sums)))
        for cell, maps in cells.items():
            # first, so that every later hook (a feedback stage's) sees the recomputed output
            self._handles.append(cell.register_forward_hook(self._cell_hook(maps), prepend=True))

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._sums = {}

    def clear(self) -> None:
        """Forget what was gathered (the hooks stay)."""
        for module in self._sums:
            self._sums[module] = _LayerSums()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Gradients flowing while inside do not count."""
        self._paused, before = True, self._paused
        try:
            yield
        finally:
            self._paused = before

    def _watch(self, module, sums: _LayerSums, u: torch.Tensor, out: torch.Tensor) -> None:
        u = u.detach()

        def grad_hook(g):
            if not self._paused:
                sums.add(module, u, g)

        out.register_hook(grad_hook)

    def _layer_hook(self, sums: _LayerSums):
        def hook(module, inputs, output):
            if torch.is_grad_enabled() and output.requires_grad:
                self._watch(module, sums, inputs[0], output)

        return hook

    def _cell_hook(self, maps: dict):
        def hook(cell, inputs, output):
            if not torch.is_grad_enabled() or not any(p.requires_grad for p in cell.parameters()):
                return None
            x = inputs[0]
            hx = inputs[1] if len(inputs) > 1 else None
            out, (h, gi, gh) = cell_forward(cell, x, hx)
            x = x.unsqueeze(0) if x.dim() == 1 else x
            for which, u, o in (("ih", x, gi), ("hh", h, gh)):
                if which in maps and o.requires_grad:
                    module, sums = maps[which]
                    self._watch(module, sums, u, o)
            return out

        return hook

    def statistics(self) -> list[KroneckerStatistics]:
        """The normalised records of the layers that saw a forward and a backward pass."""
        out = []
        for module, sums in self._sums.items():
            if sums.A is None or sums.samples == 0:
                continue
            n = sums.batch
            locations = sums.rows / sums.samples
            out.append(
                KroneckerStatistics(self.units[module], sums.A / n, sums.B * n / locations, n)
            )
        return out
