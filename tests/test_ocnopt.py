"""OCNOpt against independent computations: SGD, hand-written K-FAC/EKFAC formulas, a
brute-force damped Gauss–Newton step, brute-force GN matrices for the exact factors."""

import copy

import pytest
import torch
from conftest import mlp_field
from torch import nn

import node_ocp as no
from node_ocp.optim import output_factors

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)
# Brute-force references backprop through rk4 with small fixed steps: backprop through an
# adaptive solver also differentiates its step-size control (errors ~1e-8).
REF = dict(method="rk4", options={"step_size": 0.005})


class Classifier(nn.Module):
    """stem (outside) -> ODE block -> head (outside)."""

    def __init__(self, dim=3, classes=4, hidden=6, conv=False):
        super().__init__()
        if conv:
            self.stem = nn.Conv2d(1, 2, 3, padding=1)
            field = no.TimeSequential(no.ConcatConv2d(2, 2, 3, padding=1))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, classes))
        else:
            self.stem = nn.Linear(dim, dim)
            field = mlp_field(dim, hidden)
            self.head = nn.Linear(dim, classes)
        self.ode = no.ODEBlock(field.double(), (0.0, 0.5), **TIGHT)
        self.double()

    def forward(self, x):
        return self.head(self.ode(torch.tanh(self.stem(x))))


def _data(conv=False, n=8, classes=4):
    g = torch.Generator().manual_seed(1)
    x = (
        torch.randn(n, 1, 4, 4, generator=g, dtype=F64)
        if conv
        else torch.randn(n, 3, generator=g, dtype=F64)
    )
    return x, torch.randint(0, classes, (n,), generator=g)


def test_identity_matches_sgd_step_for_step():
    torch.manual_seed(0)
    model = Classifier()
    ref = copy.deepcopy(model)
    x, y = _data()
    opt = no.OCNOpt(model, lr=0.1, momentum=0.9, weight_decay=1e-3, curvature="identity")
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(10):
        for m, o in [(model, opt), (ref, sgd)]:
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-14)


def _matrix(layer, grad=False):
    """[W.reshape(d_out, -1), b] of the values (or of the gradients)."""
    pick = (lambda p: p.grad) if grad else (lambda p: p.detach())
    parts = [pick(layer.weight).reshape(layer.weight.shape[0], -1)]
    if layer.bias is not None:
        parts.append(pick(layer.bias)[:, None])
    return torch.cat(parts, 1).clone()


def _grad_matrix(layer):
    return _matrix(layer, grad=True)


def _captured(model, x, y, sample_dt):
    """Independent capture pass on the same batch (the capture itself is checked by hand
    computations in test_second_order)."""
    cap = no.CurvatureCapture(sample_dt=sample_dt)
    stats = {}
    handles = []
    for m in [model.stem, model.head[-1] if isinstance(model.head, nn.Sequential) else model.head]:

        def fwd(mod, inp, out):
            rows = no.curvature.input_rows(mod, inp[0].detach())
            rows = rows.reshape(-1, rows.shape[-1])
            stats[mod] = {"A": rows.T @ rows}
            out.register_hook(
                lambda g, mod=mod: stats[mod].update(
                    B=(lambda r: r.T @ r)(no.curvature.output_rows(mod, g).reshape(-1, g.shape[1]))
                )
            )

        handles.append(m.register_forward_hook(fwd))
    with cap.active(model):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    return cap, stats


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("variant", ["kfac", "ekfac"])
def test_kronecker_directions_equal_hand_formulas(variant, conv):
    torch.manual_seed(0)
    model = Classifier(conv=conv)
    x, y = _data(conv)
    n = x.shape[0]
    eps, alpha, dt = 0.05, 0.75, 0.1
    cap, outside = _captured(model, x, y, dt)
    expected = {}
    # Convolutions: B is divided by the output locations per sample (KFC), 16 on 4x4 maps.
    locs = {m: (16 if isinstance(m, nn.Conv2d) else 1) for m in list(cap.kronecker) + list(outside)}
    layers = {m: (s.A / n, s.B * n / locs[m]) for m, s in cap.kronecker.items()}
    for m, s in outside.items():
        layers[m] = (s["A"] / n, s["B"] * n / locs[m])
    for m, (a_n, b_n) in layers.items():
        g = _grad_matrix(m)
        if variant == "kfac":
            ia = torch.linalg.inv(a_n + eps**0.5 * torch.eye(a_n.shape[0], dtype=F64))
            ib = torch.linalg.inv(b_n + eps**0.5 * torch.eye(b_n.shape[0], dtype=F64))
            expected[m] = ib @ g @ ia
        else:
            ea, qa = torch.linalg.eigh(a_n)
            eb, qb = torch.linalg.eigh(b_n)
            gt = qb.T @ g @ qa
            s = alpha * torch.outer(eb, ea) + (1 - alpha) * n * gt * gt
            expected[m] = qb @ (gt / (s + eps)) @ qa.T
    before = {m: _matrix(m) for m in layers}
    opt = no.OCNOpt(
        model,
        lr=1.0,
        momentum=0.0,
        curvature=variant,
        damping=eps,
        alpha=alpha,
        update_every=5,
        sample_dt=dt,
    )
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for m in layers:
        step = before[m] - _matrix(m)
        assert torch.allclose(step, expected[m], rtol=1e-8, atol=1e-12), type(m)
    if variant == "ekfac":
        # Second step: same eigenbasis, s = α (α λ_B λ_Aᵀ + (1 − α) n G̃1²) + (1 − α) n G̃2².
        m = model.ode.field.layers[0].linear if not conv else model.ode.field.layers[0].conv
        a_n, b_n = layers[m]
        ea, qa = torch.linalg.eigh(a_n)
        eb, qb = torch.linalg.eigh(b_n)
        g1 = qb.T @ _grad_matrix(m) @ qa
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        g2 = qb.T @ _grad_matrix(m) @ qa
        s1 = alpha * torch.outer(eb, ea) + (1 - alpha) * n * g1 * g1
        s = alpha * s1 + (1 - alpha) * n * g2 * g2
        w0 = _matrix(m)
        opt.step()
        w1 = _matrix(m)
        assert torch.allclose(w0 - w1, qb @ (g2 / (s + eps)) @ qa.T, rtol=1e-8, atol=1e-12)


def _jac(fn, params):
    """J[b, k, :] = ∂out[b, k]/∂θ by brute-force autograd through the direct solver."""
    out = fn()
    rows = []
    for b in range(out.shape[0]):
        rows.append(
            torch.stack(
                [
                    torch.cat(
                        [
                            g.reshape(-1)
                            for g in torch.autograd.grad(out[b, k], params, retain_graph=True)
                        ]
                    )
                    for k in range(out.shape[1])
                ]
            )
        )
    return torch.stack(rows), out.detach()


def test_dense_step_equals_brute_force_damped_gauss_newton():
    torch.manual_seed(0)
    field = mlp_field(dim=2, hidden=3)
    block = no.ODEBlock(field, (0.0, 0.6), adjoint_norm="full", **TIGHT)
    direct = no.ODEBlock(field, (0.0, 0.6), gradient="direct", **REF)
    x0 = torch.randn(4, 2, dtype=F64)
    target = torch.randn(4, 2, dtype=F64)
    params = list(field.parameters())
    jac, out = _jac(lambda: direct(x0), params)
    n, eps, lr = 4, 0.05, 0.7
    gn = torch.einsum("bkp,bkq->pq", jac, jac) / n
    grad = torch.einsum("bkp,bk->p", jac, out - target) / n
    expected = -lr * torch.linalg.solve(gn + eps * torch.eye(gn.shape[0], dtype=F64), grad)
    before = torch.cat([p.detach().reshape(-1) for p in params])
    opt = no.OCNOpt(block, lr=lr, momentum=0.0, curvature="dense", damping=eps, factors="exact")
    pred = block(x0)
    loss = 0.5 * ((pred - target) ** 2).sum(1).mean()
    opt.backward(loss, outputs=pred, likelihood="gaussian")
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in params])
    assert torch.allclose(after - before, expected, rtol=1e-6, atol=1e-10)


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
        params = list(field.parameters())
        jac, _ = _jac(lambda: direct(s0)[:, :2], params)
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
    opt = no.OCNOpt(model, lr=1e-9, curvature="dense", factors=source, rank=500, update_every=1)
    for _ in range(draws):
        out = run()
        outputs = outputs_of(out)
        loss = outputs.pow(2).mean()
        opt.zero_grad()
        opt.backward(loss, outputs=outputs, likelihood=likelihood)
        block = model if isinstance(model, no.ODEBlock) else model.ode
        stats = opt.capture.dense[block]
        total += stats.gauss_newton() / n
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
    opt = no.OCNOpt(model, lr=1e-9, curvature="dense", factors="exact")
    out = model(s0)
    opt.backward(out[:, :2].pow(2).mean(), outputs=out[:, :2], likelihood="standard_normal")
    got = opt.capture.dense[model[0]].gauss_newton() / n
    assert torch.allclose(got, gn_ref, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("variant", ["identity", "diagonal", "kfac", "ekfac", "dense"])
def test_state_dict_round_trip_is_bit_identical(variant, tmp_path):
    def make():
        torch.manual_seed(0)
        model = Classifier(hidden=4)
        model.ode = no.ODEBlock(model.ode.field, (0.0, 0.5), rtol=1e-6, atol=1e-6)
        opt = no.OCNOpt(
            model, lr=0.05, curvature=variant, update_every=3, sample_dt=0.1, weight_decay=1e-4
        )
        return model, opt

    x, y = _data(n=16)

    def run(model, opt, steps, start):
        losses = []
        for i in range(start, start + steps):
            idx = torch.arange(i % 2, 16, 2)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.backward(loss)
            opt.step()
            losses.append(loss.item())
        return losses

    model, opt = make()
    straight = run(model, opt, 27, 0)
    model, opt = make()
    run(model, opt, 7, 0)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    model2, opt2 = make()
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert opt2.steps_taken == 7 and opt2.refresh_due == (7 % 3 == 0)
    resumed = run(model2, opt2, 20, 7)
    assert resumed == straight[7:]


def test_lr_scheduler_and_schedules():
    model = Classifier()
    opt = no.OCNOpt(model, lr=0.1, curvature="identity")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    opt2 = no.OCNOpt(model, lr=lambda s: 0.1 / (1 + s), curvature="identity", momentum=0.0)
    p = model.head.bias
    opt2.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    before, g = p.detach().clone(), p.grad.clone()
    opt2.step()
    assert torch.allclose(p.detach(), before - 0.1 * g)
    opt2.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    before, g = p.detach().clone(), p.grad.clone()
    opt2.step()
    assert torch.allclose(p.detach(), before - 0.05 * g)


def test_groups_and_outside_rules():
    model = Classifier()
    opt = no.OCNOpt(
        model, lr=0.1, groups=[{"params": model.head.parameters(), "lr": 0.01, "outside": "sgd"}]
    )
    assert len(opt.param_groups) == 2 and opt.param_groups[0]["lr"] == 0.01
    assert model.head not in opt._kron and model.stem in opt._kron
    assert "group 0" in repr(opt) and "ekfac" in repr(opt)
    x, y = _data()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    b, g = model.head.bias.detach().clone(), model.head.bias.grad.clone()
    opt.step()
    assert torch.allclose(model.head.bias.detach(), b - 0.01 * g)  # sgd rule, first momentum step


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
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient at step 1"):
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
        ({"damping": 0.0}, r"damping: received 0.0; accepted: a float > 0"),
        ({"damping": -1.0}, r"damping: received -1.0"),
        ({"alpha": 0.0}, r"alpha: received 0.0; accepted: a float in \(0, 1\]"),
        ({"alpha": 1.5}, r"alpha: received 1.5"),
        ({"update_every": 0}, r"update_every: received 0; accepted: an int >= 1"),
        ({"curvature": "newton"}, r"curvature: received 'newton'; accepted: one of 'identity'"),
        ({"factors": "fisher"}, r"factors: received 'fisher'; accepted: one of 'empirical'"),
        ({"lr": -0.1}, r"lr: received -0.1; accepted: a float > 0"),
        ({"momentum": 1.0}, r"momentum: received 1.0; accepted: a float in \[0, 1\)"),
        ({"outside": "adam"}, r"outside: received 'adam'"),
        ({"rank": 0}, r"rank: received 0"),
    ],
)
def test_constructor_errors(kwargs, message):
    args = {"lr": 0.1, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        no.OCNOpt(Classifier(), **args)


def test_model_errors():
    with pytest.raises(
        ValueError,
        match=r"model: received 'Linear'; accepted: a model containing at least one ODEBlock",
    ):
        no.OCNOpt(nn.Linear(2, 2), lr=0.1)
    no.OCNOpt(nn.Linear(2, 2), lr=0.1, curvature="diagonal")  # fine without blocks
    big = no.ODEBlock(mlp_field(dim=8, hidden=256))
    with pytest.raises(
        ValueError, match=r"'dense' only for fields with at most max_dense_params=4096"
    ):
        no.OCNOpt(big, lr=0.1, curvature="dense")


def test_factor_source_errors():
    model = TinyHead()
    x = torch.randn(3, 2, dtype=F64)
    opt = no.OCNOpt(model, lr=0.1, factors="exact")
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


def test_horizon_update_equals_formula():
    """dx/dt = a x, L = ½ x(t1)²: ∂L/∂t1 = a x(t1)², known in closed form."""

    class Linear1(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(-0.8, dtype=F64))

        def forward(self, t, x):
            return self.a * x

    field = Linear1()
    block = no.ODEBlock(field, (0.0, 1.0), **TIGHT)
    lam, lr, beta = 0.1, 0.5, 0.0
    horizon = no.HorizonOptimizer(block, field.parameters(), lr=lr, penalty=lam, beta=beta)
    opt = torch.optim.SGD(field.parameters(), lr=0.1)
    x0 = torch.tensor([[1.5]], dtype=F64)
    for _ in range(3):
        t1, a = horizon.t1, field.a.item()
        a_prev = a
        opt.zero_grad()
        out = block(x0)
        (0.5 * out**2).sum().backward()
        xt1 = 1.5 * torch.exp(torch.tensor(a * t1, dtype=F64))
        dl_dt1 = (a * xt1**2).item()
        dl_da = (t1 * xt1**2).item()
        assert block.t.grad[1].item() == pytest.approx(dl_dt1, rel=1e-8)
        opt.step()
        dtheta = field.a.item() - a_prev
        new = horizon.step()
        q_t = dl_dt1 + lam * t1
        q_tt = dl_dt1**2 + lam
        expected = t1 - lr * (q_t + dl_dt1 * dl_da * dtheta) / q_tt
        assert new == pytest.approx(max(expected, 0.05), rel=1e-8)
    state = horizon.state_dict()
    assert state["t1"] == horizon.t1 and block.t.grad is None


def test_horizon_warmup_only_averages_then_updates_from_the_averages():
    """No t1 update during warm-up; the first update uses the averages of all warm-up steps."""
    block = no.ODEBlock(mlp_field(), (0.0, 1.0), **TIGHT)
    beta, lr, lam = 0.5, 0.3, 0.01
    h = no.HorizonOptimizer(block, mode="open_loop", lr=lr, penalty=lam, beta=beta)
    assert h.warmup == 1  # ceil(1 / (1 - 0.5)) - 1
    h = no.HorizonOptimizer(block, mode="open_loop", lr=lr, penalty=lam, beta=beta, warmup=3)
    gen = torch.Generator().manual_seed(0)
    q_t = q_tt = 0.0
    for k in range(4):
        x0 = torch.randn(5, 3, dtype=F64, generator=gen)
        (block(x0) ** 2).sum().backward()
        g, t1 = block.t.grad[1].item(), h.t1
        b = beta if k > 0 else 0.0
        q_t = b * q_t + (1 - b) * (g + lam * t1)
        q_tt = b * q_tt + (1 - b) * (g * g + lam)
        new = h.step()
        if k < 3:
            assert new == t1 == 1.0
        else:
            assert new == pytest.approx(min(max(t1 - lr * q_t / q_tt, 0.05), 1e9), rel=1e-10)
            assert new != 1.0
    with pytest.raises(ValueError, match=r"warmup: received -1"):
        no.HorizonOptimizer(block, mode="open_loop", warmup=-1)


def test_horizon_modes_and_errors():
    block = no.ODEBlock(mlp_field(), (0.0, 1.0))
    with pytest.raises(ValueError, match=r"params: .* the model parameters for mode='feedback'"):
        no.HorizonOptimizer(block)
    with pytest.raises(ValueError, match=r"mode: received 'pid'"):
        no.HorizonOptimizer(block, mode="pid")
    with pytest.raises(ValueError, match=r"block.t: .* a pair \(t0, t1\) with t1 > t0"):
        no.HorizonOptimizer(no.ODEBlock(mlp_field(), [0.0, 0.5, 1.0]), mode="open_loop")
    h = no.HorizonOptimizer(block, mode="first_order", lr=0.1, penalty=1.0, min_horizon=0.2)
    with pytest.raises(ValueError, match=r"t1 has no gradient"):
        h.step()
    x0 = torch.randn(4, 3, dtype=F64)
    (block(x0) ** 2).sum().backward()
    g = block.t.grad[1].item()
    new = h.step()
    assert new == pytest.approx(max(1.0 - 0.1 * (g + 1.0), 0.2))
    assert all(p is not block.t for p in block.parameters())


def test_factors_the_loss_cannot_provide():
    """Outputs that do not depend on the last block's output cannot carry factors to it."""
    model = TinyHead()
    side = nn.Linear(2, 3).double()
    x = torch.randn(3, 2, dtype=F64)
    opt = no.OCNOpt(nn.ModuleList([model, side]), lr=0.1, factors="exact")
    out = model(x)  # the block runs (its output is kept), but `outputs` is another branch
    outputs = side(x)
    with pytest.raises(ValueError, match=r"does not depend on the last ODE block's output"):
        opt.backward(outputs.sum() + out.sum(), outputs=outputs, likelihood="categorical")
    fresh = no.OCNOpt(TinyHead(), lr=0.1, factors="exact")
    with pytest.raises(ValueError, match=r"no ODE block was called with grad enabled"):
        fresh.backward(outputs.sum(), outputs=outputs, likelihood="categorical")


@pytest.mark.parametrize("kl_clip", [1e-6, 1e6])
def test_kl_clip_scales_the_update_to_the_bound(kl_clip):
    torch.manual_seed(0)
    model = Classifier()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _data()
    lr = 0.1
    opt = no.OCNOpt(model, lr=lr, momentum=0.0, curvature="identity", kl_clip=kl_clip)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.step()
    vg = lr * lr * sum(float((g * g).sum()) for g in grads)  # identity: u = g
    nu = min(1.0, (kl_clip / vg) ** 0.5)
    assert (nu < 1.0) == (kl_clip < vg)
    assert opt.last_clip == pytest.approx(nu, rel=1e-12)
    for p, p0, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - lr * nu * g, rtol=0, atol=1e-14)
    if nu < 1.0:  # the clipped step Δ = -lr·ν·u has Δᵀ F Δ = lr² ν² u·g (F u = g) = kl_clip
        delta = [p0 - p.detach() for p, p0 in zip(model.parameters(), before)]
        quad = sum(float((d * g).sum()) for d, g in zip(delta, grads)) * lr * nu
        assert quad == pytest.approx(kl_clip, rel=1e-9)
    with pytest.raises(TypeError, match="kl_clip"):
        no.OCNOpt(model, lr=0.1, kl_clip="big")
