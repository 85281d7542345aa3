"""The ODE core's own interfaces: the capture interface the solves call
(``BackwardCapture``), the settings and counters records the helpers receive instead of the
block, and the block's attributes that read them."""

import pytest
import torch
from conftest import mlp_field

import node_ocp as no
from node_ocp.ode import backward_capture
from node_ocp.ode.adjoint import AdjointSolve, forward_solve
from node_ocp.ode.backward_capture import BackwardCapture
from node_ocp.ode.factors import SolveRecord
from node_ocp.ode.reference import torchdiffeq_solve
from node_ocp.ode.settings import make_settings
from node_ocp.ode.solvers import make_spec

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


class Recorder:
    """A minimal capture: the members of ``BackwardCapture`` and nothing else (not a
    ``CurvatureCapture``); it writes down every call with the shapes it received."""

    def __init__(self, kronecker: bool = True, dense: bool = True, samples: int = 3):
        self.kronecker_enabled = kronecker
        self.dense_enabled = dense
        self.samples = samples
        self.calls: list[tuple] = []

    def record_call(self, record, x0, out):
        record.output = out  # so that terminal factors can be set on the record
        self.calls.append(("record_call", record, tuple(x0.shape), tuple(out.shape)))

    def sample_grid(self, t_start, t_end, like):
        n = self.samples
        frac = (torch.arange(n, dtype=like.dtype, device=like.device) + 0.5) / n
        times = t_start + frac * (t_end - t_start)
        self.calls.append(("sample_grid", float(t_start), float(t_end)))
        return times, abs(float(t_end - t_start)) / n

    def accumulate_kronecker(self, field, times, weight, states, factors):
        self.calls.append(
            ("accumulate_kronecker", field, times.clone(), weight, states.clone(), factors.clone())
        )
        return 2  # "evaluations made"

    def accumulate_dense(self, block, names, p):
        self.calls.append(("accumulate_dense", block, list(names), p.clone()))


def _names(calls):
    return [c[0] for c in calls]


def test_curvature_capture_implements_the_declared_interface():
    capture = no.CurvatureCapture()
    assert isinstance(capture, BackwardCapture)
    assert isinstance(Recorder(), BackwardCapture)
    declared = set(BackwardCapture.__annotations__) | {
        n for n, v in vars(BackwardCapture).items() if callable(v) and not n.startswith("_")
    }
    assert declared == set(backward_capture.MEMBERS)


@pytest.mark.parametrize("rank", [0, 2])
def test_a_minimal_capture_receives_the_documented_calls_and_shapes(rank):
    field = mlp_field()  # state (B, 3)
    n_par = sum(p.numel() for p in field.parameters())
    grid = [0.0, 0.4, 1.0]
    block = no.ODEBlock(field, grid, **TIGHT)
    capture = Recorder()
    block.attach_capture(capture)
    assert block.capture is capture
    x0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    out = block(x0)  # (T, B, 3)
    assert _names(capture.calls) == ["record_call"]
    _, record, x_shape, out_shape = capture.calls[0]
    assert isinstance(record, SolveRecord) and record.block is block
    assert (x_shape, out_shape) == ((4, 3), (3, 4, 3))
    if rank:
        record.set_terminal_factors(torch.randn(rank, *out.shape, dtype=F64))
    (out**2).sum().backward()

    r = max(rank, 1)
    # per interval, last first: sample_grid then accumulate_kronecker; dense once at the end
    assert _names(capture.calls[1:]) == [
        "sample_grid",
        "accumulate_kronecker",
        "sample_grid",
        "accumulate_kronecker",
        "accumulate_dense",
    ]
    assert capture.calls[1][1:] == pytest.approx((1.0, 0.4))
    assert capture.calls[3][1:] == pytest.approx((0.4, 0.0))
    for call, (t1, t0) in zip((capture.calls[2], capture.calls[4]), [(1.0, 0.4), (0.4, 0.0)]):
        _, got_field, times, weight, states, factors = call
        assert got_field is field
        assert times.shape == (3,) and times.dtype == F64
        assert weight == pytest.approx(abs(t1 - t0) / 3)
        assert states.shape == (3, 4, 3)  # (S, B, *feat)
        assert factors.shape == (3, r, 4, 3)  # (S, R, B, *feat)
    _, key, names, p = capture.calls[5]
    assert key is block
    assert names == [n for n, _ in field.named_parameters()]
    assert p.shape == (r, 4, n_par)  # (R, B, P)
    assert block.nfe_capture == 4  # the two returns of accumulate_kronecker
    assert record.input_factors.shape == (r, 4, 3)

    # the states handed over are the trajectory x(t_j) at the sample times
    _, _, times, _, states, _ = capture.calls[2]
    with torch.no_grad():
        direct = no.ODEBlock(
            field, torch.cat([torch.tensor([0.0], dtype=F64), times.flip(0)]), **TIGHT
        )
        want = direct(x0.detach())[1:].flip(0)
    torch.testing.assert_close(states, want, rtol=1e-6, atol=1e-6)


def test_the_minimal_capture_gets_what_curvature_capture_gets():
    """Same dense integrals for the Recorder and ``CurvatureCapture`` on the same call."""
    field = mlp_field()
    block = no.ODEBlock(field, (0.0, 0.7), **TIGHT)
    x0 = torch.randn(5, 3, dtype=F64)
    ps = []
    for capture in (Recorder(kronecker=False), no.CurvatureCapture(kronecker=False, dense=True)):
        block.attach_capture(capture)
        block(x0).pow(2).sum().backward()
        block.detach_capture(capture)
        ps.append(capture.calls[-1][3] if isinstance(capture, Recorder) else capture.dense[block].p)
    torch.testing.assert_close(ps[0], ps[1], rtol=0, atol=0)


def test_an_incomplete_capture_is_refused_naming_what_it_lacks():
    class Half:
        kronecker_enabled = True
        dense_enabled = False

        def record_call(self, record, x0, out):
            pass

    block = no.ODEBlock(mlp_field(), (0.0, 1.0))
    with pytest.raises(TypeError, match="lacks: sample_grid, accumulate_kronecker"):
        block.attach_capture(Half())
    assert block.capture is None


# ---------------------------------------------------------------------- settings, counters
def test_block_attributes_read_and_write_its_settings_and_counters():
    block = no.ODEBlock(mlp_field(), (0.0, 1.0), method="rk4", options={"step_size": 0.25})
    s = block.settings
    assert block.solver is s.forward and block.adjoint_solver is s.backward
    assert (block.method, block.options, block.adjoint_norm) == (
        "rk4",
        {"step_size": 0.25},
        s.adjoint_norm,
    )
    assert (block.rtol, block.atol, block.check_finite) == (s.forward.rtol, s.forward.atol, True)
    block.solver = make_spec("dopri5", 1e-6, 1e-7, None)
    assert block.settings.forward.method == "dopri5" and block.settings.backward.method == "rk4"
    block.name = "mine"
    assert block.settings.name == "mine"
    with pytest.raises(ValueError, match="adjoint_norm"):
        block.adjoint_norm = "l2"
    with pytest.raises(TypeError, match="solver"):
        block.solver = "dopri5"

    counters = block.counters
    block(torch.randn(2, 3, dtype=F64))
    assert block.nfe_forward == counters.forward > 0 and block.nfe_backward == 0
    block.nfe_forward += 1000
    assert counters.forward == block.nfe_forward
    block.reset_nfe()
    assert block.counters is counters and (counters.forward, counters.backward) == (0, 0)


@pytest.mark.parametrize("gradient", ["adjoint", "torchdiffeq"])
def test_the_solves_run_on_settings_and_counters_without_a_block(gradient):
    field = mlp_field()
    settings = make_settings("dopri5", 1e-8, 1e-8, None, name="bare")
    counters = no.ode.SolveCounters()
    x0 = torch.randn(3, 3, dtype=F64, requires_grad=True)
    grid = torch.tensor([0.0, 0.6], dtype=F64)
    params = tuple(field.parameters())
    if gradient == "adjoint":
        ys = AdjointSolve.apply(
            field, settings, counters, SolveRecord(None, False), x0, grid, *params
        )
    else:
        ys = torchdiffeq_solve(field, settings, counters, x0, grid)
    grads = torch.autograd.grad(ys[-1].pow(2).sum(), (x0, *params))
    assert counters.forward > 0 and counters.backward > 0

    block = no.ODEBlock(field, (0.0, 0.6), rtol=1e-8, atol=1e-8, gradient=gradient)
    want = torch.autograd.grad(block(x0).pow(2).sum(), (x0, *params))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert (counters.forward, counters.backward) == (block.nfe_forward, block.nfe_backward)


def test_a_failing_solve_names_the_settings_name():
    settings = make_settings("dopri5", 1e-8, 1e-8, {"max_num_steps": 2}, name="named block")
    with torch.no_grad(), pytest.raises(no.SolverError, match="named block: in the forward solve"):
        forward_solve(
            mlp_field(),
            settings,
            no.ode.SolveCounters(),
            torch.randn(2, 3, dtype=F64),
            torch.tensor([0.0, 5.0], dtype=F64),
        )
