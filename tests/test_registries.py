"""Every registered task kind and model kind, and every optimizer adapter, through the same
contract: built from a bundled config, one training step through the adapter; unknown
kinds are one ConfigError line naming the key, what it received and what it accepts."""

import math
from pathlib import Path

import pytest
import torch
from train_helpers import tiny  # noqa: I001  (tests/ is on sys.path)

from node_ocp.train import ConfigError, config_from_dict, load_config, train_step
from node_ocp.train.adapters import (
    OCNOptAdapter,
    OptimizerAdapter,
    adapt,
    adapter_for,
    build_adapter,
)
from node_ocp.train.model_kinds import MODELS, ModelKind
from node_ocp.train.registry import Registry
from node_ocp.train.task_kinds import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _bundled() -> dict[tuple[str, str], Path]:
    """The first bundled config of each (task kind, model kind), procedural data first
    (UEA/UCR archives, capitalised, and user files last)."""
    found: dict[tuple[str, str], Path] = {}
    paths = sorted(CONFIGS.glob("*.toml"))
    for path in sorted(paths, key=lambda p: _needs(load_config(p).task.dataset)):
        cfg = load_config(path)
        found.setdefault((cfg.task.kind, cfg.model.kind), path)
    return found


def _needs(dataset: str) -> int:
    return 2 if dataset == "file" else int(dataset[:1].isupper())


BUNDLED = _bundled()
PAIRS = [(t.name, m.name) for t in TASKS for m in MODELS if t.name in m.tasks]


def test_every_registered_kind_has_a_bundled_config():
    assert {t for t, _ in BUNDLED} == set(TASKS.names())
    assert {m for _, m in BUNDLED} == set(MODELS.names())
    assert set(PAIRS) <= set(BUNDLED), sorted(set(PAIRS) - set(BUNDLED))


def _small(path: Path):
    cfg = load_config(path)
    if cfg.task.dataset[:1].isupper():
        pytest.importorskip("sktime")
    cfg.task.n_train, cfg.task.n_val, cfg.task.n_test = 32, 8, 8
    cfg.model.hidden = [8]
    cfg.model.width = min(cfg.model.width, 8)
    cfg.model.blocks = 1
    cfg.solver.rtol = cfg.solver.atol = 1e-2
    return cfg


@pytest.mark.parametrize(("task_kind", "model_kind"), PAIRS)
def test_each_kind_builds_from_its_bundled_config_and_steps_through_each_adapter(
    task_kind, model_kind
):
    from node_ocp.train.tasks import build_task

    cfg = _small(BUNDLED[task_kind, model_kind])
    tables = {}  # the first table of each adapter (adam, sgd, ocnopt)
    for n, t in cfg.optimizers.items():
        if not t.is_class_path and adapter_for(t) not in map(adapter_for, tables.values()):
            tables[n] = t
    assert tables, "a bundled config has optimizer tables"
    for name, table in tables.items():
        torch.manual_seed(0)
        task = build_task(cfg)
        assert type(task) is TASKS[task_kind] and task.kind == task_kind
        assert task.metric in task.metrics(1.0, 1.0, 1.0)
        opt = build_adapter(table, task.model, seed=0)
        assert type(opt) is adapter_for(table), name  # the table's kind and the built type agree
        batch = task.data.train.batch(torch.arange(8))
        before = [p.detach().clone() for p in task.model.parameters()]
        kind = opt.next_kind()
        r = train_step(
            opt,
            lambda task=task, batch=batch: task.outputs_and_loss(batch),
            blocks=task.blocks,
            likelihood=task.likelihood,
        )
        assert math.isfinite(r.loss) and r.kind == kind, (name, r)
        after = list(task.model.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), name
        assert math.isfinite(opt.current_lr()) or adapter_for(table).uncapped_lr(table)
        assert isinstance(opt.metrics(), dict) and isinstance(opt.state_dict(), dict)


def test_adapt_chooses_by_the_optimizer_class_and_keeps_an_adapter():
    model = torch.nn.Linear(2, 1)
    sgd = adapt(torch.optim.SGD(model.parameters(), lr=0.1))
    assert type(sgd).__name__ == "SGDAdapter" and adapt(sgd) is sgd
    rprop = adapt(torch.optim.Rprop(model.parameters()))
    assert type(rprop) is OptimizerAdapter and rprop.next_kind() == "plain"
    assert adapter_for("ocnopt") is OCNOptAdapter
    assert adapter_for("torch.optim.Rprop") is OptimizerAdapter  # a class path
    assert adapter_for("adam").reference and not adapter_for("sgd").reference


@pytest.mark.parametrize(
    ("key", "value", "accepted"),
    [
        ("task.kind", "survival", "'density', 'image_density', 'classification', 'forecast'"),
        (
            "model.kind",
            "transformer",
            "'cnf', 'image_cnf', 'ode_mlp', 'image', 'mlp', 'cnn', 'odernn', 'cde', 'latent_ode'",
        ),
    ],
)
def test_an_unknown_kind_is_one_line_naming_key_received_and_accepted(key, value, accepted):
    table, field = key.split(".")
    with pytest.raises(ConfigError) as err:
        config_from_dict(tiny(**{key: value}))
    text = str(err.value)
    assert text == f"[{table}].{field}: received {value!r}; accepted: one of {accepted}"
    registry = TASKS if table == "task" else MODELS
    with pytest.raises(ConfigError, match=rf"^\[{table}\]\.{field}: received {value!r};"):
        registry[value]


def test_a_registry_refuses_a_second_class_under_a_taken_name():
    reg: Registry = Registry("[model].kind")

    class A(ModelKind):
        name = "a"

    class B(ModelKind):
        name = "a"

    assert reg.register(A) is A and reg.register(A) is A
    with pytest.raises(ValueError, match="already registered as A"):
        reg.register(B)
    assert reg.names() == ("a",) and "a" in reg and list(reg) == [A]


def test_a_new_model_kind_is_one_registration(tmp_path, monkeypatch):
    # a user's model kind: one class, registered (here only for this test), trains end to end
    from node_ocp.train import RunOptions, train
    from node_ocp.train.model_kinds import AugmentedODEClassifier, solver_settings

    class PlainODE(ModelKind):
        """An ODE classifier without augmentation."""

        name = "plain_ode"
        tasks = ("classification",)

        @classmethod
        def build(cls, config, data, task):
            x = data.train.x
            return AugmentedODEClassifier(
                x.shape[1], task.output_size(data), 0, [8], 1.0, solver_settings(config)
            )

    monkeypatch.setitem(MODELS._kinds, PlainODE.name, PlainODE)
    over = {"task.kind": "classification", "task.dataset": "spirals", "train.steps": 3}
    cfg = config_from_dict(tiny(**over, **{"model.kind": "plain_ode"}))
    s = train(cfg, tmp_path, RunOptions(optimizer="ocnopt", progress=False))
    assert s["steps"] == 3 and math.isfinite(s["test_metric"]) and s["task"] == "classification"


SERIES = {
    "task.kind": "forecast",
    "task.dataset": "spiral",
    "task.n_train": 16,
    "task.n_val": 8,
    "task.n_test": 8,
    "model.kind": "odernn",
    "model.width": 4,
}


@pytest.mark.parametrize(
    ("over", "words"),
    [
        (
            {"horizon.mode": "feedback"},
            "[horizon]: a model of kind 'odernn' with 1 ODE block(s); accepted: a model with "
            "one ODE block",
        ),
        (
            {"optimizers.ocnopt": {"kind": "ocnopt", "factors": "exact"}},
            "[optimizers.ocnopt].factors: received 'exact' for a odernn forecast model whose "
            "loss reaches the ODE block at several times; accepted: 'auto', 'empirical'",
        ),
    ],
)
def test_what_a_model_kind_and_an_optimizer_cannot_do_together_is_one_line(over, words):
    from node_ocp.train.tasks import build_task

    with pytest.raises(ConfigError) as err:
        build_task(config_from_dict(tiny(**SERIES, **over)))
    assert str(err.value).startswith(words) and "\n" not in str(err.value), str(err.value)
