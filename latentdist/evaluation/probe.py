"""The generation probe: a small latent generative model of one fixed recipe (docs/metrics.md).

Continuous latents get a rectified flow (flow matching with straight paths; Lipman et al.,
"Flow Matching for Generative Modeling", ICLR 2023; Liu et al., "Flow Straight and Fast",
ICLR 2023): with x_0 ~ N(0, I) and x_1 a standardised latent, x_t = (1 - t) x_0 + t x_1 and a
velocity network v(x_t, t) is fitted to x_1 - x_0 by least squares, t ~ U(0, 1); samples are
the Euler integration of dx/dt = v(x, t) from t = 0 to 1. Latents are standardised per channel
(dimension 1 of (N, C, ...) latents; per feature for (N, d) vectors), as diffusion models
standardise their latents, and de-standardised after sampling.

The velocity network is an MLP on the flattened latent (``MLPVelocity``; input and output sized
to the latent, hidden width fixed). A convolutional velocity network was tried for (C, H, W)
latents and dropped: on 2 CPU cores it trained 10-20x slower per step on MNIST's 4x7x7 latents,
far beyond the probe's budget of a minute per run. The recipe (``PROBE_RECIPE``: steps, batch,
learning rate, width, Euler steps) is the same for every latent, so differences between probes
come from the latents. VQ code maps use the existing
autoregressive ``CodePrior`` instead (``compare`` picks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from latentdist.device import torch_threads
from latentdist.errors import UsageError

__all__ = ["PROBE_RECIPE", "FlowPrior", "MLPVelocity", "ProbeRecipe"]


@dataclass(frozen=True)
class ProbeRecipe:
    """The probe's fixed settings; ``describe`` states them in words for reports."""

    steps: int = 1000  # optimiser steps of the velocity network
    batch_size: int = 128
    lr: float = 2e-3  # Adam, decayed linearly to 0
    width: int = 256  # hidden width of the MLP velocity network
    sample_steps: int = 32  # Euler steps from noise to latent

    def describe(self) -> str:
        return (
            "rectified flow on per-channel standardised latents: MLP velocity net on the "
            f"flattened latent (3 hidden layers of {self.width}, SiLU); {self.steps} Adam "
            f"steps (lr {self.lr:g}, linear decay), batch {self.batch_size}, t ~ U(0, 1); "
            f"{self.sample_steps} Euler steps"
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
        return self.net(torch.cat([x, _time_features(t)], dim=1))


class FlowPrior:
    """Rectified-flow prior over continuous latents (the probe's model; module docstring).

    ``fit`` standardises per channel (mean 0, std 1 over the batch and any spatial positions),
    then trains the velocity network; ``sample`` integrates from N(0, I) with Euler steps and
    undoes the standardisation. Deterministic given the seed (CPU).
    """

    def __init__(self, recipe: ProbeRecipe = PROBE_RECIPE) -> None:
        if recipe.steps < 1 or recipe.sample_steps < 1 or recipe.batch_size < 1:
            raise UsageError("FlowPrior: steps, sample_steps and batch_size must be >= 1")
        self.recipe = recipe
        self.net: nn.Module | None = None
        self.shift: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.latent_shape: tuple[int, ...] = ()
        self.losses: list[float] = []

    def _channel_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = [0, *range(2, z.ndim)]
        shift = z.mean(dim=dims, keepdim=True)[0]
        scale = z.std(dim=dims, keepdim=True)[0] if len(z) > 1 else torch.ones_like(shift)
        return shift, torch.where(scale > 1e-8, scale, torch.ones_like(scale))

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
        zs = zs.reshape(len(zs), -1)
        self.net = MLPVelocity(zs.shape[1], r.width)
        opt = torch.optim.Adam(self.net.parameters(), lr=r.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / r.steps)
        gen = torch.Generator().manual_seed(seed)
        self.net.train()
        self.losses = []
        with torch_threads(1):  # tiny products: one thread is several times faster
            self._train(zs, opt, sched, gen)
        self.net.eval()
        return self

    def _train(self, zs: torch.Tensor, opt, sched, gen: torch.Generator) -> None:
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
            self.losses.append(float(loss.detach()))

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, batch: int = 1024) -> torch.Tensor:
        """``n`` latents (float32, shape (n, *latent_shape)) by Euler integration of the flow."""
        if self.net is None or self.shift is None or self.scale is None:
            raise RuntimeError("FlowPrior.sample called before fit")
        gen = torch.Generator().manual_seed(seed)
        k = self.recipe.sample_steps
        dim = math.prod(self.latent_shape)
        with torch_threads(1):  # tiny products: one thread is several times faster
            out = self._integrate(n, dim, k, batch, gen)
        return torch.cat(out) * self.scale + self.shift

    def _integrate(self, n: int, dim: int, k: int, batch: int, gen: torch.Generator) -> list:
        assert self.net is not None
        out = []
        for s in range(0, n, batch):
            x = torch.randn((min(batch, n - s), dim), generator=gen)
            for i in range(k):
                t = torch.full((len(x),), i / k)
                x = x + self.net(x, t) / k
            out.append(x.reshape(len(x), *self.latent_shape))
        return out
