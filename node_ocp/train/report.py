"""Reports and figures of comparisons and single runs (PNG with matplotlib's Agg backend).

Comparison figures (``write_report``):

- ``curves_steps.png`` / ``curves_time.png``: validation metric against steps and against
  training wall-clock (evaluation excluded), per optimizer at its chosen learning rate; the
  line is the mean over seeds, the band the min–max spread;
- ``lr_sensitivity.png``: final validation metric against learning rate per optimizer (the
  robustness picture), when more than one learning rate ran;
- ``density.png`` (2-D density tasks): data, and each optimizer's learned density and samples;
- ``forecast.png`` (forecast tasks): a few test series — observed points, the held-out
  truth, each optimizer's prediction (with a posterior band for a latent ODE); see
  :mod:`.forecast_figure`;
- ``samples.png`` (image density tasks): test images and each optimizer's samples; see
  :mod:`.sample_figure`;
- ``t1.png`` when the integration time is a control: t1 against steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..io import atomic_write_text
from .config import lr_label
from .errors import RunError
from .forecast_figure import draw_forecast, load_run_models
from .loop import CONFIG, read_metrics
from .sample_figure import draw_samples

COMPARISON = "comparison.json"  # written by node_ocp.train.compare
FIGURES = (
    "curves_steps.png",
    "curves_time.png",
    "lr_sensitivity.png",
    "density.png",
    "forecast.png",
    "samples.png",
    "t1.png",
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(v, fmt="{:.2f}", none="–") -> str:
    return none if v is None else fmt.format(v)


def _ci_cell(ci, digits=4) -> str:
    """``mean [lo, hi]`` of a ``(mean, lo, hi, n)`` interval."""
    m, lo, hi = ci[0], ci[1], ci[2]
    if not _finite(m):
        return "diverged"
    if not _finite(lo):
        return f"{m:.{digits}g}"
    return f"{m:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def _best_cell(a) -> str:
    """The best-validation models' test interval (``–`` for runs without ``best.pt``)."""
    ci = a.get("best_test_ci")
    if not ci or not _finite(ci[0]):
        return "–"
    return _ci_cell(ci)


def _time_cell(a) -> str:
    """The median time to the target with its interval; without a median (most seeds never
    reached it), how many seeds did."""
    t = a["time_to_target_s"]
    if t is None:
        reached = str(a.get("reached", "0/0"))
        return "never" if reached.startswith("0/") else f"no median ({reached} reached)"
    lo, hi = a.get("time_to_target_ci", [None, None])
    if lo is None and hi is None:
        return f"{t:.1f}"
    return f"{t:.1f} [{_num(lo, '{:.1f}', 'never')}, {_num(hi, '{:.1f}', 'never')}]"


def _ratio_cell(a) -> str:
    """The time ratio to the baseline as the verdicts word it (the seeds it is over, or why
    there is none); a comparison.json written before these words: the number."""
    return a.get("time_ratio_cell") or _num(a.get("time_to_target_ratio"))


def verdict_lines(result: dict) -> list[str]:
    """The verdicts in words, the headline (OCNOpt against the best baseline) first."""
    return [v["text"] + "." for v in result.get("verdicts", [])]


def write_report(out, result: dict) -> Path:
    """Write ``report.md`` and the figures of a comparison folder; returns the report path."""
    out = Path(out)
    figures = draw_comparison(out, result)
    metric, opts = result["metric"], result["optimizers"]
    better = "higher" if result["higher_is_better"] else "lower"
    base = result["baseline"]
    verdicts = verdict_lines(result)
    lines = [
        f"# {result['task']} on {result['dataset']}: optimizer comparison",
        "",
        f"**{verdicts[0]}**" if verdicts else "No verdict: a single optimizer ran.",
        "",
        f"Config `{result['source']}` · device {result['device']} · metric **{metric}** "
        f"({better} is better) · target {result['target']:.4g} ({result['target_source']}) "
        f"· ratios to **{base}**",
        "",
        "Every optimizer trained the same model, data, solver and tolerances; each is shown at "
        "the learning rate with the best mean final validation metric. Intervals are 95%: "
        "t intervals of means, bootstrap intervals of medians. Times are training wall-clock "
        "(evaluation excluded) on this machine; ratios are to the baseline in the same "
        "comparison. *test* is the final model's test metric (the verdicts' *final*); "
        "*test (best val)* is that of each run's model at its best validation metric "
        "(best.pt; the verdicts' *best-val*). An lr of *default* is OCNOpt's: none, its step "
        "scale comes from its quadratic model.",
        "",
        "| optimizer | lr | seeds | test | test (best val) | val | to target s | reached "
        "| time ratio | step cost | refresh cost | memory MB | memory ratio | NFE f/b |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in opts.items():
        nfe = (
            f"{a['nfe_forward']:.0f}/{a['nfe_backward']:.0f}"
            if a["nfe_forward"] is not None
            else "–"
        )
        test = _ci_cell(a["test_ci"])
        if a["diverged"]:
            test += f" ({a['diverged']}/{a['seeds']} diverged)"
        best = _best_cell(a)
        if a.get("stopped_early"):
            best += f" ({a['stopped_early']}/{a['seeds']} stopped early)"
        lines.append(
            f"| {name} | {lr_label(a['lr'])} | {a['seeds']} | {test} | {best} "
            f"| {_ci_cell(a['val_ci'])} | {_time_cell(a)} | {a['reached']} | {_ratio_cell(a)} "
            f"| {_num(a['step_cost_ratio'])} | {_num(a['refresh_cost_ratio'])} "
            f"| {_num(a.get('train_memory_mb'), '{:.1f}')} | {_num(a['memory_ratio'])} "
            f"| {nfe} |"
        )
    lines += ["", "## Verdicts", ""]
    lines += [f"- {v}" for v in verdicts] or ["- (one optimizer: nothing to compare)"]
    lines += [
        "",
        f"## Per seed (test {metric} of the final and of the best-validation model, seconds "
        "to the target)",
        "",
    ]
    lines += [
        "| optimizer | seed | test | test (best val) | best step | val | to target s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, a in opts.items():
        for seed in a.get("seed_list", []):
            key = str(seed) if str(seed) in a["per_seed_test"] else seed
            t = a["per_seed_time_to_target_s"].get(key)
            best = a.get("per_seed_best_test", {}).get(key)
            step = a.get("per_seed_best_step", {}).get(key)
            lines.append(
                f"| {name} | {seed} | {_num(a['per_seed_test'][key], '{:.4g}', 'nan')} "
                f"| {_num(best, '{:.4g}')} | {_num(step, '{}')} "
                f"| {_num(a['per_seed_val'][key], '{:.4g}', 'nan')} "
                f"| {_num(t, '{:.1f}', 'never')} |"
            )
    lines += ["", "## Learning-rate grid (mean final validation metric over seeds)", ""]
    lines += ["| optimizer | lr | mean val | per seed | diverged |", "|---|---|---|---|---|"]
    for name, a in opts.items():
        for lr, g in a["grid"].items():
            vals = ", ".join("nan" if not _finite(v) else f"{v:.4g}" for v in g["vals"])
            mean = g["mean_val"]
            chosen = " **(chosen)**" if float(lr) == float(a["lr"]) else ""
            shown = "–" if not _finite(mean) else f"{mean:.4g}"
            lines.append(
                f"| {name} | {lr_label(float(lr))}{chosen} | {shown} "
                f"| {vals} | {g['diverged']}/{g['seeds']} |"
            )
    lines += [
        "",
        "## How to read this",
        "",
        "- *verdict*: seeds paired. *final* figures are the final models', *best-val* "
        "those of each run's best-validation model (best.pt). A win or a loss only when the "
        "95% interval of the test-metric difference excludes 0, otherwise 'no difference "
        "detected' at that many seeds; a difference with the same sign on every seed is said "
        "('worse on every seed', with the sign test's p) whatever the interval. A run 'ended "
        "far worse than its best' when its final validation metric gave back more than half "
        "of its improvement from its first evaluation to its best (or never improved on its "
        "first and ended worse). The metric leads the verdict unless it shows nothing and no "
        "run diverged or ended far worse; then the time ratio does.",
        "- *time ratio*: the geometric mean, over the seeds where both reached the target "
        "(named), of the per-seed ratio of times to the target, to the baseline; the same "
        "figure, over the same seeds, as the verdict of that pair. Where one of them never "
        "reached the target there is no ratio, and the cell says who did on how many seeds.",
        "- *to target s*: median over seeds of the first training second at which the "
        "validation metric reached the target (a seed that never did counts as infinitely "
        "late: 'no median' unless most seeds got there, 'never' when none did); *reached* "
        "counts the seeds that did.",
        "- *step cost*: median training step time, amortized over OCNOpt's refresh period "
        "(the refresh step, with curvature capture and eigendecompositions, separately), as "
        "ratios to the baseline's. Both are measured while training, so they include the "
        "solver's NFE changing as the field changes; `node-ocp bench` measures them on one "
        "model state.",
        "- *memory MB*: the optimizer's state plus the transient peak of a training step (the "
        "larger of a plain and a refresh step), each run in its own process: CUDA allocator "
        "peak on a GPU, the resident high-water mark reset at the step's start on Linux.",
        "",
        "## Figures",
        "",
    ]
    lines += [f"![{f}]({f})" for f in figures]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _curves(out: Path, result: dict, name: str) -> list[list[dict]]:
    return [read_metrics(out / d) for d in result["optimizers"][name]["runs"]]


def draw_comparison(out, result: dict) -> list[str]:
    """Draw the comparison figures into ``out``; returns the file names written."""
    plt = _plt()
    out = Path(out)
    metric = result["metric"]
    key = f"val_{metric}"
    written = []
    for xkey, fname, xlabel in (
        ("step", "curves_steps.png", "step"),
        ("seconds", "curves_time.png", "training wall-clock (s)"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, agg in result["optimizers"].items():
            curves = [c for c in _curves(out, result, name) if c]
            if not curves:
                continue
            n = max(len(c) for c in curves)  # a seed that stopped early drops out
            xs = [_nanmean([c[i][xkey] for c in curves if i < len(c)]) for i in range(n)]
            ys = [[c[i][key] for c in curves if i < len(c)] for i in range(n)]
            mean = [_nanmean(v) for v in ys]
            lo = [_nanmin(v) for v in ys]
            hi = [_nanmax(v) for v in ys]
            (line,) = ax.plot(xs, mean, label=f"{name} (lr {lr_label(agg['lr'])})")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        if _finite(result.get("target")):
            ax.axhline(result["target"], color="gray", ls="--", lw=0.8, label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"validation {metric}")
        ax.set_title(f"{result['dataset']}: mean and min–max over seeds")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(fname)
    if any(len(a["grid"]) > 1 for a in result["optimizers"].values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, agg in result["optimizers"].items():
            lrs = sorted(agg["grid"], key=float)
            means, errs = [], []
            for lr in lrs:
                vals = [v for v in agg["grid"][lr]["vals"] if _finite(v)]
                means.append(sum(vals) / len(vals) if vals else math.nan)
                errs.append(_std(vals))
            ax.errorbar(
                [float(x) for x in lrs], means, yerr=errs, marker="o", capsize=3, label=name
            )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"final validation {metric}")
        ax.set_title("robustness to the learning rate (missing points diverged)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "lr_sensitivity.png", dpi=120)
        plt.close(fig)
        written.append("lr_sensitivity.png")
    if _draws_density(result["task"], result["config"]["task"]["dataset"]):
        dirs = _first_finished_runs(out, result)
        if dirs and draw_density(out / "density.png", dirs):
            written.append("density.png")
    if result["task"] == "forecast":
        dirs = _first_finished_runs(out, result)
        if dirs and draw_forecast(out / "forecast.png", dirs):
            written.append("forecast.png")
    if result["task"] == "image_density":
        dirs = _first_finished_runs(out, result)
        if dirs and draw_samples(out / "samples.png", dirs):
            written.append("samples.png")
    if result["config"].get("horizon") is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in result["optimizers"]:
            for i, c in enumerate(_curves(out, result, name)):
                ax.plot(
                    [r["step"] for r in c],
                    [r["t1"] for r in c],
                    color=f"C{list(result['optimizers']).index(name)}",
                    label=name if i == 0 else None,
                    alpha=0.8,
                )
        ax.set_xlabel("step")
        ax.set_ylabel("t1")
        ax.set_title("integration time t1 (each seed)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "t1.png", dpi=120)
        plt.close(fig)
        written.append("t1.png")
    return written


def _first_finished_runs(out: Path, result: dict) -> dict[str, Path]:
    """Each optimizer's first run (lowest seed) that did not diverge: name -> folder."""
    dirs = {}
    for name, a in result["optimizers"].items():
        ok = [r["dir"] for r in result["runs"] if r["dir"] in a["runs"] and not r["diverged"]]
        if ok:
            dirs[name] = out / ok[0]
    return dirs


def _draws_density(kind: str, dataset: str) -> bool:
    """Whether runs of the task kind ``kind`` on ``dataset`` get a density plot."""
    from .task_kinds import TASKS

    return kind in TASKS and TASKS[kind].plots_density(dataset)


def draw_density(path: Path, run_dirs: dict[str, Path], grid: int = 80) -> bool:
    """Data, learned log-density and samples of 2-D CNF runs (from their checkpoints)."""
    import torch

    plt = _plt()
    task, loaded = load_run_models(run_dirs)  # the final models
    if task is None:
        return False
    models = {name: model for name, (model, _) in loaded.items()}
    data = task.data.test.x[:2000]
    lim = float(data.abs().max()) * 1.1
    axis = torch.linspace(-lim, lim, grid)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    cols = 1 + len(models)
    fig, axes = plt.subplots(2, cols, figsize=(3 * cols, 6), squeeze=False)
    axes[0][0].scatter(data[:, 0], data[:, 1], s=1, alpha=0.4)
    axes[0][0].set_title("data (test)")
    axes[1][0].hist2d(
        data[:, 0].numpy(), data[:, 1].numpy(), bins=60, range=[[-lim, lim], [-lim, lim]]
    )
    axes[1][0].set_title("data histogram")
    gen = torch.Generator().manual_seed(0)
    from ..ode.block import SolverError

    for j, (name, model) in enumerate(models.items(), start=1):
        try:
            with torch.no_grad():
                logp = torch.cat([model.log_prob(c) for c in pts.split(2048)])
                samples = model.sample(2000, generator=gen)
        except SolverError:  # a flow that blew up: leave its panels empty
            axes[0][j].set_title(f"{name}: solver failed")
            continue
        axes[0][j].imshow(
            logp.exp().reshape(grid, grid).numpy(), origin="lower", extent=[-lim, lim, -lim, lim]
        )
        axes[0][j].set_title(f"{name}: density")
        axes[1][j].scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.4)
        axes[1][j].set_xlim(-lim, lim)
        axes[1][j].set_ylim(-lim, lim)
        axes[1][j].set_title(f"{name}: samples")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_run(run_dir) -> list[str]:
    """Figures of a single ``train`` run: metric and loss against steps and time, density."""
    plt = _plt()
    d = Path(run_dir)
    records = read_metrics(d)
    info = json.loads((d / CONFIG).read_text())
    metric_key = next(k for k in records[0] if k.startswith("val_"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, xkey, xlabel in (
        (axes[0], "step", "step"),
        (axes[1], "seconds", "training wall-clock (s)"),
    ):
        (line,) = ax.plot(
            [r[xkey] for r in records], [r[metric_key] for r in records], label=metric_key
        )
        ax.set_ylabel(metric_key)
        handles = [line]
        tl = [(r[xkey], r["train_loss"]) for r in records if r["train_loss"] is not None]
        if tl:  # on its own axis: a loss and a metric need not share units (ELBO, accuracy)
            twin = ax.twinx()
            handles += twin.plot(*zip(*tl), color="C1", label="train loss", alpha=0.7)
            twin.set_ylabel("train loss")
        ax.set_xlabel(xlabel)
        ax.legend(handles=handles)
    fig.suptitle(f"{info['optimizer']} lr={lr_label(info['lr'])} seed={info['seed']}")
    fig.tight_layout()
    fig.savefig(d / "curves.png", dpi=120)
    plt.close(fig)
    written = ["curves.png"]
    cfg = info["config"]
    if _draws_density(cfg["task"]["kind"], cfg["task"]["dataset"]):
        if draw_density(d / "density.png", {info["optimizer"]: d}):
            written.append("density.png")
    if cfg["task"]["kind"] == "forecast":
        if draw_forecast(d / "forecast.png", {info["optimizer"]: d}):
            written.append("forecast.png")
    if cfg["task"]["kind"] == "image_density":
        if draw_samples(d / "samples.png", {info["optimizer"]: d}):
            written.append("samples.png")
    if any(r.get("t1") is not None for r in records):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in records], [r["t1"] for r in records])
        ax.set_xlabel("step")
        ax.set_ylabel("t1")
        fig.tight_layout()
        fig.savefig(d / "t1.png", dpi=120)
        plt.close(fig)
        written.append("t1.png")
    return written


def _nanmean(v):
    f = [x for x in v if _finite(x)]
    return sum(f) / len(f) if f else math.nan


def _nanmin(v):
    f = [x for x in v if _finite(x)]
    return min(f) if f else math.nan


def _nanmax(v):
    f = [x for x in v if _finite(x)]
    return max(f) if f else math.nan


def _std(v):
    if len(v) < 2:
        return 0.0
    m = sum(v) / len(v)
    return (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5


def plot(run_dir) -> list[str]:
    """Redraw a comparison folder (report and figures) or a single run's figures.

    A file it cannot read (a damaged or foreign ``comparison.json``, a run's corrupt
    ``config.json`` or log) is one :class:`RunError` line naming that file.
    """
    from .loop import METRICS

    d = Path(run_dir)
    if (d / COMPARISON).exists():
        what = d / COMPARISON
        accepted = (
            "the comparison.json node-ocp compare wrote (run compare again with --resume to "
            "rebuild it from the finished runs)"
        )
        try:
            result = json.loads(what.read_text())
            if not isinstance(result, dict) or "optimizers" not in result:
                raise ValueError("no 'optimizers' table")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise _unreadable(what, exc, accepted, "comparison") from None
        try:
            write_report(d, result)
        except _SHAPE_ERRORS as exc:  # read, but not of the shape compare writes
            raise _unreadable(what, exc, accepted, "comparison") from None
        return ["report.md", *[f for f in FIGURES if (d / f).exists()]]
    if (d / METRICS).exists() and (d / CONFIG).exists():
        try:
            json.loads((d / CONFIG).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise _unreadable(
                d / CONFIG, exc, "the config.json node-ocp train wrote", "JSON"
            ) from None
        try:
            return plot_run(d)
        except _SHAPE_ERRORS as exc:
            raise _unreadable(
                d / METRICS, exc, "the metrics.jsonl node-ocp train wrote", "metrics"
            ) from None
    raise RunError(
        f"RUN_DIR: {str(d)!r} holds neither comparison.json nor metrics.jsonl + config.json; "
        "accepted: a folder written by node-ocp compare or node-ocp train"
    )


#: what reading a file of the wrong shape raises (a missing key, a number where a table was)
_SHAPE_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    IndexError,
    AttributeError,
    StopIteration,
)


def _unreadable(path: Path, exc: BaseException, accepted: str, kind: str) -> RunError:
    text = str(exc).strip()
    why = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return RunError(
        f"RUN_DIR: {str(path)!r} is not a readable {kind} ({why}); accepted: {accepted}"
    )


def format_summary(result: dict) -> str:
    """A plain-text table of a comparison for the terminal: the verdicts first."""
    metric, base = result["metric"], result["baseline"]
    lines = [*verdict_lines(result)]
    lines.append(
        f"{result['dataset']} ({result['task']}): target {metric} {result['target']:.4g} "
        f"({result['target_source']}); intervals 95%; ratios to {base}"
    )
    head = (
        f"{'optimizer':<16} {'lr':>8} {'test ' + metric:>28} {'test (best val)':>28} "
        f"{'to target s':>24} {'reached':>7} {'step cost':>9} {'memory MB':>9}  time ratio"
    )
    lines.append(head)
    for name, a in result["optimizers"].items():
        lines.append(
            f"{name:<16} {lr_label(a['lr']):>8} {_ci_cell(a['test_ci']):>28} "
            f"{_best_cell(a):>28} {_time_cell(a):>24} {a['reached']:>7} "
            f"{_num(a['step_cost_ratio']):>9} {_num(a.get('train_memory_mb'), '{:.1f}'):>9}  "
            f"{_ratio_cell(a)}"
        )
    return "\n".join(lines)
