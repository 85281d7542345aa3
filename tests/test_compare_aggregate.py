"""Comparison aggregation on hand-made run folders: lr choice, intervals, target, verdicts."""

import json
import math
import statistics

import pytest
from train_helpers import tiny

from node_ocp.train import config_from_dict
from node_ocp.train.compare import aggregate, run_dir, time_to_target


def _run(out, name, kind, lr, seed, curve, test, diverged=False, step_s=0.1):
    d = run_dir(out, name, lr, seed)
    d.mkdir(parents=True)
    records = [
        {
            "step": 10 * i,
            "seconds": sec,
            "val_nll": v,
            "nfe_forward": 20.0,
            "nfe_backward": 20.0,
            "t1": None,
            "train_loss": v,
        }
        for i, (sec, v) in enumerate(curve)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "optimizer": name,
        "optimizer_kind": kind,
        "lr": lr,
        "seed": seed,
        "device": "cpu",
        "task": "density",
        "dataset": "8gaussians",
        "metric": "nll",
        "higher_is_better": False,
        "diverged": diverged,
        "final_val": math.nan if diverged else curve[-1][1],
        "test_metric": math.nan if diverged else test,
        "train_seconds": curve[-1][0],
        "amortized_step_s": step_s,
        "refresh_time_s": None,
        "step_time_s": step_s,
        "nfe_forward": 20.0,
        "nfe_backward": 20.0,
        "peak_memory_mb": 400.0,
        "train_memory_mb": 40.0,
        "t1": None,
    }
    (d / "summary.json").write_text(json.dumps(summary))


def test_aggregate_chooses_lrs_on_validation_and_times_the_target(tmp_path):
    cfg = config_from_dict(tiny())
    # adam: lr 0.1 better on validation than lr 0.01; final vals 3.0 and 3.2 (target 3.2)
    _run(tmp_path, "adam", "adam", 0.1, 0, [(0, 5.0), (1.0, 3.5), (2.0, 3.0)], 3.1)
    _run(tmp_path, "adam", "adam", 0.1, 1, [(0, 5.0), (1.5, 3.6), (3.0, 3.2)], 3.3)
    _run(tmp_path, "adam", "adam", 0.01, 0, [(0, 5.0), (1.0, 4.0), (2.0, 3.9)], 3.9)
    _run(tmp_path, "adam", "adam", 0.01, 1, [(0, 5.0), (1.0, 4.1), (2.0, 3.8)], 3.8)
    # ocnopt: lr 0.3 has a diverged seed, so 0.1 is chosen although its other seed is best
    _run(tmp_path, "ocnopt", "ocnopt", 0.3, 0, [(0, 5.0), (0.5, 2.0), (1.0, 1.9)], 1.9)
    _run(tmp_path, "ocnopt", "ocnopt", 0.3, 1, [(0, 5.0)], 0.0, diverged=True)
    _run(tmp_path, "ocnopt", "ocnopt", 0.1, 0, [(0, 5.0), (0.4, 3.1), (0.8, 2.9)], 2.8, step_s=0.12)
    _run(tmp_path, "ocnopt", "ocnopt", 0.1, 1, [(0, 5.0), (0.6, 3.4), (1.2, 3.3)], 3.4, step_s=0.12)
    r = aggregate(tmp_path, cfg, ["adam", "ocnopt"])
    adam, ocn = r["optimizers"]["adam"], r["optimizers"]["ocnopt"]
    assert adam["lr"] == 0.1 and ocn["lr"] == 0.1
    assert ocn["grid"]["0.3"]["diverged"] == 1 and math.isinf(ocn["grid"]["0.3"]["mean_val"])
    # the median over seeds of the best baseline's final validation NLL (3.0, 3.2): 3.1
    assert r["best_baseline"] == "adam" and r["target"] == pytest.approx(3.1)
    assert adam["test"][0] == pytest.approx(3.2) and adam["test"][1] == pytest.approx(
        statistics.stdev([3.1, 3.3])
    )
    half = 12.7062 * statistics.stdev([3.1, 3.3]) / math.sqrt(2)  # t_{0.975, 1}
    assert adam["test_ci"][1:3] == pytest.approx([3.2 - half, 3.2 + half])
    assert adam["per_seed_test"] == {0: 3.1, 1: 3.3}
    # adam reaches 3.1 at 2.0 s in seed 0 only; ocnopt at 0.4 s in seed 0 only
    assert adam["per_seed_time_to_target_s"] == {0: 2.0, 1: None}
    assert adam["time_to_target_s"] is None and adam["reached"] == "1/2"  # median(2.0, inf)
    assert ocn["per_seed_time_to_target_s"] == {0: 0.4, 1: None} and ocn["reached"] == "1/2"
    assert ocn["step_cost_ratio"] == pytest.approx(1.2)
    # seed-paired verdict: test differences -0.3 and +0.1 -> no difference detected; the
    # time ratio over the one seed both reached: 0.4 / 2.0
    (v,) = r["verdicts"]
    assert (v["name"], v["baseline"], v["outcome"]) == ("ocnopt", "adam", "tie")
    assert v["test_difference"][0] == pytest.approx(-0.1)
    assert v["time_ratio"][0] == pytest.approx(0.2)
    assert r["headline"].startswith("ocnopt reached the target in 0.2× adam's time, 1/2 seeds")
    assert "no difference detected at 2 seeds" in r["headline"]


def test_time_to_target_direction_and_missing_values():
    recs = [
        {"step": 0, "seconds": 0.0, "val_accuracy": 0.2},
        {"step": 5, "seconds": 1.5, "val_accuracy": None},
        {"step": 10, "seconds": 3.0, "val_accuracy": 0.9},
    ]
    assert time_to_target(recs, "val_accuracy", 0.8, higher=True) == (3.0, 10)
    assert time_to_target(recs, "val_accuracy", 0.95, higher=True) is None
    assert time_to_target(recs, "val_accuracy", 0.5, higher=False) == (0.0, 0)
    assert time_to_target(recs, "val_accuracy", math.nan, higher=False) is None


def test_the_standard_ekfac_table_is_a_baseline_not_the_method_judged(tmp_path):
    raw = tiny()
    raw["optimizers"]["ekfac"] = {"kind": "ocnopt", "time_joint": False, "gradient": "direct"}
    cfg = config_from_dict(raw)
    for seed, (a, o, e) in enumerate([(3.0, 2.8, 4.0), (3.2, 3.0, 4.2), (3.1, 2.9, 4.1)]):
        _run(tmp_path, "adam", "adam", 0.1, seed, [(0, 5.0), (1.0, a)], a)
        _run(tmp_path, "ocnopt", "ocnopt", 0.1, seed, [(0, 5.0), (0.5, o)], o)
        _run(tmp_path, "ekfac", "ocnopt", 0.1, seed, [(0, 5.0), (0.7, e)], e)
    r = aggregate(tmp_path, cfg, ["adam", "ekfac", "ocnopt"])
    assert [v["name"] for v in r["verdicts"]] == ["ocnopt", "ocnopt"]
    assert [v["baseline"] for v in r["verdicts"]] == ["adam", "ekfac"]
    assert r["headline"].startswith("ocnopt reached the target in 0.5× adam's time")
    assert "test nll lower by 0.2 ±" in r["headline"] and r["verdicts"][0]["outcome"] == "win"
