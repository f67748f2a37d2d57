"""The output folder (issue 22, item 4): an --out that is a file, a read-only or full disk, two
runs on the same --out at once. One line each, exit 2, nothing half-written, the other run
unharmed, for every command that writes an --out."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import latentdist as ld
import latentdist._io as lio
from latentdist.errors import UsageError
from latentdist.outdir import LOCK_NAME, output_folder
from tests._cli import run_cli

REPO = Path(__file__).resolve().parents[1]
TINY_DAE = ["--data", "digits", "--base-width", "4", "--downsample", "2", "--latent-channels", "2", "--batch-size", "16", "--stage1-steps", "2", "--stage2-steps", "2", "--checkpoint-every", "2", "--log-every", "1", "--no-progress"]  # fmt: skip
ON_LINUX = pytest.mark.skipif(
    not (Path("/dev/full").exists() and Path("/proc/self/fd").is_dir()),
    reason="needs /dev/full and /proc (Linux)",
)


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    """Small sample and reference arrays for ``distance``."""
    folder = tmp_path_factory.mktemp("arrays")
    x = ld.load_data("digits").take().numpy()
    np.save(folder / "a.npy", x[:200])
    np.save(folder / "b.npy", x[200:500])
    return folder


def _args(command: str, out: Path, arrays: Path) -> list[str]:
    """The smallest run of ``command`` writing to ``out``."""
    if command == "distance":
        a, b = str(arrays / "a.npy"), str(arrays / "b.npy")
        return ["distance", a, "--data", b, "--n-eval", "50", "--seeds", "2", "--quiet", "--out", str(out)]  # fmt: skip
    if command == "train-dae":
        return ["train-dae", *TINY_DAE, "--out", str(out)]
    return ["demo", "--data", "digits", "--steps", "2", "--device", "cpu", "--quiet", "--out", str(out)]  # fmt: skip


COMMANDS = ("distance", "train-dae", "demo")


def _one_line_exit_2(code, err) -> str:
    assert code == 2, err
    assert err.startswith("latentdist: error: ") and len(err.strip().splitlines()) == 1, err
    return err.strip()


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (hidden ones included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- an --out that is a file


@pytest.mark.parametrize("command", COMMANDS)
def test_out_that_is_a_file_or_under_one(command, tmp_path, capsys, arrays):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    err = _one_line_exit_2(*run_cli(_args(command, afile, arrays), capsys)[::2])
    assert "afile" in err and "is a file" in err
    err = _one_line_exit_2(*run_cli(_args(command, afile / "sub", arrays), capsys)[::2])
    assert "afile/sub" in err and "a folder on its path is a file" in err
    assert afile.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["afile"]


def test_api_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with (
        pytest.raises(UsageError, match="exists and is not a folder"),
        output_folder(tmp_path / "f", "t"),
    ):
        pass


# ---------------------------------------------------------------- read-only


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_folder_refused_up_front(command, tmp_path, capsys, arrays):
    out = tmp_path / "ro"
    out.mkdir()
    (out / "old.txt").write_text("old")
    out.chmod(0o555)
    try:
        try:
            (out / "probe").write_text("")
        except PermissionError:
            pass
        else:  # root (CAP_DAC_OVERRIDE) ignores modes
            (out / "probe").unlink()
            pytest.skip("this process may write to a read-only folder (root)")
        err = _one_line_exit_2(*run_cli(_args(command, out, arrays), capsys)[::2])
        assert f"--out {out}" in err and "permission denied" in err
        assert _tree(out) == {"old.txt": b"old"}
    finally:
        out.chmod(0o755)


def _refuse_under(monkeypatch, root: Path, err: int) -> None:
    """Make creating anything under ``root`` fail with ``err``, as a read-only disk would."""

    def guard(real):
        def call(path, *a, **kw):
            inside = Path(os.path.abspath(os.fsdecode(path))).is_relative_to(root.absolute())
            if inside:
                raise OSError(err, os.strerror(err), os.fsdecode(path))
            return real(path, *a, **kw)

        return call

    monkeypatch.setattr(os, "open", guard(os.open))
    monkeypatch.setattr(os, "mkdir", guard(os.mkdir))


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_file_system_refused_up_front(command, tmp_path, capsys, arrays, monkeypatch):
    """An existing folder and a new one on a read-only disk: one line naming the cause, before
    any work (the refusal comes before data is read), nothing written."""
    old, new = tmp_path / "old", tmp_path / "new" / "deeper"
    old.mkdir()
    (old / "run.json").write_text("{}")
    _refuse_under(monkeypatch, tmp_path, errno.EROFS)
    err = _one_line_exit_2(*run_cli(_args(command, old, arrays), capsys)[::2])
    assert f"--out {old}: cannot write: read-only file system" in err
    err = _one_line_exit_2(*run_cli(_args(command, new, arrays), capsys)[::2])
    assert f"--out {new}: cannot create the folder: read-only file system" in err
    monkeypatch.undo()
    assert _tree(tmp_path) == {"old/run.json": b"{}"} and not (tmp_path / "new").exists()


# ---------------------------------------------------------------- full disk


class _FullDisk:
    """``os`` as ``latentdist._io`` sees it, except that the files whose names contain ``part``
    are written to /dev/full: the real ENOSPC, from the real write path (torch.save included)."""

    def __init__(self, part: str):
        self.part = part

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, fd, mode="r"):
        if self.part not in os.readlink(f"/proc/self/fd/{fd}"):
            return os.fdopen(fd, mode)
        os.close(fd)
        return open("/dev/full", mode)  # noqa: SIM115 (closed by atomic_open)


@ON_LINUX
@pytest.mark.parametrize("what", ["small", "large"])
def test_atomic_write_on_a_full_disk(what, tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError: still one line naming the file; the
    file before the write is intact and no temporary file remains."""
    path = tmp_path / "checkpoint.pt"
    lio.save_torch(path, {"step": 1})
    before = path.read_bytes()
    monkeypatch.setattr(lio, "os", _FullDisk("checkpoint.pt"))
    size = 3 if what == "small" else 100_000
    with pytest.raises(UsageError, match=f"^{path}: cannot write: no space left on device$"):
        lio.save_torch(path, {"w": torch.zeros(size)})
    assert os.listdir(tmp_path) == ["checkpoint.pt"] and path.read_bytes() == before


def test_interrupts_and_other_errors_stay_what_they_are(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")
    assert lio.write_failure(full, "x") is not None
    assert lio.write_failure(OSError(errno.EIO, "I/O error"), "x") is None
    assert lio.write_failure(KeyboardInterrupt(), "x") is None
    assert lio.write_failure(UsageError("bad flag"), "x") is None
    # "permission denied" on a file outside --out is an input's problem, not the folder's
    with pytest.raises(PermissionError), output_folder(tmp_path / "o", "t"):
        raise PermissionError(errno.EACCES, "Permission denied", "/elsewhere/data.npy")
    with (
        pytest.raises(UsageError, match="no space left on device"),
        output_folder(tmp_path / "o", "t"),
    ):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not (tmp_path / "o").exists()  # created by the runs, nothing written: removed


@ON_LINUX
def test_distance_on_a_full_disk_keeps_the_old_report(tmp_path, capsys, arrays, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "distance.json").write_text('{"old": true}\n')
    monkeypatch.setattr(lio, "os", _FullDisk("distance.json"))
    err = _one_line_exit_2(*run_cli(_args("distance", out, arrays), capsys)[::2])
    assert f"{out / 'distance.json'}: cannot write: no space left on device" in err
    assert _tree(out) == {"distance.json": b'{"old": true}\n'}


@ON_LINUX
def test_train_dae_disk_full_at_a_checkpoint(tmp_path, capsys, monkeypatch):
    """The disk fills when the first checkpoint is due: one line naming it, no checkpoint and
    no temporary file left; the lock is gone."""
    out = tmp_path / "run"
    monkeypatch.setattr(lio, "os", _FullDisk("checkpoint.pt"))
    err = _one_line_exit_2(*run_cli(_args("train-dae", out, None), capsys)[::2])
    assert f"{out / 'checkpoint.pt'}: cannot write: no space left on device" in err
    names = set(_tree(out))
    assert "checkpoint.pt" not in names and not any(n.endswith(".tmp") for n in names)
    assert LOCK_NAME not in names


# ---------------------------------------------------------------- two runs at once


@pytest.mark.parametrize("command", COMMANDS)
def test_second_run_on_a_held_folder(command, tmp_path, capsys, arrays):
    """While one run holds --out, another stops with one line naming the holder and touches
    nothing; the holder finishes unharmed and the lock goes with it."""
    out = tmp_path / "o"
    with output_folder(out, "holder"):
        (out / "mine.txt").write_text("first")
        before = _tree(out)
        err = _one_line_exit_2(*run_cli(_args(command, out, arrays), capsys)[::2])
        assert f"--out {out} is in use by another latentdist run" in err
        assert f"latentdist holder, pid {os.getpid()}" in err
        assert _tree(out) == before
        (out / "mine.txt").write_text("first, finished")
    assert _tree(out) == {"mine.txt": b"first, finished"}


def _holder(out: Path) -> subprocess.Popen:
    code = (
        "import sys, time\n"
        "from latentdist.outdir import output_folder\n"
        "with output_folder(sys.argv[1], 'holder'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_another_process_holds_then_is_killed(tmp_path, capsys, arrays):
    """A lock held by another process blocks; once that process is killed (SIGKILL: no clean
    up, its lock file stays behind) the next run goes ahead."""
    out = tmp_path / "o"
    proc = _holder(out)
    try:
        err = _one_line_exit_2(*run_cli(_args("distance", out, arrays), capsys)[::2])
        assert f"pid {proc.pid}" in err and not (out / "distance.json").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / LOCK_NAME).is_file()  # the stale lock file a killed run leaves
    code, _, err = run_cli(_args("distance", out, arrays), capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["distance.json"]


def test_stale_lock_file_does_not_block(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / LOCK_NAME).write_text('{"command": "measure", "pid": 999999, "host": "h"}')
    with output_folder(out, "t"):
        assert str(os.getpid()) in (out / LOCK_NAME).read_text()
    assert os.listdir(out) == []


def test_lock_is_released_for_the_next_run(tmp_path):
    """Runs one after another (the lock file removed between them) each get the folder."""
    out = tmp_path / "o"
    for i in range(3):
        with output_folder(out, "t"):
            (out / f"{i}.txt").write_text("x")
    assert sorted(os.listdir(out)) == ["0.txt", "1.txt", "2.txt"]


def test_only_rank_0_takes_the_folder(tmp_path, monkeypatch):
    """Under torchrun the other ranks write nothing, so they neither lock nor create."""
    out = tmp_path / "o"
    with output_folder(out, "holder"):
        monkeypatch.setenv("RANK", "1")
        with output_folder(out, "rank 1"):
            pass
        with output_folder(tmp_path / "new", "rank 1"):
            pass
    assert not (tmp_path / "new").exists()


def test_none_is_a_no_op():
    with output_folder(None, "t") as out:
        assert out is None


def test_bad_input_leaves_no_folder(tmp_path, capsys, arrays):
    """A run refused for its input removes the --out it created: nothing half-written."""
    out = tmp_path / "new" / "o"
    args = _args("distance", out, arrays)
    args[args.index("--n-eval") + 1] = "5000"
    _one_line_exit_2(*run_cli(args, capsys)[::2])
    assert not (tmp_path / "new").exists()


def test_train_dae_resume_and_overwrite_under_the_lock(tmp_path, capsys):
    """The lock leaves train-dae's own rules as they were: a finished run is refused without
    --overwrite, replaced with it; no lock or probe file is left in the run."""
    out = tmp_path / "run"
    code, _, err = run_cli(_args("train-dae", out, None), capsys)
    assert code == 0, err
    files = set(_tree(out))
    assert not any(n.startswith(".") for n in files) and "checkpoint.pt" in files
    err = _one_line_exit_2(*run_cli(_args("train-dae", out, None), capsys)[::2])
    assert "holds a finished run" in err
    code, _, err = run_cli([*_args("train-dae", out, None), "--overwrite"], capsys)
    assert code == 0, err
    assert set(_tree(out)) == files


# ---------------------------------------------------------------- a real full disk (root only)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs, where the machine lets this process mount one (root, not in most CI)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount")):
        pytest.skip("mounting a tmpfs needs root")
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_really_full_disk(tiny_tmpfs, capsys):
    """On a disk that is actually full: refused up front; with room for the start only, the
    run stops at the first file that does not fit, with no temporary file left."""
    filler = tiny_tmpfs / "filler"
    filler.write_bytes(b"\0" * 64 * 1024)
    out = tiny_tmpfs / "run"
    err = _one_line_exit_2(*run_cli(_args("train-dae", out, None), capsys)[::2])
    assert f"--out {out}: cannot write: no space left on device" in err
    assert not out.exists()
    filler.write_bytes(b"\0" * 20 * 1024)
    t0 = time.time()
    err = _one_line_exit_2(*run_cli(_args("train-dae", out, None), capsys)[::2])
    assert "no space left on device" in err and time.time() - t0 < 300
    assert not any(n.endswith(".tmp") for n in _tree(out)) and LOCK_NAME not in _tree(out)
