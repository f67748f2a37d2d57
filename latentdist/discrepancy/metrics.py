"""Discrepancies d_F between two samples: the metric side of D_c(P_z; P_x) (SPEC section 1).

Every function takes two samples ``x`` (n, ...) and ``y`` (m, ...), NumPy arrays or torch
tensors, flattens them to (n, D) and (m, D), works in float64 and returns a Python float.
Both samples carry uniform weights 1/n and 1/m. Formulas, units and sources: docs/metrics.md.

* ``w1``       exact W1, Euclidean cost                       (distance units)
* ``w2``       exact W2 = sqrt(OT with squared Euclidean cost) (distance units)
* ``sinkhorn`` sqrt(max(S_eps, 0)), debiased Sinkhorn divergence (distance units)
* ``sliced``   sliced W2 over random directions               (distance units)
* ``mmd``      unbiased MMD^2, sum of Gaussian kernels          (dimensionless, may be < 0)
* ``kid``      unbiased MMD^2, cubic polynomial kernel (KID)     (dimensionless, may be < 0)
* ``fd``       Frechet distance of Gaussian fits (W2^2 of them)  (squared distance units)
* ``critic``   held-out neural-net distance, Lipschitz critic   (distance units, lower bound on W1)

``kid`` and ``fd`` take ``features`` (a module applied to both samples first; identity by
default). ``critic`` trains on rows disjoint from the ones it scores (``NEEDS_FIT``).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

from latentdist.discrepancy._sinkhorn import sinkhorn_divergence
from latentdist.discrepancy.critic import heldout_critic_distance
from latentdist.discrepancy.features import extract_features
from latentdist.discrepancy.frechet import frechet_distance
from latentdist.discrepancy.kernels import (
    MMD_SCALES,
    gaussian_gammas,
    gaussian_kernel,
    median_bandwidth,
    polynomial_kernel,
    sq_dists,
    unbiased_mmd2,
)
from latentdist.discrepancy.validate import Array, as_row_pair
from latentdist.errors import UsageError

__all__ = [
    "FEATURE_METRICS",
    "METRICS",
    "NEEDS_FIT",
    "UNBIASED",
    "below_floor_cause",
    "critic",
    "default_blur",
    "discrepancy",
    "fd",
    "kid",
    "mmd",
    "resolve_metric",
    "sinkhorn",
    "sliced",
    "w1",
    "w2",
]

_EMD_MAX_ITER = 10**12  # network simplex pivots: effectively unbounded, so it never stops early


def _exact_ot(cost: np.ndarray, solver: str = "auto") -> float:
    """min over couplings of uniform weights of sum_ij P_ij C_ij (exact).

    Solved by POT's network simplex ``ot.emd2`` with an unbounded iteration budget; a
    non-optimal exit raises. For n == m the optimum is a permutation (Birkhoff-von Neumann) and
    ``solver="lsa"`` uses ``scipy.optimize.linear_sum_assignment`` instead: as exact, slightly
    faster on generic high-dimensional costs, but catastrophically slow on near-degenerate ones
    (a collapsed generator in low dimension: 121 s vs 5.8 s for emd at n = 4000, D = 3), so
    ``auto`` picks emd.
    """
    n, m = cost.shape
    if solver == "auto":
        solver = "emd"
    if solver == "lsa":
        if n != m:
            raise ValueError("assignment solver needs equal sample sizes")
        rows, cols = linear_sum_assignment(cost)
        return float(cost[rows, cols].sum() / n)
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # replaced by the explicit check below
        value, log = ot.emd2(a, b, np.ascontiguousarray(cost), numItermax=_EMD_MAX_ITER, log=True)
    if log["result_code"] != 1:  # 1 == OPTIMAL in POT's network simplex
        raise RuntimeError(f"exact OT (ot.emd2) did not reach optimality: {log['warning']}")
    return float(value)


def w1(x: Array, y: Array) -> float:
    """Exact 1-Wasserstein distance between the empirical measures of ``x`` and ``y``.

    W1 = min_{P in U(1/n, 1/m)} sum_ij P_ij |x_i - y_j|  (Euclidean ground cost; Villani 2009),
    solved exactly by POT's network simplex (``_exact_ot``).
    """
    xt, yt = as_row_pair(x, y)
    return _exact_ot(sq_dists(xt, yt).sqrt_().numpy())


def w2(x: Array, y: Array) -> float:
    """Exact 2-Wasserstein distance between the empirical measures of ``x`` and ``y``.

    W2 = sqrt( min_{P in U(1/n, 1/m)} sum_ij P_ij |x_i - y_j|^2 )  (Villani 2009), solved
    exactly as in ``w1``.
    """
    xt, yt = as_row_pair(x, y)
    return math.sqrt(max(_exact_ot(sq_dists(xt, yt).numpy()), 0.0))


def default_blur(x: torch.Tensor, y: torch.Tensor) -> float:
    """Default Sinkhorn blur: 0.2 * s, s = RMS distance of the pooled sample to its mean.

    s = sqrt(mean_i |p_i - mean(p)|^2) over the pooled points p = (x, y), so s^2 is the total
    variance and eps = blur^2 = 0.04 s^2. Smaller blurs bring S_eps closer to W2^2 but Sinkhorn
    needs ~1/eps iterations: on digits (n = 800) blur 0.1 s took 295 iterations, 0.2 s took 71,
    and sqrt(S_eps) was 0.95 x W2 at 0.2 s. Pass ``blur`` explicitly for another trade-off.
    """
    pooled = torch.cat([x, y])
    s = math.sqrt(float(((pooled - pooled.mean(0)) ** 2).sum(1).mean()))
    return 0.2 * s if s > 0 else 1.0


def sinkhorn(x: Array, y: Array, *, blur: float | None = None) -> float:
    """sqrt(max(S_eps, 0)) for the debiased Sinkhorn divergence (Feydy et al., AISTATS 2019).

    S_eps(a, b) = OT_eps(a, b) - OT_eps(a, a)/2 - OT_eps(b, b)/2 with
    OT_eps(a, b) = min_P <P, C> + eps KL(P | a x b),  C_ij = |x_i - y_j|^2,  eps = blur^2.
    S_eps >= 0, = 0 iff a = b, and S_eps -> W2^2 as eps -> 0; the square root puts it in
    distance units like ``w2``. ``blur`` defaults to ``default_blur`` (0.2 x RMS radius of the
    pooled sample). Solver: ``sinkhorn_divergence``.
    """
    xt, yt = as_row_pair(x, y)
    if blur is None:
        blur = default_blur(xt, yt)
    if not blur > 0:
        raise UsageError(f"sinkhorn: blur must be positive, got {blur}")
    return math.sqrt(max(sinkhorn_divergence(xt, yt, eps=blur**2), 0.0))


def sliced(x: Array, y: Array, *, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance (Bonneel et al. 2015), POT ``ot.sliced_wasserstein_distance``.

    SW2 = sqrt( mean_{l=1..L} W2^2(<theta_l, x>, <theta_l, y>) ) over L = ``n_projections``
    directions theta_l drawn uniformly on the unit sphere with ``seed``; each 1-D W2 is exact.
    """
    if n_projections < 1:
        raise UsageError(f"sliced: n_projections must be >= 1, got {n_projections}")
    xt, yt = as_row_pair(x, y)
    value = ot.sliced_wasserstein_distance(
        xt.numpy(), yt.numpy(), n_projections=n_projections, p=2, seed=seed
    )
    return float(value)


def mmd(
    x: Array,
    y: Array,
    *,
    bandwidth: float | None = None,
    scales: tuple[float, ...] = MMD_SCALES,
) -> float:
    """Unbiased estimate of MMD^2 with a sum of Gaussian kernels (Gretton et al., JMLR 2012).

    MMD_u^2 = 1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j)
              - 2/(nm) sum_{i,j} k(x_i, y_j),
    k(u, v) = 1/S sum_s exp(-|u - v|^2 / (2 (a_s sigma)^2)) over the ``scales`` a_1..a_S
    (default ``MMD_SCALES`` = 0.25 ... 4; ``scales=(1,)`` is the single median-bandwidth kernel),
    sigma = ``bandwidth`` or, by default, ``median_bandwidth`` of the pooled sample. Pass a
    bandwidth fixed by a reference sample (``median_bandwidth(reference)``) to judge several
    samples with one kernel, as ``measure`` and ``sample_distance`` do. A sum of characteristic
    kernels is characteristic, so MMD = 0 iff P = Q. Unbiased: it can be slightly negative when
    P = Q. Needs n, m >= 2.
    """
    xt, yt = as_row_pair(x, y)
    sigma = median_bandwidth(xt, yt) if bandwidth is None else float(bandwidth)
    if not sigma > 0:
        raise UsageError(f"mmd: bandwidth must be positive, got {bandwidth}")
    if not scales or not all(s > 0 for s in scales):
        raise UsageError(f"mmd: scales must be positive numbers, got {scales}")
    return unbiased_mmd2(gaussian_kernel(gaussian_gammas(sigma, scales)), xt, yt, "mmd")


def _featurize(a: Array, features: Callable | None) -> Array:
    if features is None:
        return a
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a), dtype=torch.float32)
    return extract_features(features, t)


def kid(x: Array, y: Array, *, features: Callable | None = None) -> float:
    """Kernel Inception Distance: unbiased MMD^2 with k(u, v) = (<u, v>/F + 1)^3 on features.

    Binkowski et al., ICLR 2018 ("Demystifying MMD GANs"), with F the feature dimension. The
    estimate is taken over the whole samples at once (the subset average of FID tools has the
    same expectation and more variance). ``features``: a module mapping (n, ...) -> (n, F),
    applied to both samples first; None keeps the samples as they are (identity features).
    """
    xt, yt = as_row_pair(_featurize(x, features), _featurize(y, features))
    return unbiased_mmd2(polynomial_kernel(xt.shape[1]), xt, yt, "kid")


def fd(x: Array, y: Array, *, features: Callable | None = None) -> float:
    """Frechet distance between Gaussians fitted to (features of) ``x`` and ``y`` (FID form).

    FD = |mu_x - mu_y|^2 + Tr(S_x + S_y - 2 (S_x S_y)^{1/2}) (Dowson & Landau 1982; Heusel et
    al. 2017): W2^2 between the Gaussian fits, so a lower bound on W2^2 between the fits' parent
    distributions only when those are Gaussian. Biased upward at finite n (Chong & Forsyth 2020):
    compare values at equal sample sizes, as the floor beside it does.
    """
    xt, yt = as_row_pair(_featurize(x, features), _featurize(y, features))
    return frechet_distance(xt.numpy(), yt.numpy())


def critic(
    x: Array, y: Array, *, fit_x: Array | None = None, fit_y: Array | None = None, **settings: Any
) -> float:
    """Held-out neural-net distance E_x f - E_y f for a critic f trained on other rows.

    See ``latentdist.discrepancy.critic.heldout_critic_distance``: f is a Lipschitz (gradient
    penalty) MLP for vectors or a small conv net for images, trained to maximise the gap on
    ``fit_x`` vs ``fit_y``; without them, on the first halves of ``x`` and ``y``, which are then
    scored on their second halves. A fixed f makes the value an unbiased estimate of
    E_P f - E_Q f <= d_F(P, Q) (Arora et al. 2017), so two samples of one distribution score
    ~0 rather than the positive bias of empirical W1.
    """
    return heldout_critic_distance(x, y, fit_x=fit_x, fit_y=fit_y, **settings)


METRICS: dict[str, Callable[..., float]] = {
    "w1": w1,
    "w2": w2,
    "sinkhorn": sinkhorn,
    "sliced": sliced,
    "mmd": mmd,
    "kid": kid,
    "fd": fd,
    "critic": critic,
}
NEEDS_FIT = frozenset({"critic"})  # trained on rows disjoint from the scored ones
UNBIASED = frozenset({"mmd", "kid", "critic"})  # two samples of one distribution score 0 on average
FEATURE_METRICS = frozenset({"fd", "kid"})  # take a ``features`` map (``resolve_features``)


def resolve_metric(name: str) -> Callable[..., float]:
    """The function of the metric ``name`` in ``METRICS``; a one-line ``UsageError`` otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise UsageError(
            f"unknown metric {name!r} (expected one of: {', '.join(METRICS)})"
        ) from None


def below_floor_cause(metric: str, n_eval: int, dim: int) -> str:
    """Why a sample scores below fresh data beyond both intervals, for a warning.

    No distribution beats the data's own in the population. A biased estimate (empirical W1/W2,
    Sinkhorn, sliced, FD) at ``n_eval`` points in ``dim`` dimensions rewards samples huddled near
    the data's bulk (Stanczuk et al. 2021); an unbiased one (``UNBIASED``) does not in
    expectation, so there the samples repeat the reference's rows, or the intervals are noise.
    """
    if metric in UNBIASED:
        return (
            f"{metric} is unbiased, so nothing scores below the truth in expectation: the samples "
            "most likely repeat rows of the reference (copied or memorised data), or n_eval is "
            "too small for the intervals"
        )
    return (
        f"at n_eval {n_eval} in {dim} dimensions {metric} rewards samples concentrated near the "
        f"bulk of the data over fresh data; use an unbiased metric ({', '.join(sorted(UNBIASED))})"
    )


def discrepancy(name: str, x: Array, y: Array, **kwargs: Any) -> float:
    """d_F(x, y) for the metric ``name`` in ``METRICS``; ``kwargs`` go to that function."""
    fn = resolve_metric(name)
    try:
        inspect.signature(fn).bind(x, y, **kwargs)
    except TypeError as err:
        raise UsageError(f"metric {name!r}: {err}") from None
    return fn(x, y, **kwargs)
