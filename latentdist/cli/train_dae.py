"""``latentdist train-dae``: the command lives beside the trainer, in ``latentdist.dae.cli``."""

from latentdist.dae.cli import train_dae

__all__ = ["train_dae"]
