"""``sample_distance``: how far a set of generated samples is from a reference set, honestly.

What FID tools do for one number, with the floor and intervals beside it. For every seed the
reference rows are permuted and split into

* ``eval``  (n_eval rows): the reference sample every value is measured against;
* ``floor`` (n_eval rows, disjoint): fresh real data, scored like the samples;
* ``fit``   (the rest, only for metrics that train: the held-out critic, and fd/kid in a learned
  feature space): rows that a critic or feature network is trained on and that are never scored;

and a random n_eval subsample of the samples is drawn (plus, for the critic, a disjoint fit part).
Then, with ``d`` the chosen discrepancy (``latentdist.discrepancy``; its second argument is the
reference)::

    distance_s = d(samples_eval, ref_eval)        floor_s = d(ref_floor, ref_eval)

The floor is what the true distribution itself scores at this sample size: ~0 for unbiased
estimators (unbiased MMD^2, KID, the held-out critic), far from 0 for empirical W1/W2 in high
dimension (Weed & Bach 2019, arXiv 1707.00087). Means and Student-t 95 % intervals are over
seeds (``latentdist.stats.mean_ci``), widened by the delete-d jackknife for the
fraction of each finite set a seed evaluates, so that they carry the data's own sampling
variability and not only the re-splits' (a side used whole in every seed cannot; the report
warns). A held-out critic value is E_P f - E_Q f for one
f fixed before the scored rows are seen: a lower bound on d_F whose floor is ~0 with
O(n^(-1/2)) spread (Arora et al. 2017, "Generalization and Equilibrium in GANs").
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdist._io import save_json, to_json
from latentdist._progress import progress_bar
from latentdist.discrepancy import (
    FEATURE_METRICS,
    METRICS,
    NEEDS_FIT,
    Judge,
    as_rows,
    below_floor_cause,
    resolve_features,
    resolve_metric,
)
from latentdist.errors import UsageError
from latentdist.estimator.split import distance_split
from latentdist.stats import mean_ci

__all__ = [
    "DEFAULT_METRIC",
    "DistanceResult",
    "sample_distance",
    "sample_distances",
]

#: The metric ``latentdist distance`` uses when none is named. Unbiased MMD^2 with several
#: bandwidths: its floor is centred on 0, nothing scores below the true distribution in
#: expectation, and it ranks image degradations where empirical W1/W2 at n ~ 10^3 rank them
#: below fresh data (benchmarks/results/validity.md, V2).
DEFAULT_METRIC: str = "mmd"
_MAX_N_EVAL = 1000


@dataclass
class DistanceResult:
    """The outcome of ``sample_distance``; ``report`` is the content of ``distance.json``."""

    report: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.report

    def to_json(self, indent: int | None = 2) -> str:
        return to_json(self.report, indent)

    @property
    def verdict(self) -> str:
        """'above' / 'below' the floor (the 95 % interval of the per-seed excess over the floor
        excludes 0), or 'within' (or 'one seed')."""
        return self.report["verdict"]

    def table(self) -> str:
        """A plain-text table: distance and floor with intervals, and what was measured."""
        r = self.report

        def row(name: str, s: dict) -> str:
            ci = s["ci"]
            interval = f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "-"
            return f"{name:<9} {s['mean']:>12.4g}   {interval}"

        lines = [
            f"{r['metric']} between {r['samples']['name']} ({r['samples']['rows']} rows) and the "
            f"reference {r['reference']['name']} ({r['reference']['rows']} rows); "
            f"n_eval={r['n_eval']}, seeds={len(r['seeds'])}",
            f"{'':<9} {'mean':>12}   95% CI",
            row("distance", r["distance"]),
            row("floor", r["floor"]),
            row("excess", r["excess"]),
            f"verdict: {_VERDICT_TEXT[r['verdict']]}",
            f"space: {r['space']}",
        ]
        if r["training"]:
            t = r["training"]
            lines.append(
                f"trained on: {t['reference_rows']} reference rows"
                + (f" + {t['sample_rows']} sample rows" if t.get("sample_rows") else "")
                + f" per seed, disjoint from the scored rows ({t['what']})"
            )
        lines += [f"warning: {w}" for w in r["warnings"]]
        return "\n".join(lines)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``distance.json`` into ``out_dir`` atomically; return its path."""
        path = Path(out_dir) / "distance.json"
        save_json(path, self.report)
        return path


_VERDICT_TEXT = {
    "above": "above the floor: the 95% interval of the excess over it excludes 0 (the samples "
    "are distinguishable)",
    "within": "within the floor's range (not distinguishable from fresh reference data)",
    "below": "below the floor (the excess's 95% interval is below 0): no sample set beats fresh "
    "data in the population, so this is a failure of the estimate at this size, not a ranking "
    "(see the warning)",
    "one seed": "one seed: no interval to judge by",
}


def _rows(source: Any, index: np.ndarray) -> torch.Tensor:
    """Rows ``index`` of a DataSource, array or tensor, as float32 (only those rows are read)."""
    if hasattr(source, "take") and hasattr(source, "sample_shape"):  # a DataSource
        order = np.argsort(index)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(index))
        return source.take(index[order])[torch.as_tensor(rank)]  # sorted reads suit memmaps
    return source[torch.as_tensor(index, dtype=torch.long)].float()


def _describe(source: Any, what: str) -> tuple[Any, dict[str, Any]]:
    """Validate ``source`` (a DataSource, array or tensor): non-empty, finite; name, rows, shape."""
    if hasattr(source, "take") and hasattr(source, "sample_shape"):
        return source, {
            "name": source.name,
            "rows": len(source),
            "shape": list(source.sample_shape),
        }
    t = as_rows(source, what, dtype=torch.float32, flat=False)
    return t, {"name": f"<{what} array>", "rows": len(t), "shape": list(t.shape[1:])}


def _space(
    metric: str, fn: Any, features: Any, feature_kind: str, kwargs: dict, shape: list
) -> str:
    """In words: the space and kernel the metric works in (stated in every report)."""
    params = inspect.signature(fn).parameters
    dim = math.prod(shape)
    if metric in FEATURE_METRICS:
        where = {
            "identity": f"the data space itself (identity features, {dim} dimensions)",
            "learned": "a feature network trained on the reference's fit rows only "
            "(latentdist.evaluation.train_feature_net: a classifier when labels exist, "
            "else a denoising autoencoder)",
            "extractor": f"the user's feature extractor {features}",
            "module": "a given feature module",
            "inception": f"FID's Inception-v3 pool features (2048-d; pytorch-fid's network and "
            f"preprocessing) with the weights of {features}",
            "dinov2": f"DINOv2's class token (transformers' Dinov2Model; dgm-eval's "
            f"preprocessing) with the weights of {features}",
        }[feature_kind]
        kind = (
            "Frechet distance of Gaussian fits (FD = W2^2 between them)"
            if metric == "fd"
            else "unbiased MMD^2 with the cubic polynomial kernel (x.y/dim + 1)^3 (KID)"
        )
        return f"{kind}, in {where}"
    if metric == "mmd":
        scales = kwargs.get("scales", params["scales"].default if "scales" in params else (1,))
        bw = kwargs.get("bandwidth")
        sigma = (
            f"{bw:g}"
            if bw
            else "the median pairwise distance within the seed's reference evaluation rows "
            "(kernel_bandwidth_per_seed), one kernel for the floor and the samples"
        )
        return (
            f"unbiased MMD^2, mean of Gaussian kernels at bandwidths {tuple(scales)} x sigma, "
            f"sigma = {sigma}; data space ({dim} dimensions)"
        )
    if metric == "critic":
        return "held-out neural-net distance E f(samples) - E f(reference) for a critic f trained on the fit rows"
    return {
        "w1": f"exact empirical W1, Euclidean cost; data space ({dim} dimensions)",
        "w2": f"exact empirical W2, squared Euclidean cost; data space ({dim} dimensions)",
        "sinkhorn": f"debiased Sinkhorn divergence (square root); data space ({dim} dimensions)",
        "sliced": f"sliced W2 over random directions; data space ({dim} dimensions)",
    }.get(metric, f"{metric}; data space ({dim} dimensions)")


def _resolve_features(
    features: Any, metric: str, shape: list[int]
) -> tuple[str | None, torch.nn.Module | None]:
    """(kind, module) of ``resolve_features``; kind None for a metric that takes no features."""
    if metric not in FEATURE_METRICS:
        if features not in (None, "auto"):
            raise UsageError(f"--features applies to fd and kid only, not to --metric {metric}")
        return None, None
    return resolve_features("auto" if features is None else features, tuple(shape))


def sample_distance(samples: Any, reference: Any, **settings: Any) -> DistanceResult:
    """The discrepancy between ``samples`` and ``reference``, with the floor and 95 % intervals.

    ``samples``, ``reference``: DataSources (``latentdist.load_data``), arrays or tensors of rows
    with the same sample shape. Settings (keywords of ``sample_distances``): ``metric`` (a name
    in ``latentdist.discrepancy.METRICS``, default ``DEFAULT_METRIC``), ``n_eval`` (rows per
    evaluation, default min(1000, what the rows allow)), ``seeds`` (independent splits, >= 2 for
    intervals), ``features`` (fd, kid), ``seed``, ``feature_steps``, ``metric_kwargs`` (e.g.
    ``scales=(1,)`` for single-bandwidth MMD), ``progress``. Splits: the module docstring.
    """
    return sample_distances({"samples": samples}, reference, **settings)["samples"]


def sample_distances(
    sets: Mapping[str, Any],
    reference: Any,
    *,
    metric: str | None = None,
    n_eval: int | None = None,
    seeds: int = 5,
    features: Any = "auto",
    seed: int = 0,
    feature_steps: int = 300,
    metric_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, DistanceResult]:
    """``sample_distance`` for several named sample sets against one reference, sharing work.

    Every set is scored on the same reference splits (seed by seed), so the floor, and a learned
    feature network, are computed once per seed and shared; the sets' values are then paired
    comparisons. ``features`` (fd, kid): "auto" (learned for images, identity for vectors),
    "identity", "learned" (a network trained per seed on that seed's reference fit rows for
    ``feature_steps`` steps), "inception:PATH" or "dinov2:PATH" (those networks with the weights
    of a local file, ``latentdist.discrepancy.pretrained``), a TorchScript path, or a module
    mapping (n, *shape) -> (n, F).
    """
    t_start = time.perf_counter()
    if int(seeds) < 1:
        raise UsageError(f"--seeds {seeds}: expected an integer >= 1")
    plan = _plan(sets, reference, metric or DEFAULT_METRIC, n_eval, features, metric_kwargs)
    seed_list = [seed + s for s in range(int(seeds))]
    scores = _Scores(plan.smps)
    for s in progress_bar(
        seed_list, desc=f"distance {plan.metric}", disable=not progress, leave=False
    ):
        _score_seed(plan, s, feature_steps, scores)
    elapsed = time.perf_counter() - t_start
    return {name: _result(plan, name, scores, seed_list, features, elapsed) for name in plan.smps}


@dataclass
class _Plan:
    """What ``sample_distances`` scores, checked once: the metric, the sides, the sizes."""

    metric: str
    kwargs: dict[str, Any]
    ref: Any
    ref_info: dict[str, Any]
    smps: dict[str, tuple[Any, dict[str, Any]]]
    feature_kind: str | None
    feature_module: torch.nn.Module | None
    fit: str | None  # None, "features" or "critic": what trains on reference rows
    n_eval: int


@dataclass
class _Scores:
    """Per-seed values of every set, and what was trained on which rows."""

    smps: dict
    distances: dict[str, list[float]] = field(default_factory=dict)
    floors: dict[str, list[float]] = field(default_factory=dict)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)
    bandwidths: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.distances = {name: [] for name in self.smps}
        self.floors = {name: [] for name in self.smps}


def _plan(sets, reference, metric, n_eval, features, metric_kwargs) -> _Plan:
    """Validate the sides and settings; choose n_eval (see ``sample_distances``)."""
    resolve_metric(metric)
    if not sets:
        raise UsageError("no sample sets given")
    ref, ref_info = _describe(reference, "reference")
    smps = {}
    for name, samples in sets.items():
        smp, smp_info = _describe(samples, "samples")
        if smp_info["shape"] != ref_info["shape"]:
            raise UsageError(
                f"samples {smp_info['name']} have shape {tuple(smp_info['shape'])} per row but "
                f"the reference {ref_info['name']} has {tuple(ref_info['shape'])}"
            )
        smps[name] = (smp, smp_info)
    feature_kind, feature_module = _resolve_features(features, metric, ref_info["shape"])
    critic = metric in NEEDS_FIT
    fit = "critic" if critic else ("features" if feature_kind == "learned" else None)
    n_eval = _check_sizes(ref_info, [info for _, info in smps.values()], n_eval, fit)
    return _Plan(
        metric, dict(metric_kwargs or {}), ref, ref_info, smps, feature_kind, feature_module,
        fit, n_eval,
    )  # fmt: skip


def _check_sizes(ref_info: dict, smp_infos: list[dict], n_eval: int | None, fit) -> int:
    """n_eval (default: at most half of each set per seed, so that the re-splits show every
    side's variability), checked against the rows each side needs."""
    n_ref = ref_info["rows"]
    n_smp_min = min(info["rows"] for info in smp_infos)
    # rows that must remain for training, as a multiple of n_eval (the default keeps them equal)
    fit_share = {"critic": 2, "features": 1, None: 0}[fit]
    if n_eval is None:
        n_eval = min(_MAX_N_EVAL, n_ref // (2 + fit_share), n_smp_min // 2)
    if n_eval < 2:
        raise UsageError(
            f"--n-eval {n_eval}: expected an integer >= 2 (reference has {n_ref} rows, "
            f"samples {n_smp_min})"
        )
    need_ref = 2 * n_eval + 2 * fit_share  # at least 2 training rows per trained side
    if n_ref < need_ref:
        raise UsageError(
            f"reference {ref_info['name']}: {n_ref} rows, but n_eval {n_eval} needs at least "
            f"{need_ref} (an evaluation sample and a disjoint floor sample of n_eval each"
            + (", and rows to train the " + fit + " on" if fit else "")
            + "); lower --n-eval or give more reference rows"
        )
    critic = fit == "critic"
    need_smp = n_eval + (2 if critic else 0)
    for info in smp_infos:
        if info["rows"] < need_smp:
            raise UsageError(
                f"samples {info['name']}: {info['rows']} rows, but n_eval {n_eval} needs at "
                f"least {need_smp}"
                + (" (plus rows to train the critic on)" if critic else "")
                + "; lower --n-eval"
            )
    return n_eval


def _score_seed(plan: _Plan, s: int, feature_steps: int, scores: _Scores) -> None:
    """Every set's distance and floor for seed ``s``, against one judge of the seed's
    reference rows (one kernel, one feature network for the floor and every set)."""
    n_ref = plan.ref_info["rows"]
    n_smp_min = min(info["rows"] for _, info in plan.smps.values())
    kw = dict(plan.kwargs)
    critic = plan.fit == "critic"
    # the judge passes the split's seed to metrics that take one (sliced); the critic takes
    # metric_kwargs' seed, else 0, for every split (as recorded results were computed)
    judge_seed = kw.pop("seed", 0) if critic else kw.pop("seed", s)
    features = plan.feature_module
    if plan.feature_kind == "learned":
        ref_fit = distance_split(n_ref, n_smp_min, plan.n_eval, s, fit=plan.fit).ref_fit
        features = _train_features(plan.ref, ref_fit, feature_steps, s)
        for name in plan.smps:
            scores.training[name] = {
                "what": "feature network",
                "reference_rows": len(ref_fit),
                "steps": feature_steps,
            }
    # the reference's rows of this seed do not depend on the samples' size
    ref_eval = _rows(
        plan.ref, distance_split(n_ref, n_smp_min, plan.n_eval, s, fit=plan.fit).ref_eval
    )
    judges: dict[int, tuple[Judge, float]] = {}  # the floor depends on the samples via n_fit
    for name, (smp, info) in plan.smps.items():
        sp = distance_split(n_ref, info["rows"], plan.n_eval, s, fit=plan.fit)
        key = len(sp.smp_fit)
        if key not in judges:
            fit_ref = _rows(plan.ref, sp.ref_fit) if critic else None
            judge = Judge(
                plan.metric, ref_eval, reference_fit=fit_ref, features=features,
                seed=judge_seed, **kw,
            )  # fmt: skip
            floor_fit = _rows(plan.ref, sp.ref_fit_floor) if critic else None
            judges[key] = (judge, float(judge(_rows(plan.ref, sp.ref_floor), floor_fit)))
        judge, floor = judges[key]
        if plan.metric == "mmd" and name == next(iter(plan.smps)) and not kw.get("bandwidth"):
            scores.bandwidths.append(judge.kernel["sigma"])
        if critic:
            scores.training[name] = {
                "what": "critic: samples vs reference for the distance, reference vs "
                "reference for the floor",
                "reference_rows": len(sp.ref_fit) + len(sp.ref_fit_floor),
                "sample_rows": len(sp.smp_fit),
            }
        smp_fit = _rows(smp, sp.smp_fit) if critic else None
        scores.floors[name].append(floor)
        scores.distances[name].append(float(judge(_rows(smp, sp.smp_eval), smp_fit)))


def _result(
    plan: _Plan, name: str, scores: _Scores, seed_list: list[int], features: Any, elapsed: float
) -> DistanceResult:
    """One set's report: distance, floor and their paired excess, with intervals and verdict."""
    smp_info = plan.smps[name][1]
    ref_info, n_eval, metric = plan.ref_info, plan.n_eval, plan.metric
    # each seed evaluates a fraction of each finite set (see mean_ci); a set evaluated
    # whole in every seed shows no variability across seeds, so it cannot enter
    f_ref, f_smp = n_eval / ref_info["rows"], n_eval / smp_info["rows"]
    sampled = max(f for f in (f_ref, f_smp) if f < 1)
    distances, floors = scores.distances[name], scores.floors[name]
    distance = mean_ci(distances, sampled_fraction=sampled)
    floor = mean_ci(floors, sampled_fraction=f_ref)
    # distance and floor of a seed share its reference rows: their difference is paired
    excess = mean_ci(np.subtract(distances, floors).tolist(), sampled_fraction=sampled)
    verdict = _verdict(excess)
    warnings = []
    if f_smp >= 1 and len(seed_list) > 1:
        warnings.append(
            f"every seed scores all {smp_info['rows']} sample rows (n_eval {n_eval}): the "
            "interval does not carry the samples' own sampling variability; give more "
            "samples or a lower --n-eval"
        )
    if verdict == "below":
        cause = below_floor_cause(metric, n_eval, math.prod(ref_info["shape"]))
        warnings.append(
            "the samples score below the floor (the interval of their excess over it lies "
            f"below 0): {cause}"
        )
    report = {
        "metric": metric,
        "metric_kwargs": dict(plan.kwargs),
        "space": _space(
            metric,
            METRICS[metric],
            features,
            plan.feature_kind or "",
            plan.kwargs,
            ref_info["shape"],
        ),  # fmt: skip
        "features": plan.feature_kind,
        "kernel_bandwidth_per_seed": scores.bandwidths or None,
        "n_eval": n_eval,
        "seeds": seed_list,
        "distance": distance,
        "floor": floor,
        "excess": excess,
        "verdict": verdict,
        "training": scores.training.get(name),
        "samples": smp_info,
        "reference": ref_info,
        "warnings": warnings,
        "timings": {"total_s": elapsed, "sets_scored_together": len(plan.smps)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return DistanceResult(report)


def _verdict(excess: dict) -> str:
    """From the interval of distance - floor, seed by seed (a paired comparison)."""
    if not excess["ci"]:
        return "one seed"
    if excess["ci"][0] > 0:
        return "above"
    if excess["ci"][1] < 0:
        return "below"
    return "within"


_FEATURE_CACHE: OrderedDict[str, torch.nn.Module] = OrderedDict()
_FEATURE_CACHE_SIZE = 8


def _train_features(ref: Any, rows: np.ndarray, steps: int, seed: int) -> torch.nn.Module:
    """A feature network trained on the reference rows ``rows`` only (with their labels if any).

    Training is deterministic in (rows' content, labels, steps, seed), so the last few networks
    are kept by a content hash: fd and kid on the same split then share one network.
    """
    x = _rows(ref, rows)
    labels = getattr(ref, "labels", None)
    labels = None if labels is None else np.asarray(labels)[rows]
    h = hashlib.sha256(x.numpy().tobytes())
    h.update(repr((tuple(x.shape), steps, seed)).encode())
    if labels is not None:
        h.update(np.ascontiguousarray(labels).tobytes())
    key = h.hexdigest()
    if key in _FEATURE_CACHE:
        _FEATURE_CACHE.move_to_end(key)
        return _FEATURE_CACHE[key]
    _, net = resolve_features(
        "learned",
        tuple(x.shape[1:]),
        fit_rows=x,
        labels=labels,
        steps=steps,
        seed=seed,
        name=f"{getattr(ref, 'name', 'reference')}[fit rows]",
    )
    _FEATURE_CACHE[key] = net
    while len(_FEATURE_CACHE) > _FEATURE_CACHE_SIZE:
        _FEATURE_CACHE.popitem(last=False)
    return net
