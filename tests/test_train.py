"""Configs, the training loop, checkpoints and exact resumption."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import tiny, write_toml  # noqa: I001  (tests/ is on sys.path)

from node_ocp.data.density_suite import SUITE, missing_files
from node_ocp.train import (
    ConfigError,
    RunError,
    RunOptions,
    build_task,
    config_from_dict,
    load_config,
    read_metrics,
    train,
)
from node_ocp.train import loop as loop_mod
from node_ocp.train.model_kinds import MODELS
from node_ocp.train.tasks import Task

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def without_time(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


# ----------------------------------------------------------------- configs
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_bundled_config_parses_and_builds_its_task(path):
    cfg = load_config(path)
    if cfg.task.dataset in SUITE:  # the tabular suite reads the user's copy of its files
        missing = missing_files(cfg.task.dataset, path.parent / cfg.task.path)
        if missing:
            pytest.skip(f"the release's files are not here: {missing[0]}")
    task = build_task(cfg)
    assert len(task.data.train) > 0 and len(task.data.val) > 0 and len(task.data.test) > 0
    # every task's model integrates at least one ODE block, but the discrete baselines
    assert bool(task.blocks) != MODELS[cfg.model.kind].discrete
    # `train` refuses a batch larger than the training split (cnf_iris's 128 > 120 did)
    assert cfg.train.batch_size <= len(task.data.train)
    torch.manual_seed(0)
    batch = task.data.train.batch(torch.arange(min(4, len(task.data.train))))
    with torch.no_grad():
        _, loss = task.outputs_and_loss(batch)
    assert torch.isfinite(loss)


def test_the_issue_s_task_list_has_a_config_each():
    names = {p.stem for p in CONFIGS}
    toys = {"moons", "circles", "8gaussians", "pinwheel", "checkerboard", "2spirals"}
    assert {f"cnf_{t}" for t in toys} <= names
    assert {"cnf_digits", "cnf_wine", "cnf_breast_cancer", "cnf_iris"} <= names
    assert {"ts_japanese_vowels", "ts_basic_motions", "forecast_spiral", "quickstart"} <= names
    assert {"forecast_italy_power", "digits_classification", "horizon_spirals"} <= names
    kinds = set()
    for p in CONFIGS:
        for opt in load_config(p).optimizers.values():
            kinds.add((opt.kind, opt.curvature if opt.kind == "ocnopt" else None, opt.factors))
    curvatures = {c for k, c, _ in kinds if k == "ocnopt"}
    sources = {f for k, _, f in kinds if k == "ocnopt"}
    assert curvatures == {"identity", "diagonal", "kfac", "ekfac", "dense"}
    assert sources == {"auto", "empirical", "sampled", "exact"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train": {"stepz": 3}}, r"\[train\]: unknown key 'stepz'; accepted: optimizer, steps"),
        ({"trian": {}}, r"unknown table \[trian\]; accepted: \[task\]"),
        ({"train": {"steps": "many"}}, r"\[train\]\.steps: received 'many'; accepted: an int"),
        ({"train": {"steps": 0}}, r"\[train\]\.steps: received 0; accepted: an int >= 1"),
        ({"task": {"kind": "regression"}}, r"\[task\]\.kind: received 'regression'; accepted"),
        ({"model": {"kind": "image"}}, r"\[model\]\.kind: received 'image' for task kind"),
        ({"solver": {"method": "euler2"}}, r"\[solver\]\.method: received 'euler2'"),
        ({"train": {"optimizer": "lbfgs"}}, r"\[train\]\.optimizer: received 'lbfgs'"),
        ({"optimizers": {"x": {"kind": "rmsprop"}}}, r"\[optimizers\.x\]\.kind: received"),
        ({"optimizers": {"x": {"kind": "ocnopt", "curvature": "full"}}}, r"curvature"),
        (
            {"optimizers": {"x": {"kind": "ocnopt", "feedback": "on"}}},
            r"\[optimizers\.x\]\.feedback: received 'on'; accepted: one of 'off', 'gauss_newton'",
        ),
        (
            {"optimizers": {"x": {"kind": "ocnopt", "time_joint": False}}},
            r"\[optimizers\.x\]\.time_joint: received false without gradient = 'direct'",
        ),
        ({"optimizers": {"x": {"gradient": "backprop"}}}, r"\[optimizers\.x\]\.gradient"),
        ({"horizon": {"beta": 1.0}}, r"\[horizon\]\.beta: received 1\.0; accepted"),
    ],
)
def test_bad_config_values_name_the_key_and_list_what_is_accepted(change, message):
    cfg = tiny()
    for table, body in change.items():
        if isinstance(cfg.get(table), dict) and table != "optimizers":
            cfg[table] = {**cfg[table], **body}
        elif table == "optimizers":
            cfg["optimizers"] = {**cfg["optimizers"], **body}
        else:
            cfg[table] = body
    with pytest.raises(ConfigError, match=message):
        config_from_dict(cfg)


def test_unknown_dataset_lists_accepted_names():
    cfg = config_from_dict(tiny(**{"task.dataset": "mnist"}))
    with pytest.raises(ConfigError, match=r"\[task\]\.dataset: received 'mnist'.*8gaussians"):
        build_task(cfg)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"is not a file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"is not valid TOML"):
        load_config(bad)


def test_horizon_needs_a_single_block_model():
    cfg = config_from_dict(tiny(**{"model.blocks": 2, "horizon.lr": 0.1}))
    with pytest.raises(ConfigError, match=r"\[horizon\]: a model of kind 'cnf' with 2"):
        build_task(cfg)


# ----------------------------------------------------------------- training loop
def test_train_writes_metrics_checkpoint_and_summary(tmp_path):
    cfg = config_from_dict(tiny())
    s = train(cfg, tmp_path, RunOptions(progress=False))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 3, 6, 9, 12]
    keys = {"step", "seconds", "train_loss", "val_nll", "nfe_forward", "nfe_backward", "t1", "lr"}
    assert keys <= set(records[1])
    seconds = [r["seconds"] for r in records]
    assert seconds == sorted(seconds) and seconds[0] == 0.0
    assert abs(seconds[-1] - s["train_seconds"]) < 1e-9
    assert records[-1]["val_nll"] < records[0]["val_nll"]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["step"] == 12 and "ocnopt" in ckpt["optimizer"]
    assert s["steps"] == 12 and s["refresh_time_s"] is not None
    assert s["test_metric"] == pytest.approx(s["test"]["nll"])
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 12


class _Kill(BaseException):
    """Stands for the process being killed: nothing in the loop catches it."""


@pytest.mark.parametrize(
    "kind, optimizer", [("density", "ocnopt"), ("horizon", "ocnopt"), ("density", "adam")]
)
def test_killed_run_resumes_to_the_same_metrics_log(tmp_path, monkeypatch, kind, optimizer):
    cfg = config_from_dict(tiny(kind))
    full = tmp_path / "full"
    train(cfg, full, RunOptions(optimizer=optimizer, progress=False))

    calls = {"n": 0}
    original = Task.training_terms

    def dying(self, batch):
        calls["n"] += torch.is_grad_enabled()  # training forwards, not OCNOpt's trials
        if calls["n"] == 7:  # after the checkpoint at step 4 and the log line at step 6
            raise _Kill()
        return original(self, batch)

    part = tmp_path / "part"
    monkeypatch.setattr(Task, "training_terms", dying)
    with pytest.raises(_Kill):
        train(cfg, part, RunOptions(optimizer=optimizer, progress=False))
    monkeypatch.setattr(Task, "training_terms", original)
    assert [r["step"] for r in read_metrics(part)] == [0, 3, 6]
    s = train(cfg, part, RunOptions(optimizer=optimizer, resume=True, progress=False))
    assert without_time(read_metrics(part)) == without_time(read_metrics(full))
    final_full = torch.load(full / "checkpoint.pt", weights_only=False)["model"]
    final_part = torch.load(part / "checkpoint.pt", weights_only=False)["model"]
    for k in final_full:
        assert torch.equal(final_full[k], final_part[k]), k
    if kind == "horizon":
        assert s["t1"] != 1.0  # t1 moved, and identically in both runs (equal logs)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_run_stopped_by_its_budget_off_schedule_resumes_exactly(tmp_path, divergence):
    # stopped at step 7 (eval_every 3): the stop writes a line and a checkpoint off the
    # schedule; resuming to 12 steps must log what an uninterrupted 12-step run logs
    cfg = config_from_dict(tiny(**{"model.divergence": divergence}))
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg, full, RunOptions(progress=False))
    train(cfg, part, RunOptions(max_steps=7, progress=False))
    assert [r["step"] for r in read_metrics(part)] == [0, 3, 6, 7]
    # --resume takes the optimizer, lr and seed of the checkpoint
    train(cfg, part, RunOptions(max_steps=12, resume=True, progress=False))
    assert without_time(read_metrics(part)) == without_time(read_metrics(full))
    final_full = torch.load(full / "checkpoint.pt", weights_only=False)["model"]
    final_part = torch.load(part / "checkpoint.pt", weights_only=False)["model"]
    for k in final_full:
        assert torch.equal(final_full[k], final_part[k]), k


def test_resume_keeps_the_checkpoint_s_optimizer_lr_and_seed(tmp_path):
    cfg = config_from_dict(tiny())
    first = RunOptions(optimizer="adam", lr=0.02, seed=5, max_steps=4, progress=False)
    train(cfg, tmp_path, first)
    s = train(cfg, tmp_path, RunOptions(max_steps=6, resume=True, progress=False))
    run = json.loads((tmp_path / "config.json").read_text())
    assert (run["optimizer"], run["lr"], run["seed"]) == ("adam", 0.02, 5)
    assert s["steps"] == 6


def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = config_from_dict(tiny())
    saves = {"n": 0}
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        saves["n"] += 1
        # calls: checkpoint.pt and best.pt at step 4, then the step-8 checkpoint.pt
        if saves["n"] == 3:  # the step-8 checkpoint: write half a file, then fail
            f.write(b"\x80\x02partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(loop_mod.torch, "save", failing_save)
    with pytest.raises(RunError, match=r"^checkpoint: cannot write .*No space left"):
        train(cfg, tmp_path, RunOptions(progress=False))
    monkeypatch.setattr(loop_mod.torch, "save", real_save)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["step"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    train(cfg, tmp_path, RunOptions(resume=True, progress=False))
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 3, 6, 9, 12]


def test_sigkilled_process_resumes_exactly(tmp_path):
    cfg = tiny(**{"train.steps": 400, "train.checkpoint_every": 4})
    path = write_toml(tmp_path / "run.toml", cfg)
    full_cfg = config_from_dict(tiny(**{"train.steps": 60, "train.checkpoint_every": 4}))
    cmd = [sys.executable, "-m", "node_ocp", "train", str(path), "--no-progress"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "part")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = tmp_path / "part" / "checkpoint.pt"
    deadline = time.time() + 120
    step = 0
    while time.time() < deadline and step < 8:
        if ckpt.exists():
            step = torch.load(ckpt, weights_only=False)["state"]["step"]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(ckpt, weights_only=False)["state"]["step"]
    assert 8 <= killed_at < 60, "the run must be killed mid-way for this test to mean anything"
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path / "part"), "--resume", "--max-steps", "60"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    train(full_cfg, tmp_path / "full", RunOptions(progress=False))
    got = without_time(read_metrics(tmp_path / "part"))
    want = without_time(read_metrics(tmp_path / "full"))
    assert got == want


def test_time_budget_stops_the_run_and_still_evaluates(tmp_path):
    cfg = config_from_dict(tiny(**{"train.steps": 10_000}))
    s = train(cfg, tmp_path, RunOptions(max_time=0.5, progress=False, optimizer="adam"))
    assert s["stopped_by_time"] and 0 < s["steps"] < 10_000
    assert read_metrics(tmp_path)[-1]["step"] == s["steps"]
    assert s["train_seconds"] >= 0.5


def test_divergence_is_recorded_not_raised(tmp_path):
    cfg = config_from_dict(tiny(**{"train.steps": 30}))
    s = train(cfg, tmp_path, RunOptions(optimizer="adam", lr=1e4, progress=False))
    assert s["diverged"] and s["steps"] < 30
    assert s["diverged_reason"]


@pytest.mark.parametrize("kind", ["density", "horizon"])
def test_a_solve_failing_in_evaluation_marks_the_run_diverged(tmp_path, monkeypatch, kind):
    from node_ocp.ode.block import SolverError

    calls = {"n": 0}
    original = Task._chunk_sums

    def failing(self, part):  # the third evaluation's first chunk fails
        calls["n"] += 1
        if calls["n"] == 3:
            raise SolverError("step size underflow")
        return original(self, part)

    monkeypatch.setattr(Task, "_chunk_sums", failing)
    s = train(config_from_dict(tiny(kind)), tmp_path, RunOptions(progress=False))
    assert s["diverged"] and "is nan" in s["diverged_reason"]
    records = read_metrics(tmp_path)
    assert records[-1]["step"] == 6 and all(math.isfinite(r["t1"] or 0) for r in records)
    key = "val_nll" if kind == "density" else "val_accuracy"
    assert [math.isnan(r[key]) for r in records] == [False, False, True]


def test_resume_and_device_errors(tmp_path):
    cfg = config_from_dict(tiny())
    with pytest.raises(RunError, match=r"--resume: no checkpoint in"):
        train(cfg, tmp_path, RunOptions(resume=True, progress=False))
    if not torch.cuda.is_available():
        with pytest.raises(RunError, match=r"--device: received 'cuda' but no CUDA GPU"):
            train(cfg, tmp_path, RunOptions(device="cuda", progress=False))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunError, match=r"--out: cannot write to"):
        train(cfg, blocker / "sub", RunOptions(progress=False))
    train(cfg, tmp_path / "a", RunOptions(max_steps=4, progress=False))
    with pytest.raises(RunError, match=r"written with lr = 0.05, this run has 0.5;"):
        train(cfg, tmp_path / "a", RunOptions(resume=True, lr=0.5, progress=False))


@pytest.mark.parametrize("damage", ["half", "empty", "random", "text", "foreign", "schema"])
def test_a_damaged_or_foreign_checkpoint_is_one_line_naming_the_file(tmp_path, damage):
    cfg = config_from_dict(tiny())
    train(cfg, tmp_path, RunOptions(max_steps=4, progress=False))
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    if damage == "half":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "random":
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()))
    elif damage == "text":
        path.write_text("not a checkpoint\n")
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        ckpt = torch.load(path, weights_only=False)
        torch.save({**ckpt, "schema": 99}, path)
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(RunError) as err:
        train(cfg, tmp_path, RunOptions(resume=True, progress=False))
    text = str(err.value)
    assert "\n" not in text and repr(str(path)) in text, text
    words = {"foreign": "not a node-ocp checkpoint", "schema": "checkpoint schema 99"}
    assert words.get(damage, "is not a readable checkpoint") in text
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics  # nothing lost


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    cfg = config_from_dict(tiny())
    train(cfg, tmp_path, RunOptions(max_steps=4, progress=False))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def full(obj, f, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RunError) as err:
        train(cfg, tmp_path, RunOptions(max_steps=8, resume=True, progress=False))
    monkeypatch.setattr(torch, "save", real_save)
    text = str(err.value)
    assert text.startswith("checkpoint: cannot write") and "No space left on device" in text
    assert "\n" not in text and "previous checkpoint is kept" in text
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert train(cfg, tmp_path, RunOptions(max_steps=8, resume=True, progress=False))["steps"] == 8


@pytest.mark.parametrize(
    "over",
    [
        {
            "task.kind": "classification",
            "task.dataset": "digits",
            "model.kind": "image",
            "model.width": 4,
        },
        {
            "task.kind": "forecast",
            "task.dataset": "spiral",
            "task.length": 12,
            "model.kind": "odernn",
            "model.width": 8,
            "solver.method": "rk4",
        },
        {
            "task.kind": "forecast",
            "task.dataset": "oscillator",
            "task.length": 12,
            "model.kind": "cde",
            "model.width": 8,
            "solver.method": "rk4",
        },
        {
            "task.kind": "classification",
            "task.dataset": "JapaneseVowels",
            "task.drop": 0.5,
            "model.kind": "odernn",
            "model.width": 8,
            "solver.method": "rk4",
        },
    ],
    ids=["digits-image", "spiral-odernn", "oscillator-cde", "vowels-odernn"],
)
def test_every_task_kind_trains_and_evaluates(tmp_path, over):
    over = {
        "train.steps": 4,
        "train.eval_every": 2,
        "train.batch_size": 16,
        "task.n_train": 64,
        "task.n_val": 16,
        "task.n_test": 16,
        **over,
    }
    cfg = config_from_dict(tiny(**over))
    s = train(cfg, tmp_path, RunOptions(progress=False))
    assert not s["diverged"] and s["steps"] == 4
    metric = {"classification": "accuracy", "forecast": "mse"}[cfg.task.kind]
    assert s["metric"] == metric
    # the test metric recomputed by hand: the trained model on the whole test split at once
    task = build_task(cfg, "cpu")
    task.model.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"])
    test = task.data.test.batch(torch.arange(len(task.data.test)))
    with torch.no_grad():
        if metric == "accuracy":
            want = float((task.model(test.x).argmax(1) == test.y).double().mean())
        else:
            err = (task.model(test.x, test.y.times) - test.y.values) ** 2
            want = float((err * test.y.mask).sum() / test.y.mask.sum())
    assert s["test_metric"] == pytest.approx(want, rel=1e-5, abs=1e-7)


def _file_cfg(tmp_path, kind, path, **task):
    cfg = tiny()
    model = task.pop("model", "ode_mlp")
    cfg["task"] = {"kind": kind, "dataset": "file", "path": path, **task}
    if kind == "classification":
        cfg["model"] = {"kind": model, "hidden": [8], "width": 2}
    if kind == "forecast":
        cfg["model"] = {"kind": "odernn", "hidden": [8], "width": 4}
    cfg["train"]["batch_size"] = 16
    return load_config(write_toml(tmp_path / "own.toml", cfg))


def test_own_data_files_from_a_config(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(60, 3))
    np.savetxt(tmp_path / "d.csv", table, delimiter=",", header="a,b,c", comments="")
    s = train(
        _file_cfg(tmp_path, "density", "d.csv"),
        tmp_path / "r1",
        RunOptions(max_steps=2, progress=False),
    )
    assert s["dataset"] == "file" and math.isfinite(s["test_metric"])
    task = build_task(_file_cfg(tmp_path, "density", "d.csv"), "cpu")
    n = len(task.data.train) + len(task.data.val) + len(task.data.test)
    assert n == 60 and task.data.train.x.shape[1] == 3  # the header went, no row did
    labels = rng.integers(0, 3, size=(60, 1)) * 5  # classes 0, 5, 10 -> 0, 1, 2
    np.savetxt(tmp_path / "c.csv", np.hstack([table[:, :2], labels]), delimiter=",")
    task = build_task(_file_cfg(tmp_path, "classification", "c.csv"), "cpu")
    assert task.data.info["classes"] == 3 and set(task.data.train.y.tolist()) <= {0, 1, 2}
    np.savez(tmp_path / "im.npz", x=rng.random((40, 6, 6)), y=rng.integers(0, 2, 40))
    task = build_task(_file_cfg(tmp_path, "classification", "im.npz", model="image"), "cpu")
    assert tuple(task.data.train.x.shape[1:]) == (1, 6, 6)


@pytest.mark.parametrize(
    "kind, path, task, words",
    [
        ("density", "missing.csv", {}, "[task].path: no file at"),
        ("density", "bad.csv", {}, "[task].path: bad.csv line 3 column 2: cannot read 'q'"),
        ("classification", "bad2.csv", {"label_column": 5}, "[task].label_column: received 5"),
        (
            "forecast",
            "bad.csv",
            {},
            "[task].path: bad.csv line 1: no column named 'series' in the header",
        ),
    ],
)
def test_own_data_errors_are_one_line_naming_the_key(tmp_path, kind, path, task, words):
    (tmp_path / "bad.csv").write_text("1,2\n3,4\n5,q\n")
    (tmp_path / "bad2.csv").write_text("".join(f"{i},{i % 2}\n" for i in range(20)))
    with pytest.raises(ConfigError) as err:
        cfg = _file_cfg(tmp_path, kind, path, **task)
        build_task(cfg, "cpu")
    assert str(err.value).startswith(words) and "\n" not in str(err.value), str(err.value)


def test_build_model_raises_for_a_kind_it_does_not_handle():
    from node_ocp.train.tasks import build_model, load_data

    cfg = config_from_dict(tiny())
    data = load_data(cfg)
    cfg.model.kind = "transformer"  # past the config's own check
    with pytest.raises(ConfigError, match=r"^\[model\]\.kind: received 'transformer'"):
        build_model(cfg, data)


def test_a_neural_cde_run_resumes(tmp_path):
    # the control path of the last batch is not part of the model's state: a fresh model
    # loads the checkpoint (it failed with "Unexpected key(s) ... field.path._a")
    over = {
        "task.kind": "forecast",
        "task.dataset": "oscillator",
        "task.length": 12,
        "task.n_train": 64,
        "task.n_val": 16,
        "task.n_test": 16,
        "model.kind": "cde",
        "model.width": 8,
        "solver.method": "rk4",
        "train.batch_size": 16,
        "train.eval_every": 2,
    }
    cfg = config_from_dict(tiny(**over))
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg, full, RunOptions(optimizer="adam", max_steps=6, progress=False))
    train(cfg, part, RunOptions(optimizer="adam", max_steps=4, progress=False))
    s = train(cfg, part, RunOptions(max_steps=6, resume=True, progress=False))
    assert s["steps"] == 6
    drop = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert drop(read_metrics(part)) == drop(read_metrics(full))


def test_config_defaults_are_the_librarys():
    """One source of truth: a table's unset keys take the library's own defaults."""
    import inspect

    from node_ocp import HorizonOptimizer, ODEBlock
    from node_ocp.models.cde import INTERPOLATIONS
    from node_ocp.optim.ocnopt import DEFAULTS
    from node_ocp.train.config import HorizonConfig, OptimizerConfig, SolverConfig

    def defaults(cls, keys):
        params = inspect.signature(cls).parameters
        return {k: params[k].default for k in keys}

    solver = SolverConfig()
    assert defaults(ODEBlock, ("method", "rtol", "atol", "gradient", "backend")) == {
        "method": solver.method,
        "rtol": solver.rtol,
        "atol": solver.atol,
        "gradient": solver.gradient,
        "backend": solver.backend,
    }
    from node_ocp.ode.compiled import check_compile_field

    block = defaults(ODEBlock, ("compile_field", "cuda_graph"))
    assert check_compile_field(block["compile_field"]) == check_compile_field(solver.compile_field)
    assert block["cuda_graph"] == solver.cuda_graph
    h = HorizonConfig()
    keys = ("mode", "lr", "penalty", "update_every", "beta", "min_horizon", "max_horizon")
    assert defaults(HorizonOptimizer, keys + ("warmup",)) == {
        k: getattr(h, k) for k in keys + ("warmup",)
    }
    o = OptimizerConfig(kind="ocnopt")
    for key in ("curvature", "factors", "update_every", "damping", "sample_dt", "step"):
        assert getattr(o, key) == DEFAULTS[key], key
    with pytest.raises(ConfigError, match="interpolation: received 'spline'.*'hermite'"):
        config_from_dict(tiny(**{"model.interpolation": "spline"}))
    assert "hermite" in INTERPOLATIONS


def test_a_run_written_before_new_config_keys_resumes(tmp_path):
    """A checkpoint whose saved config lacks keys added since (here [task].format and
    columns) resumes: the saved config is read again with their defaults."""
    cfg = config_from_dict(tiny())
    out = tmp_path / "run"
    train(cfg, out, RunOptions(max_steps=4, progress=False))
    path = out / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    for key in ("format", "columns"):
        del ckpt["run"]["config"]["task"][key]
    torch.save(ckpt, path)
    s = train(config_from_dict(tiny()), out, RunOptions(max_steps=6, resume=True, progress=False))
    assert s["steps"] == 6
    # a key the run did use, with another value, is still a mismatch naming it
    ckpt = torch.load(path, weights_only=False)
    ckpt["run"]["config"]["solver"]["rtol"] = 0.5
    torch.save(ckpt, path)
    with pytest.raises(RunError, match=r"config\.solver\.rtol = 0\.5, this run has 0\.001"):
        train(config_from_dict(tiny()), out, RunOptions(max_steps=8, resume=True, progress=False))


def test_bench_names_the_optimizer_whose_step_failed(monkeypatch):
    from node_ocp.train import bench as bench_mod
    from node_ocp.train.step import StepFailed

    def failing(*args, **kwargs):
        raise StepFailed("non-finite training loss nan")

    monkeypatch.setattr(bench_mod, "train_step", failing)
    with pytest.raises(RunError, match=r"^bench: adam's step 0 failed \(non-finite"):
        bench_mod.bench(config_from_dict(tiny()), ["adam"], steps=2, memory=False)
