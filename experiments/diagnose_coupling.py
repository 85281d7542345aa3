"""Is it the coupling? Hessian-free (truncated Newton) with the exact Gauss-Newton
curvature of the whole model against tuned Adam on the ODE-RNN spiral forecaster (issue 21).

OCNOpt's curvature is Kronecker-factored per layer and block-diagonal across layers, so it
leaves out the coupling between the GRU cell, the ODE field and the head (parameters shared
across time). This script asks whether a second-order method that has every coupling, the
exact Gauss-Newton matrix ``G = Jᵀ H_L J`` of the whole model, beats tuned Adam at equal
steps, and whether it does better than the same method restricted to a block-diagonal
``G`` (the cleanest test of "the coupling matters").

Data, model, loss and metric are the library's: ``load_config`` + ``build_task`` (seeded as
``node-ocp train`` seeds it), ``Task.batch_loss`` on the batches of the training loop's
``BatchSampler`` (same seed), ``Task.evaluate`` on the validation split every
``eval_every`` steps and on the test split at the reported steps (the final model, and the
best-validation model among the scheduled evaluations, as ``summary.json`` does). The ODE
block is switched to ``gradient="direct"`` (backprop through the solver) so that the
double-backward trick works; Adam runs with it too.

Hessian-free step (Martens 2010): on the batch, the gradient ``g`` and Gauss-Newton-vector
products ``Gv = Jᵀ H_L J v``. For the masked mean squared error ``Σ m (p - y)² / Σ m`` the
loss Hessian wrt the predictions ``p`` is exactly ``diag(2 m / Σ m)``. ``Jv`` comes from
the double-backward trick (``Jᵀu`` is built once per step with ``create_graph``, linear in a
dummy ``u``; ``Jv = ∂(Jᵀu · v)/∂u``) and ``Jᵀw`` from one backward pass. Conjugate
gradient on ``(G + λI) d = -g`` for a fixed number of iterations, warm-started from the
previous ``d`` times 0.95; λ by Levenberg-Marquardt from the reduction ratio
``ρ = (f(θ+d) - f(θ)) / (gᵀd + ½ dᵀGd)`` on the batch (ρ < 1/4: λ × 3/2; ρ > 3/4:
λ × 2/3); then a backtracking line search (α halved up to 8 times) until
``f(θ+αd) <= f(θ) + 0.01 α gᵀd``, no step when none passes.

Block-diagonal variant (``hfbd<N>``): ``G`` with every off-block part zeroed, the blocks
being the model's parts (``--blocks parts``: GRU cell, ODE field, head), its layers
(``layers``: the GRU's input and hidden maps, each field layer, the head) or its parameter
tensors (``tensors``). One ``Gv`` per block per CG iteration.

Re-scaling arm (``cr``, :class:`CoupledRescale`): Adam's direction cut into the ``--blocks``
(``full``: one block), plus the previous update, combined with the coefficients that
minimise the exact, coupled Gauss-Newton model of the batch (``k + 1`` products a step, no
CG): how much of the coupling a few products recover.

The latent ODE (``--config configs/latent_oscillator_interp.toml``) is handled through
:func:`latent_terms`: its bound as a function of the decoded means, ``mu`` and ``std`` with
the exact output Hessian, so that ``G`` is the whole bound's Gauss-Newton (KL included).

    OMP_NUM_THREADS=1 python experiments/diagnose_coupling.py --arms hf10 adam --seeds 0
    OMP_NUM_THREADS=1 python experiments/diagnose_coupling.py --arms hf30 hfbd10 --seeds 0 \
        --steps 150

Results are merged into ``--out`` (one entry per arm and seed; a rerun replaces its entry)
and the table of everything there is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------- curvature
def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(v: torch.Tensor, like) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like:
        out.append(v[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out


class GaussNewton:
    """The Gauss-Newton-vector products of one batch: ``outputs`` (any shape) computed from
    ``params`` with its graph, and ``hdiag`` the loss's diagonal Hessian wrt ``outputs``.

    ``blocks``: lists of indices into ``params``; with them :meth:`gv` is the product with
    the block-diagonal part of ``G`` (off-block parts zeroed). ``count``: products made.
    """

    def __init__(self, outputs, params, hdiag, blocks=None):
        self.outputs, self.params, self.hdiag = outputs, list(params), hdiag
        self.u = torch.zeros_like(outputs, requires_grad=True)
        # Jᵀu, linear in u: its graph is built once, Jv is one backward pass through it
        self.jtu = torch.autograd.grad(
            outputs, self.params, grad_outputs=self.u, create_graph=True, allow_unused=True
        )
        self.blocks = blocks
        self.count = 0
        sizes = [p.numel() for p in self.params]
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
        self.slices = [slice(starts[i], starts[i + 1]) for i in range(len(sizes))]

    def jv(self, v: torch.Tensor) -> torch.Tensor:
        vs = unflat(v, self.params)
        pairs = [(a, b) for a, b in zip(self.jtu, vs) if a is not None and a.requires_grad]
        (out,) = torch.autograd.grad(
            [a for a, _ in pairs], self.u, grad_outputs=[b for _, b in pairs], retain_graph=True
        )
        return out

    def jtw(self, w: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(
            self.outputs, self.params, grad_outputs=w, retain_graph=True, allow_unused=True
        )
        return flat([torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)])

    def full(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.jtw(self.hdiag * self.jv(v))

    def gv(self, v: torch.Tensor) -> torch.Tensor:
        if self.blocks is None:
            return self.full(v)
        out = torch.zeros_like(v)
        for block in self.blocks:
            keep = torch.zeros_like(v, dtype=torch.bool)
            for i in block:
                keep[self.slices[i]] = True
            out = torch.where(keep, self.full(torch.where(keep, v, 0.0)), out)
        return out


def masked_mse_hessian(target) -> torch.Tensor:
    """The exact Hessian diagonal of ``node_ocp.train.tasks.masked_mse`` wrt the predictions
    (shape of ``target.values``): ``2 m / max(Σ m, 1)``."""
    m = target.mask.to(target.values.dtype)
    return 2.0 * m / m.sum().clamp_min(1.0)


def latent_terms(model: nn.Module, x, y, eps: torch.Tensor):
    """A latent ODE's training loss as a function of outputs ``o = (preds, mu, std)``
    (flattened, concatenated) and the loss's exact Hessian diagonal wrt ``o``:
    ``(o, loss, hdiag)``.

    The loss is the model's own (``model(x, y.times, targets=y)``: the negative bound per
    observed value) for one posterior draw ``z = mu + std * eps`` (``eps (1, B, L)``, fixed
    by the caller so that a step's trials see the same draw): with one draw the bound is the
    observation log-likelihood minus ``w`` times the closed-form KL, so it is a function of
    the decoded means and of ``(mu, std)`` only. Its Hessian is diagonal:
    ``m / (σ² n)`` in the decoded means (mask ``m``, ``n`` observed values), ``w / n`` in
    ``mu`` and ``w (1 + 1/std²) / n`` in ``std`` (KL ``= ½(std² + mu²) − log std − ½``).
    So ``Jᵀ H J`` is the exact Gauss–Newton matrix of the whole bound: decoder, latent field
    and encoder coupled, the KL's curvature included.
    """
    from node_ocp.models.latent import bound_per_series, observation_log_likelihood

    if eps.shape[0] != 1:
        raise ValueError(f"eps: received shape {tuple(eps.shape)}; accepted: (1, B, L)")
    mu, std = model.posterior(x)
    times = torch.cat([x.times, y.times], 1)
    values = torch.cat([x.values, y.values], 1)
    mask = torch.cat([x.mask, y.mask], 1)
    z = mu + std * eps
    preds = model.decode(z, times)  # (1, B, P, C)
    n = mask.sum().to(preds.dtype).clamp_min(1.0)
    w = float(model.kl_weight)
    outputs = torch.cat([preds.reshape(-1), mu.reshape(-1), std.reshape(-1)])
    sizes = [preds.numel(), mu.numel(), std.numel()]
    p_, mu_, std_ = outputs.split(sizes)
    log_lik = observation_log_likelihood(p_.view(preds.shape), values, mask, model.obs_std)
    bound = bound_per_series(log_lik, z, mu_.view(mu.shape), std_.view(std.shape), w)
    loss = -bound.sum() / n
    m = mask.to(preds.dtype).expand(preds.shape).reshape(-1)
    sd = std.detach().reshape(-1)
    hdiag = torch.cat(
        [m / (model.obs_std**2 * n), torch.full_like(sd, w) / n, w * (1 + 1 / sd**2) / n]
    )
    return outputs, loss, hdiag.detach()


def conjugate_gradient(matvec, b, x0, iters: int):
    """``iters`` CG iterations on ``A x = b`` from ``x0``; returns ``(x, A x)``."""
    x = x0.clone()
    ax = matvec(x) if bool(x.any()) else torch.zeros_like(b)
    r = b - ax
    p = r.clone()
    rr = r @ r
    for _ in range(iters):
        if float(rr) <= 1e-30:
            break
        ap = matvec(p)
        pap = p @ ap
        if float(pap) <= 0:
            break
        a = rr / pap
        x = x + a * p
        ax = ax + a * ap
        r = r - a * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, ax


def parameter_blocks(model: nn.Module, how: str) -> list[list[int]] | None:
    """Index lists into ``list(model.parameters())``: ``full`` (None: one block),
    ``parts`` (the model's top-level children: GRU cell, ODE block, head), ``layers`` (the
    GRU's input and hidden maps, each field layer, the head) or ``tensors``."""
    names = [n for n, _ in model.named_parameters()]
    if how == "full":
        return None
    if how == "tensors":
        return [[i] for i in range(len(names))]
    keys = []
    for n in names:
        if how == "parts":
            keys.append(n.split(".")[0])
        elif how == "layers":
            if n.startswith("gru."):
                keys.append("gru." + n.rsplit("_", 1)[-1])  # ih or hh: weight and bias
            else:
                m = re.match(r"(.*layers\.\d+)\.", n)
                keys.append(m.group(1) if m else n.rsplit(".", 1)[0])
        else:
            raise ValueError(f"blocks: {how!r}")
    order = list(dict.fromkeys(keys))
    return [[i for i, k in enumerate(keys) if k == key] for key in order]


# ---------------------------------------------------------------------- optimizers
class _Checked:
    """A step ``d`` checked on the batch: λ by Levenberg–Marquardt on its reduction ratio
    ρ, then Armijo backtracking (α halved up to 8 times, no step when none passes)."""

    params: list
    damping: float

    def _set(self, theta):
        with torch.no_grad():
            for p, t in zip(self.params, unflat(theta, self.params)):
                p.copy_(t)

    def _take(self, batch_fn, d, f0: float, gd: float, predicted: float, lam: float):
        """Apply ``d`` (or a fraction, or nothing); returns ``(ρ, α)``."""
        theta = flat(self.params).detach().clone()
        with torch.no_grad():
            self._set(theta + d)
            f1 = float(batch_fn(False)[1])
        rho = (f1 - f0) / predicted if predicted < 0 else -math.inf
        if not math.isfinite(f1):
            rho = -math.inf
        if rho < 0.25:
            self.damping = lam * 1.5
        elif rho > 0.75:
            self.damping = max(lam * (2.0 / 3.0), 1e-8)
        alpha, f = 1.0, f1
        tries = 0
        while not (math.isfinite(f) and f <= f0 + 0.01 * alpha * gd) and tries < 8:
            alpha *= 0.5
            tries += 1
            with torch.no_grad():
                self._set(theta + alpha * d)
                f = float(batch_fn(False)[1])
        if not (math.isfinite(f) and f <= f0 + 0.01 * alpha * gd):
            alpha = 0.0
            self._set(theta)
        return rho, alpha


class HessianFree(_Checked):
    """Truncated Newton with CG on the (block-diagonal) Gauss-Newton matrix; see the module
    docstring. ``step(batch_fn)``: ``batch_fn(with_grad)`` -> ``(outputs, loss, hdiag)``."""

    def __init__(self, model, cg_iters, blocks="full", damping=1.0, decay=0.95):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.cg_iters, self.damping, self.decay = cg_iters, damping, decay
        self.blocks = parameter_blocks(model, blocks)
        self.d_prev = None
        self.products = 0
        self.log: list[dict] = []

    def step(self, batch_fn) -> float:
        outputs, loss, hdiag = batch_fn(True)
        grads = torch.autograd.grad(loss, self.params, retain_graph=True)
        g = flat(grads).detach()
        gn = GaussNewton(outputs, self.params, hdiag, self.blocks)
        lam = self.damping

        def a(v):
            return gn.gv(v).detach() + lam * v

        x0 = torch.zeros_like(g) if self.d_prev is None else self.decay * self.d_prev
        d, ad = conjugate_gradient(a, -g, x0, self.cg_iters)
        self.products += gn.count
        f0 = float(loss.detach())
        gd = float(g @ d)
        dgd = float(d @ ad) - lam * float(d @ d)  # dᵀGd without the damping
        predicted = gd + 0.5 * dgd
        rho, alpha = self._take(batch_fn, d, f0, gd, predicted, lam)
        self.d_prev = d
        self.log.append(
            {"loss": f0, "rho": rho, "lambda": lam, "alpha": alpha, "gd": gd, "dgd": dgd}
        )
        return f0


class CoupledRescale(_Checked):
    """Adam's direction cut into blocks, plus the previous update, combined by the exact,
    coupled Gauss-Newton quadratic model of the batch (K-FAC's re-scaling and momentum,
    Martens & Grosse 2015 §7, with exact products): ``D = [d_1 … d_k, δ_prev]``,
    ``c = argmin gᵀDc + ½ cᵀ(DᵀGD + λ diag(DᵀGD))c``, the step ``Dc`` (backtracked until the
    loss falls, λ by Levenberg-Marquardt on ρ). A probe of how much of the whole curvature's
    coupling a few products per step recover (``k + 1`` products ``J d``, no CG)."""

    #: the base direction: Adam's ``m̂/(√v̂+ε)``; ``rms``: ``g/(√v̂+ε)``; ``momentum``: ``m̂``;
    #: ``gradient``: ``g`` (which part of Adam's direction the re-scaling needs, §19)
    BASES = ("adam", "rms", "momentum", "gradient")

    def __init__(
        self, model, blocks="parts", damping=1.0, betas=(0.9, 0.999), eps=1e-8, base="adam"
    ):
        if base not in self.BASES:
            raise ValueError(f"base: received {base!r}; accepted: {', '.join(self.BASES)}")
        self.base = base
        self.params = [p for p in model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in self.params)
        self.blocks = parameter_blocks(model, blocks) or [list(range(len(self.params)))]
        self.damping, self.betas, self.eps = damping, betas, eps
        self.m, self.v, self.t = torch.zeros(n), torch.zeros(n), 0
        self.prev = None
        self.products = 0
        self.log: list[dict] = []

    def combine(self, dirs, g, gn: GaussNewton, hdiag, lam: float):
        """``(c, DᵀGD, Dᵀg)``: the coefficients minimising the damped coupled model."""
        jd = [gn.jv(d).detach().reshape(-1) for d in dirs]
        self.products += len(dirs)
        h = hdiag.reshape(-1)
        k = len(dirs)
        mat = torch.empty(k, k, dtype=torch.float64)
        for i in range(k):
            for j in range(i, k):
                mat[i, j] = mat[j, i] = float((jd[i] * h * jd[j]).sum())
        b = torch.tensor([float(g @ d) for d in dirs], dtype=torch.float64)
        damped = mat + lam * torch.diag(mat.diagonal().clamp_min(1e-12))
        c = torch.linalg.lstsq(damped, -b[:, None]).solution[:, 0]
        return c, mat, b

    def step(self, batch_fn) -> float:
        outputs, loss, hdiag = batch_fn(True)
        g = flat(torch.autograd.grad(loss, self.params, retain_graph=True)).detach()
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        top = g if self.base in ("rms", "gradient") else self.m / (1 - b1**self.t)
        if self.base in ("adam", "rms"):
            a = top / ((self.v / (1 - b2**self.t)).sqrt() + self.eps)
        else:
            a = top
        gn = GaussNewton(outputs, self.params, hdiag)
        dirs = []
        for block in self.blocks:
            keep = torch.zeros_like(a, dtype=torch.bool)
            for i in block:
                keep[gn.slices[i]] = True
            dirs.append(torch.where(keep, -a, 0.0))
        if self.prev is not None:
            dirs.append(self.prev)
        lam = self.damping
        c, mat, b = self.combine(dirs, g, gn, hdiag, lam)
        d = sum(float(ci) * di for ci, di in zip(c, dirs))
        predicted = float(b @ c + 0.5 * c @ mat @ c)
        f0 = float(loss.detach())
        rho, alpha = self._take(batch_fn, d, f0, float(g @ d), predicted, lam)
        self.prev = alpha * d
        self.log.append({"loss": f0, "rho": rho, "lambda": lam, "alpha": alpha})
        return f0


# ---------------------------------------------------------------------- the runs
def build(config_path: str, seed: int):
    from node_ocp.train.config import load_config
    from node_ocp.train.loop import BatchSampler
    from node_ocp.train.tasks import build_task

    cfg = load_config(config_path)
    torch.manual_seed(seed)  # as the training loop seeds the initialisation
    task = build_task(cfg, "cpu")
    for block in task.blocks:
        block.gradient = "direct"
    sampler = BatchSampler(len(task.data.train), cfg.train.batch_size, seed)
    return cfg, task, sampler


def run(arm: str, seed: int, steps: int, report: list[int], args) -> dict:
    cfg, task, sampler = build(args.config, seed)
    model = task.model
    every, chunk = cfg.train.eval_every, cfg.train.eval_batch
    m = re.fullmatch(r"(hf|hfbd)(\d+)|adam|cr", arm)
    if m is None:
        raise SystemExit(f"--arms: {arm!r}; accepted: adam, hf<N>, hfbd<N>, cr")
    blocks = None
    if arm == "cr":  # Adam's blocks re-scaled by the coupled model (CoupledRescale)
        blocks = args.blocks
        hf = CoupledRescale(model, blocks=blocks, damping=args.damping, base=args.cr_base)
    elif arm == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=args.adam_lr, betas=(0.9, 0.999))
        hf = None
    else:
        blocks = "full" if m.group(1) == "hf" else args.blocks
        hf = HessianFree(model, int(m.group(2)), blocks=blocks, damping=args.damping)
    metric = task.metric
    record = {
        "arm": arm,
        "seed": seed,
        "steps": steps,
        "blocks": blocks,
        "cr_base": args.cr_base if arm == "cr" else None,
        "curve": [],
        "reports": {},
    }
    val0 = task.evaluate(task.data.val, chunk)[metric]
    record["curve"].append({"step": 0, "train_loss": None, f"val_{metric}": val0})
    best = (val0, 0, copy.deepcopy(model.state_dict()))
    clock, losses = 0.0, []
    latent = bool(getattr(task, "owns_objective", False))  # a latent ODE: the bound
    for step in range(1, steps + 1):
        batch = task.data.train.batch(sampler.next())
        task.at_step(step - 1)  # as the training loop (KL annealing)
        t0 = time.perf_counter()
        if hf is None:
            opt.zero_grad()
            _, loss = task.batch_loss(model, batch)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        else:

            def batch_fn(with_grad, batch=batch):
                with torch.set_grad_enabled(with_grad):
                    outputs, loss = task.batch_loss(model, batch)
                return outputs, loss, masked_mse_hessian(batch.y)

            if latent:  # the bound with every term's curvature, one draw fixed per step
                mu0 = model.posterior(batch.x)[0].detach()
                eps = torch.randn(1, *mu0.shape, dtype=mu0.dtype)

                def batch_fn(with_grad, batch=batch, eps=eps):
                    with torch.set_grad_enabled(with_grad):
                        return latent_terms(model, batch.x, batch.y, eps)

            losses.append(hf.step(batch_fn))
        clock += time.perf_counter() - t0
        if not math.isfinite(losses[-1]):
            record["diverged"] = step
            break
        if step % every == 0:
            val = task.evaluate(task.data.val, chunk)[metric]
            line = {"step": step, "train_loss": sum(losses) / len(losses), f"val_{metric}": val}
            if hf is not None:
                line["lambda"] = hf.damping
                line["gv_products"] = hf.products
            record["curve"].append(line)
            losses = []
            if val < best[0]:
                best = (val, step, copy.deepcopy(model.state_dict()))
            print(
                f"  {arm} seed {seed} step {step}: loss {line['train_loss']:.4g} val "
                f"{val:.4g} ({clock:.0f} s)",
                flush=True,
            )
        if step in report:
            val = task.evaluate(task.data.val, chunk)[metric]
            test = task.evaluate(task.data.test, chunk)[metric]
            final = copy.deepcopy(model.state_dict())
            model.load_state_dict(best[2])
            best_test = task.evaluate(task.data.test, chunk)[metric]
            model.load_state_dict(final)
            record["reports"][str(step)] = {
                "val": val,
                "test": test,
                "best_step": best[1],
                "best_val": best[0],
                "best_test": best_test,
                "seconds": clock,
                "gv_products": 0 if hf is None else hf.products,
            }
    record["seconds"] = clock
    record["gv_products"] = 0 if hf is None else hf.products
    if hf is not None:
        record["hf_log"] = hf.log
    return record


def table(runs: list[dict]) -> str:
    rows = [
        "| arm | seed | steps | val MSE | test MSE (final) | test MSE (best val, step) "
        "| seconds | Gv products |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["arm"], r["seed"])):
        for step, rep in sorted(r["reports"].items(), key=lambda kv: int(kv[0])):
            rows.append(
                f"| {r['arm']} | {r['seed']} | {step} | {rep['val']:.4f} | {rep['test']:.4f} "
                f"| {rep['best_test']:.4f} ({rep['best_step']}) | {rep['seconds']:.0f} "
                f"| {rep['gv_products']} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/forecast_spiral.toml")
    ap.add_argument("--arms", nargs="+", default=["hf10", "hf30", "adam", "hfbd10"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--report", nargs="+", type=int, default=[150, 250])
    ap.add_argument("--adam-lr", type=float, default=0.01)
    ap.add_argument("--damping", type=float, default=1.0, help="initial λ")
    ap.add_argument("--blocks", default="parts", choices=["parts", "layers", "tensors", "full"])
    ap.add_argument(
        "--cr-base", default="adam", choices=CoupledRescale.BASES, help="the cr arm's direction"
    )
    ap.add_argument("--out", default="experiments/results/diagnose_coupling.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    for seed in args.seeds:
        for arm in args.arms:
            print(f"{arm} seed {seed}", flush=True)
            r = run(arm, seed, args.steps, [s for s in args.report if s <= args.steps], args)
            r["damping0"] = args.damping
            runs = [x for x in runs if not (x["arm"] == r["arm"] and x["seed"] == r["seed"])]
            runs.append(r)
            out.write_text(json.dumps({"config": args.config, "runs": runs}, indent=1) + "\n")
    print(table(runs))


if __name__ == "__main__":
    main()
