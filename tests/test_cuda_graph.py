"""``ODEBlock(..., cuda_graph=True)``: fixed-grid solves replayed from CUDA graphs.

On the CPU: the stepping that is captured (``run_fixed``, ``adjoint_fixed``) against
torchdiffeq and the own adjoint, and every refusal. On CUDA (skipped without it): the replayed
solves against the eager ones, NFE, recapture for a new shape, in-place parameter updates."""

import pytest
import torch
import torchdiffeq
from conftest import mlp_field

import node_ocp as no
from node_ocp.ode.adjoint import AugmentedDynamics
from node_ocp.ode.calls import FieldCall
from node_ocp.ode.graphs import CudaGraphError, adjoint_fixed, plan_fixed, run_fixed
from node_ocp.train.config import ConfigError, SolverConfig

F64 = torch.float64
GRIDS = {"increasing": [0.0, 0.3, 0.35, 1.2], "decreasing": [1.5, 0.9, -0.4]}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("step_size", [None, 0.07], ids=["grid", "step_size"])
@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_the_captured_stepping_is_torchdiffeqs(method, grid, step_size):
    field = mlp_field()
    y0 = torch.randn(3, 3, dtype=F64)
    t = torch.tensor(GRIDS[grid], dtype=F64)
    options = {} if step_size is None else {"step_size": step_size}
    plan = plan_fixed(method, t.tolist(), F64, "cpu", step_size)
    with torch.no_grad():
        got = run_fixed(plan, field, y0)
        want = torchdiffeq.odeint(field, y0, t, method=method, options=options)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert plan.nfe == {"euler": 1, "midpoint": 2, "rk4": 4}[method] * len(plan.steps)


@pytest.mark.parametrize("options", [{}, {"step_size": 0.1}])
def test_the_captured_adjoint_is_the_own_adjoint(options):
    field = mlp_field()
    grid = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    x0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    block = no.ODEBlock(field, grid, method="rk4", options=options)
    ys = block(x0)
    cot = torch.randn_like(ys)
    params = tuple(field.parameters())
    want = torch.autograd.grad(ys, (x0, *params), cot)

    counters = no.ode.SolveCounters()
    dyn = AugmentedDynamics(
        FieldCall(field, counters, "b", backward=True), params, (4, 3), 0, False
    )
    plans = [
        plan_fixed(
            "rk4", [grid[k].item(), grid[k - 1].item()], F64, "cpu", options.get("step_size")
        )  # fmt: skip
        for k in range(1, 3)
    ]
    got = adjoint_fixed(dyn, plans, ys.detach(), cot)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert counters.backward == sum(p.nfe for p in plans) == block.nfe_backward


def test_what_cannot_be_captured_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"cuda_graph: .*fixed-grid method.*'dopri5'"):
        no.ODEBlock(mlp_field(), method="dopri5", cuda_graph=True)
    with pytest.raises(ValueError, match=r"cuda_graph: .*adjoint_method='bosh3'"):
        no.ODEBlock(mlp_field(), method="rk4", adjoint_method="bosh3", cuda_graph=True)
    with pytest.raises(ValueError, match=r"cuda_graph: .*gradient='adjoint'"):
        no.ODEBlock(mlp_field(), method="rk4", gradient="direct", cuda_graph=True)
    with pytest.raises(ValueError, match=r"cuda_graph: .*options of \['step_size'\]"):
        no.ODEBlock(mlp_field(), method="rk4", options={"perturb": False}, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph: received an object of type str"):
        no.ODEBlock(mlp_field(), method="rk4", cuda_graph="yes")
    block = no.ODEBlock(mlp_field(), method="rk4", cuda_graph=True, name="blk")
    assert block.cuda_graph and "cuda_graph=True" in repr(block)
    with pytest.raises(ValueError, match=r"blk: cuda_graph: .*states on a CUDA device"):
        block(torch.randn(2, 3, dtype=F64))
    block.solver = no.ode.solvers.make_spec("dopri5", 1e-4, 1e-5, None)
    with pytest.raises(ValueError, match=r"cuda_graph: .*'dopri5'"):
        block(torch.randn(2, 3, dtype=F64))
    block.cuda_graph = False
    block(torch.randn(2, 3, dtype=F64))
    with pytest.raises(ConfigError, match=r"\[solver\].cuda_graph: received true with method"):
        SolverConfig(cuda_graph=True).check("[solver]")
    SolverConfig(cuda_graph=True, method="rk4").check("[solver]")


def _train_pair(device, dtype, options, batch=5):
    """An eager and a graphed block with the same field; returns both and the data."""
    torch.manual_seed(0)
    field = mlp_field(dtype=dtype).to(device)
    eager = no.ODEBlock(field, (0.0, 1.0), method="rk4", options=options)
    graphed = no.ODEBlock(field, (0.0, 1.0), method="rk4", options=options, cuda_graph=True)
    x = torch.randn(batch, 3, dtype=dtype, device=device)
    return field, eager, graphed, x


def _loss_and_grads(block, x):
    xg = x.clone().requires_grad_(True)
    y = block(xg)
    loss = y.pow(2).sum()
    return y.detach(), torch.autograd.grad(loss, (xg, *block.field.parameters()))


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_replayed_solves_match_the_eager_ones_on_cuda(dtype):
    tol = 1e-10 if dtype == F64 else 1e-4
    field, eager, graphed, x = _train_pair("cuda", dtype, {"step_size": 0.1})
    opt = torch.optim.SGD(field.parameters(), lr=0.05)
    for _ in range(3):  # replays see in-place parameter updates
        y_e, g_e = _loss_and_grads(eager, x)
        y_g, g_g = _loss_and_grads(graphed, x)
        torch.testing.assert_close(y_g, y_e, rtol=tol, atol=tol)
        for a, b in zip(g_g, g_e):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        for p, g in zip(field.parameters(), g_e[1:]):
            p.grad = g
        opt.step()
    assert (graphed.nfe_forward, graphed.nfe_backward) == (eager.nfe_forward, eager.nfe_backward)
    assert len(graphed._graphs) == 2  # one forward and one backward graph
    # a new batch size: captured again, still the same values
    x2 = torch.randn(2, 3, dtype=dtype, device="cuda")
    torch.testing.assert_close(_loss_and_grads(graphed, x2)[0], _loss_and_grads(eager, x2)[0])
    assert len(graphed._graphs) == 4


@pytest.mark.cuda
@CUDA
def test_a_field_that_reads_the_host_cannot_be_captured():
    class HostRead(torch.nn.Module):
        def forward(self, t, y):
            return -y * float(t)

    block = no.ODEBlock(HostRead(), (0.0, 1.0), method="rk4", cuda_graph=True, name="blk")
    with pytest.raises(CudaGraphError, match="blk: cuda_graph=True: the forward solve could not"):
        block(torch.randn(2, 3, device="cuda", requires_grad=True))
