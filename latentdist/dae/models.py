"""Encoder/decoder pairs for the DAE trainer.

Images: the convolutional pair of VQGAN (Esser et al., "Taming Transformers", CVPR 2021) and
Stable Diffusion's VAE (Rombach et al., CVPR 2022): ResNet blocks with GroupNorm and SiLU, one
stride-2 downsampling per channel-multiplier level, nearest-neighbour upsampling followed by a
3x3 convolution, the decoder one ResNet block deeper per level than the encoder. Attention
blocks are left out (they matter little at the sizes a CPU can train). Vectors: an MLP pair.

``Affine`` standardises the data (per channel for images, per feature for vectors) with
statistics of the training split, so losses and learning rates do not depend on the data's
units; the exported encoder/decoder carry it, so they read and write data in its own scale.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def group_count(channels: int) -> int:
    """The largest of 32, 16, ..., 1 that divides ``channels`` (GroupNorm groups)."""
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels), channels, eps=1e-6)


class Affine(nn.Module):
    """``y = (x - shift) / scale`` (or its inverse), with the statistics held as buffers."""

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor, inverse: bool = False):
        super().__init__()
        self.register_buffer("shift", shift.clone().float())
        self.register_buffer("scale", scale.clone().float())
        self.inverse = inverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inverse:
            return x * self.scale + self.shift
        return (x - self.shift) / self.scale


def data_statistics(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift and scale for ``Affine``: per-channel (images) or per-feature (vectors) mean and std.

    A constant channel/feature gets scale 1 (nothing to standardise).
    """
    x = x.double()
    if kind == "images":
        mean = x.mean(dim=(0, 2, 3), keepdim=True)[0]
        std = (
            x.std(dim=(0, 2, 3), keepdim=True)[0]
            if x.numel() > x.shape[1]
            else torch.ones_like(mean)
        )
    else:
        mean = x.mean(0)
        std = x.std(0) if len(x) > 1 else torch.ones_like(mean)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return mean.float(), std.float()


def streamed_statistics(
    take, idx: np.ndarray, kind: str, max_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``data_statistics`` of rows ``idx`` read ``max_rows`` at a time through ``take(rows)``.

    One chunk gives exactly ``data_statistics``; more are merged with Chan et al.'s pairwise
    update of (count, mean, sum of squared deviations) in float64, so an image folder larger
    than memory is never decoded whole.
    """
    if len(idx) <= max_rows:
        return data_statistics(take(idx), kind)
    dims = (0, 2, 3) if kind == "images" else (0,)
    count, mean, m2 = 0, None, None
    for start in range(0, len(idx), max_rows):
        x = take(idx[start : start + max_rows]).double()
        n_b = x.numel() // math.prod(x.shape[d] for d in range(x.ndim) if d not in dims)
        mean_b = x.mean(dim=dims, keepdim=True)[0]
        m2_b = (x - mean_b).pow(2).sum(dim=dims, keepdim=True)[0]
        if mean is None:
            count, mean, m2 = n_b, mean_b, m2_b
            continue
        delta, total = mean_b - mean, count + n_b
        mean = mean + delta * n_b / total
        m2 = m2 + m2_b + delta.pow(2) * count * n_b / total
        count = total
    std = (m2 / max(count - 1, 1)).sqrt()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return mean.float(), std.float()


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice with a residual connection (VQGAN's ``ResnetBlock``)."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            _norm(c_in),
            nn.SiLU(),
            nn.Conv2d(c_in, c_out, 3, padding=1),
            _norm(c_out),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def conv_encoder(
    in_ch: int, width: int, mult: tuple[int, ...], num_res: int, out_ch: int, dropout: float = 0.0
) -> nn.Sequential:
    """VQGAN/SD encoder: ``len(mult) - 1`` stride-2 downsamplings (factor 2**(len(mult)-1))."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, width, 3, padding=1)]
    ch = width
    for i, m in enumerate(mult):
        for _ in range(num_res):
            layers.append(ResnetBlock(ch, width * m, dropout))
            ch = width * m
        if i < len(mult) - 1:
            layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
    layers += [
        ResnetBlock(ch, ch, dropout),
        _norm(ch),
        nn.SiLU(),
        nn.Conv2d(ch, out_ch, 3, padding=1),
    ]
    return nn.Sequential(*layers)


def conv_decoder(
    z_ch: int, width: int, mult: tuple[int, ...], num_res: int, out_ch: int, dropout: float = 0.0
) -> nn.Sequential:
    """VQGAN/SD decoder: mirror of ``conv_encoder`` with ``num_res + 1`` blocks per level.

    The last module is the output convolution (the "last layer" of VQGAN's adaptive weight).
    """
    ch = width * mult[-1]
    layers: list[nn.Module] = [nn.Conv2d(z_ch, ch, 3, padding=1), ResnetBlock(ch, ch, dropout)]
    for i in reversed(range(len(mult))):
        for _ in range(num_res + 1):
            layers.append(ResnetBlock(ch, width * mult[i], dropout))
            ch = width * mult[i]
        if i > 0:
            layers += [
                nn.Upsample(scale_factor=2.0, mode="nearest"),
                nn.Conv2d(ch, ch, 3, padding=1),
            ]
    layers += [_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1)]
    return nn.Sequential(*layers)


def mlp_encoder(
    data_shape: tuple[int, ...], hidden: int, layers: int, out_dim: int
) -> nn.Sequential:
    """Flatten, then ``layers`` Linear-SiLU blocks of width ``hidden``, then a linear head."""
    d = math.prod(data_shape)
    mods: list[nn.Module] = [nn.Flatten(1)]
    for i in range(layers):
        mods += [nn.Linear(d if i == 0 else hidden, hidden), nn.SiLU()]
    mods.append(nn.Linear(hidden if layers else d, out_dim))
    return nn.Sequential(*mods)


def mlp_decoder(
    z_dim: int, hidden: int, layers: int, data_shape: tuple[int, ...], dropout: float = 0.0
) -> nn.Sequential:
    """Mirror of ``mlp_encoder`` with dropout after each hidden activation; last module is linear."""
    d = math.prod(data_shape)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(z_dim if i == 0 else hidden, hidden), nn.SiLU(), nn.Dropout(dropout)]
    mods += [nn.Linear(hidden if layers else z_dim, d), nn.Unflatten(1, tuple(data_shape))]
    return nn.Sequential(*mods)


def last_layer(decoder: nn.Sequential) -> torch.Tensor:
    """The weight of the decoder's output layer (for VQGAN's adaptive GAN weight)."""
    for m in reversed(decoder):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return m.weight
    raise ValueError("decoder has no output layer")


class PatchDiscriminator(nn.Module):
    """PatchGAN critic (Isola et al. 2017, as used by VQGAN) with GroupNorm instead of BatchNorm.

    GroupNorm keeps the critic independent of the batch split, so DDP and resumed runs match a
    single uninterrupted process. 3x3 kernels let it run on images as small as 8x8.
    """

    def __init__(self, in_ch: int, width: int, image_size: int):
        super().__init__()
        n_down = min(3, max(1, int(math.log2(max(image_size, 2))) - 2))
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        ch = width
        for _ in range(n_down - 1):
            layers += [
                nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1),
                _norm(2 * ch),
                nn.LeakyReLU(0.2),
            ]
            ch *= 2
        layers += [
            nn.Conv2d(ch, ch, 3, padding=1),
            _norm(ch),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ch, 1, 3, padding=1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def count_params(*modules: nn.Module | None) -> int:
    """Number of scalars in the parameters and learned buffers (e.g. an EMA codebook)."""
    total = 0
    for m in modules:
        if m is None:
            continue
        total += sum(p.numel() for p in m.parameters())
        total += sum(b.numel() for name, b in m.named_buffers() if name.endswith("codebook"))
    return total
