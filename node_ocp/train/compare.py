"""Optimizer comparisons: the same task under several optimizers, learning rates and seeds.

Every run is a ``node-ocp train`` of the same config in its own process (so each run's peak
memory is its own), one after another; under ``torchrun`` the runs happen in-process instead,
each data-parallel over all processes. The comparison folder holds::

    runs/NAME/lr<LR>/seed<S>/   each run's folder (metrics.jsonl, summary.json, checkpoint.pt)
    comparison.json             every run's summary and the aggregate per optimizer
    report.md, *.png            the report (see node_ocp.train.report)

Aggregation: for every optimizer the learning rate with the best mean final *validation*
metric over seeds is chosen (a diverged run counts as the worst), and test metrics are
reported at that learning rate per seed and as means with 95% t intervals: those of the
final model (``test``, the figure the verdicts use) and, beside them, those of each run's
best-validation model, its ``best.pt`` (``best_test``; None for runs written before it).
The target of time-to-target is ``[train].target`` or else the median over seeds of the
final validation metric of the best first-order baseline (the non-OCNOpt optimizer with
the best mean final validation metric; the standard-EKFAC table, time_joint = false, counts
as a baseline), which that baseline reaches in about half of its seeds: no optimizer reaches it by
construction. Each optimizer's time to it is the median over seeds (with a
bootstrap interval) of the first training wall-clock (evaluation excluded) at which its
validation metric reaches it, a seed that never does counting as infinitely late.

Verdicts (:func:`node_ocp.train.intervals.verdict`): every time-joint OCNOpt table (the
method under test, :meth:`~node_ocp.train.adapters.OptimizerAdapter.judged`) against the best
baseline, then against every other optimizer; without such a table, every optimizer against
the best baseline. Seeds are paired: the test-metric difference with its 95% interval (a win
or loss only when the interval excludes 0) and the geometric-mean time-to-target ratio.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from .. import dist
from ..io import atomic_write_json
from . import intervals
from .adapters import adapter_for
from .config import ConfigError, RunConfig, lr_label
from .costs import ratio
from .loop import CONFIG, SUMMARY, RunError, RunOptions, prepare_out_dir, read_metrics, train
from .report import COMPARISON, write_report


def run_dir(out: Path, name: str, lr: float, seed: int) -> Path:
    return out / "runs" / name / f"lr{float(lr)!r}" / f"seed{seed}"


def train_in_process_args(config_path, out, name, lr, seed, device, max_steps, max_time):
    """The ``node-ocp train`` command line of one run."""
    cmd = [
        sys.executable,
        "-m",
        "node_ocp",
        "train",
        str(config_path),
        "--out",
        str(out),
        "--optimizer",
        name,
        "--lr",
        repr(float(lr)),
        "--seed",
        str(seed),
        "--no-progress",
        "--overwrite",  # the caller owns the run folder (an unfinished run is run again)
    ]
    if device is not None:
        cmd += ["--device", device]
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    if max_time is not None:
        cmd += ["--max-time", str(max_time)]
    return cmd


def compare(
    config: RunConfig,
    out_dir,
    optimizers: list[str],
    seeds: int = 3,
    lr_grid: bool = False,
    device: str | None = None,
    max_steps: int | None = None,
    max_time: float | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Run every optimizer (× learning rate × seed) on ``config`` and write the report.

    ``resume``: keep the runs that already finished in ``out_dir`` (their summary.json
    exists) and run only the others. ``overwrite``: replace the comparison already in
    ``out_dir``; without it or ``resume``, a folder holding one is refused.
    """
    if not optimizers:
        raise ConfigError("--optimizers: received nothing; accepted: names like adam,sgd,ocnopt")
    for name in optimizers:
        config.optimizer(name, "--optimizers")
    if len(set(optimizers)) != len(optimizers):
        raise ConfigError(f"--optimizers: received duplicates in {','.join(optimizers)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds: received {seeds!r}; accepted: an int >= 1")
    from .loop import resolve_device
    from .tasks import check_dataset

    check_dataset(config.task)
    held = [p for p in (COMPARISON, "report.md", "runs") if (Path(out_dir) / p).exists()]
    if held and not resume and not overwrite:
        raise RunError(
            f"--out: {str(out_dir)!r} already holds a comparison ({', '.join(held)}); "
            "accepted: a new folder, --resume to keep its finished runs, or --overwrite to "
            "replace it"
        )
    dev = resolve_device(device or config.train.device)  # no GPU: an error before any run
    if dist.launched_by_torchrun():  # join the group now: rank decides who writes
        dev = dist.init_from_env(dev.type) or dev
    out, problem = Path(out_dir), None
    if dist.rank() == 0:
        try:
            out = prepare_out_dir(out_dir)
        except RunError as exc:
            problem = exc
    _stop_together(problem, dev, f"--out: process 0 cannot write to {str(out_dir)!r}")
    plan = []
    for name in optimizers:
        opt = config.optimizers[name]
        for lr in opt.grid if lr_grid else [opt.learning_rate]:
            for i in range(seeds):
                plan.append((name, lr, config.train.seed + i))
    bar = None
    if progress and dist.rank() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), desc="runs", unit="run", dynamic_ncols=True)
    in_process = dist.launched_by_torchrun()
    for name, lr, seed in plan:
        target = run_dir(out, name, lr, seed)
        if resume and _finished(target, config, name, lr, seed, max_steps, max_time):
            if bar is not None:
                bar.update(1)
            continue
        if in_process:
            # Under torchrun every process runs the plan in step, each run data-parallel
            # over all of them (so peak memory is not per run here).
            s = train(
                config,
                target,
                RunOptions(
                    optimizer=name,
                    lr=lr,
                    seed=seed,
                    device=device,
                    max_steps=max_steps,
                    max_time=max_time,
                    overwrite=True,
                    progress=False,
                ),
            )
            if dist.rank() != 0:
                continue
        else:
            cmd = train_in_process_args(
                config.source, target, name, lr, seed, device, max_steps, max_time
            )
            proc = run_child(cmd)
            if proc.returncode != 0:
                lines = (proc.stderr or proc.stdout).strip().splitlines()
                said = [ln for ln in lines if ln.startswith("node-ocp: error: ")]
                if said:  # the run's own one-line error
                    why = said[-1][len("node-ocp: error: ") :]
                    raise RunError(f"run {name} lr={lr_label(lr)} seed={seed}: {why}")
                tail = "\n".join(lines[-8:])  # a crash: its traceback's end
                raise RunError(f"run {name} lr={lr_label(lr)} seed={seed} failed:\n{tail}")
            s = _read_json(target / SUMMARY)
        best = s.get("best_test_metric")
        line = (
            f"{name:<14} lr={lr_label(lr):<8} seed={seed}  val {s['metric']} {s['final_val']:.4g}  "
            f"test {s['test_metric']:.4g}"
            + (f"  test (best val, step {s['best_step']}) {best:.4g}" if best is not None else "")
            + f"  {s['train_seconds']:.1f}s"
            + ("  (diverged)" if s["diverged"] else "")
            + ("  (stopped early)" if s.get("stopped_early") else "")
        )
        if bar is not None:
            bar.write(line)
            bar.update(1)
        else:
            print(line)
    if bar is not None:
        bar.close()
    result, problem = {}, None
    if dist.rank() == 0:
        try:
            result = aggregate(
                out, config, optimizers, plan={(n, float(lr), s) for n, lr, s in plan}
            )
            write_report(out, result)
        except Exception as exc:  # the others must not wait for a report that never comes
            problem = exc
    _stop_together(problem, dev, "compare: process 0 could not write the report")
    return result


def run_child(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a ``node-ocp train``) to completion, capturing its output. A SIGINT or
    SIGTERM to this process is passed on to the child, which is waited for (its checkpoint
    stays valid), and then ends this process as the signal would (KeyboardInterrupt /
    exit status 128 + signal)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # no handlers off main
        return subprocess.run(cmd, capture_output=True, text=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got: list[int] = []

    def forward(signum, frame):
        got.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        out, err = proc.communicate()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if got:
        if got[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + got[0])
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _finished(target: Path, config: RunConfig, name, lr, seed, max_steps, max_time) -> bool:
    """A run in ``target`` finished with this config, optimizer, lr, seed and budgets."""
    if not (target / SUMMARY).exists() or not (target / CONFIG).exists():
        return False
    try:
        run = _read_json(target / CONFIG)
    except (OSError, ValueError):
        return False
    steps = config.train.steps if max_steps is None else int(max_steps)
    seconds = config.train.max_seconds if max_time is None else float(max_time)
    return (
        _read_back(run.get("config")) == json.loads(json.dumps(config.to_dict()))
        and (run.get("optimizer"), run.get("seed"), run.get("max_steps")) == (name, seed, steps)
        and run.get("lr") == float(lr)
        and run.get("max_time") == seconds
    )


def _read_back(saved):
    """A saved config as this version reads it (renamed keys under their new names, keys
    added since at their defaults), or as written when it no longer reads."""
    import warnings

    from .config import config_from_dict

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the run itself warned
            return json.loads(json.dumps(config_from_dict(saved).to_dict()))
    except (TypeError, ValueError, AttributeError):  # ConfigError is a ValueError
        return saved


def _stop_together(problem: Exception | None, device, other: str) -> None:
    """Raise ``problem`` on process 0 and a RunError on the others when process 0 had one."""
    if dist.all_reduce_sum_floats([float(problem is not None)], device)[0]:
        raise problem if problem is not None else RunError(other)


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _worst(higher: bool) -> float:
    return -math.inf if higher else math.inf


def _score(v, higher: bool) -> float:
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
        return _worst(higher)
    return float(v)


def reaches(value, target: float, higher: bool) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return value >= target if higher else value <= target


def time_to_target(records: list[dict], key: str, target: float, higher: bool):
    """``(seconds, step)`` of the first record whose ``key`` reaches ``target``, else None."""
    if not math.isfinite(target):
        return None
    for r in records:
        if reaches(r.get(key), target, higher):
            return r["seconds"], r["step"]
    return None


#: A run *ended far worse than its best* when its final validation metric gave back more
#: than this fraction of its improvement from its first evaluation to its best one.
GAVE_BACK = 0.5


def ended_far_worse(records: list[dict], key: str, higher: bool) -> dict | None:
    """The validation figures ``{"first", "first_step", "best", "best_step", "final"}`` of a
    run that ended far worse than its best, else None.

    The rule is scale-free (it holds for NLLs below 0 and accuracies alike): the final value
    gave back more than :data:`GAVE_BACK` of the improvement from the first evaluation to
    the best, or the run never improved on its first evaluation and ended worse than it. A
    run whose final value is not finite (diverged) is left to the diverged count: None.
    """
    seen = [(r["step"], float(r[key])) for r in records if intervals.finite([r.get(key)])]
    if len(seen) < 2 or not intervals.finite([records[-1].get(key)]):
        return None
    sign = 1.0 if higher else -1.0
    (first_step, first), final = seen[0], seen[-1][1]
    best_step, best = max(seen, key=lambda sv: sign * sv[1])  # the first of equal bests
    gain, lost = sign * (best - first), sign * (best - final)
    if lost <= 0 or lost <= GAVE_BACK * gain:
        return None
    return {
        "first": first,
        "first_step": first_step,
        "best": best,
        "best_step": best_step,
        "final": final,
    }


#: The share of a run's validation improvement made in the last quarter of its training
#: time below which the run is said to have *plateaued* within its budget.
PLATEAU = 0.1


def late_gain(records: list[dict], key: str, higher: bool, tail: float = 0.25) -> float | None:
    """The share of a run's improvement (best validation so far, from its first evaluation
    to its end) made in the last ``tail`` of its training time; None when the run never
    improved or has fewer than two finite evaluations.

    0 means the best-so-far validation metric did not move in the tail (plateaued), 1 that
    all of the improvement came in it. Used to state whether a budget let a run plateau.
    """
    seen = [(r["seconds"], float(r[key])) for r in records if intervals.finite([r.get(key)])]
    if len(seen) < 2:
        return None
    sign = 1.0 if higher else -1.0
    start, end = seen[0][0], seen[-1][0]
    cut = end - tail * (end - start)
    best, best_before = seen[0][1], seen[0][1]
    for t, v in seen:
        if sign * v > sign * best:
            best = v
        if t <= cut:
            best_before = best
    gain = sign * (best - seen[0][1])
    if not gain > 0:
        return None
    return max(0.0, sign * (best - best_before) / gain)  # (no -0.0)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and std over the finite values (diverged seeds are counted apart)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(out: Path, config: RunConfig, optimizers: list[str], plan=None) -> dict:
    """Read the runs of a comparison folder; choose learning rates; compute the table.

    ``plan``: the ``(optimizer, lr, seed)`` triples to use (default: every finished run of
    ``optimizers`` in the folder), so that runs left by an earlier comparison do not mix in.
    """
    runs = []
    for path in sorted((out / "runs").glob("*/lr*/seed*/" + SUMMARY)):
        s = _read_json(path)
        if s["optimizer"] not in optimizers:
            continue
        if plan is not None and (s["optimizer"], float(s["lr"]), s["seed"]) not in plan:
            continue
        s["dir"] = str(path.parent.relative_to(out))
        s["records"] = read_metrics(path.parent)
        runs.append(s)
    if not runs:
        raise RunError(f"no finished runs under {str(out / 'runs')!r}")
    metric = runs[0]["metric"]
    higher = runs[0]["higher_is_better"]
    key = f"val_{metric}"
    per_opt: dict[str, dict] = {}
    for name in optimizers:
        mine = [r for r in runs if r["optimizer"] == name]
        if not mine:
            continue
        grid = {}
        for lr in sorted({r["lr"] for r in mine}):
            at = [r for r in mine if r["lr"] == lr]
            scores = [_score(r["final_val"], higher) for r in at]
            finite = [s for s in scores if math.isfinite(s)]
            mean = statistics.fmean(scores) if len(finite) == len(scores) else _worst(higher)
            grid[lr] = {
                "mean_val": mean,
                "vals": [r["final_val"] for r in at],
                "diverged": sum(r["diverged"] for r in at),
                "seeds": len(at),
            }
        pick = (max if higher else min)(grid, key=lambda lr: grid[lr]["mean_val"])
        best = [r for r in mine if r["lr"] == pick]
        per_opt[name] = {
            "kind": best[0]["optimizer_kind"],
            "lr": pick,
            "grid": {repr(float(lr)): g for lr, g in grid.items()},
            "runs": [r["dir"] for r in best],
            "seed_list": [r["seed"] for r in best],
            "per_seed_val": {r["seed"]: r["final_val"] for r in best},
            "per_seed_test": {r["seed"]: r["test_metric"] for r in best},
            "val": _mean_std([r["final_val"] for r in best]),
            "test": _mean_std([r["test_metric"] for r in best]),
            "val_ci": list(_ci([r["final_val"] for r in best])),
            "test_ci": list(_ci([r["test_metric"] for r in best])),
            # the same figures of each run's best-validation model (best.pt)
            "per_seed_best_test": {r["seed"]: r.get("best_test_metric") for r in best},
            "per_seed_best_step": {r["seed"]: r.get("best_step") for r in best},
            "best_test": _mean_std([r.get("best_test_metric") for r in best]),
            "best_test_ci": list(_ci([r.get("best_test_metric") for r in best])),
            # validation figures of the runs that ended far worse than their best
            "per_seed_far_worse": {
                r["seed"]: far
                for r in best
                if (far := ended_far_worse(r["records"], key, higher)) is not None
            },
            "stopped_early": sum(bool(r.get("stopped_early")) for r in best),
            "diverged": sum(r["diverged"] for r in best),
            "seeds": len(best),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in best),
            "amortized_step_s": _median([r["amortized_step_s"] for r in best]),
            "refresh_time_s": _median([r["refresh_time_s"] for r in best]),
            "step_time_s": _median([r["step_time_s"] for r in best]),
            "nfe_forward": _median([r["nfe_forward"] for r in best]),
            "nfe_backward": _median([r["nfe_backward"] for r in best]),
            "peak_memory_mb": _median([r["peak_memory_mb"] for r in best]),
            "train_memory_mb": _median([r.get("train_memory_mb") for r in best]),
            "step_memory_mb": _median([r.get("step_memory_mb") for r in best]),
            "refresh_memory_mb": _median([r.get("refresh_memory_mb") for r in best]),
            "t1": _median([r["t1"] for r in best]),
        }
    baseline = next(
        (n for n in optimizers if n in per_opt and adapter_for(per_opt[n]["kind"]).reference),
        None,
    )
    baseline = baseline or next(iter(per_opt))
    for name, agg in per_opt.items():
        # OCNOpt's time-joint method is the one judged (see OptimizerAdapter.judged)
        agg["judged"] = adapter_for(agg["kind"]).judged(config.optimizers.get(name))
    first_order = [n for n, a in per_opt.items() if not a["judged"]] or list(per_opt)
    best_base = (max if higher else min)(
        first_order, key=lambda n: _score(per_opt[n]["val_ci"][0], higher)
    )
    target = config.train.target
    target_source = "[train].target"
    if target is None:
        finals = intervals.finite(per_opt[best_base]["per_seed_val"].values())
        target = statistics.median(finals) if finals else math.nan
        target_source = (
            f"median over seeds of the final validation {metric} of {best_base}, the best "
            "first-order baseline"
        )
    for agg in per_opt.values():
        times, steps_to = {}, {}
        for rdir in agg["runs"]:
            r = next(x for x in runs if x["dir"] == rdir)
            hit = (
                time_to_target(r["records"], key, target, higher) if math.isfinite(target) else None
            )
            times[r["seed"]] = hit[0] if hit else math.inf
            steps_to[r["seed"]] = hit[1] if hit else math.inf
        # a seed that never got there counts as +inf: the median is "never" unless more
        # than half of the seeds reached the target
        med = intervals.median_interval(list(times.values()))
        s_med = statistics.median(steps_to.values()) if steps_to else math.inf
        agg["per_seed_time_to_target_s"] = {s: _none_if_inf(t) for s, t in times.items()}
        agg["time_to_target_s"] = _none_if_inf(med.value)
        agg["time_to_target_ci"] = [_none_if_inf(med.lo), _none_if_inf(med.hi)]
        agg["steps_to_target"] = s_med if math.isfinite(s_med) else None
        agg["reached"] = f"{sum(math.isfinite(t) for t in times.values())}/{len(times)}"
    base = per_opt[baseline]
    for name, agg in per_opt.items():
        # the time ratio the table prints: the verdicts' (intervals.time_ratio), seeds paired
        t = intervals.time_ratio(name, baseline, _inf_times(agg), _inf_times(base))
        agg["time_to_target_ratio"] = _none_if_inf(t.ratio.value) if t.both else None
        agg["time_ratio_ci"] = [_none_if_inf(t.ratio.lo), _none_if_inf(t.ratio.hi)]
        agg["time_ratio_seeds"] = list(t.both)
        agg["time_ratio_cell"] = t.cell if name != baseline else "baseline"
        agg["step_cost_ratio"] = ratio(agg["amortized_step_s"], base["amortized_step_s"])
        agg["refresh_cost_ratio"] = ratio(agg["refresh_time_s"], base["amortized_step_s"])
        agg["memory_ratio"] = ratio(agg["train_memory_mb"], base["train_memory_mb"])
    verdicts = _verdicts(per_opt, best_base, metric, higher)
    result = {
        "config": config.to_dict(),
        "source": config.source,
        "task": runs[0]["task"],
        "dataset": runs[0]["dataset"],
        "metric": metric,
        "higher_is_better": higher,
        "device": runs[0]["device"],
        "baseline": baseline,
        "target": target,
        "target_source": target_source,
        "best_baseline": best_base,
        "verdicts": verdicts,
        "headline": verdicts[0]["text"] if verdicts else None,
        "optimizers": per_opt,
        "runs": [{k: v for k, v in r.items() if k != "records"} for r in runs],
    }
    atomic_write_json(out / COMPARISON, result)
    return result


def _ci(xs) -> tuple:
    """``(mean, lo, hi, n)``: the 95% t interval of the finite values."""
    i = intervals.mean_interval(xs)
    return i.value, i.lo, i.hi, i.n


def _none_if_inf(v):
    return None if v is None or not math.isfinite(v) else v


def _verdicts(per_opt: dict, best_base: str, metric: str, higher: bool) -> list[dict]:
    """Each time-joint OCNOpt table against the best baseline first, then against every
    other optimizer (without such tables: every optimizer against the best baseline)."""
    focus = [n for n, a in per_opt.items() if a["judged"]]
    judged = bool(focus)
    if not focus:
        focus = [n for n in per_opt if n != best_base]
    out = []
    for name in focus:
        others = [best_base] + [n for n in per_opt if n not in (best_base, name)]
        if not judged:
            others = [best_base]
        for base in others:
            if base == name:
                continue
            a, b = per_opt[name], per_opt[base]
            v = intervals.verdict(metric, higher, _side(name, a), _side(base, b))
            out.append(
                {
                    "name": name,
                    "baseline": base,
                    "outcome": v.outcome,
                    "text": v.text,
                    "test_difference": [v.difference.value, v.difference.lo, v.difference.hi],
                    "every_seed": v.final.every_seed,
                    "sign_test_p": v.final.sign_p,
                    "time_ratio": [v.time_ratio.value, v.time_ratio.lo, v.time_ratio.hi],
                    "time_ratio_seeds": list(v.time.both),
                    "seeds": v.difference.n,
                }
            )
    return out


def _side(name: str, agg: dict) -> intervals.Side:
    """An optimizer's per-seed figures as :func:`intervals.verdict` reads them."""
    return intervals.Side(
        name,
        agg["per_seed_test"],
        _inf_times(agg),
        agg.get("per_seed_best_test", {}),
        agg.get("per_seed_far_worse", {}),
    )


def _inf_times(agg: dict) -> dict:
    return {s: math.inf if t is None else t for s, t in agg["per_seed_time_to_target_s"].items()}


def _median(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else None
