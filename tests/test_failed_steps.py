"""A step whose solve fails is skipped, not the end of the run (``[train]
failures_in_a_row``): no parameter moves, the optimizer forgets the pass, the run goes on,
and it stops as diverged only after that many failures in a row.

The backward solve's failure is injected after the real backward pass has run (so OCNOpt
has gathered its statistics and handed its step what it needs), as a stiff adjoint does
(``experiments/results/bench_issue21.md`` §26)."""

import pytest
import torch
from train_helpers import tiny  # noqa: I001  (tests/ is on sys.path)

from node_ocp.ode.checked import SolverError
from node_ocp.train import RunOptions, adapters, config_from_dict, train
from node_ocp.train.config import ConfigError


def _failing_backward(monkeypatch, fail_on: set[int], starts: list):
    """Make the ``fail_on``-th calls (1-based) of every adapter's backward_and_step run the
    backward pass and then raise the SolverError of a failed backward solve; ``starts``
    gets the parameters every call began at."""
    calls = {"n": 0}
    real = {
        adapters.OptimizerAdapter: adapters.OptimizerAdapter.backward_and_step,
        adapters.OCNOptAdapter: adapters.OCNOptAdapter.backward_and_step,
    }

    def patched(self, loss, outputs, likelihood, closure, loss_inputs=None):
        calls["n"] += 1
        starts.append([p.detach().clone() for g in self.opt.param_groups for p in g["params"]])
        if calls["n"] not in fail_on:
            own = adapters.OCNOptAdapter if isinstance(self, adapters.OCNOptAdapter) else None
            return real[own or adapters.OptimizerAdapter](
                self, loss, outputs, likelihood, closure, loss_inputs
            )
        if isinstance(self, adapters.OCNOptAdapter):
            self.opt.backward(loss, outputs=outputs, likelihood=likelihood)
        else:
            loss.backward()
        raise SolverError("block 0: in the backward solve the state became non-finite")

    for cls in real:
        monkeypatch.setattr(cls, "backward_and_step", patched)
    return calls


def _run(tmp_path, name, steps=8, **train_over):
    cfg = tiny(**{"train.steps": steps})
    cfg["train"]["optimizer"] = name
    cfg["train"].update(train_over)
    return train(config_from_dict(cfg), tmp_path / name, RunOptions(progress=False))


@pytest.mark.parametrize("name", ["ocnopt", "adam"])
def test_a_failed_backward_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch, name):
    calls = _failing_backward(monkeypatch, {3, 6}, [])
    with pytest.warns(RuntimeWarning, match=r"step 3 failed and was skipped") as caught:
        run = _run(tmp_path, name)
    assert sum("was skipped" in str(w.message) for w in caught) == 2
    assert not run["diverged"] and run["steps"] == 8
    assert calls["n"] == 10  # eight steps taken, two failed and skipped
    assert run["failed_steps"] == 2 and "non-finite" in run["last_failure"]
    assert torch.isfinite(torch.tensor(run["test_metric"]))
    ckpt = torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["state"]["failed_steps"] == 2 and ckpt["state"]["failed_in_a_row"] == 0
    if name == "ocnopt":
        assert ckpt["optimizer"]["ocnopt"]["skipped_steps"] == 2
        assert ckpt["optimizer"]["ocnopt"]["step"] == 8  # skipped steps are not counted


@pytest.mark.parametrize("name", ["ocnopt", "adam"])
def test_the_step_after_a_failure_starts_where_the_failed_one_did(tmp_path, monkeypatch, name):
    starts = []
    _failing_backward(monkeypatch, {4}, starts)
    _run(tmp_path, name, steps=5)
    assert len(starts) == 6
    failed, after = starts[3], starts[4]
    assert all(torch.equal(a, b) for a, b in zip(failed, after))  # nothing moved
    assert not all(torch.equal(a, b) for a, b in zip(starts[2], failed))  # steps do move


@pytest.mark.parametrize("in_a_row, diverges", [(3, True), (4, False)])
def test_the_run_diverges_after_failures_in_a_row(tmp_path, monkeypatch, in_a_row, diverges):
    _failing_backward(monkeypatch, {2, 3, 4}, [])
    run = _run(tmp_path, "ocnopt", steps=6, failures_in_a_row=in_a_row)
    assert run["diverged"] is diverges
    if diverges:
        assert run["steps"] == 1 and "3 steps in a row failed" in run["diverged_reason"]
    else:
        assert run["steps"] == 6 and run["failed_steps"] == 3


def test_one_failure_in_a_row_stops_at_the_first(tmp_path, monkeypatch):
    _failing_backward(monkeypatch, {2}, [])
    run = _run(tmp_path, "adam", steps=6, failures_in_a_row=1)
    assert run["diverged"] and run["steps"] == 1
    assert "non-finite" in run["diverged_reason"] and "in a row" not in run["diverged_reason"]


def test_a_bad_failures_in_a_row_is_refused_by_name():
    cfg = tiny()
    cfg["train"]["failures_in_a_row"] = 0
    with pytest.raises(ConfigError, match=r"train\]?\.failures_in_a_row") as err:
        config_from_dict(cfg)
    assert "received 0" in str(err.value)


def _failing_before_backward(monkeypatch, fail_on: set[int]):
    """As :func:`_failing_backward`, but the failure comes before the backward pass (so
    the optimizer gathers nothing from the failed batch)."""
    calls = {"n": 0}
    real = adapters.OCNOptAdapter.backward_and_step

    def patched(self, loss, outputs, likelihood, closure, loss_inputs=None):
        calls["n"] += 1
        if calls["n"] in fail_on:
            raise SolverError("block 0: in the backward solve the state became non-finite")
        return real(self, loss, outputs, likelihood, closure, loss_inputs)

    monkeypatch.setattr(adapters.OCNOptAdapter, "backward_and_step", patched)


def _final_model(tmp_path, name):
    path = tmp_path / name / "checkpoint.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.mark.parametrize("call", [1, 4])  # OCNOpt's steps 0 and 3: refresh steps
def test_a_failed_refresh_leaves_no_statistics_behind(tmp_path, monkeypatch, call):
    # the failed batch's backward pass gathered Kronecker statistics; skipped, the run must
    # go on as one whose failed batch never reached the backward pass
    _failing_backward(monkeypatch, {call}, [])
    _run(tmp_path / "after", "ocnopt", steps=7)
    monkeypatch.undo()
    _failing_before_backward(monkeypatch, {call})
    _run(tmp_path / "before", "ocnopt", steps=7)
    a, b = _final_model(tmp_path / "after", "ocnopt"), _final_model(tmp_path / "before", "ocnopt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_step_leaves_no_gradient_of_the_horizon(tmp_path, monkeypatch):
    from node_ocp.ode.block import ODEBlock

    grads = []
    real = adapters.OCNOptAdapter.backward_and_step
    calls = {"n": 0}

    def patched(self, loss, outputs, likelihood, closure, loss_inputs=None):
        calls["n"] += 1
        (block,) = [m for m in self.opt.model.modules() if isinstance(m, ODEBlock)]
        grads.append(None if block.t.grad is None else block.t.grad.clone())
        if calls["n"] == 3:
            self.opt.backward(loss, outputs=outputs, likelihood=likelihood)
            assert block.t.grad is not None  # the failed pass reached t1
            raise SolverError("block 0: in the backward solve the state became non-finite")
        return real(self, loss, outputs, likelihood, closure, loss_inputs)

    monkeypatch.setattr(adapters.OCNOptAdapter, "backward_and_step", patched)
    cfg = tiny("horizon", **{"train.steps": 5})
    run = train(config_from_dict(cfg), tmp_path / "h", RunOptions(progress=False))
    assert run["failed_steps"] == 1 and not run["diverged"]
    assert all(g is None for g in grads)  # every step starts without a stale dL/dt1


def test_a_failure_inside_the_optimizers_step_stops_the_run(tmp_path, monkeypatch):
    from node_ocp.optim.ocnopt import OCNOpt

    real = OCNOpt.step
    calls = {"n": 0}

    def step(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 3:  # after its refresh and averages took the batch in
            raise SolverError("block 0: in a trial solve the step size underflowed")
        return real(self, closure)

    monkeypatch.setattr(OCNOpt, "step", step)
    run = _run(tmp_path, "ocnopt", steps=6)
    assert run["diverged"] and run["steps"] == 2
    assert "inside the optimizer's step" in run["diverged_reason"]


def test_ocnopts_own_skips_of_non_finite_gradients_count_in_a_row(tmp_path, monkeypatch):
    from node_ocp.optim.ocnopt import OCNOpt

    real = OCNOpt.backward
    calls = {"n": 0}

    def backward(self, loss, *args, **kw):
        calls["n"] += 1
        real(self, loss, *args, **kw)
        if calls["n"] >= 2:  # every gradient from the second step on is non-finite
            next(iter(self.param_groups[0]["params"])).grad.fill_(float("nan"))

    monkeypatch.setattr(OCNOpt, "backward", backward)
    run = _run(tmp_path, "ocnopt", steps=6)
    assert run["diverged"] and run["steps"] == 1 and run["failed_steps"] == 3
    assert "non-finite gradient" in run["diverged_reason"]
