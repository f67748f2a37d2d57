"""Geometry of a latent sample: intrinsic dimension, effective rank, variance spectrum, codebooks."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from latentdist.errors import UsageError


def _as_matrix(z: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, *shape) -> float64 (N, D), checked finite."""
    x = z.detach().cpu().numpy() if isinstance(z, torch.Tensor) else np.asarray(z)
    if x.ndim < 2 or x.shape[0] < 2:
        raise UsageError(
            f"latents must have shape (N, *latent_shape) with N >= 2, got {list(x.shape)}"
        )
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    if not np.isfinite(x).all():
        raise UsageError("latents contain NaN or infinite values")
    return x


def _subsample(x: np.ndarray, n_max: int, seed: int) -> np.ndarray:
    if x.shape[0] <= n_max:
        return x
    idx = np.random.default_rng(seed).choice(x.shape[0], size=n_max, replace=False)
    return x[np.sort(idx)]


def _centred_spectrum(x: np.ndarray) -> np.ndarray:
    """Squared singular values of the centred (N, D) matrix, descending, via the smaller Gram."""
    xc = x - x.mean(axis=0, keepdims=True)
    gram = xc @ xc.T if xc.shape[0] < xc.shape[1] else xc.T @ xc
    return np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)


def intrinsic_dimension(
    z: torch.Tensor | np.ndarray, *, n_max: int = 2000, seed: int = 0, k: int = 20
) -> dict:
    """Intrinsic dimension of the latent sample by two scikit-dimension estimators.

    * TwoNN (Facco, d'Errico, Rodriguez & Laio 2017): the ratio mu = r_2 / r_1 of each point's
      second to first neighbour distance is Pareto with index d; fitted by the linear regression of
      -log(1 - F(mu)) on log(mu), discarding the top 10 % (``skdim.id.TwoNN``).
    * MLE (Levina & Bickel 2005): d_i = [(1/(k-1)) sum_{j<k} log(r_k / r_j)]^{-1} over the k = 20
      nearest neighbours, combined as 1 / mean(1 / d_i) (MacKay & Ghahramani) (``skdim.id.MLE``).

    Latents are flattened and subsampled (seeded) to ``n_max`` points. Exact duplicate points are
    removed first: a zero neighbour distance makes log(r_2 / r_1) infinite, and duplicates carry no
    geometric information. ``n_points`` is the number of distinct points used.
    """
    import skdim

    x = _subsample(_as_matrix(z), n_max, seed)
    x = np.unique(x, axis=0)
    if x.shape[0] < max(10, k + 1) or x.shape[1] < 2:
        raise UsageError(
            f"intrinsic dimension needs >= {max(10, k + 1)} distinct points of dimension >= 2, "
            f"got {x.shape[0]} of dimension {x.shape[1]}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        twonn = skdim.id.TwoNN().fit(x).dimension_
        mle = skdim.id.MLE().fit(x, n_neighbors=k).dimension_
    return {"twonn": float(twonn), "mle": float(mle), "n_points": int(x.shape[0])}


def effective_rank(z: torch.Tensor | np.ndarray) -> float:
    """Effective rank of Roy & Vetterli (2007): exp(H(p)), p_i = s_i / sum_j s_j, H the Shannon
    entropy (0 log 0 = 0), s_i the singular values of the centred (N, D) data matrix. Equals r for
    r equal nonzero singular values; lies in [1, min(N - 1, D)] (0 for a constant sample)."""
    x = _as_matrix(z)
    # SVD of the data itself, not sqrt of Gram eigenvalues (which turn rounding into ~1e-8 values);
    # values below the numerical-rank cutoff of numpy.linalg.matrix_rank count as zero
    s = np.linalg.svd(x - x.mean(axis=0, keepdims=True), compute_uv=False)
    s = s[s > s.max(initial=0.0) * max(x.shape) * np.finfo(np.float64).eps]
    total = s.sum()
    if total <= 0:
        return 0.0  # all points equal: no direction of variation (the matrix is zero)
    p = s / total
    return float(np.exp(-(p * np.log(p)).sum()))


def variance_spectrum(z: torch.Tensor | np.ndarray, *, top: int = 64) -> list[float]:
    """Explained-variance ratios lambda_i / sum_j lambda_j of the sample covariance, descending,
    first ``top`` (PCA; lambda_i = s_i^2 / (N - 1) for the centred data's singular values)."""
    lam = _centred_spectrum(_as_matrix(z))
    total = lam.sum()
    if total <= 0:
        return []
    return [float(v) for v in lam[:top] / total]


def codebook_usage(codes: torch.Tensor | np.ndarray, n_codes: int | None = None) -> dict:
    """Usage of a K-entry codebook by integer codes (any shape).

    usage = counts / total; 'perplexity' = exp(H(usage)) (natural log, 0 log 0 = 0), the effective
    number of codes in use (van den Oord et al. 2017; K when uniform); 'dead_fraction' = the
    fraction of the K codes never used. K = ``n_codes``, or max(code) + 1 if not given.
    """
    c = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if c.size == 0:
        raise UsageError("codebook usage needs at least one code")
    if not np.issubdtype(c.dtype, np.integer):
        if not (np.isfinite(c).all() and np.all(c == np.round(c))):
            raise UsageError(f"codes must be integers, got dtype {c.dtype} with fractional values")
        c = c.astype(np.int64)
    c = c.reshape(-1)
    if c.min() < 0:
        raise UsageError(f"codes must be >= 0, got {int(c.min())}")
    k = int(c.max()) + 1 if n_codes is None else int(n_codes)
    if k < 1 or c.max() >= k:
        raise UsageError(f"codes up to {int(c.max())} do not fit a codebook of {k} entries")
    counts = np.bincount(c, minlength=k)
    p = counts[counts > 0] / c.size
    return {
        "perplexity": float(np.exp(-(p * np.log(p)).sum())),
        "dead_fraction": float((counts == 0).sum() / k),
        "n_codes": k,
        "usage": [int(n) for n in counts],
    }


def nearest_codes(
    z: torch.Tensor | np.ndarray, codebook: torch.Tensor | np.ndarray, *, chunk: int = 65536
) -> torch.Tensor:
    """Index of the nearest codebook vector (Euclidean) for each latent vector.

    ``codebook`` is (K, C). The channel dimension of z is dim 1 for (N, C, H, W) maps and the last
    dimension otherwise ((N, C) vectors, (N, L, C) token sequences). Returns int64 codes of z's
    shape without the channel dimension.
    """
    z = torch.as_tensor(z).detach().cpu().double()
    cb = torch.as_tensor(codebook).detach().cpu().double()
    if cb.ndim != 2:
        raise UsageError(f"codebook must be (K, C), got shape {list(cb.shape)}")
    if z.ndim == 4:
        z = z.movedim(1, -1)
    elif z.ndim < 2:
        raise UsageError(f"latents must be (N, C), (N, L, C) or (N, C, H, W), got {list(z.shape)}")
    if z.shape[-1] != cb.shape[1]:
        raise UsageError(
            f"latent channel size {z.shape[-1]} does not match codebook width {cb.shape[1]}"
        )
    flat = z.reshape(-1, cb.shape[1])
    idx = torch.cat(
        [torch.cdist(flat[i : i + chunk], cb).argmin(dim=1) for i in range(0, flat.shape[0], chunk)]
    )
    return idx.view(z.shape[:-1])


def latent_geometry(
    z: torch.Tensor | np.ndarray,
    *,
    codebook: torch.Tensor | np.ndarray | None = None,
    is_integer: bool = False,
    n_max: int = 2000,
    seed: int = 0,
    top: int = 64,
) -> dict:
    """Geometry of a latent sample (SPEC section 2).

    {'shape': per-sample shape, 'intrinsic_dim': ``intrinsic_dimension``, 'effective_rank',
    'variance_spectrum' (top ``top`` ratios), 'n_points': points used (after the seeded subsample
    to ``n_max``), and 'codebook': ``codebook_usage``}. The codebook entry is present only for
    integer latents (``is_integer``: the values are the codes, K = max + 1) or when a ``codebook``
    is given (codes = ``nearest_codes``, K = its rows); usage counts all N latents, not the
    subsample. Effective rank and the spectrum are computed
    on the same subsample (both depend on N when N < D). Intrinsic dimension is None when the sample
    has too few distinct points for it (e.g. a handful of tokens).
    """
    full = z.detach().cpu().numpy() if isinstance(z, torch.Tensor) else np.asarray(z)
    x = _subsample(_as_matrix(full), n_max, seed)
    try:
        idim: dict | None = intrinsic_dimension(x, n_max=n_max, seed=seed)
    except UsageError:
        idim = None
    out = {
        "shape": list(full.shape[1:]),
        "intrinsic_dim": idim,
        "effective_rank": effective_rank(x),
        "variance_spectrum": variance_spectrum(x, top=top),
        "n_points": int(x.shape[0]),
    }
    if codebook is not None:
        out["codebook"] = codebook_usage(
            nearest_codes(full, codebook), n_codes=int(np.shape(codebook)[0])
        )
    elif is_integer:
        out["codebook"] = codebook_usage(full)
    return out
