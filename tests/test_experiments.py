"""Each experiment's main() runs briefly, so examples never rot."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_main_runs(capsys):
    result = _load("quickstart").main(["--steps", "6", "--batch", "16", "--capture-every", "2"])
    out = capsys.readouterr().out
    assert "Adam, plain adjoint" in out and "OCNOpt (ekfac)" in out
    assert result["captured"]["capture"].kronecker  # factors were gathered
    assert result["captured"]["refresh_step_time"] is not None
    assert "Measured:" in out and result["plain"]["steps"] <= 6


def test_quickstart_conclusion_states_what_was_measured():
    conclusion = _load("quickstart").conclusion
    adam = {"reached": (100, 20.0), "time_per_step": 0.2, "best_acc": 0.96, "steps": 100}
    ocn = {"reached": (40, 10.0), "time_per_step": 0.25, "best_acc": 0.97, "steps": 40}
    text = conclusion(adam, ocn, 0.95)
    assert (
        "in 40 steps against Adam's 100" in text and "0.50x Adam's training time (faster)" in text
    )
    slow = dict(ocn, reached=None, best_acc=0.6, steps=300)
    assert conclusion(adam, slow, 0.95).startswith("Measured: only Adam reached 0.95")
    none = conclusion(dict(adam, reached=None, lr=0.01), slow, 0.95)
    assert "neither reached 0.95" in none and "OCNOpt 0.600" in none


def test_bench_memory_main_runs(tmp_path):
    out = tmp_path / "bench.json"
    result = _load("bench_memory").main(
        ["--steps", "4", "8", "--batch", "8", "--hidden", "8", "--repeats", "1", "--out", str(out)]
    )
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 6 == len(result["rows"])
    direct = {r["steps"]: r["saved_MB"] for r in saved["rows"] if r["mode"] == "direct"}
    adjoint = {r["steps"]: r["saved_MB"] for r in saved["rows"] if r["mode"] == "adjoint"}
    assert direct[8] > direct[4]  # backprop through the solver stores every step
    assert adjoint[8] == adjoint[4]  # the adjoint stores nothing per step


def test_backend_compare_main_trains_both_backends_alike(tmp_path, capsys):
    out = tmp_path / "compare.json"
    cfg = ROOT / "configs" / "quickstart.toml"
    result = _load("backend_compare").main(
        [str(cfg), "--optimizers", "adam", "--steps", "3", "--out", str(out)]
    )
    row = json.loads(out.read_text())["optimizers"]["adam"]
    assert row == result["optimizers"]["adam"]
    assert row["same_nfe_every_step"] and row["first_step_with_other_nfe"] is None
    assert row["loss_max_rel_diff"] < 1e-5 and row["own_over_torchdiffeq"] > 0
    assert "ratio" in capsys.readouterr().out


def test_bench_default_main_runs_every_arm_and_saves_the_table(tmp_path):
    from train_helpers import tiny, write_toml

    cfg = write_toml(tmp_path / "tiny_task.toml", tiny(**{"train.eval_every": 2}))
    out = tmp_path / "bench"
    argv = ["--configs", str(cfg), "--budget", "1.5", "--seeds", "2", "--out", str(out)]
    argv += ["--adam-grid", "0.01", "0.05", "--tuned-grid", "0.05"]
    result = _load("bench_default").main(argv)
    saved = json.loads((out / "summary.json").read_text())
    task = saved["results"]["tiny_task"]
    assert set(task["arms"]) == {"ocnopt", "ocnopt-tuned", "adam", "ocnopt-identity"}
    adam = task["arms"]["adam"]
    assert set(adam["grid"]) == {"0.01", "0.05"} and adam["lr"] in (0.01, 0.05)
    # the choice is the better seed-0 validation metric of the grid (nll: lower)
    assert adam["grid"][repr(adam["lr"])] == min(adam["grid"].values())
    assert all(len(a["test_per_seed"]) == 2 for a in task["arms"].values())
    assert task["arms"]["ocnopt"]["lr"] == float("inf")  # the default: no grid, no cap
    # the target is Adam's median final validation metric; its own ratio is 1 or never
    assert task["target"] == pytest.approx(sum(adam["val_per_seed"]) / 2)
    assert "| tiny_task | nll ↓ | ocnopt | default |" in result["table"]
    assert "OCNOpt's default reached" in (out / "summary.md").read_text()
    # every arm but Adam carries compare's verdict in words against tuned Adam
    assert all("adam" in a["verdict"] for n, a in task["arms"].items() if n != "adam")
    # (the time to target leads the verdict where both arms reached it: timing decides)
    line = next(
        x
        for x in (out / "summary.md").read_text().splitlines()
        if x.startswith("- tiny_task, ocnopt:")
    )
    # ("final (= best-val) test nll" where the final model was the best-validation one)
    assert "final" in line and "test nll" in line and "best-val" in line
    # finished runs are kept: a second call trains nothing
    runs = sorted((out / "tiny_task").rglob("summary.json"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    _load("bench_default").main(argv)
    assert [p.stat().st_mtime_ns for p in runs] == stamps


def test_bench_default_ocnopt_set_reaches_only_the_default_arm(tmp_path):
    import tomllib
    from train_helpers import tiny, write_toml

    bench = _load("bench_default")
    settings = bench._settings(["weight_decay=0.001", "damping = 0.1", 'factors="sampled"'])
    assert settings == {"weight_decay": 0.001, "damping": 0.1, "factors": "sampled"}
    src = write_toml(tmp_path / "t.toml", tiny())
    cfg = bench._write_config(src, tmp_path / "out.toml", 3.0, {"adam": [0.01]}, settings)
    tables = tomllib.loads(cfg.read_text())["optimizers"]
    assert tables["ocnopt"] == {"kind": "ocnopt", **settings}
    assert "weight_decay" not in tables["ocnopt-tuned"] and "weight_decay" not in tables["adam"]
    for bad in (["weight_decay"], ["=1"], ["weight_decay=1e-3x"]):
        with pytest.raises(SystemExit, match="--ocnopt-set"):
            bench._settings(bad)


def test_bench_default_adam_set_reaches_only_the_adam_arm(tmp_path):
    import tomllib
    from train_helpers import tiny, write_toml

    bench = _load("bench_default")
    adam_set = bench._settings(['gradient="direct"'], "--adam-set")
    src = write_toml(tmp_path / "t.toml", tiny())
    cfg = bench._write_config(src, tmp_path / "out.toml", 3.0, {"adam": [0.01]}, {}, adam_set)
    tables = tomllib.loads(cfg.read_text())["optimizers"]
    assert tables["adam"]["gradient"] == "direct" and tables["adam"]["lr_grid"] == [0.01]
    assert all("gradient" not in t for arm, t in tables.items() if arm != "adam")
    with pytest.raises(SystemExit, match="--adam-set: expected KEY=VALUE"):
        bench._settings(["gradient"], "--adam-set")


def test_bench_default_gradient_matches_ocnopts_steps_between_refreshes(tmp_path):
    import tomllib

    bench = _load("bench_default")
    configs = ROOT / "configs"
    direct = {"gradient": "direct"}
    # the ODE-RNN forecaster: OCNOpt's default takes subspace steps through the solvers
    assert bench.gradient_tables("matched", configs / "forecast_spiral.toml") == {"adam": direct}
    # a CNF, and the latent ODE (a GRU encoder, but a loss its outputs do not determine):
    # OCNOpt's default keeps the own adjoint, and so does Adam
    assert bench.gradient_tables("matched", configs / "cnf_moons.toml") == {}
    assert bench.gradient_tables("matched", configs / "latent_spiral.toml") == {}
    assert bench.gradient_tables("adjoint", configs / "forecast_spiral.toml") == {}
    every = bench.gradient_tables("direct", configs / "cnf_moons.toml")
    assert every["adam"] == direct
    assert all(every[a] == {"between_refreshes": "direct"} for a in bench.ARMS if a != "adam")
    # written into the arms' tables; an explicit --ocnopt-set wins
    cfg = bench._write_config(
        configs / "cnf_moons.toml", tmp_path / "c.toml", 3.0, {"adam": [0.01]},
        {"between_refreshes": "own"}, None, "direct",
    )  # fmt: skip
    tables = tomllib.loads(cfg.read_text())["optimizers"]
    assert tables["adam"]["gradient"] == "direct" and tables["adam"]["lr_grid"] == [0.01]
    assert tables["ocnopt"]["between_refreshes"] == "own"
    assert tables["ocnopt-identity"]["between_refreshes"] == "direct"

    def matched(src, **ocnopt):
        cfg = bench._write_config(src, tmp_path / "m.toml", 3.0, {}, ocnopt, None, "matched")
        return tomllib.loads(cfg.read_text())["optimizers"]["adam"].get("gradient")

    # matched follows the ocnopt arm's own table: through the solver on a CNF when it says
    # so, not on the ODE-RNN when its subspace step is off
    assert matched(configs / "cnf_moons.toml", between_refreshes="direct") == "direct"
    assert matched(configs / "forecast_spiral.toml", subspace="off") is None
    assert matched(configs / "forecast_spiral.toml") == "direct"


def test_bench_default_runs_again_a_run_of_another_table(tmp_path):
    import dataclasses

    from train_helpers import tiny, write_toml

    from node_ocp.train import load_config

    bench = _load("bench_default")
    src = write_toml(tmp_path / "t.toml", tiny())
    adjoint = bench._write_config(src, tmp_path / "a.toml", 3.0, {"adam": [0.01]}, None, None)
    direct = bench._write_config(
        src, tmp_path / "d.toml", 3.0, {"adam": [0.01]}, None, None, "direct"
    )
    run = tmp_path / "run"
    run.mkdir()
    table = dataclasses.asdict(load_config(adjoint).optimizer("adam"))
    table["lr"] = 0.01  # the run's learning rate differs from the table's: not a difference
    (run / "config.json").write_text(json.dumps({"config": {"optimizers": {"adam": table}}}))
    assert bench._same_table(run, adjoint, "adam")
    assert not bench._same_table(run, direct, "adam")
    assert not bench._same_table(tmp_path, adjoint, "adam")  # no config.json: run it
    with pytest.raises(SystemExit, match=r"\[optimizers\.adam\]: unknown key 'gradiant'"):
        bench._write_config(src, tmp_path / "x.toml", 3.0, {}, None, {"gradiant": "direct"})


def test_bench_default_counts_a_diverged_run_as_a_result_not_a_failure(tmp_path, monkeypatch):
    import subprocess

    bench = _load("bench_default")
    summary = {
        "optimizer": "adam", "lr": 0.01, "seed": 1, "final_val": math.nan,
        "test_metric": math.nan, "best_test_metric": 70.5, "diverged": True, "steps": 335,
        "train_seconds": 45.3, "amortized_step_s": 0.13, "nfe_forward": 50.0,
        "nfe_backward": 170.0, "metric": "nll", "higher_is_better": False,
    }  # fmt: skip

    def diverging(cmd, **kwargs):  # the trainer writes its summary, then exits with status 3
        folder = Path(cmd[cmd.index("--out") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(summary))
        return subprocess.CompletedProcess(cmd, 3, "", "diverged: the step size underflowed")

    monkeypatch.setattr(bench.subprocess, "run", diverging)
    first = bench._run(tmp_path / "c.toml", tmp_path, "adam", 0.01, 1, 9.0)
    assert "failed" not in first and first["diverged"] and first["best_test"] == 70.5
    # found finished by a later call, it reads the same
    assert bench._run(tmp_path / "c.toml", tmp_path, "adam", 0.01, 1, 9.0) == first

    def crashing(cmd, **kwargs):  # no summary written: a failure, with the message's tail
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback\nValueError: boom")

    monkeypatch.setattr(bench.subprocess, "run", crashing)
    failed = bench._run(tmp_path / "c.toml", tmp_path, "adam", 0.03, 0, 9.0)
    assert failed["failed"].endswith("ValueError: boom") and failed["lr"] == 0.03


def test_compare_all_main_collects_one_summary_table(tmp_path):
    from train_helpers import tiny, write_toml

    cfg = write_toml(tmp_path / "tiny_task.toml", tiny(**{"train.eval_every": 2}))
    bad = write_toml(tmp_path / "bad_task.toml", tiny(**{"task.dataset": "mnist"}))
    out = tmp_path / "all"
    result = _load("compare_all").main(
        [
            "--quick",
            "--configs",
            str(bad),  # fails first; the others still run
            str(cfg),
            "--optimizers",
            "adam,ocnopt",
            "--max-steps",
            "4",
            "--out",
            str(out),
        ]
    )
    assert "| tiny_task | nll ↓ |" in result["table"]
    assert "| bad_task | failed: [task].dataset: received 'mnist'" in result["table"]
    summary = (out / "summary.md").read_text()
    assert "ocnopt t→target × adam" in summary and "tiny_task" in summary
    saved = json.loads((out / "summary.json").read_text())
    row = saved["results"]["tiny_task"]["optimizers"]
    assert set(row) == {"adam", "ocnopt"} and row["adam"]["seeds"] == 1
    assert (out / "tiny_task" / "report.md").exists()
    (t,) = saved["tally"]
    assert (t["name"], t["baseline"]) == ("ocnopt", "adam")
    assert t["win"] + t["tie"] + t["loss"] == 1  # one task that ran


def test_compare_all_tally_counts_outcomes_and_runs_the_sign_test():
    def v(outcome, ratio):
        return {"name": "ocnopt", "baseline": "adam", "outcome": outcome, "time_ratio": [ratio]}

    results = {
        f"task{i}": {"verdicts": [v(o, r)]}
        for i, (o, r) in enumerate(
            [("win", 0.5), ("win", 0.8), ("win", 1.2), ("tie", 0.9), ("loss", None), ("win", 0.7)]
        )
    }
    results["broken"] = {"failed": "x"}
    (t,) = _load("compare_all").tally(results)
    assert (t["win"], t["tie"], t["loss"]) == (4, 1, 1)
    assert (t["faster"], t["slower"], t["untimed"]) == (4, 1, 1)
    assert t["p_test"] == pytest.approx(2 * (1 + 5) / 32)  # 4 wins, 1 loss: 2 P(X <= 1)
    assert t["tasks"]["loss"] == ["task4"]


def test_feedback_ablation_main_runs_both_arms_with_gains(tmp_path):
    out = tmp_path / "ablation"
    argv = ["--tasks", "spirals", "--budget", "2", "--seeds", "1", "--out", str(out)]
    result = _load("feedback_ablation").main(argv)
    (task,) = result["tasks"]
    assert set(task["arms"]) == {"open-loop", "feedback"}
    assert all(len(a["test_per_seed"]) == 1 and not a["failed"] for a in task["arms"].values())
    assert task["arms"]["open-loop"]["mean_gain_ratio"] is None  # no feedback: no gains
    assert task["arms"]["feedback"]["mean_gain_ratio"] > 0  # the sweep added gain terms
    assert (out / "spirals.png").stat().st_size > 0
    assert "| spirals | accuracy | feedback |" in (out / "summary.md").read_text()


def test_feedback_price_main_times_the_three_arms(tmp_path):
    out = tmp_path / "price"
    argv = ["--tasks", "spirals", "--steps", "21", "--no-memory", "--out", str(out)]
    result = _load("feedback_price").main(argv)
    (row,) = result["tasks"]
    assert row["amortized_x_adam"]["adam"] == pytest.approx(1.0)
    assert row["feedback_x_open_loop"] > 0
    # the sweep's forward and the stages' re-forwards are counted
    assert row["feedback_nfe"][0] > row["open_loop_nfe"][0]
    assert "| spirals |" in (out / "summary.md").read_text()


def test_lr_robustness_main_covers_every_arm_and_rate(tmp_path):
    out = tmp_path / "lr"
    argv = ["--tasks", "spirals", "--lrs", "0.01", "10", "--seeds", "1", "--budget", "1.5"]
    argv += ["--arms", "adam", "ocnopt-feedback"]
    module = _load("lr_robustness")
    assert module.DEFAULT_ARMS == ["sgd", "adam", "ocnopt", "ocnopt-feedback"]
    result = module.main(argv + ["--out", str(out)])
    (task,) = result["tasks"]
    assert set(task["arms"]) == {"adam", "ocnopt-feedback"}
    for arm in task["arms"].values():
        assert set(arm["by_lr"]) == {"0.01", "10.0"}
        assert all(len(r["test_per_seed"]) + r["diverged"] >= 1 for r in arm["by_lr"].values())
    assert (out / "spirals.png").stat().st_size > 0
    assert "| spirals | adam |" in (out / "summary.md").read_text()


def test_diagnose_ocnopt_main_records_every_group_for_both_optimizers(tmp_path):
    import math

    out = tmp_path / "diag"
    _load("diagnose_ocnopt").main(["--steps", "3", "--eval-every", "2", "--out", str(out)])
    saved = json.loads((out / "diagnosis.json").read_text())
    assert saved["groups"] == ["gru", "ode", "head"]  # the ODE-RNN's top-level children
    keys = {"grad_norm", "update_norm", "cosine", "decrease", "share"}
    for name in ("adam", "ocnopt"):
        arm = saved["optimizers"][name]
        assert arm["failed"] is None and len(arm["steps"]) == 3
        for step in arm["steps"]:
            assert set(step["groups"]) == {"gru", "ode", "head"}
            for group in step["groups"].values():
                assert set(group) == keys
                assert all(math.isfinite(v) for v in group.values())
            assert math.isfinite(step["loss"]) and step["nfe_forward"] > 0
        assert [e["step"] for e in arm["evals"]] == [0, 2, 3]
        assert all(math.isfinite(e["mse"]) for e in arm["evals"])
    ocn = saved["optimizers"]["ocnopt"]["steps"]
    assert ocn[0]["ocnopt"]["adapted"] and ocn[0]["nfe_trial"] > 0  # the first step is a trial
    assert all(s["nfe_trial"] == 0 for s in saved["optimizers"]["adam"]["steps"])
    summary = saved["summary"]
    assert math.isfinite(summary["groups"]["ode"]["update_ratio"])
    assert 0 < summary["optimizers"]["ocnopt"]["trial_nfe_share"] < 1
    assert "| ode |" in (out / "diagnosis.md").read_text()


def test_unit_calibration_main_measures_every_unit(tmp_path):
    from train_helpers import tiny, write_toml

    cfg = write_toml(tmp_path / "tiny_task.toml", tiny())
    rows = _load("unit_calibration").main([str(cfg), "--steps", "2", "--sizes", "1e-3"])
    assert rows and all(r["held"] > 0 for r in rows)
    assert all(math.isfinite(r["kappa_u"]["0.001"]) for r in rows)


def test_bench_latent_summary_picks_adams_lr_and_times_each_run_to_its_best(tmp_path, capsys):
    import subprocess

    def run(name, vals, test):
        d = tmp_path / name
        d.mkdir()
        rows = [{"step": 10 * i, "seconds": 2.0 * i, "val_mse": v} for i, v in enumerate(vals)]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        summ = {"best_test": {"mse": test, "elbo": -1.0}, "test": {"mse": test, "elbo": -1.0}}
        summ.update(best_step=10 * vals.index(min(vals)), train_seconds=8.0, steps=40)
        (d / "summary.json").write_text(json.dumps(summ))

    run("adam_lr0.01_s0", [0.5, 0.3, 0.2], 0.2)
    run("adam_lr0.1_s0", [0.5, 0.4, 0.25], 0.25)
    for s in range(3):
        run(f"adam_best_s{s}", [0.5, 0.3, 0.2], 0.2)
        run(f"ocnopt_s{s}", [0.5, 0.15, 0.1] if s else [0.5, 0.4, 0.3], 0.1)
    script = ROOT / "experiments" / "bench_latent_summary.py"
    argv = [sys.executable, str(script), str(tmp_path)]
    best = subprocess.run([*argv, "--best-lr"], capture_output=True, text=True, check=True)
    assert best.stdout.strip() == "0.01"
    table = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert "| 0 | OCNOpt default | 0.1000 (20) | 0.1000 | -1.000 | 0.20 | never |" in table
    assert "| 1 | OCNOpt default | 0.1000 (20) | 0.1000 | -1.000 | 0.20 | 2 s (10) |" in table
    assert "| 2 | Adam (tuned) | 0.2000 (20) | 0.2000 | -1.000 | 0.20 | 4 s (20) |" in table


def test_feedback_arms_are_data_and_take_any_extra_option_table():
    module = _load("feedback_ablation")
    argv = ["--tasks", "spirals", "mlp_digits", "--arm", "fb-own", "feedback=gauss_newton"]
    args = module._parser().parse_args(argv + ["feedback_gain=own", "feedback_clip=3"])
    arms = module.arms_per_task(args, module.ARMS, module.DEFAULT_ARMS, module.TASK_ARMS)
    assert list(arms["spirals"]) == ["open-loop", "feedback", "fb-own"]
    sources = ["open-loop", "feedback", "feedback-sampled", "feedback-exact"]
    assert list(arms["mlp_digits"]) == [*sources, "fb-own"]
    own = {"kind": "ocnopt", "feedback": "gauss_newton", "feedback_gain": "own", "feedback_clip": 3}
    assert arms["spirals"]["fb-own"] == own
    with pytest.raises(SystemExit, match="--arms: received 'nope'"):
        module.arms_per_task(module._parser().parse_args(["--arms", "nope"]), module.ARMS, [], {})
    # the learning-rate experiment's arms on the discrete networks span >= 3 decades each
    lr = _load("lr_robustness")
    for table in lr.TASK_ARMS["cnn_digits"].values():
        assert max(table["lr_grid"]) / min(table["lr_grid"]) >= 1e3


def test_per_sample_nfe_main_runs(capsys):
    result = _load("per_sample_nfe").main(
        ["--configs", str(ROOT / "configs" / "quickstart.toml"), "--train-steps", "1",
         "--batches", "8", "--time", "--repeats", "1"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "iterations batch" in out and "time: solve" in out
    (row,) = next(iter(result["configs"].values()))["batches"].values()
    assert row["per_sample"]["iterations"] >= row["per_sample"]["accepted_max"]
    assert row["max_abs_diff"] < 1e-2
