"""The process group: one process per device under ``torchrun`` (single- or multi-node).

The one ``torch.distributed`` wrapper of the package, used by the DAE trainer and the estimator
alike. ``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; with ``WORLD_SIZE > 1`` a
command joins the process group through ``env://`` (NCCL on GPUs, gloo on CPU). Every helper is
a no-op in a single process, so the code that calls it reads the same either way.

* joining and leaving: ``setup``/``teardown`` (the trainer), ``session`` (measure, compare),
  which also stops a rank cleanly when another one dies (``Stopped``: one line, exit 2);
* collectives on tensors: ``barrier``, ``all_reduce_sum_``, ``all_reduce_mean_``, ``broadcast_``,
  ``all_gather_rows`` (rows of different counts per rank, concatenated in rank order);
* exchanges of Python objects that carry errors as well as results (``Group.gather``): a rank
  that fails makes every rank raise its one-line error (``RankFailure``) at the next exchange;
* dealing work to ranks: ``split_contiguous``, ``deal``, ``map_items``, ``shard_rows``.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from latentdist.device import resolve_device
from latentdist.errors import UsageError


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``; ``created`` if we initialised the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# how long ranks that finished together wait for each other before leaving the group
SETTLE_TIMEOUT = datetime.timedelta(minutes=2)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device_type: str, timeout=None) -> DistInfo:
    """Join the process group when launched by torchrun with ``WORLD_SIZE > 1``; ``timeout``
    (a ``datetime.timedelta``) bounds each collective's wait, default torch's."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))
        gpus = torch.cuda.device_count()
        if per_node > gpus:  # every rank says so: no rank is left waiting for the others
            raise UsageError(
                f"torchrun started {per_node} processes on this node but {gpus} GPU(s) are "
                f"visible; DDP on CUDA (NCCL) needs one GPU per process: use "
                f"--nproc_per_node {gpus} or fewer, or --device cpu (gloo)"
            )
    created = False
    if not dist.is_initialized():
        _import_dynamo()
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            init_method="env://",
            **({"timeout": timeout} if timeout is not None else {}),
        )
        created = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, created)


def _import_dynamo() -> None:
    """Import torch._dynamo before the group exists, not at the first optimizer (torch.optim
    imports it): imported while a group exists, it takes references to the group that
    ``destroy_process_group`` leaves, so the group was never freed and gloo's threads and sockets
    lived on into the interpreter's exit, the state in which ranks were seen to die by SIGABRT
    ("terminate called without an active exception"; benchmarks/results/teardown.md)."""
    with contextlib.suppress(Exception):  # a torch without it: nothing holds the group
        importlib.import_module("torch._dynamo")


def teardown(info: DistInfo, settle: bool = False) -> None:
    """Leave the process group. ``settle`` when every rank leaves at the same point (after the
    same exchange): the ranks first meet at a barrier, so that none tears its connections down
    while another still works with them (benchmarks/results/teardown.md)."""
    if not (info.created and dist.is_initialized()):
        return
    try:
        if settle and info.world_size > 1:
            _settle()
    finally:
        dist.destroy_process_group()


def _settle() -> None:
    """A barrier bounded by ``SETTLE_TIMEOUT``; a rank gone by then is torchrun's to report."""
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=SETTLE_TIMEOUT, wait_all_ranks=True)
        else:
            dist.barrier()
    except RankFailure:  # Stopped, by torchrun's SIGTERM: this rank stops too
        raise
    except Exception:  # noqa: BLE001 (every result is in: leave without the missing rank)
        pass


def barrier() -> None:
    if active():
        with _exchange():
            dist.barrier()


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum in place across processes."""
    if active():
        with _exchange():
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average in place across processes."""
    if active():
        with _exchange():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def broadcast_(*tensors: torch.Tensor, src: int = 0) -> None:
    """Copy rank ``src``'s tensors to every process."""
    if active():
        with _exchange():
            for t in tensors:
                dist.broadcast(t, src=src)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every process's rows ``t`` (n_rank, *shape) concatenated in rank order (rank 0's first);
    ``t`` itself in a single process.

    Row counts may differ between ranks, zero included: each rank's rows are padded to the
    largest count for one ``all_gather`` and cut back after it (on the current CUDA device
    under NCCL, on the CPU under gloo; the result is on ``t``'s device). Ranks that hold rows
    must agree on the row shape and dtype, else every rank raises the same ``UsageError``."""
    if not active():
        return t
    meta = all_gather_object((int(t.shape[0]) if t.ndim else 0, tuple(t.shape[1:]), t.dtype))
    kinds = {(shape, dtype) for n, shape, dtype in meta if n > 0}
    if len(kinds) > 1:
        held = ", ".join(f"rank {r}: {list(s)} {d}" for r, (n, s, d) in enumerate(meta) if n)
        raise UsageError(f"ranks hold rows of different shapes or dtypes ({held})")
    if not kinds:
        return t
    shape, dtype = kinds.pop()
    counts = [n for n, _, _ in meta]
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    padded = torch.zeros((max(counts), *shape), dtype=dtype, device=device)
    if counts[dist.get_rank()]:
        padded[: counts[dist.get_rank()]] = t.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    with _exchange():
        dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)]).to(t.device)


def all_gather_object(obj: object) -> list:
    """Every process's ``obj`` (one entry per rank)."""
    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    with _exchange():
        dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every process (e.g. an error message, so all ranks stop together)."""
    if not active():
        return obj
    box = [obj]
    with _exchange():
        dist.broadcast_object_list(box, src=src)
    return box[0]


# --- exchanges that carry errors -----------------------------------------------------------


class RankFailure(UsageError):
    """An error raised on one rank, re-raised on every rank at an exchange (one-line message)."""

    def __init__(self, message: str, usage: bool, rank: int, shared: bool = True):
        super().__init__(message)
        self.usage, self.rank, self.shared = usage, rank, shared


class Stopped(RankFailure):
    """This rank stopped because another process of the launch died (killed, out of memory) or
    torchrun stopped the launch: every surviving rank says so itself (not shared), exit 2."""

    def __init__(self, message: str, rank: int):
        super().__init__(message, usage=True, rank=rank, shared=False)


def stopped(rank: int, world_size: int, broke: str | None = None) -> Stopped:
    """The one line of rank ``rank`` stopping because another rank died: ``broke``, the error of
    an exchange with it that broke; None on torchrun's SIGTERM (its agent sends it to the
    survivors once it has seen a process die, or when the launch is interrupted)."""
    other = f"rank {1 - rank} of 2" if world_size == 2 else "another rank"
    here = f"rank {rank} of {world_size}"
    if broke is None:
        why = f"torchrun stopped {here} (SIGTERM): {other} died, or the launch was interrupted"
    else:
        cause = broke.split("] ", 1)[-1].split(". ")[0]  # gloo: "[file:line] what. advice"
        why = f"{here} lost {other} mid-exchange ({cause}): it died (killed, out of memory?)"
    tail = "torchrun's summary names the cause; no result was written, the rerun resumes"
    return Stopped(f"stopped: {why}; {tail}", -1)


@contextlib.contextmanager
def stop_when_a_rank_dies(info: DistInfo) -> Iterator[None]:
    """For code whose collectives are not ``Group`` exchanges (the trainer's DDP): torchrun's
    SIGTERM (``stop_on_sigterm``), or a collective that broke in the backend (gloo, NCCL)
    because a rank died, become ``Stopped``: one line, exit 2. No-op in a single process."""
    if info.world_size <= 1:
        yield
        return
    with stop_on_sigterm(info):
        try:
            yield
        except RuntimeError as e:
            text = str(e)
            if not (isinstance(e, dist.DistError) or "gloo" in text or "NCCL" in text):
                raise  # ours, not the backend's
            raise stopped(info.rank, info.world_size, text or type(e).__name__) from e


@contextlib.contextmanager
def _exchange() -> Iterator[None]:
    """Around a collective: the error of one that broke (a rank gone) becomes ``Stopped``."""
    try:
        yield
    except RuntimeError as e:  # gloo's "Connection reset by peer", NCCL's, a timeout
        raise stopped(dist.get_rank(), dist.get_world_size(), str(e) or type(e).__name__) from e


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
        try:
            payload: tuple = ("ok", fn())
        except RankFailure:  # learnt at an exchange inside fn, as every rank did, or this rank
            raise  # is stopping (Stopped): no more exchanges; all of them unwind
        except Exception as e:  # noqa: BLE001 (shipped to every rank, re-raised there)
            usage = isinstance(e, UsageError) and getattr(e, "usage", True)
            text = str(e) if usage else f"{type(e).__name__}: {e}"
            payload = ("error", " ".join(text.split()), usage)
        out: list = [None] * self.world_size
        with _exchange():
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
    if not active():
        return None
    return Group(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def describe(group: Group | None) -> dict[str, Any]:
    return {
        "world_size": 1 if group is None else group.world_size,
        "backend": None if group is None else group.backend,
    }


@contextlib.contextmanager
def session(device: str) -> Iterator[Group | None]:
    """Join the process group when launched by torchrun with ``WORLD_SIZE > 1`` (gloo on CPU,
    NCCL on CUDA), and leave it afterwards; yields the group, or None in a single process.

    A rank that dies makes the others stop with one line (``Stopped``) and exit status 2, within
    torchrun's monitor interval: an exchange with it breaks, or torchrun's SIGTERM arrives. Ranks
    that finish (or fail at the same exchange) leave together, through a barrier."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    # ranks wait at exchanges while others work (e.g. the evaluation of fewer seeds than
    # ranks), longer than torch's default timeouts (NCCL's 10 min); a rank that dies is
    # torchrun's to notice, which then stops the others
    info = setup(resolve_device(device).type, timeout=datetime.timedelta(hours=24))
    with stop_on_sigterm(info):
        settle = False
        try:
            yield current()
            settle = True
        except RankFailure as e:
            settle = e.shared  # every rank raised it at the same exchange
            raise
        finally:
            teardown(info, settle=settle)


@contextlib.contextmanager
def stop_on_sigterm(info: DistInfo) -> Iterator[None]:
    """Make torchrun's SIGTERM raise ``Stopped`` (a line, exit 2) rather than kill silently.
    Once this rank is stopping, later SIGTERMs are ignored, so that it ends with its own status
    (torchrun still kills it 30 s on)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise stopped(info.rank, info.world_size)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except BaseException:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def progress(quiet: bool = False) -> bool:
    """Progress bars unless ``quiet``; under torchrun on rank 0 only."""
    group = current()
    return not quiet and (group is None or group.is_main)


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


# --- dealing work to ranks --------------------------------------------------------------------


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


def shard_rows(n: int, batch_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s rows: a contiguous run of whole batches of ``batch_size``."""
    batches = -(-n // batch_size)
    lo, hi = batches * rank // world_size, batches * (rank + 1) // world_size
    return min(n, lo * batch_size), min(n, hi * batch_size)
