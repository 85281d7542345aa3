"""Compare optimizers on every bundled task and collect one summary table.

For every config in ``configs/`` (or those given with ``--configs``) this runs
``node-ocp compare`` (same model, data, solver and tolerances per optimizer; seeds; optional
learning-rate grids), keeps each task's report folder, and writes ``summary.md`` and
``summary.json`` with, per task, the test metric of each optimizer (mean ± std over seeds)
and the time-to-target ratio of each optimizer to Adam, then, for every OCNOpt table against
every baseline, the tasks it won, tied and lost (by the seed-paired 95% interval of the test
metric, see ``node_ocp.train.intervals.verdict``) and the tasks where it reached the target
faster or slower, each with a two-sided sign test over the tasks (ties left out).

    python experiments/compare_all.py --quick          # minutes on a CPU: few steps, 1 seed
    python experiments/compare_all.py                  # each config's full length, 3 seeds
    python experiments/compare_all.py --max-time 15    # equal training-time budget per run

``--resume`` skips tasks whose comparison already finished (their comparison.json exists).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from node_ocp._errors import first_line
from node_ocp.data.density_suite import SUITE, missing_files
from node_ocp.io import atomic_write_json, atomic_write_text
from node_ocp.train.compare import COMPARISON, aggregate, compare
from node_ocp.train.config import ConfigError, load_config
from node_ocp.train.intervals import sign_test
from node_ocp.train.loop import RunError
from node_ocp.train.report import write_report

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("quickstart",)  # the README's config duplicates cnf_8gaussians


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help="config files (default: every configs/*.toml but quickstart, and but the "
        "tabular suite's configs whose release files are not at their path)",
    )
    p.add_argument(
        "--optimizers",
        default="adam,sgd,ocnopt",
        help="comma-separated optimizer tables (default: adam,sgd,ocnopt)",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3; 1 with --quick)")
    p.add_argument("--lr-grid", action="store_true", help="tune each optimizer's lr on its grid")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="step budget per run (default: the config's; 8 with --quick)",
    )
    p.add_argument(
        "--max-time",
        type=float,
        default=None,
        help="training seconds per run (default: the config's)",
    )
    p.add_argument("--quick", action="store_true", help="a few steps and one seed per run")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: the config's)")
    p.add_argument("--out", default="runs/compare_all", help="output folder (runs/compare_all)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip tasks already compared and keep finished runs of the others",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the comparisons already in --out (default: off: such a task fails)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: re-aggregate each task's finished runs and rewrite "
        "its report and the summary",
    )
    return p


def _cell(mean_std) -> str:
    m, s = mean_std
    return "diverged" if m is None or not math.isfinite(m) else f"{m:.4g} ± {s:.2g}"


def _diverged(agg) -> str:
    return f" ({agg['diverged']}/{agg['seeds']} diverged)" if agg["diverged"] else ""


def _ratio(v) -> str:
    return "never" if v is None else f"{v:.2f}"


def summarize(results: dict[str, dict], optimizers: list[str]) -> str:
    """One markdown table: a row per task, test metric and time-to-target ratio per optimizer.

    A task whose comparison failed (``{"failed": message}``) gets a row with the message.
    """
    base = next((r["baseline"] for r in results.values() if "baseline" in r), optimizers[0])
    head = "| task | metric | " + " | ".join(f"{o} test" for o in optimizers)
    head += " | " + " | ".join(f"{o} t→target × {base}" for o in optimizers if o != base)
    head += f" | OCNOpt step cost × {base} |"
    width = head.count("|") - 1
    lines = [head, "|" + "---|" * width]
    for stem, r in results.items():
        if "failed" in r:
            cells = [stem, "failed: " + r["failed"].replace("|", "/")] + [""] * (width - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        opts = r["optimizers"]
        better = "↑" if r["higher_is_better"] else "↓"
        row = [stem, f"{r['metric']} {better}"]
        row += [
            _cell(opts[o]["test"]) + _diverged(opts[o]) if o in opts else "–" for o in optimizers
        ]
        row += [
            _ratio(opts[o]["time_to_target_ratio"]) if o in opts else "–"
            for o in optimizers
            if o != base
        ]
        ocn = next((a for a in opts.values() if a["kind"] == "ocnopt"), None)
        row.append(_ratio(ocn["step_cost_ratio"]) if ocn else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def tally(results: dict[str, dict]) -> list[dict]:
    """Per (OCNOpt table, baseline): wins/ties/losses on the test metric and faster/slower
    to the target over the tasks, each with its sign-test p-value."""
    pairs: dict[tuple[str, str], dict] = {}
    for stem, r in results.items():
        for v in r.get("verdicts", []):
            t = pairs.setdefault(
                (v["name"], v["baseline"]),
                {"win": [], "tie": [], "loss": [], "faster": [], "slower": [], "untimed": []},
            )
            t[v["outcome"]].append(stem)
            ratio = v["time_ratio"][0]
            if ratio is None or not math.isfinite(ratio):
                t["untimed"].append(stem)
            else:
                t["faster" if ratio < 1 else "slower"].append(stem)
    out = []
    for (name, base), t in pairs.items():
        out.append(
            {
                "name": name,
                "baseline": base,
                **{k: len(v) for k, v in t.items()},
                "tasks": t,
                "p_test": sign_test(len(t["win"]), len(t["loss"])),
                "p_time": sign_test(len(t["faster"]), len(t["slower"])),
            }
        )
    return out


def tally_table(rows: list[dict]) -> str:
    lines = [
        "| OCNOpt table | against | wins | ties | losses | sign test p | faster | slower "
        "| sign test p (time) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in rows:
        lines.append(
            f"| {t['name']} | {t['baseline']} | {t['win']} | {t['tie']} | {t['loss']} "
            f"| {t['p_test']:.3g} | {t['faster']} | {t['slower']} | {t['p_time']:.3g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    max_steps = args.max_steps or (8 if args.quick else None)
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    paths = (
        [Path(c) for c in args.configs]
        if args.configs
        else [p for p in sorted((ROOT / "configs").glob("*.toml")) if p.stem not in SKIP]
    )
    if not args.configs:
        paths = [p for p in paths if _has_its_files(p)]
    out = Path(args.out)
    results, seconds = {}, {}
    for path in paths:
        folder = out / path.stem
        if args.report_only:
            if (folder / "runs").exists():
                cfg = load_config(path)
                results[path.stem] = aggregate(folder, cfg, optimizers)
                write_report(folder, results[path.stem])
            continue
        if args.resume and (folder / COMPARISON).exists():
            import json

            results[path.stem] = json.loads((folder / COMPARISON).read_text())
            continue
        print(f"== {path.stem}", flush=True)
        t0 = time.perf_counter()
        try:
            results[path.stem] = compare(
                load_config(path),
                folder,
                optimizers,
                seeds=seeds,
                lr_grid=args.lr_grid,
                device=args.device,
                max_steps=max_steps,
                max_time=args.max_time,
                progress=False,
                resume=args.resume,
                overwrite=args.overwrite,
            )
        except (ConfigError, RunError, ImportError, ValueError) as exc:
            # one task that cannot run (a missing extra, a failed run) does not stop the rest
            why = first_line(exc)
            print(f"{path.stem}: failed: {why}", flush=True)
            results[path.stem] = {"failed": why}
        seconds[path.stem] = time.perf_counter() - t0
        _write(out, results, optimizers, args, seeds, max_steps)
    table = _write(out, results, optimizers, args, seeds, max_steps)
    print(table)
    print(f"summary: {out / 'summary.md'}")
    return {"results": results, "table": table, "seconds": seconds}


def _has_its_files(path: Path) -> bool:
    """False (with a note) for a tabular-suite config whose release files are not at its
    ``path``: by default those tasks are left out rather than listed as failed."""
    cfg = load_config(path)
    if cfg.task.dataset not in SUITE:
        return True
    missing = missing_files(cfg.task.dataset, path.parent / Path(cfg.task.path).expanduser())
    if missing:
        print(f"{path.stem}: left out: the release's files are not here ({missing[0]})")
    return not missing


def _write(out: Path, results, optimizers, args, seeds, max_steps) -> str:
    rows = tally(results)
    table = summarize(results, optimizers) + "\n\n" + tally_table(rows)
    setup = (
        f"seeds {seeds}; optimizers {', '.join(optimizers)}; "
        f"{'lr grid' if args.lr_grid else 'each optimizer at its config lr'}; "
        f"steps {'per config' if max_steps is None else max_steps}; "
        f"time budget {'per config' if args.max_time is None else f'{args.max_time:g} s'}"
    )
    if args.report_only:  # the flags of this call did not train anything
        setup = (
            f"optimizers {', '.join(optimizers)}; re-aggregated from finished runs, with the "
            "seeds, learning rates and budgets they ran with (each run's config.json)"
        )
    text = (
        "# Optimizer comparison over the bundled tasks\n\n"
        f"{setup}. Test metrics are mean ± std over seeds; time-to-target is the median "
        "training wall-clock to reach the task's target (the median final validation metric "
        "of its best first-order baseline, or [train].target), as a ratio to Adam's "
        "('never': most seeds did not). Wins, ties and losses: the seed-paired 95% interval "
        "of the test-metric difference excludes 0 (or not); faster/slower: the geometric "
        "mean time-to-target ratio over the seeds both reached; p: two-sided sign test over "
        "the tasks. Per-task reports: `<task>/report.md`.\n\n"
        f"{table}\n"
    )
    atomic_write_text(out / "summary.md", text)
    atomic_write_json(
        out / "summary.json",
        {
            "setup": setup,
            "tally": rows,
            "results": {
                k: {
                    kk: v[kk]
                    for kk in (
                        "metric",
                        "higher_is_better",
                        "target",
                        "verdicts",
                        "optimizers",
                        "failed",
                    )
                    if kk in v
                }
                for k, v in results.items()
            },
        },
    )
    return table


if __name__ == "__main__":
    main()
