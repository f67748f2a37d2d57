"""Distances, kernels and bandwidths: the pieces the MMD-type metrics, ``Judge`` and the MMD fit
share, so that all of them use one kernel.

Everything works on float64 CPU row blocks (``validate.as_rows``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from latentdist.discrepancy.validate import Array, as_row_pair, as_rows
from latentdist.errors import UsageError

__all__ = [
    "MMD_SCALES",
    "Kernel",
    "gaussian_gammas",
    "gaussian_kernel",
    "kernel_sum",
    "median_bandwidth",
    "polynomial_kernel",
    "sq_dists",
    "unbiased_mmd2",
]

Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_MEDIAN_MAX_POINTS = 2000  # pooled points used by the median heuristic (fixed-seed subsample)
# Bandwidth multipliers of the default MMD kernel: one Gaussian at the median distance loses its
# power as the dimension grows (Ramdas et al. 2015); a sum over scales around it keeps some
# (benchmarks/results/validity.md measures it on MNIST).
MMD_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


def sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances in float64 (matmul expansion, clamped at 0).

    The expansion |x|^2 + |y|^2 - 2<x, y> is ~10x faster than the direct difference at D = 784
    and, in float64, accurate to ~1e-13 relative to the squared norms.
    """
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return d2.clamp_min_(0.0)


def median_bandwidth(x: Array, y: Array | None = None) -> float:
    """Median heuristic (Gretton et al. 2012): median Euclidean distance over distinct pairs.

    Pairs are taken within the pooled sample (x, y), or within ``x`` alone when ``y`` is None
    (a kernel fixed by a reference sample). Above 2000 points a fixed-seed subsample of 2000 is
    used (the median is stable and the full pair matrix would not fit).
    """
    pooled = as_rows(x, "discrepancy: sample x") if y is None else torch.cat(as_row_pair(x, y))
    if len(pooled) > _MEDIAN_MAX_POINTS:
        idx = np.random.default_rng(0).choice(len(pooled), _MEDIAN_MAX_POINTS, replace=False)
        pooled = pooled[torch.as_tensor(idx)]
    iu = torch.triu_indices(len(pooled), len(pooled), offset=1)
    d = sq_dists(pooled, pooled)[iu[0], iu[1]].sqrt()
    # mean of the two middle values for an even count (NumPy's median convention)
    med = float(np.median(d.numpy()))
    return med if med > 0 else 1.0


def gaussian_gammas(sigma: float, scales: tuple[float, ...]) -> tuple[float, ...]:
    """gamma_s = 1 / (2 (a_s sigma)^2) for each scale a_s: exp(-gamma_s d^2) is a Gaussian of
    width a_s sigma."""
    return tuple(1.0 / (2.0 * (s * sigma) ** 2) for s in scales)


def gaussian_kernel(gammas: tuple[float, ...]) -> Kernel:
    """k(u, v) = mean_s exp(-gamma_s |u - v|^2) as a function of two row blocks."""

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = sq_dists(a, b)
        return sum(torch.exp(-g * d2) for g in gammas) / len(gammas)

    return k


def polynomial_kernel(dim: int) -> Kernel:
    """k(u, v) = (<u, v> / dim + 1)^3, the KID kernel."""
    return lambda a, b: (a @ b.T / dim + 1.0) ** 3


def kernel_sum(kernel: Kernel, x: torch.Tensor, y: torch.Tensor, *, exclude_diag: bool) -> float:
    """sum_ij k(x_i, y_j), in row blocks to bound memory."""
    total = 0.0
    block = max(1, 2**24 // max(1, len(y)))
    for start in range(0, len(x), block):
        k = kernel(x[start : start + block], y)
        if exclude_diag:
            k.diagonal(offset=start).zero_()
        total += float(k.sum())
    return total


def unbiased_mmd2(kernel: Kernel, x: torch.Tensor, y: torch.Tensor, what: str) -> float:
    """Unbiased MMD^2 (Gretton et al., JMLR 2012, eq. 3) for the kernel ``kernel``."""
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise UsageError(f"{what}: each sample needs at least 2 points for the unbiased estimate")
    kxx = kernel_sum(kernel, x, x, exclude_diag=True) / (n * (n - 1))
    kyy = kernel_sum(kernel, y, y, exclude_diag=True) / (m * (m - 1))
    kxy = kernel_sum(kernel, x, y, exclude_diag=False) / (n * m)
    return kxx + kyy - 2.0 * kxy
