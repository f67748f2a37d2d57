"""The Frechet distance between Gaussian fits (FID form): the core of the ``fd`` metric and of
the generation metrics (docs/metrics.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from latentdist.discrepancy.validate import as_rows
from latentdist.errors import UsageError

__all__ = ["frechet_distance", "frechet_distance_gaussians"]


def frechet_distance_gaussians(
    mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """Frechet (= W2^2) distance between N(mu_a, cov_a) and N(mu_b, cov_b) (Dowson & Landau 1982).

    FD = |mu_a - mu_b|^2 + Tr(cov_a + cov_b - 2 (cov_a cov_b)^{1/2}). The trace of the square
    root is taken from the eigenvalues of the symmetric PSD matrix cov_a^{1/2} cov_b cov_a^{1/2},
    which has the same square-root trace as cov_a cov_b and, unlike ``scipy.linalg.sqrtm`` of the
    non-symmetric product, stays exact and real when the covariances are singular (few samples).
    """
    mu_a, mu_b = np.atleast_1d(mu_a).astype(np.float64), np.atleast_1d(mu_b).astype(np.float64)
    cov_a, cov_b = np.atleast_2d(cov_a).astype(np.float64), np.atleast_2d(cov_b).astype(np.float64)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    product = root_a @ cov_b @ root_a
    tr_covmean = float(
        np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    )
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)


def frechet_distance(feat_a: Any, feat_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID; Heusel et al. 2017).

    FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) with sample means mu and unbiased
    (ddof = 1) covariances S of ``feat_a`` (n, F) and ``feat_b`` (m, F); squared feature units.
    """
    a, b = as_rows(feat_a, "feat_a").numpy(), as_rows(feat_b, "feat_b").numpy()
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"frechet_distance: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    if len(a) < 2 or len(b) < 2:
        raise UsageError("frechet_distance: each feature set needs at least 2 samples")
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return frechet_distance_gaussians(a.mean(0), cov_a, b.mean(0), cov_b)
