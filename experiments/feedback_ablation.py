"""OCNOpt's feedback policies on and off: the paper's first experiment.

Arms on the same tasks, seeds and training-time budgets (``ARMS``: arm name -> its
``[optimizers.NAME]`` table):

- ``open-loop``: OCNOpt at its one default (every stage steps as if the others stood still);
- ``feedback``: the same with ``feedback = "gauss_newton"`` (each stage's update gets the
  gain term ``K_s δx_s``, one extra forward and one extra backward per step), its gains from
  the empirical factors (the per-sample loss gradients);
- ``feedback-sampled``, ``feedback-exact``: the gains from Monte-Carlo or exact factors of
  the output Hessian (``factors = "sampled"``/``"exact"``; one backward pass per factor).

Tasks: the digits ODE classifier (conv stem + ODE block + head), a two-block CNF on the
breast-cancer table, the augmented ODE classifier of two spirals (ODE block + head) — arms
``open-loop`` and ``feedback`` by default —, and the deep discrete networks of issue 26 on the
digits (``mlp_digits``: 8 linear layers; ``cnn_digits``: 4 conv stages and a head), where
the OCNOpt/DDPNOpt papers claim feedback helps — all four arms by default (``TASK_ARMS``). On
these the open-loop arm stands for every factor source: without an ODE block the curvature
statistics of ``auto``, ``sampled`` and ``exact`` are the same sampled Fisher backward pass
(bit-identical runs), only the gains differ. ``--arms`` picks arms for every task;
``--arm NAME KEY=VALUE ...`` adds an arm of any OCNOpt options (values read as TOML, else as
text), e.g. ``--arm feedback-own kind=ocnopt feedback=gauss_newton feedback_gain=own``.
Each run is a ``node-ocp train`` process (``OMP_NUM_THREADS=1``), ``--jobs`` at a time.
Reported per task and arm: test metric per seed and mean ± std, final validation metric,
steps taken, seconds per step, the mean gain ratio ``‖Σ K δx‖ / ‖open-loop step‖``;
curves of the validation metric against steps and against wall-clock (``<task>.png``).
Printed, and saved as ``summary.json``/``summary.md`` in ``--out``; finished runs are kept.

    python experiments/feedback_ablation.py                 # every task, 3 seeds
    python experiments/feedback_ablation.py --tasks spirals --budget 20 --seeds 1
    python experiments/feedback_ablation.py --tasks mlp_digits cnn_digits   # 10 s, 30 s
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from itertools import cycle
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
    "mlp_digits": ("mlp_digits", {}, ()),
    "cnn_digits": ("cnn_digits", {}, ()),
}
#: arm name -> its [optimizers.NAME] table
ARMS = {
    "open-loop": {"kind": "ocnopt"},
    "feedback": {"kind": "ocnopt", "feedback": "gauss_newton"},
    "feedback-sampled": {"kind": "ocnopt", "feedback": "gauss_newton", "factors": "sampled"},
    "feedback-exact": {"kind": "ocnopt", "feedback": "gauss_newton", "factors": "exact"},
}
DEFAULT_ARMS = ["open-loop", "feedback"]
#: seconds of training per run where ``--budget`` is not given (else DEFAULT_BUDGET)
TASK_BUDGETS = {"mlp_digits": 10.0, "cnn_digits": 30.0}
DEFAULT_BUDGET = 90.0
#: tasks whose default arms differ from DEFAULT_ARMS
TASK_ARMS = {
    "mlp_digits": ["open-loop", "feedback", "feedback-sampled", "feedback-exact"],
    "cnn_digits": ["open-loop", "feedback", "feedback-sampled", "feedback-exact"],
}


def _value(text: str):
    """A ``KEY=VALUE`` value: TOML (numbers, booleans, lists, quoted strings), else text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_arm(words: list[str]) -> tuple[str, dict]:
    """``NAME KEY=VALUE ...`` (one ``--arm``) as ``(name, table)``; ``kind`` defaults to
    ``ocnopt``."""
    name, *pairs = words
    table = {"kind": "ocnopt"}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise SystemExit(f"--arm {name}: received {pair!r}; accepted: KEY=VALUE pairs")
        table[key] = _value(value)
    return name, table


def add_arm_options(p: argparse.ArgumentParser, arms: dict) -> None:
    """``--arms`` (names from ``arms``) and ``--arm NAME KEY=VALUE ...`` (repeatable)."""
    p.add_argument(
        "--arms", nargs="+", default=None, help=f"arms for every task, of: {', '.join(arms)}"
    )
    p.add_argument(
        "--arm",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME KEY=VALUE",
        help="add (or replace) an arm: its [optimizers.NAME] keys, e.g. --arm fb-own "
        "feedback=gauss_newton feedback_gain=own (kind defaults to ocnopt)",
    )


def arms_per_task(args, arms: dict, default: list[str], task_arms: dict, tasks=None) -> dict:
    """task -> {arm name: table}: ``--arms`` (or the task's default) plus every ``--arm``."""
    extra = dict(parse_arm(words) for words in args.arm)
    known = {**arms, **extra}
    for name in args.arms or []:
        if name not in known:
            raise SystemExit(f"--arms: received {name!r}; accepted: {', '.join(known)}")
    out = {}
    for task in args.tasks if tasks is None else tasks:
        names = list(args.arms or task_arms.get(task, default))
        names += [n for n in extra if n not in names]
        out[task] = {n: known[n] for n in names}
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds per run (default: {DEFAULT_BUDGET:g}; {TASK_BUDGETS} for those tasks)",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one per core)")
    p.add_argument("--out", default=str(ROOT / "runs" / "feedback_ablation"))
    add_arm_options(p, ARMS)
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
            "test_loss_per_seed": [r.get("test_figures", {}).get("loss") for r in good],
            "steps": [r["steps"] for r in good],
            "s_per_step": [r["seconds"] / max(r["steps"], 1) for r in good],
            "diverged": sum(bool(r["diverged"]) for r in good),
            "failed": [r["failed"] for r in rs if "failed" in r],
            "mean_gain_ratio": statistics.fmean(gains) if gains else None,
        }
    first = next(iter(out["arms"].values()), None)
    for a in out["arms"].values():  # s/step against the first arm (open-loop)
        base = statistics.fmean(first["s_per_step"]) if first and first["s_per_step"] else 0
        mine = statistics.fmean(a["s_per_step"]) if a["s_per_step"] else math.nan
        a["s_per_step_x_first"] = mine / base if base > 0 else None
    # the validation metric at the last evaluation step every run reached (per step, free of
    # the machine's load, which sets how many steps a time budget buys)
    key = f"val_{out.get('metric')}"
    evals = [
        {m["step"] for m in r["records"] if m.get(key) is not None}
        for rs in runs.values()
        for r in rs
        if "failed" not in r
    ]
    common = max(set.intersection(*evals), default=None) if evals else None
    out["common_step"] = common
    for arm, rs in runs.items():
        for name, k in (("val_at_common_step", key), ("val_loss_at_common_step", "val_loss")):
            vals = []
            for r in (r for r in rs if "failed" not in r):
                at = [m[k] for m in r["records"] if m.get(k) is not None and m["step"] == common]
                vals.append(at[0] if at else None)
            out["arms"][arm][name] = vals
    return out


def plot(task: str, runs: dict, metric: str, path: Path) -> None:
    """Validation metric against steps and against seconds, one line per run (and below, on
    a log scale, the validation loss where the runs log one beside their metric: a
    classifier's accuracy saturates early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f"val_{metric}"]
    good = [r for rs in runs.values() for r in rs if "failed" not in r]
    if metric != "loss" and any(m.get("val_loss") is not None for r in good for m in r["records"]):
        keys.append("val_loss")
    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 3.5 * len(keys)), squeeze=False)
    fixed = {"open-loop": "tab:blue", "feedback": "tab:red"}
    spare = cycle(["tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:cyan"])
    colours = {arm: fixed.get(arm) or next(spare) for arm in runs}
    for row, key in zip(axes, keys):
        for arm, rs in runs.items():
            for i, r in enumerate(r for r in rs if "failed" not in r):
                recs = [m for m in r["records"] if m.get(key) is not None]
                pts = [(m["step"], m["seconds"], m[key]) for m in recs]
                if not pts:
                    continue
                steps, secs, vals = zip(*pts)
                label = arm if i == 0 else None
                row[0].plot(steps, vals, color=colours.get(arm), alpha=0.8, label=label)
                row[1].plot(secs, vals, color=colours.get(arm), alpha=0.8, label=label)
        row[0].set_xlabel("step")
        row[1].set_xlabel("seconds")
        for ax in row:
            ax.set_ylabel(key)
            if key == "val_loss":
                ax.set_yscale("log")
            ax.legend()
    fig.suptitle(f"{task}: feedback on vs off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def table(summaries: list[dict]) -> str:
    lines = [
        "| task | metric | arm | test (mean ± std) | per seed | steps | s/step | s/step × "
        "first arm | val at common step (per seed) | gain ratio | diverged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        for arm, a in s["arms"].items():
            per = ", ".join(_fmt(v) for v in a["test_per_seed"])
            at = ", ".join(_fmt(v) for v in a.get("val_at_common_step", []))
            at = f"step {s.get('common_step')}: {at}" if at else "-"
            loss = a.get("val_loss_at_common_step", [])
            if any(v is not None for v in loss):  # classification: the loss beside accuracy
                at += f" (val loss {', '.join(_fmt(v) for v in loss)})"
            tl = a.get("test_loss_per_seed", [])
            if s["metric"] != "loss" and any(v is not None for v in tl):
                per += f" (test loss {', '.join(_fmt(v) for v in tl)})"
            sps = statistics.fmean(a["s_per_step"]) if a["s_per_step"] else None
            steps = statistics.fmean(a["steps"]) if a["steps"] else None
            lines.append(
                f"| {s['task']} | {s['metric']} | {arm} | {_fmt(a['test_mean'])} ± "
                f"{_fmt(a['test_std'])} | {per} | {_fmt(steps)} | {_fmt(sps)} | "
                f"{_fmt(a.get('s_per_step_x_first'))} | {at} | {_fmt(a['mean_gain_ratio'])} | "
                f"{a['diverged']} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    arms = arms_per_task(args, ARMS, DEFAULT_ARMS, TASK_ARMS)
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    futures = {}
    budgets = {t: args.budget or TASK_BUDGETS.get(t, DEFAULT_BUDGET) for t in args.tasks}
    for task in args.tasks:
        cfg = write_config(task, out / task / "config.toml", budgets[task], arms[task])
        for seed in range(args.seeds):
            for arm in arms[task]:
                futures[(task, arm, seed)] = pool.submit(
                    _run, cfg, out / task, arm, NO_GRID, seed, budgets[task]
                )
    summaries = []
    for task in args.tasks:
        runs = {
            arm: [futures[(task, arm, s)].result() for s in range(args.seeds)] for arm in arms[task]
        }
        s = summarise(task, runs)
        summaries.append(s)
        if s.get("metric"):
            plot(task, runs, s["metric"], out / f"{task}.png")
    pool.shutdown()
    result = {"budget_s": budgets, "seeds": args.seeds, "arms": arms, "tasks": summaries}
    text = table(summaries)
    print(text)
    atomic_write_json(out / "summary.json", result)
    atomic_write_text(out / "summary.md", text + "\n")
    return result


if __name__ == "__main__":
    main()
