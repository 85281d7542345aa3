"""ODE-RNN for irregularly sampled multivariate series (Rubanova et al., 2019).

The hidden state of each series starts at zero at its first observation. Between
observation times one shared ODE block evolves the hidden states of the whole batch; at an
observation a GRU cell updates the hidden state of the series observed there from
``[values · mask, mask]``. The batch steps through the union of its observation times, so
every series keeps its own times (no resampling) and every interval is one call of the same
block (curvature capture sees them all in one step).

Heads: classification from the hidden state at each series' last observation; forecasting
at query times after (or between) the observations, decoded from the evolved state.
"""

from __future__ import annotations

import torch
from torch import nn

from .._errors import bad_type, bad_value, check_choice
from ..data.irregular import IrregularBatch
from ..ode.block import ODEBlock
from .fields import time_mlp

TASKS = ("classification", "forecast")


class ODERNN(nn.Module):
    """ODE-RNN encoder with a classification or forecasting head.

    Args:
        channels: C, channels per observation.
        outputs: number of classes (classification) or of forecast channels.
        hidden: size H of the hidden state.
        field_hidden: hidden widths of the ODE field (a tanh concat-squash MLP on H).
        task: ``"classification"`` or ``"forecast"``.
        method, rtol, atol, gradient, backend, step_control: the ODE block's settings.

    ``forward(batch)`` returns logits ``(B, outputs)``; ``forward(batch, query_times)`` with
    ``query_times (B, Q)`` returns forecasts ``(B, Q, outputs)``.
    """

    def __init__(
        self,
        channels: int,
        outputs: int,
        hidden: int = 32,
        field_hidden=(64,),
        task: str = "classification",
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-4,
        gradient: str = "adjoint",
        backend: str = "torchdiffeq",
        step_control: str = "batch",
    ):
        super().__init__()
        self.task = check_choice("task", task, TASKS)
        self.channels = channels
        self.gru = nn.GRUCell(2 * channels, hidden)
        self.ode = ODEBlock(
            time_mlp(hidden, field_hidden, "tanh"),
            (0.0, 1.0),
            method=method,
            rtol=rtol,
            atol=atol,
            gradient=gradient,
            backend=backend,
            step_control=step_control,
            name="ODE-RNN block",
        )
        self.head = nn.Linear(hidden, outputs)
        self.hidden = hidden

    def feedback_stages(self) -> list[nn.Module]:
        """The stages of OCNOpt's feedback policies: GRU cell, ODE block, head. The cell and
        the block are called once per observation interval and take the open-loop step (see
        :mod:`node_ocp.optim.feedback`); the head takes a gain when called once."""
        return [self.gru, self.ode, self.head]

    def forward(self, batch: IrregularBatch, query_times: torch.Tensor | None = None):
        if not isinstance(batch, IrregularBatch):
            raise bad_type("batch", batch, "an IrregularBatch (see node_ocp.data)")
        if batch.values.shape[-1] != self.channels:
            raise bad_value(
                "batch.values", batch.values, f"{self.channels} channels in the last dimension"
            )
        if self.task == "forecast" and query_times is None:
            raise bad_value("query_times", None, "a (B, Q) tensor of times for task='forecast'")
        if query_times is not None and query_times.shape[0] != len(batch):
            raise bad_value("query_times", query_times, f"shape ({len(batch)}, Q)")
        times, valid = batch.times, batch.valid
        events = times[valid]
        if query_times is not None:
            events = torch.cat([events, query_times.reshape(-1).to(times.dtype)])
        grid = torch.unique(events)  # sorted
        n = len(batch)
        h = batch.values.new_zeros(n, self.hidden)
        started = torch.zeros(n, dtype=torch.bool, device=h.device)
        h_last = h
        preds = None
        if query_times is not None:
            preds = h.new_zeros(n, query_times.shape[1], self.head.out_features)
        for k in range(grid.numel()):
            t = grid[k]
            if k > 0:
                evolved = self.ode(h, t=torch.stack([grid[k - 1], t]))
                h = torch.where(started[:, None], evolved, h)
            hit = valid & (times == t)  # (B, L): at most one per series
            has = hit.any(1)
            if bool(has.any()):
                sel = hit[..., None]
                x = (batch.values * sel).sum(1)
                m = (batch.mask & sel).any(1).to(h.dtype)
                updated = self.gru(torch.cat([x * m, m], 1), h)
                h = torch.where(has[:, None], updated, h)
                started = started | has
                h_last = torch.where(has[:, None], h, h_last)
            if query_times is not None:
                q_hit = query_times == t  # (B, Q)
                if bool(q_hit.any()):
                    out = self.head(h)  # (B, outputs)
                    preds = torch.where(q_hit[..., None], out[:, None, :], preds)
        if query_times is not None:
            return preds
        return self.head(h_last)
