"""The ``node-ocp`` command line: ``train``, ``compare``, ``bench`` and ``plot``.

Errors a user can fix (a missing or malformed config, unknown names, an unwritable output
folder, ``--resume`` without a checkpoint, ``--device cuda`` without a GPU) print one line
``node-ocp: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .train.config import DEVICES

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks; every option's help states its default."""


class _Parser(argparse.ArgumentParser):
    """A usage error is one line like every other error (no usage block): ``node-ocp:
    error: argument --max-steps: received 0; accepted: ... (see node-ocp train --help)``,
    exit status 2."""

    commands: tuple[str, ...] = ()

    def error(self, message: str):
        if self.commands and message.endswith("required: COMMAND"):
            message += f"; accepted: one of {', '.join(self.commands)}"
        self.exit(EXIT_USAGE, f"node-ocp: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    """An argparse type: an int >= ``low``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"received {text!r}; accepted: an int >= {low}"
            ) from None
        if v < low:
            raise argparse.ArgumentTypeError(f"received {v}; accepted: an int >= {low}")
        return v

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"received {text!r}; accepted: a number >= 0") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"received {text}; accepted: a number >= 0")
    return v


def _patience(text: str) -> int | str:
    """``--patience``: an int >= 1, or ``none`` (no early stopping, whatever the config says)."""
    if text.strip().lower() == "none":
        return "none"
    accepted = (
        "accepted: an int >= 1 (evaluations without improvement before the run stops) or 'none'"
    )
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"received {text!r}; {accepted}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"received {v}; {accepted}")
    return v


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _run_options(p: argparse.ArgumentParser, per_run: str = "") -> None:
    """Options shared by train and compare: device and budgets."""
    p.add_argument(
        "--device",
        choices=DEVICES,
        default=None,
        help="device (default: [train].device of the config)",
    )
    p.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        help=f"step budget{per_run} (default: [train].steps)",
    )
    p.add_argument(
        "--max-time",
        type=_nonneg_float,
        default=None,
        help=f"training wall-clock budget in seconds{per_run}, evaluation excluded; 0: none "
        "(default: [train].max_seconds)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="node-ocp",
        description="Train Neural ODEs, CNFs and time-series ODE models with OCNOpt (a "
        "second-order optimal-control optimizer) or first-order adjoint training, and "
        "compare them.",
        formatter_class=_Formatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train one model from a config",
        formatter_class=_Formatter,
        description="Train one model as CONFIG says; writes metrics.jsonl, checkpoint.pt "
        "(atomically, every [train].checkpoint_every steps), best.pt (the model at the best "
        "validation metric so far, with each checkpoint), summary.json (the final and the "
        "best model's figures) and config.json to --out.",
    )
    t.add_argument("config", metavar="CONFIG", help="a TOML config (see configs/)")
    t.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    t.add_argument("--seed", type=int, default=None, help="seed (default: [train].seed)")
    _run_options(t)
    t.add_argument(
        "--patience",
        type=_patience,
        default=None,
        metavar="N",
        help="early stopping: end the run after N evaluations without improvement of the "
        "validation metric; 'none': off (default: [train].patience, none)",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue exactly from the checkpoint in --out, with its optimizer, lr and seed "
        "unless given (default: off)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (default: off: a folder holding a run is refused)",
    )
    t.add_argument(
        "--optimizer",
        default=None,
        help="name of an [optimizers.NAME] table (default: [train].optimizer)",
    )
    t.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: lr of the optimizer's table)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar (default: off)")

    c = sub.add_parser(
        "compare",
        help="compare optimizers on one config and write a report",
        formatter_class=_Formatter,
        description="Train the same model, data, solver and tolerances with each optimizer "
        "(and each learning rate of its lr_grid with --lr-grid) for --seeds seeds, one run "
        "after another, then write report.md, figures and comparison.json to --out.",
    )
    c.add_argument("config", metavar="CONFIG", help="a TOML config (see configs/)")
    c.add_argument(
        "--optimizers",
        type=_names,
        default=None,
        help="comma-separated [optimizers.NAME] tables (default: all of the config)",
    )
    c.add_argument(
        "--seeds",
        type=_positive_int,
        default=3,
        help="seeds per optimizer and learning rate: [train].seed, +1, ... (default: 3)",
    )
    c.add_argument(
        "--lr-grid",
        action="store_true",
        help="run every lr of each optimizer's lr_grid and report each at its best "
        "(default: off: each optimizer at its lr)",
    )
    c.add_argument(
        "--out", default=None, help="comparison folder (default: runs/compare-<config name>)"
    )
    _run_options(c, " per run")
    c.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already finished in --out and run only the others (default: off)",
    )
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the comparison already in --out (default: off: refused)",
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar (default: off)")

    b = sub.add_parser(
        "bench",
        help="per-iteration time, NFE and peak memory per optimizer, as ratios to Adam",
        formatter_class=_Formatter,
        description="Time each optimizer's steps on the same model state (interleaved; "
        "OCNOpt's refresh step separately and amortized), count function evaluations, and "
        "measure each step's memory (optimizer state + transient peak); print and save JSON.",
    )
    b.add_argument("config", metavar="CONFIG", help="a TOML config (see configs/)")
    b.add_argument(
        "--optimizers",
        type=_names,
        default=None,
        help="comma-separated optimizer tables (default: all of the config)",
    )
    b.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="timed steps per optimizer (default: 2 refresh periods + 1, >= 21)",
    )
    b.add_argument(
        "--device",
        choices=DEVICES,
        default=None,
        help="device (default: [train].device)",
    )
    b.add_argument(
        "--no-memory", action="store_true", help="skip the memory measure (default: off)"
    )
    b.add_argument(
        "--out", default=None, help="JSON output (default: runs/bench-<config name>.json)"
    )
    b.add_argument(
        "--solver-loop",
        type=_nonneg_int,
        default=15,
        metavar="REPEATS",
        help="repeats of the solver-loop table (own adjoint vs floor vs torchdiffeq per NFE; "
        "0: skip it)",
    )
    b.add_argument(
        "--solver-loop-train-steps",
        type=_nonneg_int,
        default=20,
        metavar="STEPS",
        help="seeded training steps of each solver-loop case with each backend (torchdiffeq, "
        "own) whose losses are compared (0: none)",
    )
    b.add_argument(
        "--force",
        action="store_true",
        help="replace --out even when it is not an earlier bench output (default: off)",
    )

    pl = sub.add_parser(
        "plot",
        help="redraw the figures of a finished run or comparison",
        formatter_class=_Formatter,
        description="RUN_DIR is a comparison folder (with comparison.json: report and "
        "figures are rewritten) or a train run folder (with metrics.jsonl).",
    )
    pl.add_argument("run_dir", metavar="RUN_DIR", help="a run or comparison folder")
    p.commands = tuple(sub.choices)
    return p


def _best_words(summary: dict) -> str:
    """``; best val ... at step ..., its test ...`` (and an early stop) for the run line."""
    if summary.get("best_step") is None:
        return ""
    m = summary["metric"]
    words = (
        f"; best val {m} {summary['best_val']:.4g} at step {summary['best_step']} (best.pt), "
        f"its test {m} {summary['best_test_metric']:.4g}"
    )
    if summary.get("stopped_early"):
        words += f"; stopped early at step {summary['early_stop_step']}"
    return words


def _config(path):
    from .train.config import load_config

    return load_config(path)


def _stem(path) -> str:
    return Path(path).stem


def run(args) -> int:
    from .train import RunOptions, train
    from .train.loop import EXIT_DIVERGED

    if args.command == "train":
        cfg = _config(args.config)
        out = args.out or f"runs/{_stem(args.config)}"
        summary = train(
            cfg,
            out,
            RunOptions(
                optimizer=args.optimizer,
                lr=args.lr,
                seed=args.seed,
                device=args.device,
                max_steps=args.max_steps,
                max_time=args.max_time,
                patience=args.patience,
                resume=args.resume,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            ),
        )
        if _rank() != 0:
            return EXIT_DIVERGED if summary["diverged"] else 0
        m = summary["metric"]
        state = "diverged" if summary["diverged"] else "done"
        print(
            f"{state}: {summary['steps']} steps, {summary['train_seconds']:.1f}s training; "
            f"val {m} {summary['final_val']:.4g}, test {m} {summary['test_metric']:.4g}"
            + _best_words(summary)
            + f"; run folder {out}"
        )
        if summary["diverged"]:
            print(f"diverged: {summary.get('diverged_reason')}; exit status {EXIT_DIVERGED}")
            return EXIT_DIVERGED
        if cfg.task.kind == "forecast":  # a fit is seen, not only scored
            from .train.forecast_figure import draw_forecast

            if draw_forecast(Path(out) / "forecast.png", {summary["optimizer"]: Path(out)}):
                print(f"figure: {Path(out) / 'forecast.png'}")
        if cfg.task.kind == "image_density":  # samples seen, not only scored
            from .train.sample_figure import draw_samples

            if draw_samples(Path(out) / "samples.png", {summary["optimizer"]: Path(out)}):
                print(f"figure: {Path(out) / 'samples.png'}")
        return 0
    if args.command == "compare":
        from .train.compare import compare
        from .train.loop import RunError

        cfg = _config(args.config)
        out = args.out or f"runs/compare-{_stem(args.config)}"
        names = args.optimizers if args.optimizers is not None else list(cfg.optimizers)
        if not names:
            raise RunError("--optimizers: received nothing; accepted: names like adam,ocnopt")
        result = compare(
            cfg,
            out,
            names,
            seeds=args.seeds,
            lr_grid=args.lr_grid,
            device=args.device,
            max_steps=args.max_steps,
            max_time=args.max_time,
            progress=not args.no_progress,
            resume=args.resume,
            overwrite=args.overwrite,
        )
        if _rank() != 0:
            return 0
        from .train.report import format_summary

        print(format_summary(result))
        print(f"report: {Path(out) / 'report.md'}")
        return 0
    if args.command == "bench":
        from . import dist
        from .train.bench import bench
        from .train.loop import RunError

        if dist.launched_by_torchrun():
            raise RunError(
                "bench: received a torchrun launch; accepted: one process (bench times "
                "optimizers side by side in one process; use train/compare under torchrun)"
            )

        cfg = _config(args.config)
        bench(
            cfg,
            args.optimizers,
            steps=args.steps,
            device=args.device,
            memory=not args.no_memory,
            out=args.out or f"runs/bench-{_stem(args.config)}.json",
            force=args.force,
            solver_loop=args.solver_loop,
            solver_loop_train_steps=args.solver_loop_train_steps,
        )
        return 0
    from .train.loop import RunError
    from .train.report import plot

    d = Path(args.run_dir)
    if not d.is_dir():
        raise RunError(
            f"RUN_DIR: {str(d)!r} is not a folder; accepted: a run or comparison "
            "folder written by node-ocp train/compare"
        )
    for name in plot(d):
        print(d / name)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``node-ocp`` and ``python -m node_ocp``; returns the exit status."""
    from .train.config import ConfigError
    from .train.loop import RunError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named with the command whose options were expected
        parser.exit(
            EXIT_USAGE,
            f"node-ocp: error: unrecognized arguments: {' '.join(extra)}; accepted: the "
            f"options of node-ocp {args.command} (see node-ocp {args.command} --help)\n",
        )
    try:
        return run(args)
    except (ConfigError, RunError) as exc:
        if _rank() != 0:
            return EXIT_USAGE
        print(f"node-ocp: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, ImportError) as exc:
        # the library's own argument checks (they name the argument, what was received and
        # what is accepted) and missing optional packages; NODE_OCP_TRACEBACK=1 re-raises
        if os.environ.get("NODE_OCP_TRACEBACK"):
            raise
        if _rank() == 0:
            from ._errors import first_line

            print(f"node-ocp: error: {first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "node-ocp: interrupted; checkpoints already written are kept (train --resume "
            "continues)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # compare ends as a SIGTERM would, after its child stopped
        if not (isinstance(exc.code, int) and exc.code > 128):
            raise
        import signal

        try:
            name = signal.Signals(exc.code - 128).name
        except ValueError:
            name = f"signal {exc.code - 128}"
        print(
            f"node-ocp: stopped by {name}; the running child was stopped and waited for, "
            "finished runs and checkpoints are kept (--resume continues)",
            file=sys.stderr,
        )
        return exc.code
    finally:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()


def _rank() -> int:
    from . import dist

    return dist.rank()


if __name__ == "__main__":
    sys.exit(main())
