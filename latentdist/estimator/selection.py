"""Held-out evaluation of a fitted sweep: the floor, each fit's distance, and the choice.

Per seed, a ``Judge`` fixed by the held-out reference rows scores every candidate generator,
and the floor (a disjoint data sample judged the same way). With selection on, the reported
generator at each capacity is the best on validation rows among each fit's own generator and the
one chosen at the next smaller capacity, embedded (``SELECTION_MEANING``). Capacities are visited
in increasing order, so the candidate inherited from the smaller capacity is already chosen.
Under torchrun the seeds are split across the ranks (``evaluate_sweep``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from latentdist import parallel
from latentdist._progress import progress_bar as tqdm
from latentdist.checkpoint import Checkpoints
from latentdist.discrepancy import FEATURE_METRICS, NEEDS_FIT, Judge, resolve_features
from latentdist.estimator.config import MeasureConfig
from latentdist.generators.ensemble import member_seed
from latentdist.generators.modules import embed_generator, embed_linear, make_generator

# Validation judges for the choice: the critic trains per judged sample, so choosing with it
# would multiply its cost by the number of candidates; the MMD judges the choice instead.
VALIDATION_METRIC = {"critic": "mmd"}
CRITIC_FIT_ROWS = 2000  # rows of each side the held-out critic trains on

Shapes = tuple[tuple[int, ...], tuple[int, ...]]


def make_judges(cfg: MeasureConfig, sp, x_all: torch.Tensor, data_shape, seed: int):
    """(evaluation judge, floor value, validation judge) of one seed's split."""
    features = None
    if cfg.metric in FEATURE_METRICS:  # identity, a user's TorchScript file, or a net learned
        # on fitting rows only (a denoising autoencoder without labels)
        _, features = resolve_features(
            cfg.features, tuple(data_shape), fit_rows=x_all[sp.train_x], seed=seed
        )
    half = min(CRITIC_FIT_ROWS, len(sp.train_x) // 2)
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
            VALIDATION_METRIC.get(cfg.metric, cfg.metric),
            x_all[sp.val_x],
            features=features,
            seed=seed,
        )
    return judge, floor, val_judge


@torch.no_grad()
def apply_generator(g: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """g(z) in blocks of 4096 rows."""
    return torch.cat([g(zb) for zb in z.split(4096)])


def _score(cfg: MeasureConfig, judge: Judge, g: torch.nn.Module, z_eval, z_fit) -> float:
    """The held-out distance of ``g``: its evaluation latents judged against the reference
    (the critic trains on its fitting latents first)."""
    fit_rows = apply_generator(g, z_fit) if cfg.metric in NEEDS_FIT else None
    return judge(apply_generator(g, z_eval), fit_rows)


def _fresh(cfg: MeasureConfig, cap: int, seed: int, shapes: Shapes) -> torch.nn.Module:
    """A generator of capacity ``cap`` whose new units' initialisation is fixed by (seed,
    capacity) rather than by the global random stream: the same whatever ran before (e.g.
    under torchrun)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(member_seed(seed, cap))
        return make_generator(cfg.generator, *shapes, cap, cfg.depth)


def _candidates(
    cfg: MeasureConfig,
    cap: int | None,
    seed: int,
    slot: int,
    own: dict[str, torch.nn.Module],
    by_fit: dict[str, list[float]],
    previous: tuple | None,
    fitted: dict[str, dict],
    shapes: Shapes,
) -> list[tuple[str, torch.nn.Module, float | None, float | None]]:
    """(label, generator, held-out distance if known, validation value if known) of every
    candidate at ``cap``: each fit's own, and the smaller capacity's choice embedded (or, at
    the smallest capacity, each fit's linear start embedded)."""
    tag = cap if cap is not None else "linear"
    cands = [(f"{f}@{tag}", g, by_fit[f][-1], None) for f, g in own.items()]
    if cap is None:
        return cands
    if previous is not None:  # same function, so its values carry over
        label, g_prev, d_prev, v_prev = previous
        cands.append(
            (label, embed_generator(g_prev, _fresh(cfg, cap, seed, shapes)).eval(), d_prev, v_prev)
        )
        return cands
    for f in fitted:  # the linear start of this slot, where one was fitted
        lin = fitted[f]["linear"]
        if lin is not None and lin[slot] is not None:
            # the linear fit's start at this capacity (its rank-c truncation in the skip)
            g_lin = embed_linear(lin[slot], _fresh(cfg, cap, seed, shapes)).eval()
            cands.append((f"{f}@linear-start", g_lin, None, None))
    return cands


def _evaluate_member(
    cfg: MeasureConfig,
    cap: int | None,
    slot: int,
    seeds: list[int],
    sp: Any,
    z_all: torch.Tensor,
    x_all: Any,
    fitted: dict[str, dict],
    judges: tuple[Judge, Judge | None],
    previous: tuple | None,
    rec: dict[str, Any],
    shapes: Shapes,
) -> tuple:
    """Score one (capacity, seed): append to ``rec``; return the choice, which the next
    capacity inherits as a candidate."""
    judge, val_judge = judges
    z_eval, z_fit = z_all[sp.eval_z], z_all[sp.train_z[:CRITIC_FIT_ROWS]]
    own = {}
    for f in fitted:
        own[f] = fitted[f]["ensemble"].export(fitted[f]["index"][(cap, slot)])
        rec["by_fit"][f].append(_score(cfg, judge, own[f], z_eval, z_fit))
    if "paired" in own:  # eval_z and floor_x are the same rows: E|g(E(x)) - x|^2 held out
        err = (apply_generator(own["paired"], z_eval) - x_all[sp.floor_x]).flatten(1)
        rec["recon"].append(float(err.square().sum(1).mean().sqrt()))
    if not cfg.select:
        first = next(iter(fitted))
        rec["distance"].append(rec["by_fit"][first][-1])
        rec["chosen"].append(f"{first}@{cap}")
        rec["generators"].append(own[first])
        return previous
    cands = _candidates(cfg, cap, seeds[slot], slot, own, rec["by_fit"], previous, fitted, shapes)
    z_val = z_all[sp.val_z]
    values = [v if v is not None else val_judge(apply_generator(g, z_val)) for _, g, _, v in cands]
    k = int(np.argmin(values))
    label, g_best, best, _ = cands[k]
    if best is None:
        best = _score(cfg, judge, g_best, z_eval, z_fit)
    rec["distance"].append(best)
    rec["chosen"].append(label)
    rec["generators"].append(g_best)
    return (label, g_best, best, values[k])


def evaluate_seeds(
    cfg: MeasureConfig,
    caps: list[int | None],
    seeds: list[int],
    splits: list,
    z_all: torch.Tensor,
    x_all: Any,
    fitted: dict[str, dict],
    judges: list[tuple[Judge, Judge | None]],
    shapes: Shapes,
    progress: bool,
    checkpoints: Checkpoints | None = None,
    tag: str = "",
    previous: list[tuple | None] | None = None,
) -> dict[int | None, dict[str, Any]]:
    """Held-out distances per capacity and seed: each fit's own, and the chosen bound.
    ``checkpoints``: each capacity's records are kept in slot ``evaluate-c{cap}{tag}`` once
    done, and read back instead of recomputed when it holds them. ``previous``: each seed's
    choice at the capacity below ``caps`` (a sweep extended after it was evaluated)."""
    fits = list(fitted)
    out: dict[int | None, dict[str, Any]] = {}
    chosen: list[tuple | None] = list(previous) if previous else [None] * len(seeds)
    bar = tqdm(
        total=len(caps) * len(seeds),
        desc=f"evaluate {cfg.metric}",
        disable=not progress,
        leave=False,
    )
    for cap in caps:
        kept = (checkpoints or Checkpoints(None)).slot(f"evaluate-c{cap}{tag}")
        done = kept.load()
        if done is not None:
            out[cap], chosen = restore_records(cfg, cap, shapes, done)
            bar.update(len(seeds))
            continue
        first = fitted[fits[0]]
        rec: dict[str, Any] = {
            "distance": [],
            "by_fit": {f: [] for f in fits},
            "chosen": [],
            "generators": [],
            "recon": [],
            "params": first["ensemble"].members[first["index"][(cap, 0)]].params,
        }
        for slot in range(len(seeds)):
            chosen[slot] = _evaluate_member(
                cfg, cap, slot, seeds, splits[slot], z_all, x_all, fitted,
                judges[slot], chosen[slot], rec, shapes,
            )  # fmt: skip
            bar.update()
        out[cap] = rec
        kept.save(records_state(rec, chosen))
    bar.close()
    return out


def records_state(rec: dict[str, Any], chosen: list[tuple | None]) -> dict[str, Any]:
    """A capacity's records and each seed's choice, generators as state dicts."""
    return {
        "rec": {**rec, "generators": [g.state_dict() for g in rec["generators"]]},
        "chosen": [None if c is None else [c[0], c[1].state_dict(), c[2], c[3]] for c in chosen],
    }


def restore_records(
    cfg: MeasureConfig, cap: int | None, shapes: Shapes, state: dict[str, Any]
) -> tuple[dict[str, Any], list[tuple | None]]:
    """What ``records_state`` saved: (the capacity's records, each seed's choice)."""

    def generator(weights: dict) -> torch.nn.Module:
        g = make_generator(cfg.generator, *shapes, cap, cfg.depth)
        g.load_state_dict(weights)
        return g.eval()

    rec = {**state["rec"], "generators": [generator(w) for w in state["rec"]["generators"]]}
    chosen = [None if c is None else (c[0], generator(c[1]), c[2], c[3]) for c in state["chosen"]]
    return rec, chosen


def slot_view(fitted: dict[str, dict], slots: Sequence[int]) -> dict[str, dict]:
    """``fitted`` as ``evaluate_seeds`` sees it for seed slots ``slots`` only (renumbered 0..)."""
    out = {}
    for f, info in fitted.items():
        index = {
            (c, k): m for (c, s), m in info["index"].items() for k, t in enumerate(slots) if s == t
        }
        linear = info["linear"]
        out[f] = {
            **info,
            "index": index,
            "linear": None if linear is None else [linear[s] for s in slots],
        }
    return out


def _evaluate_slots(
    cfg: MeasureConfig,
    caps: list[int | None],
    seeds: list[int],
    splits: list,
    z_all: torch.Tensor,
    x_all: Any,
    fitted: dict[str, dict],
    shapes: Shapes,
    slots: list[int],
    progress: bool,
    checkpoints: Checkpoints | None = None,
    kept_judges: dict[int, tuple] | None = None,
    previous: list[tuple | None] | None = None,
) -> tuple | None:
    """Judges, floors and ``evaluate_seeds`` for the seed slots ``slots`` (one rank's share):
    (the first seed's kernel description, floors, curve data), or None without slots.
    ``kept_judges``: each slot's judges, made once (filled here) and reused when the sweep is
    extended; ``previous``: every slot's choice at the capacity below ``caps``."""
    if not slots:
        return None
    kept_judges = {} if kept_judges is None else kept_judges
    judges, floors = [], []
    for i in slots:
        if i not in kept_judges:
            kept_judges[i] = make_judges(cfg, splits[i], x_all, shapes[1], seeds[i])
        judge, floor_value, val_judge = kept_judges[i]
        judges.append((judge, val_judge))
        floors.append(floor_value)
    view = fitted if len(slots) == len(seeds) else slot_view(fitted, slots)
    curve = evaluate_seeds(
        cfg,
        caps,
        [seeds[i] for i in slots],
        [splits[i] for i in slots],
        z_all,
        x_all,
        view,
        judges,
        shapes,
        progress,
        checkpoints,
        "" if len(slots) == len(seeds) else "-seeds" + "-".join(map(str, slots)),
        None if previous is None else [previous[i] for i in slots],
    )
    return judges[0][0].kernel, floors, curve


def evaluate_sweep(
    cfg: MeasureConfig,
    caps: list[int | None],
    seeds: list[int],
    splits: list,
    z_all: torch.Tensor,
    x_all: Any,
    fitted: dict[str, dict],
    shapes: Shapes,
    progress: bool,
    checkpoints: Checkpoints | None = None,
    kept_judges: dict[int, tuple] | None = None,
    below: dict[str, Any] | None = None,
) -> tuple[Any, list[float], dict, list[list[int]]]:
    """Judges, floors and ``evaluate_seeds`` per seed, the seeds split across the ranks of an
    active group: (the first seed's kernel description, floors, curve data, each rank's seeds).
    An extension of an evaluated sweep passes the same ``kept_judges`` (each rank keeps its
    seeds') and ``below``, the curve data of the capacity under ``caps``, whose choices are
    every seed's nested candidate."""
    group = parallel.current()
    world, rank = (1, 0) if group is None else (group.world_size, group.rank)
    blocks = parallel.split_contiguous([1.0] * len(seeds), world)
    args = (cfg, caps, seeds, splits, z_all, x_all, fitted, shapes, blocks[rank])
    previous = None
    if below is not None:  # validation values are recomputed from the generator (None)
        rows = zip(below["chosen"], below["generators"], below["distance"], strict=True)
        previous = [(label, g, d, None) for label, g, d in rows]
    more = (checkpoints, kept_judges, previous)
    if group is None:
        parts = [_evaluate_slots(*args, progress, *more)]
    else:
        parts = group.gather(lambda: _evaluate_slots(*args, progress and rank == 0, *more))
        parts = [p for p in parts if p is not None]
    kernel = parts[0][0]
    floors = [v for p in parts for v in p[1]]
    curve: dict = {}
    for cap in caps:
        recs = [p[2][cap] for p in parts]
        curve[cap] = {
            "params": recs[0]["params"],
            **{
                k: [v for r in recs for v in r[k]]
                for k in ("distance", "chosen", "generators", "recon")
            },
            "by_fit": {f: [v for r in recs for v in r["by_fit"][f]] for f in recs[0]["by_fit"]},
        }
    return kernel, floors, curve, [[seeds[i] for i in b] for b in blocks]
