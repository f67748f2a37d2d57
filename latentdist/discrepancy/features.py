"""The feature spaces of ``fd`` and ``kid``: the learned ``FeatureNet``, a user's TorchScript
extractor, the field's Inception-v3 and DINOv2 from a local weights file (``pretrained.py``), and
``resolve_features``, which maps a feature spec to one of them (docs/metrics.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from latentdist._shapes import pixel_budget_batch
from latentdist.data.source import DataSource
from latentdist.discrepancy.pretrained import PRETRAINED, load_pretrained, parse_pretrained
from latentdist.errors import UsageError

__all__ = [
    "FEATURE_KINDS",
    "FeatureNet",
    "extract_features",
    "load_feature_extractor",
    "resolve_features",
    "train_feature_net",
]

#: What ``resolve_features`` reports a feature space as.
FEATURE_KINDS = ("identity", "learned", "extractor", "module", *PRETRAINED)


class FeatureNet(nn.Module):
    """Feature extractor for the Frechet distance; ``forward`` returns the penultimate layer.

    Images (C, H, W): conv 3x3 (32) -> conv 3x3 stride 2 (64) -> conv 3x3 stride 2 (64) ->
    global average pool -> linear (``feat_dim``) -> ReLU. Vectors: MLP 256 -> ``feat_dim``.
    ``head`` maps the trunk's output to class logits (supervised) or back to the input (denoising
    AE). The features are the trunk's output standardised, (trunk(x) - shift) / scale, with the
    buffers set after training from the training rows (``standardise``).
    """

    def __init__(self, sample_shape: tuple[int, ...], n_out: int, feat_dim: int = 64) -> None:
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        if len(sample_shape) == 3:
            c = sample_shape[0]
            self.trunk: nn.Module = nn.Sequential(
                nn.Conv2d(c, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(64, 64, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(64, feat_dim),
                nn.ReLU(),
            )
        else:
            d = math.prod(sample_shape)
            self.trunk = nn.Sequential(
                nn.Flatten(), nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, feat_dim), nn.ReLU()
            )
        self.head = nn.Linear(feat_dim, n_out)
        self.register_buffer("shift", torch.zeros(feat_dim))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.trunk(x) - self.shift) / self.scale

    @torch.no_grad()
    def standardise(self, batches: Iterable[torch.Tensor]) -> None:
        """shift = the mean feature over the samples of ``batches``; scale = the root mean
        per-dimension variance.

        One scale for all dimensions keeps the feature geometry (FD scales by 1/scale^2); it
        fixes the size that training happened to give the features, which otherwise varies by
        orders of magnitude between seeds and puts KID's cubic kernel out of range.
        """
        f = torch.cat([extract_features(self.trunk, x) for x in batches])
        self.shift.copy_(f.mean(0))
        self.scale.copy_(f.var(0).mean().sqrt().clamp_min(1e-12))


def train_feature_net(
    source: DataSource,
    steps: int = 500,
    seed: int = 0,
    *,
    rows: np.ndarray | None = None,
    batch_size: int | None = None,
    lr: float = 1e-3,
    noise: float = 0.2,
) -> FeatureNet:
    """Train the default feature space on the rows ``rows`` of ``source`` (default all; CPU;
    returns the net in eval mode). Rows are read a batch at a time (``source.take``), so an
    image folder larger than memory is never decoded whole.

    ``batch_size`` defaults to 128, or for images above 32 x 32 pixels as many as hold the
    pixels of 128 such images (at least 16: ``latentdist._shapes.pixel_budget_batch``), so that
    training it on photographs costs what it costs on CIFAR-sized images.

    With labels (``source.labels``, as the built-ins carry): a classifier, cross-entropy on
    ``head(features)``; features are its penultimate layer (as Inception features are for FID).
    Without labels: a denoising autoencoder (Vincent et al. 2008): ``head`` reconstructs x from
    x + ``noise`` * std(x) * N(0, I) through the features, squared error. The features are then
    standardised on (up to 5000 of) the training rows (``FeatureNet.standardise``).
    """
    labels = getattr(source, "labels", None)
    if batch_size is None:
        batch_size = pixel_budget_batch(tuple(source.sample_shape), 128, 32 * 32, 16)
    torch.manual_seed(seed)
    rows = np.arange(len(source)) if rows is None else np.asarray(rows)
    if labels is not None:
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if len(y) != len(source):
            raise UsageError(f"{source.name}: {len(y)} labels for {len(source)} samples")
        net = FeatureNet(source.sample_shape, int(y[rows].max()) + 1)
    else:
        net = FeatureNet(source.sample_shape, math.prod(source.sample_shape))
        std = _streamed_std(source, rows, batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = rows[torch.randint(len(rows), (min(batch_size, len(rows)),), generator=gen)]
        xb = source.take(idx)
        if labels is not None:
            loss = nn.functional.cross_entropy(net.head(net.trunk(xb)), y[idx])
        else:
            noisy = xb + noise * std * torch.randn(xb.shape, generator=gen)
            loss = nn.functional.mse_loss(net.head(net.trunk(noisy)), xb.flatten(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    picked = rows[torch.randperm(len(rows), generator=gen)[:5000].numpy()]
    net.standardise(
        source.take(picked[i : i + batch_size]) for i in range(0, len(picked), batch_size)
    )
    return net


def _streamed_std(source: DataSource, rows: np.ndarray, chunk: int) -> float:
    """The standard deviation (n - 1) of every entry of the rows ``rows``, read ``chunk`` rows
    at a time and summed in float64."""
    total = squares = 0.0
    for i in range(0, len(rows), chunk):
        block = source.take(rows[i : i + chunk]).double()
        total += float(block.sum())
        squares += float(block.square().sum())
    n = len(rows) * math.prod(source.sample_shape)
    return math.sqrt(max(squares - total * total / n, 0.0) / max(n - 1, 1))


def load_feature_extractor(path: str | os.PathLike) -> nn.Module:
    """Load a user's TorchScript feature extractor (``torch.jit.save`` file) in eval mode, or,
    for ``inception:PATH`` and ``dinov2:PATH``, that network with the weights of PATH
    (``latentdist.discrepancy.pretrained.load_pretrained``).

    TorchScript archives hold code and tensors, not arbitrary pickled objects.
    """
    named = parse_pretrained(path)
    if named is not None:
        return load_pretrained(*named)
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise UsageError(f"{p}: no such feature-extractor file")
    try:
        module = torch.jit.load(p, map_location="cpu")
    except Exception as err:  # torch raises several types for a non-TorchScript file
        raise UsageError(f"{p}: not a TorchScript module ({type(err).__name__})") from None
    return module.eval()


@torch.no_grad()
def extract_features(net: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``net`` applied to ``x`` in batches on the net's device: (n, F) float64 CPU tensor."""
    params = list(net.parameters())
    device = params[0].device if params else torch.device("cpu")
    out = [
        net(x[s : s + batch_size].to(device, torch.float32)).flatten(1).cpu()
        for s in range(0, len(x), batch_size)
    ]
    return torch.cat(out).double()


def resolve_features(
    spec: str | os.PathLike | nn.Module | None,
    sample_shape: tuple[int, ...],
    *,
    fit_rows: Any | None = None,
    labels: Any | None = None,
    steps: int = 500,
    seed: int = 0,
    name: str = "fitting rows",
) -> tuple[str, nn.Module | None]:
    """(kind, module) of the feature space ``spec`` for samples of shape ``sample_shape``.

    ``spec``: None or "identity" -> ("identity", None), the samples themselves; "auto" ->
    "learned" for images (C, H, W), else "identity"; "learned" -> a ``train_feature_net`` on
    ``fit_rows`` (n, *sample_shape) with ``labels``, ``steps`` and ``seed``, or ("learned", None)
    when ``fit_rows`` is None (the caller trains one per split later); "inception:PATH" or
    "dinov2:PATH" -> (that name, the network with PATH's weights, ``pretrained.py``); a path ->
    ("extractor", ``load_feature_extractor(spec)``); a module -> ("module", spec). ``name`` names the fitting
    rows in errors. Whether a metric takes features at all is the caller's question
    (``FEATURE_METRICS``).
    """
    if spec == "auto":
        spec = "learned" if len(sample_shape) == 3 else "identity"
    if spec is None or spec == "identity":
        return "identity", None
    if spec == "learned":
        if fit_rows is None:
            return "learned", None
        rows = fit_rows.numpy() if isinstance(fit_rows, torch.Tensor) else np.asarray(fit_rows)
        kind = "images" if len(sample_shape) == 3 else "vectors"
        source = DataSource(name, rows, kind=kind, labels=labels)
        return "learned", train_feature_net(source, steps=steps, seed=seed)
    if isinstance(spec, nn.Module):
        return "module", spec
    named = parse_pretrained(spec)
    if named is not None:
        return named[0], load_pretrained(*named)
    if isinstance(spec, (str, os.PathLike)):
        return "extractor", load_feature_extractor(spec)
    raise UsageError(
        f"features: expected auto, identity, learned, inception:PATH, dinov2:PATH, a path or a "
        f"module, got {spec!r}"
    )
