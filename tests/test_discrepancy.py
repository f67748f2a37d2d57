"""Discrepancies d_F: agreement with POT/SciPy, closed forms, symmetry, the finite-sample floor."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from scipy.stats import wasserstein_distance

from latentdist.discrepancy import (
    METRICS,
    MMD_SCALES,
    critic,
    discrepancy,
    fd,
    kid,
    median_bandwidth,
    mmd,
    sinkhorn,
    sinkhorn_divergence,
    sliced,
    w1,
    w2,
)
from latentdist.discrepancy.metrics import _exact_ot
from latentdist.errors import UsageError


def _samples(n: int, m: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(m, d)) * 1.3 + 0.5


def _cdist2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize(("n", "m"), [(60, 60), (50, 70)])
def test_w1_w2_agree_with_pot_emd2(n: int, m: int) -> None:
    x, y = _samples(n, m, 4)
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    m2 = _cdist2(x, y)
    assert w1(x, y) == pytest.approx(ot.emd2(a, b, np.sqrt(m2)), rel=1e-10)
    assert w2(x, y) == pytest.approx(math.sqrt(ot.emd2(a, b, m2)), rel=1e-10)


def test_assignment_and_network_simplex_agree() -> None:
    x, y = _samples(300, 300, 8, seed=1)
    cost = _cdist2(x, y)
    assert _exact_ot(cost, "lsa") == pytest.approx(_exact_ot(cost, "emd"), rel=1e-12)


def test_1d_closed_forms() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(200, 1)), rng.exponential(size=(150, 1))
    assert w1(x, y) == pytest.approx(wasserstein_distance(x[:, 0], y[:, 0]), rel=1e-10)
    # equal sizes: the monotone (sorted) coupling is optimal in 1-D
    y2 = rng.exponential(size=(200, 1))
    expected = math.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y2[:, 0])) ** 2))
    assert w2(x, y2) == pytest.approx(expected, rel=1e-10)


def test_translation_closed_form() -> None:
    # W2(x, x + t) = |t| exactly: the identity coupling is optimal (cross term vanishes)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, 5))
    t = np.array([0.3, -1.0, 2.0, 0.0, 0.5])
    assert w2(x, x + t) == pytest.approx(np.linalg.norm(t), rel=1e-9)
    assert w2(torch.tensor(x), torch.tensor(x + t)) == pytest.approx(np.linalg.norm(t), rel=1e-9)


def _entropic_ot_primal(x: np.ndarray, y: np.ndarray, eps: float) -> float:
    """<P, C> + eps KL(P | a x b) at POT's log-domain Sinkhorn plan (an independent solver)."""
    a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
    cost = _cdist2(x, y)
    plan = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", stopThr=1e-11, numItermax=20000)
    ab = a[:, None] * b[None, :]
    kl = np.sum(plan * np.log(np.maximum(plan, 1e-300) / ab))
    return float(np.sum(plan * cost) + eps * kl)


@pytest.mark.filterwarnings("error")  # POT's reference solve must itself converge
def test_sinkhorn_agrees_with_pot_primal() -> None:
    x, y = _samples(40, 50, 3, seed=4)
    eps = 1.0
    expected = (
        _entropic_ot_primal(x, y, eps)
        - 0.5 * _entropic_ot_primal(x, x, eps)
        - 0.5 * _entropic_ot_primal(y, y, eps)
    )
    got = sinkhorn_divergence(torch.tensor(x), torch.tensor(y), eps=eps, tol=1e-10)
    assert got == pytest.approx(expected, rel=1e-6)
    assert sinkhorn(x, y, blur=math.sqrt(eps)) == pytest.approx(math.sqrt(expected), rel=1e-5)


def test_sinkhorn_self_zero() -> None:
    x, y = _samples(80, 80, 3, seed=5)
    xt = torch.tensor(x)
    # S_eps(a, a) = 0; the solver meets the marginals to tol, so 0 up to tol x cost scale
    assert sinkhorn_divergence(xt, xt, eps=0.5, tol=1e-9) == pytest.approx(0.0, abs=1e-9)
    assert sinkhorn(x, x) < 1e-3 * sinkhorn(x, y)


def test_sliced_agrees_with_independent_projection() -> None:
    x, y = _samples(120, 120, 6, seed=6)
    theta = ot.sliced.get_random_projections(6, 64, seed=7)  # (d, L) unit directions
    px, py = np.sort(x @ theta, axis=0), np.sort(y @ theta, axis=0)
    expected = math.sqrt(np.mean((px - py) ** 2))
    assert sliced(x, y, n_projections=64, seed=7) == pytest.approx(expected, rel=1e-10)


def test_mmd_closed_forms_and_independent_kernel() -> None:
    # n copies of a against n copies of b: MMD_u^2 = 2 - 2 k(a, b); the median pairwise
    # distance of the pooled sample is |a - b| (n^2 of the n(2n-1) pairs), so k = e^{-1/2}
    a, b = np.zeros(3), np.array([1.0, 2.0, 2.0])
    x, y = np.tile(a, (10, 1)), np.tile(b, (10, 1))
    assert mmd(x, y, scales=(1,)) == pytest.approx(2 - 2 * math.exp(-0.5), rel=1e-12)
    # the default kernel averages Gaussians at a_s * sigma: k(a, b) = mean_s exp(-1/(2 a_s^2))
    k_ab = np.mean([math.exp(-1 / (2 * s**2)) for s in MMD_SCALES])
    assert mmd(x, y) == pytest.approx(2 - 2 * k_ab, rel=1e-12)
    # identical, well-separated points with a tiny kernel: k = identity, MMD_u^2 = -2/n
    grid = np.arange(20.0)[:, None] * 100
    assert mmd(grid, grid, bandwidth=1.0) == pytest.approx(-2 / 20, rel=1e-12)
    # a bandwidth fixed by a reference: the median within that sample alone
    ref = np.array([[0.0], [1.0], [3.0]])  # pair distances 1, 2, 3
    assert median_bandwidth(ref) == 2.0
    # general case against a direct O(n^2) computation
    x, y = _samples(30, 40, 4, seed=8)
    sigma = median_bandwidth(torch.tensor(x), torch.tensor(y))
    pooled = np.vstack([x, y])
    iu = np.triu_indices(70, 1)
    assert sigma == pytest.approx(np.median(np.sqrt(_cdist2(pooled, pooled))[iu]), rel=1e-10)

    def k(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.mean([np.exp(-_cdist2(u, v) / (2 * (s * sigma) ** 2)) for s in MMD_SCALES], 0)

    kxx, kyy = k(x, x), k(y, y)
    expected = (
        (kxx.sum() - np.trace(kxx)) / (30 * 29)
        + (kyy.sum() - np.trace(kyy)) / (40 * 39)
        - 2 * k(x, y).mean()
    )
    assert mmd(x, y) == pytest.approx(expected, rel=1e-10)


def test_kid_against_direct_polynomial_kernel() -> None:
    x, y = _samples(30, 40, 5, seed=11)

    def k(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return (u @ v.T / 5 + 1) ** 3

    kxx, kyy = k(x, x), k(y, y)
    expected = (
        (kxx.sum() - np.trace(kxx)) / (30 * 29)
        + (kyy.sum() - np.trace(kyy)) / (40 * 39)
        - 2 * k(x, y).mean()
    )
    assert kid(x, y) == pytest.approx(expected, rel=1e-10)
    # features are applied to both samples first: doubling them = kid of the doubled samples
    double = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5, 5, bias=False))
    with torch.no_grad():
        double[1].weight.copy_(2 * torch.eye(5))
    assert kid(x, y, features=double) == pytest.approx(kid(2 * x, 2 * y), rel=1e-6)


def test_fd_is_the_gaussian_closed_form_on_identity_features() -> None:
    # FD between N(0, I) and N(m, 4 I) in 3-D: |m|^2 + 3 (1 + 4 - 2 * 2) = |m|^2 + 3
    rng = np.random.default_rng(12)
    x = rng.normal(size=(20000, 3))
    y = np.array([1.0, 0.0, 2.0]) + 2 * rng.normal(size=(20000, 3))
    assert fd(x, y) == pytest.approx(5 + 3, rel=0.03)


def test_critic_is_a_heldout_lower_bound_on_w1() -> None:
    # N(0, I) vs N(mu, I) in 2-D: W1 = |mu| (a translation); f(v) = <v, mu>/|mu| attains it.
    rng = np.random.default_rng(13)
    mu = np.array([1.5, 0.0])
    x, y = rng.normal(size=(2000, 2)) + mu, rng.normal(size=(2000, 2))
    value = critic(x, y, steps=300, width=64)
    assert 0.85 * 1.5 < value < 1.5 + 0.1  # trained on halves, scored on the other halves
    # two samples of one distribution: ~0 (a fixed f scored on fresh rows), not W1's bias
    same = critic(rng.normal(size=(2000, 2)), rng.normal(size=(2000, 2)), steps=300, width=64)
    assert abs(same) < 0.1
    assert w1(rng.normal(size=(1000, 2)), rng.normal(size=(1000, 2))) > 0.1
    with pytest.raises(UsageError, match="both fit_x and fit_y"):
        critic(x, y, fit_x=x)


@pytest.mark.parametrize("name", sorted(set(METRICS) - {"critic"}))
def test_symmetry(name: str) -> None:
    x, y = _samples(50, 50, 4, seed=9)
    assert discrepancy(name, x, y) == pytest.approx(discrepancy(name, y, x), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", ["w1", "w2", "sinkhorn", "sliced"])
def test_floor_shrinks_with_sample_size(name: str) -> None:
    # E d(P_n, P'_n) decreases in n for two samples of one distribution (rate n^{-1/d} for W_p)
    rng = np.random.default_rng(10)
    means = []
    for n in (40, 160, 640):
        vals = [
            discrepancy(name, rng.normal(size=(n, 8)), rng.normal(size=(n, 8))) for _ in range(3)
        ]
        means.append(np.mean(vals))
    assert means[0] > means[1] > means[2]


def test_bad_input() -> None:
    x = np.zeros((5, 2))
    with pytest.raises(UsageError, match="unknown metric"):
        discrepancy("fid", x, x)
    with pytest.raises(UsageError, match="different dimensions"):
        w2(x, np.zeros((5, 3)))
    with pytest.raises(UsageError, match="NaN"):
        w1(np.full((3, 2), np.nan), x)
    with pytest.raises(UsageError, match="metric 'w2'"):
        discrepancy("w2", x, x, blur=1.0)
