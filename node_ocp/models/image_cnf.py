"""Continuous normalizing flows on images (FFJORD, Grathwohl et al. 2019): single-scale and
multiscale, with uniform dequantisation and the logit transform.

**The quantisation convention.** An image set with ``L`` grey levels holds integers
``k ∈ {0, …, L−1}``, one per value; the data loaders hand them over as ``x = k / (L − 1)``
in [0, 1] (scikit-learn's 8×8 digits: ``L = 17``, ``x = k/16``; 8-bit files such as MNIST's
IDX: ``L = 256``, ``x = k/255``). The flow models the continuous variable ``v = k + u``,
``u ~ U[0, 1)^D`` (uniform dequantisation), in *level units*: ``v ∈ [0, L)^D``. Since
``log P(k) = log ∫ p(k + u) du ≥ E_u log p(k + u)`` (Theis et al. 2016), ``−log p(k + u)``
for one draw of ``u`` is an unbiased estimate of an upper bound of the discrete data's
negative log-likelihood in nats: that is the NLL reported. Bits per dimension are
``bpd = NLL / (D ln 2)``, ``D = C·H·W``. A model that spreads its mass evenly over the
``L`` levels scores ``log2 L`` — 4.09 for the digits, 8 for 8-bit images —, so bits per
dimension compare across data sets only at the same ``L`` (FFJORD's MNIST figures use
``L = 256``).

**Preprocessing**, with its log-determinants (``∂w/∂v`` is diagonal):

    y = v / L ∈ [0, 1)                  log|det ∂y/∂v| = −D log L
    p = α + (1 − 2α) y,  w = logit(p)   log|det ∂w/∂y| = Σ [log(1 − 2α) − log p − log(1 − p)]

(``α = 1e-6`` as FFJORD on MNIST; RealNVP uses 0.05). The CNF maps the logit image ``w`` to
``z``, and ``log p(v) = log N(z; 0, I) − Δlogp_ODE + log|det ∂w/∂v|``.

**Architecture.** Scale ``s`` (``s = 0 … scales−1``) works on a state of shape
``(C·2^s, H/2^s, W/2^s)``, starting at the image: ``blocks`` chained CNF blocks, each with a
time-conditioned conv field (:func:`~node_ocp.models.fields.time_conv`); then, except at the
last scale, a 2×2 squeeze to ``(4C_s, H_s/2, W_s/2)`` and the first ``2C_s`` channels are
*factored out*: latent dimensions with a standard-normal density, no longer transformed
(RealNVP, Dinh et al. 2017; FFJORD's multiscale model); the other ``2C_s`` go on to the next
scale. ``scales = 1`` is the single-scale flow. Every block integrates the state flattened
to ``(N, D_s)`` with :class:`~node_ocp.models.cnf.CNFDynamics`, so the exact divergence (``D_s``
backward passes: fine for 8×8 images) and Hutchinson's estimate are the vector CNF's, and so
are the kinetic-energy and Jacobian-norm (Frobenius) regularisers (RNODE, Finlay et al. 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .._errors import bad_type, bad_value, check_choice, check_positive
from ..ode.block import ODEBlock
from .cnf import (
    DIVERGENCES,
    PROBES,
    CNFDynamics,
    bits_per_dim,
    cnf_block,
    regulariser_weights,
    standard_normal_logprob,
)
from .fields import time_conv

#: FFJORD's α for MNIST
DEFAULT_ALPHA = 1e-6


# ---------------------------------------------------------------------- preprocessing
def grey_levels(x: torch.Tensor, levels: int) -> torch.Tensor:
    """The integer levels ``k = x·(L − 1)`` of images ``x`` holding ``k / (L − 1)``
    (rounded; a value off that grid is an error naming ``x``)."""
    k = x * (levels - 1)
    r = k.round()
    if r.numel() and (
        bool(((k - r).abs() > 1e-3).any()) or float(r.min()) < 0 or float(r.max()) > levels - 1
    ):
        raise bad_value(
            "x",
            x,
            f"images holding k / {levels - 1} for integers k = 0..{levels - 1} (levels = "
            f"{levels}: what digits_images and load_image_file return)",
            "Set the number of grey levels of your data ([task].levels) or rescale the images.",
        )
    return r


def dequantize(k: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``v = k + u`` in level units, ``u ~ U[0, 1)`` (or the given ``noise``, shaped like
    ``k``, with values in [0, 1))."""
    if noise is None:
        return k + torch.rand_like(k)
    if not isinstance(noise, torch.Tensor) or noise.shape != k.shape:
        raise bad_value("noise", noise, f"a tensor of shape {tuple(k.shape)} (like x)")
    if noise.numel() and (float(noise.min()) < 0 or float(noise.max()) >= 1):
        raise bad_value("noise", noise, "values in [0, 1)")
    return k + noise.to(k.dtype)


def logit_transform(
    v: torch.Tensor, levels: int, alpha: float = DEFAULT_ALPHA
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w = logit(α + (1 − 2α)·v/L)`` of dequantised images ``v`` in level units, and the
    log-determinant ``log|det ∂w/∂v|`` per image ``(N,)`` (the ``−D log L`` of the scaling
    included)."""
    y = v / levels
    p = alpha + (1.0 - 2.0 * alpha) * y
    log_p, log_q = torch.log(p), torch.log1p(-p)
    w = log_p - log_q
    dims = v[0].numel()
    logdet = (math.log(1.0 - 2.0 * alpha) - log_p - log_q).flatten(1).sum(1)
    return w, logdet - dims * math.log(levels)


def inverse_logit(w: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """``y = (sigmoid(w) − α) / (1 − 2α)``: the logit image back in [0, 1) (clamped)."""
    return ((torch.sigmoid(w) - alpha) / (1.0 - 2.0 * alpha)).clamp(0.0, 1.0)


# ---------------------------------------------------------------------- squeeze
def squeeze(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W) -> (N, 4C, H/2, W/2)``: each 2×2 patch becomes 4 channels, channel
    ``4c + 2i + j`` holding pixel ``(2h + i, 2w + j)`` of channel ``c``."""
    n, c, h, w = x.shape
    if h % 2 or w % 2:
        raise bad_value("x", x, "images of even height and width (a 2×2 squeeze)")
    x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`squeeze`: ``(N, 4C, H, W) -> (N, C, 2H, 2W)``."""
    n, c4, h, w = x.shape
    if c4 % 4:
        raise bad_value("x", x, "a channel count divisible by 4 (the inverse of a squeeze)")
    c = c4 // 4
    x = x.reshape(n, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c, 2 * h, 2 * w)


class FlatImageField(nn.Module):
    """An image field ``net(t, (N, C, H, W))`` seen as a field on flattened states
    ``(N, C·H·W)`` — what :class:`~node_ocp.models.cnf.CNFDynamics` integrates (its exact
    divergence and Hutchinson's estimate then hold for images as they are)."""

    def __init__(self, net: nn.Module, shape: Sequence[int]):
        super().__init__()
        self.net = net
        self.shape = tuple(int(s) for s in shape)
        self.accepts_batched_time = bool(getattr(net, "accepts_batched_time", False))

    def forward(self, t, z: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        return self.net(t, z.reshape(n, *self.shape)).reshape(n, -1)


def _int_at_least(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_type(name, value, f"an int >= {low}")
    if value < low:
        raise bad_value(name, value, f"an int >= {low}")
    return value


class ImageCNF(nn.Module):
    """A continuous normalizing flow on images ``(N, C, H, W)`` with a standard-normal base.

    Args:
        shape: ``(C, H, W)`` of the images.
        levels: the number of grey levels L of the data (17 for scikit-learn's digits, 256
            for 8-bit images); inputs hold ``k / (L − 1)``, see the module docstring for the
            convention of the reported NLL and bits per dimension.
        hidden: channel widths of each block's hidden conv layers.
        activation: the field's activation (softplus, tanh, elu, relu, silu).
        scales: 1 for the single-scale flow; more for the multiscale flow (H and W must be
            divisible by ``2^(scales − 1)``).
        blocks: chained CNF blocks per scale.
        horizon: integration time of each block.
        divergence: ``"hutchinson"`` (default, as FFJORD on images) or ``"exact"``
            (``D_s`` backward passes per evaluation); ``probe``: Rademacher or Gaussian.
        kinetic, jacobian: weights of the kinetic-energy and Jacobian-norm regularisers, as
            for :class:`~node_ocp.models.CNF` (0 disables).
        alpha: the logit transform's α in (0, 0.5).
        layer: the conv layers, ``"concatsquash"`` or ``"concat"``.
        method, rtol, atol, gradient, backend, step_control: ODE block settings.

    ``forward(x, noise=None)`` returns ``(z, delta_logp, reg)``: the latent ``(N, D)`` (the
    factored-out parts of every scale, then the last scale's output, each flattened), the
    per-image ``(N,)`` with ``log p(v) = log N(z; 0, I) − delta_logp`` (the ODE's
    ``Δlogp`` minus the preprocessing's log-determinant: the NLL of the data in level
    units, see above) and the weighted regulariser ``(N,)``. ``noise`` fixes the
    dequantisation draw ``u``.
    """

    def __init__(
        self,
        shape: Sequence[int],
        levels: int = 256,
        hidden: Sequence[int] = (32, 32),
        activation: str = "softplus",
        scales: int = 1,
        blocks: int = 1,
        horizon: float = 1.0,
        divergence: str = "hutchinson",
        probe: str = "rademacher",
        kinetic: float = 0.0,
        jacobian: float = 0.0,
        alpha: float = DEFAULT_ALPHA,
        layer: str = "concatsquash",
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        gradient: str = "adjoint",
        backend: str = "torchdiffeq",
        step_control: str = "batch",
    ):
        super().__init__()
        if (
            not isinstance(shape, (tuple, list, torch.Size))
            or len(shape) != 3
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)
        ):
            raise bad_value("shape", shape, "(C, H, W): three ints >= 1")
        self.image_shape = tuple(int(s) for s in shape)
        self.levels = _int_at_least("levels", levels, 2)
        self.n_scales = _int_at_least("scales", scales, 1)
        _int_at_least("blocks", blocks, 1)
        c, h, w = self.image_shape
        step = 2 ** (self.n_scales - 1)
        if h % step or w % step:
            raise bad_value(
                "scales",
                scales,
                f"at most as many scales as 2×2 squeezes of a {h}×{w} image allow (H and W "
                f"divisible by 2^(scales − 1) = {step})",
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5:
            raise bad_value("alpha", alpha, "a float in (0, 0.5)")
        self.alpha = float(alpha)
        self.probe_kind = check_choice("probe", probe, PROBES)
        check_choice("divergence", divergence, DIVERGENCES)
        horizon = check_positive("horizon", horizon)
        self.reg_weights = regulariser_weights(kinetic, jacobian)
        extra = len(self.reg_weights)
        self.dim = c * h * w
        self.shapes = [(c * 2**s, h // 2**s, w // 2**s) for s in range(self.n_scales)]
        solver = dict(
            method=method,
            rtol=rtol,
            atol=atol,
            gradient=gradient,
            backend=backend,
            step_control=step_control,
        )
        self.scales = nn.ModuleList()
        for s, shp in enumerate(self.shapes):
            self.scales.append(
                nn.ModuleList(
                    cnf_block(
                        CNFDynamics(
                            FlatImageField(time_conv(shp[0], hidden, activation, layer), shp),
                            math.prod(shp),
                            divergence,
                            extra,
                        ),
                        horizon,
                        f"image CNF scale {s} block {b}",
                        solver,
                    )
                    for b in range(blocks)
                )
            )

    # ------------------------------------------------------------------ structure
    @property
    def blocks(self) -> list[ODEBlock]:
        """Every ODE block, scale by scale, in the order the forward pass calls them."""
        return [b for scale in self.scales for b in scale]

    def feedback_stages(self) -> list[nn.Module]:
        """The stages of OCNOpt's feedback policies: the ODE blocks in order."""
        return self.blocks

    def _set_probes(self, n: int, like: torch.Tensor) -> None:
        for shp, scale in zip(self.shapes, self.scales):
            for block in scale:
                f = block.field
                if f.divergence == "hutchinson" or f.extra >= 2:
                    size = (n, math.prod(shp))
                    if self.probe_kind == "rademacher":
                        e = torch.randint(0, 2, size, device=like.device).to(like.dtype) * 2 - 1
                    else:
                        e = torch.randn(size, dtype=like.dtype, device=like.device)
                    f.probe = e

    # ------------------------------------------------------------------ density
    def preprocess(
        self, x: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w, log|det ∂w/∂v|)``: images ``x`` (``k / (L − 1)``) dequantised to
        ``v = k + u`` and logit-transformed."""
        return logit_transform(
            dequantize(grey_levels(x, self.levels), noise), self.levels, self.alpha
        )

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() != 4
            or tuple(x.shape[1:]) != self.image_shape
        ):
            raise bad_value(
                "x", x, f"a batch of images of shape (N, {', '.join(map(str, self.image_shape))})"
            )
        n = x.shape[0]
        w, logdet = self.preprocess(x, noise)
        self._set_probes(n, w)
        acc = w.new_zeros(n, 1 + len(self.reg_weights))  # Δlogp and the regularisers
        h, parts = w, []
        last = self.n_scales - 1
        for s, (shp, scale) in enumerate(zip(self.shapes, self.scales)):
            d = math.prod(shp)
            st = torch.cat([h.reshape(n, d), acc], 1)
            for block in scale:
                st = block(st)
            flat, acc = st[:, :d], st[:, d:]
            if s == last:
                parts.append(flat)
                break
            h = squeeze(flat.reshape(n, *shp))
            half = h.shape[1] // 2
            parts.append(h[:, :half].reshape(n, -1))
            h = h[:, half:]
        z = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        reg = w.new_zeros(n)
        for i, wgt in enumerate(self.reg_weights):
            reg = reg + wgt * acc[:, 1 + i]
        return z, acc[:, 0] - logdet, reg

    def log_prob(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(k + u)`` per image ``(N,)`` in nats, level units (see the module
        docstring): a one-draw estimate of a lower bound of ``log P(k)``."""
        z, dlogp, _ = self(x, noise)
        return standard_normal_logprob(z) - dlogp

    def nll(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log-likelihood in nats per image."""
        return -self.log_prob(x, noise).mean()

    def bits_per_dim(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Mean bits per dimension: :meth:`nll` / (D ln 2)."""
        return bits_per_dim(self.nll(x, noise), self.dim)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, quantize: bool = True
    ) -> torch.Tensor:
        """``n`` images ``(n, C, H, W)``: base draws ``z ~ N(0, I)`` through :meth:`decode`.
        ``quantize``: on the data's grid ``k / (L − 1)`` (what :meth:`log_prob` accepts);
        else the continuous ``v / L`` in [0, 1]."""
        _int_at_least("n", n, 1)
        p = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator, dtype=p.dtype).to(p.device)
        return self.decode(z, quantize)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Latents ``z`` ``(n, D)`` (laid out as :meth:`forward` returns them) back to images
        ``(n, C, H, W)``: the factored-out parts put back, the squeezes undone and each block
        integrated from t1 to t0, scale by scale from the last, then the logit transform
        inverted (``v / L``; with ``quantize``, ``floor(v)`` on the data's grid)."""
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.dim:
            raise bad_value("z", z, f"latents of shape (n, {self.dim})")
        n = z.shape[0]
        self._set_probes(n, z)
        last = self.n_scales - 1
        sizes = [math.prod(shp) // 2 for shp in self.shapes[:last]]  # factored out per scale
        factored = list(z[:, : sum(sizes)].split(sizes, 1)) if sizes else []
        h = z[:, sum(sizes) :].reshape(n, *self.shapes[last])
        extra = 1 + len(self.reg_weights)
        for s in range(last, -1, -1):
            shp = self.shapes[s]
            if s < last:
                f = factored[s].reshape(n, -1, *h.shape[2:])
                h = unsqueeze(torch.cat([f, h], 1))
            d = math.prod(shp)
            st = torch.cat([h.reshape(n, d), h.new_zeros(n, extra)], 1)
            for block in reversed(self.scales[s]):
                st = block(st, t=block.t.flip(0))
            h = st[:, :d].reshape(n, *shp)
        y = inverse_logit(h, self.alpha)
        if not quantize:
            return y
        k = torch.floor(y * self.levels).clamp(0, self.levels - 1)
        return k / (self.levels - 1)
