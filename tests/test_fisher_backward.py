"""The Monte-Carlo Fisher by a backward pass of its own (``factors="auto"``/``"sampled"``).

References: the draws' second moments against the loss Hessian (written out by hand), and the
statistics against those of the empirical rule run on a surrogate loss ``Σ outputs · s`` with
the same draw ``s``; the gradients against plain autograd of the real loss.
"""

import copy

import pytest
import torch
from conftest import mlp_field
from torch import nn

import node_ocp as no
from node_ocp.optim.likelihoods import sampled_cotangent

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


class Recurrent(nn.Module):
    """A GRU cell over T steps, an ODE block between steps and a head read at every step:
    the loss reaches the block at several times (the factor chain cannot follow it)."""

    def __init__(self, channels=2, hidden=3, outputs=2):
        super().__init__()
        self.cell = nn.GRUCell(channels, hidden)
        self.ode = no.ODEBlock(mlp_field(hidden, 4), (0.0, 0.3), **TIGHT)
        self.head = nn.Linear(hidden, outputs)
        self.double()

    def forward(self, xs):
        h = None
        outs = []
        for t in range(xs.shape[0]):
            h = self.cell(xs[t], h)
            h = self.ode(h)
            outs.append(self.head(h))
        return torch.stack(outs, 1)  # (N, T, outputs)


def _case(seed=0, n=5, steps=3):
    torch.manual_seed(seed)
    model = Recurrent()
    xs = torch.randn(steps, n, 2, dtype=F64)
    target = torch.randn(n, steps, 2, dtype=F64)
    mask = torch.rand(n, steps, 2) > 0.3
    return model, xs, target, mask


def _masked_mse(out, target, mask):
    m = mask.to(out.dtype)
    return ((out - target) ** 2 * m).sum() / m.sum()


def test_categorical_draws_have_the_cross_entropy_hessian_as_second_moment():
    """N² E[s_b s_bᵀ] = diag(p_b) − p_b p_bᵀ, the per-sample Hessian of the cross-entropy."""
    torch.manual_seed(1)
    logits = torch.randn(3, 4, dtype=F64, requires_grad=True)
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sampled_cotangent(loss, logits, "categorical", gen) for _ in range(6000)])
    n = logits.shape[0]
    p = torch.softmax(logits.detach(), 1)
    for b in range(n):
        second = n**2 * torch.einsum("ri,rj->ij", draws[:, b], draws[:, b]) / draws.shape[0]
        hessian = torch.diag(p[b]) - torch.outer(p[b], p[b])
        torch.testing.assert_close(second, hessian, rtol=0, atol=0.03)
    # each draw is a one-hot minus the probabilities, over N
    rows = draws[0] * n + p
    assert torch.allclose(rows.sum(1), torch.ones(n, dtype=F64))
    assert set(rows.flatten().round(decimals=12).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("weighted", [False, True])
def test_gaussian_draws_have_the_loss_hessian_diagonal_as_variance(weighted):
    """E[s²] = diag(∇²_o L)/N for a masked (and channel-weighted) MSE; masked entries get
    no draw."""
    torch.manual_seed(2)
    out = torch.randn(4, 3, 2, dtype=F64, requires_grad=True)
    target = torch.randn(4, 3, 2, dtype=F64)
    mask = (torch.rand(4, 3, 2) > 0.4).to(F64)
    w = torch.tensor([1.0, 5.0], dtype=F64) if weighted else torch.ones(2, dtype=F64)
    loss = ((out - target) ** 2 * mask * w).sum() / mask.sum()
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sampled_cotangent(loss, out, "gaussian", gen) for _ in range(8000)])
    expected = 2 * mask * w / mask.sum() / out.shape[0]
    assert bool((draws[:, mask == 0] == 0).all())
    variance = draws.pow(2).mean(0)
    torch.testing.assert_close(variance[mask > 0], expected[mask > 0], rtol=0.1, atol=0)


def _kronecker_stats(opt):
    """{parameter name of the unit's first tensor: (A, B)} for every Kronecker record."""
    names = {p: n for n, p in opt.model.named_parameters()}
    from node_ocp.optim.statistics import from_capture

    records = list(opt._collector.statistics())
    if opt._capture is not None:
        records += from_capture(opt._capture, opt._units.inside, opt._units.blocks, True)
    return {names[r.unit.params[0]]: (r.A, r.B) for r in records}


@pytest.mark.parametrize("factors", ["sampled"])
def test_sampled_backward_statistics_equal_the_empirical_rule_on_the_drawn_cotangent(factors):
    """On a model the factor chain cannot follow, the refresh statistics (cell maps, head,
    field layers) are those the empirical rule gathers from the surrogate loss Σ outputs · s
    with the same draw s, and the gradients are the real loss's."""
    model, xs, target, mask = _case()
    reference, plain_model, emp_model = (copy.deepcopy(model) for _ in range(3))
    plain = torch.autograd.grad(
        _masked_mse(plain_model(xs), target, mask), list(plain_model.parameters())
    )
    opt = no.OCNOpt(model, curvature="kfac", factors=factors, seed=7)
    opt.zero_grad()
    out = model(xs)
    loss = _masked_mse(out, target, mask)
    opt.backward(loss, outputs=out, likelihood="gaussian")
    sampled = _kronecker_stats(opt)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = no.OCNOpt(reference, curvature="kfac", factors="empirical")
    ref.zero_grad()
    out_r = reference(xs)
    loss_r = _masked_mse(out_r, target, mask)
    s = sampled_cotangent(loss_r, out_r, "gaussian", torch.Generator().manual_seed(7))
    ref.backward((out_r * s).sum())
    surrogate = _kronecker_stats(ref)

    assert set(sampled) == set(surrogate)
    assert {"cell.weight_ih", "cell.weight_hh", "head.weight"} <= set(sampled)
    assert any(k.startswith("ode.") for k in sampled)
    for key, (a, b) in sampled.items():
        torch.testing.assert_close(a, surrogate[key][0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b, surrogate[key][1], rtol=1e-7, atol=1e-14)
    for (name, _), g in zip(reference.named_parameters(), plain):
        torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12)

    # and it is not the empirical rule on the real loss
    emp = no.OCNOpt(emp_model, curvature="kfac", factors="empirical")
    emp.zero_grad()
    out_e = emp_model(xs)
    emp.backward(_masked_mse(out_e, target, mask))
    empirical = _kronecker_stats(emp)
    b_s, b_e = sampled["head.weight"][1], empirical["head.weight"][1]
    assert float((b_s - b_e).abs().max()) > 0.1 * float(b_e.abs().max())


def test_sampled_backward_steps_and_exact_refuses_on_a_multi_call_model():
    model, xs, target, mask = _case(seed=3)
    for factors in ("auto", "sampled"):
        m = copy.deepcopy(model)
        opt = no.OCNOpt(m, factors=factors)
        before = [p.detach().clone() for p in m.parameters()]
        for _ in range(3):
            opt.zero_grad()
            out = m(xs)
            loss = _masked_mse(out, target, mask)
            opt.backward(loss, outputs=out, likelihood="gaussian")
            opt.step(lambda m=m: (_masked_mse(m(xs), target, mask), m(xs)))
        after = _masked_mse(m(xs), target, mask)
        assert float(after) < float(loss)
        assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    opt = no.OCNOpt(copy.deepcopy(model), factors="exact")
    out = opt.model(xs)
    with pytest.raises(ValueError, match="factor chain cannot follow; use factors='sampled'"):
        opt.backward(_masked_mse(out, target, mask), outputs=out, likelihood="gaussian")


def test_auto_keeps_the_empirical_rule_for_flows_and_a_plain_backward():
    """``auto`` with a regressor's or a flow's likelihood (or none) gathers what
    ``empirical`` gathers."""
    model, xs, target, mask = _case(seed=4)
    stats = {}
    cases = [("auto", "standard_normal"), ("auto", "gaussian"), ("auto", None), ("empirical", None)]
    for factors, likelihood in cases:
        m = copy.deepcopy(model)
        opt = no.OCNOpt(m, curvature="kfac", factors=factors)
        opt.zero_grad()
        out = m(xs)
        loss = _masked_mse(out, target, mask)
        opt.backward(loss, outputs=out if likelihood else None, likelihood=likelihood)
        stats[(factors, likelihood)] = _kronecker_stats(opt)
    ref = stats[("empirical", None)]
    for key in [("auto", "standard_normal"), ("auto", "gaussian"), ("auto", None)]:
        for name, (a, b) in stats[key].items():
            torch.testing.assert_close(a, ref[name][0], rtol=0, atol=0)
            torch.testing.assert_close(b, ref[name][1], rtol=0, atol=0)


def test_sampled_pass_leaves_every_gradient_to_the_loss_including_the_horizon():
    """The sampled pass accumulates nothing: the horizon t1 (a parameter OCNOpt does not
    own) and every model parameter get exactly the loss's own gradient."""
    model, xs, target, mask = _case(seed=5)
    model.ode.t = nn.Parameter(torch.tensor([0.0, 0.3], dtype=F64))
    plain_model = copy.deepcopy(model)
    opt = no.OCNOpt(model, factors="sampled")
    opt.zero_grad()
    out = model(xs)
    opt.backward(_masked_mse(out, target, mask), outputs=out, likelihood="gaussian")
    assert opt._statistics_route.name == "fisher"
    loss = _masked_mse(plain_model(xs), target, mask)
    names = [n for n, _ in plain_model.named_parameters()]
    plain = torch.autograd.grad(loss, list(plain_model.parameters()))
    got = dict(model.named_parameters())
    assert "ode.t" in names
    for name, g in zip(names, plain):
        torch.testing.assert_close(got[name].grad, g, rtol=1e-9, atol=1e-12)


def test_auto_draws_the_monte_carlo_fisher_for_a_classifier():
    """``auto`` with a categorical likelihood: the statistics of the surrogate loss
    Σ logits · s with the categorical draw s = (e_ŷ − p)/N; gradients the loss's own."""
    model, xs, target, mask = _case(seed=6)
    labels = torch.tensor([0, 1, 1, 0, 1])
    reference = copy.deepcopy(model)

    def logits_of(m):
        return m(xs)[:, -1, :]  # (N, 2): the last step's head as class logits

    opt = no.OCNOpt(model, curvature="kfac", factors="auto", seed=3)
    opt.zero_grad()
    out = logits_of(model)
    opt.backward(nn.functional.cross_entropy(out, labels), outputs=out, likelihood="categorical")
    assert opt._statistics_route.name == "fisher"
    got = _kronecker_stats(opt)
    ref = no.OCNOpt(reference, curvature="kfac", factors="empirical")
    ref.zero_grad()
    out_r = logits_of(reference)
    loss_r = nn.functional.cross_entropy(out_r, labels)
    s = sampled_cotangent(loss_r, out_r, "categorical", torch.Generator().manual_seed(3))
    ref.backward((out_r * s).sum())
    want = _kronecker_stats(ref)
    assert set(got) == set(want)
    for key, (a, b) in got.items():
        torch.testing.assert_close(a, want[key][0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b, want[key][1], rtol=1e-7, atol=1e-14)
