"""``measure``: the GAN-induced latent–data distance over a capacity sweep (SPEC §1).

    D_c(P_z ; P_x) = inf_{g in G_c} d_F(g#P_z, P_x)

For every capacity c and seed, a generator g in G_c is fitted on training rows (all members at
once, see ``sweep``), then d_F(g#P_z, P_x) is estimated on held-out rows: g applied to n_eval
held-out latents against n_eval held-out data points (``selection``). Beside it stands the
floor, the same discrepancy between two disjoint data samples of size n_eval: what even the true
generator would score at this sample size (Hu et al., 2023, arXiv 2307.08283, for the distance;
see docs/concepts.md). ``measure`` reads as its five phases: rows, fit, evaluate, proxies,
report (``summary``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from latentdist import parallel
from latentdist._io import to_json
from latentdist.checkpoint import DEFAULT_EVERY_S, Checkpoints
from latentdist.checkpoint import digest as checkpoint_digest
from latentdist.device import resolve_device
from latentdist.errors import UsageError
from latentdist.estimator import rows as rows_
from latentdist.estimator.config import (
    FIT_MEANING,
    SELECTION_MEANING,
    MeasureConfig,
    default_fit_batch,
)
from latentdist.estimator.memory import Memory, memory_report
from latentdist.estimator.paired import BOOTSTRAP_REPLICATES, critical_interval
from latentdist.estimator.saturation import next_capacity, saturation
from latentdist.estimator.selection import evaluate_sweep
from latentdist.estimator.split import default_n_eval, default_n_val, make_split
from latentdist.estimator.summary import curve_entries, describe_latent, judge_curve
from latentdist.estimator.sweep import PAIRED_START_MIN_R2, fit_all, fit_batch_size, fits_to_run
from latentdist.generators.modules import upsampling_factor
from latentdist.proxies import generator_proxies
from latentdist.stats import mean_ci
from latentdist.versions import versions


@dataclass
class MeasureResult:
    """The outcome of ``measure``: the SPEC §4 report as ``.report``, with views for notebooks."""

    report: dict[str, Any]
    generators: dict[int | None, list[torch.nn.Module]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return self.report

    def to_json(self, indent: int | None = 2) -> str:
        return to_json(self.report, indent)

    # report.measure imports pandas and matplotlib: loaded when a view is asked for
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


@dataclass
class Rows:
    """What the measurement reads: the rows its splits use, and what it knows of them."""

    z: torch.Tensor  # latent rows the splits use (their indices renumbered into these)
    x: Any  # data rows likewise: a tensor, or rows read on demand (rows.LazyRows)
    splits: list
    seeds: list[int]
    n_eval: int
    n_val: int
    n_z: int
    n_x: int
    rows_correspond: bool


def measure(
    latents: Any,
    data: Any,
    config: MeasureConfig | None = None,
    *,
    codebook: torch.Tensor | None = None,
    encoder: Any = None,
    progress: bool = True,
    memory: Memory | None = None,
    timings: Mapping[str, float] | None = None,
    report_extra: Mapping[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    restart: bool = False,
    checkpoint_every: float = DEFAULT_EVERY_S,
    **settings: Any,
) -> MeasureResult:
    """Estimate the latent–data distance curve ``c -> D_c`` with floor, intervals and proxies.

    ``latents``: (N, *latent_shape) tensor, array or DataSource (an encoder's output);
    ``data``: (N', *data_shape) likewise. Settings are ``MeasureConfig`` fields, as a config or
    keywords (e.g. ``generator="mlp", capacities=(8, 16), metric="w2", fit="ot"``).
    ``codebook``: (K, C) for vector-quantised latents, to report codebook usage.
    ``encoder``: a callable batch -> latents, for the diagnostics that need it (equivariance).
    What the caller measured before (the encoding) enters the report through ``memory`` (a
    started ``Memory`` holding its phases), ``timings`` (seconds by name) and ``report_extra``
    (top-level entries, e.g. the encoder; they override measure's own).
    ``checkpoint``: a folder keeping finished work (fits every ``checkpoint_every`` s), so the
    same call resumes after an interruption to the same result; see ``_checkpoints``.
    """
    t_start = time.perf_counter()
    memory = memory or Memory()
    memory.start()
    cfg = replace(config or MeasureConfig(), **settings).validate()
    is_integer = bool(getattr(latents, "is_integer", False))
    z_src, x_src = rows_.as_input(latents, "latents"), rows_.as_input(data, "data")
    shapes = (rows_.sample_shape(z_src), rows_.sample_shape(x_src))
    cfg, generator_choice = cfg.resolve(*shapes)
    if cfg.generator == "conv":
        upsampling_factor(*shapes)  # raises a UsageError on impossible shapes
    device = resolve_device(cfg.device)
    phases: dict[str, float] = {}

    rows = _read_rows(cfg, z_src, x_src)
    kept = _checkpoints(checkpoint, restart, checkpoint_every, cfg, rows)
    memory.stop("load")
    fits = fits_to_run(cfg, rows.rows_correspond)
    swept = _sweep(cfg, fits, rows, shapes, device, progress, kept, (memory, phases))
    caps, fitted, curve_data = swept.caps, swept.fitted, swept.curve_data
    kernel, floors, paired_start = swept.kernel, swept.floors, swept.paired_start
    with _phase(memory, phases, "proxies"):
        proxies = _proxies(cfg, caps, rows, curve_data, shapes) if cfg.proxies else None
        curve = curve_entries(
            caps, curve_data, proxies, len(fits) > 1 or cfg.select, _sampled(rows)
        )
    with _phase(memory, phases, "geometry"):
        latent_info, diagnostics = parallel.on_main(  # rank 0's, under torchrun
            lambda: describe_latent(
                rows.z, rows_.head(rows.x), codebook, encoder, is_integer, cfg.seed
            )
        )
    report = _report(cfg, rows, curve, floors, fits, fitted, paired_start, shapes)
    report["sweep"] = swept.extension
    report.update(
        kernel=kernel or None,
        generator_choice=generator_choice,
        latent=latent_info,
        diagnostics=diagnostics,
        device=str(device),
        versions=versions(),
        distributed=_distributed(fits, fitted, swept.eval_seeds),
    )
    _add_costs(report, phases, timings, memory, time.perf_counter() - t_start)
    report.update(report_extra or {})
    generators = {cap: curve_data[cap]["generators"] for cap in caps}
    return MeasureResult(_ordered(report), generators)


@contextlib.contextmanager
def _phase(memory: Memory, phases: dict[str, float], name: str) -> Iterator[None]:
    """Time a phase into ``phases[name]`` (summed when it recurs) and track its peak memory."""
    t0 = time.perf_counter()
    with memory.track(name):
        yield
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class Swept:
    """The fitted and evaluated sweep, its capacities extended as ``next_capacity`` says."""

    caps: list
    fitted: dict  # per fit: the members' final losses and, under torchrun, the plan
    paired_start: dict | None
    kernel: Any
    floors: list
    curve_data: dict
    eval_seeds: list
    extension: dict


def _sweep(
    cfg: MeasureConfig, fits: list, rows: Rows, shapes: tuple, device: torch.device,
    progress: bool, kept: Checkpoints, phase: tuple[Memory, dict],
) -> Swept:  # fmt: skip
    """Fit and evaluate the configured capacities, then double the largest one while the
    curve still falls (``saturation.next_capacity``, up to ``cfg.max_capacity``): each added
    capacity is fitted alone and evaluated with the same judges, its nested candidate the
    choice below it."""
    caps, todo, judges = [], list(cfg.capacities) or [None], {}
    fitted: dict[str, dict] = {f: {"final_loss": [], "plan": None} for f in fits}
    curve_data: dict = {}
    paired_start, linear_starts = None, {}
    while todo:
        tag = f"-c{todo[0]}" if caps else ""  # checkpoint slots of an extension's fits
        with _phase(*phase, "fit"):
            part, start = fit_all(
                cfg, fits, todo, rows.seeds, rows.splits, rows.z, rows.x, shapes, device,
                progress, kept, tag, linear_starts,
            )  # fmt: skip
        below = curve_data[caps[-1]] if caps else None
        with _phase(*phase, "evaluate"):
            kernel, floors, got, eval_seeds = evaluate_sweep(
                cfg, todo, rows.seeds, rows.splits, rows.z, rows.x, part, shapes, progress,
                kept, judges, below,
            )  # fmt: skip
        for f in fits:
            fitted[f]["final_loss"] += part[f]["final_loss"]
            fitted[f]["plan"] = _joined_plan(fitted[f]["plan"], part[f].get("plan"))
        paired_start = paired_start or start
        caps += todo
        curve_data.update(got)
        nxt, why = next_capacity(
            curve_entries(caps, curve_data, None, False, _sampled(rows)),
            _epsilon(cfg, _floor(rows, floors)),
            _sampled(rows),
            cfg.max_capacity or 0,
        )
        todo = [nxt] if nxt is not None else []
    added = caps[len(cfg.capacities or [None]) :]
    extension = {"capacities": caps, "added": added, "limit": cfg.max_capacity, "stopped": why}
    return Swept(caps, fitted, paired_start, kernel, floors, curve_data, eval_seeds, extension)


def _joined_plan(plan: list | None, more: list | None) -> list | None:
    """Each rank's members over the rounds of an extended sweep (torchrun)."""
    if plan is None or more is None:
        return plan or more
    return [a + b for a, b in zip(plan, more, strict=True)]


def _sampled(rows: Rows) -> float:
    """The fraction of the finite rows each seed evaluates (intervals carry it, stats.mean_ci)."""
    return max(rows.n_eval / rows.n_x, rows.n_eval / rows.n_z)


def _floor(rows: Rows, floors: list) -> dict:
    return mean_ci(floors, sampled_fraction=rows.n_eval / rows.n_x)


def _epsilon(cfg: MeasureConfig, floor: dict) -> float:
    """The critical capacity's tolerance: ``--epsilon``, else the floor's upper 95 % limit."""
    if cfg.epsilon is not None:
        return float(cfg.epsilon)
    return float(floor["ci"][1] if floor["ci"] else floor["mean"])


def _read_rows(cfg: MeasureConfig, z_src: Any, x_src: Any) -> Rows:
    """Each seed's split, and the rows the splits use: latents in memory, data in memory or
    read on demand when they would not fit (``rows.gather_or_stream``)."""
    n_z, n_x = len(z_src), len(x_src)
    if cfg.fit == "paired" and n_z != n_x:
        raise UsageError(
            f"--fit paired needs one latent per data row: {n_z} latents vs {n_x} data rows"
        )
    n_eval = cfg.n_eval or default_n_eval(min(n_z, n_x))
    n_val = default_n_val(n_eval) if cfg.select else 0
    seeds = [cfg.seed + s for s in range(cfg.seeds)]
    splits = [make_split(n_z, n_x, n_eval, s, cfg.fit == "paired", n_val) for s in seeds]
    for s, sp in zip(seeds, splits, strict=True):
        sp.train_x = rows_.subsample(sp.train_x, cfg.max_train_rows, s)
        sp.train_z = (
            sp.train_x
            if cfg.fit == "paired"
            else rows_.subsample(sp.train_z, cfg.max_train_rows, s)
        )
    z_fields, x_fields = ("eval_z", "val_z", "train_z"), ("eval_x", "floor_x", "val_x", "train_x")
    shared = None
    if n_z == n_x:  # rows correspond: load one row set for both, keeping pairs aligned
        shared = rows_.used_rows(splits, z_fields + x_fields)
    z = rows_.gather(z_src, splits, z_fields, shared)
    x = rows_.gather_or_stream(x_src, splits, x_fields, shared)
    return Rows(z, x, splits, seeds, n_eval, n_val, n_z, n_x, n_z == n_x)


def _checkpoints(
    folder: str | Path | None, restart: bool, every_s: float, cfg: MeasureConfig, rows: Rows
) -> Checkpoints:
    """The checkpoint folder of this measurement, named by what its result depends on: the
    rows it reads, its settings, the process and thread counts and the library versions. The result
    resumed from it is bitwise that of an uninterrupted run on CPU; a folder kept for other
    inputs or settings is refused unless ``restart``. Under torchrun rank 0 opens (or
    restarts) it first; every rank keeps its own slots in it."""
    if folder is None:
        return Checkpoints(None)
    x = rows.x
    if rows_.is_lazy(x):  # rows read on demand: the source's content hash and the row set
        source = getattr(x.source, "fingerprint", lambda: repr(x.source))()
        data = checkpoint_digest(source, x.rows)
    else:
        data = checkpoint_digest(x)
    describe = {
        **asdict(cfg),
        "latents": checkpoint_digest(rows.z),
        "data": data,
        "world_size": parallel.describe(parallel.current())["world_size"],
        "threads": torch.get_num_threads(),  # sums split differently over other thread counts
        **{f"version {k}": v for k, v in versions().items()},
    }
    fingerprint = checkpoint_digest(describe)
    parallel.on_main(lambda: Checkpoints(folder, fingerprint, describe, restart=restart) and None)
    return Checkpoints(folder, fingerprint, describe, every_s=every_s, owner=False)


def _proxies(cfg: MeasureConfig, caps: list, rows: Rows, curve_data: dict, shapes) -> dict:
    """``generator_proxies`` of every chosen (capacity, seed) generator on its evaluation
    latents, split across torchrun's ranks."""
    items = [(c, i) for c in caps for i in range(len(rows.seeds))]
    values = parallel.map_items(
        lambda m: generator_proxies(
            curve_data[m[0]]["generators"][m[1]],
            rows.z[rows.splits[m[1]].eval_z],
            shapes[0],
            n_max=default_fit_batch(shapes[1]),  # Jacobian products cost as steps do
        ),
        items,
        [curve_data[c]["params"] for c, _ in items],
    )
    return dict(zip(items, values, strict=True))


def _report(
    cfg: MeasureConfig, rows: Rows, curve: list, floors: list, fits: list, fitted: dict,
    paired_start: dict | None, shapes: tuple,
) -> dict[str, Any]:  # fmt: skip
    """The measurement's own entries of ``measure.json`` (SPEC §4)."""
    floor = _floor(rows, floors)
    epsilon = _epsilon(cfg, floor)
    critical, warnings, monotone = judge_curve(
        curve, floor, epsilon, cfg.generator, cfg.metric, rows.n_eval, shapes[1]
    )
    splits = rows.splits
    flat = saturation(curve, floor, _sampled(rows), BOOTSTRAP_REPLICATES, cfg.seed)
    if critical is None and flat["capacity"] is None and len(curve) > 1 and floor["ci"]:
        warnings.append(
            f"the distance still falls at the largest capacity ({curve[-1]['capacity']}) and "
            "has not reached the floor: a larger generator would come closer, so the curve's "
            "end is not the latent's distance (pass larger --capacities or --max-capacity)"
        )
    return {
        "metric": cfg.metric,
        "fit": cfg.fit,
        "fit_meaning": FIT_MEANING[cfg.fit],
        "fits": fits,
        "fit_batch_size": fit_batch_size(
            cfg.batch_size, shapes[1], [sp.train_z for sp in splits], [sp.train_x for sp in splits]
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
        "generator": cfg.generator,
        "depth": cfg.depth if cfg.generator != "linear" else None,
        "n_eval": rows.n_eval,
        "seeds": rows.seeds,
        "floor": floor,
        "curve": curve,
        "critical_capacity": {
            "epsilon": float(epsilon),
            "capacity": critical,
            "epsilon_source": "--epsilon" if cfg.epsilon is not None else "floor upper CI",
            **critical_interval(curve, float(epsilon), seed=cfg.seed),
        },
        "saturation": flat,
        "monotone": monotone,
        "warnings": warnings,
        "data": {
            "shape": list(shapes[1]),
            "rows": rows.n_x,
            "rows_loaded": len(rows.x),
            "streamed": rows_.is_lazy(rows.x),
        },
        "fit_diagnostics": {
            "final_loss": {f: fitted[f]["final_loss"] for f in fits},
            "train_rows": len(splits[0].train_x),
            "validation_rows": rows.n_val,
        },
        "config": {**asdict(cfg), "capacities": list(cfg.capacities), "n_eval": rows.n_eval},
    }


def _add_costs(
    report: dict, phases: dict, timings: Mapping | None, memory: Memory, total_s: float
) -> None:
    """The timings and memory entries, and when the report was created."""
    report["timings"] = {
        "fit_s": phases["fit"],
        "eval_s": phases["evaluate"],
        "proxies_s": phases["proxies"],
        "geometry_s": phases["geometry"],
        "total_s": total_s,
        **(timings or {}),
    }
    report["memory"] = memory_report(memory, report["timings"])
    report["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")


def _distributed(fits: list, fitted: dict, eval_seeds: list) -> dict[str, Any]:
    group = parallel.current()
    return {
        **parallel.describe(group),
        "fitted": {f: fitted[f].get("plan") for f in fits} if group else None,
        "evaluated_seeds": eval_seeds if group else None,
    }


# the order of measure.json's top-level keys, as documented in docs/cli.md
_KEY_ORDER = (
    "metric", "fit", "fit_meaning", "fits", "fit_batch_size", "selection", "paired_start",
    "kernel", "generator", "generator_choice", "depth", "n_eval", "seeds", "floor", "curve",
    "critical_capacity", "saturation", "sweep", "monotone", "warnings", "latent", "diagnostics", "data",
    "fit_diagnostics", "config", "device", "versions", "timings", "memory", "distributed",
    "created",
)  # fmt: skip


def _ordered(report: dict[str, Any]) -> dict[str, Any]:
    known = {k: report[k] for k in _KEY_ORDER if k in report}
    return {**known, **{k: v for k, v in report.items() if k not in known}}
