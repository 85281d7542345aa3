"""How far off is each curvature unit's scale? OCNOpt's per-unit calibration, measured.

OCNOpt scales its whole preconditioned step by one calibration ``κ`` (see
:mod:`node_ocp.optim.step_control`). This script trains a config with the default OCNOpt for
``--steps`` steps, then, on the next batch, moves each unit alone along its own direction
``u = (C + λ)⁻¹ g`` by ``a`` and measures the secant curvature
``2 (L(θ − a u) − L(θ) + a gᵀu) / a²`` over the unit's held curvature ``uᵀ(C + λ)u``: the
calibration ``κ_u`` that unit alone would need. A spread of ``κ_u`` across units, or a
global ``κ`` far above every ``κ_u`` (coupling between units), is curvature that one scalar
cannot fix.

    python experiments/unit_calibration.py configs/ts_japanese_vowels.toml --steps 20
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

import node_ocp as no
from node_ocp.optim.curvatures import Damping, dot
from node_ocp.train.config import load_config
from node_ocp.train.step import train_step
from node_ocp.train.tasks import build_task


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    p.add_argument("--out", default=None, help="a JSON file for the rows")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    cfg = load_config(args.config)
    torch.manual_seed(args.seed)
    task = build_task(cfg)
    model = task.model
    opt = no.OCNOpt(model)
    gen = torch.Generator().manual_seed(args.seed)
    n = len(task.data.train)

    def batch():
        return task.data.train.batch(torch.randperm(n, generator=gen)[: cfg.train.batch_size])

    for _ in range(args.steps):
        b = batch()
        train_step(
            opt,
            lambda b=b: task.outputs_and_loss(b),
            blocks=task.blocks,
            likelihood=task.likelihood,
            outputs_determine_loss=task.outputs_determine_loss,
        )
    b = batch()
    opt.zero_grad()
    _, loss = task.outputs_and_loss(b)
    loss.backward()
    loss0 = float(loss)
    names = {p: name for name, p in model.named_parameters()}
    damping = Damping(opt.damping, True)
    rows = []
    for unit in opt.units:
        grads = [p.grad for p in unit.params]
        u = unit.solve(grads, damping)
        held = float(unit.quadratic(u, damping))
        gu = float(dot(grads, u))
        kappas = {}
        with torch.no_grad():
            for a in args.sizes:
                for prm, d in zip(unit.params, u):
                    prm.sub_(a * d)
                _, moved = task.outputs_and_loss(b)
                for prm, d in zip(unit.params, u):
                    prm.add_(a * d)
                curvature = 2.0 * (float(moved) - loss0 + a * gu) / (a * a)
                kappas[repr(a)] = curvature / held if held > 0 else float("nan")
        row = {
            "unit": type(unit).__name__,
            "param": names[unit.params[0]],
            "grad_norm": float(dot(grads, grads)) ** 0.5,
            "held": held,
            "kappa_u": kappas,
        }
        rows.append(row)
        ks = " ".join(f"a={a}: {k:.3g}" for a, k in kappas.items())
        print(f"{row['param']:<40} {row['unit']:<12} |g| {row['grad_norm']:.2e}  κ_u {ks}")
    print(f"global κ {opt.calibration:.4g}, λ {opt.damping:.3g} (relative), step {args.steps}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "kappa": opt.calibration, "damping": opt.damping}, f)
    return rows


if __name__ == "__main__":
    main()
