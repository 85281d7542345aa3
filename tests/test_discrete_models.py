"""The deep discrete networks (``[model].kind`` ``mlp`` and ``cnn``, no ODE block) on the
bundled 8×8 digits: they train through ``train``, OCNOpt gives every layer Kronecker factors
from its hooks, and OCNOpt's feedback policies find every layer as a stage for each factor
source."""

import math
import warnings

import pytest
import torch
from torch import nn
from train_helpers import tiny  # noqa: I001  (tests/ is on sys.path)

import node_ocp as no
from node_ocp.models import DeepMLP, SmallCNN
from node_ocp.optim.curvatures.kronecker import KroneckerUnit
from node_ocp.optim.feedback import find_stages
from node_ocp.train import ConfigError, RunOptions, config_from_dict, train
from node_ocp.train.tasks import build_task

DIGITS = {"task.kind": "classification", "task.dataset": "digits"}
MODELS = {
    "mlp": {"model.kind": "mlp", "model.hidden": [16, 16, 16, 16, 16], "model.activation": "tanh"},
    "cnn": {"model.kind": "cnn", "model.hidden": [4, 8, 8], "model.activation": "relu"},
}


def _task(kind: str, **over):
    torch.manual_seed(0)
    return build_task(config_from_dict(tiny(**DIGITS, **MODELS[kind], **over)))


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_discrete_model_trains_two_steps_through_train(tmp_path, kind):
    over = {"train.steps": 2, "train.eval_every": 1, "train.batch_size": 32}
    cfg = config_from_dict(tiny(**DIGITS, **MODELS[kind], **over))
    for opt in ("ocnopt", "adam"):
        s = train(cfg, tmp_path / opt, RunOptions(optimizer=opt, progress=False))
        assert s["steps"] == 2 and math.isfinite(s["test_metric"]) and not s["diverged"]


def test_the_models_have_the_layers_their_widths_ask_for():
    mlp = DeepMLP(64, 10, hidden=(32,) * 7, activation="relu")
    assert [m.out_features for m in _layers(mlp)] == [32] * 7 + [10]
    assert mlp(torch.randn(5, 1, 8, 8)).shape == (5, 10)  # images flattened
    cnn = SmallCNN(1, (8, 8), 10, hidden=(16, 32, 32, 32))
    assert [type(m).__name__ for m in _layers(cnn)] == ["Conv2d"] * 4 + ["Linear"]
    assert sum(isinstance(m, nn.MaxPool2d) for m in cnn) == 2
    assert cnn(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    one = SmallCNN(3, (6, 10), 2, hidden=(4,))  # one conv stage: pooled once
    assert one(torch.randn(2, 3, 6, 10)).shape == (2, 2)
    with pytest.raises(ValueError, match=r"hidden: received \[\]; accepted: a non-empty"):
        DeepMLP(64, 10, hidden=[])
    with pytest.raises(ValueError, match=r"activation: received 'gelu'; accepted: one of"):
        SmallCNN(1, (8, 8), 10, activation="gelu")
    with pytest.raises(ValueError, match=r"size: received \(2, 8\); accepted: images of at"):
        SmallCNN(1, (2, 8), 10)


def test_a_cnn_refuses_vector_inputs_in_one_line():
    cfg = tiny(kind="horizon", **{"model.kind": "cnn"})
    del cfg["horizon"]
    with pytest.raises(ConfigError, match=r"^\[model\]\.kind: 'cnn' needs image inputs"):
        build_task(config_from_dict(cfg))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ocnopt_gives_every_layer_kronecker_factors(kind):
    task = _task(kind)
    opt = no.OCNOpt(task.model)
    layers = _layers(task.model)
    assert all(isinstance(opt.unit_of(m), KroneckerUnit) for m in layers)
    covered = {p for u in opt.units for p in u.params}
    assert covered == set(task.model.parameters())


@pytest.mark.parametrize("factors", ["empirical", "sampled", "exact"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_feedback_finds_every_layer_as_a_stage_for_each_factor_source(kind, factors):
    task = _task(kind)
    model = task.model
    stages, why = find_stages(model)
    assert why is None and stages == _layers(model)
    batch = task.data.train.batch(torch.arange(64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no open-loop fallback warning
        opt = no.OCNOpt(model, feedback="gauss_newton", factors=factors)
        losses = []
        for _ in range(4):
            r = no.train_step(opt, lambda: task.outputs_and_loss(batch), likelihood="categorical")
            losses.append(r.loss)
    fb = opt.last_feedback
    assert fb.reason == "ok" and opt.feedback_failures == 0 and opt.feedback_steps == 4
    # every stage but the first takes a gain (the first's input, the data, never moves)
    assert (fb.closed, fb.open) == (len(stages) - 1, 1)
    assert fb.gain_ratio > 0 and math.isfinite(fb.loss)
    assert losses[-1] < losses[0]
