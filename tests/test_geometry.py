"""Latent geometry against known dimensions, closed-form entropies and scikit-learn's PCA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from latentdist.errors import UsageError
from latentdist.proxies import (
    codebook_usage,
    effective_rank,
    intrinsic_dimension,
    latent_geometry,
    nearest_codes,
    variance_spectrum,
)


def _plane_in_r10(n: int, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pts = rng.standard_normal((n, 2)) if kind == "gaussian" else rng.uniform(-1, 1, (n, 2))
    q, _ = np.linalg.qr(rng.standard_normal((10, 2)))  # random orthonormal embedding
    return pts @ q.T


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_plane_in_r10_has_dimension_two(kind):
    x = _plane_in_r10(1500, kind)
    idim = intrinsic_dimension(x)
    assert abs(idim["twonn"] - 2) <= 0.5 and abs(idim["mle"] - 2) <= 0.5
    assert idim["n_points"] == 1500
    assert effective_rank(x) <= 2.5


def test_duplicates_are_removed_before_twonn():
    x = _plane_in_r10(800, "gaussian")
    idim = intrinsic_dimension(np.concatenate([x, x[:400]]))
    assert idim["n_points"] == 800 and abs(idim["twonn"] - 2) <= 0.5 and abs(idim["mle"] - 2) <= 0.5


def test_subsample_to_n_max():
    x = torch.from_numpy(_plane_in_r10(3000, "uniform"))
    assert intrinsic_dimension(x, n_max=700)["n_points"] == 700


def test_isotropic_gaussian_effective_rank_close_to_five():
    x = np.random.default_rng(1).standard_normal((5000, 5))
    assert effective_rank(x) == pytest.approx(5.0, abs=0.05)


def test_effective_rank_closed_form():
    # centred data with singular values exactly (3, 2, 1): columns of U orthogonal to 1
    rng = np.random.default_rng(2)
    basis, _ = np.linalg.qr(np.column_stack([np.ones(50), rng.standard_normal((50, 3))]))
    u = basis[:, 1:]
    v, _ = np.linalg.qr(rng.standard_normal((6, 3)))
    s = np.array([3.0, 2.0, 1.0])
    x = u @ np.diag(s) @ v.T + 7.0  # an offset that centring removes
    p = s / s.sum()
    assert effective_rank(x) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)


def test_variance_spectrum_matches_sklearn_pca():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 12))
    ours = variance_spectrum(torch.from_numpy(x), top=5)
    ref = PCA().fit(x).explained_variance_ratio_[:5]
    np.testing.assert_allclose(ours, ref, rtol=1e-9)
    # wide data (N < D) goes through the N x N Gram matrix and must agree too
    wide = rng.standard_normal((30, 200))
    np.testing.assert_allclose(
        variance_spectrum(wide, top=10), PCA().fit(wide).explained_variance_ratio_[:10], rtol=1e-8
    )


def test_codebook_usage_known_histograms():
    uniform_half = np.repeat(np.arange(4), 25).reshape(10, 10)
    out = codebook_usage(uniform_half, n_codes=8)
    assert out["perplexity"] == pytest.approx(4.0) and out["dead_fraction"] == 0.5
    assert out["n_codes"] == 8 and out["usage"] == [25, 25, 25, 25, 0, 0, 0, 0]
    # p = (1/2, 1/4, 1/4): H = 1.5 log 2, perplexity 2^1.5
    skew = codebook_usage(torch.tensor([0, 0, 1, 2]))
    assert skew["perplexity"] == pytest.approx(2**1.5) and skew["dead_fraction"] == 0.0
    assert skew["n_codes"] == 3
    with pytest.raises(UsageError):
        codebook_usage(np.array([0, 9]), n_codes=4)
    with pytest.raises(UsageError):
        codebook_usage(np.array([0.5, 1.0]))


@pytest.mark.parametrize("layout", ["nchw", "nlc", "nc"])
def test_nearest_codes_recovers_noisy_codes(layout):
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, 4, generator=gen) * 3
    codes = torch.randint(0, 16, (20, 5, 6), generator=gen)
    if layout != "nchw":
        codes = codes.reshape(-1) if layout == "nc" else codes.reshape(20, 30)
    vectors = codebook[codes] + 0.01 * torch.randn(*codes.shape, 4, generator=gen)
    z = vectors.movedim(-1, 1) if layout == "nchw" else vectors
    found = nearest_codes(z, codebook)
    assert found.shape == codes.shape and torch.equal(found, codes)
    with pytest.raises(UsageError, match="codebook width"):
        nearest_codes(z, codebook[:, :3])


def test_latent_geometry_bundle():
    x = _plane_in_r10(1200, "gaussian").reshape(1200, 2, 5)
    geo = latent_geometry(x, n_max=1000)
    assert geo["shape"] == [2, 5] and geo["n_points"] == 1000 and "codebook" not in geo
    assert abs(geo["intrinsic_dim"]["twonn"] - 2) <= 0.5
    assert geo["effective_rank"] == pytest.approx(
        effective_rank(x[np.sort(np.random.default_rng(0).choice(1200, 1000, replace=False))])
    )
    assert (
        sum(geo["variance_spectrum"]) == pytest.approx(1.0) and len(geo["variance_spectrum"]) == 10
    )

    tokens = np.random.default_rng(4).integers(0, 6, (500, 8))
    geo_tok = latent_geometry(tokens, is_integer=True)
    assert geo_tok["codebook"]["n_codes"] == 6 and geo_tok["codebook"]["dead_fraction"] == 0.0
    assert geo_tok["codebook"]["perplexity"] == pytest.approx(6.0, rel=0.01)

    codebook = np.eye(10)[:3] * 5  # K = 3 codes in R^10
    z = codebook[np.zeros(50, dtype=int)] + np.random.default_rng(5).normal(0, 0.1, (50, 10))
    geo_cb = latent_geometry(z, codebook=codebook)
    assert geo_cb["codebook"]["usage"] == [50, 0, 0]
    assert geo_cb["codebook"]["dead_fraction"] == pytest.approx(2 / 3)


def test_bad_latents_are_usage_errors():
    with pytest.raises(UsageError, match="NaN"):
        effective_rank(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(UsageError, match="distinct points"):
        intrinsic_dimension(np.ones((100, 3)))
