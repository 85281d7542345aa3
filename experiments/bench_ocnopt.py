"""OCNOpt against Adam and SGD on a 2-D CNF (procedural 8 Gaussians, no downloads).

Same model, data, solver and tolerances for every optimizer, in one process. Each optimizer
runs over a small grid of learning rates and is reported at its best final held-out NLL
(a fair comparison tunes everyone). Reported, printed and saved as JSON:

- per-iteration time as a ratio to Adam with the plain adjoint, measured on the same model
  state (so at equal function evaluations): OCNOpt's ordinary step, its refresh step
  (curvature capture + eigendecompositions), and the amortized cost over ``update_every``;
- per-step time ratio during training (which also reflects how the function evaluations
  change as each optimizer shapes the field);
- held-out NLL against steps and against training wall-clock (evaluation time excluded);
- time-to-target: the first training wall-clock at which each optimizer reaches Adam's final
  held-out NLL, as a ratio to Adam's time to get there;
- function evaluations per step (forward/backward).

    python experiments/bench_ocnopt.py [--steps 300] [--seed 0] [--out runs/bench_ocnopt.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import node_ocp as no
from node_ocp.data import toy_2d
from node_ocp.io import atomic_write_json
from node_ocp.models import CNF

GRIDS = {
    "adam": [3e-3, 1e-2, 3e-2, 1e-1],
    "sgd": [1e-2, 3e-2, 1e-1, 3e-1],
    "ocnopt": [1e-2, 3e-2, 1e-1, 3e-1],
}


def _make_opt(name: str, model, lr: float, args):
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return no.OCNOpt(
        model,
        lr=lr,
        curvature=args.curvature,
        update_every=args.update_every,
        sample_dt=args.sample_dt,
    )


def _nfe(model) -> tuple[int, int]:
    f = sum(b.nfe_forward for b in model.blocks)
    b = sum(b.nfe_backward for b in model.blocks)
    for blk in model.blocks:
        blk.reset_nfe()
    return f, b


def run_one(name: str, lr: float, args, data) -> dict:
    x_train, x_test = data
    torch.manual_seed(args.seed)
    model = CNF(2, hidden=tuple(args.hidden), rtol=args.tol, atol=args.tol)
    opt = _make_opt(name, model, lr, args)
    gen = torch.Generator().manual_seed(args.seed)
    curve, step_times, refresh_times, nfe_f, nfe_b = [], [], [], [], []
    train_clock = 0.0
    diverged = False
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                held_out = model.nll(x_test).item()
            _nfe(model)
            curve.append({"step": step, "seconds": train_clock, "nll": held_out})
            if held_out != held_out:
                diverged = True
                break
        if step == args.steps:
            break
        idx = torch.randint(0, x_train.shape[0], (args.batch,), generator=gen)
        refresh = isinstance(opt, no.OCNOpt) and opt.refresh_due
        t0 = time.perf_counter()
        opt.zero_grad()
        try:
            loss = model.nll(x_train[idx])
            loss.backward()
            opt.step()
        except no.SolverError:
            diverged = True
            break
        dt = time.perf_counter() - t0
        train_clock += dt
        (refresh_times if refresh else step_times).append(dt)
        f, b = _nfe(model)
        nfe_f.append(f)
        nfe_b.append(b)
    return {
        "optimizer": name,
        "lr": lr,
        "diverged": diverged,
        "curve": curve,
        "final_nll": curve[-1]["nll"] if not diverged else float("inf"),
        "step_time": statistics.median(step_times) if step_times else None,
        "refresh_time": statistics.median(refresh_times) if refresh_times else None,
        "train_seconds": train_clock,
        "nfe_forward": statistics.mean(nfe_f) if nfe_f else None,
        "nfe_backward": statistics.mean(nfe_b) if nfe_b else None,
    }


def step_costs(args, data) -> dict:
    """Per-iteration time on the *same* model state: Adam, OCNOpt ordinary and refresh steps.

    Both start from the same initial model with a learning rate so small that the model (and
    so the number of function evaluations) does not change. Their steps alternate, so that
    drift in the machine's speed hits both alike; medians over the steps.
    """
    x_train, _ = data
    torch.manual_seed(args.seed)
    base = CNF(2, hidden=tuple(args.hidden), rtol=args.tol, atol=args.tol)
    gen = torch.Generator().manual_seed(args.seed)
    batch = x_train[torch.randint(0, x_train.shape[0], (args.batch,), generator=gen)]
    runs = {}
    for name in ("adam", "ocnopt"):
        model = CNF(2, hidden=tuple(args.hidden), rtol=args.tol, atol=args.tol)
        model.load_state_dict(base.state_dict())
        runs[name] = {
            "model": model,
            "opt": _make_opt(name, model, 1e-9, args),
            "plain": [],
            "refresh": [],
            "nfe": None,
        }
    for _ in range(args.cost_steps):
        for r in runs.values():
            model, opt = r["model"], r["opt"]
            is_refresh = isinstance(opt, no.OCNOpt) and opt.refresh_due
            t0 = time.perf_counter()
            opt.zero_grad()
            model.nll(batch).backward()
            opt.step()
            (r["refresh"] if is_refresh else r["plain"]).append(time.perf_counter() - t0)
            r["nfe"] = _nfe(model)
    adam = statistics.median(runs["adam"]["plain"][1:])
    ocn = statistics.median(runs["ocnopt"]["plain"])
    ocn_refresh = statistics.median(runs["ocnopt"]["refresh"])
    k = args.update_every
    amortized = (ocn_refresh + (k - 1) * ocn) / k
    return {
        "adam_step_s": adam,
        "ocnopt_step_s": ocn,
        "ocnopt_refresh_s": ocn_refresh,
        "step_ratio": ocn / adam,
        "refresh_ratio": ocn_refresh / adam,
        "amortized_ratio": amortized / adam,
        "nfe_adam": runs["adam"]["nfe"],
        "nfe_ocnopt": runs["ocnopt"]["nfe"],
    }


def time_to(curve: list[dict], target: float) -> float | None:
    for point in curve:
        if point["nll"] <= target:
            return point["seconds"]
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=300, help="training steps per run (300)")
    p.add_argument("--batch", type=int, default=256, help="batch size (256)")
    p.add_argument("--hidden", type=int, nargs="+", default=[32, 32], help="field widths")
    p.add_argument("--tol", type=float, default=1e-4, help="rtol = atol of the solver (1e-4)")
    p.add_argument("--eval-every", type=int, default=20, help="held-out evaluation period")
    p.add_argument("--curvature", default="ekfac", help="OCNOpt curvature (ekfac)")
    p.add_argument("--update-every", type=int, default=20, help="OCNOpt refresh period (20)")
    p.add_argument("--sample-dt", type=float, default=0.05, help="capture grid spacing (0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--cost-steps", type=int, default=41, help="steps of the timing phase (41)")
    p.add_argument(
        "--grid",
        choices=["full", "single"],
        default="full",
        help="learning-rate grid per optimizer, or only its middle value",
    )
    p.add_argument("--out", default="runs/bench_ocnopt.json", help="JSON output path")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    data = (toy_2d("8gaussians", 4096, seed=args.seed), toy_2d("8gaussians", 2048, seed=10_000))
    runs = []
    for name, grid in GRIDS.items():
        lrs = grid if args.grid == "full" else [grid[1]]
        for lr in lrs:
            r = run_one(name, lr, args, data)
            runs.append(r)
            print(
                f"{name:<7} lr={lr:<6g} final held-out NLL {r['final_nll']:.4f}  "
                f"{r['train_seconds']:.1f}s train" + ("  (diverged)" if r["diverged"] else "")
            )
    best = {}
    for r in runs:
        if r["optimizer"] not in best or r["final_nll"] < best[r["optimizer"]]["final_nll"]:
            best[r["optimizer"]] = r
    adam = best["adam"]
    target = adam["final_nll"]
    adam_tt = time_to(adam["curve"], target)
    summary = {}
    for name, r in best.items():
        tt = time_to(r["curve"], target)
        summary[name] = {
            "lr": r["lr"],
            "final_nll": r["final_nll"],
            "step_time_ratio": r["step_time"] / adam["step_time"] if r["step_time"] else None,
            "time_to_adam_final_s": tt,
            "time_to_target_ratio": (tt / adam_tt) if (tt is not None and adam_tt) else None,
            "nfe_forward": r["nfe_forward"],
            "nfe_backward": r["nfe_backward"],
        }
    costs = step_costs(args, data)
    k = args.update_every
    print(f"\ntarget: Adam's final held-out NLL {target:.4f} (reached at {adam_tt:.1f}s)")
    print(
        f"{'optimizer':<8} {'lr':>7} {'final NLL':>10} {'step x Adam':>12} "
        f"{'t->target s':>12} {'x Adam':>7} {'NFE f/b':>12}"
    )
    for name, s in summary.items():
        tt = "never" if s["time_to_adam_final_s"] is None else f"{s['time_to_adam_final_s']:.1f}"
        ratio = "-" if s["time_to_target_ratio"] is None else f"{s['time_to_target_ratio']:.2f}"
        nfe = f"{s['nfe_forward']:.0f}/{s['nfe_backward']:.0f}" if s["nfe_forward"] else "-"
        print(
            f"{name:<8} {s['lr']:>7g} {s['final_nll']:>10.4f} {s['step_time_ratio']:>12.2f} "
            f"{tt:>12} {ratio:>7} {nfe:>12}"
        )
    print(
        f"OCNOpt per-iteration cost vs Adam on the same model state (equal NFE): ordinary step "
        f"{costs['step_ratio']:.2f}x, refresh step {costs['refresh_ratio']:.2f}x, amortized "
        f"over {k} steps {costs['amortized_ratio']:.2f}x"
    )
    result = {"config": vars(args), "costs": costs, "summary": summary, "runs": runs}
    print(f"saved {atomic_write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
