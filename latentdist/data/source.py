"""``DataSource``: a validated array of samples that may live on disk (memory-mapped).

Everything downstream (encoding, fitting, evaluation) reads samples through ``take`` and
``batches`` so a large ``.npy`` file is streamed, never copied into memory whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from latentdist.errors import UsageError

_CHECK_ROWS = 4096  # rows per chunk when scanning a memory-mapped file for NaN/Inf


@dataclass
class DataSource:
    """Samples ``array[i]`` of shape ``sample_shape``; ``kind`` is ``"images"`` (C, H, W) or ``"vectors"``."""

    name: str
    array: np.ndarray  # possibly an np.memmap
    kind: str = "vectors"
    scale: tuple[float, float] | None = None  # (offset, factor): value = (raw - offset) * factor
    labels: np.ndarray | None = None  # class labels, when the data set has them (built-ins do)

    def __post_init__(self) -> None:
        if self.array.ndim < 1 or len(self.array) == 0:
            raise UsageError(f"{self.name}: no samples (empty array)")
        if self.array.dtype.kind not in "biuf":
            raise UsageError(f"{self.name}: expected a numeric array, got dtype {self.array.dtype}")
        if self.array.dtype.kind == "f":
            for start in range(0, len(self.array), _CHECK_ROWS):
                if not np.isfinite(self.array[start : start + _CHECK_ROWS]).all():
                    raise UsageError(f"{self.name}: contains NaN or Inf values")

    def __len__(self) -> int:
        return len(self.array)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    @property
    def is_integer(self) -> bool:
        """True for integer-valued arrays (e.g. VQ code indices)."""
        return self.array.dtype.kind in "biu"

    def take(self, index: np.ndarray | slice | None = None) -> torch.Tensor:
        """Rows ``index`` (all when None) as a float32 tensor, scaled if the source says so."""
        rows = self.array if index is None else self.array[index]
        out = torch.from_numpy(np.array(rows, dtype=np.float32))  # a copy: memmaps are read-only
        if self.scale is not None:
            offset, factor = self.scale
            out = (out - offset) * factor
        return out

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive float32 batches over all rows (streams memory-mapped files)."""
        for start in range(0, len(self), batch_size):
            yield self.take(slice(start, start + batch_size))

    def fingerprint(self) -> str:
        """A short content hash (shape, dtype and a strided sample of rows): cheap on huge files."""
        h = hashlib.sha256(f"{self.array.shape}{self.array.dtype}{self.scale}".encode())
        step = max(1, len(self) // 256)
        chunk = step * _CHECK_ROWS // 64  # the strided rows, read a few at a time (same hash)
        for start in range(0, len(self), chunk):
            h.update(np.ascontiguousarray(self.array[start : start + chunk : step]).tobytes())
        return h.hexdigest()[:16]
