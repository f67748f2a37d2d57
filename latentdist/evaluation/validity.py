"""The validity checks of issue 10 as reusable pieces: does a discrepancy, and a fit, measure what
it claims? Used by ``benchmarks/bench_validity.py`` (full tables) and ``tests/test_validity.py``.

* Degradation ladder (V2): sets built from real rows that are worse in known ways (blur, k-means
  centroids, the mean image, dropped classes) must score above the floor (fresh real rows)
  beyond both 95 % intervals, in the right order within each family. Empirical W2 at n ~ 10^3
  in 784 dimensions fails this: samples concentrated near the bulk beat fresh data (Stanczuk et
  al. 2021, arXiv 2103.01678; Weed & Bach 2019, arXiv 1707.00087).
* Planted latent (V3): x = h(z*) + noise with h a fixed random ReLU MLP; the planted latent at a
  capacity containing h must reach the floor, its truncations must not.
* Nested latents (V4): PCA-k latents are nested, so D_c(PCA-2) >= D_c(PCA-8) >= D_c(PCA-32).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from scipy.stats import norm
from sklearn.cluster import KMeans

from latentdist.data.source import DataSource
from latentdist.evaluation.distance import sample_distances
from latentdist.stats import mean_ci

__all__ = [
    "DEGRADATIONS",
    "ORDERS",
    "above_floor",
    "common_curve",
    "paired_above",
    "degrade",
    "ladder_distances",
    "ladder_verdict",
    "nested_verdict",
    "planted_latent",
    "planted_verdict",
]

DEGRADATIONS = ("blur1", "blur2", "kmeans100", "kmeans10", "mean image", "5 classes", "1 class")
#: families whose members must score in this order (increasing damage)
ORDERS = (("blur1", "blur2"), ("kmeans100", "kmeans10", "mean image"), ("5 classes", "1 class"))


def above_floor(d: Mapping, f: Mapping) -> bool:
    """True when summary ``d`` lies above summary ``f`` beyond both 95 % intervals."""
    return bool(d["ci"] and f["ci"] and d["ci"][0] > f["ci"][1])


def paired_above(d: Mapping, f: Mapping, sampled: float) -> bool:
    """True when summary ``d`` lies above ``f`` seed by seed: both were scored on the same
    held-out rows, seeds and judges, and the 95 % interval of their per-seed differences
    (``mean_ci``, widened for the fraction ``sampled`` of the rows each seed evaluates) lies
    above 0. More powerful than ``above_floor`` where the reference sample's noise, shared by
    both, dominates each interval."""
    diff = mean_ci(np.subtract(d["per_seed"], f["per_seed"]).tolist(), sampled_fraction=sampled)
    return bool(diff["ci"] and diff["ci"][0] > 0)


def _sampled(report: Mapping) -> float:
    return report["n_eval"] / report["data"]["rows"]


def degrade(src: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The degraded sets, each built from the image rows ``src`` (N, C, H, W) alone, N rows each.

    blur1 / blur2: Gaussian blur of sigma 1 / 2 px (``scipy.ndimage.gaussian_filter``);
    kmeans100 / kmeans10: each row replaced by its centroid (``sklearn.cluster.KMeans`` fitted
    on these rows, one initialisation, ``seed``); mean image: every row the mean of ``src``;
    5 classes / 1 class: rows of classes 0-4 / class 0 drawn with replacement (``src`` holds
    about N/2 and N/10 of them).
    """
    n = len(src)
    flat = src.reshape(n, -1)
    rng = np.random.default_rng(seed)
    out = {
        "blur1": gaussian_filter(src, sigma=(0, 0, 1, 1)),
        "blur2": gaussian_filter(src, sigma=(0, 0, 2, 2)),
    }
    for k in (100, 10):
        km = KMeans(n_clusters=min(k, n), n_init=1, random_state=seed).fit(flat)
        out[f"kmeans{k}"] = km.cluster_centers_[km.labels_].reshape(src.shape)
    out["mean image"] = np.broadcast_to(src.mean(0), src.shape).copy()
    out["5 classes"] = src[rng.choice(np.flatnonzero(labels < 5), n)]
    out["1 class"] = src[rng.choice(np.flatnonzero(labels == 0), n)]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def ladder_distances(
    source: DataSource,
    metrics: Mapping[str, Mapping[str, Any]],
    *,
    rows: int | None = None,
    n_eval: int = 1000,
    seeds: int = 5,
    ref_fraction: float = 0.6,
) -> tuple[dict[str, dict[str, dict]], dict[str, dict]]:
    """The degradation ladder: per metric label, {set: mean_ci of the distance}, and the floor.

    ``metrics``: label -> keywords of ``sample_distances`` (``metric``, ``metric_kwargs``,
    ``features``, ``feature_steps``). For every seed the rows (the first ``rows`` of a
    permutation) are split: ``ref_fraction`` form the reference (n_eval evaluation rows, n_eval
    floor rows, the rest for learned features or the critic), the others the pool that every
    degraded set is built from (``degrade``); all sets are scored on the same reference split.
    Needs ``source.labels``.
    """
    everything = source.take().numpy()
    labels = np.asarray(source.labels)
    rows = rows or len(everything)
    values: dict[str, dict[str, list[float]]] = {k: {} for k in metrics}
    floors: dict[str, list[float]] = {k: [] for k in metrics}
    for s in range(seeds):
        perm = np.random.default_rng(1000 + s).permutation(len(everything))[:rows]
        n_ref = int(ref_fraction * rows)
        ref = DataSource(
            f"{source.name}[reference rows]",
            everything[perm[:n_ref]],
            kind="images",
            labels=labels[perm[:n_ref]],
        )
        sets = degrade(everything[perm[n_ref:]], labels[perm[n_ref:]], s)
        for label, settings in metrics.items():
            res = sample_distances(sets, ref, n_eval=n_eval, seeds=1, seed=s, **settings)
            for name, r in res.items():
                values[label].setdefault(name, []).append(r.report["distance"]["mean"])
            floors[label].append(next(iter(res.values())).report["floor"]["mean"])
    dist = {k: {name: mean_ci(v) for name, v in d.items()} for k, d in values.items()}
    return dist, {k: mean_ci(v) for k, v in floors.items()}


def ladder_verdict(dist: Mapping[str, Mapping], floor: Mapping) -> tuple[int, list[str]]:
    """(how many of ``DEGRADATIONS`` lie above the floor beyond both intervals, the families
    of ``ORDERS`` whose means are not strictly increasing)."""
    passes = sum(above_floor(dist[k], floor) for k in DEGRADATIONS)
    bad = [
        " < ".join(chain)
        for chain in ORDERS
        if not all(
            dist[a]["mean"] < dist[b]["mean"] for a, b in zip(chain, chain[1:], strict=False)
        )
    ]
    return passes, bad


class _Coupling(torch.nn.Module):
    """One affine coupling of ``CouplingWarp``: z_b <- z_b * exp(s(z_a)) + t(z_a), or its inverse."""

    def __init__(self, d: int, first_half: bool, g: torch.Generator, strength: float, hidden: int):
        super().__init__()
        half = d // 2
        self.a0, self.a1, self.b0, self.b1 = (
            (0, half, half, d) if first_half else (half, d, 0, half)
        )
        self.strength = strength
        da, db = self.a1 - self.a0, self.b1 - self.b0
        self.register_buffer("w1", torch.randn(da, hidden, generator=g) / da**0.5)
        self.register_buffer("ws", torch.randn(hidden, db, generator=g) / hidden**0.5)
        self.register_buffer("wt", torch.randn(hidden, db, generator=g) / hidden**0.5)

    def forward(self, z: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        za, zb = z[:, self.a0 : self.a1], z[:, self.b0 : self.b1]
        h = torch.tanh(za @ self.w1 * 2.0)
        s = 0.5 * self.strength * torch.tanh(h @ self.ws)
        t = self.strength * (h @ self.wt)
        zb = (zb - t) * torch.exp(-s) if reverse else zb * torch.exp(s) + t
        out = z.clone()
        out[:, self.b0 : self.b1] = zb
        return out


class CouplingWarp(torch.nn.Module):
    """A fixed invertible nonlinear map of (n, d) vectors: ``forward`` warps, ``inverse`` undoes
    it exactly (up to float rounding). Scriptable (``torch.jit.script``), so a warped latent can
    be given to ``compare`` as a TorchScript encoder and decoder pair.

    Affine couplings (Dinh et al., ICLR 2017, RealNVP): for layers l = 1..``layers``, with the
    coordinates split in halves (z_a, z_b) that alternate, z_b <- z_b * exp(s(z_a)) + t(z_a),
    s = strength/2 * tanh(h W_s), t = strength * h W_t, h = tanh(2 z_a W_1), with fixed Gaussian
    weights under ``seed``. Each layer is invertible (z_b = (z_b' - t(z_a)) exp(-s(z_a))).
    """

    def __init__(
        self, d: int, seed: int = 0, layers: int = 4, strength: float = 2.0, hidden: int = 32
    ):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = torch.nn.ModuleList(
            [_Coupling(d, layer % 2 == 0, g, strength, hidden) for layer in range(layers)]
        )
        self.reversed = torch.nn.ModuleList(list(self.layers)[::-1])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            z = layer(z)
        return z

    @torch.jit.export
    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in self.reversed:
            y = layer(y, True)
        return y


def coupling_warp(
    z: np.ndarray, seed: int = 0, layers: int = 4, strength: float = 2.0, hidden: int = 32
) -> np.ndarray:
    """``z`` (n, d) through a fixed invertible nonlinear map (``CouplingWarp``), standardised per
    coordinate: the same information as ``z`` in coordinates a small generator serves worse.
    ``strength`` sets how nonlinear the map is.
    """
    z = torch.as_tensor(np.asarray(z, dtype=np.float32))
    with torch.no_grad():
        warped = CouplingWarp(z.shape[1], seed, layers, strength, hidden)(z).numpy()
    return ((warped - warped.mean(0)) / warped.std(0)).astype(np.float32)


def planted_latent(
    n: int = 5000, seed: int = 7, noise: float = 0.05, hidden: int = 32, dim: int = 784
) -> dict[str, np.ndarray]:
    """Data with a known latent: x = a h(z*) + b + noise * N(0, I), z* ~ N(0, I_8).

    h: a fixed random ReLU MLP 8 -> ``hidden`` -> ``dim`` (PyTorch's default initialisation
    under ``seed``); a, b: the affine map that gives h's outputs mean -0.5 and standard
    deviation 0.4 (image-like values, and an affine map keeps h in every MLP class that contains
    it). Returns ``x`` and the latents: z*, its first 4 and first 2 coordinates, and
    2 Phi(z*) - 1 (coordinate-wise uniform on [-1, 1]: the same information, not Gaussian).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        h = torch.nn.Sequential(
            torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, dim)
        )
    z = torch.randn(n, 8, generator=g)
    with torch.no_grad():
        o = h(z)
    x = (o - o.mean()) / o.std() * 0.4 - 0.5 + noise * torch.randn(o.shape, generator=g)
    zs = z.numpy()
    return {
        "x": x.numpy().astype(np.float32),
        "z* (8-d)": zs,
        "first 4": zs[:, :4].copy(),
        "first 2": zs[:, :2].copy(),
        "2 Phi(z*) - 1 (uniform, 8-d)": (2 * norm.cdf(zs) - 1).astype(np.float32),
    }


def planted_verdict(
    reports: Mapping[str, Mapping], min_capacity: int = 32
) -> tuple[bool, list[str]]:
    """Issue 10 §2 on ``measure`` reports keyed as ``planted_latent``'s latents.

    At every capacity >= ``min_capacity`` (those containing h) the planted latent's mean must be
    <= max(the floor's upper limit, 10 % of the first-4 latent's mean); at every capacity the
    first-4 and first-2 latents must lie above the floor, seed by seed (``paired_above``).
    """
    floor = reports["z* (8-d)"]["floor"]
    sampled = _sampled(reports["z* (8-d)"])
    names = ("z* (8-d)", "first 4", "first 2")
    fails = []
    for cap, d in common_curve(reports, names):
        if cap is not None and cap >= min_capacity:
            tol = max(floor["ci"][1], 0.1 * d["first 4"]["mean"])
            if d["z* (8-d)"]["mean"] > tol:
                fails.append(f"z* at {cap}: {d['z* (8-d)']['mean']:.3g} > {tol:.3g}")
        for name in ("first 4", "first 2"):
            if not paired_above(d[name], floor, sampled):
                fails.append(f"{name} at {cap} not above the floor")
    return not fails, fails


def common_curve(reports: Mapping, names) -> list[tuple[Any, dict]]:
    """(capacity, {name: distance}) at every capacity all of ``names`` measured (default sweeps
    extend as far as each latent's curve needs)."""
    by_cap = {k: {e["capacity"]: e["distance"] for e in reports[k]["curve"]} for k in names}
    common = set.intersection(*(set(v) for v in by_cap.values()))
    caps = sorted(common, key=lambda c: -1 if c is None else c)
    return [(c, {k: by_cap[k][c] for k in names}) for c in caps]


def nested_verdict(reports: Mapping[int, Mapping]) -> tuple[bool, list[str]]:
    """Nested PCA latents {2, 8, 32} -> ``measure`` report, at every capacity all three
    measured, seed by seed (``paired_above``: the same rows, seeds and judges):

    * PCA-2 is a linear function of PCA-8, so D_c(PCA-2) >= D_c(PCA-8) at every c: PCA-8 never
      above PCA-2;
    * strictly D_c(PCA-2) > D_c(PCA-8) where c >= 2: a capacity-c mlp reads at most 2c
      directions of its latent (its skip has rank <= c, its body's first layer width c), so
      from c = 2 on it can use what PCA-8 has beyond PCA-2's two; at c = 1 both may reach the
      same best two-direction generator;
    * PCA-32 not above PCA-8.
    """
    fails = []
    sampled = _sampled(reports[8])
    for cap, d in common_curve(reports, (2, 8, 32)):
        if cap is not None and 2 * cap <= 2:
            if paired_above(d[8], d[2], sampled):
                fails.append(f"PCA-8 above PCA-2 at {cap}")
        elif not paired_above(d[2], d[8], sampled):
            fails.append(f"PCA-2 not above PCA-8 at {cap}")
        if paired_above(d[32], d[8], sampled):
            fails.append(f"PCA-32 above PCA-8 at {cap}")
    return not fails, fails
