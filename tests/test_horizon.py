"""HorizonOptimizer (t1 as a control) against its closed-form updates."""

import pytest
import torch
from conftest import mlp_field
from torch import nn

import node_ocp as no

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


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


def test_load_state_dict_refuses_another_model_s_snapshots():
    def controller(width):
        field = mlp_field(2, width)
        block = no.ODEBlock(field, (0.0, 1.0))
        return no.HorizonOptimizer(block, field.parameters(), lr=0.1, penalty=0.01)

    saved = controller(8).state_dict()
    with pytest.raises(ValueError) as err:
        controller(16).load_state_dict(saved)
    text = str(err.value)
    assert text.startswith("state_dict: received") and "parameter #0" in text
    first = tuple(next(mlp_field(2, 16).parameters()).shape)
    assert f"accepted: shape {first}" in text
    controller(8).load_state_dict(saved)  # the same model loads


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_horizon_converges_to_the_analytic_optimum_of_the_linear_problem(beta):
    """dx/dt = a x with a fixed, J(t1) = ½ x(t1)² + (λ/2) t1²: J'(t*) = a x0² e^{2a t*} + λ t*
    = 0, found by bisection; the controller (averages of memory beta) settles there."""
    a, x0v, lam = -0.8, 1.5, 0.1

    def dj(t):
        return a * x0v**2 * torch.exp(torch.tensor(2 * a * t, dtype=F64)).item() + lam * t

    lo, hi = 0.0, 5.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dj(mid) < 0 else (lo, mid)
    t_star = (lo + hi) / 2

    class Linear1(nn.Module):
        def forward(self, t, x):
            return a * x

    block = no.ODEBlock(Linear1(), (0.0, 1.0), rtol=1e-8, atol=1e-8)
    horizon = no.HorizonOptimizer(block, mode="open_loop", lr=0.5, penalty=lam, beta=beta)
    x0 = torch.tensor([[x0v]], dtype=F64)
    for _ in range(40 if beta == 0 else 240):  # the averages' memory slows it down
        (0.5 * block(x0) ** 2).sum().backward()
        horizon.step()
    assert horizon.t1 == pytest.approx(t_star, abs=2e-4)
    assert abs(dj(horizon.t1)) < 2e-4 and 1.0 < t_star < 2.5
