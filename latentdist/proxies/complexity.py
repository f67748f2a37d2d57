"""Norm-based capacity of a generator (Bartlett, Foster & Telgarsky 2017) and the proxy bundle."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from latentdist.errors import UsageError
from latentdist.generators.modules import SumOfPaths, count_params
from latentdist.proxies.lipschitz import (
    as_latents,
    eval_mode,
    jacobian_fro,
    leaf_lipschitz,
    lipschitz_lower,
    lipschitz_upper,
)

# One factor of a path: ("A", ||A||_sigma, ||A^T||_{2,1}) for a parameterised linear layer, or
# ("rho", Lip) for a parameter-free map (activation, upsampling, reshape).
_Item = tuple


def linear_21_norm(layer: nn.Linear) -> float:
    """||A^T||_{2,1} = sum over output units of the l2 norm of their weight row."""
    return float(layer.weight.detach().double().norm(dim=1).sum())


def conv_21_norm(conv: nn.Conv2d, input_shape: tuple[int, ...]) -> float:
    """||A^T||_{2,1} of the dense matrix A of a zero-padded Conv2d at ``input_shape``, exactly.

    Row (o, i, j) of A holds the kernel taps W[o, c, a, b] that land inside the input, so its
    squared norm is the conv of an all-ones input with the squared kernel (zero padding drops the
    taps that fall outside). Sum of the square roots over all output units.
    """
    if conv.padding_mode != "zeros":
        raise UsageError(
            f"spectral complexity: Conv2d padding_mode {conv.padding_mode!r} is not supported (zeros only)"
        )
    w2 = conv.weight.detach().double().pow(2)
    ones = torch.ones((1, *input_shape), dtype=torch.float64, device=w2.device)
    with torch.no_grad():
        row_sq = conv._conv_forward(ones, w2, None)
    return float(row_sq.clamp_min(0).sqrt().sum())


def _paths(
    module: nn.Module, shape: tuple[int, ...], cache: dict
) -> tuple[list[list[_Item]], tuple[int, ...]]:
    """Every input-to-output path through the Sequential / SumOfPaths tree, as lists of factors."""
    if isinstance(module, nn.Sequential):
        paths: list[list[_Item]] = [[]]
        for child in module:
            sub, shape = _paths(child, shape, cache)
            paths = [p + q for p in paths for q in sub]
        return paths, shape
    if isinstance(module, SumOfPaths):
        out: list[list[_Item]] = []
        out_shape = shape
        for branch in module.paths:
            sub, out_shape = _paths(branch, shape, cache)
            out += sub
        return out, out_shape
    lip, out_shape = leaf_lipschitz(module, shape, cache)
    if isinstance(module, nn.Linear):
        return [[("A", lip, linear_21_norm(module))]], out_shape
    if isinstance(module, nn.Conv2d):
        return [[("A", lip, conv_21_norm(module, shape))]], out_shape
    return [[("rho", lip)]], out_shape


def path_spectral_complexity(items: list[_Item]) -> float:
    """R = (prod_j rho_j)(prod_i ||A_i||_sigma) (sum_i (||A_i^T||_{2,1} / ||A_i||_sigma)^{2/3})^{3/2}."""
    rho = math.prod(it[1] for it in items if it[0] == "rho")
    layers = [(it[1], it[2]) for it in items if it[0] == "A"]
    if not layers or any(s == 0.0 for s, _ in layers):
        return 0.0  # a parameter-free path, or one that is identically constant
    spec = math.prod(s for s, _ in layers)
    ratio = sum((n21 / s) ** (2.0 / 3.0) for s, n21 in layers)
    return rho * spec * ratio**1.5


def spectral_complexity(
    g: nn.Module, input_shape: tuple[int, ...] | list[int], *, _cache: dict | None = None
) -> float:
    """Spectral complexity of Bartlett, Foster & Telgarsky (2017), "Spectrally-normalized margin
    bounds for neural networks", with reference matrices M_i = 0:

        R = (prod_i rho_i ||A_i||_sigma) * (sum_i ||A_i^T||_{2,1}^{2/3} / ||A_i||_sigma^{2/3})^{3/2},

    ||A||_sigma the spectral norm, ||A^T||_{2,1} the sum of the l2 norms of A's rows (one per output
    unit). How our generators enter it:

    * Skip paths: the formula is for a chain. A SumOfPaths is expanded into its input-to-output
      paths (a Sequential around sums gives the product of choices) and R is the **sum of the
      per-path R** -- a covering of f + h follows from covers of f and h, so summing is the
      natural, monotone extension. A path without parameterised layers contributes 0.
    * Convolutions enter as the linear maps they are at the actual input shape: ||A||_sigma is the
      conv operator norm (as in ``lipschitz_upper``) and ||A^T||_{2,1} is computed exactly from the
      dense matrix's rows (``conv_21_norm``), not from the kernel alone.
    * Parameter-free maps between layers (ReLU, nearest Upsample by s, reshapes) are part of the
      nonlinearity sigma_i: rho is their Lipschitz constant (1 for ReLU, s for s x s upsampling).
    * Biases are ignored, as in Bartlett et al., whose networks have none.
    """
    with eval_mode(g):
        paths, _ = _paths(g, tuple(int(s) for s in input_shape), {} if _cache is None else _cache)
    return float(sum(path_spectral_complexity(p) for p in paths))


# The Jacobian figures run on chunks of points of at most this many output entries (points x
# output size), but at least 64 points: all 256 points of an MNIST generator at once (twice as
# fast as chunks of 64 on 2 CPU cores), 64 of a 256x256 RGB one. A larger chunk runs each point's
# power iteration at least as long (its chunk stops when all its points have converged), so
# lipschitz_lower can only tighten.
JACOBIAN_CHUNK_ENTRIES = 2**22


def generator_proxies(
    g: nn.Module,
    z: torch.Tensor | np.ndarray,
    input_shape: tuple[int, ...] | list[int] | None = None,
    *,
    fast: bool = False,
    n_max: int = 256,
    n_iter: int = 30,
    n_probes: int = 8,
    seed: int = 0,
) -> dict:
    """Complexity proxies of a fitted generator g on held-out latents z (SPEC section 2).

    Returns {'lipschitz_lower', 'lipschitz_upper', 'jacobian_fro', 'spectral_complexity',
    'params', 'n_points'}. z is subsampled without replacement to at most ``n_max`` points
    (seeded), and ``n_points`` says how many were used. The structural figures (``lipschitz_upper``,
    ``spectral_complexity``, ``params``) do not look at z; ``fast=True`` computes only those and
    sets the two Jacobian-based figures (``lipschitz_lower``, ``jacobian_fro``, which cost
    n_points x (2 n_iter + n_probes) forward-mode / reverse-mode passes) to None with
    ``n_points`` = 0. Conv operator norms are computed once and shared by the two structural figures.
    """
    z = as_latents(g, z)
    shape = tuple(int(s) for s in (input_shape if input_shape is not None else z.shape[1:]))
    if tuple(z.shape[1:]) != shape:
        raise UsageError(
            f"latents have per-sample shape {list(z.shape[1:])}, generator expects {list(shape)}"
        )
    cache: dict = {}
    out = {
        "lipschitz_lower": None,
        "lipschitz_upper": lipschitz_upper(g, shape, _cache=cache),
        "jacobian_fro": None,
        "spectral_complexity": spectral_complexity(g, shape, _cache=cache),
        "params": count_params(g),
        "n_points": 0,
    }
    if fast:
        return out
    if z.shape[0] > n_max:
        idx = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))[:n_max]
        z = z[idx.to(z.device)]
    with eval_mode(g), torch.no_grad():
        out_size = g(z[:1]).numel()
    chunk = max(64, JACOBIAN_CHUNK_ENTRIES // out_size)
    out["lipschitz_lower"] = lipschitz_lower(g, z, n_iter=n_iter, seed=seed, chunk_size=chunk)
    out["jacobian_fro"] = jacobian_fro(g, z, n_probes=n_probes, seed=seed, chunk_size=chunk)
    out["n_points"] = int(z.shape[0])
    return out
