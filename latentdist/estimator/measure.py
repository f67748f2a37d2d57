"""``measure``: the GAN-induced latent–data distance over a capacity sweep (SPEC §1).

    D_c(P_z ; P_x) = inf_{g in G_c} d_F(g#P_z, P_x)

For every capacity c and seed, a generator g in G_c is fitted on training rows (all members at
once, see ``fit``), then d_F(g#P_z, P_x) is estimated on held-out rows: g applied to n_eval
held-out latents against n_eval held-out data points. Beside it stands the floor, the same
discrepancy between two disjoint data samples of size n_eval: what even the true generator would
score at this sample size (Hu et al., 2023, arXiv 2307.08283, for the distance; see
docs/concepts.md).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from latentdist._progress import progress_bar as tqdm
from latentdist._shapes import pixel_budget_batch
from latentdist.device import resolve_device
from latentdist.discrepancy import METRICS as _ALL_METRICS
from latentdist.discrepancy import NEEDS_FIT, below_floor_cause, median_bandwidth
from latentdist.discrepancy.judge import Judge
from latentdist.errors import UsageError
from latentdist.estimator import distributed as _dist
from latentdist.estimator import streaming as _streaming
from latentdist.estimator.fit import DISTRIBUTIONAL, FITS, FitSettings, fit_ensemble
from latentdist.estimator.split import default_n_eval, default_n_val, make_split
from latentdist.estimator.stats import mean_ci
from latentdist.generators.ensemble import (
    GeneratorEnsemble,
    _member_seed,
    default_bucket_ratio,
)
from latentdist.generators.modules import (
    FAMILIES,
    embed_generator,
    embed_linear,
    make_generator,
    upsampling_factor,
)

METRICS = tuple(_ALL_METRICS)
FIT_MEANING = {
    "mmd": "distributional: unpaired minibatch MMD^2 under the evaluation kernel (estimates D_c)",
    "ot": "distributional: unpaired minibatch optimal transport (estimates D_c)",
    "adversarial": "distributional: WGAN-GP critic game (estimates D_c)",
    "paired": "paired regression of x on its latent: the distance of the least-squares generator, an upper bound on D_c (at most the reconstruction error, reported as recon_rmse), not D_c",
}
SELECTION_MEANING = (
    "every fitted generator is an upper bound on D_c; per capacity and seed the reported one is "
    "the best on validation rows (disjoint from the evaluation rows) among: each fit's generator "
    "at this capacity (by_fit) and the one chosen at the next smaller capacity, which G_c "
    "contains (nesting). 'chosen' names the winner per seed. When latent and data rows "
    "correspond the paired fit runs first and the distributional fit starts from its generator "
    "where that generator explains the data (validation R^2 > 0.05, see paired_start)"
)
# The paired generator of a latent that says nothing about its rows is the constant mean: a
# saddle of every distributional loss (all samples coincide, the gradient averages to zero), so
# starting there collapses the fit (V1's independent latent). Below this validation R^2 a member
# starts as it would without a paired fit.
PAIRED_START_MIN_R2 = 0.05
# Validation judges for the choice: the critic trains per judged sample, so choosing with it
# would multiply its cost by the number of candidates; the MMD judges the choice instead.
_VALIDATION_METRIC = {"critic": "mmd"}
_CRITIC_FIT_ROWS = 2000  # rows of each side the held-out critic trains on
DEFAULT_CAPACITIES = {"mlp": (4, 8, 16, 32, 64, 128), "conv": (4, 8, 16, 32), "linear": ()}
DEFAULT_LR = {"linear": 2e-2, "mlp": 2e-3, "conv": 2e-3}
GENERATORS = ("auto", *FAMILIES)
# --generator auto takes mlp up to this many parameters in its widest member: a dense map from
# a 4x63x63 latent to 250x250 images has ~10^9, more than a sweep of 18 members can hold
MLP_PARAMS_LIMIT = 10_000_000
# default fitting batch (default_fit_batch): FIT_BATCH rows up to FIT_BATCH_PIXELS pixels each
FIT_BATCH, FIT_BATCH_PIXELS, MIN_FIT_BATCH = 256, 32 * 32, 16


def choose_generator(
    latent_shape: tuple[int, ...],
    data_shape: tuple[int, ...],
    capacities: tuple[int, ...] | None = None,
    depth: int = 2,
) -> tuple[str, str]:
    """The family ``--generator auto`` measures with, and why: (family, reason).

    mlp when its widest member has at most ``MLP_PARAMS_LIMIT`` parameters (every vector latent
    and small images: the family the validity benchmark checked); conv when the dense map would
    be larger and the latent is spatial (C×h×w to C'×H×W images), since a conv generator's size
    does not grow with the image; mlp otherwise, whatever its size.
    """
    widest = max(capacities or DEFAULT_CAPACITIES["mlp"])
    with torch.device("meta"):
        g = make_generator("mlp", latent_shape, data_shape, widest, depth)
    n = sum(p.numel() for p in g.parameters())
    if n <= MLP_PARAMS_LIMIT:
        return "mlp", f"mlp: {n:,} parameters at width {widest} (<= {MLP_PARAMS_LIMIT:,})"
    why = f"an mlp would have {n:,} parameters at width {widest} (> {MLP_PARAMS_LIMIT:,})"
    try:
        upsampling_factor(latent_shape, data_shape)
    except UsageError:
        return "mlp", f"mlp: {why}, and the latent is not spatial, so conv does not apply"
    return "conv", f"conv: {why}; the latent is spatial"


@dataclass
class MeasureConfig:
    """Every setting of a measurement; validated once by ``validate`` (UsageError on nonsense)."""

    generator: str = "auto"  # choose_generator: mlp unless too large for spatial latents
    capacities: tuple[int, ...] | None = None  # None: the family's default sweep
    depth: int = 2
    metric: str = "mmd"  # the validity benchmark's choice (benchmarks/results/validity.md)
    fit: str = "mmd"
    select: bool = True  # best held-out bound over fits and nested capacities (SELECTION_MEANING)
    features: str | None = None  # fd/kid feature space: None/"identity", "learned" or a path
    seeds: int = 3
    n_eval: int | None = None  # None: default_n_eval(rows)
    steps: int = 400
    batch_size: int | None = None  # None: default_fit_batch(data shape)
    lr: float | None = None  # None: DEFAULT_LR[generator]
    device: str = "auto"
    epsilon: float | None = None  # None: the floor's upper confidence limit
    proxies: bool = True
    seed: int = 0
    max_train_rows: int = 100_000

    def validate(self) -> MeasureConfig:
        def bad(flag: str, value: Any, expected: str) -> UsageError:
            return UsageError(f"--{flag} {value}: expected {expected}")

        if self.generator not in GENERATORS:
            raise bad("generator", self.generator, "one of " + ", ".join(GENERATORS))
        if self.metric not in METRICS:
            raise bad("metric", self.metric, "one of " + ", ".join(METRICS))
        if self.fit not in FITS:
            raise bad("fit", self.fit, "one of " + ", ".join(FITS))
        if self.generator == "linear":
            self.capacities = ()
        elif self.capacities is None:
            self.capacities = DEFAULT_CAPACITIES.get(self.generator)  # auto: after the shapes
        else:
            caps = tuple(int(c) for c in self.capacities)
            if not caps or any(c < 1 for c in caps):
                raise bad("capacities", ",".join(map(str, caps)), "positive integers, e.g. 4,8,16")
            self.capacities = tuple(sorted(set(caps)))
        for flag, value, low in (
            ("depth", self.depth, 1),
            ("seeds", self.seeds, 1),
            ("steps", self.steps, 1),
            ("batch-size", 2 if self.batch_size is None else self.batch_size, 2),
        ):
            if int(value) < low:
                raise bad(flag, value, f"an integer >= {low}")
        if self.n_eval is not None and self.n_eval < 2:
            raise bad("n-eval", self.n_eval, "an integer >= 2")
        if self.lr is None and self.generator != "auto":
            self.lr = DEFAULT_LR[self.generator]
        if self.lr is not None and not (np.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", self.lr, "a positive number")
        if self.features not in (None, "identity", "learned"):
            import os

            if not os.path.isfile(str(self.features)):
                raise bad(
                    "metric-features", self.features, "identity, learned or a TorchScript file"
                )
        if self.epsilon is not None and not (np.isfinite(self.epsilon) and self.epsilon >= 0):
            raise bad("epsilon", self.epsilon, "a non-negative number")
        resolve_device(self.device)
        return self

    def resolve_generator(self, latent_shape: tuple[int, ...], data_shape: tuple[int, ...]) -> str:
        """Replace ``generator="auto"`` by ``choose_generator``'s family (with its default
        capacities and lr unless given); returns the reason, as the report states it."""
        if self.generator != "auto":
            return f"{self.generator}: given"
        self.generator, why = choose_generator(
            latent_shape, data_shape, self.capacities, self.depth
        )
        self.capacities = self.capacities or DEFAULT_CAPACITIES[self.generator]
        self.validate()
        return why


@dataclass
class MeasureResult:
    """The outcome of ``measure``: the SPEC §4 report as ``.report``, with views for notebooks."""

    report: dict[str, Any]
    generators: dict[int | None, list[torch.nn.Module]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return self.report

    def to_json(self, indent: int | None = 2) -> str:
        from latentdist._io import to_json

        return to_json(self.report, indent)

    def to_frame(self):
        """The curve as a pandas DataFrame, one row per capacity."""
        from latentdist.report.measure import curve_frame

        return curve_frame(self.report)

    def table(self) -> str:
        from latentdist.report.measure import format_table

        return format_table(self.report)

    def plot(self, path: str | None = None):
        """The distance curve (and proxies, when present) as a matplotlib figure; saved if ``path``."""
        from latentdist.report.measure import plot_measure

        return plot_measure(self.report, path)

    def save(self, out_dir: str) -> None:
        """Write ``measure.json``, ``curve.csv`` and ``curve.png`` into ``out_dir`` (atomically)."""
        from latentdist.report.measure import save_measure

        save_measure(self.report, out_dir)


def _is_source(x: Any) -> bool:
    return hasattr(x, "take") and hasattr(x, "sample_shape")  # a DataSource (maybe memory-mapped)


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if t.dim() < 1 or len(t) == 0:
        raise UsageError(f"{what}: no samples")
    if not torch.isfinite(t).all():
        raise UsageError(f"{what}: contains NaN or Inf values")
    return t.reshape(len(t), -1) if t.dim() == 1 else t


def _gather(source: Any, splits: list, fields: tuple[str, ...], rows: torch.Tensor | None = None):
    """Load only the rows the splits use (a large memory-mapped file is never read whole) and
    renumber the splits' ``fields`` into the loaded block. ``rows`` fixes the row set, so that
    latents and data loaded with the same rows stay aligned (paired fitting relies on it)."""
    if rows is None:
        rows = torch.unique(torch.cat([getattr(sp, f) for sp in splits for f in fields]))
    position = torch.full((len(source),), -1, dtype=torch.long)
    position[rows] = torch.arange(len(rows))
    block = source.take(rows.numpy()) if _is_source(source) else source[rows]
    for sp in splits:
        for f in fields:
            setattr(sp, f, position[getattr(sp, f)])
    return block


def _subsample(rows: torch.Tensor, cap: int, seed: int) -> torch.Tensor:
    if len(rows) <= cap:
        return rows
    g = torch.Generator().manual_seed(seed)
    return rows[torch.randperm(len(rows), generator=g)[:cap]]


def measure(
    latents: Any,
    data: Any,
    config: MeasureConfig | None = None,
    *,
    codebook: torch.Tensor | None = None,
    encoder: Any = None,
    progress: bool = True,
    **settings: Any,
) -> MeasureResult:
    """Estimate the latent–data distance curve ``c -> D_c`` with floor, intervals and proxies.

    ``latents``: (N, *latent_shape) tensor, array or DataSource (an encoder's output);
    ``data``: (N', *data_shape) likewise. Settings are ``MeasureConfig`` fields, as a config or
    keywords (e.g. ``generator="mlp", capacities=(8, 16), metric="w2", fit="ot"``).
    ``codebook``: (K, C) for vector-quantised latents, to report codebook usage.
    ``encoder``: a callable batch -> latents, for the diagnostics that need it (equivariance).
    """

    t_start = time.perf_counter()
    memory = _dist.Memory()
    memory.start()
    # a copy: resolving defaults (auto generator, capacities, lr) never changes the caller's config
    cfg = MeasureConfig(**{**asdict(config or MeasureConfig()), **settings})
    cfg.validate()
    is_integer = bool(getattr(latents, "is_integer", False))
    z_src = latents if _is_source(latents) else _as_tensor(latents, "latents")
    x_src = data if _is_source(data) else _as_tensor(data, "data")
    n_z, n_x = len(z_src), len(x_src)
    latent_shape = tuple(z_src.sample_shape if _is_source(z_src) else z_src.shape[1:])
    data_shape = tuple(x_src.sample_shape if _is_source(x_src) else x_src.shape[1:])
    if cfg.fit == "paired" and n_z != n_x:
        raise UsageError(
            f"--fit paired needs one latent per data row: {n_z} latents vs {n_x} data rows"
        )
    generator_choice = cfg.resolve_generator(latent_shape, data_shape)
    if cfg.generator == "conv":
        upsampling_factor(latent_shape, data_shape)  # raises a UsageError on impossible shapes
    n_rows = min(n_z, n_x)
    n_eval = cfg.n_eval or default_n_eval(n_rows)
    n_val = default_n_val(n_eval) if cfg.select else 0
    device = resolve_device(cfg.device)
    seeds = [cfg.seed + s for s in range(cfg.seeds)]
    rows_correspond = n_z == n_x
    splits = [make_split(n_z, n_x, n_eval, s, cfg.fit == "paired", n_val) for s in seeds]
    for s, sp in zip(seeds, splits, strict=True):
        sp.train_x = _subsample(sp.train_x, cfg.max_train_rows, s)
        sp.train_z = (
            sp.train_x if cfg.fit == "paired" else _subsample(sp.train_z, cfg.max_train_rows, s)
        )
    z_fields, x_fields = ("eval_z", "val_z", "train_z"), ("eval_x", "floor_x", "val_x", "train_x")
    shared = None
    if rows_correspond:  # rows correspond: load one row set for both, keeping pairs aligned
        shared = torch.unique(
            torch.cat([getattr(sp, f) for sp in splits for f in z_fields + x_fields])
        )
    z_all = _gather(z_src, splits, z_fields, shared)
    # the data rows in memory, or read on demand when they would not fit (streaming.py)
    x_all = _streaming.gather(x_src, splits, x_fields, shared, _gather, _is_source(x_src))

    # --- fit every (capacity, seed) at once, once per fit (the paired bound beside a
    # distributional fit when rows correspond and selection is on)
    caps: list[int | None] = list(cfg.capacities) or [None]
    fits = [cfg.fit]
    if cfg.select and cfg.fit in DISTRIBUTIONAL and rows_correspond:
        fits.append("paired")
    # the mmd fit's kernel width, from fitting rows (1.0 is unused by the other fits)
    bandwidth = median_bandwidth(x_all[splits[0].train_x[:2000]]) if "mmd" in fits else 1.0
    t0 = time.perf_counter()
    rows = (  # on the fitting device once, for every fit
        z_all.to(device),
        x_all.to(device),
        [sp.train_z.to(device) for sp in splits],
        [sp.train_x.to(device) for sp in splits],
    )
    memory.stop("load")
    memory.start()
    fitted: dict[str, dict[str, Any]] = {}
    paired_start = None
    for f in sorted(fits, key=lambda f: f != "paired"):  # paired first: it starts the others
        if f != "paired" and "paired" in fitted and paired_start is None:
            paired_start = _informative_members(fitted["paired"], splits, z_all, x_all, device)
        fitted[f] = _dist.fit_sweep(  # _fit_sweep, its members split across torchrun's ranks
            f,
            cfg,
            caps,
            seeds,
            rows,
            latent_shape,
            data_shape,
            device,
            bandwidth,
            progress,
            start=paired_start["start"] if paired_start and f != "paired" else None,
        )
    t_fit = time.perf_counter() - t0
    memory.stop("fit")

    # --- held-out evaluation, the floor, and the choice among candidates on validation rows
    # (_judges and _evaluate per seed, the seeds split across torchrun's ranks)
    t0 = time.perf_counter()
    memory.start()
    kernel, floors, curve_data, eval_seeds = _dist.evaluate(
        cfg, caps, seeds, splits, z_all, x_all, fitted, latent_shape, data_shape, progress
    )
    t_eval = time.perf_counter() - t0
    memory.stop("evaluate")

    # each seed evaluates n_eval of the finite latent and data rows: intervals widened so that
    # they carry the data's own sampling variability, not only the re-splits' (stats.mean_ci)
    sampled = max(n_eval / n_x, n_eval / n_z)
    floor = mean_ci(floors, sampled_fraction=n_eval / n_x)
    epsilon = cfg.epsilon
    if epsilon is None:
        epsilon = floor["ci"][1] if floor["ci"] else floor["mean"]

    # --- proxies on the chosen generators, geometry of the latent
    t0 = time.perf_counter()
    memory.start()
    curve = []
    generators: dict[int | None, list[torch.nn.Module]] = {}
    per_member = {}
    if cfg.proxies:  # one (capacity, seed) each, split across torchrun's ranks
        from latentdist.proxies import generator_proxies

        items = [(c, i) for c in caps for i in range(len(seeds))]
        values = _dist.map_items(
            lambda m: generator_proxies(
                curve_data[m[0]]["generators"][m[1]],
                z_all[splits[m[1]].eval_z],
                latent_shape,
                n_max=default_fit_batch(data_shape),  # Jacobian products cost as steps do
            ),
            items,
            [curve_data[c]["params"] for c, _ in items],
        )
        per_member = dict(zip(items, values, strict=True))
    for cap in tqdm(caps, desc="proxies", disable=not (progress and cfg.proxies), leave=False):
        info = curve_data[cap]
        generators[cap] = info["generators"]
        entry: dict[str, Any] = {
            "capacity": cap,
            "params": info["params"],
            "distance": mean_ci(info["distance"], sampled_fraction=sampled),
        }
        if len(fits) > 1 or cfg.select:
            entry["by_fit"] = {
                f: mean_ci(v, sampled_fraction=sampled) for f, v in info["by_fit"].items()
            }
            entry["chosen"] = info["chosen"]
        if info["recon"]:
            entry["recon_rmse"] = mean_ci(info["recon"])
        if cfg.proxies:
            entry["proxies"] = _proxies([per_member[(cap, i)] for i in range(len(seeds))])
        else:
            entry["proxies"] = {"params": entry["params"]}
        curve.append(entry)
    t_proxies = time.perf_counter() - t0
    memory.stop("proxies")
    rises = _monotonicity_warnings(curve)
    undetermined = _undetermined(curve, floor)
    for e in curve:
        e["undetermined"] = e["capacity"] in undetermined
    warnings = rises + _below_floor_warnings(curve, floor, cfg.metric, n_eval, data_shape)
    critical = next(
        (
            e["capacity"]
            for e in curve
            if e["distance"]["mean"] <= epsilon and not e["undetermined"]
        ),
        None,
    )
    if (
        cfg.generator == "linear"
        and critical is None
        and not curve[0]["undetermined"]
        and (curve[0]["distance"]["mean"] <= epsilon)
    ):
        critical = 0
    t0 = time.perf_counter()
    memory.start()
    latent_info, diagnostics = _dist.on_main(  # rank 0's, under torchrun
        lambda: (
            _geometry(z_all, codebook, is_integer, cfg.seed),
            _diagnostics(z_all, _streaming.head(x_all), encoder, is_integer, cfg.seed),
        )
    )
    t_geometry = time.perf_counter() - t0
    memory.stop("geometry")
    group = _dist.current()
    timings = {
        "fit_s": t_fit,
        "eval_s": t_eval,
        "proxies_s": t_proxies,
        "geometry_s": t_geometry,
        "total_s": time.perf_counter() - t_start,
    }

    report = {
        "metric": cfg.metric,
        "fit": cfg.fit,
        "fit_meaning": FIT_MEANING[cfg.fit],
        "fits": fits,
        "fit_batch_size": fit_batch_size(
            cfg.batch_size, data_shape, [sp.train_z for sp in splits], [sp.train_x for sp in splits]
        ),
        "selection": SELECTION_MEANING if cfg.select else None,
        "paired_start": None
        if paired_start is None
        else {
            "min_r2": PAIRED_START_MIN_R2,
            "validation_r2": paired_start["r2"],
            "started": len(paired_start["start"]["index"]),
            "members": len(paired_start["r2"]),
        },
        "kernel": kernel or None,
        "generator": cfg.generator,
        "generator_choice": generator_choice,
        "depth": cfg.depth if cfg.generator != "linear" else None,
        "n_eval": n_eval,
        "seeds": seeds,
        "floor": floor,
        "curve": curve,
        "critical_capacity": {
            "epsilon": float(epsilon),
            "capacity": critical,
            "epsilon_source": "--epsilon" if cfg.epsilon is not None else "floor upper CI",
        },
        "monotone": not rises,
        "warnings": warnings,
        "latent": latent_info,
        "diagnostics": diagnostics,
        "data": {
            "shape": list(data_shape),
            "rows": n_x,
            "rows_loaded": len(x_all),
            "streamed": _streaming.is_lazy(x_all),
        },
        "fit_diagnostics": {
            "final_loss": {f: fitted[f]["final_loss"] for f in fits},
            "train_rows": len(splits[0].train_x),
            "validation_rows": n_val,
        },
        "config": {**asdict(cfg), "capacities": list(cfg.capacities), "n_eval": n_eval},
        "device": str(device),
        "versions": _versions(),
        "timings": timings,
        "memory": _dist.memory_report(memory, timings),
        "distributed": {
            **_dist.describe(group),
            "fitted": {f: fitted[f].get("plan") for f in fits} if group else None,
            "evaluated_seeds": eval_seeds if group else None,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return MeasureResult(report, generators)


def _fit_sweep(
    fit: str,
    cfg: MeasureConfig,
    caps: list[int | None],
    seeds: list[int],
    rows: tuple,
    latent_shape: tuple[int, ...],
    data_shape: tuple[int, ...],
    device: torch.device,
    bandwidth: float,
    progress: bool,
    start: dict[str, Any] | None = None,
    members: list[tuple[int | None, int]] | None = None,
) -> dict[str, Any]:
    """Fit one generator per (capacity, seed) with ``fit``, all members at once.

    Starting points, so that each fit begins at a bound already reached: with ``start`` (another
    fit's sweep, the paired one), each member in its ``index`` starts from that sweep's member of
    the same capacity and seed; the others (all without ``start``), with selection on, MLP
    members, start from the linear generator fitted first by the same fit (its map in the skip
    path, the body's output zero), which every capacity contains. ``members``: only these
    (capacity, seed slot) pairs, in capacity order (a rank's share under torchrun, see
    ``distributed``); default all.
    """
    sweep = [(c, i) for c in caps for i in range(len(seeds))]
    subset = None if members is None else (len(sweep), [sweep.index(m) for m in members])
    members = sweep if members is None else members
    member_caps = [c for c, _ in members]
    member_slot = [i for _, i in members]
    z_dev, x_dev, train_z, train_x = rows  # all rows and each seed's fitting rows, on device
    settings = FitSettings(
        fit=fit,
        steps=cfg.steps,
        batch_size=fit_batch_size(cfg.batch_size, x_dev.shape[1:], train_z, train_x),
        lr=cfg.lr,
        cost="euclidean" if cfg.metric == "w1" else "sqeuclidean",
        bandwidth=bandwidth,
    )
    ratio = default_bucket_ratio(device)
    ensemble = GeneratorEnsemble(
        cfg.generator,
        latent_shape,
        data_shape,
        member_caps,
        [seeds[i] for i in member_slot],
        cfg.depth,
        bucket_ratio=ratio,
    ).to(device)
    linear = None
    started = set()
    if start is not None:  # the member of the same (capacity, seed slot), where it is given
        for m, key in enumerate(members):
            if key in start["index"]:
                ensemble.load_member(m, start["ensemble"].export(start["index"][key]))
                started.add(m)
    rest = [m for m in range(len(members)) if m not in started]
    if rest and cfg.generator == "mlp" and cfg.select:
        lin_slots = sorted({member_slot[m] for m in rest})  # batches drawn for every slot anyway
        lin = GeneratorEnsemble(
            "linear",
            latent_shape,
            data_shape,
            [None] * len(lin_slots),
            [seeds[i] for i in lin_slots],
            bucket_ratio=ratio,
        ).to(device)
        lin_settings = FitSettings(**{**asdict(settings), "lr": DEFAULT_LR["linear"]})
        fit_ensemble(
            lin,
            z_dev,
            x_dev,
            train_z,
            train_x,
            lin_slots,
            lin_settings,
            seed=cfg.seed,
            progress=progress,
            subset=None if subset is None else (len(seeds), lin_slots),
        )
        linear = [None] * len(seeds)
        for k, i in enumerate(lin_slots):
            linear[i] = lin.export(k)
        for m in rest:
            ensemble.load_member(m, embed_linear(linear[member_slot[m]], ensemble.export(m)))
    info = fit_ensemble(
        ensemble,
        z_dev,
        x_dev,
        train_z,
        train_x,
        member_slot,
        settings,
        seed=cfg.seed,
        progress=progress,
        subset=subset,
    )
    index = {(c, slot): m for m, (c, slot) in enumerate(zip(member_caps, member_slot, strict=True))}
    return {"ensemble": ensemble, "index": index, "linear": linear, **info}


def default_fit_batch(data_shape: Sequence[int]) -> int:
    """256 rows, or for images of more than 32 x 32 pixels 256 * 1024 / (H * W) (at least 16):
    the pixels per step of a CIFAR-sized batch at every image size, so that a conv sweep on
    photographs finishes on a CPU (96 x 96: 28 rows; 250 x 250: 16). The rule of train-dae's
    default batch (``latentdist.dae.config.default_batch_size``)."""
    return pixel_budget_batch(tuple(data_shape), FIT_BATCH, FIT_BATCH_PIXELS, MIN_FIT_BATCH)


def fit_batch_size(
    batch_size: int | None, data_shape: Sequence[int], train_z: list, train_x: list
) -> int:
    """--batch-size (default ``default_fit_batch``), but at most the rows one seed fits on: a
    batch drawn from fewer rows than its size only repeats them (a folder of 200 photos leaves
    ~80 fitting rows per seed), which costs B^2 kernel entries per step and carries no more
    information."""
    batch = default_fit_batch(data_shape) if batch_size is None else batch_size
    return max(2, min(batch, *(len(t) for t in (*train_z, *train_x))))


def _informative_members(
    paired: dict[str, Any],
    splits: list,
    z_all: torch.Tensor,
    x_all: torch.Tensor,
    device: torch.device,
) -> dict[str, Any]:
    """The paired sweep as a start, restricted to the members whose generator explains the data:
    R^2 = 1 - |g(z) - x|^2 / |x - mean x|^2 on the seed's validation rows (paired through their
    common row index, disjoint from the fitting and evaluation rows) above PAIRED_START_MIN_R2.
    Returns ``{"start", "r2"}``; ``r2`` maps "capacity/seed slot" to the value, for the report."""
    ens, index = paired["ensemble"], paired["index"]
    r2: dict[tuple, float] = {}
    with torch.no_grad():
        for key, m in index.items():
            rows = splits[key[1]].val_x
            x = x_all[rows].to(device).flatten(1).float()
            g = ens.export(m).to(device)
            pred = g(z_all[rows].to(device)).flatten(1).float()
            sst = (x - x.mean(0)).square().sum()
            r2[key] = float(1.0 - (pred - x).square().sum() / sst.clamp_min(1e-12))
    keep = {k: m for k, m in index.items() if r2[k] > PAIRED_START_MIN_R2}
    return {
        "start": {**paired, "index": keep},
        "r2": {f"{k[0]}/{k[1]}": round(v, 4) for k, v in r2.items()},
    }


def _features_for(cfg: MeasureConfig, train: torch.Tensor, data_shape, seed: int):
    """The fd/kid feature space: identity, a user's TorchScript file, or a net learned on
    fitting rows only (``train_feature_net``: a denoising autoencoder without labels)."""
    from latentdist.evaluation.generation import load_feature_extractor, train_feature_net

    choice = cfg.features or "identity"
    if choice == "identity":
        return None
    if choice == "learned":
        from latentdist.data.source import DataSource

        kind = "images" if len(data_shape) == 3 else "vectors"
        return train_feature_net(DataSource("fitting rows", train.numpy(), kind=kind), seed=seed)
    return load_feature_extractor(choice)


def _judges(cfg: MeasureConfig, sp, x_all: torch.Tensor, data_shape, seed: int):
    """(evaluation judge, floor value, validation judge) of one seed's split."""
    features = None
    if cfg.metric in ("fd", "kid"):
        features = _features_for(cfg, x_all[sp.train_x], data_shape, seed)
    half = min(_CRITIC_FIT_ROWS, len(sp.train_x) // 2)
    needs_fit = cfg.metric in NEEDS_FIT
    train = x_all[sp.train_x[: 2 * half]] if needs_fit else None  # only the rows it needs
    judge = Judge(
        cfg.metric,
        x_all[sp.eval_x],
        reference_fit=train[:half] if needs_fit else None,
        features=features,
        seed=seed,
    )
    floor = judge(x_all[sp.floor_x], train[half : 2 * half] if needs_fit else None)
    val_judge = None
    if cfg.select:
        val_judge = Judge(
            _VALIDATION_METRIC.get(cfg.metric, cfg.metric),
            x_all[sp.val_x],
            features=features,
            seed=seed,
        )
    return judge, floor, val_judge


@torch.no_grad()
def _apply(g: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    return torch.cat([g(zb) for zb in z.split(4096)])


def _evaluate(
    cfg: MeasureConfig,
    caps: list[int | None],
    seeds: list[int],
    splits: list,
    z_all: torch.Tensor,
    x_all: torch.Tensor,
    fitted: dict[str, dict],
    judges: list,
    val_judges: list,
    latent_shape: tuple[int, ...],
    data_shape: tuple[int, ...],
    progress: bool,
) -> dict[int | None, dict[str, Any]]:
    """Held-out distances per capacity and seed: each fit's own, and the chosen bound.

    Capacities are visited in increasing order, so the candidate inherited from the next
    smaller capacity is already chosen (SELECTION_MEANING).
    """
    fits = list(fitted)
    out: dict[int | None, dict[str, Any]] = {}
    chosen_prev: list[tuple[str, torch.nn.Module, float, float] | None] = [None] * len(seeds)
    bar = tqdm(
        total=len(caps) * len(seeds),
        desc=f"evaluate {cfg.metric}",
        disable=not progress,
        leave=False,
    )
    for cap in caps:
        rec: dict[str, Any] = {
            "distance": [],
            "by_fit": {f: [] for f in fits},
            "chosen": [],
            "generators": [],
            "recon": [],
            "params": fitted[fits[0]]["ensemble"]
            .members[fitted[fits[0]]["index"][(cap, 0)]]
            .params,
        }
        for slot in range(len(seeds)):
            sp, judge = splits[slot], judges[slot]
            z_eval, z_fit = z_all[sp.eval_z], z_all[sp.train_z[:_CRITIC_FIT_ROWS]]

            def score(g: torch.nn.Module, judge=judge, z_eval=z_eval, z_fit=z_fit) -> float:
                fit_rows = _apply(g, z_fit) if cfg.metric in NEEDS_FIT else None
                return judge(_apply(g, z_eval), fit_rows)

            own = {}
            for f in fits:
                ens = fitted[f]["ensemble"]
                own[f] = ens.export(fitted[f]["index"][(cap, slot)])
                rec["by_fit"][f].append(score(own[f]))
            if "paired" in own:  # eval_z and floor_x are the same rows: E|g(E(x)) - x|^2 held out
                err = (_apply(own["paired"], z_eval) - x_all[sp.floor_x]).flatten(1)
                rec["recon"].append(float(err.square().sum(1).mean().sqrt()))
            if not cfg.select:
                rec["distance"].append(rec["by_fit"][fits[0]][-1])
                rec["chosen"].append(f"{fits[0]}@{cap}")
                rec["generators"].append(own[fits[0]])
                bar.update()
                continue
            # candidates: (label, generator, held-out distance if known, validation value if known)
            tag = cap if cap is not None else "linear"
            cands = [(f"{f}@{tag}", g, rec["by_fit"][f][-1], None) for f, g in own.items()]
            if cap is not None:

                def fresh(cap: int = cap, seed: int = seeds[slot]) -> torch.nn.Module:
                    # the new units' initialisation, fixed by (seed, capacity) rather than by
                    # the global random stream: the same whatever ran before (e.g. under torchrun)
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(_member_seed(seed, cap))
                        return make_generator(
                            cfg.generator, latent_shape, data_shape, cap, cfg.depth
                        )

                if chosen_prev[slot] is not None:  # same function, so its values carry over
                    label, g_prev, d_prev, v_prev = chosen_prev[slot]
                    cands.append((label, embed_generator(g_prev, fresh()).eval(), d_prev, v_prev))
                else:
                    for f in fits:  # the linear start of this slot, where one was fitted
                        lin = fitted[f]["linear"]
                        if lin is not None and lin[slot] is not None:
                            g_lin = embed_linear(lin[slot], fresh()).eval()
                            cands.append((f"{f}@linear", g_lin, None, None))
            z_val = z_all[sp.val_z]
            values = [
                v if v is not None else val_judges[slot](_apply(g, z_val)) for _, g, _, v in cands
            ]
            k = int(np.argmin(values))
            label, g_best, best, _ = cands[k]
            if best is None:
                best = score(g_best)
            rec["distance"].append(best)
            rec["chosen"].append(label)
            rec["generators"].append(g_best)
            chosen_prev[slot] = (label, g_best, best, values[k])
            bar.update()
        out[cap] = rec
    bar.close()
    return out


def _undetermined(curve: list[dict], floor: dict) -> set:
    """Capacities scoring below the floor beyond both intervals: no generator beats fresh data
    in the population, so such a value is a failure of the estimator, not a measurement."""
    if not floor["ci"]:
        return set()
    return {
        e["capacity"]
        for e in curve
        if e["distance"]["ci"] and e["distance"]["ci"][1] < floor["ci"][0]
    }


def _proxies(per_seed: list[dict]) -> dict:
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


def _geometry(z: torch.Tensor, codebook, is_integer: bool, seed: int) -> dict:
    from latentdist.proxies import latent_geometry

    info = latent_geometry(z, codebook=codebook, is_integer=is_integer, seed=seed)
    info.setdefault("shape", list(z.shape[1:]))
    return info


def _diagnostics(z: torch.Tensor, x: torch.Tensor, encoder, is_integer: bool, seed: int) -> dict:
    from latentdist.proxies.diagnostics import latent_diagnostics

    return latent_diagnostics(z, x, encoder=encoder, discrete=is_integer, seed=seed)


def _monotonicity_warnings(curve: list[dict]) -> list[str]:
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


def _below_floor_warnings(
    curve: list[dict], floor: dict, metric: str, n_eval: int, data_shape: tuple[int, ...]
) -> list[str]:
    """Flag capacities that score below the floor beyond both intervals: no generator beats
    fresh data from P_x in the population, so these are undetermined, not a ranking
    (``below_floor_cause`` says why such values arise)."""
    if not floor["ci"]:  # one seed: no interval to judge by
        return []
    below = sorted(_undetermined(curve, floor), key=lambda c: -1 if c is None else c)
    if not below:
        return []
    names = ", ".join("linear" if c is None else str(c) for c in below)
    which = f"capacities {names} score" if len(below) > 1 else f"capacity {names} scores"
    cause = below_floor_cause(metric, n_eval, int(np.prod(data_shape)))
    return [
        f"{which} below the floor ({floor['mean']:.4g}) beyond both intervals, so they are "
        f"undetermined, not a ranking: {cause}"
    ]


def _versions() -> dict[str, str]:
    import ot
    import scipy
    import sklearn

    from latentdist import __version__

    return {
        "latentdist": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "pot": ot.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
    }
