"""Neural CDE at initialisation: outputs on the scale of the loss.

The field's last linear map starts at zero, so the CDE state keeps its initial value (a
linear map of the path's first point) until the optimizer grows the field, whatever the
scale of the path's increments. With the usual initialisation the state moved by about
``f · (X(t1) − X(t0))`` and BasicMotions' raw channels (up to ~35) gave initial logits with
a standard deviation of ~20 and a cross-entropy of ~19 for 4 classes.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from node_ocp.data import collate_irregular
from node_ocp.train import build_task, load_config

pytest.importorskip("torchcde")
from node_ocp.models import NeuralCDE  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_cde_classifier_starts_with_calibrated_logits_on_basic_motions():
    pytest.importorskip("sktime")
    cfg = load_config(CONFIGS / "ts_basic_motions.toml")
    assert cfg.model.kind == "cde"
    torch.manual_seed(0)
    task = build_task(cfg)
    train = task.data.train
    with torch.no_grad():
        logits = task.model(train.x)
    classes = logits.shape[1]
    ce = F.cross_entropy(logits, train.y).item()
    assert abs(ce - math.log(classes)) < 0.5, ce
    assert logits.std().item() < 2.0


@pytest.mark.parametrize("task", ["classification", "forecast"])
def test_cde_state_starts_still_and_the_field_gets_a_gradient(task):
    torch.manual_seed(0)
    model = NeuralCDE(2, 3, hidden=4, field_hidden=(8,), task=task).double()
    g = torch.Generator().manual_seed(0)
    items = [
        (torch.tensor([0.0, 0.4, 1.0]), 30 * torch.randn(3, 2, generator=g), None),
        (torch.tensor([0.0, 0.5, 0.7, 1.0]), 30 * torch.randn(4, 2, generator=g), None),
    ]
    batch = collate_irregular([(t.double(), v.double(), m) for t, v, m in items])
    seen = {}
    model.initial.register_forward_hook(lambda m, i, o: seen.__setitem__("z0", o))
    model.ode.register_forward_hook(lambda m, i, o: seen.__setitem__("z1", o))
    if task == "classification":
        out = model(batch)
    else:
        out = model(batch, torch.tensor([[1.0, 1.5], [1.0, 2.0]], dtype=torch.float64))
    # increments of scale 30 leave the state where the initial map put it
    assert torch.allclose(seen["z1"], seen["z0"], rtol=0, atol=1e-12)
    out.square().sum().backward()
    last = model.field.net[-2]
    assert last.weight.grad.abs().max() > 0  # the field grows from the first step
