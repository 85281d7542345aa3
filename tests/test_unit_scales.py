"""One calibration per curvature unit (node_ocp.optim.unit_scales), against hand formulas."""

import math

import pytest
import torch
from torch import nn

import node_ocp as no
from node_ocp.optim.unit_scales import SCALE_KEY, scale_of

F64 = torch.float64


class TwoInputs(nn.Module):
    """o = W1 x1 + W2 x2 (no bias): the loss's Hessian in W_i is E[x_i x_iᵀ] ⊗ I."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2, bias=False)
        self.b = nn.Linear(3, 2, bias=False)
        self.double()

    def forward(self, x1, x2):
        return self.a(x1) + self.b(x2)


def _case(scale_a=10.0, scale_b=0.1, n=64, seed=0):
    torch.manual_seed(seed)
    model = TwoInputs()
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, 3, generator=g, dtype=F64) * scale_a
    x2 = torch.randn(n, 3, generator=g, dtype=F64) * scale_b
    y = torch.randn(n, 2, generator=g, dtype=F64)

    def compute():
        out = model(x1, x2)
        return 0.5 * ((out - y) ** 2).sum(1).mean(), out

    return model, compute, (x1, x2)


def _step(opt, compute):
    opt.zero_grad()
    loss, out = compute()
    opt.backward(loss, outputs=out, likelihood="gaussian")
    opt.step(compute)
    return float(loss.detach())


def test_the_first_sweep_sets_each_units_scale_to_its_curvature_over_the_geometric_mean():
    """At step 0 the identity units hold |v|², so a probe along −g measures
    κ_i = mean_b ‖G_i x_b‖² / ‖G_i‖² (the exact curvature of this quadratic along G_i); the
    scales are κ_i / √(κ_a κ_b)."""
    model, compute, (x1, x2) = _case()
    opt = no.OCNOpt(model, curvature="identity")
    opt.zero_grad()
    loss, out = compute()
    opt.backward(loss, outputs=out, likelihood="gaussian")
    grads = {m: m.weight.grad.detach().clone() for m in (model.a, model.b)}
    opt.step(compute)
    kappa = {}
    for m, x in ((model.a, x1), (model.b, x2)):
        g = grads[m]
        kappa[m] = float(((x @ g.T) ** 2).sum(1).mean() / (g**2).sum())
    mean = math.sqrt(kappa[model.a] * kappa[model.b])
    units = {u.params[0]: u for u in opt.units}
    for m in (model.a, model.b):
        assert scale_of(units[m.weight]) == pytest.approx(kappa[m] / mean, rel=1e-6)
    assert kappa[model.a] / kappa[model.b] > 1e3  # the case is what it claims: mis-scaled


def test_per_unit_scales_let_both_units_converge_where_one_kappa_cannot():
    """Inputs 100x apart in scale: with one κ the small-curvature unit crawls; with a scale
    per unit the loss reaches the least-squares optimum to 1e-6 within 20 steps."""
    results = {}
    for calibrate in (True, False):
        model, compute, (x1, x2) = _case(seed=1)
        opt = no.OCNOpt(model, curvature="identity", momentum=0.0, calibrate_units=calibrate)
        for _ in range(20):
            _step(opt, compute)
        results[calibrate] = float(compute()[0])
    # the optimum of the joint least-squares problem
    _, _, (x1, x2) = _case(seed=1)
    x = torch.cat([x1, x2], 1)
    target = _targets(seed=1)
    sol = torch.linalg.lstsq(x, target).solution
    best = float(0.5 * ((x @ sol - target) ** 2).sum(1).mean())
    assert results[True] - best < 1e-6 * max(1.0, best)
    assert results[False] - best > 1e3 * (results[True] - best + 1e-12)


def _targets(seed, n=64):
    """The y of :func:`_case` (same generator draws)."""
    g = torch.Generator().manual_seed(seed)
    torch.randn(n, 3, generator=g, dtype=F64)
    torch.randn(n, 3, generator=g, dtype=F64)
    return torch.randn(n, 2, generator=g, dtype=F64)


def test_scales_are_saved_and_the_sweep_can_be_switched_off():
    model, compute, _ = _case()
    opt = no.OCNOpt(model, curvature="identity")
    _step(opt, compute)
    scales = [scale_of(u) for u in opt.units]
    assert any(abs(s - 1.0) > 0.1 for s in scales)
    twin_model, _, _ = _case()
    twin = no.OCNOpt(twin_model, curvature="identity")
    twin.load_state_dict(opt.state_dict())
    assert [scale_of(u) for u in twin.units] == scales
    off = no.OCNOpt(_case()[0], curvature="identity", calibrate_units=False)
    assert all(SCALE_KEY not in u.state for u in off.units)
    with pytest.raises(TypeError, match="calibrate_units"):
        no.OCNOpt(model, calibrate_units="yes")


def test_units_are_grouped_by_the_part_that_owns_them_and_one_part_is_not_swept():
    """An ODE-RNN-like model: the cell's two maps, the field's layers and the head are three
    groups; a model of one ODE block is one group and its sweep evaluates nothing."""
    from conftest import mlp_field

    from node_ocp.optim.unit_scales import unit_groups

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.GRUCell(2, 3)
            self.ode = no.ODEBlock(mlp_field(3, 4), (0.0, 0.5))
            self.head = nn.Linear(3, 2)
            self.double()

        def forward(self, x):
            return self.head(self.ode(self.cell(x)))

    model = Seq()
    opt = no.OCNOpt(model)
    groups = unit_groups(model, opt.blocks, opt.units)
    params = [{p for u in g for p in u.params} for g in groups]
    assert sorted(len(g) for g in groups) == [1, 2, 6]  # head; cell maps; 2 layers x 3 maps
    assert set(model.cell.parameters()) in params
    assert set(model.ode.field.parameters()) in params
    assert set(model.head.parameters()) in params

    block = no.ODEBlock(mlp_field(2, 4), (0.0, 0.5))
    single = no.OCNOpt(block)
    assert len(unit_groups(block, single.blocks, single.units)) == 1
    x = torch.randn(8, 2, dtype=F64)
    calls = {"n": 0}

    def compute():
        calls["n"] += 1
        out = block(x)
        return 0.5 * (out**2).sum(1).mean(), out

    _step(single, compute)
    assert calls["n"] == 2  # the step's forward and its one trial: no probe
    assert all(SCALE_KEY not in u.state for u in single.units)


def test_calibrate_units_from_a_config_reaches_ocnopt():
    from train_helpers import tiny

    from node_ocp.train.config import ConfigError, config_from_dict
    from node_ocp.train.optimizers import build_optimizer
    from node_ocp.train.tasks import build_task

    raw = tiny()
    raw["optimizers"]["ocnopt"]["calibrate_units"] = False
    cfg = config_from_dict(raw)
    task = build_task(cfg, "cpu")
    assert build_optimizer(cfg.optimizer("ocnopt"), task.model)._calibration.enabled is False
    default = config_from_dict(tiny())
    assert build_optimizer(default.optimizer("ocnopt"), task.model)._calibration.enabled
    raw["optimizers"]["ocnopt"]["calibrate_units"] = "no"
    with pytest.raises(ConfigError, match=r"calibrate_units: received 'no'; accepted: true"):
        config_from_dict(raw)
