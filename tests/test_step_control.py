"""The step control against closed forms: on a quadratic the reduction ratio is 1, the damping
falls and one step reaches the least-squares minimiser; the step along u minimises the model
written out with explicit matrices; failed, stiff and loss-raising trials; the trust region."""

import copy

import pytest
import torch
from conftest import mlp_field
from torch import nn

import node_ocp as no
from node_ocp.optim.step_control import StepControl, TrialOutcome, momentum_step

F64 = torch.float64


def _quadratic_problem(n=32, d=4, k=3, seed=0):
    """o = W x with XᵀX / n = I, so that the Hessian of ½ mean ‖W x − y‖² in W is I."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=F64))
    x = q * n**0.5
    y = torch.randn(n, k, generator=g, dtype=F64)
    model = nn.Linear(d, k, bias=False).double()
    solution = torch.linalg.lstsq(x, y).solution.T  # (k, d)

    def compute():
        out = model(x)
        return 0.5 * ((out - y) ** 2).sum(1).mean(), out

    return model, compute, solution


def _step(opt, compute, likelihood="gaussian"):
    opt.zero_grad()
    loss, out = compute()
    opt.backward(loss, outputs=out, likelihood=likelihood)
    opt.step(compute)
    return float(loss.detach())


def test_on_a_quadratic_rho_is_one_the_damping_falls_and_a_step_reaches_the_minimiser():
    model, compute, solution = _quadratic_problem()
    opt = no.OCNOpt(model, curvature="identity", momentum=0.0, adapt_every=1, damping=0.1)
    kappas, rhos, dampings, errors = [], [], [], []
    for _ in range(8):
        _step(opt, compute)
        a = opt.last_adaptation
        kappas.append(a.kappa)
        rhos.append(a.rho)
        dampings.append(opt.damping)
        errors.append(float((model.weight.detach() - solution).norm()))
        if errors[-1] < 1e-12:
            break
    # κ falls by at most 4x per adaptation onto the exact curvature 1 (H = I, P = I); every
    # trial lowered the loss at least as much as the model promised (ρ = 2 − 1/κ >= 1 while
    # κ over-estimates the curvature), and the damping fell each time
    assert all(k1 >= k0 / 4 - 1e-12 for k0, k1 in zip(kappas, kappas[1:]))
    assert kappas[-1] == pytest.approx(1.0, rel=1e-9)
    assert all(r >= 1.0 - 1e-9 for r in rhos)
    assert all(d1 < d0 for d0, d1 in zip([0.1, *dampings], dampings))
    # once κ is exact the model is exact (ρ = 1), and the step α = 1/κ = 1 (the Newton step,
    # once the trust region allows it) lands on the least-squares minimiser
    assert rhos[-1] == pytest.approx(1.0, abs=1e-9)
    assert errors[-1] < 1e-12 and len(errors) < 8
    torch.testing.assert_close(model.weight.detach(), solution, rtol=1e-9, atol=1e-10)
    # at the minimum nothing is left to gain: trials change the loss by rounding only, are
    # taken (no step is refused) and leave κ alone
    for _ in range(3):
        _step(opt, compute)
        assert opt.last_adaptation.reason == "ok"
    assert opt.calibration == pytest.approx(1.0, rel=1e-6)


def test_momentum_step_is_the_minimiser_of_the_model_written_out():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=g, dtype=F64)
    p = m @ m.T + 0.5 * torch.eye(5, dtype=F64)
    for _ in range(20):
        grad = torch.randn(5, generator=g, dtype=F64)
        u = torch.linalg.solve(p, grad)
        prev = torch.randn(5, generator=g, dtype=F64)  # μ δ_prev
        kappa = float(torch.rand(1, generator=g)) * 3 + 0.2
        # m(α) = gᵀ(−αu + m) + ½ κ (−αu + m)ᵀ P (−αu + m), minimised in closed form
        best = float((grad @ u + kappa * (u @ p @ prev)) / (kappa * (u @ p @ u)))
        alpha, keep = momentum_step(float(grad @ u), float(grad @ prev), kappa)
        if float(grad @ prev) <= 0:
            assert keep and alpha == pytest.approx(max(best, 0.0), rel=1e-10, abs=1e-12)
        else:  # the momentum goes uphill: dropped, the model's step along u alone
            assert not keep and alpha == pytest.approx(1.0 / kappa, rel=1e-12)


def test_calibration_follows_the_measured_curvature_trust_region_style():
    control = StepControl("model")
    good = TrialOutcome(g_delta=-1.0, held=0.1, kappa=8.0, damping=0.0, actual=-0.95)
    good.gauss_newton = 0.05  # the secant 2(ΔL − gᵀδ) = 0.1 is larger: κ_measured = 1
    assert good.predicted == pytest.approx(-1.0 + 0.5 * 8.0 * 0.1)
    assert good.rho == pytest.approx(0.95 / 0.6) and good.accepted
    assert good.measured == pytest.approx(0.1)
    control.kappa = 8.0
    assert control.calibrated(good) == pytest.approx(8.0 / 4)  # growth capped at 4x
    near = TrialOutcome(g_delta=-1.0, held=0.1, kappa=0.5, damping=0.0, actual=-0.95)
    near.gauss_newton = 0.05
    control.kappa = 0.5
    assert near.rho == pytest.approx(0.95 / 0.975)
    assert control.calibrated(near) == pytest.approx(1.0)  # the measured curvature itself
    bad = TrialOutcome(g_delta=-1.0, held=0.1, kappa=0.5, damping=0.0, actual=-0.01)
    assert bad.rho < 0.25 and bad.accepted
    assert control.calibrated(bad) == pytest.approx(5.0)  # shrinks, by at most 10x
    worse = TrialOutcome(g_delta=-1.0, held=0.25, kappa=0.5, damping=0.0, actual=0.3)
    assert not worse.accepted and worse.why_rejected == "loss rose"
    stiff = TrialOutcome(g_delta=-1.0, held=0.1, kappa=8.0, damping=0.0, actual=-0.05, stiff=True)
    assert stiff.failed and stiff.why_rejected == "stiff"
    stiff_but_good = copy.copy(stiff)
    stiff_but_good.actual = -0.9
    assert stiff_but_good.accepted


class Regression(nn.Module):
    """An ODE block on a linear readout (for trials that need function evaluations)."""

    def __init__(self):
        super().__init__()
        self.ode = no.ODEBlock(mlp_field(3, 6), (0.0, 0.5), rtol=1e-7, atol=1e-7)

    def forward(self, x):
        return self.ode(x)


def _regression_case():
    torch.manual_seed(0)
    model = Regression()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 3, generator=g, dtype=F64)
    y = torch.randn(16, 3, generator=g, dtype=F64)

    def compute():
        out = model(x)
        return 0.5 * ((out - y) ** 2).sum(1).mean(), out

    return model, compute


def test_a_failing_trial_leaves_the_parameters_and_grows_kappa():
    model, compute = _regression_case()
    opt = no.OCNOpt(model, adapt_every=5)
    _step(opt, compute)  # step 0 sets κ
    for _ in range(4):  # to the next adaptation (a capped growth may adapt in between)
        _step(opt, compute)
    assert opt.adapt_due
    kappa, damping = opt.calibration, opt.damping
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss, out = compute()
    opt.backward(loss, outputs=out, likelihood="gaussian")

    def broken():
        value, outputs = compute()
        return value * float("nan"), outputs

    opt.step(broken)
    a = opt.last_adaptation
    assert a.reason == "failed" and a.trials == 3
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.calibration > kappa * 999 and opt.damping > damping
    assert opt.adapt_due  # the next step checks again


@pytest.mark.parametrize("power, kept", [(1, True), (2, False)])
def test_a_rise_in_proportion_to_the_step_keeps_kappa(power, kept):
    """Every trial raises the loss. Where the rise is first order in the step's length
    (the gradient disagrees with the loss evaluated: an inexact adjoint), κ and the trust
    region are kept; where it is second order (curvature the model missed), κ grows by
    ``1/shrink`` per trial as before."""
    model, compute = _regression_case()
    opt = no.OCNOpt(model, adapt_every=5)
    for _ in range(5):
        _step(opt, compute)
    assert opt.adapt_due
    kappa = opt.calibration
    radius = list(opt._stepper.control.radius)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss, out = compute()
    opt.backward(loss, outputs=out, likelihood="gaussian")
    scale = 1e3 if power == 1 else 1e9

    def misleading():
        value, outputs = compute()
        moved = sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)) ** 0.5
        return value + scale * moved**power, outputs

    opt.step(misleading)
    a = opt.last_adaptation
    assert a.trials == 3
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    if kept:
        assert a.reason == "loss rose along the step"
        assert opt.calibration == kappa and opt._stepper.control.radius == radius
    else:
        assert a.reason == "loss rose"
        assert opt.calibration == pytest.approx(kappa * 1e3)
    assert opt.adapt_due  # either way the next step checks again


def test_first_order_rise_reads_the_ratio_of_two_trials():
    def outcome(actual, previous):
        return TrialOutcome(-1.0, 0.1, 1.0, 0.0, actual, previous=previous, shrink=0.1)

    assert outcome(0.0102, 0.110).first_order_rise  # §24's CNF: in proportion to length
    assert not outcome(0.0011, 0.110).first_order_rise  # in proportion to the square
    assert not outcome(0.01, float("nan")).first_order_rise  # a first trial: nothing to compare
    assert not outcome(-0.01, 0.11).first_order_rise  # the smaller trial lowered the loss
    assert not outcome(float("nan"), 0.11).first_order_rise  # failed


def test_a_trial_that_raises_the_loss_is_retried_smaller():
    model, compute = _regression_case()
    twin = copy.deepcopy(model)
    opt = no.OCNOpt(model, adapt_every=1)
    opt_twin = no.OCNOpt(twin, adapt_every=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 3, generator=g, dtype=F64)
    y = torch.randn(16, 3, generator=g, dtype=F64)

    def compute_twin():
        out = twin(x)
        return 0.5 * ((out - y) ** 2).sum(1).mean(), out

    before = [p.detach().clone() for p in twin.parameters()]
    _step(opt_twin, compute_twin)
    planned = [p.detach() - b for p, b in zip(twin.parameters(), before)]
    calls = {"n": 0}

    def first_trial_worse():
        calls["n"] += 1
        value, outputs = compute()
        return (value + 10.0 if calls["n"] == 1 else value), outputs

    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss, out = compute()
    opt.backward(loss, outputs=out, likelihood="gaussian")
    opt.step(first_trial_worse)
    assert opt.last_adaptation.trials == 2 and calls["n"] == 2
    for p, b, d in zip(model.parameters(), before, planned):
        torch.testing.assert_close(p.detach() - b, 0.1 * d, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("decrease", ["small", "large"])
def test_a_stiffening_trial_fails_only_without_the_promised_decrease(decrease):
    model, compute = _regression_case()
    opt = no.OCNOpt(model, adapt_every=1)
    _step(opt, compute)
    opt.zero_grad()
    loss, out = compute()
    opt.backward(loss, outputs=out, likelihood="gaussian")

    def stiff():
        value, outputs = compute()
        model.ode.nfe_forward += 1000  # as if the solver had needed many more steps
        if decrease == "small":  # barely lower than before
            value = loss.detach() - 1e-12
        return value, outputs

    opt.step(stiff)
    a = opt.last_adaptation
    if decrease == "small":
        assert a.reason == "stiff" and a.trials == 3
    else:
        assert a.reason == "ok" and a.trials == 1


def test_steps_between_adaptations_stay_in_the_trust_region():
    model, compute, _ = _quadratic_problem()
    opt = no.OCNOpt(model, curvature="identity", momentum=0.0, adapt_every=4)
    before = model.weight.detach().clone()
    _step(opt, compute)  # step 0 adapts: the trial is the step taken
    trial = model.weight.detach() - before

    def spiked():  # the same loss, 1000x steeper
        value, outputs = compute()
        return 1000.0 * value, outputs

    before = model.weight.detach().clone()
    opt.zero_grad()
    loss, out = spiked()
    opt.backward(loss)
    opt.step()
    taken = model.weight.detach() - before
    # its squared length is bounded by radius_growth = 4 times that of the trial
    assert float((taken**2).sum()) == pytest.approx(4.0 * float((trial**2).sum()), rel=1e-6)


def test_without_a_closure_the_model_step_warns_once():
    model, compute, _ = _quadratic_problem()
    opt = no.OCNOpt(model, curvature="identity")
    with pytest.warns(RuntimeWarning, match="without a closure"):
        opt.zero_grad()
        compute()[0].backward()
        opt.step()
    opt.zero_grad()
    compute()[0].backward()
    opt.step()  # no second warning (an error under -W error would show it)
    assert opt.steps_taken == 2 and opt.last_adaptation is None
