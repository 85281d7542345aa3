"""Train one config on both solver backends, step by step interleaved: step times and losses.

For each optimizer, two copies of the config's model start from the same seeded initial
state, one with ``[solver].backend = "torchdiffeq"`` and one with ``"own"`` (the own
Runge–Kutta loop, :mod:`node_ocp.ode.rk`); they take the same sequence of seeded batches,
alternating one step each (the order flipped every step), so that both see the same machine
load. Prints and saves (JSON) per optimizer the median step time of each backend, their
ratio, the NFE per step and the largest relative difference of the training losses.

    OMP_NUM_THREADS=1 python experiments/backend_compare.py configs/quickstart.toml \\
        [--optimizers adam ocnopt] [--steps 40] [--out runs/backend_compare.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from node_ocp.io import atomic_write_json
from node_ocp.train import build_task, load_config
from node_ocp.train.adapters import build_adapter
from node_ocp.train.optimizers import decay_for_task
from node_ocp.train.step import train_step

BACKENDS = ("torchdiffeq", "own")


def compare(config_path: str, optimizers: list[str], steps: int, seed: int = 0) -> dict:
    result = {"config": config_path, "steps": steps, "optimizers": {}}
    for name in optimizers:
        arms = {}
        for backend in BACKENDS:
            cfg = load_config(config_path)
            cfg.solver.backend = backend
            torch.manual_seed(seed)
            task = build_task(cfg, torch.device("cpu"))
            table = decay_for_task(cfg.optimizers[name], task)  # the trainer's default decay
            opt = build_adapter(table, task.model, seed=seed)
            arms[backend] = {"task": task, "opt": opt, "s": [], "loss": [], "nfe": []}
        n = len(arms["own"]["task"].data.train)
        batch_size = min(cfg.train.batch_size, n)
        gen = torch.Generator().manual_seed(seed)
        for i in range(steps):
            idx = torch.randperm(n, generator=gen)[:batch_size]
            order = BACKENDS if i % 2 == 0 else BACKENDS[::-1]
            for backend in order:
                a = arms[backend]
                t = a["task"]
                batch = t.data.train.batch(idx)
                r = train_step(
                    a["opt"],
                    lambda t=t, batch=batch: t.outputs_and_loss(batch),
                    blocks=t.blocks,
                    likelihood=t.likelihood,
                )
                a["s"].append(r.seconds)
                a["loss"].append(float(r.loss))
                a["nfe"].append(r.nfe_forward + r.nfe_backward)
        row = {}
        for backend, a in arms.items():
            row[f"{backend}_step_s"] = statistics.median(a["s"][1:])  # the first warms up
            row[f"{backend}_nfe"] = statistics.mean(a["nfe"])
            row[f"{backend}_final_loss"] = a["loss"][-1]
            row[f"{backend}_losses"] = a["loss"]
            row[f"{backend}_nfe_per_step"] = a["nfe"]
        row["own_over_torchdiffeq"] = row["own_step_s"] / row["torchdiffeq_step_s"]
        row["loss_max_rel_diff"] = max(
            abs(x - y) / max(abs(y), 1e-12)
            for x, y in zip(arms["own"]["loss"], arms["torchdiffeq"]["loss"])
        )
        row["same_nfe_every_step"] = arms["own"]["nfe"] == arms["torchdiffeq"]["nfe"]
        differ = [i for i, (x, y) in enumerate(zip(arms["own"]["nfe"], arms["torchdiffeq"]["nfe"]))
                  if x != y]  # fmt: skip
        row["first_step_with_other_nfe"] = differ[0] if differ else None
        result["optimizers"][name] = row
        print(
            f"{name:<10} step ms: torchdiffeq {1e3 * row['torchdiffeq_step_s']:.1f}  own "
            f"{1e3 * row['own_step_s']:.1f}  ratio {row['own_over_torchdiffeq']:.3f}  NFE/step "
            f"{row['own_nfe']:.1f} (same every step: {row['same_nfe_every_step']})  final loss "
            f"{row['torchdiffeq_final_loss']:.5g} / {row['own_final_loss']:.5g}  largest "
            f"relative loss difference {row['loss_max_rel_diff']:.2e}"
        )
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--optimizers", nargs="+", default=["adam", "ocnopt"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output (default: print only)")
    args = p.parse_args(argv)
    result = compare(args.config, args.optimizers, args.steps, args.seed)
    if args.out:
        print(f"saved {atomic_write_json(args.out, result)}")
    return copy.deepcopy(result)


if __name__ == "__main__":
    main()
