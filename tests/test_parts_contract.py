"""OCNOpt's parts under one contract: every stepper and every curvature variant resumes from
``state_dict`` exactly; the options object is the one source of defaults and checks."""

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import mlp_field
from torch import nn

import node_ocp as no
from node_ocp.optim.curvatures import VARIANTS
from node_ocp.optim.options import DEFAULTS, OCNOptOptions
from node_ocp.optim.steppers import STEPPERS
from node_ocp.train.config import load_config
from node_ocp.train.optimizers import ocnopt_options

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(2, 3), nn.Tanh())
        self.ode = no.ODEBlock(
            mlp_field(3, 6), (0.0, 0.5), method="rk4", options={"step_size": 0.25}
        )
        self.head = nn.Linear(3, 2)
        self.double()

    def forward(self, x):
        return self.head(self.ode(self.stem(x)))

    def feedback_stages(self):
        return [self.stem, self.ode, self.head]


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 2, generator=g, dtype=torch.float64), torch.randn(
        16, 2, generator=g, dtype=torch.float64
    )


def _steps(model, opt, n):
    x, y = _data()
    for _ in range(n):
        opt.zero_grad()
        out = model(x)
        loss = (out - y).pow(2).mean()
        opt.backward(loss, outputs=out, likelihood="gaussian")
        opt.step(lambda: ((model(x) - y).pow(2).mean(), model(x)))


def _round_trip(**kw):
    """Three steps, a state_dict, then two more steps: continued against resumed."""
    torch.manual_seed(0)
    model = Net()
    opt = no.OCNOpt(model, update_every=2, adapt_every=2, **kw)
    _steps(model, opt, 3)
    twin = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    _steps(model, opt, 2)
    other = Net()
    other.load_state_dict(twin)
    resumed = no.OCNOpt(other, update_every=2, adapt_every=2, **kw)
    resumed.load_state_dict(state)
    _steps(other, resumed, 2)
    for a, b in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return model, opt


@pytest.mark.parametrize("name", sorted(STEPPERS))
def test_every_stepper_resumes_exactly_and_moves(name):
    kw = {"step": name}
    if STEPPERS[name].requires_lr:
        kw["lr"] = 0.05
    before = Net().state_dict()
    model, opt = _round_trip(**kw)
    assert type(opt._stepper).__name__ == STEPPERS[name].__name__
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("curvature", sorted(VARIANTS))
def test_every_curvature_variant_resumes_exactly(curvature):
    _round_trip(curvature=curvature)


def test_options_are_the_one_source_of_defaults_and_checks():
    assert DEFAULTS["factors"] == OCNOptOptions().factors == "auto"
    assert no.optim.DEFAULTS is DEFAULTS
    opts = OCNOptOptions(damping=1e-3)
    opt = no.OCNOpt(Net(), opts, momentum=0.5)
    assert opt.options.damping == 1e-3 and opt.options.momentum == 0.5
    assert opt.damping == 1e-3 and opt.param_groups[0]["momentum"] == 0.5
    with pytest.raises(TypeError, match="OCNOpt: unknown option 'dampening'; accepted: lr, "):
        no.OCNOpt(Net(), dampening=0.1)
    with pytest.raises(TypeError, match="options: received an object of type float"):
        no.OCNOpt(Net(), 0.1)
    with pytest.raises(ValueError, match=r"alpha: received 0\.0; accepted: a float in \(0, 1\]"):
        no.OCNOpt(Net(), OCNOptOptions(alpha=0.0))


def test_a_config_table_gives_the_library_default_options():
    """``kind = "ocnopt"`` alone is ``OCNOptOptions()``; keys set in a table reach it."""
    cfg = load_config(CONFIGS / "quickstart.toml")
    assert ocnopt_options(cfg.optimizers["ocnopt"], math.inf, seed=3) == OCNOptOptions(seed=3)
    kfac = ocnopt_options(cfg.optimizers["ocnopt-kfac"], 0.1)
    assert kfac == OCNOptOptions(curvature="kfac", lr=0.1)


@pytest.mark.parametrize("name", ["gauss_newton", "dense"])
def test_every_feedback_policy_sweeps_and_resumes_exactly(name):
    from node_ocp.optim.feedback_policies import POLICIES

    kw = dict(feedback=name, step="fixed", lr=0.05, damping_mode="absolute", damping=0.1)
    model, opt = _round_trip(**kw)
    assert type(opt._feedback_runner.policy) is POLICIES[name]
    assert opt.feedback_steps >= 5 and opt.feedback_failures == 0
