"""Which layers of a vector field get Kronecker factors, and how their rows are formed.

A *tapped* layer is an ``nn.Linear`` or an ``nn.Conv2d`` with ``groups == 1``, found by
``isinstance`` anywhere inside the field (also inside time-conditioned layers). For such a
layer the parameter gradient for one sample is ``Σ_l g_l ū_lᵀ``, where ``ū_l`` is the layer
input (with a trailing 1 when the layer has a bias) at location ``l`` and ``g_l`` the
gradient with respect to its output there; a linear layer has one location per leading
index, a convolution one per output pixel (the input row is the patch the kernel sees).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def is_tapped(module: nn.Module) -> bool:
    """True for the layer types that get Kronecker factors."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def tapped_modules(root: nn.Module) -> list[nn.Module]:
    """All tapped layers inside ``root`` (each once), in ``modules()`` order."""
    return [m for m in root.modules() if is_tapped(m)]


def input_rows(module: nn.Module, u: torch.Tensor) -> torch.Tensor:
    """Rows ``ū`` of a layer input, shape ``(N, L, K)``.

    Linear (and a recurrent cell's :class:`~.cells.CellMap`): ``u`` is ``(N, ..., d_in)``,
    ``K = d_in (+1)``, ``L`` the product of the middle dimensions. Conv2d: ``u`` is
    ``(N, C_in, H, W)``, ``K = C_in·kh·kw (+1)`` in the order of
    ``weight.reshape(C_out, -1)``, ``L`` the number of output pixels.
    """
    n = u.shape[0]
    if isinstance(module, nn.Conv2d):
        rows = conv_patches(module, u).transpose(1, 2)
    else:
        rows = u.reshape(n, -1, u.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], dim=-1)
    return rows


def output_rows(module: nn.Module, g: torch.Tensor, lead: int = 0) -> torch.Tensor:
    """Rows of the gradient with respect to a layer output, ``(*lead, N, L, d_out)``.

    ``g`` is ``(*lead, N, ..., d_out)`` for Linear and ``(*lead, N, C_out, H', W')`` for
    Conv2d; the ``lead`` leading dimensions (a factor index) are kept.
    """
    head = g.shape[: lead + 1]
    if isinstance(module, nn.Conv2d):
        return g.reshape(*head, g.shape[lead + 1], -1).transpose(-1, -2)
    return g.reshape(*head, -1, g.shape[-1])


def conv_patches(module: nn.Conv2d, u: torch.Tensor) -> torch.Tensor:
    """Kernel patches of ``u`` (``(N, C_in, H, W)``) as ``(N, C_in·kh·kw, L)``.

    Padding is applied exactly as the layer applies it (zeros, reflect, replicate, circular,
    and ``padding='same'``).
    """
    pad = getattr(module, "_reversed_padding_repeated_twice", None)
    if pad is None:  # pragma: no cover - all torch versions we support have it
        ph, pw = module.padding
        pad = [pw, pw, ph, ph]
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        u = F.pad(u, list(pad), mode=mode)
    return F.unfold(
        u, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride
    )
