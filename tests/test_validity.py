"""Small versions of the validity benchmark (issue 10 §5) for the DEFAULT metric and fit.

Each asserts the property the full benchmark (benchmarks/bench_validity.py) tabulates: degraded
image sets score above the floor in the right order (V2), the planted latent reaches the floor
while its truncations do not (V3), nested PCA latents give nested distances (V4).
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

import latentdist as ld
from latentdist.estimator import MeasureConfig
from latentdist.estimator.paired import paired_difference
from latentdist.evaluation.distance import DEFAULT_METRIC
from latentdist.evaluation.validity import (
    DEGRADATIONS,
    CouplingWarp,
    coupling_warp,
    degrade,
    ladder_distances,
    ladder_verdict,
    nested_verdict,
    paired_above,
    planted_latent,
    planted_verdict,
)
from latentdist.stats import mean_ci

DEFAULT = MeasureConfig()


@pytest.fixture(scope="module")
def mnist():
    return ld.load_data("mnist5k")


def test_coupling_warp_is_invertible_and_scriptable():
    import torch

    z = torch.as_tensor(np.random.default_rng(0).standard_normal((300, 7)))
    warp = torch.jit.script(CouplingWarp(7, seed=3).double())
    y = warp(z)
    assert (y - z).abs().mean() > 0.3  # a real warp
    assert torch.allclose(warp.inverse(y), z, atol=1e-10)
    plain = coupling_warp(z.float().numpy(), seed=3)  # coupling_warp: the same map, standardised
    w = warp(z.float().double()).numpy()
    assert np.allclose(plain, (w - w.mean(0)) / w.std(0), atol=1e-4)


def test_degradations_are_what_they_claim(mnist):
    x = mnist.take(np.arange(0, 5000, 10)).numpy()  # 500 rows, all classes
    labels = np.asarray(mnist.labels)[::10]
    sets = degrade(x, labels, 0)
    assert set(sets) == set(DEGRADATIONS) and all(v.shape == x.shape for v in sets.values())
    # blurring keeps the mean intensity (up to the border) and lowers the pixel variance
    for k in ("blur1", "blur2"):
        assert abs(sets[k].mean() - x.mean()) < 0.02 and sets[k].var() < x.var()
    assert sets["blur2"].var() < sets["blur1"].var()
    assert len(np.unique(sets["kmeans100"].reshape(500, -1), axis=0)) <= 100
    assert len(np.unique(sets["kmeans10"].reshape(500, -1), axis=0)) <= 10
    assert len(np.unique(sets["mean image"].reshape(500, -1), axis=0)) == 1
    class_of = {r.tobytes(): c for r, c in zip(x, labels, strict=True)}
    assert {class_of[r.tobytes()] for r in sets["5 classes"]} == {0, 1, 2, 3, 4}
    assert {class_of[r.tobytes()] for r in sets["1 class"]} == {0}


def test_planted_latent_is_a_function_of_z():
    """x is h(z*) + small noise: from z* the rows are predictable (a nearest neighbour in z*
    space is a near neighbour in x space), from 2 coordinates they are not."""
    d = planted_latent(n=600, noise=0.05)
    x = d["x"]
    assert x.shape == (600, 784) and abs(x.mean() + 0.5) < 0.05

    def nn_error(z):
        dz = ((z[:, None] - z[None]) ** 2).sum(-1)
        np.fill_diagonal(dz, np.inf)
        j = dz.argmin(1)
        return float(((x - x[j]) ** 2).sum(1).mean())

    assert nn_error(d["z* (8-d)"]) < 0.5 * nn_error(d["first 2"])
    assert np.all(np.abs(d["2 Phi(z*) - 1 (uniform, 8-d)"]) <= 1)


def _metric_params() -> list:
    """The defaults of ``distance`` and of ``measure``. Empirical W1/W2/Sinkhorn rank blurred and
    centroid sets below fresh data at n = 400 in 784-D (validity.md, V2): while one of them is
    ``measure``'s default its case is a strict expected failure (it must start failing the
    moment the default changes, so the marker goes too) and slow."""
    params = []
    for m in sorted({DEFAULT_METRIC, DEFAULT.metric}):
        marks = []
        if m in ("w1", "w2", "sinkhorn"):
            marks = [
                pytest.mark.slow,
                pytest.mark.xfail(
                    strict=True, reason=f"{m} fails the degradation ladder (validity.md V2)"
                ),
            ]
        params.append(pytest.param(m, marks=marks))
    return params


@pytest.mark.parametrize("metric", _metric_params())
def test_ladder_default_metrics(mnist, metric):
    """V2 small: 2000 MNIST rows, 400 evaluation rows, 3 seeds: all seven degradations above
    the floor beyond both intervals, in order within each family."""
    dist, floor = ladder_distances(
        mnist, {metric: {"metric": metric}}, rows=2000, n_eval=400, seeds=3
    )
    passes, bad = ladder_verdict(dist[metric], floor[metric])
    assert (passes, bad) == (len(DEGRADATIONS), []), (dist[metric], floor[metric])


def test_nested_verdict_allows_a_tie_only_where_the_generator_reads_two_directions():
    """A capacity-c mlp reads at most 2c latent directions: at c = 1 PCA-2 and PCA-8 may tie
    (PCA-8 must only not lie above PCA-2); from c = 2 on PCA-2 must lie above PCA-8."""
    rng = np.random.default_rng(0)

    def report(values: dict) -> dict:
        curve = [
            {"capacity": c, "distance": mean_ci((v + rng.normal(0, 1e-6, 3)).tolist())}
            for c, v in values.items()
        ]
        return {"curve": curve, "n_eval": 100, "data": {"rows": 1000}}

    tie = {1: 0.05, 2: 0.03, 4: 0.02}
    gap = {1: 0.05, 2: 0.02, 4: 0.01}
    assert nested_verdict({2: report(tie), 8: report(gap), 32: report(gap)}) == (True, [])
    ok, fails = nested_verdict({2: report(tie), 8: report(tie), 32: report(tie)})
    assert not ok and fails == ["PCA-2 not above PCA-8 at 2", "PCA-2 not above PCA-8 at 4"]
    below = {1: 0.06, 2: 0.02, 4: 0.01}
    ok, fails = nested_verdict({2: report(tie), 8: report(below), 32: report(below)})
    assert fails == ["PCA-8 above PCA-2 at 1"]


def test_paired_above_sees_through_the_shared_reference_noise():
    """Two summaries scored on the same reference rows per seed: each seed's sample moves
    both alike. The paired test sees a 1e-4 gap that the two intervals, each dominated by the
    shared noise, cannot; and it never calls a sample above itself."""
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 1e-3, 5)
    floor = mean_ci((shared + rng.normal(0, 1e-6, 5)).tolist())
    d = mean_ci((shared + 1e-4 + rng.normal(0, 1e-6, 5)).tolist())
    assert d["ci"][0] < floor["ci"][1]  # unpaired: the intervals overlap
    assert paired_above(d, floor, 0.1)
    assert not paired_above(floor, d, 0.1) and not paired_above(d, d, 0.1)


@pytest.mark.slow
def test_planted_latent_default_fit():
    """V3 small: with the default metric and fit, z* at width 32 (contains h) reaches the floor;
    its 2- and 4-coordinate truncations stay above it, seed by seed."""
    data = planted_latent(n=2000)
    x = data.pop("x")
    reports = {
        name: ld.measure(
            z,
            x,
            generator="mlp",
            capacities=(8, 32),
            seeds=3,
            n_eval=400,
            proxies=False,
            progress=False,
            device="cpu",
        ).report  # fmt: skip
        for name, z in data.items()
        if name != "2 Phi(z*) - 1 (uniform, 8-d)"
    }
    ok, fails = planted_verdict(reports)
    assert ok, fails


@pytest.mark.slow
def test_nested_pca_latents_default(mnist):
    """V4 small: PCA-2, PCA-8, PCA-32 of 2000 MNIST rows; at widths 8 and 32,
    D(PCA-2) > D(PCA-8) seed by seed and PCA-32 not above PCA-8."""
    x = mnist.take(np.random.default_rng(0).permutation(5000)[:2000]).numpy()
    flat = x.reshape(len(x), -1)
    reports = {
        k: ld.measure(
            PCA(k, random_state=0).fit_transform(flat).astype(np.float32),
            x,
            generator="mlp",
            capacities=(8, 32),
            seeds=3,
            n_eval=400,
            proxies=False,
            progress=False,
            device="cpu",
        ).report  # fmt: skip
        for k in (2, 8, 32)
    }
    ok, fails = nested_verdict(reports)
    assert ok, fails


def test_same_information_in_warped_coordinates_needs_a_larger_generator():
    """Issue 20's known answer, small form: PCA-8 of digits, and the same scores through a fixed
    invertible coupling flow. Same information; at small capacity the warped latent is farther
    from the data, beyond the paired interval (same rows, seeds and judges), and the gap
    shrinks as the capacity grows."""
    x = ld.load_data("digits").take()
    z = PCA(8, random_state=0).fit_transform(x.flatten(1).numpy()).astype(np.float32)
    z = (z - z.mean(0)) / z.std(0)
    settings = dict(
        generator="mlp", capacities=(4, 8, 16), seeds=3, steps=150, proxies=False,
        progress=False, device="cpu",
    )  # fmt: skip
    plain = ld.measure(z, x, **settings).report
    warped = ld.measure(coupling_warp(z), x, **settings).report
    diff = {e["capacity"]: e for e in paired_difference(warped, plain)["curve"]}
    assert diff[8]["ci"][0] > 0, diff[8]
    assert diff[16]["mean"] < diff[8]["mean"]
