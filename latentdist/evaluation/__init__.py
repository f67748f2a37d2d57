"""Evaluation of generators: sample-quality metrics and latent priors (see docs/metrics.md)."""

from latentdist.evaluation.generation import (
    CodePrior,
    FeatureNet,
    GaussianMixturePrior,
    frechet_distance,
    frechet_distance_gaussians,
    generation_metrics,
    load_feature_extractor,
    prdc,
    train_feature_net,
)

__all__ = [
    "CodePrior",
    "FeatureNet",
    "GaussianMixturePrior",
    "frechet_distance",
    "frechet_distance_gaussians",
    "generation_metrics",
    "load_feature_extractor",
    "prdc",
    "train_feature_net",
]
