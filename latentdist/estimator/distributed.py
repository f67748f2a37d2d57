"""``measure`` and ``compare`` under ``torchrun``: a sweep's work split across processes.

PyTorch's own runtime does the launching (``torchrun``, single- or multi-node rendezvous) and the
communication (``torch.distributed``: gloo on CPU, NCCL on CUDA); there is no scheduler here.
With ``WORLD_SIZE > 1`` the command joins the process group (``latentdist.dae.distributed``),
and then:

* **encoding** is split by row shards: rank r encodes a contiguous block of whole encoding
  batches (the batches a single process would use, so each row sees the same arithmetic); the
  latents are gathered on every rank. A stochastic encoder (a KL posterior with ``--sample``)
  draws one stream over all rows, so it is encoded by rank 0 alone and broadcast.
* **fitting** is split by members: the (capacity, seed) pairs of every fit are dealt to ranks
  in contiguous, cost-balanced blocks (``plan_members``); each rank fits its members as one
  vectorised ensemble and the fitted generators are gathered on every rank. A member's fit does
  not depend on which members share its ensemble: its initialisation is seeded by (seed,
  capacity), the minibatches are drawn for every seed slot from one generator seeded by
  ``--seed`` whichever slots a rank fits, Adam is elementwise, and the adversarial fit's
  critics and interpolation draws are taken from those of the whole sweep.
* **held-out evaluation** (the floor, each fit's distance, the choice among candidates on
  validation rows) is split by seed: each seed's choice runs through the capacities in order,
  and seeds are independent. **Proxies** are split by (capacity, seed); the latent's geometry
  and diagnostics run on rank 0.

Rank 0 alone writes the outputs (atomically, after everything has been gathered). Every
exchange carries errors as well as results (``Group.gather``): a rank that fails (a corrupt
image in its shard, say) makes every rank raise its one-line error at the next exchange; rank 0
prints it and all ranks exit with status 2, and nothing has been written.

Equality with one process: on CPU the result is bitwise equal to the single-process result when
every process runs with the same number of threads as the single process (torchrun sets
``OMP_NUM_THREADS=1``; compare with ``--threads 1``). Across thread counts the differences are
rounding: mlp and linear fits stayed bitwise equal, held-out kernel sums differ by about 1e-16
relative, convolutions sum in a thread-dependent order (a few 1e-8 per parameter after 15
steps). On CUDA, kernels are not bitwise reproducible across batch shapes in general: equal
within float32 rounding, amplified by the fit's dynamics.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import resource
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from latentdist.errors import UsageError


class RankFailure(UsageError):
    """An error raised on one rank, re-raised on every rank at an exchange (one-line message)."""

    def __init__(self, message: str, usage: bool, rank: int, shared: bool = True):
        super().__init__(message)
        self.usage, self.rank, self.shared = usage, rank, shared


@dataclass
class Group:
    """This process's place in the torch.distributed group of a ``torchrun`` launch."""

    rank: int
    world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, fn: Callable[[], Any]) -> list[Any]:
        """Run ``fn`` here and return every rank's result (rank order). If ``fn`` raised on any
        rank, every rank raises that rank's error (the lowest failing rank's) instead.

        Exchanges may nest (``fn`` may exchange too): every exchange is one all-gather of a
        tagged payload, so a failed rank's error pairs with whichever exchange the others are
        in, and once a failure is known no rank exchanges again; all of them unwind."""
        import torch.distributed as dist

        try:
            payload: tuple = ("ok", fn())
        except RankFailure:  # learnt at an exchange inside fn, as every rank did: no more
            raise
        except Exception as e:  # noqa: BLE001 (shipped to every rank, re-raised there)
            usage = isinstance(e, UsageError) and getattr(e, "usage", True)
            text = str(e) if usage else f"{type(e).__name__}: {e}"
            payload = ("error", " ".join(text.split()), usage)
        out: list = [None] * self.world_size
        dist.all_gather_object(out, payload)
        failed = [(r, p) for r, p in enumerate(out) if p[0] == "error"]
        if failed:
            r, (_, text, usage) = failed[0]
            if len(failed) < self.world_size or len({p[1] for _, p in failed}) > 1:
                text = f"rank {r} of {self.world_size}: {text}"
            raise RankFailure(text, usage, r)
        return [p[1] for p in out]

    def check(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` here; return its result once every rank's has succeeded (see ``gather``)."""
        box: list = []

        def run() -> None:
            box.append(fn())

        self.gather(run)
        return box[0]

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn`` run on rank 0 only; its result on every rank."""
        return self.gather(lambda: fn() if self.is_main else None)[0]


def current() -> Group | None:
    """The active process group of more than one process, or None."""
    from latentdist.dae import distributed as ddp

    if not ddp.active():
        return None
    import torch.distributed as dist

    return Group(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def describe(group: Group | None) -> dict[str, Any]:
    return {
        "world_size": 1 if group is None else group.world_size,
        "backend": None if group is None else group.backend,
    }


@contextlib.contextmanager
def session(device: str) -> Iterator[Group | None]:
    """Join the process group when launched by torchrun with ``WORLD_SIZE > 1`` (gloo on CPU,
    NCCL on CUDA), and leave it afterwards; yields the group, or None in a single process."""
    from latentdist.dae import distributed as ddp
    from latentdist.device import resolve_device

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    # ranks wait at exchanges while others work (e.g. the evaluation of fewer seeds than
    # ranks), longer than torch's default timeouts (NCCL's 10 min); a rank that dies is
    # torchrun's to notice, which then stops the others
    info = ddp.setup(resolve_device(device).type, timeout=datetime.timedelta(hours=24))
    try:
        yield current()
    finally:
        ddp.teardown(info)


def progress(options: dict) -> bool:
    """Progress bars unless ``--quiet``; under torchrun on rank 0 only."""
    group = current()
    return not options.get("quiet") and (group is None or group.is_main)


def gather(fn: Callable[[], Any]) -> list[Any]:
    """``Group.gather`` in the active group; ``[fn()]`` in a single process."""
    group = current()
    return [fn()] if group is None else group.gather(fn)


def check(fn: Callable[[], Any]) -> Any:
    group = current()
    return fn() if group is None else group.check(fn)


def on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, on rank 0 only under torchrun; its result on every rank."""
    group = current()
    return fn(*args, **kwargs) if group is None else group.on_main(lambda: fn(*args, **kwargs))


# --- memory -------------------------------------------------------------------------------------


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak resident set (Linux: ``/proc/self/clear_refs``, value 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Memory:
    """Peak memory per phase: resident set (VmHWM, reset at each phase's start where Linux
    allows, else the process's peak so far) and, on CUDA, ``torch.cuda.max_memory_allocated``."""

    phases: dict[str, float] = field(default_factory=dict)
    cuda: dict[str, float] = field(default_factory=dict)
    per_phase: bool = True

    def start(self) -> None:
        self.per_phase = _reset_peak() and self.per_phase
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def stop(self, phase: str) -> None:
        hwm = _status_kib("VmHWM")
        kib = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.phases[phase] = max(self.phases.get(phase, 0.0), kib / 1024)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda[phase] = torch.cuda.max_memory_allocated() / 2**20

    @contextlib.contextmanager
    def track(self, phase: str) -> Iterator[None]:
        self.start()
        yield
        self.stop(phase)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "peak_rss_mb": max(self.phases.values(), default=0.0),
            "phases_rss_mb": dict(self.phases),
            "rss_per_phase": self.per_phase,
        }
        if self.cuda:
            out["cuda_peak_mb"] = max(self.cuda.values())
            out["phases_cuda_mb"] = dict(self.cuda)
        return out


def memory_report(memory: Memory, timings: dict[str, float]) -> dict[str, Any]:
    """The memory entry of ``measure.json``: this process's, and with several ranks every rank's
    (``per_rank``, with its timings) and the largest peak over ranks."""
    mine = memory.report()
    group = current()
    if group is None:
        return mine
    ranks = group.gather(lambda: {**mine, "timings": dict(timings)})
    return {
        **mine,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "scope": "rank 0's phases; peak_rss_mb is the largest over ranks",
        "per_rank": ranks,
    }


# --- planning ----------------------------------------------------------------------------------


def member_cost(
    cfg: Any, capacity: int | None, latent_shape: Sequence[int], data_shape: Sequence[int]
) -> float:
    """Relative cost of fitting one member: forward and backward through its parameters, plus
    the fit's loss, which costs about B data dimensions per sample (the B x B kernel or cost
    matrix, computed per member)."""
    from latentdist.estimator.measure import default_fit_batch
    from latentdist.generators.modules import count_params, make_generator

    with torch.device("meta"):
        g = make_generator(
            cfg.generator, tuple(latent_shape), tuple(data_shape), capacity, cfg.depth
        )
    batch = default_fit_batch(data_shape) if cfg.batch_size is None else cfg.batch_size
    return 3.0 * count_params(g) + 2.0 * batch * float(np.prod(data_shape))


def split_contiguous(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Indices 0..n-1 cut into ``parts`` contiguous blocks of nearly equal total cost."""
    total = float(sum(costs)) or 1.0
    out: list[list[int]] = [[] for _ in range(parts)]
    acc = 0.0
    for i, c in enumerate(costs):
        k = min(parts - 1, int((acc + c / 2) / total * parts))
        out[k].append(i)
        acc += c
    return out


def plan_members(
    cfg: Any,
    caps: Sequence[int | None],
    n_slots: int,
    world_size: int,
    latent_shape: Sequence[int],
    data_shape: Sequence[int],
) -> list[list[tuple[int | None, int]]]:
    """Each rank's (capacity, seed slot) members: contiguous in seed-major order, so a rank holds
    few seed slots (each slot it holds fits its own linear start when selection is on), with
    nearly equal cost; each block is returned in capacity order, as an ensemble wants it."""
    order = [(c, s) for s in range(n_slots) for c in caps]
    costs = [member_cost(cfg, c, latent_shape, data_shape) for c, _ in order]
    blocks = split_contiguous(costs, world_size)
    position = {c: k for k, c in enumerate(caps)}
    return [sorted((order[i] for i in b), key=lambda m: (position[m[0]], m[1])) for b in blocks]


def deal(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Indices dealt to ``parts`` bins, largest cost first to the least loaded (ties: lowest)."""
    load = [0.0] * parts
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        k = min(range(parts), key=lambda k: (load[k], k))
        out[k].append(i)
        load[k] += costs[i]
    return out


def map_items(
    fn: Callable[[Any], Any], items: Sequence[Any], costs: Sequence[float] | None = None
) -> list[Any]:
    """``[fn(i) for i in items]``, the items dealt across ranks by cost; every rank gets all."""
    group = current()
    if group is None:
        return [fn(i) for i in items]
    blocks = deal(costs if costs is not None else [1.0] * len(items), group.world_size)
    mine = blocks[group.rank]
    parts = group.gather(lambda: [fn(items[i]) for i in mine])
    out: list[Any] = [None] * len(items)
    for block, values in zip(blocks, parts, strict=True):
        for i, v in zip(block, values, strict=True):
            out[i] = v
    return out


# --- encoding ----------------------------------------------------------------------------------


class _Rows:
    """Rows ``start:stop`` of an array (a memmap, a lazily decoded image folder), as an array
    whose slices read only those rows."""

    def __init__(self, array: Any, start: int, stop: int):
        self.array, self.start, self.stop = array, start, stop
        self.shape = (stop - start, *array.shape[1:])
        self.dtype, self.ndim = array.dtype, array.ndim

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index):
        if isinstance(index, slice):
            a, b, step = index.indices(len(self))
            return self.array[self.start + a : self.start + b : step]
        return self.array[np.arange(self.start, self.stop)[index]]


def shard_rows(n: int, batch_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s rows: a contiguous run of whole batches of ``batch_size``."""
    batches = -(-n // batch_size)
    lo, hi = batches * rank // world_size, batches * (rank + 1) // world_size
    return min(n, lo * batch_size), min(n, hi * batch_size)


def _shard(source: Any, start: int, stop: int) -> Any:
    from latentdist.data.source import DataSource

    if isinstance(source, DataSource):

        class _Shard(DataSource):
            def __post_init__(self) -> None:  # the whole source was validated when loaded
                pass

        return _Shard(
            f"{source.name} [rows {start}:{stop}]",
            _Rows(source.array, start, stop),  # type: ignore[arg-type]
            kind=source.kind,
            scale=source.scale,
        )
    return source[start:stop]


def _stochastic(encoder: Any) -> bool:
    module = getattr(encoder, "module", None)
    return callable(getattr(module, "reseed", None)) and bool(getattr(module, "sample", True))


def encode(
    encoder: Any,
    source: Any,
    *,
    batch_size: int = 256,
    device: Any = "cpu",
    progress: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """``encoder.encode(source, ...)``, sharded by whole batches across the ranks of an active
    group and gathered on every rank (rank order, so the rows keep their order)."""
    group = current()
    kwargs = dict(batch_size=batch_size, device=device, seed=seed)
    if group is None:
        return encoder.encode(source, progress=progress, **kwargs)
    if _stochastic(encoder):  # one random stream over all rows: encoded by rank 0 alone
        return group.on_main(lambda: encoder.encode(source, progress=progress, **kwargs))
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: expected a positive integer")
    start, stop = shard_rows(len(source), batch_size, group.world_size, group.rank)

    def mine() -> torch.Tensor | None:
        if start == stop:
            return None
        return encoder.encode(
            _shard(source, start, stop), progress=progress and group.is_main, **kwargs
        )

    parts = [p for p in group.gather(mine) if p is not None]
    return torch.cat(parts)


# --- fitting and evaluation --------------------------------------------------------------------


class GatheredEnsemble:
    """The fitted members of a sweep gathered from the ranks: what ``_evaluate`` reads of a
    ``GeneratorEnsemble`` (``members`` and ``export``)."""

    def __init__(self, members: list, generators: list[torch.nn.Module]):
        self.members, self._generators = members, generators

    def export(self, index: int) -> torch.nn.Module:
        return copy.deepcopy(self._generators[index])


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
) -> dict[str, Any]:
    """``_fit_sweep`` with its members split across the ranks of an active group (see the
    module docstring); the same dictionary, with every member, on every rank. ``start``: a
    fitted sweep (gathered, so every rank has every member) whose members start these."""
    from latentdist.estimator.measure import _fit_sweep

    args = (fit, cfg, caps, seeds, rows, latent_shape, data_shape, device, bandwidth)
    group = current()
    if group is None:
        return _fit_sweep(*args, progress, start=start)
    plan = plan_members(cfg, caps, len(seeds), group.world_size, latent_shape, data_shape)
    mine = plan[group.rank]

    def local() -> dict[str, Any]:
        if not mine:
            return {"members": {}, "linear": {}}
        res = _fit_sweep(*args, progress and group.is_main, start=start, members=mine)
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
        "ensemble": GatheredEnsemble(list(members), list(generators)),
        "index": {key: m for m, key in enumerate(order)},
        "linear": [linear.get(s) for s in range(len(seeds))] if linear else None,
        "final_loss": list(losses),
        "plan": [[[c, seeds[s]] for c, s in block] for block in plan],
    }


def _slot_view(fitted: dict[str, dict], slots: Sequence[int]) -> dict[str, dict]:
    """``fitted`` as ``_evaluate`` sees it for seed slots ``slots`` only (renumbered 0..)."""
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


def evaluate(
    cfg: Any,
    caps: list[int | None],
    seeds: list[int],
    splits: list,
    z_all: torch.Tensor,
    x_all: torch.Tensor,
    fitted: dict[str, dict],
    latent_shape: tuple[int, ...],
    data_shape: tuple[int, ...],
    progress: bool,
) -> tuple[Any, list[float], dict, list[list[int]]]:
    """Judges, floors and ``_evaluate`` per seed, the seeds split across the ranks of an active
    group: (the first seed's kernel description, floors, curve data, each rank's seeds)."""
    from latentdist.estimator.measure import _evaluate, _judges

    group = current()
    world, rank = (1, 0) if group is None else (group.world_size, group.rank)
    blocks = split_contiguous([1.0] * len(seeds), world)
    slots = blocks[rank]

    def local() -> tuple | None:
        if not slots:
            return None
        judges, floors, val_judges = [], [], []
        for i in slots:
            judge, floor_value, val_judge = _judges(cfg, splits[i], x_all, data_shape, seeds[i])
            judges.append(judge)
            floors.append(floor_value)
            val_judges.append(val_judge)
        view = fitted if len(slots) == len(seeds) else _slot_view(fitted, slots)
        curve = _evaluate(
            cfg,
            caps,
            [seeds[i] for i in slots],
            [splits[i] for i in slots],
            z_all,
            x_all,
            view,
            judges,
            val_judges,
            latent_shape,
            data_shape,
            progress and rank == 0,
        )
        return judges[0].kernel, floors, curve

    parts = [local()] if group is None else [p for p in group.gather(local) if p is not None]
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
