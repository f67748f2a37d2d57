"""The image-size rule: any H x W works with any power-of-two down/upsampling factor f.

* Encoders (the DAE's) pad the image at the bottom and right to the next multiples of f,
  ``ceil(H / f) * f`` x ``ceil(W / f) * f``, by reflection (by replication where the image is
  smaller than the padding), so the latent is ``ceil(H / f)`` x ``ceil(W / f)``.
* Decoders (the DAE's and ``measure --generator conv``) upsample the latent by f and crop the
  output back to its top-left H x W.

So ``decoder(encoder(x)).shape == x.shape`` for every size, and a size that f divides is left
exactly as it was (no padding, no crop).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def pixel_budget_batch(sample_shape: tuple[int, ...], batch: int, pixels: int, least: int) -> int:
    """``batch`` samples, or for images of more than ``pixels`` pixels (H x W) as many as hold
    ``batch * pixels`` pixels, at least ``least``: the rule of every default batch on images
    (train-dae, measure's fit and proxies, compare's feature network), so that a step's time
    and memory do not grow with the image area. Vectors get ``batch``."""
    area = math.prod(sample_shape[-2:]) if len(sample_shape) == 3 else 1
    return batch if area <= pixels else max(least, batch * pixels // area)


def padded_size(h: int, w: int, factor: int) -> tuple[int, int]:
    """The next multiples of ``factor``: ``(ceil(h / f) * f, ceil(w / f) * f)``."""
    return math.ceil(h / factor) * factor, math.ceil(w / factor) * factor


def latent_size(h: int, w: int, factor: int) -> tuple[int, int]:
    """Spatial size of the latent of an h x w image: ``(ceil(h / f), ceil(w / f))``."""
    return math.ceil(h / factor), math.ceil(w / factor)


class PadTo(nn.Module):
    """Pad (B, C, h, w) images at the bottom and right to ``size`` (the run's padded size).

    Reflection, or replication where the image is smaller than the padding (reflection needs
    ``pad < side``). An image already of ``size`` passes unchanged.
    """

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        ph, pw = self.size[0] - h, self.size[1] - w
        if ph == 0 and pw == 0:
            return x
        mode = "reflect" if ph < h and pw < w else "replicate"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class Crop(nn.Module):
    """Keep the top-left ``size`` = (H, W) of (B, C, h, w) maps (1-Lipschitz: a projection)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : self.size[0], : self.size[1]]

    def extra_repr(self) -> str:
        return f"size={self.size}"
