"""The latent ODE's bound as a function of its ``loss_inputs`` (decoded means, ``mu``,
``std``), and OCNOpt's subspace step through them: the bound, its gradient and its Hessian
against hand computations, the subspace model against a dense Gauss–Newton matrix of the
whole bound built from the full Jacobian (float64)."""

import contextlib
import copy
import math

import pytest
import torch
from torch.func import functional_call

from node_ocp import OCNOpt
from node_ocp.data import collate_irregular
from node_ocp.models import LatentODE
from node_ocp.ode.block import ODEBlock
from node_ocp.optim.ocnopt import _backprop
from node_ocp.optim.subspace import SubspaceStep
from node_ocp.optim.trial import read_closure
from node_ocp.train.step import train_step

F64 = torch.float64
SIGMA = 0.3


def _model(samples=1):
    torch.manual_seed(0)
    return LatentODE(
        2,
        latent=3,
        hidden=5,
        encoder_hidden=(6,),
        field_hidden=(5,),
        decoder_hidden=(4,),
        obs_std=SIGMA,
        samples=samples,
        method="rk4",
    ).double()


def _series():
    """Three series of 4, 2 and 3 points, 2 channels, one value missing."""
    g = torch.Generator().manual_seed(1)
    items = []
    for times in ([0.0, 0.3, 0.5, 0.9], [0.1, 0.7], [0.0, 0.4, 0.6]):
        t = torch.tensor(times, dtype=F64)
        items.append((t, torch.randn(len(times), 2, generator=g, dtype=F64), None))
    v = items[0][1].clone()
    v[1, 0] = float("nan")
    items[0] = (items[0][0], v, None)
    return collate_irregular(items)


def _terms(m, x, w=0.6):
    torch.manual_seed(7)  # the posterior draw, the same at every call
    return m(x, x.times, targets=x, kl_weight=w)


def _hessian_diagonal(m, x, terms, w=0.6):
    """The bound's (negated, summed) Hessian in ``(means, mu, std)``, by hand: ``m/σ²`` on
    the observed means, ``w`` on ``mu``, ``w (1 + 1/std²)`` on ``std``."""
    mask = torch.cat([x.mask, x.mask], 1).to(F64).reshape(-1)
    n_mu = (terms.loss_inputs.numel() - mask.numel()) // 2
    std = terms.loss_inputs[-n_mu:].detach()
    return torch.cat([mask / SIGMA**2, torch.full((n_mu,), w, dtype=F64), w * (1 + 1 / std**2)])


def test_the_bound_is_computed_from_its_loss_inputs_alone():
    m, x = _model(), _series()
    terms = _terms(m, x)
    o = terms.loss_inputs
    means, mu, std = o.split([terms.outputs.numel(), 3 * 3, 3 * 3])
    # the bound by hand: Gaussian log-likelihood of the observed values, closed-form KL
    values = torch.cat([x.values, x.values], 1).reshape(-1)
    mask = torch.cat([x.mask, x.mask], 1).reshape(-1)
    r = (means[mask] - values[mask]) / SIGMA
    log_lik = (-0.5 * r**2 - math.log(SIGMA) - 0.5 * math.log(2 * math.pi)).sum()
    kl = (0.5 * (std**2 + mu**2) - torch.log(std) - 0.5).sum()
    assert float(terms.neg_elbo) == pytest.approx(float(-(log_lik - 0.6 * kl)), rel=1e-12)
    torch.testing.assert_close(means, terms.outputs.reshape(-1), rtol=0, atol=0)
    # the parameters reach the bound only through o: the whole gradient is Jᵀ ∂L/∂o
    params = list(m.parameters())
    whole = torch.autograd.grad(terms.neg_elbo, params, retain_graph=True)
    (g_o,) = torch.autograd.grad(terms.neg_elbo, o, retain_graph=True)
    through = torch.autograd.grad(o, params, g_o, allow_unused=True)
    for a, b in zip(whole, through):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=1e-10, atol=0)
    # its Hessian in o is the diagonal by hand
    (g,) = torch.autograd.grad(terms.neg_elbo, o, create_graph=True)
    v = torch.randn(o.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    (hv,) = torch.autograd.grad(g, o, v)
    torch.testing.assert_close(hv, _hessian_diagonal(m, x, terms) * v, rtol=1e-10, atol=1e-12)


def test_an_importance_weighted_bound_gives_no_loss_inputs():
    m, x = _model(samples=2), _series()
    assert _terms(m, x).loss_inputs is None


def _dense_ggn(m, x):
    """``Jᵀ H J`` of the whole bound: ``J`` the full Jacobian of the loss inputs in the
    parameters by backprop through the solvers (a twin with ``gradient="direct"``), ``H``
    the diagonal by hand."""
    twin = copy.deepcopy(m)
    for b in twin.modules():
        if isinstance(b, ODEBlock):
            b.gradient = "direct"
    names = [n for n, _ in twin.named_parameters()]
    params = [p.detach() for p in twin.parameters()]
    sizes = [p.numel() for p in params]

    def inputs(flat):
        values = {n: c.reshape(p.shape) for n, c, p in zip(names, flat.split(sizes), params)}
        torch.manual_seed(7)
        return functional_call(twin, values, (x, x.times), {"targets": x, "kl_weight": 0.6})[3]

    flat = torch.cat([p.reshape(-1) for p in params])
    jac = torch.autograd.functional.jacobian(inputs, flat)  # (O, P)
    h = _hessian_diagonal(m, x, _terms(m, x))
    return jac.T @ (h[:, None] * jac)


def test_subspace_model_of_the_bound_matches_the_dense_gauss_newton_matrix():
    m, x = _model(), _series()
    params = list(m.parameters())
    terms = _terms(m, x)
    grads = dict(zip(params, torch.autograd.grad(terms.neg_elbo, params)))
    state = {p: {} for p in params}
    g = torch.Generator().manual_seed(3)
    step = SubspaceStep(m, "parts", state, backprop=_backprop(m))
    dirs = step.basis({p: torch.randn(p.shape, generator=g, dtype=F64) for p in params})
    assert len(dirs) == 3  # encoder (with its head), latent field, decoder: no previous yet

    def closure():
        t = _terms(m, x)
        return t.neg_elbo, None, t.loss_inputs

    with torch.no_grad():
        loss0, mat, b = step.model(closure, dirs, grads, {}, _noop)
    flat = [torch.cat([d.get(p, torch.zeros_like(p)).reshape(-1) for p in params]) for d in dirs]
    big = torch.stack(flat, dim=1)
    torch.testing.assert_close(mat, big.T @ _dense_ggn(m, x) @ big, rtol=1e-8, atol=1e-12)
    gvec = torch.cat([grads[p].reshape(-1) for p in params])
    torch.testing.assert_close(b, big.T @ gvec, rtol=1e-10, atol=1e-14)
    assert loss0 == pytest.approx(float(terms.neg_elbo), rel=1e-12)


def _noop():
    return contextlib.nullcontext()


def _steps(m, x, steps=4, **options):
    opt = OCNOpt(m, **options)

    def forward():
        t = m(x, x.times, targets=x, kl_weight=0.6)
        return t.outputs, t.neg_elbo / t.count, t.loss_inputs

    for _ in range(steps):
        train_step(opt, forward, likelihood="gaussian", outputs_determine_loss=False)
    return opt


def test_subspace_parts_takes_checked_steps_on_the_latent_ode():
    m, x = _model(), _series()
    before = [p.detach().clone() for p in m.parameters()]
    opt = _steps(m, x, subspace="parts")
    assert opt.options.subspace == "parts"
    assert opt._subspace.last_reason == ""  # no fallback: the closure gave loss_inputs
    assert math.isfinite(opt._subspace.last_rho)
    assert any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))


def test_the_default_keeps_the_held_step_on_the_latent_ode():
    """``"auto"`` takes subspace steps only where the closure's outputs determine the loss:
    on the latent ODE's bound the held step measured better (bench_issue21.md §21), and the
    run is the held step's bit for bit."""
    runs = []
    for options in ({}, {"subspace": "off"}):
        m, x = _model(), _series()
        opt = _steps(m, x, **options)
        runs.append([p.detach().clone() for p in m.parameters()])
        assert opt.options.subspace == "off"
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_subspace_parts_falls_back_to_the_held_step_for_an_importance_weighted_bound():
    m, x = _model(samples=2), _series()
    with pytest.warns(RuntimeWarning, match="subspace: the closure returned no outputs"):
        _steps(m, x, steps=2, subspace="parts")


@pytest.mark.parametrize(
    "value", [(torch.tensor(1.0), None, None, None), "loss", (torch.tensor(1.0), "o")]
)
def test_a_closure_value_of_the_wrong_form_is_refused_by_name(value):
    with pytest.raises((TypeError, ValueError), match="^closure"):
        read_closure(value)
