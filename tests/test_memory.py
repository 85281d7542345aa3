"""The step-memory measure tells optimizers apart; bench --out keeps foreign files."""

import json
import statistics

import pytest
import torch
from train_helpers import tiny

from node_ocp.train import config_from_dict
from node_ocp.train.bench import bench
from node_ocp.train.loop import RunError
from node_ocp.train.memory import StepMemory, state_mb


def _step(extra_mb: int):
    x = torch.randn(256, 256)
    y = (x @ x).tanh()
    if extra_mb:
        big = torch.ones(extra_mb * 2**20 // 4)
        big.mul_(2.0)
        del big
    return float(y.sum())


def test_step_memory_tells_apart_a_step_that_allocates_100_mb_more():
    meter = StepMemory("cpu")
    if meter.method.endswith("(approximate)"):
        pytest.skip("no resettable peak on this platform")
    plain, more = [], []
    for _ in range(3):
        meter.start()
        _step(0)
        plain.append(meter.stop())
        meter.start()
        _step(100)
        more.append(meter.stop())
    gap = statistics.median(more) - statistics.median(plain)  # the first call warms up
    assert 95 <= gap <= 110, (plain, more)


def test_optimizer_state_is_counted_exactly():
    p = torch.nn.Parameter(torch.zeros(1000, 250))  # 10^6 bytes of float32
    opt = torch.optim.Adam([p])
    assert state_mb(opt) == 0
    p.grad = torch.ones_like(p)
    opt.step()
    step = opt.state[p]["step"]
    expected = 2 * 10**6 + step.untyped_storage().nbytes()  # exp_avg, exp_avg_sq, step
    assert state_mb(opt) == expected / 2**20


def test_bench_measures_refresh_memory_apart_and_refuses_a_foreign_out_file(tmp_path):
    cfg = tiny()
    cfg["optimizers"]["dense"] = {"kind": "ocnopt", "curvature": "dense", "update_every": 3}
    run = config_from_dict(cfg)
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    with pytest.raises(RunError, match="not a node-ocp bench output.*--force"):
        bench(run, ["adam", "dense"], steps=7, out=foreign)
    assert json.loads(foreign.read_text()) == {"mine": 1}
    out = tmp_path / "bench.json"
    r = bench(run, ["adam", "dense"], steps=7, out=out)
    rows = r["optimizers"]
    assert rows["dense"]["refresh_memory_mb"] > rows["dense"]["step_memory_mb"]
    assert rows["adam"]["refresh_memory_mb"] is None and rows["adam"]["step_memory_mb"] > 0
    bench(run, ["adam"], steps=3, out=out, memory=False)  # its own output: replaced
    bench(run, ["adam"], steps=3, out=foreign, memory=False, force=True)
    assert json.loads(foreign.read_text())["format"] == "node-ocp bench"
