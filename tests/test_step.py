"""The one training step, the run state / checkpoint schema and the cost cycle.

``train_step`` is compared with the same step written out by hand (the parameters after it
must be identical), its NFE with the blocks' own counters, its failure path with
unchanged parameters; the checkpoint schema round-trips and refuses unknown fields.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import node_ocp as no
from node_ocp.train.checkpoint import CHECKPOINT_SCHEMA, Checkpoint, RunState
from node_ocp.train.config import OptimizerConfig
from node_ocp.train.costs import amortized, amortized_for, cycle, take_nfe
from node_ocp.train.errors import RunError


def _model(seed=0):
    torch.manual_seed(seed)
    field = no.TimeSequential(
        no.ConcatSquashLinear(2, 8), nn.Tanh(), no.ConcatSquashLinear(8, 2)
    ).double()
    block = no.ODEBlock(field, method="rk4", options={"step_size": 0.25})
    return nn.Sequential(block, nn.Linear(2, 3).double())


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 2, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (32,), generator=g
    )


def _forward(model, x, y):
    def forward():
        logits = model(x)
        return logits, nn.functional.cross_entropy(logits, y)

    return forward


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_adam_step_equals_the_hand_written_step():
    x, y = _data()
    a, b = _model(), _model()
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    for _ in range(3):
        r = no.train_step(opt_a, _forward(a, x, y), blocks=[a[0]])
        opt_b.zero_grad()
        loss = nn.functional.cross_entropy(b(x), y)
        loss.backward()
        opt_b.step()
        assert r.loss == pytest.approx(float(loss.detach()), abs=0, rel=1e-15)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert r.kind == "plain"


def test_ocnopt_step_equals_the_hand_written_step():
    x, y = _data()
    a, b = _model(), _model()
    opt_a, opt_b = no.OCNOpt(a, update_every=2), no.OCNOpt(b, update_every=2)
    kinds = []
    for _ in range(4):
        expected_kind = ("refresh" if opt_b.refresh_due else "") + (
            "+adapt" if opt_b.adapt_due else ""
        )
        r = no.train_step(opt_a, _forward(a, x, y), blocks=[a[0]], likelihood="categorical")
        opt_b.zero_grad()
        logits, loss = _forward(b, x, y)()
        opt_b.backward(loss, outputs=logits, likelihood="categorical")
        opt_b.step(lambda: _forward(b, x, y)()[::-1])
        kinds.append((r.kind, expected_kind.strip("+") or "plain"))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-14)
    assert all(k == e for k, e in kinds), kinds
    assert kinds[0][0] == "refresh+adapt"  # the first step refreshes and runs a trial


def test_nfe_is_the_blocks_count_of_the_step_only():
    x, y = _data()
    model = _model()
    block = model[0]
    model(x)  # evaluations before the step are not the step's
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    r = no.train_step(opt, _forward(model, x, y), blocks=[block])
    # rk4 with step 0.25 on (0, 1): 4 steps of 4 evaluations forward; the backward solve too
    assert r.nfe_forward == 16 and r.nfe_backward == 16
    assert (block.nfe_forward, block.nfe_backward) == (0, 0)  # read and reset
    block(x)
    assert take_nfe([block]) == (16, 0) and block.nfe_forward == 0


def test_a_non_finite_loss_steps_nothing():
    x, y = _data()
    model = _model()
    before = _params(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def forward():
        logits = model(x)
        return logits, nn.functional.cross_entropy(logits, y) * float("nan")

    with pytest.raises(no.StepFailed, match="non-finite training loss"):
        no.train_step(opt, forward, blocks=[model[0]])
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_agree_can_stop_a_step_another_process_failed():
    x, y = _data()
    model = _model()
    before = _params(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-1)
    seen = []

    def agree(failure):
        seen.append(failure)
        return "another process failed"

    with pytest.raises(no.StepFailed, match="another process failed"):
        no.train_step(opt, _forward(model, x, y), agree=agree)
    assert seen == [None]
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_schedule_and_horizon_are_stepped_after_the_optimizer():
    x = torch.randn(16, 2, dtype=torch.float64)
    field = no.TimeSequential(no.ConcatSquashLinear(2, 8), nn.Tanh(), no.ConcatSquashLinear(8, 2))
    block = no.ODEBlock(field.double(), t=(0.0, 1.0))
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k)
    horizon = no.HorizonOptimizer(block, block.parameters(), lr=0.5, mode="first_order")

    def forward():
        z = block(x)
        return z, z.pow(2).mean()  # shrinking the state: a shorter horizon helps or hurts

    t1 = horizon.t1
    no.train_step(opt, forward, blocks=[block], scheduler=sched, horizon=horizon)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    no.train_step(opt, forward, blocks=[block], scheduler=sched, horizon=horizon)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert horizon.t1 != t1  # first-order mode moves t1 from the first step


def test_run_state_round_trips_and_counts():
    s = RunState()
    s.add_step(2.0, "plain", 0.5, 10, 12)
    s.add_step(4.0, "refresh", 1.5, 20, 22)
    assert (s.step, s.train_clock, s.loss_sum, s.loss_count) == (2, 2.0, 6.0, 2)
    assert (s.nfe_f, s.nfe_b) == (30, 34)
    assert s.step_times["plain"] == [0.5] and s.step_times["refresh"] == [1.5]
    s.fail("first")
    s.fail("second")
    assert s.diverged and s.diverged_reason == "first"
    assert RunState.from_dict(s.to_dict()) == s
    s.reset_sums()
    assert (s.loss_sum, s.loss_count, s.nfe_f, s.nfe_b) == (0.0, 0, 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown field 'stepz'"):
        RunState.from_dict({"stepz": 3})


def test_checkpoint_round_trip_and_an_older_state_without_new_fields(tmp_path):
    state = RunState(step=7, memory={"plain": 3.5})
    ck = Checkpoint(
        run={"optimizer": "adam"},
        model={"w": torch.ones(2)},
        optimizer={},
        sampler={"pos": 3},
        state=state,
        rng={"torch": torch.get_rng_state()},
    )
    path = tmp_path / "checkpoint.pt"
    ck.write(path)
    raw = torch.load(path, weights_only=False)
    assert raw["schema"] == CHECKPOINT_SCHEMA and raw["state"]["step"] == 7  # plain dicts
    back = Checkpoint.read(path)
    assert back.state == state and torch.equal(back.model["w"], torch.ones(2))
    # a state written before `memory` / `diverged_reason` existed (schema 1) still loads
    old = dict(raw)
    old["state"] = {k: v for k, v in raw["state"].items() if k not in ("memory", "diverged_reason")}
    torch.save(old, path)
    assert Checkpoint.read(path).state.memory == {}
    old["state"]["surprise"] = 1
    torch.save(old, path)
    with pytest.raises(RunError, match="damaged run state.*surprise"):
        Checkpoint.read(path)
    assert Checkpoint.read(tmp_path / "none.pt") is None


def test_cycle_and_amortized_cost_of_a_table():
    cost = {"plain": 1.0, "adapt": 2.0, "refresh": 5.0, "refresh+adapt": 6.0}
    ocn = OptimizerConfig(kind="ocnopt", update_every=4, adapt_every=2)
    assert cycle(ocn) == (4, 2)
    # steps 0..3 of the cycle: refresh+adapt, plain, adapt, plain
    assert amortized_for(ocn, cost) == pytest.approx((6 + 1 + 2 + 1) / 4)
    fixed = copy.copy(ocn)
    fixed.step, fixed.adapt_damping = "fixed", False
    fixed.lr = 0.1
    assert cycle(fixed) == (4, None)
    assert amortized_for(fixed, cost) == pytest.approx((5 + 1 + 1 + 1) / 4)
    adam = OptimizerConfig(kind="adam")
    assert cycle(adam) == (None, None) and amortized_for(adam, cost) == 1.0
    assert amortized_for(adam, cost) == amortized(cost)


def test_a_local_failure_stands_whatever_agree_returns():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-1)

    def forward():
        logits = model(x)
        return logits, nn.functional.cross_entropy(logits, y) * float("inf")

    with pytest.raises(no.StepFailed, match="non-finite"):
        no.train_step(opt, forward, agree=lambda failure: None)


def test_a_state_without_its_required_fields_is_refused():
    with pytest.raises(ValueError, match="no field 'step'"):
        RunState.from_dict({"train_clock": 1.0, "step_times": {}})
    with pytest.raises(ValueError, match="step_times of type list"):
        RunState.from_dict({"step": 1, "train_clock": 1.0, "step_times": []})


def test_a_loss_beyond_the_outputs_gives_the_trials_no_gauss_newton_curvature():
    """A loss with a term the outputs do not determine (here a penalty on the head's weight,
    as a latent ODE's KL term is on its encoder): ``outputs_determine_loss=False`` hands the
    trial the loss only, so the adaptation learns from the loss's secant (``exact`` False);
    by default the trial reads the Gauss–Newton curvature from the outputs (``exact`` True)."""
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    target = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    exact = {}
    for determine in (True, False):
        model = _model()
        opt = no.OCNOpt(model)

        def forward(model=model):
            out = model(x)
            penalty = 0.1 * model[1].weight.pow(2).sum()
            return out, 0.5 * (out - target).pow(2).sum(1).mean() + penalty

        no.train_step(
            opt,
            forward,
            blocks=[model[0]],
            likelihood="gaussian",
            outputs_determine_loss=determine,
        )
        exact[determine] = opt.last_adaptation.exact
    assert exact == {True: True, False: False}
