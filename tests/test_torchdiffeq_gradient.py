"""gradient="torchdiffeq": torchdiffeq.odeint_adjoint behind an ODEBlock, against the
own adjoint and backprop through the solver (float64), and its evaluation counters."""

import pytest
import torch
from conftest import conv_field, mlp_field

import node_ocp as no

CASES = {
    # method: (options, rtol/atol of the solves, tolerance of the comparison)
    "dopri5": (None, 1e-11, 1e-7),
    "rk4": ({"step_size": 0.01}, 1e-11, 1e-9),
}


def _grads(block, x0, t, params, need_t=False):
    x0 = x0.clone().requires_grad_(True)
    t = t.clone().requires_grad_(need_t)
    out = block(x0, t)
    torch.manual_seed(1)
    weights = torch.randn_like(out)
    loss = (weights * out).sum() + 0.5 * (out**2).sum()
    wrt = [x0, *params] + ([t] if need_t else [])
    return torch.autograd.grad(loss, wrt)


def _blocks(field, t, method):
    options, tol, _ = CASES[method]
    kw = dict(method=method, rtol=tol, atol=tol, options=options)
    return {g: no.ODEBlock(field, t, gradient=g, **kw) for g in no.ode.block.GRADIENT_MODES}


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("field_kind", ["mlp", "conv"])
@pytest.mark.parametrize("grid", [[0.0, 0.7], [0.0, 0.2, 0.45, 0.7], [0.7, 0.3, 0.0]])
def test_gradients_equal_direct_and_own_adjoint(method, field_kind, grid):
    if field_kind == "mlp":
        field, x0 = mlp_field(), torch.randn(4, 3, dtype=torch.float64)
    else:
        field, x0 = conv_field(), torch.randn(2, 2, 4, 4, dtype=torch.float64)
    params = list(field.parameters())
    t = torch.tensor(grid, dtype=torch.float64)
    blocks = _blocks(field, t, method)
    got = _grads(blocks["torchdiffeq"], x0, t, params)
    tol = CASES[method][2]
    for ref in ("direct", "adjoint"):
        want = _grads(blocks[ref], x0, t, params)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    with torch.no_grad():
        out = blocks["torchdiffeq"](x0, t)
    assert out.shape == ((len(grid), *x0.shape) if len(grid) > 2 else x0.shape)


def test_time_gradients_equal_own_adjoint():
    field, x0 = mlp_field(), torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.7], dtype=torch.float64)
    blocks = _blocks(field, t, "dopri5")
    got = _grads(blocks["torchdiffeq"], x0, t, list(field.parameters()), need_t=True)
    want = _grads(blocks["adjoint"], x0, t, list(field.parameters()), need_t=True)
    # dL/dt0: torchdiffeq integrates a·∂f/∂t, the own adjoint takes -a(t0)·f(t0, x0).
    torch.testing.assert_close(got[-1], want[-1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", list(CASES))
def test_counters_grow_in_both_phases_like_the_own_adjoint(method):
    field = mlp_field()
    x0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    blocks = _blocks(field, torch.tensor([0.0, 0.7], dtype=torch.float64), method)
    counts = {}
    for mode in ("torchdiffeq", "adjoint"):
        block = blocks[mode]
        out = block(x0)
        forward = block.nfe_forward
        assert forward > 0 and block.nfe_backward == 0
        (out**2).sum().backward()
        assert block.nfe_forward == forward and block.nfe_backward > 0
        counts[mode] = (block.nfe_forward, block.nfe_backward)
    # the same error norm over the same augmented state: the same steps in both phases
    assert counts["torchdiffeq"] == counts["adjoint"]
    if method == "rk4":  # 4 evaluations per step of 0.01
        assert counts["adjoint"] == (4 * 70, 4 * 70)


def test_two_calls_before_one_backward_are_counted_apart():
    field = mlp_field()
    block = no.ODEBlock(field, (0.0, 0.5), method="rk4", options={"step_size": 0.1})
    block.gradient = "torchdiffeq"
    x0 = torch.randn(4, 3, dtype=torch.float64)
    loss = block(x0).sum() + block(x0 + 1).sum()
    assert (block.nfe_forward, block.nfe_backward) == (40, 0)
    loss.backward()
    assert (block.nfe_forward, block.nfe_backward) == (40, 40)


def test_capture_is_refused_and_bad_fields_are_named():
    block = no.ODEBlock(mlp_field(), (0.0, 1.0), gradient="torchdiffeq")
    with pytest.raises(ValueError, match="gradient.*'adjoint' for curvature capture"):
        block.attach_capture(object())

    class Wrong(torch.nn.Module):
        def forward(self, t, x):
            return x[:, :1]

    bad = no.ODEBlock(Wrong(), (0.0, 1.0), gradient="torchdiffeq", name="wrong block")
    with pytest.raises(ValueError, match="field of wrong block.*shape"):
        bad(torch.randn(2, 3))
