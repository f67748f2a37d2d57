"""Fitting a capacity sweep: one generator per (capacity, seed), every member at once.

Each fit (``fit.py``) runs over the whole sweep as one vectorised ensemble. Starting points, so
that each fit begins at a bound already reached: when latent and data rows correspond and
selection is on, the paired fit runs first and the distributional fit starts from its members
where they explain the data (``informative_members``); the other MLP members start from a linear
generator fitted first by the same fit (its map in the skip path, the body's output zero), which
every capacity contains.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from latentdist import parallel
from latentdist.checkpoint import Checkpoints, Slot
from latentdist.discrepancy import median_bandwidth
from latentdist.estimator import sharding
from latentdist.estimator.config import DEFAULT_LR, MeasureConfig, default_fit_batch
from latentdist.estimator.fit import DISTRIBUTIONAL, FitSettings, fit_ensemble
from latentdist.generators.ensemble import GeneratorEnsemble, default_bucket_ratio
from latentdist.generators.modules import embed_linear

# The paired generator of a latent that says nothing about its rows is the constant mean: a
# saddle of every distributional loss (all samples coincide, the gradient averages to zero), so
# starting there collapses the fit (V1's independent latent). Below this validation R^2 a member
# starts as it would without a paired fit.
PAIRED_START_MIN_R2 = 0.05


def fit_batch_size(
    batch_size: int | None, data_shape: tuple[int, ...], train_z: list, train_x: list
) -> int:
    """--batch-size (default ``default_fit_batch``), but at most the rows one seed fits on: a
    batch drawn from fewer rows than its size only repeats them (a folder of 200 photos leaves
    ~80 fitting rows per seed), which costs B^2 kernel entries per step and carries no more
    information."""
    batch = default_fit_batch(data_shape) if batch_size is None else batch_size
    return max(2, min(batch, *(len(t) for t in (*train_z, *train_x))))


def fits_to_run(cfg: MeasureConfig, rows_correspond: bool) -> list[str]:
    """The fit asked for, and the paired bound beside a distributional fit when rows
    correspond and selection is on."""
    fits = [cfg.fit]
    if cfg.select and cfg.fit in DISTRIBUTIONAL and rows_correspond:
        fits.append("paired")
    return fits


def fit_all(
    cfg: MeasureConfig,
    fits: list[str],
    caps: list[int | None],
    seeds: list[int],
    splits: list,
    z_all: Any,
    x_all: Any,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    device: torch.device,
    progress: bool,
    checkpoints: Checkpoints | None = None,
    tag: str = "",
    linear_starts: dict | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Every fit of the sweep, the paired one first when it runs (it starts the others):
    ({fit: fitted sweep}, the paired start or None). ``checkpoints``: where each fitting
    loop keeps its state, to resume from (``fit.fit_ensemble``), in slots named with ``tag``.
    ``linear_starts``: the linear starts fitted so far (``fit_members``), kept across the
    rounds of an extended sweep, whose fitting rows and settings are the same."""
    # the mmd fit's kernel width, from fitting rows (1.0 is unused by the other fits)
    bandwidth = median_bandwidth(x_all[splits[0].train_x[:2000]]) if "mmd" in fits else 1.0
    rows = (  # on the fitting device once, for every fit
        z_all.to(device),
        x_all.to(device),
        [sp.train_z.to(device) for sp in splits],
        [sp.train_x.to(device) for sp in splits],
    )
    fitted: dict[str, dict[str, Any]] = {}
    paired_start = None
    for f in sorted(fits, key=lambda f: f != "paired"):
        if f != "paired" and "paired" in fitted and paired_start is None:
            paired_start = informative_members(fitted["paired"], splits, z_all, x_all, device)
        fitted[f] = fit_sweep(  # its members split across torchrun's ranks
            f,
            cfg,
            caps,
            seeds,
            rows,
            *shapes,
            device,
            bandwidth,
            progress,
            start=paired_start["start"] if paired_start and f != "paired" else None,
            checkpoints=checkpoints,
            tag=f + tag,
            linear_starts=linear_starts,
        )
    return fitted, paired_start


def fit_sweep(
    fit: str,
    cfg: Any,
    caps: list[int | None],
    seeds: list[int],
    rows: tuple,
    latent_shape: tuple[int, ...],
    data_shape: tuple[int, ...],
    device: torch.device,
    bandwidth: float,
    progress: bool,
    start: dict[str, Any] | None = None,
    checkpoints: Checkpoints | None = None,
    tag: str | None = None,
    linear_starts: dict | None = None,
) -> dict[str, Any]:
    """``fit_members`` with its members split across the ranks of an active group
    (``sharding``); the same dictionary, with every member, on every rank. ``start``: a fitted
    sweep (gathered, so every rank has every member) whose members start these. ``tag``: the
    name of its checkpoint slots (default: the fit's)."""
    tag = tag or fit
    args = (fit, cfg, caps, seeds, rows, latent_shape, data_shape, device, bandwidth)
    group = parallel.current()
    if group is None:
        return fit_members(
            *args, progress, start=start, checkpoints=checkpoints, tag=tag,
            linear_starts=linear_starts,
        )  # fmt: skip
    plan = sharding.plan_members(cfg, caps, len(seeds), group.world_size, latent_shape, data_shape)
    mine = plan[group.rank]

    def local() -> dict[str, Any]:
        if not mine:
            return {"members": {}, "linear": {}}
        res = fit_members(
            *args, progress and group.is_main, start=start, members=mine,
            checkpoints=checkpoints, tag=f"{tag}-rank{group.rank}", linear_starts=linear_starts,
        )  # fmt: skip
        ens, index = res["ensemble"], res["index"]
        return {
            "members": {
                key: (
                    ens.members[index[key]],
                    ens.export(index[key]),
                    res["final_loss"][index[key]],
                )
                for key in mine
            },
            "linear": {s: g for s, g in enumerate(res["linear"] or []) if g is not None},
        }

    parts = group.gather(local)
    merged: dict = {}
    linear: dict[int, torch.nn.Module] = {}
    for part in parts:
        merged.update(part["members"])
        for s, g in part["linear"].items():
            linear.setdefault(s, g)  # equal on every rank that fitted it; the lowest rank's
    order = [(c, s) for c in caps for s in range(len(seeds))]
    members, generators, losses = zip(*(merged[key] for key in order), strict=True)
    return {
        "ensemble": sharding.GatheredEnsemble(list(members), list(generators)),
        "index": {key: m for m, key in enumerate(order)},
        "linear": [linear.get(s) for s in range(len(seeds))] if linear else None,
        "final_loss": list(losses),
        "plan": [[[c, seeds[s]] for c, s in block] for block in plan],
    }


def fit_members(
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
    checkpoints: Checkpoints | None = None,
    tag: str = "",
    linear_starts: dict | None = None,
) -> dict[str, Any]:
    """Fit one generator per (capacity, seed) with ``fit``, all members at once.

    With ``start`` (another fit's sweep, the paired one), each member in its ``index`` starts
    from that sweep's member of the same capacity and seed; the others (all without ``start``),
    with selection on, MLP members, start from the linear generator fitted first by the same fit
    (``fit_linear_starts``). ``members``: only these (capacity, seed slot) pairs, in capacity
    order (a rank's share under torchrun, see ``sharding``); default all. ``checkpoints``: the
    fitting loops' slots ``fit-{tag}`` and ``fit-{tag}-linear`` (resumed when they hold a state).
    ``linear_starts``: linear starts already fitted, by (fit, seed slots); the ones this call
    fits are added (the same fit of the same rows gives the same maps, so none is refitted).
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
    ensemble = GeneratorEnsemble(
        cfg.generator,
        latent_shape,
        data_shape,
        member_caps,
        [seeds[i] for i in member_slot],
        cfg.depth,
        bucket_ratio=default_bucket_ratio(device),
    ).to(device)
    started = _load_starts(ensemble, members, start)
    rest = [m for m in range(len(members)) if m not in started]
    linear = None
    if rest and cfg.generator == "mlp" and cfg.select:
        lin_slots = sorted({member_slot[m] for m in rest})  # batches drawn for every slot anyway
        linear = fit_linear_starts(
            cfg, lin_slots, seeds, rows, (latent_shape, data_shape), settings, progress, subset,
            None if checkpoints is None else checkpoints.slot(f"fit-{tag}-linear"),
            linear_starts,
        )  # fmt: skip
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
        checkpoint=None if checkpoints is None else checkpoints.slot(f"fit-{tag}"),
    )
    index = {(c, slot): m for m, (c, slot) in enumerate(zip(member_caps, member_slot, strict=True))}
    return {"ensemble": ensemble, "index": index, "linear": linear, **info}


def _load_starts(ensemble: GeneratorEnsemble, members: list, start: dict | None) -> set[int]:
    """Load each member that ``start`` (another fit's sweep) holds at the same (capacity, seed
    slot) into ``ensemble``; returns the positions loaded."""
    started: set[int] = set()
    if start is None:
        return started
    for m, key in enumerate(members):
        if key in start["index"]:
            ensemble.load_member(m, start["ensemble"].export(start["index"][key]))
            started.add(m)
    return started


def fit_linear_starts(
    cfg: MeasureConfig,
    slots: list[int],
    seeds: list[int],
    rows: tuple,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    settings: FitSettings,
    progress: bool,
    subset: tuple | None,
    checkpoint: Slot | None = None,
    fitted: dict | None = None,
) -> list[torch.nn.Module | None]:
    """The linear generator of each seed slot in ``slots``, fitted by the same fit (at the
    linear family's learning rate): per slot, the start of every MLP member of that slot.
    ``fitted``: starts fitted before, by (fit, slots), taken from there and added to it."""
    key = (settings.fit, tuple(slots))
    if fitted is not None and key in fitted:
        return fitted[key]
    z_dev, x_dev, train_z, train_x = rows
    lin = GeneratorEnsemble(
        "linear",
        *shapes,
        [None] * len(slots),
        [seeds[i] for i in slots],
        bucket_ratio=default_bucket_ratio(z_dev.device),
    ).to(z_dev.device)
    lin_settings = FitSettings(**{**asdict(settings), "lr": DEFAULT_LR["linear"]})
    fit_ensemble(
        lin,
        z_dev,
        x_dev,
        train_z,
        train_x,
        slots,
        lin_settings,
        seed=cfg.seed,
        progress=progress,
        subset=None if subset is None else (len(seeds), slots),
        checkpoint=checkpoint,
    )
    linear: list[torch.nn.Module | None] = [None] * len(seeds)
    for k, i in enumerate(slots):
        linear[i] = lin.export(k)
    if fitted is not None:
        fitted[key] = linear
    return linear


def informative_members(
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
