"""Generation-quality metrics: FD closed forms, PRDC limits, priors, the feature net."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import linalg

from latentdist.data import DataSource, load_data
from latentdist.discrepancy import w2
from latentdist.errors import UsageError
from latentdist.evaluation import (
    CodePrior,
    FeatureNet,
    GaussianMixturePrior,
    frechet_distance,
    frechet_distance_gaussians,
    generation_metrics,
    load_feature_extractor,
    prdc,
    train_feature_net,
)


def _with_moments(rng: np.random.Generator, n: int, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n points whose sample mean and (ddof=1) covariance are exactly mu and cov."""
    z = rng.normal(size=(n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten exactly
    return z @ np.linalg.cholesky(cov).T + mu


def test_frechet_closed_form_diagonal() -> None:
    # commuting covariances: FD = |mu_a - mu_b|^2 + sum_i (sqrt(la_i) - sqrt(lb_i))^2
    rng = np.random.default_rng(0)
    mu_a, mu_b = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, 2.0])
    la, lb = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 1.0])
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(la) - np.sqrt(lb)) ** 2)
    fa = _with_moments(rng, 500, mu_a, np.diag(la))
    fb = _with_moments(rng, 400, mu_b, np.diag(lb))
    assert frechet_distance(fa, fb) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(torch.tensor(fa), torch.tensor(fa)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_general_covariances_match_symmetric_form() -> None:
    # the code takes Tr (Sa^{1/2} Sb Sa^{1/2})^{1/2}; SciPy's sqrtm of the product Sa Sb is an
    # independent route to the same trace on well-conditioned covariances
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    sa, sb = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu_a, mu_b = rng.normal(size=5), rng.normal(size=5)
    tr = np.trace(linalg.sqrtm(sa @ sb).real)
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(sa) + np.trace(sb) - 2 * tr
    assert frechet_distance_gaussians(mu_a, sa, mu_b, sb) == pytest.approx(expected, rel=1e-9)
    # rank-deficient covariances (more features than samples) still give a finite, real value
    fa = rng.normal(size=(10, 30))
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-6)


def test_prdc_limits() -> None:
    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 4))
    same = prdc(real, real.copy(), k=5)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    far = prdc(real, real + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_density_is_one_in_expectation() -> None:
    # E density = 1 when fake ~ real: a k-NN ball holds mass k/N on average (Naeem et al. 2020)
    rng = np.random.default_rng(3)
    out = prdc(rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8)), k=5)
    assert 0.8 < out["density"] < 1.2
    assert out["precision"] > 0.6 and out["recall"] > 0.6


def test_gmm_prior_matches_gaussian_latent() -> None:
    rng = np.random.default_rng(4)
    n, mu = 4000, np.array([1.0, -2.0, 0.5, 0.0])
    a = rng.normal(size=(4, 4))
    cov = a @ a.T / 4 + 0.2 * np.eye(4)
    z = rng.multivariate_normal(mu, cov, size=n).reshape(n, 2, 2)
    prior = GaussianMixturePrior(n_components=1).fit(torch.tensor(z))
    s = prior.sample(n, seed=1)
    assert s.shape == (n, 2, 2)
    flat = s.reshape(n, -1).double().numpy()
    # sampling error of a mean over n draws, twice (fit sample and generated sample)
    se_mean = np.sqrt(2 * np.diag(cov) / n)
    assert np.all(np.abs(flat.mean(0) - mu) < 5 * se_mean)
    se_cov = np.sqrt(2 * (np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    assert np.all(np.abs(np.cov(flat, rowvar=False) - cov) < 5 * se_cov)


def test_gmm_prior_pca_path_keeps_low_rank_structure() -> None:
    # a rank-3 latent in 48 dims + tiny noise: PCA(8) + GMM reproduces its covariance
    rng = np.random.default_rng(5)
    basis = np.linalg.qr(rng.normal(size=(48, 3)))[0]
    z = rng.normal(size=(3000, 3)) * [3.0, 2.0, 1.0] @ basis.T + 0.01 * rng.normal(size=(3000, 48))
    prior = GaussianMixturePrior(n_components=2, n_pca=8).fit(z.reshape(3000, 3, 4, 4))
    s = prior.sample(3000, seed=0).reshape(3000, -1).double().numpy()
    ev = np.sort(np.linalg.eigvalsh(np.cov(s, rowvar=False)))[::-1]
    assert ev[:3] == pytest.approx([9.0, 4.0, 1.0], rel=0.1)
    assert ev[3] < 1e-2


def test_code_prior_learns_deterministic_pattern() -> None:
    # code[t+1] = code[t] + 1 mod K from a uniform start: chance of following it is 1/K
    rng = np.random.default_rng(6)
    k = 12
    start = rng.integers(0, k, size=(600, 1))
    codes = ((start + np.arange(16)) % k).reshape(600, 4, 4)
    prior = CodePrior().fit(codes, steps=200, batch_size=32, seed=0)
    s = prior.sample(200, seed=1)
    assert s.shape == (200, 4, 4) and s.dtype == torch.long
    seq = s.reshape(200, -1)
    follows = ((seq[:, 1:] - seq[:, :-1]) % k == 1).double().mean()
    assert follows > 0.95  # chance: 1/12


def test_feature_net_classifies_digits() -> None:
    digits = load_data("digits")
    perm = np.random.default_rng(0).permutation(len(digits))
    tr, te = perm[:1400], perm[1400:]
    train = DataSource("digits-train", digits.array[tr], kind="images", scale=digits.scale)
    train.labels = digits.labels[tr]
    net = train_feature_net(train, steps=400, seed=0)
    with torch.no_grad():
        pred = net.head(net.trunk(digits.take(te))).argmax(1).numpy()
        feats = net(train.take()).double()
    assert (pred == digits.labels[te]).mean() > 0.8
    # features standardised on the training rows: zero mean, mean per-dimension variance 1
    assert feats.mean(0).abs().max() < 1e-5
    assert feats.var(0).mean() == pytest.approx(1.0, rel=1e-5)


def test_generation_metrics_and_torchscript_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    net = FeatureNet((6,), n_out=3, feat_dim=8).eval()
    path = tmp_path / "feat.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    loaded = load_feature_extractor(path)
    real = torch.randn(200, 6)
    fake = real + torch.tensor([0.5, 0, 0, 0, 0, 0])
    with torch.no_grad():
        fr, ff = net(real), net(fake)
    out = generation_metrics(real, fake, loaded, k=5)
    assert out["fd"] == pytest.approx(frechet_distance(fr, ff), rel=1e-6)
    assert out["w2"] == pytest.approx(0.5, rel=1e-6)  # a translation: W2 = |t|
    assert out["w2"] == pytest.approx(w2(real, fake), rel=1e-12)
    assert {k: out[k] for k in ("precision", "recall", "density", "coverage")} == pytest.approx(
        prdc(fr, ff, k=5), rel=1e-6
    )
    with pytest.raises(UsageError, match="not a TorchScript"):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"not a model")
        load_feature_extractor(bad)
    assert math.isfinite(out["fd"])
