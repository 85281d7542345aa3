"""Renamed hyper-parameters keep working, and a config table's OCNOpt keys are the options'.

``alpha`` (the EKFAC decay, which shared its name with the step size α) is now
``ekfac_decay``: the old keyword, group key, config key and saved parameter groups still
work, with a warning. The ``[optimizers.*]`` table's OCNOpt keys are made from
``OCNOptOptions``: every option a table may set is a key with the option's default.
"""

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import tomllib
import torch
from conftest import mlp_field
from torch import nn

import node_ocp as no
from node_ocp.optim.options import RENAMED, OCNOptOptions
from node_ocp.train.config import (
    NOT_TABLE_KEYS,
    OFF_AT_ZERO,
    ConfigError,
    OptimizerConfig,
    config_from_dict,
)
from node_ocp.train.optimizers import ocnopt_options

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.ode = no.ODEBlock(
            mlp_field(2, 5), (0.0, 0.5), method="rk4", options={"step_size": 0.25}
        )
        self.head = nn.Linear(2, 2)
        self.double()

    def forward(self, x):
        return self.head(self.ode(x))


def _run(opt_of, steps=4):
    """Parameters after ``steps`` EKFAC steps of a seeded model under ``opt_of(model)``."""
    torch.manual_seed(0)
    model = Net()
    opt = opt_of(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 2, generator=g, dtype=torch.float64)
    y = torch.randn(12, 2, generator=g, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step(lambda: (model(x) - y).pow(2).mean())
    return [p.detach().clone() for p in model.parameters()], opt


def _same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


def test_alpha_keyword_is_ekfac_decay_with_a_deprecation_warning():
    new, _ = _run(lambda m: no.OCNOpt(m, ekfac_decay=0.3, update_every=3))
    with pytest.warns(DeprecationWarning, match="'alpha' is deprecated; it is now called "):
        old, opt = _run(lambda m: no.OCNOpt(m, alpha=0.3, update_every=3))
    assert opt.options.ekfac_decay == 0.3
    assert _same(new, old)
    default, _ = _run(lambda m: no.OCNOpt(m, update_every=3))
    assert not _same(new, default)  # the decay reached the EKFAC units
    with pytest.raises(TypeError, match="received both 'alpha' \\(deprecated\\) and 'ekfac_decay'"):
        no.OCNOpt(Net(), alpha=0.3, ekfac_decay=0.3)


def test_alpha_group_key_is_ekfac_decay():
    def groups(key):
        def make(m):
            return no.OCNOpt(
                m, update_every=3, groups=[{"params": list(m.ode.parameters()), key: 0.3}]
            )

        return make

    new, opt_new = _run(groups("ekfac_decay"))
    with pytest.warns(DeprecationWarning, match="groups\\[...\\]: 'alpha' is deprecated"):
        old, opt_old = _run(groups("alpha"))
    assert opt_old.param_groups[0]["ekfac_decay"] == 0.3
    assert "alpha" not in opt_old.param_groups[0]
    assert _same(new, old)


def test_a_state_dict_saved_with_alpha_groups_resumes_exactly():
    """A checkpoint written before the rename (groups with ``alpha``) loads, and the run
    continues as the uninterrupted one does."""
    _, opt = _run(lambda m: no.OCNOpt(m, ekfac_decay=0.3, update_every=3), steps=2)
    saved = copy.deepcopy(opt.state_dict())
    for g in saved["param_groups"]:
        g["alpha"] = g.pop("ekfac_decay")
    model = opt.model
    fresh = no.OCNOpt(model, update_every=3)  # the default decay, until the state loads
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["ekfac_decay"] == 0.3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 2, generator=g, dtype=torch.float64)
    y = torch.randn(12, 2, generator=g, dtype=torch.float64)
    twin = copy.deepcopy(model)
    twin_opt = no.OCNOpt(twin, ekfac_decay=0.3, update_every=3)
    twin_opt.load_state_dict(opt.state_dict())
    for m, o in ((model, fresh), (twin, twin_opt)):
        for _ in range(3):
            o.zero_grad()
            loss = (m(x) - y).pow(2).mean()
            loss.backward()
            o.step(lambda m=m: (m(x) - y).pow(2).mean())
    assert _same(list(model.parameters()), list(twin.parameters()))


def _quickstart(**keys) -> dict:
    raw = tomllib.loads((CONFIGS / "quickstart.toml").read_text())
    raw["optimizers"]["ocnopt"].update(keys)
    return raw


def test_alpha_config_key_is_read_with_a_future_warning():
    with pytest.warns(FutureWarning, match=r"\[optimizers.ocnopt\]: 'alpha' is deprecated"):
        cfg = config_from_dict(_quickstart(alpha=0.3))
    table = cfg.optimizers["ocnopt"]
    assert table.ekfac_decay == 0.3 and not hasattr(table, "alpha")
    assert ocnopt_options(table, math.inf).ekfac_decay == 0.3
    with pytest.raises(ConfigError, match="received both 'alpha'"):
        config_from_dict(_quickstart(alpha=0.3, ekfac_decay=0.5))


def test_every_option_is_a_table_key_with_the_options_default():
    options = {f.name: f.default for f in dataclasses.fields(OCNOptOptions)}
    table = {f.name: f.default for f in dataclasses.fields(OptimizerConfig)}
    for name, default in options.items():
        if name in NOT_TABLE_KEYS:
            continue
        assert name in table, name
        assert table[name] == (0.0 if name in OFF_AT_ZERO and default is None else default)
    assert not set(RENAMED) & set(table)
    # keys a table could not set before the options object made them (and their checks)
    cfg = config_from_dict(
        _quickstart(rank=2, diag_beta=0.5, nonfinite="raise", min_damping=1e-3, kl_clip=0.0)
    )
    opts = ocnopt_options(cfg.optimizers["ocnopt"], math.inf)
    assert (opts.rank, opts.diag_beta, opts.nonfinite, opts.min_damping) == (2, 0.5, "raise", 1e-3)
    assert opts.kl_clip is None  # 0 in a table: off
    with pytest.raises(ConfigError, match=r"\[optimizers.ocnopt\].diag_beta: received 1.0"):
        config_from_dict(_quickstart(diag_beta=1.0))
    with pytest.raises(ConfigError, match=r"\[optimizers.ocnopt\].rank: received 'two'"):
        config_from_dict(_quickstart(rank="two"))
