"""Evaluation of generators: sample-quality metrics and latent priors (see docs/metrics.md).

The Frechet distance and the feature space are the metric layer's (``latentdist.discrepancy``)
and are re-exported here, where users import them.
"""

from latentdist.discrepancy import (
    FeatureNet,
    frechet_distance,
    frechet_distance_gaussians,
    load_feature_extractor,
    train_feature_net,
)
from latentdist.evaluation.generation import (
    CodePrior,
    GaussianMixturePrior,
    generation_metrics,
    kid_subsets,
    prdc,
)
from latentdist.evaluation.probe import PROBE_RECIPE, FlowPrior, ProbeRecipe

__all__ = [
    "PROBE_RECIPE",
    "CodePrior",
    "FlowPrior",
    "FeatureNet",
    "GaussianMixturePrior",
    "frechet_distance",
    "frechet_distance_gaussians",
    "generation_metrics",
    "kid_subsets",
    "load_feature_extractor",
    "prdc",
    "ProbeRecipe",
    "train_feature_net",
]
