"""The cheap predictors of generation (latentdist.proxies.signals) on cases with known answers:
decodes that equal the data score the floor, closed forms of the Gaussian flow-matching target,
a probe that reads the label off the latent, and the rankings the definitions predict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentdist.errors import UsageError
from latentdist.proxies.geometry import nearest_codes
from latentdist.proxies.signals import (
    interpolation_fd,
    latent_neighbours,
    linear_probe_accuracy,
    perturb_codes,
    perturbation_fd,
    slerp,
    velocity_irreducible_variance,
)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """Identity features: the samples themselves, flattened."""
    return x.reshape(len(x), -1).double()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- mixing and neighbours


def test_slerp_keeps_the_norm_and_the_endpoints():
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 2.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    mid = slerp(a, b, 0.5)
    # orthogonal rows of norm 2: the midpoint of the arc, (a + b) / sqrt(2)
    assert mid[0].tolist() == pytest.approx([math.sqrt(2), math.sqrt(2), 0.0], abs=1e-6)
    assert mid[1].tolist() == pytest.approx([0.0, 3.0, 0.0])  # parallel rows mix linearly
    assert slerp(a, b, 0.0)[0].tolist() == pytest.approx(a[0].tolist(), abs=1e-6)
    assert slerp(a, b, 1.0)[0].tolist() == pytest.approx(b[0].tolist(), abs=1e-6)


def test_neighbours_are_among_the_k_nearest_and_prefer_the_closest():
    pool = torch.arange(100, dtype=torch.float64)[:, None]  # 0, 1, ..., 99
    query = torch.full((4000, 1), 50.2, dtype=torch.float64)
    idx = latent_neighbours(query, pool, k=4, mode="linear", seed=0)
    assert set(idx.tolist()) == {49, 50, 51, 52}  # the 4 nearest of 50.2
    # drawn with weights softmax(-squared difference): exp(-0.04), exp(-0.64), exp(-1.44),
    # exp(-3.24) for 50, 51, 49, 52, i.e. shares 0.54, 0.30, 0.13, 0.02
    share = np.bincount(idx, minlength=100) / len(idx)
    w = np.exp(-np.array([0.04, 0.64, 1.44, 3.24]))
    assert share[[50, 51, 49, 52]] == pytest.approx(w / w.sum(), abs=0.02)


# ---------------------------------------------------------------- interpolation FD


def _atoms(n_atoms: int, copies: int, dim: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, dim))
    return torch.from_numpy(np.repeat(atoms, copies, axis=0))


def test_interpolation_fd_is_the_floor_when_mixtures_decode_to_the_data():
    """Every data point occurs at least k times in the pool, so its k nearest latents are copies
    of its own latent; any mixture is that latent, and the exact decoder returns the query rows
    themselves: the interpolation FD (linear and slerp) is the floor."""
    perm = torch.randperm(6, generator=_gen(0))
    encode = lambda x: 2.0 * x[:, perm]  # noqa: E731 (exact in floating point)
    decode = lambda z: z[:, torch.argsort(perm)] / 2.0  # noqa: E731
    x_pool = _atoms(40, 12, 6, seed=1).float()
    x_query = x_pool[::3][:150]
    x_ref = _atoms(40, 4, 6, seed=1).float() + 0.1 * torch.randn(160, 6, generator=_gen(2))
    out = interpolation_fd(
        encode(x_query), encode(x_pool), x_query, x_ref, decode, _flat, k=10, seed=0
    )
    assert out["floor"] > 0
    assert out["linear"] == pytest.approx(out["floor"], rel=1e-12)
    assert out["slerp"] == pytest.approx(out["floor"], rel=1e-12)
    assert out["reconstruction"] == pytest.approx(out["floor"], rel=1e-12)
    assert (out["k"], out["alpha"], out["n_query"], out["n_ref"]) == (10, 0.5, 150, 160)


def _clusters(n: int, seed: int) -> torch.Tensor:
    """Four tight clusters (std 0.3) at (+-3, +-3, 0, 0)."""
    g = _gen(seed)
    centres = torch.tensor([[3.0, 3, 0, 0], [3, -3, 0, 0], [-3, 3, 0, 0], [-3, -3, 0, 0]])
    return centres[torch.randint(4, (n,), generator=g)] + 0.3 * torch.randn(n, 4, generator=g)


def test_a_latent_with_nuisance_coordinates_interpolates_off_the_data():
    """Two latents that both reconstruct exactly: x itself, and x with 8 appended noise
    coordinates (std 10) the decoder ignores. In the first, nearest latents lie in the same
    cluster and their midpoints are data-like (FD near the floor); in the second, neighbours are
    chosen mostly by the noise, midpoints fall between clusters, and the FD rises well above the
    floor. Reconstruction cannot tell them apart; interpolation FD can (the iFID paper's point)."""
    x_pool, x_query, x_ref = _clusters(3000, 0), _clusters(400, 1), _clusters(400, 2)
    noise = lambda n, s: 10.0 * torch.randn(n, 8, generator=_gen(s))  # noqa: E731
    plain = interpolation_fd(x_query, x_pool, x_query, x_ref, lambda z: z, _flat, seed=0)
    nuisance = interpolation_fd(
        torch.cat([x_query, noise(400, 3)], 1), torch.cat([x_pool, noise(3000, 4)], 1),
        x_query, x_ref, lambda z: z[:, :4], _flat, seed=0,
    )  # fmt: skip
    assert plain["reconstruction"] == pytest.approx(plain["floor"], rel=1e-6)
    assert nuisance["reconstruction"] == pytest.approx(plain["floor"], rel=1e-6)
    for mode in ("linear", "slerp"):
        excess_plain = plain[mode] - plain["floor"]
        excess_nuisance = nuisance[mode] - nuisance["floor"]
        assert excess_nuisance > 3 * nuisance["floor"]  # floor 0.09: the FD of 400 rows
        assert abs(excess_plain) < 0.05 * excess_nuisance, mode


def test_interpolation_fd_rejects_a_mixing_weight_outside_the_unit_interval():
    z = torch.randn(10, 2)
    with pytest.raises(UsageError, match="alpha"):
        interpolation_fd(z, z, z, z, lambda v: v, _flat, alpha=1.5)


# ---------------------------------------------------------------- perturbation FD


def test_perturbation_swaps_the_given_share_for_near_codes():
    codebook = torch.arange(32, dtype=torch.float64)[:, None]  # codes on a line, 1 apart
    codes = torch.full((4000, 16), 10, dtype=torch.long)
    new, share = perturb_codes(codes, codebook, rate=0.25, strength=4, seed=0)
    changed = new != codes
    assert share == pytest.approx(float(changed.double().mean()))  # a neighbour is never itself
    assert share == pytest.approx(0.25, abs=0.01)
    assert set(new[changed].tolist()) == {8, 9, 11, 12}  # the 4 nearest other codes


def _code_data(n: int, seed: int) -> torch.Tensor:
    """Code maps of 4 positions that all carry one code, drawn from the lower half of 32."""
    c = torch.randint(16, (n, 1), generator=_gen(seed))
    return c.expand(n, 4).clone()


def test_perturbation_fd_is_the_floor_when_near_codes_decode_alike():
    """Every codebook vector occurs 9 times: its 8 nearest other codes are copies, swaps change
    nothing that the decoder sees, and the FD is exactly the floor."""
    table = torch.randn(8, 3, generator=_gen(0), dtype=torch.float64)
    codebook = table.repeat_interleave(9, dim=0)  # (72, 3): codes 9j..9j+8 are one vector
    codes = torch.randint(72, (300, 5), generator=_gen(1))
    z = codebook.float()[codes]  # (N, L, C) token sequences
    x_query = z.reshape(300, -1)
    x_ref = codebook.float()[torch.randint(72, (300, 5), generator=_gen(2))].reshape(300, -1)
    decode = lambda v: v.reshape(len(v), -1)  # noqa: E731
    out = perturbation_fd(z, codebook, x_query, x_ref, decode, _flat, rate=0.5, strength=8)
    assert out["swapped_share"] == pytest.approx(0.5, abs=0.05)
    assert out["fd"] == pytest.approx(out["floor"], rel=1e-12)
    assert out["reconstruction"] == pytest.approx(out["floor"], rel=1e-12)


def test_a_codebook_whose_neighbours_decode_far_apart_scores_worse():
    """The same data and an exact decoder for both: in the first latent the codebook is the data
    table itself (near codes decode to near values); in the second the codebook vectors are
    random and the decoder looks the code's value up, so a swap lands anywhere. pFID ranks the
    first far better; reconstruction (the floor, exactly) ranks them equal."""
    table = torch.arange(32, dtype=torch.float64)[:, None] / 4  # data values 0, 0.25, ..., 7.75
    random_cb = torch.randn(32, 2, generator=_gen(0), dtype=torch.float64)
    codes_q, codes_r = _code_data(500, 1), _code_data(500, 2)
    x_query, x_ref = table[codes_q].reshape(500, -1), table[codes_r].reshape(500, -1)
    near = perturbation_fd(
        table.float()[codes_q], table, x_query, x_ref, lambda z: z.reshape(len(z), -1), _flat
    )
    lookup = lambda z: table[nearest_codes(z, random_cb)].reshape(len(z), -1)  # noqa: E731
    far = perturbation_fd(random_cb.float()[codes_q], random_cb, x_query, x_ref, lookup, _flat)
    for out in (near, far):
        assert out["reconstruction"] == pytest.approx(out["floor"], rel=1e-9)
    assert far["fd"] - far["floor"] > 10 * max(near["fd"] - near["floor"], 1e-3)


# ---------------------------------------------------------------- velocity irreducible variance


def _gaussian_viv(eigenvalues: list[float], ts: list[float]) -> float:
    """Closed form for z ~ N(0, S) (S's eigenvalues), on the grid ts: V(t) = sum_i l_i /
    (t^2 l_i + (1 - t)^2), averaged over ts, over Var(u) = sum_i (l_i + 1)."""
    v = [sum(lam / (t * t * lam + (1 - t) ** 2) for lam in eigenvalues) for t in ts]
    return float(np.mean(v)) / sum(lam + 1 for lam in eigenvalues)


def _half(ci: list[float]) -> float:
    return (ci[1] - ci[0]) / 2


def test_velocity_variance_matches_the_gaussian_closed_form():
    """1-D Gaussian latents of any scale: after standardisation V(t) = 1 / (t^2 + (1 - t)^2),
    whose average over [0, 1] is pi / 2, a share pi / 4 of Var(u) = 2. The empirical posterior
    of 2000 rows is the Gaussian one wherever the noise (1 - t) exceeds the rows' spacing (all
    16 grid points). Agreement within two half-widths of the estimator's own 95 % interval."""
    z = 5.0 * torch.randn(2000, 1, generator=_gen(0), dtype=torch.float64) + 2.0
    out = velocity_irreducible_variance(z, n_max=2000, seed=0)
    ts = [p["t"] for p in out["profile"]]
    assert ts == pytest.approx([(i + 0.5) / 16 for i in range(16)])
    exact = _gaussian_viv([1.0], ts)
    assert exact == pytest.approx(math.pi / 4, abs=2e-3)  # the midpoint rule on 16 cells
    assert abs(out["viv"] - exact) < 2 * _half(out["ci"])
    assert _half(out["ci"]) < 0.03
    # Var(z) of rows standardised with the n - 1 divisor, plus Var(x_0) = 1
    assert out["total_variance_per_dim"] == pytest.approx(1 + 1999 / 2000, rel=1e-9)


def test_velocity_variance_is_scale_free_and_ranks_correlated_latents_lower():
    """Per-channel scaling does not change it (the probe standardises the same way); a latent
    whose two coordinates are correlated (eigenvalues 1.9, 0.1) leaves less ambiguity than an
    independent one: pi (sqrt 1.9 + sqrt 0.1) / 8 = 0.665 against pi / 4 = 0.785, on t <= 0.84
    where 1500 rows in 2-D still resolve the Gaussian posterior."""
    ts = [(i + 0.5) / 16 for i in range(14)]
    g = torch.randn(1500, 2, generator=_gen(1), dtype=torch.float64)
    chol = torch.linalg.cholesky(torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64))
    indep = velocity_irreducible_variance(g, n_max=1500, times=ts, seed=0)
    scaled = velocity_irreducible_variance(g * torch.tensor([10.0, 0.1]), n_max=1500, times=ts)
    corr = velocity_irreducible_variance(g @ chol.T, n_max=1500, times=ts, seed=0)
    assert scaled["viv"] == pytest.approx(indep["viv"], rel=1e-9)
    for out, lam in ((indep, [1.0, 1.0]), (corr, [1.9, 0.1])):
        assert abs(out["viv"] - _gaussian_viv(lam, ts)) < 2 * _half(out["ci"])
    assert corr["ci"][1] < indep["ci"][0]


def _two_atoms_share(a: float, t: float) -> float:
    """V(t) / Var(u) for z = +-a with probability 1/2 each (1-D, unstandardised): the posterior
    mean is a tanh(t a x / (1 - t)^2), so V(t) = E_{x ~ N(t a, (1 - t)^2)} (a - a tanh(.))^2 /
    (1 - t)^2 by symmetry, computed by Gauss-Hermite quadrature; Var(u) = a^2 + 1."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    x = t * a + (1 - t) * nodes
    gap = (a - a * np.tanh(t * a * x / (1 - t) ** 2)) ** 2
    return float((weights * gap).sum() / weights.sum()) / (1 - t) ** 2 / (a * a + 1)


def test_velocity_variance_of_two_atoms_matches_the_exact_posterior():
    """Rows that are two atoms, +-2, 500 times each: their empirical distribution is exactly the
    two-atom law, whose posterior is known in closed form. At small t the noise hides which atom
    drew the path (share near a^2 / (a^2 + 1) = 0.8); by t = 0.8 the paths from the two atoms
    no longer cross and nothing is left. Agreement within two half-widths of the 95 % interval at each t."""
    z = torch.tensor([[2.0], [-2.0]], dtype=torch.float64).repeat(500, 1)
    ts = [0.05, 0.3, 0.5, 0.8]
    exact = [_two_atoms_share(2.0, t) for t in ts]
    assert exact[0] > 0.75 and exact[3] < 1e-6
    for t, want in zip(ts, exact, strict=True):
        out = velocity_irreducible_variance(z, n_max=1000, times=[t], standardise=False, seed=1)
        assert abs(out["viv"] - want) < 2 * _half(out["ci"]) + 1e-12, t
    assert 0 <= out["ci"][0] <= out["viv"] <= out["ci"][1] <= 1


# ---------------------------------------------------------------- linear probe


def test_linear_probe_reads_a_label_that_the_latent_contains_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(10, size=1500)
    onehot = np.eye(10)[y]
    noise = rng.standard_normal((1500, 20))
    exact = linear_probe_accuracy(np.concatenate([onehot, noise], 1), y, seed=0)
    assert exact["accuracy"] == 1.0 and all(a == 1.0 for a in exact["per_split"])
    blind = linear_probe_accuracy(noise, y, seed=0)
    assert blind["ci"][0] <= blind["chance"] <= blind["ci"][1]
    assert blind["chance"] == pytest.approx(0.1, abs=0.03) and blind["n_classes"] == 10
    # the label under growing noise: accuracy falls with the noise
    acc = [
        linear_probe_accuracy(onehot + s * rng.standard_normal((1500, 10)), y)["accuracy"]
        for s in (0.2, 0.6, 2.0)
    ]
    assert acc[0] > acc[1] > acc[2] > blind["accuracy"]


def test_linear_probe_needs_matching_labels_of_two_classes():
    with pytest.raises(UsageError, match="labels"):
        linear_probe_accuracy(np.zeros((10, 2)), np.zeros(9))
    with pytest.raises(UsageError, match="single class"):
        linear_probe_accuracy(np.zeros((10, 2)), np.zeros(10))
