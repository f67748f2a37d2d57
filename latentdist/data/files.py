"""Load arrays (.npy, .npz, .pt, .safetensors, .csv) and folders of images (read lazily)."""

from __future__ import annotations

from dataclasses import dataclass
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


CHANNELS = ("auto", "grey", "rgb")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


@dataclass(frozen=True)
class ImageOptions:
    """How an image folder becomes (N, C, H, W): ``channels`` auto/grey/rgb, ``resize`` (H, W).

    ``channels='auto'`` keeps grey folders grey (C=1) and colour folders RGB (C=3) and refuses a
    folder mixing both; ``grey``/``rgb`` convert every image. ``resize`` resizes every image with
    Pillow's bicubic filter (antialiased); without it all images must share one size.
    """

    channels: str = "auto"
    resize: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.channels not in CHANNELS:
            raise UsageError(f"--channels {self.channels}: expected auto, grey or rgb")
        if self.resize is not None and (
            len(self.resize) != 2 or min(int(v) for v in self.resize) < 1
        ):
            raise UsageError(f"--resize {self.resize}: expected two positive integers H,W")


def _open(path: Path):
    """PIL image of ``path`` (header read, pixels not yet decoded); corrupt files are UsageErrors."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UsageError(f"{path}: unreadable or corrupt image ({e})") from None


class ImageFolderArray:
    """A read-only (N, C, H, W) uint8 array over image files, decoded only when indexed.

    ``array[i]``, ``array[a:b]``, ``array[[i, j]]`` decode just those images, so a folder far
    larger than memory is streamed batch by batch (``DataSource.batches``, ``take``).
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(
        self, files: list[Path], channels: int, size: tuple[int, int], resize: bool
    ) -> None:
        self.files, self.channels, self.size, self.resize = files, channels, size, resize
        self.shape = (len(files), channels, *size)
        self.decoded = 0  # images decoded so far (for tests and diagnostics)

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, i: int) -> np.ndarray:
        from PIL import Image

        path = self.files[i]
        with _open(path) as im:
            try:
                im = im.convert("L" if self.channels == 1 else "RGB")
                if self.resize and im.size != (self.size[1], self.size[0]):
                    im = im.resize((self.size[1], self.size[0]), Image.Resampling.BICUBIC)
                arr = np.asarray(im, dtype=np.uint8)
            except (OSError, SyntaxError, ValueError) as e:
                raise UsageError(f"{path}: unreadable or corrupt image ({e})") from None
        self.decoded += 1
        if arr.shape[:2] != self.size:  # a file changed since the folder was scanned
            raise UsageError(
                f"{path}: image size {arr.shape[1]}x{arr.shape[0]} differs from the folder's "
                f"{self.size[1]}x{self.size[0]}"
            )
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self._decode(int(index) % len(self))
        rows = np.arange(len(self))[index]
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        for k, i in enumerate(rows):
            out[k] = self._decode(int(i))
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def load_image_folder(path: Path, options: ImageOptions | None = None) -> DataSource:
    """All PNG/JPEG/BMP files below ``path`` (sorted) as (N, C, H, W) scaled to [-1, 1].

    Only the headers are read here; pixels are decoded when rows are taken (``ImageFolderArray``).
    Channels and sizes follow ``options`` (see ``ImageOptions``); a folder that mixes grey and
    colour, or sizes, without a flag that converts them, is refused naming two such files.
    """
    opts = options or ImageOptions()
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"{path}: no images (.png, .jpg, .jpeg, .bmp) found")
    first_size: dict[tuple[int, int], Path] = {}
    first_kind: dict[str, Path] = {}
    for f in files:
        with _open(f) as im:
            w, h = im.size
            kind = "grey" if im.mode in _GREY_MODES else "colour"
        first_size.setdefault((h, w), f)
        first_kind.setdefault(kind, f)
        if opts.resize is None and len(first_size) > 1:
            (s0, f0), (s1, f1) = first_size.items()
            raise UsageError(
                f"{f1}: image size {s1[1]}x{s1[0]} differs from {f0}'s {s0[1]}x{s0[0]}; "
                "pass --resize H,W to resize every image to one size"
            )
        if opts.channels == "auto" and len(first_kind) > 1:
            raise UsageError(
                f"{path}: mixes grey ({first_kind['grey']}) and colour ({first_kind['colour']}) "
                "images; pass --channels rgb or --channels grey to convert them all"
            )
    if opts.channels == "auto":
        channels = 1 if "grey" in first_kind else 3
    else:
        channels = 1 if opts.channels == "grey" else 3
    size = tuple(opts.resize) if opts.resize is not None else next(iter(first_size))
    array = ImageFolderArray(files, channels, size, resize=opts.resize is not None)
    src = DataSource(str(path), array, kind="images", scale=(127.5, 1 / 127.5))  # type: ignore[arg-type]
    src.files = files
    return src
