"""Generation-quality metrics and latent priors for ``latentdist compare`` (docs/metrics.md).

* ``kid_subsets``: kernel inception distance, the unbiased MMD^2 with a cubic polynomial kernel
  averaged over random subsets (Binkowski et al. 2018; ``latentdist.discrepancy.kid`` is the
  same estimator on the whole samples).
* ``prdc``: precision, recall, density, coverage of k-NN manifolds (Naeem et al. 2020).
* ``GaussianMixturePrior`` / ``CodePrior``: priors fitted to continuous latents / VQ code maps,
  so a decoder can be fed *generated* latents rather than encodings of real data.
* ``generation_metrics``: the Frechet distance, ``kid_subsets`` and ``prdc`` in one feature space,
  plus the data-space W2.

The Frechet distance and the feature space (``FeatureNet``, ``train_feature_net``,
``load_feature_extractor``) live in the metric layer, ``latentdist.discrepancy``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits
from torch import nn

from latentdist.discrepancy import as_rows, extract_features, frechet_distance, kid, w2
from latentdist.errors import UsageError

__all__ = [
    "CodePrior",
    "GaussianMixturePrior",
    "generation_metrics",
    "kid_subsets",
    "prdc",
]


# ---------------------------------------------------------------- kernel inception distance


def kid_subsets(
    feat_a: Any,
    feat_b: Any,
    *,
    n_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> float:
    """Kernel inception distance (Binkowski et al., "Demystifying MMD GANs", ICLR 2018).

    The unbiased estimate of MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / F + 1)^3
    (F the feature size), on random subsets of m = min(``subset_size``, n_a, n_b) rows of each
    set (without replacement, seeded), averaged over ``n_subsets`` subsets:

        MMD^2_u = sum_{i != j} k(a_i, a_j) / (m(m-1)) + sum_{i != j} k(b_i, b_j) / (m(m-1))
                  - 2 sum_{i, j} k(a_i, b_j) / m^2

    as in torch-fidelity and clean-fid (100 subsets of 1000). Zero in expectation when both
    sets come from one distribution; it can be slightly negative. Squared kernel units.
    """
    a, b = as_rows(feat_a, "feat_a").numpy(), as_rows(feat_b, "feat_b").numpy()
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"kid: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    m = min(subset_size, len(a), len(b))
    if m < 2 or n_subsets < 1:
        raise UsageError("kid: need at least 2 samples in each set and n_subsets >= 1")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(n_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        total += kid(x, y)  # the whole-sample estimator on one subset
    return float(total / n_subsets)


# ---------------------------------------------------------------- precision / recall / density / coverage


def _knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    nn_ = NearestNeighbors(n_neighbors=k + 1).fit(feats)
    dist, _ = nn_.kneighbors(feats)
    return dist[:, k]


def prdc(real_feats: Any, fake_feats: Any, *, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al., ICML 2020, eqs. 1-4).

    With B(x, r) the ball of radius r about x and NND_k(x) the distance from x to its k-th
    nearest neighbour within its own set (real X_1..X_N, fake Y_1..Y_M):

    * precision = 1/M sum_j 1[Y_j in U_i B(X_i, NND_k(X_i))]
    * recall    = 1/N sum_i 1[X_i in U_j B(Y_j, NND_k(Y_j))]
    * density   = 1/(kM) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))]   (1 in expectation if P = Q)
    * coverage  = 1/N sum_i 1[exists j: Y_j in B(X_i, NND_k(X_i))]
    """
    real = as_rows(real_feats, "real_feats").numpy()
    fake = as_rows(fake_feats, "fake_feats").numpy()
    if real.shape[1] != fake.shape[1]:
        raise UsageError(f"prdc: feature sizes differ ({real.shape[1]} vs {fake.shape[1]})")
    if k < 1 or len(real) <= k or len(fake) <= k:
        raise UsageError(f"prdc: need k >= 1 and more than k={k} samples in each set")
    r_real = torch.from_numpy(_knn_radii(real, k))
    r_fake = torch.from_numpy(_knn_radii(fake, k))
    rt, ft = torch.from_numpy(real), torch.from_numpy(fake)
    in_real_ball = torch.zeros(len(fake), dtype=torch.bool)
    count = torch.zeros(len(fake), dtype=torch.float64)
    covered = torch.zeros(len(real), dtype=torch.bool)
    recalled = torch.zeros(len(real), dtype=torch.bool)
    block = max(1, 2**22 // len(real))
    for s in range(0, len(fake), block):  # fake x real distances, in row blocks
        d = torch.cdist(ft[s : s + block], rt)
        inside = d <= r_real[None, :]  # fake j inside real ball i
        in_real_ball[s : s + block] = inside.any(1)
        count[s : s + block] = inside.sum(1).double()
        covered |= inside.any(0)
        recalled |= (d <= r_fake[s : s + block, None]).any(0)  # real i inside fake ball j
    return {
        "precision": float(in_real_ball.double().mean()),
        "recall": float(recalled.double().mean()),
        "density": float(count.sum() / (k * len(fake))),
        "coverage": float(covered.double().mean()),
    }


# ---------------------------------------------------------------- latent priors


class GaussianMixturePrior:
    """A Gaussian-mixture prior over continuous latents (the usual two-stage generator baseline).

    Latents (N, *latent_shape) are flattened to d dimensions. If d > ``n_pca`` they are first
    reduced by PCA to ``n_pca`` components and the discarded directions are modelled as
    isotropic Gaussian noise with PCA's ``noise_variance_`` (probabilistic PCA; Tipping & Bishop
    1999). A full-covariance ``GaussianMixture`` with ``n_components`` components is fitted in
    the (reduced) space; sampling draws a component by its weight, then N(mean_c, cov_c).
    """

    def __init__(self, n_components: int = 10, n_pca: int = 64, seed: int = 0) -> None:
        if n_components < 1 or n_pca < 1:
            raise UsageError("GaussianMixturePrior: n_components and n_pca must be >= 1")
        self.n_components, self.n_pca, self.seed = n_components, n_pca, seed
        self.pca: PCA | None = None
        self.gmm: GaussianMixture | None = None
        self.latent_shape: tuple[int, ...] = ()

    def fit(self, latents: Any) -> GaussianMixturePrior:
        """Fit PCA (when needed) and the mixture to ``latents`` (N, ...)."""
        if isinstance(latents, torch.Tensor):
            latents = latents.detach().cpu().numpy()
        arr = np.asarray(latents, dtype=np.float64)
        if arr.ndim < 2 or len(arr) < 2:
            raise UsageError("GaussianMixturePrior.fit: need latents of shape (N >= 2, ...)")
        self.latent_shape = tuple(arr.shape[1:])
        flat = as_rows(arr, "latents").numpy()
        if flat.shape[1] > self.n_pca:
            self.pca = PCA(n_components=min(self.n_pca, len(flat)), random_state=self.seed)
            flat = self.pca.fit_transform(flat)
        with threadpool_limits(1):  # small EM: BLAS threads only oversubscribe the cores
            self.gmm = GaussianMixture(
                n_components=min(self.n_components, len(flat)),
                covariance_type="full",
                reg_covar=1e-6,
                random_state=self.seed,
            ).fit(flat)
        return self

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` latents drawn from the fitted prior, float32 tensor (n, *latent_shape)."""
        if self.gmm is None:
            raise RuntimeError("GaussianMixturePrior.sample called before fit")
        rng = np.random.default_rng(seed)
        comp = rng.choice(len(self.gmm.weights_), size=n, p=self.gmm.weights_)
        chol = np.linalg.cholesky(self.gmm.covariances_)  # (C, d, d)
        noise = rng.standard_normal((n, self.gmm.means_.shape[1]))
        z = self.gmm.means_[comp] + np.einsum("nij,nj->ni", chol[comp], noise)
        if self.pca is not None:
            z = self.pca.inverse_transform(z)
            resid = rng.standard_normal(z.shape) * math.sqrt(max(self.pca.noise_variance_, 0.0))
            comps = self.pca.components_  # orthonormal rows: keep only the orthogonal complement
            z = z + resid - (resid @ comps.T) @ comps
        return torch.as_tensor(z, dtype=torch.float32).reshape(n, *self.latent_shape)


class _CodeNet(nn.Module):
    """logits(c_t | c_{t-w}, ..., c_{t-1}, t): embeddings of the w previous codes + position."""

    def __init__(self, num_codes: int, length: int, context: int, width: int) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(num_codes + 1, 16)  # index num_codes = "before the start"
        self.pos = nn.Embedding(length, width)
        self.inp = nn.Linear(16 * context, width)
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.out = nn.Linear(width, num_codes)

    def forward(self, ctx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.inp(self.embed(ctx).flatten(-2)) + self.pos(pos)
        return self.out(self.mlp(h))


class CodePrior:
    """Autoregressive prior over VQ code maps: p(c) = prod_t p(c_t | previous w codes, t).

    Code maps (N, H, W) are read in raster order (N, L = H W); (N, L) sequences as they are.
    Each conditional is a small MLP on the embeddings of the previous ``context`` codes (a start
    token pads before position 0) plus a learned position embedding: a neural n-gram model
    (Bengio et al. 2003) made position-aware. ``context`` defaults to W + 1 for maps (covers
    the left and upper neighbours) and min(L, 8) for sequences. Trained by maximum likelihood
    (teacher forcing, Adam); sampled position by position.
    """

    def __init__(self, num_codes: int | None = None, context: int | None = None, width: int = 128):
        self.num_codes, self.context, self.width = num_codes, context, width
        self.net: _CodeNet | None = None
        self.code_shape: tuple[int, ...] = ()

    def _contexts(self, seq: torch.Tensor) -> torch.Tensor:
        """(N, L) codes -> (N, L, w) previous-code windows, start-token padded."""
        assert self.net is not None
        w = self.net.context
        pad = torch.full((len(seq), w), self.num_codes, dtype=torch.long)  # type: ignore[arg-type]
        padded = torch.cat([pad, seq], 1)
        return padded.unfold(1, w, 1)[:, : seq.shape[1]]

    def fit(
        self,
        codes: Any,
        steps: int = 500,
        *,
        batch_size: int = 128,
        lr: float = 3e-3,
        seed: int = 0,
    ) -> CodePrior:
        """Fit by maximum likelihood on integer ``codes`` (N, H, W) or (N, L)."""
        c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes)
        if c.dtype.is_floating_point:
            if not torch.equal(c, c.round()):
                raise UsageError("CodePrior.fit: codes must be integers")
        if c.ndim not in (2, 3) or len(c) == 0:
            raise UsageError(
                f"CodePrior.fit: expected codes (N, H, W) or (N, L), got {tuple(c.shape)}"
            )
        c = c.long()
        if int(c.min()) < 0:
            raise UsageError("CodePrior.fit: codes must be non-negative")
        if self.num_codes is None:
            self.num_codes = int(c.max()) + 1
        elif int(c.max()) >= self.num_codes:
            raise UsageError(f"CodePrior.fit: code {int(c.max())} >= num_codes={self.num_codes}")
        self.code_shape = tuple(c.shape[1:])
        seq = c.reshape(len(c), -1)
        length = seq.shape[1]
        context = self.context or (
            min(length, self.code_shape[1] + 1) if c.ndim == 3 else min(length, 8)
        )
        torch.manual_seed(seed)
        self.net = _CodeNet(self.num_codes, length, context, self.width)
        ctx, pos = self._contexts(seq), torch.arange(length)
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(len(seq), (min(batch_size, len(seq)),), generator=gen)
            logits = self.net(ctx[idx], pos)
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, self.num_codes), seq[idx].reshape(-1)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.net.eval()
        return self

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` code maps (long tensor, shape (n, *code_shape)), sampled in raster order."""
        if self.net is None:
            raise RuntimeError("CodePrior.sample called before fit")
        gen = torch.Generator().manual_seed(seed)
        length, w = math.prod(self.code_shape), self.net.context
        seq = torch.full((n, w + length), self.num_codes, dtype=torch.long)  # type: ignore[arg-type]
        for t in range(length):
            logits = self.net(seq[:, t : t + w], torch.full((n,), t, dtype=torch.long))
            seq[:, w + t] = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
        return seq[:, w:].reshape(n, *self.code_shape)


def _features(net: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    return extract_features(net, x, batch_size).numpy()


def generation_metrics(
    real: Any, fake: Any, features: nn.Module, *, k: int = 5
) -> dict[str, float]:
    """Sample-quality metrics of generated samples ``fake`` against data ``real``.

    ``fd``: ``frechet_distance`` in the space of ``features``; ``kid``: ``kid_subsets`` in the
    same space (subsets of at most 1000, 50 subsets); ``precision``, ``recall``,
    ``density``, ``coverage``: ``prdc`` with ``k`` in the same space; ``w2``: exact data-space
    W2 (``latentdist.discrepancy.w2``) between the flattened samples.
    """
    real_t = torch.as_tensor(real, dtype=torch.float32)
    fake_t = torch.as_tensor(fake, dtype=torch.float32)
    if real_t.shape[1:] != fake_t.shape[1:]:
        raise UsageError(
            f"generation_metrics: sample shapes differ ({tuple(real_t.shape[1:])} vs "
            f"{tuple(fake_t.shape[1:])})"
        )
    was_training = features.training
    features.eval()
    fr, ff = _features(features, real_t), _features(features, fake_t)
    features.train(was_training)
    out = {"fd": frechet_distance(fr, ff), "kid": kid_subsets(fr, ff, n_subsets=50)}
    out.update(prdc(fr, ff, k=k))
    out["w2"] = w2(real_t, fake_t)
    return out
