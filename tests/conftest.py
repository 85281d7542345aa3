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


def irregular_spirals(n: int, seed: int):
    """``n`` irregularly sampled 2-D spirals turning one way (label 0) or the other (1).

    Times lie on a common grid of step 0.25 in [0, 4] (as in real archives), each series
    its own subset of 6 to 11 of them: a batch steps through at most 17 distinct times
    (the cost of an ODE-RNN step grows with that number).
    """
    from node_ocp.data import collate_irregular

    g = torch.Generator().manual_seed(seed)
    items, labels = [], []
    for _ in range(n):
        label = int(torch.randint(0, 2, (1,), generator=g))
        k = int(torch.randint(6, 12, (1,), generator=g))
        t = torch.sort(torch.randperm(17, generator=g)[:k]).values.float() * 0.25
        sign = 1.0 if label == 0 else -1.0
        r = 1.0 + 0.1 * t
        v = torch.stack([r * torch.cos(sign * t), r * torch.sin(sign * t)], 1)
        items.append((t, v + 0.05 * torch.randn(k, 2, generator=g), None))
        labels.append(label)
    return collate_irregular(items), torch.tensor(labels)


def ocnopt_step(opt, compute, likelihood=None):
    """One step of the recommended OCNOpt loop on a fixed batch.

    ``compute()`` returns ``(loss, outputs)``; it serves the forward pass and the closure
    of the step control (re-evaluated at trial parameters). Returns the loss.
    """
    opt.zero_grad()
    loss, outputs = compute()
    opt.backward(loss, outputs=outputs if likelihood else None, likelihood=likelihood)
    opt.step(compute)
    return loss
