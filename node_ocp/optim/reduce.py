"""The middle stages of a refresh: average the statistics over processes, then decompose.

Under torch.distributed every process gathered statistics on its share of the batch.
:func:`reduce_statistics` averages the per-sample records of all units in one all-reduce per
dtype (never inside a solver loop, where processes take different numbers of steps) and sums
the sample counts. :func:`decompose` hands every record to its unit; a unit whose larger
factor has at least ``spread_min_dim`` rows is decomposed by one process (units dealt
round-robin) and broadcast, smaller ones on every process. Either way all processes end
with the same state.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import dist
from .statistics import Statistics


@dataclass
class ReduceReport:
    """What the last refresh sent between processes."""

    bytes: int = 0
    collectives: int = 0
    spread_layers: int = 0

    def as_dict(self) -> dict:
        return {
            "bytes": self.bytes,
            "collectives": self.collectives,
            "spread_layers": self.spread_layers,
        }


def reduce_statistics(records: list[Statistics]) -> ReduceReport:
    """Average the records over the processes of the default group (in place)."""
    mats = [m for r in records for m in r.tensors()]
    if not mats:  # every process built the same (empty) list: nothing to send
        return ReduceReport()
    reduced = iter(dist.all_reduce_bucket(mats, "mean"))
    counts = dist.all_reduce_sum_floats([r.samples for r in records], device=mats[0].device)
    for r, n in zip(records, counts):
        r.replace([next(reduced) for _ in r.tensors()], n)
    return ReduceReport(
        bytes=sum(m.numel() * m.element_size() for m in mats) + 8 * len(records),
        collectives=len({(m.dtype, m.device) for m in mats}) + 1,
    )


def decompose(records: list[Statistics], spread: bool, spread_min_dim: int) -> int:
    """Refresh every record's unit; returns the number of decompositions spread."""
    spread_count = 0
    for r in records:
        unit = r.unit
        if not spread or r.size < spread_min_dim:
            unit.refresh(r)
            continue
        owner = spread_count % dist.world_size()
        spread_count += 1
        if dist.rank() == owner:
            unit.refresh(r)
            tensors = unit.decomposition()
        else:
            tensors = _placeholders(r)
        dist.broadcast_(tensors, src=owner)
        if dist.rank() != owner:
            unit.set_decomposition(tensors, r.samples)
    return spread_count


def _placeholders(record: Statistics) -> list:
    """Empty tensors shaped like the decomposition of ``record`` (eigenvectors, values)."""
    out = []
    mats = record.tensors()
    out.extend(m.new_empty(m.shape) for m in mats)
    out.extend(m.new_empty(m.shape[0]) for m in mats)
    return out
