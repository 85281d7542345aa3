"""OCNOpt: the second-order optimal-control optimizer for models with ODE blocks.

Typical loop (the empirical factor source needs nothing more than ``loss.backward()``):

    opt = node_ocp.OCNOpt(model, lr=0.1)          # ekfac, refresh every 100 steps
    for x, y in data:
        opt.zero_grad()
        loss = loss_fn(model(x), y)               # a mean over the batch
        opt.backward(loss, outputs=logits, likelihood="categorical")  # or loss.backward()
        opt.step()

On a *refresh* step (step 0, ``update_every``, ``2·update_every``, ...) the optimizer has
curvature capture switched on for every ODE block of the model before the forward pass; the
backward solve gathers time-joint Kronecker factors (or the dense Gauss–Newton integrals)
for the layers of the vector fields, and hooks gather ordinary K-FAC factors for the tapped
layers outside the blocks. ``step()`` turns them into eigenbases (``kfac``/``ekfac``) or a
damped Gauss–Newton matrix (``dense``) and capture is switched off again until the next
refresh. Between refreshes a step costs what a first-order step costs plus small matrix
products per layer.

Losses are taken to be means over the batch (the usual reduction): the factor statistics are
normalised with the batch size so that ``A ⊗ B`` approximates the Gauss–Newton matrix of the
mean loss. For convolutions ``B`` is also divided by the number of output locations per
sample (the KFC approximation of Grosse & Martens, 2016), so that the factors of a layer
with many locations are not inflated by that count.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .. import dist
from .._errors import bad_type, bad_value, check_choice, check_positive
from ..curvature import CurvatureCapture, input_rows, is_tapped, output_rows, tapped_modules
from ..ode.block import ODEBlock
from ..ode.factors import propagated_factors, set_terminal_factors
from .hyper import check_hyper, check_int, value_at
from .likelihoods import LIKELIHOODS, output_factors
from .rules import (
    DenseRule,
    KroneckerRule,
    diagonal_direction,
    layer_gradient_matrix,
    split_layer_matrix,
)

CURVATURES: tuple[str, ...] = ("identity", "diagonal", "kfac", "ekfac", "dense")
FACTOR_SOURCES: tuple[str, ...] = ("empirical", "sampled", "exact")
OUTSIDE_RULES: tuple[str, ...] = ("kfac", "diagonal", "sgd")
NONFINITE: tuple[str, ...] = ("skip", "raise")


class _OutsideStats:
    """Ordinary K-FAC sums for one tapped layer outside the ODE blocks."""

    def __init__(self):
        self.A = None
        self.B = None
        self.samples = 0
        self.rows = 0

    def add_input(self, module, u):
        rows = input_rows(module, u.detach())
        flat = rows.reshape(-1, rows.shape[-1])
        a_mat = flat.T @ flat
        self.A = a_mat if self.A is None else self.A + a_mat
        self.samples += u.shape[0]
        self.rows += flat.shape[0]

    def add_grad(self, module, g):
        rows = output_rows(module, g.detach())
        flat = rows.reshape(-1, rows.shape[-1])
        b_mat = flat.T @ flat
        self.B = b_mat if self.B is None else self.B + b_mat


class OCNOpt(torch.optim.Optimizer):
    """Second-order optimizer with curvature from the ODE blocks' backward solves.

    Args:
        model: the whole model (an ``nn.Module``); its ODE blocks are found by ``isinstance``.
            Horizon parameters (an ``ODEBlock.t`` that is an ``nn.Parameter``) are left out:
            control them with :class:`~node_ocp.HorizonOptimizer`.
        lr: learning rate (> 0); a number or a schedule ``step -> lr``.
        momentum: heavy-ball momentum in [0, 1) applied after preconditioning.
        weight_decay: L2 coefficient (>= 0), added to the gradient before preconditioning.
        curvature: ``"identity"`` (exactly SGD with momentum), ``"diagonal"``
            (RMSprop/Adam-like), ``"kfac"``, ``"ekfac"`` (default) or ``"dense"``.
        damping: ε > 0 (Kronecker and dense rules).
        update_every: refresh period of the curvature (>= 1).
        alpha: EKFAC running-average coefficient in (0, 1].
        sample_dt: spacing of the capture sample grid (> 0).
        factors: terminal-factor source: ``"empirical"`` (the adjoint itself; any loss),
            ``"sampled"`` or ``"exact"`` (these need :meth:`backward` with ``outputs`` and
            ``likelihood`` on refresh steps).
        rank: number of Monte-Carlo factors per sample for ``factors="sampled"``.
        outside: rule for tapped layers outside the ODE blocks (stems, heads): ``"kfac"``
            (ordinary K-FAC statistics from the normal forward/backward, preconditioned like
            the blocks' layers), ``"diagonal"`` or ``"sgd"`` (plain gradient). Other
            parameters (GRU cells, norms, ...) use the diagonal rule, or the plain gradient
            with ``"sgd"``. May be set per group.
        diag_beta, diag_eps: the diagonal rule's running-average coefficient and epsilon.
        max_dense_params: ``curvature="dense"`` refuses a block whose field has more
            parameters than this.
        kl_clip: None (default) or a float > 0: scale every update by
            ``ν = min(1, sqrt(kl_clip / Σ_groups lr² Σ_p u_p·g_p))`` (``u`` the preconditioned
            direction, ``g`` the gradient), so that the step ``Δ = -lr ν u`` has
            ``Δᵀ F Δ = lr² ν² u·g <= kl_clip`` under the curvature ``F`` (``F u = g``) — the
            usual K-FAC safeguard against oversized second-order steps when
            the curvature is stale or small. Applied before momentum.
        nonfinite: ``"skip"`` (default: a step with a non-finite loss or gradient changes
            nothing, warns and counts in ``skipped_steps``) or ``"raise"``.
        groups: optional list of parameter-group dicts (``{"params": [...], "lr": ...}``)
            with per-group ``lr``, ``momentum``, ``weight_decay``, ``damping``, ``alpha``,
            ``outside``; model parameters not listed go to a last, default group.
        seed: seed of the optimizer's own generator (sampled factors).
        distributed: average the curvature statistics over the processes of the default
            torch.distributed group on refresh steps (None, the default: when a group with
            more than one process is initialised). Use it with ``DistributedDataParallel``
            and equal per-process batches: the factors and the update then equal those of
            one process on the whole batch. The statistics of all layers travel in one
            all-reduce (per dtype), after the backward solves.
        eigh_spread_min_dim: under ``distributed``, a layer whose larger factor has at least
            this many rows has its eigendecompositions computed by one process (layers are
            dealt round-robin) and broadcast; smaller layers are decomposed on every process
            (cheaper than a broadcast). Either way all processes hold the same state.
    """

    def __init__(
        self,
        model: nn.Module,
        lr,
        momentum=0.9,
        weight_decay=0.0,
        curvature: str = "ekfac",
        damping=0.05,
        update_every: int = 100,
        alpha=0.75,
        sample_dt: float = 0.01,
        factors: str = "empirical",
        *,
        rank: int = 1,
        outside: str = "kfac",
        diag_beta: float = 0.99,
        diag_eps: float = 1e-8,
        max_dense_params: int = 4096,
        nonfinite: str = "skip",
        groups: list[dict] | None = None,
        seed: int = 0,
        distributed: bool | None = None,
        eigh_spread_min_dim: int = 512,
        kl_clip: float | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise bad_type("model", model, "an nn.Module (the whole model)")
        self.curvature = check_choice("curvature", curvature, CURVATURES)
        self.factors = check_choice("factors", factors, FACTOR_SOURCES)
        self.update_every = check_int("update_every", update_every, 1)
        self.rank = check_int("rank", rank, 1)
        self.diag_beta = float(check_hyper("diag_beta", diag_beta, 0, 1, False, True, "in [0, 1)"))
        self.diag_eps = check_positive("diag_eps", diag_eps)
        self.max_dense_params = check_int("max_dense_params", max_dense_params, 1)
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE)
        self.sample_dt = check_positive("sample_dt", sample_dt)
        if distributed is not None and not isinstance(distributed, bool):
            raise bad_type("distributed", distributed, "True, False or None (automatic)")
        self.distributed = distributed
        self.eigh_spread_min_dim = check_int("eigh_spread_min_dim", eigh_spread_min_dim, 1)
        self.kl_clip = None if kl_clip is None else check_positive("kl_clip", kl_clip)
        self.last_clip = 1.0
        self.last_reduce = {"bytes": 0, "collectives": 0, "spread_layers": 0}
        defaults = dict(
            lr=check_hyper("lr", lr, 0, float("inf"), True, True, "a float > 0"),
            momentum=check_hyper("momentum", momentum, 0, 1, False, True, "a float in [0, 1)"),
            weight_decay=check_hyper(
                "weight_decay", weight_decay, 0, float("inf"), False, True, "a float >= 0"
            ),
            damping=check_hyper("damping", damping, 0, float("inf"), True, True, "a float > 0"),
            alpha=check_hyper("alpha", alpha, 0, 1, True, False, "a float in (0, 1]"),
            outside=check_choice("outside", outside, OUTSIDE_RULES),
        )
        self.model = model
        self.blocks = [m for m in model.modules() if isinstance(m, ODEBlock)]
        if self.curvature in ("kfac", "ekfac", "dense") and not self.blocks:
            raise bad_value(
                "model",
                type(model).__name__,
                f"a model containing at least one ODEBlock for curvature={curvature!r}",
                "Use curvature='identity' or 'diagonal' for a model without ODE blocks.",
            )
        horizons = {id(b.t) for b in self.blocks if isinstance(b.t, nn.Parameter)}
        params = [p for p in model.parameters() if id(p) not in horizons]
        super().__init__(self._build_groups(params, groups), defaults)
        for g in self.param_groups:
            for key, spec in [
                ("lr", ("a float > 0", True, float("inf"), True)),
                ("damping", ("a float > 0", True, float("inf"), True)),
                ("momentum", ("a float in [0, 1)", False, 1, True)),
                ("weight_decay", ("a float >= 0", False, float("inf"), True)),
                ("alpha", ("a float in (0, 1]", True, 1, False)),
            ]:
                accepted, low_open, high, high_open = spec
                check_hyper(f"groups[...]['{key}']", g[key], 0, high, low_open, high_open, accepted)
            check_choice("groups[...]['outside']", g["outside"], OUTSIDE_RULES)

        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._build_rules()
        self._step = 0
        self.skipped_steps = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._capture: CurvatureCapture | None = None
        self._hooks: list = []
        self._outside_stats: dict[nn.Module, _OutsideStats] = {}
        self._collect_outside = True
        self._factors_given = False
        self._arm_if_due()

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _build_groups(params: list, groups: list[dict] | None) -> list[dict]:
        if groups is None:
            return [{"params": params}]
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise bad_type("groups", groups, "a list of dicts {'params': [...], ...}")
        listed = set()
        out = []
        for g in groups:
            if "params" not in g:
                raise bad_value("groups", g, "dicts with a 'params' entry")
            ps = list(g["params"]) if isinstance(g["params"], Iterable) else [g["params"]]
            listed.update(id(p) for p in ps)
            out.append({**g, "params": ps})
        rest = [p for p in params if id(p) not in listed]
        if rest:
            out.append({"params": rest})
        return out

    def _build_rules(self) -> None:
        """Assign every parameter to a unit: Kronecker layer, dense block or per-tensor rule."""
        self._kron: dict[nn.Module, KroneckerRule] = {}
        self._kron_inside: set[nn.Module] = set()
        self._dense: dict[ODEBlock, DenseRule] = {}
        covered: set = set()
        owned = set(self._group_of)
        ode_layers = {m for b in self.blocks for m in tapped_modules(b.field)}
        if self.curvature == "dense":
            for block in self.blocks:
                ps = [p for p in block.field.parameters() if p.requires_grad]
                n = sum(p.numel() for p in ps)
                if n > self.max_dense_params:
                    raise bad_value(
                        "curvature",
                        "dense",
                        f"'dense' only for fields with at most max_dense_params="
                        f"{self.max_dense_params} parameters ({block.name} has {n})",
                        "Use curvature='ekfac' or 'kfac', or raise max_dense_params.",
                    )
                if ps and all(p in owned for p in ps):
                    self._dense[block] = DenseRule(ps, self.state[ps[0]])
                    covered.update(ps)
        if self.curvature in ("kfac", "ekfac", "dense"):
            for module in self.model.modules():
                if not is_tapped(module) or module.weight not in owned:
                    continue
                if module.weight in covered:
                    continue
                inside = module in ode_layers
                if self.curvature == "dense" and inside:
                    continue
                if not inside and self._group_of[module.weight]["outside"] != "kfac":
                    continue
                variant = "kfac" if self.curvature == "dense" else self.curvature
                self._kron[module] = KroneckerRule(module, variant, self.state[module.weight])
                if inside:
                    self._kron_inside.add(module)
                covered.add(module.weight)
                if module.bias is not None:
                    covered.add(module.bias)
        self._covered = covered

    def __repr__(self) -> str:
        head = (
            f"OCNOpt(curvature={self.curvature!r}, factors={self.factors!r}, "
            f"update_every={self.update_every}, sample_dt={self.sample_dt}, "
            f"blocks={len(self.blocks)}, kronecker_layers={len(self._kron)} "
            f"({len(self._kron_inside)} in ODE fields), dense_blocks={len(self._dense)}, "
            f"step={self._step})"
        )
        lines = [head]
        for i, g in enumerate(self.param_groups):
            hp = ", ".join(
                f"{k}={g[k]}"
                for k in ("lr", "momentum", "weight_decay", "damping", "alpha", "outside")
            )
            n = sum(p.numel() for p in g["params"])
            lines.append(f"  group {i}: {len(g['params'])} tensors ({n} values), {hp}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ refresh control
    @property
    def steps_taken(self) -> int:
        """Number of steps applied so far (skipped steps not counted)."""
        return self._step

    @property
    def capture(self) -> CurvatureCapture | None:
        """The curvature capture of the coming refresh step (None between refreshes).

        Its statistics stay readable after ``step()`` through a reference kept by the caller.
        """
        return self._capture

    @property
    def refresh_due(self) -> bool:
        """True when the coming step gathers curvature."""
        return self._capture is not None or bool(self._hooks)

    def _needs_capture(self) -> bool:
        return self.curvature in ("kfac", "ekfac", "dense") and (
            bool(self._kron_inside) or bool(self._dense)
        )

    def _arm_if_due(self) -> None:
        self._disarm()
        if self._step % self.update_every != 0:
            return
        if self._needs_capture():
            self._capture = CurvatureCapture(
                kronecker=bool(self._kron_inside),
                dense=bool(self._dense),
                sample_dt=self.sample_dt,
            )
            self._capture.attach(self.model)
        for module in self._kron:
            if module in self._kron_inside:
                continue
            stats = _OutsideStats()
            self._outside_stats[module] = stats
            self._hooks.append(module.register_forward_hook(self._make_forward_hook(stats)))
        self._factors_given = False

    def _make_forward_hook(self, stats: _OutsideStats):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            stats.add_input(module, inputs[0])

            def grad_hook(g):
                if self._collect_outside:
                    stats.add_grad(module, g)

            output.register_hook(grad_hook)

        return hook

    def _disarm(self) -> None:
        if self._capture is not None:
            self._capture.detach()
            self._capture = None
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._outside_stats = {}

    # ------------------------------------------------------------------ backward
    def backward(
        self,
        loss: torch.Tensor,
        outputs: torch.Tensor | None = None,
        likelihood: str | None = None,
        retain_graph: bool = False,
    ) -> None:
        """``loss.backward()``, handing the optimizer the terminal factors it needs.

        Args:
            loss: the scalar training loss (a mean over the batch).
            outputs: the model output the likelihood is about (logits, predictions, or the
                latent ``z`` of a flow). Needed on refresh steps with ``factors="sampled"``
                or ``"exact"``; the factors pass through the layers between ``outputs`` and
                the last ODE block, and from each block to the block before it.
            likelihood: ``"categorical"``, ``"gaussian"`` or ``"standard_normal"``.

        With the empirical source, or between refreshes, this is exactly ``loss.backward()``.
        """
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise bad_type("loss", loss, "a scalar tensor")
        capture = self._capture
        if self.factors == "empirical" or capture is None:
            loss.backward(retain_graph=retain_graph)
            return
        if outputs is None or likelihood is None:
            raise bad_value(
                "outputs/likelihood",
                (outputs if outputs is None else "tensor", likelihood),
                f"both given on refresh steps with factors={self.factors!r} "
                f"(likelihood one of {', '.join(LIKELIHOODS)})",
                "Or use factors='empirical', which needs only loss.backward().",
            )
        check_choice("likelihood", likelihood, LIKELIHOODS)
        if not isinstance(outputs, torch.Tensor) or not outputs.requires_grad:
            raise bad_value(
                "outputs", outputs, "the model output tensor, part of the graph of the loss"
            )
        calls = [c for c in capture.calls if c.tensor() is not None]
        if not calls:
            raise ValueError(
                "outputs: no ODE block was called with grad enabled since the last step; "
                f"factors={self.factors!r} needs the forward pass of this step between "
                "opt.step() and opt.backward()."
            )
        y = output_factors(outputs, likelihood, self.factors, self.rank, self._generator)
        last = calls[-1].tensor()
        self._collect_outside = False
        try:
            set_terminal_factors(last, _pull_back(outputs, last, y))
        finally:
            self._collect_outside = True
        for earlier, later in zip(calls[:-1], calls[1:]):
            _chain_factors(earlier, later, self)
        loss.backward(retain_graph=retain_graph or len(calls) > 1)
        self._factors_given = True

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Apply one update. ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._all_finite(loss):
            return loss
        step = self._step
        if self.refresh_due:
            if (
                self.factors != "empirical"
                and self._capture is not None
                and not self._factors_given
            ):
                raise ValueError(
                    f"factors={self.factors!r}: step {step} is a refresh step but no factors "
                    "were handed over; call opt.backward(loss, outputs=..., likelihood=...) "
                    "instead of loss.backward()."
                )
            self._refresh()
        directions = {}
        for group in self.param_groups:
            wd = value_at(group["weight_decay"], step)
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if wd != 0:
                    d = d.add(p, alpha=wd)
                directions[p] = d
        updates = self._precondition(directions, step)
        if self.kl_clip is not None:
            self._clip(updates, directions, step)
        for group in self.param_groups:
            lr = value_at(group["lr"], step)
            momentum = value_at(group["momentum"], step)
            for p in group["params"]:
                if p not in updates:
                    continue
                u = updates[p]
                if momentum != 0:
                    st = self.state[p]
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = torch.clone(u).detach()
                        st["momentum_buffer"] = buf
                    else:
                        buf.mul_(momentum).add_(u)
                    u = buf
                p.add_(u, alpha=-lr)
        self._step += 1
        self._arm_if_due()
        return loss

    def _clip(self, updates: dict, directions: dict, step: int) -> None:
        """Scale all updates by ν = min(1, sqrt(kl_clip / Σ lr² u·g)) (see ``kl_clip``)."""
        total = 0.0
        for group in self.param_groups:
            lr = value_at(group["lr"], step)
            inner = sum(
                float((updates[p] * directions[p]).sum()) for p in group["params"] if p in updates
            )
            total += lr * lr * inner
        nu = min(1.0, (self.kl_clip / total) ** 0.5) if total > 0 else 1.0
        self.last_clip = nu
        if nu < 1.0:
            for p in updates:
                updates[p] = updates[p] * nu

    def _all_finite(self, loss) -> bool:
        checks = [
            p.grad.isfinite().all()
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None
        ]
        if loss is not None and isinstance(loss, torch.Tensor):
            checks.append(loss.detach().isfinite().all())
        if not checks or bool(torch.stack(checks).all()):
            return True
        msg = (
            f"OCNOpt: non-finite loss or gradient at step {self._step}; the step was skipped "
            "and the optimizer state is unchanged."
        )
        if self.nonfinite == "raise":
            raise FloatingPointError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        self.skipped_steps += 1
        if self._capture is not None:
            self._capture.reset()
        for module in list(self._outside_stats):
            self._outside_stats[module] = _OutsideStats()
        self._factors_given = False
        return False

    def _refresh(self) -> None:
        """Turn this step's statistics into eigenbases / Gauss–Newton matrices.

        Stages: collect the normalised statistics of every unit → average them over the
        processes (distributed) → decompose (spread over processes for large layers).
        """
        jobs = self._collect_statistics()
        if self._reduces():
            self._reduce(jobs)
        else:
            self.last_reduce = {"bytes": 0, "collectives": 0, "spread_layers": 0}
        self._decompose(jobs)

    def _reduces(self) -> bool:
        return dist.is_distributed() if self.distributed is None else self.distributed

    def _collect_statistics(self) -> list[list]:
        """``[kind, rule, [matrices], n]`` per unit, matrices normalised per sample."""
        empirical = self.factors == "empirical"
        capture = self._capture
        jobs: list[list] = []
        if capture is not None:
            for module, stats in capture.kronecker.items():
                rule = self._kron.get(module)
                if rule is None or stats.samples == 0:
                    continue
                n = stats.samples / stats.solves
                scale_b = n if empirical else 1.0 / n
                locations = stats.rows / stats.samples  # 1 for linear layers
                jobs.append(["kron", rule, [stats.A / n, stats.B * scale_b / locations], n])
            for block, rule in self._dense.items():
                stats = capture.dense.get(block)
                if stats is None:
                    continue
                n = stats.p.shape[1]
                scale = n if empirical else 1.0 / n
                jobs.append(["dense", rule, [stats.gauss_newton() * scale], n])
        for module, stats in self._outside_stats.items():
            if stats.A is None or stats.B is None or stats.samples == 0:
                continue
            n = stats.samples
            locations = stats.rows / n
            jobs.append(["kron", self._kron[module], [stats.A / n, stats.B * n / locations], n])
        return jobs

    def _reduce(self, jobs: list[list]) -> None:
        """Average the per-sample statistics over processes; sum the sample counts."""
        mats = [m for job in jobs for m in job[2]]
        if not mats:  # every process built the same (empty) list: nothing to send
            self.last_reduce = {"bytes": 0, "collectives": 0, "spread_layers": 0}
            return
        reduced = dist.all_reduce_bucket(mats, "mean")
        device = mats[0].device if mats else None
        counts = dist.all_reduce_sum_floats([job[3] for job in jobs], device=device)
        it = iter(reduced)
        for job, n in zip(jobs, counts):
            job[2] = [next(it) for _ in job[2]]
            job[3] = n
        self.last_reduce = {
            "bytes": sum(m.numel() * m.element_size() for m in mats) + 8 * len(jobs),
            "collectives": len({(m.dtype, m.device) for m in mats}) + 1,
            "spread_layers": 0,
        }

    def _decompose(self, jobs: list[list]) -> None:
        spread = self._reduces() and dist.world_size() > 1
        owner_of = 0
        for kind, rule, mats, n in jobs:
            if kind == "dense":
                rule.refresh(mats[0])
                continue
            a_mat, b_mat = mats
            if not spread or max(a_mat.shape[0], b_mat.shape[0]) < self.eigh_spread_min_dim:
                rule.refresh(a_mat, b_mat, n)
                continue
            owner = owner_of % dist.world_size()
            owner_of += 1
            self.last_reduce["spread_layers"] += 1
            if dist.rank() == owner:
                rule.refresh(a_mat, b_mat, n)
                eig = rule.eigen()
            else:
                eig = [
                    a_mat.new_empty(a_mat.shape),
                    b_mat.new_empty(b_mat.shape),
                    a_mat.new_empty(a_mat.shape[0]),
                    b_mat.new_empty(b_mat.shape[0]),
                ]
            dist.broadcast_(eig, src=owner)
            if dist.rank() != owner:
                rule.set_eigen(*eig, n)

    def _precondition(self, directions: dict, step: int) -> dict:
        updates: dict = {}
        for module, rule in self._kron.items():
            if module.weight not in directions:
                continue
            group = self._group_of[module.weight]
            grad = layer_gradient_matrix(module, directions)
            u = rule.direction(
                grad, value_at(group["damping"], step), value_at(group["alpha"], step)
            )
            updates.update(split_layer_matrix(module, u))
        for rule in self._dense.values():
            if not all(p in directions for p in rule.params):
                continue
            group = self._group_of[rule.params[0]]
            updates.update(rule.direction(directions, value_at(group["damping"], step)))
        for p, d in directions.items():
            if p in updates:
                continue
            group = self._group_of[p]
            if self.curvature == "identity" or group["outside"] == "sgd":
                updates[p] = d
            else:
                updates[p] = diagonal_direction(d, self.state[p], self.diag_beta, self.diag_eps)
        return updates

    @property
    def generator(self) -> torch.Generator:
        """The CPU generator of the optimizer's own draws (sampled factors); in
        ``state_dict``. Under torch.distributed each process has its own: a training loop
        that checkpoints every process's draws saves and restores this one per process."""
        return self._generator

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["ocnopt"] = {
            "step": self._step,
            "skipped_steps": self.skipped_steps,
            "generator": self._generator.get_state(),
            "curvature": self.curvature,
            "factors": self.factors,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("ocnopt", None)
        if extra is None:
            raise bad_value(
                "state_dict", "a dict without 'ocnopt'", "a dict from OCNOpt.state_dict()"
            )
        if extra["curvature"] != self.curvature:
            raise bad_value(
                "state_dict",
                f"curvature={extra['curvature']!r}",
                f"the curvature of this optimizer ({self.curvature!r})",
            )
        super().load_state_dict(state_dict)
        self._step = int(extra["step"])
        self.skipped_steps = int(extra["skipped_steps"])
        self._generator.set_state(extra["generator"])
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._build_rules()
        self._arm_if_due()


def _pull_back(outputs: torch.Tensor, target: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian products of ``outputs`` w.r.t. ``target`` with each of the R rows of y."""
    if outputs is target:
        return y
    (vjp,) = torch.autograd.grad(
        outputs,
        target,
        grad_outputs=y,
        retain_graph=True,
        is_grads_batched=True,
        allow_unused=True,
    )
    if vjp is None:
        raise ValueError(
            "outputs: the model output does not depend on the last ODE block's output; the "
            "factor source cannot provide factors for it. Use factors='empirical'."
        )
    return vjp


def _chain_factors(earlier, later, opt: OCNOpt) -> None:
    """When backward reaches ``earlier``'s output, hand it ``later``'s input factors."""
    out = earlier.tensor()
    if out is None:
        return
    later_out = later.tensor()
    later_in = later.input

    def hook(grad):
        q = propagated_factors(later_out)
        opt._collect_outside = False
        try:
            factors = q if later_in is out else _pull_back(later_in, out, q)
        finally:
            opt._collect_outside = True
        set_terminal_factors(out, factors)
        return grad

    out.register_hook(hook)
