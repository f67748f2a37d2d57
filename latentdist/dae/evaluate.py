"""Held-out scores of a run: the final validation MSE (run.json) and the validation points of
the curves, both in eval mode with the deterministic encoding."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from latentdist.dae.bottleneck import VectorQuantizer
from latentdist.dae.losses import reconstruction_loss
from latentdist.dae.models import Models
from latentdist.data import DataSource


@contextlib.contextmanager
def eval_mode(models: Models) -> Iterator[None]:
    """Every network in eval mode, each restored to its own mode afterwards."""
    mods = list(models.named().values())
    modes = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(mods, modes, strict=True):
            m.train(mode)


@torch.no_grad()
def evaluate(
    models: Models, src: DataSource, idx: np.ndarray, device: torch.device, batch: int = 256
) -> dict:
    """Validation reconstruction MSE in the data's own scale (mean over all elements).

    Rows ``idx`` of ``src`` are read ``batch`` at a time. Uses the deterministic encoding
    (posterior mean for ``kl``); ``val_mse_aux`` for the stage-1 decoder when there is one;
    codebook perplexity ``exp(H(p))`` and codes used for ``vq``.
    """
    if len(idx) == 0:
        return {"val_mse": None, "val_mse_aux": None}
    err, err_aux, counts, n = 0.0, 0.0, None, 0
    with eval_mode(models):
        for start in range(0, len(idx), batch):
            xb = src.take(idx[start : start + batch]).to(device)
            h = models.encoder(models.pad(models.normalize(xb)))
            z = models.bottleneck.encode(h)
            decoded = models.denormalize(models.crop(models.decoder(z)))
            err += (decoded - xb).pow(2).sum().item()
            if models.aux_decoder is not None:
                decoded = models.denormalize(models.crop(models.aux_decoder(z)))
                err_aux += (decoded - xb).pow(2).sum().item()
            if isinstance(models.bottleneck, VectorQuantizer):
                codes = models.bottleneck.codes(h).flatten()
                c = torch.bincount(codes, minlength=models.bottleneck.num_codes).double()
                counts = c if counts is None else counts + c
            n += xb.numel()
    res = {
        "val_mse": err / n,
        "val_mse_aux": err_aux / n if models.aux_decoder is not None else None,
    }
    if counts is not None:
        p = counts / counts.sum()
        res["codebook_perplexity"] = float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))
        res["codes_used"] = int((counts > 0).sum())
    return res


@torch.no_grad()
def validation_loss(
    models: Models,
    decoder: nn.Module,
    src: DataSource,
    idx: np.ndarray,
    device: torch.device,
    kind: str,
    batch: int = 256,
) -> float | None:
    """The training reconstruction loss (``kind``, on normalised data) of ``decoder`` on rows
    ``idx``, in eval mode with the deterministic encoding: the validation point of the curves."""
    if len(idx) == 0:
        return None
    total, n = 0.0, 0
    with eval_mode(models):
        for start in range(0, len(idx), batch):
            x = models.normalize(src.take(idx[start : start + batch]).to(device))
            z = models.bottleneck.encode(models.encoder(models.pad(x)))
            total += float(reconstruction_loss(models.crop(decoder(z)), x, kind)) * x.numel()
            n += x.numel()
    return total / n
