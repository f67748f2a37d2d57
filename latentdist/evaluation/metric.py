"""Metric objects for training loops, in the style of torchmetrics: ``update``, ``compute``, ``reset``.

Both objects only collect rows; ``compute`` hands them to the function the command line runs, so
a value is the command line's on the same rows and settings (tests/test_metric.py checks it):

* ``SampleDistanceMetric``: ``update(real=...)`` / ``update(fake=...)`` collect reference rows
  and generated samples; ``compute()`` is ``sample_distance(fake, real, **settings)``
  (``latentdist distance FAKE --data REAL``): the distance with its floor and 95 % intervals
  over seeds, a ``DistanceResult``.
* ``LatentSignalsMetric``: ``update(latents)`` or ``update(latents, data)`` collect latents (and
  the data they encode); ``compute()`` is the cheap latent signals of the predictive study
  (docs/concepts.md, *Does the score predict generation?*): the latent's geometry and
  diffusability diagnostics exactly as ``latentdist measure`` reports them under ``latent`` and
  ``diagnostics`` in measure.json (``estimator.summary.describe_latent``), a ``LatentSignals``.

Rows are kept on the CPU as float32, in the order they were given, up to ``max_rows`` per kind
(a ``UsageError`` beyond it: the memory is rows x row size x 4 bytes). Under DDP
(``torch.distributed`` initialised with more than one process) ``compute()`` first gathers every
rank's rows (``parallel.all_gather_rows``: counts may differ, rank 0's rows first), computes once
on rank 0 and gives every rank that value (``parallel.on_main``); an error on rank 0 is raised on
every rank. The value is the one a single process fed all rows in rank order computes.
``sync_on_compute=False`` computes each rank's own value instead, with no collective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from latentdist import parallel
from latentdist._io import to_json
from latentdist.data import DataSource
from latentdist.discrepancy import as_rows, resolve_metric
from latentdist.errors import UsageError
from latentdist.estimator.rows import head
from latentdist.estimator.summary import describe_latent
from latentdist.evaluation.distance import DistanceResult, sample_distance
from latentdist.report.compare import diagnostic_values

__all__ = [
    "DEFAULT_MAX_ROWS",
    "LatentSignals",
    "LatentSignalsMetric",
    "SampleDistanceMetric",
    "scalars",
]

#: Rows kept per kind (real, fake, latents) before ``update`` refuses more. ``sample_distance``
#: scores at most 1000 rows per seed and side by default (2000 reference rows with the floor),
#: the diagnostics subsample 2000 latents: 20 000 leaves room for larger ``n_eval`` and for the
#: fitting rows of the critic and learned features.
DEFAULT_MAX_ROWS = 20_000
#: Data rows the diagnostics read (their first rows, as ``measure`` passes them).
DATA_ROWS = 2000


class _Rows:
    """Batches of one kind of rows, copied to the CPU as float32 and checked as they come: one
    row shape, finite values, at most ``cap`` rows given; the first ``keep`` rows kept (all
    when None)."""

    def __init__(self, owner: str, what: str, cap: int | None, keep: int | None = None):
        self.owner, self.what, self.cap, self.keep = owner, what, cap, keep
        self.batches: list[torch.Tensor] = []
        self.count = 0  # rows given (more than are kept when ``keep`` truncates)

    def add(self, x: Any, like: _Rows | None = None, check: Callable | None = None) -> None:
        """Add the rows ``x``; their shape must be that of earlier rows and of ``like``'s, and
        ``check(rows)`` (which may raise) must pass before they are kept."""
        where = f"{self.owner}.update({self.what}=...)"
        t = as_rows(x, where, dtype=torch.float32, flat=False)
        for other, name in ((self, f"earlier {self.what}"), (like, f"the {like and like.what}")):
            expected = other.shape() if other is not None else None
            if expected is not None and tuple(t.shape[1:]) != expected:
                raise UsageError(
                    f"{where}: rows of shape {list(t.shape[1:])}, but {name} rows have shape "
                    f"{list(expected)}"
                )
        if self.cap is not None and self.count + len(t) > self.cap:
            raise UsageError(
                f"{where}: {self.count + len(t)} {self.what} rows would exceed "
                f"max_rows={self.cap}; call reset() after compute(), feed fewer rows, or raise "
                "max_rows"
            )
        if check is not None:
            check(t)
        self.count += len(t)
        if self.keep is not None:
            t = t[: max(0, self.keep - sum(len(b) for b in self.batches))]
        if len(t):
            self.batches.append(_own(t, x))

    def shape(self) -> tuple[int, ...] | None:
        return tuple(self.batches[0].shape[1:]) if self.batches else None

    def rows(self, sync: bool) -> torch.Tensor:
        """This process's rows, or (``sync``, under DDP) every rank's in rank order."""
        local = torch.cat(self.batches) if self.batches else torch.empty(0)
        return parallel.all_gather_rows(local) if sync else local

    def clear(self) -> None:
        self.batches, self.count = [], 0


def _own(t: torch.Tensor, x: Any) -> torch.Tensor:
    """``t``, copied when it shares memory with the caller's ``x`` (a float32 CPU tensor or
    array is taken as it is by ``as_rows``; a training loop may overwrite it later)."""
    if isinstance(x, torch.Tensor):
        shared = t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    else:
        shared = isinstance(x, np.ndarray) and np.shares_memory(t.numpy(), x)
    return t.clone() if shared else t


def _sync(flag: bool) -> bool:
    """Gather across ranks: asked for, and a process group of more than one process is active."""
    return flag and parallel.active()


class SampleDistanceMetric:
    """``sample_distance`` as a metric object: collect real and fake rows batch by batch, then
    ``compute()`` the distance of the fake rows to the real ones with its floor and intervals.

    Settings are those of ``sample_distance`` (and of ``latentdist distance``): ``metric``
    (default ``mmd``), ``n_eval`` (default min(1000, half the fake rows, what the real rows
    allow)), ``seeds`` (5; >= 2 for intervals), ``seed`` (the first), ``features``,
    ``feature_steps``, ``metric_kwargs``. ``max_rows``: rows kept per side (``DEFAULT_MAX_ROWS``;
    None for no cap). ``sync_on_compute``: under DDP, gather every rank's rows first (module
    docstring). Class labels of the real rows (``update(real=x, real_labels=y)``) go to a
    learned feature network as a built-in data set's labels do on the command line (fd, kid).

    >>> m = SampleDistanceMetric(n_eval=200, seeds=3)
    >>> for real, fake in batches:
    ...     m.update(real=real, fake=fake)
    >>> result = m.compute()  # a DistanceResult: result.report["distance"]["mean"], ...
    >>> m.reset()
    """

    def __init__(
        self,
        *,
        metric: str | None = None,
        n_eval: int | None = None,
        seeds: int = 5,
        seed: int = 0,
        features: Any = "auto",
        feature_steps: int = 300,
        metric_kwargs: dict[str, Any] | None = None,
        max_rows: int | None = DEFAULT_MAX_ROWS,
        sync_on_compute: bool = True,
    ) -> None:
        if metric is not None:
            resolve_metric(metric)  # an unknown name fails here, not at the first compute
        for name, value, low in (("seeds", seeds, 1), ("feature_steps", feature_steps, 1)):
            if not isinstance(value, int) or value < low:
                raise UsageError(
                    f"SampleDistanceMetric: {name}={value!r}, expected an int >= {low}"
                )
        if n_eval is not None and (not isinstance(n_eval, int) or n_eval < 2):
            raise UsageError(f"SampleDistanceMetric: n_eval={n_eval!r}, expected an int >= 2")
        _check_cap("SampleDistanceMetric", max_rows)
        self.settings: dict[str, Any] = dict(
            metric=metric, n_eval=n_eval, seeds=seeds, seed=seed, features=features,
            feature_steps=feature_steps, metric_kwargs=metric_kwargs,
        )  # fmt: skip
        self.max_rows, self.sync_on_compute = max_rows, sync_on_compute
        self._real = _Rows("SampleDistanceMetric", "real", max_rows)
        self._fake = _Rows("SampleDistanceMetric", "fake", max_rows)
        self._labels: list[torch.Tensor | None] = []  # per real batch, all or none

    def update(self, real: Any = None, fake: Any = None, *, real_labels: Any = None) -> None:
        """Add a batch of reference rows (``real``) and/or generated rows (``fake``): tensors or
        arrays (n, ...) with one row shape for both sides; copied to the CPU as float32.
        ``real_labels``: integer class labels of the ``real`` rows (n,), with every real batch
        or none."""
        if real is None and fake is None:
            raise UsageError("SampleDistanceMetric.update: give real=... and/or fake=...")
        if real is not None:
            before = self._labels[0] if self._labels else False
            labels: list = []
            self._real.add(
                real,
                like=self._fake,
                check=lambda t: labels.append(_labels(real_labels, len(t), before)),
            )
            self._labels.append(labels[0])
        elif real_labels is not None:
            raise UsageError("SampleDistanceMetric.update: real_labels=... needs real=...")
        if fake is not None:
            self._fake.add(fake, like=self._real)

    @property
    def rows(self) -> dict[str, int]:
        """Rows given on this process so far, per side."""
        return {"real": self._real.count, "fake": self._fake.count}

    def compute(self) -> DistanceResult:
        """``sample_distance(fake rows, real rows, **settings)`` on every row given since the
        last ``reset`` (every rank's under DDP, rank 0's first): a ``DistanceResult``."""
        sync = _sync(self.sync_on_compute)
        real, fake = self._real.rows(sync), self._fake.rows(sync)
        for what, t in (("real", real), ("fake", fake)):
            if len(t) == 0:
                where = " on any rank" if sync else ""
                raise UsageError(
                    f"SampleDistanceMetric.compute: no {what} rows{where}; call "
                    f"update({what}=...) first"
                )
        reference = _with_labels(real, self._labels, sync)
        settings = self.settings
        if sync:
            return parallel.on_main(lambda: sample_distance(fake, reference, **settings))
        return sample_distance(fake, reference, **settings)

    def reset(self) -> None:
        """Forget every row (the settings stay)."""
        self._real.clear()
        self._fake.clear()
        self._labels = []


def _labels(labels: Any, n: int, before: torch.Tensor | bool | None) -> torch.Tensor | None:
    """``labels`` of a real batch of ``n`` rows as int64 (n,), checked: integers, one per row,
    given with every batch or none (``before``: the first batch's labels, False if none yet)."""
    where = "SampleDistanceMetric.update(real_labels=...)"
    if before is not False and (labels is None) != (before is None):
        raise UsageError(f"{where}: give labels with every real batch or with none")
    if labels is None:
        return None
    a = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if a.shape != (n,) or a.dtype.kind not in "biu":
        raise UsageError(
            f"{where}: expected {n} integer labels (one per real row), got shape "
            f"{list(a.shape)} of dtype {a.dtype}"
        )
    return torch.from_numpy(a.astype(np.int64))


def _with_labels(real: torch.Tensor, labels: list, sync: bool) -> Any:
    """The real rows, as a DataSource carrying their labels when they came with labels (what
    ``sample_distance`` passes to a learned feature network), else as they are."""
    given = [t for t in labels if t is not None]
    local = torch.cat(given) if given else torch.empty(0, dtype=torch.long)
    gathered = parallel.all_gather_rows(local) if sync else local
    if len(gathered) == 0:
        return real
    if len(gathered) != len(real):
        raise UsageError(
            f"SampleDistanceMetric.compute: {len(gathered)} real labels for {len(real)} real "
            "rows (labels given on some ranks only)"
        )
    kind = "images" if real.ndim == 4 else "vectors"
    return DataSource("<reference array>", real.numpy(), kind=kind, labels=gathered.numpy())


def _check_cap(owner: str, max_rows: int | None) -> None:
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise UsageError(f"{owner}: max_rows={max_rows!r}, expected an int >= 1 or None")


@dataclass
class LatentSignals:
    """The outcome of ``LatentSignalsMetric.compute``.

    ``latent`` and ``diagnostics``: what ``latentdist measure`` reports under those keys in
    measure.json (geometry: intrinsic dimension, effective rank, variance spectrum, codebook
    usage; diagnostics: spectrum, equivariance, statistics, modes). ``signals``: their scalars,
    flat, keyed as in the predictive study (``report.compare.diagnostic_values``) plus
    ``effective_rank``, ``intrinsic_dim_twonn``, ``intrinsic_dim_mle`` and, for codes,
    ``codebook_perplexity`` and ``codebook_dead_fraction``; what could not be computed is left
    out."""

    latent: dict[str, Any]
    diagnostics: dict[str, Any]
    signals: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"latent": self.latent, "diagnostics": self.diagnostics, "signals": self.signals}

    def to_json(self, indent: int | None = 2) -> str:
        return to_json(self.to_dict(), indent)


def _signals(latent: dict[str, Any], diagnostics: dict[str, Any]) -> dict[str, float]:
    """The scalar signals of ``LatentSignals`` (its docstring), finite or not, None left out."""
    out = {k: float(v) for k, v in diagnostic_values(diagnostics).items() if v is not None}
    out["effective_rank"] = float(latent["effective_rank"])
    for k in ("twonn", "mle"):
        if latent.get("intrinsic_dim"):
            out[f"intrinsic_dim_{k}"] = float(latent["intrinsic_dim"][k])
    if latent.get("codebook"):
        out["codebook_perplexity"] = float(latent["codebook"]["perplexity"])
        out["codebook_dead_fraction"] = float(latent["codebook"]["dead_fraction"])
    return out


class LatentSignalsMetric:
    """The cheap latent signals as a metric object: collect latents (and the data they encode)
    batch by batch, then ``compute()`` the latent's geometry and diagnostics.

    ``update(latents)`` or ``update(latents, data)``: latents (n, ...) and, for the spectrum and
    the equivariance errors, image data (m, C, H, W) (the first ``DATA_ROWS`` data rows are
    kept: all the diagnostics read, as in ``measure``). ``encoder``: a callable from data to
    latents, for the equivariance errors (a module runs on its own device, in the mode the
    caller left it in; under DDP pass the module inside the DDP wrapper, since only rank 0
    calls it); ``codebook`` (K, C) or ``is_integer``: codebook usage
    of vector-quantised latents; ``seed``: the diagnostics' subsampling (``measure``'s
    ``--seed``). ``max_rows``, ``sync_on_compute``: as ``SampleDistanceMetric``'s.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        encoder: Any = None,
        codebook: Any = None,
        is_integer: bool = False,
        max_rows: int | None = DEFAULT_MAX_ROWS,
        sync_on_compute: bool = True,
    ) -> None:
        _check_cap("LatentSignalsMetric", max_rows)
        self.seed, self.encoder, self.codebook = seed, _on_its_device(encoder), codebook
        self.is_integer = is_integer
        self.max_rows, self.sync_on_compute = max_rows, sync_on_compute
        self._latents = _Rows("LatentSignalsMetric", "latents", max_rows)
        self._data = _Rows("LatentSignalsMetric", "data", None, keep=DATA_ROWS)

    def update(self, latents: Any, data: Any = None) -> None:
        """Add a batch of latents (n, ...) and, optionally, data rows (any count)."""
        self._latents.add(latents)
        if data is not None:
            self._data.add(data)

    @property
    def rows(self) -> dict[str, int]:
        """Rows given on this process so far: latents, and data (of which ``DATA_ROWS`` kept)."""
        return {"latents": self._latents.count, "data": self._data.count}

    def compute(self) -> LatentSignals:
        """``describe_latent`` (as ``measure`` runs it) on every latent given since the last
        ``reset`` and the first ``DATA_ROWS`` data rows (every rank's under DDP, rank 0's
        first): a ``LatentSignals``."""
        sync = _sync(self.sync_on_compute)
        z, x = self._latents.rows(sync), self._data.rows(sync)
        if len(z) < 3:
            where = " on all ranks together" if sync else ""
            raise UsageError(
                f"LatentSignalsMetric.compute: {len(z)} latent rows{where}; needs at least 3 "
                "(call update(latents) first)"
            )
        x_head = head(x, DATA_ROWS) if len(x) else None

        def run() -> LatentSignals:
            latent, diagnostics = describe_latent(
                z, x_head, self.codebook, self.encoder, self.is_integer, self.seed
            )
            return LatentSignals(latent, diagnostics, _signals(latent, diagnostics))

        return parallel.on_main(run) if sync else run()

    def reset(self) -> None:
        """Forget every latent and data row (the settings stay)."""
        self._latents.clear()
        self._data.clear()


def _on_its_device(encoder: Any) -> Any:
    """A module ``encoder`` as a callable that takes CPU batches: each runs on the device of the
    module's first parameter, without autograd, and comes back as float32 on the CPU (as
    ``measure``'s encoder does). Its mode (train/eval) is left as the caller set it."""
    if not isinstance(encoder, torch.nn.Module):
        return encoder

    def run(x: torch.Tensor) -> torch.Tensor:
        param = next(encoder.parameters(), None)
        device = x.device if param is None else param.device
        with torch.no_grad():
            return encoder(x.to(device)).detach().to("cpu", torch.float32)

    return run


def scalars(result: DistanceResult | LatentSignals, prefix: str = "") -> dict[str, float]:
    """The numbers of a result as a flat dict for a logger (``self.log_dict`` in Lightning,
    TensorBoard's ``add_scalar``), keys prefixed by ``prefix``.

    A ``DistanceResult``: ``distance``, ``floor`` and ``excess`` (distance - floor, seed by seed),
    each with ``_lo`` / ``_hi``, the bounds of its 95 % interval (absent with one seed). A
    ``LatentSignals``: its ``signals``. Non-finite values are kept (a logger may drop them)."""
    if isinstance(result, LatentSignals):
        return {prefix + k: v for k, v in result.signals.items()}
    out: dict[str, float] = {}
    for key in ("distance", "floor", "excess"):
        stat = result.report[key]
        out[prefix + key] = float(stat["mean"])
        if stat.get("ci"):
            out[f"{prefix}{key}_lo"], out[f"{prefix}{key}_hi"] = map(float, stat["ci"])
    return out
