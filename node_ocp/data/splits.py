"""Deterministic train/validation/test splits and the small dataset objects tasks consume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .._errors import bad_value


@dataclass
class Split:
    """One split: inputs ``x`` (``(N, ...)``) and optional targets ``y`` (``(N, ...)``)."""

    x: torch.Tensor
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, idx: torch.Tensor) -> Split:
        return Split(self.x[idx], None if self.y is None else self.y[idx])


@dataclass
class TaskData:
    """Train, validation and test splits plus what a model needs to know about them."""

    train: Split
    val: Split
    test: Split
    info: dict = field(default_factory=dict)


def split_indices(
    n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint, seeded index sets for train / validation / test covering ``range(n)``."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise bad_value("fractions", fractions, "three non-negative fractions summing to 1")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


def standardize(train: torch.Tensor, *others: torch.Tensor):
    """Standardise every tensor with the mean and std of ``train`` (features in the last dim)."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(1e-6)
    return tuple((t - mean) / std for t in (train, *others)), (mean, std)
