"""Feedback policies: gains against brute-force Jacobians, the sweep against a hand-made
sequential update, the dense variant against the minimiser of a linear-quadratic problem."""

import copy

import pytest
import torch
from conftest import mlp_field, ocnopt_step
from torch import nn
from torch.func import functional_call

import node_ocp as no
from node_ocp.optim.curvatures import Damping
from node_ocp.optim.curvatures.identity import IdentityUnit
from node_ocp.optim.feedback import (
    FeedbackSweep,
    StageRecorder,
    empirical_factors,
    find_stages,
    pulled_factors,
)
from node_ocp.optim.likelihoods import output_factors

D = torch.float64


def _chain(ode: bool) -> nn.Sequential:
    torch.manual_seed(3)
    mid = (
        no.ODEBlock(mlp_field(4, 6), (0.0, 0.5), method="rk4", options=dict(step_size=0.125))
        if ode
        else nn.Linear(4, 4)
    )
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), mid, nn.Linear(4, 2)).to(D)


def _loss(o, t):
    return 0.5 * (o - t).pow(2).sum(1).mean()


def _compute(model, x, t):
    """The step's forward, called once per evaluation (a stage called twice is open-loop)."""

    def compute():
        o = model(x)
        return _loss(o, t), o

    return compute


def _recorded(model, x, t):
    stages, why = find_stages(model)
    assert why is None and len(stages) == 3
    rec = StageRecorder(stages)
    rec.arm(keep_grads=True)
    o = model(x)
    loss = _loss(o, t)
    rec.disarm()
    loss.backward(retain_graph=True)
    rec.stop_grads()
    return rec.ordered(), o


def _brute_gain(model, s, x, t, dx, per_sample_hessian):
    """``(1/N) Σ_b J_θ,bᵀ H_b J_x,b δx_b`` for child ``s`` of ``model``, with the Jacobians
    of each sample's output built row by row (one backward pass per output coordinate)."""
    rest = nn.Sequential(*list(model)[s:])
    theta = list(list(model)[s].parameters())
    with torch.no_grad():
        xs = nn.Sequential(*list(model)[:s])(x)
    xs = xs.clone().requires_grad_(True)
    o = rest(xs)
    n, k = o.shape
    total = [torch.zeros_like(p) for p in theta]
    for b in range(n):
        jx, jt = [], [[] for _ in theta]
        for j in range(k):
            gx, *gt = torch.autograd.grad(o[b, j], [xs, *theta], retain_graph=True)
            jx.append(gx[b])
            for i, g in enumerate(gt):
                jt[i].append(g)
        v = per_sample_hessian(b) @ (torch.stack(jx) @ dx[b])  # (K,)
        for i in range(len(theta)):
            total[i] += torch.tensordot(v, torch.stack(jt[i]), dims=1) / n
    return total


@pytest.mark.parametrize("ode", [False, True])
def test_exact_factor_gain_equals_brute_force_gauss_newton_cross_term(ode):
    model = _chain(ode)
    x, t = torch.randn(5, 3, dtype=D), torch.randn(5, 2, dtype=D)
    records, o = _recorded(model, x, t)
    y = output_factors(o, "gaussian", "exact", 1)
    factors = pulled_factors(records, o, y)
    for k, s in ((1, 2), (2, 3)):  # the stages whose input depends on parameters
        rec = records[k]
        dx = 0.1 * torch.randn_like(rec.inputs[0])
        units = [IdentityUnit([p], {}) for p in rec.module.parameters()]
        sweep = FeedbackSweep(records, factors, units, Damping(0.0), lambda p: 1.0, False)
        got = sweep.gain(rec, [rec.inputs[0].detach() + dx], units)
        want = _brute_gain(model, s, x, t, dx, lambda b: torch.eye(2, dtype=D))
        for p, w in zip(rec.module.parameters(), want):
            torch.testing.assert_close(got[p], w, rtol=1e-9, atol=1e-11)
        assert max(float(w.abs().max()) for w in want) > 1e-4


def test_empirical_gain_is_the_per_sample_weighted_gradient():
    model = _chain(False)
    x, t = torch.randn(6, 3, dtype=D), torch.randn(6, 2, dtype=D)
    records, o = _recorded(model, x, t)
    factors = empirical_factors(records)
    rec = records[2]  # the head: input (6, 4)
    dx = 0.1 * torch.randn_like(rec.inputs[0])
    units = [IdentityUnit([p], {}) for p in rec.module.parameters()]
    sweep = FeedbackSweep(records, factors, units, Damping(0.0), lambda p: 1.0, False)
    got = sweep.gain(rec, [rec.inputs[0].detach() + dx], units)
    # hand formula: (1/N) Σ_b ∇_θ ℓ_b (∇_x ℓ_b · δx_b), per-sample gradients by a loop
    head = rec.module
    with torch.no_grad():
        xs = nn.Sequential(*list(model)[:3])(x)
    want = [torch.zeros_like(p) for p in head.parameters()]
    for b in range(6):
        xb = xs[b : b + 1].clone().requires_grad_(True)
        lb = 0.5 * (head(xb) - t[b : b + 1]).pow(2).sum()
        gx, *gt = torch.autograd.grad(lb, [xb, *head.parameters()])
        w = float((gx * dx[b : b + 1]).sum())
        for i, g in enumerate(gt):
            want[i] += g * w / 6
    for p, w in zip(head.parameters(), want):
        torch.testing.assert_close(got[p], w, rtol=1e-10, atol=1e-12)


def test_sweep_applies_each_stage_update_with_its_gain():
    """One fixed-step OCNOpt step with identity curvature against the policy by hand:
    δθ_s = −η (g_s + Q_θx,s δx_s), δx_s measured after the earlier stages moved."""
    model = _chain(False)
    ref = _chain(False)
    x, t = torch.randn(6, 3, dtype=D), torch.randn(6, 2, dtype=D)
    eta = 0.3
    opt = no.OCNOpt(
        model,
        lr=eta,
        step="fixed",
        momentum=0.0,
        curvature="identity",
        adapt_damping=False,
        feedback="gauss_newton",
        feedback_clip=None,
    )
    opt.zero_grad()
    o = model(x)
    opt.backward(_loss(o, t))
    opt.step(lambda: _loss(model(x), t))
    assert opt.last_feedback.reason == "ok" and opt.last_feedback.closed == 2
    # by hand on the copy: per-sample gradients at the nominal point
    lin = [m for m in ref if isinstance(m, nn.Linear)]
    grads = torch.autograd.grad(_loss(ref(x), t), [p for m in lin for p in m.parameters()])
    nominal_inputs = []
    with torch.no_grad():
        h = x
        for m in ref:
            if isinstance(m, nn.Linear):
                nominal_inputs.append(h.clone())
            h = m(h)
    gi = iter(grads)
    nominal = copy.deepcopy(ref)
    new = x
    for k, m in enumerate(lin):
        dx = new - nominal_inputs[k]
        gain = [torch.zeros_like(p) for p in m.parameters()]
        if k > 0:
            s = list(ref).index(m)
            gain = _empirical_brute(nominal, s, x, t, dx)
        with torch.no_grad():
            for p, g, c in zip(m.parameters(), [next(gi), next(gi)], gain):
                p.add_(-eta * (g + c))
            new = m(new)
            if k < len(lin) - 1:
                new = torch.tanh(new) if k == 0 else new
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _empirical_brute(model, s, x, t, dx):
    """``(1/N) Σ_b ∇_θ ℓ_b (∇_x ℓ_b · δx_b)`` for child ``s`` at the nominal point."""
    with torch.no_grad():
        xs = nn.Sequential(*list(model)[:s])(x)
    rest = nn.Sequential(*list(model)[s:])
    stage = list(model)[s]
    n = x.shape[0]
    out = [torch.zeros_like(p) for p in stage.parameters()]
    for b in range(n):
        xb = xs[b : b + 1].clone().requires_grad_(True)
        lb = 0.5 * (rest(xb) - t[b : b + 1]).pow(2).sum()
        gx, *gt = torch.autograd.grad(lb, [xb, *stage.parameters()])
        w = float((gx * dx[b : b + 1]).sum())
        for i, g in enumerate(gt):
            out[i] += g.detach() * w / n
    return out


class Shift(nn.Module):
    """An affine stage ``y = A x + θ`` with a fixed ``A`` and a bias ``θ``."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)
        self.theta = nn.Parameter(torch.zeros(a.shape[0], dtype=a.dtype))

    def forward(self, x):
        return x @ self.a.T + self.theta


def _affine_problem():
    torch.manual_seed(5)
    model = nn.Sequential(
        Shift(torch.randn(3, 2, dtype=D)),
        Shift(torch.randn(3, 3, dtype=D)),
        Shift(torch.randn(2, 3, dtype=D)),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_().mul_(2.0)
    x, t = torch.randn(8, 2, dtype=D), torch.randn(8, 2, dtype=D)
    return model, x, t


def _min_loss(model, x, t):
    """The minimum over all biases of an affine chain's quadratic loss (least squares)."""
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(th):
        return functional_call(model, dict(zip(names, th.split(sizes))), (x,))

    j = torch.autograd.functional.jacobian(lambda th: f(th).reshape(-1), theta)
    r = (f(theta) - t).reshape(-1).detach()
    step = torch.linalg.lstsq(j, -r.unsqueeze(1)).solution.squeeze(1)
    return float(_loss(f(theta + step), t))


def _dense_step(model, x, t, feedback, **options):
    """One fixed step ``lr = 1`` with identity curvature and (almost) no damping: on affine
    stages whose exact Gauss–Newton block is the identity, each stage's block-Newton step."""
    opt = no.OCNOpt(
        model,
        lr=1.0,
        step="fixed",
        momentum=0.0,
        curvature="identity",
        damping=1e-9,
        damping_mode="absolute",
        min_damping=1e-12,
        adapt_damping=False,
        feedback=feedback,
        **options,
    )
    opt.zero_grad()
    o = model(x)
    opt.backward(_loss(o, t), outputs=o, likelihood="gaussian")
    opt.step(lambda: _loss(model(x), t))
    return opt


def test_dense_feedback_is_the_newton_step_of_a_linear_quadratic_problem():
    model, x, t = _affine_problem()
    best = _min_loss(model, x, t)
    before = float(_loss(model(x), t).detach())
    opt = _dense_step(model, x, t, "dense")
    after = float(_loss(model(x), t).detach())
    assert opt.last_feedback.reason == "ok"
    assert before - best > 0.2
    assert after == pytest.approx(best, rel=1e-6, abs=1e-8)
    # open-loop with each stage's own exact Gauss–Newton block (a perfect block-diagonal
    # curvature, as OCNOpt without feedback would hold): every stage corrects the residual
    # as if the others stood still, and together they overshoot
    model2, _, _ = _affine_problem()
    o = model2(x)
    loss = _loss(o, t)
    steps = []
    for stage in model2:
        (theta,) = stage.parameters()
        j = torch.autograd.functional.jacobian(
            lambda th, st=stage: functional_call(model2, {_name(model2, st): th}, (x,)), theta
        ).reshape(-1, theta.numel())
        g = torch.autograd.grad(loss, theta, retain_graph=True)[0]
        gn = j.T @ j / x.shape[0]
        steps.append(-torch.linalg.solve(gn, g))
    with torch.no_grad():
        for stage, d in zip(model2, steps):
            stage.theta.add_(d)
    assert float(_loss(model2(x), t).detach()) > best + 0.1


def _name(model, stage):
    return next(f"{i}.theta" for i, m in enumerate(model) if m is stage)


def test_feedback_off_is_the_open_loop_optimizer_bit_for_bit():
    def run(**kw):
        torch.manual_seed(0)
        model = _chain(True)
        opt = no.OCNOpt(model, **kw)
        x, t = torch.randn(16, 3, dtype=D), torch.randn(16, 2, dtype=D)
        for _ in range(6):
            ocnopt_step(opt, _compute(model, x, t), "gaussian")
        return [p.detach().clone() for p in model.parameters()]

    a, b = run(), run(feedback="off")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = run(feedback="gauss_newton")
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


@pytest.mark.parametrize("factors", ["empirical", "exact", "sampled"])
def test_feedback_trains_an_ode_chain_and_reports(factors):
    model = _chain(True)
    x, t = torch.randn(32, 3, dtype=D), torch.randn(32, 2, dtype=D)
    opt = no.OCNOpt(model, feedback="gauss_newton", factors=factors, feedback_every=2)
    first = None
    for i in range(10):
        loss = ocnopt_step(opt, _compute(model, x, t), "gaussian")
        first = float(loss) if first is None else first
        if i % 2 == 0:
            assert opt.last_feedback.step == i
    assert opt.feedback_steps == 5 and opt.feedback_failures == 0
    assert opt.last_feedback.closed == 2 and opt.last_feedback.gain_ratio > 0
    assert float(_loss(model(x), t)) < first


def test_feedback_state_round_trip_resumes_identically():
    def make():
        torch.manual_seed(0)
        return _chain(True)

    x, t = torch.randn(16, 3, dtype=D), torch.randn(16, 2, dtype=D)
    a = make()
    oa = no.OCNOpt(a, feedback="gauss_newton")
    for _ in range(3):
        ocnopt_step(oa, _compute(a, x, t), "gaussian")
    b = make()
    b.load_state_dict(a.state_dict())
    ob = no.OCNOpt(b, feedback="gauss_newton")
    ob.load_state_dict(oa.state_dict())
    assert ob.feedback_steps == 3 and ob.last_feedback == oa.last_feedback
    for _ in range(3):
        ocnopt_step(oa, _compute(a, x, t), "gaussian")
        ocnopt_step(ob, _compute(b, x, t), "gaussian")
    assert all(torch.equal(u, v) for u, v in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="feedback"):
        no.OCNOpt(make()).load_state_dict(oa.state_dict())


def test_open_loop_with_a_warning_when_the_stage_order_is_unknown():
    class Free(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    with pytest.warns(RuntimeWarning, match="open-loop: Free is not an nn.Sequential"):
        opt = no.OCNOpt(Free(), curvature="diagonal", feedback="gauss_newton")
    assert not opt.feedback_due


def test_open_loop_with_a_warning_without_opt_backward():
    model = _chain(False)
    x, t = torch.randn(8, 3, dtype=D), torch.randn(8, 2, dtype=D)
    opt = no.OCNOpt(model, curvature="diagonal", feedback="gauss_newton")
    opt.zero_grad()
    _loss(model(x), t).backward()
    with pytest.warns(RuntimeWarning, match="opt.backward"):
        opt.step(lambda: _loss(model(x), t))
    assert opt.last_feedback is None


def test_a_stage_called_twice_stays_open_loop():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

        def feedback_stages(self):
            return [self.a, self.b, self.c]

        def forward(self, x):
            return self.c(self.b(torch.tanh(self.b(self.a(x)))))

    model = Twice().to(D)
    x, t = torch.randn(8, 3, dtype=D), torch.randn(8, 2, dtype=D)
    opt = no.OCNOpt(model, curvature="diagonal", feedback="gauss_newton")
    ocnopt_step(opt, _compute(model, x, t))
    assert opt.last_feedback.closed == 1 and opt.last_feedback.open == 2


def test_bundled_models_declare_their_stages():
    from node_ocp.models import CNF, ODEImageClassifier

    image = ODEImageClassifier(channels=4)
    assert find_stages(image)[0] == [image.stem, image.ode, image.head]
    cnf = CNF(2, hidden=(8,), blocks=2)
    assert find_stages(cnf)[0] == list(cnf.blocks)


def test_feedback_errors_name_the_argument():
    with pytest.raises(ValueError, match="feedback"):
        no.OCNOpt(_chain(False), curvature="diagonal", feedback="on")
    with pytest.raises(ValueError, match="feedback_every"):
        no.OCNOpt(_chain(False), curvature="diagonal", feedback="gauss_newton", feedback_every=0)
    with pytest.raises(ValueError, match="step='fixed'"):
        no.OCNOpt(_chain(False), curvature="diagonal", feedback="dense")


def test_feedback_clip_bounds_the_gain_term_in_the_held_metric():
    w = nn.Parameter(torch.zeros(3, dtype=D))
    units = [IdentityUnit([w], {})]
    update = {w: torch.tensor([1.0, 0.0, 0.0], dtype=D)}
    fbs = {w: torch.tensor([0.0, 3.0, 4.0], dtype=D)}  # 5x the step
    clip = FeedbackSweep([], {}, units, Damping(0.0), lambda p: 1.0, False, clip=2.0)
    assert clip._clip_factor(units, update, fbs) == pytest.approx(2.0 / 5.0)
    free = FeedbackSweep([], {}, units, Damping(0.0), lambda p: 1.0, False, clip=None)
    assert free._clip_factor(units, update, fbs) == 1.0
    small = {w: torch.tensor([0.0, 0.3, 0.4], dtype=D)}
    assert clip._clip_factor(units, update, small) == 1.0


# ---------------------------------------------------------------- the gain's own scale
def test_own_gain_scale_learns_from_the_sweep_against_the_open_loop_trial():
    from node_ocp.optim.feedback_gain import HIGH, LOW, GainCalibration

    own = GainCalibration("own")
    own.learn(1.0, 0.9)  # the sweep beat the open-loop trial: the gain grows
    assert own.scale == 2.0 and (own.trials, own.wins) == (1, 1)
    own.learn(1.0, 1.1)
    own.learn(1.0, 1.0)  # a tie is no win
    assert own.scale == 0.5 and (own.trials, own.wins) == (3, 1)
    own.learn(None, 0.5)  # no open-loop trial on this step: nothing learnt
    own.learn(1.0, float("nan"))
    assert own.scale == 0.5 and own.trials == 3
    assert not own.resting(None)
    for _ in range(20):
        own.learn(1.0, 2.0)
    assert own.scale == LOW
    assert own.resting(None) and not own.resting(1.0)  # at LOW: sweeps only beside a trial
    for _ in range(20):
        own.learn(2.0, 1.0)
    assert own.scale == HIGH
    kappa = GainCalibration("kappa")
    kappa.learn(1.0, 0.5)
    assert kappa.scale == 1.0 and kappa.trials == 0
    back = GainCalibration("own")
    back.load_state_dict(own.state_dict())
    assert back.state_dict() == own.state_dict()
    with pytest.raises(ValueError, match=r"feedback_gain: received 'mine'"):
        GainCalibration("mine")
    with pytest.raises(ValueError, match=r"feedback_gain: received 'mine'"):
        no.OCNOpt(_chain(False), curvature="diagonal", feedback_gain="mine")


def _hand_sweep(nominal, x, t, eta, beta, grads):
    """The exact-source policy by hand on a chain of Linear stages (identity curvature,
    fixed step ``eta``): ``δθ_s = −eta (g_s + beta · (1/N) Σ_b J_θᵀ J_x δx_b)``, with
    ``δx_s`` the change of stage ``s``'s input after the stages before it moved and the
    Jacobians at the nominal point (:func:`_brute_gain`, ``H = I``). Returns the moved
    copy."""
    moved = copy.deepcopy(nominal)
    lin = [i for i, m in enumerate(nominal) if isinstance(m, nn.Linear)]
    old, new = x, x
    for i, (m_old, m_new) in enumerate(zip(nominal, moved)):
        if i in lin:
            dx = (new - old).detach()
            gain = (
                _brute_gain(nominal, i, x, t, dx, lambda b: torch.eye(2, dtype=D))
                if i != lin[0]
                else [torch.zeros_like(p) for p in m_old.parameters()]
            )
            with torch.no_grad():
                for p, g, c in zip(m_new.parameters(), grads[i], gain):
                    p.add_(-eta * (g + beta * c))
        with torch.no_grad():
            old, new = m_old(old), m_new(new)
    return moved


def test_exact_gain_with_its_own_scale_is_the_hand_formula_on_a_three_stage_chain():
    """``feedback_gain="own"``: after step 0 (a trial of the open-loop update and a sweep on
    the same batch), β is 2 if the sweep's loss beat the open-loop trial's, else 1/2; step 1's
    update is then the exact-source policy with its gain terms scaled by that β."""
    model = _chain(False)  # Linear, Tanh, Linear, Linear: three stages
    x, t = torch.randn(6, 3, dtype=D), torch.randn(6, 2, dtype=D)
    eta = 0.4
    opt = no.OCNOpt(
        model,
        lr=eta,
        step="fixed",
        momentum=0.0,
        curvature="identity",
        factors="exact",
        feedback="gauss_newton",
        feedback_gain="own",
        feedback_clip=None,
    )
    lin = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]

    def grads_at(m):
        ps = [p for i in lin for p in m[i].parameters()]
        gs = iter(torch.autograd.grad(_loss(m(x), t), ps))
        return {i: [next(gs) for _ in m[i].parameters()] for i in lin}

    nominal = copy.deepcopy(model)
    grads = grads_at(nominal)
    open_loop = copy.deepcopy(nominal)
    with torch.no_grad():
        for i in lin:
            for p, g in zip(open_loop[i].parameters(), grads[i]):
                p.add_(-eta * g)
        open_loss = float(_loss(open_loop(x), t))
    ocnopt_step(opt, _compute(model, x, t), "gaussian")
    assert opt.last_adaptation is not None and opt.last_feedback.reason == "ok"
    want0 = _hand_sweep(nominal, x, t, eta, 1.0, grads)  # β = 1 before anything is learnt
    for a, b in zip(model.parameters(), want0.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        sweep_loss = float(_loss(model(x), t))
    beta = opt.feedback_gain_scale
    assert beta == (2.0 if sweep_loss < open_loss else 0.5)
    assert opt.last_feedback.gain_scale == 1.0

    nominal = copy.deepcopy(model)
    grads = grads_at(nominal)
    ocnopt_step(opt, _compute(model, x, t), "gaussian")
    assert opt.last_feedback.gain_scale == beta and opt.last_feedback.closed == 2
    want = _hand_sweep(nominal, x, t, eta, beta, grads)
    for a, b in zip(model.parameters(), want.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    plain = _hand_sweep(nominal, x, t, eta, 1.0, grads)  # the scale is visible in the step
    assert (
        max(float((a - b).abs().max()) for a, b in zip(want.parameters(), plain.parameters()))
        > 1e-6
    )


def _orthogonal_chain(stages: int, dim: int = 3):
    """Affine stages ``y = Q x + θ`` with orthogonal ``Q``: the exact Gauss–Newton block of
    every stage's bias is the identity, so identity curvature with ``lr = 1`` is each
    stage's exact block-Newton step."""
    g = torch.Generator().manual_seed(11)
    qs = [torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=D))[0] for _ in range(stages)]
    model = nn.Sequential(*[Shift(q) for q in qs])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D))
    x = torch.randn(10, dim, generator=g, dtype=D)
    return model, x, torch.randn(10, dim, generator=g, dtype=D)


@pytest.mark.parametrize("feedback", ["off", "gauss_newton", "dense"])
def test_deep_linear_chain_feedback_reaches_the_minimiser_where_open_loop_overshoots(feedback):
    """Six affine stages, quadratic loss: the minimum over the biases is known (least
    squares). Open-loop, every stage takes its own exact block-Newton step as if the others
    stood still, and together they overshoot by the number of stages; with Gauss–Newton
    feedback each stage corrects what the stages before it already moved (block
    Gauss–Seidel), which for affine stages reaches the minimiser; so does the dense policy
    (the Newton step of the whole problem)."""
    model, x, t = _orthogonal_chain(6)
    best = _min_loss(model, x, t)
    before = float(_loss(model(x), t))
    opt = _dense_step(model, x, t, feedback, factors="exact", feedback_clip=None)
    after = float(_loss(model(x), t))
    assert before - best > 1.0
    if feedback == "off":
        assert after - best > 10 * (before - best)  # 6 stages: (6 − 1)² times the gap
    else:
        assert opt.last_feedback.reason == "ok"
        assert after == pytest.approx(best, rel=1e-6, abs=1e-9)


def test_a_stage_whose_input_did_not_move_takes_no_gain():
    """The first stage's update is zero: the second stage's input does not move and it keeps
    its open-loop step (no product computed); the third's input moves with the second stage
    and takes its gain."""
    from node_ocp.optim.feedback import moved

    model = _chain(False)
    x, t = torch.randn(8, 3, dtype=D), torch.randn(8, 2, dtype=D)
    records, o = _recorded(model, x, t)
    factors = pulled_factors(records, o, output_factors(o, "gaussian", "exact", 1))
    units = [IdentityUnit([p], {}) for p in model.parameters()]
    update = {p: torch.zeros_like(p) for p in model[0].parameters()}
    update.update(
        {p: 0.01 * torch.randn_like(p) for m in (model[2], model[3]) for p in m.parameters()}
    )
    sweep = FeedbackSweep(records, factors, units, Damping(0.0), lambda p: 1.0, False)
    with torch.no_grad():
        taken, _, fields = sweep.run(_compute(model, x, t), update, lambda m: set(m.parameters()))
    assert fields["closed"] == 2 and fields["still"] == 1
    for p in model[2].parameters():
        assert torch.equal(taken[p], update[p])  # open-loop
    assert any(not torch.equal(taken[p], update[p]) for p in model[3].parameters())
    a = torch.ones(4, dtype=D)
    assert not moved([a], [a + 1e-15]) and moved([a], [a + 1e-12])
    assert not moved([torch.zeros(2, dtype=D)], [torch.zeros(2, dtype=D)])


def test_own_gain_at_its_floor_sweeps_only_beside_an_open_loop_trial():
    """β at its floor: steps without a trial take the open-loop update (no sweep, no report);
    a step with a trial still sweeps, so β can come back."""
    from node_ocp.optim.feedback_gain import LOW

    model = _chain(False)
    x, t = torch.randn(8, 3, dtype=D), torch.randn(8, 2, dtype=D)
    opt = no.OCNOpt(
        model,
        lr=0.02,
        step="fixed",
        adapt_every=3,
        curvature="identity",
        feedback="gauss_newton",
        feedback_gain="own",
    )
    opt._feedback_runner.gain.scale = LOW
    swept = []
    for _ in range(6):
        due = opt.adapt_due
        before = opt.feedback_steps
        ocnopt_step(opt, _compute(model, x, t), "gaussian")
        swept.append((due, opt.feedback_steps > before))
    assert all(d == s for d, s in swept), swept
    assert any(d for d, _ in swept) and not all(d for d, _ in swept)
