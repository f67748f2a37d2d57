"""A command's output folder (``--out``): checked up front and held by one run at a time.

A read-only, full or unwritable folder is found before a long run starts, not when its first
checkpoint is due; two runs writing the same folder at once would interleave each other's
checkpoints and reports, so the second one stops with one line and touches nothing of the
first's (SPEC §5). The lock is ``flock`` on ``OUT/.latentdist.lock``: the kernel releases it
when its holder dies, so a lock file a killed run left behind never blocks the next one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from latentdist._io import WRITE_FAILURES, refused_write
from latentdist.errors import UsageError

try:
    import fcntl
except ImportError:  # no flock (Windows): runs are not locked
    fcntl = None

LOCK_NAME = ".latentdist.lock"
_PROBE_BYTES = b"\0" * 4096  # one block: a full disk refuses it even where an empty file fits


def _refusal(out: Path, err: OSError, what: str) -> UsageError:
    if err.errno == errno.ENOTDIR:
        return UsageError(f"--out {out}: {what}: a folder on its path is a file")
    cause = WRITE_FAILURES.get(err.errno) or (err.strerror or str(err)).lower()
    return UsageError(f"--out {out}: {what}: {cause}")


def _write_error(err: Exception, out: Path) -> UsageError | None:
    """A write the disk refused during the run, named by its file where the error names one.
    "Permission denied" counts only on a file inside ``out``: elsewhere it is an input's."""
    cause = refused_write(err)
    if cause is None:
        return None
    name = cause.filename if isinstance(cause.filename, (str, os.PathLike)) else None
    inside = name is not None and Path(os.path.abspath(name)).is_relative_to(out.absolute())
    if cause.errno in (errno.EACCES, errno.EPERM) and not inside:
        return None
    target = str(name) if name is not None else f"--out {out}"
    return UsageError(f"{target}: cannot write: {WRITE_FAILURES[cause.errno]}")


def _create(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents; return the folders this call created."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    missing = []
    p = out
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            if not d.is_dir():
                _remove_empty(created)
                raise UsageError(f"--out {out}: {d} exists and is not a folder") from None
            continue  # another run made it first
        except OSError as e:
            _remove_empty(created)
            raise _refusal(out, e, "cannot create the folder") from e
        created.append(d)
    return created


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders this run created if nothing was written in them (deepest first)."""
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            return  # not empty (or gone): leave it and its parents


def _probe(out: Path) -> None:
    """Write and remove one block in ``out``, so that a read-only or full disk fails now."""
    try:
        fd, name = tempfile.mkstemp(dir=out, prefix=".latentdist-probe-", suffix=".tmp")
        try:
            try:
                os.write(fd, _PROBE_BYTES)
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
    except OSError as e:
        raise _refusal(out, e, "cannot write") from e


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it into the lock file."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode())
        return (
            f"latentdist {owner['command']}, pid {owner['pid']} on {owner['host']}, "
            f"started {owner['started']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown: it is starting"


def _acquire(lock: Path, out: Path) -> int | None:
    """The lock file's descriptor, locked; None where the file system has no locks."""
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise _refusal(out, e, "cannot write") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UsageError(
                f"--out {out} is in use by another latentdist run ({holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        except OSError:  # ENOLCK, EOPNOTSUPP: this file system cannot lock
            os.close(fd)
            return None
        with contextlib.suppress(FileNotFoundError):
            st, now = os.fstat(fd), os.stat(lock)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                return fd
        os.close(fd)  # its holder removed the file as we opened it: lock the new one
    raise UsageError(f"--out {out} is in use by other latentdist runs; choose another --out")


@contextlib.contextmanager
def _locked(out: Path, command: str) -> Iterator[None]:
    """Hold ``OUT/.latentdist.lock`` (with who holds it written inside) for the block."""
    lock = out / LOCK_NAME
    fd = _acquire(lock, out) if fcntl is not None else None
    if fd is None:
        yield
        return
    try:
        owner = {
            "command": command,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner).encode(), 0)
        except OSError as e:
            raise _refusal(out, e, "cannot write") from e
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still locked: the next run locks a file of its own
        os.close(fd)


@contextlib.contextmanager
def output_folder(path: str | os.PathLike | None, command: str) -> Iterator[Path | None]:
    """Hold ``path`` as this run's output folder: refuse a file there, create it, lock it
    against other runs and prove it writable before the work starts; a write the disk refuses
    during the block (full, read-only) becomes a one-line ``UsageError``. Folders it created
    and nothing was written in are removed at the end. ``path=None`` does nothing; under
    torchrun only rank 0 (the one process that writes) takes the folder."""
    if path is None:
        yield None
        return
    out = Path(path)
    if os.environ.get("RANK", "0") != "0":
        yield out
        return
    created = _create(out)
    try:
        with _locked(out, command):
            _probe(out)
            try:
                yield out
            except Exception as e:
                failure = _write_error(e, out)
                if failure is None:
                    raise
                raise failure from e
    finally:
        _remove_empty(created)
