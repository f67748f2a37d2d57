"""Diffusability diagnostics on constructed cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latentdist.errors import UsageError
from latentdist.proxies.diagnostics import (
    _blur_downsample,
    dct_radial_spectrum,
    decoder_robustness,
    equivariance_error,
    gaussian_kl_to_standard,
    gmm_modes,
    latent_diagnostics,
    latent_spectrum,
    latent_statistics,
    spectrum_divergence,
)


def test_white_noise_has_a_flat_spectrum():
    """Orthonormal DCT of white noise: equal expected power at every non-DC coefficient, so the
    per-bin mean power is the same in every occupied bin (within sampling error)."""
    z = torch.randn(400, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    spec = dct_radial_spectrum(z)
    occupied = spec[~np.isnan(spec)]
    assert occupied.sum() == pytest.approx(1.0)
    assert np.allclose(occupied, occupied.mean(), rtol=0.08)


def test_smooth_maps_put_their_power_at_low_frequencies():
    g = torch.Generator().manual_seed(1)
    smooth = F.interpolate(torch.randn(200, 2, 4, 4, generator=g), size=(16, 16), mode="bilinear")
    spec = dct_radial_spectrum(smooth)
    assert np.nansum(spec[:4]) > 0.8  # nearly all the power in the lowest quarter of the bins
    assert np.isnan(dct_radial_spectrum(smooth[..., :7, :7])[0])  # 7x7: bin 0 holds only DC
    assert spectrum_divergence(spec, spec) == pytest.approx(0.0, abs=1e-12)


def test_spectrum_divergence_is_kl_of_image_to_latent():
    p, q = np.array([np.nan, 0.5, 0.5]), np.array([np.nan, 0.25, 0.75])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert spectrum_divergence(p, q, eps=0) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(UsageError):
        spectrum_divergence(p, q[:2])


def test_latent_equal_to_downsampled_images_matches_their_spectrum():
    """A latent that *is* the images blurred and resized to its size has KL 0; white noise of
    the same size carries far more high-frequency power and a larger KL."""
    g = torch.Generator().manual_seed(2)
    x = F.interpolate(torch.randn(100, 1, 6, 6, generator=g), size=(32, 32), mode="bilinear")
    z = _blur_downsample(x, (8, 8))
    same = latent_spectrum(z, x)
    noise = latent_spectrum(torch.randn(100, 4, 8, 8, generator=g), x)
    assert same["kl_image_latent"] == pytest.approx(0.0, abs=1e-9)
    assert noise["kl_image_latent"] > 0.05
    assert noise["high_freq_fraction"]["latent"] > same["high_freq_fraction"]["latent"]


def test_average_pooling_encoder_is_exactly_equivariant():
    x = torch.randn(20, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def enc(t):
        return F.avg_pool2d(t, 2)

    assert equivariance_error(enc, x, "scale") == pytest.approx(0.0, abs=1e-12)
    assert equivariance_error(enc, x, "rot90") == pytest.approx(0.0, abs=1e-12)


def test_transposing_encoder_breaks_rotation_equivariance_by_a_known_amount():
    """E = transpose: E(rot90 x) = rot270(x^T) while rot90(E x) = rot90(x^T). For a single bright
    pixel in the corner (fixed by transposition), the two latents are deltas in opposite
    corners: ||a - b||^2 / ||a||^2 = 2."""
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 0, 0] = 1.0
    assert equivariance_error(lambda t: t.transpose(-1, -2), x, "rot90") == pytest.approx(2.0)
    with pytest.raises(UsageError, match="square"):
        equivariance_error(lambda t: t, torch.zeros(2, 1, 4, 6), "rot90")


def test_gaussian_kl_matches_the_closed_form():
    """Standardised 2-D Gaussian with correlation rho: KL(N(0, R) || N(0, I)) = -log(1-rho^2)/2."""
    rho = 0.6
    rng = np.random.default_rng(0)
    z = rng.multivariate_normal([3.0, -1.0], [[4.0, rho * 2 * 0.5], [rho * 2 * 0.5, 0.25]], 40000)
    stats = latent_statistics(z)
    assert stats["gaussian_kl"]["kl"] == pytest.approx(-0.5 * math.log(1 - rho**2), abs=0.01)
    assert stats["channel_mean"] == pytest.approx([3.0, -1.0], abs=0.05)
    assert stats["channel_std"] == pytest.approx([2.0, 0.5], rel=0.03)
    assert stats["std_spread"] == pytest.approx(4.0, rel=0.05)
    assert stats["scaling_factor"] == pytest.approx(1 / z.std(), rel=1e-9)
    # independent unit Gaussians: KL ~ 0; a constant direction falls back to Ledoit-Wolf (finite)
    assert gaussian_kl_to_standard(rng.standard_normal((20000, 3)))["kl"] < 0.01
    flat = np.c_[rng.standard_normal((500, 2)), np.zeros(500)]
    out = gaussian_kl_to_standard(flat)
    assert math.isfinite(out["kl"]) and out["estimator"].startswith("Ledoit-Wolf")


def test_gmm_modes_counts_well_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0, 0, 0, 0], [10, 0, 0, 0, 0], [0, 10, 0, 0, 0]], dtype=float)
    z = np.concatenate([c + rng.standard_normal((300, 5)) for c in centres])
    out = gmm_modes(z, max_components=6, n_pca=3)
    assert out["n_modes"] == 3 and len(out["bic"]) == 6 and out["pca_dims"] == 3
    assert not out["saturated"] and gmm_modes(z, max_components=2)["saturated"]
    assert gmm_modes(rng.standard_normal((600, 5)), max_components=4)["n_modes"] == 1


def test_decoder_robustness_of_the_identity_decoder():
    """D = identity, x = z, channel stds s = (1, 3): MSE(sigma) = sigma^2 mean(s^2) = 5 sigma^2."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4000, 2, 4, 4, generator=g) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    out = decoder_robustness(lambda t: t, z, z.clone())
    assert out["mse"]["0"] == 0.0
    for sigma in (0.1, 0.2, 0.5):
        assert out["mse"][f"{sigma:g}"] == pytest.approx(5 * sigma**2, rel=0.03)
    with pytest.raises(UsageError):
        decoder_robustness(lambda t: t, z, z[:10])


def test_latent_diagnostics_skips_with_notes():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 1, 8, 8, generator=g)
    z = F.avg_pool2d(x, 2)
    only_latents = latent_diagnostics(z, x)
    assert "encoder" in only_latents["equivariance"]["rot90"]["skipped"]
    assert "decoder" in only_latents["decoder_robustness"]["skipped"]
    assert math.isfinite(only_latents["spectrum"]["kl_image_latent"])
    with_encoder = latent_diagnostics(z, x, encoder=lambda t: F.avg_pool2d(t, 2))
    assert with_encoder["equivariance"]["scale_2x"] == pytest.approx(0.0, abs=1e-12)
    vectors = latent_diagnostics(torch.randn(60, 6, generator=g), x.flatten(1))
    assert "spatial" in vectors["spectrum"]["skipped"]
    assert vectors["modes"]["n_modes"] >= 1
    codes = latent_diagnostics(torch.randint(0, 8, (60, 4, 4), generator=g), x, discrete=True)
    assert "code indices" in codes["statistics"]["skipped"]


def test_measure_report_carries_diagnostics():
    from latentdist import measure

    g = torch.Generator().manual_seed(6)
    x = torch.randn(200, 1, 8, 8, generator=g)
    z = F.avg_pool2d(x, 2)
    rep = measure(z, x, generator="linear", steps=5, seeds=1, proxies=False, progress=False).report
    diag = rep["diagnostics"]
    assert "encoder" in diag["equivariance"]["scale_2x"]["skipped"]
    assert math.isfinite(diag["spectrum"]["kl_image_latent"])
    assert diag["statistics"]["scaling_factor"] == pytest.approx(1 / float(z.double().std()), 1e-3)
    rep = measure(
        z,
        x,
        generator="linear",
        steps=5,
        seeds=1,
        proxies=False,
        progress=False,
        encoder=lambda t: F.avg_pool2d(t, 2),
    ).report
    assert rep["diagnostics"]["equivariance"]["rot90"] == pytest.approx(0.0, abs=1e-12)
