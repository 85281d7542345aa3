"""experiments/diagnose_coupling.py: its Gauss-Newton-vector products against a dense GGN
built from the full Jacobian (float64, a tiny ODE-RNN forecaster)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from node_ocp.data import IrregularBatch
from node_ocp.models import ODERNN
from node_ocp.train.tasks import masked_mse

ROOT = Path(__file__).resolve().parents[1]


def _module():
    path = ROOT / "experiments" / "diagnose_coupling.py"
    spec = importlib.util.spec_from_file_location("diagnose_coupling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny():
    g = torch.Generator().manual_seed(3)
    model = ODERNN(
        2, 2, hidden=3, field_hidden=(3,), task="forecast", method="rk4", gradient="direct"
    ).double()
    times = torch.tensor([[0.0, 0.2, 0.5], [0.1, 0.3, 0.4]], dtype=torch.float64)
    values = torch.randn(2, 3, 2, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 3, 2, dtype=torch.bool)
    mask[1, 2, 0] = False  # one channel unobserved
    x = IrregularBatch(times, values, mask)
    qt = torch.tensor([[0.6, 0.8], [0.7, 0.8]], dtype=torch.float64)
    qmask = torch.tensor([[[1, 1], [1, 0]], [[1, 1], [0, 1]]], dtype=torch.bool)
    y = IrregularBatch(qt, torch.randn(2, 2, 2, generator=g, dtype=torch.float64), qmask)
    return model, x, y


def _dense_ggn(dc, model, x, y):
    """``(params, θ, outputs_of, the masked MSE's output Hessian h, Jᵀ diag(h) J)`` from the
    full Jacobian."""
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    theta = dc.flat(params).detach()

    def outputs_of(flat_theta):
        ps = dict(zip(names, dc.unflat(flat_theta, params)))
        return functional_call(model, ps, (x, y.times))

    jac = torch.autograd.functional.jacobian(outputs_of, theta)  # (B, Q, C, P)
    jac = jac.reshape(-1, theta.numel())
    h = dc.masked_mse_hessian(y)
    return params, theta, outputs_of, h, jac.T @ (h.reshape(-1, 1) * jac)


def test_gauss_newton_products_match_the_dense_ggn():
    dc = _module()
    model, x, y = _tiny()
    params, theta, outputs_of, h, dense = _dense_ggn(dc, model, x, y)
    # the Hessian of the masked MSE is the diagonal 2 m / Σ m: checked against autograd
    preds = outputs_of(theta).detach()
    hess = torch.autograd.functional.hessian(lambda p: masked_mse(p, y), preds)
    assert torch.allclose(hess.reshape(preds.numel(), -1), torch.diag(h.reshape(-1)))

    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0), dtype=theta.dtype)
    out = model(x, y.times)
    gn = dc.GaussNewton(out, params, h)
    assert torch.allclose(gn.gv(v), dense @ v, rtol=1e-8, atol=1e-10)
    assert gn.count == 1

    for how in ("parts", "layers", "tensors"):
        blocks = dc.parameter_blocks(model, how)
        keep = torch.zeros_like(dense, dtype=torch.bool)
        for block in blocks:
            idx = torch.zeros(theta.numel(), dtype=torch.bool)
            for i in block:
                idx[gn.slices[i]] = True
            keep |= idx[:, None] & idx[None, :]
        gb = dc.GaussNewton(out, params, h, blocks)
        assert torch.allclose(gb.gv(v), (dense * keep) @ v, rtol=1e-8, atol=1e-10)
        assert gb.count == len(blocks)
    assert len(dc.parameter_blocks(model, "parts")) == 3  # GRU cell, ODE field, head
    assert dc.parameter_blocks(model, "full") is None


def test_conjugate_gradient_solves_a_small_system():
    dc = _module()
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = a @ a.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x, ax = dc.conjugate_gradient(lambda v: a @ v, b, torch.zeros(6, dtype=torch.float64), 12)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-8)
    assert torch.allclose(ax, a @ x, atol=1e-8)


def test_latent_terms_are_the_models_bound_and_its_exact_output_hessian():
    """The latent ODE's loss as a function of (preds, mu, std): the model's own bound for
    the same draw, and its Hessian wrt those outputs is the stated diagonal (autograd)."""
    from node_ocp.models import LatentODE

    mod = _module()
    torch.manual_seed(0)
    model = LatentODE(
        2,
        latent=2,
        hidden=3,
        encoder_hidden=(3,),
        field_hidden=(3,),
        decoder_hidden=(3,),
        method="rk4",
        gradient="direct",
    ).double()
    model.kl_weight = 0.7
    _, x, y = _tiny()
    eps = torch.randn(1, 2, 2, dtype=torch.float64)
    outputs, loss, hdiag = mod.latent_terms(model, x, y, eps)
    # the model's own objective, with its draw replaced by ours
    real_randn = torch.randn
    torch.randn = lambda *a, **k: eps.clone()
    try:
        terms = model(x, y.times, targets=y)
    finally:
        torch.randn = real_randn
    assert torch.allclose(loss, terms.neg_elbo / terms.count, rtol=1e-12, atol=0)
    # the loss depends on the parameters only through the outputs: a function of o alone
    o = outputs.detach().requires_grad_(True)
    sizes = [outputs.numel() - 8, 4, 4]

    def loss_of(o):
        from node_ocp.models.latent import bound_per_series, observation_log_likelihood

        p, mu, std = o.split(sizes)
        mask = torch.cat([x.mask, y.mask], 1)
        values = torch.cat([x.values, y.values], 1)
        ll = observation_log_likelihood(p.view(1, 2, 5, 2), values, mask, model.obs_std)
        z = mu.view(2, 2) + std.view(2, 2) * eps
        return -bound_per_series(ll, z, mu.view(2, 2), std.view(2, 2), 0.7).sum() / mask.sum()

    assert torch.allclose(loss_of(o), loss, rtol=1e-12, atol=0)
    hess = torch.autograd.functional.hessian(loss_of, o)
    assert torch.allclose(hess, torch.diag(hdiag), rtol=1e-10, atol=1e-12)
    # and the gradient through the outputs is the loss's whole gradient
    params = [p for p in model.parameters()]
    g_direct = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    (g_o,) = torch.autograd.grad(loss, outputs, retain_graph=True)
    g_chain = torch.autograd.grad(outputs, params, grad_outputs=g_o, allow_unused=True)
    for a, b in zip(g_direct, g_chain):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_coupled_rescale_minimises_the_coupled_model_over_its_directions():
    """CoupledRescale.combine: ``DᵀGD`` against the dense GGN, and the coefficients solve the
    damped model ``(DᵀGD + λ diag) c = −Dᵀg`` (float64, the tiny ODE-RNN)."""
    dc = _module()
    model, x, y = _tiny()
    params, theta, _, h, dense = _dense_ggn(dc, model, x, y)
    gen = torch.Generator().manual_seed(2)
    dirs = [torch.randn(theta.numel(), generator=gen, dtype=torch.float64) for _ in range(4)]
    g = torch.randn(theta.numel(), generator=gen, dtype=torch.float64)
    cr = dc.CoupledRescale(model, blocks="parts")
    gn = dc.GaussNewton(model(x, y.times), params, h)
    for lam in (0.0, 0.3):
        c, mat, b = cr.combine(dirs, g, gn, h, lam)
        d = torch.stack(dirs, 1)
        assert torch.allclose(mat, d.T @ dense @ d, rtol=1e-8, atol=1e-12)
        assert torch.allclose(b, d.T @ g)
        damped = mat + lam * torch.diag(mat.diagonal())
        assert torch.allclose(damped @ c, -b, rtol=1e-6, atol=1e-9)
    assert cr.products == 8


def test_coupled_rescale_refuses_an_unknown_base_direction():
    dc = _module()
    model, _, _ = _tiny()
    with pytest.raises(ValueError, match="base: received 'lion'"):
        dc.CoupledRescale(model, base="lion")
