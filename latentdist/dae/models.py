"""Encoder/decoder pairs for the DAE trainer.

Images: the convolutional pair of VQGAN (Esser et al., "Taming Transformers", CVPR 2021) and
Stable Diffusion's VAE (Rombach et al., CVPR 2022): ResNet blocks with GroupNorm and SiLU, one
stride-2 downsampling per channel-multiplier level, nearest-neighbour upsampling followed by a
3x3 convolution, the decoder one ResNet block deeper per level than the encoder. Attention
blocks are left out (they matter little at the sizes a CPU can train). Vectors: an MLP pair.

``Affine`` standardises the data (per channel for images, per feature for vectors) with
statistics of the training split, so losses and learning rates do not depend on the data's
units; the exported encoder/decoder carry it, so they read and write data in its own scale.

``Models`` holds a run's networks (``build_models`` makes them from a ``TrainConfig``) and
``Pipeline`` is the forward pass a stage trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from latentdist._shapes import Crop, PadTo, padded_size
from latentdist.dae.bottleneck import make_bottleneck
from latentdist.dae.config import TrainConfig


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


# ---------------------------------------------------------------- a run's networks


@dataclass
class Models:
    """Every network of a run; ``normalize``/``denormalize`` map data to and from the model's scale.

    ``pad``/``crop`` carry the image-size rule (``latentdist._shapes``): the encoder sees images
    padded to multiples of ``downsample``, the decoder's output is cropped back to the data size.
    """

    normalize: Affine
    denormalize: Affine
    encoder: nn.Module
    bottleneck: nn.Module
    decoder: nn.Module
    aux_decoder: nn.Module | None
    discriminator: nn.Module | None
    pad: nn.Module = field(default_factory=nn.Identity)
    crop: nn.Module = field(default_factory=nn.Identity)

    def named(self) -> dict[str, nn.Module]:
        mods = {
            "normalize": self.normalize,
            "encoder": self.encoder,
            "bottleneck": self.bottleneck,
            "decoder": self.decoder,
            "aux_decoder": self.aux_decoder,
            "discriminator": self.discriminator,
        }
        return {k: v for k, v in mods.items() if v is not None}

    def state_dicts(self) -> dict[str, dict]:
        """Every network's ``state_dict`` by its ``named`` key (checkpoints, safetensors)."""
        return {k: m.state_dict() for k, m in self.named().items()}

    def load_state_dicts(self, states: dict[str, dict]) -> None:
        """Load what ``state_dicts`` returned (a checkpoint's ``models``)."""
        for name, mod in self.named().items():
            mod.load_state_dict(states[name])

    def to(self, device: torch.device, channels_last: bool = False) -> Models:
        """Move every network to ``device``, ``denormalize`` too (it has no entry in ``named``:
        its buffers are ``normalize``'s, so checkpoints do not hold them twice)."""
        for m in (*self.named().values(), self.denormalize):
            m.to(device)
            if channels_last:
                m.to(memory_format=torch.channels_last)
        return self


def build_models(
    config: TrainConfig,
    data_shape: tuple[int, ...],
    kind: str,
    shift: torch.Tensor,
    scale: torch.Tensor,
) -> Models:
    """Build the networks of ``config`` with ``torch.manual_seed(config.seed)``.

    Encoder, bottleneck and full decoder are built first, so a DAE run and a joint run with the
    same seed start from the same encoder and decoder.
    """
    torch.manual_seed(config.seed)
    c = config.latent_channels
    vq = dict(
        num_codes=config.codebook_size,
        beta=config.vq_beta,
        ema=config.vq_ema,
        decay=config.vq_decay,
        restart_every=config.vq_restart_every,
    )
    bottleneck = make_bottleneck(config.bottleneck, c, **(vq if config.bottleneck == "vq" else {}))
    aux_dropout = config.aux_dropout
    pad, crop = nn.Identity(), nn.Identity()
    if kind == "images":
        hw = tuple(data_shape[1:])
        if padded_size(*hw, config.downsample) != hw:
            pad, crop = PadTo(padded_size(*hw, config.downsample)), Crop(hw)
        ch, mult, nr, w = data_shape[0], config.mult(), config.num_res_blocks, config.base_width
        encoder = conv_encoder(ch, w, mult, nr, bottleneck.in_channels)
        decoder = conv_decoder(c, w, mult, nr, ch)
        aux_w = max(1, round(w * config.aux_width_mult))
        make_aux = lambda: conv_decoder(c, aux_w, mult, nr, ch, aux_dropout)  # noqa: E731
    else:
        h, n = config.mlp_hidden, config.mlp_layers
        encoder = mlp_encoder(data_shape, h, n, bottleneck.in_channels)
        decoder = mlp_decoder(c, h, n, data_shape)
        aux_h = max(1, round(h * config.aux_width_mult))
        make_aux = lambda: mlp_decoder(c, aux_h, n, data_shape, aux_dropout)  # noqa: E731
    aux = make_aux() if config.mode == "dae" else None
    disc = None
    if config.disc_weight > 0:
        disc = PatchDiscriminator(data_shape[0], 4 * config.base_width, min(data_shape[1:]))
    return Models(
        Affine(shift, scale),
        Affine(shift, scale, inverse=True),
        encoder,
        bottleneck,
        decoder,
        aux,
        disc,
        pad,
        crop,
    )


class Pipeline(nn.Module):
    """normalised data -> pad -> encoder -> bottleneck -> decoder -> crop; the encoder part
    frozen in stage 2."""

    def __init__(
        self,
        encoder: nn.Module,
        bottleneck: nn.Module,
        decoder: nn.Module,
        frozen: bool,
        pad: nn.Module | None = None,
        crop: nn.Module | None = None,
    ):
        super().__init__()
        self.encoder, self.bottleneck, self.decoder, self.frozen = (
            encoder,
            bottleneck,
            decoder,
            frozen,
        )
        self.pad, self.crop = pad or nn.Identity(), crop or nn.Identity()

    def train(self, mode: bool = True) -> Pipeline:
        super().train(mode)
        if self.frozen:  # eval-mode normalisation and no codebook updates in stage 2
            self.encoder.eval()
            self.bottleneck.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.frozen:
            with torch.no_grad():
                z, _ = self.bottleneck(self.encoder(self.pad(x)), sample=True)
            return self.crop(self.decoder(z)), {}
        z, terms = self.bottleneck(self.encoder(self.pad(x)), sample=True)
        return self.crop(self.decoder(z)), terms
