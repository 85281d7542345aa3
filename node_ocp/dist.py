"""torch.distributed helpers: process-group set-up from ``torchrun``'s environment and the
bucketed collectives OCNOpt and the training loop use.

Nothing here is called inside a solver loop: adaptive solvers take different numbers of
steps on different processes, so collectives happen only after the backward solves (in
``OCNOpt.step``, ``HorizonOptimizer.step``, evaluation and logging).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as tdist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def launched_by_torchrun() -> bool:
    """True when ``torchrun`` (or ``torch.distributed.run``) started this process with
    ``WORLD_SIZE`` > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device_type: str) -> torch.device | None:
    """Join the process group ``torchrun`` describes (``gloo`` on CPU, ``nccl`` on CUDA).

    Returns this process's device for CUDA (``cuda:LOCAL_RANK``), None on CPU. Does nothing
    (returns None) outside ``torchrun`` or when the group is already initialised.
    """
    if not launched_by_torchrun():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = None
    if device_type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return device


def all_reduce_bucket(tensors: Sequence[torch.Tensor], op: str = "mean") -> list[torch.Tensor]:
    """Sum or average ``tensors`` over all processes with one collective.

    The tensors are flattened into one buffer (per dtype and device), reduced, and split
    back; returns new tensors shaped like the inputs. Outside a process group: copies.
    """
    if not tensors:
        return []
    if not is_distributed():
        return [t.clone() for t in tensors]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    n = world_size()
    for idx in groups.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        if op == "mean":
            flat = flat / n
        offset = 0
        for i in idx:
            k = tensors[i].numel()
            out[i] = flat[offset : offset + k].reshape(tensors[i].shape)
            offset += k
    return out  # type: ignore[return-value]


def all_reduce_sum_floats(values: Sequence[float], device=None) -> list[float]:
    """Sum Python numbers over all processes (one collective, float64)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.tolist()


def broadcast_(tensors: Sequence[torch.Tensor], src: int) -> None:
    """Overwrite ``tensors`` on every process with process ``src``'s values."""
    if not is_distributed():
        return
    for t in tensors:
        if t.is_contiguous():
            tdist.broadcast(t, src=src)
        else:  # e.g. eigenvectors from eigh are column-major; send them in logical order
            buf = t.contiguous()
            tdist.broadcast(buf, src=src)
            t.copy_(buf)


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def wrap_ddp(model: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``model`` without per-forward buffer broadcasts.

    The only buffers node_ocp's models hold are ODE block time grids, which every process
    keeps equal itself (the horizon controller averages its statistics).
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device is not None and device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(model, device_ids=ids, forward_sync_buffers=False)
    return DDP(model, device_ids=ids, broadcast_buffers=False)
