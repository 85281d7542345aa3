"""The solver-loop table (node_ocp.ode.floor): its rows, its checks, bench_memory's section;
the flat state of the backward solve (node_ocp.ode.state) and a user's norm over it."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import mlp_field

import node_ocp as no
from node_ocp.models import ODEImageClassifier
from node_ocp.ode import floor
from node_ocp.ode.state import StateLayout

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_one_row_per_case_with_equal_nfe_and_consistent_ratios(method):
    (row,) = floor.solver_loop_table(
        fields=("mlp",), methods=(method,), repeats=1, train_steps=2 if method == "rk4" else 0
    )
    assert (row["field"], row["method"], row["repeats"], row["clock"]) == ("mlp", method, 1, "wall")
    nfe = {v: (row[f"{v}_nfe_forward"], row[f"{v}_nfe_backward"]) for v in floor.VARIANTS}
    # the floor and the solvers replay the own adjoint's step; torchdiffeq and the own loop
    # take the same steps
    assert len(set(nfe.values())) == 1, nfe
    if method == "rk4":  # step 0.1 over [0, 1], 4 evaluations per step
        assert nfe["own"] == (40, 40)
    for v in floor.VARIANTS:
        assert row[f"{v}_s"] > 0
        assert row[f"{v}_s_per_nfe"] == pytest.approx(row[f"{v}_s"] / sum(nfe[v]))
    per = {v: row[f"{v}_s_per_nfe"] for v in floor.VARIANTS}
    assert row["own_over_floor"] == pytest.approx(per["own"] / per["floor"])
    assert row["own_over_torchdiffeq"] == pytest.approx(per["own"] / per["torchdiffeq"])
    assert row["torchdiffeq_over_floor"] == pytest.approx(per["torchdiffeq"] / per["floor"])
    # repeats=1: the phases add up to the step; the backward ratios are of that phase alone
    for v in floor.VARIANTS:
        assert row[f"{v}_forward_s"] + row[f"{v}_backward_s"] == pytest.approx(row[f"{v}_s"])
    bwd = {v: row[f"{v}_backward_s"] / nfe[v][1] for v in floor.VARIANTS}
    assert row["backward_own_over_floor"] == pytest.approx(bwd["own"] / bwd["floor"])
    assert row["backward_own_over_torchdiffeq"] == pytest.approx(bwd["own"] / bwd["torchdiffeq"])
    bound = per["floor"] + per["solver"]
    assert row["floor_plus_solver_over_floor"] == pytest.approx(bound / per["floor"])
    assert row["own_over_floor_plus_solver"] == pytest.approx(per["own"] / bound)
    assert row["own_loop_over_floor"] == pytest.approx(per["own_loop"] / per["floor"])
    assert row["own_loop_over_torchdiffeq"] == pytest.approx(per["own_loop"] / per["torchdiffeq"])
    assert row["own_loop_over_own"] == pytest.approx(per["own_loop"] / per["own"])
    assert row["floor_plus_solver_own_over_floor"] == pytest.approx(
        (per["floor"] + per["solver_own"]) / per["floor"]
    )
    assert row["backward_own_loop_over_floor"] == pytest.approx(bwd["own_loop"] / bwd["floor"])
    text = floor.format_solver_loop([row])
    assert text.splitlines()[2].startswith(f"mlp   {method}")
    if method == "rk4":  # the own loop leaves the losses of training steps unchanged
        assert row["loss_own"] == pytest.approx(row["loss_torchdiffeq"], rel=1e-5)
        assert row["loss_max_rel_diff"] < 1e-5 and "largest relative difference" in text
    else:
        assert "loss_own" not in row


def test_training_losses_agree_between_backends():
    own = floor.training_losses("mlp", "dopri5", "own", steps=3)
    ref = floor.training_losses("mlp", "dopri5", "torchdiffeq", steps=3)
    # the same model and batch, the same steps: the same losses to rounding (float32)
    assert own == pytest.approx(ref, rel=1e-5)


def test_conv_field_is_the_image_classifiers_field():
    model = ODEImageClassifier(channels=8)
    assert repr(floor.conv_field(8)) == repr(model.ode.field)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"fields\[...\]: received 'resnet'"):
        floor.solver_loop_table(fields=("resnet",))
    with pytest.raises(TypeError, match="methods: received an object of type str"):
        floor.solver_loop_table(methods="rk4")
    with pytest.raises(ValueError, match="repeats: received 0"):
        floor.solver_loop_table(repeats=0)
    with pytest.raises(ValueError, match="clock: received 'cpu'; accepted: one of 'wall'"):
        floor.solver_loop_table(clock="cpu")
    with pytest.raises(ValueError, match="train_steps: received -1"):
        floor.solver_loop_table(train_steps=-1)


def test_bench_memory_saves_the_solver_loop_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_memory", ROOT / "experiments" / "bench_memory.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bench.json"
    argv = ["--solver-loop-only", "--solver-loop-repeats", "1", "--out", str(out)]
    argv += ["--solver-loop-fields", "conv", "--solver-loop-methods", "rk4", "--device", "cpu"]
    argv += ["--solver-loop-clock", "process", "--solver-loop-train-steps", "0"]
    module.main(argv)
    saved = json.loads(out.read_text())
    assert saved["rows"] == []
    assert [(r["field"], r["method"], r["clock"]) for r in saved["solver_loop"]] == [
        ("conv", "rk4", "process")
    ]
    assert "own/floor" in capsys.readouterr().out


def test_the_batch_and_the_extra_variants():
    """``batch`` sizes every case; ``own_graph`` rows only for rk4 on CUDA (none here)."""
    (row,) = floor.solver_loop_table(
        fields=("mlp",), methods=("rk4",), repeats=1, train_steps=0, batch=8, extra=("own_graph",)
    )
    assert row["batch"] == 8 and "own_graph_s" not in row
    with pytest.raises(ValueError, match="batch: received 0"):
        floor.solver_loop_table(batch=0)
    with pytest.raises(ValueError, match=r"extra\[...\]: received 'fast'"):
        floor.solver_loop_table(extra=("fast",))


@pytest.mark.slow
def test_the_compiled_variant_takes_the_same_steps():
    (row,) = floor.solver_loop_table(
        fields=("mlp",), methods=("rk4",), repeats=1, train_steps=0, batch=8,
        extra=("own_compiled",),
    )  # fmt: skip
    assert (row["own_compiled_nfe_forward"], row["own_compiled_nfe_backward"]) == (40, 40)
    assert row["own_compiled_first_s"] > row["own_compiled_s"] > 0
    assert "own_compiled" in floor.format_solver_loop([row])


def test_bench_memory_dry_run_checks_the_arguments(capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_memory", ROOT / "experiments" / "bench_memory.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--solver-loop-only", "--solver-loop-batch", "1024", "--device", "cuda"]
    argv += ["--solver-loop-extra", "own_graph", "own_compiled", "--dry-run"]
    assert module.main(argv) == {}
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["solver_loop_batch"] == 1024
    assert parsed["solver_loop_extra"] == ["own_graph", "own_compiled"]


def test_state_layout_round_trip_and_views():
    layout = StateLayout([(2, 3), (), (4,), (0,)])
    parts = [torch.randn(2, 3), torch.tensor(5.0), torch.randn(4), torch.zeros(0)]
    flat = layout.join(parts)
    assert flat.shape == (layout.numel,) == (11,)
    for got, want in zip(layout.split(flat), parts):
        assert torch.equal(got, want)
    rows = torch.stack([flat, 2 * flat])  # (T, N) solutions split into (T, *shape) views
    assert layout.split(rows)[0].shape == (2, 2, 3)
    assert torch.equal(layout.part(rows, 2)[1], 2 * parts[2])
    norm = layout.rms_norm(3)  # the empty part is skipped
    want = max(p.pow(2).mean().sqrt() for p in parts[:3])
    assert torch.equal(norm(flat), want)


def test_a_users_adjoint_norm_gets_the_tuple_of_parts():
    seen = []

    def user_norm(parts):  # the own seminorm, written on the tuple (x, a, *acc)
        seen.append(tuple(p.shape for p in parts))
        return torch.stack([p.pow(2).mean().sqrt() for p in parts[:2]]).max()

    field = mlp_field()
    x0 = torch.randn(4, 3, dtype=torch.float64)
    kw = dict(rtol=1e-8, atol=1e-8)
    plain = no.ODEBlock(field, (0.0, 0.7), **kw)
    mine = no.ODEBlock(field, (0.0, 0.7), adjoint_options={"norm": user_norm}, **kw)
    want = torch.autograd.grad(plain(x0).pow(2).sum(), list(field.parameters()))
    got = torch.autograd.grad(mine(x0).pow(2).sum(), list(field.parameters()))
    assert seen and seen[0] == ((4, 3), (4, 3), *(p.shape for p in field.parameters()))
    assert plain.nfe_backward == mine.nfe_backward
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_time_options_keep_torchdiffeqs_reversal_and_results():
    field = mlp_field()
    x0 = torch.randn(4, 3, dtype=torch.float64)
    kw = dict(rtol=1e-10, atol=1e-10)
    mine = no.ODEBlock(field, (0.0, 0.7), **kw)  # the backward solve reversed by the block
    step_t = torch.tensor([0.35], dtype=torch.float64)
    theirs = no.ODEBlock(field, (0.0, 0.7), adjoint_options={"step_t": step_t}, **kw)
    want = torch.autograd.grad(mine(x0).pow(2).sum(), list(field.parameters()))
    got = torch.autograd.grad(theirs(x0).pow(2).sum(), list(field.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-8)  # other steps, same answer


def test_a_failing_backward_solve_names_the_true_times():
    class NanInBackward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, t, x):
            return self.w * x * (float("nan") if torch.is_grad_enabled() else 1.0)

    block = no.ODEBlock(
        NanInBackward(), (0.0, 0.5), method="rk4", options={"step_size": 0.1}, name="nan block"
    )
    out = block(torch.randn(3, 2))
    with pytest.raises(no.SolverError, match=r"nan block: in the backward solve.*at t=0\b"):
        out.sum().backward()
