"""OCNOpt's ``decay_in_model``: the weight decay's curvature inside the held model and its
change inside the trials, against dense matrices and the analytic ridge solution (float64)."""

from collections import defaultdict

import pytest
import torch
from torch import nn
from train_helpers import tiny  # noqa: I001  (tests/ is on sys.path)

import node_ocp as no
from node_ocp.optim.curvatures import Damping
from node_ocp.optim.preconditioner import Preconditioner
from node_ocp.optim.trial import decay_terms
from node_ocp.optim.unit_scales import SCALE_KEY
from node_ocp.train import RunOptions, config_from_dict, train
from node_ocp.train.config import ConfigError
from node_ocp.train.optimizers import resolve_decay

F64 = torch.float64


def _decomposed(curvature: str):
    """A one-layer model whose unit holds a decomposition set by hand, and a calibration
    scale ≠ 1 (so that the decay's ``wd / s`` in the unit's units is exercised)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    pre = Preconditioner(model, curvature, state=defaultdict(dict))
    (unit,) = pre.units.units
    qa, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64))
    qb, _ = torch.linalg.qr(torch.randn(2, 2, dtype=F64))
    ea = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64)
    eb = torch.tensor([0.25, 4.0], dtype=F64)
    unit.set_decomposition([qa, qb, ea, eb], 1.0)
    unit.state[SCALE_KEY] = 2.5
    return model, pre


def _flat(vectors: dict, params) -> torch.Tensor:
    return torch.cat([vectors[p].reshape(-1) for p in params])


def _unflat(x: torch.Tensor, params) -> dict:
    out, i = {}, 0
    for p in params:
        out[p] = x[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _dense_quadratic(pre, params, damping) -> torch.Tensor:
    """The matrix of ``v -> pre.quadratic(v, damping)`` by polarisation, entry by entry."""
    n = sum(p.numel() for p in params)
    eye = torch.eye(n, dtype=F64)

    def q(x):
        return pre.quadratic(_unflat(x, params), damping)

    mat = torch.empty(n, n, dtype=F64)
    for i in range(n):
        for j in range(n):
            mat[i, j] = 0.5 * (q(eye[i] + eye[j]) - q(eye[i]) - q(eye[j]))
    return mat


@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
def test_decay_adds_wd_identity_to_the_held_model_and_its_solve(curvature):
    model, pre = _decomposed(curvature)
    params = list(model.parameters())
    damping = Damping(1e-1, True)
    wd = 0.3
    plain = _dense_quadratic(pre, params, damping)
    pre.decay = {p: wd for p in params}
    decayed = _dense_quadratic(pre, params, damping)
    n = plain.shape[0]
    eye = torch.eye(n, dtype=F64)
    if curvature == "ekfac":  # Σ s vᵀ(C + λ + wd/s)v = Σ s vᵀ(C + λ)v + wd |v|²
        assert torch.allclose(decayed, plain + wd * eye, atol=1e-10)
    else:  # K-FAC splits every shift between its factors (π-balanced Tikhonov), the decay too
        pre.decay = {}
        shifted = Damping(1e-1 + wd / (2.5 * pre.units.units[0].scale()), True)
        assert torch.allclose(decayed, _dense_quadratic(pre, params, shifted), atol=1e-10)
        assert not torch.allclose(decayed, plain + wd * eye, atol=1e-3)
        pre.decay = {p: wd for p in params}
    g = torch.randn(n, dtype=F64)
    u = _flat(pre.solve(_unflat(g, params), damping), params)
    assert torch.allclose(u, torch.linalg.solve(decayed, g), rtol=1e-9, atol=1e-12)
    # the damping's own share leaves the decay in the model (it is objective, not damping)
    zero = damping.without_damping()
    v = _unflat(torch.randn(n, dtype=F64), params)
    pre.decay = {}
    undamped_plain = pre.quadratic(v, zero)
    pre.decay = {p: wd for p in params}
    flat_v = _flat(v, params)
    if curvature == "ekfac":
        assert pre.quadratic(v, zero) == pytest.approx(
            undamped_plain + wd * float(flat_v @ flat_v), rel=1e-10
        )
    else:
        assert pre.quadratic(v, zero) > undamped_plain


def test_decay_terms_are_the_change_of_the_l2_term():
    torch.manual_seed(1)
    a, b = torch.randn(3, 2, dtype=F64), torch.randn(4, dtype=F64)
    da, db = torch.randn(3, 2, dtype=F64), torch.randn(4, dtype=F64)
    decay = {a: 0.2, b: 0.0}
    alpha = 0.37
    change, curvature = decay_terms(decay, {a: da, b: db}, alpha)

    def l2(x):
        return 0.1 * float((x * x).sum())  # wd/2 |x|² with wd = 0.2

    assert change == pytest.approx(l2(a + alpha * da) - l2(a), rel=1e-12)
    assert curvature == pytest.approx(0.2 * alpha**2 * float((da * da).sum()), rel=1e-12)
    assert decay_terms({}, {a: da}) == (0.0, 0.0)


def _ridge(x, y, wd):
    """``argmin_W mean((xWᵀ + b − y)²) + wd/2 (|W|² + |b|²)`` in closed form."""
    n = x.shape[0]
    xb = torch.cat([x, torch.ones(n, 1, dtype=F64)], dim=1)
    k = y.shape[1]
    # the loss is the mean over all n·k entries: its Hessian in vec(Wᵀ) is 2 XᵀX/(n k)
    h = 2.0 * xb.T @ xb / (n * k) + wd * torch.eye(xb.shape[1], dtype=F64)
    rhs = 2.0 * xb.T @ y / (n * k)
    return torch.linalg.solve(h, rhs)  # (features + 1, k)


def test_ocnopt_with_weight_decay_reaches_the_ridge_solution():
    # (with the decay in the gradient alone, decay_in_model=False, the same run stalls: the
    # trials see only the loss, λ climbs to its bound and the flat column stays near 1.6)
    torch.manual_seed(2)
    x = torch.randn(64, 5, dtype=F64)
    x[:, 4] = 0.0  # a flat direction: only the decay moves its weights
    y = torch.randn(64, 2, dtype=F64)
    model = nn.Linear(5, 2).double()
    with torch.no_grad():
        model.weight[:, 4] = 3.0
    wd = 0.05
    opt = no.OCNOpt(model, weight_decay=wd, decay_in_model=True)

    def loss_of():
        out = model(x)
        return ((out - y) ** 2).mean(), out

    for _ in range(200):
        opt.zero_grad()
        loss, out = loss_of()
        opt.backward(loss, outputs=out, likelihood="gaussian")
        opt.step(loss_of)
    expected = _ridge(x, y, wd)
    got = torch.cat([model.weight.T, model.bias[None, :]], dim=0).detach()
    assert torch.allclose(got, expected, atol=1e-4)
    assert float(model.weight[:, 4].abs().max()) < 1e-4  # the flat column decayed to 0


def test_decay_in_model_is_refused_unless_a_bool():
    with pytest.raises(TypeError, match="decay_in_model"):
        no.OCNOpt(nn.Linear(2, 1), decay_in_model="yes")


# ---------------------------------------------------------------------- the trainer's prior
def _density_run(tmp_path, name: str, **tables):
    """A two-step run of the tiny density task (256 training rows): its summary."""
    cfg = tiny(**{"train.steps": 2})
    for opt, table in tables.items():
        cfg["optimizers"][opt].update(table)
    cfg["train"]["optimizer"] = name
    out = tmp_path / name
    return train(config_from_dict(cfg), out, RunOptions(progress=False)), out


def test_weight_decay_prior_is_one_over_the_training_rows(tmp_path):
    run, out = _density_run(tmp_path, "ocnopt", ocnopt={"weight_decay": "prior"})
    assert run["weight_decay"] == pytest.approx(1 / 256)  # n_train = 256 rows
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == pytest.approx(1 / 256)
    run, _ = _density_run(tmp_path, "adam", adam={"weight_decay": "prior"})
    assert run["weight_decay"] == pytest.approx(1 / 256)


def test_ocnopts_unset_decay_is_the_prior_in_its_model_on_a_likelihood_loss(tmp_path):
    # the tiny density task: a mean NLL per row, so OCNOpt's default is the unit prior
    run, out = _density_run(tmp_path, "ocnopt")
    assert run["weight_decay"] == pytest.approx(1 / 256)
    explicit, out2 = _density_run(
        tmp_path / "x", "ocnopt", ocnopt={"weight_decay": "prior", "decay_in_model": True}
    )
    a = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(out2 / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run, seeded
    off, out3 = _density_run(tmp_path / "o", "ocnopt", ocnopt={"weight_decay": 0.0})
    assert off["weight_decay"] == 0.0
    c = torch.load(out3 / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    assert any(not torch.equal(a[k], c[k]) for k in a)  # and the prior changes the run
    run, _ = _density_run(tmp_path, "adam")
    assert run["weight_decay"] == 0.0  # the baselines get none unless asked


def test_resolve_decay_by_the_tasks_loss():
    from node_ocp.train.task_kinds import ClassificationTask, DensityTask, ForecastTask

    assert DensityTask.nll_per_row and ClassificationTask.nll_per_row
    assert not ForecastTask.nll_per_row  # a squared error: its scale is a chosen noise
    ocnopt = config_from_dict(tiny()).optimizer("ocnopt")
    assert ocnopt.weight_decay is None and not ocnopt.decay_in_model
    assert resolve_decay(ocnopt, 40, False) is ocnopt  # no likelihood: no prior
    auto = resolve_decay(ocnopt, 40, True)
    assert auto.decay == pytest.approx(1 / 40) and auto.decay_in_model
    adam = config_from_dict(tiny()).optimizer("adam")
    assert resolve_decay(adam, 40, True) is adam  # unset stays 0 for the baselines
    cfg = tiny()
    cfg["optimizers"]["adam"]["weight_decay"] = "auto"
    cfg["optimizers"]["ocnopt"]["weight_decay"] = "prior"
    parsed = config_from_dict(cfg)
    adam_auto = parsed.optimizer("adam")
    assert resolve_decay(adam_auto, 40, True).decay == pytest.approx(1 / 40)
    assert resolve_decay(adam_auto, 40, False).decay == 0.0
    prior = parsed.optimizer("ocnopt")
    for nll in (True, False):  # "prior" asks for it whatever the loss
        resolved = resolve_decay(prior, 40, nll)
        assert resolved.decay == pytest.approx(1 / 40) and not resolved.decay_in_model
    cfg = tiny()
    cfg["optimizers"]["ocnopt"]["weight_decay"] = 0.0
    zero = config_from_dict(cfg).optimizer("ocnopt")
    assert resolve_decay(zero, 40, True) is zero  # a number is kept


@pytest.mark.parametrize("value", ["1/N", -0.1, True])
def test_a_bad_weight_decay_is_one_line_naming_it(value):
    cfg = tiny()
    cfg["optimizers"]["ocnopt"]["weight_decay"] = value
    with pytest.raises(ConfigError, match=r"optimizers\.ocnopt\]?\.weight_decay") as err:
        config_from_dict(cfg)
    assert "\n" not in str(err.value) and "prior" in str(err.value) and "auto" in str(err.value)


def test_a_run_from_before_the_auto_decay_resumes_with_the_decay_it_started_with(tmp_path):
    cfg = tiny(**{"train.steps": 2})
    out = tmp_path / "run"
    train(config_from_dict(cfg), out, RunOptions(progress=False))
    path = out / "checkpoint.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["run"]["decay"] == {"weight_decay": 1 / 256, "decay_in_model": True}
    # a checkpoint of the version before: no record of the decay (an unset key meant none)
    del ckpt["run"]["decay"]
    for group in ckpt["optimizer"]["param_groups"]:
        group["weight_decay"] = 0.0
    torch.save(ckpt, path)
    run = train(
        config_from_dict(tiny(**{"train.steps": 3})), out, RunOptions(progress=False, resume=True)
    )
    assert run["steps"] == 3 and run["weight_decay"] == 0.0  # as it started
    resumed = torch.load(path, map_location="cpu", weights_only=False)
    assert all(g["weight_decay"] == 0.0 for g in resumed["optimizer"]["param_groups"])
    assert resumed["run"]["decay"] == {"weight_decay": 0.0, "decay_in_model": False}
    # resumed again, it now carries its record and keeps it
    run = train(
        config_from_dict(tiny(**{"train.steps": 4})), out, RunOptions(progress=False, resume=True)
    )
    assert run["steps"] == 4 and run["weight_decay"] == 0.0


def test_a_run_from_before_subspace_held_resumes_with_the_exact_model_alone(tmp_path, monkeypatch):
    import node_ocp.train.loop as loop

    built = []
    real = loop.build_adapter

    def spy(cfg, *a, **k):
        built.append(cfg.subspace_held)
        return real(cfg, *a, **k)

    monkeypatch.setattr(loop, "build_adapter", spy)
    out = tmp_path / "run"
    train(config_from_dict(tiny(**{"train.steps": 2})), out, RunOptions(progress=False))
    path = out / "checkpoint.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert built == [0.3] and ckpt["run"]["kept"] == {}
    # a checkpoint of the version before: its table has no subspace_held (it ran with none)
    del ckpt["run"]["kept"]
    del ckpt["run"]["config"]["optimizers"]["ocnopt"]["subspace_held"]
    torch.save(ckpt, path)
    options = RunOptions(progress=False, resume=True)
    train(config_from_dict(tiny(**{"train.steps": 3})), out, options)
    resumed = torch.load(path, map_location="cpu", weights_only=False)
    assert built[-1] == 0.0 and resumed["run"]["kept"] == {"subspace_held": 0.0}
    # resumed again, it carries its record and keeps it
    run = train(config_from_dict(tiny(**{"train.steps": 4})), out, options)
    assert run["steps"] == 4 and built[-1] == 0.0
