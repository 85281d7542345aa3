"""Kronecker curvature for recurrent cells and layers used several times in one forward.

The references are written out in the tests: the cells' gate equations by hand (not
``node_ocp.capture.cell_forward``), the rows from plain autograd on those equations, the
preconditioned step from a dense ``(A ⊗ B + damping)`` solve.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp_field
from torch import nn

import node_ocp as no
from node_ocp.capture import cell_forward
from node_ocp.optim.curvatures import EKFACUnit

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)
CELLS = [nn.GRUCell, nn.LSTMCell, nn.RNNCell]


class Sequence(nn.Module):
    """A cell over T steps (rows with ``mask`` False keep their state), an ODE block on the
    last state and a head read at every step (a decoder: one layer, T uses)."""

    def __init__(self, cell_cls, channels=2, hidden=3, outputs=2):
        super().__init__()
        self.cell = cell_cls(channels, hidden)
        self.ode = no.ODEBlock(mlp_field(hidden, 4), (0.0, 0.5), **TIGHT)
        self.head = nn.Linear(hidden, outputs)
        self.double()

    def forward(self, xs, masks):
        state = None
        outs = []
        for t in range(xs.shape[0]):
            new = self.cell(xs[t], state)
            if state is None:
                state = new
            state, h = _advance(new, state, masks[t])
            outs.append(self.ode(h) if t == xs.shape[0] - 1 else h)
        return torch.stack([self.head(h) for h in outs])  # (T, N, outputs)


def _advance(new, state, mask):
    """The rows with ``mask`` (N,) take the cell's new state; returns (state, hidden h)."""
    keep = mask[:, None]
    if isinstance(new, tuple):
        state = tuple(torch.where(keep, a, b) for a, b in zip(new, state))
    else:
        state = torch.where(keep, new, state)
    return state, state[0] if isinstance(state, tuple) else state


def _hand_cell(cell, x, state):
    """The cell's equations written out; returns (new state, gi, gh) with gi, gh retaining
    their gradients."""
    gi = x @ cell.weight_ih.T + cell.bias_ih
    h = state[0] if isinstance(state, tuple) else state
    gh = h @ cell.weight_hh.T + cell.bias_hh
    gi.retain_grad()
    gh.retain_grad()
    size = cell.hidden_size
    if isinstance(cell, nn.GRUCell):
        r = torch.sigmoid(gi[:, :size] + gh[:, :size])
        z = torch.sigmoid(gi[:, size : 2 * size] + gh[:, size : 2 * size])
        n = torch.tanh(gi[:, 2 * size :] + r * gh[:, 2 * size :])
        return (1 - z) * n + z * h, gi, gh
    if isinstance(cell, nn.LSTMCell):
        s = gi + gh
        i, f = torch.sigmoid(s[:, :size]), torch.sigmoid(s[:, size : 2 * size])
        g, o = torch.tanh(s[:, 2 * size : 3 * size]), torch.sigmoid(s[:, 3 * size :])
        c = f * state[1] + i * g
        return (o * torch.tanh(c), c), gi, gh
    return torch.tanh(gi + gh), gi, gh


def _case(cell_cls, seed=0):
    torch.manual_seed(seed)
    model = Sequence(cell_cls)
    t, n = 3, 5
    xs = torch.randn(t, n, 2, dtype=F64)
    masks = torch.ones(t, n, dtype=torch.bool)
    masks[1, [0, 2]] = False  # rows 0 and 2 are not observed at step 1
    target = torch.randn(t, n, 2, dtype=F64)
    return model, xs, masks, target


def _loss(out, target):
    return 0.5 * (out - target).pow(2).sum(-1).mean()


def _hand_rows(model, xs, masks, target):
    """Per-use rows [u, 1] and gradient rows of both cell maps and of the head, from plain
    autograd on the written-out equations (the ODE block backpropagated through directly)."""
    cell, head = model.cell, model.head
    direct = no.ODEBlock(model.ode.field, (0.0, 0.5), gradient="direct", **TIGHT)
    n, size = xs.shape[1], cell.hidden_size
    zeros = xs.new_zeros(n, size)
    state = (zeros, zeros) if isinstance(cell, nn.LSTMCell) else zeros
    uses = []  # (map, input rows, pre-activation tensor, live rows)
    houts, hins = [], []
    for t in range(xs.shape[0]):
        h_in = state[0] if isinstance(state, tuple) else state
        new, gi, gh = _hand_cell(cell, xs[t], state)
        live = masks[t]
        uses += [("ih", xs[t], gi, live), ("hh", h_in, gh, live)]
        state, h = _advance(new, state, masks[t])
        h = direct(h) if t == xs.shape[0] - 1 else h
        hins.append(h.detach())
        o = h @ head.weight.T + head.bias
        o.retain_grad()
        houts.append(o)
    _loss(torch.stack(houts), target).backward()
    ones = xs.new_ones(n, 1)
    rows = {"ih": ([], []), "hh": ([], [])}
    for which, u, pre, live in uses:
        rows[which][0].append(torch.cat([u.detach(), ones], 1)[live])
        rows[which][1].append(pre.grad[live])
    head_rows = (
        [torch.cat([u, ones], 1) for u in hins],
        [o.grad for o in houts],
    )
    out = {k: (torch.cat(a), torch.cat(g)) for k, (a, g) in rows.items()}
    out["head"] = (torch.cat(head_rows[0]), torch.cat(head_rows[1]))
    return out


@pytest.mark.parametrize("cell_cls", CELLS, ids=lambda c: c.__name__)
def test_cell_forward_equals_the_fused_cell(cell_cls):
    torch.manual_seed(1)
    cell = cell_cls(3, 4).double()
    x, h = torch.randn(6, 3, dtype=F64), torch.randn(6, 4, dtype=F64)
    hx = (h, torch.randn(6, 4, dtype=F64)) if cell_cls is nn.LSTMCell else h
    for args in [(x, hx), (x,), (x[0],)]:
        fused = cell(*args)
        ours, (h_read, gi, gh) = cell_forward(cell, *args)
        fused = fused if isinstance(fused, tuple) else (fused,)
        ours = ours if isinstance(ours, tuple) else (ours,)
        for a, b in zip(fused, ours):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gi, F.linear(args[0].reshape(-1, 3), *_map(cell, "ih")))


def _map(cell, which):
    return getattr(cell, f"weight_{which}"), getattr(cell, f"bias_{which}")


@pytest.mark.parametrize("cell_cls", CELLS, ids=lambda c: c.__name__)
def test_cell_factors_summed_over_a_sequence_equal_per_use_rows(cell_cls):
    """A = Σ_uses Σ_live ū ūᵀ / N, B = N Σ_uses Σ_live g gᵀ for both maps of the cell (masked
    rows are not uses) and for a head read at every step."""
    model, xs, masks, target = _case(cell_cls)
    opt = no.OCNOpt(model, curvature="kfac")
    units = {p: u for u in opt.units for p in u.params}
    opt.zero_grad()
    loss = _loss(model(xs, masks), target)
    opt.backward(loss)
    stats = {s.unit: s for s in opt._collector.statistics()}
    model.zero_grad()
    hand = _hand_rows(model, xs, masks, target)
    n = xs.shape[1]
    for key, param in [("ih", model.cell.weight_ih), ("hh", model.cell.weight_hh)]:
        rows, grads = hand[key]
        assert rows.shape[0] == 3 * n - 2  # two rows unobserved at step 1
        s = stats[units[param]]
        torch.testing.assert_close(s.A, rows.T @ rows / n, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s.B, grads.T @ grads * n, rtol=1e-8, atol=1e-12)
        assert s.samples == n
    rows, grads = hand["head"]
    s = stats[units[model.head.weight]]
    torch.testing.assert_close(s.A, rows.T @ rows / n, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.B, grads.T @ grads * n, rtol=1e-8, atol=1e-12)


def test_gru_cell_step_is_the_damped_kronecker_solve():
    """OCNOpt (kfac, fixed step 1, no momentum) moves each map of the GRU cell by
    (A ⊗ B + π-balanced damping)⁻¹ g, computed here from the hand rows."""
    model, xs, masks, target = _case(nn.GRUCell, seed=2)
    r = 0.05
    opt = no.OCNOpt(
        model, lr=1.0, momentum=0.0, step="fixed", curvature="kfac", damping=r, update_every=10
    )
    before = {k: torch.cat([w, b[:, None]], 1).detach().clone() for k, (w, b) in _maps(model)}
    hand = _hand_rows(copy.deepcopy(model), xs, masks, target)
    opt.zero_grad()
    opt.backward(_loss(model(xs, masks), target))
    grads = {k: torch.cat([w.grad, b.grad[:, None]], 1).clone() for k, (w, b) in _maps(model)}
    opt.step()
    n = xs.shape[1]
    for key, (w, b) in _maps(model):
        rows, gr = hand[key]
        a_mat, b_mat = rows.T @ rows / n, gr.T @ gr * n
        ma, mb = a_mat.trace() / a_mat.shape[0], b_mat.trace() / b_mat.shape[0]
        dense = torch.kron(
            a_mat + r**0.5 * ma * torch.eye(a_mat.shape[0], dtype=F64),
            b_mat + r**0.5 * mb * torch.eye(b_mat.shape[0], dtype=F64),
        )
        g = grads[key]
        vec = g.T.reshape(-1)
        expected = torch.linalg.solve(dense, vec).reshape(g.shape[1], g.shape[0]).T
        after = torch.cat([w, b[:, None]], 1).detach()
        torch.testing.assert_close(before[key] - after, expected, rtol=1e-6, atol=1e-10)
        # and it is not the plain or the diagonal step
        assert float((before[key] - after - g).abs().max()) > 1e-3


def _maps(model):
    return [(k, _map(model.cell, k)) for k in ("ih", "hh")]


def test_ekfac_default_covers_a_users_cells_and_trains_a_sequence_model():
    """The default OCNOpt gives a user's GRU and LSTM cells EKFAC units and lowers the loss of
    a small sequence model by a fifth within 30 steps (the recomputed cell forward keeps the
    gradients of the fused cell)."""
    for cell_cls in (nn.GRUCell, nn.LSTMCell):
        model, xs, masks, target = _case(cell_cls, seed=3)
        opt = no.OCNOpt(model)
        kinds = {p: type(u) for u in opt.units for p in u.params}
        assert all(kinds[p] is EKFACUnit for p in model.cell.parameters())
        # gradients with the collector armed (refresh step) equal plain autograd's
        opt.zero_grad()
        loss = _loss(model(xs, masks), target)
        opt.backward(loss)
        armed = [p.grad.clone() for p in model.cell.parameters()]
        model.zero_grad()
        _loss(model(xs, masks), target).backward()
        for a, b in zip(armed, model.cell.parameters()):
            torch.testing.assert_close(a, b.grad, rtol=1e-10, atol=1e-12)
        model.zero_grad()
        first = float(loss.detach())
        for _ in range(30):
            opt.zero_grad()
            loss = _loss(model(xs, masks), target)
            opt.backward(loss)
            opt.step(lambda m=model, x=xs, k=masks, y=target: _loss(m(x, k), y))
        assert float(_loss(model(xs, masks), target)) < 0.8 * first
