"""Where the curve c -> D_c stops falling, and how far the default sweep goes to find it.

On latents that lose information (an autoencoder's), D_c falls with capacity and then levels
off *above* the floor: the paired excess D_c - floor stays positive on every seed up to c = 256
on MNIST-5k autoencoder latents (benchmarks/results/capacity.md), so the critical capacity
C_eps = min{c : D_c <= eps} at the floor's own eps does not exist. What a larger generator can
still buy is then read off the curve itself:

    saturation capacity  c_s = the smallest capacity in the sweep from which no larger one
                              lowers D measurably,

with "measurably" judged against the sweep's largest capacity c_K, seed by seed (the seeds
share their held-out rows, so D_c - D_{c_K} is paired): c_s is the capacity after the last one
whose paired interval of D_c - D_{c_K} lies above 0 (``stats.mean_ci``, widened for the rows each
seed evaluates). It counts only when a larger capacity confirms it (c_s < c_K): two consecutive
capacities of the sweep on the plateau. A capacity noisy at the small end (a failed seed) cannot
fake it, since every capacity above the last clearly-higher one must sit on the plateau too.
The residual ``excess`` D_{c_s} - floor, again per seed, says how far from the data the
latent's generators stay. Like every test-based quantity c_s grows with the evidence (more
seeds or rows resolve smaller gains); the report states the n_eval and seeds it was read at.

``next_capacity`` is the default sweep's extension rule: double the largest capacity until the
curve has flattened (c_s exists) or two consecutive capacities reach eps, up to a limit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from latentdist.stats import bootstrap_draws, half_width, mean_ci

_LEVEL = 0.95

SATURATION_MEANING = (
    "the smallest capacity from which no larger capacity of the sweep lowers the distance "
    "measurably: the capacity after the last whose paired (per seed) interval of D_c - D at the "
    "largest capacity lies above 0; counted only when a larger capacity confirms it"
)


def _half_width(values: np.ndarray, sampled: float) -> np.ndarray:
    """``values``: (K, n) per-seed distances; (K,) the paired 95 % half-width of D_k - D_{K-1}
    over the n seeds (``stats.mean_ci``'s, widened for the rows each seed evaluates)."""
    return half_width(values - values[-1:], _LEVEL, sampled)


def _saturation_index(means: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Per column of ``means`` (K, ...): the index of the saturation capacity, or K when the
    sweep does not confirm one (the largest capacity is the first on the plateau). A capacity
    lies above the plateau when its mean exceeds the largest capacity's by more than ``half``
    (K,), its paired half-width."""
    above = (means - means[-1:]) > half.reshape((-1,) + (1,) * (means.ndim - 1))
    k = above.shape[0]
    last_above = np.where(above.any(0), k - 1 - np.argmax(above[::-1], axis=0), -1)
    first = last_above + 1
    return np.where(first <= k - 2, first, k)


def _per_seed(curve: list[dict]) -> np.ndarray:
    return np.array([e["distance"]["per_seed"] for e in curve], dtype=float)


def saturation_indices(curve: list[dict], sampled: float, draws: np.ndarray) -> np.ndarray:
    """Per bootstrap draw (rows of seed indices), the index of the saturation capacity in
    ``curve`` (len(curve): not confirmed within the sweep). Each draw resamples the means;
    what counts as a measurable gain stays the half-width from all seeds, as the critical
    capacity's bootstrap holds epsilon fixed (a draw repeating one seed has no spread)."""
    values = _per_seed(curve)
    return _saturation_index(values[:, draws].mean(-1), _half_width(values, sampled))


def saturation(
    curve: list[dict], floor: dict, sampled: float, replicates: int, seed: int
) -> dict[str, Any]:
    """The saturation capacity of ``curve`` with its 95 % percentile bootstrap interval over
    seeds, the distance there and its paired excess over the floor (``SATURATION_MEANING``)."""
    caps = [e["capacity"] for e in curve]
    values = _per_seed(curve)
    n = values.shape[1]
    out: dict[str, Any] = {"meaning": SATURATION_MEANING, "capacity": None}
    if n < 2 or len(caps) < 2:
        out.update(interval=None, why="needs two seeds and two capacities")
        return out
    s = int(_saturation_index(values.mean(-1), _half_width(values, sampled)))
    if s < len(caps):
        out.update(
            capacity=caps[s],
            distance=curve[s]["distance"],
            excess=mean_ci(
                (values[s] - np.asarray(floor["per_seed"])).tolist(), sampled_fraction=sampled
            ),
        )
    idx = saturation_indices(curve, sampled, bootstrap_draws(n, replicates, seed))
    lo, hi = (int(np.quantile(idx, q, method="inverted_cdf")) for q in (0.025, 0.975))
    labels = [str(c) for c in caps] + ["none"]
    counts = np.bincount(idx, minlength=len(caps) + 1) / replicates
    out.update(
        interval=[caps[lo] if lo < len(caps) else None, caps[hi] if hi < len(caps) else None],
        share={labels[k]: round(float(v), 4) for k, v in enumerate(counts) if v > 0},
        method=f"percentile bootstrap over seeds, {replicates} replicates, each capacity's "
        "paired half-width held fixed; null: not confirmed within the sweep",
    )
    return out


def next_capacity(
    curve: list[dict], epsilon: float, sampled: float, limit: int
) -> tuple[int | None, str]:
    """The extension rule of the default sweep: (the next capacity to measure, or None, and
    why the sweep stops or goes on). Doubling continues until the curve has flattened
    (a confirmed saturation capacity) or two consecutive capacities reach ``epsilon``, and
    stops at ``limit``."""
    caps = [e["capacity"] for e in curve]
    last = caps[-1]
    values = _per_seed(curve)
    if not limit or last is None:
        return None, "no extension"
    if values.shape[1] < 2:
        return None, "one seed: no interval to judge the curve by, so no extension"
    if len(caps) >= 2 and all(e["distance"]["mean"] <= epsilon for e in curve[-2:]):
        return None, f"two consecutive capacities ({caps[-2]}, {last}) reach epsilon"
    flat = _saturation_index(values.mean(-1), _half_width(values, sampled))
    if len(caps) >= 2 and flat < len(caps):
        return None, "the curve has flattened"
    if last >= limit:
        return None, f"the limit {limit} is reached"
    return min(2 * last, limit), f"the curve still falls at {last}"
