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
seeds (``latentdist.estimator.stats.mean_ci``), widened by the delete-d jackknife for the
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdist.discrepancy import below_floor_cause
from latentdist.errors import UsageError
from latentdist.estimator.stats import mean_ci

__all__ = [
    "DEFAULT_METRIC",
    "DistanceResult",
    "DistanceSplit",
    "distance_split",
    "sample_distance",
    "sample_distances",
]

#: The metric ``latentdist distance`` uses when none is named. Unbiased MMD^2 with several
#: bandwidths: its floor is centred on 0, nothing scores below the true distribution in
#: expectation, and it ranks image degradations where empirical W1/W2 at n ~ 10^3 rank them
#: below fresh data (benchmarks/results/validity.md, V2).
DEFAULT_METRIC: str = "mmd"
_FEATURE_METRICS = ("fd", "kid")  # metrics that take a ``features`` map
_MAX_N_EVAL = 1000


@dataclass
class DistanceSplit:
    """Row indices of one seed: into the reference (``ref_*``) and into the samples (``smp_*``).

    ``ref_fit`` trains the critic (its reference side) or the feature network; ``ref_fit_floor``
    plays the samples' part when the critic of the floor is trained, so the floor's critic sees
    as many rows as the distance's (``smp_fit``). All index sets within one array are disjoint.
    """

    ref_eval: np.ndarray
    ref_floor: np.ndarray
    ref_fit: np.ndarray
    ref_fit_floor: np.ndarray
    smp_eval: np.ndarray
    smp_fit: np.ndarray


def distance_split(
    n_ref: int, n_samples: int, n_eval: int, seed: int, *, fit: str | None = None
) -> DistanceSplit:
    """The split of one seed (see the module docstring); ``fit`` is None, "features" or "critic".

    * ``None``: ref_eval, ref_floor of n_eval rows each; needs n_ref >= 2 n_eval.
    * ``"features"``: ref_fit = all remaining reference rows (the feature network's training set).
    * ``"critic"``: the remaining reference rows are halved into ref_fit (reference side of both
      critics) and ref_fit_floor (the floor critic's other side); the samples give smp_fit, the
      rows after smp_eval, truncated with ref_fit_floor to a common size n_fit.
    """
    rng = np.random.default_rng(20_011 + seed)
    perm_r, perm_s = rng.permutation(n_ref), rng.permutation(n_samples)
    rest = perm_r[2 * n_eval :]
    empty = np.zeros(0, dtype=np.int64)
    ref_fit, ref_fit_floor, smp_fit = empty, empty, empty
    if fit == "features":
        ref_fit = rest
    elif fit == "critic":
        n_fit = min(len(rest) // 2, n_samples - n_eval)
        ref_fit, ref_fit_floor = rest[:n_fit], rest[n_fit : 2 * n_fit]
        smp_fit = perm_s[n_eval : n_eval + n_fit]
    return DistanceSplit(
        ref_eval=perm_r[:n_eval],
        ref_floor=perm_r[n_eval : 2 * n_eval],
        ref_fit=ref_fit,
        ref_fit_floor=ref_fit_floor,
        smp_eval=perm_s[:n_eval],
        smp_fit=smp_fit,
    )


@dataclass
class DistanceResult:
    """The outcome of ``sample_distance``; ``report`` is the content of ``distance.json``."""

    report: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.report

    def to_json(self, indent: int | None = 2) -> str:
        from latentdist._io import to_json

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
        from latentdist._io import save_json

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
    t = source.detach().cpu() if isinstance(source, torch.Tensor) else torch.as_tensor(source)
    t = t.float()
    if t.dim() < 1 or len(t) == 0:
        raise UsageError(f"{what}: no samples")
    if t.dim() == 1:
        t = t[:, None]
    if not torch.isfinite(t).all():
        raise UsageError(f"{what}: contains NaN or Inf values")
    return t, {"name": f"<{what} array>", "rows": len(t), "shape": list(t.shape[1:])}


def _metric_function(metric: str):
    from latentdist.discrepancy import METRICS

    if metric not in METRICS:
        raise UsageError(
            f"--metric {metric}: unknown metric (expected one of: {', '.join(METRICS)})"
        )
    return METRICS[metric]


def _needs_fit(metric: str) -> bool:
    from latentdist import discrepancy as disc

    return metric in getattr(disc, "NEEDS_FIT", {"critic"})


def _space(
    metric: str, fn: Any, features: Any, feature_kind: str, kwargs: dict, shape: list
) -> str:
    """In words: the space and kernel the metric works in (stated in every report)."""
    params = inspect.signature(fn).parameters
    dim = math.prod(shape)
    if metric in _FEATURE_METRICS:
        where = {
            "identity": f"the data space itself (identity features, {dim} dimensions)",
            "learned": "a feature network trained on the reference's fit rows only "
            "(latentdist.evaluation.train_feature_net: a classifier when labels exist, "
            "else a denoising autoencoder)",
            "extractor": f"the user's feature extractor {features}",
            "module": "a given feature module",
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
    features: Any, metric: str, is_image: bool
) -> tuple[str | None, torch.nn.Module | None]:
    """(kind, module): kind is None (metric takes no features), identity, learned, extractor, module."""
    if metric not in _FEATURE_METRICS:
        if features not in (None, "auto"):
            raise UsageError(f"--features applies to fd and kid only, not to --metric {metric}")
        return None, None
    if features in (None, "auto"):
        return ("learned" if is_image else "identity"), None
    if features in ("identity", "learned"):
        return features, None
    if isinstance(features, torch.nn.Module):
        return "module", features
    if isinstance(features, (str, os.PathLike)):
        from latentdist.evaluation.generation import load_feature_extractor

        return "extractor", load_feature_extractor(features)
    raise UsageError(
        f"features: expected auto, identity, learned, a path or a module, got {features!r}"
    )


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
    ``feature_steps`` steps), a TorchScript path, or a module mapping (n, *shape) -> (n, F).
    """
    t_start = time.perf_counter()
    metric = metric or DEFAULT_METRIC
    fn = _metric_function(metric)
    kwargs = dict(metric_kwargs or {})
    if int(seeds) < 1:
        raise UsageError(f"--seeds {seeds}: expected an integer >= 1")
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
    is_image = len(ref_info["shape"]) == 3
    feature_kind, feature_module = _resolve_features(features, metric, is_image)
    critic = _needs_fit(metric)
    fit = "critic" if critic else ("features" if feature_kind == "learned" else None)
    n_ref = ref_info["rows"]
    n_smp_min = min(info["rows"] for _, info in smps.values())
    # rows that must remain for training, as a multiple of n_eval (the default keeps them equal)
    fit_share = {"critic": 2, "features": 1, None: 0}[fit]
    if n_eval is None:
        # at most half of each set per seed: the re-splits then show every side's variability
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
    need_smp = n_eval + (2 if critic else 0)
    for _, info in smps.values():
        if info["rows"] < need_smp:
            raise UsageError(
                f"samples {info['name']}: {info['rows']} rows, but n_eval {n_eval} needs at "
                f"least {need_smp}"
                + (" (plus rows to train the critic on)" if critic else "")
                + "; lower --n-eval"
            )

    params = inspect.signature(fn).parameters
    seed_list = [seed + s for s in range(int(seeds))]
    distances: dict[str, list[float]] = {name: [] for name in smps}
    floors: dict[str, list[float]] = {name: [] for name in smps}
    training: dict[str, dict[str, Any]] = {}
    bandwidths: list[float] = []
    from tqdm.auto import tqdm

    from latentdist.discrepancy import median_bandwidth

    for s in tqdm(seed_list, desc=f"distance {metric}", disable=not progress, leave=False):
        kw = dict(kwargs)
        if "seed" in params and "seed" not in kw:
            kw["seed"] = s
        if feature_kind is not None and feature_kind != "identity":
            module = feature_module
            if feature_kind == "learned":
                ref_fit = distance_split(n_ref, n_smp_min, n_eval, s, fit=fit).ref_fit
                module = _train_features(ref, ref_fit, feature_steps, s)
                for name in smps:
                    training[name] = {
                        "what": "feature network",
                        "reference_rows": len(ref_fit),
                        "steps": feature_steps,
                    }
            kw["features"] = module
        # the reference's rows of this seed do not depend on the samples' size
        ref_eval = _rows(ref, distance_split(n_ref, n_smp_min, n_eval, s, fit=fit).ref_eval)
        if metric == "mmd" and kw.get("bandwidth") is None:
            # one kernel for the floor and every set: fixed by the reference (median heuristic)
            kw["bandwidth"] = median_bandwidth(ref_eval)
            bandwidths.append(kw["bandwidth"])
        floor_by_size: dict[int, float] = {}  # the floor depends on the samples only via n_fit
        for name, (smp, info) in smps.items():
            sp = distance_split(n_ref, info["rows"], n_eval, s, fit=fit)
            kw_d, kw_f = dict(kw), dict(kw)
            if critic:
                fit_ref = _rows(ref, sp.ref_fit)
                kw_d.update(fit_x=_rows(smp, sp.smp_fit), fit_y=fit_ref)
                kw_f.update(fit_x=_rows(ref, sp.ref_fit_floor), fit_y=fit_ref)
                training[name] = {
                    "what": "critic: samples vs reference for the distance, reference vs "
                    "reference for the floor",
                    "reference_rows": len(sp.ref_fit) + len(sp.ref_fit_floor),
                    "sample_rows": len(sp.smp_fit),
                }
            key = len(sp.smp_fit)
            if key not in floor_by_size:
                floor_by_size[key] = float(fn(_rows(ref, sp.ref_floor), ref_eval, **kw_f))
            floors[name].append(floor_by_size[key])
            distances[name].append(float(fn(_rows(smp, sp.smp_eval), ref_eval, **kw_d)))

    elapsed = time.perf_counter() - t_start
    out = {}
    for name, (_, smp_info) in smps.items():
        # each seed evaluates a fraction of each finite set (see mean_ci); a set evaluated
        # whole in every seed shows no variability across seeds, so it cannot enter
        f_ref, f_smp = n_eval / n_ref, n_eval / smp_info["rows"]
        sampled = max(f for f in (f_ref, f_smp) if f < 1)
        distance = mean_ci(distances[name], sampled_fraction=sampled)
        floor = mean_ci(floors[name], sampled_fraction=f_ref)
        # distance and floor of a seed share its reference rows: their difference is paired
        excess = mean_ci(
            np.subtract(distances[name], floors[name]).tolist(), sampled_fraction=sampled
        )
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
            "metric_kwargs": dict(kwargs),
            "space": _space(metric, fn, features, feature_kind or "", kwargs, ref_info["shape"]),
            "features": feature_kind,
            "kernel_bandwidth_per_seed": bandwidths or None,
            "n_eval": n_eval,
            "seeds": seed_list,
            "distance": distance,
            "floor": floor,
            "excess": excess,
            "verdict": verdict,
            "training": training.get(name),
            "samples": smp_info,
            "reference": ref_info,
            "warnings": warnings,
            "timings": {"total_s": elapsed, "sets_scored_together": len(smps)},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        out[name] = DistanceResult(report)
    return out


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
    from latentdist.data.source import DataSource
    from latentdist.evaluation.generation import train_feature_net

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
    sub = DataSource(
        f"{getattr(ref, 'name', 'reference')}[fit rows]",
        x.numpy(),
        kind="images" if x.dim() == 4 else "vectors",
        labels=labels,
    )
    net = train_feature_net(sub, steps=steps, seed=seed)
    _FEATURE_CACHE[key] = net
    while len(_FEATURE_CACHE) > _FEATURE_CACHE_SIZE:
        _FEATURE_CACHE.popitem(last=False)
    return net
