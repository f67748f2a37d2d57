"""Atomic writes: write to a temporary file in the target folder, fsync, then rename.

An interrupted run therefore never leaves a half-written report or checkpoint (SPEC §5). The
file gets the permissions an ordinary ``open()`` would give it, ``0o666 & ~umask`` (a temporary
file starts private, 0600, so its mode is set before the rename). A write the disk refuses
(full, over quota, read-only, not permitted) is the user's to fix, not a bug: it becomes one
line naming the file (``write_failure``), and the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from latentdist.errors import UsageError

_UMASK_LOCK = threading.Lock()
# errno of a write the user's disk refused -> what the one-line error says
WRITE_FAILURES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def refused_write(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` if a disk refused a write (anywhere in its chain: ``torch.save``
    reports a full disk as a RuntimeError whose context is the OSError), else None. An
    interrupt or a ``UsageError`` is never one: they stay what they are."""
    if not isinstance(err, Exception) or isinstance(err, UsageError):
        return None
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_FAILURES:
            return e
        e = e.__cause__ or e.__context__
    return None


def write_failure(err: BaseException, target: str) -> UsageError | None:
    """The one-line error for a write to ``target`` the disk refused; None for anything else,
    which stays a bug."""
    cause = refused_write(err)
    if cause is None:
        return None
    return UsageError(f"{target}: cannot write: {WRITE_FAILURES[cause.errno]}")


def current_umask() -> int:
    """The process's umask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` on success.

    The file's mode is ``0o666 & ~umask``, as ``open(path, "w")`` would create it. A full or
    read-only disk raises a one-line ``UsageError`` naming ``path``; no temporary file remains.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        failure = write_failure(e, str(path))
        if failure is None:
            raise
        raise failure from e
    try:
        if hasattr(os, "fchmod"):  # POSIX
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        failure = write_failure(e, str(path))
        if failure is None:
            raise
        raise failure from e


def _jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays, and non-finite floats (to null), for JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / torch arrays and scalars
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_json(obj: Any, indent: int | None = 2) -> str:
    """Serialise ``obj`` as strict JSON (NaN/Inf become null)."""
    return json.dumps(_jsonable(obj), indent=indent, allow_nan=False)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(to_json(obj))
        f.write("\n")


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_text(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def save_figure(path: str | os.PathLike, fig: Any, **kwargs: Any) -> None:
    """Save a matplotlib figure to ``path`` atomically (format from the suffix)."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", **kwargs)
