"""The trainer's data: the checked source, its seeded split, normalisation statistics and the
batch order.

Data order: global batch ``t`` holds samples ``[t B, (t + 1) B)`` of the endless concatenation of
per-epoch permutations ``default_rng([seed, epoch]).permutation(n_train)``; process ``r`` of ``W``
takes the ``r``-th of ``W`` equal slices (a DistributedSampler over the global batch). The order is
therefore a function of the step alone, which makes resuming exact.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from latentdist.dae.config import TrainConfig, default_batch_size
from latentdist.dae.models import Affine, streamed_statistics
from latentdist.data import DataSource, ImageOptions, load_data
from latentdist.errors import UsageError

_PRELOAD_BYTES = 2 << 30  # keep the training split in (device) memory below this size
_STATISTICS_ROWS = 10000  # training rows (evenly spaced) behind the normalisation statistics


def split_indices(n: int, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded hold-out split: ``p = default_rng(split_seed).permutation(n)``; the last
    ``round(n * val_fraction)`` of ``p`` (sorted) are validation, the rest (sorted) training."""
    perm = np.random.default_rng(split_seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[: n - n_val]), np.sort(perm[n - n_val :])


def validate_data(config: TrainConfig, src: DataSource) -> None:
    """Refuse data the configured networks and losses cannot take (one line naming the flag)."""
    shape = src.sample_shape
    if src.kind == "images":
        if len(shape) != 3:
            raise UsageError(
                f"--data {config.data}: images must be (N, C, H, W), got {(len(src),) + shape}"
            )
    else:
        if config.disc_weight > 0:
            raise UsageError("--disc-weight: the patch discriminator needs image data (N, C, H, W)")
        if config.perceptual:
            raise UsageError("--perceptual: a perceptual loss needs image data (N, C, H, W)")


def load_training_data(config: TrainConfig, world_size: int) -> tuple[TrainConfig, DataSource]:
    """Load and check ``--data``; return the config with its batch size resolved, and the source.

    The default batch is resolved once here, so the run's config records the number.
    """
    src = load_data(
        config.data,
        trust_pickle=config.trust_pickle,
        image=ImageOptions(config.channels, config.resize),
    )
    validate_data(config, src)
    if config.batch_size is None:
        config = replace(config, batch_size=default_batch_size(src.sample_shape, world_size))
    if config.batch_size % world_size:
        raise UsageError(
            f"--batch-size {config.batch_size}: must be divisible by the {world_size} processes"
        )
    return config, src


def training_split(config: TrainConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``split_indices`` of the config; a split that leaves no training rows is a usage error."""
    train_idx, val_idx = split_indices(n, config.val_fraction, config.split_seed)
    if len(train_idx) == 0:
        raise UsageError(f"--val-fraction {config.val_fraction}: leaves no training samples")
    return train_idx, val_idx


def normalization_statistics(
    src: DataSource, train_idx: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift and scale of ``Affine`` from up to 10,000 evenly spaced training rows, streamed in
    chunks that fit the preload budget."""
    stat_idx = train_idx[
        np.linspace(0, len(train_idx) - 1, min(len(train_idx), _STATISTICS_ROWS)).astype(np.int64)
    ]
    row_bytes = math.prod(src.sample_shape) * 8
    return streamed_statistics(
        src.take, np.unique(stat_idx), src.kind, max(1, (_PRELOAD_BYTES // 8) // row_bytes)
    )


class BatchStream:
    """Global batch ``t`` = samples ``[tB, (t+1)B)`` of concatenated seeded epoch permutations."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._cache[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        start, parts = step * self.batch, []
        end = start + self.batch
        while start < end:
            epoch, pos = divmod(start, self.n)
            take = min(end - start, self.n - pos)
            parts.append(self._perm(epoch)[pos : pos + take])
            start += take
        return np.concatenate(parts)

    def local_indices(self, step: int) -> np.ndarray:
        b = self.batch // self.world
        return self.global_indices(step)[self.rank * b : (self.rank + 1) * b]

    def state(self, step: int) -> dict:
        epoch, pos = divmod(step * self.batch, self.n)
        return {"seed": self.seed, "epoch": epoch, "position": pos, "global_batch": self.batch}


class TrainData:
    """The training split, normalised, in memory when small enough (else read per batch)."""

    def __init__(
        self,
        src: DataSource,
        idx: np.ndarray,
        normalize: Affine,
        device: torch.device,
        channels_last: bool,
    ):
        self.src, self.idx, self.normalize, self.device = src, idx, normalize, device
        self.channels_last = channels_last
        self.tensor = None
        if len(idx) * math.prod(src.sample_shape) * 4 <= _PRELOAD_BYTES:
            with torch.no_grad():  # normalize's buffers live on ``device``: move, then map
                self.tensor = normalize(src.take(idx).to(device))

    def __call__(self, local: np.ndarray) -> torch.Tensor:
        if self.tensor is not None:
            x = self.tensor[torch.from_numpy(local).to(self.device)]
        else:
            with torch.no_grad():
                x = self.normalize(
                    self.src.take(self.idx[local]).to(self.device, non_blocking=True)
                )
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
