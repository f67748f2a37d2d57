"""Summaries over seeds: mean and a 95 % Student-t confidence interval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_ci(values: Sequence[float], level: float = 0.95, sampled_fraction: float = 0.0) -> dict:
    """``{"mean", "ci": [lo, hi], "per_seed"}``; the interval is
    mean ± t_{(1+level)/2, n-1} · s · √(1/n + f/(1-f)), with s the spread over the n seeds.

    ``sampled_fraction`` f: each value was computed on a random subsample holding a fraction f
    of one fixed, finite data set (the seeds re-split the same rows). The spread over such
    re-splits is only the subsampling noise; it misses the data set's own sampling variability,
    so with f = 0 the interval would cover the quantity for *this* data set, not the population.
    The delete-d jackknife (Shao & Wu 1989, Ann. Statist. 17; Shao & Tu 1995, §2.3) estimates the
    variance of the statistic on the whole data set as f/(1-f) times the variance over
    subsamples; the interval adds it to the seeds' own s²/n. Exact for means (s² = σ²(1/m - 1/N));
    conservative for degenerate U-statistics (MMD² at distance 0, whose variance falls as 1/m²).
    With one seed there is no spread to estimate and ``ci`` is null.
    """
    if not 0.0 <= sampled_fraction < 1.0:
        raise ValueError(f"sampled_fraction {sampled_fraction}: expected 0 <= f < 1")
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if len(v) < 2:
        ci = None
    else:
        half = float(half_width(v, level, sampled_fraction))
        ci = [mean - half, mean + half]
    return {"mean": mean, "ci": ci, "per_seed": [float(x) for x in v]}


def half_width(values: np.ndarray, level: float = 0.95, sampled_fraction: float = 0.0):
    """``mean_ci``'s half-width over the last axis of ``values`` (n >= 2 seeds):
    t_{(1+level)/2, n-1} · s · √(1/n + f/(1-f))."""
    n = values.shape[-1]
    f = sampled_fraction
    se = values.std(-1, ddof=1) * np.sqrt(1.0 / n + f / (1.0 - f))
    return stats.t.ppf((1 + level) / 2, n - 1) * se


def bootstrap_draws(n_seeds: int, replicates: int, seed: int) -> np.ndarray:
    """(replicates, n_seeds) indices drawn with replacement: a percentile bootstrap's resamples
    (over seeds, of the critical and saturation capacities; over latents, in the benchmarks)."""
    return np.random.default_rng(seed).integers(0, n_seeds, (replicates, n_seeds))
