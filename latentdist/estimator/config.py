"""The settings of a measurement: ``MeasureConfig`` and the rules that fill in its defaults.

A config is frozen. ``validate`` returns a normalised copy (or raises one ``UsageError`` naming
the flag); ``resolve`` returns the copy the measurement runs with once the shapes are known
(``--generator auto`` replaced by a family, the family's default capacities and learning rate).
So a caller's config is never changed by measuring with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from latentdist._shapes import pixel_budget_batch
from latentdist.device import resolve_device
from latentdist.discrepancy import METRICS as ALL_METRICS
from latentdist.errors import UsageError
from latentdist.estimator.fit import FITS
from latentdist.generators.modules import (
    FAMILIES,
    count_params,
    make_generator,
    upsampling_factor,
)

METRICS = tuple(ALL_METRICS)
FIT_MEANING = {
    "mmd": "distributional: unpaired minibatch MMD^2 under the evaluation kernel (estimates D_c)",
    "ot": "distributional: unpaired minibatch optimal transport (estimates D_c)",
    "adversarial": "distributional: WGAN-GP critic game (estimates D_c)",
    "paired": "paired regression of x on its latent: the distance of the least-squares generator, an upper bound on D_c (at most the reconstruction error, reported as recon_rmse), not D_c",
}
SELECTION_MEANING = (
    "every fitted generator is an upper bound on D_c; per capacity and seed the reported one is "
    "the best on validation rows (disjoint from the evaluation rows) among: each fit's generator "
    "at this capacity (by_fit) and the one chosen at the next smaller capacity, which G_c "
    "contains (nesting). 'chosen' names the winner per seed. When latent and data rows "
    "correspond the paired fit runs first and the distributional fit starts from its generator "
    "where that generator explains the data (validation R^2 > 0.05, see paired_start)"
)
# geometric from 1, so that the sweep starts where the generator is clearly too small
# (benchmarks/results/capacity.md: the rank-limited mlp reaches the floor's band near 64 on
# MNIST-5k latents); ratio 4, not 2: a member costs about the same at every capacity, so this
# sweep costs ~4/7 of 1, 2, ..., 64, and V3, V4, V8 pass with it (docs/concepts.md)
DEFAULT_CAPACITIES = {"mlp": (1, 4, 16, 64), "conv": (4, 8, 16, 32), "linear": ()}
# how far the default sweep may extend (estimator.saturation.next_capacity): conv sweeps are
# not extended by default, since one more conv capacity costs minutes per seed on photographs
# (benchmarks/results/conv_cpu.md)
EXTEND_LIMIT = {"mlp": 256, "conv": 32, "linear": 0}
DEFAULT_LR = {"linear": 2e-2, "mlp": 2e-3, "conv": 2e-3}
GENERATORS = ("auto", *FAMILIES)
# --generator auto takes mlp while the linear map from latent to data has at most this many
# parameters: from a 4x63x63 latent to 250x250 images it has ~10^9
MLP_PARAMS_LIMIT = 10_000_000
# default fitting batch (default_fit_batch): FIT_BATCH rows up to FIT_BATCH_PIXELS pixels each
FIT_BATCH, FIT_BATCH_PIXELS, MIN_FIT_BATCH = 256, 32 * 32, 16


def choose_generator(
    latent_shape: tuple[int, ...],
    data_shape: tuple[int, ...],
    capacities: tuple[int, ...] | None = None,
    depth: int = 2,
) -> tuple[str, str]:
    """The family ``--generator auto`` measures with, and why: (family, reason).

    mlp when the linear map from latent to data, which the mlp's rank-limited skip grows towards,
    has at most ``MLP_PARAMS_LIMIT`` parameters (every vector latent and small images: the family
    the validity benchmark checked); conv when it would be larger and the latent is spatial
    (C×h×w to C'×H×W images: 96×96 and 250×250 photographs), since a conv generator's size does
    not grow with the image; mlp otherwise, whatever its size. ``capacities`` and ``depth``
    are accepted for callers of the earlier rule; the choice depends on the shapes alone.
    """
    widest = max(capacities or DEFAULT_CAPACITIES["mlp"])
    with torch.device("meta"):
        n = count_params(make_generator("linear", latent_shape, data_shape))
    if n <= MLP_PARAMS_LIMIT:
        return (
            "mlp",
            f"mlp: a {n:,}-parameter linear map (<= {MLP_PARAMS_LIMIT:,}); widest {widest}",
        )
    why = f"the linear map from latent to data has {n:,} parameters (> {MLP_PARAMS_LIMIT:,})"
    try:
        upsampling_factor(latent_shape, data_shape)
    except UsageError:
        return "mlp", f"mlp: {why}, and the latent is not spatial, so conv does not apply"
    return "conv", f"conv: {why}; the latent is spatial"


def default_fit_batch(data_shape: Sequence[int]) -> int:
    """256 rows, or for images of more than 32 x 32 pixels 256 * 1024 / (H * W) (at least 16):
    the pixels per step of a CIFAR-sized batch at every image size, so that a conv sweep on
    photographs finishes on a CPU (96 x 96: 28 rows; 250 x 250: 16). The rule of train-dae's
    default batch (``latentdist.dae.config.default_batch_size``)."""
    return pixel_budget_batch(tuple(data_shape), FIT_BATCH, FIT_BATCH_PIXELS, MIN_FIT_BATCH)


def _bad(flag: str, value: Any, expected: str) -> UsageError:
    return UsageError(f"--{flag} {value}: expected {expected}")


@dataclass(frozen=True)
class MeasureConfig:
    """Every setting of a measurement; ``validate`` checks them once (UsageError on nonsense)."""

    generator: str = "auto"  # choose_generator: mlp unless too large for spatial latents
    capacities: tuple[int, ...] | None = None  # None: the family's default sweep
    # the sweep doubles its largest capacity until the curve flattens, up to this; None: the
    # family's EXTEND_LIMIT for a default sweep, no extension for given capacities; 0: never
    max_capacity: int | None = None
    depth: int = 2
    metric: str = "mmd"  # the validity benchmark's choice (benchmarks/results/validity.md)
    fit: str = "mmd"
    select: bool = True  # best held-out bound over fits and nested capacities (SELECTION_MEANING)
    features: str | None = None  # fd/kid feature space: None/"identity", "learned" or a path
    seeds: int = 3
    n_eval: int | None = None  # None: default_n_eval(rows)
    steps: int = 400
    batch_size: int | None = None  # None: default_fit_batch(data shape)
    lr: float | None = None  # None: DEFAULT_LR[generator]
    device: str = "auto"
    epsilon: float | None = None  # None: the floor's upper confidence limit
    proxies: bool = True
    seed: int = 0
    max_train_rows: int = 100_000

    def validate(self) -> MeasureConfig:
        """This config checked, with its capacities sorted and the family's defaults filled in
        where the family is known (a copy; ``self`` is frozen)."""
        if self.generator not in GENERATORS:
            raise _bad("generator", self.generator, "one of " + ", ".join(GENERATORS))
        if self.metric not in METRICS:
            raise _bad("metric", self.metric, "one of " + ", ".join(METRICS))
        if self.fit not in FITS:
            raise _bad("fit", self.fit, "one of " + ", ".join(FITS))
        for flag, value, low in (
            ("depth", self.depth, 1),
            ("seeds", self.seeds, 1),
            ("steps", self.steps, 1),
            ("batch-size", 2 if self.batch_size is None else self.batch_size, 2),
        ):
            if int(value) < low:
                raise _bad(flag, value, f"an integer >= {low}")
        if self.max_capacity is not None and int(self.max_capacity) < 0:
            raise _bad("max-capacity", self.max_capacity, "an integer >= 0")
        if self.n_eval is not None and self.n_eval < 2:
            raise _bad("n-eval", self.n_eval, "an integer >= 2")
        lr = self.lr
        if lr is None and self.generator != "auto":
            lr = DEFAULT_LR[self.generator]
        if lr is not None and not (np.isfinite(lr) and lr > 0):
            raise _bad("lr", lr, "a positive number")
        if self.features not in (None, "identity", "learned") and not os.path.isfile(
            str(self.features)
        ):
            raise _bad("metric-features", self.features, "identity, learned or a TorchScript file")
        if self.epsilon is not None and not (np.isfinite(self.epsilon) and self.epsilon >= 0):
            raise _bad("epsilon", self.epsilon, "a non-negative number")
        resolve_device(self.device)
        limit = self.max_capacity
        if limit is None and self.generator != "auto":
            limit = EXTEND_LIMIT[self.generator] if self.capacities is None else 0
        return replace(self, capacities=self._checked_capacities(), lr=lr, max_capacity=limit)

    def _checked_capacities(self) -> tuple[int, ...] | None:
        if self.generator == "linear":
            return ()
        if self.capacities is None:
            return DEFAULT_CAPACITIES.get(self.generator)  # auto: once the shapes are known
        caps = tuple(int(c) for c in self.capacities)
        if not caps or any(c < 1 for c in caps):
            raise _bad("capacities", ",".join(map(str, caps)), "positive integers, e.g. 4,8,16")
        return tuple(sorted(set(caps)))

    def resolve(
        self, latent_shape: tuple[int, ...], data_shape: tuple[int, ...]
    ) -> tuple[MeasureConfig, str]:
        """(the config to measure with, the reason for its family, as the report states it):
        ``generator="auto"`` becomes ``choose_generator``'s family, with that family's default
        capacities and lr unless given."""
        cfg = self.validate()
        if cfg.generator != "auto":
            return cfg, f"{cfg.generator}: given"
        family, why = choose_generator(latent_shape, data_shape, cfg.capacities, cfg.depth)
        caps = cfg.capacities or DEFAULT_CAPACITIES[family]
        limit = cfg.max_capacity
        if limit is None:
            limit = EXTEND_LIMIT[family] if cfg.capacities is None else 0
        resolved = replace(cfg, generator=family, capacities=caps, max_capacity=limit)
        return resolved.validate(), why
