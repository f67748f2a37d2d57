"""Reference Decoupled Autoencoder trainer (Hu et al., NeurIPS 2023) and its joint baseline.

>>> from latentdist.dae import TrainConfig, train
>>> run = train(TrainConfig(data="digits", out="runs/dae", mode="dae", bottleneck="kl"))
"""

from latentdist.dae.config import TrainConfig
from latentdist.dae.data import split_indices
from latentdist.dae.models import build_models
from latentdist.dae.train import NonFiniteLossError, train

__all__ = ["NonFiniteLossError", "TrainConfig", "build_models", "split_indices", "train"]
