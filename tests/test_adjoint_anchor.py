"""The own adjoint's reconstruction check (``ODEBlock(adjoint_anchor=...)``).

The backward solve re-solves the state from the top of each grid interval. Where the flow
contracts strongly forward in time, that reconstruction leaves the forward trajectory
exponentially, and the gradient with it. The field below makes this exact in float64:
``dx1/dt = -k x1`` (contracting, ``k = 30``) drives ``dx2/dt = w x1``; the loss is
``x2(1)``, so ``dL/dw = ∫ x1 dt = x1(0) (1 - e^{-k}) / k``, which needs ``x1`` early in the
interval — exactly where the plain backward solve's ``x1`` is ``e^{k}`` times its error at
``t = 1``.
"""

import math

import pytest
import torch
from torch import nn

import node_ocp as no
from node_ocp.ode.adjoint import MAX_PIECES, pieces_for

F64 = torch.float64
K = 30.0
TOL = dict(rtol=1e-6, atol=1e-8)


class Driven(nn.Module):
    """``dx1/dt = -k x1``, ``dx2/dt = w x1`` (state ``(B, 2)``, ``k`` fixed, ``w`` learnt)."""

    def __init__(self, k: float = K):
        super().__init__()
        self.k = k
        self.w = nn.Parameter(torch.tensor(0.7, dtype=F64))

    def forward(self, t, x):
        return torch.stack([-self.k * x[:, 0], self.w * x[:, 0]], dim=1)


def _grad_w(block: no.ODEBlock, x0: torch.Tensor) -> float:
    block.field.w.grad = None
    block(x0)[:, 1].sum().backward()
    return float(block.field.w.grad)


def _x0() -> torch.Tensor:
    return torch.tensor([[1.0, 0.0], [0.5, 0.2], [-0.8, 1.0]], dtype=F64)


def _exact(x0: torch.Tensor, k: float = K) -> float:
    return float(x0[:, 0].sum()) * (1 - math.exp(-k)) / k


def test_the_plain_adjoint_loses_the_gradient_of_a_contracting_flow():
    block = no.ODEBlock(Driven(), (0.0, 1.0), adjoint_anchor=None, **TOL)
    x0 = _x0()
    g = _grad_w(block, x0)
    assert abs(g - _exact(x0)) > 10 * abs(_exact(x0))  # the failure the check is for
    assert block.counters.splits == 0 and block.counters.reconstruction > 1e6


def test_the_anchored_adjoint_recovers_the_analytic_gradient_and_backprop():
    block = no.ODEBlock(Driven(), (0.0, 1.0), **TOL)  # the default check
    x0 = _x0()
    g = _grad_w(block, x0)
    assert g == pytest.approx(_exact(x0), rel=1e-4)
    assert block.counters.splits >= 1
    assert block.counters.reconstruction > 1e6  # measured before the first split
    direct = no.ODEBlock(Driven(), (0.0, 1.0), gradient="direct", **TOL)
    assert g == pytest.approx(_grad_w(direct, x0), rel=1e-4)


def test_each_interval_of_a_longer_grid_is_checked():
    grid = torch.tensor([0.0, 0.9, 1.0], dtype=F64)
    plain = no.ODEBlock(Driven(), grid, adjoint_anchor=None, **TOL)
    anchored = no.ODEBlock(Driven(), grid, **TOL)
    x0 = _x0()
    for block in (plain, anchored):
        block.field.w.grad = None
        block(x0)[-1, :, 1].sum().backward()
    g_plain, g = float(plain.field.w.grad), float(anchored.field.w.grad)
    assert g == pytest.approx(_exact(x0), rel=1e-4)
    assert abs(g_plain - _exact(x0)) > abs(_exact(x0))  # e^{27} over the first interval
    assert anchored.counters.splits >= 1


def test_a_well_reconstructed_solve_is_left_alone():
    """A flow that does not contract: the same numbers as without the check, no split."""
    x0 = _x0()
    grads = []
    for anchor in (None, 10.0):
        block = no.ODEBlock(Driven(k=-0.5), (0.0, 1.0), adjoint_anchor=anchor, **TOL)
        grads.append(_grad_w(block, x0))
        assert block.counters.splits == 0
    assert grads[0] == grads[1]
    assert grads[1] == pytest.approx(_exact(x0, k=-0.5), rel=1e-5)


class Recorder:
    """A capture that writes down the sample times and weights it is handed."""

    kronecker_enabled = True
    dense_enabled = False

    def __init__(self):
        self.pieces: list[tuple[torch.Tensor, float]] = []

    def record_call(self, record, x0, out):
        pass

    def sample_grid(self, t_start, t_end, like):
        frac = (torch.arange(4, dtype=like.dtype) + 0.5) / 4
        return t_start + frac * (t_end - t_start), abs(float(t_end - t_start)) / 4

    def accumulate_kronecker(self, field, times, weight, states, factors):
        self.pieces.append((times.clone(), weight, states.clone()))
        return 0

    def accumulate_dense(self, block, names, p):
        raise AssertionError("not enabled")


def test_the_capture_sees_only_the_kept_pieces():
    """A discarded backward solve's statistics are never taken: the weights of the kept
    pieces add up to the interval once, their times descend without overlap, and their
    states follow the forward trajectory, not the diverged reconstruction."""
    block = no.ODEBlock(Driven(), (0.0, 1.0), **TOL)
    capture = Recorder()
    block.attach_capture(capture)
    x0 = _x0()
    block(x0)[:, 1].sum().backward()
    assert block.counters.splits >= 1 and len(capture.pieces) > 1
    times = torch.cat([t for t, _, _ in capture.pieces])
    assert bool((times[1:] < times[:-1]).all())
    assert sum(w * t.numel() for t, w, _ in capture.pieces) == pytest.approx(1.0, rel=1e-12)
    for t, _, states in capture.pieces:
        exact = x0[:, 0] * torch.exp(-K * t).unsqueeze(1)  # (S, B)
        err = (states[..., 0] - exact).abs().max()
        assert float(err) < 1e-5


def test_pieces_for():
    assert pieces_for(100.0, 10.0) == 2
    assert pieces_for(1e5, 10.0) == 5
    assert pieces_for(11.0, 10.0) == 2  # at least two
    assert pieces_for(1e40, 10.0) == MAX_PIECES
    assert pieces_for(float("inf"), 10.0) == MAX_PIECES


@pytest.mark.parametrize("bad", [0.5, 1.0, -3.0, float("inf"), True, "10"])
def test_a_bad_anchor_is_refused_naming_the_argument(bad):
    with pytest.raises(ValueError, match="adjoint_anchor") as err:
        no.ODEBlock(Driven(), (0.0, 1.0), adjoint_anchor=bad)
    assert "received" in str(err.value) and "> 1" in str(err.value)
    block = no.ODEBlock(Driven(), (0.0, 1.0))
    with pytest.raises(ValueError, match="adjoint_anchor"):
        block.adjoint_anchor = bad
    block.adjoint_anchor = None
    assert block.adjoint_anchor is None and block.settings.anchor is None


@pytest.mark.parametrize("value, expected", [(50, 50.0), ("off", None), (1000.0, 1000.0)])
def test_the_solver_table_sets_every_block(tmp_path, value, expected):
    from train_helpers import tiny, write_toml

    from node_ocp.train import build_task, load_config

    cfg = load_config(write_toml(tmp_path / "c.toml", tiny(**{"solver.adjoint_anchor": value})))
    task = build_task(cfg, "cpu")
    blocks = [m for m in task.model.modules() if isinstance(m, no.ODEBlock)]
    assert blocks and all(b.adjoint_anchor == expected for b in blocks)


@pytest.mark.parametrize("value", [0.5, 1, "x", True])
def test_a_bad_solver_table_anchor_is_refused_in_one_line(tmp_path, value):
    from train_helpers import tiny, write_toml

    from node_ocp.train import load_config
    from node_ocp.train.config import ConfigError

    path = write_toml(tmp_path / "c.toml", tiny(**{"solver.adjoint_anchor": value}))
    with pytest.raises(ConfigError, match=r"\[solver\]\.adjoint_anchor: received .*; accepted: "
                       r"a float > 1 or 'off'"):  # fmt: skip
        load_config(path)


def test_without_an_anchor_a_departed_reconstruction_is_measured_and_warned_of():
    block = no.ODEBlock(Driven(), (0.0, 1.0), adjoint_anchor=None, name="stiff block", **TOL)
    with pytest.warns(RuntimeWarning, match="stiff block: the own adjoint's backward solve"):
        _grad_w(block, _x0())
    assert block.counters.reconstruction > 1e6 and block.counters.splits == 0


def test_a_low_order_method_at_a_tight_tolerance_is_not_split():
    """bosh3 at rtol 1e-8 on a plain MLP field keeps a global error of thousands of
    tolerances that is still ~1e-4 of the state: left alone (no split, no warning), and the
    gradient is the plain adjoint's."""
    import warnings

    from conftest import mlp_field

    torch.manual_seed(0)
    field = mlp_field(3, 8)
    x0 = torch.randn(1, 3, dtype=F64) * 0.1
    grads = []
    for anchor in (None, 1000.0):
        block = no.ODEBlock(field, (0.0, 1.0), method="bosh3", rtol=1e-8, atol=1e-10,
                            backend="own", adjoint_anchor=anchor)  # fmt: skip
        x = x0.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            (g,) = torch.autograd.grad((block(x) ** 2).sum(), [x])
        grads.append(g)
        assert block.counters.reconstruction > 1000 and block.counters.splits == 0
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("value", ["state", "full"])  # seminorm: the default, below
def test_the_solver_tables_adjoint_norm_sets_every_block(tmp_path, value):
    from train_helpers import tiny, write_toml

    from node_ocp.train import build_task, load_config

    cfg = load_config(write_toml(tmp_path / "c.toml", tiny(**{"solver.adjoint_norm": value})))
    task = build_task(cfg, "cpu")
    blocks = [m for m in task.model.modules() if isinstance(m, no.ODEBlock)]
    assert blocks and all(b.adjoint_norm == value for b in blocks)


def test_the_solver_tables_adjoint_norm_defaults_to_the_blocks(tmp_path):
    from train_helpers import tiny, write_toml

    from node_ocp.train import build_task, load_config

    cfg = load_config(write_toml(tmp_path / "c.toml", tiny()))
    assert cfg.solver.adjoint_norm == "seminorm"
    blocks = [m for m in build_task(cfg, "cpu").model.modules() if isinstance(m, no.ODEBlock)]
    assert blocks and all(b.adjoint_norm == "seminorm" for b in blocks)


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"solver.adjoint_norm": "l2"}, r"\[solver\]\.adjoint_norm: received 'l2'; accepted: "
         r"one of 'seminorm', 'state', 'full'"),
        ({"solver.adjoint_norm": "full", "solver.step_control": "per_sample",
          "solver.backend": "own"},
         r"\[solver\]\.adjoint_norm \(with step_control = 'per_sample'\): received 'full'"),
    ],
)  # fmt: skip
def test_a_bad_solver_table_adjoint_norm_is_refused_in_one_line(tmp_path, keys, match):
    from train_helpers import tiny, write_toml

    from node_ocp.train import load_config
    from node_ocp.train.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(write_toml(tmp_path / "c.toml", tiny(**keys)))
