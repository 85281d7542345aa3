"""Recurrent cells as Kronecker layers: the two linear maps inside a fused cell.

``nn.GRUCell``, ``nn.LSTMCell`` and ``nn.RNNCell`` compute their gates from two affine maps,

    gi = W_ih x + b_ih        (input to hidden,  rows ū = [x, 1])
    gh = W_hh h + b_hh        (hidden to hidden, rows ū = [h, 1])

followed by element-wise gate arithmetic. The fused kernels hide ``gi`` and ``gh``, so layer
hooks cannot see the gradients there. :class:`CellMap` names one of the two maps (its
``weight`` and ``bias`` are the cell's own parameters, so a Kronecker unit treats it like an
``nn.Linear``), and :func:`cell_forward` recomputes a cell from ``F.linear`` maps with the
same arithmetic as PyTorch's kernels, returning ``gi`` and ``gh`` so that their gradients
can be hooked. A cell applied at every step of a sequence contributes one input row and one
output-gradient row per map and use, which the consumer sums over the uses (Martens, Ba &
Johnson, ICLR 2018, for the Kronecker approximation across time steps).

The gate layout follows ``torch.nn``: GRU ``(r, z, n)``, LSTM ``(i, f, g, o)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import bad_value

#: The fused recurrent cells whose maps get Kronecker factors.
RECURRENT_CELLS: tuple[type[nn.Module], ...] = (nn.GRUCell, nn.LSTMCell, nn.RNNCell)
MAPS: tuple[str, ...] = ("ih", "hh")


def is_cell(module: nn.Module) -> bool:
    """True for the fused recurrent cells of :data:`RECURRENT_CELLS`."""
    return isinstance(module, RECURRENT_CELLS)


class CellMap:
    """One affine map of a fused recurrent cell (``which`` is ``"ih"`` or ``"hh"``).

    Attributes:
        cell: the cell.
        weight: ``(G·H, d_in)`` with ``G`` gates (GRU 3, LSTM 4, RNN 1), ``d_in`` the input
            size (``"ih"``) or hidden size (``"hh"``).
        bias: ``(G·H,)`` or None.
    """

    def __init__(self, cell: nn.Module, which: str):
        if not is_cell(cell):
            raise bad_value("cell", type(cell).__name__, "an nn.GRUCell, nn.LSTMCell or nn.RNNCell")
        if which not in MAPS:
            raise bad_value("which", which, "'ih' or 'hh'")
        self.cell = cell
        self.which = which

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.cell, f"weight_{self.which}")

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.cell, f"bias_{self.which}", None)

    def __repr__(self) -> str:
        return f"CellMap({type(self.cell).__name__}.{self.which})"


def cell_maps(cell: nn.Module) -> tuple[CellMap, CellMap]:
    """The input-to-hidden and hidden-to-hidden maps of ``cell``."""
    return CellMap(cell, "ih"), CellMap(cell, "hh")


def cell_forward(cell: nn.Module, x: torch.Tensor, hx=None):
    """``cell(x, hx)`` recomputed from its two affine maps.

    Args:
        cell: an ``nn.GRUCell``, ``nn.LSTMCell`` or ``nn.RNNCell``.
        x: ``(N, input_size)`` or ``(input_size,)``.
        hx: the hidden state as the cell takes it (``(N, H)``, for LSTM a pair ``(h, c)``),
            or None for zeros.

    Returns ``(output, (h, gi, gh))``: ``output`` as the cell returns it, ``h`` the hidden
    state the ``"hh"`` map read (``(N, H)``), ``gi`` and ``gh`` the two maps' outputs
    (``(N, G·H)``), part of the graph of ``output``.
    """
    unbatched = x.dim() == 1
    if unbatched:
        x = x.unsqueeze(0)
    size = cell.hidden_size
    if hx is None:
        zeros = x.new_zeros(x.shape[0], size)
        h, c = zeros, zeros
    elif isinstance(cell, nn.LSTMCell):
        h, c = (s.unsqueeze(0) if unbatched else s for s in hx)
    else:
        h = hx.unsqueeze(0) if unbatched else hx
    gi = F.linear(x, cell.weight_ih, cell.bias_ih)
    gh = F.linear(h, cell.weight_hh, cell.bias_hh)
    if isinstance(cell, nn.GRUCell):
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        out = (1 - z) * n + z * h
        out = out.squeeze(0) if unbatched else out
    elif isinstance(cell, nn.LSTMCell):
        i, f, g, o = (gi + gh).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        out = (h_new.squeeze(0), c_new.squeeze(0)) if unbatched else (h_new, c_new)
    else:
        act = torch.tanh if cell.nonlinearity == "tanh" else torch.relu
        out = act(gi + gh)
        out = out.squeeze(0) if unbatched else out
    return out, (h, gi, gh)
