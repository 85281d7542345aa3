"""ODE image classifier and Neural CDE: shapes, both gradient modes, short training runs."""

import pytest
import torch
from conftest import irregular_spirals, ocnopt_step

import node_ocp as no
from node_ocp.data import collate_irregular
from node_ocp.models import ODEImageClassifier

F64 = torch.float64


@pytest.mark.parametrize("gradient", ["adjoint", "direct"])
def test_image_classifier_trains_on_digits(gradient):
    pytest.importorskip("sklearn")
    from node_ocp.data import digits_images

    torch.manual_seed(0)
    data = digits_images(seed=0)
    model = ODEImageClassifier(channels=8, gradient=gradient)
    if gradient == "adjoint":
        opt = no.OCNOpt(model, update_every=10, sample_dt=0.1)
    else:  # curvature capture is part of the own adjoint; backprop runs with a first-order rule
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = data.val.x, data.val.y
    with torch.no_grad():
        first = loss_fn(model(x), y).item()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        idx = torch.randint(0, len(data.train), (64,), generator=g)

        def compute(idx=idx):
            logits = model(data.train.x[idx])
            return loss_fn(logits, data.train.y[idx]), logits

        if gradient == "adjoint":
            ocnopt_step(opt, compute, "categorical")
        else:
            opt.zero_grad()
            compute()[0].backward()
            opt.step()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (len(data.val), 10)
    assert loss_fn(logits, y).item() < 0.6 * first  # 0.53 with OMP_NUM_THREADS=1


@pytest.mark.parametrize("interpolation", ["hermite", "linear"])
@pytest.mark.parametrize("gradient", ["adjoint", "direct"])
def test_neural_cde_trains_on_irregular_spirals(interpolation, gradient):
    pytest.importorskip("torchcde")
    from node_ocp.models import NeuralCDE

    torch.manual_seed(0)
    batch, y = irregular_spirals(48, 0)
    model = NeuralCDE(
        2, 2, hidden=8, field_hidden=(16,), interpolation=interpolation, gradient=gradient
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        first = loss_fn(model(batch), y).item()
    for _ in range(30):
        opt.zero_grad()
        loss_fn(model(batch), y).backward()
        opt.step()
    with torch.no_grad():
        last = loss_fn(model(batch), y).item()
    assert last < 0.5 * first, (first, last)


def test_neural_cde_path_and_padding():
    pytest.importorskip("torchcde")
    from node_ocp.models import NeuralCDE

    torch.manual_seed(0)
    model = NeuralCDE(2, 3, hidden=4, field_hidden=(8,), rtol=1e-8, atol=1e-8).double()
    short = (torch.tensor([0.0, 0.5, 1.0], dtype=F64), torch.randn(3, 2, dtype=F64), None)
    long = (torch.tensor([0.0, 0.25, 0.5, 1.0, 1.5], dtype=F64), torch.randn(5, 2, dtype=F64), None)
    grid, data = model.path_data(collate_irregular([short, long]))
    assert grid.tolist() == [0.0, 0.25, 0.5, 1.0, 1.5]
    assert data.shape == (2, 5, 5)
    assert torch.isnan(data[0, 1, 1:3]).all()  # the short series has no observation at 0.25
    # cumulative observation counts as fractions of the series' time points
    assert data[0, 3, 3:].tolist() == [1.0, 1.0]  # short: 3 of 3 seen at t=1
    assert data[1, 1, 3:].tolist() == [2 / 5, 2 / 5]  # long: 2 of 5 seen at t=0.25
    assert torch.isnan(data[0, -1]).all()  # after its last observation: filled by torchcde
    # With linear interpolation the path of the short series is constant after its last
    # observation, so padding it with a longer series leaves its output unchanged.
    lin = NeuralCDE(
        2, 3, hidden=4, field_hidden=(8,), interpolation="linear", rtol=1e-8, atol=1e-8
    ).double()
    alone = lin(collate_irregular([short]))
    together = lin(collate_irregular([short, long]))
    assert torch.allclose(alone[0], together[0], atol=1e-6)


def test_neural_cde_forecasts_at_query_times():
    pytest.importorskip("torchcde")
    from node_ocp.models import NeuralCDE

    torch.manual_seed(0)
    model = NeuralCDE(2, 2, hidden=4, field_hidden=(8,), task="forecast").double()
    short = (torch.tensor([0.0, 0.5, 1.0], dtype=F64), torch.randn(3, 2, dtype=F64), None)
    long = (torch.tensor([0.0, 0.25, 0.5, 1.5], dtype=F64), torch.randn(4, 2, dtype=F64), None)
    batch = collate_irregular([short, long])
    queries = torch.tensor([[1.0, 2.0], [1.5, 2.0]], dtype=F64)
    preds = model(batch, queries)
    assert preds.shape == (2, 2, 2)
    # At its last observation time a series' forecast is the head of its encoded state.
    clf = NeuralCDE(2, 2, hidden=4, field_hidden=(8,)).double()
    clf.load_state_dict(model.state_dict(), strict=False)
    assert torch.allclose(preds[:, 0], clf(batch), atol=1e-10)
    assert (preds[:, 1] - preds[:, 0]).abs().max() > 1e-6  # the decoder moved the state
    target = torch.zeros_like(preds)
    loss = ((preds - target) ** 2).mean()
    loss.backward()
    assert model.decoder.field.layers[0].linear.weight.grad is not None
    with pytest.raises(ValueError, match=r"query_times: .* a \(2, Q\) tensor of times"):
        model(batch)
