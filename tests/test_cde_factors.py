"""Neural CDE fields: Kronecker factors against brute force, the control path included.

The CDE's ODE is ``dz/dt = F(t, z) = f(z) · dX/dt`` with ``f(z)`` a (hidden × channels)
matrix. For a linear layer of ``f`` with input ``u`` and output ``o`` the capture's statistics
are ``A = Σ_j w_j Σ_b ū ūᵀ`` and ``B = Σ_j w_j Σ_{i,b} g gᵀ`` with ``g = ∂(q_i · F)/∂o``:
the factor is dotted with the *whole* field, so ``dX/dt`` enters ``B``. The reference below
takes states and adjoints from its own fine fixed-step solve (backprop through rk4, split at
the path's knots) and forms ``ū`` and ``g`` by hand at every sample time.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torchdiffeq import odeint

import node_ocp as no
from node_ocp.data import collate_irregular

pytest.importorskip("torchcde")
from node_ocp.models import NeuralCDE  # noqa: E402

F64 = torch.float64


def _batch():
    g = torch.Generator().manual_seed(1)
    items = []
    for times in ([0.0, 0.3, 0.5, 1.1], [0.0, 0.2, 0.5, 0.8, 1.1], [0.1, 0.5, 0.9]):
        t = torch.tensor(times, dtype=F64)
        items.append((t, torch.randn(len(times), 2, generator=g, dtype=F64), None))
    return collate_irregular(items)


def _rk4(field, z, ta, tb, h=2e-3):
    """z(tb) from z(ta) by rk4 with about ``h``-long steps, on one smooth piece of the path.

    torchcde reads the path at a knot from the piece that ends there; the piece starting at
    ``ta`` is read at a time just after it instead (a linear path's slope jumps at knots).
    """
    steps = max(1, math.ceil(abs(tb - ta) / h))
    grid = torch.tensor([ta, tb], dtype=F64)
    start = ta + 1e-12 * (tb - ta)

    def piece(t, z):
        return field(torch.clamp(t, min=start), z)

    return odeint(piece, z, grid, method="rk4", options={"step_size": (tb - ta) / steps})[-1]


def _reference(model, batch, samples, weight, terminal):
    """Hand-made A, B (and B with dX/dt left out) for the field's two linear layers.

    ``terminal(z_end) -> list of scalars``: the functions whose gradients at z(t_j) are the
    factors q_i(t_j) (the loss itself for the empirical source).
    """
    field = model.field
    path = field.path
    grid, _ = model.path_data(batch)
    lin1, lin2 = field.net[0], field.net[2]
    # States at the sample times from one forward pass split at the path's knots and at the
    # sample times, each kept in the graph: the gradient at z(t_j) is the adjoint a(t_j).
    knots = [float(t) for t in grid]
    stops = sorted(set(knots) | {float(t) for t in samples})
    z = model.initial(path.evaluate(grid[0])).detach()
    at = {}
    for ta, tb in zip(stops[:-1], stops[1:]):
        z = _rk4(field, z, ta, tb)
        at[tb] = z
    zs = [at[float(t)] for t in samples]
    qs = []  # per factor: list over sample times of (N, H)
    scalars = terminal(z)
    for i, s in enumerate(scalars):
        qs.append(torch.autograd.grad(s, zs, retain_graph=i + 1 < len(scalars)))
    hidden, chans = field.hidden, field.path_channels
    n = zs[0].shape[0]
    ones = torch.ones(n, 1, dtype=F64)
    A1 = torch.zeros(hidden + 1, hidden + 1, dtype=F64)
    A2 = torch.zeros(lin2.in_features + 1, lin2.in_features + 1, dtype=F64)
    B1 = torch.zeros(lin1.out_features, lin1.out_features, dtype=F64)
    B2 = torch.zeros(hidden * chans, hidden * chans, dtype=F64)
    B2_no_path = torch.zeros_like(B2)
    with torch.no_grad():
        W2 = lin2.weight
        for j, t in enumerate(samples):
            zj = zs[j]
            dx = path.derivative(t)  # (N, C)
            o1 = zj @ lin1.weight.T + lin1.bias
            h = F.softplus(o1)
            o2 = h @ W2.T + lin2.bias
            dtanh = 1 - torch.tanh(o2) ** 2
            u1, u2 = torch.cat([zj, ones], 1), torch.cat([h, ones], 1)
            A1 += weight * u1.T @ u1
            A2 += weight * u2.T @ u2
            for q in qs:
                qj = q[j]  # (N, H)
                # F_h = Σ_c tanh(o2)[h*C + c] dx_c, so ∂(q·F)/∂o2[h*C + c] = q_h dx_c tanh'
                g2 = (qj[:, :, None] * dx[:, None, :]).reshape(n, -1) * dtanh
                g1 = (g2 @ W2) * torch.sigmoid(o1)
                B2 += weight * g2.T @ g2
                B1 += weight * g1.T @ g1
                g2_np = qj.repeat_interleave(chans, dim=1) * dtanh  # dX/dt taken as ones
                B2_no_path += weight * g2_np.T @ g2_np
    return {lin1: (A1, B1), lin2: (A2, B2)}, B2_no_path


def _close(got, ref, rel=1e-6):
    """Agreement to ``rel`` of the matrix's largest entry (about 2e-8 is seen)."""
    return bool((got - ref).abs().max() <= rel * ref.abs().max())


@pytest.mark.parametrize("interpolation, source", [("hermite", "empirical"), ("linear", "factors")])
def test_cde_kronecker_factors_match_brute_force(interpolation, source):
    torch.manual_seed(0)
    model = NeuralCDE(
        2,
        3,
        hidden=3,
        field_hidden=(4,),
        interpolation=interpolation,
        rtol=1e-10,
        atol=1e-10,
    ).double()
    # The field's last layer starts at zero (f = 0); give it weights so every term matters.
    with torch.no_grad():
        for param in model.field.net[2].parameters():
            param.normal_(0.0, 0.5)
    batch = _batch()
    labels = torch.tensor([0, 2, 1])
    capture = no.CurvatureCapture(sample_dt=0.1)
    y = torch.randn(2, 3, 3, dtype=F64)
    with capture.active(model):
        logits = model(batch)
        loss = F.cross_entropy(logits, labels)
        if source == "factors":
            (record,) = capture.records
            capture.set_terminal_factors(record.output, y)
        loss.backward()

    grid, _ = model.path_data(batch)
    # the block solves over [first time, last time] (adaptive); its backward solve samples
    # that interval from its end
    samples, weight = capture.sample_grid(grid[-1], grid[0], like=grid)
    assert samples.numel() == 11

    def terminal(z_end):
        if source == "empirical":
            return [F.cross_entropy(model.head(z_end), labels)]
        return [(z_end * y[i]).sum() for i in range(2)]

    ref, b2_no_path = _reference(model, batch, samples, weight, terminal)
    assert set(capture.kronecker) == set(ref)
    for layer, (A, B) in ref.items():
        stats = capture.kronecker[layer]
        assert _close(stats.A, A), layer
        assert _close(stats.B, B), layer
        assert stats.rank == (1 if source == "empirical" else 2)
    # dX/dt matters: B without the control path's derivative is far from the captured one.
    b2 = capture.kronecker[model.field.net[2]].B
    assert (b2 - b2_no_path).norm() > 0.1 * b2.norm()
