"""Learning-rate robustness: the paper's second experiment.

SGD (momentum 0.9), Adam, OCNOpt open-loop and OCNOpt with feedback, each over one grid of
learning rates spanning ``--lrs`` (default 1e-3 … 1, three decades), on the same tasks,
seeds and training-time budget. OCNOpt runs with ``step = "fixed"`` here: its ``lr`` is then
the step scale itself (with the default model step ``lr`` is only a cap and the question does
not arise). Reported: the final test metric against the learning rate per arm (mean over
seeds), the number of diverged runs (``--arms ocnopt-model`` adds the default model step,
where ``lr`` only caps the step), and the spread of the metric over the grid (best minus
worst finite value). Printed, saved as ``summary.json``/``summary.md`` and a figure per task
(``<task>.png``) in ``--out``; finished runs are kept.

Arms are data (``ARMS``: arm name -> its ``[optimizers.NAME]`` table). A table with an
``lr_grid`` runs over that grid instead of ``--lrs``: on the deep discrete networks of issue 26
(``mlp_digits``, ``cnn_digits``; ``TASK_ARMS``) SGD and Adam span four decades of their usable
range and the fixed-step OCNOpt six, 1e-8 … 1e-2 (its ``lr`` multiplies ``(C + λ)⁻¹ g``, many
decades larger than a gradient, so its range sits far below SGD's). ``--arm NAME
KEY=VALUE ...`` adds an arm of any options, e.g. ``--arm ocnopt-own kind=ocnopt step=fixed
feedback=gauss_newton feedback_gain=own "lr_grid=[1e-6, 1e-4, 1e-2]"``.

    python experiments/lr_robustness.py
    python experiments/lr_robustness.py --tasks spirals --lrs 0.01 1 --seeds 1 --budget 5
    python experiments/lr_robustness.py --tasks mlp_digits cnn_digits   # 8 s, 20 s a run
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_default import _run  # noqa: E402
from feedback_ablation import ROOT, TASKS, add_arm_options, arms_per_task, write_config  # noqa: E402

from node_ocp.io import atomic_write_json, atomic_write_text  # noqa: E402

ARMS = {
    "sgd": {"kind": "sgd"},
    "adam": {"kind": "adam"},
    "ocnopt": {"kind": "ocnopt", "step": "fixed", "lr": 0.1},
    "ocnopt-feedback": {"kind": "ocnopt", "step": "fixed", "lr": 0.1, "feedback": "gauss_newton"},
    "ocnopt-model": {"kind": "ocnopt"},
}
DEFAULT_ARMS = ["sgd", "adam", "ocnopt", "ocnopt-feedback"]
#: the deep discrete networks: each optimizer over its own range (four decades or more)
DISCRETE_ARMS = {
    "sgd": {"kind": "sgd", "lr_grid": [1e-3, 1e-2, 1e-1, 1.0, 10.0]},
    "adam": {"kind": "adam", "lr_grid": [1e-4, 1e-3, 1e-2, 1e-1, 1.0]},
    "ocnopt": {
        "kind": "ocnopt",
        "step": "fixed",
        "lr": 0.1,
        "lr_grid": [1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2],
    },
    "ocnopt-feedback": {
        "kind": "ocnopt",
        "step": "fixed",
        "lr": 0.1,
        "feedback": "gauss_newton",
        "lr_grid": [1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2],
    },
}
#: tasks whose arms are their own (name -> table), and their seconds per run
TASK_ARMS = {"mlp_digits": DISCRETE_ARMS, "cnn_digits": DISCRETE_ARMS}
TASK_BUDGETS = {"mlp_digits": 8.0, "cnn_digits": 20.0}
DEFAULT_BUDGET = 40.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", nargs="+", default=["spirals", "digits_classification"])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0])
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds per run (default: {DEFAULT_BUDGET:g}; {TASK_BUDGETS} for those tasks)",
    )
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one per core)")
    p.add_argument("--out", default=str(ROOT / "runs" / "lr_robustness"))
    add_arm_options(p, ARMS)  # ocnopt-model: the default model step, where lr only caps it
    return p


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def summarise(task: str, runs: dict) -> dict:
    """Per arm and learning rate: test per seed and mean; divergences; spread over the grid."""
    out = {"task": task, "arms": {}}
    for arm, by_lr in runs.items():
        rows, diverged = {}, 0
        for lr, rs in by_lr.items():
            good = [r for r in rs if "failed" not in r]
            bad = sum(bool(r["diverged"]) or not _finite(r["test"]) for r in good)
            bad += len(rs) - len(good)
            diverged += bad
            vals = [r["test"] for r in good if not r["diverged"] and _finite(r["test"])]
            rows[repr(lr)] = {
                "test_per_seed": [r["test"] for r in good],
                "best_test_per_seed": [r["best_test"] for r in good],  # its best-val model
                "steps_per_seed": [r["steps"] for r in good],
                "test_mean": statistics.fmean(vals) if vals else None,
                "diverged": bad,
            }
            if good:
                out["metric"], out["higher"] = good[0]["metric"], good[0]["higher"]
        means = [r["test_mean"] for r in rows.values() if r["test_mean"] is not None]
        out["arms"][arm] = {
            "by_lr": rows,
            "diverged": diverged,
            "spread": max(means) - min(means) if means else None,
        }
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for arm, a in summary["arms"].items():
        pts = [(float(lr), r["test_mean"]) for lr, r in a["by_lr"].items()]
        pts = [(lr, v) for lr, v in sorted(pts) if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"test {summary.get('metric')}")
    ax.set_title(f"{summary['task']}: final metric against lr")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v) -> str:
    return "diverged" if v is None else f"{v:.4g}"


def table(summaries: list[dict], lrs: list[float]) -> str:
    """One row per task and arm; the columns are the rates any arm ran (else ``lrs``;
    ``-``: not in that arm's grid)."""
    ran = {float(lr) for s in summaries for a in s["arms"].values() for lr in a["by_lr"]}
    lrs = sorted(ran) if ran else list(lrs)
    head = " | ".join(f"lr {lr:g}" for lr in lrs)
    lines = [
        f"| task | arm | {head} | diverged | spread |",
        "|---|---|" + "---|" * len(lrs) + "---|---|",
    ]

    def cell(a, lr):
        row = a["by_lr"].get(repr(lr))
        return "-" if row is None else _fmt(row["test_mean"])

    for s in summaries:
        for arm, a in s["arms"].items():
            cells = " | ".join(cell(a, lr) for lr in lrs)
            spread = "-" if a["spread"] is None else f"{a['spread']:.4g}"
            lines.append(f"| {s['task']} | {arm} | {cells} | {a['diverged']} | {spread} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    for t in args.tasks:
        if t not in TASKS:
            raise SystemExit(f"--tasks: received {t!r}; accepted: {', '.join(TASKS)}")
    out = Path(args.out)
    arms = {}
    for task in args.tasks:  # a task's own tables (with their lr grids) first
        own = {**ARMS, **TASK_ARMS.get(task, {})}
        default = list(TASK_ARMS.get(task, DEFAULT_ARMS))
        arms.update(arms_per_task(args, own, default, {}, tasks=[task]))
    grids = {
        task: {arm: [float(x) for x in t.get("lr_grid", args.lrs)] for arm, t in tabs.items()}
        for task, tabs in arms.items()
    }
    budgets = {t: args.budget or TASK_BUDGETS.get(t, DEFAULT_BUDGET) for t in args.tasks}
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    futures = {}
    for task in args.tasks:
        tables = {  # every table with an lr (each run passes its own): fixed steps need one
            n: {"lr": grids[task][n][0], **{k: v for k, v in t.items() if k != "lr_grid"}}
            for n, t in arms[task].items()
        }
        cfg = write_config(task, out / task / "config.toml", budgets[task], tables)
        for seed in range(args.seeds):
            for arm in arms[task]:
                for lr in grids[task][arm]:
                    futures[(task, arm, lr, seed)] = pool.submit(
                        _run, cfg, out / task, arm, lr, seed, budgets[task]
                    )
    summaries = []
    for task in args.tasks:
        runs = {
            arm: {
                lr: [futures[(task, arm, lr, s)].result() for s in range(args.seeds)]
                for lr in grids[task][arm]
            }
            for arm in arms[task]
        }
        s = summarise(task, runs)
        summaries.append(s)
        plot(s, out / f"{task}.png")
    pool.shutdown()
    text = table(summaries, args.lrs)
    print(text)
    result = {
        "budget_s": budgets,
        "seeds": args.seeds,
        "lrs": args.lrs,
        "grids": grids,
        "arms": arms,
        "tasks": summaries,
    }
    atomic_write_json(out / "summary.json", result)
    atomic_write_text(out / "summary.md", text + "\n")
    return result


if __name__ == "__main__":
    main()
