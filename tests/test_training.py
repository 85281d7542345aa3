"""Every OCNOpt curvature variant trains a 2-D CNF and a small ODE classifier at its defaults
(no learning rate: the step comes from the quadratic model)."""

import math

import pytest
import torch
from conftest import ocnopt_step
from torch import nn

import node_ocp as no
from node_ocp.data import toy_2d
from node_ocp.models import CNF, standard_normal_logprob, time_mlp

VARIANTS = ["identity", "diagonal", "kfac", "ekfac", "dense"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_a_2d_cnf(variant):
    torch.manual_seed(0)
    x = toy_2d("8gaussians", 1024, seed=0)
    model = CNF(2, hidden=(16, 16), rtol=1e-3, atol=1e-4)
    opt = no.OCNOpt(model, curvature=variant, update_every=10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        first = model.nll(x).item()

    for _ in range(40):
        idx = torch.randint(0, 1024, (128,), generator=g)

        def compute(idx=idx):
            z, dlogp, _ = model(x[idx])
            return -(standard_normal_logprob(z) - dlogp).mean(), z

        ocnopt_step(opt, compute, "standard_normal")
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


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_an_ode_classifier(variant):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = two_moons(512, g)
    model = MoonsClassifier()
    opt = no.OCNOpt(model, curvature=variant, update_every=10)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        first = loss_fn(model(x), y).item()

    for _ in range(100):
        idx = torch.randint(0, 512, (128,), generator=g)

        def compute(idx=idx):
            logits = model(x[idx])
            return loss_fn(logits, y[idx]), logits

        ocnopt_step(opt, compute, "categorical")
    with torch.no_grad():
        last = loss_fn(model(x), y).item()
    assert last < 0.5 * first, (first, last)
