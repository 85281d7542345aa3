"""``ODEBlock(..., compile_field=...)``: the solvers evaluate ``torch.compile(field)``; the
same solve and gradients as the eager field, the eager field wherever the compiled one
cannot serve (capture, hooked layers), and failures that name the option."""

import copy

import pytest
import torch
from conftest import mlp_field

import node_ocp as no
from node_ocp.ode.compiled import CompileFieldError, FieldCompiler, check_compile_field
from node_ocp.train.config import ConfigError, SolverConfig

F64 = torch.float64


def test_the_option_is_checked_and_named():
    assert check_compile_field(False) is None and check_compile_field("off") is None
    assert check_compile_field(True) == "default"
    assert check_compile_field("max-autotune") == "max-autotune"
    with pytest.raises(ValueError, match=r"compile_field: received 'fast'; accepted: True"):
        no.ODEBlock(mlp_field(), compile_field="fast")
    with pytest.raises(ValueError, match="compile_field: .*gradient='torchdiffeq'"):
        no.ODEBlock(mlp_field(), gradient="torchdiffeq", compile_field=True)
    block = no.ODEBlock(mlp_field(), compile_field=True)
    assert block.compile_field == "default" and "compile_field='default'" in repr(block)
    block.compile_field = False
    assert block.compile_field is None
    with pytest.raises(ConfigError, match=r"\[solver\].compile_field: received 'fast'"):
        SolverConfig(compile_field="fast").check("[solver]")
    with pytest.raises(ConfigError, match=r"\[solver\].compile_field: .*torchdiffeq"):
        SolverConfig(compile_field="default", gradient="torchdiffeq").check("[solver]")
    SolverConfig(compile_field="reduce-overhead").check("[solver]")


def test_capture_and_hooked_layers_get_the_eager_field():
    """A compiled module does not fire hooks added to its layers after compilation and
    cannot take batched products: capture and K-FAC hooks see the eager field."""
    field = mlp_field()
    comp = FieldCompiler("default", "blk")
    compiled = comp.evaluator(field, None)
    assert compiled is not field  # lazily compiled: nothing is compiled before a call
    assert comp.evaluator(field, capture=object()) is field
    layer = next(m for m in field.modules() if isinstance(m, torch.nn.Linear))
    handle = layer.register_forward_hook(lambda *a: None)
    assert comp.evaluator(field, None) is field
    handle.remove()
    assert comp.evaluator(field, None) is compiled
    # the compiled module is not a submodule: the state_dict keys are the field's own
    block = no.ODEBlock(field, compile_field=True)
    block._compiler.evaluator(field, None)
    assert list(block.state_dict()) == list(no.ODEBlock(field).state_dict())
    # a copy of a block compiles again, its own field
    twin = copy.deepcopy(block)
    assert twin.compile_field == "default" and twin._compiler._module is None


def test_torch_compile_unavailable_or_failing_names_the_option(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    block = no.ODEBlock(mlp_field(), compile_field=True, name="blk")
    with pytest.raises(CompileFieldError, match=r"blk: compile_field='default': torch.compile "
                       r"failed on this field \(RuntimeError: no C\+\+ compiler\)"):  # fmt: skip
        block(torch.randn(2, 3, dtype=F64))
    monkeypatch.delattr(torch, "compile")
    with pytest.raises(CompileFieldError, match="compile_field='default' needs torch.compile"):
        no.ODEBlock(mlp_field(), compile_field=True)(torch.randn(2, 3, dtype=F64))


def _solve(gradient, backend, compile_field, x0):
    torch.manual_seed(1)
    block = no.ODEBlock(mlp_field(), (0.0, 1.0), rtol=1e-8, atol=1e-9, gradient=gradient,
                        backend=backend, compile_field=compile_field)  # fmt: skip
    x = x0.clone().requires_grad_(True)
    y = block(x)
    grads = torch.autograd.grad(y.pow(2).sum(), (x, *block.field.parameters()))
    return y.detach(), grads, (block.nfe_forward, block.nfe_backward)


@pytest.mark.slow
def test_a_compiled_field_gives_the_same_solve_and_gradients():
    """float64: the own adjoint and backprop through the own loop, compiled and eager."""
    x0 = torch.randn(4, 3, dtype=F64)
    for gradient in ("adjoint", "direct"):
        y, g, nfe = _solve(gradient, "own", False, x0)
        for _ in range(2):  # a second call reuses the compiled code
            yc, gc, nfec = _solve(gradient, "own", True, x0)
            assert nfec == nfe
            torch.testing.assert_close(yc, y, rtol=1e-12, atol=1e-12)
            for a, b in zip(gc, g):
                torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.slow
def test_a_field_differentiated_in_its_forward_is_refused_naming_the_option():
    """A CNF takes the divergence by autograd in its field: the own adjoint would need a
    double backward through the compiled graph, which torch.compile does not support."""
    from node_ocp.models import CNF

    flow = CNF(2, hidden=(4,), backend="own").double()
    for b in flow.blocks:
        b.compile_field = True
    with pytest.raises(CompileFieldError, match="compile_field='default'.*differentiate it twice"):
        flow.log_prob(torch.randn(3, 2, dtype=F64)).sum().backward()


def test_the_solver_table_reaches_every_block():
    """``[solver].compile_field`` and ``cuda_graph`` are set on every block of a built model
    (nothing is compiled or captured before a call)."""
    from train_helpers import tiny

    from node_ocp.train import build_task, config_from_dict

    over = {"solver.compile_field": "max-autotune", "solver.method": "rk4"}
    blocks = build_task(config_from_dict(tiny(**over)), torch.device("cpu")).blocks
    assert blocks and all(b.compile_field == "max-autotune" and not b.cuda_graph for b in blocks)
    over = {"solver.cuda_graph": True, "solver.method": "rk4"}
    blocks = build_task(config_from_dict(tiny(**over)), torch.device("cpu")).blocks
    assert blocks and all(b.cuda_graph and b.compile_field is None for b in blocks)
