"""Validity: does each discrepancy, and the estimator's fits, measure what they claim? (issue 10)

One table per check, every metric a column:

* V1 closed forms: linear-Gaussian inf_g W2 (SPEC §1), FD and Gaussian-kernel MMD^2 between two
  Gaussians, measured against the exact values.
* V2 degradation ladder on MNIST-5k: blur 1 and 2 px, k-means 100 and 10 centroids, the mean
  image, 5 classes, 1 class, each against held-out real rows beside the floor (fresh real rows).
  Pass: above the floor beyond both 95 % intervals; ordered: blur1 < blur2,
  kmeans100 < kmeans10 < mean image, 5 classes < 1 class (means).
* V3 planted latent: x = h(z*) + noise with h a fixed ReLU MLP 8 -> 32 -> 784; latents z*, its
  first 4 and 2 coordinates and a non-Gaussian 8-d latent (2 Phi(z*) - 1, uniform); ``measure``
  across capacities for the default metric with every fit. Pass: z* at a capacity containing h
  (width >= 32) within max(floor's upper limit, 10 % of the 4-coordinate distance); the 2- and
  4-coordinate truncations above the floor beyond both intervals.
* V4 nested latents on MNIST-5k: PCA-2, PCA-8, PCA-32 with the default metric and fit. Pass at
  every capacity: D(PCA-2) > D(PCA-8) beyond both intervals and D(PCA-8) >= D(PCA-32) within
  them (PCA-32 not above PCA-8 beyond the intervals).
* V5 calibration: 20 repeats with fresh data of a case with a known value (same distribution:
  0; shifted Gaussians: the exact MMD^2 and FD); how often the 95 % interval covers the truth,
  and where the floors centre.
* V6 DAE vs joint on MNIST-5k (demo settings): ``compare``'s distance curves beside generation
  FD, with intervals; reported as measured.
* V7 resolution of the paired design: a noise ladder on held-out MNIST rows, every rung scored
  against the same reference rows and seeds; the smallest noise the paired difference to the
  clean rows detects, against the smallest that the two separate intervals do.
* V8 same information, different complexity: PCA-8 of MNIST-5k and the same scores through a
  fixed invertible coupling flow; paired D_c(warped) - D_c(plain) per capacity with the default
  family and sweep. Pass: above 0 beyond the paired interval at small capacity, and the gap at
  the largest capacity smaller than its largest.

    python benchmarks/bench_validity.py [--small] [--only V1,V2,...] [--no-write]
        [--steps S] [--batch-size B] [--capacities 1,4,16,64] [--tag TAG]

The last four run V3/V4/V8 with other fit settings (a given --capacities is extended by the
default rule, as the default sweep is); --tag writes them to validity_TAG.md, not over the
defaults' record. --help lists the rest.
"""

from __future__ import annotations

import argparse
import inspect
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from scipy.stats import ortho_group
from sklearn.decomposition import PCA

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, extended_sweep, markdown_table, write_result  # noqa: E402

import latentdist as ld  # noqa: E402
from latentdist.discrepancy import METRICS  # noqa: E402
from latentdist.estimator import MeasureConfig  # noqa: E402
from latentdist.estimator.fit import FITS  # noqa: E402
from latentdist.estimator.paired import paired_difference  # noqa: E402
from latentdist.evaluation.distance import sample_distances  # noqa: E402
from latentdist.evaluation.validity import (  # noqa: E402
    DEGRADATIONS,
    above_floor,
    common_curve,
    coupling_warp,
    ladder_distances,
    ladder_verdict,
    nested_verdict,
    paired_above,
    planted_latent,
    planted_verdict,
)
from latentdist.stats import mean_ci  # noqa: E402


@dataclass(frozen=True)
class Column:
    """One metric column: a discrepancy name, its settings and (fd/kid) its feature space."""

    label: str
    metric: str
    kwargs: tuple = ()
    features: str | None = None


def columns() -> list[Column]:
    """Every metric column this installation offers (fd, kid, critic once they exist)."""
    cols = [Column("w2", "w2"), Column("sinkhorn", "sinkhorn"), Column("sliced", "sliced")]
    cols.append(Column("mmd", "mmd"))
    if "scales" in inspect.signature(METRICS["mmd"]).parameters:
        cols.append(Column("mmd 1bw (old)", "mmd", (("scales", (1,)),)))
    for m in ("kid", "fd"):
        if m in METRICS:
            cols += [Column(f"{m} id", m, (), "identity"), Column(f"{m} feat", m, (), "learned")]
    if "critic" in METRICS:
        dev = (("device", "cuda"),) if torch.cuda.is_available() else ()
        cols.append(Column("critic", "critic", dev))
    return cols


def cell(s: dict) -> str:
    """'mean ± half-width' of a mean_ci summary."""
    if not s["ci"]:
        return f"{s['mean']:.3g}"
    return f"{s['mean']:.3g} ± {(s['ci'][1] - s['ci'][0]) / 2:.2g}"


# ---------------------------------------------------------------- V1 closed forms


def gaussian_mmd2(delta2: float, dim: int, bandwidth: float, scales) -> float:
    """Exact MMD^2 between N(a, I_d) and N(b, I_d), |a - b|^2 = delta2, for the kernel
    1/S sum_s exp(-|x - y|^2 / (2 (s h)^2)) (latentdist's mmd): for one bandwidth w,
    E k(X, X') with X - X' ~ N(0, 2I) is c = (w^2 / (w^2 + 2))^(d/2), and
    E k(X, Y) = c exp(-delta2 / (2 (w^2 + 2))); so MMD^2 = 2 c (1 - exp(-delta2 / (2 (w^2 + 2))))
    per bandwidth (Gretton et al. 2012, eq. 3 in expectation), averaged over the scales."""
    total = 0.0
    for s in scales:
        w2 = (s * bandwidth) ** 2
        c = (w2 / (w2 + 2.0)) ** (dim / 2)
        total += 2.0 * c * (1.0 - math.exp(-delta2 / (2.0 * (w2 + 2.0))))
    return total / len(scales)


def mmd_scales() -> tuple:
    p = inspect.signature(METRICS["mmd"]).parameters
    return tuple(p["scales"].default) if "scales" in p else (1.0,)


def v1(small: bool) -> str:
    rows = []
    seeds = 2 if small else 3
    # (a) linear generators, P_x = N(0, Q diag(9, 4, 1) Q^T), k = 2: inf_g W2 = sqrt(1) = 1
    n = 3000
    rng = np.random.default_rng(0)
    q = ortho_group.rvs(3, random_state=0)
    x = (rng.standard_normal((n, 3)) @ np.diag([3.0, 2.0, 1.0]) @ q.T).astype(np.float32)
    c = x - x.mean(0)
    pca = (c @ np.linalg.svd(c, full_matrices=False)[2][:2].T).astype(np.float32)
    indep = rng.standard_normal((n, 2)).astype(np.float32)
    # the default fit, and the OT fit the closed form is classically checked with (the
    # adversarial fit takes tens of minutes on 2 cores here)
    default_fit = MeasureConfig().fit
    dist_fits = sorted({default_fit if default_fit != "paired" else "ot", "ot"})
    for name, z in (("PCA-2 latent", pca), ("independent N(0, I_2) latent", indep)):
        for fit in dist_fits:
            r = ld.measure(
                z, x, generator="linear", metric="w2", fit=fit, seeds=seeds, n_eval=1000,
                proxies=False, progress=False, device="cpu", **({"steps": 150} if small else {}),
            ).report  # fmt: skip
            d = r["curve"][0]["distance"]
            rows.append(
                {
                    "case": f"inf_g W2, linear g, {name}, fit={fit}",
                    "exact": 1.0,
                    "measured": cell(d),
                    "floor": cell(r["floor"]),
                    "rel. error": f"{d['mean'] - 1.0:+.1%}",
                }
            )
    # (b) two Gaussians in R^8: N(0, I) vs N(delta e_1, diag(1, ..., 1, 4)): FD exact; MMD^2 exact
    # for the shift alone (kernel at a fixed bandwidth h = sqrt(d))
    dim, delta = 8, 1.5
    mu = np.zeros(dim)
    mu[0] = delta
    p_rows = rng.standard_normal((4000, dim)).astype(np.float32)
    q_rows = (rng.standard_normal((2000, dim)) + mu).astype(np.float32)
    cov_q = np.eye(dim)
    cov_q[-1, -1] = 4.0
    q_cov_rows = (rng.standard_normal((2000, dim)) @ np.sqrt(cov_q) + mu).astype(np.float32)
    if "fd" in METRICS:
        from latentdist.discrepancy import frechet_distance_gaussians

        exact = frechet_distance_gaussians(mu, cov_q, np.zeros(dim), np.eye(dim))
        r = sample_distances(
            {"q": q_cov_rows}, p_rows, metric="fd", features="identity", n_eval=1000, seeds=5
        )["q"].report
        rows.append(
            {
                "case": "FD of N(1.5 e1, diag(1,..,1,4)) and N(0, I_8), identity features",
                "exact": exact,
                "measured": cell(r["distance"]),
                "floor": cell(r["floor"]),
                "rel. error": f"{r['distance']['mean'] / exact - 1:+.1%}",
            }
        )
    h = math.sqrt(dim)
    scales = mmd_scales()
    exact = gaussian_mmd2(delta**2, dim, h, scales)
    r = sample_distances(
        {"q": q_rows}, p_rows, metric="mmd", n_eval=1000, seeds=5,
        metric_kwargs={"bandwidth": h},
    )["q"].report  # fmt: skip
    rows.append(
        {
            "case": f"MMD^2 of N(1.5 e1, I_8) and N(0, I_8), bandwidth {h:.3g} x scales {scales}",
            "exact": exact,
            "measured": cell(r["distance"]),
            "floor": cell(r["floor"]),
            "rel. error": f"{r['distance']['mean'] / exact - 1:+.1%}",
        }
    )
    return (
        "## V1 closed forms\n\nmeasured: mean ± 95 % half-width over seeds; linear cases "
        "n_eval 1000 of 3000 rows, 3 seeds, scored by W2 (its floor, 3-D, is the finite-sample "
        "bias); Gaussian pairs n_eval 1000, 5 seeds.\n\n" + markdown_table(rows) + "\n"
    )


# ---------------------------------------------------------------- V2 degradation ladder


def v2(small: bool, cols: list[Column], seeds: int | None) -> tuple[str, dict]:
    rows, n_eval = (2000, 400) if small else (5000, 1000)
    seeds = seeds or 3
    feature_steps = 100 if small else 200
    t0 = time.perf_counter()
    metrics = {
        c.label: {
            "metric": c.metric,
            "metric_kwargs": dict(c.kwargs),
            "features": c.features or "auto",
            "feature_steps": feature_steps,
        }
        for c in cols
    }
    dist, floor = ladder_distances(
        ld.load_data("mnist5k"), metrics, rows=rows, n_eval=n_eval, seeds=seeds
    )
    table = []
    for name in ("floor (fresh real rows)", *DEGRADATIONS):
        row = {"set": name}
        for c in cols:
            if name.startswith("floor"):
                row[c.label] = cell(floor[c.label])
            else:
                d = dist[c.label][name]
                row[c.label] = cell(d) + (" ✓" if above_floor(d, floor[c.label]) else " ✗")
        table.append(row)
    summary_pass = {"set": "above floor"}
    summary_order = {"set": "ordered"}
    verdicts = {}
    for c in cols:
        p, bad = ladder_verdict(dist[c.label], floor[c.label])
        verdicts[c.label] = (p, bad)
        summary_pass[c.label] = f"{p}/{len(DEGRADATIONS)}"
        summary_order[c.label] = "y" if not bad else "n: " + "; ".join(bad)
    table += [summary_pass, summary_order]
    text = (
        f"## V2 degradation ladder (MNIST-5k, {rows} rows)\n\n"
        f"Per seed ({seeds} seeds) the rows are permuted: 60 % reference ({n_eval} evaluation "
        f"rows, {n_eval} floor rows, the rest to train learned features ({feature_steps} steps) "
        f"or the critic), 40 % the pool every degraded set is built from; all sets scored on the "
        f"same splits (`sample_distances`, n_eval {n_eval}). ✓: above the floor beyond both 95 % "
        f"intervals. {time.perf_counter() - t0:.0f} s.\n\n" + markdown_table(table) + "\n"
    )
    return text, verdicts


# ---------------------------------------------------------------- V3 planted latent


def _flat(report: dict) -> str:
    """'64 [64, 128], 3e-4 above the floor': where the curve flattens (estimator.saturation)."""
    flat = report.get("saturation")
    if flat is None:
        return "-"
    if flat.get("capacity") is None:
        return "still falling at " + str(report["curve"][-1]["capacity"])
    lo, hi = ("none" if c is None else str(c) for c in flat["interval"])
    return f"{flat['capacity']} [{lo}, {hi}], {flat['excess']['mean']:.2g} above the floor"


def _view(report: dict, key: str | None) -> dict:
    """A measure report reduced to one value per capacity: the reported (selected) distance
    when ``key`` is None, else ``by_fit[key]`` (one fit's own generator)."""
    return {
        "floor": report["floor"],
        "n_eval": report["n_eval"],
        "data": report["data"],
        "saturation": report.get("saturation") if key is None else None,
        "curve": [
            {
                "capacity": e["capacity"],
                "distance": e["distance"] if key is None else e["by_fit"][key],
            }
            for e in report["curve"]
        ],
    }


def _extension(report: dict) -> str:
    """How a measurement's sweep grew, as the V3/V4 texts say it."""
    if report["config"]["max_capacity"]:
        return "extended per latent by the default rule"
    return "as given, not extended"


def v3(small: bool, fits: list[str], capacities: tuple, fit: dict) -> tuple[str, dict]:
    """The default measurement (its selected bound and each fit's own value inside it), then
    every fit in ``fits`` on its own: selection off, so from its own initialisation, with no
    warm start and no paired fit beside it."""
    data = planted_latent(2000 if small else 5000)
    x = data.pop("x")
    if small:
        data.pop("2 Phi(z*) - 1 (uniform, 8-d)")
    n_eval = 400 if small else 1000
    runs = [("default", {})] + [(f, {"fit": f, "select": False}) for f in fits]
    out, verdicts = [], {}
    for run, settings in runs:
        t0 = time.perf_counter()
        reports = {}
        for name, z in data.items():
            reports[name] = ld.measure(
                z, x, generator="mlp", seeds=3,
                **({"capacities": capacities} if capacities else {}),
                n_eval=n_eval, proxies=False, progress=False,
                **fit, **settings,
            ).report  # fmt: skip
        first = reports["z* (8-d)"]
        views = [(None, f"fit={first['fit']}, selection off")]
        if run == "default":
            views = [(None, f"default: fit={first['fit']}, best held-out bound (selection)")]
            views += [
                (f, f"{f} alone, inside the default run") for f in first["curve"][0]["by_fit"]
            ]
        elapsed = time.perf_counter() - t0
        for key, title in views:
            vr = {name: _view(r, key) for name, r in reports.items()}
            table = [
                {"capacity": cap, **{name: cell(d[name]) for name in vr}}
                for cap, d in common_curve(vr, list(vr))
            ]
            table.append({"capacity": "floor", **{k: cell(r["floor"]) for k, r in vr.items()}})
            table.append({"capacity": "flattens at", **{k: _flat(r) for k, r in vr.items()}})
            if key is None and run == "default":
                table.append(
                    {
                        "capacity": "chosen (per seed)",
                        **{
                            k: " ".join(" ".join(e["chosen"]) for e in r["curve"][-1:])
                            for k, r in reports.items()
                        },
                    }
                )
            ok, fails = planted_verdict(vr)
            why = "; ".join(fails) or "all conditions hold"
            verdicts[title] = (ok, why)
            out.append(
                f"### {title} — metric={first['metric']}, {first['config']['steps']} steps, "
                f"sweep from {first['config']['capacities']}, n_eval {n_eval}: {'PASS' if ok else 'FAIL'} ({why}; run {elapsed:.0f} s)\n\n"
                + markdown_table(table)
                + "\n"
            )
    text = (
        "## V3 planted latent\n\nx = h(z*) + 0.05 noise, h a fixed random ReLU MLP 8 -> 32 -> "
        f"784 (scaled to mean -0.5, sd 0.4), {len(x)} rows; MLP generators (depth 2, so width "
        f">= 32 contains h); the sweep {_extension(first)} (rows: the capacities every "
        "latent measured). Pass: z* at every width >= 32 within max(floor's upper limit, 10 % "
        "of the first-4 distance), and first-2 and first-4 above the floor at every width, "
        "seed by seed (the paired interval of distance - floor lies above 0). The 'chosen' row names, per seed, the generator the default "
        "reported at the largest width. In the default run the paired fit runs first and the "
        "mmd fit starts from it ('mmd alone, inside the default run'); 'fit=..., selection off' "
        "is that fit from its own initialisation, with no warm start and no paired fit: the "
        "pure distributional fit.\n\n" + "\n".join(out)
    )
    return text, verdicts


# ---------------------------------------------------------------- V4 nested PCA latents


def v4(small: bool, capacities: tuple | None, fit: dict) -> tuple[str, dict]:

    source = ld.load_data("mnist5k")
    x = source.take().numpy()
    if small:
        x = x[np.random.default_rng(0).permutation(len(x))[:2000]]
    flat = x.reshape(len(x), -1)
    t0 = time.perf_counter()
    reports = {}
    for k in (2, 8, 32):
        z = PCA(k, random_state=0).fit_transform(flat).astype(np.float32)
        reports[k] = ld.measure(
            z, x, generator="mlp", seeds=3, proxies=False, progress=False,
            n_eval=400 if small else None,
            **({"capacities": capacities} if capacities else {}),
            **fit,
        ).report  # fmt: skip
    r2 = reports[2]
    sampled = r2["n_eval"] / r2["data"]["rows"]
    table = []
    for cap, d in common_curve(reports, (2, 8, 32)):
        a = paired_above(d[2], d[8], sampled)
        b = not paired_above(d[32], d[8], sampled)
        table.append(
            {
                "capacity": cap,
                **{f"PCA-{k}": cell(d[k]) for k in d},
                "PCA-2 > PCA-8": "y" if a else "n",
                "PCA-8 >= PCA-32": "y" if b else "n",
            }
        )
    table.append(
        {
            "capacity": "floor",
            **{f"PCA-{k}": cell(reports[k]["floor"]) for k in reports},
            "PCA-2 > PCA-8": "",
            "PCA-8 >= PCA-32": "",
        }
    )
    ok, fails = nested_verdict(reports)
    text = (
        f"## V4 nested latents (MNIST-5k{', 2000 rows' if small else ''})\n\n"
        f"PCA-2, PCA-8, PCA-32 (sklearn PCA of the flattened images), metric={r2['metric']}, "
        f"fit={r2['fit']} (the defaults), {r2['config']['steps']} steps, n_eval {r2['n_eval']}, "
        f"3 seeds, the sweep from {r2['config']['capacities']} ({_extension(r2)}; rows: "
        "the capacities all three "
        f"measured); saturation (where each curve flattens): "
        + ", ".join(f"PCA-{k} {_flat(reports[k])}" for k in (2, 8, 32))
        + ". PCA-2 > PCA-8: the paired (per seed) interval of the difference lies above 0; "
        "required where c >= 2 (a capacity-c mlp reads at most 2c latent directions, so at "
        "c = 1 the two may tie: there PCA-8 must only not lie above PCA-2); "
        f"PCA-8 >= PCA-32: PCA-32 not above PCA-8 so. {'PASS' if ok else 'FAIL: ' + '; '.join(fails)} "
        f"({time.perf_counter() - t0:.0f} s)\n\n" + markdown_table(table) + "\n"
    )
    return text, {"default": (ok, fails)}


# ---------------------------------------------------------------- V5 calibration


def v5(small: bool, cols: list[Column]) -> str:
    """Coverage of the truth by the 95 % interval over repeats with fresh data."""
    repeats = 8 if small else 20
    dim, n_ref, n_smp, n_eval, seeds = 16, 2000, 1000, 500, 5
    h = math.sqrt(dim)
    delta = 1.0
    scales = mmd_scales()
    cases = {"same distribution": 0.0, "shifted by 1.0 e1": delta**2}
    # vectors: no learned features; the critic trains 2 networks per seed and repeat (too slow here)
    usable = [c for c in cols if c.features != "learned" and c.metric != "critic"]
    hits = {(case, c.label): 0 for case in cases for c in usable}
    floor_hits = {c.label: 0 for c in usable}
    floor_means: dict[str, list[float]] = {c.label: [] for c in usable}
    truth_of: dict[tuple[str, str], float | None] = {}
    for case, delta2 in cases.items():
        for c in usable:
            if delta2 == 0.0:
                truth_of[case, c.label] = 0.0
            elif c.metric == "mmd":
                truth_of[case, c.label] = gaussian_mmd2(
                    delta2, dim, h, dict(c.kwargs).get("scales", scales)
                )
            elif c.metric == "fd":
                truth_of[case, c.label] = delta2
            else:
                truth_of[case, c.label] = None
    for rep in range(repeats):
        rng = np.random.default_rng(50_000 + rep)
        ref = rng.standard_normal((n_ref, dim)).astype(np.float32)
        shift = np.zeros(dim, dtype=np.float32)
        shift[0] = delta
        sets = {
            "same distribution": rng.standard_normal((n_smp, dim)).astype(np.float32),
            "shifted by 1.0 e1": (rng.standard_normal((n_smp, dim)) + shift).astype(np.float32),
        }
        for c in usable:
            kw = dict(c.kwargs)
            if c.metric == "mmd":
                kw["bandwidth"] = h  # a fixed kernel: the truth is then exact
            res = sample_distances(
                sets, ref, metric=c.metric, n_eval=n_eval, seeds=seeds, seed=rep,
                features=c.features or "auto", metric_kwargs=kw,
            )  # fmt: skip
            for case, r in res.items():
                truth = truth_of[case, c.label]
                ci = r.report["distance"]["ci"]
                if truth is not None and ci[0] <= truth <= ci[1]:
                    hits[case, c.label] += 1
            f = next(iter(res.values())).report["floor"]
            floor_means[c.label].append(f["mean"])
            floor_hits[c.label] += f["ci"][0] <= 0.0 <= f["ci"][1]
    table = []
    for case in cases:
        row = {"case": f"{case}: interval covers the truth"}
        for c in usable:
            truth = truth_of[case, c.label]
            row[c.label] = (
                "-" if truth is None else f"{hits[case, c.label]}/{repeats} (truth {truth:.3g})"
            )
        table.append(row)
    table.append(
        {
            "case": "floor interval covers 0",
            **{c.label: f"{floor_hits[c.label]}/{repeats}" for c in usable},
        }
    )
    table.append(
        {
            "case": "floor: mean ± sd over repeats",
            **{
                c.label: f"{np.mean(floor_means[c.label]):.3g} ± {np.std(floor_means[c.label], ddof=1):.2g}"
                for c in usable
            },
        }
    )
    return (
        "## V5 calibration\n\n"
        f"{repeats} repeats, each with fresh data: reference N(0, I_{dim}) ({n_ref} rows), "
        f"samples ({n_smp} rows) from the same law or shifted by 1.0 along e1; n_eval {n_eval}, "
        f"{seeds} seeds per repeat. MMD with a fixed bandwidth sqrt(d) x scales {scales} so the "
        "truth is exact; FD truth |shift|^2. '-': no known value. The interval is over seeds "
        "(re-splits of one data set), widened by the delete-d jackknife for the fraction of each "
        "set a seed evaluates (latentdist.stats.mean_ci) so that it carries the data's own "
        "sampling variability; goal: >= 18/20 where the truth is known and the estimator "
        "unbiased (mmd, kid; fd and the OT metrics are biased at n_eval).\n\n"
        + markdown_table(table)
        + "\n"
    )


# ---------------------------------------------------------------- V6 DAE vs joint


def v6(steps: int) -> str:
    from latentdist.cli.demo import DEMO_MEASURE, train_demo_run
    from latentdist.evaluation.compare import compare

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for mode in ("dae", "joint"):
            train_demo_run(mode, out, "mnist5k", steps, True, "cpu", False)
        result = compare(
            [out / "dae", out / "joint"], "mnist5k", measure_config=DEMO_MEASURE, device="cpu",
            progress=False, gen_seeds=3,
        )  # fmt: skip
    return (
        f"## V6 DAE vs joint (MNIST-5k, demo settings, {steps} training steps per run)\n\n"
        f"`compare` with the demo's measurement ({DEMO_MEASURE.metric}, fit={DEMO_MEASURE.fit}); "
        f"no direction required. {time.perf_counter() - t0:.0f} s.\n\n```\n{result.table()}\n```\n"
    )


# ---------------------------------------------------------------- main

SECTION = re.compile(r"^## (V\d)\b", re.M)


def _table(text: str) -> tuple[list[str], dict[str, list[str]], int, int]:
    """The first markdown table in ``text``: header, rows by first cell, its line span."""
    lines = text.split("\n")
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[start:end]]
    return cells[0], {r[0]: r for r in cells[2:]}, start, end


def merge_columns(old: str, new: str, note: str) -> str:
    """The V2 section ``old`` with the columns of ``new`` (a run of some columns on the same
    splits and seeds) added or replaced, their summary lines too, and ``note`` appended."""
    head_o, rows_o, start, end = _table(old)
    head_n, rows_n, _, _ = _table(new)
    added = head_n[1:]
    header = [h for h in head_o if h not in added] + added
    keep = [head_o.index(h) for h in header if h in head_o]
    lines = old.split("\n")
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, row in rows_o.items():
        cells = [row[k] for k in keep] + rows_n[key][1:]
        table.append("| " + " | ".join(cells) + " |")
    summary = {ln.split(":")[0]: ln for ln in lines if ln.startswith("- ")}
    summary.update({ln.split(":")[0]: ln for ln in new.split("\n") if ln.startswith("- ")})
    body = [ln for ln in lines[:start] if not ln.startswith("- ")]
    first = next(i for i, ln in enumerate(body) if ln.startswith("_"))  # the stamp line
    body = body[: first + 1] + [""] + list(summary.values()) + body[first + 1 :]
    text = "\n".join(body).rstrip() + "\n\n" + "\n".join(table) + "\n"
    return text + "\n".join(lines[end:]).rstrip() + "\n\n" + note + "\n"


# ---------------------------------------------------------------- V7 paired resolution

V7_COLUMNS = (
    "discrepancy",
    "n_eval",
    "clean rows: excess over floor [95% CI]",
    "honest",
    "smallest sigma detected: paired",
    "unpaired",
    "unpaired / paired",
    "paired z at sigma 0.02",
    "CPU s",
)
V8_COLUMNS = ("capacity", "plain", "warped", "paired warped - plain [95% CI]")


def v7(small: bool, critic: bool = False) -> tuple[str, list[str]]:
    """Gaussian pixel noise of standard deviation sigma on held-out MNIST rows (clipped to
    [-1, 1]); every rung and the clean rows are scored by ``sample_distances`` on the same
    reference rows and seeds, once per discrepancy. Paired: the interval of d(noisy) - d(clean)
    seed by seed excludes 0. Unpaired: the two intervals do not overlap. Honest: the clean rows'
    excess over the floor (their paired verdict against the reference) covers 0."""
    from latentdist.evaluation import distance as distance_module

    src = ld.load_data("mnist5k")
    data, labels = src.take().numpy(), np.asarray(src.labels)
    perm = np.random.default_rng(0).permutation(len(data))
    # labelled as in V2, so that the learned features are V2's (a classifier's penultimate layer)
    ref = ld.DataSource(
        "mnist5k[reference rows]", data[perm[:3000]], kind="images", labels=labels[perm[:3000]]
    )
    held = data[perm[3000:]]
    noise = np.random.default_rng(1).standard_normal(held.shape).astype(np.float32)
    sigmas = (
        (0.0025, 0.005, 0.01, 0.02, 0.04)
        if small
        else (0.00125, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)
    )
    seeds, n, steps = (3, 500, 100) if small else (5, 1000, 200)  # steps: V2's feature_steps
    cuda = torch.cuda.is_available()
    # the critic trains one network per set and seed (~1 min each on one CPU thread): on CPU
    # only the rungs around the other discrepancies' paired thresholds
    critic_sigmas = sigmas if cuda else (0.01, 0.02)
    specs = [(f"mmd n_eval {n}", dict(metric="mmd", n_eval=n), sigmas)]
    if not small:  # 2 n_eval <= 3000 reference rows (evaluation + floor): 1500 is the most
        specs.append(("mmd n_eval 1500", dict(metric="mmd", n_eval=1500), sigmas))
    feat = dict(n_eval=n, features="learned", feature_steps=steps)
    specs.append(("kid feat", dict(metric="kid", **feat), sigmas))
    if not small:
        specs.append(("fd feat", dict(metric="fd", **feat), sigmas))
    if critic and not small:
        dev = {"metric_kwargs": {"device": "cuda"}} if cuda else {}
        specs.append(("critic", dict(metric="critic", n_eval=750, **dev), critic_sigmas))
    out = []
    for label, kw, rungs in specs:
        distance_module._FEATURE_CACHE.clear()  # each column pays for its own feature networks
        sets = {"clean": held, **{f"{s:g}": np.clip(held + s * noise, -1, 1) for s in rungs}}
        t0, c0 = time.perf_counter(), time.process_time()
        res = sample_distances(sets, ref, seeds=seeds, **kw)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        clean = res["clean"].report
        n_eval = clean["n_eval"]
        r = {"label": label, "n_eval": n_eval, "rungs": rungs, "wall": wall, "cpu": cpu,
             "clean": clean, "honest": clean["verdict"] == "within", "z": {},
             "paired": None, "unpaired": None}  # fmt: skip
        for s in rungs:
            d = res[f"{s:g}"].report["distance"]
            diff = mean_ci(
                np.subtract(d["per_seed"], clean["distance"]["per_seed"]).tolist(),
                sampled_fraction=n_eval / len(held),
            )
            paired = diff["ci"][0] > 0
            unpaired = d["ci"][0] > clean["distance"]["ci"][1]
            r["z"][s] = (diff["mean"] / ((diff["ci"][1] - diff["ci"][0]) / 2), paired, unpaired)
            for key, ok in (("paired", paired), ("unpaired", unpaired)):
                if ok and r[key] is None:
                    r[key] = s
        out.append(r)
        print(f"V7 {label}: {wall:.0f} s", flush=True)

    def first(r: dict, key: str) -> str:
        s = r[key]
        if s is None:
            return f"none <= {r['rungs'][-1]:g}"
        return f"{s:g}" if s != r["rungs"][0] or s == sigmas[0] else f"<= {s:g} (lowest rung run)"

    def ratio(r: dict) -> str:
        if r["paired"] is None:
            return "-"
        if r["unpaired"] is None:
            return f"> {r['rungs'][-1] / r['paired']:g}"
        return f"{r['unpaired'] / r['paired']:g}"

    summary = []
    for r in out:
        e = r["clean"]["excess"]
        z = r["z"].get(0.02)
        summary.append([r["label"], str(r["n_eval"]),
                        f"{e['mean']:.3g} [{e['ci'][0]:.3g}, {e['ci'][1]:.3g}]",
                        "yes" if r["honest"] else f"no ({r['clean']['verdict']})",
                        first(r, "paired"), first(r, "unpaired"), ratio(r),
                        "-" if z is None else f"{z[0]:.2f}", f"{r['cpu']:.0f}"])  # fmt: skip
    ladder = []
    for s in sigmas:
        row = {"sigma": f"{s:g}"}
        for r in out:
            z = r["z"].get(s)
            if z is None:
                row[r["label"]] = "-"
                continue
            marks = ", ".join(k for k, ok in zip("PU", z[1:], strict=True) if ok)
            row[r["label"]] = f"{z[0]:.2f}" + (f" ({marks})" if marks else "")
        ladder.append(row)
    # recommendation: the honest discrepancy with the smallest paired threshold, ties to the
    # cheaper one; costlier ones that resolve no smaller noise are named
    ok = [r for r in out if r["honest"] and r["paired"] is not None]
    advice = "No honest discrepancy detected any rung paired."
    if ok:
        best = min(ok, key=lambda r: (r["paired"], r["cpu"]))
        advice = (
            f"Recommendation: {best['label']}: of the honest discrepancies it detects the "
            f"smallest noise paired (sigma {best['paired']:g}), and of those that do it costs "
            f"the least CPU ({best['cpu']:.0f} s for its {len(best['rungs'])}-rung ladder)."
        )
        worse = [r for r in ok if r is not best and r["paired"] >= best["paired"]]
        if worse:
            advice += (
                " "
                + ", ".join(
                    f"{r['label']} ({r['cpu']:.0f} s) resolves no smaller noise" for r in worse
                )
                + "."
            )
        better_dishonest = [r for r in out if not r["honest"] and r["paired"] is not None
                            and r["paired"] < best["paired"]]  # fmt: skip
        if better_dishonest:
            advice += (
                " "
                + ", ".join(r["label"] for r in better_dishonest)
                + (" detects smaller noise but scores the clean rows off the floor: not honest.")
            )
    blind = [r for r in out if r["paired"] is None]
    if blind:
        advice += " " + ", ".join(
            f"{r['label']} ({r['cpu']:.0f} s; z <= {max(z[0] for z in r['z'].values()):.2f})"
            for r in blind
        )
        advice += f" detect{'s' if len(blind) == 1 else ''} no rung paired."
    dishonest = [r["label"] for r in out if not r["honest"]]
    advice += (
        f" Not honest here (clean rows vs reference beyond the floor): {', '.join(dishonest)}."
        if dishonest
        else " Every discrepancy is honest here: the clean rows' excess over the floor covers 0."
    )
    names = ", ".join(f"{r['label']} {r['wall']:.0f} s" for r in out)
    text = (
        "## V7 resolution of the paired design (MNIST-5k noise ladder)\n\n"
        f"{seeds} seeds; reference 3000 rows (labelled, as in V2), samples the 2000 held-out rows "
        "plus noise; every discrepancy scores the clean rows and its rungs on the same reference "
        "rows and seeds (`sample_distances`). n_eval 2000 (all held-out rows) is not possible: "
        "evaluation and floor need 2 n_eval reference rows, and a seed scoring every sample row "
        "would leave the interval without the samples' sampling variability (mean_ci's sampled "
        "fraction 1); 1500 is the most."
        + (
            f" feat: kid/fd in V2's learned features (a classifier trained per seed on that "
            f"seed's reference fit rows, {steps} steps; each column trains its own)."
            if any(kw.get("features") == "learned" for _, kw, _ in specs)
            else ""
        )
        + (
            " critic: the held-out critic (V2's), n_eval 750, the most 3000 reference rows allow "
            "beside its fit rows"
            + ("" if critic_sigmas == sigmas else f"; on CPU only at sigma {critic_sigmas}")
            + "."
            if any(kw["metric"] == "critic" for _, kw, _ in specs)
            else ""
        )
        + f" torch threads {torch.get_num_threads()}; wall time: {names}. z: paired "
        "d(noisy) - d(clean) over its 95 % half-width (detected when > 1). Honest: the clean "
        "rows' excess over the floor covers 0.\n\n"
        + markdown_table([dict(zip(V7_COLUMNS, r, strict=True)) for r in summary])
        + "\n\nPaired z per rung (P: paired detects, U: unpaired detects; -: not run):\n\n"
        + markdown_table(ladder)
        + "\n\n"
        + advice
        + "\n"
    )
    lines = [
        f"smallest noise detected, {r['label']}: paired "
        f"{first(r, 'paired')}, unpaired {first(r, 'unpaired')}"
        for r in out
    ]
    return text, lines


# ---------------------------------------------------------------- V8 warped latent


def v8(small: bool, fit: dict) -> tuple[str, bool]:
    """PCA-8 of MNIST (standardised) and the same scores through ``coupling_warp``; paired
    D_c(warped) - D_c(plain) with the default family and sweep (same rows, seeds, judges)."""
    x = ld.load_data("mnist5k").take()
    if small:
        x = x[:2000]
    z = PCA(8, random_state=0).fit_transform(x.flatten(1).numpy()).astype(np.float32)
    z = (z - z.mean(0)) / z.std(0)
    settings = dict(seeds=3, proxies=False, progress=False, device="cpu")
    if small:
        settings.update(capacities=(2, 8, 32), n_eval=400)
    settings.update(fit)
    plain = ld.measure(z, x, **settings).report
    warped = ld.measure(coupling_warp(z), x, **settings).report
    paired = paired_difference(warped, plain)
    diff = paired["curve"]
    peak = max(diff, key=lambda e: e["mean"])
    ok = any(e["ci"] and e["ci"][0] > 0 for e in diff[: max(1, len(diff) // 2)])
    ok = ok and diff[-1]["mean"] < peak["mean"]
    by_cap = {
        k: {e["capacity"]: e["distance"] for e in r["curve"]}
        for k, r in (("plain", plain), ("warped", warped))
    }
    rows = [
        [str(e["capacity"]), f"{by_cap['plain'][e['capacity']]['mean']:.4g}",
         f"{by_cap['warped'][e['capacity']]['mean']:.4g}",
         f"{e['mean']:.4g} [{e['ci'][0]:.3g}, {e['ci'][1]:.3g}]"]
        for e in diff
    ]  # fmt: skip
    flat = paired["saturation"]
    flat_text = f"Where the curves flatten: plain {_flat(plain)}, warped {_flat(warped)}"
    flattened = any((r.get("saturation") or {}).get("capacity") for r in (plain, warped))
    if flat.get("b_smaller_share") is not None and flattened:
        share = 100 * flat["b_smaller_share"]
        flat_text += f"; the paired bootstrap puts warped's later in {share:.0f} % of the resamples"
    flat_text += "."
    text = (
        "## V8 same information, different complexity (PCA-8 vs warped PCA-8, MNIST-5k)\n\n"
        f"generator {plain['generator']}, {plain['config']['steps']} steps of batch "
        f"{plain['config'].get('batch_size') or 'default'}, sweep from "
        f"{plain['config']['capacities']}, 3 seeds, n_eval "
        f"{plain['n_eval']}; floor {cell(plain['floor'])}. "
        f"{'PASS' if ok else 'FAIL'}: warped above plain beyond the paired interval at small "
        f"capacity; gap at the largest capacity {diff[-1]['mean']:.3g} vs its peak "
        f"{peak['mean']:.3g} at c = {peak['capacity']} "
        f"({100 * (1 - diff[-1]['mean'] / peak['mean']):.0f} % smaller). {flat_text}\n\n"
        + markdown_table([dict(zip(V8_COLUMNS, r, strict=True)) for r in rows])
    )
    return text, ok


def provenance(old: str, intro: str) -> str:
    """The paragraphs an earlier results file holds between ``intro`` and its first section
    (where and how its sections ran, written by hand): kept when some sections are rerun."""
    start = old.find(intro.strip())
    if start < 0:
        return ""
    rest = old[start + len(intro.strip()) :]
    first = SECTION.search(rest)
    text = (rest[: first.start()] if first else rest).strip()
    return text + "\n\n" if text else ""


def merge_sections(old: str, new: dict[str, str]) -> dict[str, str]:
    """Sections of an earlier results file (split at '## Vn' headings), replaced by ``new``."""
    parts = SECTION.split(old)
    kept = {parts[k]: "## " + parts[k] + parts[k + 1] for k in range(1, len(parts) - 1, 2)}
    kept.update(new)
    return {k: kept[k].rstrip() + "\n" for k in sorted(kept)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a few minutes: for CI")
    ap.add_argument("--only", default=None, help="comma-separated checks, e.g. V2,V4 (the other "
                    "sections of the results file are kept)")  # fmt: skip
    ap.add_argument("--seeds", type=int, default=None, help="V2 seeds")
    ap.add_argument(
        "--steps", type=int, default=None, help="V3/V4/V8 fit steps (default: measure's)"
    )
    ap.add_argument(
        "--batch-size", type=int, default=None, help="V3/V4/V8 fit batch (default: measure's)"
    )
    ap.add_argument(
        "--capacities",
        default=None,
        help="V3/V4/V8 starting sweep, extended by the default rule (default: measure's)",
    )
    ap.add_argument("--tag", default="", help="write validity[_small]_TAG.md (other settings)")
    ap.add_argument(
        "--columns", default=None, help="V2/V5 metric columns (labels, comma-separated)"
    )
    ap.add_argument("--critic", action="store_true", help="include the critic column on CPU "
                    "(minutes per critic on 2 cores; included by default with a GPU)")  # fmt: skip
    ap.add_argument(
        "--fits",
        default=None,
        help="V3 fits run alone, selection off (comma-separated; default: all; '' for none)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    fit = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v}
    if args.capacities:
        try:
            fit.update(extended_sweep(args.capacities))
        except ValueError:
            ap.error(f"--capacities {args.capacities}: expected positive integers, e.g. 1,4,16,64")
    # V3/V4's sweep at --small, unless given; None: the default sweep
    small_caps = (8, 32) if args.small and "capacities" not in fit else None
    only = set((args.only or "V1,V2,V3,V4,V5,V6,V7,V8").upper().split(","))
    if args.small:
        only.discard("V6")  # DAE vs joint at small size: bench_quality --small
        only.discard("V8")  # two sweeps: tests/test_validity.py asserts its small form
    cols = columns()
    if args.columns:
        cols = [c for c in cols if c.label in args.columns.split(",")]
    elif not (args.critic or torch.cuda.is_available()):
        cols = [c for c in cols if c.metric != "critic"]
    default = MeasureConfig()
    stamp = (
        f"_{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; defaults metric={default.metric}, "
        f"fit={default.fit}_"
    )
    sections: dict[str, str] = {}

    def add(key: str, text: str, verdict_lines: list[str], t0: float) -> None:
        head, _, rest = text.partition("\n")
        summary = "".join(f"- {v}\n" for v in verdict_lines)
        sections[key] = (
            f"{head}\n\n{stamp}; {time.perf_counter() - t0:.0f} s\n\n{summary}{rest.lstrip()}"
        )
        print(sections[key], flush=True)

    t_all = time.perf_counter()
    if "V1" in only:
        t0 = time.perf_counter()
        add("V1", v1(args.small), [], t0)
    if "V2" in only:
        t0 = time.perf_counter()
        v2_cols = cols if not args.small else [c for c in cols if c.label != "sinkhorn"]
        text, verdicts = v2(args.small, v2_cols, args.seeds)
        lines = [
            f"{k}: {p}/7 above the floor, {'ordered' if not bad else 'not ordered'}"
            for k, (p, bad) in verdicts.items()
        ]
        add("V2", text, lines, t0)
    if "V3" in only:
        t0 = time.perf_counter()
        fits = list(FITS) if not args.small else []
        if args.fits is not None:  # "" : the default run alone
            fits = [f for f in args.fits.split(",") if f]
        text, verdicts = v3(args.small, fits, small_caps, fit)
        add(
            "V3",
            text,
            [f"{k}: {'pass' if ok else 'fail'}" for k, (ok, _) in verdicts.items()],
            t0,
        )
    if "V4" in only:
        t0 = time.perf_counter()
        text, verdicts = v4(args.small, small_caps, fit)
        add("V4", text, [f"default: {'pass' if verdicts['default'][0] else 'fail'}"], t0)
    if "V5" in only:
        t0 = time.perf_counter()
        add("V5", v5(args.small, cols), [], t0)
    if "V6" in only:
        t0 = time.perf_counter()
        add("V6", v6(300), [], t0)
    if "V7" in only:
        t0 = time.perf_counter()
        text, lines = v7(args.small, args.critic or torch.cuda.is_available())
        add("V7", text, lines, t0)
    if "V8" in only:
        t0 = time.perf_counter()
        text, ok = v8(args.small, fit)
        add("V8", text, [f"default: {'pass' if ok else 'fail'}"], t0)
    print(f"bench_validity: {time.perf_counter() - t_all:.0f} s", flush=True)
    if args.no_write:
        return
    name = "validity" + ("_small" if args.small else "") + (f"_{args.tag}" if args.tag else "")
    old_path = RESULTS / f"{name}.md"
    old = old_path.read_text() if args.only and old_path.exists() else ""
    if args.columns and "V2" in sections and old:  # a rerun of some columns: merge them in
        prev = merge_sections(old, {}).get("V2")
        if prev:
            stamp_new = sections["V2"].split("\n")[2]
            sections["V2"] = merge_columns(
                prev,
                sections["V2"],
                f"Columns {args.columns} were (re)run on the same splits and seeds: {stamp_new}.",
            )
    merged = merge_sections(old, sections)
    intro = (
        "One section per check (benchmarks/bench_validity.py; each stamped with when it ran and "
        "the estimator's defaults then). Cells: mean ± 95 % half-width over seeds.\n\n"
    )
    intro += provenance(old, intro)
    path = write_result(name, "Validity of the distance", intro + "\n".join(merged.values()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
