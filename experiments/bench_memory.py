"""Peak memory and time of one training step as the number of solver steps grows.

Modes, on the same MLP vector field, data and fixed-step rk4 solver:
  - adjoint           the own adjoint, no curvature capture
  - adjoint+capture   the own adjoint with Kronecker capture on (sample_dt = 0.01)
  - direct            backprop through the solver's operations

For each number of steps (default 10, 40, 160) every mode runs in a fresh subprocess, so the
peak resident memory (ru_maxrss) belongs to that configuration alone; on CUDA the peak
allocated GPU memory is reported instead. "saved_MB" is the size of the tensors autograd
saved for backward (the memory that grows with solver steps when it is not O(1)). Times are
medians over repeats, and every figure is also given as a ratio to the plain adjoint with
the same number of steps.

With ``--solver-loop`` it also prints and saves (key ``"solver_loop"``) the solver-loop table
of :func:`node_ocp.ode.floor.solver_loop_table`: seconds per function evaluation of a training
step of the own adjoint (over torchdiffeq and over the own loop, ``backend="own"``) and of
``torchdiffeq.odeint_adjoint`` against the floor (the field's evaluations and
vector-Jacobian products at the same points, with no solver around them), timed interleaved
in this process, and the losses of seeded training steps with each backend
(``--solver-loop-train-steps``); ``--solver-loop-only`` skips the memory rows.

    python experiments/bench_memory.py [--steps 10 40 160] [--out runs/bench_memory.json]
    python experiments/bench_memory.py --solver-loop-only [--solver-loop-repeats 15]
        [--solver-loop-clock wall|process] [--solver-loop-train-steps 20]
        [--solver-loop-batch 1024] [--solver-loop-extra own_graph own_compiled] [--dry-run]

``--solver-loop-batch`` sets the batch of every case; ``--solver-loop-extra`` adds the own
adjoint with CUDA-graph replay (``own_graph``: rk4 rows on CUDA) or with a compiled field
(``own_compiled``), each with the time of its first step (capture or compilation).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

from node_ocp.io import atomic_write_json

MODES = ("adjoint", "adjoint+capture", "direct")


def _one(mode: str, steps: int, args) -> dict:
    import torch
    from torch import nn

    import node_ocp as no

    device = torch.device(args.device)
    torch.manual_seed(0)
    dim, hidden = args.dim, args.hidden
    field = no.TimeSequential(
        no.ConcatSquashLinear(dim, hidden),
        nn.Softplus(),
        no.ConcatSquashLinear(hidden, hidden),
        nn.Softplus(),
        no.ConcatSquashLinear(hidden, dim),
    )
    gradient = "direct" if mode == "direct" else "adjoint"
    block = no.ODEBlock(
        field, (0.0, 1.0), method="rk4", options={"step_size": 1.0 / steps}, gradient=gradient
    ).to(device)
    opt = torch.optim.SGD(block.parameters(), lr=1e-3)
    x = torch.randn(args.batch, dim, device=device)
    target = torch.randn(args.batch, dim, device=device)
    capture = no.CurvatureCapture(sample_dt=0.01) if mode == "adjoint+capture" else None
    if capture is not None:
        capture.attach(block)

    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    def forward():  # the tensors autograd saves for backward are counted
        saved[0] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block(x)
            loss = ((out - target) ** 2).mean()
        return out, loss

    def step():  # the library's one training step (as node-ocp train and bench take it)
        r = no.train_step(opt, forward, blocks=[block])
        if capture is not None:
            capture.reset()
        return r

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    results = [step() for _ in range(args.repeats)]
    times = [r.seconds for r in results]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "cuda_max_allocated_MB"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_kind = "peak_rss_MB"
    return {
        "mode": mode,
        "steps": steps,
        "time_s": statistics.median(times),
        "peak_MB": peak,
        "peak_kind": peak_kind,
        "saved_MB": saved[0] / 2**20,
        "nfe_forward": results[-1].nfe_forward,
        "nfe_backward": results[-1].nfe_backward,
        "nfe_capture": results[-1].nfe_capture,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, nargs="+", default=[10, 40, 160], help="fixed solver steps")
    p.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--dim", type=int, default=16, help="state dimension (default 16)")
    p.add_argument("--hidden", type=int, default=256, help="hidden width (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda")
    p.add_argument("--out", default="runs/bench_memory.json", help="where to save the JSON")
    p.add_argument(
        "--solver-loop", action="store_true", help="also time the solver loop against its floor"
    )
    p.add_argument(
        "--solver-loop-only", action="store_true", help="only the solver-loop table (no memory)"
    )
    p.add_argument("--solver-loop-repeats", type=int, default=15, help="interleaved repeats")
    p.add_argument(
        "--solver-loop-clock",
        choices=["wall", "process"],
        default="wall",
        help="wall time, or CPU time of the process (steadier on a shared CPU)",
    )
    p.add_argument(
        "--solver-loop-fields", nargs="+", default=["mlp", "conv"], help="fields (mlp, conv)"
    )
    p.add_argument(
        "--solver-loop-methods", nargs="+", default=["dopri5", "rk4"], help="methods (dopri5, rk4)"
    )
    p.add_argument(
        "--solver-loop-batch",
        type=int,
        default=None,
        help="batch size of every solver-loop case (default: each field's own, 256 / 64)",
    )
    p.add_argument(
        "--solver-loop-extra",
        nargs="*",
        default=[],
        choices=["own_graph", "own_compiled"],
        help="extra variants: own_graph (rk4 replayed from CUDA graphs, CUDA only), "
        "own_compiled (torch.compile of the field; its first step includes the compilation)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="parse the arguments, print them and exit (checks a prepared command line)",
    )
    p.add_argument(
        "--solver-loop-train-steps",
        type=int,
        default=20,
        help="seeded training steps with each backend whose losses are compared (0: none)",
    )
    p.add_argument("--child", nargs=2, metavar=("MODE", "STEPS"), help=argparse.SUPPRESS)
    return p


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _memory_rows(args) -> list[dict]:
    """One child process per (steps, mode); prints the memory table and returns its rows."""
    rows = []
    passthrough = [
        f"--batch={args.batch}",
        f"--dim={args.dim}",
        f"--hidden={args.hidden}",
        f"--repeats={args.repeats}",
        f"--device={args.device}",
    ]
    for steps in args.steps:
        for mode in MODES:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, str(steps)]
            cmd += passthrough
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    base = {r["steps"]: r for r in rows if r["mode"] == "adjoint"}
    for r in rows:
        b = base[r["steps"]]
        r["time_ratio"] = r["time_s"] / b["time_s"]
        r["peak_ratio"] = r["peak_MB"] / b["peak_MB"]
    header = (
        f"{'steps':>5} {'mode':<16} {'time s':>8} {'x adj':>6} {'peak MB':>8} {'x adj':>6} "
        f"{'saved MB':>9} {'nfe f/b/cap':>12}"
    )
    print(header)
    for r in rows:
        nfe = f"{r['nfe_forward']}/{r['nfe_backward']}/{r['nfe_capture']}"
        print(
            f"{r['steps']:>5} {r['mode']:<16} {r['time_s']:>8.4f} {r['time_ratio']:>6.2f} "
            f"{r['peak_MB']:>8.1f} {r['peak_ratio']:>6.2f} {r['saved_MB']:>9.2f} {nfe:>12}"
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.dry_run:
        print(json.dumps({k: v for k, v in vars(args).items() if k != "child"}))
        return {}
    if args.child:
        print(json.dumps(_one(args.child[0], int(args.child[1]), args)))
        return {}
    rows = [] if args.solver_loop_only else _memory_rows(args)
    result = {"config": {k: v for k, v in vars(args).items() if k != "child"}, "rows": rows}
    if args.solver_loop or args.solver_loop_only:
        from node_ocp.ode.floor import format_solver_loop, solver_loop_table

        result["solver_loop"] = solver_loop_table(
            fields=args.solver_loop_fields,
            methods=args.solver_loop_methods,
            repeats=args.solver_loop_repeats,
            device=args.device,
            clock=args.solver_loop_clock,
            train_steps=args.solver_loop_train_steps,
            batch=args.solver_loop_batch,
            extra=args.solver_loop_extra,
        )
        print(
            f"solver loop: one training step per NFE, {args.solver_loop_clock} clock, "
            f"interleaved, medians over {args.solver_loop_repeats} repeats"
        )
        print(format_solver_loop(result["solver_loop"]))
    print(f"saved {atomic_write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
