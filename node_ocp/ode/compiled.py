"""``ODEBlock(..., compile_field=True)``: the solvers evaluate a ``torch.compile``d field.

The block keeps its field as it is (parameters, ``state_dict`` keys and curvature taps
unchanged) and holds a :class:`FieldCompiler`, which compiles the field lazily on the first
solve that uses it and hands the compiled module to the solver's evaluations
(:meth:`FieldCompiler.evaluator`). What the compiled module cannot do, the eager field does:

- curvature capture: a compiled module does not fire forward hooks registered on its layers
  after compilation, and batched vector-Jacobian products (``is_grads_batched``, the
  capture's factors) cannot run through it; so a call made while a capture is attached, or
  while any layer of the field carries a hook (K-FAC statistics of the field's layers),
  evaluates the eager field;
- fields whose forward takes a gradient of their own output (a CNF's divergence): the own
  adjoint differentiates them twice, which ``torch.compile``'s autograd does not support;
  such a failure comes out as a :class:`CompileFieldError` naming the option.

Shapes: ``dynamic=None`` (torch's default: the first shape is compiled static; a later new
shape, e.g. a smaller last batch, recompiles once with dynamic sizes), which suits
fixed-batch training and the adaptive solves alike (the state's shape never changes within
one solve; only ``t``'s value does, and it is a tensor).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._errors import bad_value, first_line

#: ``torch.compile`` modes accepted by ``compile_field`` (``True`` is ``"default"``).
COMPILE_MODES: tuple[str, ...] = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)


class CompileFieldError(RuntimeError):
    """``torch.compile`` of an ODE block's field is unavailable or failed."""


def check_compile_field(value: Any, name: str = "compile_field") -> str | None:
    """``False``/``None``/``"off"`` -> None (no compile), ``True`` -> ``"default"``, a mode
    of :data:`COMPILE_MODES` -> itself; anything else raises a ``ValueError`` naming ``name``."""
    if value is None or value is False or value == "off":
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise bad_value(
        name,
        value,
        "True, False ('off') or a torch.compile mode ("
        + ", ".join(repr(m) for m in COMPILE_MODES)
        + ")",
        "True compiles the field with torch.compile's default mode.",
    )


def has_hooks(module: nn.Module) -> bool:
    """Whether any submodule of ``module`` carries a forward or backward hook."""
    for m in module.modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            return True
        if getattr(m, "_backward_pre_hooks", None):
            return True
    return False


class FieldCompiler:
    """The compiled field of one block, built on first use.

    Args:
        mode: a mode of :data:`COMPILE_MODES`.
        name: the block's name, for messages.

    Not copied or pickled with the block (a deep copy or an unpickled block compiles again).
    """

    def __init__(self, mode: str, name: str):
        self.mode = mode
        self.name = name
        self._module: nn.Module | None = None
        self._field_id: int | None = None

    def __deepcopy__(self, memo):
        return FieldCompiler(self.mode, self.name)

    def __getstate__(self):
        return {"mode": self.mode, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["mode"], state["name"])

    def evaluator(self, field: nn.Module, capture) -> nn.Module:
        """The module the solvers should call for a block call: the compiled field, or
        ``field`` itself while a capture is attached or a layer of the field is hooked."""
        if capture is not None or has_hooks(field):
            return field
        if self._module is None or self._field_id != id(field):
            self._module = self._compile(field)
            self._field_id = id(field)
        return self._module

    def _compile(self, field: nn.Module) -> nn.Module:
        compile_fn = getattr(torch, "compile", None)
        if compile_fn is None:
            raise CompileFieldError(
                f"{self.name}: compile_field={self.mode!r} needs torch.compile (PyTorch >= 2.0; "
                f"this is {torch.__version__}). Set compile_field=False."
            )
        try:
            return compile_fn(field, mode=self.mode, dynamic=None)
        except Exception as err:  # torch.compile refuses the module or the platform
            raise self.failure(err) from err

    def failure(self, err: BaseException) -> CompileFieldError:
        """The :class:`CompileFieldError` for ``err``, raised by a compiled solve."""
        text = first_line(err)
        hint = ""
        if "double backward" in text or "donated buffer" in text:
            hint = (
                " The own adjoint differentiates the field's output, and this field takes a "
                "gradient inside its forward (e.g. a CNF's divergence): torch.compile cannot "
                "differentiate it twice."
            )
        return CompileFieldError(
            f"{self.name}: compile_field={self.mode!r}: torch.compile failed on this field "
            f"({type(err).__name__}: {text[:300]}).{hint} Set compile_field=False."
        )


def is_compile_failure(err: BaseException) -> bool:
    """Whether ``err`` (raised inside a solve of a compiled field) comes from
    ``torch.compile`` (dynamo, inductor, AOT autograd) rather than from the field or solver."""
    mod = type(err).__module__ or ""
    if mod.startswith(("torch._dynamo", "torch._inductor", "torch._functorch")):
        return True
    text = str(err)
    return isinstance(err, (RuntimeError, NotImplementedError)) and any(
        s in text
        for s in (
            "does not currently support double backward",
            "donated buffer",
            "BatchedTensorImpl",
            "torch.compile",
        )
    )
