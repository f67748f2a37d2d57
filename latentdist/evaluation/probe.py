"""The generation probe: a small latent generative model of one fixed recipe (docs/metrics.md).

Continuous latents get a rectified flow (flow matching with straight paths; Lipman et al.,
"Flow Matching for Generative Modeling", ICLR 2023; Liu et al., "Flow Straight and Fast",
ICLR 2023): with x_0 ~ N(0, I) and x_1 a standardised latent, x_t = (1 - t) x_0 + t x_1 and a
velocity network v(x_t, t) is fitted to x_1 - x_0 by least squares, t ~ U(0, 1); samples are
the integration of dx/dt = v(x, t) from t = 0 to 1 (Euler or Heun steps). Latents are
standardised per channel (dimension 1 of (N, C, ...) latents; per feature for (N, d) vectors),
as diffusion models standardise their latents, and de-standardised after sampling.

``PROBE_RECIPE`` (steps, batch, learning rate, network, EMA, integrator) is the same for every
latent, so differences between probes come from the latents. It was chosen by
``benchmarks/bench_probe.py`` (``benchmarks/results/probe.md``): on five MNIST-5k encoders an
MLP velocity net with 4000 Adam steps and 16 Heun steps gave a lower probe FD on every encoder
than the former 1000 steps and 32 Euler steps (DAE 11.7 against 17.3), with the same
between-seed spread (pooled sd 0.88 against 0.87), at about 4x the time (about 26 CPU seconds
per seed on one core). An exponential moving average of the weights (``ema``, through
``torch.optim.swa_utils.AveragedModel``) narrowed the spread a little (0.78) but raised FD on
every encoder under the linearly decaying learning rate; a convolutional velocity net
(``ConvVelocity``, ``conv_width``) was slower (3x per step at 32 channels, 7-9x at 48-64, one
thread) and worse (FD 38 against 12 on the DAE encoder at 2000 steps). Both stay available as
recipe fields, off in ``PROBE_RECIPE``.
VQ code maps use the existing autoregressive ``CodePrior`` instead (``compare`` picks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from latentdist.device import torch_threads
from latentdist.errors import UsageError

__all__ = ["PROBE_RECIPE", "ConvVelocity", "FlowPrior", "MLPVelocity", "ProbeRecipe"]


@dataclass(frozen=True)
class ProbeRecipe:
    """The probe's fixed settings (the defaults are ``PROBE_RECIPE``); ``describe`` states them
    in words for reports."""

    steps: int = 4000  # optimiser steps of the velocity network
    batch_size: int = 128
    lr: float = 2e-3  # Adam, decayed linearly to 0
    width: int = 256  # hidden width of the MLP velocity network (flat latents, or conv_width 0)
    conv_width: int = 0  # channels of the conv velocity network for (C, H, W) latents; 0: MLP
    conv_blocks: int = 2  # residual blocks of the conv velocity network
    ema: float = 0.0  # decay of the exponential moving average of the weights; 0: none
    sample_steps: int = 16  # integration steps from noise to latent
    integrator: str = "heun"  # "euler" (1 evaluation per step) or "heun" (2)

    def describe(self) -> str:
        mlp = f"MLP velocity net on the flattened latent (3 hidden layers of {self.width}, SiLU)"
        net = (
            f"conv velocity net for (C, H, W) latents ({self.conv_blocks} residual blocks of "
            f"two 3x3 convs, {self.conv_width} channels, SiLU, at the latent's resolution), "
            f"else an {mlp}"
            if self.conv_width
            else mlp
        )
        ema = (
            f"sampling with an EMA of the weights (decay {self.ema:g})"
            if self.ema
            else "sampling with the last weights"
        )
        return (
            f"rectified flow on per-channel standardised latents: {net}; {self.steps} Adam "
            f"steps (lr {self.lr:g}, linear decay), batch {self.batch_size}, t ~ U(0, 1); "
            f"{ema}; {self.sample_steps} {self.integrator.capitalize()} steps"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROBE_RECIPE = ProbeRecipe()


def _time_features(t: torch.Tensor, n: int = 8) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, 2n) sinusoidal features at frequencies pi * 2^k, k < n."""
    freqs = math.pi * 2.0 ** torch.arange(n, dtype=t.dtype, device=t.device)
    ang = t[:, None] * freqs[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class MLPVelocity(nn.Module):
    """v(x, t) for flat latents: MLP on [x, sinusoidal features of t], SiLU, 3 hidden layers."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 16, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.net(torch.cat([x.reshape(len(x), -1), _time_features(t)], dim=1)).reshape(shape)


class ConvVelocity(nn.Module):
    """v(x, t) for (C, H, W) latents: residual 3x3 convolutions at the latent's resolution.

    A 3x3 convolution lifts the latent to ``width`` channels; each of ``blocks`` residual blocks
    is SiLU, conv 3x3, plus a per-channel embedding of t, SiLU, conv 3x3, added back; a final
    SiLU and 3x3 convolution (initialised at zero) map to the latent's channels. t enters as 16
    sinusoidal features through a 2-layer MLP shared by the blocks.
    """

    def __init__(self, channels: int, width: int, blocks: int) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(16, width), nn.SiLU(), nn.Linear(width, width))
        self.a = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(blocks))
        self.b = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(blocks))
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(_time_features(t))[:, :, None, None]
        h = self.inp(x)
        for a, b in zip(self.a, self.b, strict=True):
            h = h + b(F.silu(a(F.silu(h)) + emb))
        return self.out(F.silu(h))


class FlowPrior:
    """Rectified-flow prior over continuous latents (the probe's model; module docstring).

    ``fit`` standardises per channel (mean 0, std 1 over the batch and any spatial positions),
    then trains the velocity network (``net``; ``ema_net`` is the moving average of its weights
    when the recipe keeps one, else the same network); ``sample`` integrates from N(0, I) with
    ``ema_net`` and undoes the standardisation. Deterministic given the seed (CPU).
    """

    def __init__(self, recipe: ProbeRecipe = PROBE_RECIPE) -> None:
        if recipe.steps < 1 or recipe.sample_steps < 1 or recipe.batch_size < 1:
            raise UsageError("FlowPrior: steps, sample_steps and batch_size must be >= 1")
        if not 0.0 <= recipe.ema < 1.0:
            raise UsageError(f"FlowPrior: ema {recipe.ema}: expected 0 <= ema < 1")
        if recipe.integrator not in ("euler", "heun"):
            raise UsageError(f"FlowPrior: integrator {recipe.integrator!r}: euler or heun")
        self.recipe = recipe
        self.net: nn.Module | None = None
        self.ema_net: nn.Module | None = None
        self.shift: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.latent_shape: tuple[int, ...] = ()
        self.losses: list[float] = []

    def _channel_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = [0, *range(2, z.ndim)]
        shift = z.mean(dim=dims, keepdim=True)[0]
        scale = z.std(dim=dims, keepdim=True)[0] if len(z) > 1 else torch.ones_like(shift)
        return shift, torch.where(scale > 1e-8, scale, torch.ones_like(scale))

    def _make_net(self) -> nn.Module:
        r, shape = self.recipe, self.latent_shape
        if r.conv_width and len(shape) == 3:
            return ConvVelocity(shape[0], r.conv_width, r.conv_blocks)
        return MLPVelocity(math.prod(shape), r.width)

    def fit(self, latents: Any, seed: int = 0) -> FlowPrior:
        """Fit the velocity network to ``latents`` (N, *latent_shape), float."""
        z = torch.as_tensor(
            np.asarray(latents) if not isinstance(latents, torch.Tensor) else latents
        ).float()
        if z.ndim < 2 or len(z) < 2:
            raise UsageError("FlowPrior.fit: need latents of shape (N >= 2, ...)")
        if not torch.isfinite(z).all():
            raise UsageError("FlowPrior.fit: latents contain NaN or Inf values")
        self.latent_shape = tuple(z.shape[1:])
        self.shift, self.scale = self._channel_stats(z)
        zs = (z - self.shift) / self.scale
        r = self.recipe
        torch.manual_seed(seed)
        self.net = self._make_net()
        opt = torch.optim.Adam(self.net.parameters(), lr=r.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / r.steps)
        ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(r.ema)) if r.ema else None
        gen = torch.Generator().manual_seed(seed)
        self.net.train()
        self.losses = []
        with torch_threads(1):  # tiny products: one thread is several times faster
            self._train(zs, opt, sched, gen, ema)
        self.net.eval()
        self.ema_net = ema.module.eval() if ema is not None else self.net
        return self

    def _train(self, zs: torch.Tensor, opt, sched, gen: torch.Generator, ema) -> None:
        r = self.recipe
        assert self.net is not None
        for _ in range(r.steps):
            idx = torch.randint(len(zs), (min(r.batch_size, len(zs)),), generator=gen)
            x1 = zs[idx]
            x0 = torch.randn(x1.shape, generator=gen)
            t = torch.rand(len(x1), generator=gen)
            tb = t.view(-1, *([1] * (x1.ndim - 1)))
            loss = (self.net((1 - tb) * x0 + tb * x1, t) - (x1 - x0)).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(self.net)
            self.losses.append(float(loss.detach()))

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, batch: int = 1024) -> torch.Tensor:
        """``n`` latents (float32, shape (n, *latent_shape)) by integrating the flow (Euler or
        Heun steps, as the recipe says)."""
        if self.ema_net is None or self.shift is None or self.scale is None:
            raise RuntimeError("FlowPrior.sample called before fit")
        gen = torch.Generator().manual_seed(seed)
        with torch_threads(1):  # tiny products: one thread is several times faster
            out = [
                self._integrate(torch.randn((min(batch, n - s), *self.latent_shape), generator=gen))
                for s in range(0, n, batch)
            ]
        return torch.cat(out) * self.scale + self.shift

    def _integrate(self, x: torch.Tensor) -> torch.Tensor:
        """x at t = 0 carried to t = 1: Euler, x += v(x, t) h; or Heun (the trapezoid of v at
        both ends of the Euler step)."""
        net, k = self.ema_net, self.recipe.sample_steps
        assert net is not None
        h = 1.0 / k
        for i in range(k):
            t = torch.full((len(x),), i * h)
            v = net(x, t)
            if self.recipe.integrator == "heun":
                v = 0.5 * (v + net(x + h * v, t + h))
            x = x + h * v
        return x
