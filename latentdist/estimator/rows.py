"""The rows a measurement reads: validated inputs, the rows its splits use, read on demand.

``measure`` normally loads the rows its splits use (up to ``max_train_rows`` training rows plus
the held-out ones) into one float32 block. When that block would not fit in the memory this
process may use, it keeps a ``LazyRows`` instead: indexing it with a tensor of row positions
reads just those rows from the source (a memory-mapped array, a lazily decoded image folder), so
each fitting step reads its minibatches, and the held-out rows are read once per evaluation. The
values are those the block would hold (the same ``take``), so the result is the same.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from latentdist.discrepancy import as_rows

# stream when the block would take more than this fraction of the memory available to this
# process (MemAvailable shared among the processes torchrun started on this node)
MEMORY_FRACTION = 0.5


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), shared by this node's torchrun processes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    kib = int(line.split()[1])
                    break
            else:
                return None
    except OSError:
        return None
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return kib * 1024 // max(1, per_node)


def should_stream(n_rows: int, sample_shape: tuple[int, ...], budget: int | None = None) -> bool:
    """True when ``n_rows`` float32 rows would exceed ``MEMORY_FRACTION`` of ``budget`` bytes
    (default: ``available_bytes()``; never when it is unknown). ``LATENTDIST_STREAM_ROWS=1``
    forces streaming and ``=0`` forbids it."""
    forced = os.environ.get("LATENTDIST_STREAM_ROWS")
    if forced in ("0", "1"):
        return forced == "1"
    budget = available_bytes() if budget is None else budget
    if budget is None:
        return False
    return n_rows * int(np.prod(sample_shape)) * 4 > MEMORY_FRACTION * budget


class LazyRows:
    """Rows ``rows`` of ``source`` (a DataSource) as a read-on-demand float32 array.

    ``lazy[idx]`` with a tensor of positions of any shape returns ``(*idx.shape, *sample)`` on
    ``device``; ``shape``, ``len`` and ``to(device)`` are those of the block it stands for.
    """

    def __init__(self, source: Any, rows: torch.Tensor, device: Any = "cpu"):
        self.source, self.rows, self.device = source, rows, torch.device(device)
        self.shape = torch.Size((len(rows), *source.sample_shape))
        self.dtype = torch.float32

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device: Any) -> LazyRows:
        return LazyRows(self.source, self.rows, device)

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        idx = torch.as_tensor(index).to("cpu", torch.long)
        flat = self.rows[idx.reshape(-1)].numpy()
        unique, inverse = np.unique(flat, return_inverse=True)  # sorted: sequential reads
        block = self.source.take(unique)
        out = block[torch.from_numpy(inverse.reshape(-1))]
        return out.reshape(*idx.shape, *self.shape[1:]).to(self.device)


def is_source(x: Any) -> bool:
    """True for a DataSource (maybe memory-mapped, maybe a lazily decoded image folder)."""
    return hasattr(x, "take") and hasattr(x, "sample_shape")


def as_input(x: Any, what: str) -> Any:
    """A DataSource as it is; anything else as float32 rows, non-empty and finite."""
    if is_source(x):
        return x
    return as_rows(x, what, dtype=torch.float32, flat=False, device=None)


def sample_shape(x: Any) -> tuple[int, ...]:
    return tuple(x.sample_shape if is_source(x) else x.shape[1:])


def used_rows(splits: list, fields: tuple[str, ...]) -> torch.Tensor:
    """The sorted row indices that the splits' ``fields`` use."""
    return torch.unique(torch.cat([getattr(sp, f) for sp in splits for f in fields]))


def _renumber(n: int, splits: list, fields: tuple[str, ...], rows: torch.Tensor) -> None:
    """Replace the splits' ``fields`` (indices into ``n`` rows) by positions within ``rows``."""
    position = torch.full((n,), -1, dtype=torch.long)
    position[rows] = torch.arange(len(rows))
    for sp in splits:
        for f in fields:
            setattr(sp, f, position[getattr(sp, f)])


def gather(source: Any, splits: list, fields: tuple[str, ...], rows: torch.Tensor | None = None):
    """Load only the rows the splits use (a large memory-mapped file is never read whole) and
    renumber the splits' ``fields`` into the loaded block. ``rows`` fixes the row set, so that
    latents and data loaded with the same rows stay aligned (paired fitting relies on it)."""
    if rows is None:
        rows = used_rows(splits, fields)
    block = source.take(rows.numpy()) if is_source(source) else source[rows]
    _renumber(len(source), splits, fields, rows)
    return block


def gather_lazy(source: Any, splits: list, fields: tuple[str, ...], rows: torch.Tensor | None):
    """As ``gather``, but the rows stay where they are: the splits' ``fields`` are renumbered
    into positions of a ``LazyRows``."""
    if rows is None:
        rows = used_rows(splits, fields)
    _renumber(len(source), splits, fields, rows)
    return LazyRows(source, rows)


def gather_or_stream(source: Any, splits: list, fields: tuple[str, ...], rows=None):
    """``gather``, or a ``LazyRows`` when ``source`` is a DataSource whose rows would not fit
    in memory (``should_stream``)."""
    if rows is None:
        rows = used_rows(splits, fields)
    if is_source(source) and should_stream(len(rows), tuple(source.sample_shape)):
        return gather_lazy(source, splits, fields, rows)
    return gather(source, splits, fields, rows)


def subsample(rows: torch.Tensor, cap: int, seed: int) -> torch.Tensor:
    """At most ``cap`` of ``rows``, a random choice fixed by ``seed``."""
    if len(rows) <= cap:
        return rows
    g = torch.Generator().manual_seed(seed)
    return rows[torch.randperm(len(rows), generator=g)[:cap]]


def is_lazy(x: Any) -> bool:
    return isinstance(x, LazyRows)


def head(x: Any, n: int = 2000) -> Any:
    """The first ``n`` rows as a tensor: all the diagnostics read of the data (their ``n_max``
    first rows, 2000), without the float64 copy of every row they would otherwise make."""
    return x[: min(n, len(x))]
