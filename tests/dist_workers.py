"""Process bodies for the torch.distributed tests (started with the spawn method)."""

import os

import torch
import torch.distributed as tdist
from torch import nn

import node_ocp as no
from node_ocp.dist import wrap_ddp
from node_ocp.optim.curvatures import KroneckerUnit


class Classifier(nn.Module):
    """An ODE block on a small MLP or conv field and a linear head, in float64."""

    def __init__(self, kind: str, method: str = "rk4"):
        super().__init__()
        if kind == "mlp":
            field = no.TimeSequential(
                no.ConcatSquashLinear(3, 8), nn.Tanh(), no.ConcatSquashLinear(8, 3)
            )
            head = nn.Linear(3, 3)
        else:
            field = no.TimeSequential(
                no.ConcatConv2d(2, 3, 3, padding=1),
                nn.Softplus(),
                no.ConcatConv2d(3, 2, 3, padding=1),
            )
            head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
        options = {"step_size": 0.25} if method == "rk4" else None
        self.ode = no.ODEBlock(
            field, (0.0, 1.0), method=method, rtol=1e-6, atol=1e-7, options=options
        )
        self.head = head
        self.double()

    def forward(self, x):
        return self.head(self.ode(x))


def case(kind: str, n: int = 8):
    """Model (seeded), inputs ``(n, ...)`` and labels, the same in every process."""
    torch.manual_seed(0)
    model = Classifier(kind)
    shape = (n, 3) if kind == "mlp" else (n, 2, 4, 4)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, x, y


def make_opt(model, **kw):
    return no.OCNOpt(
        model,
        lr=0.1,
        step="fixed",
        curvature="ekfac",
        update_every=1,
        sample_dt=0.25,
        damping=1e-3,
        eigh_spread_min_dim=1,
        **kw,
    )


def snapshot(model, opt) -> dict:
    """Parameters and each layer's factors rebuilt from its eigendecomposition."""
    names = {m: n for n, m in model.named_modules()}
    factors = {}
    for unit in opt.units:
        if not isinstance(unit, KroneckerUnit) or not unit.ready:
            continue
        qa, qb, ea, eb = unit.decomposition()
        factors[names[unit.module]] = (qa @ torch.diag(ea) @ qa.T, qb @ torch.diag(eb) @ qb.T)
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"factors": factors, "params": params, "reduce": dict(opt.last_reduce)}


def _join(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)


def _leave() -> None:
    # all processes are done before any tears gloo down: a process destroying its group
    # while the other still talks to it can abort ("terminate called without an active
    # exception")
    tdist.barrier()
    tdist.destroy_process_group()


def refresh_step(rank: int, world: int, port: int, kind: str, out: str) -> None:
    """One OCNOpt refresh step under DDP on this process's share of the batch."""
    _join(rank, world, port)
    model, x, y = case(kind)
    ddp = wrap_ddp(model)
    opt = make_opt(model)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(ddp(x[rank::world]), y[rank::world])
    loss.backward()
    opt.step()
    torch.save(snapshot(model, opt), os.path.join(out, f"rank{rank}.pt"))
    _leave()


def five_steps(rank: int, world: int, port: int, out: str) -> None:
    """Five DDP steps with OCNOpt (refresh every 2) and t1 feedback, an adaptive solver."""
    _join(rank, world, port)
    torch.manual_seed(0)
    model = Classifier("mlp", method="dopri5")
    ddp = wrap_ddp(model)
    opt = no.OCNOpt(model, update_every=2, adapt_every=2, sample_dt=0.25)
    horizon = no.HorizonOptimizer(model.ode, model.parameters(), lr=0.2, penalty=0.01, warmup=0)
    gen = torch.Generator().manual_seed(rank)  # each process its own data
    trace = []
    for _ in range(5):
        x = torch.randn(6, 3, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 3, (6,), generator=gen)

        def compute(x=x, y=y):
            logits = ddp(x)
            return nn.functional.cross_entropy(logits, y), logits

        opt.zero_grad()
        loss, logits = compute()
        opt.backward(loss, outputs=logits, likelihood="categorical")
        opt.step(compute)  # trials on each process's own batch; λ and κ agreed
        horizon.step()
        trace.append((opt.damping, opt.calibration, opt.step_scale))
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "t1": horizon.t1,
            "nfe": model.ode.nfe_forward,
            "trace": trace,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    _leave()
