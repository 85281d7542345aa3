"""Vector-field builders."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .._errors import bad_value, check_choice
from ..ode.layers import ConcatLinear, ConcatSquashLinear, TimeSequential

ACTIVATIONS = {
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}
LAYER_KINDS = {"concatsquash": ConcatSquashLinear, "concat": ConcatLinear}


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
