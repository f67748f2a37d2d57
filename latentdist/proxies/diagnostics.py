"""Diffusability diagnostics of a latent (docs/proxies.md): what recent tokenizer work measures.

Plain functions over arrays/tensors, each stating its formula and source:

* ``dct_radial_spectrum`` / ``spectrum_divergence``: radially binned 2-D DCT power of the latent
  beside that of the images downsampled to the latent's size, and KL(image || latent)
  (Skorokhodov et al. 2025, arXiv 2502.14831; the recipe of SpectrumMatching's ``utils_DCT``).
* ``equivariance_error``: ||E(T x) - T E(x)||^2 / ||E(T x)||^2 for 2x downscaling and 90 degree
  rotation (Kouzelis et al. 2025, EQ-VAE, arXiv 2502.09509).
* ``latent_statistics``: per-channel mean/std, the diffusion scaling factor, and the Gaussian KL
  of the standardised latent to N(0, I) (Rombach et al. 2022; LightningDiT's latent statistics).
* ``gmm_modes``: number of Gaussian-mixture components chosen by BIC on the PCA-reduced latent
  (MAETok, arXiv 2502.03444).
* ``decoder_robustness``: reconstruction MSE against Gaussian noise added to the standardised
  latent (l-DeTok, arXiv 2507.15856).
* ``latent_diagnostics``: all that apply to one latent sample, as a JSON-ready dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F

from latentdist.errors import UsageError

__all__ = [
    "DIAGNOSTIC_SIGMAS",
    "dct_radial_spectrum",
    "decoder_robustness",
    "equivariance_error",
    "gaussian_kl_to_standard",
    "gmm_modes",
    "latent_diagnostics",
    "latent_spectrum",
    "latent_statistics",
    "spectrum_divergence",
]

DIAGNOSTIC_SIGMAS = (0.1, 0.2, 0.5)
DIAGNOSTIC_KEYS = (
    "spectrum",
    "equivariance",
    "statistics",
    "modes",
    "decoder_robustness",
    "time_s",
)
N_BINS = 16


def _np(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _radial_bins(h: int, w: int, n_bins: int) -> np.ndarray:
    """Bin index of every DCT coefficient (u, v): floor(r / r_max * n_bins), r = sqrt(u^2 + v^2)."""
    r = np.sqrt(np.arange(h)[:, None] ** 2 + np.arange(w)[None, :] ** 2)
    return np.clip(np.floor(r / max(r.max(), 1.0) * n_bins), 0, n_bins - 1).astype(np.int64)


def dct_radial_spectrum(x: Any, n_bins: int = N_BINS) -> np.ndarray:
    """Radially binned, normalised 2-D DCT power spectrum of a set of (N, C, H, W) maps.

    SpectrumMatching's recipe (``utils_DCT``; Skorokhodov et al. 2025): each map is centred
    (its spatial mean removed), transformed by the orthonormal 2-D DCT-II
    (``scipy.fft.dctn(..., norm="ortho")``), squared, and averaged over channels and over the
    N samples into P(u, v); the DC term is dropped; bin b holds the mean of P over coefficients
    with floor(sqrt(u^2 + v^2) / r_max * n_bins) = b. The bins are normalised to sum 1. Bins
    holding no coefficient (small maps) and the DC-only bin are NaN and excluded from the sum.

    Returns an (n_bins,) array. White noise has equal expected power at every non-DC
    coefficient, so its spectrum is flat over the occupied bins.
    """
    a = _np(x)
    if a.ndim != 4 or a.shape[-1] < 2 or a.shape[-2] < 2:
        raise UsageError(f"dct_radial_spectrum: expected (N, C, H, W) maps, got {list(a.shape)}")
    a = a - a.mean(axis=(-2, -1), keepdims=True)
    power = (scipy.fft.dctn(a, type=2, norm="ortho", axes=(-2, -1)) ** 2).mean(axis=(0, 1))
    power[0, 0] = np.nan
    bins = _radial_bins(*power.shape, n_bins).ravel()
    flat = power.ravel()
    keep = ~np.isnan(flat)
    sums = np.bincount(bins[keep], weights=flat[keep], minlength=n_bins)
    counts = np.bincount(bins[keep], minlength=n_bins)
    spec = np.full(n_bins, np.nan)
    spec[counts > 0] = sums[counts > 0] / counts[counts > 0]
    total = np.nansum(spec)
    return spec / total if total > 0 else spec


def spectrum_divergence(p_image: np.ndarray, q_latent: np.ndarray, eps: float = 1e-8) -> float:
    """KL(p || q) = sum_b p_b log(p_b / q_b) between two normalised radial spectra (nats).

    As SpectrumMatching: the image spectrum is the reference p, the latent's is q; eps is added
    to both before renormalising (so an empty latent band is a large but finite penalty). Bins
    that are NaN in either (unoccupied) are left out.
    """
    p, q = np.asarray(p_image, dtype=np.float64), np.asarray(q_latent, dtype=np.float64)
    if p.shape != q.shape:
        raise UsageError(f"spectrum_divergence: shapes differ ({p.shape} vs {q.shape})")
    ok = ~(np.isnan(p) | np.isnan(q))
    if not ok.any():
        raise UsageError("spectrum_divergence: no bin is occupied in both spectra")
    p, q = p[ok] + eps, q[ok] + eps
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def _blur_downsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Gaussian blur (sigma = 0.3 x downsampling factor, kernel 2 round(2.5 sigma) + 1, edges
    replicated) then bicubic resize to ``size``: SpectrumMatching's anti-aliased downsampling
    (sigma 1.2 / kernel 7 at factor 4)."""
    factor = max(x.shape[-2] / size[0], x.shape[-1] / size[1])
    if factor > 1:
        sigma = 0.3 * factor
        half = max(1, round(2.5 * sigma))
        ax = torch.arange(-half, half + 1, dtype=x.dtype)
        k1 = torch.exp(-(ax**2) / (2 * sigma**2))
        k2 = torch.outer(k1, k1)
        k2 = (k2 / k2.sum()).expand(x.shape[1], 1, -1, -1)
        x = F.conv2d(F.pad(x, (half,) * 4, mode="replicate"), k2, groups=x.shape[1])
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def latent_spectrum(latents: Any, images: Any, n_bins: int = N_BINS) -> dict[str, Any]:
    """Spectra of the latent and of the images downsampled to its size, and KL(image || latent).

    ``latents`` (N, C, h, w), ``images`` (M, C', H, W); the images are blurred and resized to
    (h, w) (``_blur_downsample``), then both go through ``dct_radial_spectrum``; the
    divergence is ``spectrum_divergence(image, latent)`` (Skorokhodov et al. 2025: latents carry
    excess high-frequency power, more with more channels; a larger KL means a latent spectrum
    further from the image's). Also reports the share of the latent's power in the upper half of
    the occupied bins (``high_freq_fraction``) beside the image's.
    """
    z = torch.as_tensor(_np(latents)).float()
    x = torch.as_tensor(_np(images)).float()
    if z.ndim != 4 or x.ndim != 4:
        raise UsageError("latent_spectrum: needs spatial latents and images (N, C, H, W)")
    x_small = _blur_downsample(x, tuple(z.shape[-2:]))
    sz, sx = dct_radial_spectrum(z, n_bins), dct_radial_spectrum(x_small, n_bins)
    occupied = np.flatnonzero(~np.isnan(sz))
    upper = occupied[len(occupied) // 2 :]
    return {
        "n_bins": n_bins,
        "latent": sz.tolist(),
        "image": sx.tolist(),
        "kl_image_latent": spectrum_divergence(sx, sz),
        "high_freq_fraction": {
            "latent": float(np.nansum(sz[upper])),
            "image": float(np.nansum(sx[upper])),
        },
    }


# ---------------------------------------------------------------- equivariance


def _downscale2(t: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Downscaling by 2: 2x2 average pooling (area interpolation), or adaptive average pooling to
    ``size`` when a side is odd (a latent of side 7 whose image halves to a latent of side 4)."""
    size = size or (t.shape[-2] // 2, t.shape[-1] // 2)
    return F.adaptive_avg_pool2d(t, size)


def equivariance_error(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    x: Any,
    transform: str,
    *,
    batch_size: int = 256,
) -> float:
    """EQ-VAE's relative equivariance error (Kouzelis et al. 2025, eq. 3), over the sample:

        err = sum_i ||E(T x_i) - T E(x_i)||^2 / sum_i ||E(T x_i)||^2

    ``transform``: ``"scale"`` (downscale by 2 with area averaging: ``T`` is 2x2 average pooling
    on the image; on the latent, average pooling to the size E gives the halved image, which is
    the same 2x2 pooling when the latent's sides are even) or ``"rot90"`` (a 90 degree rotation
    of the last two axes, ``torch.rot90``; needs square images and latents). An average-pooling
    encoder is exactly equivariant to both (err = 0). Raises UsageError where the shapes do not
    allow the transform.
    """
    xt = torch.as_tensor(_np(x)).float()
    if xt.ndim != 4:
        raise UsageError("equivariance_error: needs image data (N, C, H, W)")
    num = den = 0.0
    with torch.no_grad():
        for xb in xt.split(batch_size):
            z = encoder(xb).float()
            if z.ndim != 4:
                raise UsageError("equivariance_error: needs spatial latents (N, C, h, w)")
            if transform == "scale":
                if min(xb.shape[-2:]) < 4 or min(z.shape[-2:]) < 2:
                    raise UsageError("equivariance_error: images or latents too small to halve")
                z_t = encoder(_downscale2(xb)).float()
                t_z = _downscale2(z, tuple(z_t.shape[-2:]))
            elif transform == "rot90":
                if xb.shape[-1] != xb.shape[-2] or z.shape[-1] != z.shape[-2]:
                    raise UsageError("equivariance_error: rot90 needs square images and latents")
                z_t = encoder(torch.rot90(xb, 1, dims=(-2, -1))).float()
                t_z = torch.rot90(z, 1, dims=(-2, -1))
            else:
                raise UsageError(f"equivariance_error: unknown transform {transform!r}")
            if z_t.shape != t_z.shape:
                raise UsageError(
                    f"equivariance_error ({transform}): E(Tx) has shape {list(z_t.shape[1:])}, "
                    f"T E(x) {list(t_z.shape[1:])}"
                )
            num += float((z_t - t_z).double().square().sum())
            den += float(z_t.double().square().sum())
    return num / den if den > 0 else math.nan


# ---------------------------------------------------------------- statistics


def _channel_axis_stats(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std: over (N, *spatial) for (N, C, ...) latents, per feature for (N, d)."""
    axes = (0, *range(2, z.ndim))
    return z.mean(axis=axes), z.std(axis=axes)


def gaussian_kl_to_standard(z: Any, *, max_dim: int = 1024) -> dict[str, Any]:
    """KL(N(mu, S) || N(0, I)) of the Gaussian fitted to the flattened latent (nats).

    KL = 1/2 (tr S + |mu|^2 - d - log det S), mu and S the sample mean and covariance of the
    d-dimensional flattened latent (standard closed form; e.g. Kingma & Welling 2014, app. B).
    For a per-channel standardised latent the trace and mean terms are ~d and ~0, so the KL
    measures how far the latent's dependence structure is from independent unit Gaussians. The
    covariance is the empirical one when N > 2 d and it is non-singular, else the Ledoit-Wolf
    shrinkage estimate (scikit-learn), which stays invertible (constant directions); latents with more than ``max_dim`` dimensions are
    first projected on ``max_dim`` random orthonormal directions (seeded). Returns ``kl``,
    ``kl_per_dim`` and ``estimator``.
    """
    from sklearn.covariance import LedoitWolf

    a = _np(z)
    a = a.reshape(len(a), -1)
    n, d = a.shape
    if n < 3:
        raise UsageError("gaussian_kl_to_standard: need at least 3 latents")
    note = "empirical"
    if d > max_dim:
        q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((d, max_dim)))
        a, d, note = a @ q, max_dim, f"empirical, {max_dim} random orthonormal directions"
    mu = a.mean(0)
    cov = np.cov(a, rowvar=False).reshape(d, d)
    eig = np.linalg.eigvalsh(cov)
    if n <= 2 * d or eig[0] <= 1e-9 * max(eig[-1], 1e-300):
        cov, note = LedoitWolf().fit(a).covariance_, note.replace("empirical", "Ledoit-Wolf")
    sign, logdet = np.linalg.slogdet(cov)
    kl = 0.5 * (np.trace(cov) + mu @ mu - d - logdet) if sign > 0 else math.inf
    return {"kl": float(kl), "kl_per_dim": float(kl / d), "estimator": note, "dim": d}


def latent_statistics(z: Any) -> dict[str, Any]:
    """Per-channel statistics of a latent sample, as diffusion users inspect them.

    * ``channel_mean`` / ``channel_std``: mean and standard deviation of each channel over
      samples and positions (LightningDiT, ``tools/latent_vis.py``);
    * ``scaling_factor`` = 1 / std(z) over all elements: the constant Stable Diffusion
      multiplies its latents by before diffusion (0.18215 for SD's VAE; Rombach et al. 2022);
    * ``std_spread`` = max / min channel std (1 when the channels are balanced);
    * ``gaussian_kl``: ``gaussian_kl_to_standard`` of the per-channel standardised latent.
    """
    a = _np(z)
    if a.ndim < 2 or len(a) < 3:
        raise UsageError("latent_statistics: need latents of shape (N >= 3, ...)")
    mean, std = _channel_axis_stats(a)
    safe = np.where(std > 1e-12, std, 1.0)
    shape = (1, -1) + (1,) * (a.ndim - 2)
    standardised = (a - mean.reshape(shape)) / safe.reshape(shape)
    gstd = float(a.std())
    return {
        "channel_mean": mean.tolist() if mean.size <= 64 else None,
        "channel_std": std.tolist() if std.size <= 64 else None,
        "mean_abs_channel_mean": float(np.abs(mean).mean()),
        "global_std": gstd,
        "scaling_factor": 1.0 / gstd if gstd > 0 else math.inf,
        "std_spread": float(std.max() / std.min()) if std.min() > 0 else math.inf,
        "gaussian_kl": gaussian_kl_to_standard(standardised),
    }


# ---------------------------------------------------------------- modes


def gmm_modes(
    z: Any,
    *,
    max_components: int = 10,
    n_pca: int = 8,
    n_max: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Number of Gaussian-mixture modes of the latent, chosen by BIC (MAETok's mode count).

    The flattened latent (subsampled, seeded, to ``n_max`` rows) is centred and scaled by its
    overall std (per-dimension scaling would lift pure-noise directions to the level of the
    structured ones before PCA chooses among them), reduced by PCA to ``n_pca`` components (``sklearn.decomposition.PCA``), and full-covariance
    ``sklearn.mixture.GaussianMixture`` models with k = 1 .. ``max_components`` are fitted; the
    chosen k minimises BIC = -2 log L + p log N (Schwarz 1978). MAETok (Chen et al. 2025) reports
    that latents with fewer modes give lower diffusion loss. Returns ``n_modes``, the BIC
    curve, and ``saturated`` (the largest k won: the count is a lower bound).
    """
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    a = _np(z)
    a = a.reshape(len(a), -1)
    if len(a) > n_max:
        a = a[np.sort(np.random.default_rng(seed).choice(len(a), n_max, replace=False))]
    if len(a) < 2 * max_components:
        raise UsageError(f"gmm_modes: need at least {2 * max_components} latents")
    a = (a - a.mean(0)) / max(float(a.std()), 1e-12)
    k_pca = min(n_pca, a.shape[1], len(a) - 1)
    if a.shape[1] > k_pca:
        a = PCA(n_components=k_pca, random_state=seed).fit_transform(a)
    with threadpool_limits(1):  # small EM problems: BLAS threads only oversubscribe (50x slower)
        bics = [
            float(
                GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=seed)
                .fit(a)
                .bic(a)
            )
            for k in range(1, max_components + 1)
        ]
    n_modes = int(np.argmin(bics)) + 1
    return {
        "n_modes": n_modes,
        "saturated": n_modes == max_components,  # BIC still falling: at least this many
        "bic": bics,
        "pca_dims": int(a.shape[1]),
        "rows": len(a),
    }


# ---------------------------------------------------------------- decoder robustness


def decoder_robustness(
    decoder: Callable[[torch.Tensor], torch.Tensor],
    z: Any,
    x: Any,
    sigmas: Sequence[float] = DIAGNOSTIC_SIGMAS,
    *,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Reconstruction MSE when Gaussian noise is added to the standardised latent (l-DeTok view).

    With per-channel mean m_c and std s_c of ``z`` (N, C, ...) (per feature for (N, d)):
    z_sigma = z + sigma * s * eps, eps ~ N(0, I) (noise of std sigma in the standardised
    latent), and MSE(sigma) = mean over all elements of (D(z_sigma) - x)^2. sigma = 0 is the
    plain reconstruction error; ``ratio`` is MSE(sigma) / MSE(0). Yang et al. 2025 (l-DeTok)
    train decoders on such corrupted latents; a decoder whose error grows slowly with sigma
    forgives the imperfect latents a generator produces.
    """
    zt = torch.as_tensor(_np(z)).float()
    xt = torch.as_tensor(_np(x)).float()
    if len(zt) != len(xt) or len(zt) == 0:
        raise UsageError("decoder_robustness: latents and data must have the same (>0) rows")
    _, std = _channel_axis_stats(zt.double().numpy())
    s = torch.as_tensor(std, dtype=torch.float32).reshape((1, -1) + (1,) * (zt.ndim - 2))
    gen = torch.Generator().manual_seed(seed)
    mse: dict[str, float] = {}
    with torch.no_grad():
        for sigma in (0.0, *sigmas):
            total = 0.0
            for zb, xb in zip(zt.split(batch_size), xt.split(batch_size), strict=True):
                noisy = zb + sigma * s * torch.randn(zb.shape, generator=gen)
                total += float((decoder(noisy).float() - xb).double().square().sum())
            mse[f"{sigma:g}"] = total / xt.numel()
    base = mse["0"]
    return {
        "sigmas": [float(s_) for s_ in sigmas],
        "mse": mse,
        "ratio": {k: (v / base if base > 0 else math.inf) for k, v in mse.items() if k != "0"},
        "definition": "MSE of D(z + sigma * s_c * eps) vs x, s_c the per-channel latent std",
    }


# ---------------------------------------------------------------- all at once


def _skip(note: str) -> dict[str, str]:
    return {"skipped": note}


def latent_diagnostics(
    z: Any,
    x: Any | None = None,
    *,
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    discrete: bool = False,
    n_max: int = 2000,
    n_equivariance: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Every diagnostic that applies to latents ``z`` (N, ...) of data ``x`` (M, ...).

    ``spectrum`` needs spatial latents and image data; ``equivariance`` needs the ``encoder``
    (applied to the first ``n_equivariance`` rows of ``x``) and spatial shapes; the others take
    any continuous latent; ``discrete`` latents (integer VQ code indices) get none of the three
    (indices have no spectrum, scale or modes). What cannot be computed is
    ``{"skipped": reason}``. ``decoder_robustness`` needs the decoder and is
    added by ``compare``.
    """
    import time

    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    with threadpool_limits(1):  # small linear algebra: extra BLAS threads only oversubscribe
        out = _all_diagnostics(z, x, encoder, discrete, n_max, n_equivariance, seed)
    out["time_s"] = time.perf_counter() - t0
    return {k: out[k] for k in DIAGNOSTIC_KEYS}


def _all_diagnostics(z, x, encoder, discrete, n_max, n_equivariance, seed) -> dict[str, Any]:
    zt = torch.as_tensor(_np(z)) if not isinstance(z, torch.Tensor) else z.detach().cpu()
    zt = zt.double()
    if len(zt) > n_max:
        g = torch.Generator().manual_seed(seed)
        zt = zt[torch.randperm(len(zt), generator=g)[:n_max].sort().values]
    xt = None if x is None else torch.as_tensor(_np(x))
    spatial = zt.ndim == 4
    images = xt is not None and xt.ndim == 4
    out: dict[str, Any] = {}
    if discrete:
        note = _skip("integer code indices (VQ codes): no spectrum, statistics or modes")
        out["spectrum"] = out["statistics"] = out["modes"] = note
    elif spatial and images and min(zt.shape[-2:]) >= 2:
        out["spectrum"] = latent_spectrum(zt, xt[:n_max])
    else:
        out["spectrum"] = _skip("needs spatial (N, C, h, w) latents and image data")
    eq: dict[str, Any] = {}
    for name, tf in (("scale_2x", "scale"), ("rot90", "rot90")):
        if encoder is None:
            eq[name] = _skip("needs the encoder (only latents were given)")
        elif not (spatial and images):
            eq[name] = _skip("needs spatial latents and image data")
        else:
            try:
                eq[name] = equivariance_error(encoder, xt[:n_equivariance].float(), tf)
            except UsageError as e:
                eq[name] = _skip(str(e).removeprefix("equivariance_error: "))
    out["equivariance"] = eq
    if not discrete:
        out["statistics"] = latent_statistics(zt)
        try:
            out["modes"] = gmm_modes(zt, seed=seed)
        except UsageError as e:
            out["modes"] = _skip(str(e))
    out["decoder_robustness"] = _skip("needs the decoder (compare only)")
    return out
