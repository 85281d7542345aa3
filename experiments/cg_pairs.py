"""Paired wall-clock comparison of a ``cg_iters`` run and an Adam run (bench_issue21.md §8).

Each pair folder holds two ``node-ocp train`` runs started together, one per core
(``OMP_NUM_THREADS=1``), so both see the same load. Prints, per pair: validation MSE at
given steps and at given seconds (training clock, evaluation excluded), the time each run
needs to reach the other's validation MSE at a reference step, and the test MSE.

    python experiments/cg_pairs.py /work/bench/cgcost/pairs/s0 --cg gn10-direct-fwd --ref 150
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("val_mse") is not None]


def at_step(rows, step):
    hit = [r for r in rows if r["step"] == step]
    return hit[0] if hit else None


def at_seconds(rows, seconds):
    """The last evaluation at or before ``seconds`` of training clock (None past the run)."""
    if seconds > rows[-1]["seconds"]:
        return None
    hit = [r for r in rows if r["seconds"] <= seconds]
    return hit[-1] if hit else None


def first_below(rows, value):
    """The first evaluation with validation MSE <= ``value``: (step, seconds) or None."""
    for r in rows:
        if r["val_mse"] <= value:
            return r["step"], r["seconds"]
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pairs", nargs="+")
    ap.add_argument("--cg", required=True)
    ap.add_argument("--adam", default="adam")
    ap.add_argument("--ref", type=int, default=150, help="Adam's reference step")
    ap.add_argument("--ref-cg", type=int, default=None, help="the cg run's (default: its last)")
    ap.add_argument("--steps", type=int, nargs="*", default=[10, 30, 60, 90, 120, 150])
    ap.add_argument("--seconds", type=float, nargs="*", default=[30, 60, 120, 240, 480])
    a = ap.parse_args()
    for folder in map(Path, a.pairs):
        cg, adam = curve(folder / a.cg), curve(folder / a.adam)
        print(f"## {folder}")
        for name, rows in ((a.cg, cg), (a.adam, adam)):
            last = rows[-1]
            s_per_step = last["seconds"] / max(last["step"], 1)
            vals = [at_step(rows, s) for s in a.steps]
            secs = [at_seconds(rows, t) for t in a.seconds]
            summary = folder / name / "summary.json"
            test = json.loads(summary.read_text())["test_metric"] if summary.exists() else None
            print(
                f"{name}: {last['step']} steps in {last['seconds']:.0f} s "
                f"({s_per_step:.3f} s/step), test MSE (final) {test}"
            )
            print(
                "  val @ steps "
                + " ".join(
                    f"{s}:{'-' if v is None else format(v['val_mse'], '.4f')}"
                    for s, v in zip(a.steps, vals)
                )
            )
            print(
                "  val @ seconds "
                + " ".join(
                    f"{t:.0f}:{'-' if v is None else format(v['val_mse'], '.4f')}"
                    for t, v in zip(a.seconds, secs)
                )
            )
        for name, rows, other_name, other, step in (
            (a.adam, adam, a.cg, cg, a.ref),
            (a.cg, cg, a.adam, adam, a.ref_cg),
        ):
            ref = (None if step is None else at_step(rows, step)) or rows[-1]
            reach = first_below(other, ref["val_mse"])
            print(
                f"  {other_name} reaches {name}'s val {ref['val_mse']:.4f} (its step "
                f"{ref['step']}, {ref['seconds']:.0f} s): "
                + (
                    f"not within its run ({other[-1]['step']} steps, {other[-1]['seconds']:.0f} s)"
                    if reach is None
                    else f"step {reach[0]}, {reach[1]:.0f} s"
                )
            )


if __name__ == "__main__":
    main()
