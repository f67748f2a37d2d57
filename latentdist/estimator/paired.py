"""The uncertainty of a critical capacity, and two latents compared as a paired experiment.

Two runs measured with the same data, seeds and settings are scored on the same held-out rows
by the same judges: seed s's reference sample, kernel and floor are shared. The question a user
asks is the difference D_c(A) - D_c(B), and its per-seed values cancel the reference sample's
noise, which dominates each run's interval alone (common random numbers; Efron & Tibshirani
1993, the paired bootstrap). Critical capacities get their uncertainty from a bootstrap over
seeds: resample the seeds with replacement, recompute the curve's means, take the smallest
determined capacity whose mean is within epsilon; for two runs the same resampled seeds serve
both, so their difference is paired too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from latentdist.errors import UsageError
from latentdist.estimator.saturation import saturation_indices
from latentdist.stats import bootstrap_draws, mean_ci

BOOTSTRAP_REPLICATES = 2000
_LEVEL = 0.95


def _capacities(curve: list[dict]) -> list:
    return [e["capacity"] for e in curve]


def _critical_indices(curve: list[dict], epsilon: float, draws: np.ndarray) -> np.ndarray:
    """Per bootstrap draw (rows of seed indices), the index of the critical capacity in
    ``curve``, or len(curve) when no determined capacity reaches epsilon."""
    values = np.array([e["distance"]["per_seed"] for e in curve], dtype=float)  # (caps, seeds)
    means = values[:, draws].mean(-1)  # (caps, draws)
    ok = (means <= epsilon) & ~np.array([bool(e.get("undetermined")) for e in curve])[:, None]
    first = np.where(ok.any(0), ok.argmax(0), len(curve))
    return first


def _quantile_index(indices: np.ndarray, q: float) -> int:
    return int(np.quantile(indices, q, method="inverted_cdf"))


def critical_interval(
    curve: list[dict], epsilon: float, replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0
) -> dict[str, Any]:
    """A 95 % bootstrap interval of the critical capacity over seeds (percentile method; the
    threshold epsilon is held fixed). ``interval``: [lo, hi] in capacities, None for "beyond
    the sweep"; ``share``: how often each capacity (and ``"none"``) was critical."""
    n_seeds = len(curve[0]["distance"]["per_seed"])
    if n_seeds < 2:
        return {"interval": None, "method": "one seed: no bootstrap", "share": None}
    caps = _capacities(curve)
    first = _critical_indices(curve, epsilon, bootstrap_draws(n_seeds, replicates, seed))
    label = [str(c) for c in caps] + ["none"]
    lo, hi = (_quantile_index(first, q) for q in ((1 - _LEVEL) / 2, (1 + _LEVEL) / 2))
    counts = np.bincount(first, minlength=len(caps) + 1) / replicates
    return {
        "interval": [caps[lo] if lo < len(caps) else None, caps[hi] if hi < len(caps) else None],
        "method": f"percentile bootstrap over seeds, {replicates} replicates, epsilon fixed; "
        "null: not reached within the sweep",
        "share": {label[k]: round(float(v), 4) for k, v in enumerate(counts) if v > 0},
    }


def _check_comparable(a: dict, b: dict) -> None:
    for key in ("metric", "seeds", "n_eval"):
        if a[key] != b[key]:
            raise UsageError(
                f"paired difference: the runs differ in {key} ({a[key]} vs {b[key]}); measure "
                "both with the same settings"
            )
    if a["data"]["rows"] != b["data"]["rows"] or a["floor"] != b["floor"]:
        raise UsageError(
            "paired difference: the runs were not scored on the same held-out rows (their "
            "floors differ); measure both on the same data with the same settings"
        )
    if not _common(a, b):
        raise UsageError("paired difference: the runs' capacity sweeps share no capacity")


def _common(a: dict, b: dict) -> list:
    """The capacities both sweeps measured (a default sweep extends as far as its own curve
    needs, so one run's may go further)."""
    theirs = set(_capacities(b["curve"]))
    return [c for c in _capacities(a["curve"]) if c in theirs]


def _as_capacity(caps: list, indices: np.ndarray) -> np.ndarray:
    """Sweep indices as capacities, with "not reached within the sweep" as +inf."""
    table = np.array([np.inf if c is None else c for c in caps] + [np.inf], dtype=float)
    return table[indices]


def _compare_draws(ca: np.ndarray, cb: np.ndarray) -> dict[str, Any]:
    """Per bootstrap draw, the two runs' capacities: how often each is the smaller, and the
    interval of log2(a / b) (null where a run's is beyond its sweep)."""
    with np.errstate(invalid="ignore"):
        ratio = np.log2(ca / cb)
    lo, hi = (np.quantile(ratio, q, method="inverted_cdf") for q in (0.025, 0.975))
    return {
        "a_smaller_share": round(float((ca < cb).mean()), 4),
        "b_smaller_share": round(float((cb < ca).mean()), 4),
        "log2_ratio_interval": [float(v) if np.isfinite(v) else None for v in (lo, hi)],
    }


def _bootstrapped(r: dict, which: str, sampled: float, draws: np.ndarray) -> np.ndarray:
    """Run ``r``'s critical or saturation capacity per bootstrap draw of seeds."""
    if which == "critical_capacity":
        idx = _critical_indices(r["curve"], r["critical_capacity"]["epsilon"], draws)
    else:
        idx = saturation_indices(r["curve"], sampled, draws)
    return _as_capacity(_capacities(r["curve"]), idx)


def paired_difference(
    a: dict[str, Any], b: dict[str, Any], replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0
) -> dict[str, Any]:
    """D_c(A) - D_c(B) per capacity both sweeps measured, seed by seed, with its interval
    (``mean_ci``, widened for the fraction of the rows each seed evaluates), and the paired
    bootstrap of the two critical and the two saturation capacities (the same resampled seeds
    for both runs). ``a``, ``b``: two ``measure`` reports of the same data and settings."""
    _check_comparable(a, b)
    sampled = a["n_eval"] / a["data"]["rows"]
    common = set(_common(a, b))
    pairs = zip(
        [e for e in a["curve"] if e["capacity"] in common],
        [e for e in b["curve"] if e["capacity"] in common],
        strict=True,
    )
    curve = []
    for ea, eb in pairs:
        diff = np.subtract(ea["distance"]["per_seed"], eb["distance"]["per_seed"]).tolist()
        curve.append({"capacity": ea["capacity"], **mean_ci(diff, sampled_fraction=sampled)})
    out: dict[str, Any] = {"curve": curve}
    draws = bootstrap_draws(len(a["seeds"]), replicates, seed) if len(a["seeds"]) >= 2 else None
    for which in ("critical_capacity", "saturation"):
        entry = {
            "a": (a.get(which) or {}).get("capacity"),
            "b": (b.get(which) or {}).get("capacity"),
        }
        if draws is not None:
            ca, cb = (_bootstrapped(r, which, sampled, draws) for r in (a, b))
            entry.update(
                _compare_draws(ca, cb),
                method=f"paired percentile bootstrap over seeds ({replicates} replicates): "
                "the same resampled seeds for both runs; log2_ratio_interval: of a's capacity "
                "over b's (null: beyond a sweep)",
            )
        out[which] = entry
    return out


def verdict(name_a: str, name_b: str, diff: dict[str, Any], a: dict, b: dict) -> dict[str, Any]:
    """Which run needs the smaller generator, and whether the data can tell: the critical
    capacities with their intervals, the paired differences that say so."""
    separated = [e for e in diff["curve"] if e["ci"] and (e["ci"][0] > 0 or e["ci"][1] < 0)]
    crit = diff["critical_capacity"]
    share_a, share_b = crit.get("a_smaller_share", 0.0), crit.get("b_smaller_share", 0.0)
    if share_a >= _LEVEL and separated:
        smaller, can_tell = name_a, True
    elif share_b >= _LEVEL and separated:
        smaller, can_tell = name_b, True
    else:
        smaller, can_tell = None, bool(separated)
    closer = None
    if separated:
        below = sum(e["mean"] < 0 for e in separated)
        closer = name_a if below * 2 > len(separated) else name_b
    flat = diff.get("saturation", {})
    flattens_first = None
    if flat.get("a_smaller_share", 0.0) >= _LEVEL:
        flattens_first = name_a
    elif flat.get("b_smaller_share", 0.0) >= _LEVEL:
        flattens_first = name_b
    return {
        "smaller_generator": smaller,
        "closer_to_data": closer,
        "can_tell": can_tell,
        "separated_capacities": [e["capacity"] for e in separated],
        "critical": {name_a: _crit(a, "critical_capacity"), name_b: _crit(b, "critical_capacity")},
        "flattens_first": flattens_first,
        "saturation": {name_a: _crit(a, "saturation"), name_b: _crit(b, "saturation")},
    }


def _crit(report: dict, which: str) -> dict[str, Any]:
    c = report.get(which) or {}
    out = {"capacity": c.get("capacity"), "interval": c.get("interval")}
    if "excess" in c:
        out["excess"] = c["excess"]
    return out
