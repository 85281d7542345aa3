"""Batches of irregularly sampled multivariate time series.

A batch keeps every series' own observation times; nothing is resampled to a grid:

- ``times``  ``(B, L)`` observation times, increasing along each row over its valid part;
- ``values`` ``(B, L, C)`` observed values (anything where unobserved);
- ``mask``   ``(B, L, C)`` True where a channel is observed.

A time point ``(b, l)`` is *valid* when any channel is observed there; padding is a row of
all-False mask entries at the end of a shorter series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._errors import bad_type, bad_value


@dataclass
class IrregularBatch:
    """``times (B, L)``, ``values (B, L, C)``, ``mask (B, L, C)`` (bool)."""

    times: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        for name in ("times", "values", "mask"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise bad_type(name, getattr(self, name), "a tensor")
        t, v, m = self.times, self.values, self.mask
        if v.dim() != 3:
            raise bad_value("values", v, "shape (batch, length, channels)")
        if t.shape != v.shape[:2]:
            raise ValueError(
                f"times: shape {tuple(t.shape)} does not match values {tuple(v.shape)}; "
                "accepted: times (batch, length) with values (batch, length, channels)."
            )
        if m.shape != v.shape or m.dtype != torch.bool:
            raise ValueError(
                f"mask: shape {tuple(m.shape)} dtype {m.dtype}; accepted: a bool tensor "
                f"shaped like values {tuple(v.shape)}, True where a channel is observed."
            )
        if not torch.isfinite(t[self.valid]).all():
            raise bad_value("times", t, "finite times at every observed point")
        if not torch.isfinite(v[m]).all():
            raise bad_value("values", v, "finite values wherever mask is True")
        for b in range(t.shape[0]):
            tb = t[b][self.valid[b]]
            if tb.numel() > 1 and not bool((tb[1:] > tb[:-1]).all()):
                raise bad_value("times", t[b], f"strictly increasing observed times in series {b}")

    @property
    def valid(self) -> torch.Tensor:
        """``(B, L)``: True where any channel is observed."""
        return self.mask.any(-1)

    def to(self, device) -> IrregularBatch:
        return IrregularBatch(self.times.to(device), self.values.to(device), self.mask.to(device))

    def __len__(self) -> int:
        return self.times.shape[0]

    def __getitem__(self, idx) -> IrregularBatch:
        """The series selected by ``idx`` (an index tensor, list or slice)."""
        return IrregularBatch(self.times[idx], self.values[idx], self.mask[idx])


def collate_irregular(
    series: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
) -> IrregularBatch:
    """Pad a list of ``(times (L_i,), values (L_i, C), mask (L_i, C) or None)`` into a batch.

    ``mask=None`` means: observed wherever ``values`` is not NaN. NaNs become 0 in ``values``.
    """
    if not series:
        raise bad_value("series", series, "a non-empty list of (times, values, mask)")
    channels = series[0][1].shape[-1]
    length = max(s[0].shape[0] for s in series)
    n = len(series)
    dtype = series[0][1].dtype if series[0][1].is_floating_point() else torch.float32
    times = torch.zeros(n, length, dtype=dtype)
    values = torch.zeros(n, length, channels, dtype=dtype)
    mask = torch.zeros(n, length, channels, dtype=torch.bool)
    for i, item in enumerate(series):
        t, v, m = item if len(item) == 3 else (*item, None)
        if v.dim() != 2 or v.shape[1] != channels or t.shape != v.shape[:1]:
            raise ValueError(
                f"series[{i}]: times {tuple(t.shape)} and values {tuple(v.shape)}; accepted: "
                f"times (L,) with values (L, {channels}) like the first series."
            )
        m = ~torch.isnan(v) if m is None else m.bool()
        k = t.shape[0]
        times[i, :k] = t
        if k < length:
            times[i, k:] = t[-1] if k else 0.0
        values[i, :k] = torch.nan_to_num(v.to(dtype))
        mask[i, :k] = m
    return IrregularBatch(times, values, mask)
