"""The own Runge–Kutta loop (node_ocp.ode.rk, ``backend="own"``) against exact solutions and
against torchdiffeq, the reference: trajectories, steps and NFE, the own adjoint's and
backprop's gradients, the curvature capture's sample grid, the backend switch."""

import math

import pytest
import torch
import torchdiffeq
from conftest import mlp_field

import node_ocp as no
from node_ocp.ode import rk
from node_ocp.ode.solvers import make_spec
from node_ocp.train.config import ConfigError, SolverConfig

F64 = torch.float64
OWN = ("dopri5", "bosh3", "rk4")


class Linear(torch.nn.Module):
    """``dy/dt = A y`` for rows ``y`` ``(B, D)``: ``y(t) = y0 exp(A (t - t0))ᵀ``."""

    def __init__(self, dtype):
        super().__init__()
        a = torch.tensor([[-0.5, 1.0, 0.0], [-1.0, -0.5, 0.3], [0.0, -0.3, -0.2]], dtype=F64)
        self.register_buffer("a", a.to(dtype))
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return y @ self.a.T

    def exact(self, y0, t):
        a = self.a.double()
        return torch.stack([y0 @ torch.linalg.matrix_exp(a * (s - t[0])).T for s in t])


class Sine(torch.nn.Module):
    """``dy/dt = cos(t)``: ``y(t) = y0 + sin(t) - sin(t0)`` (a field of time alone)."""

    calls = 0

    def forward(self, t, y):
        self.calls += 1
        return torch.cos(t).expand_as(y).to(y.dtype)

    def exact(self, y0, t):
        return torch.stack([y0 + math.sin(s) - math.sin(float(t[0])) for s in t])


class Decay(torch.nn.Module):
    """``dy/dt = -k y`` with a rate per column: ``y(t) = y0 exp(-k (t - t0))``."""

    def __init__(self, dtype):
        super().__init__()
        self.register_buffer("k", torch.tensor([0.3, 1.0, 2.5], dtype=dtype))
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return -self.k * y

    def exact(self, y0, t):
        return torch.stack([y0 * torch.exp(-self.k.double() * (s - float(t[0]))) for s in t])


PROBLEMS = {"linear": Linear, "sine": lambda dtype: Sine(), "decay": Decay}
#: settings per method and dtype, and the tolerance of the exact solution at those settings
SETTINGS = {
    ("dopri5", F64): (dict(rtol=1e-9, atol=1e-11), 1e-7),
    ("bosh3", F64): (dict(rtol=1e-8, atol=1e-10), 2e-5),
    ("rk4", F64): (dict(options={"step_size": 0.01}), 1e-7),
    ("dopri5", torch.float32): (dict(rtol=1e-5, atol=1e-6), 1e-4),
    ("bosh3", torch.float32): (dict(rtol=1e-5, atol=1e-6), 2e-3),  # its dense output
    ("rk4", torch.float32): (dict(options={"step_size": 0.05}), 1e-5),
}
GRIDS = {"increasing": [0.0, 0.3, 0.35, 1.2, 2.0], "decreasing": [1.5, 0.9, 0.1, -0.4]}


def _solve(solver, func, y0, t, method, kw):
    func.calls = 0
    with torch.no_grad():
        ys = solver(func, y0, t, method=method, **kw)
    return ys, func.calls


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("method", OWN)
def test_trajectory_matches_the_exact_solution_and_torchdiffeq(method, problem, grid, dtype):
    kw, tol = SETTINGS[(method, dtype)]
    func = PROBLEMS[problem](dtype)
    y0 = torch.tensor([[1.0, -0.5, 0.25], [0.3, 0.7, -1.2]], dtype=dtype)
    t = torch.tensor(GRIDS[grid], dtype=dtype)
    stats = rk.SolveStats()
    own, nfe_own = _solve(rk.odeint, func, y0, t, method, dict(kw, stats=stats))
    ref, nfe_ref = _solve(torchdiffeq.odeint, func, y0, t, method, kw)
    assert own.shape == ref.shape == (len(t), *y0.shape) and own.dtype == dtype
    # the same steps as torchdiffeq (NFE), values equal to rounding
    assert nfe_own == nfe_ref == stats.nfe
    close = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(own, ref, rtol=close, atol=close)
    assert torch.equal(own[0], y0)
    exact = func.exact(y0.double(), t.double().tolist()).to(dtype)
    torch.testing.assert_close(own, exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_adaptive_nfe_is_two_plus_stages_per_attempt_and_syncs_are_counted(method):
    func = Linear(F64)
    y0 = torch.randn(4, 3, dtype=F64)
    stats = rk.SolveStats()
    t = torch.tensor([0.0, 3.0], dtype=F64)
    rk.odeint(func, y0, t, method=method, rtol=1e-6, atol=1e-8, stats=stats)
    per_step = {"dopri5": 6, "bosh3": 3}[method]
    attempts = stats.accepted + stats.rejected
    assert stats.nfe == func.calls == 2 + per_step * attempts
    # the output grid, the initial step, one per step attempt (tests/test_host_syncs.py)
    assert stats.host_syncs == 1 + 1 + attempts


def test_rejected_steps_are_taken_like_torchdiffeqs():
    func = Decay(F64)
    y0 = torch.ones(2, 3, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    kw = dict(rtol=1e-7, atol=1e-9, options={"first_step": 1.0})
    stats = rk.SolveStats()
    own, nfe_own = _solve(rk.odeint, func, y0, t, "dopri5", {**kw, "stats": stats})
    ref, nfe_ref = _solve(torchdiffeq.odeint, func, y0, t, "dopri5", kw)
    assert stats.rejected > 0 and nfe_own == nfe_ref
    torch.testing.assert_close(own, ref, rtol=1e-13, atol=1e-13)


def test_rk4_is_torchdiffeqs_three_eighths_rule_on_its_grids():
    func = Linear(F64)
    y0 = torch.randn(2, 3, dtype=F64)
    t = torch.tensor([0.0, 0.25, 0.7], dtype=F64)
    for options in [{}, {"step_size": 0.1}, {"step_size": 0.3}]:
        own, n_own = _solve(rk.odeint, func, y0, t, "rk4", dict(options=options))
        ref, n_ref = _solve(torchdiffeq.odeint, func, y0, t, "rk4", dict(options=options))
        assert n_own == n_ref
        torch.testing.assert_close(own, ref, rtol=1e-14, atol=1e-14)
    # one step of the 3/8 rule by hand
    a = func.a
    k1 = y0 @ a.T
    k2 = (y0 + k1 / 3) @ a.T
    k3 = (y0 + (k2 - k1 / 3)) @ a.T
    k4 = (y0 + (k1 - k2 + k3)) @ a.T
    one, _ = _solve(rk.odeint, func, y0, torch.tensor([0.0, 1.0], dtype=F64), "rk4", {})
    torch.testing.assert_close(one[1], y0 + (k1 + 3 * k2 + 3 * k3 + k4) / 8, rtol=1e-15, atol=0)


@pytest.mark.parametrize("method", OWN)
def test_extra_output_times_do_not_change_the_steps(method):
    """The curvature capture asks for sample times inside each interval (keep_grid=True)."""
    spec = make_spec(method, 1e-6, 1e-8, {"step_size": 0.1} if method == "rk4" else {})
    spec = make_spec(method, 1e-6, 1e-8, spec.options, backend="own")
    func = Linear(F64)
    y0 = torch.randn(3, 3, dtype=F64)
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    dense = torch.cat([ends[:1], torch.linspace(0.013, 0.987, 37, dtype=F64), ends[1:]])
    with torch.no_grad():
        func.calls = 0
        two = spec.integrate(func, y0, ends, keep_grid=True)
        n_two = func.calls
        func.calls = 0
        many = spec.integrate(func, y0, dense, keep_grid=True)
        n_many = func.calls
        options = spec.odeint_options(keep_grid=True)
        ref = torchdiffeq.odeint(func, y0, dense, method=method, rtol=1e-6, atol=1e-8,
                                 options=options)  # fmt: skip
    assert n_many == n_two
    assert torch.equal(many[-1], two[-1])  # the same steps: the same end state, bit for bit
    # torchdiffeq's dense output (dopri5, bosh3: its quartic; rk4: linear between steps)
    torch.testing.assert_close(many, ref, rtol=1e-12, atol=1e-12)
    exact = func.exact(y0, dense.tolist())
    tol = {"dopri5": 1e-5, "bosh3": 1e-3, "rk4": 1e-2}[method]
    torch.testing.assert_close(many, exact, rtol=tol, atol=tol)


def _grads(block, x0):
    out = block(x0)
    loss = (out**2).sum() + out.sum()
    return torch.autograd.grad(loss, [x0, *block.field.parameters()])


def _backprop_through_torchdiffeq(field, x0, horizon, method, kw):
    out = torchdiffeq.odeint(field, x0, torch.tensor([0.0, horizon], dtype=x0.dtype), **kw)
    loss = (out[-1] ** 2).sum() + out[-1].sum()
    return torch.autograd.grad(loss, [x0, *field.parameters()])


GRAD_SETTINGS = {
    "dopri5": (dict(rtol=1e-11, atol=1e-12), 1e-7),
    "bosh3": (dict(rtol=1e-9, atol=1e-10), 2e-4),
    "rk4": (dict(options={"step_size": 0.005}), 1e-8),
}


@pytest.mark.parametrize("method", OWN)
def test_own_adjoint_over_the_own_loop_gives_backprops_gradients(method):
    kw, tol = GRAD_SETTINGS[method]
    torch.manual_seed(0)
    field = mlp_field()
    x0 = torch.randn(5, 3, dtype=F64, requires_grad=True)
    want = _backprop_through_torchdiffeq(field, x0, 0.6, method, dict(method=method, **kw))
    own = no.ODEBlock(field, (0.0, 0.6), method=method, backend="own", **kw)
    ref = no.ODEBlock(field, (0.0, 0.6), method=method, **kw)
    got, same = _grads(own, x0), _grads(ref, x0)
    for g, w, s in zip(got, want, same):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
        torch.testing.assert_close(g, s, rtol=1e-10, atol=1e-12)  # the same steps
    assert (own.nfe_forward, own.nfe_backward) == (ref.nfe_forward, ref.nfe_backward)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", OWN)
def test_every_gradient_mode_works_with_the_own_loop(method, dtype):
    torch.manual_seed(1)
    field = mlp_field(dtype=dtype)
    x0 = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    # a given first step: torchdiffeq's backprop also differentiates its initial-step
    # selection (the first step size depends on x0 and θ); the own loop holds the steps
    # fixed. With the first step given, both are the derivative of the same computation.
    options = {"step_size": 0.05} if method == "rk4" else {"first_step": 0.05}
    kw = dict(rtol=1e-6, atol=1e-7, options=options)
    grid = torch.tensor([0.0, 0.2, 0.5, 0.8], dtype=dtype)
    tol = 1e-11 if dtype == F64 else 1e-4
    for gradient in ("adjoint", "direct", "torchdiffeq"):
        res = {}
        for backend in ("torchdiffeq", "own"):
            block = no.ODEBlock(
                field, grid, method=method, gradient=gradient, backend=backend, **kw
            )
            ys = block(x0)
            res[backend] = (ys.detach(), _grads(block, x0), block.nfe_forward, block.nfe_backward)
        (ys_t, g_t, *n_t), (ys_o, g_o, *n_o) = res["torchdiffeq"], res["own"]
        assert n_t == n_o, gradient
        same = 1e-12 if dtype == F64 else 1e-5
        torch.testing.assert_close(ys_o, ys_t, rtol=same, atol=same)
        for a, b in zip(g_o, g_t):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_the_own_loop_serves_the_capture_without_extra_steps():
    field = mlp_field()
    x0 = torch.randn(4, 3, dtype=F64)
    block = no.ODEBlock(field, (0.0, 0.5), rtol=1e-6, atol=1e-6, backend="own")
    (block(x0) ** 2).sum().backward()
    plain = block.nfe_backward
    ref_block = no.ODEBlock(field, (0.0, 0.5), rtol=1e-6, atol=1e-6)
    stats = []
    for b in (block, ref_block):
        capture = no.CurvatureCapture(sample_dt=0.05)
        with capture.active(b):
            b.reset_nfe()
            (b(x0) ** 2).sum().backward()
        stats.append(({m: (s.A, s.B) for m, s in capture.kronecker.items()}, b.nfe_backward))
    assert stats[0][1] == stats[1][1] == plain
    for (a1, b1), (a2, b2) in zip(stats[0][0].values(), stats[1][0].values()):
        torch.testing.assert_close(a1, a2, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(b1, b2, rtol=1e-6, atol=1e-10)


def test_a_solve_nested_in_the_field_gets_its_own_buffers():
    inner_spec = make_spec("dopri5", 1e-8, 1e-10, {}, backend="own")

    class Nested(torch.nn.Module):
        def forward(self, t, y):  # y' = -y through an inner solve of y' = -y over [0, h]
            h = torch.tensor([0.0, 1e-3], dtype=y.dtype)
            inner = inner_spec.integrate(lambda s, z: -z, y, h)[-1]
            return (inner - y) / 1e-3

    y0 = torch.randn(2, 3, dtype=F64)
    t = torch.tensor([0.0, 0.5], dtype=F64)
    with torch.no_grad():
        own = rk.odeint(Nested(), y0, t, method="dopri5", rtol=1e-7, atol=1e-9)
        ref = torchdiffeq.odeint(Nested(), y0, t, method="dopri5", rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(own, ref, rtol=1e-9, atol=1e-9)


def test_other_methods_and_options_stay_torchdiffeqs():
    y0 = torch.randn(2, 3, dtype=F64)
    t = torch.tensor([0.0, 0.5], dtype=F64)
    assert rk.supports("dopri5", {"norm": None, "first_step": 0.1}, y0, t)
    assert not rk.supports("euler", {}, y0, t)
    assert not rk.supports("dopri5", {"step_t": t}, y0, t)
    assert not rk.supports("rk4", {"interp": "cubic"}, y0, t)
    assert not rk.supports("rk4", {}, y0.half(), t)
    func = Linear(F64)
    for method, options in [("euler", {}), ("dopri5", {"step_t": torch.tensor([0.25])})]:
        spec = make_spec(method, 1e-6, 1e-8, options, backend="own")
        assert not spec.uses_own_loop(y0, t, spec.odeint_options())
        with torch.no_grad():
            got = spec.integrate(func, y0, t)
            want = torchdiffeq.odeint(func, y0, t, method=method, rtol=1e-6, atol=1e-8,
                                      options=options)  # fmt: skip
        assert torch.equal(got, want)


def test_a_bad_backend_is_named_with_the_accepted_values():
    with pytest.raises(ValueError, match=r"backend: received 'fast'; accepted: one of "
                       r"'torchdiffeq', 'own'"):  # fmt: skip
        no.ODEBlock(mlp_field(), backend="fast")
    block = no.ODEBlock(mlp_field())
    with pytest.raises(ValueError, match="backend: received 3"):
        block.backend = 3
    block.backend = "own"
    assert block.solver.backend == block.adjoint_solver.backend == "own"
    assert "backend='own'" in repr(block)
    with pytest.raises(ConfigError, match=r"\[solver\].backend: received 'fast'"):
        SolverConfig(backend="fast").check("[solver]")
    assert SolverConfig().backend == "torchdiffeq"


def test_failures_of_the_own_loop_are_solver_errors():
    class Blowup(torch.nn.Module):
        def forward(self, t, y):
            return y**2

    block = no.ODEBlock(Blowup(), (0.0, 2.0), backend="own", name="blow")
    with pytest.raises(no.SolverError, match="blow: in the forward solve"):
        block(torch.full((2, 2), 3.0, dtype=F64))

    class NanLater(torch.nn.Module):
        def forward(self, t, y):
            return -y if t < 0.5 else y * float("nan")

    nan_block = no.ODEBlock(NanLater(), (0.0, 1.0), backend="own", name="nan")
    with pytest.raises(no.SolverError, match="nan: in the forward solve.*non-finite"):
        nan_block(torch.ones(2, 2, dtype=F64))


def test_solver_backend_of_a_config_reaches_every_block_and_trains_alike(tmp_path):
    """``[solver].backend = "own"``: every block of the model steps through the own loop, and
    OCNOpt (own adjoint, curvature capture on its refresh steps) trains as with torchdiffeq."""
    from train_helpers import tiny

    from node_ocp.train import RunOptions, build_task, config_from_dict, read_metrics, train

    losses = {}
    for backend in ("torchdiffeq", "own"):
        cfg = config_from_dict(tiny(**{"solver.backend": backend, "train.steps": 6}))
        blocks = build_task(cfg, torch.device("cpu")).blocks
        assert blocks and all(b.backend == backend for b in blocks)
        train(cfg, tmp_path / backend, RunOptions(progress=False))
        rows = read_metrics(tmp_path / backend)
        losses[backend] = [(r["train_loss"], r["val_nll"], r["nfe_forward"]) for r in rows[1:]]
    assert len(losses["own"]) == len(losses["torchdiffeq"]) == 2
    for own, ref in zip(losses["own"], losses["torchdiffeq"]):
        assert own[2] == ref[2]  # the same steps
        assert own[:2] == pytest.approx(ref[:2], rel=1e-4)


def test_every_model_takes_the_backend():
    """The models build their blocks with the backend they are given (``[solver].backend``
    reaches them through ``solver_settings``); an image CNF gives the same log-likelihood
    and gradients on both backends."""
    from node_ocp.models import ImageCNF

    x = torch.randint(0, 17, (3, 1, 4, 4)).double() / 16
    noise = torch.rand(3, 1, 4, 4, dtype=F64)
    out = {}
    for backend in ("torchdiffeq", "own"):
        torch.manual_seed(0)
        flow = ImageCNF((1, 4, 4), 17, hidden=(4,), scales=2, backend=backend, rtol=1e-7,
                        atol=1e-7).double()  # fmt: skip
        assert all(b.backend == backend for b in flow.blocks)
        logp = flow.log_prob(x, noise)
        out[backend] = (logp.detach(), torch.autograd.grad(logp.sum(), list(flow.parameters())))
    torch.testing.assert_close(out["own"][0], out["torchdiffeq"][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(out["own"][1], out["torchdiffeq"][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
