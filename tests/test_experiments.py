"""Each experiment's main() runs briefly, so examples never rot."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_main_runs(capsys):
    result = _load("quickstart").main(["--steps", "4", "--batch", "16", "--capture-every", "2"])
    out = capsys.readouterr().out
    assert "Adam, plain adjoint" in out and "OCNOpt (ekfac)" in out
    assert result["captured"]["capture"].kronecker  # factors were gathered
    assert result["captured"]["refresh_step_time"] is not None


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


def test_bench_ocnopt_main_runs(tmp_path):
    out = tmp_path / "bench.json"
    result = _load("bench_ocnopt").main(
        [
            "--steps",
            "3",
            "--batch",
            "16",
            "--hidden",
            "4",
            "--eval-every",
            "1",
            "--update-every",
            "2",
            "--cost-steps",
            "4",
            "--grid",
            "single",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert set(saved["summary"]) == {"adam", "sgd", "ocnopt"}
    assert saved["costs"]["refresh_ratio"] > 0 and result["costs"]["amortized_ratio"] > 0
    assert len(saved["runs"][0]["curve"]) == 4  # steps 0..3


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
