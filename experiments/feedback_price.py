"""The price of OCNOpt's feedback policies: the paper's third experiment.

Per task, in one ``node-ocp bench`` run (same model state, steps interleaved): Adam,
OCNOpt open-loop, OCNOpt with ``feedback = "gauss_newton"`` (every step a feedback sweep) and
the standard-EKFAC baseline (``time_joint = false``, ``gradient = "direct"``: ordinary K-FAC
hooks on the field's layers, one statistic per solver evaluation, backprop through the
solver). Reported: the amortised step time, function evaluations per step and peak memory
as ratios to Adam, and OCNOpt against the standard EKFAC. Printed, and saved as
``summary.json``/``summary.md`` in ``--out``. On a CPU the peak memory is the process's peak
resident memory, which includes the interpreter and torch and barely separates optimizers;
on CUDA it is the allocator's peak.

On the deep discrete networks (``mlp_digits``, ``cnn_digits``) the feedback arms of the other
factor sources are timed too (``TASK_ARMS``), and ``--arm NAME KEY=VALUE ...`` adds an arm of
any OCNOpt options; every arm's step time is also given against OCNOpt open-loop.

    python experiments/feedback_price.py
    python experiments/feedback_price.py --tasks spirals --steps 21 --no-memory
    python experiments/feedback_price.py --tasks mlp_digits cnn_digits --no-memory
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feedback_ablation import ROOT, TASKS, parse_arm, write_config  # noqa: E402

from node_ocp.io import atomic_write_json, atomic_write_text  # noqa: E402
from node_ocp.train.bench import bench  # noqa: E402
from node_ocp.train.config import load_config  # noqa: E402

ARMS = {
    "adam": {"kind": "adam"},
    "ocnopt": {"kind": "ocnopt"},
    "ocnopt-feedback": {"kind": "ocnopt", "feedback": "gauss_newton"},
    "ekfac-direct": {"kind": "ocnopt", "time_joint": False, "gradient": "direct"},
}
_SOURCES = {
    "ocnopt-feedback-sampled": {"kind": "ocnopt", "feedback": "gauss_newton", "factors": "sampled"},
    "ocnopt-feedback-exact": {"kind": "ocnopt", "feedback": "gauss_newton", "factors": "exact"},
}
#: arms timed beside ARMS on some tasks
TASK_ARMS = {"mlp_digits": _SOURCES, "cnn_digits": _SOURCES}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--steps", type=int, default=None, help="timed steps per optimizer")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "runs" / "feedback_price"))
    p.add_argument(
        "--arm",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME KEY=VALUE",
        help="time one more arm: its [optimizers.NAME] keys (kind defaults to ocnopt)",
    )
    return p


def _x(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.2f}"


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    rows = []
    extra = dict(parse_arm(words) for words in args.arm)
    for task in args.tasks:
        arms = {**ARMS, **TASK_ARMS.get(task, {}), **extra}
        cfg = write_config(task, out / task / "config.toml", 60.0, arms)
        res = bench(
            load_config(cfg),
            steps=args.steps,
            device=args.device,
            memory=not args.no_memory,
            out=out / task / "bench.json",
        )
        o = res["optimizers"]
        fb, ol = o["ocnopt-feedback"], o["ocnopt"]
        rows.append(
            {
                "task": task,
                "device": res["device"],
                "amortized_s": {k: v["amortized_s"] for k, v in o.items()},
                "amortized_x_adam": {k: v["amortized_ratio"] for k, v in o.items()},
                "nfe_x_adam": {k: v["nfe_ratio"] for k, v in o.items()},
                "memory_x_adam": {k: v["memory_ratio"] for k, v in o.items()},
                "feedback_x_open_loop": fb["amortized_s"] / ol["amortized_s"],
                "open_loop_x_ekfac": ol["amortized_s"] / o["ekfac-direct"]["amortized_s"],
                "feedback_x_ekfac": fb["amortized_s"] / o["ekfac-direct"]["amortized_s"],
                "feedback_nfe": (fb["nfe_forward"], fb["nfe_backward"]),
                "open_loop_nfe": (ol["nfe_forward"], ol["nfe_backward"]),
                "x_open_loop": {k: v["amortized_s"] / ol["amortized_s"] for k, v in o.items()},
            }
        )
    lines = [
        "| task | OCNOpt × Adam | OCNOpt+feedback × Adam | EKFAC-direct × Adam | feedback × "
        "open-loop | OCNOpt × EKFAC (open / feedback) | NFE f/b open-loop | NFE f/b feedback "
        "| memory × Adam (open / feedback / EKFAC) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, m = r["amortized_x_adam"], r["memory_x_adam"]
        nf, no = r["feedback_nfe"], r["open_loop_nfe"]
        lines.append(
            f"| {r['task']} | {_x(a['ocnopt'])} | {_x(a['ocnopt-feedback'])} | "
            f"{_x(a['ekfac-direct'])} | {_x(r['feedback_x_open_loop'])} | "
            f"{_x(r['open_loop_x_ekfac'])} / {_x(r['feedback_x_ekfac'])} | "
            f"{no[0]:.0f}/{no[1]:.0f} | {nf[0]:.0f}/{nf[1]:.0f} | {_x(m['ocnopt'])} / "
            f"{_x(m['ocnopt-feedback'])} / {_x(m['ekfac-direct'])} |"
        )
    lines += [
        "",
        "| task | arm | amortized s/step | × Adam | × OCNOpt open-loop |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        for arm, sec in r["amortized_s"].items():
            lines.append(
                f"| {r['task']} | {arm} | {sec:.4g} | {_x(r['amortized_x_adam'][arm])} | "
                f"{_x(r['x_open_loop'][arm])} |"
            )
    text = "\n".join(lines)
    print(text)
    result = {"tasks": rows}
    atomic_write_json(out / "summary.json", result)
    atomic_write_text(out / "summary.md", text + "\n")
    return result


if __name__ == "__main__":
    main()
