"""What a run hands on: TorchScript encoder and decoder that read and write data in its own
scale, and every weight in one safetensors file."""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from latentdist._io import atomic_open
from latentdist.dae.bottleneck import VectorQuantizer
from latentdist.dae.config import TrainConfig
from latentdist.dae.models import Models


class ExportEncoder(nn.Module):
    """Data in its own scale -> latent (``ae``: z; ``kl``: posterior mean; ``vq``: quantised vectors).

    A VQ encoder also carries its (K, C) codebook as the top-level buffer ``codebook``. Images
    are padded to the run's padded size first (``latentdist._shapes``).
    """

    def __init__(
        self,
        normalize: nn.Module,
        encoder: nn.Module,
        bottleneck: nn.Module,
        pad: nn.Module | None = None,
    ):
        super().__init__()
        self.normalize, self.encoder, self.bottleneck = normalize, encoder, bottleneck
        self.pad = pad or nn.Identity()
        if isinstance(bottleneck, VectorQuantizer):
            self.register_buffer("codebook", bottleneck.codebook.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck.encode(self.encoder(self.pad(self.normalize(x.float()))))

    @classmethod
    def of(cls, models: Models) -> ExportEncoder:
        return cls(models.normalize, models.encoder, models.bottleneck, models.pad)


class ExportDecoder(nn.Module):
    """Latent -> data in its own scale (images cropped back to the data size)."""

    def __init__(self, decoder: nn.Module, denormalize: nn.Module, crop: nn.Module | None = None):
        super().__init__()
        self.decoder, self.denormalize = decoder, denormalize
        self.crop = crop or nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.denormalize(self.crop(self.decoder(z.float())))


def cpu_copy(module: nn.Module) -> nn.Module:
    """A CPU float32 eval-mode copy of ``module`` (contiguous memory), the form that is exported."""
    m = copy.deepcopy(module).cpu().float().eval()
    return m.to(memory_format=torch.contiguous_format)


def save_torchscript(path: Path, module: nn.Module, example: torch.Tensor) -> None:
    """Trace ``module`` (a CPU float32 eval-mode copy) on ``example`` and save it atomically."""
    with torch.no_grad(), warnings.catch_warnings():
        # shape checks inside GroupNorm and jit's deprecation notices are harmless here
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(cpu_copy(module), example.cpu().float())
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


def save_safetensors(path: Path, models: Models, metadata: dict[str, str]) -> None:
    """All weights as ``<module>.<name>``; a VQ codebook also under the top-level key ``codebook``."""
    tensors = {}
    for name, sd in models.state_dicts().items():
        for k, v in sd.items():
            tensors[f"{name}.{k}"] = v.detach().cpu().contiguous().clone()
    if isinstance(models.bottleneck, VectorQuantizer):
        tensors["codebook"] = models.bottleneck.codebook.detach().cpu().float().contiguous().clone()
    with atomic_open(path, "wb") as f:
        f.write(save(tensors, metadata=metadata))


def save_stage1_encoder(out: Path, models: Models, example: torch.Tensor) -> None:
    """``stage1/encoder.pt``: the frozen stage-1 encoder, for measuring it on its own."""
    save_torchscript(out / "stage1" / "encoder.pt", ExportEncoder.of(models), example)


def export_run(out: Path, models: Models, config: TrainConfig, example: torch.Tensor) -> list[int]:
    """Write ``encoder.pt``, ``decoder.pt`` and ``model.safetensors``; return the latent shape.

    The decoder is traced on the encoder's latents of ``example``.
    """
    enc = ExportEncoder.of(models)
    save_torchscript(out / "encoder.pt", enc, example)
    with torch.no_grad():
        z_example = cpu_copy(enc)(example.float())
    save_torchscript(
        out / "decoder.pt",
        ExportDecoder(models.decoder, models.denormalize, models.crop),
        z_example,
    )
    save_safetensors(out / "model.safetensors", models, {"config": json.dumps(config.to_dict())})
    return list(z_example.shape[1:])
