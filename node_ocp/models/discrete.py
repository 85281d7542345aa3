"""Deep discrete networks: a fully connected net and a small CNN, no ODE block.

The models where the OCNOpt / DDPNOpt papers make their claims for feedback policies
(``δθ_s = k_s + K_s δx_s``): every layer with parameters is a stage. Both are
``nn.Sequential``, so :func:`node_ocp.optim.feedback.find_stages` finds the stages (the
children with parameters: each ``nn.Linear`` and ``nn.Conv2d``) in call order, and OCNOpt
gives each of them ordinary K-FAC factors from its forward and backward hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .._errors import bad_value
from .fields import ACTIVATIONS


def _widths(name: str, widths: Sequence[int]) -> list[int]:
    out = list(widths)
    if not out or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in out):
        raise bad_value(name, widths, "a non-empty sequence of ints >= 1")
    return out


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_value(name, value, "an int >= 1")
    return value


def _activation(activation: str) -> type[nn.Module]:
    if activation not in ACTIVATIONS:
        raise bad_value("activation", activation, f"one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


class DeepMLP(nn.Sequential):
    """``Flatten → (Linear → activation) × len(hidden) → Linear``: inputs ``(N, *shape)``
    flattened to ``(N, in_features)``, logits ``(N, classes)``.

    Args:
        in_features: the number of input values per sample (64 for the 8×8 digits).
        classes: the number of outputs.
        hidden: the hidden layers' widths (``len(hidden) + 1`` linear layers in all).
        activation: one of ``softplus``, ``tanh``, ``elu``, ``relu``, ``silu``.
    """

    def __init__(
        self,
        in_features: int,
        classes: int,
        hidden: Sequence[int] = (64,) * 7,
        activation: str = "tanh",
    ):
        widths = [_positive("in_features", in_features), *_widths("hidden", hidden)]
        act = _activation(activation)
        _positive("classes", classes)
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), act()]
        layers.append(nn.Linear(widths[-1], classes))
        super().__init__(*layers)


class SmallCNN(nn.Sequential):
    """``(Conv3x3 → activation [→ MaxPool2d(2)]) × len(hidden) → Flatten → Linear`` on images
    ``(N, C, H, W)``; logits ``(N, classes)``.

    The spatial size is halved twice (once with a single conv stage): after the middle
    conv stage and after the last, so an 8×8 digit reaches the head as ``2 × 2`` maps.

    Args:
        in_channels, size: the images' channels and ``(H, W)`` (each at least 4).
        classes: the number of outputs.
        hidden: the conv stages' output channels (one stage per entry).
        activation: one of ``softplus``, ``tanh``, ``elu``, ``relu``, ``silu``.
    """

    def __init__(
        self,
        in_channels: int,
        size: tuple[int, int],
        classes: int,
        hidden: Sequence[int] = (16, 32, 32, 32),
        activation: str = "relu",
    ):
        channels = [_positive("in_channels", in_channels), *_widths("hidden", hidden)]
        act = _activation(activation)
        _positive("classes", classes)
        h, w = size
        if min(h, w) < 4:
            raise bad_value("size", size, "images of at least 4x4 (two 2x2 poolings)")
        n = len(channels) - 1
        pools = {n // 2 - 1, n - 1} if n > 1 else {0}
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(channels[:-1], channels[1:])):
            layers += [nn.Conv2d(a, b, 3, padding=1), act()]
            if i in pools:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(channels[-1] * h * w, classes)]
        super().__init__(*layers)
