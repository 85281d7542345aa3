"""OCNOpt's parts under one contract: every stepper, curvature variant, factor source and
feedback policy resumes from ``state_dict`` exactly; the options object is the one source of
defaults and checks. Then the parts on their own: each factor source's route of the
statistics, the feedback runner's state."""

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import mlp_field
from torch import nn

import node_ocp as no
from node_ocp.optim.curvatures import VARIANTS
from node_ocp.optim.factor_sources import EMPIRICAL, FACTOR_SOURCES_BY_NAME
from node_ocp.optim.feedback import FeedbackReport
from node_ocp.optim.feedback_runner import FeedbackRunner
from node_ocp.optim.options import DEFAULTS, FACTOR_SOURCES, OCNOptOptions
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
    with pytest.raises(
        ValueError, match=r"ekfac_decay: received 0\.0; accepted: a float in \(0, 1\]"
    ):
        no.OCNOpt(Net(), OCNOptOptions(ekfac_decay=0.0))


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


# ---------------------------------------------------------------- factor sources
@pytest.mark.parametrize("name", sorted(FACTOR_SOURCES_BY_NAME))
def test_every_factor_source_resumes_exactly(name):
    model, opt = _round_trip(factors=name)
    assert type(opt._factor_source) is FACTOR_SOURCES_BY_NAME[name]
    assert opt._factor_source.name == name == opt.state_dict()["ocnopt"]["factors"]


def test_a_state_load_leaves_no_hooks_of_the_old_collector():
    """Loading rebuilds the units and their outside collector; the old collector's hooks
    used to stay on the layers, gathering unpaused, and broke the factor flow's batched
    pull-backs on the first refresh after a resume (the sampled and exact cases above)."""
    model = Net()
    opt = no.OCNOpt(model)  # armed at step 0: the head's statistics hook is on
    hooks = len(model.head._forward_hooks)
    assert hooks == 1
    opt.load_state_dict(opt.state_dict())
    assert len(model.head._forward_hooks) == hooks


def test_the_factor_source_registry_is_the_options_choices():
    assert (
        tuple(FACTOR_SOURCES_BY_NAME) == FACTOR_SOURCES == ("auto", "empirical", "sampled", "exact")
    )
    for name, cls in FACTOR_SOURCES_BY_NAME.items():
        assert cls.name == name and cls.stage_source in ("empirical", "sampled", "exact")
    with pytest.raises(ValueError, match="factors: received 'fisher'; accepted: one of 'auto'"):
        no.OCNOpt(Net(), factors="fisher")


def _captured(factors, twice=False):
    """An optimizer armed for a refresh and the outputs of one forward pass (``twice``: the
    output reads both of two block calls, which the factor chain cannot follow)."""
    torch.manual_seed(0)
    model = Net()
    opt = no.OCNOpt(model, factors=factors)
    x, _ = _data()
    h = model.ode(model.stem(x))
    out = model.head(h + model.ode(h)) if twice else model.head(h)
    return opt, out


@pytest.mark.parametrize(
    "factors, likelihood, capture, route",
    [
        ("empirical", "categorical", "chain", "empirical"),
        ("empirical", None, "chain", "empirical"),
        ("auto", "categorical", "chain", "fisher"),
        ("auto", "categorical", None, "fisher"),
        ("auto", "gaussian", "chain", "empirical"),
        ("auto", None, "chain", "empirical"),
        ("sampled", "gaussian", "chain", "flow"),
        ("sampled", "gaussian", "twice", "fisher"),
        ("sampled", "gaussian", "empty", "fisher"),
        ("sampled", "gaussian", None, "fisher"),
        ("exact", "gaussian", "chain", "flow"),
        ("exact", "gaussian", None, "fisher"),  # no capture: a model without blocks
    ],
)
def test_each_factor_source_routes_the_statistics(factors, likelihood, capture, route):
    """The route of a refresh step's statistics for what backward was handed and the
    capture armed (None: no capture; "empty": no block call recorded)."""
    opt, out = _captured(factors, twice=capture == "twice")
    cap = {None: None, "empty": SimpleNamespace(records=[])}.get(capture, opt.capture)
    got = opt._factor_source.route(out if likelihood else None, likelihood, cap)
    assert got.name == route
    assert got.empirical == (route != "flow")
    assert got.pauses_collector == (route == "fisher")
    assert got.gives_factors == (route != "empirical")


@pytest.mark.parametrize("factors", ["sampled", "exact"])
def test_the_factor_carrying_sources_need_outputs_and_their_factors(factors):
    opt, out = _captured(factors)
    source = opt._factor_source
    assert source.carries_factors and opt.capture is not None
    with pytest.raises(ValueError, match=rf"both given on refresh steps with factors='{factors}'"):
        source.route(None, None, opt.capture)
    with pytest.raises(ValueError, match=rf"factors='{factors}': step 0 is a refresh step but no"):
        source.check_handed_over(0, opt.capture, EMPIRICAL)
    source.check_handed_over(0, opt.capture, source.route(out, "gaussian", opt.capture))
    source.check_handed_over(0, None, EMPIRICAL)  # no capture armed: nothing was owed


@pytest.mark.parametrize("factors", ["auto", "empirical"])
def test_the_empirical_sources_carry_no_factors(factors):
    opt, _ = _captured(factors)
    assert not opt._factor_source.carries_factors and opt._factor_source.flow is None
    opt._factor_source.check_handed_over(0, opt.capture, EMPIRICAL)


# ---------------------------------------------------------------- feedback runner
def _runner(mode="gauss_newton", model=None):
    return FeedbackRunner(
        mode,
        2,
        Net() if model is None else model,
        "empirical",
        1,
        torch.Generator(),
        1.0,
        64,
        fixed_step=True,
    )


def test_the_feedback_runner_state_dict_round_trips():
    runner = _runner()
    runner.steps, runner.failures = 7, 2
    runner.last = FeedbackReport(step=6, closed=2, open=1, gain_ratio=0.25, loss=0.5)
    state = copy.deepcopy(runner.state_dict())
    assert state == {
        "feedback": "gauss_newton",
        "feedback_every": 2,
        "feedback_steps": 7,
        "feedback_failures": 2,
        "last_feedback": runner.last.as_dict(),
        "feedback_gain": {"scale": 1.0, "trials": 0, "wins": 0},
    }
    other = _runner()
    other.load_state_dict(state)
    assert (other.steps, other.failures, other.last) == (7, 2, runner.last)
    assert other.state_dict() == state
    with pytest.raises(ValueError, match=r"received \"feedback='off'\"; accepted: the feedback"):
        other.load_state_dict({})  # a checkpoint from before feedback: off
    off = _runner("off")
    off.load_state_dict({})
    assert (off.steps, off.failures, off.last) == (0, 0, None)
    with pytest.raises(ValueError, match=r"feedback='gauss_newton'.*\('off'\)"):
        off.load_state_dict(state)


def test_the_feedback_runner_is_due_every_feedback_every_steps():
    runner = _runner()
    assert [runner.due(s) for s in range(4)] == [True, False, True, False]
    assert not any(_runner("off").due(s) for s in range(4))
    runner.arm(0)
    assert runner.recorder.armed and not runner.ready
    runner.arm(1)
    assert not runner.recorder.armed
    with pytest.warns(RuntimeWarning, match="feedback runs open-loop"):
        lone = _runner(model=nn.Linear(2, 2))
    assert lone.recorder is None and not lone.due(0)
    with pytest.raises(ValueError, match="'dense' with step='fixed'"):
        FeedbackRunner("dense", 1, Net(), "empirical", 1, torch.Generator(), 1.0, 64, False)


def test_a_checkpoint_keeps_the_keys_of_its_format():
    """The saved dict keeps the keys (and order) OCNOpt has always written, so checkpoints
    load across the split into parts (``feedback_gain``, the feedback gain's own scale, is
    new; a checkpoint without it loads with the scale at 1; ``subspace`` and
    ``auto_pending`` are new too: a checkpoint without them resumes with held steps, see
    ``test_subspace.py``)."""
    _, opt = _round_trip(feedback="gauss_newton", step="fixed", lr=0.05)
    assert list(opt.state_dict()["ocnopt"]) == [
        "step",
        "skipped_steps",
        "feedback",
        "feedback_every",
        "feedback_steps",
        "feedback_failures",
        "last_feedback",
        "feedback_gain",
        "generator",
        "curvature",
        "factors",
        "samples",
        "damping",
        "control",
        "unit_calibration",
        "last_adaptation",
        "param_shapes",
        "subspace",
        "auto_pending",
    ]
