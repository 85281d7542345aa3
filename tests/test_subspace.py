"""OCNOpt's ``scale_power``, ``numerator`` and ``subspace``: the held directions against hand
computations, and the exact coupled combination against a dense Gauss–Newton matrix built
from the full Jacobian (float64)."""

import copy
import math
import warnings
from collections import defaultdict

import pytest
import torch
from conftest import mlp_field
from test_gauss_newton_cg import Net, _dense_ggn, _loss, _setup
from torch import nn

import node_ocp as no
from node_ocp.optim.curvatures import Damping, DiagonalUnit, EKFACUnit
from node_ocp.optim.ocnopt import _backprop
from node_ocp.optim.preconditioner import Preconditioner
from node_ocp.optim.subspace import SubspaceStep, model_parts

F64 = torch.float64


# ---------------------------------------------------------------------- scale_power
def test_damping_denominator_is_the_power_of_the_shifted_diagonal():
    s = torch.tensor([0.0, 1.0, 4.0], dtype=F64)
    assert torch.equal(Damping(0.5, True).denominator(s, 2.0), s + 1.0)  # p = 1: exactly s + λ
    got = Damping(0.5, True, 0.5).denominator(s, 2.0)
    assert torch.allclose(got, torch.tensor([1.0, math.sqrt(2.0), math.sqrt(5.0)], dtype=F64))
    assert Damping(0.5, False, 0.5).without_damping() == Damping(0.0, False, 0.5)


def test_diagonal_unit_power_half_is_adam_like():
    torch.manual_seed(0)
    p = torch.zeros(5, dtype=F64)
    unit = DiagonalUnit([p], {}, beta=0.9)
    gs = [torch.randn(5, dtype=F64) for _ in range(3)]
    s = torch.zeros(5, dtype=F64)
    for t, g in enumerate(gs, 1):
        (u,) = unit.direction([g], Damping(1e-2, True, 0.5), samples=4.0)
        s = 0.9 * s + 0.1 * 4.0 * g * g
        hat = s / (1 - 0.9**t)
        expected = g / (hat + 1e-2 * float(hat.mean())).sqrt()
        assert torch.allclose(u, expected, rtol=1e-12)


def test_ekfac_unit_power_half_in_its_eigenbasis():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    unit = EKFACUnit(list(layer.parameters()), {}, layer, decay=1.0)
    # a decomposition by hand: A (4 x 4 with the bias column), B (2 x 2)
    qa, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64))
    qb, _ = torch.linalg.qr(torch.randn(2, 2, dtype=F64))
    ea = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64)
    eb = torch.tensor([0.25, 4.0], dtype=F64)
    unit.set_decomposition([qa, qb, ea, eb], 1.0)
    gw, gb = torch.randn(2, 3, dtype=F64), torch.randn(2, dtype=F64)
    damping = Damping(1e-1, True, 0.5)
    uw, ub = unit.direction([gw, gb], damping, samples=1.0)
    mat = torch.cat([gw, gb[:, None]], dim=1)
    s = eb[:, None] * ea[None, :]
    lam = 1e-1 * unit.scale()
    expected = qb @ ((qb.T @ mat @ qa) / (s + lam).sqrt()) @ qa.T
    assert torch.allclose(torch.cat([uw, ub[:, None]], dim=1), expected, rtol=1e-10)
    # the quadratic form with the same metric: vᵀ (C + λ)^½ v
    quad = float(unit.quadratic([gw, gb], damping))
    proj = qb.T @ mat @ qa
    assert quad == pytest.approx(float(((s + lam).sqrt() * proj * proj).sum()), rel=1e-10)


# ---------------------------------------------------------------------- numerator
def test_averaged_numerator_keeps_the_statistics_of_the_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    twin = copy.deepcopy(model)
    pre = Preconditioner(model, "diagonal", state=defaultdict(dict))
    ref = Preconditioner(twin, "diagonal", state=defaultdict(dict))
    params, twin_params = list(model.parameters()), list(twin.parameters())
    g = [torch.randn_like(p) for p in params]
    m = [torch.randn_like(p) for p in params]
    damping = Damping(1e-2, True)
    u = pre.directions(dict(zip(params, g)), damping, numerator=dict(zip(params, m)))
    plain = ref.directions(dict(zip(twin_params, g)), damping)
    state = {unit.params[0]: unit.state for unit in pre.units.units}
    twin_state = {unit.params[0]: unit.state for unit in ref.units.units}
    for p, q, gi, mi in zip(params, twin_params, g, m):
        assert torch.equal(state[p]["diag_s"], twin_state[q]["diag_s"])  # from g, not m
        # the same preconditioner, applied to m instead of g
        assert torch.allclose(u[p] / mi, plain[q] / gi, rtol=1e-10)


def test_ocnopt_averaged_numerator_is_the_bias_corrected_mean():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    opt = no.OCNOpt(model, curvature="identity", numerator="average", numerator_beta=0.5)
    gs = [torch.randn(3, dtype=F64) for _ in range(3)]
    m = torch.zeros(3, dtype=F64)
    for t, g in enumerate(gs, 1):
        out = opt._numerator({model.weight: g[None, :]})
        m = 0.5 * m + 0.5 * g
        assert torch.allclose(out[model.weight][0], m / (1 - 0.5**t), rtol=1e-12)


# ---------------------------------------------------------------------- subspace: the model
def test_model_parts_are_the_top_level_children():
    model, _, _ = _setup()
    parts = model_parts(model)
    assert {parts[model.stem.weight], parts[model.head.bias]} == {"stem", "head"}
    assert all(parts[p] == "ode" for p in model.ode.parameters())


def _directions(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(p.shape, generator=g, dtype=F64) for p in model.parameters()}


def _grads(model, x, y):
    model.zero_grad()
    _loss(model(x), y).backward()
    return {p: p.grad.detach().clone() for p in model.parameters()}


@pytest.mark.parametrize("how", ["parts", "whole"])
def test_subspace_model_matches_the_dense_gauss_newton_matrix(how):
    model, x, y = _setup()
    grads = _grads(model, x, y)
    state = {p: {} for p in model.parameters()}
    prev = _directions(model, seed=5)
    for p in model.parameters():
        state[p]["subspace_prev"] = prev[p]
    step = SubspaceStep(model, how, state, backprop=_backprop(model))
    u = _directions(model)
    dirs = step.basis(u)
    assert len(dirs) == (4 if how == "parts" else 2)  # stem, ode, head (or whole) + previous
    wd = {p: 0.3 for p in model.parameters()}
    with torch.no_grad():
        loss0, mat, b = step.model(
            lambda: (_loss(out := model(x), y), out),
            dirs,
            grads,
            wd,
            _noop,
        )
    ggn, _ = _dense_ggn(model, x, y)
    params = list(model.parameters())

    def flat(d):
        return torch.cat([d.get(p, torch.zeros_like(p)).reshape(-1) for p in params])

    big = torch.stack([flat(d) for d in dirs], dim=1)  # (P, k)
    expected = big.T @ ggn @ big + 0.3 * big.T @ big
    assert torch.allclose(mat, expected, rtol=1e-8, atol=1e-12)
    g = torch.cat([grads[p].reshape(-1) for p in params])
    assert torch.allclose(b, big.T @ g, rtol=1e-10)
    assert loss0 == pytest.approx(float(_loss(model(x), y)), rel=1e-12)
    assert model.ode.gradient != "direct"  # the block's own setting restored


def _noop():
    from contextlib import nullcontext

    return nullcontext()


class TwoParts(nn.Module):
    """Outputs linear in the parameters: the exact model of an MSE loss is the loss."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2, bias=False)
        self.b = nn.Linear(4, 2)
        self.double()

    def forward(self, x):
        return self.a(x[:, :3]) + self.b(x[:, 3:])


def _two_parts_batch():
    """A seeded ``TwoParts`` model, a batch ``(x, y)`` and the closure of its MSE loss."""
    torch.manual_seed(0)
    model = TwoParts()
    x = torch.randn(16, 7, dtype=F64)
    y = torch.randn(16, 2, dtype=F64)

    def closure():
        out = model(x)
        return _loss(out, y), out

    return model, x, y, closure


def test_subspace_step_is_exact_on_a_quadratic_loss():
    model, x, y, closure = _two_parts_batch()
    grads = _grads(model, x, y)
    state = {p: {} for p in model.parameters()}
    step = SubspaceStep(model, "parts", state, damping=1e-3)
    u = _directions(model)

    with torch.no_grad():
        loss0 = float(_loss(model(x), y))
        dirs = step.basis(u)
        _, mat, b = step.model(closure, dirs, grads, {}, _noop)
        c = -torch.linalg.solve(mat + 1e-3 * torch.diag(mat.diagonal()), b)
        taken, loss1 = step.step(grads, u, closure, {}, _noop)
    assert step.last_alpha == 1.0
    assert step.last_rho == pytest.approx(1.0, abs=1e-9)  # the model is the loss
    for p in model.parameters():
        part = 0 if p is model.a.weight else 1
        assert torch.allclose(taken[p], -float(c[part]) * u[p], rtol=1e-9)
    assert loss1 == pytest.approx(loss0 + float(b @ c + 0.5 * c @ mat @ c), rel=1e-9)
    assert torch.equal(state[model.b.bias]["subspace_prev"], taken[model.b.bias])
    assert step.damping < 1e-3  # ρ > ¾: λ shrinks


@pytest.mark.parametrize("in_trials", [True, False])
def test_subspace_step_with_decay_in_its_trials_is_exact_on_the_regularised_loss(in_trials):
    # M carries wd dᵢᵀdⱼ and b the decay's gradient: with the decay's change in the trials
    # the model is the regularised loss itself (ρ = 1); judged on the loss alone it is not
    model, x, y, closure = _two_parts_batch()
    wd = 0.3
    decay = {p: wd for p in model.parameters()}
    grads = {p: g + wd * p.detach() for p, g in _grads(model, x, y).items()}
    step = SubspaceStep(model, "parts", {p: {} for p in model.parameters()}, damping=1e-3)

    with torch.no_grad():
        step.step(grads, _directions(model), closure, decay, _noop, decay_in_trials=in_trials)
    if in_trials:
        assert step.last_rho == pytest.approx(1.0, abs=1e-9)
    else:
        assert abs(step.last_rho - 1.0) > 1e-3


def test_held_weight_adds_the_held_curvature_to_the_model_it_solves():
    # c = −(M + λ diag M + μ diag Q)⁻¹ b with Q_ii the held quadratic along d_i; the trial's
    # ρ is still read against the exact model (1 on a quadratic loss)
    model, x, y, closure = _two_parts_batch()
    grads = _grads(model, x, y)
    mu, lam = 0.7, 1e-3
    weights = {model.a.weight: 3.0, model.b.weight: 0.5, model.b.bias: 2.0}

    def held_quadratic(v):  # a diagonal held curvature, by hand
        return sum(float(weights[p] * (t * t).sum()) for p, t in v.items())

    step = SubspaceStep(model, "parts", {p: {} for p in model.parameters()}, damping=lam)
    step.held_weight = mu
    u = _directions(model)

    with torch.no_grad():
        dirs = step.basis(u)
        _, mat, b = step.model(closure, dirs, grads, {}, _noop)
        q = torch.tensor([held_quadratic(d) for d in dirs], dtype=F64)
        c = -torch.linalg.solve(mat + lam * torch.diag(mat.diagonal()) + mu * torch.diag(q), b)
        c0 = -torch.linalg.solve(mat + lam * torch.diag(mat.diagonal()), b)
        taken, _ = step.step(grads, u, closure, {}, _noop, held_quadratic=held_quadratic)
    assert not torch.allclose(c, c0, rtol=1e-3)  # the held term matters here
    for p in model.parameters():
        part = 0 if p is model.a.weight else 1
        assert torch.allclose(taken[p], -float(c[part]) * u[p], rtol=1e-9)
    assert step.last_rho == pytest.approx(1.0, abs=1e-9)


def test_held_weight_bounds_the_step_along_a_direction_the_batch_finds_flat():
    # a part whose direction barely changes the outputs: the exact model's coefficient is
    # about |b|/M, large; with μ it is about |b| / (μ Q) (not exactly: the parts couple)
    model, x, y, closure = _two_parts_batch()
    with torch.no_grad():
        model.a.weight.mul_(0.0)
    x[:, :3] *= 1e-5  # part a's inputs: the batch constrains it very little
    grads = _grads(model, x, y)
    u = _directions(model)

    def held_quadratic(v):
        return sum(float((t * t).sum()) for t in v.values())

    coefficients = {}
    for mu in (0.0, 0.3):
        step = SubspaceStep(model, "parts", {p: {} for p in model.parameters()}, damping=1e-8)
        step.held_weight = mu
        with torch.no_grad():
            step.step(grads, u, closure, {}, _noop, held_quadratic=held_quadratic)
            dirs = step.basis(u)
            _, _, b = step.model(closure, dirs, grads, {}, _noop)
        coefficients[mu] = (abs(step.last_coefficients[0]), abs(float(b[0])))
    q_a = held_quadratic({model.a.weight: u[model.a.weight]})
    assert coefficients[0.0][0] > 1e3
    bound = coefficients[0.3][1] / (0.3 * q_a)
    assert 0.5 * bound < coefficients[0.3][0] < 2.0 * bound
    assert coefficients[0.3][0] < 1e-6 * coefficients[0.0][0]


def test_ocnopt_hands_the_subspace_its_held_quadratic():
    # with the gradient as numerator, power 1 and no calibration, the held direction of part
    # i is u_i = (C + λ)⁻¹ g_i, so its held quadratic is u_iᵀ(C + λ)u_i = u_iᵀ g_i
    seen = {}
    real_step, real_coefficients = SubspaceStep.step, SubspaceStep.coefficients

    def spy_step(self, grads, directions, *a, **k):
        seen["grads"], seen["directions"] = dict(grads), dict(directions)
        return real_step(self, grads, directions, *a, **k)

    def spy_coefficients(self, mat, b, held=None):
        seen["held"] = held
        return real_coefficients(self, mat, b, held)

    def run(held, steps):
        torch.manual_seed(0)
        net = copy.deepcopy(model)
        opt = no.OCNOpt(
            net,
            subspace="parts",
            scale_power=1.0,
            numerator="gradient",
            calibrate_units=False,
            subspace_held=held,
        )
        found = []
        SubspaceStep.step, SubspaceStep.coefficients = spy_step, spy_coefficients
        try:
            for _ in range(steps):
                opt.zero_grad()
                out = net(x)
                opt.backward(_loss(out, y), outputs=out, likelihood="gaussian")
                opt.step(lambda: (_loss(o := net(x), y), o))
                found.append(dict(seen))
        finally:
            SubspaceStep.step, SubspaceStep.coefficients = real_step, real_coefficients
        return opt, found

    model, x, y = _setup()
    opt, found = run(0.5, 2)
    parts = model_parts(opt.model)
    assert opt._subspace.held_weight == 0.5
    for k, got in enumerate(found):
        expected = defaultdict(float)
        for p, g in got["grads"].items():
            expected[parts[p]] += float((got["directions"][p] * g).sum())
        held = got["held"].tolist()
        # the second step also combines the previous update: one more direction, its own Q
        assert len(held) == len(expected) + k
        assert held[: len(expected)] == pytest.approx(list(expected.values()), rel=1e-8)
        assert all(math.isfinite(q) and q > 0 for q in held)
    _, found = run(0.0, 1)  # μ = 0: no held term reaches the solve (the exact model alone)
    assert found[0]["held"] is None


# ---------------------------------------------------------------------- subspace in OCNOpt
def _train(model, x, y, steps, **kw):
    opt = no.OCNOpt(model, **kw)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        loss = _loss(out, y)
        opt.backward(loss, outputs=out, likelihood="gaussian")
        opt.step(lambda: (_loss(out := model(x), y), out))
        losses.append(float(loss))
    return opt, losses


def test_ocnopt_subspace_descends_every_step_and_resumes_exactly():
    model, x, y = _setup()
    twin = copy.deepcopy(model)
    kw = dict(subspace="parts", scale_power=0.5, numerator="average", update_every=3)
    opt, losses = _train(model, x, y, 8, **kw)
    assert all(b <= a for a, b in zip(losses, losses[1:]))  # every step checked on the batch
    assert losses[-1] < 0.9 * losses[0]
    # the same run in two halves, through a state dict
    opt1, _ = _train(twin, x, y, 4, **kw)
    saved = copy.deepcopy(opt1.state_dict())
    opt2 = no.OCNOpt(twin, **kw)
    opt2.load_state_dict(saved)
    for _ in range(4):
        opt2.zero_grad()
        out = twin(x)
        opt2.backward(_loss(out, y), outputs=out, likelihood="gaussian")
        opt2.step(lambda: (_loss(out := twin(x), y), out))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_ocnopt_subspace_without_outputs_keeps_the_held_step():
    model, x, y = _setup()
    twin = copy.deepcopy(model)
    caught = {}
    # the held step with the directions of "parts" (whose per-part coefficients replace the
    # per-part calibration)
    same = dict(scale_power=0.5, numerator="average", calibrate_units=False)
    pairs = ((model, no.OCNOpt(model, subspace="parts")), (twin, no.OCNOpt(twin, **same)))
    for m, o in pairs:
        o.zero_grad()
        out = m(x)
        o.backward(_loss(out, y), outputs=out, likelihood="gaussian")
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            o.step(lambda m=m: _loss(m(x), y))  # the loss alone: no outputs
        caught[m is model] = [str(w.message) for w in got]
    assert any("subspace: the closure returned no outputs" in w for w in caught[True])
    assert not any("subspace" in w for w in caught[False])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(scale_power=0.5, curvature="kfac"), "scale_power"),
        (dict(scale_power=0.0), "scale_power"),
        (dict(scale_power=lambda s: 0.5), "scale_power"),
        (dict(numerator="momentum"), "numerator"),
        (dict(numerator_beta=1.0), "numerator_beta"),
        (dict(subspace="layers"), "subspace"),
        (dict(subspace="parts", cg_iters=2), "subspace"),
        (dict(subspace_held=-0.1), "subspace_held"),
        (dict(subspace_held="big"), "subspace_held"),
    ],
)
def test_bad_options_are_refused_by_name(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        no.OCNOpt(Net(), **kw)


# ---------------------------------------------------------------------- subspace="auto"
class Recurrent(nn.Module):
    """A GRU cell over a short sequence and a linear read-out."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(2, 3)
        self.head = nn.Linear(3, 2)
        self.double()

    def forward(self, x):  # x: (N, T, 2)
        h = torch.zeros(x.shape[0], 3, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(h)


def test_auto_chooses_the_subspace_step_for_recurrent_models_only():
    rec = no.OCNOpt(Recurrent()).options
    assert (rec.subspace, rec.scale_power, rec.numerator) == ("parts", 0.5, "average")
    ode = no.OCNOpt(Net()).options
    assert (ode.subspace, ode.scale_power, ode.numerator) == ("off", 1.0, "gradient")
    fixed = no.OCNOpt(Recurrent(), step="fixed", lr=0.1).options
    assert fixed.subspace == "off"
    kfac = no.OCNOpt(Net(), subspace="parts", curvature="kfac").options
    assert (kfac.subspace, kfac.scale_power, kfac.numerator) == ("parts", 1.0, "average")


def _recurrent_run(opt, model, x, y, closure_outputs: bool, steps=4):
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        opt.backward(_loss(out, y), outputs=out, likelihood="gaussian")
        if closure_outputs:
            opt.step(lambda: (_loss(o := model(x), y), o))
        else:
            opt.step(lambda: _loss(model(x), y))


def test_auto_without_outputs_is_the_held_step_bit_for_bit():
    torch.manual_seed(0)
    model = Recurrent()
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 4, 2, dtype=F64), torch.randn(8, 2, dtype=F64)
    opt, ref = no.OCNOpt(model), no.OCNOpt(twin, subspace="off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silent: the automatic choice is withdrawn quietly
        _recurrent_run(opt, model, x, y, closure_outputs=False)
    _recurrent_run(ref, twin, x, y, closure_outputs=False)
    assert opt.options.subspace == "off" and opt.options.scale_power == 1.0
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_auto_with_outputs_takes_subspace_steps_and_resumes_exactly():
    torch.manual_seed(0)
    model = Recurrent()
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 4, 2, dtype=F64), torch.randn(8, 2, dtype=F64)
    opt = no.OCNOpt(model)
    _recurrent_run(opt, model, x, y, closure_outputs=True, steps=6)
    assert opt.options.subspace == "parts"
    assert len(opt._subspace.last_coefficients) == 3  # cell, head, previous update
    first = no.OCNOpt(twin)
    _recurrent_run(first, twin, x, y, closure_outputs=True, steps=3)
    second = no.OCNOpt(twin)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    _recurrent_run(second, twin, x, y, closure_outputs=True, steps=3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------- the step's own graph
class ODERecurrent(nn.Module):
    """A GRU cell, an ODE block between observations and a read-out (an ODE-RNN)."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(2, 3)
        self.ode = no.ODEBlock(
            mlp_field(3, 4), (0.0, 0.25), method="rk4", options={"step_size": 0.125}
        )
        self.head = nn.Linear(3, 2)
        self.double()

    def forward(self, x):  # x: (N, T, 2)
        h = torch.zeros(x.shape[0], 3, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], self.ode(h))
        return self.head(h)


def test_kept_graph_gives_the_closures_model():
    torch.manual_seed(0)
    model = ODERecurrent()
    x, y = torch.randn(6, 3, 2, dtype=F64), torch.randn(6, 2, dtype=F64)
    state = {p: {} for p in model.parameters()}
    step = SubspaceStep(model, "parts", state, backprop=_backprop(model))
    model.ode.gradient = "direct"
    out = model(x)
    loss = _loss(out, y)
    loss.backward(retain_graph=True)
    grads = {p: p.grad.detach().clone() for p in model.parameters()}
    model.ode.gradient = "adjoint"
    dirs = step.basis(_directions(model))
    calls = []

    def closure():
        calls.append(1)
        o = model(x)
        return _loss(o, y), o

    with torch.no_grad():
        kept = step.model(closure, dirs, grads, {}, _noop, graph=(loss, out))
        assert not calls  # the kept graph: no evaluation of the batch
        fresh = step.model(closure, dirs, grads, {}, _noop)
    assert calls == [1]
    assert kept[0] == pytest.approx(fresh[0], rel=1e-14)
    assert torch.allclose(kept[1], fresh[1], rtol=1e-10, atol=1e-14)
    assert torch.allclose(kept[2], fresh[2], rtol=1e-12)


def test_subspace_steps_keep_the_forward_graph_between_refreshes():
    torch.manual_seed(0)
    model = ODERecurrent()
    x, y = torch.randn(6, 3, 2, dtype=F64), torch.randn(6, 2, dtype=F64)
    opt = no.OCNOpt(model, update_every=4)
    calls, modes = [], []

    def closure():
        calls.append(1)
        o = model(x)
        return _loss(o, y), o

    for i in range(8):
        opt.zero_grad()
        modes.append(model.ode.gradient)
        out = model(x)
        opt.backward(_loss(out, y), outputs=out, likelihood="gaussian")
        kept = opt._graph is not None
        before = len(calls)
        opt.step(closure)
        used = len(calls) - before
        if i % 4:  # between refreshes
            assert kept and used == opt._subspace.last_trials, (i, used)  # only the trials
    # refresh steps (0, 4) run the own adjoint (the time-joint capture), the others direct
    assert modes == ["adjoint", "direct", "direct", "direct"] * 2
    assert opt.options.subspace == "parts"
