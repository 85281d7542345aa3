"""``forecast.png``: a few test series of a forecast run (or of each optimizer of a
comparison) — the observed points, the held-out truth, each model's prediction on a dense
time grid, and for a model with a posterior (the latent ODE) a band from its draws.

What is drawn is the model a run hands back as its result: ``best.pt`` (the best-validation
model) where the run kept one, else the final ``checkpoint.pt``; each legend entry says
which.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .loop import BEST, CHECKPOINT, CONFIG

#: the band of a model with posterior draws: these quantiles of its decoded draws
BAND = (0.1, 0.9)


def load_run_models(run_dirs: dict[str, Path], prefer_best: bool = False):
    """``(task, {name: (model, which)})`` rebuilt on the CPU from the runs' folders, ``which``
    saying what was loaded (``"final"`` or ``"best-val, step S"``); runs without a
    checkpoint are left out (task None when none has one)."""
    from .config import config_from_dict
    from .tasks import build_task

    task, models = None, {}
    for name, d in run_dirs.items():
        if not (d / CHECKPOINT).exists():
            continue
        info = json.loads((d / CONFIG).read_text())
        cfg = config_from_dict(info["config"], source=info["source"])
        task = build_task(cfg, "cpu")
        which = "final"
        state = torch.load(d / CHECKPOINT, map_location="cpu", weights_only=False)["model"]
        if prefer_best and (d / BEST).exists():
            best = torch.load(d / BEST, map_location="cpu", weights_only=False)
            state, which = best["model"], f"best-val, step {best['step']}"
        task.model.load_state_dict(state)
        task.model.eval()
        models[name] = (task.model, which)
    return task, models


def query_grid(batch, predict: str, points: int = 80, whole: bool = False) -> torch.Tensor:
    """``(B, points)`` times per series: from its last observation to its last target
    (``extrapolate``), or over its whole span, first to last point observed or held out
    (``interpolate``, or ``whole``: a model that reconstructs the observed part too, the
    latent ODE)."""
    x, y = batch.x, batch.y
    inf = torch.tensor(float("inf"))
    t_end = torch.where(y.valid, y.times, -inf).max(1).values
    if predict == "interpolate" or whole:  # to the last point of either kind
        t_end = torch.maximum(t_end, torch.where(x.valid, x.times, -inf).max(1).values)
        t_obs = torch.where(x.valid, x.times, inf).min(1).values
        t_start = torch.minimum(t_obs, torch.where(y.valid, y.times, inf).min(1).values)
    else:
        t_start = torch.where(x.valid, x.times, -inf).max(1).values
    u = torch.linspace(0.0, 1.0, points, dtype=x.times.dtype)
    return t_start[:, None] + (t_end - t_start)[:, None] * u[None]


def draw_forecast(path: Path, run_dirs: dict[str, Path], series: int = 3) -> bool:
    """Draw ``series`` test series of forecast runs into ``path``; False when there is
    nothing to draw (no checkpoint)."""
    from ..ode.block import SolverError
    from .report import _plt

    task, models = load_run_models(run_dirs, prefer_best=True)
    if task is None:
        return False
    test = task.data.test
    batch = test.batch(torch.arange(min(series, len(test))))
    predict = task.config.task.predict
    n, channels = len(batch.x), batch.x.values.shape[-1]
    cols = min(channels, 3)
    plt = _plt()
    width = max(4.2 * cols, 8.0)  # room for the title and legend with one channel
    fig, axes = plt.subplots(n, cols, figsize=(width, 2.6 * n), squeeze=False)
    for j, (name, (model, which)) in enumerate(models.items()):
        color = f"C{j}"
        query = query_grid(batch, predict, whole=hasattr(model, "sample_forecasts"))
        try:
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(0)
                mean = model(batch.x, query)
                draws = None
                if hasattr(model, "sample_forecasts"):
                    draws = model.sample_forecasts(batch.x, query, samples=40)
        except SolverError:
            axes[0][0].plot([], [], color=color, label=f"{name}: solver failed")
            continue
        for b in range(n):
            for c in range(cols):
                ax = axes[b][c]
                label = f"{name} ({which})" if b == 0 and c == 0 else None
                ax.plot(query[b], mean[b, :, c], color=color, lw=1.5, label=label)
                if draws is not None:
                    lo, hi = torch.quantile(draws[:, b, :, c], torch.tensor(BAND), dim=0)
                    ax.fill_between(query[b], lo, hi, color=color, alpha=0.2, lw=0)
    held = "future (truth)" if predict == "extrapolate" else "held out (truth)"
    for b in range(n):
        x, y = batch.x, batch.y
        for c in range(cols):
            ax = axes[b][c]
            seen, target = x.mask[b, :, c], y.mask[b, :, c]
            first = b == 0 and c == 0
            ax.scatter(
                x.times[b][seen], x.values[b, :, c][seen], s=14, color="k",
                label="observed" if first else None, zorder=3,
            )  # fmt: skip
            ax.scatter(
                y.times[b][target], y.values[b, :, c][target], s=22, marker="x",
                color="crimson", label=held if first else None, zorder=3,
            )  # fmt: skip
            ax.set_title(f"test series {b}, channel {c}", fontsize=9)
            if b == n - 1:
                ax.set_xlabel("time")
    band = f"\nbands: {BAND[0]:.0%}-{BAND[1]:.0%} of posterior draws"
    has_band = any(hasattr(m, "sample_forecasts") for m, _ in models.values())
    fig.suptitle(f"{task.config.task.dataset}: {predict}" + (band if has_band else ""))
    fig.legend(loc="lower center", ncol=min(4, 2 + len(models)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
