"""Generator families G_c as plain ``nn.Module`` s, nested in their capacity ``c``.

Each family's forward is a composition of ``nn.Sequential`` and ``SumOfPaths`` over standard
layers (Linear, Conv2d, ReLU, nearest Upsample, Flatten, Unflatten, ``Crop``). That structure is what the
proxies walk to bound Lipschitz constants, so keep to it when adding a family.

Nesting: a ReLU network of width c can represent every network of width c' < c (zero the extra
units), but a narrow ReLU network cannot represent a linear map. Every family therefore adds a
linear skip path that grows with the capacity, so that G_c ⊂ G_c' for c < c' and D_c is
non-increasing in c, while no path of fixed size is present at every capacity (a dense skip
would be a full linear decoder at "width 1", and the curve c -> D_c flat): the mlp's skip has
rank <= c, the conv generator's is a per-pixel 1x1 convolution. ``--generator linear`` stays the
reference point (G_c contains it once c reaches the rank of the linear map).
benchmarks/results/capacity.md measures the choice.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from latentdist._shapes import Crop, latent_size
from latentdist.errors import UsageError

FAMILIES = ("linear", "mlp", "conv")


class SumOfPaths(nn.Module):
    """f(x) = sum_k path_k(x): parallel branches whose outputs add (e.g. a linear skip + a body)."""

    def __init__(self, *paths: nn.Module):
        super().__init__()
        self.paths = nn.ModuleList(paths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.paths[0](x)
        for path in self.paths[1:]:
            out = out + path(x)
        return out


def _numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


def linear_generator(latent_shape: tuple[int, ...], data_shape: tuple[int, ...]) -> nn.Sequential:
    """g(z) = W vec(z) + b, reshaped to the data shape."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_numel(latent_shape), _numel(data_shape)),
        nn.Unflatten(1, data_shape),
    )


def mlp_generator(
    latent_shape: tuple[int, ...], data_shape: tuple[int, ...], width: int, depth: int = 2
) -> nn.Sequential:
    """g(z) = B A z + b + body(z): a linear skip of rank <= ``width`` (A: width x d_in, B:
    d_out x width) and a ReLU MLP with ``depth`` hidden layers of ``width`` units, so that every
    path, and the parameter count, grows with the width."""
    if width < 1 or depth < 1:
        raise UsageError(f"mlp generator needs width >= 1 and depth >= 1 (got {width}, {depth})")
    d_in, d_out = _numel(latent_shape), _numel(data_shape)
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, d_out, bias=False))  # the skip path carries the output bias
    skip = nn.Sequential(nn.Linear(d_in, width, bias=False), nn.Linear(width, d_out))
    return nn.Sequential(
        nn.Flatten(),
        SumOfPaths(skip, nn.Sequential(*layers)),
        nn.Unflatten(1, data_shape),
    )


def mlp_output_factors(
    mlp: nn.Sequential, params: dict[str, torch.Tensor], z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mlp generator's output as a map of rank <= 2c + 1 of its last features.

    g(z) = H U^T (flattened), with H = [A z, h(z), 1] (B, 2c + 1), h(z) the body's last hidden
    layer, and U = [B, W_out, b] (d_out, 2c + 1). A loss of g(z) can then be taken through H
    and U without forming the B x d_out output (``estimator.fit.factored_mmd_loss``).
    ``params``: ``mlp``'s parameters by name, as ``functional_call`` takes them, so that this
    also runs under ``vmap`` on a bucket's stacked parameters.
    """
    body = mlp[1].paths[1]
    skip_in, skip_out = "1.paths.0.0.", "1.paths.0.1."
    out = f"1.paths.1.{len(body) - 1}."
    hidden_params = {
        name[len("1.paths.1.") :]: p
        for name, p in params.items()
        if name.startswith("1.paths.1.") and not name.startswith(out)
    }
    x = z.reshape(len(z), -1)
    hidden = functional_call(body[:-1], hidden_params, (x,))
    ones = x.new_ones(len(x), 1)
    h = torch.cat([x @ params[skip_in + "weight"].T, hidden, ones], dim=-1)
    u = torch.cat(
        [params[skip_out + "weight"], params[out + "weight"], params[skip_out + "bias"][:, None]],
        dim=-1,
    )
    return h, u


def upsampling_factor(latent_shape: tuple[int, ...], data_shape: tuple[int, ...]) -> int:
    """Number k of 2x upsamplings from a C×h×w latent to a C'×H×W image.

    The image-size rule of ``latentdist._shapes``: h = ceil(H / 2^k) and w = ceil(W / 2^k) (the
    smallest such k); the generator's h·2^k × w·2^k output is cropped to H×W. Sizes that 2^k
    divides (H = h·2^k) need no crop.
    """
    if len(latent_shape) != 3 or len(data_shape) != 3:
        raise UsageError(
            f"conv generator needs spatial latents C×H×W and image data C×H×W; got latent shape "
            f"{list(latent_shape)} and data shape {list(data_shape)} (use --generator mlp for vectors)"
        )
    (_, h, w), (_, H, W) = latent_shape, data_shape
    for k in range(max(H, W).bit_length() + 1):
        if latent_size(H, W, 2**k) == (h, w):
            return k
    raise UsageError(
        f"conv generator: latent size {h}x{w} is not data size {H}x{W} divided by a power of "
        "two f (rounded up, ceil(H/f) x ceil(W/f))"
    )


def conv_level_width(width: int, level: int) -> int:
    """Channels of the conv generator at ``level`` upsamplings from the latent: ``width`` halved
    per level, as image decoders do (Rombach et al. 2022's KL-f8 decoder), so that each level
    costs about the same (4x the pixels, 1/4 the channel pairs), but never below min(width, 4).
    Non-decreasing in ``width``, so G_c ⊂ G_c' still holds level by level."""
    return max(math.ceil(width / 2**level), min(width, 4))


def conv_generator(
    latent_shape: tuple[int, ...], data_shape: tuple[int, ...], width: int, depth: int = 1
) -> nn.Sequential:
    """A conv decoder: 3x3 conv to ``width`` channels, k times (nearest 2x upsample, ``depth``
    3x3 convs + ReLU at ``conv_level_width(width, level)`` channels), then a 3x3 conv to the
    image channels; plus the linear skip upsample(1x1 conv(z)); the sum is cropped to the data
    size when 2^k does not divide it."""
    if width < 1 or depth < 1:
        raise UsageError(f"conv generator needs width >= 1 and depth >= 1 (got {width}, {depth})")
    k = upsampling_factor(latent_shape, data_shape)
    c_in, c_out = latent_shape[0], data_shape[0]
    layers: list[nn.Module] = [nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU()]
    channels = width
    for level in range(1, k + 1):
        layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        out = conv_level_width(width, level)
        for _ in range(depth):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
            channels = out
    if k == 0:
        for _ in range(depth - 1):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    layers.append(nn.Conv2d(channels, c_out, 3, padding=1, bias=False))
    skip: list[nn.Module] = [nn.Conv2d(c_in, c_out, 1)]
    if k:
        skip.append(nn.Upsample(scale_factor=2**k, mode="nearest"))
    body = SumOfPaths(nn.Sequential(*skip), nn.Sequential(*layers))
    h, w = latent_shape[1] * 2**k, latent_shape[2] * 2**k
    if (h, w) == tuple(data_shape[1:]):
        return nn.Sequential(body)
    return nn.Sequential(body, Crop(tuple(data_shape[1:])))


def make_generator(
    family: str,
    latent_shape: tuple[int, ...],
    data_shape: tuple[int, ...],
    capacity: int | None = None,
    depth: int = 2,
) -> nn.Sequential:
    """Build one generator of ``family`` (``linear``, ``mlp`` or ``conv``) at ``capacity``."""
    if family == "linear":
        return linear_generator(latent_shape, data_shape)
    if capacity is None:
        raise UsageError(f"--generator {family} needs a capacity")
    if family == "mlp":
        return mlp_generator(latent_shape, data_shape, capacity, depth)
    if family == "conv":
        return conv_generator(latent_shape, data_shape, capacity, depth)
    raise UsageError(f"--generator {family}: expected one of {', '.join(FAMILIES)}")


def count_params(*modules: nn.Module | None) -> int:
    """Number of scalars in the modules' parameters and learned buffers (an EMA codebook);
    None entries count 0."""
    total = 0
    for m in modules:
        if m is None:
            continue
        total += sum(p.numel() for p in m.parameters())
        total += sum(b.numel() for name, b in m.named_buffers() if name.endswith("codebook"))
    return total


@torch.no_grad()
def embed_generator(small: nn.Module, big: nn.Module) -> nn.Module:
    """Make ``big`` (same family and depth, capacity >= small's) compute ``small``'s function.

    Each of ``small``'s parameters is copied into the leading block of ``big``'s; of the new
    entries, those through which new units would reach old units or the output
    (``W[:out_small, in_small:]``) are zeroed and the rest keep ``big``'s initialisation, so the
    new units start alive and can still learn. This is the nesting G_c ⊂ G_c' made concrete: a
    fit at c' can start from the fit at c. Returns ``big``.
    """
    for p_small, p_big in zip(small.parameters(), big.parameters(), strict=True):
        if p_small.dim() != p_big.dim() or any(
            a > b for a, b in zip(p_small.shape, p_big.shape, strict=True)
        ):
            raise ValueError("embed_generator: big must be a wider generator of the same family")
        p_big[tuple(slice(0, n) for n in p_small.shape)] = p_small
        if p_small.dim() >= 2:
            p_big[: p_small.shape[0], p_small.shape[1] :] = 0
    return big


@torch.no_grad()
def embed_linear(linear: nn.Module, mlp: nn.Module) -> nn.Module:
    """Start the MLP generator ``mlp`` from the linear generator ``linear``'s map.

    The skip path of rank <= c takes the map's rank-c truncation (Eckart-Young: the best rank-c
    approximation, from the SVD W = U S V^T: A = S_c^(1/2) V_c^T, B = U_c S_c^(1/2)), exact when
    c reaches the map's rank; A's further rows keep their initialisation and B's columns for
    them are zero. The body's output layer is zeroed (its hidden units keep their
    initialisation, so they start alive). Returns ``mlp``.
    """
    weight, bias = linear[1].weight, linear[1].bias
    (a, b), body = mlp[1].paths[0], mlp[1].paths[1]
    u, sv, vh = torch.linalg.svd(weight, full_matrices=False)
    r = min(a.out_features, len(sv))
    root = sv[:r].sqrt()
    a.weight[:r] = root[:, None] * vh[:r]
    b.weight.zero_()
    b.weight[:, :r] = u[:, :r] * root
    b.bias.copy_(bias)
    body[-1].weight.zero_()
    return mlp
