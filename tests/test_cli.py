"""The node-ocp command line: help, errors (one line, exit 2), compare/bench/plot end to end."""

import json
import subprocess
import sys

import pytest
import torch
from train_helpers import tiny, write_toml

from node_ocp.cli import EXIT_USAGE, main
from node_ocp.train.loop import EXIT_DIVERGED


@pytest.fixture
def cfg_path(tmp_path):
    cfg = tiny(**{"train.steps": 6, "train.eval_every": 3})
    cfg["optimizers"]["adam"]["lr_grid"] = [0.02, 0.05]
    return write_toml(tmp_path / "tiny.toml", cfg)


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("node-ocp: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", ["train", "compare", "bench", "plot"])
def test_help_of_every_command_is_complete(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"node-ocp {command}" in out
    if command != "plot":
        assert "CONFIG" in out and "--device" in out and "default" in out


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "node_ocp", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "train" in proc.stdout and "compare" in proc.stdout


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, cfg_path, capsys):
    msg = _error(capsys, ["train", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")])
    assert "nope.toml" in msg and "is not a file" in msg
    bad = tmp_path / "bad.toml"
    bad.write_text("[task]\nkind = \n")
    assert "is not valid TOML" in _error(capsys, ["train", str(bad)])
    unknown = tmp_path / "unknown.toml"
    unknown.write_text(
        "[task]\ndataset = 'mnist'\n[optimizers.adam]\nkind = 'adam'\n[train]\noptimizer = 'adam'\n"
    )
    msg = _error(capsys, ["train", str(unknown), "--out", str(tmp_path / "u")])
    assert "[task].dataset: received 'mnist'" in msg and "8gaussians" in msg
    msg = _error(
        capsys,
        ["compare", str(cfg_path), "--optimizers", "adam,lbfgs", "--out", str(tmp_path / "c")],
    )
    assert "--optimizers: received 'lbfgs'" in msg and "'adam', 'ocnopt'" in msg
    msg = _error(capsys, ["train", str(cfg_path), "--optimizer", "rmsprop"])
    assert "--optimizer: received 'rmsprop'" in msg
    blocker = tmp_path / "file"
    blocker.write_text("x")
    msg = _error(capsys, ["train", str(cfg_path), "--out", str(blocker / "run")])
    assert "--out: cannot write to" in msg
    msg = _error(capsys, ["train", str(cfg_path), "--out", str(tmp_path / "r"), "--resume"])
    assert "--resume: no checkpoint in" in msg
    if not torch.cuda.is_available():
        msg = _error(
            capsys, ["train", str(cfg_path), "--device", "cuda", "--out", str(tmp_path / "g")]
        )
        assert "no CUDA GPU" in msg
        msg = _error(
            capsys, ["compare", str(cfg_path), "--device", "cuda", "--out", str(tmp_path / "h")]
        )
        assert "no CUDA GPU" in msg and not (tmp_path / "h").exists()
    msg = _error(capsys, ["compare", str(unknown), "--out", str(tmp_path / "cu"), "--seeds", "1"])
    assert "[task].dataset: received 'mnist'" in msg
    text = cfg_path.read_text()
    assert "[optimizers.ocnopt]" in text
    negative = tmp_path / "negative.toml"
    negative.write_text(text.replace("[optimizers.ocnopt]", "[optimizers.ocnopt]\nkl_clip = -1.0"))
    msg = _error(capsys, ["train", str(negative), "--out", str(tmp_path / "n")])
    assert "[optimizers.ocnopt].kl_clip: received -1.0; accepted: a float >= 0" in msg
    msg = _error(capsys, ["plot", str(tmp_path / "absent")])
    assert "is not a folder" in msg
    msg = _error(capsys, ["plot", str(tmp_path)])
    assert "neither comparison.json nor metrics.jsonl" in msg


@pytest.mark.parametrize(
    "error",
    [
        ValueError("curvature: received 'dense'; accepted: ...\nsecond line"),
        ImportError("torchcde is needed for NeuralCDE; install it with: pip install torchcde"),
    ],
)
def test_library_argument_errors_and_missing_packages_are_one_line(
    tmp_path, cfg_path, capsys, monkeypatch, error
):
    import node_ocp.train.loop as loop

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(loop, "build_task", failing)
    msg = _error(capsys, ["train", str(cfg_path), "--out", str(tmp_path / "o")])
    assert msg == "node-ocp: error: " + str(error).splitlines()[0]
    monkeypatch.setenv("NODE_OCP_TRACEBACK", "1")
    with pytest.raises(type(error)):
        main(["train", str(cfg_path), "--out", str(tmp_path / "o")])


def test_bad_flag_values_exit_2(capsys, cfg_path):
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(cfg_path), "--seeds", "0"])
    assert exc.value.code == 2
    assert "--seeds: received 0; accepted: an int >= 1" in capsys.readouterr().err


def test_train_then_resume_then_plot(tmp_path, cfg_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", str(cfg_path), "--out", str(out), "--no-progress", "--max-steps", "3"]) == 0
    )
    assert "done: 3 steps" in capsys.readouterr().out
    assert main(["train", str(cfg_path), "--out", str(out), "--no-progress", "--resume"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 6]
    assert main(["plot", str(out)]) == 0
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "density.png").stat().st_size > 1000


def test_compare_writes_report_figures_and_picks_lrs(tmp_path, cfg_path, capsys):
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            str(cfg_path),
            "--optimizers",
            "adam,ocnopt",
            "--seeds",
            "2",
            "--lr-grid",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    result = json.loads((out / "comparison.json").read_text())
    adam = result["optimizers"]["adam"]
    assert set(adam["grid"]) == {"0.02", "0.05"} and adam["seeds"] == 2
    # the chosen lr has the best mean final validation NLL of its grid
    means = {lr: g["mean_val"] for lr, g in adam["grid"].items()}
    assert means[f"{adam['lr']:g}"] == min(means.values())
    chosen = adam["grid"][repr(adam["lr"])]["vals"]
    assert result["best_baseline"] == "adam"  # the only first-order optimizer
    assert result["target"] == pytest.approx(sum(chosen) / 2)  # median of two seeds
    runs = [r for r in result["runs"] if r["optimizer"] == "adam" and r["lr"] == adam["lr"]]
    assert adam["test"][0] == pytest.approx(sum(r["test_metric"] for r in runs) / 2)
    assert adam["per_seed_test"] == {str(r["seed"]): r["test_metric"] for r in runs}
    report = (out / "report.md").read_text()
    assert "| adam | " in report and "| ocnopt | " in report and "to target s" in report
    headline = report.splitlines()[2]
    assert headline == f"**{result['verdicts'][0]['text']}.**"
    assert headline.startswith("**ocnopt") and "adam" in headline
    assert "## Per seed" in report and result["verdicts"][0]["text"] + "." in printed
    for fig in ("curves_steps.png", "curves_time.png", "lr_sensitivity.png", "density.png"):
        assert (out / fig).stat().st_size > 1000, fig
        assert f"]({fig})" in report
    (out / "report.md").unlink()
    (out / "curves_time.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "report.md").exists() and (out / "curves_time.png").exists()


def test_bench_prints_and_saves_ratios_to_adam(tmp_path, cfg_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", str(cfg_path), "--steps", "7", "--out", str(out), "--solver-loop", "1"]
    assert main([*argv, "--solver-loop-train-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "ratios to adam" in printed and "ocnopt" in printed
    result = json.loads(out.read_text())
    loop = {(r["field"], r["method"]) for r in result["solver_loop"]}
    assert loop == {("mlp", "dopri5"), ("mlp", "rk4"), ("conv", "dopri5"), ("conv", "rk4")}
    assert "solver loop" in printed and "own/floor" in printed
    assert all(r["loss_max_rel_diff"] < 1e-4 for r in result["solver_loop"])
    rows = result["optimizers"]
    want_ratio = rows["ocnopt"]["amortized_s"] / rows["adam"]["amortized_s"]
    assert rows["ocnopt"]["amortized_ratio"] == pytest.approx(want_ratio)
    assert rows["ocnopt"]["refresh_s"] is not None and rows["ocnopt"]["step_s"] is not None
    # refresh every 3 steps, a trial every 5: over 15 steps one step does both, 4 more
    # refresh, 2 more adapt and 8 are plain
    assert (rows["ocnopt"]["update_every"], rows["ocnopt"]["adapt_every"]) == (3, 5)
    c = rows["ocnopt"]["kind_s"]
    want = (c["refresh+adapt"] + 4 * c["refresh"] + 2 * c["adapt"] + 8 * c["plain"]) / 15
    assert rows["ocnopt"]["amortized_s"] == pytest.approx(want)
    # same model state for both: equal function evaluations per solve; OCNOpt's trials at
    # steps 0 and 5 of the 7 add a forward solve each
    assert rows["ocnopt"]["nfe_forward"] == pytest.approx(rows["adam"]["nfe_forward"] * 9 / 7)
    assert rows["ocnopt"]["nfe_backward"] == rows["adam"]["nfe_backward"]
    assert rows["adam"]["step_memory_mb"] > 0 and rows["ocnopt"]["memory_ratio"] > 0
    assert rows["ocnopt"]["refresh_memory_mb"] > 0 and rows["adam"]["refresh_memory_mb"] is None
    want_nfe = (rows["ocnopt"]["nfe_forward"] + rows["ocnopt"]["nfe_backward"]) / (
        rows["adam"]["nfe_forward"] + rows["adam"]["nfe_backward"]
    )
    assert rows["ocnopt"]["nfe_ratio"] == pytest.approx(want_nfe)


def test_bench_without_adam_uses_the_config_s_adam_and_checks_out_first(tmp_path, cfg_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    msg = _error(capsys, ["bench", str(cfg_path), "--out", str(blocker / "b.json")])
    assert msg.startswith("node-ocp: error: --out: cannot write to")
    out = tmp_path / "b.json"
    args = ["bench", str(cfg_path), "--optimizers", "ocnopt", "--steps", "4", "--out", str(out)]
    args += ["--solver-loop", "0"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["baseline"] == "adam" and set(result["optimizers"]) == {"adam", "ocnopt"}
    assert result["optimizers"]["ocnopt"]["memory_ratio"] > 0


def test_compare_resume_keeps_finished_runs(tmp_path, cfg_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", str(cfg_path), "--optimizers", "adam", "--out", str(out), "--no-progress"]
    assert main([*args, "--seeds", "1"]) == 0
    first = out / "runs" / "adam" / "lr0.05" / "seed0" / "summary.json"
    stamp = first.stat().st_mtime_ns
    assert main([*args, "--seeds", "2", "--resume"]) == 0
    assert first.stat().st_mtime_ns == stamp  # not trained again
    result = json.loads((out / "comparison.json").read_text())
    assert result["optimizers"]["adam"]["seeds"] == 2
    # another budget is another run: --resume trains it again
    assert main([*args, "--seeds", "1", "--resume", "--max-steps", "3"]) == 0
    assert first.stat().st_mtime_ns != stamp
    assert json.loads((first.parent / "config.json").read_text())["max_steps"] == 3


def test_a_run_folder_is_never_overwritten_without_resume_or_overwrite(tmp_path, cfg_path, capsys):
    out = tmp_path / "run"
    base = ["train", str(cfg_path), "--out", str(out), "--no-progress", "--optimizer", "adam"]
    assert main(base) == 0
    before = {f: (out / f).read_bytes() for f in ("metrics.jsonl", "summary.json", "config.json")}
    msg = _error(capsys, base + ["--lr", "0.01"])
    assert msg.startswith(f"node-ocp: error: --out: {str(out)!r} already holds a run (")
    assert "--resume" in msg and "--overwrite" in msg
    assert {f: (out / f).read_bytes() for f in before} == before  # nothing lost
    assert main(base + ["--lr", "0.01", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01


def test_resume_on_a_missing_folder_creates_nothing(tmp_path, cfg_path, capsys):
    out = tmp_path / "nothing" / "here"
    msg = _error(capsys, ["train", str(cfg_path), "--out", str(out), "--resume"])
    assert msg.startswith("node-ocp: error: --resume: no checkpoint in")
    assert not (tmp_path / "nothing").exists()


def test_compare_refuses_a_folder_holding_a_comparison(tmp_path, cfg_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", str(cfg_path), "--optimizers", "adam", "--seeds", "1"]
    argv += ["--out", str(out), "--no-progress", "--max-steps", "2"]
    assert main(argv) == 0
    report = (out / "report.md").read_bytes()
    msg = _error(capsys, argv)
    assert "already holds a comparison (comparison.json, report.md, runs)" in msg
    assert (out / "report.md").read_bytes() == report
    assert main(argv + ["--resume"]) == 0 and main(argv + ["--overwrite"]) == 0


def test_batch_larger_than_the_training_split_is_an_error(tmp_path, capsys):
    path = write_toml(tmp_path / "big.toml", tiny(**{"train.batch_size": 1000}))
    msg = _error(capsys, ["train", str(path), "--out", str(tmp_path / "r")])
    assert msg == (
        "node-ocp: error: [train].batch_size: received 1000 for a training split of 256 "
        "examples; accepted: an int <= 256"
    )


def test_a_diverged_run_exits_with_its_documented_status(tmp_path, capsys):
    cfg = tiny(**{"train.steps": 6})
    cfg["optimizers"]["adam"]["lr"] = 1e6  # blows up the flow
    path = write_toml(tmp_path / "wild.toml", cfg)
    out = tmp_path / "r"
    code = main(["train", str(path), "--optimizer", "adam", "--out", str(out), "--no-progress"])
    assert code == EXIT_DIVERGED == 3
    assert json.loads((out / "summary.json").read_text())["diverged"] is True
    assert "exit status 3" in capsys.readouterr().out


def test_plot_on_a_corrupt_comparison_names_the_file(tmp_path, capsys):
    (tmp_path / "comparison.json").write_text('{"optimizers": ')
    msg = _error(capsys, ["plot", str(tmp_path)])
    assert repr(str(tmp_path / "comparison.json")) in msg and "not a readable comparison" in msg


def _children_running(marker: str) -> list[int]:
    import os

    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if " train " in cmd and marker in cmd:
            pids.append(int(pid))
    return pids


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sigterm_to_compare_reaches_its_child_run(tmp_path):
    import signal
    import time

    path = write_toml(tmp_path / "long.toml", tiny(**{"train.steps": 100000}))
    out = tmp_path / "cmp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "node_ocp", "compare", str(path), "--optimizers", "adam"]
        + ["--seeds", "1", "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not list(out.glob("runs/*/*/*/metrics.jsonl")) and time.time() < deadline:
        time.sleep(0.2)
    assert _children_running(str(out)), "the child train never started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    time.sleep(0.5)
    assert _children_running(str(out)) == []  # no orphan left training
