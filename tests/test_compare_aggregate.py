"""Comparison aggregation on hand-made run folders: lr choice, intervals, target, verdicts."""

import json
import math
import statistics

import pytest
from train_helpers import tiny

from node_ocp.train import config_from_dict
from node_ocp.train.compare import (
    aggregate,
    ended_far_worse,
    late_gain,
    run_dir,
    time_to_target,
)
from node_ocp.train.config import lr_label
from node_ocp.train.report import format_summary, write_report


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
    assert r["headline"].startswith(
        "ocnopt reached the target in 0.2× adam's time on seed 0, the only seed where both "
        "reached it (ocnopt 1/2, adam 1/2)"
    )
    assert "final test nll: no difference detected at 2 seeds" in r["headline"]
    assert v["time_ratio_seeds"] == [0] and ocn["time_ratio_seeds"] == [0]
    assert ocn["time_to_target_ratio"] == pytest.approx(0.2)  # the table's: the same seeds


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
    assert r["headline"].startswith(
        "ocnopt's final test nll is lower (better) than adam's on every seed (3/3"
    )
    assert (
        "ocnopt reached the target in 0.5× [0.5, 0.5] adam's time over seeds 0,2" in (r["headline"])
    )
    assert r["verdicts"][0]["outcome"] == "win"


# ------------------------------------------- issue 23: reports that agree with themselves
def _row(report: str, name: str) -> list[str]:
    """The cells of ``name``'s row of the report's main table."""
    row = next(ln for ln in report.splitlines() if ln.startswith(f"| {name} | "))
    return [c.strip() for c in row.split("|")[1:-1]]


def _legends(monkeypatch) -> list[str]:
    """Collects the legend texts of every figure the report draws (read as it closes)."""
    import matplotlib.pyplot as plt

    seen, close = [], plt.close

    def reading(fig=None):
        for ax in getattr(fig, "axes", []):
            if ax.get_legend() is not None:
                seen.extend(t.get_text() for t in ax.get_legend().get_texts())
        close(fig)

    monkeypatch.setattr(plt, "close", reading)
    return seen


def test_the_headline_and_the_table_give_one_time_ratio_over_named_seeds(tmp_path, monkeypatch):
    """Issue 23: the headline said '1.15× adam's time, 2/2 seeds (adam 1/2)' where the table
    said '–' and adam 'never'. Adam reached the target (3.1, its median final) on seed 0
    only, ocnopt (no lr: 'default', not 'inf') on both seeds."""
    cfg = config_from_dict(tiny())
    _run(tmp_path, "adam", "adam", 0.1, 0, [(0, 5.0), (1.0, 3.5), (2.0, 3.0)], 3.1)
    _run(tmp_path, "adam", "adam", 0.1, 1, [(0, 5.0), (1.5, 3.6), (3.0, 3.2)], 3.3)
    _run(tmp_path, "ocnopt", "ocnopt", math.inf, 0, [(0, 5.0), (2.3, 3.05), (3.0, 3.0)], 3.2)
    _run(tmp_path, "ocnopt", "ocnopt", math.inf, 1, [(0, 5.0), (1.0, 3.0), (2.0, 3.05)], 3.1)
    r = aggregate(tmp_path, cfg, ["adam", "ocnopt"])
    said = "1.15× on seed 0, the only seed where both reached it"
    assert r["headline"].startswith(
        "ocnopt reached the target in 1.15× adam's time on seed 0, the only seed where both "
        "reached it (ocnopt 2/2, adam 1/2)"
    )
    ocn = r["optimizers"]["ocnopt"]
    assert ocn["time_ratio_cell"] == said and ocn["time_ratio_seeds"] == [0]
    assert ocn["time_to_target_ratio"] == pytest.approx(r["verdicts"][0]["time_ratio"][0])
    legends = _legends(monkeypatch)
    report = write_report(tmp_path, r).read_text()
    assert report.splitlines()[2] == f"**{r['headline']}.**"
    ocn_row, adam_row = _row(report, "ocnopt"), _row(report, "adam")
    assert ocn_row[1] == "default" and ocn_row[8] == said and ocn_row[7] == "2/2"
    assert adam_row[6] == "no median (1/2 reached)" and adam_row[8] == "baseline"
    assert "| ocnopt | default **(chosen)** |" in report  # the lr grid
    assert "ocnopt (lr default)" in legends and "adam (lr 0.1)" in legends
    assert not any("inf" in ln for ln in report.splitlines() if ln.startswith("| ocnopt |"))
    text = format_summary(r)
    table = text.splitlines()[len(r["verdicts"]) + 2 :]  # past the verdicts and the header
    line = next(ln for ln in table if ln.startswith("ocnopt "))
    assert "default" in line and line.endswith(said) and "inf" not in line


def test_a_baseline_that_never_reached_the_target_gives_no_ratio_anywhere(tmp_path):
    cfg = config_from_dict(tiny(**{"train.target": 2.5}))
    for seed in (0, 1):
        _run(tmp_path, "adam", "adam", 0.1, seed, [(0, 5.0), (1.0, 3.5), (2.0, 3.0)], 3.1)
        _run(tmp_path, "ocnopt", "ocnopt", 0.1, seed, [(0, 5.0), (1.0, 2.4), (2.0, 2.3)], 3.0)
    r = aggregate(tmp_path, cfg, ["adam", "ocnopt"])
    said = "adam never reached the target; ocnopt did on 2/2 seeds"
    assert said in r["headline"] and "×" not in r["headline"]
    assert r["optimizers"]["ocnopt"]["time_to_target_ratio"] is None
    report = write_report(tmp_path, r).read_text()
    assert _row(report, "ocnopt")[8] == said and _row(report, "adam")[6] == "never"


def test_a_loss_on_every_seed_leads_the_headline_with_the_runs_that_fell_back(tmp_path):
    """Issue 23's small tabular CNF: ocnopt ends 40-130x worse than adam on every seed,
    having touched the target once (seed 2, early); the headline read 'ocnopt reached the
    target in 0.117× adam's time, 1/3 seeds (adam 3/3); test nll: no difference detected'."""
    cfg = config_from_dict(tiny())
    adam = [
        [(0, 50.0), (1.0, 20.0), (2.0, 10.5), (3.0, 12.0)],
        [(0, 50.0), (1.5, 15.0), (3.0, 10.0)],
        [(0, 50.0), (1.5, 15.0), (3.0, 11.0)],
    ]
    ocn = [
        [(0, 50.0), (0.4, 30.0), (1.0, 480.0)],
        [(0, 50.0), (0.4, 30.0), (1.0, 1300.0)],
        [(0, 50.0), (0.35, 9.0), (0.7, 400.0), (1.0, 1430.0)],
    ]
    for seed in range(3):
        _run(tmp_path, "adam", "adam", 0.1, seed, adam[seed], adam[seed][-1][1])
        _run(tmp_path, "ocnopt", "ocnopt", 0.1, seed, ocn[seed], ocn[seed][-1][1])
    r = aggregate(tmp_path, cfg, ["adam", "ocnopt"])
    assert r["target"] == pytest.approx(11.0)
    (v,) = r["verdicts"]
    assert v["outcome"] == "tie"  # the t interval includes 0 at three seeds...
    assert v["every_seed"] == "worse" and v["sign_test_p"] == pytest.approx(0.25)
    head = r["headline"]
    assert "no difference" not in head  # ...but 3/3 worse is not 'no difference'
    assert head.startswith(
        "ocnopt's final test nll is higher (worse) than adam's on every seed (3/3, sign test "
        "p = 0.25), by 468 to 1.42e+03"
    )
    assert (
        "ocnopt ended far worse than its best on 3/3 seeds (final val nll vs best: seed 0: 480 "
        "vs 30 at step 10, seed 1: 1.3e+03 vs 30 at step 10, seed 2: 1.43e+03 vs 9 at step 10)"
    ) in head
    said = "0.117× on seed 2, the only seed where both reached it"
    assert head.endswith(
        "ocnopt reached the target in 0.117× adam's time on seed 2, the only seed where both "
        "reached it (ocnopt 1/3, adam 3/3)"
    )
    assert head.index("every seed") < head.index("far worse") < head.index("0.117×")
    report = write_report(tmp_path, r).read_text()
    assert _row(report, "ocnopt")[8] == said and _row(report, "ocnopt")[7] == "1/3"
    assert f"- {head}." in report  # the first verdict is the headline


def test_ended_far_worse_gives_back_more_than_half_of_its_gain():
    def recs(vals, key="val_nll"):
        return [{"step": 10 * i, key: v} for i, v in enumerate(vals)]

    far = ended_far_worse(recs([5.0, 3.0, 4.5]), "val_nll", higher=False)  # lost 1.5 of 2
    assert far == {"first": 5.0, "first_step": 0, "best": 3.0, "best_step": 10, "final": 4.5}
    assert ended_far_worse(recs([5.0, 3.0, 3.9]), "val_nll", higher=False) is None  # 0.9 of 2
    assert ended_far_worse(recs([-1.0, -3.0, -1.5]), "val_nll", higher=False)["best"] == -3.0
    acc = recs([0.1, 0.9, 0.45], "val_accuracy")  # lost 0.45 of 0.8
    assert ended_far_worse(acc, "val_accuracy", higher=True)["best_step"] == 10
    assert ended_far_worse(recs([0.1, 0.9, 0.6], "val_accuracy"), "val_accuracy", True) is None
    never = ended_far_worse(recs([3.0, 3.5, 4.0]), "val_nll", higher=False)
    assert never["best_step"] == never["first_step"] == 0  # never improved, ended worse
    assert ended_far_worse(recs([5.0, 3.0, math.nan]), "val_nll", higher=False) is None
    assert ended_far_worse(recs([5.0, 3.0, 3.0]), "val_nll", higher=False) is None


def test_lr_label_says_default_for_an_optimizer_without_one():
    assert lr_label(math.inf) == lr_label(None) == "default"
    assert lr_label(0.5) == "0.5" and lr_label(1e-3) == "0.001"


def test_late_gain_share_of_the_improvement_in_the_tail():
    def recs(vals):
        return [{"seconds": float(i), "val_nll": v} for i, v in enumerate(vals)]

    # 0..8 s: the NLL falls 10 -> 2 by 6 s, then stays: nothing in the last quarter (6..8 s)
    flat = recs([10, 6, 4, 3, 2.5, 2.2, 2.0, 2.0, 2.0])
    assert late_gain(flat, "val_nll", higher=False) == 0.0
    # half of the improvement in the last quarter: 10 -> 6 before 6 s, 6 -> 2 after
    late = recs([10, 9, 8, 7, 6.5, 6.2, 6.0, 4.0, 2.0])
    assert late_gain(late, "val_nll", higher=False) == 0.5
    # a worse tail does not count as a gain: the best so far stays
    worse = recs([10, 6, 4, 3, 2.5, 2.2, 2.0, 5.0, 9.0])
    assert late_gain(worse, "val_nll", higher=False) == 0.0
    # accuracy (higher is better): an eighth of the gain late
    accs = [0.1, 0.5, 0.7, 0.8, 0.9]
    acc = [{"seconds": float(i), "val_accuracy": v} for i, v in enumerate(accs)]
    assert late_gain(acc, "val_accuracy", higher=True) == pytest.approx(0.1 / 0.8)
    # never improved, or too few evaluations: None
    assert late_gain(recs([3, 4, 5]), "val_nll", higher=False) is None
    assert late_gain(recs([3]), "val_nll", higher=False) is None
