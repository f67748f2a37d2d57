"""Load arrays (.npy, .npz, .pt, .safetensors, .csv) and folders of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from latentdist.data.source import DataSource
from latentdist.errors import UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
_PREFERRED_KEYS = ("x", "X", "data", "latents", "z", "codes", "images")


def _pick(mapping: dict, path: Path, key: str | None):
    """One array out of a named collection: ``key``, the only entry, or a conventional name."""
    keys = list(mapping)
    if key is not None:
        if key not in mapping:
            raise UsageError(f"{path}: no array named {key!r} (has {', '.join(keys)})")
        return mapping[key]
    if len(keys) == 1:
        return mapping[keys[0]]
    for k in _PREFERRED_KEYS:
        if k in mapping:
            return mapping[k]
    raise UsageError(f"{path}: holds several arrays ({', '.join(keys)}); name one with PATH:KEY")


def load_array_file(path: Path, key: str | None = None, trust_pickle: bool = False) -> np.ndarray:
    """Read one numeric array from ``path``; a ``.npy`` file is memory-mapped, not read whole."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            try:
                return np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                if "pickle" in str(e) and not trust_pickle:
                    raise UsageError(
                        f"{path}: holds pickled objects; pass --trust-pickle to load it"
                    ) from None
                return np.load(path, allow_pickle=trust_pickle)
        if suffix == ".npz":
            with np.load(path, allow_pickle=trust_pickle) as z:
                return np.asarray(_pick({k: z[k] for k in z.files}, path, key))
        if suffix == ".pt" or suffix == ".pth":
            import torch

            try:
                obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
            except Exception as e:  # weights_only refuses arbitrary pickles
                if not trust_pickle and "weights_only" in str(e):
                    raise UsageError(
                        f"{path}: not a plain tensor file; pass --trust-pickle to unpickle it"
                    ) from None
                raise
            if isinstance(obj, dict):
                obj = _pick(obj, path, key)
            if not isinstance(obj, torch.Tensor):
                raise UsageError(f"{path}: expected a tensor, found {type(obj).__name__}")
            return obj.detach().cpu().numpy()
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return _pick(load_file(str(path)), path, key)
        if suffix in (".csv", ".tsv", ".txt"):
            import pandas as pd

            sep = "\t" if suffix == ".tsv" else ","
            frame = pd.read_csv(path, sep=sep, header=None)
            if not all(np.issubdtype(t, np.number) for t in frame.dtypes):  # first row was a header
                frame = pd.read_csv(path, sep=sep)
            if not all(np.issubdtype(t, np.number) for t in frame.dtypes):
                raise UsageError(f"{path}: CSV has non-numeric columns")
            return frame.to_numpy(dtype=np.float32)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(
            f"{path}: cannot read as {suffix} array ({type(e).__name__}: {e})"
        ) from None
    raise UsageError(
        f"{path}: unknown file type {suffix!r} (expected .npy, .npz, .pt, .safetensors, .csv or an image folder)"
    )


def load_image_folder(path: Path) -> DataSource:
    """All PNG/JPEG/BMP files below ``path`` (sorted), as (N, C, H, W) scaled to [-1, 1].

    All grey images give C=1; any colour image makes every image RGB (C=3). Sizes must agree.
    """
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"{path}: no images (.png, .jpg, .jpeg, .bmp) found")
    images, size = [], None
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                grey = im.mode in ("1", "L", "I", "I;16", "F")
                im = im.convert("L" if grey else "RGB")
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise UsageError(f"{f}: unreadable or corrupt image ({e})") from None
        if size is None:
            size, first = arr.shape[:2], f
        elif arr.shape[:2] != size:
            raise UsageError(
                f"{f}: image size {arr.shape[1]}x{arr.shape[0]} differs from {first.name}'s "
                f"{size[1]}x{size[0]}; all images must share one size"
            )
        images.append(arr)
    if all(a.ndim == 2 for a in images):
        stacked = np.stack(images)[:, None]
    else:
        stacked = np.stack([np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a for a in images])
        stacked = stacked.transpose(0, 3, 1, 2)
    src = DataSource(
        str(path), np.ascontiguousarray(stacked), kind="images", scale=(127.5, 1 / 127.5)
    )
    src.files = files
    return src
