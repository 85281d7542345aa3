"""Procedural 2-D density toys, seeded: ``toy_2d(name, n, seed) -> (n, 2) float32``."""

from __future__ import annotations

import math

import torch

from .._errors import bad_value, check_choice

TOYS = ("moons", "circles", "8gaussians", "pinwheel", "checkerboard", "2spirals")


def toy_2d(name: str, n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """``n`` points of the 2-D toy ``name`` (roughly standardised to [-4, 4])."""
    check_choice("name", name, TOYS)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise bad_value("n", n, "an int >= 1")
    g = torch.Generator().manual_seed(seed)
    if name == "moons":
        t = torch.rand(n, generator=g) * math.pi
        upper = torch.rand(n, generator=g) < 0.5
        x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
        y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
        pts = torch.stack([x - 0.5, y - 0.25], 1) * 2 + 0.1 * torch.randn(n, 2, generator=g)
    elif name == "circles":
        r = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, 0.5) * 3
        a = torch.rand(n, generator=g) * 2 * math.pi
        pts = torch.stack([r * torch.cos(a), r * torch.sin(a)], 1)
        pts = pts + 0.08 * torch.randn(n, 2, generator=g)
    elif name == "8gaussians":
        k = torch.randint(0, 8, (n,), generator=g)
        a = k.float() * math.pi / 4
        centers = torch.stack([torch.cos(a), torch.sin(a)], 1) * 2 * math.sqrt(2)
        pts = centers + 0.5 * torch.randn(n, 2, generator=g) / math.sqrt(2)
    elif name == "pinwheel":
        k = torch.randint(0, 5, (n,), generator=g)
        feats = torch.randn(n, 2, generator=g) * torch.tensor([0.3, 0.05]) + torch.tensor([1.0, 0])
        angle = k.float() * 2 * math.pi / 5 + 0.25 * torch.exp(feats[:, 0])
        c, s = torch.cos(angle), torch.sin(angle)
        pts = 2 * torch.stack(
            [c * feats[:, 0] - s * feats[:, 1], s * feats[:, 0] + c * feats[:, 1]], 1
        )
    elif name == "checkerboard":
        x1 = torch.rand(n, generator=g) * 4 - 2
        x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
        x2 = x2 + torch.floor(x1) % 2
        pts = torch.stack([x1, x2], 1) * 2
    else:  # 2spirals
        r = torch.sqrt(torch.rand(n, generator=g)) * 540 * (2 * math.pi) / 360
        sign = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0)
        pts = torch.stack([-torch.cos(r) * r, torch.sin(r) * r], 1) * sign[:, None]
        pts = pts + torch.rand(n, 2, generator=g) * 0.5
        pts = pts / 3
    return pts.to(dtype)


def two_spirals(
    n: int, noise: float = 0.02, seed: int = 0, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled classification toy: ``n`` points ``(n, 2)`` on two interleaved spirals and
    their labels ``(n,)`` in {0, 1}."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise bad_value("n", n, "an int >= 1")
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (n,), generator=g)
    r = torch.rand(n, generator=g) * 0.9 + 0.1
    angle = 2.0 * math.pi * r + math.pi * label
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
    return (x + noise * torch.randn(n, 2, generator=g)).to(dtype), label
