"""Checkpoints of long computations, so that a killed run resumes to the result it would have had.

A ``Checkpoints`` folder belongs to one computation, named by a fingerprint of everything its
result depends on (inputs, settings, process count, versions). It holds one file per finished
piece of work (a ``Slot``: a fit's state at a step, a capacity's evaluation, a run of
``compare``), each written atomically (``_io.atomic_open``) and read back with
``torch.load(weights_only=True)``: plain tensors and Python values only, so a checkpoint file
never runs code, even one somebody replaced. Resumption is exact because every random stream a
piece of work draws from is saved with it (``rng_state``).

Opening a folder written for a different fingerprint is refused with one line naming what
changed, unless ``restart`` asks to start afresh. Without a folder (``Checkpoints(None)``) every
slot is empty and saving does nothing, so code that checkpoints reads the same either way.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdist._io import save_json, save_torch, to_json
from latentdist.errors import UsageError

FOLDER = "checkpoint"
DEFAULT_EVERY_S = 60.0  # a fit saves its state at most this often (and when it ends)


def rng_state() -> dict:
    """This process's torch, CUDA, NumPy and Python RNG states, as checkpointable values."""
    np_state = np.random.get_state()  # noqa: NPY002 (global state, saved for exact resumption)
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [py[0], list(py[1]), py[2]],
    }


def set_rng_state(s: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def plain(obj: Any) -> Any:
    """``obj`` with NumPy scalars and arrays as Python values and tensors, and subclasses of
    Python's scalars as those scalars, which ``torch.load(weights_only=True)`` reads back
    (values unchanged, NaN kept)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    for base in (bool, int, float, str):  # subclasses (torch's TorchVersion is a str) as such
        if isinstance(obj, base) and type(obj) is not base:
            return base(obj)
    return obj


def digest(*parts: Any) -> str:
    """A SHA-256 of bytes, tensors (their bytes, dtype and shape) and JSON-able values."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, bytes):
            h.update(p)
        elif isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(to_json(p, indent=None).encode())
    return h.hexdigest()[:20]


class Slot:
    """One piece of work's checkpoint file: ``load`` (None when absent), ``save``, and ``due``
    (whether ``every_s`` seconds have passed since this slot last saved)."""

    def __init__(self, path: Path | None, every_s: float = DEFAULT_EVERY_S):
        self.path, self.every_s = path, every_s
        self._last = time.monotonic()

    def load(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (a damaged file: one line, not a traceback)
            raise UsageError(
                f"{self.path}: unreadable checkpoint ({type(e).__name__}); pass --restart "
                "to start afresh"
            ) from None

    def save(self, payload: dict) -> None:
        if self.path is not None:
            save_torch(self.path, plain(payload))
        self._last = time.monotonic()

    def due(self) -> bool:
        return self.path is not None and time.monotonic() - self._last >= self.every_s


class Checkpoints:
    """The checkpoint folder of one computation (see the module docstring); ``folder=None``:
    nothing is kept. ``describe`` is what the fingerprint was made of, stored beside it so a
    refusal can name the setting that changed."""

    def __init__(
        self,
        folder: str | Path | None,
        fingerprint: str = "",
        describe: Mapping[str, Any] | None = None,
        *,
        restart: bool = False,
        every_s: float = DEFAULT_EVERY_S,
        owner: bool = True,
    ):
        self.folder = None if folder is None else Path(folder)
        self.fingerprint, self.every_s = fingerprint, every_s
        if self.folder is None:
            return
        meta = self.folder / "fingerprint.json"
        if restart and owner:
            shutil.rmtree(self.folder, ignore_errors=True)
        old = _read_meta(meta)
        if old is not None and old.get("fingerprint") != fingerprint:
            raise UsageError(
                f"{self.folder}: holds the checkpoint of a different computation "
                f"({_changed(old.get('describe') or {}, describe or {})}); rerun with the "
                "same inputs and settings to resume it, or pass --restart to start afresh"
            )
        if old is None and owner:
            save_json(meta, {"fingerprint": fingerprint, "describe": describe or {}})

    def slot(self, key: str) -> Slot:
        """The slot named ``key`` (a file name without suffix)."""
        path = None if self.folder is None else self.folder / f"{key}.pt"
        return Slot(path, self.every_s)


def remove(folder: str | Path | None) -> None:
    """Remove a checkpoint folder: its computation finished and the result is written."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Which described entries differ, as 'key: old -> new' (the first three)."""
    new = json.loads(to_json(new))  # as fingerprint.json holds it
    diffs = [
        f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    return "; ".join(diffs[:3]) or "a different fingerprint"


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."
