"""Per-sample step control (``step_control="per_sample"``, node_ocp.ode.per_sample): every
row keeps its own time, step and accept/reject. Checked against exact solutions, against
each sample solved alone (the own loop with batch control, torchdiffeq), for trajectories,
steps, NFE, the gradients of the own adjoint and of backprop, the curvature capture's
sample grid, and the refusals."""

import math

import pytest
import torch
import torchdiffeq
from conftest import conv_field, mlp_field

import node_ocp as no
from node_ocp.ode import per_sample as ps
from node_ocp.ode import rk
from node_ocp.ode.solvers import make_spec
from node_ocp.train.config import ConfigError, SolverConfig

F64 = torch.float64
#: decay rates per sample: the samples need very different steps
RATES = (0.1, 1.0, 8.0, 40.0)


class Spiral(torch.nn.Module):
    """``dy_b/dt = M_b (y_b - sin(t) 1) + cos(t) 1`` per row ``b``, ``M_b = -k_b I + ω J``
    (a decay rate per sample, a rotation): ``y_b(t) = sin(t) 1 + e^{M_b (t - t0)} (y_b(t0) -
    sin(t0) 1)``. ``rows`` selects the samples' rates (a sample solved alone uses
    ``rows=[b]``)."""

    accepts_batched_time = True
    omega = 2.0

    def __init__(self, rows=None):
        super().__init__()
        k = torch.tensor(RATES, dtype=F64)
        self.register_buffer("k", k if rows is None else k[rows])

    def forward(self, t, y):
        t = t.reshape(-1, 1).to(y.dtype)
        u = y - torch.sin(t)
        ju = torch.stack([-u[:, 1], u[:, 0]], 1)
        return -self.k[:, None] * u + self.omega * ju + torch.cos(t)

    def exact(self, y0, t0: float, t: float) -> torch.Tensor:
        d, w = t - t0, self.omega
        u = y0 - math.sin(t0)
        c, s = math.cos(w * d), math.sin(w * d)
        rot = torch.stack([c * u[:, 0] - s * u[:, 1], s * u[:, 0] + c * u[:, 1]], 1)
        return math.sin(t) + torch.exp(-self.k * d)[:, None] * rot


def per_sample_block(field, t=(0.0, 1.0), **kw):
    kw = {"rtol": 1e-8, "atol": 1e-10, **kw}
    return no.ODEBlock(field, t, backend="own", step_control="per_sample", **kw)


#: method, rtol, tolerance against the exact solution (bosh3: its dense output)
@pytest.mark.parametrize("method,rtol,tol", [("dopri5", 1e-9, 1e-7), ("bosh3", 1e-7, 1e-4)])
@pytest.mark.parametrize("grid", [[0.0, 0.3, 0.35, 1.2], [1.2, 0.5, -0.3]])
def test_trajectory_matches_exact_and_each_sample_alone(method, rtol, tol, grid):
    y0 = torch.tensor([[1.0, -0.5], [0.3, 2.0], [-1.0, 0.7], [2.0, 1.0]], dtype=F64)
    t = torch.tensor(grid, dtype=F64)
    opts = dict(method=method, rtol=rtol, atol=rtol / 100)
    stats = ps.PerSampleStats()
    with torch.no_grad():
        got = ps.odeint(Spiral(), y0, t, stats=stats, **opts)
    assert got.shape == (len(grid), 4, 2)
    exact = torch.stack([Spiral().exact(y0, grid[0], s) for s in grid])
    torch.testing.assert_close(got, exact, rtol=tol, atol=tol)
    for b in range(4):
        alone = Spiral(rows=[b])
        own_stats = rk.SolveStats()
        with torch.no_grad():
            own = rk.odeint(alone, y0[b : b + 1], t, stats=own_stats, **opts)
            ref = torchdiffeq.odeint(alone, y0[b : b + 1], t, **opts)
        # the same steps as the own loop on this sample alone, the same values to rounding
        assert int(stats.accepted[b]) == own_stats.accepted
        assert int(stats.rejected[b]) == own_stats.rejected
        torch.testing.assert_close(got[:, b : b + 1], own, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[:, b : b + 1], ref, rtol=1e-9, atol=1e-9)
    # the samples needed very different steps
    assert int(stats.accepted.max()) > 2 * int(stats.accepted.min())


def test_nfe_counts_one_per_batch_evaluation():
    """NFE: each evaluation of the field on the whole batch counts one; dopri5 makes 2 (the
    initial step) plus 6 per loop iteration, and the loop runs until its slowest sample is
    done (its attempts, accepted and rejected)."""
    field = Spiral()
    block = per_sample_block(field, (0.0, 1.0), gradient="direct")
    y0 = torch.ones(4, 2, dtype=F64)
    stats = ps.PerSampleStats()
    with torch.no_grad():
        out = block.solver.integrate_per_sample(field, y0, block.t, stats=stats)
        block(y0)
    assert stats.nfe == block.nfe_forward == 2 + 6 * stats.iterations
    assert stats.iterations == int((stats.accepted + stats.rejected).max())
    batch = no.ODEBlock(field, (0.0, 1.0), rtol=1e-8, atol=1e-10, backend="own")
    with torch.no_grad():
        batch_out = batch(y0)
    # (batch control's RMS over the whole batch dilutes the hardest sample's error, so it may
    # take fewer steps than that sample alone: per-sample control holds every sample to the
    # tolerance)
    torch.testing.assert_close(out[-1], batch_out, rtol=1e-7, atol=1e-9)


def test_extra_output_times_do_not_change_the_steps():
    y0 = torch.randn(4, 2, dtype=F64)
    s1, s2 = ps.PerSampleStats(), ps.PerSampleStats()
    opts = dict(method="dopri5", rtol=1e-7, atol=1e-9)
    with torch.no_grad():
        a = ps.odeint(Spiral(), y0, torch.tensor([0.0, 1.0], dtype=F64), stats=s1, **opts)
        grid = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.99, 1.0], dtype=F64)
        b = ps.odeint(Spiral(), y0, grid, stats=s2, **opts)
    assert torch.equal(s1.accepted, s2.accepted) and s1.iterations == s2.iterations
    assert torch.equal(a[-1], b[-1])


def _separate(field, x0, grid, gradient, method="dopri5", backend="own"):
    """Each sample alone with batch control (the own loop, or torchdiffeq's ``odeint``): the
    outputs stacked, the gradients of ``sum(out²)`` w.r.t. x0 and the parameters summed over
    samples."""
    block = no.ODEBlock(
        field, grid, method=method, rtol=1e-8, atol=1e-10, gradient=gradient, backend=backend
    )
    outs, gx = [], []
    params = list(field.parameters())
    gp = [torch.zeros_like(p) for p in params]
    for b in range(x0.shape[0]):
        xb = x0[b : b + 1].clone().requires_grad_(True)
        out = block(xb)
        grads = torch.autograd.grad((out**2).sum(), [xb, *params])
        outs.append(out.detach())
        gx.append(grads[0])
        for acc, g in zip(gp, grads[1:]):
            acc += g
    return torch.cat(outs, dim=0 if len(grid) == 2 else 1), torch.cat(gx), gp


@pytest.mark.parametrize("gradient", ["adjoint", "direct"])
@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
@pytest.mark.parametrize("grid", [(0.0, 1.0), (0.0, 0.4, 1.0), (1.0, 0.2)])
def test_gradients_match_each_sample_alone(gradient, method, grid):
    torch.manual_seed(0)
    field = mlp_field(3, 8)
    x0 = torch.randn(5, 3, dtype=F64) * torch.tensor([0.1, 1.0, 3.0, 5.0, 8.0], dtype=F64)[:, None]
    block = per_sample_block(field, grid, method=method, gradient=gradient)
    x = x0.clone().requires_grad_(True)
    out = block(x)
    params = list(field.parameters())
    grads = torch.autograd.grad((out**2).sum(), [x, *params])
    want_out, want_gx, want_gp = _separate(field, x0, grid, gradient, method)
    torch.testing.assert_close(out.detach(), want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], want_gx, rtol=1e-9, atol=1e-9)
    for g, w in zip(grads[1:], want_gp):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
    # and each sample alone stepped by torchdiffeq.odeint (the same gradient mode), to solver
    # tolerance (torchdiffeq's backprop also differentiates its step sizes)
    ref_out, ref_gx, ref_gp = _separate(field, x0, grid, gradient, method, "torchdiffeq")
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-8, atol=1e-8)
    tol = 1e-5 if method == "dopri5" else 1e-3
    torch.testing.assert_close(grads[0], ref_gx, rtol=tol, atol=tol)
    for g, w in zip(grads[1:], ref_gp):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_adjoint_with_factors_and_the_grid_gradient():
    """Terminal factors (the second-order backward) and the gradient of the time grid go
    through the per-sample backward solve like the batch one, to solver tolerance."""
    torch.manual_seed(1)
    x0 = torch.randn(4, 3, dtype=F64) * 3
    res = {}
    for control in ("batch", "per_sample"):
        field = mlp_field(3, 8)
        torch.manual_seed(2)
        field.load_state_dict(mlp_field(3, 8).state_dict())
        t = torch.tensor([0.0, 0.7], dtype=F64, requires_grad=True)
        block = no.ODEBlock(field, t, rtol=1e-10, atol=1e-12, backend="own", step_control=control)
        out = block(x0)
        grads = torch.autograd.grad((out**2).sum(), [block.t, *field.parameters()])
        res[control] = grads
    for a, b in zip(res["batch"], res["per_sample"]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_cnf_log_likelihood_and_gradients_match_each_sample_alone():
    from node_ocp.models import CNF

    torch.manual_seed(0)
    scale = torch.tensor([0.2, 0.5, 1.0, 2.0, 3.0, 4.0], dtype=F64)
    x = torch.randn(6, 2, dtype=F64) * scale[:, None]
    kw = dict(hidden=(8,), rtol=1e-8, atol=1e-8, backend="own", kinetic=0.1)
    torch.manual_seed(1)
    flow = CNF(2, step_control="per_sample", **kw).double()
    assert flow.blocks[0].step_control == "per_sample"
    logp = flow.log_prob(x)
    g = torch.autograd.grad(logp.sum(), list(flow.parameters()))
    torch.manual_seed(1)
    ref = CNF(2, **kw).double()
    want = [torch.zeros_like(p) for p in ref.parameters()]
    for b in range(6):
        lb = ref.log_prob(x[b : b + 1])
        torch.testing.assert_close(logp[b : b + 1].detach(), lb.detach(), rtol=1e-9, atol=1e-9)
        for acc, gb in zip(want, torch.autograd.grad(lb.sum(), list(ref.parameters()))):
            acc += gb
    for a, b in zip(g, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_the_capture_sample_grid_is_served():
    """Kronecker curvature capture: the per-sample backward solve passes every sample through
    the capture's sample times; the statistics are those of each sample captured alone."""
    torch.manual_seed(0)
    field = mlp_field(3, 8)
    x0 = torch.randn(4, 3, dtype=F64) * torch.tensor([0.1, 1.0, 4.0, 8.0], dtype=F64)[:, None]
    block = per_sample_block(field, (0.0, 0.5))
    cap = no.CurvatureCapture(sample_dt=0.05)
    with cap.active(block):
        (block(x0) ** 2).sum().backward()
    got = {m: (s.A.clone(), s.B.clone()) for m, s in cap.kronecker.items()}
    alone = no.ODEBlock(field, (0.0, 0.5), rtol=1e-8, atol=1e-10, backend="own")
    cap2 = no.CurvatureCapture(sample_dt=0.05)
    with cap2.active(alone):
        for b in range(4):
            (alone(x0[b : b + 1]) ** 2).sum().backward()
    assert got.keys() == cap2.kronecker.keys() and got
    for m, (a, bb) in got.items():
        torch.testing.assert_close(a, cap2.kronecker[m].A, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(bb, cap2.kronecker[m].B, rtol=1e-9, atol=1e-10)


def test_dense_capture_is_refused():
    block = per_sample_block(mlp_field(), (0.0, 0.5))
    cap = no.CurvatureCapture(kronecker=False, dense=True)
    with cap.active(block), pytest.raises(ValueError, match="step_control.*dense"):
        (block(torch.randn(2, 3, dtype=F64)) ** 2).sum().backward()


class NoBatchedTime(torch.nn.Module):
    def forward(self, t, y):
        return -y


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(step_control="sample"), r"step_control: received 'sample'; accepted: one of "
         r"'batch', 'per_sample'"),
        (dict(method="rk4"), r"^method: received 'rk4'; accepted: one of 'dopri5', 'bosh3' "
         r"with step_control='per_sample' \(fixed-step"),
        (dict(adjoint_method="euler"), r"adjoint_method: received 'euler'"),
        (dict(backend="torchdiffeq"), r"step_control: .*with backend='own'"),
        (dict(gradient="torchdiffeq"), r"step_control: .*gradient 'adjoint' or 'direct'"),
        (dict(adjoint_norm="full"), r"adjoint_norm: received 'full'"),
        (dict(options={"norm": None}), r"options: .*not norm"),
        (dict(field=NoBatchedTime()), r"step_control: .*NoBatchedTime does not set "
         r"accepts_batched_time"),
    ],
)  # fmt: skip
def test_refusals_name_the_argument(kw, match):
    args = dict(field=mlp_field(), backend="own", step_control="per_sample")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        no.ODEBlock(args.pop("field"), **args)


def test_refusals_after_construction():
    block = per_sample_block(mlp_field())
    assert "step_control='per_sample'" in repr(block)
    with pytest.raises(ValueError, match="step_control"):
        block.backend = "torchdiffeq"
    block.gradient = "torchdiffeq"  # as an optimizer table may set it
    with pytest.raises(ValueError, match="step_control"):
        block(torch.randn(2, 3, dtype=F64))
    direct = per_sample_block(
        mlp_field(), torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True), gradient="direct"
    )
    with pytest.raises(ValueError, match="^t: .*step_control='per_sample' and gradient='direct'"):
        direct(torch.randn(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="step_control"):
        make_spec("dopri5", 1e-3, 1e-3, {}, step_control="per_sample")
    with pytest.raises(ValueError, match="adjoint_norm: received 'full'"):
        per_sample_block(mlp_field()).adjoint_norm = "full"


def test_step_control_can_be_switched_on_a_block():
    block = no.ODEBlock(mlp_field(), backend="own")
    block.step_control = "per_sample"
    assert block.solver.step_control == block.adjoint_solver.step_control == "per_sample"
    block.step_control = "batch"
    assert block.step_control == "batch"
    with pytest.raises(ValueError, match="step_control: received 'x'"):
        block.step_control = "x"
    fixed = no.ODEBlock(mlp_field(), method="rk4", backend="own")
    with pytest.raises(ValueError, match="^method: received 'rk4'"):
        fixed.step_control = "per_sample"
    plain = no.ODEBlock(NoBatchedTime(), backend="own")
    with pytest.raises(ValueError, match="accepts_batched_time"):
        plain.step_control = "per_sample"
    assert plain.step_control == "batch"


def test_failures_are_solver_errors():
    class Blowup(torch.nn.Module):
        accepts_batched_time = True

        def forward(self, t, y):
            return y**2

    block = per_sample_block(Blowup(), (0.0, 2.0), name="blow")
    with pytest.raises(no.SolverError, match="blow: in the forward solve"):
        block(torch.tensor([[0.1, 0.1], [3.0, 3.0]], dtype=F64))


def test_config_step_control_reaches_every_block():
    from train_helpers import tiny

    from node_ocp.train import build_task, config_from_dict

    over = {"solver.backend": "own", "solver.step_control": "per_sample"}
    cfg = config_from_dict(tiny(**over))
    blocks = build_task(cfg, torch.device("cpu")).blocks
    assert blocks and all(b.step_control == "per_sample" for b in blocks)
    assert SolverConfig().step_control == "batch"
    with pytest.raises(ConfigError, match=r"\[solver\].step_control: received 'x'"):
        SolverConfig(step_control="x").check("[solver]")
    with pytest.raises(ConfigError, match=r"\[solver\].backend \(with step_control"):
        SolverConfig(step_control="per_sample").check("[solver]")
    with pytest.raises(ConfigError, match=r"\[solver\].method \(with step_control"):
        SolverConfig(step_control="per_sample", backend="own", method="rk4").check("[solver]")
    with pytest.raises(ConfigError, match=r"\[solver\].gradient: received 'torchdiffeq'"):
        SolverConfig(step_control="per_sample", backend="own", gradient="torchdiffeq").check(
            "[solver]"
        )


class FactorCapture:
    """A minimal capture: terminal factors of rank 2, three sample times per interval; keeps
    what the backward solve hands over."""

    kronecker_enabled = True
    dense_enabled = False

    def __init__(self):
        self.records, self.seen = [], []

    def record_call(self, record, x0, out):
        record.output = out  # so that terminal factors can be set on the record
        self.records.append(record)

    def sample_grid(self, t_start, t_end, like):
        frac = (torch.arange(3, dtype=like.dtype) + 0.5) / 3
        return t_start + frac * (t_end - t_start), float(abs(t_end - t_start)) / 3

    def accumulate_kronecker(self, field, times, weight, states, factors):
        self.seen.append((times, states.clone(), factors.clone()))
        return 0

    def accumulate_dense(self, block, names, p):
        raise AssertionError("not enabled")


def test_second_order_factors_go_through_the_per_sample_backward_solve():
    """Terminal factors ``q`` (the second-order backward) with the capture's sample times:
    the states, factors and input factors of the per-sample backward solve are those of the
    batch one, to solver tolerance."""
    torch.manual_seed(3)
    field = mlp_field(3, 8)
    x0 = torch.randn(4, 3, dtype=F64) * torch.tensor([0.1, 1.0, 4.0, 8.0], dtype=F64)[:, None]
    q = torch.randn(2, 3, 4, 3, dtype=F64)
    got = {}
    for control in ("batch", "per_sample"):
        block = no.ODEBlock(
            field, [0.0, 0.3, 0.8], rtol=1e-10, atol=1e-12, backend="own", step_control=control
        )
        cap = FactorCapture()
        block.attach_capture(cap)
        out = block(x0.clone().requires_grad_(True))
        cap.records[0].set_terminal_factors(q)
        grads = torch.autograd.grad((out**2).sum(), list(field.parameters()))
        got[control] = (cap, grads)
    (cb, gb), (cp, gp) = got["batch"], got["per_sample"]
    assert len(cb.seen) == len(cp.seen) == 2
    for (tb, sb, fb), (tp, sp, fp) in zip(cb.seen, cp.seen):
        assert torch.equal(tb, tp)
        assert sp.shape == (3, 4, 3) and fp.shape == (3, 2, 4, 3)
        torch.testing.assert_close(sp, sb, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(fp, fb, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(
        cp.records[0].input_factors, cb.records[0].input_factors, rtol=1e-7, atol=1e-7
    )
    for a, b in zip(gp, gb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gradient", ["adjoint", "direct"])
def test_image_states_keep_their_shape(gradient):
    """A conv field on ``(B, C, H, W)``: each sample (all its channels and pixels) is a row."""
    torch.manual_seed(0)
    field = conv_field(2)
    x0 = torch.randn(3, 2, 4, 4, dtype=F64) * torch.tensor([0.1, 1.0, 5.0], dtype=F64).view(
        3, 1, 1, 1
    )
    block = per_sample_block(field, (0.0, 0.5), gradient=gradient)
    x = x0.clone().requires_grad_(True)
    out = block(x)
    assert out.shape == x0.shape
    grads = torch.autograd.grad((out**2).sum(), [x, *field.parameters()])
    want_out, want_gx, want_gp = _separate(field, x0, (0.0, 0.5), gradient)
    torch.testing.assert_close(out.detach(), want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], want_gx, rtol=1e-9, atol=1e-9)
    for g, w in zip(grads[1:], want_gp):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_float32_matches_each_sample_alone():
    torch.manual_seed(0)
    field = mlp_field(3, 8, dtype=torch.float32)
    x0 = torch.randn(4, 3) * torch.tensor([0.1, 1.0, 4.0, 8.0])[:, None]
    block = per_sample_block(field, (0.0, 1.0), rtol=1e-5, atol=1e-6)
    x = x0.clone().requires_grad_(True)
    out = block(x)
    assert out.dtype == torch.float32
    grads = torch.autograd.grad((out**2).sum(), [x, *field.parameters()])
    alone = no.ODEBlock(field, (0.0, 1.0), rtol=1e-5, atol=1e-6, backend="own")
    for b in range(4):
        xb = x0[b : b + 1].clone().requires_grad_(True)
        ob = alone(xb)
        (gb,) = torch.autograd.grad((ob**2).sum(), [xb])
        torch.testing.assert_close(out[b : b + 1].detach(), ob.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[0][b : b + 1], gb, rtol=1e-4, atol=1e-4)
