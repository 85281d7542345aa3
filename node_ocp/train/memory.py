"""Memory of training steps that tells optimizers apart.

A step's memory is measured as the peak of the memory in use during the step above the
memory in use when it started (its *transient* peak: gradients, saved activations, solver
states, curvature work), plus the optimizer's state (its tensors, counted exactly). The
peak comes from

- CUDA: the caching allocator's ``max_memory_allocated`` (reset at the step's start);
- Linux CPU: the kernel's resident high-water mark ``VmHWM``, reset at the step's start by
  writing ``5`` to ``/proc/self/clear_refs``, after ``malloc_trim(0)`` has handed memory
  that malloc holds free back to the system (so reused heap pages count again);
- elsewhere: the process's peak resident memory (``ru_maxrss``), which cannot be reset: the
  figure is then an upper bound, marked ``approximate``.
"""

from __future__ import annotations

import ctypes
import re
import resource
import sys

import torch

_MB = 2**20


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _can_reset_hwm() -> bool:
    if _LIBC is None or _status_kb("VmHWM") is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class StepMemory:
    """Transient peak memory of one stretch of work (a training step), in MB.

    Usage: ``m.start()``, the step, ``m.stop()`` -> MB above the memory in use at start.
    ``method`` says which measure is used (``cuda-allocator``, ``linux-hwm`` or
    ``ru_maxrss (approximate)``).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.method = "cuda-allocator"
        elif _can_reset_hwm():
            self.method = "linux-hwm"
        else:
            self.method = "ru_maxrss (approximate)"
        self._base = 0.0

    def start(self) -> None:
        if self.method == "cuda-allocator":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / _MB
        elif self.method == "linux-hwm":
            _LIBC.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _status_kb("VmRSS") / 1024
        else:
            self._base = _rss_mb()

    def stop(self) -> float:
        if self.method == "cuda-allocator":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / _MB - self._base
        if self.method == "linux-hwm":
            return max(0.0, _status_kb("VmHWM") / 1024 - self._base)
        return max(0.0, _max_rss_mb() - self._base)


def state_mb(opt) -> float:
    """The optimizer's state tensors in MB (each storage counted once)."""
    seen, total = set(), 0

    def visit(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.device)
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(opt.state)
    usage = getattr(opt, "memory_usage", None)  # OCNOpt: curvature held outside .state
    if callable(usage):
        held = usage()
        total += held["total"] - held["momentum"]  # its momentum buffers are in .state
    return total / _MB


def process_peak_mb(device: torch.device) -> float:
    """The process's peak: the CUDA allocator's on a GPU, the peak resident memory else."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _MB
    return _max_rss_mb()


def _rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else _max_rss_mb()


def _max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / _MB if sys.platform == "darwin" else rss / 1024


__all__ = ["StepMemory", "state_mb", "process_peak_mb"]


class FirstStepMemory:
    """Memory of training steps, as ``node-ocp train`` and ``bench`` report it.

    The first step of each type (plain, refresh, ...) after the first step is measured:
    the optimizer's state plus the step's transient peak (:class:`StepMemory`). The
    process's peak (CUDA allocator peak / peak resident memory) is reported beside it.
    ``measured`` (step type -> MB) is filled in place (a run keeps it in its state).
    """

    def __init__(self, device: torch.device, measured: dict):
        self.device = device
        self.meter = StepMemory(device)
        self.measured = measured
        self.active: str | None = None

    def before_step(self, step_type: str, step: int) -> bool:
        """Start measuring when this step is the first of its type after step 0; whether
        it is measured."""
        self.active = None
        if step > 0 and step_type not in self.measured:
            self.active = step_type
            self.meter.start()
        return self.active is not None

    def after_step(self, opt) -> None:
        if self.active is not None:
            self.measured[self.active] = self.meter.stop() + state_mb(opt)

    def summary(self) -> dict:
        m = self.measured
        plain = m.get("plain")
        refresh = m.get("refresh+adapt", m.get("refresh"))
        steps = [v for v in m.values() if v is not None]
        return {
            "peak_memory_mb": process_peak_mb(self.device),
            "train_memory_mb": max(steps) if steps else None,
            "step_memory_mb": plain,
            "refresh_memory_mb": refresh,
            "memory_method": self.meter.method,
        }
