"""Real data that ships inside packages (scikit-learn, sktime): nothing is downloaded.

- :func:`tabular_density` — digits (64-D, dequantised), wine, breast_cancer, iris, as density
  estimation sets standardised with training statistics.
- :func:`digits_images` — scikit-learn's 8×8 digits as ``(N, 1, 8, 8)`` images with labels.
- :func:`uea_series` — any UEA/UCR archive bundled with sktime (JapaneseVowels,
  BasicMotions, ...), variable length included, optionally made irregular by dropping a
  fraction of the observations of every series (the times are kept).

scikit-learn and sktime are optional extras (``pip install node_ocp[data]``); a missing one
gives an error that says how to install it.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from .._errors import bad_value, check_choice
from .irregular import collate_irregular
from .splits import Split, TaskData, split_indices, standardize

TABULAR = ("digits", "wine", "breast_cancer", "iris")


def _require(module: str, extra: str = "data"):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{module.split('.')[0]} is needed for this data set but is not installed; "
            f"install it with: pip install 'node_ocp[{extra}]'"
        ) from err


def tabular_density(name: str, seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> TaskData:
    """A bundled tabular set as float32 ``(N, D)`` splits, standardised with train statistics.

    ``digits`` pixel counts (0..16) are dequantised with uniform noise in [0, 1) first.
    """
    check_choice("name", name, TABULAR)
    datasets = _require("sklearn.datasets")
    loader = getattr(datasets, f"load_{name}")
    x = torch.as_tensor(np.asarray(loader().data), dtype=torch.float32)
    if name == "digits":
        noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
        x = x + noise
    tr, va, te = split_indices(x.shape[0], fractions, seed)
    (xtr, xva, xte), (mean, std) = standardize(x[tr], x[va], x[te])
    return TaskData(
        Split(xtr),
        Split(xva),
        Split(xte),
        {"name": name, "dim": x.shape[1], "mean": mean, "std": std},
    )


def digits_images(seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> TaskData:
    """scikit-learn digits: images ``(N, 1, 8, 8)`` float32 in [0, 1], labels ``(N,)`` int64.

    The pixels are counts 0..16 (17 grey levels, ``info["levels"]``), divided by 16."""
    datasets = _require("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.as_tensor(np.asarray(d.images), dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(np.asarray(d.target), dtype=torch.long)
    tr, va, te = split_indices(x.shape[0], fractions, seed)
    return TaskData(
        Split(x[tr], y[tr]),
        Split(x[va], y[va]),
        Split(x[te], y[te]),
        {"name": "digits", "classes": 10, "shape": (1, 8, 8), "levels": 17},
    )


def bundled_uea_names() -> list[str]:
    """Names of the UEA/UCR archives that ship inside the installed sktime."""
    from pathlib import Path

    sktime = _require("sktime")
    root = Path(sktime.__file__).parent / "datasets" / "data"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob(f"{p.name}_TRAIN.*")))


def uea_series(
    name: str,
    seed: int = 0,
    drop: float = 0.0,
    val_fraction: float = 0.2,
) -> TaskData:
    """A bundled UEA/UCR classification archive as irregular batches.

    Returns splits whose ``x`` is an :class:`~node_ocp.data.irregular.IrregularBatch`
    (times ``0, 1, ..., L-1`` scaled to [0, 1] over the longest series) and ``y`` class
    indices. The archive's test split is the test split; a seeded ``val_fraction`` of its
    training split is the validation split. ``drop`` in [0, 1) removes that fraction of every
    series' time points at random (seeded; at least one kept), keeping the times.
    """
    names = bundled_uea_names()
    if name not in names:
        raise bad_value(
            "name",
            name,
            f"a UEA/UCR set bundled with sktime: {', '.join(names)}",
            "Other archives need a local copy; nothing is downloaded.",
        )
    if not (0.0 <= drop < 1.0):
        raise bad_value("drop", drop, "a fraction in [0, 1)")
    datasets = _require("sktime.datasets")
    parts = {}
    for split in ("train", "test"):
        x, y = datasets.load_UCR_UEA_dataset(
            name, split=split, return_X_y=True, return_type="nested_univ"
        )
        parts[split] = (x, np.asarray(y))
    classes = sorted(set(parts["train"][1]) | set(parts["test"][1]))
    index = {c: i for i, c in enumerate(classes)}
    longest = max(len(parts[s][0].iloc[i, 0]) for s in parts for i in range(len(parts[s][0])))
    scale = max(longest - 1, 1)
    gen = torch.Generator().manual_seed(seed)

    def series(frame, i):
        cols = [np.asarray(frame.iloc[i, c], dtype=np.float32) for c in range(frame.shape[1])]
        length = max(len(c) for c in cols)
        values = torch.full((length, len(cols)), float("nan"))
        for c, col in enumerate(cols):
            values[: len(col), c] = torch.as_tensor(col)
        times = torch.arange(length, dtype=torch.float32) / scale
        if drop > 0:
            keep = torch.rand(length, generator=gen) >= drop
            if not keep.any():
                keep[torch.randint(0, length, (1,), generator=gen)] = True
            times, values = times[keep], values[keep]
        return times, values, None

    def build(split):
        frame, labels = parts[split]
        items = [series(frame, i) for i in range(len(frame))]
        return items, torch.tensor([index[v] for v in labels])

    train_items, train_y = build("train")
    test_items, test_y = build("test")
    perm = torch.randperm(len(train_items), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(train_items)))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    return TaskData(
        Split(collate_irregular([train_items[i] for i in tr_idx]), train_y[tr_idx]),
        Split(collate_irregular([train_items[i] for i in val_idx]), train_y[val_idx]),
        Split(collate_irregular(test_items), test_y),
        {
            "name": name,
            "classes": len(classes),
            "channels": parts["train"][0].shape[1],
            "labels": classes,
            "drop": drop,
        },
    )
