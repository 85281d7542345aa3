"""Where the time of a ``cg_iters`` step goes (issue 21, bench_issue21.md §8).

Runs OCNOpt with a config table on the spiral forecaster, ``--warm`` steps unprofiled,
then ``--steps`` steps with timers around: the loop's forward (with graph) and backward,
the step's graph-building forward, every closure call without grad (the products' ±εv
forwards, the trials), every ``autograd.grad`` (the ``Jᵀu`` backward, the output Hessian),
and the rest of ``opt.step`` (CG arithmetic, bookkeeping). Also times a bare forward
without grad, one with a graph, and a backward at several batch sizes.

    OMP_NUM_THREADS=1 python experiments/profile_cg.py --optimizer ocnopt-gn --steps 5
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch


def build(config_path, optimizer, seed, batch_size=None):
    from node_ocp.train.config import load_config
    from node_ocp.train.loop import BatchSampler
    from node_ocp.train.optimizers import build_optimizer, decay_for_task
    from node_ocp.train.tasks import build_task

    cfg = load_config(config_path)
    torch.manual_seed(seed)
    task = build_task(cfg, "cpu")
    table = decay_for_task(cfg.optimizers[optimizer], task)  # the trainer's default decay
    opt = build_optimizer(table, task.model, seed=seed)
    sampler = BatchSampler(len(task.data.train), batch_size or cfg.train.batch_size, seed)
    return cfg, task, opt, sampler


class Timers:
    def __init__(self):
        self.t = defaultdict(float)
        self.n = defaultdict(int)

    def add(self, key, dt):
        self.t[key] += dt
        self.n[key] += 1


def profile_steps(args) -> dict:
    cfg, task, opt, sampler = build(args.config, args.optimizer, args.seed)
    timers = Timers()
    real_grad = torch.autograd.grad
    state = {"in_step": False}

    def timed_grad(outputs, inputs, *a, **k):
        if state.get("depth"):  # the own adjoint's vector-Jacobian products inside a backward
            return real_grad(outputs, inputs, *a, **k)
        t0 = time.perf_counter()
        state["depth"] = 1
        try:
            out = real_grad(outputs, inputs, *a, **k)
        finally:
            state["depth"] = 0
        if state["in_step"]:
            key = (
                "grad→params (Jᵀu)"
                if isinstance(inputs, (list, tuple)) and len(inputs) > 1
                else "grad→outputs (H, ∂L/∂y)"
            )
            timers.add(key, time.perf_counter() - t0)
        return out

    torch.autograd.grad = timed_grad
    try:
        for step in range(args.warm + args.steps):
            profiling = step >= args.warm
            batch = task.data.train.batch(sampler.next())

            def closure(batch=batch, profiling=profiling):
                t0 = time.perf_counter()
                outputs, loss = task.outputs_and_loss(batch)
                if profiling and state["in_step"]:
                    key = "closure, with graph" if torch.is_grad_enabled() else "closure, no grad"
                    timers.add(key, time.perf_counter() - t0)
                return loss, outputs

            t0 = time.perf_counter()
            opt.zero_grad()
            outputs, loss = task.outputs_and_loss(batch)
            t1 = time.perf_counter()
            opt.backward(loss, outputs=outputs, likelihood=task.likelihood)
            t2 = time.perf_counter()
            state["in_step"] = profiling
            opt.step(closure)
            state["in_step"] = False
            t3 = time.perf_counter()
            if profiling:
                timers.add("loop forward", t1 - t0)
                timers.add("loop backward", t2 - t1)
                timers.add("opt.step total", t3 - t2)
                timers.add("step total", t3 - t0)
    finally:
        torch.autograd.grad = real_grad
    n = args.steps
    inside = sum(v for k, v in timers.t.items() if k.startswith(("closure", "grad→")))
    timers.add("opt.step rest (CG arithmetic, bookkeeping)", timers.t["opt.step total"] - inside)
    rows = {
        k: {
            "s_per_step": timers.t[k] / n,
            "calls_per_step": timers.n[k] / n,
            "s_per_call": timers.t[k] / max(timers.n[k], 1),
        }
        for k in timers.t
    }
    rows["opt.step rest (CG arithmetic, bookkeeping)"]["calls_per_step"] = None
    return rows


def batch_sizes(args) -> dict:
    cfg, task, opt, sampler = build(args.config, "adam", args.seed)
    out = {}
    for b in args.batch_sizes:
        idx = torch.arange(b)
        batch = task.data.train.batch(idx)
        res = {}
        for name in ("no grad", "with graph", "backward"):
            times = []
            for _ in range(args.repeats):
                if name == "no grad":
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        task.outputs_and_loss(batch)
                    times.append(time.perf_counter() - t0)
                else:
                    t0 = time.perf_counter()
                    outputs, loss = task.outputs_and_loss(batch)
                    t1 = time.perf_counter()
                    torch.autograd.grad(loss, list(task.model.parameters()))
                    t2 = time.perf_counter()
                    times.append(t1 - t0 if name == "with graph" else t2 - t1)
            res[name] = sorted(times)[len(times) // 2]
        grid = torch.unique(torch.cat([batch.x.times[batch.x.valid], batch.y.times.reshape(-1)]))
        res["grid points"] = int(grid.numel())
        out[b] = res
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/forecast_spiral.toml")
    ap.add_argument("--optimizer", default="ocnopt-gn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"args": vars(args)}
    if args.steps:
        rows = profile_steps(args)
        result["steps"] = rows
        print(f"{args.optimizer}: per step over {args.steps} steps after {args.warm}")
        for k, r in sorted(rows.items(), key=lambda kv: -kv[1]["s_per_step"]):
            c = r["calls_per_step"]
            print(
                f"  {k:45s} {r['s_per_step']:7.3f} s/step  "
                + ("" if c is None else f"{c:5.1f} calls  {1000 * r['s_per_call']:7.1f} ms/call")
            )
    if args.batch_sizes:
        result["batch_sizes"] = batch_sizes(args)
        for b, r in result["batch_sizes"].items():
            print(
                f"  B={b:5d} grid={r['grid points']:3d}"
                f"  fwd no-grad {1000 * r['no grad']:7.1f} ms"
                f"  fwd graph {1000 * r['with graph']:7.1f} ms"
                f"  backward {1000 * r['backward']:7.1f} ms"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
