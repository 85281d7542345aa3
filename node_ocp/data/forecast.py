"""Forecasting from irregular samples: procedural series and bundled archives.

Every split's ``x`` is what the model observes, an
:class:`~node_ocp.data.irregular.IrregularBatch`, and its ``y`` what it predicts, also an
``IrregularBatch`` whose ``times`` ``(B, Q)`` are the query times, ``values`` ``(B, Q, C)``
the targets and ``mask`` what is observed there. Two ways to split a series
(``predict``):

- ``"extrapolate"``: ``x`` is the past (the time points before ``observe`` of the series'
  span, with a random ``drop`` fraction removed), ``y`` the future;
- ``"interpolate"``: ``y`` is a random ``drop`` fraction of the series' time points held
  out (at least one), ``x`` the rest (at least one).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._errors import bad_value
from .irregular import collate_irregular
from .splits import Split, TaskData

PROCEDURAL = ("spiral", "oscillator")
#: what a forecast predicts: the future after the observed span, or held-out points in it
PREDICTS = ("extrapolate", "interpolate")


def procedural_series(
    name: str, n: int, length: int = 40, noise: float = 0.02, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` procedural series on the regular grid ``times (length,)`` in [0, 1].

    ``spiral``: 2 channels, a damped rotation ``r0 e^{-λt} (cos(ωt+φ), sin(ωt+φ))`` with a
    random direction, rate, decay, radius and phase. ``oscillator``: 1 channel, the position
    of a damped oscillator ``A e^{-γt} cos(ωt+φ)`` (its velocity is not observed).
    Returns ``(times (length,), values (n, length, C))``.
    """
    if name not in PROCEDURAL:
        raise bad_value("name", name, f"one of {', '.join(map(repr, PROCEDURAL))}")
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.0, 1.0, length)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, 1, generator=g)

    if name == "spiral":
        sign = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)
        omega = sign * 2 * math.pi * u(0.6, 1.0)
        decay, radius, phase = u(0.3, 1.2), u(0.7, 1.5), u(0.0, 2 * math.pi)
        r = radius * torch.exp(-decay * t)
        angle = omega * t + phase
        values = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], -1)
    else:
        omega, decay = 2 * math.pi * u(1.0, 2.0), u(0.5, 2.0)
        amp, phase = u(0.5, 1.5), u(0.0, 2 * math.pi)
        values = (amp * torch.exp(-decay * t) * torch.cos(omega * t + phase)).unsqueeze(-1)
    return t, values + noise * torch.randn(values.shape, generator=g)


def past_and_future(
    times: torch.Tensor,
    values: torch.Tensor,
    observe: float,
    drop: float,
    generator: torch.Generator,
):
    """Split series on a shared grid into an irregular observed past and the future.

    ``times (L,)``, ``values (N, L, C)`` (NaN where missing) -> ``(past, future)`` batches.
    """
    if not (0.0 < observe < 1.0):
        raise bad_value("observe", observe, "a fraction in (0, 1)")
    if not (0.0 <= drop < 1.0):
        raise bad_value("drop", drop, "a fraction in [0, 1)")
    cut = float(times[0] + observe * (times[-1] - times[0]))
    past_idx = torch.nonzero(times < cut).flatten()
    future_idx = torch.nonzero(times >= cut).flatten()
    if past_idx.numel() == 0 or future_idx.numel() == 0:
        raise bad_value("observe", observe, f"a cut leaving points on both sides of {cut:.3g}")
    past, future = [], []
    for i in range(values.shape[0]):
        observed = ~torch.isnan(values[i, past_idx]).all(-1)  # padding of shorter series
        keep = (torch.rand(past_idx.numel(), generator=generator) >= drop) & observed
        if not keep.any():
            keep[observed.nonzero().flatten()[-1:]] = True
        idx = past_idx[keep]
        past.append((times[idx], values[i, idx], None))
        future.append((times[future_idx], values[i, future_idx], None))
    return collate_irregular(past), collate_irregular(future)


def held_out(n: int, drop: float, generator: torch.Generator) -> torch.Tensor:
    """``(n,)`` bool, True for the time points held out as targets: each with probability
    ``drop``, and at least one held out and one kept (``n >= 2``)."""
    if n < 2:
        raise bad_value("n", n, "a series of >= 2 time points to hold some out")
    out = torch.rand(n, generator=generator) < drop
    pick = torch.randperm(n, generator=generator)[:2]
    if not out.any():
        out[pick[0]] = True
    if out.all():
        out[pick[1]] = False
    return out


def kept_and_held_out(
    times: torch.Tensor,
    values: torch.Tensor,
    drop: float,
    generator: torch.Generator,
):
    """Split series on a shared grid into kept points and held-out points inside the span.

    ``times (L,)``, ``values (N, L, C)`` (NaN where missing) -> ``(kept, held)`` batches: a
    random ``drop`` fraction of each series' points (at least one, and at least one kept)
    are the targets.
    """
    if not (0.0 < drop < 1.0):
        raise bad_value("drop", drop, "a fraction in (0, 1) of time points held out")
    kept, held = [], []
    for i in range(values.shape[0]):
        idx = torch.nonzero(~torch.isnan(values[i]).all(-1)).flatten()  # not padding
        if idx.numel() < 2:
            raise bad_value(f"values[{i}]", values[i], "series of >= 2 observed time points")
        out = held_out(idx.numel(), drop, generator)
        kept.append((times[idx[~out]], values[i, idx[~out]], None))
        held.append((times[idx[out]], values[i, idx[out]], None))
    return collate_irregular(kept), collate_irregular(held)


def split_series(times, values, predict: str, observe: float, drop: float, generator):
    """:func:`past_and_future` or :func:`kept_and_held_out`, as ``predict`` says."""
    if predict == "interpolate":
        return kept_and_held_out(times, values, drop, generator)
    if predict != "extrapolate":
        raise bad_value("predict", predict, f"one of {', '.join(map(repr, PREDICTS))}")
    return past_and_future(times, values, observe, drop, generator)


def procedural_forecast(
    name: str,
    n_train: int,
    n_val: int,
    n_test: int,
    length: int = 40,
    observe: float = 0.75,
    drop: float = 0.5,
    noise: float = 0.02,
    seed: int = 0,
    predict: str = "extrapolate",
) -> TaskData:
    """Train/validation/test forecasting splits of a procedural series family (``predict``:
    see :data:`PREDICTS`)."""
    parts = []
    for offset, n in enumerate((n_train, n_val, n_test)):
        t, v = procedural_series(name, n, length, noise, seed=seed * 1000 + offset)
        g = torch.Generator().manual_seed(seed * 1000 + 100 + offset)
        parts.append(Split(*split_series(t, v, predict, observe, drop, g)))
    return TaskData(*parts, {"name": name, "channels": parts[0].x.values.shape[-1]})


def uea_forecast(
    name: str,
    observe: float = 0.75,
    drop: float = 0.5,
    seed: int = 0,
    val_fraction=0.2,
    predict: str = "extrapolate",
) -> TaskData:
    """Forecast the end of each series of a bundled UEA/UCR archive from its irregular start
    (or, ``predict = "interpolate"``, its held-out points from the rest).

    Channels are standardised with training statistics; the archive's test split is the
    test split and a seeded ``val_fraction`` of its training split the validation split.
    """
    from .bundled import _require, bundled_uea_names

    names = bundled_uea_names()
    if name not in names:
        raise bad_value("name", name, f"a UEA/UCR set bundled with sktime: {', '.join(names)}")
    datasets = _require("sktime.datasets")
    arrays = {}
    for split in ("train", "test"):
        frame, _ = datasets.load_UCR_UEA_dataset(
            name, split=split, return_X_y=True, return_type="nested_univ"
        )
        length = max(
            len(frame.iloc[i, c]) for i in range(len(frame)) for c in range(frame.shape[1])
        )
        arr = np.full((len(frame), length, frame.shape[1]), np.nan, dtype=np.float32)
        for i in range(len(frame)):
            for c in range(frame.shape[1]):
                col = np.asarray(frame.iloc[i, c], dtype=np.float32)
                arr[i, : len(col), c] = col
        arrays[split] = torch.as_tensor(arr)
    length = max(a.shape[1] for a in arrays.values())
    for k, a in arrays.items():
        if a.shape[1] < length:
            pad = torch.full((a.shape[0], length - a.shape[1], a.shape[2]), float("nan"))
            arrays[k] = torch.cat([a, pad], 1)
    train = arrays["train"]
    times = torch.linspace(0.0, 1.0, length)
    perm = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * train.shape[0]))
    fit = train[perm[n_val:]]  # statistics of the training rows only
    mean = torch.nanmean(fit, dim=(0, 1), keepdim=True)
    std = torch.sqrt(torch.nanmean((fit - mean) ** 2, dim=(0, 1), keepdim=True)).clamp_min(1e-6)
    chunks = {
        "train": train[perm[n_val:]],
        "val": train[perm[:n_val]],
        "test": arrays["test"],
    }
    g = torch.Generator().manual_seed(seed)
    splits = [
        Split(*split_series(times, (chunks[k] - mean) / std, predict, observe, drop, g))
        for k in ("train", "val", "test")
    ]
    return TaskData(*splits, {"name": name, "channels": train.shape[-1], "mean": mean, "std": std})
