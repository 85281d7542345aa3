"""Why does tuned Adam beat OCNOpt's default on recurrent time-series models? A measured
diagnosis.

One bundled config (an ODE-RNN: GRU cell + ODE block + linear head) is trained twice in one
process from the same initial model on the same batches: Adam at ``--adam-lr`` and OCNOpt's
default (``node_ocp.OCNOpt(model)``). Data, model, loss and evaluation come from the
library's training side (``build_task``, ``Task.outputs_and_loss``, ``Task.evaluate``, the
training loop's ``BatchSampler``) and every step is ``node_ocp.train_step``, so OCNOpt's
closure and trial are exactly those of ``node-ocp train``.

Per step and optimizer: the batch's training loss (before the step), the step's forward and
backward NFE and the part of the forward NFE spent in OCNOpt's trial evaluations (every
call of the batch's forward after the first one of the step), and per parameter group (the
model's top-level children: ``gru``, ``ode``, ``head``) the gradient norm ``‖g_k‖``, the
update norm ``‖δ_k‖`` (``δ = θ_after − θ_before``), ``cos(δ_k, −g_k)`` and the group's share
of the first-order loss decrease ``−g_kᵀδ_k / −gᵀδ``. For OCNOpt also κ (calibration), λ
(damping), α, whether the step adapted (and what ``last_adaptation`` decided) and whether
the planned step was cut to the trust region (``_control.bounded``, where the installed
OCNOpt has it). The validation metric every ``--eval-every`` steps.

Written to ``--out``: ``diagnosis.json`` (everything, per step) and ``diagnosis.md`` (a
short summary: per group medians, OCNOpt/Adam update-norm ratios, NFE growth, the trial NFE
share, final losses).

    OMP_NUM_THREADS=1 python experiments/diagnose_ocnopt.py --out /tmp/diag_spiral
    OMP_NUM_THREADS=1 python experiments/diagnose_ocnopt.py \
        --config configs/ts_japanese_vowels.toml --out /tmp/diag_vowels
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import subprocess
import time
from pathlib import Path

import torch

import node_ocp
from node_ocp.io import atomic_write_json, atomic_write_text
from node_ocp.train import StepFailed, build_task, load_config, train_step
from node_ocp.train.config import OptimizerConfig
from node_ocp.train.loop import BatchSampler
from node_ocp.train.optimizers import build_optimizer, decay_for_task

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("adam", "ocnopt")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=str(ROOT / "configs" / "forecast_spiral.toml"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adam-lr", type=float, default=0.03)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "runs" / "diagnose_ocnopt"))
    p.add_argument(
        "--subspace",
        default="off",
        choices=["off", "auto", "parts", "whole"],
        help="OCNOpt's subspace option (default off: the held step this diagnosis was "
        "written for, the default before subspace='auto'; auto: today's default)",
    )
    return p


# ---------------------------------------------------------------------------- helpers
def _finite(v):
    """``v`` as a float, or None where it is not a finite number (strict JSON)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _groups(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """The trainable parameters by the name of the top-level child that holds them."""
    out: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out.setdefault(name.split(".")[0], []).append(p)
    return out


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _median(values) -> float | None:
    vs = [v for v in values if v is not None]
    return statistics.median(vs) if vs else None


def _mean(values) -> float | None:
    vs = [v for v in values if v is not None]
    return statistics.fmean(vs) if vs else None


def _ratio(a, b) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _commit() -> dict:
    """The git commit of the installed ``node_ocp`` package's repository (where it is one),
    and whether its ``node_ocp`` folder differs from that commit."""
    pkg = Path(node_ocp.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=pkg, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=pkg, capture_output=True, text=True
        )
    except OSError:
        return {"package": str(pkg), "commit": None, "dirty": None}
    if head.returncode != 0:
        return {"package": str(pkg), "commit": None, "dirty": None}
    return {"package": str(pkg), "commit": head.stdout.strip(), "dirty": bool(dirty.stdout)}


# ---------------------------------------------------------------------------- one arm
def _make_optimizer(name: str, config, task, args):
    model = task.model
    if name == "adam":
        table = config.optimizers.get("adam") or OptimizerConfig(kind="adam")
        if table.kind != "adam":
            table = OptimizerConfig(kind="adam")
        return build_optimizer(table, model, lr=args.adam_lr, seed=args.seed)
    # OCNOpt's default: nothing tuned (the seed of its own draws is the run's, as in
    # training), with the trainer's weight-decay rule (the prior on a likelihood loss)
    table = decay_for_task(OptimizerConfig(kind="ocnopt"), task)
    return node_ocp.OCNOpt(
        model,
        seed=args.seed,
        subspace=args.subspace,
        weight_decay=table.decay,
        decay_in_model=table.decay_in_model,
    )


def _ocnopt_state(opt, before_adaptation) -> dict:
    """κ, λ, α, the trust-region cut and the adaptation of the step just taken."""
    control = getattr(opt, "_control", None)
    adapted = opt.last_adaptation is not None and opt.last_adaptation is not before_adaptation
    out = {
        "kappa": _finite(opt.calibration),
        "damping": _finite(opt.damping),
        "alpha": _finite(opt.step_scale),
        "adapted": adapted,
        "adaptation": None,
    }
    if control is not None and hasattr(control, "bounded"):
        out["bounded"] = bool(control.bounded)
    if adapted:
        a = opt.last_adaptation
        out["adaptation"] = {
            "kappa": _finite(a.kappa),
            "alpha": _finite(a.alpha),
            "rho": _finite(a.rho),
            "damping": _finite(a.damping),
            "trials": int(a.trials),
            "reason": a.reason,
        }
    return out


def run_arm(name: str, task, batches: list[torch.Tensor], args) -> dict:
    """Train ``task.model`` with optimizer ``name`` on ``batches``; the per-step record."""
    config = task.config
    torch.manual_seed(args.seed)  # the same global stream for both arms
    opt = _make_optimizer(name, config, task, args)
    groups = _groups(task.model)
    blocks = task.blocks
    metric = task.metric
    eval_chunk = config.train.eval_batch
    grads: dict[str, list[torch.Tensor]] = {}

    def snapshot(_opt, _args, _kwargs):  # the gradient the step acts on
        grads.clear()
        for g, ps in groups.items():
            grads[g] = [
                torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in ps
            ]

    hook = opt.register_step_pre_hook(snapshot)
    evals = [{"step": 0, **task.evaluate(task.data.val, eval_chunk)}]
    steps: list[dict] = []
    failed = None
    t0 = time.perf_counter()
    for i, idx in enumerate(batches):
        batch = task.data.train.batch(idx)
        calls: list[int] = []  # forward NFE of each evaluation of the batch in this step

        def forward(batch=batch, calls=calls):
            mark = sum(b.nfe_forward for b in blocks)
            out = task.outputs_and_loss(batch)
            calls.append(sum(b.nfe_forward for b in blocks) - mark)
            return out

        before = {g: [p.detach().clone() for p in ps] for g, ps in groups.items()}
        adaptation = getattr(opt, "last_adaptation", None)
        grads.clear()
        try:
            result = train_step(
                opt,
                forward,
                blocks=blocks,
                likelihood=task.likelihood,
                outputs_determine_loss=task.outputs_determine_loss,
            )
        except StepFailed as exc:
            failed = f"step {i}: {exc.reason}"
            break
        if not grads:  # the pre-hook did not run: the gradients are still on the parameters
            snapshot(None, None, None)
        record: dict = {
            "step": i,
            "loss": _finite(result.loss),
            "kind": result.kind,
            "seconds": result.seconds,
            "nfe_forward": result.nfe_forward,
            "nfe_backward": result.nfe_backward,
            "nfe_capture": result.nfe_capture,
            "nfe_own_forward": calls[0] if calls else 0,
            "nfe_trial": sum(calls[1:]),
            "trial_calls": max(len(calls) - 1, 0),
        }
        per: dict[str, dict] = {}
        total = 0.0
        for g, ps in groups.items():
            delta = [p.detach() - b for p, b in zip(ps, before[g])]
            gg = grads[g]
            gn = _dot(gg, gg) ** 0.5
            dn = _dot(delta, delta) ** 0.5
            dec = -_dot(gg, delta)  # first-order decrease −g_kᵀδ_k
            total += dec
            cos = dec / (gn * dn) if gn > 0 and dn > 0 else float("nan")
            per[g] = {"grad_norm": gn, "update_norm": dn, "cosine": cos, "decrease": dec}
        for g in per:
            per[g]["share"] = per[g]["decrease"] / total if total != 0 else float("nan")
            per[g] = {k: _finite(v) for k, v in per[g].items()}
        record["groups"] = per
        record["decrease"] = _finite(total)  # −gᵀδ, the first-order predicted decrease
        if isinstance(opt, node_ocp.OCNOpt):
            record["ocnopt"] = _ocnopt_state(opt, adaptation)
        steps.append(record)
        done = i + 1
        if done % args.eval_every == 0 or done == len(batches):
            evals.append({"step": done, **task.evaluate(task.data.val, eval_chunk)})
            if evals[-1][metric] is None or not math.isfinite(evals[-1][metric]):
                failed = f"step {done}: validation {metric} is {evals[-1][metric]}"
                break
    hook.remove()
    return {
        "optimizer": name,
        "repr": repr(opt).splitlines()[0],
        "metric": metric,
        "seconds": time.perf_counter() - t0,
        "failed": failed,
        "steps": steps,
        "evals": [{k: _finite(v) if k != "step" else v for k, v in e.items()} for e in evals],
    }


# ---------------------------------------------------------------------------- summary
def summarize(arms: dict[str, dict], groups: list[str], metric: str) -> dict:
    out: dict = {"groups": {}, "optimizers": {}}
    for g in groups:
        row: dict = {}
        for name, arm in arms.items():
            recs = [s["groups"][g] for s in arm["steps"]]
            dec_sum = sum(r["decrease"] for r in recs if r["decrease"] is not None)
            tot_sum = sum(s["decrease"] for s in arm["steps"] if s["decrease"] is not None)
            row[name] = {
                "grad_norm": _median(r["grad_norm"] for r in recs),
                "update_norm": _median(r["update_norm"] for r in recs),
                "cosine": _median(r["cosine"] for r in recs),
                "share": _median(r["share"] for r in recs),
                "share_of_sum": _finite(dec_sum / tot_sum) if tot_sum else None,
            }
        a, o = row.get("adam"), row.get("ocnopt")
        if a and o:
            row["update_ratio"] = _ratio(o["update_norm"], a["update_norm"])
            pairs = zip(arms["ocnopt"]["steps"], arms["adam"]["steps"])
            row["update_ratio_per_step"] = _median(
                _ratio(s["groups"][g]["update_norm"], t["groups"][g]["update_norm"])
                for s, t in pairs
            )
        out["groups"][g] = row
    for name, arm in arms.items():
        st = arm["steps"]
        nfe = [s["nfe_forward"] + s["nfe_backward"] for s in st]
        first, last = _mean(nfe[:10]), _mean(nfe[-10:])
        trial = sum(s["nfe_trial"] for s in st)
        evals = [e for e in arm["evals"] if e.get(metric) is not None]
        o: dict = {
            "steps": len(st),
            "failed": arm["failed"],
            "seconds": arm["seconds"],
            "nfe_first10": first,
            "nfe_last10": last,
            "nfe_growth": _ratio(last, first),
            "nfe_forward_mean": _mean(s["nfe_forward"] for s in st),
            "nfe_backward_mean": _mean(s["nfe_backward"] for s in st),
            "nfe_capture_mean": _mean(s["nfe_capture"] for s in st),
            "trial_nfe_share": _ratio(trial, sum(nfe)),
            "trial_nfe_share_of_forward": _ratio(trial, sum(s["nfe_forward"] for s in st)),
            "final_train_loss": st[-1]["loss"] if st else None,
            "train_loss_last10": _mean(s["loss"] for s in st[-10:]),
            "final_val": evals[-1][metric] if evals else None,
            "val_curve": [(e["step"], e[metric]) for e in evals],
        }
        if st and "ocnopt" in st[0]:
            oc = [s["ocnopt"] for s in st]
            ad = [s["adaptation"] for s in oc if s["adapted"]]
            reasons: dict[str, int] = {}
            for a in ad:
                reasons[a["reason"]] = reasons.get(a["reason"], 0) + 1
            o["adaptations"] = len(ad)
            o["reasons"] = reasons
            o["trials_mean"] = _mean(a["trials"] for a in ad)
            o["rho_median"] = _median(a["rho"] for a in ad)
            o["kappa_first_last"] = (oc[0]["kappa"], oc[-1]["kappa"])
            o["kappa_median"] = _median(s["kappa"] for s in oc)
            o["damping_first_last"] = (oc[0]["damping"], oc[-1]["damping"])
            o["alpha_median"] = _median(s["alpha"] for s in oc)
            if "bounded" in oc[0]:
                o["bounded_share"] = sum(s["bounded"] for s in oc) / len(oc)
            trial_steps = [s for s in st if s["trial_calls"]]
            o["trial_nfe_share_on_adapt_steps"] = _ratio(
                sum(s["nfe_trial"] for s in trial_steps),
                sum(s["nfe_forward"] + s["nfe_backward"] for s in trial_steps),
            )
        out["optimizers"][name] = o
    return out


def _f(v, fmt: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    return format(v, fmt)


def markdown(result: dict) -> str:
    s, metric = result["summary"], result["metric"]
    opts = s["optimizers"]
    lines = [
        f"### {Path(result['config']).name}: Adam (lr {result['adam_lr']:g}) vs OCNOpt default",
        "",
        f"{result['steps_requested']} steps, seed {result['seed']}, batch "
        f"{result['batch_size']}; node_ocp at {result['source'].get('commit')}"
        + (" (uncommitted changes in node_ocp)" if result["source"].get("dirty") else "")
        + f"; {result['device']}, {result['threads']} thread(s).",
        "",
        "Per parameter group, medians over steps (share: −g_kᵀδ_k / −gᵀδ, the group's part "
        "of the first-order loss decrease; 'of sum': Σ_steps −g_kᵀδ_k / Σ_steps −gᵀδ):",
        "",
        "| group | ‖g‖ Adam | ‖g‖ OCNOpt | ‖δ‖ Adam | ‖δ‖ OCNOpt | ‖δ‖ OCNOpt/Adam "
        "(per-step median) | cos(δ,−g) Adam | cos OCNOpt | share Adam (of sum) "
        "| share OCNOpt (of sum) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g, row in s["groups"].items():
        a, o = row["adam"], row["ocnopt"]
        lines.append(
            f"| {g} | {_f(a['grad_norm'])} | {_f(o['grad_norm'])} | {_f(a['update_norm'])} | "
            f"{_f(o['update_norm'])} | {_f(row['update_ratio'])} "
            f"({_f(row['update_ratio_per_step'])}) | {_f(a['cosine'], '.2f')} | "
            f"{_f(o['cosine'], '.2f')} | {_f(a['share'], '.2f')} ({_f(a['share_of_sum'], '.2f')})"
            f" | {_f(o['share'], '.2f')} ({_f(o['share_of_sum'], '.2f')}) |"
        )
    lines += [
        "",
        f"| optimizer | steps | wall s | NFE f+b first 10 → last 10 (growth) | NFE f / b / "
        f"capture per step | trial share of NFE | final train loss (mean last 10) | "
        f"val {metric} start → final |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, o in opts.items():
        curve = o["val_curve"]
        start = curve[0][1] if curve else None
        lines.append(
            f"| {name} | {o['steps']}{' (failed)' if o['failed'] else ''} | "
            f"{_f(o['seconds'], '.0f')} | {_f(o['nfe_first10'], '.0f')} → "
            f"{_f(o['nfe_last10'], '.0f')} ({_f(o['nfe_growth'], '.2f')}×) | "
            f"{_f(o['nfe_forward_mean'], '.0f')} / {_f(o['nfe_backward_mean'], '.0f')} / "
            f"{_f(o['nfe_capture_mean'], '.0f')} | {_f(o['trial_nfe_share'], '.1%')} | "
            f"{_f(o['final_train_loss'], '.4g')} ({_f(o['train_loss_last10'], '.4g')}) | "
            f"{_f(start, '.4g')} → {_f(o['final_val'], '.4g')} |"
        )
    o = opts.get("ocnopt")
    if o:
        kf, kl = o["kappa_first_last"]
        df, dl = o["damping_first_last"]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(o["reasons"].items())) or "none"
        bounded = (
            f"{_f(o['bounded_share'], '.0%')} of steps"
            if "bounded_share" in o
            else "not reported by this OCNOpt"
        )
        lines += [
            "",
            f"OCNOpt: {o['adaptations']} adaptations ({reasons}; mean trials "
            f"{_f(o['trials_mean'], '.2f')}, median ρ {_f(o['rho_median'], '.2f')}); κ "
            f"{_f(kf)} → {_f(kl)} (median {_f(o['kappa_median'])}); λ {_f(df)} → {_f(dl)}; "
            f"median α {_f(o['alpha_median'])}; cut to the trust region: {bounded}; trial "
            f"share of forward NFE {_f(o['trial_nfe_share_of_forward'], '.1%')}, of all NFE "
            f"on adapting steps {_f(o['trial_nfe_share_on_adapt_steps'], '.1%')}.",
        ]
    for name, o in opts.items():
        if o["failed"]:
            lines.append(f"\n{name} stopped: {o['failed']}")
    lines.append(
        "\nval "
        + metric
        + ": "
        + "; ".join(
            f"{name} " + " ".join(f"{st}:{_f(v, '.4g')}" for st, v in o["val_curve"])
            for name, o in opts.items()
        )
    )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    config = load_config(args.config)
    torch.manual_seed(args.seed)
    task = build_task(config, "cpu")
    initial = copy.deepcopy(task.model)  # before any optimizer touches the model
    sampler = BatchSampler(len(task.data.train), config.train.batch_size, args.seed)
    batches = [sampler.next() for _ in range(args.steps)]
    groups = list(_groups(task.model))
    arms: dict[str, dict] = {}
    for name in OPTIMIZERS:
        model = copy.deepcopy(initial)
        arms[name] = run_arm(name, dataclasses.replace(task, model=model), batches, args)
    result = {
        "config": str(args.config),
        "steps_requested": args.steps,
        "seed": args.seed,
        "adam_lr": args.adam_lr,
        "batch_size": config.train.batch_size,
        "metric": task.metric,
        "groups": groups,
        "group_sizes": {g: sum(p.numel() for p in ps) for g, ps in _groups(initial).items()},
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "source": _commit(),
        "optimizers": arms,
    }
    result["summary"] = summarize(arms, groups, task.metric)
    text = markdown(result)
    print(text)
    atomic_write_json(out / "diagnosis.json", result)
    atomic_write_text(out / "diagnosis.md", text)
    return result


if __name__ == "__main__":
    main()
