"""``measure`` and ``compare`` under ``torchrun``: a sweep's work split across processes.

PyTorch's own runtime does the launching (``torchrun``, single- or multi-node rendezvous) and the
communication (``torch.distributed``: gloo on CPU, NCCL on CUDA); there is no scheduler here.
With ``WORLD_SIZE > 1`` the command joins the process group (``latentdist.parallel``),
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

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from latentdist.data.source import DataSource
from latentdist.errors import UsageError
from latentdist.estimator.config import default_fit_batch
from latentdist.generators.modules import count_params, make_generator
from latentdist.parallel import current, shard_rows, split_contiguous

# --- planning ----------------------------------------------------------------------------------


def member_cost(
    cfg: Any, capacity: int | None, latent_shape: Sequence[int], data_shape: Sequence[int]
) -> float:
    """Relative cost of fitting one member: forward and backward through its parameters, plus
    the fit's loss, which costs about B data dimensions per sample (the B x B kernel or cost
    matrix, computed per member)."""
    with torch.device("meta"):
        g = make_generator(
            cfg.generator, tuple(latent_shape), tuple(data_shape), capacity, cfg.depth
        )
    batch = default_fit_batch(data_shape) if cfg.batch_size is None else cfg.batch_size
    return 3.0 * count_params(g) + 2.0 * batch * float(np.prod(data_shape))


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


def _shard(source: Any, start: int, stop: int) -> Any:
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
