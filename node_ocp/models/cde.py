"""Neural CDE on irregular batches, with torchcde's interpolation and our ODE block.

``dz = f(z) dX(t)`` is solved as the ODE ``dz/dt = f(z) · dX/dt`` in an
:class:`~node_ocp.ODEBlock`, so the own adjoint and curvature capture apply. ``X`` is
torchcde's interpolation of the observations on the union of the batch's times, with time and
cumulative observation counts (divided by the series' number of time points, so in [0, 1])
as extra channels. Missing values are filled by torchcde; the
time channel is observed only at each series' own times, so a series' path is constant
before its first and after its last observation and its state does not change there.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .._errors import bad_type, bad_value, check_choice
from ..data.irregular import IrregularBatch
from ..ode.block import ODEBlock
from .fields import ACTIVATIONS, time_mlp

INTERPOLATIONS = ("hermite", "linear")


def _torchcde():
    try:
        return importlib.import_module("torchcde")
    except ImportError as err:
        raise ImportError(
            "torchcde is needed for NeuralCDE; install it with: pip install torchcde"
        ) from err


class CDEField(nn.Module):
    """``f(t, z) = net(z) · dX/dt(t)``: ``(N, H) -> (N, H)`` for the path set by ``set_path``.

    The last linear map of ``net`` starts at zero, so at initialisation ``f = 0`` and the
    state keeps its initial value whatever the scale of the path: with the usual
    initialisation ``f`` is of order one and, being nearly constant while the state has not
    moved, carries the state by about ``f · (X(t1) − X(t0))``, which for raw (unstandardised)
    channels is tens (BasicMotions: final state RMS 28, initial logits' std 26,
    cross-entropy 21 for 4 classes). Its gradient is not zero (``tanh'(0) = 1``), so the
    field grows from the first step.
    """

    accepts_batched_time = False

    def __init__(self, hidden: int, path_channels: int, widths=(64,), activation="softplus"):
        super().__init__()
        layers, a = [], hidden
        for w in widths:
            layers += [nn.Linear(a, w), ACTIVATIONS[activation]()]
            a = w
        last = nn.Linear(a, hidden * path_channels)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers += [last, nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.hidden, self.path_channels = hidden, path_channels
        self._path_box: list = [None]  # a list, not a submodule: the path is the batch's

    @property
    def path(self):
        """The control path of the current batch (a torchcde interpolation), or None."""
        return self._path_box[0]

    def set_path(self, path) -> None:
        """Use ``path`` (``derivative(t) -> (N, C_path)``) until the next call. It is not
        registered as a submodule, so its coefficients stay out of ``state_dict()``."""
        self._path_box[0] = path

    def forward(self, t, z):
        if self.path is None:
            raise RuntimeError("CDEField: no path set; call the NeuralCDE, not its block")
        dx = self.path.derivative(t)  # (N, C_path)
        f = self.net(z).view(z.shape[0], self.hidden, self.path_channels)
        return (f @ dx.unsqueeze(-1)).squeeze(-1)


class NeuralCDE(nn.Module):
    """Neural CDE for irregular series: classification or forecasting.

    Args:
        channels: observed channels C.
        outputs: number of classes (classification) or forecast channels.
        hidden: size of the CDE state.
        interpolation: ``"hermite"`` (cubic Hermite with backward differences) or
            ``"linear"``.
        task: ``"classification"``: ``forward(batch) -> (B, outputs)`` logits from the state
            at the end of each series. ``"forecast"``: ``forward(batch, query_times (B, Q))
            -> (B, Q, outputs)``; after the CDE has read a series, a decoder ODE block evolves
            its state from the series' last observation time to each query time (queries at
            or after the last observation).
        method, rtol, atol, gradient, backend, step_control: the ODE blocks' settings.
    """

    def __init__(
        self,
        channels: int,
        outputs: int,
        hidden: int = 32,
        field_hidden=(64,),
        interpolation: str = "hermite",
        task: str = "classification",
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-4,
        gradient: str = "adjoint",
        backend: str = "torchdiffeq",
        step_control: str = "batch",
    ):
        super().__init__()
        self.interpolation = check_choice("interpolation", interpolation, INTERPOLATIONS)
        _torchcde()
        path_channels = 1 + 2 * channels  # time, values, cumulative observation counts
        self.channels = channels
        self.initial = nn.Linear(path_channels, hidden)
        self.field = CDEField(hidden, path_channels, field_hidden)
        self.ode = ODEBlock(
            self.field,
            (0.0, 1.0),
            method=method,
            rtol=rtol,
            atol=atol,
            gradient=gradient,
            backend=backend,
            step_control=step_control,
            name="CDE block",
        )
        self.head = nn.Linear(hidden, outputs)
        self.task = check_choice("task", task, ("classification", "forecast"))
        self.decoder = None
        if self.task == "forecast":
            self.decoder = ODEBlock(
                time_mlp(hidden, field_hidden, "tanh"),
                (0.0, 1.0),
                method=method,
                rtol=rtol,
                atol=atol,
                gradient=gradient,
                backend=backend,
                step_control=step_control,
                name="CDE decoder block",
            )

    def path_data(self, batch: IrregularBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grid (T,), data (B, T, 1 + 2C))`` on the union of times, NaN where unobserved."""
        times, valid = batch.times, batch.valid
        grid = torch.unique(times[valid])
        n, t_len, c = len(batch), grid.numel(), self.channels
        values = batch.values.new_full((n, t_len, c), float("nan"))
        # Time and cumulative observation counts (as fractions of the series' time points)
        # are set at the series' own observation times only (NaN elsewhere, filled by
        # torchcde like the values), so that a series' path does not depend on the other
        # series' times and is constant before its first and after its last observation.
        counts = batch.values.new_full((n, t_len, c), float("nan"))
        time_channel = batch.values.new_full((n, t_len, 1), float("nan"))
        pos = torch.searchsorted(grid, times.contiguous())  # (B, L)
        for b in range(n):
            idx = pos[b][valid[b]]
            observed = batch.mask[b][valid[b]]
            v = batch.values[b][valid[b]].clone()
            v[~observed] = float("nan")
            values[b, idx] = v
            # divided by the series' number of time points: the channel stays in [0, 1]
            # whatever the length (raw counts reach L and would drive the state by as much)
            counts[b, idx] = observed.to(values.dtype).cumsum(0) / max(int(idx.numel()), 1)
            time_channel[b, idx, 0] = grid[idx]
        return grid, torch.cat([time_channel, values, counts], 2)

    def feedback_stages(self) -> list[nn.Module]:
        """The stages of OCNOpt's feedback policies: initial map, CDE block, (decoder,) head.
        A stage called once per query time takes the open-loop step."""
        extra = [] if self.decoder is None else [self.decoder]
        return [self.initial, self.ode, *extra, self.head]

    def forward(self, batch: IrregularBatch, query_times: torch.Tensor | None = None):
        if not isinstance(batch, IrregularBatch):
            raise bad_type("batch", batch, "an IrregularBatch (see node_ocp.data)")
        if self.task == "forecast" and (
            query_times is None or query_times.dim() != 2 or query_times.shape[0] != len(batch)
        ):
            raise bad_value("query_times", query_times, f"a ({len(batch)}, Q) tensor of times")
        cde = _torchcde()
        grid, data = self.path_data(batch)
        if self.interpolation == "hermite":
            coeffs = cde.hermite_cubic_coefficients_with_backward_differences(data, t=grid)
            path = cde.CubicSpline(coeffs, t=grid)
        else:
            coeffs = cde.linear_interpolation_coeffs(data, t=grid)
            path = cde.LinearInterpolation(coeffs, t=grid)
        # The block's backward solve reads the field's path too: a forward pass is followed by
        # its backward before the next forward, as in any training loop.
        self.field.set_path(path)
        z = self.initial(path.evaluate(grid[0]))
        if grid.numel() >= 2:
            if self.ode.solver.adaptive:
                z = self.ode(z, t=torch.stack([grid[0], grid[-1]]))
            else:
                # A fixed-step solver steps from knot to knot of the path (a single step over
                # the whole span would skip the data); the state at the last knot is kept.
                z = self.ode(z, t=grid)[-1]
        if self.task == "classification":
            return self.head(z)
        return self._decode(z, batch, query_times.to(z.dtype))

    def _decode(self, z, batch: IrregularBatch, query_times: torch.Tensor) -> torch.Tensor:
        last = torch.where(batch.valid, batch.times, batch.times.new_full((), -float("inf")))
        last = last.max(1).values.to(z.dtype)  # (B,) each series' last observation time
        events = torch.unique(torch.cat([last, query_times.reshape(-1)]))
        started = torch.zeros(len(batch), dtype=torch.bool, device=z.device)
        preds = z.new_zeros(*query_times.shape, self.head.out_features)
        h = z
        for k in range(events.numel()):
            t = events[k]
            if k > 0 and bool(started.any()):
                evolved = self.decoder(h, t=torch.stack([events[k - 1], t]))
                h = torch.where(started[:, None], evolved, h)
            started = started | (last == t)
            hit = query_times == t
            if bool(hit.any()):
                preds = torch.where(hit[..., None], self.head(h)[:, None, :], preds)
        return preds
