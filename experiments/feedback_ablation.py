"""OCNOpt's feedback policies on and off: the paper's first experiment.

Two arms on the same tasks, seeds and training-time budgets:

- ``open-loop``: OCNOpt at its one default (every stage steps as if the others stood still);
- ``feedback``: the same with ``feedback = "gauss_newton"`` (each stage's update gets the
  gain term ``K_s δx_s``, one extra forward and one extra backward per step).

Tasks: the digits ODE classifier (conv stem + ODE block + head), a two-block CNF on the
breast-cancer table, and the augmented ODE classifier of two spirals (ODE block + head).
Each run is a ``node-ocp train`` process (``OMP_NUM_THREADS=1``), ``--jobs`` at a time.
Reported per task and arm: test metric per seed and mean ± std, final validation metric,
steps taken, seconds per step, the mean gain ratio ``‖Σ K δx‖ / ‖open-loop step‖``;
curves of the validation metric against steps and against wall-clock (``<task>.png``).
Printed, and saved as ``summary.json``/``summary.md`` in ``--out``; finished runs are kept.

    python experiments/feedback_ablation.py                 # three tasks, 3 seeds, 90 s
    python experiments/feedback_ablation.py --tasks spirals --budget 20 --seeds 1
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_default import NO_GRID, ROOT, _run, _toml  # noqa: E402

from node_ocp.io import atomic_write_json, atomic_write_text  # noqa: E402

#: task -> (bundled config, overrides of its tables, tables to drop)
TASKS = {
    "digits_classification": ("digits_classification", {}, ()),
    "cnf_breast_cancer_2blocks": ("cnf_breast_cancer", {"model": {"blocks": 2}}, ()),
    "spirals": ("horizon_spirals", {}, ("horizon",)),
}
ARMS = {
    "open-loop": {"kind": "ocnopt"},
    "feedback": {"kind": "ocnopt", "feedback": "gauss_newton"},
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--budget", type=float, default=90.0, help="seconds per run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one per core)")
    p.add_argument("--out", default=str(ROOT / "runs" / "feedback_ablation"))
    return p


def write_config(task: str, dest: Path, budget: float, arms: dict) -> Path:
    """The task's bundled config with ``arms`` as its optimizer tables and a time budget."""
    name, overrides, drop = TASKS[task]
    raw = tomllib.loads((ROOT / "configs" / f"{name}.toml").read_text())
    for table in drop:
        raw.pop(table, None)
    for table, body in overrides.items():
        raw[table] = {**raw.get(table, {}), **body}
    raw["optimizers"] = {arm: dict(t) for arm, t in arms.items()}
    raw["train"] = {**raw.get("train", {}), "steps": 10**7, "max_seconds": budget}
    raw["train"]["optimizer"] = next(iter(arms))
    raw["train"]["checkpoint_every"] = 10**7
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(_toml(raw))
    return dest


def _mean_std(values) -> tuple[float, float]:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarise(task: str, runs: dict) -> dict:
    """Per arm: test and validation per seed, mean ± std, steps, s/step, gain ratio."""
    out = {"task": task, "arms": {}}
    for arm, rs in runs.items():
        good = [r for r in rs if "failed" not in r]
        gains = [
            rec["feedback_gain"]
            for r in good
            for rec in r["records"]
            if isinstance(rec.get("feedback_gain"), (int, float))
        ]
        mean, std = _mean_std([r["test"] for r in good])
        out["metric"] = good[0]["metric"] if good else None
        out["higher"] = good[0]["higher"] if good else None
        out["arms"][arm] = {
            "test_per_seed": [r["test"] for r in good],
            "test_mean": mean,
            "test_std": std,
            "val_per_seed": [r["final_val"] for r in good],
            "steps": [r["steps"] for r in good],
            "s_per_step": [r["seconds"] / max(r["steps"], 1) for r in good],
            "diverged": sum(bool(r["diverged"]) for r in good),
            "failed": [r["failed"] for r in rs if "failed" in r],
            "mean_gain_ratio": statistics.fmean(gains) if gains else None,
        }
    return out


def plot(task: str, runs: dict, metric: str, path: Path) -> None:
    """Validation metric against steps and against seconds, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    colours = {"open-loop": "tab:blue", "feedback": "tab:red"}
    key = f"val_{metric}"
    for arm, rs in runs.items():
        for i, r in enumerate(r for r in rs if "failed" not in r):
            recs = [m for m in r["records"] if m.get(key) is not None]
            pts = [(m["step"], m["seconds"], m[key]) for m in recs]
            if not pts:
                continue
            steps, secs, vals = zip(*pts)
            label = arm if i == 0 else None
            axes[0].plot(steps, vals, color=colours.get(arm), alpha=0.8, label=label)
            axes[1].plot(secs, vals, color=colours.get(arm), alpha=0.8, label=label)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("seconds")
    for ax in axes:
        ax.set_ylabel(key)
        ax.legend()
    fig.suptitle(f"{task}: feedback on vs off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def table(summaries: list[dict]) -> str:
    lines = [
        "| task | metric | arm | test (mean ± std) | per seed | steps | s/step | gain ratio "
        "| diverged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        for arm, a in s["arms"].items():
            per = ", ".join(_fmt(v) for v in a["test_per_seed"])
            sps = statistics.fmean(a["s_per_step"]) if a["s_per_step"] else None
            steps = statistics.fmean(a["steps"]) if a["steps"] else None
            lines.append(
                f"| {s['task']} | {s['metric']} | {arm} | {_fmt(a['test_mean'])} ± "
                f"{_fmt(a['test_std'])} | {per} | {_fmt(steps)} | {_fmt(sps)} | "
                f"{_fmt(a['mean_gain_ratio'])} | {a['diverged']} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    futures = {}
    for task in args.tasks:
        cfg = write_config(task, out / task / "config.toml", args.budget, ARMS)
        for seed in range(args.seeds):
            for arm in ARMS:
                futures[(task, arm, seed)] = pool.submit(
                    _run, cfg, out / task, arm, NO_GRID, seed, args.budget
                )
    summaries = []
    for task in args.tasks:
        runs = {arm: [futures[(task, arm, s)].result() for s in range(args.seeds)] for arm in ARMS}
        s = summarise(task, runs)
        summaries.append(s)
        if s.get("metric"):
            plot(task, runs, s["metric"], out / f"{task}.png")
    pool.shutdown()
    result = {"budget_s": args.budget, "seeds": args.seeds, "tasks": summaries}
    text = table(summaries)
    print(text)
    atomic_write_json(out / "summary.json", result)
    atomic_write_text(out / "summary.md", text + "\n")
    return result


if __name__ == "__main__":
    main()
