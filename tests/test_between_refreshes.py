"""OCNOpt's ``between_refreshes``: the ODE blocks' gradient on the steps that gather no
curvature. ``"direct"`` backpropagates through the solvers there; refresh steps keep the
own adjoint (the time-joint capture). Float64, tight tolerances: the two gradients agree to
the solver's error, so the runs must agree to it too."""

import pytest
import torch
from conftest import mlp_field
from torch import nn

import node_ocp as no

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


class Classifier(nn.Module):
    """An ODE block on 3-D inputs and a linear head to 2 classes."""

    def __init__(self):
        super().__init__()
        self.ode = no.ODEBlock(mlp_field(dim=3, hidden=6), (0.0, 0.5), **TIGHT)
        self.head = nn.Linear(3, 2, dtype=F64)

    def forward(self, x):
        return self.head(self.ode(x))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, generator=g, dtype=F64), torch.randint(0, 2, (16,), generator=g)


def _run(steps: int, **options):
    """``steps`` of the recommended loop: the parameters, and per step the block's gradient
    mode in the forward, its backward NFE and whether OCNOpt kept a graph."""
    torch.manual_seed(0)
    model = Classifier()
    x, y = _batch()
    opt = no.OCNOpt(model, update_every=3, **options)

    def closure():
        out = model(x)
        return nn.functional.cross_entropy(out, y), out

    modes, backward, kept = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        modes.append(model.ode.gradient)
        model.ode.reset_nfe()
        loss, out = closure()
        opt.backward(loss, outputs=out, likelihood="categorical")
        backward.append(model.ode.nfe_backward)
        kept.append(opt._graph is not None)
        opt.step(closure)
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return params, modes, backward, kept, model


def test_direct_between_refreshes_backpropagates_there_and_refreshes_through_the_adjoint():
    _, modes, backward, kept, model = _run(6, between_refreshes="direct")
    assert modes == ["adjoint", "direct", "direct"] * 2
    # the own adjoint's backward solve on refresh steps only
    assert [n > 0 for n in backward] == [True, False, False] * 2
    assert not any(kept)  # no graph kept: that is the subspace step's
    assert model.ode.gradient == "adjoint"  # the coming step (6) is a refresh


def test_the_default_keeps_the_blocks_own_gradient_on_every_step():
    _, modes, backward, _, _ = _run(6)
    assert modes == ["adjoint"] * 6 and all(n > 0 for n in backward)


def test_direct_between_refreshes_takes_the_same_steps_to_the_solvers_error():
    own, *_ = _run(7)
    direct, *_ = _run(7, between_refreshes="direct")
    start, *_ = _run(0)
    moved = (own - start).norm()
    assert moved > 1e-2  # the runs move
    # the gradients differ by the solvers' error (tolerance 1e-10); seven second-order steps
    # amplify it to ~5e-6 of the distance moved, no discrete choice of the steps differs
    assert (direct - own).norm() < 1e-4 * moved


def test_a_resumed_optimizer_restores_the_blocks_own_gradient():
    _, _, _, _, model = _run(2, between_refreshes="direct")
    assert model.ode.gradient == "direct"
    opt = no.OCNOpt(model, update_every=3)  # a new optimizer of the same model, step 0
    assert model.ode.gradient == "adjoint" and opt.options.between_refreshes == "own"


def test_a_bad_value_is_refused_by_name():
    with pytest.raises(ValueError, match=r"between_refreshes: received 'backprop'.*'own'"):
        no.OCNOpt(Classifier(), between_refreshes="backprop")


def test_the_ocnopt_table_key_reaches_the_optimizer_and_refuses_a_bad_value(tmp_path):
    from train_helpers import tiny, write_toml

    from node_ocp.train import build_task, load_config
    from node_ocp.train.config import ConfigError
    from node_ocp.train.optimizers import build_optimizer

    def config(value, name):
        raw = tiny()
        raw["optimizers"]["ocnopt"]["between_refreshes"] = value
        return load_config(write_toml(tmp_path / name, raw))

    cfg = config("direct", "c.toml")
    task = build_task(cfg, "cpu")
    opt = build_optimizer(cfg.optimizer("ocnopt"), task.model, seed=0)
    assert opt.options.between_refreshes == "direct"
    with pytest.raises(ConfigError, match=r"\[optimizers\.ocnopt\]\.between_refreshes: received"):
        config("x", "d.toml")


def test_a_resumed_run_goes_on_through_the_solver_between_refreshes():
    x, y = _batch()
    for options, mode in (({"between_refreshes": "direct"}, "direct"), ({}, "adjoint")):
        torch.manual_seed(0)
        model = Classifier()
        opt = no.OCNOpt(model, update_every=3, **options)
        for _ in range(2):  # the coming step, 2, is between refreshes
            opt.zero_grad()
            out = model(x)
            opt.backward(nn.functional.cross_entropy(out, y), outputs=out, likelihood="categorical")
            opt.step(lambda m=model: (nn.functional.cross_entropy(m(x), y), m(x)))
        fresh = Classifier()
        fresh.load_state_dict(model.state_dict())
        resumed = no.OCNOpt(fresh, update_every=3, **options)
        assert fresh.ode.gradient == "adjoint"  # step 0 of a new optimizer: a refresh
        resumed.load_state_dict(opt.state_dict())
        assert fresh.ode.gradient == mode, options


def test_a_block_only_the_own_adjoint_serves_keeps_it():
    from test_per_sample import per_sample_block

    from node_ocp.optim.ocnopt import _can_backprop

    block = per_sample_block(mlp_field(dim=3, hidden=6))
    assert _can_backprop(block)
    block.t.requires_grad_(True)  # a horizon control: direct refuses this grid
    assert not _can_backprop(block)
    opt = no.OCNOpt(nn.Sequential(block), update_every=3, between_refreshes="direct")
    opt._set_direct(True, keep_graph=False)
    assert block.gradient == "adjoint"


@pytest.mark.parametrize("other", [{"feedback": "gauss_newton"}, {"cg_iters": 2}])
def test_direct_between_refreshes_is_refused_where_steps_need_the_adjoint(other):
    with pytest.raises(ValueError, match=r"between_refreshes: received 'direct'.*'own' with"):
        no.OCNOpt(Classifier(), between_refreshes="direct", **other)
