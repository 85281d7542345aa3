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

from ..curvature import CurvatureCapture, input_rows, output_rows
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
    """Raw K-FAC sums of one layer outside the blocks."""

    def __init__(self):
        self.A = None
        self.B = None
        self.samples = 0
        self.rows = 0

    def add_input(self, module: nn.Module, u: torch.Tensor) -> None:
        rows = input_rows(module, u.detach())
        flat = rows.reshape(-1, rows.shape[-1])
        a_mat = flat.T @ flat
        self.A = a_mat if self.A is None else self.A + a_mat
        self.samples += u.shape[0]
        self.rows += flat.shape[0]

    def add_grad(self, module: nn.Module, g: torch.Tensor) -> None:
        rows = output_rows(module, g.detach())
        flat = rows.reshape(-1, rows.shape[-1])
        b_mat = flat.T @ flat
        self.B = b_mat if self.B is None else self.B + b_mat


class OutsideCollector:
    """Ordinary K-FAC statistics for the layers outside the ODE blocks.

    While armed, a forward hook on each layer adds its inputs to ``A`` and a hook on its
    output adds the gradient that reaches it to ``B``. :meth:`paused` stops the gradient
    hooks for backward passes that are not the loss's (pulling factors back through a
    head). The gradient is that of the mean loss, so ``B`` is scaled by ``n`` (as for the
    empirical source).

    Args:
        units: the layer units outside the blocks, by layer.
    """

    def __init__(self, units: dict[nn.Module, CurvatureUnit]):
        self.units = units
        self._sums: dict[nn.Module, _LayerSums] = {}
        self._handles: list = []
        self._paused = False

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        self.disarm()
        for module in self.units:
            sums = _LayerSums()
            self._sums[module] = sums
            self._handles.append(module.register_forward_hook(self._forward_hook(sums)))

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

    def _forward_hook(self, sums: _LayerSums):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            sums.add_input(module, inputs[0])

            def grad_hook(g):
                if not self._paused:
                    sums.add_grad(module, g)

            output.register_hook(grad_hook)

        return hook

    def statistics(self) -> list[KroneckerStatistics]:
        """The normalised records of the layers that saw a forward and a backward pass."""
        out = []
        for module, sums in self._sums.items():
            if sums.A is None or sums.B is None or sums.samples == 0:
                continue
            n = sums.samples
            locations = sums.rows / n
            out.append(
                KroneckerStatistics(self.units[module], sums.A / n, sums.B * n / locations, n)
            )
        return out
