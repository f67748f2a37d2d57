"""The estimator of the latent–data distance, by phase.

``config`` (the settings, frozen) → ``split`` and ``rows`` (held-out splits, the rows they read)
→ ``fit`` and ``sweep`` (every (capacity, seed) generator fitted at once) → ``selection`` (the
floor, held-out distances, the choice among candidates) → ``summary`` (intervals, the critical
capacity, the report) and ``saturation`` (where the curve flattens; how far a default sweep
extends); ``paired`` compares two runs seed by seed; ``measure`` runs them in order, ``sharding`` splits the work under
torchrun, ``memory`` records peak memory per phase.
"""

from latentdist.estimator.config import (
    DEFAULT_CAPACITIES,
    EXTEND_LIMIT,
    GENERATORS,
    METRICS,
    MLP_PARAMS_LIMIT,
    MeasureConfig,
    choose_generator,
    default_fit_batch,
)
from latentdist.estimator.fit import FITS, FitSettings, fit_ensemble
from latentdist.estimator.measure import MeasureResult, measure
from latentdist.estimator.memory import Memory

__all__ = [
    "DEFAULT_CAPACITIES",
    "EXTEND_LIMIT",
    "FITS",
    "GENERATORS",
    "METRICS",
    "MLP_PARAMS_LIMIT",
    "FitSettings",
    "MeasureConfig",
    "MeasureResult",
    "Memory",
    "choose_generator",
    "default_fit_batch",
    "fit_ensemble",
    "measure",
]
