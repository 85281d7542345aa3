import pytest
import torch
from torch import nn

import node_ocp as no


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mlp_field(dim: int = 3, hidden: int = 8, dtype=torch.float64) -> nn.Module:
    """A small non-autonomous MLP field (concat-squash), float64 by default."""
    return no.TimeSequential(
        no.ConcatSquashLinear(dim, hidden), nn.Tanh(), no.ConcatSquashLinear(hidden, dim)
    ).to(dtype)


def conv_field(channels: int = 2, dtype=torch.float64) -> nn.Module:
    """A small conv field on (B, C, H, W) states."""
    return no.TimeSequential(
        no.ConcatConv2d(channels, 3, 3, padding=1),
        nn.Softplus(),
        no.ConcatConv2d(3, channels, 3, padding=1),
    ).to(dtype)


class ScalarTimeField(nn.Module):
    """Wraps a field and refuses per-row times: exercises the one-call-per-time path."""

    accepts_batched_time = False

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, t, x):
        if t.dim() != 0:
            raise AssertionError("batched time given to a scalar-time field")
        return self.inner(t, x)
