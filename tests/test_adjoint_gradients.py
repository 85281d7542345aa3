"""The own adjoint against independent references: backprop through the solver,
torchdiffeq.odeint_adjoint, finite differences and gradcheck (float64)."""

import pytest
import torch
from conftest import conv_field, mlp_field
from torchdiffeq import odeint, odeint_adjoint

import node_ocp as no

SETTINGS = {
    # method: (options, tolerance vs direct backprop, vs torchdiffeq adjoint, for dL/dt).
    # torchdiffeq gets dL/dt0 from an integral of a·∂f/∂t, we from -a(t0)·f(t0, x0): equal in
    # exact arithmetic, so they differ by the discretisation error of the method.
    "dopri5": (None, 1e-6, 5e-7, 5e-7),
    "rk4": ({"step_size": 0.01}, 1e-8, 1e-9, 1e-7),
    "euler": ({"step_size": 1e-3}, 5e-3, 1e-9, 2e-3),
}


def _grid(kind: str, reverse: bool):
    t = {"pair": [0.0, 0.7], "multi": [0.0, 0.2, 0.45, 0.7]}[kind]
    t = torch.tensor(t, dtype=torch.float64)
    return t.flip(0) if reverse else t


def _state(field_kind: str):
    if field_kind == "mlp":
        return mlp_field(), torch.randn(4, 3, dtype=torch.float64)
    return conv_field(), torch.randn(2, 2, 4, 4, dtype=torch.float64)


def _loss(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (weights * out).sum() + 0.5 * (out**2).sum()


def _grads(out_fn, x0, t, params):
    x0 = x0.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    out = out_fn(x0, t)
    torch.manual_seed(1)
    weights = torch.randn_like(out)
    loss = _loss(out, weights)
    return torch.autograd.grad(loss, [x0, t, *params])


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("method", list(SETTINGS))
@pytest.mark.parametrize("field_kind", ["mlp", "conv"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("grid", ["pair", "multi"])
def test_adjoint_matches_direct_and_torchdiffeq(method, field_kind, reverse, grid):
    options, tol_direct, tol_tdq, tol_time = SETTINGS[method]
    field, x0 = _state(field_kind)
    params = list(field.parameters())
    t = _grid(grid, reverse)
    kw = dict(method=method, rtol=1e-10, atol=1e-10, options=options)
    ours = no.ODEBlock(field, t, gradient="adjoint", **kw)
    direct = no.ODEBlock(field, t, gradient="direct", **kw)

    def last(ys):
        return ys if grid == "multi" else ys[-1]

    g_ours = _grads(lambda x, tt: ours(x, tt), x0, t, params)
    g_direct = _grads(lambda x, tt: direct(x, tt), x0, t, params)
    g_tdq = _grads(
        lambda x, tt: last(odeint_adjoint(field, x, tt, **kw, adjoint_params=tuple(params))),
        x0,
        t,
        params,
    )
    # x0 and parameters against both references.
    for i in [0] + list(range(2, len(g_ours))):
        assert _rel(g_ours[i], g_direct[i]) < tol_direct, (i, _rel(g_ours[i], g_direct[i]))
        assert _rel(g_ours[i], g_tdq[i]) < tol_tdq, (i, _rel(g_ours[i], g_tdq[i]))
    # Time gradients against torchdiffeq's adjoint (backprop through an adaptive solver's
    # step-size logic is not a reference for dL/dt).
    assert _rel(g_ours[1], g_tdq[1]) < tol_time, _rel(g_ours[1], g_tdq[1])


def test_end_time_gradient_matches_finite_difference():
    field = mlp_field()
    x0 = torch.randn(4, 3, dtype=torch.float64)
    t1 = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    block = no.ODEBlock(field, (0.0, 1.0), rtol=1e-11, atol=1e-11)

    def loss(end):
        grid = torch.stack([torch.zeros((), dtype=torch.float64), end])
        return (block(x0, grid) ** 2).sum()

    (g,) = torch.autograd.grad(loss(t1), [t1])
    eps = 1e-5
    with torch.no_grad():
        fd = (loss(t1 + eps) - loss(t1 - eps)) / (2 * eps)
    assert abs(g.item() - fd.item()) < 1e-6 * max(1.0, abs(fd.item()))


def test_learnable_horizon_parameter_gets_gradient():
    field = mlp_field()
    t = torch.nn.Parameter(torch.tensor([0.0, 0.5], dtype=torch.float64))
    block = no.ODEBlock(field, t, rtol=1e-10, atol=1e-10)
    assert isinstance(block.t, torch.nn.Parameter)
    assert any(p is block.t for p in block.parameters())
    x0 = torch.randn(3, 3, dtype=torch.float64)
    out = block(x0)
    (out**2).sum().backward()
    # dL/dt1 = ∂L/∂x(t1) · f(t1, x(t1)) and dL/dt0 = -a(t0) · f(t0, x0)
    with torch.no_grad():
        expected_t1 = (2 * out * field(block.t[1], out)).sum()
    assert torch.allclose(block.t.grad[1], expected_t1, rtol=1e-8)
    # dL/dt0 against central finite differences of the solve from moved start times
    eps = 1e-5

    def loss_from(t0: float) -> float:
        moved = no.ODEBlock(field, (t0, 0.5), rtol=1e-10, atol=1e-10)
        with torch.no_grad():
            return float((moved(x0) ** 2).sum())

    fd = (loss_from(eps) - loss_from(-eps)) / (2 * eps)
    assert abs(block.t.grad[0].item() - fd) < 1e-6 * max(1.0, abs(fd))


def test_gradcheck_small_problem():
    field = mlp_field(dim=2, hidden=3)
    block = no.ODEBlock(field, (0.0, 1.0), method="rk4", options={"step_size": 0.01})
    x0 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.6], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, tt: block(x, tt), (x0, t), atol=1e-6, rtol=1e-4)


def test_gradcheck_grid_output_dopri5():
    field = mlp_field(dim=2, hidden=3)
    block = no.ODEBlock(field, (0.0, 1.0), rtol=1e-12, atol=1e-12)
    x0 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, tt: block(x, tt), (x0, t), atol=1e-6, rtol=1e-4)


def test_float32_and_counters():
    field = mlp_field(dtype=torch.float32)
    block = no.ODEBlock(field, (0.0, 1.0))
    x0 = torch.randn(8, 3, requires_grad=True)
    out = block(x0)
    assert out.dtype == torch.float32 and out.shape == (8, 3)
    out.sum().backward()
    assert block.nfe_forward > 0 and block.nfe_backward > 0
    assert x0.grad is not None and x0.grad.dtype == torch.float32
    direct = no.ODEBlock(field, (0.0, 1.0), gradient="direct")
    ref = torch.autograd.grad(direct(x0).sum(), x0)[0]
    assert torch.allclose(x0.grad, ref, rtol=1e-2, atol=1e-3)
    block.reset_nfe()
    assert block.nfe_forward == block.nfe_backward == 0


def test_frozen_parameters_and_no_grad_eval():
    field = mlp_field()
    for p in list(field.parameters())[:2]:
        p.requires_grad_(False)
    block = no.ODEBlock(field, (0.0, 1.0), rtol=1e-9, atol=1e-9)
    x0 = torch.randn(3, 3, dtype=torch.float64)
    with torch.no_grad():
        y = block(x0)
    ref = odeint(field, x0, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-9, atol=1e-9)
    assert torch.allclose(y, ref[-1], atol=1e-8)
    block(x0).sum().backward()
    params = list(field.parameters())
    assert params[0].grad is None and params[2].grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    field = mlp_field()
    x0 = torch.randn(4, 3, dtype=torch.float64)
    block = no.ODEBlock(field, (0.0, 1.0), rtol=1e-9, atol=1e-9)
    g_cpu = torch.autograd.grad((block(x0) ** 2).sum(), list(field.parameters()))
    block.cuda()
    g_gpu = torch.autograd.grad((block(x0.cuda()) ** 2).sum(), list(field.parameters()))
    for a, b in zip(g_cpu, g_gpu):
        assert torch.allclose(a, b.cpu(), rtol=1e-6, atol=1e-9)
