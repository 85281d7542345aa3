"""CNF: divergences against brute force, closed-form flow, normalisation, round trips."""

import copy
import math

import pytest
import torch
from conftest import ocnopt_step
from torch import nn

import node_ocp as no
from node_ocp.data import TOYS, toy_2d
from node_ocp.models import CNF, CNFDynamics, standard_normal_logprob, time_mlp
from node_ocp.ode.solvers import make_spec

F64 = torch.float64


def _field(dim=3):
    torch.manual_seed(0)
    return time_mlp(dim, (8,), "tanh").double()


def test_exact_divergence_equals_jacobian_trace():
    net = _field()
    dyn = CNFDynamics(net, 3, "exact")
    z = torch.randn(5, 3, dtype=F64)
    t = torch.tensor(0.3, dtype=F64)
    out = dyn(t, torch.cat([z, torch.zeros(5, 1, dtype=F64)], 1))
    for b in range(5):
        jac = torch.autograd.functional.jacobian(lambda v: net(t, v[None])[0], z[b])
        assert torch.allclose(-out[b, 3], jac.trace(), atol=1e-12)
    assert torch.allclose(out[:, :3], net(t, z))


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    net = _field()
    dyn = CNFDynamics(net, 3, "hutchinson")
    z = torch.randn(1, 3, dtype=F64)
    t = torch.tensor(0.3, dtype=F64)
    m = 20000
    g = torch.Generator().manual_seed(0)
    if probe == "rademacher":
        e = torch.randint(0, 2, (m, 3), generator=g).to(F64) * 2 - 1
    else:
        e = torch.randn(m, 3, generator=g, dtype=F64)
    dyn.probe = e
    est = -dyn(t, torch.cat([z.expand(m, 3), torch.zeros(m, 1, dtype=F64)], 1))[:, 3]
    exact = torch.autograd.functional.jacobian(lambda v: net(t, v[None])[0], z[0]).trace()
    se = est.std() / math.sqrt(m)
    assert abs(est.mean() - exact) < 4 * se
    assert est.std() > 0  # it is an estimate, not the trace itself


class LinearNet(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, t, z):
        return z @ self.a.T


def test_log_prob_matches_change_of_variables_on_a_linear_field():
    a = torch.tensor([[-0.5, 0.3], [0.1, 0.2]], dtype=F64)
    flow = CNF(2, horizon=0.8, rtol=1e-10, atol=1e-10).double()
    flow.blocks[0].field.net = LinearNet(a)
    x = torch.randn(6, 2, dtype=F64)
    z_expected = x @ torch.linalg.matrix_exp(0.8 * a).T
    expected = standard_normal_logprob(z_expected) + 0.8 * torch.trace(a)
    z, dlogp, _ = flow(x)
    assert torch.allclose(z, z_expected, atol=1e-8)
    assert torch.allclose(flow.log_prob(x), expected, atol=1e-8)
    assert torch.allclose(dlogp, -0.8 * torch.trace(a).expand(6), atol=1e-8)


@pytest.fixture(scope="module")
def trained_flow():
    torch.manual_seed(0)
    x = toy_2d("8gaussians", 2048, seed=0, dtype=F64)
    flow = CNF(2, hidden=(16, 16), rtol=1e-5, atol=1e-5).double()
    opt = no.OCNOpt(flow, update_every=10)
    for i in range(25):
        batch = x[(i * 128) % 2048 :][:128]

        def compute(batch=batch):
            z, dlogp, _ = flow(batch)
            return -(standard_normal_logprob(z) - dlogp).mean(), z

        ocnopt_step(opt, compute, "standard_normal")
    return flow


def test_trained_density_integrates_to_one(trained_flow):
    side = torch.linspace(-7, 7, 141, dtype=F64)
    gx, gy = torch.meshgrid(side, side, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    with torch.no_grad():
        dens = trained_flow.log_prob(pts).exp()
    mass = dens.sum() * (side[1] - side[0]) ** 2
    assert abs(mass.item() - 1.0) < 0.03


def test_sample_then_log_prob_round_trips(trained_flow):
    # at tight tolerances, so that what is left is the flow's own (in)exactness
    flow = copy.deepcopy(trained_flow)
    for block in flow.blocks:
        block.solver = make_spec("dopri5", 1e-9, 1e-9, None)
    g = torch.Generator().manual_seed(3)
    x = flow.sample(64, generator=g)
    z_base = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        z, dlogp, _ = flow(x)
        logp = flow.log_prob(x)
    assert torch.allclose(z, z_base, atol=1e-6)
    assert torch.allclose(logp, standard_normal_logprob(z_base) - dlogp, atol=1e-6)


@pytest.mark.parametrize("gradient", ["adjoint", "direct"])
@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_cnf_trains_with_both_gradient_modes_and_regularisers(gradient, divergence):
    torch.manual_seed(0)
    flow = CNF(
        2,
        hidden=(8,),
        blocks=2,
        divergence=divergence,
        gradient=gradient,
        kinetic=0.01,
        jacobian=0.01,
        rtol=1e-4,
        atol=1e-4,
    )
    x = toy_2d("moons", 256)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        z, dlogp, reg = flow(x)
        loss = -(standard_normal_logprob(z) - dlogp).mean() + reg.mean()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and (reg > 0).all()
    assert flow.state_dim == 5


@pytest.mark.parametrize("name", TOYS)
def test_toys_are_seeded_and_shaped(name):
    a, b = toy_2d(name, 500, seed=1), toy_2d(name, 500, seed=1)
    assert a.shape == (500, 2) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, toy_2d(name, 500, seed=2))
    assert a.abs().max() < 10 and a.std() > 0.3


def test_model_and_toy_errors():
    with pytest.raises(ValueError, match=r"name: received 'spiral'; accepted: one of 'moons'"):
        toy_2d("spiral", 10)
    with pytest.raises(ValueError, match=r"divergence: received 'trace'"):
        CNF(2, divergence="trace")
    with pytest.raises(ValueError, match=r"x: .* a batch of shape \(N, 2\)"):
        CNF(2)(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"activation: received 'gelu2'"):
        time_mlp(2, (4,), "gelu2")


def test_cnf_with_ocnopt_exact_factors_for_the_normal_base():
    torch.manual_seed(0)
    flow = CNF(2, hidden=(8,), blocks=2, rtol=1e-4, atol=1e-4)
    x = toy_2d("8gaussians", 512)
    opt = no.OCNOpt(flow, factors="exact", update_every=2, sample_dt=0.1)
    with torch.no_grad():
        first = flow.nll(x).item()
    for i in range(8):
        batch = x[(i * 64) % 512 :][:64]

        def compute(batch=batch):
            z, dlogp, _ = flow(batch)
            return -(standard_normal_logprob(z) - dlogp).mean(), z

        ocnopt_step(opt, compute, "standard_normal")
    with torch.no_grad():
        assert flow.nll(x).item() < first
    # On refresh steps both blocks got factors: the last from z, the first through the chain;
    # every field layer of both blocks has a decomposed B with a positive eigenvalue.
    assert opt.steps_taken == 8
    units = {u.module: u for u in opt.units if getattr(u, "module", None) is not None}
    for block in flow.blocks:
        layers = [m for m in block.field.modules() if isinstance(m, nn.Linear)]
        assert layers and all(m in units and units[m].ready for m in layers)
        assert all(float(units[m].state["kron_eB"].max()) > 0 for m in layers)


def test_cnf_regularisers_and_divergence_equal_quadratures_along_the_trajectory():
    """reg = w_k ∫‖f‖² dt + w_j ∫‖εᵀ∂f/∂z‖² dt and Δlogp = −∫tr(∂f/∂z) dt, against Simpson's
    rule on a dense grid of the field's own trajectory (float64, tight tolerances)."""
    from torchdiffeq import odeint

    torch.manual_seed(0)
    flow = CNF(2, hidden=(8,), kinetic=0.3, jacobian=0.7, rtol=1e-10, atol=1e-10).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    z1, dlogp, reg = flow(x)
    probe = flow.blocks[0].field.probe
    net = flow.blocks[0].field.net
    grid = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)
    with torch.no_grad():
        zs = odeint(net, x, grid, rtol=1e-11, atol=1e-11)
    kin, jac, tr = [], [], []
    for t, z in zip(grid, zs):
        z = z.detach().requires_grad_(True)
        f = net(t, z)
        rows = [torch.autograd.grad(f[:, i].sum(), z, retain_graph=True)[0] for i in range(2)]
        jmat = torch.stack(rows, 1)  # (N, 2, 2): ∂f_i/∂z_j
        kin.append(f.detach().pow(2).sum(1))
        jac.append(torch.einsum("ni,nij->nj", probe, jmat).pow(2).sum(1))
        tr.append(jmat.diagonal(dim1=1, dim2=2).sum(1))

    def simpson(vals):
        v = torch.stack(vals)
        h = float(grid[1] - grid[0])
        return h / 3 * (v[0] + v[-1] + 4 * v[1:-1:2].sum(0) + 2 * v[2:-1:2].sum(0))

    torch.testing.assert_close(z1, zs[-1], rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(reg, 0.3 * simpson(kin) + 0.7 * simpson(jac), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(dlogp, -simpson(tr), rtol=1e-6, atol=1e-8)
