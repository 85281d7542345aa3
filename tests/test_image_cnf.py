"""Image CNFs: dequantisation and logit log-determinants against autograd, bits per dimension
of a known density against the closed form, squeeze and the factored-out likelihood against
hand computations, sampling, training through `train`, OCNOpt's Kronecker factors on the conv
field (against brute force)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ocnopt_step
from torch import nn
from torchdiffeq import odeint
from train_helpers import write_toml  # noqa: I001  (tests/ is on sys.path)

import node_ocp as no
from node_ocp.models import ImageCNF, standard_normal_logprob, time_conv
from node_ocp.models.cnf import CNFDynamics
from node_ocp.models.image_cnf import (
    FlatImageField,
    grey_levels,
    inverse_logit,
    logit_transform,
    squeeze,
    unsqueeze,
)
from node_ocp.train import ConfigError, RunOptions, build_task, load_config, read_metrics, train

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
TIGHT = dict(rtol=1e-10, atol=1e-10)


def _images(n, shape, levels, seed=0):
    """Images on the grid k / (L − 1) and a dequantisation draw, float64."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, levels, (n, *shape), generator=g).to(F64)
    return k / (levels - 1), torch.rand(n, *shape, generator=g, dtype=F64)


def _zero_fields(flow):
    """Make every block's field f = 0 (the last conv layer and its time bias zeroed)."""
    with torch.no_grad():
        for block in flow.blocks:
            last = block.field.net.net.layers[-1]
            last.conv.weight.zero_()
            last.conv.bias.zero_()
            last.hyper_bias.weight.zero_()


# ---------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_dequantisation_and_logit_log_det_equals_the_autograd_jacobian(alpha):
    levels = 17
    x, u = _images(3, (2, 2, 2), levels)
    v = grey_levels(x, levels) + u  # level units
    w, logdet = logit_transform(v, levels, alpha)
    p = alpha + (1 - 2 * alpha) * v / levels
    assert torch.allclose(w, torch.log(p / (1 - p)), atol=1e-12)
    assert torch.allclose(inverse_logit(w, alpha), v / levels, atol=1e-10)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(
            lambda vb: logit_transform(vb[None], levels, alpha)[0][0], v[b]
        ).reshape(8, 8)
        sign, ref = torch.linalg.slogdet(jac)
        assert sign > 0
        assert torch.allclose(logdet[b], ref, rtol=1e-12, atol=1e-9)


def test_grey_levels_refuse_values_off_the_grid():
    assert torch.equal(grey_levels(torch.tensor([0.0, 0.5, 1.0]), 17), torch.tensor([0.0, 8, 16]))
    with pytest.raises(ValueError, match=r"x: .*k / 16 for integers k = 0\.\.16"):
        grey_levels(torch.tensor([0.03]), 17)
    with pytest.raises(ValueError, match=r"x: "):
        grey_levels(torch.tensor([1.5]), 17)


@pytest.mark.parametrize("scales, shape", [(1, (1, 2, 2)), (2, (1, 4, 4))])
def test_bits_per_dim_of_a_standard_normal_in_logit_space_equal_the_closed_form(scales, shape):
    """Zero fields: z is the logit image (up to the order of its values), so log p(v) is
    log N(w; 0, I) + log|∂w/∂v| with both written out by hand."""
    torch.manual_seed(0)
    levels, alpha = 17, 0.05
    flow = ImageCNF(shape, levels, hidden=(3,), scales=scales, alpha=alpha, **TIGHT).double()
    _zero_fields(flow)
    x, u = _images(4, shape, levels)
    dims = math.prod(shape)
    y = (x * (levels - 1) + u) / levels
    p = alpha + (1 - 2 * alpha) * y
    w = torch.log(p) - torch.log(1 - p)
    log_normal = (-0.5 * w**2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    log_det = (math.log(1 - 2 * alpha) - torch.log(p * (1 - p))).flatten(1).sum(1)
    log_p = log_normal + log_det - dims * math.log(levels)
    bpd = -log_p.mean() / (dims * math.log(2))
    assert torch.allclose(flow.log_prob(x, noise=u), log_p, rtol=1e-10)
    assert torch.allclose(flow.bits_per_dim(x, noise=u), bpd, rtol=1e-10)


# ---------------------------------------------------------------------- multiscale
def test_squeeze_layout_and_its_inverse():
    x = torch.randn(2, 3, 4, 6, dtype=F64)
    s = squeeze(x)
    assert s.shape == (2, 12, 2, 3)
    for c, i, j, h, w in [(0, 0, 0, 0, 0), (1, 1, 0, 1, 2), (2, 0, 1, 1, 1), (2, 1, 1, 0, 2)]:
        assert s[:, 4 * c + 2 * i + j, h, w].equal(x[:, c, 2 * h + i, 2 * w + j])
    assert torch.equal(unsqueeze(s), x)
    y = torch.randn(2, 8, 3, 3, dtype=F64)
    assert torch.equal(squeeze(unsqueeze(y)), y)
    with pytest.raises(ValueError, match="even height and width"):
        squeeze(torch.zeros(1, 1, 3, 4))


class ScaledIdentity(nn.Module):
    """f(t, z) = a z: the flow map is e^{aT} z and Δlogp = −a D T (the trace)."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=F64))

    def forward(self, t, z):
        return self.a * z


def test_multiscale_log_likelihood_counts_the_factored_out_dimensions():
    levels, alpha, horizon = 256, 1e-6, 0.7
    flow = ImageCNF(
        (1, 4, 4), levels, hidden=(3,), scales=2, horizon=horizon, alpha=alpha, **TIGHT
    ).double()
    a, b = -0.4, 0.3
    flow.scales[0][0].field.net = ScaledIdentity(a)
    flow.scales[1][0].field.net = ScaledIdentity(b)
    x, u = _images(3, (1, 4, 4), levels)
    z, dlogp, _ = flow(x, noise=u)
    # by hand: scale 0 scales the logit image by e^{aT}; the squeeze puts each 2x2 patch's
    # top row (channels 0, 1) out to N(0, I) and the bottom row on to scale 1, which scales
    # it by e^{bT}
    w, logdet = logit_transform(x * (levels - 1) + u, levels, alpha)
    h0 = math.exp(a * horizon) * w
    top = torch.stack([h0[:, 0, 0::2, 0::2], h0[:, 0, 0::2, 1::2]], 1).reshape(3, -1)
    bottom = torch.stack([h0[:, 0, 1::2, 0::2], h0[:, 0, 1::2, 1::2]], 1).reshape(3, -1)
    out = math.exp(b * horizon) * bottom
    assert torch.allclose(z[:, :8], top, atol=1e-9) and torch.allclose(z[:, 8:], out, atol=1e-9)
    log_p = (
        standard_normal_logprob(top)  # the factored-out dimensions
        + standard_normal_logprob(out)
        + a * 16 * horizon  # log|det| of scale 0: tr(a I_16) T
        + b * 8 * horizon
        + logdet
    )
    assert torch.allclose(flow.log_prob(x, noise=u), log_p, rtol=1e-9)
    assert torch.allclose(dlogp, -(a * 16 + b * 8) * horizon - logdet, rtol=1e-9)


@pytest.mark.parametrize("scales", [1, 2])
def test_samples_have_the_image_shape_and_round_trip_to_a_finite_log_prob(scales):
    torch.manual_seed(0)
    flow = ImageCNF((1, 4, 4), 17, hidden=(4,), scales=scales, rtol=1e-4, atol=1e-4)
    images = flow.sample(5, generator=torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, 4, 4)
    assert torch.equal(grey_levels(images, 17) / 16, images)  # on the data's grid
    assert torch.isfinite(flow.log_prob(images)).all()
    smooth = flow.sample(3, quantize=False)
    assert smooth.shape == (3, 1, 4, 4) and 0 <= float(smooth.min()) <= float(smooth.max()) <= 1


def test_multiscale_decoding_inverts_the_chain():
    """The continuous decoding of the latent z of a dequantised image is that image (both
    scales: blocks integrated back, factored-out parts put back, squeeze undone)."""
    torch.manual_seed(1)
    flow = ImageCNF((1, 4, 4), 256, hidden=(4,), scales=2, divergence="exact", **TIGHT)
    flow = flow.double()
    x, u = _images(2, (1, 4, 4), 256)
    z, _, _ = flow(x, noise=u)
    assert torch.allclose(flow.decode(z, quantize=False), (x * 255 + u) / 256, atol=1e-8)
    assert torch.equal(flow.decode(z), x)  # floor(v) = k: the data themselves
    with pytest.raises(ValueError, match=r"z: .*latents of shape \(n, 16\)"):
        flow.decode(z[:, :8])


def test_model_errors():
    with pytest.raises(ValueError, match=r"scales: received 3; accepted: .* divisible by 2\^"):
        ImageCNF((1, 6, 6), scales=3)
    with pytest.raises(ValueError, match=r"alpha: received 0.5"):
        ImageCNF((1, 4, 4), alpha=0.5)
    with pytest.raises(ValueError, match=r"levels: received 1"):
        ImageCNF((1, 4, 4), levels=1)
    with pytest.raises(ValueError, match=r"x: .*a batch of images of shape \(N, 1, 4, 4\)"):
        ImageCNF((1, 4, 4))(torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match=r"layer: received 'dense'"):
        time_conv(2, (4,), layer="dense")


def test_regularisers_are_the_vector_cnfs():
    """kinetic/jacobian weights give the same channels as the vector CNF's: with
    jacobian only, a zero kinetic channel is kept and the regulariser is positive."""
    torch.manual_seed(0)
    x, _ = _images(3, (1, 4, 4), 17)
    for kinetic, jacobian, extra in [(0.1, 0.0, 1), (0.0, 0.2, 2), (0.1, 0.2, 2)]:
        flow = ImageCNF((1, 4, 4), 17, hidden=(4,), kinetic=kinetic, jacobian=jacobian)
        assert all(b.field.extra == extra for b in flow.blocks)
        _, _, reg = flow(x.float())
        assert reg.shape == (3,) and bool((reg > 0).all())


# ---------------------------------------------------------------------- training
def _config_dict(name: str, steps: int = 2) -> dict:
    import tomllib

    cfg = tomllib.loads((ROOT / "configs" / name).read_text())
    cfg["train"].update(steps=steps, eval_every=1, checkpoint_every=1, batch_size=16)
    cfg["model"]["hidden"] = [4]
    cfg["solver"].update(rtol=1e-2, atol=1e-2)
    return cfg


@pytest.mark.parametrize("name", ["cnf_digits_image.toml", "cnf_digits_image_multiscale.toml"])
@pytest.mark.parametrize("optimizer", ["ocnopt", "adam"])
def test_each_config_trains_two_steps_and_reports_bits_per_dim(name, optimizer, tmp_path):
    from node_ocp.cli import main

    cfg = write_toml(tmp_path / name, _config_dict(name))
    out = tmp_path / "run"
    args = ["train", str(cfg), "--out", str(out), "--no-progress", "--optimizer", optimizer]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "bpd" and summary["task"] == "image_density"
    assert summary["steps"] == 2 and not summary["diverged"]
    assert 0 < summary["test_metric"] < 20 and set(summary["test"]) == {"bpd", "nll"}
    # bits per dimension are the NLL in nats per image over D ln 2 (D = 64)
    assert math.isclose(summary["test"]["bpd"], summary["test"]["nll"] / (64 * math.log(2)))
    records = read_metrics(out)
    assert {"val_bpd", "val_nll"} <= set(records[-1])
    assert (out / "samples.png").stat().st_size > 1000
    (out / "samples.png").unlink()
    from node_ocp.train.report import plot

    assert "samples.png" in plot(out) and (out / "samples.png").exists()  # `node-ocp plot`


def test_image_files_train_with_their_grey_levels(tmp_path):
    """IDX images (MNIST's format, 8-bit: 256 levels) and float .npz images with levels."""
    rng = np.random.default_rng(0)
    n, side = 24, 4
    raw = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
    idx = tmp_path / "train-images-idx3-ubyte"
    idx.write_bytes(
        bytes([0, 0, 0x08, 3]) + np.array([n, side, side], ">u4").tobytes() + raw.tobytes()
    )
    cfg = _config_dict("cnf_digits_image.toml")
    cfg["task"] = {"kind": "image_density", "dataset": "file", "path": str(idx)}
    config = load_config(write_toml(tmp_path / "own.toml", cfg))
    task = build_task(config)
    assert task.data.info["levels"] == 256 and task.model.levels == 256
    assert task.data.train.x.shape[1:] == (1, side, side)
    summary = train(config, tmp_path / "run", RunOptions(progress=False))
    assert summary["metric"] == "bpd" and math.isfinite(summary["test_metric"])

    npz = tmp_path / "own.npz"
    np.savez(npz, x=rng.integers(0, 5, (n, 1, side, side)) / 4.0)
    cfg["task"] = {"kind": "image_density", "dataset": "file", "path": str(npz)}
    with pytest.raises(ConfigError, match=r"\[task\]\.levels: own\.npz holds float64 images"):
        build_task(load_config(write_toml(tmp_path / "npz.toml", cfg)))
    cfg["task"]["levels"] = 5
    assert build_task(load_config(write_toml(tmp_path / "npz5.toml", cfg))).model.levels == 5
    cfg["task"]["levels"] = 4
    with pytest.raises(ConfigError, match=r"\[task\]\.levels: own\.npz holds values from 0"):
        build_task(load_config(write_toml(tmp_path / "npz4.toml", cfg)))


def test_config_errors_name_the_key(tmp_path):
    cfg = _config_dict("cnf_digits_image_multiscale.toml")
    cfg["model"]["scales"] = 5
    with pytest.raises(ConfigError, match=r"\[model\]\.scales: received 5 for 8x8 images"):
        build_task(load_config(write_toml(tmp_path / "a.toml", cfg)))
    cfg = _config_dict("cnf_digits_image.toml")
    cfg["task"]["levels"] = 256
    with pytest.raises(ConfigError, match=r"\[task\]\.levels: received 256 for dataset 'digits'"):
        build_task(load_config(write_toml(tmp_path / "b.toml", cfg)))
    cfg = _config_dict("cnf_digits_image.toml")
    cfg["model"]["kind"] = "cnf"
    with pytest.raises(ConfigError, match=r"\[model\]\.kind: received 'cnf' for task kind"):
        load_config(write_toml(tmp_path / "c.toml", cfg))


# ---------------------------------------------------------------------- OCNOpt
@pytest.mark.parametrize("scales", [1, 2])
def test_ocnopt_step_gives_every_conv_layer_kronecker_factors(scales):
    from node_ocp.optim.curvatures.kronecker import KroneckerUnit

    torch.manual_seed(0)
    flow = ImageCNF((1, 4, 4), 17, hidden=(4,), scales=scales, rtol=1e-3, atol=1e-3)
    x, _ = _images(16, (1, 4, 4), 17)
    x = x.float()
    opt = no.OCNOpt(flow)  # the default: ekfac, time-joint factors from the backward solves

    def compute():
        z, dlogp, reg = flow(x)
        return -(standard_normal_logprob(z) - dlogp).mean() + reg.mean(), z

    before = [p.detach().clone() for p in flow.parameters()]
    ocnopt_step(opt, compute, "standard_normal")
    assert opt.steps_taken == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, flow.parameters()))
    units = {u.module: u for u in opt.units if getattr(u, "module", None) is not None}
    for block in flow.blocks:  # every scale's block
        convs = [m for m in block.field.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 2
        for m in convs:
            assert isinstance(units.get(m), KroneckerUnit) and units[m].ready
            assert float(units[m].state["kron_eB"].max()) > 0
            assert float(units[m].state["kron_eA"].max()) > 0


def _flow(field, s0, t0, t1):
    """s(t1) from s(t0) = s0 by fine fixed-step rk4 (error ~1e-10), backprop-able."""
    steps = max(1, math.ceil(abs(t1 - t0) / 5e-3))
    grid = torch.tensor([t0, t1], dtype=F64)
    return odeint(field, s0, grid, method="rk4", options={"step_size": abs(t1 - t0) / steps})[-1]


def test_concat_squash_conv_field_time_joint_factors_equal_brute_force():
    """The image CNF's field (concat-squash convs inside the CNF dynamics with the exact
    divergence, state flattened): A and B of both convs on a 2-point sample grid against
    sums written out from brute-force trajectories and adjoints (empirical source)."""
    torch.manual_seed(2)
    shape, d = (1, 3, 3), 9
    net = time_conv(1, (2,), "tanh")
    dyn = CNFDynamics(FlatImageField(net, shape), d, "exact").double()
    t1, dt = 0.3, 0.15
    block = no.ODEBlock(dyn, (0.0, t1), **TIGHT)
    s0 = torch.cat([torch.randn(2, d, dtype=F64), torch.zeros(2, 1, dtype=F64)], 1)

    def loss_of(s):  # the CNF's NLL: a standard normal on z, minus Δlogp
        return -(standard_normal_logprob(s[:, :d]) - s[:, d]).sum()

    capture = no.CurvatureCapture(sample_dt=dt)
    with capture.active(block):
        loss_of(block(s0)).backward()
    conv1, conv2 = (m for m in net.modules() if isinstance(m, nn.Conv2d))
    sums = {}
    for m in (conv1, conv2):
        k = m.weight[0].numel() + 1  # C_in·3·3 patch values and the bias' 1
        sums[m] = [torch.zeros(k, k, dtype=F64), torch.zeros(m.out_channels, m.out_channels)]
        sums[m][1] = sums[m][1].to(F64)
    times = [t1 - (j + 0.5) * dt for j in range(2)]
    for tj in times:
        sj = _flow(dyn, s0, 0.0, tj).detach().requires_grad_(True)
        a = torch.autograd.grad(loss_of(_flow(dyn, sj, tj, t1)), sj)[0]  # adjoint at t_j
        outs = {}

        def keep(mod, inp, out, outs=outs):
            outs.setdefault(mod, (inp[0], out))  # the forward evaluation's call, not the VJPs'

        hooks = [m.register_forward_hook(keep) for m in (conv1, conv2)]
        try:
            with torch.enable_grad():
                s_in = sj.detach().requires_grad_(True)
                f = dyn(torch.tensor(tj, dtype=F64), s_in)
        finally:
            for h in hooks:
                h.remove()
        grads = torch.autograd.grad(f, [outs[m][1] for m in (conv1, conv2)], a)
        for m, g in zip((conv1, conv2), grads):
            u = outs[m][0].detach()
            cols = torch.nn.functional.unfold(u, 3, padding=1).transpose(1, 2)  # (B, L, K)
            rows = torch.cat([cols, torch.ones(*cols.shape[:2], 1, dtype=F64)], 2).reshape(
                -1, cols.shape[2] + 1
            )
            go = g.permute(0, 2, 3, 1).reshape(-1, m.out_channels)
            sums[m][0] += dt * rows.T @ rows
            sums[m][1] += dt * go.T @ go
    for m in (conv1, conv2):
        k = capture.kronecker[m]
        assert torch.allclose(k.A, sums[m][0], rtol=1e-7, atol=1e-10)
        assert torch.allclose(k.B, sums[m][1], rtol=1e-7, atol=1e-10)
        assert k.samples == 2 and k.rows == 2 * 9 and abs(k.time - t1) < 1e-12


def test_factor_sources_on_the_multiscale_chain():
    """The factored-out parts reach the output beside the last block, which the exact
    factor chain cannot follow (one line); the sampled source's own backward pass can."""
    torch.manual_seed(0)
    x, _ = _images(8, (1, 4, 4), 17)
    for factors in ("sampled", "exact"):
        flow = ImageCNF((1, 4, 4), 17, hidden=(4,), scales=2, rtol=1e-3, atol=1e-3)
        opt = no.OCNOpt(flow, factors=factors)

        def compute(flow=flow):
            z, dlogp, _ = flow(x.float())
            return -(standard_normal_logprob(z) - dlogp).mean(), z

        if factors == "exact":
            with pytest.raises(ValueError, match=r"factors='exact': the model output depends"):
                ocnopt_step(opt, compute, "standard_normal")
        else:
            ocnopt_step(opt, compute, "standard_normal")
            assert opt.steps_taken == 1
