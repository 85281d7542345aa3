"""``samples.png``: image-flow runs seen, not only scored — a grid of test images beside a
grid of samples drawn from each run's model (an ``image_density`` run, or each optimizer of
a comparison).

What is drawn is the model a run hands back as its result: ``best.pt`` (the
best-validation model) where the run kept one, else the final ``checkpoint.pt``; each
panel's title says which. Samples are quantised to the data's grey levels, as the data are.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .forecast_figure import load_run_models


def tile(images: torch.Tensor, cols: int, pad: int = 1) -> torch.Tensor:
    """Images ``(n, C, H, W)`` in [0, 1] as one ``(rows·(H+pad)+pad, cols·(W+pad)+pad, 3)``
    RGB grid on a white ground (one channel: grey; three: RGB; other counts: the first)."""
    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(n, 3, h, w)
    elif c != 3:
        images = images[:, :1].expand(n, 3, h, w)
    rows = math.ceil(n / cols)
    out = torch.ones(rows * (h + pad) + pad, cols * (w + pad) + pad, 3)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        out[top : top + h, left : left + w] = images[i].permute(1, 2, 0).clamp(0, 1).float()
    return out


def draw_samples(path: Path, run_dirs: dict[str, Path], n: int = 36) -> bool:
    """Draw ``n`` test images and ``n`` samples of each run's model into ``path``; False
    when there is nothing to draw (no checkpoint)."""
    from ..ode.block import SolverError
    from .report import _plt

    task, models = load_run_models(run_dirs, prefer_best=True)
    if task is None:
        return False
    cols = math.ceil(math.sqrt(n))
    test = task.data.test.x[:n].cpu()
    plt = _plt()
    panels = 1 + len(models)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.6), squeeze=False)
    axes = axes[0]
    axes[0].imshow(tile(test, cols).numpy(), interpolation="nearest")
    axes[0].set_title("data (test)", fontsize=9)
    for ax, (name, (model, which)) in zip(axes[1:], models.items()):
        try:
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(0)
                images = model.sample(n, generator=torch.Generator().manual_seed(0))
        except SolverError:
            ax.set_title(f"{name}: solver failed", fontsize=9)
            continue
        ax.imshow(tile(images.cpu(), cols).numpy(), interpolation="nearest")
        ax.set_title(f"{name} ({which}): samples", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    levels = task.data.info.get("levels")
    note = f", {levels} grey levels" if levels else ""
    fig.suptitle(f"{task.config.task.dataset}{note}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
