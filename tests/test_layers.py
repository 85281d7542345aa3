"""Time-conditioned layers: shapes, formulas, and per-row times equal to scalar times."""

import pytest
import torch
from torch import nn

import node_ocp as no

F64 = torch.float64


@pytest.mark.parametrize(
    "layer, x",
    [
        (no.ConcatLinear(3, 5), torch.randn(4, 3, dtype=F64)),
        (no.ConcatSquashLinear(3, 5), torch.randn(4, 3, dtype=F64)),
        (no.ConcatConv2d(2, 3, 3, padding=1), torch.randn(4, 2, 5, 5, dtype=F64)),
        (no.ConcatSquashConv2d(2, 3, 3, padding=1), torch.randn(4, 2, 5, 5, dtype=F64)),
    ],
)
def test_per_row_times_equal_scalar_times(layer, x):
    layer = layer.double()
    times = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=F64)
    batched = layer(times, x)
    for i, t in enumerate(times):
        single = layer(t, x[i : i + 1])
        assert torch.allclose(batched[i : i + 1], single, atol=1e-12)
    assert batched.shape[0] == 4 and batched.shape[1] in (5, 3)


def test_concat_linear_formula():
    layer = no.ConcatLinear(2, 1).double()
    x = torch.randn(3, 2, dtype=F64)
    t = torch.tensor(0.4, dtype=F64)
    w, b = layer.linear.weight, layer.linear.bias
    expected = x @ w[:, :2].T + 0.4 * w[:, 2] + b
    assert torch.allclose(layer(t, x), expected)


def test_concat_squash_formula():
    layer = no.ConcatSquashLinear(2, 3).double()
    x = torch.randn(3, 2, dtype=F64)
    t = torch.tensor(0.4, dtype=F64)
    gate = torch.sigmoid(layer.gate.weight[:, 0] * 0.4 + layer.gate.bias)
    expected = layer.linear(x) * gate + layer.hyper_bias.weight[:, 0] * 0.4
    assert torch.allclose(layer(t, x), expected)


def test_time_sequential_and_taps_find_inner_layers():
    field = no.TimeSequential(no.ConcatSquashLinear(2, 4), nn.Softplus(), no.ConcatLinear(4, 2))
    assert field.accepts_batched_time
    taps = no.curvature.tapped_modules(field)
    assert len(taps) == 4  # linear, gate, hyper_bias, and the concat layer's linear
    assert all(isinstance(m, nn.Linear) for m in taps)
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    assert not no.curvature.is_tapped(grouped)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("padding", [1, "same"])
def test_conv_patches_reproduce_the_convolution(padding_mode, padding):
    conv = nn.Conv2d(2, 3, 3, padding=padding, padding_mode=padding_mode, dilation=1).double()
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    rows = no.curvature.input_rows(conv, x)  # (N, L, K+1)
    w = torch.cat([conv.weight.reshape(3, -1), conv.bias[:, None]], 1)
    out = (rows @ w.T).transpose(1, 2).reshape(2, 3, 5, 5)
    assert torch.allclose(out, conv(x), atol=1e-12)
