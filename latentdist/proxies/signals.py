"""Cheap predictors of generation quality (docs/proxies.md, *Cheap predictors of generation*).

Signals that recent tokenizer work reports to track the FID of a generator trained on the latent,
without training that generator. Each is a plain function over tensors; the ones that need a
decoder and a feature space take them as callables, so this layer imports nothing from
``latentdist.evaluation``:

* ``interpolation_fd``: decode mixtures of a latent and one of its nearest latent neighbours,
  Frechet distance of the decodes to data (iFID; Xu et al. 2026, arXiv 2603.05630);
* ``perturbation_fd``: swap a share of VQ tokens for near codebook neighbours, decode, Frechet
  distance (pFID; Qiu et al. 2025, arXiv 2509.12474);
* ``velocity_irreducible_variance``: the loss floor of any flow-matching velocity net on the
  latent, from trajectory crossings (VIV; Zhong et al. 2026, arXiv 2606.03578);
* ``linear_probe_accuracy``: held-out accuracy of a logistic regression on the latent.

Every Frechet distance here is reported beside its floor: the same distance between the data
rows whose latents were mixed or perturbed and the reference rows. Decodes that equal those data
rows score exactly the floor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from latentdist.device import torch_threads
from latentdist.discrepancy import frechet_distance
from latentdist.errors import UsageError
from latentdist.proxies.geometry import nearest_codes
from latentdist.stats import mean_ci

__all__ = [
    "interpolation_fd",
    "latent_neighbours",
    "linear_probe_accuracy",
    "mix_latents",
    "perturb_codes",
    "perturbation_fd",
    "slerp",
    "standardise_channels",
    "velocity_irreducible_variance",
]

Decode = Callable[[torch.Tensor], torch.Tensor]  # (n, *latent_shape) -> (n, *data_shape)
Features = Callable[[torch.Tensor], Any]  # (n, *data_shape) -> (n, F) array or tensor
MIX_MODES = ("linear", "slerp")


def _rows(z: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z)
    return t.detach().cpu().double().reshape(len(t), -1)


def _interval(values: np.ndarray) -> list[float] | None:
    """The 95 % Student-t interval of the mean of ``values`` (None for fewer than 2)."""
    return mean_ci(values)["ci"]


# ---------------------------------------------------------------- interpolation FD (iFID)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation of flattened rows (Shoemake 1985):

        slerp(a, b; t) = sin((1 - t) theta) / sin theta * a + sin(t theta) / sin theta * b,

    theta the angle between a and b, taken as 2 atan2(|a' - b'|, |a' + b'|) of the unit rows
    (accurate for nearly parallel rows, where acos of the cosine is not); rows with
    sin theta < 1e-6 (parallel, or a zero row) mix linearly, as iFID's reference code does
    (tongdaxu/Making-rFID-Predictive-of-Diffusion-gFID, ``ifid.py``).
    """
    af, bf = a.reshape(len(a), -1), b.reshape(len(b), -1)
    an = af / af.norm(dim=1, keepdim=True).clamp_min(1e-30)
    bn = bf / bf.norm(dim=1, keepdim=True).clamp_min(1e-30)
    theta = 2 * torch.atan2((an - bn).norm(dim=1), (an + bn).norm(dim=1))
    sin = torch.sin(theta)
    flat = sin < 1e-6
    sin = torch.where(flat, torch.ones_like(sin), sin)
    wa = torch.where(flat, 1.0 - t, torch.sin((1 - t) * theta) / sin)[:, None]
    wb = torch.where(flat, t, torch.sin(t * theta) / sin)[:, None]
    return (wa * af + wb * bf).reshape(a.shape)


def mix_latents(a: torch.Tensor, b: torch.Tensor, t: float, mode: str) -> torch.Tensor:
    """``(1 - t) a + t b`` (``mode`` 'linear') or ``slerp(a, b, t)`` ('slerp')."""
    if mode == "linear":
        return (1 - t) * a + t * b
    if mode == "slerp":
        return slerp(a, b, t)
    raise UsageError(f"mix mode {mode!r}: expected one of {', '.join(MIX_MODES)}")


def latent_neighbours(
    z_query: Any, z_pool: Any, *, k: int = 10, mode: str = "linear", seed: int = 0
) -> np.ndarray:
    """For each query latent, the index in ``z_pool`` of one of its ``k`` nearest neighbours.

    As iFID's reference code: neighbours by Euclidean distance for linear mixing and by cosine
    similarity for slerp; among the k, one is drawn with probability
    ``softmax_j(-mean_e (z_i,e - z_j,e)^2)`` (the mean squared difference over latent elements).
    """
    q, p = _rows(z_query).numpy(), _rows(z_pool).numpy()
    k = min(k, len(p))
    metric = "euclidean" if mode == "linear" else "cosine"
    _, idx = NearestNeighbors(n_neighbors=k, metric=metric, algorithm="brute").fit(p).kneighbors(q)
    mse = ((q[:, None, :] - p[idx]) ** 2).mean(axis=2)
    logits = -(mse - mse.min(axis=1, keepdims=True))
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    pick = (w.cumsum(axis=1) < rng.random((len(q), 1))).sum(axis=1).clip(0, k - 1)
    return idx[np.arange(len(q)), pick]


def _fd(features: Features, x: torch.Tensor, ref_feats: Any) -> float:
    return frechet_distance(features(x), ref_feats)


def interpolation_fd(
    z_query: torch.Tensor,
    z_pool: torch.Tensor,
    x_query: torch.Tensor,
    x_ref: torch.Tensor,
    decode: Decode,
    features: Features,
    *,
    k: int = 10,
    alpha: float = 0.5,
    modes: Sequence[str] = MIX_MODES,
    x_recon: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Interpolation FD (iFID; Xu et al., "Making Reconstruction FID Predictive of Diffusion
    Generation FID", arXiv 2603.05630, 2026): Spearman ~0.85 with diffusion gFID over 22 tokenizers.

    For every query latent z_i, one of its ``k`` nearest latents z_j in ``z_pool`` is drawn
    (``latent_neighbours``: softmax of minus the mean squared difference, the reference code's
    rule), the two are mixed at ``alpha`` (0.5, the paper's), linearly ``(1 - a) z_i + a z_j``
    and by ``slerp``, and the mixtures are decoded:

        iFID_mode = FD(phi(D(mix_mode(z_i, z_j))), phi(x_ref))

    with phi = ``features`` and FD the Frechet distance of Gaussian fits. Departure from the
    reference code, which scores the decodes against the very images whose latents were mixed:
    the reference here is a separate data sample ``x_ref`` (compare: as many training rows as
    there are held-out query rows), so the value has a floor, ``floor = FD(phi(x_query), phi(x_ref))`` at the same sample
    sizes; decodes equal to the query data score exactly the floor. ``reconstruction`` is
    ``FD(phi(D(z_query)), phi(x_ref))``, the same rows without mixing (rFID in this form);
    ``x_recon``: D(z_query) when already decoded. ``z_pool`` must not contain the query rows.
    """
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"interpolation_fd: alpha {alpha} outside [0, 1]")
    zq, zp = torch.as_tensor(z_query).float(), torch.as_tensor(z_pool).float()
    ref = features(torch.as_tensor(x_ref).float())
    out: dict[str, Any] = {
        "floor": _fd(features, torch.as_tensor(x_query).float(), ref),
        "reconstruction": _fd(features, decode(zq) if x_recon is None else x_recon, ref),
    }
    for i, mode in enumerate(modes):
        nb = latent_neighbours(zq, zp, k=k, mode=mode, seed=seed + i)
        out[mode] = _fd(features, decode(mix_latents(zq, zp[nb], alpha, mode)), ref)
    out.update(k=min(k, len(zp)), alpha=alpha, n_query=len(zq), n_pool=len(zp), n_ref=len(ref))
    return out


# ---------------------------------------------------------------- perturbation FD (pFID)


def perturb_codes(
    codes: torch.Tensor, codebook: torch.Tensor, *, rate: float, strength: int, seed: int = 0
) -> tuple[torch.Tensor, float]:
    """RobusTok's latent perturbation (Qiu et al. 2025, arXiv 2509.12474, section 3): each token
    is replaced, with probability ``rate``, by one of the ``strength`` nearest other codebook
    vectors of its code (Euclidean, drawn uniformly). Returns the new codes and the share of
    tokens replaced."""
    cb = torch.as_tensor(codebook).detach().cpu().double()
    strength = min(strength, len(cb) - 1)
    if strength < 1 or not 0.0 <= rate <= 1.0:
        raise UsageError("perturb_codes: need rate in [0, 1] and a codebook of >= 2 codes")
    d = torch.cdist(cb, cb)
    d.fill_diagonal_(math.inf)  # the code itself never counts as its neighbour
    table = d.argsort(dim=1)[:, :strength]  # (K, strength)
    gen = torch.Generator().manual_seed(seed)
    swap = torch.rand(codes.shape, generator=gen) < rate
    pick = torch.randint(strength, codes.shape, generator=gen)
    return torch.where(swap, table[codes, pick], codes), float(swap.double().mean())


def _embed(codes: torch.Tensor, codebook: torch.Tensor, latent_ndim: int) -> torch.Tensor:
    """Codebook vectors of ``codes``, channel at dim 1 for (N, C, H, W) latents (as the VQ
    bottleneck lays them out), last otherwise."""
    z = torch.as_tensor(codebook).float()[codes]
    return z.movedim(-1, 1) if latent_ndim == 4 else z


def perturbation_fd(
    z_query: torch.Tensor,
    codebook: torch.Tensor,
    x_query: torch.Tensor,
    x_ref: torch.Tensor,
    decode: Decode,
    features: Features,
    *,
    rate: float = 0.1,
    strength: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Perturbation FD (pFID; Qiu et al., "Image Tokenizer Needs Post-Training", arXiv
    2509.12474, 2025: rho > 0.95 with autoregressive gFID over 11 discrete tokenizers).

    The query latents are quantised to their codes (``nearest_codes``), each token is swapped
    with probability ``rate`` for one of the ``strength`` nearest other codebook vectors
    (``perturb_codes``), and the perturbed code maps are decoded:

        pFID = FD(phi(D(e[perturb(c)])), phi(x_ref))

    The papers' evaluation values of rate and strength are not given in what we could read;
    rate 0.1 of tokens and the 8 nearest codes are our choice (their training perturbation
    draws rate and strength from ranges). ``floor`` = FD(phi(x_query), phi(x_ref)) and
    ``reconstruction`` = FD(phi(D(e[c])), phi(x_ref)) (no swap) as in ``interpolation_fd``.
    """
    zq = torch.as_tensor(z_query).float()
    codes = nearest_codes(zq, codebook)
    new, share = perturb_codes(codes, codebook, rate=rate, strength=strength, seed=seed)
    ref = features(torch.as_tensor(x_ref).float())
    return {
        "fd": _fd(features, decode(_embed(new, codebook, zq.ndim)), ref),
        "floor": _fd(features, torch.as_tensor(x_query).float(), ref),
        "reconstruction": _fd(features, decode(_embed(codes, codebook, zq.ndim)), ref),
        "rate": rate,
        "strength": min(strength, len(codebook) - 1),
        "swapped_share": share,
        "n_query": len(zq),
        "n_ref": len(ref),
    }


# ---------------------------------------------------------------- velocity irreducible variance


def standardise_channels(z: torch.Tensor) -> torch.Tensor:
    """Per-channel standardisation (dimension 1; per feature for (N, d) vectors), as the
    generation probe standardises latents before its flow (``latentdist.evaluation.probe``)."""
    dims = [0, *range(2, z.ndim)]
    scale = z.std(dim=dims, keepdim=True)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    return (z - z.mean(dim=dims, keepdim=True)) / scale


def _posterior_gap(zs: torch.Tensor, xt: torch.Tensor, t: float) -> torch.Tensor:
    """||z_i - E[z | x_t,i]||^2 per query under the empirical distribution of ``zs``:
    E[z | x_t] = sum_j w_j z_j, w = softmax_j(-||x_t - t z_j||^2 / (2 (1 - t)^2))."""
    sq = (xt * xt).sum(1, keepdim=True) - 2 * t * xt @ zs.T + t * t * (zs * zs).sum(1)[None]
    w = torch.softmax(-sq / (2 * (1 - t) ** 2), dim=1)
    return (zs - w @ zs).square().sum(1)


def velocity_irreducible_variance(
    z: Any,
    *,
    n_max: int = 1000,
    times: int | Sequence[float] = 16,
    standardise: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Velocity irreducible variance (VIV; Zhong et al., "Diffusing in the Right Space", arXiv
    2606.03578, 2026: the velocity ambiguity left by trajectory crossings).

    Flow matching on the latent z (per-channel standardised, as the probe does): x_0 ~ N(0, I),
    x_t = (1 - t) x_0 + t z, target u = z - x_0. No velocity network can go below

        V(t) = E ||u - E[u | x_t]||^2 = E ||z - E[z | x_t]||^2 / (1 - t)^2

    (u = (z - x_t) / (1 - t)). E[z | x_t] is the exact posterior mean under the empirical
    distribution of the latent rows (``_posterior_gap``; the queries are the rows themselves,
    each with one draw of x_0 per t), i.e. the floor of a net fitted to these rows. ``viv`` is
    the average of V over ``times`` (midpoints of ``times`` equal cells of [0, 1], or the given
    t) divided by the total variance of u, Var(z) + d (z and x_0 independent): a share in [0, 1]
    by the law of total variance, invariant to per-channel scaling of the latent. ``profile``
    is V(t) / Var(u) per t; the interval is Student-t over query rows (noise draws; the rows
    defining the distribution are fixed). For z ~ N(0, S) after standardisation,
    V(t) = sum_i lambda_i / (t^2 lambda_i + (1 - t)^2) (S's eigenvalues) and the t-average is
    pi sum_i sqrt(lambda_i) / 2: ``viv`` -> pi / 4 for an isotropic Gaussian (test). Memorising
    the rows drives V to 0 near t = 1, so values depend on the number of rows: compare latents
    at equal ``n_max``.
    """
    zt = torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z).double()
    if zt.ndim < 2 or len(zt) < 2:
        raise UsageError("velocity_irreducible_variance: need latents of shape (N >= 2, ...)")
    gen = torch.Generator().manual_seed(seed)
    if len(zt) > n_max:
        zt = zt[torch.randperm(len(zt), generator=gen)[:n_max]]
    zs = (standardise_channels(zt) if standardise else zt).reshape(len(zt), -1)
    ts = [(i + 0.5) / times for i in range(times)] if isinstance(times, int) else list(times)
    total = float(zs.var(dim=0, unbiased=False).sum()) + zs.shape[1]
    per_t = []
    with torch_threads(1):  # 1000 x 1000 products: one thread is 3x faster on a busy machine
        for t in ts:
            x0 = torch.randn(zs.shape, generator=gen, dtype=zs.dtype)
            per_t.append(_posterior_gap(zs, (1 - t) * x0 + t * zs, t) / (1 - t) ** 2)
    per_query = (torch.stack(per_t).mean(0) / total).numpy()
    return {
        "viv": float(per_query.mean()),
        "ci": _interval(per_query),
        "profile": [
            {"t": t, "share": float(v.mean()) / total} for t, v in zip(ts, per_t, strict=True)
        ],
        "total_variance_per_dim": total / zs.shape[1],
        "dim": zs.shape[1],
        "rows": len(zs),
        "standardised": standardise,
    }


# ---------------------------------------------------------------- linear-probe accuracy


def linear_probe_accuracy(
    z: Any,
    labels: Any,
    *,
    n_splits: int = 5,
    test_size: float = 0.25,
    n_max: int = 2000,
    max_iter: int = 300,
    seed: int = 0,
) -> dict[str, Any]:
    """Held-out accuracy of a linear classifier on the flattened latent (linear probing; Alain &
    Bengio 2016). On ``n_splits`` seeded stratified splits of at most ``n_max`` rows, features
    standardised on the training part and an L2-regularised (C = 1) multinomial logistic
    regression (scikit-learn, lbfgs, ``max_iter``) fitted; ``accuracy`` is the mean test
    accuracy with its Student-t 95 % interval over splits; ``chance`` the share of the most
    frequent class in the test parts (what predicting it alone scores). iFID's table
    (arXiv 2603.05630) reports this accuracy correlating -0.82 with gFID across tokenizers;
    GigaTok (arXiv 2504.08736) reports it does not predict generation: it is reported, not
    trusted.
    """
    x = _rows(z).numpy()
    y = np.asarray(labels).reshape(-1)
    if len(y) != len(x):
        raise UsageError(f"linear_probe_accuracy: {len(x)} latents but {len(y)} labels")
    rng = np.random.default_rng(seed)
    if len(x) > n_max:
        keep = rng.choice(len(x), n_max, replace=False)
        x, y = x[keep], y[keep]
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise UsageError("linear_probe_accuracy: the labels hold a single class")
    split = StratifiedShuffleSplit if counts.min() >= 2 else ShuffleSplit
    splitter = split(n_splits=n_splits, test_size=test_size, random_state=seed)
    acc, chance = [], []
    with threadpool_limits(1):  # small lbfgs problems: BLAS threads only oversubscribe
        for tr, te in splitter.split(x, y):
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
            acc.append(float(clf.fit(x[tr], y[tr]).score(x[te], y[te])))
            chance.append(float(np.unique(y[te], return_counts=True)[1].max() / len(te)))
    a = np.asarray(acc)
    return {
        "accuracy": float(a.mean()),
        "ci": _interval(a),
        "per_split": acc,
        "chance": float(np.mean(chance)),
        "n_classes": len(classes),
        "rows": len(x),
        "n_splits": n_splits,
    }
