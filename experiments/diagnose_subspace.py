"""What OCNOpt's subspace step does, step by step, beside any other optimizer table
(``bench_issue21.md`` §27). One ``node-ocp`` config trained with one of its optimizer
tables, printing as JSON every ``--every`` steps: the batch loss, ``‖θ‖``, each top-level
part's move ``‖Δθ_part‖ / ‖θ‖``, and for a subspace step its λ, ρ, α, trials and
coefficients ``c`` (one per part, then the previous update's); the validation split every
``--eval-every`` steps. The steps are the trainer's own (:func:`node_ocp.train.train_step`
with the task's ``training_terms`` and the loop's sampler and seed).

    OMP_NUM_THREADS=1 python experiments/diagnose_subspace.py \
        --config configs/ts_japanese_vowels.toml --steps 400 --set subspace_held=0
    OMP_NUM_THREADS=1 python experiments/diagnose_subspace.py \
        --config configs/ts_japanese_vowels.toml --optimizer adam --set lr=0.03
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from node_ocp.train import build_task, load_config
from node_ocp.train.optimizers import build_optimizer, decay_for_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnose_stall import trainer_steps  # noqa: E402


def _value(text: str):
    """A ``--set`` value: a number where it reads as one, else the string."""
    try:
        return float(text)
    except ValueError:
        return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/ts_japanese_vowels.toml")
    p.add_argument("--optimizer", default="ocnopt", help="the config's optimizer table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=10, help="log every this many steps")
    p.add_argument("--eval-every", type=int, default=50, help="validate every this many steps")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="override keys of the table"
    )
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    torch.manual_seed(a.seed)
    task = build_task(cfg, "cpu")
    table = cfg.optimizer(a.optimizer)
    for item in a.set:
        key, _, value = item.partition("=")
        table = dataclasses.replace(table, **{key: _value(value)})
    table = decay_for_task(table, task)  # the trainer's rule: OCNOpt's prior on an NLL
    opt = build_optimizer(table, task.model, seed=a.seed)
    params = list(task.model.parameters())
    part = {q: n.split(".")[0] for n, q in task.model.named_parameters()}
    for step, res, before in trainer_steps(task, opt, cfg.train.batch_size, a.seed, a.steps):
        last = step == a.steps - 1
        if step % a.every and not last:
            continue
        with torch.no_grad():
            moved: dict[str, float] = {}
            for q, b in zip(params, before):
                moved[part[q]] = moved.get(part[q], 0.0) + float(((q - b) ** 2).sum())
            theta = math.sqrt(sum(float((q**2).sum()) for q in params))
        record = dict(
            step=step,
            loss=round(float(res.loss), 4),
            theta=round(theta, 2),
            moved={k: f"{math.sqrt(v) / theta:.2e}" for k, v in moved.items()},
        )
        sub = getattr(opt, "_subspace", None)
        if sub is not None:
            record.update(
                lam=f"{sub.damping:.2g}",
                rho=f"{sub.last_rho:.2f}",
                alpha=sub.last_alpha,
                trials=sub.last_trials,
                c=[f"{c:.2f}" for c in sub.last_coefficients],
            )
        if step % a.eval_every == 0 or last:
            task.model.eval()
            with torch.no_grad():
                record["val"] = task.evaluate(task.data.val, cfg.train.eval_batch)
            task.model.train()
        print(json.dumps(record, default=str), flush=True)


if __name__ == "__main__":
    main()
