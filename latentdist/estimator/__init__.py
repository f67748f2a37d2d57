"""The estimator of the latent–data distance: splits, batched fitting, evaluation, summaries."""

from latentdist.estimator.fit import FITS, FitSettings, fit_ensemble
from latentdist.estimator.measure import METRICS, MeasureConfig, MeasureResult, measure

__all__ = [
    "FITS",
    "METRICS",
    "FitSettings",
    "MeasureConfig",
    "MeasureResult",
    "fit_ensemble",
    "measure",
]
