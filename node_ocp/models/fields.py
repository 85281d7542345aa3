"""Vector-field builders: time-conditioned MLPs on vectors and conv nets on images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .._errors import bad_value, check_choice
from ..ode.layers import (
    ConcatConv2d,
    ConcatLinear,
    ConcatSquashConv2d,
    ConcatSquashLinear,
    TimeSequential,
)

ACTIVATIONS = {
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}
LAYER_KINDS = {"concatsquash": ConcatSquashLinear, "concat": ConcatLinear}
CONV_LAYER_KINDS = {"concatsquash": ConcatSquashConv2d, "concat": ConcatConv2d}


def time_mlp(
    dim: int,
    hidden: Sequence[int] = (64, 64),
    activation: str = "softplus",
    layer: str = "concatsquash",
) -> TimeSequential:
    """A time-conditioned MLP field ``f(t, x)``: ``(N, dim) -> (N, dim)``.

    ``hidden`` lists the widths of the hidden layers (depth = len(hidden) + 1 layers);
    ``activation`` is one of softplus, tanh, elu, relu, silu; ``layer`` is concatsquash or
    concat.
    """
    check_choice("activation", activation, tuple(ACTIVATIONS))
    check_choice("layer", layer, tuple(LAYER_KINDS))
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise bad_value("dim", dim, "an int >= 1")
    widths = [dim, *hidden, dim]
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise bad_value("hidden", hidden, "a sequence of ints >= 1")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(LAYER_KINDS[layer](a, b))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return TimeSequential(*layers)


def time_conv(
    channels: int,
    hidden: Sequence[int] = (32, 32),
    activation: str = "softplus",
    layer: str = "concatsquash",
    kernel_size: int = 3,
) -> TimeSequential:
    """A time-conditioned conv field ``f(t, x)``: ``(N, channels, H, W) -> (N, channels, H, W)``.

    ``hidden`` lists the channel widths of the hidden layers (depth = len(hidden) + 1
    convolutions, each ``kernel_size`` × ``kernel_size`` with "same" zero padding, stride 1);
    ``layer`` is ``concatsquash`` (:class:`~node_ocp.ode.layers.ConcatSquashConv2d`,
    FFJORD's) or ``concat`` (:class:`~node_ocp.ode.layers.ConcatConv2d`). Every learnable map
    is an ``nn.Conv2d`` or an ``nn.Linear``, so OCNOpt gives each Kronecker factors.
    """
    check_choice("activation", activation, tuple(ACTIVATIONS))
    check_choice("layer", layer, tuple(CONV_LAYER_KINDS))
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise bad_value("channels", channels, "an int >= 1")
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise bad_value("kernel_size", kernel_size, "an odd int >= 1 (same padding)")
    widths = [channels, *hidden, channels]
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise bad_value("hidden", hidden, "a sequence of ints >= 1")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(CONV_LAYER_KINDS[layer](a, b, kernel_size, padding=kernel_size // 2))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return TimeSequential(*layers)
