"""Per-sample adaptive step control: the own loop for batches of independent samples.

With ``step_control="per_sample"`` every row of the state (dim 0, a sample) keeps its own
time, step size, error ratio and accept/reject decision, as torchode (Lienen & Günnemann,
2022) does; the batch is still evaluated together, one field call per stage, the field
receiving one time per row (``t`` of shape ``(B,)``, so the field must accept per-sample
time: ``accepts_batched_time = True``). A sample whose last output time is reached stops
moving (its step is zero and its rows are masked), so a batch costs as many loop iterations
as its hardest sample, each iteration a full-batch evaluation; it pays when the samples
need very different steps, since the easy ones no longer take the hard ones' steps.

Semantics per sample are those of the own batch loop (:mod:`node_ocp.ode.rk`, torchdiffeq's)
on that sample alone: the initial step of Hairer, Nørsett & Wanner per sample; the RMS error
ratio over the sample's own state (or a per-sample norm given by the caller); accept when
``ratio <= 1``; the same step-size factor; FSAL; steps are not shortened to hit output
times: every sample passes through every output time by the step's dense output (the same
quartic as the batch loop), so extra output times (the curvature capture's sample grid)
never change the steps. Solving a batch here gives, row by row, the solves of each sample
alone by the own loop (to rounding; a decision at ``ratio`` within rounding of 1 may differ).

NFE: one evaluation of the field on the whole batch counts as one, as in batch control;
:class:`PerSampleStats` also counts the loop's iterations and each sample's accepted and
rejected steps.

Shared integrals (the own adjoint's parameter accumulators ``∫(∂f/∂θ)ᵀa dt``, a sum over
samples): ``func`` returns with each stage a token, and after every decision ``shared``
is handed the tokens of each stage slot with weights ``W`` ``(S, B)``: a sample's step
weights (its ``dt`` times the solution row) for an accepted step, the dense-output weights
of its last step where that step passes its last output time, zero for a rejected or
finished sample; the shared integral is ``Σ_i Σ_b W[i, b] g_b(stage i)``, the sum of each
sample's own integral.

Not supported (a ``ValueError`` from :func:`check_per_sample` naming the argument): fixed
step methods, methods other than ``dopri5`` and ``bosh3``, a ``norm`` option and options
other than :data:`OPTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .._errors import bad_value
from . import rk

#: Step controls: one step size for the whole batch, or one per sample (row of dim 0).
STEP_CONTROLS: tuple[str, ...] = ("batch", "per_sample")
#: Methods with per-sample control.
METHODS: tuple[str, ...] = ("dopri5", "bosh3")
#: Solver options per-sample control implements.
OPTIONS = frozenset(
    {"first_step", "min_step", "max_step", "safety", "ifactor", "dfactor", "max_num_steps"}
)


def check_step_control(value, name: str = "step_control") -> str:
    """Return ``value`` if it is one of :data:`STEP_CONTROLS`, else raise a ``ValueError``."""
    if not isinstance(value, str) or value not in STEP_CONTROLS:
        raise bad_value(
            name,
            value,
            "one of " + ", ".join(repr(s) for s in STEP_CONTROLS),
            "'per_sample' gives every sample (row of the batch) its own step size; "
            "'batch' shares one step size over the batch.",
        )
    return value


def check_per_sample(method: str, options: dict, backend: str, prefix: str = "") -> None:
    """Refuse, naming the argument, what per-sample control cannot solve."""
    if backend != "own":
        raise bad_value(
            "step_control",
            "per_sample",
            "step_control='per_sample' with backend='own' (it is an option of the own loop)",
            "Pass backend='own' as well.",
        )
    if method not in METHODS:
        raise bad_value(
            f"{prefix}method",
            method,
            f"one of {', '.join(repr(m) for m in METHODS)} with step_control='per_sample' "
            "(fixed-step methods have no step to control)",
            "Use dopri5 or bosh3, or step_control='batch'.",
        )
    extra = sorted(set(options) - OPTIONS)
    if extra:
        raise bad_value(
            f"{prefix}options",
            options,
            f"options among {', '.join(sorted(OPTIONS))} with step_control='per_sample' "
            f"(not {', '.join(extra)}; the error norm is the RMS over each sample's state)",
        )


@dataclass
class PerSampleStats:
    """What one per-sample solve did.

    Attributes:
        iterations: loop iterations (step attempts of the batch; each evaluates every stage
            but the first once on the whole batch).
        nfe: evaluations of the field on the whole batch (initial step included).
        accepted, rejected: ``(B,)`` each sample's accepted and rejected steps.
    """

    iterations: int = 0
    nfe: int = 0
    accepted: torch.Tensor | None = None
    rejected: torch.Tensor | None = None


def rms_norm(v: torch.Tensor) -> torch.Tensor:
    """``(B, M) -> (B,)``: the root mean square of each row."""
    return v.pow(2).mean(dim=1).sqrt()


def odeint(
    func: Callable,
    y0: torch.Tensor,
    t: torch.Tensor,
    *,
    method: str,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    options: dict | None = None,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stats: PerSampleStats | None = None,
    shared: Callable[[list, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Solve ``dy/dt = func(t, y)`` with one step size per row of ``y0``.

    Args:
        func: ``func(t, y)``, ``t`` ``(B,)`` one time per row (the state's dtype), ``y``
            shaped like ``y0``; returns a tensor shaped like ``y`` (with ``shared``: a pair
            ``(dy, token)``).
        y0: ``(B, *feat)`` float32/float64, rows independent samples.
        t: ``(T,)`` strictly monotone output times shared by every sample, ``T >= 2``.
        method: ``"dopri5"`` or ``"bosh3"``.
        options: among :data:`OPTIONS`.
        norm: ``(B, M) -> (B,)`` error norm of each row of the flattened scaled error
            (default: :func:`rms_norm`).
        stats: filled in when given.
        shared: called after every decision as ``shared(slots, W)``: ``slots[i]`` a list of
            ``(token, rows)`` (``rows`` ``(B,)`` bool, where stage slot ``i`` holds that
            token's value), ``W`` ``(S, B)`` the weights of each stage of each sample.

    Returns ``(T, B, *feat)``: row ``b`` of output ``k`` is sample ``b`` at ``t[k]``.
    """
    tab = rk.TABLEAUS[method]
    options = dict(options or {})
    stats = PerSampleStats() if stats is None else stats
    norm = rms_norm if norm is None else norm
    shape = y0.shape
    b_rows = shape[0]
    times = t.detach().to(torch.float64)
    reverse = bool(times[0] > times[1])
    if reverse:
        times = -times

    def f(s: torch.Tensor, y: torch.Tensor):
        stats.nfe += 1
        ts = s.to(y0.dtype)
        out = func(-ts if reverse else ts, y.view(shape))
        if shared is not None:
            dy, token = out
        else:
            dy, token = out, None
        dy = dy.reshape(b_rows, -1)
        return (-dy if reverse else dy), token

    ys = _solve(f, y0.reshape(b_rows, -1), times, tab, rtol, atol, options, norm, stats, shared)
    return ys.view(ys.shape[0], *shape)


def _solve(f, y, times, tab, rtol, atol, options, norm, stats, shared):
    dtype, device = y.dtype, y.device
    n_rows, m = y.shape
    n_out = times.numel()
    times = times.to(device)
    min_step = float(options.get("min_step", 0.0))
    max_step = float(options.get("max_step", float("inf")))
    safety = float(options.get("safety", 0.9))
    ifactor = float(options.get("ifactor", 10.0))
    dfactor = float(options.get("dfactor", 0.2))
    max_num_steps = int(options.get("max_num_steps", 2**31 - 1))
    s = tab.stages
    w = tab.weights(dtype, device)  # stage rows, the error row, the dense rows
    w64 = torch.as_tensor(tab.rows(), dtype=torch.float64, device=device)
    b_row = w64[s - 2]  # the solution: the last stage's input (FSAL)
    dense = w64[s:]  # (4, S): the powers x..x⁴ of the dense output
    c = torch.as_tensor(tab.nodes(np.float64), device=device)
    order = tab.order

    t = times[0].expand(n_rows).clone()
    f0, tok0 = f(t, y)
    if options.get("first_step") is not None:
        dt = torch.full_like(t, float(options["first_step"]))
    else:
        dt = _initial_step(f, t, y, f0, order, rtol, atol, norm)
    k = [None] * s  # stage derivatives (B, M)
    k[0] = f0
    slots: list[list] = [[] for _ in range(s)]  # tokens of the stage slots (shared)
    if shared is not None:
        slots[0] = [(tok0, torch.ones(n_rows, dtype=torch.bool, device=device))]
    outs = y.new_zeros(n_out, n_rows, m)
    outs[0] = y
    nxt = torch.ones(n_rows, dtype=torch.long, device=device)  # next output of each sample
    since_out = torch.zeros(n_rows, dtype=torch.long, device=device)
    accepted = torch.zeros(n_rows, dtype=torch.long, device=device)
    rejected = torch.zeros_like(accepted)
    rows = torch.arange(n_rows, device=device)
    graph = torch.is_grad_enabled()
    kbuf = None if graph else y.new_empty(s, n_rows, m)  # the stages, rewritten in place
    if kbuf is not None:
        kbuf[0] = f0
    while True:
        active = nxt < n_out
        dt = torch.where(torch.isfinite(dt), dt, torch.full_like(dt, min_step))
        dt = dt.clamp(min=min_step, max=max_step)
        dt = torch.where(active, dt, torch.zeros_like(dt))  # finished samples stay put
        t1 = t + dt
        underflow = active & ~(t1 > t)
        # one read of the device per check round: done, too many steps, underflow
        go, too_many, under = torch.stack(
            [active.any(), (since_out >= max_num_steps).any(), underflow.any()]
        ).tolist()
        if not go:
            break
        if too_many:
            raise AssertionError(f"max_num_steps exceeded ({max_num_steps})")
        if under:
            raise AssertionError(f"underflow in dt {float(dt[underflow][0])}")
        stats.iterations += 1
        dt_col = dt.to(dtype)[:, None]
        # stage times t + c·dt (the stages at c = 1 just below t1, as the batch loop)
        below = torch.nextafter(t1.to(dtype), torch.full_like(t1, -float("inf"), dtype=dtype))
        yi = y
        for i in range(1, s):
            if graph:
                comb = torch.einsum("j,jbm->bm", w[i - 1, :i], torch.stack(k[:i]))
            else:
                comb = torch.mv(kbuf[:i].view(i, -1).t(), w[i - 1, :i]).view(n_rows, m)
            yi = torch.addcmul(y, dt_col, comb)
            ti = below if tab.c[i] == 1 else (t + c[i] * dt).to(dtype)
            ki, tok = f(ti, yi)
            if graph:
                k[i] = ki
            else:
                kbuf[i] = ki
            if shared is not None:
                slots[i] = [(tok, torch.ones(n_rows, dtype=torch.bool, device=device))]
        y1 = yi
        kk = torch.stack(k) if graph else kbuf
        with torch.no_grad():
            err = torch.einsum("j,jbm->bm", w[s - 1], kk) * dt_col
            tol = torch.maximum(y.abs(), y1.abs()).mul_(rtol).add_(atol)
            ratio = norm(err / tol).to(torch.float64)
        bad = active & torch.isnan(ratio)
        accept = active & ((ratio <= 1) | (dt <= min_step))
        idx = nxt.clamp(max=n_out - 1)
        emit = accept & (nxt < n_out) & (times[idx] <= t1)
        nan, emitting = torch.stack([bad.any(), emit.any()]).tolist()
        if nan:
            first = int(rows[bad][0])
            raise AssertionError(
                f"non-finite values in the error estimate of sample {first}'s step from "
                f"t={float(t[first])} (dt={float(dt[first])})"
            )
        reject = active & ~accept
        accepted += accept
        rejected += reject
        since_out += active
        # dense output at every output time the accepted steps pass
        wts = None  # (S, B) the weights of each sample's step, for the shared integral
        if shared is not None:
            wts = torch.where(accept[None, :], b_row[:, None] * dt[None, :], 0.0)
        while emitting:
            tj = times[idx]
            x = torch.where(emit, (tj - t) / torch.where(emit, dt, 1.0), 1.0)
            pw = torch.stack([x, x * x, x**3, x**4])  # (4, B)
            wd = (dense.T @ pw) * dt  # (S, B)
            val = y + torch.einsum("sb,sbm->bm", wd.to(dtype), kk)
            val = torch.where((tj == t1)[:, None], y1, val)
            sel = rows[emit]
            outs = outs.index_put((idx[sel], sel), val[sel])
            if shared is not None:
                final = emit & (nxt == n_out - 1) & (tj < t1)
                wts = torch.where(final[None, :], wd, wts)
            since_out = torch.where(emit, 0, since_out)
            nxt = nxt + emit
            idx = nxt.clamp(max=n_out - 1)
            emit = accept & (nxt < n_out) & (times[idx] <= t1)
            emitting = bool(emit.any())
        if shared is not None:
            shared(slots, wts)
        acc_col = accept[:, None]
        y = torch.where(acc_col, y1, y)
        t = torch.where(accept, t1, t)
        if graph:
            k[0] = torch.where(acc_col, k[s - 1], k[0])  # FSAL
        else:
            kbuf[0] = torch.where(acc_col, kbuf[s - 1], kbuf[0])
        if shared is not None:
            slots[0] = [(tok, r & ~accept) for tok, r in slots[0]] + [
                (tok, r & accept) for tok, r in slots[s - 1]
            ]
            slots[0] = [(tok, r) for tok, r in slots[0] if bool(r.any())]
        # the next step of each sample (the batch loop's factor, per row)
        with torch.no_grad():
            safe = torch.where(ratio > 0, ratio, 1.0)
            low = torch.where(ratio < 1, 1.0, dfactor)
            factor = torch.clamp(safety / safe ** (1.0 / order), min=low).clamp(max=ifactor)
            factor = torch.where(ratio == 0, ifactor, factor)
            dt = (dt * factor).clamp(min=min_step, max=max_step)
    stats.accepted = accepted if stats.accepted is None else stats.accepted + accepted
    stats.rejected = rejected if stats.rejected is None else stats.rejected + rejected
    return outs


def _initial_step(f, t0, y0, f0, order: int, rtol, atol, norm) -> torch.Tensor:
    """Hairer, Nørsett & Wanner's initial step per row (float64 ``(B,)``), like the batch
    loop's on each sample alone (``order`` is the method's; the exponent is ``1/order``)."""
    with torch.no_grad():
        scale = y0.abs().mul(rtol).add_(atol)
        d0 = norm(y0 / scale).abs().to(torch.float64)
        d1 = norm(f0 / scale).abs().to(torch.float64)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
        h0 = h0.to(y0.dtype).to(torch.float64)
        y1 = y0 + h0.to(y0.dtype)[:, None] * f0
    f1, _ = f(t0 + h0, y1)
    with torch.no_grad():
        d2 = norm((f1 - f0) / scale).abs().to(torch.float64) / h0
        small = (d1 <= 1e-15) & (d2 <= 1e-15)
        h1 = torch.where(
            small,
            torch.clamp(h0 * 1e-3, min=1e-6),
            (0.01 / torch.maximum(d1, d2)) ** (1.0 / order),
        )
        return torch.minimum(100 * h0, h1)
