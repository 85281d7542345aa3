"""OCNOpt at its one default against a tuned Adam, a tuned OCNOpt and the identity ablation.

For every task (a bundled config) and a training-time budget per run, four arms:

- ``ocnopt``: OCNOpt at its one default (``kind = "ocnopt"`` and nothing else; no grid);
- ``ocnopt-tuned``: OCNOpt with the cap ``lr`` on its step tuned over ``--tuned-grid``;
- ``adam``: Adam with its learning rate tuned over ``--adam-grid`` (1e-3 ... 1e-1);
- ``ocnopt-identity``: the ablation, OCNOpt's step control with the curvature replaced by
  the identity (the same model-chosen effective step along the plain gradient).

Tuned arms pick their learning rate on seed-0 *validation* (the final validation metric);
then every arm runs seeds ``0..seeds-1`` at its choice. Each run is a ``node-ocp train``
process of its own (``OMP_NUM_THREADS=1``), ``--jobs`` at a time, so that every run sees the
same load. Reported per task: test metric mean ± std and per seed, divergences, the median
(over seeds) training time to reach the target — tuned Adam's median final validation
metric — as a ratio to Adam's (a seed that never gets there counts as never; "never" when
most seeds never do), the amortised step cost and NFE, and the *late gain*: the share of a
run's validation improvement made in the last quarter of its budget (median over seeds; at
most 10% for tuned Adam says the budget let Adam plateau). Printed as a table and saved as JSON
(``summary.json``) and Markdown (``summary.md``) in ``--out``; finished runs are kept, so an
interrupted benchmark resumes where it stopped.

The arms' gradients (``--gradient``): a step that backpropagates through the solver
(``gradient = "direct"``) costs ~0.6x one through the own adjoint on these models
(``bench_issue21.md`` §28), so the arms compared must use the same kind. ``matched`` (the
default): Adam backpropagates through the solvers where OCNOpt's default does on its steps
between refreshes (its subspace step: models with a recurrent layer whose loss their outputs
determine), and takes the own adjoint elsewhere, as OCNOpt's default does; ``direct``: every
arm backpropagates through the solvers (OCNOpt with ``between_refreshes = "direct"``; its
refresh steps keep the own adjoint); ``adjoint``: the configs' own gradient for every arm
(the benchmark before §28: OCNOpt's subspace steps backpropagate through the solvers there,
Adam does not).

    python experiments/bench_default.py                       # the seven tasks, 3 seeds
    python experiments/bench_default.py --tasks cnf_moons --budget 30 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tomllib

from node_ocp.io import atomic_write_json, atomic_write_text
from node_ocp.train.compare import PLATEAU, late_gain, time_to_target, train_in_process_args
from node_ocp.train.intervals import Side, verdict
from node_ocp.train.loop import SUMMARY, read_metrics

ROOT = Path(__file__).resolve().parents[1]
#: The tasks and their training-time budget per run (seconds, evaluation excluded).
TASKS = {
    "cnf_8gaussians": 90.0,
    "cnf_moons": 90.0,
    "cnf_breast_cancer": 90.0,
    "cnf_digits": 120.0,
    "digits_classification": 240.0,  # tuned Adam is still climbing at 150 s (0.92)
    "ts_japanese_vowels": 90.0,
    "forecast_spiral": 120.0,
}
#: The families where OCNOpt lost (issue 21): recurrent and CDE time series, small tables.
#: Run them with ``--tasks`` (the default stays the seven tasks above).
MORE_TASKS = {
    "own_series": 60.0,
    "forecast_italy_power": 90.0,
    "ts_basic_motions": 90.0,
    "cnf_iris": 60.0,
    "cnf_wine": 60.0,
    "latent_spiral": 300.0,  # Adam (0.01) still falling at 600 steps (bench_latent.md)
}
ARMS = ("ocnopt", "ocnopt-tuned", "adam", "ocnopt-identity")
TABLES = {
    "ocnopt": {"kind": "ocnopt"},
    "ocnopt-tuned": {"kind": "ocnopt"},
    "adam": {"kind": "adam"},
    "ocnopt-identity": {"kind": "ocnopt", "curvature": "identity"},
}
NO_GRID = math.inf  # OCNOpt's default: no cap on its step
#: ``--gradient``'s choices (see the module docstring)
GRADIENTS = ("matched", "direct", "adjoint")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tasks", nargs="+", default=list(TASKS), help="bundled config names (default: TASKS)"
    )
    p.add_argument(
        "--arms",
        nargs="+",
        default=list(ARMS),
        choices=ARMS,
        help="arms to run (ocnopt and adam always run)",
    )
    p.add_argument("--configs", nargs="+", default=None, help="config files instead of --tasks")
    p.add_argument("--budget", type=float, default=None, help="seconds per run (default: per task)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--adam-grid", type=float, nargs="+", default=[1e-3, 1e-2, 3e-2, 1e-1])
    p.add_argument("--tuned-grid", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one per core)")
    p.add_argument(
        "--model",
        choices=("best", "final"),
        default="best",
        help="the test metric of each run's best-validation model (default) or final model",
    )
    p.add_argument(
        "--ocnopt-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="options added to the ocnopt arm's table (VALUE in TOML: weight_decay=0.001), to "
        "measure a candidate default against runs of the other arms already in --out",
    )
    p.add_argument(
        "--adam-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help='options added to the adam arm\'s table (VALUE in TOML: gradient="direct", '
        "backprop through the solvers), to measure the baseline at another setting",
    )
    p.add_argument(
        "--gradient",
        choices=GRADIENTS,
        default="matched",
        help="the arms' gradients: 'matched' (default: Adam backpropagates through the solvers "
        "where OCNOpt's default does between refreshes), 'direct' (every arm does) or "
        "'adjoint' (the configs' own)",
    )
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_default"))
    return p


def _settings(pairs: list[str], flag: str = "--ocnopt-set") -> dict:
    """``["weight_decay=0.001", ...]`` as a dict of TOML values; a clear error otherwise."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"{flag}: expected KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise SystemExit(
                f"{flag}: the value of {key.strip()!r} is not a TOML value "
                f"(a number, true/false or a quoted string), got {value!r}: {e}"
            ) from None
    return out


def gradient_tables(gradient: str, config: Path) -> dict:
    """What ``--gradient`` adds to each arm's table for the task of ``config``."""
    if gradient == "adjoint":
        return {}
    if gradient == "direct":
        between = {"between_refreshes": "direct"}
        return {"adam": {"gradient": "direct"}, **{a: between for a in ARMS if a != "adam"}}
    from node_ocp.train import build_task, load_config
    from node_ocp.train.optimizers import ocnopt_options

    run = load_config(config)
    task = build_task(run, "cpu")
    o = ocnopt_options(run.optimizer("ocnopt"), math.inf).resolved(task.model)
    # OCNOpt's default arm backpropagates through the solvers between refreshes where it
    # takes subspace steps (a loss its outputs determine; else it settles on the held step)
    # or where its table says so (OCNOpt._arm_if_due)
    subspace = o.subspace != "off" and task.outputs_determine_loss
    direct = o.update_every > 1 and o.feedback == "off"
    direct = direct and (subspace or o.between_refreshes == "direct")
    return {"adam": {"gradient": "direct"}} if direct else {}


def _write_config(
    src: Path,
    dest: Path,
    budget: float,
    grids: dict,
    ocnopt_set: dict | None = None,
    adam_set: dict | None = None,
    gradient: str = "adjoint",
) -> Path:
    """The task's config with the four arms as its optimizer tables and a time budget;
    ``ocnopt_set`` adds options to the ``ocnopt`` arm's table (a candidate default),
    ``adam_set`` to the ``adam`` arm's, ``gradient`` what :func:`gradient_tables` says
    (after ``ocnopt_set`` and ``adam_set``, which may override it)."""
    raw = tomllib.loads(src.read_text())
    path = raw.get("task", {}).get("path")
    if isinstance(path, str) and not Path(path).is_absolute():  # relative to the source
        raw["task"]["path"] = str((src.parent / path).resolve())
    raw["optimizers"] = {}
    for arm, table in TABLES.items():
        t = dict(table)
        if arm in grids:
            t["lr_grid"] = grids[arm]
        if arm == "ocnopt":
            t.update(ocnopt_set or {})
        if arm == "adam":
            t.update(adam_set or {})
        raw["optimizers"][arm] = t
    raw["train"] = {**raw.get("train", {}), "steps": 10**7, "max_seconds": budget}
    raw["train"]["optimizer"] = "ocnopt"
    raw["train"]["checkpoint_every"] = 10**7
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(_toml(raw))
    from node_ocp.train import load_config
    from node_ocp.train.config import ConfigError

    try:  # a bad --ocnopt-set or --adam-set key: one error now, not a failed run per seed
        load_config(dest)
    except ConfigError as e:
        raise SystemExit(f"{dest}: {e}") from None
    extra = gradient_tables(gradient, dest)
    if extra:
        for arm, keys in extra.items():
            sets = {"ocnopt": ocnopt_set, "adam": adam_set}.get(arm) or {}
            raw["optimizers"][arm] = {**raw["optimizers"][arm], **keys, **sets}
        dest.write_text(_toml(raw))
    return dest


def _toml(raw: dict) -> str:
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    lines = []
    for table, body in raw.items():
        if table == "optimizers":
            for name, opt in body.items():
                lines.append(f"[optimizers.{name}]")
                lines += [f"{k} = {val(v)}" for k, v in opt.items()]
        else:
            lines.append(f"[{table}]")
            lines += [f"{k} = {val(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def _run(cfg: Path, out: Path, arm: str, lr: float, seed: int, budget: float) -> dict:
    """One training run in its own process (kept when it already finished)."""
    folder = out / arm / f"lr{lr!r}" / f"seed{seed}"
    summary = folder / SUMMARY
    if summary.exists() and _same_table(folder, cfg, arm):
        s = json.loads(summary.read_text())
        if s.get("stopped_by_time") or s.get("diverged"):
            return _result(s, folder)
    cmd = train_in_process_args(cfg, folder, arm, lr, seed, "cpu", None, budget)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if summary.exists():
        s = json.loads(summary.read_text())
        # a diverged run exits non-zero but is a result (its best model counts), as it is
        # when a later call finds it finished
        if proc.returncode == 0 or s.get("diverged"):
            return _result(s, folder)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"failed": " | ".join(tail), "arm": arm, "lr": lr, "seed": seed}


def _same_table(folder: Path, cfg: Path, arm: str) -> bool:
    """Whether the finished run in ``folder`` ran the arm's table of ``cfg`` (every key both
    know equal, the learning rates aside): a run of another ``--gradient``, ``--adam-set``
    or ``--ocnopt-set`` is run again, not reused."""
    import dataclasses

    from node_ocp.train import load_config

    try:
        saved = json.loads((folder / "config.json").read_text())["config"]["optimizers"][arm]
    except (OSError, KeyError, ValueError):
        return False
    now = dataclasses.asdict(load_config(cfg).optimizer(arm))
    return all(saved[k] == v for k, v in now.items() if k in saved and k not in ("lr", "lr_grid"))


def _result(s: dict, folder: Path) -> dict:
    return {
        "arm": s["optimizer"],
        "lr": s["lr"],
        "seed": s["seed"],
        "final_val": s["final_val"],
        "test": s["test_metric"],
        "best_test": s.get("best_test_metric", s["test_metric"]),
        "test_figures": s.get("test") or {},  # every test figure (a classifier's loss too)
        "diverged": s["diverged"],
        "steps": s["steps"],
        "seconds": s["train_seconds"],
        "amortized_step_s": s["amortized_step_s"],
        "nfe_forward": s["nfe_forward"],
        "nfe_backward": s["nfe_backward"],
        "metric": s["metric"],
        "higher": s["higher_is_better"],
        "records": read_metrics(folder),
    }


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _better(higher: bool):
    return max if higher else min


def _choose(results: list[dict], higher: bool) -> float:
    """The learning rate with the best seed-0 final validation metric (diverged: worst)."""
    ok = [r for r in results if "failed" not in r and _finite(r["final_val"])]
    if not ok:
        return results[0]["lr"]
    return _better(higher)(ok, key=lambda r: r["final_val"])["lr"]


def _mean_std(values: list) -> tuple[float, float]:
    vals = [v for v in values if _finite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarise(
    task: str, budget: float, grid_runs: dict, seed_runs: dict, select: str = "best_test"
) -> dict:
    """Per-arm figures of one task (see the module docstring); ``select`` is the test
    metric reported: ``"best_test"`` (the best-validation model's) or ``"test"`` (final)."""
    any_run = next(r for rs in seed_runs.values() for r in rs if "failed" not in r)
    metric, higher = any_run["metric"], any_run["higher"]
    key = f"val_{metric}"
    adam_vals = [r["final_val"] for r in seed_runs["adam"] if "failed" not in r]
    finite = [v for v in adam_vals if _finite(v)]
    target = statistics.median(finite) if finite else math.nan
    arms = {}
    for arm, runs in seed_runs.items():
        good = [r for r in runs if "failed" not in r]
        hits = []
        for r in good:
            hit = time_to_target(r["records"], key, target, higher) if _finite(target) else None
            hits.append(hit[0] if hit else math.inf)
        hits += [math.inf] * (len(runs) - len(good))
        late = [late_gain(r["records"], key, higher) for r in good]
        arms[arm] = {
            "lr": runs[0]["lr"] if runs else None,
            "grid": {
                repr(r["lr"]): r.get("final_val") for r in grid_runs.get(arm, []) if "lr" in r
            },
            "test": _mean_std([r[select] for r in good]),
            "test_per_seed": [r[select] for r in good],
            "final_test_per_seed": [r["test"] for r in good],
            "val_per_seed": [r["final_val"] for r in good],
            "diverged": sum(bool(r["diverged"]) for r in good),
            "failed": [r["failed"] for r in runs if "failed" in r],
            "time_to_target_per_seed": hits,
            "time_to_target": statistics.median(hits) if hits else math.inf,
            "reached": sum(math.isfinite(h) for h in hits),
            "amortized_step_s": statistics.median(
                [r["amortized_step_s"] for r in good if _finite(r["amortized_step_s"])] or [0]
            ),
            "nfe_forward": statistics.median(
                [r["nfe_forward"] for r in good if _finite(r["nfe_forward"])] or [0]
            ),
            "steps": statistics.median([r["steps"] for r in good] or [0]),
            "late_gain_per_seed": late,
            "late_gain": statistics.median([v for v in late if v is not None] or [math.nan]),
        }
    sides = {}
    for arm, runs in seed_runs.items():
        good = [r for r in runs if "failed" not in r]
        hits = dict(zip((r["seed"] for r in runs), arms[arm]["time_to_target_per_seed"]))
        sides[arm] = Side(
            arm,
            test={r["seed"]: r["test"] for r in good},
            times={s: hits[s] for s in (r["seed"] for r in good)},
            best_test={r["seed"]: r["best_test"] for r in good},
        )
    for arm, a in arms.items():  # the verdict in words, as compare's report says it
        if arm != "adam":
            a["verdict"] = verdict(metric, higher, sides[arm], sides["adam"]).text
    base = arms["adam"]["time_to_target"]
    base_cost = arms["adam"]["amortized_step_s"]
    for a in arms.values():
        t = a["time_to_target"]
        a["time_ratio"] = t / base if math.isfinite(t) and math.isfinite(base) and base else None
        a["step_cost_ratio"] = a["amortized_step_s"] / base_cost if base_cost else None
    return {
        "task": task,
        "metric": metric,
        "higher_is_better": higher,
        "budget_s": budget,
        "target": target,
        "arms": arms,
    }


def format_table(results: dict) -> str:
    head = (
        "| task | metric | arm | lr | test (mean ± std) | per seed | t→target × adam "
        "| reached | diverged | step cost × adam | NFE fwd | late gain |"
    )
    lines = [head, "|" + "---|" * 12]
    for task, res in results.items():
        if "failed" in res:
            lines.append(f"| {task} | failed: {res['failed']} |" + " |" * 10)
            continue
        arrow = "↑" if res["higher_is_better"] else "↓"
        for arm, a in res["arms"].items():
            mean, std = a["test"]
            seeds = ", ".join(f"{v:.4g}" for v in a["test_per_seed"])
            ratio = a["time_ratio"]
            if not math.isfinite(a["time_to_target"]):
                ratio = "never"
            elif ratio is None:  # Adam's median seed never got there
                ratio = f"{a['time_to_target']:.0f} s (adam: never)"
            else:
                ratio = f"{ratio:.2f}"
            lr = "default" if a["lr"] == NO_GRID else f"{a['lr']:g}"
            cost = a["step_cost_ratio"]
            lines.append(
                f"| {task} | {res['metric']} {arrow} | {arm} | {lr} | {mean:.4g} ± {std:.2g} "
                f"| {seeds} | {ratio} | {a['reached']}/{len(a['time_to_target_per_seed'])} "
                f"| {a['diverged']} | {'-' if cost is None else f'{cost:.2f}'} "
                f"| {a['nfe_forward']:.0f} | {a['late_gain']:.2f} |"
            )
    return "\n".join(lines)


def verdicts(results: dict) -> list[str]:
    """The issue's aims, in words, from the figures."""
    done = {t: r for t, r in results.items() if "failed" not in r}

    def within(ratio: float) -> list[str]:
        """Tasks where most of OCNOpt's seeds reached the target, in <= ratio x Adam's time."""
        return [
            t
            for t, r in done.items()
            if (r["arms"]["ocnopt"]["time_ratio"] or math.inf) <= ratio
            and r["arms"]["ocnopt"]["reached"] * 2
            > len(r["arms"]["ocnopt"]["time_to_target_per_seed"])
        ]

    fast = within(0.5)
    diverged = [t for t, r in done.items() if r["arms"]["ocnopt"]["diverged"]]

    def beats(r, other):
        a, d = r["arms"]["ocnopt"]["test"][0], r["arms"][other]["test"][0]
        return (a > d) if r["higher_is_better"] else (a < d)

    level = [t for t, r in done.items() if not beats(r, "adam")]
    ablated = {t: r for t, r in done.items() if "ocnopt-identity" in r["arms"]}
    ablation = [t for t, r in ablated.items() if beats(r, "ocnopt-identity")]
    near = within(0.7)
    moving = [t for t, r in done.items() if not r["arms"]["adam"]["late_gain"] <= PLATEAU]
    n = len(done)
    words = [
        f"Tuned Adam plateaued (at most {PLATEAU:.0%} of its validation gain in the last "
        f"quarter of the budget, median over seeds) on {n - len(moving)}/{n} tasks; still "
        f"moving on {', '.join(moving) or 'none'}.",
        f"OCNOpt's default reached tuned Adam's target in <= 0.7x Adam's time on "
        f"{len(near)}/{n} tasks ({', '.join(near) or 'none'}).",
        f"OCNOpt's default reached tuned Adam's target in <= 0.5x Adam's time on "
        f"{len(fast)}/{n} tasks ({', '.join(fast) or 'none'}); the aim is 2/3.",
        f"OCNOpt's default diverged on {len(diverged)}/{n} tasks "
        f"({', '.join(diverged) or 'none'}).",
        f"OCNOpt's default had a worse mean test metric than tuned Adam on {len(level)}/{n} "
        f"tasks ({', '.join(level) or 'none'}).",
    ]
    if ablated:
        words.append(
            f"OCNOpt's default beat its identity-curvature ablation on test on "
            f"{len(ablation)}/{len(ablated)} tasks ({', '.join(ablation) or 'none'})."
        )
    return words


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    configs = (
        {Path(c).stem: Path(c) for c in args.configs}
        if args.configs
        else {t: ROOT / "configs" / f"{t}.toml" for t in args.tasks}
    )
    grids = {"adam": args.adam_grid, "ocnopt-tuned": args.tuned_grid}
    ocnopt_set = _settings(args.ocnopt_set)
    adam_set = _settings(args.adam_set, "--adam-set")
    plan = {}
    for task, src in configs.items():
        budget = args.budget if args.budget is not None else {**TASKS, **MORE_TASKS}.get(task, 60.0)
        cfg = _write_config(
            src, out / task / "config.toml", budget, grids, ocnopt_set, adam_set, args.gradient
        )
        plan[task] = (cfg, budget)
    arms = [a for a in ARMS if a in {"ocnopt", "adam", *args.arms}]
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    # stage 1: the grids of the tuned arms on seed 0 (and the untuned arms' seed 0)
    stage1 = {}
    for task, (cfg, budget) in plan.items():
        for arm in arms:
            for lr in grids.get(arm, [NO_GRID]):
                stage1[(task, arm, lr)] = pool.submit(_run, cfg, out / task, arm, lr, 0, budget)
    grid_runs = {t: {a: [] for a in arms} for t in plan}
    for (task, arm, _), fut in stage1.items():
        grid_runs[task][arm].append(fut.result())
    # stage 2: every arm at its choice on the other seeds
    chosen, stage2 = {}, {}
    for task in plan:
        for arm in arms:
            runs = grid_runs[task][arm]
            higher = next((r["higher"] for r in runs if "failed" not in r), False)
            chosen[(task, arm)] = _choose(runs, higher) if arm in grids else NO_GRID
    # seed by seed, the arms side by side: each run shares the machine with another arm's
    # run of the same seed (not OCNOpt with OCNOpt and Adam with Adam), so that the arms
    # compared see the same load
    for task, (cfg, budget) in plan.items():
        for seed in range(1, args.seeds):
            for arm in arms:
                lr = chosen[(task, arm)]
                stage2[(task, arm, seed)] = pool.submit(
                    _run, cfg, out / task, arm, lr, seed, budget
                )
    seed_runs = {t: {a: [] for a in arms} for t in plan}
    for task in plan:
        for arm in arms:
            lr = chosen[(task, arm)]
            seed_runs[task][arm].append(next(r for r in grid_runs[task][arm] if r.get("lr") == lr))
    for (task, arm, _), fut in stage2.items():
        seed_runs[task][arm].append(fut.result())
    pool.shutdown()
    results = {}
    for task, (_, budget) in plan.items():
        try:
            select = "best_test" if args.model == "best" else "test"
            results[task] = summarise(task, budget, grid_runs[task], seed_runs[task], select)
        except StopIteration:
            failures = [r.get("failed") for rs in seed_runs[task].values() for r in rs]
            results[task] = {"failed": next((f for f in failures if f), "no run finished")}
    table = format_table(results)
    words = verdicts(results)
    which = "best-validation" if args.model == "best" else "final"
    said = [
        f"- {task}, {arm}: {a['verdict']}"
        for task, res in results.items()
        if "failed" not in res
        for arm, a in res["arms"].items()
        if "verdict" in a
    ]
    text = "\n".join(words) + f"\n\nTest metrics of each run's {which} model.\n\n" + table
    text += "\n\nVerdicts against tuned Adam (paired by seed):\n\n" + "\n".join(said)
    print(text)
    saved = {
        "argv": sys.argv if argv is None else list(argv),
        "seeds": args.seeds,
        "model": args.model,
        "grids": grids,
        "ocnopt_set": ocnopt_set,
        "adam_set": adam_set,
        "gradient": args.gradient,
        "verdicts": words,
        "results": results,
    }
    atomic_write_json(out / "summary.json", saved)
    atomic_write_text(out / "summary.md", text + "\n")
    return {"table": table, "verdicts": words, "results": results}


if __name__ == "__main__":
    main()
