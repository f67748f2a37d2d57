"""The predictive study's statistics (benchmarks/bench_predictive.py) against known answers."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_predictive import probe_ceiling, spearman_with_interval  # noqa: E402


def test_a_monotone_signal_has_rho_one_in_every_resample():
    x = np.arange(12.0)
    rho, ci = spearman_with_interval(x, x**3 + 5)
    assert rho == 1.0 and ci == [1.0, 1.0]


def test_a_signal_that_one_latent_alone_sets_apart_gets_no_interval():
    # about a third of the resamples miss the one distinct latent: their rho is undefined, and
    # the others alone would give an interval that excludes the full sample's rho
    x = np.array([0.0] * 9 + [1.0])
    y = np.arange(10.0)
    rho, ci = spearman_with_interval(x, y)
    assert rho == spearmanr(x, y).statistic
    assert ci is None


def test_the_ceiling_is_spearman_brown_of_the_mean_pairwise_rho():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=30)
    per_seed = truth[:, None] + 0.7 * rng.normal(size=(30, 3))
    r1 = np.mean(
        [
            spearmanr(per_seed[:, i], per_seed[:, j]).statistic
            for i, j in itertools.combinations(range(3), 2)
        ]
    )
    c = probe_ceiling(per_seed)
    assert np.isclose(c["r1"], r1)
    assert np.isclose(c["ceiling"], np.sqrt(3 * r1 / (1 + 2 * r1)))
    assert c["ci"][0] <= c["ceiling"] <= c["ci"][1]
    identical = probe_ceiling(np.repeat(truth[:, None], 3, axis=1))
    assert identical["r1"] == 1.0 and identical["ceiling"] == 1.0
