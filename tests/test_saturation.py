"""Where the curve c -> D_c flattens, and the default sweep's extension
(latentdist.estimator.saturation), on curves whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentdist as ld
from latentdist.estimator.paired import paired_difference, verdict
from latentdist.estimator.saturation import next_capacity, saturation
from latentdist.stats import mean_ci

CAPS = [1, 2, 4, 8, 16, 32, 64]


def _curve(per_seed: np.ndarray, caps=CAPS) -> list[dict]:
    return [
        {"capacity": c, "distance": mean_ci(v.tolist()), "undetermined": False}
        for c, v in zip(caps, per_seed, strict=True)
    ]


def _plateau(at: int, seeds: int = 4, level: float = 4e-4, noise: float = 1e-5) -> np.ndarray:
    """D_c = level + 0.1 / c^2 below capacity ``at``, exactly ``level`` from it on, plus a
    per-seed offset shared by every capacity (the seed's reference sample) and a little own
    noise: the curve flattens at ``at`` by construction."""
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 1e-3, seeds)  # larger than every gain past the plateau
    base = np.array([level + (0.1 / c**2 if c < at else 0.0) for c in CAPS])
    return base[:, None] + shared + rng.normal(0, noise, (len(CAPS), seeds))


FLOOR = mean_ci([0.0, 1e-4, -1e-4, 0.0])


@pytest.mark.parametrize("at", [2, 8, 16])
def test_saturation_finds_the_capacity_where_a_constructed_curve_flattens(at):
    out = saturation(_curve(_plateau(at)), FLOOR, 0.0, 500, 0)
    assert out["capacity"] == at
    # the paired excess over the floor: the plateau's level, the shared offsets cancelled
    # against the floor's own per-seed values only in part, so compare with them directly
    values = _plateau(at)[CAPS.index(at)] - np.asarray(FLOOR["per_seed"])
    assert out["excess"]["mean"] == pytest.approx(values.mean())
    # the interval: the truth at its lower end and most often; where the plateau's own noise
    # brings a pair near the paired threshold, resampled seeds move it up, never past the
    # last capacity that can be confirmed
    assert out["interval"][0] == at and max(out["share"], key=out["share"].get) == str(at)
    assert out["interval"][1] <= CAPS[-2]
    exact = saturation(_curve(_plateau(at, noise=0.0)), FLOOR, 0.0, 500, 0)  # flat exactly
    assert exact["interval"] == [at, at] and exact["share"] == {str(at): 1.0}


def test_a_flat_curve_saturates_at_its_smallest_capacity_and_a_falling_one_does_not():
    flat = _plateau(1)
    assert saturation(_curve(flat), FLOOR, 0.0, 200, 0)["capacity"] == 1
    falling = _plateau(10**6)  # 0.1 / c^2 at every capacity: measurably lower each time
    out = saturation(_curve(falling), FLOOR, 0.0, 200, 0)
    assert out["capacity"] is None and out["interval"] == [None, None]


def test_a_noisy_small_capacity_cannot_fake_a_plateau():
    """One seed failing at c = 1 makes that capacity's interval cross everything; the curve
    still falls measurably from 4 to 8, so the saturation capacity is where it flattens."""
    per_seed = _plateau(8)
    per_seed[0, 0] = 5.0
    assert saturation(_curve(per_seed), FLOOR, 0.0, 500, 0)["capacity"] == 8


def test_the_plateau_must_be_confirmed_by_a_larger_capacity():
    """Flat only between the last two capacities: the first on the plateau is the largest,
    and nothing beyond it says more capacity would not help."""
    per_seed = _plateau(64)
    assert saturation(_curve(per_seed), FLOOR, 0.0, 200, 0)["capacity"] is None
    assert saturation(_curve(per_seed[:-1], CAPS[:-1]), FLOOR, 0.0, 200, 0)["capacity"] is None


def test_next_capacity_doubles_until_flat_or_within_epsilon_and_stops_at_the_limit():
    falling = _curve(_plateau(10**6))
    assert next_capacity(falling, 0.0, 0.0, 256) == (128, "the curve still falls at 64")
    assert next_capacity(falling, 0.0, 0.0, 100) == (100, "the curve still falls at 64")
    assert next_capacity(falling, 0.0, 0.0, 64)[0] is None
    assert next_capacity(falling, 0.0, 0.0, 0) == (None, "no extension")
    assert next_capacity(_curve(_plateau(8)), 0.0, 0.0, 256) == (None, "the curve has flattened")
    # two consecutive capacities within epsilon: the critical capacity is confirmed
    nxt, why = next_capacity(falling, 1.0, 0.0, 256)
    assert nxt is None and "reach epsilon" in why
    one_seed = _curve(_plateau(10**6, seeds=1))
    assert next_capacity(one_seed, 0.0, 0.0, 256)[0] is None


def test_paired_comparison_uses_the_capacities_both_sweeps_measured_and_orders_plateaus():
    def report(per_seed, caps):
        curve = _curve(per_seed, caps)
        return {
            "metric": "mmd",
            "seeds": [0, 1, 2, 3],
            "n_eval": 1000,
            "data": {"rows": 5000},
            "floor": FLOOR,
            "curve": curve,
            "critical_capacity": {"epsilon": 0.0, "capacity": None},
            "saturation": saturation(curve, FLOOR, 0.0, 200, 0),
        }

    early = report(_plateau(4, noise=0.0)[:5], CAPS[:5])  # flattened by 4, swept to 16
    late = report(_plateau(16, noise=0.0), CAPS)  # swept to 64
    diff = paired_difference(early, late)
    assert [e["capacity"] for e in diff["curve"]] == CAPS[:5]
    assert diff["saturation"]["a"] == 4 and diff["saturation"]["b"] == 16
    assert diff["saturation"]["a_smaller_share"] == 1.0
    assert diff["saturation"]["log2_ratio_interval"] == [-2.0, -2.0]
    v = verdict("early", "late", diff, early, late)
    assert v["flattens_first"] == "early"
    assert v["saturation"]["early"]["capacity"] == 4


def test_an_extended_sweep_measures_what_the_longer_sweep_measures():
    """The sweep 1, 2 extended to 4 by the rule fits and evaluates capacity 4 alone, with the
    same judges and its nested candidate from 2: the same curve as the sweep 1, 2, 4."""
    torch.manual_seed(0)
    z = torch.randn(3000, 4)
    x = z @ torch.randn(4, 10) + 0.05 * torch.randn(3000, 10)  # rank 4: c = 1, 2 fall short
    settings = dict(seeds=3, steps=40, n_eval=150, proxies=False, progress=False, device="cpu")
    extended = ld.measure(z, x, capacities=(1, 2), max_capacity=4, epsilon=0.0, **settings)
    whole = ld.measure(z, x, capacities=(1, 2, 4), epsilon=0.0, **settings)
    r = extended.report
    assert r["sweep"]["capacities"] == [1, 2, 4] and r["sweep"]["added"] == [4]
    assert whole.report["sweep"]["added"] == []  # given capacities are not extended
    for e, f in zip(r["curve"], whole.report["curve"], strict=True):
        assert e["distance"]["per_seed"] == f["distance"]["per_seed"]
        assert e["chosen"] == f["chosen"]
    assert r["floor"] == whole.report["floor"]


def test_max_capacity_is_validated_once_at_the_edge(tmp_path, capsys):
    from tests._cli import run_cli

    np.save(tmp_path / "z.npy", np.zeros((20, 2), np.float32))
    args = [
        "measure",
        "--latents",
        str(tmp_path / "z.npy"),
        "--data",
        "digits",
        "--max-capacity",
        "-1",
    ]
    code, _, err = run_cli(args + ["--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--max-capacity -1: expected an integer >= 0" in err
    assert len(err.strip().splitlines()) == 1
