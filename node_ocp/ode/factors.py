"""Terminal Hessian factors for a block output, and the factors it propagates to its input.

Under the Gauss–Newton approximation a terminal Hessian ``Φ_xx = Σ_i y_i y_iᵀ`` stays
low-rank along the trajectory, ``V_xx(t) = Σ_i q_i(t) q_i(t)ᵀ``, and each ``q_i`` obeys the
adjoint equation. A consumer (the optimizer) attaches ``y`` to the tensor an ODE block
returned, *after* the forward pass and *before* ``backward``:

    out = block(x0)                     # (B, D)
    set_terminal_factors(out, y)        # y: (R, B, D)
    loss.backward()
    q0 = propagated_factors(out)        # (R, *x0.shape): q_i(t0), ready for the block before

With a time grid the block returns ``(T, B, D)`` and the factors are ``(R, T, B, D)``: a
factor may have a component at every output time (the factor jumps there, as the adjoint
does).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from .._errors import bad_type, bad_value

if TYPE_CHECKING:  # pragma: no cover
    from .block import ODEBlock

_ATTR = "_node_ocp_solve"


class SolveRecord:
    """What one call of an ODE block leaves for its backward pass.

    Attributes:
        block: the :class:`~node_ocp.ODEBlock` that produced the output.
        output_shape: shape of the tensor the block returned.
        grid_output: True if the block returned states at every grid time ``(T, *x.shape)``.
        terminal_factors: ``(R, *output_shape)`` factors attached by the consumer, or None.
        input_factors: ``(R, *x0.shape)`` factors at the block input after backward, or None.
        input: the ``x0`` tensor of the call (kept only while a capture is attached, so that a
            consumer can pass factors through the layers between two blocks).
        output: a weak reference to the returned tensor, or None; :meth:`tensor` returns it.
        kept: the returned tensor itself, held while a capture is attached (a model may drop
            its reference to a block output after slicing it, as a CNF does).
    """

    __slots__ = (
        "block",
        "output_shape",
        "grid_output",
        "terminal_factors",
        "input_factors",
        "input",
        "output",
        "kept",
    )

    def __init__(self, block: ODEBlock, output_shape: torch.Size, grid_output: bool):
        self.block = block
        self.output_shape = output_shape
        self.grid_output = grid_output
        self.terminal_factors: torch.Tensor | None = None
        self.input_factors: torch.Tensor | None = None
        self.input: torch.Tensor | None = None
        self.output = None
        self.kept: torch.Tensor | None = None

    def tensor(self) -> torch.Tensor | None:
        """The tensor the block returned, if it is still alive."""
        if self.kept is not None:
            return self.kept
        return None if self.output is None else self.output()

    @property
    def rank(self) -> int:
        return 0 if self.terminal_factors is None else int(self.terminal_factors.shape[0])

    def factors_per_time(self, n_times: int) -> torch.Tensor | None:
        """Factors as ``(R, T, *x.shape)`` (zeros at the times a pair output does not show)."""
        y = self.terminal_factors
        if y is None or self.grid_output:
            return y
        full = y.new_zeros((y.shape[0], n_times, *y.shape[1:]))
        full[:, -1] = y
        return full


def _record_of(output: torch.Tensor, name: str) -> SolveRecord:
    if not isinstance(output, torch.Tensor):
        raise bad_type(name, output, "the tensor returned by an ODEBlock")
    record = getattr(output, _ATTR, None)
    if record is None:
        raise bad_value(
            name,
            output,
            "the tensor returned by an ODEBlock with gradient='adjoint'",
            "Attach factors to the block output itself, not to a tensor computed from it.",
        )
    return record


def attach_record(output: torch.Tensor, record: SolveRecord) -> None:
    setattr(output, _ATTR, record)
    record.output = weakref.ref(output)


def set_terminal_factors(output: torch.Tensor, factors: torch.Tensor | None) -> None:
    """Attach terminal Hessian factors ``factors`` (``(R, *output.shape)``) to a block output.

    ``None`` removes them. The factors are consumed by the next backward pass through the
    block; they must not require grad.
    """
    record = _record_of(output, "output")
    if factors is None:
        record.terminal_factors = None
        return
    if not isinstance(factors, torch.Tensor):
        raise bad_type("factors", factors, "a tensor of shape (R, *output.shape)")
    expected = tuple(output.shape)
    if factors.dim() != output.dim() + 1 or tuple(factors.shape[1:]) != expected:
        raise bad_value(
            "factors",
            factors,
            f"shape (R, {', '.join(str(s) for s in expected)}): R factors, each shaped like the "
            f"block output {expected}",
        )
    if factors.shape[0] < 1:
        raise bad_value("factors", factors, "at least one factor (R >= 1)")
    if factors.dtype != output.dtype or factors.device != output.device:
        raise bad_value(
            "factors",
            factors,
            f"dtype {output.dtype} on device {output.device}, like the block output",
        )
    record.terminal_factors = factors.detach()
    record.input_factors = None


def propagated_factors(output: torch.Tensor) -> torch.Tensor:
    """The factors ``q_i(t0)``, ``(R, *x0.shape)``, after backward through the block.

    With no factors attached this is the adjoint ``a(t0)`` as a single factor, ``(1, *x0.shape)``
    (the empirical source).
    """
    record = _record_of(output, "output")
    if record.input_factors is None:
        raise ValueError(
            "output: no propagated factors yet; the backward pass through this block output "
            "has not run. Call backward on a loss that depends on it first."
        )
    return record.input_factors
