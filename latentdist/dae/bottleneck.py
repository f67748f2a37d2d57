"""Bottlenecks between encoder and decoder: ``ae``, ``kl`` and ``vq``.

Each takes the encoder's output ``h`` (B, C_h, *spatial) and returns the latent fed to the
decoder plus a dict of loss terms; ``encode`` is the deterministic map the exported encoder uses.

* ``ae``: ``z = h``.
* ``kl``: diagonal Gaussian posterior ``q(z|x) = N(mu, diag(sigma^2))`` with ``h = [mu, log sigma^2]``
  (Kingma & Welling 2014; Stable Diffusion's ``DiagonalGaussianDistribution``). Training samples
  ``z = mu + sigma * eps``; the KL term is ``0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)`` summed
  over latent dimensions and averaged over the batch. ``encode`` returns the posterior mean.
* ``vq``: nearest codebook vector ``e_k``, ``k = argmin ||h - e_j||`` (van den Oord et al., 2017),
  straight-through gradient ``z = h + sg(e_k - h)``, loss
  ``||sg(h) - e_k||^2 + beta ||h - sg(e_k)||^2``. With ``ema=True`` the codebook follows
  exponential moving averages of assigned vectors instead of the first term (VQ-VAE appendix,
  Razavi et al. 2019). Codes unused for ``restart_every`` training steps are restarted at random
  encoder outputs of the current batch (Dhariwal et al., Jukebox 2020). The codebook is
  initialised from encoder outputs of the first training batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentdist import parallel


class IdentityBottleneck(nn.Module):
    """Deterministic autoencoder bottleneck."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_channels = channels

    def forward(
        self, h: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return h, {}

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return h


class GaussianBottleneck(nn.Module):
    """Diagonal Gaussian posterior with a KL(q(z|x) || N(0, I)) term (SD's VAE)."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_channels = 2 * channels

    def forward(
        self, h: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mean, logvar = h.float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
        return z, {"kl": kl}

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return h.chunk(2, dim=1)[0]


class VectorQuantizer(nn.Module):
    """Codebook of ``num_codes`` vectors of size ``channels`` (channel axis 1 of the input)."""

    def __init__(
        self,
        channels: int,
        num_codes: int,
        beta: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        restart_every: int = 50,
    ):
        super().__init__()
        self.in_channels = channels
        self.num_codes, self.beta, self.ema, self.decay = num_codes, beta, ema, decay
        self.restart_every = restart_every
        init = torch.empty(num_codes, channels).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if ema:
            self.register_buffer("codebook", init)
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("ema_count", torch.zeros(num_codes))
        self.register_buffer("ema_sum", torch.zeros(num_codes, channels))
        self.register_buffer(
            "window_count", torch.zeros(num_codes)
        )  # uses since last restart check
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def _assign(self, h: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code at every position, computed without reshapes (traceable)."""
        cb = self.codebook.to(h.dtype)
        view = [1, self.num_codes] + [1] * (h.dim() - 2)
        dots = torch.einsum("bc...,kc->bk...", h, cb)
        dist = h.pow(2).sum(1, keepdim=True) - 2 * dots + cb.pow(2).sum(1).view(view)
        return dist.argmin(1)

    def _lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.codebook).movedim(-1, 1)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return self._lookup(self._assign(h.float()))

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        """Code indices (B, *spatial)."""
        return self._assign(h.float())

    @torch.no_grad()
    def _initialise(self, flat: torch.Tensor) -> None:
        pick = torch.randint(len(flat), (self.num_codes,), device=flat.device)
        noise = 1e-3 * flat.std() * torch.randn(self.num_codes, flat.shape[1], device=flat.device)
        self.codebook.data.copy_(flat[pick] + noise)
        self.ema_sum.copy_(self.codebook.data)
        self.ema_count.fill_(1.0)
        parallel.broadcast_(self.codebook.data, self.ema_sum, self.ema_count)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        if self.ema:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat)
            parallel.all_reduce_sum_(counts, sums)
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.ema_count.sum()
            smoothed = (
                (self.ema_count + 1e-5) / (n + self.num_codes * 1e-5) * n
            )  # Laplace smoothing
            self.codebook.copy_(self.ema_sum / smoothed[:, None])
        else:
            parallel.all_reduce_sum_(counts)
        self.window_count.add_(counts)
        self.steps.add_(1)
        if self.restart_every and int(self.steps) % self.restart_every == 0:
            dead = self.window_count == 0
            n_dead = int(dead.sum())
            if n_dead:
                pick = torch.randint(len(flat), (n_dead,), device=flat.device)
                self.codebook.data[dead] = flat[pick]
                self.ema_sum[dead] = flat[pick]
                self.ema_count[dead] = 1.0
                parallel.broadcast_(self.codebook.data, self.ema_sum, self.ema_count)
            self.window_count.zero_()

    def forward(
        self, h: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = h.float()
        if self.training and not bool(self.initialised):
            self._initialise(h.detach().movedim(1, -1).reshape(-1, self.in_channels))
        idx = self._assign(h)
        q = self._lookup(idx)
        flat_idx = idx.flatten()
        counts = torch.bincount(flat_idx, minlength=self.num_codes).float()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        if self.training:
            self._update(
                h.detach().movedim(1, -1).reshape(-1, self.in_channels), flat_idx, counts.clone()
            )
        commit = self.beta * F.mse_loss(h, q.detach())
        loss = commit if self.ema else commit + F.mse_loss(q, h.detach())
        z = h + (q - h).detach()  # straight-through estimator
        return z, {"vq": loss, "perplexity": perplexity.detach()}


def make_bottleneck(kind: str, channels: int, **vq: object) -> nn.Module:
    """``ae`` | ``kl`` | ``vq`` bottleneck for ``channels`` latent channels/dimensions."""
    if kind == "ae":
        return IdentityBottleneck(channels)
    if kind == "kl":
        return GaussianBottleneck(channels)
    if kind == "vq":
        return VectorQuantizer(channels, **vq)  # type: ignore[arg-type]
    raise ValueError(kind)
