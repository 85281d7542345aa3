"""OCNOpt's curvature variants against independent computations: SGD, a brute-force dense
solve with Kronecker factors built here from per-sample Jacobians along the trajectory, a
brute-force damped Gauss–Newton step, brute-force Gauss–Newton matrices for the exact and
sampled factor sources, and the hand formulas of π-balanced damping and the diagonal rule."""

import copy
import math

import pytest
import torch
from conftest import mlp_field, ocnopt_step
from torch import nn
from torchdiffeq import odeint

import node_ocp as no
from node_ocp.optim import Damping, output_factors
from node_ocp.optim.curvatures import DiagonalUnit, EKFACUnit, IdentityUnit, KFACUnit, pi_split

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)
# Brute-force references backprop through rk4 with small fixed steps: backprop through an
# adaptive solver also differentiates its step-size control (errors ~1e-8).
REF = dict(method="rk4", options={"step_size": 0.005})


class Classifier(nn.Module):
    """stem (outside) -> ODE block -> head (outside)."""

    def __init__(self, dim=3, classes=4, hidden=6):
        super().__init__()
        self.stem = nn.Linear(dim, dim)
        self.ode = no.ODEBlock(mlp_field(dim, hidden).double(), (0.0, 0.5), **TIGHT)
        self.head = nn.Linear(dim, classes)
        self.double()

    def forward(self, x):
        return self.head(self.ode(torch.tanh(self.stem(x))))


def _data(n=8, classes=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=F64), torch.randint(0, classes, (n,), generator=g)


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def test_identity_with_fixed_steps_is_sgd_step_for_step():
    torch.manual_seed(0)
    model = Classifier()
    ref = copy.deepcopy(model)
    x, y = _data()
    opt = no.OCNOpt(
        model, lr=0.1, momentum=0.9, weight_decay=1e-3, curvature="identity", step="fixed"
    )
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(10):
        for m, o in [(model, opt), (ref, sgd)]:
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------- Kronecker variants
class TwoLayerField(nn.Module):
    """f(x) = W2 tanh(W1 x + b1) + b2 (autonomous), so that every layer's inputs and output
    gradients can be written down by hand."""

    def __init__(self, d=2, h=3):
        super().__init__()
        self.l1 = nn.Linear(d, h).double()
        self.l2 = nn.Linear(h, d).double()

    def forward(self, t, x):
        return self.l2(torch.tanh(self.l1(x)))


def _hand_kronecker_factors(field, x0, target, horizon, dt):
    """A and B of both layers from the trajectory and the per-sample adjoint at the capture's
    midpoint sample times, built without the library: states from torchdiffeq, adjoints by
    backprop through the rest of the trajectory, layer inputs and output gradients by hand."""
    n = x0.shape[0]
    cells = math.ceil(horizon / dt - 1e-9)
    h = horizon / cells
    times = [(j + 0.5) * h for j in range(cells)]
    sums = {field.l1: [0, 0], field.l2: [0, 0]}
    with torch.no_grad():
        w1, b1, w2 = field.l1.weight, field.l1.bias, field.l2.weight
    for t in times:
        grid = torch.tensor([0.0, t], dtype=F64)
        xt = odeint(field, x0, grid, rtol=1e-12, atol=1e-12)[-1].detach().requires_grad_(True)
        rest = torch.tensor([t, horizon], dtype=F64)
        steps = max(1, math.ceil((horizon - t) / 1e-3))
        x_end = odeint(field, xt, rest, method="rk4", options={"step_size": (horizon - t) / steps})[
            -1
        ]
        loss = 0.5 * ((x_end - target) ** 2).sum(1).mean()
        (a,) = torch.autograd.grad(loss, xt)  # (n, d): adjoint of the mean loss
        with torch.no_grad():
            pre = xt @ w1.T + b1
            act = torch.tanh(pre)
            ones = torch.ones(n, 1, dtype=F64)
            u1, u2 = torch.cat([xt, ones], 1), torch.cat([act, ones], 1)
            g2 = a
            g1 = (a @ w2) * (1 - act**2)
        for layer, u, g in ((field.l1, u1, g1), (field.l2, u2, g2)):
            sums[layer][0] = sums[layer][0] + h * u.T @ u
            sums[layer][1] = sums[layer][1] + h * g.T @ g
    # the empirical source's normalisation: A per sample, B of the per-sample gradients
    return {m: (a_sum / n, b_sum * n) for m, (a_sum, b_sum) in sums.items()}


def _vec(mat):
    """Column-major vec: (A ⊗ B) vec(G) = vec(B G Aᵀ)."""
    return mat.T.reshape(-1)


def _unvec(v, shape):
    return v.reshape(shape[1], shape[0]).T


@pytest.mark.parametrize("variant", ["kfac", "ekfac"])
def test_kronecker_directions_equal_a_brute_force_dense_solve(variant):
    torch.manual_seed(0)
    field = TwoLayerField()
    horizon, dt, n, r, alpha = 0.6, 0.1, 5, 0.05, 0.75
    block = no.ODEBlock(field, (0.0, horizon), **TIGHT)
    x0 = torch.randn(n, 2, dtype=F64)
    target = torch.randn(n, 2, dtype=F64)
    factors = _hand_kronecker_factors(field, x0, target, horizon, dt)
    opt = no.OCNOpt(
        block,
        lr=1.0,
        momentum=0.0,
        step="fixed",
        curvature=variant,
        damping=r,
        ekfac_decay=alpha,
        sample_dt=dt,
        update_every=10,
    )
    before = {m: torch.cat([m.weight, m.bias[:, None]], 1).detach().clone() for m in factors}
    opt.zero_grad()
    loss = 0.5 * ((block(x0) - target) ** 2).sum(1).mean()
    loss.backward()
    grads = {m: torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone() for m in factors}
    opt.step()
    for m, (a_mat, b_mat) in factors.items():
        g = grads[m]
        ma, mb = a_mat.trace() / a_mat.shape[0], b_mat.trace() / b_mat.shape[0]
        if variant == "kfac":  # π-balanced: A + √r m_A I, B + √r m_B I
            da, db = r**0.5 * ma, r**0.5 * mb
            dense = torch.kron(
                a_mat + da * torch.eye(a_mat.shape[0], dtype=F64),
                b_mat + db * torch.eye(b_mat.shape[0], dtype=F64),
            )
        else:  # eigenbasis of A ⊗ B, diagonal α λ_B λ_Aᵀ + (1 − α) n G̃², damping r m_A m_B
            ea, qa = torch.linalg.eigh(a_mat)
            eb, qb = torch.linalg.eigh(b_mat)
            q = torch.kron(qa, qb)
            proj = q.T @ _vec(g)
            s = alpha * torch.kron(ea.clamp_min(0), eb.clamp_min(0)) + (1 - alpha) * n * proj**2
            dense = q @ torch.diag(s + r * ma * mb) @ q.T
        expected = _unvec(torch.linalg.solve(dense, _vec(g)), g.shape)
        after = torch.cat([m.weight, m.bias[:, None]], 1).detach()
        torch.testing.assert_close(before[m] - after, expected, rtol=1e-5, atol=1e-9)


def test_pi_balanced_damping_equals_the_hand_formula():
    ma, mb, lam = 4.0, 0.01, 0.09
    pi = (ma / mb) ** 0.5
    assert pi_split(ma, mb, lam) == pytest.approx((pi * lam**0.5, lam**0.5 / pi), rel=1e-14)
    assert pi_split(ma, mb, lam) == pytest.approx(
        ((lam / (ma * mb)) ** 0.5 * ma,) * 1 + ((lam / (ma * mb)) ** 0.5 * mb,)
    )
    assert pi_split(0.0, mb, lam) == (lam**0.5, lam**0.5)  # a degenerate factor: π = 1
    # through a unit: relative damping r of the mean eigenvalue m_A m_B of A ⊗ B
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(3, 2).double()
    xa = torch.randn(6, 4, generator=g, dtype=F64)
    xb = torch.randn(5, 2, generator=g, dtype=F64)
    a_mat, b_mat = xa.T @ xa * 10.0, xb.T @ xb * 1e-3  # very different scales

    class Stats:
        A, B, samples = a_mat, b_mat, 6.0

    for relative in (True, False):
        unit = KFACUnit([layer.weight, layer.bias], {}, layer)
        unit.refresh(Stats)
        grad = torch.randn(2, 4, generator=g, dtype=F64)
        ma, mb = float(a_mat.trace() / 4), float(b_mat.trace() / 2)
        lam = 0.3 * ma * mb if relative else 0.3
        da, db = pi_split(ma, mb, lam)
        dense = torch.kron(
            a_mat + da * torch.eye(4, dtype=F64), b_mat + db * torch.eye(2, dtype=F64)
        )
        want = _unvec(torch.linalg.solve(dense, _vec(grad)), grad.shape)
        got = unit.direction([grad[:, :3], grad[:, 3]], Damping(0.3, relative), 6.0)
        torch.testing.assert_close(torch.cat([got[0], got[1][:, None]], 1), want)
        quad = unit.quadratic([grad[:, :3], grad[:, 3]], Damping(0.3, relative))
        assert float(quad) == pytest.approx(float(_vec(grad) @ dense @ _vec(grad)), rel=1e-10)


def test_diagonal_rule_equals_its_hand_formula():
    """Parameters without Kronecker factors (here a GRU cell): ŝ, the bias-corrected running
    average of n g², and the direction g / (ŝ + r mean ŝ)."""
    g = torch.Generator().manual_seed(0)
    p = torch.zeros(3, 4, dtype=F64)
    beta, r, n = 0.95, 0.1, 8.0
    unit = DiagonalUnit([p], {}, beta=beta)
    s = torch.zeros_like(p)
    for t in range(1, 4):
        grad = torch.randn(3, 4, generator=g, dtype=F64)
        s = beta * s + (1 - beta) * n * grad**2
        hat = s / (1 - beta**t)
        (got,) = unit.direction([grad], Damping(r, True), n)
        torch.testing.assert_close(got, grad / (hat + r * hat.mean()))
        assert float(unit.quadratic([grad], Damping(r, True))) == pytest.approx(
            float(((hat + r * hat.mean()) * grad**2).sum()), rel=1e-12
        )

    class GRUModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.GRUCell(2, 3).double()
            self.norm = nn.LayerNorm(3).double()
            self.ode = no.ODEBlock(mlp_field(3, 4), (0.0, 0.5), **TIGHT)

        def forward(self, x):
            return self.ode(self.norm(self.cell(x)))

    model = GRUModel()
    opt = no.OCNOpt(model)
    kinds = {p: type(u) for u in opt.units for p in u.params}
    units = {p: u for u in opt.units for p in u.params}
    assert all(kinds[p] is DiagonalUnit for p in model.norm.parameters())
    assert all(kinds[p] is EKFACUnit for p in model.ode.parameters())
    # the cell's two affine maps are Kronecker layers of their own
    cell = model.cell
    assert kinds[cell.weight_ih] is EKFACUnit and kinds[cell.weight_hh] is EKFACUnit
    assert units[cell.weight_ih].params == [cell.weight_ih, cell.bias_ih]
    assert units[cell.weight_hh].params == [cell.weight_hh, cell.bias_hh]
    diag = no.OCNOpt(model, outside="diagonal")
    assert all(
        isinstance(u, DiagonalUnit)
        for u in diag.units
        for p in u.params
        if p in set(cell.parameters())
    )


def _jac(fn, params):
    """J[b, k, :] = ∂out[b, k]/∂θ by brute-force autograd through the direct solver."""
    out = fn()
    rows = []
    for b in range(out.shape[0]):
        per_k = []
        for k in range(out.shape[1]):
            grads = torch.autograd.grad(out[b, k], params, retain_graph=True)
            per_k.append(torch.cat([g.reshape(-1) for g in grads]))
        rows.append(torch.stack(per_k))
    return torch.stack(rows), out.detach()


def _dense_case():
    torch.manual_seed(0)
    field = mlp_field(dim=2, hidden=3)
    block = no.ODEBlock(field, (0.0, 0.6), adjoint_norm="full", **TIGHT)
    direct = no.ODEBlock(field, (0.0, 0.6), gradient="direct", **REF)
    x0 = torch.randn(4, 2, dtype=F64)
    target = torch.randn(4, 2, dtype=F64)
    params = list(field.parameters())
    jac, out = _jac(lambda: direct(x0), params)
    gn = torch.einsum("bkp,bkq->pq", jac, jac) / 4
    grad = torch.einsum("bkp,bk->p", jac, out - target) / 4
    return block, x0, target, params, gn, grad


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_dense_step_equals_brute_force_damped_gauss_newton(mode):
    block, x0, target, params, gn, grad = _dense_case()
    eps, lr = 0.05, 0.7
    lam = eps * gn.trace() / gn.shape[0] if mode == "relative" else eps
    expected = -lr * torch.linalg.solve(gn + lam * torch.eye(gn.shape[0], dtype=F64), grad)
    before = _flat(params)
    opt = no.OCNOpt(
        block,
        lr=lr,
        momentum=0.0,
        step="fixed",
        curvature="dense",
        damping=eps,
        damping_mode=mode,
        factors="exact",
    )
    pred = block(x0)
    loss = 0.5 * ((pred - target) ** 2).sum(1).mean()
    opt.backward(loss, outputs=pred, likelihood="gaussian")
    opt.step()
    assert torch.allclose(_flat(params) - before, expected, rtol=1e-6, atol=1e-10)


def test_kl_clip_bounds_the_update_in_the_damped_curvature():
    """With the dense curvature: ν = min(1, sqrt(c / δᵀ(G + λ)δ)) scales the update taken."""
    block, x0, target, params, gn, grad = _dense_case()
    eps, lr = 0.05, 0.7
    lam = eps * gn.trace() / gn.shape[0]
    damped = gn + lam * torch.eye(gn.shape[0], dtype=F64)
    delta = -lr * torch.linalg.solve(damped, grad)
    quad = float(delta @ damped @ delta)
    for clip in (quad / 9, quad * 9):
        block, x0, target, params, *_ = _dense_case()
        before = _flat(params)
        opt = no.OCNOpt(
            block,
            lr=lr,
            momentum=0.0,
            step="fixed",
            curvature="dense",
            damping=eps,
            factors="exact",
            kl_clip=clip,
        )
        pred = block(x0)
        opt.backward(
            0.5 * ((pred - target) ** 2).sum(1).mean(), outputs=pred, likelihood="gaussian"
        )
        opt.step()
        nu = min(1.0, (clip / quad) ** 0.5)
        assert opt.last_clip == pytest.approx(nu, rel=1e-6)
        assert torch.allclose(_flat(params) - before, nu * delta, rtol=1e-6, atol=1e-10)
    assert nu == 1.0  # the generous bound leaves the step alone; the tight one made it 1/3


# ---------------------------------------------------------------------- factor sources
class TinyHead(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.ode = no.ODEBlock(mlp_field(dim=2, hidden=3), (0.0, 0.5), adjoint_norm="full", **TIGHT)
        self.head = nn.Linear(2, classes).double()

    def forward(self, x):
        return self.head(self.ode(x))


class TanhField(nn.Module):
    """dz/dt = tanh(W z + b) with its exact divergence on a log-density channel."""

    def __init__(self, d=2):
        super().__init__()
        self.lin = nn.Linear(d, d).double()
        self.d = d

    def forward(self, t, s):
        z = s[:, : self.d]
        h = torch.tanh(self.lin(z))
        div = ((1 - h**2) * torch.diagonal(self.lin.weight)).sum(1, keepdim=True)
        return torch.cat([h, -div], 1)


@pytest.mark.parametrize("case", ["categorical", "gaussian", "cnf"])
@pytest.mark.parametrize("source", ["exact", "sampled"])
def test_exact_and_sampled_factors_reproduce_gauss_newton(case, source):
    torch.manual_seed(0)
    n = 3
    x = torch.randn(n, 2, dtype=F64)
    if case == "cnf":
        field = TanhField()
        model = no.ODEBlock(field, (0.0, 0.5), adjoint_norm="full", **TIGHT)
        direct = no.ODEBlock(field, (0.0, 0.5), gradient="direct", **REF)
        s0 = torch.cat([x, torch.zeros(n, 1, dtype=F64)], 1)
        jac, _ = _jac(lambda: direct(s0)[:, :2], list(field.parameters()))
        hess = torch.eye(2, dtype=F64).expand(n, 2, 2)
        run = lambda: model(s0)  # noqa: E731
        outputs_of = lambda out: out[:, :2]  # noqa: E731
        likelihood = "standard_normal"
    else:
        model = TinyHead()
        params = list(model.ode.field.parameters())
        direct = no.ODEBlock(model.ode.field, (0.0, 0.5), gradient="direct", **REF)
        jac, logits = _jac(lambda: model.head(direct(x)), params)
        if case == "categorical":
            p = torch.softmax(logits, 1)
            hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            likelihood = "categorical"
        else:
            hess = torch.eye(3, dtype=F64).expand(n, 3, 3)
            likelihood = "gaussian"
        run = lambda: model(x)  # noqa: E731
        outputs_of = lambda out: out  # noqa: E731
    gn_ref = torch.einsum("bkp,bkl,blq->pq", jac, hess, jac) / n
    draws = 1 if source == "exact" else 10
    total = torch.zeros_like(gn_ref)
    opt = no.OCNOpt(
        model, lr=1e-9, step="fixed", curvature="dense", factors=source, rank=500, update_every=1
    )
    for _ in range(draws):
        outputs = outputs_of(run())
        opt.zero_grad()
        opt.backward(outputs.pow(2).mean(), outputs=outputs, likelihood=likelihood)
        block = model if isinstance(model, no.ODEBlock) else model.ode
        total += opt.capture.dense[block].gauss_newton() / n
        opt.step()
    got = total / draws
    if source == "exact":
        assert torch.allclose(got, gn_ref, rtol=1e-6, atol=1e-10)
    else:  # Monte-Carlo: unbiased, 5000 draws per sample in all
        err = (got - gn_ref).norm() / gn_ref.norm()
        assert err < 0.05, err


def test_factors_chain_through_two_blocks_in_the_optimizer():
    """Exact factors pass from the last block to the block before it (a two-block flow)."""
    torch.manual_seed(0)
    f1, f2 = TanhField(), TanhField()
    model = nn.Sequential(
        no.ODEBlock(f1, (0.0, 0.3), adjoint_norm="full", **TIGHT),
        no.ODEBlock(f2, (0.0, 0.3), adjoint_norm="full", **TIGHT),
    )
    direct = nn.Sequential(
        no.ODEBlock(f1, (0.0, 0.3), gradient="direct", **REF),
        no.ODEBlock(f2, (0.0, 0.3), gradient="direct", **REF),
    )
    n = 3
    s0 = torch.cat([torch.randn(n, 2, dtype=F64), torch.zeros(n, 1, dtype=F64)], 1)
    jac, _ = _jac(lambda: direct(s0)[:, :2], list(f1.parameters()))
    gn_ref = torch.einsum("bkp,bkq->pq", jac, jac) / n
    opt = no.OCNOpt(model, lr=1e-9, step="fixed", curvature="dense", factors="exact")
    out = model(s0)
    opt.backward(out[:, :2].pow(2).mean(), outputs=out[:, :2], likelihood="standard_normal")
    got = opt.capture.dense[model[0]].gauss_newton() / n
    assert torch.allclose(got, gn_ref, rtol=1e-6, atol=1e-10)


def test_factor_source_errors():
    model = TinyHead()
    x = torch.randn(3, 2, dtype=F64)
    opt = no.OCNOpt(model, factors="exact")
    out = model(x)
    with pytest.raises(ValueError, match=r"outputs/likelihood: .* both given on refresh steps"):
        opt.backward(out.sum())
    with pytest.raises(ValueError, match=r"likelihood: received 'poisson'"):
        opt.backward(out.sum(), outputs=out, likelihood="poisson")
    out.sum().backward()
    with pytest.raises(ValueError, match=r"no factors were handed over; call opt.backward"):
        opt.step()
    with pytest.raises(ValueError, match=r"logits of shape \(N, K\)"):
        output_factors(torch.zeros(2, 3, 4), "categorical", "exact", 1)


def test_factors_the_loss_cannot_provide():
    """Outputs that do not depend on the last block's output cannot carry factors to it."""
    model = TinyHead()
    side = nn.Linear(2, 3).double()
    x = torch.randn(3, 2, dtype=F64)
    opt = no.OCNOpt(nn.ModuleList([model, side]), factors="exact")
    out = model(x)  # the block runs (its output is kept), but `outputs` is another branch
    outputs = side(x)
    with pytest.raises(ValueError, match=r"does not depend on the last ODE block's output"):
        opt.backward(outputs.sum() + out.sum(), outputs=outputs, likelihood="categorical")
    fresh = no.OCNOpt(TinyHead(), factors="exact")
    with pytest.raises(ValueError, match=r"no ODE block was called with grad enabled"):
        fresh.backward(outputs.sum(), outputs=outputs, likelihood="categorical")


# ---------------------------------------------------------------------- state and contract
def _closure_run(model, opt, x, y, steps, start):
    losses = []
    for i in range(start, start + steps):
        idx = torch.arange(i % 2, 16, 2)

        def compute(idx=idx):
            logits = model(x[idx])
            return nn.functional.cross_entropy(logits, y[idx]), logits

        opt.zero_grad()
        loss, logits = compute()
        opt.backward(loss, outputs=logits, likelihood="categorical")
        opt.step(compute)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("variant", ["identity", "diagonal", "kfac", "ekfac", "dense"])
def test_state_dict_round_trip_is_bit_identical(variant, tmp_path):
    def make():
        torch.manual_seed(0)
        model = Classifier(hidden=4)
        model.ode = no.ODEBlock(model.ode.field, (0.0, 0.5), rtol=1e-6, atol=1e-6)
        opt = no.OCNOpt(model, curvature=variant, update_every=3, adapt_every=2, weight_decay=1e-4)
        return model, opt

    x, y = _data(n=16)
    model, opt = make()
    straight = _closure_run(model, opt, x, y, 21, 0)
    model, opt = make()
    _closure_run(model, opt, x, y, 7, 0)
    saved = opt.state_dict()
    assert {"damping", "control", "samples"} <= set(saved["ocnopt"])
    torch.save({"model": model.state_dict(), "opt": saved}, tmp_path / "ck.pt")
    model2, opt2 = make()
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert opt2.steps_taken == 7 and opt2.refresh_due == (7 % 3 == 0)
    assert opt2.damping == opt.damping and opt2.calibration == opt.calibration
    assert repr(opt2.last_adaptation) == repr(opt.last_adaptation)  # (rho may be NaN)
    resumed = _closure_run(model2, opt2, x, y, 14, 7)
    assert resumed == straight[7:]


def test_lr_scheduler_and_schedules_with_fixed_steps():
    model = Classifier()
    opt = no.OCNOpt(model, lr=0.1, curvature="identity", step="fixed")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    opt2 = no.OCNOpt(
        model, lr=lambda s: 0.1 / (1 + s), curvature="identity", momentum=0.0, step="fixed"
    )
    p = model.head.bias
    for expected_lr in (0.1, 0.05):
        opt2.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        before, g = p.detach().clone(), p.grad.clone()
        opt2.step()
        assert torch.allclose(p.detach(), before - expected_lr * g)


def test_groups_outside_rules_and_caps():
    model = Classifier()
    opt = no.OCNOpt(
        model,
        lr=0.3,
        step="fixed",
        groups=[{"params": model.head.parameters(), "lr": 0.01, "outside": "sgd"}],
    )
    assert len(opt.param_groups) == 2 and opt.param_groups[0]["lr"] == 0.01
    assert isinstance(opt.unit_of(model.stem), EKFACUnit) and opt.unit_of(model.head) is None
    kinds = {p: type(u) for u in opt.units for p in u.params}
    assert kinds[model.head.weight] is IdentityUnit and kinds[model.head.bias] is IdentityUnit
    assert "group 0" in repr(opt) and "ekfac" in repr(opt)
    x, y = _data()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    b, g = model.head.bias.detach().clone(), model.head.bias.grad.clone()
    opt.step()
    assert torch.allclose(model.head.bias.detach(), b - 0.01 * g)  # sgd rule at the group's lr
    with pytest.raises(ValueError, match=r"groups\[\.\.\.\]: received .*'damping'.*accepted"):
        no.OCNOpt(model, groups=[{"params": model.head.parameters(), "damping": 0.1}])


def test_memory_usage_counts_the_state_of_every_unit():
    model = Classifier()
    opt = no.OCNOpt(model, update_every=2)
    x, y = _data(n=16)
    _closure_run(model, opt, x, y, 2, 0)
    usage = opt.memory_usage()
    assert usage["EKFACUnit"] > 0 and usage["momentum"] > 0
    assert usage["total"] == sum(v for k, v in usage.items() if k != "total")
    expected = sum(
        t.numel() * t.element_size()
        for u in opt.units
        if isinstance(u, EKFACUnit)
        for t in u.state.values()
        if isinstance(t, torch.Tensor)
    )
    assert usage["EKFACUnit"] == expected


def test_nonfinite_gradient_skips_and_leaves_state_untouched():
    model = Classifier()
    opt = no.OCNOpt(model, lr=0.1, update_every=2)
    x, y = _data()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model.head.bias.grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient at step 1"):
        opt.step()
    assert opt.skipped_steps == 1 and opt.steps_taken == 1
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = opt.state_dict()
    assert after["ocnopt"]["step"] == state["ocnopt"]["step"]
    for k in state["state"]:
        for key, v in state["state"][k].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, after["state"][k][key])
    strict = no.OCNOpt(model, lr=0.1, nonfinite="raise")
    with pytest.raises(FloatingPointError, match="non-finite"):
        strict.step()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"damping": 0.0}, r"damping: received 0.0; accepted: a finite float > 0"),
        ({"damping": 1e9}, r"damping: received 1000000000.0; accepted: a float in \[min_d"),
        ({"ekfac_decay": 0.0}, r"ekfac_decay: received 0.0; accepted: a float in \(0, 1\]"),
        ({"ekfac_decay": 1.5}, r"ekfac_decay: received 1.5"),
        ({"update_every": 0}, r"update_every: received 0; accepted: an int >= 1"),
        ({"adapt_every": 0}, r"adapt_every: received 0; accepted: an int >= 1"),
        ({"curvature": "newton"}, r"curvature: received 'newton'; accepted: one of 'identity'"),
        ({"factors": "fisher"}, r"factors: received 'fisher'; accepted: one of 'auto', 'emp"),
        ({"step": "line"}, r"step: received 'line'; accepted: one of 'model', 'fixed'"),
        ({"damping_mode": "x"}, r"damping_mode: received 'x'; accepted: one of 'relative'"),
        ({"step": "fixed"}, r"lr: received None; accepted: a float > 0 with step='fixed'"),
        ({"lr": -0.1}, r"lr: received -0.1; accepted: a float > 0"),
        ({"momentum": 1.0}, r"momentum: received 1.0; accepted: a float in \[0, 1\)"),
        ({"outside": "adam"}, r"outside: received 'adam'"),
        ({"rank": 0}, r"rank: received 0"),
        ({"kl_clip": "big"}, r"kl_clip"),
        ({"adapt_damping": 1}, r"adapt_damping: received an object of type int"),
    ],
)
def test_constructor_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        no.OCNOpt(Classifier(), **kwargs)


def test_model_errors():
    with pytest.raises(
        ValueError,
        match=r"model: received 'Linear'; accepted: a model containing at least one ODEBlock "
        r"for curvature='dense'",
    ):
        no.OCNOpt(nn.Linear(2, 2), curvature="dense")
    with pytest.raises(ValueError, match=r"ODEBlock for curvature='ekfac' with outside='diagonal'"):
        no.OCNOpt(nn.Linear(2, 2), outside="diagonal")
    no.OCNOpt(nn.Linear(2, 2), curvature="diagonal")  # fine without blocks
    # a network without blocks: its own layers take the Kronecker factors
    assert [type(u).__name__ for u in no.OCNOpt(nn.Linear(2, 2)).units] == ["EKFACUnit"]
    big = no.ODEBlock(mlp_field(dim=8, hidden=256))
    with pytest.raises(
        ValueError, match=r"'dense' only for fields with at most max_dense_params=4096"
    ):
        no.OCNOpt(big, curvature="dense")


def test_standard_ekfac_baseline_takes_one_statistic_per_solver_evaluation():
    """time_joint=False: the field's layers get ordinary K-FAC hooks under backprop through
    the solver; A is the per-sample sum over every evaluation's inputs (checked by a hook of
    our own)."""
    torch.manual_seed(0)
    field = mlp_field(3, 6)
    block = no.ODEBlock(
        field, (0.0, 1.0), method="rk4", options=dict(step_size=0.25), gradient="direct"
    )
    model = nn.Sequential(block, nn.Linear(3, 2)).to(torch.float64)
    opt = no.OCNOpt(model, curvature="kfac", time_joint=False)
    first = next(m for m in field.modules() if isinstance(m, no.ConcatSquashLinear)).linear
    assert first in opt._units.outside and not opt._units.inside
    seen = []
    handle = first.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    x, t = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    opt.zero_grad()
    o = model(x)
    loss = 0.5 * (o - t).pow(2).sum(1).mean()
    opt.backward(loss)
    handle.remove()
    (stats,) = [s for s in opt._collector.statistics() if s.unit is opt._units.outside[first]]
    rows = torch.cat([torch.cat([u, torch.ones(len(u), 1, dtype=u.dtype)], 1) for u in seen])
    assert len(seen) == 16 == block.nfe_forward  # rk4, 4 steps: one statistic per evaluation
    torch.testing.assert_close(stats.A, rows.T @ rows / len(x))
    assert stats.samples == len(x)
    before = float(loss)
    for _ in range(5):
        ocnopt_step(opt, lambda: ((0.5 * (model(x) - t).pow(2).sum(1).mean()), None))
    assert float(0.5 * (model(x) - t).pow(2).sum(1).mean()) < before
    with pytest.raises(ValueError, match="time_joint"):
        no.OCNOpt(nn.Sequential(no.ODEBlock(mlp_field(3, 6)), nn.Linear(3, 2)), time_joint=False)


def test_standard_ekfac_factors_of_one_rk4_step_equal_a_hand_computation():
    """One rk4 step (torchdiffeq's 3/8 rule) of f(x) = tanh(W x + b), written out by hand:
    A = Σ_s [u_s, 1][u_s, 1]ᵀ / N over the four stage inputs (the evaluations are uses of one
    layer, summed as the time-joint factors are), B = N Σ_s g_s g_sᵀ with g_s the gradient of
    the mean loss at the stage's pre-activation W u_s + b."""

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, t, x):
            return torch.tanh(self.lin(x))

    torch.manual_seed(3)
    field = Field().double()
    block = no.ODEBlock(field, (0.0, 1.0), method="rk4", options=dict(step_size=1.0))
    block.gradient = "direct"
    head = nn.Linear(3, 2).double()
    model = nn.Sequential(block, head)
    opt = no.OCNOpt(model, curvature="kfac", time_joint=False)
    n = 5
    x0, y = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)
    opt.zero_grad()
    loss = 0.5 * (model(x0) - y).pow(2).sum(1).mean()
    opt.backward(loss)
    (stats,) = [s for s in opt._collector.statistics() if s.unit is opt._units.outside[field.lin]]

    w, b = field.lin.weight.detach(), field.lin.bias.detach()
    pre, inputs = [], []

    def f(u):
        inputs.append(u.detach())
        z = u @ w.T + b
        z.retain_grad()
        pre.append(z)
        return torch.tanh(z)

    u0 = x0.clone().requires_grad_(True)  # a graph through the stages
    k1 = f(u0)
    k2 = f(u0 + k1 / 3)
    k3 = f(u0 + (k2 - k1 / 3))
    k4 = f(u0 + (k1 - k2 + k3))
    x1 = u0 + (k1 + 3 * (k2 + k3) + k4) / 8
    out = x1 @ head.weight.detach().T + head.bias.detach()
    (0.5 * (out - y).pow(2).sum(1).mean()).backward()
    rows = torch.cat([torch.cat([u, torch.ones(n, 1, dtype=u.dtype)], 1) for u in inputs])
    grads = torch.cat([z.grad for z in pre])
    assert block.nfe_forward == 4
    torch.testing.assert_close(stats.A, rows.T @ rows / n, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(stats.B, grads.T @ grads * n, rtol=1e-10, atol=1e-14)


def test_load_state_dict_names_the_parameter_whose_shape_differs():
    def model(width):
        torch.manual_seed(0)
        return nn.Sequential(no.ODEBlock(mlp_field(3, width)), nn.Linear(3, 2)).double()

    small, wide = model(16), model(32)
    opt = no.OCNOpt(small)
    x, t = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    ocnopt_step(opt, lambda: ((0.5 * (small(x) - t).pow(2).sum(1).mean()), None))
    saved = opt.state_dict()
    with pytest.raises(ValueError) as err:
        no.OCNOpt(wide).load_state_dict(saved)
    text = str(err.value)
    shapes = {n: p.shape for n, p in small.named_parameters()}
    name = next(n for n, p in wide.named_parameters() if p.shape != shapes[n])
    assert text.startswith('state_dict: received "parameter') and f"'{name}'" in text
    assert "accepted: shape (32, 3)" in text
    assert "\n" not in text
    old = {**saved, "ocnopt": {k: v for k, v in saved["ocnopt"].items() if k != "param_shapes"}}
    with pytest.raises(ValueError, match='state_dict: received "parameter'):
        no.OCNOpt(wide).load_state_dict(old)  # older state dicts: the momentum buffers tell
    no.OCNOpt(model(16)).load_state_dict(saved)  # the same model loads


def test_diagonal_rule_step_equals_the_hand_formula():
    """s ← β s + (1−β) n g², ŝ = s / (1 − βᵗ), δ = −lr g / (ŝ + λ mean(ŝ)) (relative λ)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    opt = no.OCNOpt(
        model, lr=0.1, step="fixed", momentum=0.0, curvature="diagonal", adapt_damping=False
    )
    beta, lam, n = 0.95, 1e-2, opt._pre.samples
    x, t = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    s = {p: torch.zeros_like(p) for p in model.parameters()}
    for step in range(1, 4):
        opt.zero_grad()
        (0.5 * (model(x) - t).pow(2).sum(1).mean()).backward()
        want = {}
        for p in model.parameters():
            g = p.grad.detach().clone()
            s[p] = beta * s[p] + (1 - beta) * n * g * g
            hat = s[p] / (1 - beta**step)
            want[p] = p.detach() - 0.1 * g / (hat + lam * hat.mean())
        opt.step()
        for p in model.parameters():
            torch.testing.assert_close(p.detach(), want[p], rtol=1e-12, atol=1e-14)
