"""Baselines by name: optimizers by class path, schedules for every optimizer."""

import math

import pytest
import torch
from torch import nn
from train_helpers import tiny

from node_ocp import OCNOpt
from node_ocp.train import RunOptions, config_from_dict, train
from node_ocp.train.config import ConfigError
from node_ocp.train.loop import read_metrics
from node_ocp.train.optimizers import build_optimizer, build_schedule
from node_ocp.train.schedules import ScheduleFactor


def _opt_cfg(**table):
    cfg = tiny()
    cfg["optimizers"]["x"] = table
    return config_from_dict(cfg).optimizers["x"]


def _steps(opt, model, n=3):
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    for _ in range(n):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_class_path_with_keywords_builds_the_constructor_s_optimizer():
    cfg = _opt_cfg(
        kind="torch.optim.AdamW", lr=0.01, args={"weight_decay": 0.1, "betas": [0.8, 0.9]}
    )
    torch.manual_seed(1)
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    built = build_optimizer(cfg, a)
    by_hand = torch.optim.AdamW(b.parameters(), lr=0.01, weight_decay=0.1, betas=(0.8, 0.9))
    assert type(built) is torch.optim.AdamW
    assert built.defaults == by_hand.defaults
    for p, q in zip(_steps(built, a), _steps(by_hand, b)):
        assert torch.equal(p, q)


def test_class_path_without_lr_takes_the_class_default_and_alias_resolves():
    cfg = _opt_cfg(kind="adamw")
    assert cfg.learning_rate == 1e-3
    opt = build_optimizer(cfg, nn.Linear(2, 2))
    assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 0.01


@pytest.mark.parametrize(
    "table, key, words",
    [
        ({"kind": "torch.optim.AdamQ"}, "[optimizers.x].kind", "no attribute 'AdamQ'"),
        ({"kind": "torch.nn.Linear"}, "[optimizers.x].kind", "not a torch.optim.Optimizer"),
        ({"kind": "torch.optim.AdamW", "args": {"betaz": 1}}, "[optimizers.x].args.betaz", "betas"),
        ({"kind": "torch.optim.AdamW", "args": {"lr": 1}}, "[optimizers.x].args.lr", "lr key"),
        (
            {"kind": "torch.optim.AdamW", "args": {"betas": [2.0, 0.9]}},
            "[optimizers.x].args",
            "refused",
        ),
        ({"kind": "torch.optim.AdamW", "weight_decay": 0.1}, "[optimizers.x].weight_decay", "args"),
        ({"kind": "adam", "args": {"eps": 1e-6}}, "[optimizers.x].args", "class-path"),
        ({"kind": "adam", "schedule": "cosinus"}, "[optimizers.x].schedule", "'cosine'"),
        ({"kind": "adam", "warmup": -1}, "[optimizers.x].warmup", ">= 0"),
    ],
)
def test_bad_class_paths_keywords_and_schedules_are_one_line_naming_the_key(table, key, words):
    with pytest.raises(ConfigError) as err:
        _opt_cfg(**table)
    text = str(err.value)
    assert text.startswith(key + ":"), text
    assert words in text and "\n" not in text


def test_third_party_optimizers_by_alias():
    po = pytest.importorskip("pytorch_optimizer")
    for alias, cls in (("soap", po.SOAP), ("shampoo", po.Shampoo)):
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        opt = build_optimizer(_opt_cfg(kind=alias, lr=1e-2), model)
        assert type(opt) is cls
        before = [p.detach().clone() for p in model.parameters()]
        after = _steps(opt, model, n=2)
        assert any(not torch.equal(p, q) for p, q in zip(before, after))
    with pytest.raises(ConfigError, match=r"args\.shampoo_betaa: not a keyword"):
        _opt_cfg(kind="soap", args={"shampoo_betaa": 0.9})  # SOAP would swallow it


def _lrs(opt, scheduler, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


def test_cosine_and_warmup_factors_equal_torch_s_own_schedulers():
    p = nn.Parameter(torch.zeros(1))
    total = 20
    mine = [0.1 * ScheduleFactor("cosine", total, 0, 0.1)(s) for s in range(total)]
    opt = torch.optim.SGD([p], lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.01)
    assert mine == pytest.approx(_lrs(opt, ref, total), rel=1e-12)
    warm = [ScheduleFactor("constant", total, 5)(s) for s in range(8)]
    opt = torch.optim.SGD([p], lr=1.0)
    ref = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / 6, total_iters=5)
    assert warm == pytest.approx(_lrs(opt, ref, 8), rel=1e-12)
    lin = ScheduleFactor("linear", 11, 1, 0.0)
    assert [lin(s) for s in (0, 1, 6, 11, 30)] == pytest.approx([0.5, 1.0, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="kind: received 'cosin'; accepted: one of 'constant'"):
        ScheduleFactor("cosin", 10)  # was a linear decay, silently


def test_a_schedule_on_torch_optimizers_scales_the_learning_rate():
    cfg = _opt_cfg(kind="sgd", lr=0.1, schedule="cosine", warmup=2)
    opt = build_optimizer(cfg, nn.Linear(2, 2))
    sched = build_schedule(cfg, opt, total_steps=10)
    lrs = _lrs(opt, sched, 10)
    factor = ScheduleFactor("cosine", 10, 2, 0.0)
    assert lrs == pytest.approx([0.1 * factor(s) for s in range(10)])
    assert build_schedule(_opt_cfg(kind="sgd"), opt, 10) is None  # constant: nothing to step


def test_ocnopt_scales_its_fixed_step_by_the_schedule():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    b = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(32, 3, dtype=torch.float64)
    kw = dict(step="fixed", momentum=0.0, curvature="diagonal")
    half = OCNOpt(a, lr=0.1, schedule=lambda s: 0.5, **kw)
    plain = OCNOpt(b, lr=0.05, **kw)
    for opt, model in ((half, a), (plain, b)):
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_ocnopt_model_step_takes_the_scheduled_fraction_of_its_step():
    cfg = tiny()
    cfg["optimizers"]["ocnopt"].pop("lr")
    cfg["optimizers"]["ocnopt"]["schedule"] = "linear"
    cfg["optimizers"]["ocnopt"]["warmup"] = 3
    cfg["optimizers"]["ocnopt"]["curvature"] = "diagonal"
    run = config_from_dict(cfg)
    model = nn.Linear(2, 2)
    opt = build_optimizer(run.optimizers["ocnopt"], model)
    assert build_schedule(run.optimizers["ocnopt"], opt, 12) is None
    assert isinstance(opt.schedule, ScheduleFactor)
    assert opt.schedule(0) == pytest.approx(0.25) and opt.schedule(12) == 0.0


@pytest.mark.parametrize("optimizer", ["adamw", "ocnopt"])
def test_scheduled_run_resumes_exactly(tmp_path, optimizer):
    cfg = tiny()
    cfg["optimizers"]["adamw"] = {"kind": "torch.optim.AdamW", "lr": 0.05, "schedule": "cosine"}
    cfg["optimizers"]["ocnopt"].update(schedule="cosine", warmup=2)
    run = config_from_dict(cfg)
    full, part = tmp_path / "full", tmp_path / "part"
    s_full = train(run, full, RunOptions(optimizer=optimizer, progress=False))
    train(run, part, RunOptions(optimizer=optimizer, max_steps=5, progress=False))
    s_part = train(run, part, RunOptions(max_steps=12, resume=True, progress=False))
    drop = ("seconds",)
    a = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(full)]
    b = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(part)]
    assert [r["step"] for r in b if r["step"] % 3 == 0] == [r["step"] for r in a]
    assert [r for r in b if r["step"] % 3 == 0] == a
    assert s_full["test_metric"] == s_part["test_metric"]
    if optimizer == "adamw":  # the cosine reached its end: lr 0 at the last step
        assert a[-1]["lr"] == pytest.approx(0.0, abs=1e-12) and math.isfinite(a[-2]["lr"])


def test_torchdiffeq_gradient_mode_for_first_order_runs_only(tmp_path):
    cfg = tiny(**{"solver.gradient": "torchdiffeq"})
    with pytest.raises(ConfigError, match=r"^\[optimizers\.ocnopt\]\.gradient: received 'torch"):
        config_from_dict(cfg)
    cfg = tiny()
    cfg["optimizers"]["tdq"] = {"kind": "adam", "lr": 0.05, "gradient": "torchdiffeq"}
    run = config_from_dict(cfg)
    own = train(run, tmp_path / "own", RunOptions(optimizer="adam", max_steps=3, progress=False))
    tdq = train(run, tmp_path / "tdq", RunOptions(optimizer="tdq", max_steps=3, progress=False))
    # the same gradients up to solver tolerance: the same training to a few digits
    assert tdq["nfe_backward"] > 0
    assert tdq["final_val"] == pytest.approx(own["final_val"], rel=1e-2)


def test_class_paths_on_the_command_line_need_no_table(tmp_path):
    run = config_from_dict(tiny())
    table = run.optimizer("torch.optim.AdamW", "--optimizers")
    assert table.kind == "torch.optim.AdamW" and table.learning_rate == 1e-3
    assert "torch.optim.AdamW" not in run.to_dict()["optimizers"]  # not part of the file
    s = train(run, tmp_path, RunOptions(optimizer="adamw", max_steps=2, progress=False))
    assert s["optimizer"] == "adamw" and s["optimizer_kind"] == "adamw"
    with pytest.raises(ConfigError, match=r"^--optimizers: received 'adamq'; accepted: .*alias"):
        run.optimizer("adamq", "--optimizers")


def test_a_table_of_a_missing_package_loads_and_fails_only_when_used(tmp_path):
    cfg = tiny()
    cfg["optimizers"]["other"] = {"kind": "not_installed_pkg.Optim"}
    run = config_from_dict(cfg)  # the other optimizers still run
    train(run, tmp_path / "a", RunOptions(optimizer="adam", max_steps=1, progress=False))
    with pytest.raises(ConfigError, match=r"^\[optimizers\.other\]\.kind: .*cannot be imported"):
        run.optimizer("other")
