"""Two latents compared as a paired experiment, and the critical capacity's uncertainty
(latentdist.estimator.paired)."""

from __future__ import annotations

import numpy as np
import pytest

from latentdist.errors import UsageError
from latentdist.estimator.paired import critical_interval, paired_difference, verdict
from latentdist.stats import mean_ci

CAPS = [1, 2, 4, 8]


def _report(per_seed: np.ndarray, floor: list[float], epsilon: float, rows: int = 5000) -> dict:
    """A minimal measure report: per_seed (capacities, seeds)."""
    curve = [
        {"capacity": c, "distance": mean_ci(v.tolist()), "undetermined": False}
        for c, v in zip(CAPS, per_seed, strict=True)
    ]
    crit = next((e["capacity"] for e in curve if e["distance"]["mean"] <= epsilon), None)
    return {
        "metric": "mmd",
        "seeds": list(range(per_seed.shape[1])),
        "n_eval": 1000,
        "data": {"rows": rows},
        "floor": mean_ci(floor),
        "curve": curve,
        "critical_capacity": {"epsilon": epsilon, "capacity": crit},
    }


def _shared_noise(seeds: int = 5):
    """Each seed's reference sample moves every run's distance by the same amount, which
    dominates the runs' own spread: the case the paired design is for."""
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 0.02, seeds)  # per seed, shared by both runs
    base = np.array([0.1, 0.05, 0.02, 0.01])[:, None]
    a = base + reference + rng.normal(0, 1e-4, (4, seeds))
    b = base + 0.003 + reference + rng.normal(0, 1e-4, (4, seeds))
    return a, b, rng.normal(0, 1e-3, seeds).tolist()


def test_paired_difference_is_taken_seed_by_seed_and_resolves_what_the_intervals_cannot():
    a, b, floor = _shared_noise()
    ra, rb = _report(a, floor, 0.0), _report(b, floor, 0.0)
    diff = paired_difference(ra, rb)
    for e, va, vb in zip(diff["curve"], a, b, strict=True):
        assert e["per_seed"] == pytest.approx((va - vb).tolist())
        assert e["ci"][1] < 0  # a is closer to the data at every capacity, and the data say so
    # the runs' own intervals overlap at every capacity: unpaired, nothing could be told
    for ea, eb in zip(ra["curve"], rb["curve"], strict=True):
        assert ea["distance"]["ci"][1] > eb["distance"]["ci"][0]
    v = verdict("a", "b", diff, ra, rb)
    assert v["can_tell"] and v["closer_to_data"] == "a" and v["separated_capacities"] == CAPS


def test_identical_runs_differ_by_exactly_zero_and_cannot_be_told_apart():
    a, _, floor = _shared_noise()
    ra = _report(a, floor, 0.015)
    diff = paired_difference(ra, _report(a.copy(), floor, 0.015))
    assert all(e["mean"] == 0 and e["ci"] == [0.0, 0.0] for e in diff["curve"])
    v = verdict("a", "a2", diff, ra, ra)
    assert not v["can_tell"] and v["smaller_generator"] is None
    assert diff["critical_capacity"]["a_smaller_share"] == 0


def test_runs_scored_on_different_rows_are_refused():
    a, b, floor = _shared_noise()
    other_floor = [f + 1e-3 for f in floor]
    with pytest.raises(UsageError, match="same held-out rows"):
        paired_difference(_report(a, floor, 0.0), _report(b, other_floor, 0.0))


def test_critical_interval_is_a_point_when_every_seed_agrees_and_wide_when_they_do_not():
    seeds = 4
    clear = np.array([[0.1] * seeds, [0.05] * seeds, [0.001] * seeds, [0.0005] * seeds])
    r = _report(clear, [0.0] * seeds, 0.002)
    out = critical_interval(r["curve"], 0.002)
    assert out["interval"] == [4, 4] and out["share"] == {"4": 1.0}
    # at capacity 2 two seeds are within epsilon and two far above: resampling the seeds makes
    # 2 critical in some replicates and 4 in others
    mixed = clear.copy()
    mixed[1] = [0.001, 0.001, 0.2, 0.2]
    out = critical_interval(_report(mixed, [0.0] * seeds, 0.002)["curve"], 0.002)
    assert out["interval"] == [2, 4] and set(out["share"]) == {"2", "4"}
    # never reached: the interval says so rather than naming a capacity
    far = clear + 1.0
    out = critical_interval(_report(far, [0.0] * seeds, 0.002)["curve"], 0.002)
    assert out["interval"] == [None, None] and out["share"] == {"none": 1.0}
