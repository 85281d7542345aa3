"""The best model of a run (best.pt), early stopping, exact resumption with both, and
weight decay reaching OCNOpt (issue 21, item 6)."""

import json
import math

import pytest
import torch
from train_helpers import tiny, write_toml  # noqa: I001  (tests/ is on sys.path)

from node_ocp.cli import main
from node_ocp.optim import OCNOpt
from node_ocp.train import (
    ConfigError,
    RunOptions,
    build_task,
    config_from_dict,
    read_metrics,
    train,
)
from node_ocp.train.compare import aggregate, run_dir
from node_ocp.train.optimizers import build_optimizer
from node_ocp.train.report import format_summary, write_report
from node_ocp.train.tasks import Task

#: the direction of each metric, written here independently of the package
BEST_OF = {"nll": min, "mse": min, "accuracy": max}
REAL_EVALUATE = Task.evaluate


def classification(**over) -> dict:
    """Tiny spirals classification (accuracy: higher is better), no horizon control."""
    cfg = tiny("horizon", **over)
    cfg.pop("horizon")
    return cfg


def without_time(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def by_hand(task, model_state: dict, split) -> float:
    """The split's metric of ``model_state``, the whole split at once, without Task.evaluate."""
    task.model.load_state_dict(model_state)
    task.model.eval()
    batch = split.batch(torch.arange(len(split)))
    with torch.no_grad():
        if task.kind == "density":
            return float(-task.model.log_prob(batch.x).mean())
        return float((task.model(batch.x).argmax(1) == batch.y).double().mean())


# ----------------------------------------------------------------- best.pt
@pytest.mark.parametrize(
    "cfg, lr",
    [(classification(), 0.5), (tiny(), 1.0)],
    ids=["accuracy-higher", "nll-lower"],
)
def test_best_pt_holds_the_model_of_the_best_evaluation(tmp_path, cfg, lr):
    config = config_from_dict(cfg)
    s = train(config, tmp_path, RunOptions(optimizer="adam", lr=lr, progress=False))
    metric = s["metric"]
    records = read_metrics(tmp_path)
    want = BEST_OF[metric](records, key=lambda r: r[f"val_{metric}"])
    assert want["step"] != s["steps"], "the best must not be the final model to mean anything"
    best = load(tmp_path / "best.pt")
    assert best["step"] == want["step"] == s["best_step"]
    assert best["value"] == want[f"val_{metric}"] == s["best_val"]
    assert best["metric"] == metric
    # the final model's figures keep their meaning
    assert s["final_val"] == records[-1][f"val_{metric}"]
    assert s["test_metric"] == s["test"][metric]
    # recomputed by hand from the saved parameters
    task = build_task(config, "cpu")
    assert by_hand(task, best["model"], task.data.val) == pytest.approx(best["value"], rel=1e-5)
    assert by_hand(task, best["model"], task.data.test) == pytest.approx(
        s["best_test_metric"], rel=1e-5
    )
    final = load(tmp_path / "checkpoint.pt")["model"]
    assert by_hand(task, final, task.data.test) == pytest.approx(s["test_metric"], rel=1e-5)
    assert s["best_test_metric"] != s["test_metric"]
    assert s["best_test"][metric] == s["best_test_metric"]
    assert not s["stopped_early"] and s["early_stop_step"] is None and s["patience"] is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_step"] == want["step"]


def test_best_is_the_final_model_when_it_is_best(tmp_path):
    # Adam at lr 1 on spirals improves up to its last evaluation: the final model is the best
    cfg = config_from_dict(classification())
    s = train(cfg, tmp_path, RunOptions(optimizer="adam", lr=1.0, progress=False))
    records = read_metrics(tmp_path)
    assert max(r["val_accuracy"] for r in records) == records[-1]["val_accuracy"]
    assert s["best_step"] == s["steps"] == load(tmp_path / "best.pt")["step"]
    assert s["best_test_metric"] == s["test_metric"]
    final, best = load(tmp_path / "checkpoint.pt")["model"], load(tmp_path / "best.pt")["model"]
    assert all(torch.equal(final[k], best[k]) for k in final)


# ----------------------------------------------------------------- early stopping
def scripted_val(monkeypatch, values: list[float]):
    """Task.evaluate returns ``values`` in turn as the validation accuracy (the test split
    is evaluated for real); returns the list of calls made so far."""
    calls = []

    def evaluate(self, split, chunk):
        out = REAL_EVALUATE(self, split, chunk)
        if split is self.data.val:
            out = {**out, "accuracy": values[len(calls)]}
            calls.append(out["accuracy"])
        return out

    monkeypatch.setattr(Task, "evaluate", evaluate)
    return calls


def test_early_stopping_stops_patience_evaluations_after_the_best(tmp_path, monkeypatch):
    # evaluations every 3 steps: the best at step 6 (0.5); 0.4, 0.45 and 0.5 (a tie is no
    # improvement) make 3 evaluations without one: the run ends at step 15 of 60
    values = [0.1, 0.2, 0.5, 0.4, 0.45, 0.5, 0.9, 0.9, 0.9]
    scripted_val(monkeypatch, values)
    cfg = config_from_dict(classification(**{"train.steps": 60, "train.patience": 3}))
    s = train(cfg, tmp_path / "stopped", RunOptions(optimizer="adam", progress=False))
    assert [r["step"] for r in read_metrics(tmp_path / "stopped")] == [0, 3, 6, 9, 12, 15]
    assert s["stopped_early"] and s["early_stop_step"] == 15 and s["steps"] == 15
    assert s["best_step"] == 6 and s["best_val"] == 0.5 and s["patience"] == 3
    assert not s["stopped_by_time"] and not s["diverged"]
    # stopped between checkpoints (every 4): saved where it stopped
    assert load(tmp_path / "stopped" / "checkpoint.pt")["state"]["step"] == 15
    # best.pt holds the parameters of step 6: those of a run that stopped there
    scripted_val(monkeypatch, values)
    train(cfg, tmp_path / "six", RunOptions(optimizer="adam", max_steps=6, progress=False))
    best = load(tmp_path / "stopped" / "best.pt")
    at6 = load(tmp_path / "six" / "checkpoint.pt")["model"]
    assert best["step"] == 6 and all(torch.equal(best["model"][k], at6[k]) for k in at6)
    # resuming a run that stopped early stops again at once, with the same figures
    calls = scripted_val(monkeypatch, [])  # no validation evaluation may happen
    again = train(cfg, tmp_path / "stopped", RunOptions(resume=True, max_steps=60, progress=False))
    assert calls == [] and again["steps"] == 15 and again["stopped_early"]
    assert again["best_step"] == 6 and again["best_test_metric"] == s["best_test_metric"]


def test_patience_from_the_option_overrides_the_config_and_none_turns_it_off(tmp_path, monkeypatch):
    values = [0.5, 0.4, 0.4, 0.4, 0.4, 0.4]
    cfg = config_from_dict(classification(**{"train.steps": 15, "train.patience": 2}))
    scripted_val(monkeypatch, values)
    s = train(cfg, tmp_path / "a", RunOptions(optimizer="adam", patience=1, progress=False))
    assert s["steps"] == 3 and s["early_stop_step"] == 3 and s["best_step"] == 0
    scripted_val(monkeypatch, values)
    s = train(cfg, tmp_path / "b", RunOptions(optimizer="adam", patience="none", progress=False))
    assert s["steps"] == 15 and not s["stopped_early"] and s["patience"] is None
    assert s["best_step"] == 0


# ----------------------------------------------------------------- resumption
class _Kill(BaseException):
    """Stands for the process being killed: nothing in the loop catches it."""


def test_a_killed_run_resumes_to_the_same_best_model_and_early_stop(tmp_path, monkeypatch):
    # real metrics (Adam, lr 0.5 on spirals): the best is not the last evaluation, and a
    # patience of 2 ends the run before its 30 steps
    cfg = config_from_dict(classification(**{"train.steps": 30, "train.patience": 2}))
    opts = dict(optimizer="adam", lr=0.5, progress=False)
    full = train(cfg, tmp_path / "full", RunOptions(**opts))
    assert full["stopped_early"] and full["best_step"] < full["steps"] < 30, full

    calls = {"n": 0}
    original = Task.training_terms

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # after the checkpoint at step 4 and the log line at step 6
            raise _Kill()
        return original(self, batch)

    monkeypatch.setattr(Task, "training_terms", dying)
    with pytest.raises(_Kill):
        train(cfg, tmp_path / "part", RunOptions(**opts))
    monkeypatch.setattr(Task, "training_terms", original)
    part = train(cfg, tmp_path / "part", RunOptions(resume=True, progress=False))
    assert without_time(read_metrics(tmp_path / "part")) == without_time(
        read_metrics(tmp_path / "full")
    )
    keys = ("steps", "best_step", "best_val", "best_test_metric", "stopped_early")
    assert {k: part[k] for k in keys} == {k: full[k] for k in keys}
    assert part["early_stop_step"] == full["early_stop_step"]
    a, b = load(tmp_path / "full" / "best.pt"), load(tmp_path / "part" / "best.pt")
    assert a["step"] == b["step"] and all(
        torch.equal(a["model"][k], b["model"][k]) for k in a["model"]
    )


def test_a_run_stopped_off_schedule_resumes_to_the_same_best_model(tmp_path):
    # stopped at step 7 (eval_every 3): its last evaluation is off the schedule and counts
    # for neither the state's best nor the patience; resumed to 12 as an uninterrupted run
    cfg = config_from_dict(classification())
    opts = dict(optimizer="adam", lr=0.5, progress=False)
    full = train(cfg, tmp_path / "full", RunOptions(**opts))
    stopped = train(cfg, tmp_path / "part", RunOptions(max_steps=7, **opts))
    records = read_metrics(tmp_path / "part")
    best7 = max(records, key=lambda r: r["val_accuracy"])
    assert stopped["best_step"] == best7["step"] == load(tmp_path / "part" / "best.pt")["step"]
    part = train(cfg, tmp_path / "part", RunOptions(max_steps=12, resume=True, progress=False))
    keys = ("best_step", "best_val", "best_test_metric", "test_metric")
    assert {k: part[k] for k in keys} == {k: full[k] for k in keys}
    a, b = load(tmp_path / "full" / "best.pt"), load(tmp_path / "part" / "best.pt")
    assert a["step"] == b["step"] and all(
        torch.equal(a["model"][k], b["model"][k]) for k in a["model"]
    )


def test_a_checkpoint_written_before_best_tracking_resumes(tmp_path):
    cfg = config_from_dict(classification())
    out = tmp_path / "run"
    train(cfg, out, RunOptions(optimizer="adam", lr=0.5, max_steps=4, progress=False))
    path = out / "checkpoint.pt"
    ckpt = load(path)
    del ckpt["best_model"]
    for key in ("best_step", "best_value", "evals_since_best"):
        del ckpt["state"][key]
    del ckpt["run"]["patience"]
    del ckpt["run"]["config"]["train"]["patience"]
    torch.save(ckpt, path)
    (out / "best.pt").unlink()
    s = train(cfg, out, RunOptions(max_steps=12, resume=True, progress=False))
    assert s["steps"] == 12
    # tracking starts at the resume: the best of the evaluations at steps 6, 9 and 12
    later = [r for r in read_metrics(out) if r["step"] > 4]
    want = max(later, key=lambda r: r["val_accuracy"])
    assert s["best_step"] == want["step"] == load(out / "best.pt")["step"]


# ----------------------------------------------------------------- patience errors
@pytest.mark.parametrize(
    "value, message",
    [
        (0, r"^\[train\]\.patience: received 0; accepted: an int >= 1"),
        (-2, r"^\[train\]\.patience: received -2; accepted: an int >= 1"),
        (True, r"^\[train\]\.patience: received True; accepted: an int"),
        (2.5, r"^\[train\]\.patience: received 2\.5; accepted: an int"),
        ("3", r"^\[train\]\.patience: received '3'; accepted: an int"),
    ],
)
def test_a_bad_patience_in_the_config_is_one_line_naming_it(value, message):
    with pytest.raises(ConfigError, match=message) as err:
        config_from_dict(tiny(**{"train.patience": value}))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "often"])
def test_a_bad_patience_option_is_one_line_naming_it(tmp_path, value):
    with pytest.raises((ValueError, TypeError), match=r"^--patience: received") as err:
        train(config_from_dict(tiny()), tmp_path / "r", RunOptions(patience=value))
    assert "\n" not in str(err.value) and "accepted: an int >= 1" in str(err.value)
    assert not (tmp_path / "r").exists()  # refused before anything is created


@pytest.mark.parametrize("flag", ["0", "x", "-3"])
def test_a_bad_patience_flag_is_one_line_with_exit_2(tmp_path, capsys, flag):
    path = write_toml(tmp_path / "c.toml", tiny())
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path), "--out", str(tmp_path / "r"), "--patience", flag])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("node-ocp: error: argument --patience: received")
    assert "accepted: an int >= 1" in err[0]


def test_the_patience_flag_stops_a_cli_run_and_its_line_says_so(tmp_path, capsys):
    # a tiny lr: the metric barely moves; patience 1 stops at the first evaluation that
    # does not improve on the previous best
    cfg = classification(**{"train.steps": 60, "train.optimizer": "adam"})
    cfg["optimizers"]["adam"]["lr"] = 1e-7
    path = write_toml(tmp_path / "c.toml", cfg)
    out = tmp_path / "r"
    code = main(["train", str(path), "--out", str(out), "--no-progress", "--patience", "1"])
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["stopped_early"] and s["steps"] < 60 and s["early_stop_step"] == s["steps"]
    assert s["steps"] == s["best_step"] + 3  # one evaluation (every 3 steps) after the best
    line = capsys.readouterr().out
    assert f"stopped early at step {s['steps']}" in line and "(best.pt)" in line


# ----------------------------------------------------------------- weight decay
def test_weight_decay_of_an_ocnopt_table_reaches_ocnopt(tmp_path):
    base = tiny(**{"train.steps": 3})
    base["optimizers"]["ocnopt"]["weight_decay"] = 0.0  # OCNOpt's default is the prior
    decayed = tiny(**{"train.steps": 3})
    decayed["optimizers"]["ocnopt"]["weight_decay"] = 0.5
    decayed["optimizers"]["adam"]["weight_decay"] = 0.5
    cfg = config_from_dict(decayed)
    task = build_task(cfg, "cpu")
    for name in ("ocnopt", "adam"):
        opt = build_optimizer(cfg.optimizer(name), task.model)
        assert all(g["weight_decay"] == 0.5 for g in opt.param_groups), name
    assert isinstance(build_optimizer(cfg.optimizer("ocnopt"), task.model), OCNOpt)
    # and it changes what an OCNOpt run learns
    a = train(config_from_dict(base), tmp_path / "a", RunOptions(progress=False))
    b = train(cfg, tmp_path / "b", RunOptions(progress=False))
    assert a["optimizer_kind"] == b["optimizer_kind"] == "ocnopt"
    pa, pb = load(tmp_path / "a" / "checkpoint.pt"), load(tmp_path / "b" / "checkpoint.pt")
    assert pb["optimizer"]["param_groups"][0]["weight_decay"] == 0.5
    assert any(not torch.equal(pa["model"][k], pb["model"][k]) for k in pa["model"])
    # weight decay pulls the weights towards 0
    norm = {
        k: sum(float(v.norm()) for v in p["model"].values() if v.is_floating_point())
        for k, p in (("a", pa), ("b", pb))
    }
    assert norm["b"] < norm["a"]


# ----------------------------------------------------------------- compare's report
def _run(out, name, seed, final, best, best_step, stopped_early=False):
    d = run_dir(out, name, 0.1, seed)
    d.mkdir(parents=True)
    records = [
        {"step": 10 * i, "seconds": float(i), "val_nll": v, "t1": None, "train_loss": v}
        for i, v in enumerate([5.0, 3.0, 4.0])
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "optimizer": name,
        "optimizer_kind": name,
        "lr": 0.1,
        "seed": seed,
        "device": "cpu",
        "task": "density",
        "dataset": "8gaussians",
        "metric": "nll",
        "higher_is_better": False,
        "diverged": False,
        "final_val": 4.0,
        "test_metric": final,
        "train_seconds": 2.0,
        "amortized_step_s": 0.1,
        "refresh_time_s": None,
        "step_time_s": 0.1,
        "nfe_forward": 20.0,
        "nfe_backward": 20.0,
        "peak_memory_mb": 400.0,
        "train_memory_mb": 40.0,
        "t1": None,
    }
    if best is not None:  # a run written before best.pt has none of these
        summary |= {"best_test_metric": best, "best_step": best_step}
        summary["stopped_early"] = stopped_early
    (d / "summary.json").write_text(json.dumps(summary))


def test_the_comparison_reports_the_best_val_model_beside_the_final_one(tmp_path):
    cfg = config_from_dict(tiny())
    _run(tmp_path, "adam", 0, final=4.1, best=3.1, best_step=10)
    _run(tmp_path, "adam", 1, final=4.3, best=3.3, best_step=10, stopped_early=True)
    _run(tmp_path, "ocnopt", 0, final=4.0, best=None, best_step=None)  # an older run
    _run(tmp_path, "ocnopt", 1, final=4.2, best=None, best_step=None)
    result = aggregate(tmp_path, cfg, ["adam", "ocnopt"])
    adam, ocn = result["optimizers"]["adam"], result["optimizers"]["ocnopt"]
    assert adam["test"][0] == pytest.approx(4.2)  # the final models', as before
    assert adam["best_test"][0] == pytest.approx(3.2)
    assert adam["best_test_ci"][0] == pytest.approx(3.2) and adam["best_test_ci"][3] == 2
    assert adam["per_seed_best_test"] == {0: 3.1, 1: 3.3}
    assert adam["per_seed_best_step"] == {0: 10, 1: 10} and adam["stopped_early"] == 1
    assert math.isnan(ocn["best_test"][0]) and ocn["per_seed_best_test"] == {0: None, 1: None}
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["optimizers"]["adam"]["best_test"][0] == pytest.approx(3.2)
    report = write_report(tmp_path, saved).read_text()
    head = next(ln for ln in report.splitlines() if ln.startswith("| optimizer | lr |"))
    assert head.startswith("| optimizer | lr | seeds | test | test (best val) | val |")
    row = next(ln for ln in report.splitlines() if ln.startswith("| adam | 0.1 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[3].startswith("4.2 [") and cells[4].startswith("3.2 [")
    assert "(1/2 stopped early)" in cells[4]
    row = next(ln for ln in report.splitlines() if ln.startswith("| ocnopt | 0.1 |"))
    assert [c.strip() for c in row.split("|")[1:-1]][4] == "–"
    assert "| adam | 1 | 4.3 | 3.3 | 10 |" in report  # per seed: final, best-val, its step
    assert "*test (best val)*" in report
    text = format_summary(result)
    assert "test (best val)" in text.splitlines()[1 + len(result["verdicts"])]
