"""Time-conditioned layers for vector fields ``f(t, x)``.

Each layer is called as ``layer(t, x)``. ``t`` is a 0-dim tensor (one time for the whole
batch) or a ``(N,)`` tensor (one time per batch row, used by batched curvature capture).
The learnable parts are ordinary ``nn.Linear`` / ``nn.Conv2d`` modules, so curvature capture
finds them by ``isinstance``.

- :class:`ConcatLinear` / :class:`ConcatConv2d`: ``t`` appended as an input feature/channel.
- :class:`ConcatSquashLinear` / :class:`ConcatSquashConv2d`:
  ``layer(x) * sigmoid(W_g t + b_g) + W_b t`` (FFJORD's concat-squash).
- :class:`TimeSequential`: a chain of layers; time-conditioned ones get ``(t, x)``, the others
  ``x``.
"""

from __future__ import annotations

import torch
from torch import nn

from .._errors import bad_value


def time_column(t, x: torch.Tensor) -> torch.Tensor:
    """``t`` as an ``(N, 1)`` column for a batch ``x`` of ``N`` rows."""
    n = x.shape[0]
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.numel() == 1:
        return t.reshape(1, 1).expand(n, 1)
    if t.numel() != n:
        raise bad_value(
            "t",
            t,
            f"a scalar time or one time per batch row ({n} rows, shape ({n},))",
        )
    return t.reshape(n, 1)


class TimeConditioned(nn.Module):
    """Base class of layers called as ``layer(t, x)``."""

    accepts_batched_time = True


class ConcatLinear(TimeConditioned):
    """``Linear([x, t])``: ``(N, in_features) -> (N, out_features)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features + 1, out_features, bias=bias)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([x, time_column(t, x)], dim=-1))


class ConcatSquashLinear(TimeConditioned):
    """``Linear(x) * sigmoid(gate(t)) + hyper_bias(t)``: ``(N, in) -> (N, out)``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1, out_features)
        self.hyper_bias = nn.Linear(1, out_features, bias=False)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        tc = time_column(t, x)
        return self.linear(x) * torch.sigmoid(self.gate(tc)) + self.hyper_bias(tc)


class ConcatConv2d(TimeConditioned):
    """``Conv2d([x, t·1])``: ``(N, C_in, H, W) -> (N, C_out, H', W')``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding=1,
        dilation=1,
        bias: bool = True,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels + 1,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=bias,
        )

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        tc = time_column(t, x).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv(torch.cat([x, tc], dim=1))


class ConcatSquashConv2d(TimeConditioned):
    """``Conv2d(x) * sigmoid(gate(t)) + hyper_bias(t)`` per output channel."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=1, dilation=1
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
        )
        self.gate = nn.Linear(1, out_channels)
        self.hyper_bias = nn.Linear(1, out_channels, bias=False)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        tc = time_column(t, x)
        gate = torch.sigmoid(self.gate(tc))[:, :, None, None]
        return self.conv(x) * gate + self.hyper_bias(tc)[:, :, None, None]


class TimeSequential(nn.Module):
    """A vector field made of a chain of layers: ``f(t, x)``.

    Time-conditioned layers (:class:`TimeConditioned`) are called with ``(t, x)``, any other
    module (activations, norms) with ``x``. ``accepts_batched_time`` is True when every
    time-conditioned layer accepts one time per batch row.
    """

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.accepts_batched_time = all(
            getattr(m, "accepts_batched_time", False)
            for m in self.layers
            if isinstance(m, TimeConditioned)
        )

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(t, x) if isinstance(layer, TimeConditioned) else layer(x)
        return x
