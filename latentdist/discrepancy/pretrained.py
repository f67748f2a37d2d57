"""The field's feature spaces from a weights file the user already has (docs/metrics.md).

``inception:PATH``: FID's Inception-v3, pool features (2048-d), built by pytorch-fid
(``pytorch_fid.inception.InceptionV3``, the architecture of Heusel et al.'s TensorFlow FID) from
pytorch-fid's weights file (``pt_inception-2015-12-05-6726825d.pth``, a plain state dict).
pytorch-fid imports torchvision; both must be installed.

``dinov2:PATH``: DINOv2 (Oquab et al. 2023, arXiv 2304.07193), the class token after the final
layer norm, as ``torch.hub.load('facebookresearch/dinov2', ...)`` returns it and as dgm-eval
(Stein et al. 2023, arXiv 2306.04675) scores FD-DINOv2. The file is a checkpoint as torch hub
saves it (``dinov2_vits14_pretrain.pth``, ``..._reg4_pretrain.pth``, a plain state dict); the
network is transformers' ``Dinov2Model`` (``Dinov2WithRegistersModel`` for register tokens), the
``latentdist[features]`` extra.

Nothing is downloaded, and nothing is unpickled: files are read with ``torch.load(...,
weights_only=True)`` or safetensors. Inputs are latentdist images, (n, C, H, W) scaled to
[-1, 1] as image folders and the built-ins are; grey images are repeated to three channels.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from latentdist.errors import UsageError

__all__ = [
    "DINOV2_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_SIZE",
    "PRETRAINED",
    "CachedFeatures",
    "Dinov2Features",
    "InceptionFeatures",
    "dinov2_preprocess",
    "hub_to_transformers",
    "inception_preprocess",
    "load_pretrained",
    "parse_pretrained",
    "read_state_dict",
]

#: The names of ``--features NAME:PATH``.
PRETRAINED = ("inception", "dinov2")
INCEPTION_SIZE = 299  # pytorch-fid resizes to 299 x 299 (bilinear)
DINOV2_SIZE = 224  # dgm-eval resizes to 224 x 224 (bicubic)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INSTALL = {
    "inception": "pip install pytorch-fid (it brings torchvision)",
    "dinov2": "pip install 'latentdist[features]' (transformers)",
}


def parse_pretrained(spec: Any) -> tuple[str, str] | None:
    """(name, path) of a ``NAME:PATH`` feature spec with NAME in ``PRETRAINED``, else None."""
    if not isinstance(spec, str):
        return None
    name, sep, path = spec.partition(":")
    if not sep or name not in PRETRAINED:
        return None
    if not path:
        raise UsageError(f"--features {spec}: expected {name}:PATH, a local weights file")
    return name, path


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or a torch file of tensors read with
    ``weights_only=True`` (nothing is unpickled). ``what`` names the expected file in errors."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such weights file (expected {what})")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p), device="cpu")
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for a foreign file
        raise UsageError(
            f"{p}: not a weights file that loads without unpickling ({type(err).__name__}); "
            f"expected {what}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UsageError(f"{p}: holds no state dict of tensors; expected {what}")
    return state


def _rgb01(x: torch.Tensor, name: str) -> torch.Tensor:
    """Images (n, C, H, W) in [-1, 1] -> (n, 3, H, W) in [0, 1]: grey repeated to three
    channels, values clamped to [0, 1] as 8-bit images are (the references read image files)."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise UsageError(
            f"--features {name}:PATH takes images of 1 or 3 channels, got rows of shape "
            f"{tuple(x.shape[1:])}"
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < -2 or hi > 2:  # 0..255 or 0..16 scales; a decoder may overshoot 1 a little
        raise UsageError(
            f"--features {name}:PATH expects images scaled to [-1, 1] (as image folders and "
            f"the built-in data sets are), got values in [{lo:.4g}, {hi:.4g}]"
        )
    x = ((x.float() + 1) / 2).clamp(0, 1)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def inception_preprocess(x: torch.Tensor) -> torch.Tensor:
    """latentdist images -> pytorch-fid's input: (n, 3, H, W) in [0, 1], as its
    ``ImagePathDataset`` gives (``Image.convert('RGB')``, ``ToTensor``). ``InceptionV3`` itself
    then resizes to 299 x 299 (``F.interpolate``, bilinear, ``align_corners=False``) and maps
    [0, 1] to [-1, 1] (``resize_input``, ``normalize_input``)."""
    return _rgb01(x, "inception")


def dinov2_preprocess(x: torch.Tensor) -> torch.Tensor:
    """latentdist images -> DINOv2's input as dgm-eval prepares it (``dgm_eval/models/dinov2.py``:
    ``Resize((224, 224), BICUBIC)``, ``ToTensor``, ``Normalize(ImageNet mean, std)``): [0, 1],
    resized to 224 x 224 by antialiased bicubic interpolation (the tensor form of PIL's bicubic
    resize), clamped to [0, 1] as PIL's 8-bit result is, then standardised by the ImageNet mean
    (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)."""
    x = _rgb01(x, "dinov2")
    x = F.interpolate(
        x, size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic", align_corners=False, antialias=True
    ).clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class CachedFeatures(nn.Module):
    """A fixed feature network that keeps the features of the rows it has seen (by a hash of
    their bytes; at most ``max_rows``): the seeds of ``sample_distance`` re-split the same rows,
    and each row then passes the network once. Subclasses define ``features``."""

    def __init__(self, net: nn.Module, max_rows: int = 200_000) -> None:
        super().__init__()
        self.net = net.eval()
        self.max_rows = max_rows
        self._cache: dict[bytes, torch.Tensor] = {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            return self.features(x)
        rows = x.detach().float().cpu().contiguous()
        keys = [hashlib.blake2b(r.numpy().tobytes(), digest_size=16).digest() for r in rows]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        fresh: dict[int, torch.Tensor] = {}
        if todo:
            fresh = dict(zip(todo, self.features(x[todo]).float().cpu(), strict=True))
            for i, f in fresh.items():
                if len(self._cache) < self.max_rows:
                    self._cache[keys[i]] = f
        rows_out = [fresh[i] if i in fresh else self._cache[k] for i, k in enumerate(keys)]
        return torch.stack(rows_out).to(x.device)


class InceptionFeatures(CachedFeatures):
    """pytorch-fid's ``InceptionV3`` (block 3, 2048-d pool features) on latentdist images."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(inception_preprocess(x))[0].flatten(1)


class Dinov2Features(CachedFeatures):
    """transformers' ``Dinov2Model``: the class token after the final layer norm
    (``pooler_output``; the hub model's ``x_norm_clstoken``) of ``dinov2_preprocess(x)``."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=dinov2_preprocess(x)).pooler_output


def _import(name: str, module: str) -> Any:
    """``module`` imported, or a one-line error naming what to install for ``name``."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as err:  # ImportError, or torchvision's RuntimeError beside a foreign torch
        raise UsageError(
            f"--features {name}:PATH needs {module.split('.')[0]}, which does not import here "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"{_INSTALL[name]}"
        ) from None


def load_inception(path: str | os.PathLike) -> InceptionFeatures:
    """pytorch-fid's FID Inception (``InceptionV3([3])``) with the weights of ``path``.

    pytorch-fid builds the network in ``fid_inception_v3`` and fetches its weights there with
    ``load_state_dict_from_url``; latentdist hands that call the user's file instead (read with
    ``weights_only=True``), so the network is pytorch-fid's own and nothing is downloaded.
    """
    from unittest import mock

    what = "pytorch-fid's FID Inception weights (pt_inception-2015-12-05-6726825d.pth)"
    state = read_state_dict(path, what)
    inception = _import("inception", "pytorch_fid.inception")
    if "Mixed_7c.branch_pool.conv.weight" not in state:
        raise UsageError(f"{path}: not {what}: it has no Mixed_7c.branch_pool.conv.weight")
    with mock.patch.object(inception, "load_state_dict_from_url", return_value=state):
        try:
            net = inception.InceptionV3([3], resize_input=True, normalize_input=True)
        except RuntimeError as err:  # load_state_dict: missing, unexpected or mis-shaped keys
            raise UsageError(f"{path}: not {what} ({str(err).splitlines()[0]})") from None
    return InceptionFeatures(net)


def hub_pos_embed(pos_embed: torch.Tensor, size: int, patch: int) -> torch.Tensor:
    """The position embedding (1, 1 + N, D) of a hub checkpoint resized for ``size`` x ``size``
    inputs as the hub model does at run time (``DinoVisionTransformer.interpolate_pos_encoding``
    in facebookresearch/dinov2: bicubic, ``scale_factor = (size // patch + 0.1) / sqrt(N)``, no
    antialiasing). transformers interpolates to a size instead, which shifts the embeddings;
    resizing once here keeps the hub's features."""
    n = pos_embed.shape[1] - 1
    m, new = math.isqrt(n), size // patch
    if m * m != n:
        raise UsageError(f"pos_embed holds {n} patch positions, not a square grid")
    if new == m:
        return pos_embed
    grid = pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    scale = float(new + 0.1) / m
    grid = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


_BLOCK_NAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.o_proj",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w3": "mlp.down_proj",
}


def _rename_block(rest: str, value: torch.Tensor, prefix: str, out: dict) -> bool:
    """Put one block tensor (hub name ``rest`` after ``blocks.i.``) into ``out`` under
    transformers' names; False for a name this mapping does not know."""
    stem, _, leaf = rest.rpartition(".")
    if stem in ("attn.qkv", "mlp.w12"):  # fused: q, k, v / SwiGLU's gate and up, stacked
        names = ("q_proj", "k_proj", "v_proj") if stem == "attn.qkv" else ("gate_proj", "up_proj")
        parent = "attention" if stem == "attn.qkv" else "mlp"
        for name, part in zip(names, value.chunk(len(names), dim=0), strict=True):
            out[f"{prefix}{parent}.{name}.{leaf}"] = part
        return True
    if rest in _BLOCK_NAMES:  # ls1.gamma: a parameter, no leaf
        out[prefix + _BLOCK_NAMES[rest]] = value
        return True
    if stem in _BLOCK_NAMES:
        out[f"{prefix}{_BLOCK_NAMES[stem]}.{leaf}"] = value
        return True
    return False


def hub_to_transformers(
    state: dict[str, torch.Tensor], size: int = DINOV2_SIZE
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config keywords, state dict) of transformers' ``Dinov2Model`` for a DINOv2 checkpoint as
    torch hub saves it (facebookresearch/dinov2 names: ``blocks.0.attn.qkv.weight``, ...).

    The renaming of transformers' own conversion script (``convert_dinov2_to_hf.py``, which is
    not in the installed package), for transformers 5's module names: fused ``qkv`` split into
    ``q_proj``, ``k_proj``, ``v_proj``; SwiGLU's ``w12`` into ``gate_proj``, ``up_proj``; the
    position embedding resized for ``size`` inputs (``hub_pos_embed``). Heads are 64 wide, as in
    every DINOv2 (ViT-S/14 6 heads, B 12, L 16, g 24).
    """
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in state]
    if missing:
        raise UsageError(f"no {', '.join(missing)}")
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    out: dict[str, torch.Tensor] = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": hub_pos_embed(state["pos_embed"], size, patch),
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for key in ("mask_token", "register_tokens"):
        if key in state:
            out[f"embeddings.{key}"] = state[key]
    depth = 0
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head != "blocks":
            continue
        index, _, rest = rest.partition(".")
        depth = max(depth, int(index) + 1)
        if not _rename_block(rest, value, f"encoder.layer.{index}.", out):
            raise UsageError(f"unknown key {key}")
    config = {
        "hidden_size": dim,
        "num_hidden_layers": depth,
        "num_attention_heads": max(dim // 64, 1),
        "patch_size": patch,
        "image_size": size,
        "use_swiglu_ffn": "blocks.0.mlp.w12.weight" in state,
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] // dim
        if "blocks.0.mlp.fc1.weight" in state
        else 4,
        "layerscale_value": 1.0,
        "use_mask_token": "mask_token" in state,
    }
    if "register_tokens" in state:
        config["num_register_tokens"] = state["register_tokens"].shape[1]
    return config, out


def load_dinov2(path: str | os.PathLike) -> Dinov2Features:
    """transformers' ``Dinov2Model`` with the weights of a torch-hub DINOv2 checkpoint ``path``
    (``hub_to_transformers``)."""
    what = "a DINOv2 ViT checkpoint as torch hub saves it (e.g. dinov2_vits14_pretrain.pth)"
    state = read_state_dict(path, what)
    transformers = _import("dinov2", "transformers")
    try:
        config, hf_state = hub_to_transformers(state)
    except (UsageError, KeyError, ValueError) as err:
        raise UsageError(f"{path}: not {what} ({err})") from None
    registers = "num_register_tokens" in config
    cls = "Dinov2WithRegisters" if registers else "Dinov2"
    net = getattr(transformers, cls + "Model")(getattr(transformers, cls + "Config")(**config))
    try:
        net.load_state_dict(hf_state, strict=True)
    except RuntimeError as err:
        raise UsageError(f"{path}: not {what} ({str(err).splitlines()[0]})") from None
    return Dinov2Features(net)


def load_pretrained(name: str, path: str | os.PathLike) -> nn.Module:
    """The feature module ``name`` (``PRETRAINED``) with the weights of ``path``, in eval mode."""
    if name == "inception":
        return load_inception(path).eval()
    if name == "dinov2":
        return load_dinov2(path).eval()
    raise UsageError(f"--features {name}:PATH: expected one of {', '.join(PRETRAINED)}")
