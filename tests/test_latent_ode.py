"""The latent ODE: its bound, recognition backward in time and decoding against independent
computations (torch.distributions, per-series torchdiffeq solves, backprop through the
solver), the interpolation splits, and training from a config with both optimizers."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torchdiffeq import odeint
from train_helpers import tiny, write_toml

from node_ocp import OCNOpt
from node_ocp.data import collate_irregular, file_series_forecast, procedural_forecast
from node_ocp.data.forecast import kept_and_held_out
from node_ocp.models import LatentODE
from node_ocp.models.latent import bound_per_series, gaussian_kl
from node_ocp.train import RunOptions, config_from_dict, train
from node_ocp.train.config import ConfigError, load_config
from node_ocp.train.loop import read_metrics
from node_ocp.train.tasks import build_task

TIGHT = {"method": "dopri5", "rtol": 1e-10, "atol": 1e-10}


def _model(**kw):
    torch.manual_seed(0)
    args = dict(latent=3, hidden=5, encoder_hidden=(6,), field_hidden=(7,), decoder_hidden=(4,))
    return LatentODE(2, **{**args, **TIGHT, **kw}).double()


def _series():
    """Three series of 4, 2 and 3 points (padding in the batch), 2 channels, one value
    missing."""
    g = torch.Generator().manual_seed(1)
    items = []
    for times in ([0.0, 0.3, 0.5, 0.9], [0.1, 0.7], [0.0, 0.4, 0.6]):
        t = torch.tensor(times, dtype=torch.float64)
        items.append((t, torch.randn(len(times), 2, generator=g, dtype=torch.float64), None))
    v = items[0][1].clone()
    v[1, 0] = float("nan")  # an unobserved channel
    items[0] = (items[0][0], v, None)
    return collate_irregular(items)


def test_kl_in_closed_form_matches_torch_distributions():
    mu = torch.randn(4, 3, dtype=torch.float64)
    std = torch.rand(4, 3, dtype=torch.float64) + 0.1
    want = kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, std), want)


def test_importance_weighted_bound_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    k, b, n = 5, 3, 2
    mu = torch.randn(b, n, generator=g, dtype=torch.float64)
    std = torch.rand(b, n, generator=g, dtype=torch.float64) + 0.2
    z = mu + std * torch.randn(k, b, n, generator=g, dtype=torch.float64)
    log_lik = torch.randn(k, b, generator=g, dtype=torch.float64)
    for w in (1.0, 0.3):
        log_w = [
            [
                float(log_lik[i, j])
                + w * float(Normal(0.0, 1.0).log_prob(z[i, j]).sum())
                - w * float(Normal(mu[j], std[j]).log_prob(z[i, j]).sum())
                for j in range(b)
            ]
            for i in range(k)
        ]
        want = [math.log(sum(math.exp(log_w[i][j]) for i in range(k)) / k) for j in range(b)]
        got = bound_per_series(log_lik, z, mu, std, w)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    # one draw: the closed-form KL, not the one-sample estimate
    one = bound_per_series(log_lik[:1], z[:1], mu, std, 0.5)
    torch.testing.assert_close(one, log_lik[0] - 0.5 * gaussian_kl(mu, std))


def test_recognition_reads_each_series_backward_in_time_to_zero():
    m, batch = _model(), _series()
    with torch.no_grad():
        mu, std = m.posterior(batch)
        enc = m.encoder
        for b in range(len(batch)):
            valid = batch.valid[b]
            t, v, mask = batch.times[b][valid], batch.values[b][valid], batch.mask[b][valid]
            h = torch.zeros(1, enc.hidden, dtype=torch.float64)
            for i in reversed(range(len(t))):  # from the last observation back to the first
                x = torch.cat([v[i] * mask[i], mask[i].double()])[None]
                h = enc.gru(x, h)
                s_next = -float(t[i - 1]) if i > 0 else 0.0
                span = torch.tensor([-float(t[i]), s_next], dtype=torch.float64)
                if span[1] > span[0]:  # reversed time s = -t runs forward
                    h = odeint(enc.ode.field, h, span, rtol=1e-10, atol=1e-10)[-1]
            out = enc.head(h)[0]
            torch.testing.assert_close(mu[b], out[:3], rtol=1e-7, atol=1e-8)
            want_std = torch.nn.functional.softplus(out[3:]) + 1e-4
            torch.testing.assert_close(std[b], want_std, rtol=1e-7, atol=1e-8)


def test_decoding_matches_a_separate_solve_per_series_and_time():
    m = _model()
    z0 = torch.randn(2, 3, 3, dtype=torch.float64)  # K = 2 draws, B = 3 series
    times = torch.tensor([[0.5, 0.0, 0.9], [0.2, 0.2, 0.7], [1.3, 0.4, 0.1]], dtype=torch.float64)
    with torch.no_grad():
        got = m.decode(z0, times)
        for k in range(2):
            for b in range(3):
                for p in range(3):
                    t = float(times[b, p])
                    z = z0[k, b]
                    if t > 0:
                        grid = torch.tensor([0.0, t], dtype=torch.float64)
                        z = odeint(m.ode.field, z[None], grid, rtol=1e-10, atol=1e-10)[-1, 0]
                    torch.testing.assert_close(got[k, b, p], m.decoder(z), rtol=1e-7, atol=1e-8)


def test_a_fixed_grid_forecast_steps_on_the_observed_and_query_times():
    """rk4 steps on the times it is given: the forecast is solved over the batch's own times
    with the query times, as the bound is in training, not in one step from 0 to the first
    query time (which gave a forecast far from the one the trained model makes)."""
    m, batch = _model(method="rk4"), _series()
    query = torch.tensor([[1.0, 1.4], [0.9, 1.1], [1.2, 1.3]], dtype=torch.float64)
    with torch.no_grad():
        mu, _ = m.posterior(batch)
        got = m(batch, query)
        grid = torch.unique(
            torch.cat(
                [torch.zeros(1, dtype=torch.float64), batch.times.reshape(-1), query.reshape(-1)]
            )
        )
        path = odeint(m.ode.field, mu, grid, method="rk4")  # (T, B, L), by hand
        for b in range(3):
            for q in range(2):
                z = path[int((grid == query[b, q]).nonzero()), b]
                torch.testing.assert_close(got[b, q], m.decoder(z), rtol=1e-12, atol=1e-12)
        coarse = m.decode(mu[None], query)[0]  # the query times alone: another solve
    assert not torch.allclose(got, coarse, rtol=1e-6, atol=1e-8)


def test_the_bound_equals_its_hand_computation():
    m, batch = _model(samples=1), _series()
    g = torch.Generator().manual_seed(3)
    targets = collate_irregular(
        [
            (torch.tensor([1.0, 1.2]), torch.randn(2, 2, generator=g), None),
            (torch.tensor([0.8]), torch.randn(1, 2, generator=g), None),
            (torch.tensor([0.2, 0.9]), torch.randn(2, 2, generator=g), None),
        ]
    )
    targets = type(targets)(targets.times.double(), targets.values.double(), targets.mask)
    torch.manual_seed(5)
    with torch.no_grad():
        out = m(batch, targets.times, targets=targets, kl_weight=0.7)
        torch.manual_seed(5)
        mu, std = m.posterior(batch)
        z = mu + std * torch.randn(1, *mu.shape, dtype=torch.float64)
        total, count = 0.0, 0
        for part in (batch, targets):
            preds = m.decode(z, part.times)[0]
            lp = Normal(preds, m.obs_std).log_prob(part.values)
            total += float((lp * part.mask).sum())
            count += int(part.mask.sum())
        kl = float(kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).sum())
    assert float(out.neg_elbo) == pytest.approx(-(total - 0.7 * kl), rel=1e-10)
    assert float(out.count) == count == 2 * 9 - 1 + 2 * 5  # one value of the batch unobserved
    assert out.outputs.shape == (3, 4 + 2, 2)  # (K·B, padded points of x and y, C)


@pytest.mark.parametrize("samples", [1, 3])
def test_own_adjoint_gradient_of_the_bound_matches_backprop_through_the_solver(samples):
    batch = _series()
    grads = []
    for gradient in ("adjoint", "direct"):
        m = _model(samples=samples, gradient=gradient)
        torch.manual_seed(7)
        out = m(batch, batch.times, targets=batch)
        grads.append(torch.autograd.grad(out.neg_elbo, list(m.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bad_input_names_the_argument():
    m, batch = _model(), _series()
    with pytest.raises(ValueError, match=r"^query_times: received .*times >= 0"):
        m(batch, -torch.ones(3, 1, dtype=torch.float64))
    shifted = type(batch)(batch.times - 1.0, batch.values, batch.mask)
    with pytest.raises(ValueError, match=r"^batch.times: received .*shift the series"):
        m.posterior(shifted)
    with pytest.raises(ValueError, match=r"^latent: received 0"):
        LatentODE(2, latent=0)
    with pytest.raises(ValueError, match=r"^obs_std: received"):
        LatentODE(2, obs_std=0.0)


def test_interpolation_splits_partition_each_series():
    t = torch.linspace(0, 1, 12)
    v = torch.randn(5, 12, 1)
    v[2, 9:] = float("nan")  # a shorter series
    g1, g2 = (torch.Generator().manual_seed(4) for _ in range(2))
    kept, held = kept_and_held_out(t, v, 0.4, g1)
    again, _ = kept_and_held_out(t, v, 0.4, g2)
    torch.testing.assert_close(kept.times, again.times)
    for b in range(5):
        tk = kept.times[b][kept.valid[b]].tolist()
        th = held.times[b][held.valid[b]].tolist()
        n = 9 if b == 2 else 12
        assert tk and th and not set(tk) & set(th)
        assert sorted(tk + th) == pytest.approx(t[:n].tolist())
        for tt, vv in ((tk, kept), (th, held)):
            idx = [int(round(x * 11)) for x in tt]
            torch.testing.assert_close(vv.values[b][vv.valid[b]], v[b, idx])
    with pytest.raises(ValueError, match=r"^drop: received 0.0"):
        kept_and_held_out(t, v, 0.0, g1)
    data = procedural_forecast("spiral", 8, 4, 4, 20, drop=0.3, predict="interpolate")
    x, y = data.train.x, data.train.y
    assert int(x.valid.sum() + y.valid.sum()) == 8 * 20


def test_interpolation_from_a_long_csv(tmp_path):
    rows = ["series,time,a"]
    for s in range(10):
        for i in range(6):
            rows.append(f"s{s},{i * 0.5},{math.sin(s + i):.6f}")
    (tmp_path / "long.csv").write_text("\n".join(rows) + "\n")
    data = file_series_forecast(tmp_path / "long.csv", drop=0.5, predict="interpolate")
    for split in (data.train, data.val, data.test):
        x, y = split.x, split.y
        assert bool(x.valid.any(1).all()) and bool(y.valid.any(1).all())
        assert (x.valid.sum(1) + y.valid.sum(1)).tolist() == [6] * len(x)
    rows = ["series,time,a", "s0,0,1.0", "s0,1,2.0", "s1,0,1.0"]
    rows += [f"s{s},{i},{i}.5" for s in (2, 3, 4) for i in range(3)]
    (tmp_path / "short.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"^path: .*series 's1' has 1 time point"):
        file_series_forecast(tmp_path / "short.csv", drop=0.5, predict="interpolate")


def _latent_cfg(**over):
    base = {
        "task.kind": "forecast",
        "task.dataset": "spiral",
        "task.length": 16,
        "task.drop": 0.5,
        "task.n_train": 64,
        "task.n_val": 16,
        "task.n_test": 16,
        "model.kind": "latent_ode",
        "model.width": 8,
        "model.hidden": [8],
        "model.latent": 3,
        "solver.method": "rk4",
        "train.batch_size": 16,
        "train.steps": 6,
        "train.eval_every": 2,
        "train.checkpoint_every": 2,
    }
    return tiny(**{**base, **over})


def test_config_errors_name_the_key(tmp_path):
    for over, pattern in (
        ({"task.predict": "interpolate", "task.drop": 0.0}, r"^\[task\]\.drop: received 0.0"),
        ({"task.predict": "sideways"}, r"^\[task\]\.predict: received 'sideways'"),
        ({"model.latent": 0}, r"^\[model\]\.latent: received 0"),
        ({"model.obs_std": 0.0}, r"^\[model\]\.obs_std: received 0.0"),
    ):
        with pytest.raises(ConfigError, match=pattern):
            config_from_dict(_latent_cfg(**over))
    cfg = tiny(**{"task.kind": "classification", "task.dataset": "spirals"})
    cfg["model"] = {"kind": "latent_ode"}
    with pytest.raises(ConfigError, match=r"latent_ode"):
        config_from_dict(cfg)
    cde = _latent_cfg(**{"model.kind": "cde", "task.predict": "interpolate"})
    with pytest.raises(ConfigError, match=r"^\[task\]\.predict: received 'interpolate' for"):
        build_task(config_from_dict(cde))


@pytest.mark.parametrize("optimizer", ["adam", "ocnopt"])
def test_a_latent_ode_trains_from_a_config_and_resumes_exactly(tmp_path, optimizer):
    cfg = config_from_dict(_latent_cfg(**{"model.kl_anneal": 4}))
    full, part = tmp_path / "full", tmp_path / "part"
    s = train(cfg, full, RunOptions(optimizer=optimizer, progress=False))
    train(cfg, part, RunOptions(optimizer=optimizer, max_steps=3, progress=False))
    train(cfg, part, RunOptions(max_steps=6, resume=True, progress=False))
    a, b = read_metrics(full), read_metrics(part)
    assert s["metric"] == "mse" and not s["diverged"]
    assert [r["val_elbo"] for r in a] == [r["val_elbo"] for r in b if r["step"] % 2 == 0]
    assert a[-1]["val_mse"] < a[0]["val_mse"]  # it learns (the bound is annealed here)
    # the test metric recomputed by hand: the posterior-mean forecast on the test split
    task = build_task(cfg, "cpu")
    task.model.load_state_dict(torch.load(full / "checkpoint.pt", weights_only=False)["model"])
    test = task.data.test.batch(torch.arange(len(task.data.test)))
    with torch.no_grad():
        err = (task.model(test.x, test.y.times) - test.y.values) ** 2
    want = float((err * test.y.mask).sum() / test.y.mask.sum())
    assert s["test_metric"] == pytest.approx(want, rel=1e-5)


def test_kl_annealing_weight_follows_the_step():
    task = build_task(config_from_dict(_latent_cfg(**{"model.kl_anneal": 4})))
    weights = []
    for step in range(6):
        task.at_step(step)
        weights.append(task.model.kl_weight)
    assert weights == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_interpolation_with_an_odernn_and_a_latent_ode(tmp_path):
    for kind in ("odernn", "latent_ode"):
        over = {"task.predict": "interpolate", "model.kind": kind, "train.steps": 4}
        s = train(
            config_from_dict(_latent_cfg(**over)), tmp_path / kind, RunOptions(progress=False)
        )
        assert math.isfinite(s["test_metric"]) and s["steps"] == 4


def _ocnopt_steps(m, opt, x, y, steps=3) -> tuple[float, float]:
    """``steps`` OCNOpt steps on the bound per observed value, the same posterior draws at
    every evaluation of the batch; the loss before and after."""

    def loss():
        torch.manual_seed(1)
        out = m(x, y.times, targets=y)
        return out.outputs, out.neg_elbo / out.count

    first = float(loss()[1].detach())
    for _ in range(steps):
        opt.zero_grad()
        outputs, value = loss()
        opt.backward(value, outputs=outputs, likelihood="gaussian")
        opt.step(lambda: loss()[1])
    return first, float(loss()[1].detach())


def test_factor_sources_on_the_latent_ode():
    data = procedural_forecast("spiral", 16, 4, 4, 12, drop=0.5)
    x, y = data.train.x, data.train.y
    torch.manual_seed(0)
    m = LatentODE(2, latent=3, hidden=8, encoder_hidden=(8,), field_hidden=(8,), method="rk4")
    first, last = _ocnopt_steps(m, OCNOpt(m, factors="sampled"), x, y)
    assert last < first
    opt = OCNOpt(m, factors="exact")
    out = m(x, y.times, targets=y)
    with pytest.raises(ValueError, match=r"^factors='exact': .*use factors='sampled'"):
        opt.backward(out.neg_elbo / out.count, outputs=out.outputs, likelihood="gaussian")


def test_a_users_csv_with_a_latent_ode(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["series,time,a,b"]
    for s in range(20):
        for i in range(8):
            rows.append(f"s{s},{i},{rng.normal():.4f},{rng.normal():.4f}")
    (tmp_path / "mine.csv").write_text("\n".join(rows) + "\n")
    cfg = _latent_cfg(**{"train.steps": 2})
    cfg["task"] = {"kind": "forecast", "dataset": "file", "path": "mine.csv", "observe": 0.6}
    s = train(load_config(write_toml(tmp_path / "c.toml", cfg)), tmp_path / "r", RunOptions())
    assert math.isfinite(s["test_metric"])


def test_query_grid_spans_what_each_model_predicts():
    from node_ocp.train.forecast_figure import query_grid

    data = procedural_forecast("spiral", 4, 2, 2, 20, observe=0.5, drop=0.3)
    batch = data.test.batch(torch.arange(2))
    x, y = batch.x, batch.y
    future = query_grid(batch, "extrapolate", points=5)
    whole = query_grid(batch, "extrapolate", points=5, whole=True)
    for b in range(2):
        t_obs, t_y = x.times[b][x.valid[b]], y.times[b][y.valid[b]]
        want = torch.linspace(float(t_obs.max()), float(t_y.max()), 5)
        torch.testing.assert_close(future[b], want)
        torch.testing.assert_close(whole[b], torch.linspace(float(t_obs.min()), 1.0, 5))


def test_train_and_compare_draw_the_forecast_figure(tmp_path, capsys):
    from node_ocp.cli import main

    cfg = _latent_cfg(**{"train.steps": 2, "train.eval_every": 1})
    path = write_toml(tmp_path / "latent.toml", cfg)
    assert main(["train", str(path), "--optimizer", "adam", "--out", str(tmp_path / "r")]) == 0
    assert f"figure: {tmp_path / 'r' / 'forecast.png'}" in capsys.readouterr().out
    png = (tmp_path / "r" / "forecast.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    out = tmp_path / "cmp"
    argv = ["compare", str(path), "--optimizers", "adam,ocnopt", "--seeds", "1", "--out", str(out)]
    assert main(argv) == 0
    assert (out / "forecast.png").exists()
    assert "![forecast.png](forecast.png)" in (out / "report.md").read_text()


def test_feedback_runs_over_the_declared_stages():
    data = procedural_forecast("spiral", 16, 4, 4, 12, drop=0.5)
    x, y = data.train.x, data.train.y
    torch.manual_seed(0)
    m = LatentODE(2, latent=3, hidden=8, encoder_hidden=(8,), field_hidden=(8,), method="rk4")
    opt = OCNOpt(m, feedback="gauss_newton")
    first, last = _ocnopt_steps(m, opt, x, y)
    assert opt.feedback_steps >= 1 and opt.feedback_failures == 0
    assert last < first


def test_reparameterised_gradient_matches_a_finite_difference():
    m, batch = _model(samples=2), _series()
    params = list(m.parameters())
    g = torch.Generator().manual_seed(2)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]

    def bound():
        torch.manual_seed(11)  # the same draws of z0 at every evaluation
        return m(batch, batch.times, targets=batch).neg_elbo

    grads = torch.autograd.grad(bound(), params)
    along = sum(float((gr * d).sum()) for gr, d in zip(grads, direction))
    eps = 1e-5
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            values.append(float(bound()))
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    assert (values[0] - values[1]) / (2 * eps) == pytest.approx(along, rel=1e-6)


def test_unobserved_values_change_nothing():
    m, batch = _model(), _series()
    with torch.no_grad():
        mu, std = m.posterior(batch)
        values = batch.values.clone()
        values[~batch.mask] = 123.0  # the unobserved channel and the padding
        other = type(batch)(batch.times, values, batch.mask)
        mu2, std2 = m.posterior(other)
    assert torch.equal(mu, mu2) and torch.equal(std, std2)
    assert int((~batch.mask).sum()) == 2 * 3 + 1  # padding of two series, one channel


class _LinearField(torch.nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(a)

    def forward(self, t, z):
        return z @ self.a.T


def test_linear_field_and_identity_decoder_extrapolate_the_analytic_solution():
    m = LatentODE(3, latent=3, hidden=5, decoder_hidden=(), **TIGHT).double()
    a = torch.tensor([[-0.3, 1.0, 0.0], [-1.0, -0.3, 0.2], [0.0, 0.1, -0.5]], dtype=torch.float64)
    m.ode.field = _LinearField(a)
    with torch.no_grad():
        m.decoder[0].weight.copy_(torch.eye(3))
        m.decoder[0].bias.zero_()
    g = torch.Generator().manual_seed(0)
    batch = collate_irregular(
        [
            (torch.tensor([0.0, 0.2, 0.5]), torch.randn(3, 3, generator=g), None),
            (torch.tensor([0.1, 0.4]), torch.randn(2, 3, generator=g), None),
        ]
    )
    batch = type(batch)(batch.times.double(), batch.values.double(), batch.mask)
    query = torch.tensor([[0.6, 0.9, 1.5], [0.5, 1.0, 2.0]], dtype=torch.float64)
    with torch.no_grad():
        mu, _ = m.posterior(batch)
        got = m(batch, query)
    for b in range(2):
        for q in range(3):
            want = torch.linalg.matrix_exp(a * query[b, q]) @ mu[b]
            torch.testing.assert_close(got[b, q], want, rtol=1e-8, atol=1e-9)


def test_query_grid_of_an_interpolation_spans_observed_and_held_out_points():
    from node_ocp.train.forecast_figure import query_grid

    data = procedural_forecast("oscillator", 4, 2, 2, 20, drop=0.3, predict="interpolate")
    batch = data.test.batch(torch.arange(2))
    grid = query_grid(batch, "interpolate", points=4)
    for b in range(2):
        seen = torch.cat([batch.x.times[b][batch.x.valid[b]], batch.y.times[b][batch.y.valid[b]]])
        torch.testing.assert_close(grid[b], torch.linspace(float(seen.min()), float(seen.max()), 4))


def test_the_latent_ode_says_its_loss_has_a_term_beyond_the_outputs():
    """The bound's KL term is not a function of the decoded outputs, so the task tells the
    training step (OCNOpt's trials then read no Gauss–Newton curvature from the outputs); an
    ODE-RNN forecaster's masked MSE is a function of its outputs alone."""
    from node_ocp.train import build_task

    assert not build_task(config_from_dict(_latent_cfg())).outputs_determine_loss
    assert build_task(
        config_from_dict(_latent_cfg(**{"model.kind": "odernn"}))
    ).outputs_determine_loss
