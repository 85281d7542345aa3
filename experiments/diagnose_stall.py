"""Where does OCNOpt's step stall? One ``node-ocp`` config trained with its ``ocnopt`` table
(optionally another weight decay), printing per logged step: the batch's training loss, λ,
κ, α, the relative size of the update ``‖δ‖/‖θ‖``, ``‖θ‖``, the last adaptation (trials,
ρ, why a trial was rejected), the step's NFE and the own adjoint's reconstruction error and
splits (``--anchor``). The steps are the trainer's own
(:func:`node_ocp.train.train_step` with the task's ``training_terms`` and the loop's
sampler), so the trials and their random draws are those of ``node-ocp train``.

    OMP_NUM_THREADS=1 python experiments/diagnose_stall.py --config configs/cnf_digits.toml \
        --seed 1 --weight-decay 0.000695 --decay-in-model --steps 303 --from 282
    # bench_issue21.md §23: kappa goes 1.1 -> 1.1e7 over steps 295-297 and the step freezes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import torch

from node_ocp.train import build_task, load_config, train_step
from node_ocp.train.loop import BatchSampler
from node_ocp.train.optimizers import build_optimizer, decay_for_task


def trainer_steps(task, opt, batch_size: int, seed: int, steps: int, blocks=None):
    """The trainer's own steps of ``opt`` on ``task`` (:func:`node_ocp.train.train_step` with
    the task's ``training_terms``, likelihood and ``outputs_determine_loss``, and the loop's
    sampler): yields ``(step, result, parameters before the step)``. ``blocks``: the ODE
    blocks whose NFE the results count (default: every ``ODEBlock`` of the model)."""
    sampler = BatchSampler(len(task.data.train), batch_size, seed)
    params = list(task.model.parameters())
    if blocks is None:
        blocks = [m for m in task.model.modules() if type(m).__name__ == "ODEBlock"]
    for step in range(steps):
        batch = task.data.train.batch(sampler.next())
        before = [q.detach().clone() for q in params]
        result = train_step(
            opt,
            lambda b=batch: task.training_terms(b),
            blocks=blocks,
            likelihood=task.likelihood,
            outputs_determine_loss=task.outputs_determine_loss,
        )
        yield step, result, before


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/cnf_digits.toml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="overrides the table's (0: none; unset, OCNOpt's default rule: 1/N on an NLL loss)",
    )
    p.add_argument("--decay-in-model", action="store_true", help="OCNOpt's decay_in_model = true")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--from", dest="start", type=int, default=0, help="log every step from here")
    p.add_argument("--every", type=int, default=20, help="log every this many steps before")
    p.add_argument(
        "--anchor",
        default=None,
        help="the blocks' adjoint_anchor (default: the config's; 'none': no re-anchoring)",
    )
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    torch.manual_seed(a.seed)
    task = build_task(cfg, "cpu")
    table = cfg.optimizer("ocnopt")
    if a.weight_decay is not None:
        table = dataclasses.replace(table, weight_decay=a.weight_decay)
    if a.decay_in_model:
        table = dataclasses.replace(table, decay_in_model=True)
    table = decay_for_task(table, task)  # the trainer's rule: OCNOpt's prior on an NLL
    opt = build_optimizer(table, task.model, seed=a.seed)
    params = list(task.model.parameters())
    blocks = [m for m in task.model.modules() if type(m).__name__ == "ODEBlock"]
    if a.anchor is not None:  # else the config's setting
        for b in blocks:
            b.adjoint_anchor = None if a.anchor.lower() == "none" else float(a.anchor)
    for step, res, before in trainer_steps(task, opt, cfg.train.batch_size, a.seed, a.steps):
        if step >= a.start or step % a.every == 0 or step == a.steps - 1:
            with torch.no_grad():
                moved = math.sqrt(sum(float(((q - b) ** 2).sum()) for q, b in zip(params, before)))
                theta = math.sqrt(sum(float((q**2).sum()) for q in params))
            record = dict(
                step=step,
                loss=float(res.loss),
                damping=opt.damping,
                kappa=opt.calibration,
                alpha=opt._stepper.control.alpha,
                moved=moved / theta,
                theta=theta,
                nfe=f"{res.nfe_forward}/{res.nfe_backward}",
                splits=res.splits,
                reconstruction=round(res.reconstruction, 3),
                adaptation=str(opt.last_adaptation),
            )
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
