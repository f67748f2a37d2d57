"""From per-seed values to the report: intervals, the critical capacity, warnings, proxies.

Each seed evaluates n_eval of the finite latent and data rows, so intervals are widened to
carry the data's own sampling variability, not only the re-splits' (``stats.mean_ci``). A
capacity scoring below the floor beyond both intervals is undetermined: no generator beats
fresh data in the population, so such a value is a failure of the estimator, not a measurement.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from latentdist.discrepancy import below_floor_cause
from latentdist.proxies import latent_geometry
from latentdist.proxies.diagnostics import latent_diagnostics
from latentdist.stats import mean_ci


def undetermined(curve: list[dict], floor: dict) -> set:
    """Capacities scoring below the floor beyond both intervals: no generator beats fresh data
    in the population, so such a value is a failure of the estimator, not a measurement."""
    if not floor["ci"]:
        return set()
    return {
        e["capacity"]
        for e in curve
        if e["distance"]["ci"] and e["distance"]["ci"][1] < floor["ci"][0]
    }


def seed_proxies(per_seed: list[dict]) -> dict:
    """Proxies of each seed's generator at one capacity (``generator_proxies`` on its evaluation
    latents): mean over seeds, with the range."""
    keys = [k for k, v in per_seed[0].items() if isinstance(v, (int, float))]
    out: dict[str, Any] = {k: float(np.mean([p[k] for p in per_seed])) for k in keys}
    out["params"] = int(per_seed[0]["params"])
    out["over"] = f"mean over {len(per_seed)} seed(s)"
    out["range"] = {
        k: [float(min(p[k] for p in per_seed)), float(max(p[k] for p in per_seed))]
        for k in keys
        if k not in ("params", "n_points")
    }
    return out


def curve_entries(
    caps: list[int | None],
    curve_data: dict,
    proxies: dict | None,
    by_fit: bool,
    sampled: float,
) -> list[dict[str, Any]]:
    """One entry per capacity: parameters, the distance with its interval, each fit's own
    (``by_fit``), the held-out reconstruction error, and the proxies (mean over seeds)."""
    curve = []
    for cap in caps:
        info = curve_data[cap]
        entry: dict[str, Any] = {
            "capacity": cap,
            "params": info["params"],
            "distance": mean_ci(info["distance"], sampled_fraction=sampled),
        }
        if by_fit:
            entry["by_fit"] = {
                f: mean_ci(v, sampled_fraction=sampled) for f, v in info["by_fit"].items()
            }
            entry["chosen"] = info["chosen"]
        if info["recon"]:
            entry["recon_rmse"] = mean_ci(info["recon"])
        if proxies is not None:
            n_seeds = len(info["distance"])
            entry["proxies"] = seed_proxies([proxies[(cap, i)] for i in range(n_seeds)])
        else:
            entry["proxies"] = {"params": entry["params"]}
        curve.append(entry)
    return curve


def monotonicity_warnings(curve: list[dict]) -> list[str]:
    """Flag capacities whose distance rises above a smaller capacity's beyond both intervals."""
    out = []
    for a, b in zip(curve, curve[1:], strict=False):
        lo_b = (b["distance"]["ci"] or [b["distance"]["mean"]] * 2)[0]
        hi_a = (a["distance"]["ci"] or [a["distance"]["mean"]] * 2)[1]
        if lo_b > hi_a:
            out.append(
                f"distance rises from capacity {a['capacity']} ({a['distance']['mean']:.4g}) to "
                f"{b['capacity']} ({b['distance']['mean']:.4g}) beyond its confidence interval: "
                "the larger generators are under-fitted (try more --steps or another --lr)"
            )
    return out


def below_floor_warnings(
    curve: list[dict], floor: dict, metric: str, n_eval: int, data_shape: tuple[int, ...]
) -> list[str]:
    """Flag capacities that score below the floor beyond both intervals: no generator beats
    fresh data from P_x in the population, so these are undetermined, not a ranking
    (``below_floor_cause`` says why such values arise)."""
    if not floor["ci"]:  # one seed: no interval to judge by
        return []
    below = sorted(undetermined(curve, floor), key=lambda c: -1 if c is None else c)
    if not below:
        return []
    names = ", ".join("linear" if c is None else str(c) for c in below)
    which = f"capacities {names} score" if len(below) > 1 else f"capacity {names} scores"
    cause = below_floor_cause(metric, n_eval, int(np.prod(data_shape)))
    return [
        f"{which} below the floor ({floor['mean']:.4g}) beyond both intervals, so they are "
        f"undetermined, not a ranking: {cause}"
    ]


def judge_curve(
    curve: list[dict], floor: dict, epsilon: float, generator: str, metric: str, n_eval: int,
    data_shape: tuple[int, ...],
) -> tuple[int | None, list[str], bool]:  # fmt: skip
    """Mark undetermined capacities in ``curve``; return (critical capacity, warnings,
    monotone). The critical capacity is the smallest determined one with mean <= epsilon (0
    for a linear generator that reaches it); None when no capacity does."""
    rises = monotonicity_warnings(curve)
    below = undetermined(curve, floor)
    for e in curve:
        e["undetermined"] = e["capacity"] in below
    warnings = rises + below_floor_warnings(curve, floor, metric, n_eval, data_shape)
    critical = next(
        (
            e["capacity"]
            for e in curve
            if e["distance"]["mean"] <= epsilon and not e["undetermined"]
        ),
        None,
    )
    first = curve[0]
    if (
        generator == "linear"
        and critical is None
        and not first["undetermined"]
        and first["distance"]["mean"] <= epsilon
    ):
        critical = 0
    return critical, warnings, not rises


def describe_latent(
    z: torch.Tensor, x_head: Any, codebook: Any, encoder: Any, is_integer: bool, seed: int
) -> tuple[dict, dict]:
    """(the latent's geometry, its diffusability diagnostics)."""
    info = latent_geometry(z, codebook=codebook, is_integer=is_integer, seed=seed)
    info.setdefault("shape", list(z.shape[1:]))
    diagnostics = latent_diagnostics(z, x_head, encoder=encoder, discrete=is_integer, seed=seed)
    return info, diagnostics
