"""Second-order factors, dense Gauss–Newton and Kronecker statistics against brute force."""

import math

import pytest
import torch
from conftest import ScalarTimeField, mlp_field
from torch import nn
from torchdiffeq import odeint

import node_ocp as no

TIGHT = dict(rtol=1e-11, atol=1e-11)
F64 = torch.float64


def flow(field, x, t0, t1):
    """x(t1) from x(t0) = x by backprop through rk4 with small fixed steps (error ~1e-12).

    Fixed steps, because backprop through an adaptive solver also differentiates its
    step-size controller, which perturbs the gradient at the 1e-8 level.
    """
    steps = max(1, math.ceil(abs(t1 - t0) / 2e-3))
    grid = torch.tensor([t0, t1], dtype=F64)
    return odeint(field, x, grid, method="rk4", options={"step_size": abs(t1 - t0) / steps})[-1]


# ---------------------------------------------------------------------- factors q_i(t0)
@pytest.mark.parametrize("grid", [[0.0, 0.8], [0.0, 0.3, 0.8], [0.8, 0.5, 0.0]])
def test_factors_at_input_equal_vjp_of_flow_map(grid):
    field = mlp_field()
    block = no.ODEBlock(field, grid, **TIGHT)
    x0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    capture = no.CurvatureCapture(kronecker=False)  # factors only
    with capture.active(block):
        out = block(x0)
        y = torch.randn(2, *out.shape, dtype=F64)
        capture.set_terminal_factors(out, y)
        out.sum().backward()
        q0 = capture.propagated_factors(out)
    assert q0.shape == (2, 4, 3)
    assert capture.kronecker == {} and capture.dense == {}
    direct = no.ODEBlock(field, grid, gradient="direct", **TIGHT)
    for i in range(2):
        ref = torch.autograd.grad((direct(x0) * y[i]).sum(), x0)[0]
        assert torch.allclose(q0[i], ref, rtol=1e-7, atol=1e-9)
    # The adjoint (gradient) is unaffected by the factors.
    ref_grad = torch.autograd.grad(direct(x0).sum(), x0)[0]
    assert torch.allclose(x0.grad, ref_grad, rtol=1e-7, atol=1e-9)


def test_without_factors_the_adjoint_is_the_propagated_factor():
    block = no.ODEBlock(mlp_field(), (0.0, 1.0), **TIGHT)
    x0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    capture = no.CurvatureCapture(kronecker=False)
    with capture.active(block):
        out = block(x0)
        (out**2).sum().backward()
        assert torch.equal(capture.propagated_factors(out)[0], x0.grad)


def test_factors_chain_through_two_blocks():
    f1, f2 = mlp_field(), mlp_field()
    b1, b2 = no.ODEBlock(f1, (0.0, 0.5), **TIGHT), no.ODEBlock(f2, (0.0, 0.5), **TIGHT)
    x0 = torch.randn(3, 3, dtype=F64, requires_grad=True)
    capture = no.CurvatureCapture(kronecker=False)
    with capture.active(nn.Sequential(b1, b2)):
        h = b1(x0)
        out = b2(h)
        assert [r.block for r in capture.records] == [b1, b2]
        y = torch.randn(2, *out.shape, dtype=F64)
        capture.set_terminal_factors(out, y)
        # The consumer hands block 2's input factors to block 1's output before backward
        # reaches it.
        h.register_hook(lambda g: capture.set_terminal_factors(h, capture.propagated_factors(out)))
        out.sum().backward()
        q0 = capture.propagated_factors(h)

    def composed(x):
        return flow(f2, flow(f1, x, 0.0, 0.5), 0.0, 0.5)

    for i in range(2):
        ref = torch.autograd.grad((composed(x0) * y[i]).sum(), x0)[0]
        assert torch.allclose(q0[i], ref, rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------- dense Gauss–Newton
def _jacobian_wrt_params(field, x0, t1):
    """Brute force: J[b, d, :] = ∂x_b(t1)_d / ∂θ through the solver."""
    params = list(field.parameters())
    out = flow(field, x0, 0.0, t1)
    rows = []
    for b in range(out.shape[0]):
        per_b = []
        for d in range(out.shape[1]):
            g = torch.autograd.grad(out[b, d], params, retain_graph=True)
            per_b.append(torch.cat([gi.reshape(-1) for gi in g]))
        rows.append(torch.stack(per_b))
    return torch.stack(rows), out.detach()  # (B, D, P)


@pytest.mark.parametrize("rank", [0, 2])
def test_dense_equals_brute_force_gauss_newton(rank):
    field = mlp_field(dim=2, hidden=3)
    block = no.ODEBlock(field, (0.0, 0.7), adjoint_norm="full", **TIGHT)
    x0 = torch.randn(3, 2, dtype=F64)
    jac, out_ref = _jacobian_wrt_params(field, x0, 0.7)
    capture = no.CurvatureCapture(kronecker=False, dense=True)
    with capture.active(block):
        out = block(x0)
        target = torch.randn_like(out)
        loss = 0.5 * ((out - target) ** 2).sum()
        if rank:
            y = torch.randn(rank, *out.shape, dtype=F64)
            capture.set_terminal_factors(out, y)
        else:
            y = (out - target).detach().unsqueeze(0)  # empirical: ∂ℓ_b/∂x_b
        loss.backward()
    stats = capture.dense[block]
    p_ref = torch.einsum("bdp,rbd->rbp", jac, y)
    assert stats.p.shape == p_ref.shape
    assert torch.allclose(stats.p, p_ref, rtol=1e-7, atol=1e-10)
    gn_ref = torch.einsum("rbp,rbq->pq", p_ref, p_ref)
    assert torch.allclose(stats.gauss_newton(), gn_ref, rtol=1e-7, atol=1e-10)
    # The parameter gradient is still the plain adjoint's.
    grad = torch.cat([p.grad.reshape(-1) for p in field.parameters()])
    assert torch.allclose(grad, torch.einsum("bdp,bd->p", jac, out_ref - target), rtol=1e-7)


# ---------------------------------------------------------------------- Kronecker factors
def _sample_times(t0, t1, dt):
    n = max(1, math.ceil(abs(t1 - t0) / dt - 1e-9))
    return [t1 + (j + 0.5) / n * (t0 - t1) for j in range(n)], abs(t1 - t0) / n


def test_kronecker_linear_matches_hand_computation():
    torch.manual_seed(3)
    l1, l2 = no.ConcatLinear(2, 4), no.ConcatLinear(4, 2)
    field = no.TimeSequential(l1, nn.Tanh(), l2).double()
    t1, dt = 0.5, 0.1
    block = no.ODEBlock(field, (0.0, t1), **TIGHT)
    x0 = torch.randn(3, 2, dtype=F64)
    capture = no.CurvatureCapture(sample_dt=dt)
    with capture.active(block):
        out = block(x0)
        y = torch.randn(2, *out.shape, dtype=F64)
        capture.set_terminal_factors(out, y)
        out.sum().backward()

    W1, b1 = l1.linear.weight, l1.linear.bias
    W2 = l2.linear.weight
    A1 = torch.zeros(4, 4, dtype=F64)
    B1 = torch.zeros(4, 4, dtype=F64)
    A2 = torch.zeros(6, 6, dtype=F64)
    B2 = torch.zeros(2, 2, dtype=F64)
    times, w = _sample_times(0.0, t1, dt)
    assert len(times) == 5
    for tj in times:
        xj = flow(field, x0, 0.0, tj).detach().requires_grad_(True)
        xe = flow(field, xj, tj, t1)
        with torch.no_grad():
            ones = torch.ones(3, 1, dtype=F64)
            u1 = torch.cat([xj, tj * ones], 1)
            h = torch.tanh(u1 @ W1.T + b1)
            u2 = torch.cat([h, tj * ones], 1)
            A1 += w * torch.cat([u1, ones], 1).T @ torch.cat([u1, ones], 1)
            A2 += w * torch.cat([u2, ones], 1).T @ torch.cat([u2, ones], 1)
        for i in range(2):
            qi = torch.autograd.grad((xe * y[i]).sum(), xj, retain_graph=True)[0]
            g2 = qi  # f = o2
            g1 = (qi @ W2[:, :4].detach()) * (1 - h**2)
            B2 += w * g2.T @ g2
            B1 += w * g1.T @ g1
    k1, k2 = capture.kronecker[l1.linear], capture.kronecker[l2.linear]
    for got, ref in [(k1.A, A1), (k1.B, B1), (k2.A, A2), (k2.B, B2)]:
        assert torch.allclose(got, ref, rtol=1e-7, atol=1e-10)
    assert k1.samples == 3 and k1.rank == 2 and k1.solves == 1
    assert abs(k1.time - t1) < 1e-12


def _patches(x, k=3, pad=1):
    """Independent patch extraction by loops: (B, C, H, W) -> (B, H*W, C*k*k) (stride 1)."""
    b, c, hgt, wid = x.shape
    xp = torch.zeros(b, c, hgt + 2 * pad, wid + 2 * pad, dtype=x.dtype)
    xp[:, :, pad : pad + hgt, pad : pad + wid] = x
    rows = []
    for i in range(hgt):
        for j in range(wid):
            rows.append(xp[:, :, i : i + k, j : j + k].reshape(b, -1))
    return torch.stack(rows, 1)


def test_kronecker_conv_matches_hand_computation():
    torch.manual_seed(4)
    layer = no.ConcatConv2d(2, 2, 3, padding=1)
    field = no.TimeSequential(layer).double()
    t1, dt = 0.3, 0.1
    block = no.ODEBlock(field, (0.0, t1), **TIGHT)
    x0 = torch.randn(2, 2, 3, 3, dtype=F64)
    capture = no.CurvatureCapture(sample_dt=dt)
    with capture.active(block):
        out = block(x0)
        (out**2).sum().backward()  # empirical source: q = a
    A = torch.zeros(28, 28, dtype=F64)
    B = torch.zeros(2, 2, dtype=F64)
    times, w = _sample_times(0.0, t1, dt)
    for tj in times:
        xj = flow(field, x0, 0.0, tj).detach().requires_grad_(True)
        xe = flow(field, xj, tj, t1)
        a = torch.autograd.grad((xe**2).sum(), xj)[0]
        with torch.no_grad():
            u = torch.cat([xj, torch.full((2, 1, 3, 3), tj, dtype=F64)], 1)
            rows = _patches(u).reshape(-1, 27)
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=F64)], 1)
            A += w * rows.T @ rows
            g = a.permute(0, 2, 3, 1).reshape(-1, 2)
            B += w * g.T @ g
    k = capture.kronecker[layer.conv]
    assert torch.allclose(k.A, A, rtol=1e-7, atol=1e-10)
    assert torch.allclose(k.B, B, rtol=1e-7, atol=1e-10)
    assert k.rows == 2 * 9


def test_consecutive_intervals_all_contribute():
    """One block called on 2 consecutive intervals with a non-linear update in between:
    A and B equal the hand sums over both intervals' sample grids (empirical source)."""
    torch.manual_seed(5)
    layer = no.ConcatLinear(2, 2)
    field = no.TimeSequential(layer).double()
    block = no.ODEBlock(field, (0.0, 1.0), **TIGHT)
    x0 = torch.randn(3, 2, dtype=F64)
    edges = [(0.0, 0.2), (0.2, 0.5)]
    dt = 0.1

    def update(h):  # stands in for a GRU update at an observation
        return torch.tanh(1.5 * h)

    def run(x, start):  # the whole pipeline from interval `start` on; returns the loss
        loss = 0.0
        for k in range(start, len(edges)):
            x = flow(field, x, *edges[k])
            loss = loss + (x**2).sum()
            x = update(x)
        return loss

    capture = no.CurvatureCapture(sample_dt=dt)
    with capture.active(block):
        x, loss = x0, 0.0
        for ta, tb in edges:
            x = block(x, (ta, tb))
            loss = loss + (x**2).sum()
            x = update(x)
        loss.backward()

    A = torch.zeros(4, 4, dtype=F64)
    B = torch.zeros(2, 2, dtype=F64)
    x_start = x0
    for k, (ta, tb) in enumerate(edges):
        times, w = _sample_times(ta, tb, dt)
        for tj in times:
            xj = flow(field, x_start, ta, tj).detach().requires_grad_(True)
            rest = (flow(field, xj, tj, tb) ** 2).sum()
            xe = update(flow(field, xj, tj, tb))
            total = rest + (run(xe, k + 1) if k + 1 < len(edges) else 0.0)
            a = torch.autograd.grad(total, xj)[0]
            u = torch.cat(
                [xj.detach(), torch.full((3, 1), tj, dtype=F64), torch.ones(3, 1, dtype=F64)], 1
            )
            A += w * u.T @ u
            B += w * a.T @ a
        x_start = update(flow(field, x_start, ta, tb)).detach()
    k = capture.kronecker[layer.linear]
    assert k.solves == 2 and k.samples == 6 and len(_sample_times(0.0, 0.2, dt)[0]) == 2
    assert torch.allclose(k.A, A, rtol=1e-7, atol=1e-10)
    assert torch.allclose(k.B, B, rtol=1e-7, atol=1e-10)


def test_batched_time_chunked_and_scalar_paths_agree():
    field = mlp_field()
    x0 = torch.randn(4, 3, dtype=F64)
    results = []
    for f, chunk in [(field, None), (field, 12), (ScalarTimeField(field), None)]:
        block = no.ODEBlock(f, (0.0, 0.5), **TIGHT)
        capture = no.CurvatureCapture(sample_dt=0.05, max_rows=chunk)
        with capture.active(block):
            (block(x0) ** 2).sum().backward()
        results.append([(s.A, s.B) for s in capture.kronecker.values()])
        expected_calls = {None: 1, 12: 4}[chunk] if f is field else 10
        assert block.nfe_capture == expected_calls
    for other in results[1:]:
        for (a1, b1), (a2, b2) in zip(results[0], other):
            assert torch.allclose(a1, a2, rtol=1e-10) and torch.allclose(b1, b2, rtol=1e-10)


def test_statistics_accumulate_until_reset_and_capture_off_costs_nothing_extra():
    field = mlp_field()
    x0 = torch.randn(4, 3, dtype=F64)
    block = no.ODEBlock(field, (0.0, 0.5), rtol=1e-6, atol=1e-6)
    (block(x0) ** 2).sum().backward()
    plain = block.nfe_backward
    capture = no.CurvatureCapture(sample_dt=0.05)
    with capture.active(block):
        block.reset_nfe()
        (block(x0) ** 2).sum().backward()
        first = {m: s.A.clone() for m, s in capture.kronecker.items()}
        # The sample grid must not make the adaptive solver take more steps.
        assert block.nfe_backward == plain
        (block(x0) ** 2).sum().backward()
    for m, s in capture.kronecker.items():
        assert torch.allclose(s.A, 2 * first[m]) and s.solves == 2
    capture.reset()
    assert not capture.kronecker
    block.reset_nfe()
    (block(x0) ** 2).sum().backward()  # detached: no statistics
    assert not capture.kronecker and block.nfe_capture == 0 and block.nfe_backward == plain
