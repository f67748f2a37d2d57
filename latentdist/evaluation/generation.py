"""Generation-quality metrics and latent priors for ``latentdist compare`` (docs/metrics.md).

* ``frechet_distance``: Frechet distance between Gaussians fitted to two feature sets (FID-style).
* ``kid``: kernel inception distance, the unbiased MMD^2 with a cubic polynomial kernel
  averaged over subsets (Binkowski et al. 2018).
* ``prdc``: precision, recall, density, coverage of k-NN manifolds (Naeem et al. 2020).
* ``GaussianMixturePrior`` / ``CodePrior``: priors fitted to continuous latents / VQ code maps,
  so a decoder can be fed *generated* latents rather than encodings of real data.
* ``FeatureNet`` / ``train_feature_net`` / ``load_feature_extractor``: the feature space.
* ``generation_metrics``: all of the above in one dict, plus the data-space W2.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits
from torch import nn

from latentdist._shapes import pixel_budget_batch
from latentdist.data.source import DataSource
from latentdist.discrepancy import w2
from latentdist.errors import UsageError

__all__ = [
    "CodePrior",
    "FeatureNet",
    "GaussianMixturePrior",
    "frechet_distance",
    "frechet_distance_gaussians",
    "generation_metrics",
    "kid",
    "load_feature_extractor",
    "prdc",
    "train_feature_net",
]


def _np2d(a: Any, name: str) -> np.ndarray:
    """(n, ...) array or tensor -> float64 (n, D) NumPy array; rejects empty or non-finite input."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 0 or len(arr) == 0:
        raise UsageError(f"{name}: empty feature set")
    arr = arr.reshape(len(arr), -1)
    if not np.isfinite(arr).all():
        raise UsageError(f"{name}: contains NaN or Inf values")
    return arr


# ---------------------------------------------------------------- Frechet distance


def frechet_distance_gaussians(
    mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """Frechet (= W2^2) distance between N(mu_a, cov_a) and N(mu_b, cov_b) (Dowson & Landau 1982).

    FD = |mu_a - mu_b|^2 + Tr(cov_a + cov_b - 2 (cov_a cov_b)^{1/2}). The trace of the square
    root is taken from the eigenvalues of the symmetric PSD matrix cov_a^{1/2} cov_b cov_a^{1/2},
    which has the same square-root trace as cov_a cov_b and, unlike ``scipy.linalg.sqrtm`` of the
    non-symmetric product, stays exact and real when the covariances are singular (few samples).
    """
    mu_a, mu_b = np.atleast_1d(mu_a).astype(np.float64), np.atleast_1d(mu_b).astype(np.float64)
    cov_a, cov_b = np.atleast_2d(cov_a).astype(np.float64), np.atleast_2d(cov_b).astype(np.float64)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    product = root_a @ cov_b @ root_a
    tr_covmean = float(
        np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    )
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)


def frechet_distance(feat_a: Any, feat_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID; Heusel et al. 2017).

    FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) with sample means mu and unbiased
    (ddof = 1) covariances S of ``feat_a`` (n, F) and ``feat_b`` (m, F); squared feature units.
    """
    a, b = _np2d(feat_a, "feat_a"), _np2d(feat_b, "feat_b")
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"frechet_distance: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    if len(a) < 2 or len(b) < 2:
        raise UsageError("frechet_distance: each feature set needs at least 2 samples")
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return frechet_distance_gaussians(a.mean(0), cov_a, b.mean(0), cov_b)


# ---------------------------------------------------------------- kernel inception distance


def kid(
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
    a, b = _np2d(feat_a, "feat_a"), _np2d(feat_b, "feat_b")
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"kid: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    m = min(subset_size, len(a), len(b))
    if m < 2 or n_subsets < 1:
        raise UsageError("kid: need at least 2 samples in each set and n_subsets >= 1")
    from latentdist.discrepancy import kid as kid_whole  # the estimator on one subset

    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(n_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        total += kid_whole(x, y)
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
    real, fake = _np2d(real_feats, "real_feats"), _np2d(fake_feats, "fake_feats")
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
        flat = _np2d(arr, "latents")
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


# ---------------------------------------------------------------- feature space


class FeatureNet(nn.Module):
    """Feature extractor for the Frechet distance; ``forward`` returns the penultimate layer.

    Images (C, H, W): conv 3x3 (32) -> conv 3x3 stride 2 (64) -> conv 3x3 stride 2 (64) ->
    global average pool -> linear (``feat_dim``) -> ReLU. Vectors: MLP 256 -> ``feat_dim``.
    ``head`` maps the trunk's output to class logits (supervised) or back to the input (denoising
    AE). The features are the trunk's output standardised, (trunk(x) - shift) / scale, with the
    buffers set after training from the training rows (``standardise``).
    """

    def __init__(self, sample_shape: tuple[int, ...], n_out: int, feat_dim: int = 64) -> None:
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        if len(sample_shape) == 3:
            c = sample_shape[0]
            self.trunk: nn.Module = nn.Sequential(
                nn.Conv2d(c, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(64, 64, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(64, feat_dim),
                nn.ReLU(),
            )
        else:
            d = math.prod(sample_shape)
            self.trunk = nn.Sequential(
                nn.Flatten(), nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, feat_dim), nn.ReLU()
            )
        self.head = nn.Linear(feat_dim, n_out)
        self.register_buffer("shift", torch.zeros(feat_dim))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.trunk(x) - self.shift) / self.scale

    @torch.no_grad()
    def standardise(self, batches: Iterable[torch.Tensor]) -> None:
        """shift = the mean feature over the samples of ``batches``; scale = the root mean
        per-dimension variance.

        One scale for all dimensions keeps the feature geometry (FD scales by 1/scale^2); it
        fixes the size that training happened to give the features, which otherwise varies by
        orders of magnitude between seeds and puts KID's cubic kernel out of range.
        """
        f = torch.cat([extract_features(self.trunk, x) for x in batches])
        self.shift.copy_(f.mean(0))
        self.scale.copy_(f.var(0).mean().sqrt().clamp_min(1e-12))


def train_feature_net(
    source: DataSource,
    steps: int = 500,
    seed: int = 0,
    *,
    rows: np.ndarray | None = None,
    batch_size: int | None = None,
    lr: float = 1e-3,
    noise: float = 0.2,
) -> FeatureNet:
    """Train the default feature space on the rows ``rows`` of ``source`` (default all; CPU;
    returns the net in eval mode). Rows are read a batch at a time (``source.take``), so an
    image folder larger than memory is never decoded whole.

    ``batch_size`` defaults to 128, or for images above 32 x 32 pixels as many as hold the
    pixels of 128 such images (at least 16: ``latentdist._shapes.pixel_budget_batch``), so that
    training it on photographs costs what it costs on CIFAR-sized images.

    With labels (``source.labels``, as the built-ins carry): a classifier, cross-entropy on
    ``head(features)``; features are its penultimate layer (as Inception features are for FID).
    Without labels: a denoising autoencoder (Vincent et al. 2008): ``head`` reconstructs x from
    x + ``noise`` * std(x) * N(0, I) through the features, squared error. The features are then
    standardised on (up to 5000 of) the training rows (``FeatureNet.standardise``).
    """
    labels = getattr(source, "labels", None)
    if batch_size is None:
        batch_size = pixel_budget_batch(tuple(source.sample_shape), 128, 32 * 32, 16)
    torch.manual_seed(seed)
    rows = np.arange(len(source)) if rows is None else np.asarray(rows)
    if labels is not None:
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if len(y) != len(source):
            raise UsageError(f"{source.name}: {len(y)} labels for {len(source)} samples")
        net = FeatureNet(source.sample_shape, int(y[rows].max()) + 1)
    else:
        net = FeatureNet(source.sample_shape, math.prod(source.sample_shape))
        std = _streamed_std(source, rows, batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = rows[torch.randint(len(rows), (min(batch_size, len(rows)),), generator=gen)]
        xb = source.take(idx)
        if labels is not None:
            loss = nn.functional.cross_entropy(net.head(net.trunk(xb)), y[idx])
        else:
            noisy = xb + noise * std * torch.randn(xb.shape, generator=gen)
            loss = nn.functional.mse_loss(net.head(net.trunk(noisy)), xb.flatten(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    picked = rows[torch.randperm(len(rows), generator=gen)[:5000].numpy()]
    net.standardise(
        source.take(picked[i : i + batch_size]) for i in range(0, len(picked), batch_size)
    )
    return net


def _streamed_std(source: DataSource, rows: np.ndarray, chunk: int) -> float:
    """The standard deviation (n - 1) of every entry of the rows ``rows``, read ``chunk`` rows
    at a time and summed in float64."""
    total = squares = 0.0
    for i in range(0, len(rows), chunk):
        block = source.take(rows[i : i + chunk]).double()
        total += float(block.sum())
        squares += float(block.square().sum())
    n = len(rows) * math.prod(source.sample_shape)
    return math.sqrt(max(squares - total * total / n, 0.0) / max(n - 1, 1))


def load_feature_extractor(path: str | os.PathLike) -> nn.Module:
    """Load a user's TorchScript feature extractor (``torch.jit.save`` file) in eval mode.

    TorchScript archives hold code and tensors, not arbitrary pickled objects.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise UsageError(f"{p}: no such feature-extractor file")
    try:
        module = torch.jit.load(p, map_location="cpu")
    except Exception as err:  # torch raises several types for a non-TorchScript file
        raise UsageError(f"{p}: not a TorchScript module ({type(err).__name__})") from None
    return module.eval()


@torch.no_grad()
def extract_features(net: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``net`` applied to ``x`` in batches on the net's device: (n, F) float64 CPU tensor."""
    params = list(net.parameters())
    device = params[0].device if params else torch.device("cpu")
    out = [
        net(x[s : s + batch_size].to(device, torch.float32)).flatten(1).cpu()
        for s in range(0, len(x), batch_size)
    ]
    return torch.cat(out).double()


def _features(net: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    return extract_features(net, x, batch_size).numpy()


def generation_metrics(
    real: Any, fake: Any, features: nn.Module, *, k: int = 5
) -> dict[str, float]:
    """Sample-quality metrics of generated samples ``fake`` against data ``real``.

    ``fd``: ``frechet_distance`` in the space of ``features``; ``kid``: ``kid`` in the same
    space (subsets of at most 1000, 50 subsets); ``precision``, ``recall``,
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
    out = {"fd": frechet_distance(fr, ff), "kid": kid(fr, ff, n_subsets=50)}
    out.update(prdc(fr, ff, k=k))
    out["w2"] = w2(real_t, fake_t)
    return out
