"""Data and encoder loading: everything that turns a user's path or name into tensors."""

from __future__ import annotations

import os
from pathlib import Path

from latentdist.data.builtin import BUILTIN, load_builtin
from latentdist.data.files import ImageOptions, load_array_file, load_image_folder
from latentdist.data.source import DataSource
from latentdist.errors import UsageError

__all__ = ["BUILTIN", "DataSource", "ImageOptions", "load_data"]


def load_data(
    spec: str | os.PathLike, *, trust_pickle: bool = False, image: ImageOptions | None = None
) -> DataSource:
    """Load data from a built-in name (``digits``, ``mnist5k``, ``photos32``), an array file or an image folder.

    ``PATH:KEY`` selects one array of an ``.npz``/``.pt``/``.safetensors`` file holding several.
    Arrays of 4 dimensions (N, C, H, W) are treated as images, others as vectors; values are
    taken as they are (image folders and built-ins are scaled to [-1, 1]). ``image`` says how an
    image folder's channels and sizes are made uniform (``--channels``, ``--resize``); it is
    refused for anything but a folder.
    """
    text = str(spec)
    converts = image is not None and image != ImageOptions()
    if converts and (text in BUILTIN or not Path(text).is_dir()):
        flag = "--resize" if image.resize is not None else "--channels"
        raise UsageError(f"{flag}: only applies to a folder of images, not --data {text}")
    if text in BUILTIN:
        return load_builtin(text)
    path, key = Path(text), None
    if not path.exists() and ":" in text:
        head, _, key = text.rpartition(":")
        path = Path(head)
    if not path.exists():
        hint = f" (built-in names: {', '.join(BUILTIN)})" if os.sep not in text else ""
        raise UsageError(f"{text}: no such file or folder{hint}")
    if path.is_dir():
        return load_image_folder(path, image)
    if path.stat().st_size == 0:
        raise UsageError(f"{path}: file is empty")
    array = load_array_file(path, key=key, trust_pickle=trust_pickle)
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    kind = "images" if array.ndim == 4 else "vectors"
    return DataSource(str(path), array, kind=kind)
