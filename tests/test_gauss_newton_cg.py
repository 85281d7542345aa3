"""``cg_iters``: conjugate gradient on the whole model's Gauss–Newton curvature, against a
dense Gauss–Newton matrix built from the full Jacobian (float64)."""

import copy
import math
from contextlib import nullcontext

import pytest
import torch
from conftest import mlp_field
from torch import nn
from torch.func import functional_call

import node_ocp as no
from node_ocp.optim.gauss_newton_cg import GaussNewtonCG
from node_ocp.optim.ocnopt import _backprop
from node_ocp.train.config import OptimizerConfig
from node_ocp.train.optimizers import ocnopt_options

F64 = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(2, 3)
        self.ode = no.ODEBlock(
            mlp_field(3, 4), (0.0, 0.5), method="rk4", options={"step_size": 0.125}
        )
        self.head = nn.Linear(3, 2)
        self.double()

    def forward(self, x):
        return self.head(self.ode(torch.tanh(self.stem(x))))


def _setup(n=24):
    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=g, dtype=F64)
    y = torch.randn(n, 2, generator=g, dtype=F64)
    return model, x, y


def _loss(out, y):
    return (out - y).pow(2).mean()


def _dense_ggn(model, x, y):
    """``Jᵀ H J`` with ``J`` the full Jacobian of the outputs and ``H = 2/(N D) I`` (MSE),
    by backprop through the solver (a twin of the model with ``gradient="direct"``)."""
    model = copy.deepcopy(model)
    model.ode.gradient = "direct"
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def outputs(flat):
        chunks = torch.split(flat, sizes)
        values = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return functional_call(model, values, (x,)).reshape(-1)

    flat = torch.cat([p.reshape(-1) for p in params])
    jac = torch.autograd.functional.jacobian(outputs, flat)  # (N D, P)
    h = 2.0 / jac.shape[0]
    return h * jac.T @ jac, sizes


def _watched(model, x, y, **kw):
    """A CG with the graph of the batch built, the gradients and the closure."""
    cg = GaussNewtonCG(1, **kw)
    out = model(x)
    _loss(out, y).backward()
    grads = {p: p.grad.detach().clone() for p in model.parameters()}

    def closure():
        out = model(x)
        return _loss(out, y), out

    assert cg._build(closure, nullcontext) is not None
    return cg, grads, closure


def _flat(d, model):
    return torch.cat([d[p].reshape(-1) for p in model.parameters()])


def _unflat(v, model):
    out, i = {}, 0
    for p in model.parameters():
        out[p] = v[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


@pytest.mark.parametrize("gradient, tol", [("adjoint", 1e-7), ("direct", 1e-9)])
def test_products_equal_the_dense_gauss_newton_matrix(gradient, tol):
    """Through the own adjoint the transposed products carry its (rk4) discretisation
    error against backprop through the solver; through the solver they agree to round-off
    and the difference quotient's O(ε²)."""
    model, x, y = _setup()
    model.ode.gradient = gradient
    dense, _ = _dense_ggn(model, x, y)
    cg, _, closure = _watched(model, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(dense.shape[0], generator=g, dtype=F64)
        with torch.no_grad():
            gv = _flat(cg.product(_unflat(v, model), closure, {}, nullcontext), model)
        expected = dense @ v
        assert (gv - expected).norm() / expected.norm() < tol
    # the parameters are restored exactly after the difference quotients
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize(
    "jv, graph, tol",
    [("forward", "adjoint", 1e-7), ("central", "direct", 1e-9), ("forward", "direct", 1e-7)],
)
def test_cheaper_products_equal_the_dense_gauss_newton_matrix(jv, graph, tol):
    """``cg_jv = "forward"``: one forward evaluation per ``J v``, error O(ε) (ε ≈ 1.5e-8 in
    float64); ``cg_graph = "direct"``: ``Jᵀ`` through a backprop graph of the solver although
    the block's own gradient is the adjoint, which is back in place after the products."""
    model, x, y = _setup()
    assert model.ode.gradient == "adjoint"
    dense, _ = _dense_ggn(model, x, y)
    backprop = _backprop(model) if graph == "direct" else None
    cg, _, closure = _watched(model, x, y, jv=jv, backprop=backprop)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(dense.shape[0], generator=g, dtype=F64)
        with torch.no_grad():
            gv = _flat(cg.product(_unflat(v, model), closure, {}, nullcontext), model)
        expected = dense @ v
        assert (gv - expected).norm() / expected.norm() < tol
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert model.ode.gradient == "adjoint"
    if graph == "direct":  # the graph is the solver's own (no adjoint solve behind it)
        assert "AdjointSolve" not in type(cg._outputs.grad_fn).__name__
        assert not any("Adjoint" in n for n in _graph_nodes(cg._outputs))
    with pytest.raises(ValueError, match="jv: received 'backward'"):
        GaussNewtonCG(1, jv="backward")


def _graph_nodes(t):
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.append(type(f).__name__)
        todo.extend(n for n, _ in f.next_functions)
    return names


def test_cg_solves_the_gauss_newton_system_and_its_first_step_scales_the_held_direction():
    model, x, y = _setup()
    dense, _ = _dense_ggn(model, x, y)
    n = dense.shape[0]
    wd = 0.05
    a = dense + wd * torch.eye(n, dtype=F64)
    cg, grads, closure = _watched(model, x, y)
    decay = {p: wd for p in model.parameters()}
    g = _flat(grads, model)
    # preconditioner: a fixed diagonal (not the identity), as the held curvature would be
    m = a.diagonal().clamp_min(1e-3)

    def precondition(r):
        return _unflat(_flat(r, model) / m, model)

    u = precondition(grads)
    cg.iters = 1
    with torch.no_grad():
        one = _flat(cg.refine(grads, u, precondition, closure, decay, nullcontext), model)
    uf = _flat(u, model)
    assert torch.allclose(one, (g @ uf) / (uf @ a @ uf) * uf, rtol=1e-7)
    cg.iters = 3 * n
    with torch.no_grad():
        full = _flat(cg.refine(grads, u, precondition, closure, decay, nullcontext), model)
    exact = torch.linalg.solve(a, g)
    assert (full - exact).norm() / exact.norm() < 1e-5
    # a few steps already beat the held direction on the quadratic model q(d) = ½dᵀAd − gᵀd
    cg.iters = 3
    with torch.no_grad():
        few = _flat(cg.refine(grads, u, precondition, closure, decay, nullcontext), model)

    def q(d):
        return float(0.5 * d @ a @ d - g @ d)

    assert q(few) < q(one) < 0


def _train_to_a_reachable_target(model, x, opt, check, steps=25) -> list[float]:
    """``steps`` steps of ``opt`` towards another Net's outputs (a target the model can
    reach), ``check()`` after each; the losses before each step."""
    torch.manual_seed(5)
    with torch.no_grad():
        y = Net()(x)
    losses = []

    def closure():
        out = model(x)
        return _loss(out, y), out

    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        loss = _loss(out, y)
        opt.backward(loss, outputs=out, likelihood="gaussian")
        opt.step(closure)
        losses.append(float(loss.detach()))
        check()
    return losses


def test_ocnopt_with_cg_iters_trains_and_is_a_config_key():
    model, x, _ = _setup()
    opt = no.OCNOpt(model, cg_iters=4, update_every=5, momentum=0.0)

    def check():
        assert opt._cg.last_iters == 4 and opt._cg._outputs is None  # the graph released

    losses = _train_to_a_reachable_target(model, x, opt, check)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.05 * losses[0]
    table = OptimizerConfig(kind="ocnopt", cg_iters=3)
    table.check("[optimizers.x]")
    assert ocnopt_options(table, math.inf).cg_iters == 3
    with pytest.raises(ValueError, match="cg_iters: received -1; accepted: an int >= 0"):
        no.OCNOpt(model, cg_iters=-1)


def test_cg_iters_without_outputs_keeps_the_held_direction_and_warns_once():
    """A closure returning the loss alone: the run is the run without cg_iters."""
    model, x, y = _setup()
    a = no.OCNOpt(model, cg_iters=2, update_every=5)
    twin, _, _ = _setup()
    b = no.OCNOpt(twin, update_every=5)
    with pytest.warns(RuntimeWarning, match="cg_iters: the closure returned no outputs"):
        for m, o in ((model, a), (twin, b)):
            for _ in range(3):
                o.zero_grad()
                _loss(m(x), y).backward()
                o.step(lambda m=m: _loss(m(x), y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_a_cg_run_resumes_exactly_with_its_damping():
    """The Levenberg–Marquardt λ of the Gauss–Newton steps is part of the state."""
    model, x, _ = _setup()
    torch.manual_seed(5)
    with torch.no_grad():
        y = Net()(x)

    def run(m, o, n):
        def closure():
            out = m(x)
            return _loss(out, y), out

        for _ in range(n):
            o.zero_grad()
            out = m(x)
            o.backward(_loss(out, y), outputs=out, likelihood="gaussian")
            o.step(closure)

    opt = no.OCNOpt(model, cg_iters=3, update_every=2)
    run(model, opt, 3)
    assert opt._cg.damping != 1.0  # it adapted
    twin = copy.deepcopy(model)
    twin_opt = no.OCNOpt(twin, cg_iters=3, update_every=2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert twin_opt._cg.damping == opt._cg.damping
    run(model, opt, 2)
    run(twin, twin_opt, 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_cheaper_cg_options_train_restore_the_blocks_and_are_config_keys():
    """``cg_jv = "forward"`` with ``cg_graph = "direct"``: the run trains as the default CG
    does, every block keeps its own gradient between steps, and both are config keys."""
    model, x, _ = _setup()
    opt = no.OCNOpt(
        model, cg_iters=4, update_every=5, momentum=0.0, cg_jv="forward", cg_graph="direct"
    )

    def check():
        assert opt._cg.last_iters == 4 and model.ode.gradient == "adjoint"

    losses = _train_to_a_reachable_target(model, x, opt, check)
    assert losses[-1] < 0.05 * losses[0]
    table = OptimizerConfig(kind="ocnopt", cg_iters=3, cg_jv="forward", cg_graph="direct")
    table.check("[optimizers.x]")
    o = ocnopt_options(table, math.inf)
    assert (o.cg_jv, o.cg_graph) == ("forward", "direct")
    with pytest.raises(ValueError, match="cg_graph: received 'torchdiffeq'"):
        no.OCNOpt(model, cg_iters=1, cg_graph="torchdiffeq")
    with pytest.raises(ValueError, match="cg_jv: received 'x'"):
        no.OCNOpt(model, cg_iters=1, cg_jv="x")
