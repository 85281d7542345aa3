"""ODE image classifier: conv stem -> ODE block with a conv vector field -> 2x2 pool -> linear."""

from __future__ import annotations

from torch import nn

from ..ode.block import ODEBlock
from ..ode.layers import ConcatConv2d, TimeSequential


class ODEImageClassifier(nn.Module):
    """Classifies ``(N, C, H, W)`` images into ``classes`` logits ``(N, classes)``.

    Args:
        in_channels: image channels.
        channels: width of the stem and of the ODE state ``(N, channels, H, W)``.
        classes: number of classes.
        horizon: integration time of the block.
        method, rtol, atol, gradient, backend, step_control: the ODE block's settings.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 16,
        classes: int = 10,
        horizon: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-4,
        gradient: str = "adjoint",
        backend: str = "torchdiffeq",
        step_control: str = "batch",
    ):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU())
        field = TimeSequential(
            ConcatConv2d(channels, channels, 3, padding=1),
            nn.Tanh(),
            ConcatConv2d(channels, channels, 3, padding=1),
        )
        self.ode = ODEBlock(
            field,
            (0.0, horizon),
            method=method,
            rtol=rtol,
            atol=atol,
            gradient=gradient,
            backend=backend,
            step_control=step_control,
            name="image ODE block",
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * channels, classes)
        )

    def feedback_stages(self) -> list[nn.Module]:
        """The stages of OCNOpt's feedback policies: stem, ODE block, head."""
        return [self.stem, self.ode, self.head]

    def forward(self, x):
        return self.head(self.ode(self.stem(x)))
