"""Load arrays (.npy, .npz, .pt, .safetensors, .csv) and folders of images (read lazily)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentdist.data.source import DataSource
from latentdist.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
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


# ----------------------------------------------------------------- what each image mode becomes
# Every file is classified from its header (mode, and the raw layout Pillow decodes it from) when
# the folder is scanned, so a file that cannot be read faithfully is refused before any work.
_GREY8 = ("1", "L", "LA", "La")
_COLOUR8 = ("P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
_ALPHA8 = ("LA", "La", "PA", "RGBA", "RGBa")
_GREY16_RAW = ("I;16", "I;16B", "I;16L", "I;16N")  # 16-bit unsigned grey (PNG, TIFF, ...)
# 16-bit colour Pillow unpacks to 8 bits (its high byte); the low byte is read in a second decode
# of the same file with the byte order swapped (`_deep_colour`).
_COLOUR16_RAW = ("RGB;16B", "RGB;16L", "RGBA;16B", "RGBA;16L", "RGBX;16B", "RGBX;16L")
_GREY_ALPHA16_RAW = "LA;16B"  # 16-bit grey + alpha PNG (Pillow opens it as RGBA, 8 bits)
_ORIENTATION = 0x0112  # EXIF tag 274
_MULTI_FRAME_OK = ("MPO",)  # a camera JPEG with extra pictures: its first is the photograph


@dataclass(frozen=True)
class _Kind:
    """How one file is read: ``grey`` (C=1) or colour, 16-bit ``deep`` or 8-bit, with ``alpha``."""

    grey: bool
    deep: bool
    alpha: bool
    orientation: int  # EXIF orientation 1..8 (1: as stored)


def _rawmode(im) -> str:
    """The raw layout Pillow decodes ``im``'s pixels from ("" when it does not say)."""
    if not im.tile:
        return ""
    args = im.tile[0].args if hasattr(im.tile[0], "args") else im.tile[0][3]
    if isinstance(args, str):
        return args
    return args[0] if isinstance(args, tuple) and args and isinstance(args[0], str) else ""


def _orientation(im) -> int:
    """The EXIF orientation (1..8) of ``im`` without decoding pixels; 1 when absent or invalid."""
    if im.format == "PNG" and "exif" not in im.info:  # EXIF after the pixels: reading it decodes
        return 1
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block does not make the pixels unreadable
        return 1
    return value if value in range(1, 9) else 1


def _kind(path: Path, im) -> _Kind:
    """Classify an opened (not decoded) image, or refuse it with one line naming ``path``."""
    mode, raw = im.mode, _rawmode(im)
    frames = getattr(im, "n_frames", 1)
    if frames > 1 and im.format not in _MULTI_FRAME_OK:
        raise UsageError(
            f"{path}: holds {frames} frames (an animation or a stack) and only single images are "
            "read; save the frame to use as an image of its own"
        )
    has_trns = im.info.get("transparency") is not None
    o = _orientation(im)
    if mode in _GREY16_RAW or (mode == "I" and raw in _GREY16_RAW):
        if raw and raw not in _GREY16_RAW:
            raise UsageError(
                f"{path}: {raw} samples in a 16-bit image are not read; save it as a 16-bit PNG"
            )
        return _Kind(grey=True, deep=True, alpha=has_trns, orientation=o)
    if mode in ("I", "F"):
        what = "floating-point" if mode == "F" else "32-bit or signed integer"
        raise UsageError(
            f"{path}: holds {what} pixels (mode {mode}), which have no fixed range; scale them to "
            "8- or 16-bit and save a PNG, or save the pixels as an .npy array (N, C, H, W), "
            "whose values are used as they are"
        )
    if raw == _GREY_ALPHA16_RAW:
        return _Kind(grey=True, deep=True, alpha=True, orientation=o)
    if raw in _COLOUR16_RAW:
        alpha = raw.startswith("RGBA") or isinstance(im.info.get("transparency"), tuple)
        return _Kind(grey=False, deep=True, alpha=alpha, orientation=o)
    if raw.endswith((";16B", ";16L", ";16N")):
        raise UsageError(
            f"{path}: 16-bit {raw} samples, which Pillow reads only to 8 bits, are not read; "
            "save it as a 16-bit RGB or RGBA PNG"
        )
    if mode in _GREY8 or mode in _COLOUR8:
        alpha = mode in _ALPHA8 or (has_trns and mode in ("1", "L", "P", "RGB"))
        return _Kind(grey=mode in _GREY8, deep=False, alpha=alpha, orientation=o)
    raise UsageError(f"{path}: image mode {mode} is not read; save it as an RGB or greyscale image")


def _composite(arr: np.ndarray, top: int) -> np.ndarray:
    """(H, W, C+1) pixels with alpha last, composited onto white: round((v*a + top*(top-a))/top)."""
    v, a = arr[..., :-1].astype(np.uint64), arr[..., -1:].astype(np.uint64)
    out = (v * a + top * (top - a) + top // 2) // top
    return out.astype(arr.dtype)


def _luma16(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of 16-bit RGB, with Pillow's fixed-point weights (as its RGB -> L)."""
    r, g, b = (rgb[..., k].astype(np.uint64) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint16)


def _transposed(im, orientation: int):
    """``im`` turned upright by its EXIF orientation (as ``ImageOps.exif_transpose``)."""
    from PIL import Image

    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation)
    return im if method is None else im.transpose(method)


def _with_rawmode(path: Path, rawmode: str, orientation: int) -> np.ndarray:
    """``path`` decoded by Pillow from the raw layout ``rawmode`` instead of its own."""
    from PIL import ImageFile

    tile = getattr(ImageFile, "_Tile", lambda *t: t)  # a plain tuple before Pillow 11
    with _open(path) as im:
        tiles = []
        for t in im.tile:
            args = t.args if hasattr(t, "args") else t[3]
            args = rawmode if isinstance(args, str) else (rawmode, *args[1:])
            tiles.append(tile(t[0], t[1], t[2], args))
        im.tile = tiles
        im.load()
        return np.asarray(_transposed(im, orientation))


def _deep_pixels(path: Path, im, kind: _Kind) -> np.ndarray:
    """(H, W, C) uint16 pixels of a 16-bit image, alpha (if any) last, upright."""
    raw = _rawmode(im)
    if raw == _GREY_ALPHA16_RAW:  # 4 bytes L-hi L-lo A-hi A-lo, read as four 8-bit channels
        b = _with_rawmode(path, "RGBA", kind.orientation).astype(np.uint16)
        return np.stack([b[..., 0] << 8 | b[..., 1], b[..., 2] << 8 | b[..., 3]], axis=-1)
    if raw in _COLOUR16_RAW:  # the unpacker keeps one byte of each sample: decode once per byte
        swapped = raw[:-1] + ("L" if raw.endswith("B") else "B")
        hi = np.asarray(_transposed(im, kind.orientation)).astype(np.uint16)
        lo = _with_rawmode(path, swapped, kind.orientation).astype(np.uint16)
        rgb = hi << 8 | lo
        trns = im.info.get("transparency")
        if kind.alpha and isinstance(trns, tuple) and rgb.shape[-1] == 3:  # a tRNS colour
            clear = (rgb == np.asarray(trns, np.uint16)).all(-1, keepdims=True)
            return np.concatenate([rgb, np.where(clear, 0, 65535).astype(np.uint16)], -1)
        return rgb
    grey = np.asarray(_transposed(im, kind.orientation)).astype(np.uint16)[..., None]
    trns = im.info.get("transparency")
    if kind.alpha and isinstance(trns, int):  # a tRNS grey value: that value is transparent
        return np.concatenate([grey, np.where(grey == trns, 0, 65535).astype(np.uint16)], -1)
    return grey


class ImageFolderArray:
    """A read-only (N, C, H, W) array over image files, decoded only when indexed.

    uint8 for a folder of 8-bit images (values 0..255), uint16 once any image holds 16-bit samples
    (values 0..65535; 8-bit images are then multiplied by 257, which maps 255 to 65535 exactly).
    ``array[i]``, ``array[a:b]``, ``array[[i, j]]`` decode just those images, so a folder far
    larger than memory is streamed batch by batch (``DataSource.batches``, ``take``).
    """

    ndim = 4

    def __init__(
        self,
        files: list[Path],
        channels: int,
        size: tuple[int, int],
        resize: bool,
        deep: bool = False,
    ) -> None:
        self.files, self.channels, self.size, self.resize = files, channels, size, resize
        self.dtype = np.dtype(np.uint16 if deep else np.uint8)
        self.shape = (len(files), channels, *size)
        self.decoded = 0  # images decoded so far (for tests and diagnostics)

    def __len__(self) -> int:
        return len(self.files)

    def _pixels8(self, im, kind: _Kind) -> np.ndarray:
        """(H, W[, 3]) uint8 of an 8-bit image: upright, alpha composited onto white, converted
        to L or RGB, then resized: for an opaque L/RGB file exactly Pillow's convert + resize."""
        from PIL import Image

        im = _transposed(im, kind.orientation)
        if kind.alpha:
            with_alpha = "LA" if kind.grey else "RGBA"
            flat = _composite(np.asarray(im.convert(with_alpha)), 255)
            im = Image.fromarray(flat[..., 0] if kind.grey else flat)
        im = im.convert("L" if self.channels == 1 else "RGB")
        if self.resize and im.size != (self.size[1], self.size[0]):
            im = im.resize((self.size[1], self.size[0]), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)

    def _pixels16(self, path: Path, im, kind: _Kind) -> np.ndarray:
        """(H, W[, 3]) uint16 of a 16-bit image: upright, alpha composited onto white,
        converted to grey (Pillow's luma weights) or RGB, resized bicubic in floating point."""
        from PIL import Image

        arr = _deep_pixels(path, im, kind)
        if kind.alpha:
            arr = _composite(arr, 65535)
        if self.channels == 1 and arr.shape[-1] == 3:
            arr = _luma16(arr)[..., None]
        elif self.channels == 3 and arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        h, w = self.size
        if self.resize and arr.shape[:2] != (h, w):
            planes = [
                np.asarray(
                    Image.fromarray(arr[..., k].astype(np.float32), "F").resize(
                        (w, h), Image.Resampling.BICUBIC
                    )
                )
                for k in range(arr.shape[-1])
            ]
            arr = np.clip(np.rint(np.stack(planes, -1)), 0, 65535).astype(np.uint16)
        return arr[..., 0] if self.channels == 1 else arr

    def _decode(self, i: int) -> np.ndarray:
        path = self.files[i]
        with _open(path) as im:
            kind = _kind(path, im)  # the file may have changed since the folder was scanned
            try:
                if kind.deep:
                    arr = self._pixels16(path, im, kind)
                else:
                    arr = self._pixels8(im, kind)
                    if self.dtype == np.uint16:
                        arr = arr.astype(np.uint16) * np.uint16(257)
            except (OSError, SyntaxError, ValueError) as e:
                raise UsageError(f"{path}: unreadable or corrupt image ({e})") from None
        self.decoded += 1
        if arr.shape[:2] != self.size or (self.dtype == np.uint8 and kind.deep):
            raise UsageError(  # a file changed since the folder was scanned
                f"{path}: image size {arr.shape[1]}x{arr.shape[0]} differs from the folder's "
                f"{self.size[1]}x{self.size[0]}"
                if arr.shape[:2] != self.size
                else f"{path}: became a 16-bit image since the folder was scanned; load it again"
            )
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self._decode(int(index) % len(self))
        rows = np.arange(len(self))[index]
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for k, i in enumerate(rows):
            out[k] = self._decode(int(i))
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def load_image_folder(path: Path, options: ImageOptions | None = None) -> DataSource:
    """All image files below ``path`` (sorted) as (N, C, H, W) scaled to [-1, 1].

    Only the headers are read here; pixels are decoded when rows are taken (``ImageFolderArray``).
    Channels and sizes follow ``options`` (see ``ImageOptions``); a folder that mixes grey and
    colour, or sizes, without a flag that converts them, is refused naming two such files. How
    each image mode is read (bit depth, palette, alpha, EXIF orientation, frames) is in
    docs/formats.md; a file that cannot be read faithfully is refused naming it.
    """
    opts = options or ImageOptions()
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    first_size: dict[tuple[int, int], Path] = {}
    first_kind: dict[str, Path] = {}
    deep = False
    for f in files:
        with _open(f) as im:
            kind = _kind(f, im)
            w, h = im.size
        if kind.orientation in (5, 6, 7, 8):  # turned upright, width and height swap
            w, h = h, w
        deep = deep or kind.deep
        first_size.setdefault((h, w), f)
        first_kind.setdefault("grey" if kind.grey else "colour", f)
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
    array = ImageFolderArray(files, channels, size, resize=opts.resize is not None, deep=deep)
    half = 65535 / 2 if deep else 127.5
    src = DataSource(str(path), array, kind="images", scale=(half, 1 / half))  # type: ignore[arg-type]
    src.files = files
    return src
