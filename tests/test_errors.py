"""Every user-facing error of the core, pinned with its message."""

import pytest
import torch
from conftest import mlp_field
from torch import nn

import node_ocp as no

F64 = torch.float64


def test_unknown_method():
    with pytest.raises(ValueError, match=r"method: received 'rk45'; accepted: one of 'dopri5'"):
        no.ODEBlock(mlp_field(), method="rk45")
    with pytest.raises(ValueError, match=r"adjoint_method: received 'bogus'"):
        no.ODEBlock(mlp_field(), adjoint_method="bogus")


def test_unknown_gradient_mode_and_norm():
    with pytest.raises(
        ValueError, match=r"gradient: received 'backprop'; accepted: one of 'adjoint', 'direct'"
    ):
        no.ODEBlock(mlp_field(), gradient="backprop")
    with pytest.raises(ValueError, match=r"adjoint_norm: received 'l2'"):
        no.ODEBlock(mlp_field(), adjoint_norm="l2")


@pytest.mark.parametrize(
    "t, message",
    [
        ([0.0, 0.5, 0.5, 1.0], "strictly increasing or strictly decreasing"),
        ([0.0, 0.5, 0.2], "strictly increasing or strictly decreasing"),
        ([1.0], "at least 2 points"),
        (torch.zeros(2, 2), "1-D time grid with at least 2 points"),
        ([0.0, float("nan")], "finite times"),
        ("0,1", "a pair"),
    ],
)
def test_bad_time_grid(t, message):
    with pytest.raises((ValueError, TypeError), match=message):
        no.ODEBlock(mlp_field(), t=t)
    block = no.ODEBlock(mlp_field())
    with pytest.raises((ValueError, TypeError), match=message):
        block(torch.randn(2, 3, dtype=F64), t)


@pytest.mark.parametrize("arg", ["rtol", "atol", "adjoint_rtol", "adjoint_atol"])
@pytest.mark.parametrize("value", [0.0, -1e-3])
def test_non_positive_tolerance(arg, value):
    with pytest.raises(ValueError, match=rf"{arg}: received {value}; accepted: a finite float > 0"):
        no.ODEBlock(mlp_field(), **{arg: value})


def test_step_size_with_adaptive_method():
    with pytest.raises(ValueError, match=r"'step_size' only with a fixed-grid method"):
        no.ODEBlock(mlp_field(), method="dopri5", options={"step_size": 0.1})


def test_field_that_is_not_a_module():
    with pytest.raises(TypeError, match=r"field: received an object of type function"):
        no.ODEBlock(lambda t, x: x)


class WrongShape(nn.Module):
    def forward(self, t, x):
        return x[:, :2]


class WrongDtype(nn.Module):
    def forward(self, t, x):
        return x.float()


@pytest.mark.parametrize("gradient", ["adjoint", "direct"])
def test_field_output_shape_or_dtype_differs(gradient):
    x0 = torch.randn(2, 3, dtype=F64)
    with pytest.raises(
        ValueError, match=r"returned shape \(2, 2\) .* for a state of shape \(2, 3\)"
    ):
        no.ODEBlock(WrongShape(), gradient=gradient)(x0)
    with pytest.raises(ValueError, match=r"dtype torch.float32 for a state .* dtype torch.float64"):
        no.ODEBlock(WrongDtype(), gradient=gradient)(x0)


def test_non_finite_x0():
    x0 = torch.randn(2, 3, dtype=F64)
    x0[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x0: .* accepted: finite values only"):
        no.ODEBlock(mlp_field())(x0)


def test_integer_x0():
    with pytest.raises(ValueError, match=r"x0: .*accepted: a float32/float64 tensor"):
        no.ODEBlock(mlp_field())(torch.ones(2, 3, dtype=torch.long))


def test_factors_of_wrong_shape():
    block = no.ODEBlock(mlp_field())
    capture = no.CurvatureCapture(kronecker=False)
    with capture.active(block):
        out = block(torch.randn(4, 3, dtype=F64))
        with pytest.raises(
            ValueError,
            match=r"factors: received .*shape=\(2, 4, 2\).* accepted: shape \(R, 4, 3\)",
        ):
            capture.set_terminal_factors(out, torch.randn(2, 4, 2, dtype=F64))
        with pytest.raises(ValueError, match=r"accepted: dtype torch.float64"):
            capture.set_terminal_factors(out, torch.randn(2, 4, 3))
        with pytest.raises(ValueError, match=r"output: .* the tensor an ODEBlock returned"):
            capture.set_terminal_factors(out * 2, torch.randn(1, 4, 3, dtype=F64))
        with pytest.raises(ValueError, match=r"backward pass through this block output has not"):
            capture.propagated_factors(out)


class BlowUp(nn.Module):
    """dx/dt = x², x(0) = 10 blows up at t = 0.1."""

    def forward(self, t, x):
        return x**2


def test_step_size_underflow_names_block_time_and_remedy():
    block = no.ODEBlock(BlowUp(), (0.0, 1.0), name="encoder")
    with pytest.raises(
        no.SolverError,
        match=r"encoder: in the forward solve .* underflowed at t=0\.1\d*\. Remedies",
    ):
        block(torch.full((1, 1), 10.0, dtype=F64))


def test_non_finite_state_with_fixed_steps():
    block = no.ODEBlock(BlowUp(), [0.0, 0.5, 1.0], method="euler", options={"step_size": 0.05})
    with pytest.raises(
        no.SolverError, match=r"became non-finite; first bad output at t=1 .*Remedies"
    ):
        block(torch.full((1, 1), 10.0, dtype=F64))


def test_max_num_steps():
    block = no.ODEBlock(
        mlp_field(), (0.0, 1.0), rtol=1e-12, atol=1e-12, options={"max_num_steps": 3}
    )
    with pytest.raises(no.SolverError, match=r"maximum number of steps was exceeded"):
        block(torch.randn(2, 3, dtype=F64))


def test_capture_errors():
    with pytest.raises(ValueError, match=r"sample_dt: received 0.0; accepted: a finite float > 0"):
        no.CurvatureCapture(sample_dt=0.0)
    with pytest.raises(ValueError, match=r"max_rows: received 0"):
        no.CurvatureCapture(max_rows=0)
    capture = no.CurvatureCapture()
    with pytest.raises(
        ValueError,
        match=r"model: received 'Linear'; accepted: a module containing at least one ODEBlock",
    ):
        capture.attach(nn.Linear(2, 2))
    with pytest.raises(
        ValueError, match=r"gradient: received 'direct'; accepted: 'adjoint' for curvature capture"
    ):
        capture.attach(no.ODEBlock(mlp_field(), gradient="direct"))


def test_time_layers_reject_mismatched_times():
    layer = no.ConcatLinear(3, 2)
    with pytest.raises(ValueError, match=r"t: .* one time per batch row \(4 rows"):
        layer(torch.zeros(3), torch.randn(4, 3))
