"""Host round-trips of the own loop (``node_ocp.ode.rk``): every value the host reads from
the state's device is counted by a ``TorchFunctionMode`` (``float``, ``int``, ``bool``,
``.item()``, ``.tolist()`` of a tensor) and must equal ``SolveStats.host_syncs``: one read of
the output grid and one of the initial step per solve, one per adaptive step attempt (its
error ratio: accept/reject, the next step and whether the solve has ended), none per
fixed-grid step (with ``step_size``, two more reads per solve: the step grid is computed on the
device in the state's dtype, as torchdiffeq does, so that the steps are the same)."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from node_ocp.ode import rk

F64 = torch.float64
READS = {"__float__", "__int__", "__bool__", "item", "tolist", "__index__"}


class CountReads(TorchFunctionMode):
    """Counts the tensor-to-host reads made while active."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            self.reads += 1
        return func(*args, **(kwargs or {}))


class Field(torch.nn.Module):
    """A field that reads nothing on the host (``dy/dt = A y + sin(t)``)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("a", torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=F64))

    def forward(self, t, y):
        return y @ self.a.T + torch.sin(t)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
@pytest.mark.parametrize("grid", [[0.0, 3.0], [0.0, 0.4, 1.1, 3.0], [2.0, -1.0]])
def test_an_adaptive_solve_reads_the_host_once_per_step_attempt(method, grid):
    y0 = torch.randn(4, 2, dtype=F64)
    stats = rk.SolveStats()
    with CountReads() as mode, torch.no_grad():
        rk.odeint(Field(), y0, torch.tensor(grid, dtype=F64), method=method, rtol=1e-7,
                  atol=1e-9, stats=stats)  # fmt: skip
    attempts = stats.accepted + stats.rejected
    assert attempts > 3
    assert mode.reads == stats.host_syncs == 1 + 1 + attempts


@pytest.mark.parametrize("options, per_solve", [({}, 1), ({"step_size": 0.05}, 3)])
def test_a_fixed_grid_solve_reads_the_host_only_before_it_steps(options, per_solve):
    y0 = torch.randn(4, 2, dtype=F64)
    stats = rk.SolveStats()
    t = torch.linspace(0.0, 1.0, 6, dtype=F64)
    with CountReads() as mode, torch.no_grad():
        rk.odeint(Field(), y0, t, method="rk4", options=options, stats=stats)
    assert stats.accepted >= 5
    assert mode.reads == stats.host_syncs == per_solve  # the output grid (with step_size: its
    # number of steps and the step grid, computed on the device as torchdiffeq does)
