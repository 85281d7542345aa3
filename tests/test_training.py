"""Every OCNOpt curvature variant trains a 2-D CNF and a small ODE classifier."""

import math

import pytest
import torch
from torch import nn

import node_ocp as no
from node_ocp.data import toy_2d
from node_ocp.models import CNF, time_mlp

VARIANTS = {
    "identity": 0.05,
    "diagonal": 0.02,
    "kfac": 0.05,
    "ekfac": 0.05,
    "dense": 0.05,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_a_2d_cnf(variant):
    torch.manual_seed(0)
    x = toy_2d("8gaussians", 1024, seed=0)
    model = CNF(2, hidden=(16, 16), rtol=1e-3, atol=1e-4)
    opt = no.OCNOpt(model, lr=VARIANTS[variant], curvature=variant, update_every=10, sample_dt=0.05)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        first = model.nll(x).item()
    for _ in range(40):
        idx = torch.randint(0, 1024, (128,), generator=g)
        opt.zero_grad()
        model.nll(x[idx]).backward()
        opt.step()
    with torch.no_grad():
        last = model.nll(x).item()
    assert last < first - 1.0, (first, last)


class MoonsClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(2, 4)
        self.ode = no.ODEBlock(time_mlp(4, (16,), "tanh"), (0.0, 1.0), rtol=1e-3, atol=1e-4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.ode(self.stem(x)))


def two_moons(n, g):
    """Labelled two moons: (n, 2) points, (n,) labels."""
    t = torch.rand(n, generator=g) * math.pi
    lower = torch.rand(n, generator=g) < 0.5
    x = torch.where(lower, 1 - torch.cos(t), torch.cos(t))
    y = torch.where(lower, 0.5 - torch.sin(t), torch.sin(t))
    pts = torch.stack([x - 0.5, y - 0.25], 1) * 2
    return pts + 0.1 * torch.randn(n, 2, generator=g), lower.long()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_an_ode_classifier(variant):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = two_moons(512, g)
    model = MoonsClassifier()
    lr = {"diagonal": 0.01}.get(variant, 0.03)
    opt = no.OCNOpt(model, lr=lr, curvature=variant, update_every=10, sample_dt=0.05)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        first = loss_fn(model(x), y).item()
    for _ in range(60):
        idx = torch.randint(0, 512, (128,), generator=g)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        last = loss_fn(model(x), y).item()
    assert last < 0.5 * first, (first, last)
