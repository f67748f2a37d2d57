"""Evaluation of generators: sample-quality metrics and latent priors (see docs/metrics.md)."""

from latentdist.evaluation.generation import (
    CodePrior,
    FeatureNet,
    GaussianMixturePrior,
    frechet_distance,
    frechet_distance_gaussians,
    generation_metrics,
    kid,
    load_feature_extractor,
    prdc,
    train_feature_net,
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
    "kid",
    "load_feature_extractor",
    "prdc",
    "ProbeRecipe",
    "train_feature_net",
]
