"""Per-seed table of ``experiments/bench_latent.sh``: test MSE and test ELBO per observed
value of the best-validation and final models, seconds per step, and each run's time to
the tuned Adam's best validation MSE on the same seed (pairs started together).

    python experiments/bench_latent_summary.py OUT            # the table (markdown)
    python experiments/bench_latent_summary.py OUT --best-lr  # Adam's lr with the best val
"""

import argparse
import json
from pathlib import Path


def load(d: Path):
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((d / "summary.json").read_text())


def best_val(rows) -> float:
    return min(r["val_mse"] for r in rows if r["val_mse"] == r["val_mse"])


def first_time(rows, target):
    for r in rows:
        if r["val_mse"] is not None and r["val_mse"] <= target:
            return r["seconds"], r["step"]
    return None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--best-lr", action="store_true")
    args = ap.parse_args()
    grid = {p.name[len("adam_lr") : -len("_s0")]: p for p in args.out.glob("adam_lr*_s0")}
    vals = {lr: best_val(load(p)[0]) for lr, p in grid.items() if (p / "summary.json").exists()}
    if args.best_lr:
        print(min(vals, key=vals.get))
        return
    print("Adam's lr grid, seed 0, best validation MSE:")
    for lr in sorted(vals, key=float):
        print(f"- lr {lr}: {vals[lr]:.4f}")
    print()
    print(
        "| seed | optimizer | test MSE, best-val model (step) | test MSE, final | "
        "test ELBO/value, best-val | s/step | time to Adam's best val (step) |"
    )
    print("|---|---|---|---|---|---|---|")
    for s in (0, 1, 2):
        ra, sa = load(args.out / f"adam_best_s{s}")
        ro, so = load(args.out / f"ocnopt_s{s}")
        target = best_val(ra)
        for name, rows, summ in (("Adam (tuned)", ra, sa), ("OCNOpt default", ro, so)):
            t, k = first_time(rows, target)
            reach = f"{t:.0f} s ({k})" if t is not None else "never"
            print(
                f"| {s} | {name} | {summ['best_test']['mse']:.4f} ({summ['best_step']}) | "
                f"{summ['test']['mse']:.4f} | {summ['best_test']['elbo']:.3f} | "
                f"{summ['train_seconds'] / summ['steps']:.2f} | {reach} |"
            )


if __name__ == "__main__":
    main()
