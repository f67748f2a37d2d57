"""The generation probe (rectified flow) and KID, on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdist.errors import UsageError
from latentdist.evaluation.generation import kid_subsets as kid
from latentdist.evaluation.probe import FlowPrior, ProbeRecipe

SMALL = ProbeRecipe(steps=400, batch_size=256, lr=3e-3, width=128, sample_steps=32)


def test_flow_recovers_a_correlated_gaussian():
    """Mean and scale come back through the per-channel standardisation; the correlation 0.8
    must be learnt by the flow itself (a standardised N(0, I) start has none)."""
    rng = np.random.default_rng(0)
    cov = np.array([[4.0, 0.8 * 2 * 0.5], [0.8 * 2 * 0.5, 0.25]])
    z = torch.as_tensor(rng.multivariate_normal([1.0, -2.0], cov, 4000), dtype=torch.float32)
    s = FlowPrior(SMALL).fit(z, seed=0).sample(4000, seed=1).double().numpy()
    assert s.shape == (4000, 2)
    assert s.mean(0) == pytest.approx([1.0, -2.0], abs=0.1)
    assert s.std(0) == pytest.approx([2.0, 0.5], rel=0.1)
    assert np.corrcoef(s.T)[0, 1] == pytest.approx(0.8, abs=0.06)


def test_flow_keeps_the_two_modes_of_a_1d_mixture():
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (4000, 1), generator=g) * 2 - 1
    z = 2.0 * sign + 0.3 * torch.randn(4000, 1, generator=g)
    s = FlowPrior(SMALL).fit(z, seed=0).sample(4000, seed=1).squeeze(1)
    assert float((s > 0).double().mean()) == pytest.approx(0.5, abs=0.06)
    near = ((s.abs() - 2.0).abs() < 0.75).double().mean()
    assert float(near) > 0.85  # most samples sit on a mode, not in the gap between them


def test_flow_keeps_latent_shape_and_is_seeded():
    z = torch.randn(64, 2, 3, 3)
    tiny = ProbeRecipe(steps=5, width=16, sample_steps=4)
    threads = torch.get_num_threads()
    a = FlowPrior(tiny).fit(z, seed=3).sample(10, seed=4)
    assert torch.get_num_threads() == threads  # the probe's one-thread setting is undone
    b = FlowPrior(tiny).fit(z, seed=3).sample(10, seed=4)
    assert a.shape == (10, 2, 3, 3) and torch.equal(a, b)
    with pytest.raises(UsageError):
        FlowPrior(tiny).fit(torch.tensor([[float("nan")], [1.0]]))


def _kid_direct(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y/d + 1)^3, written term by term."""
    d, m, n = a.shape[1], len(a), len(b)

    def k(x, y):
        return (x @ y / d + 1) ** 3

    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_direct_computation():
    """With one subset as large as the sets, the subset is the whole set (in another order)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((30, 4)), rng.standard_normal((30, 4)) + 0.5
    assert kid(a, b, n_subsets=1, subset_size=30) == pytest.approx(_kid_direct(a, b), rel=1e-10)
    # averaged over subsets: unbiased, so near 0 for one distribution and clearly positive apart
    same = kid(rng.standard_normal((600, 8)), rng.standard_normal((600, 8)), subset_size=200)
    apart = kid(rng.standard_normal((600, 8)), rng.standard_normal((600, 8)) + 0.5, subset_size=200)
    assert abs(same) < 0.02 < apart
    with pytest.raises(UsageError):
        kid(a, b[:, :3])
