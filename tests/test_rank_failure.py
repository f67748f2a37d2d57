"""How a 2-process torchrun launch ends. Leaving the group frees it (gloo's threads and sockets
do not live on into the interpreter's exit, where ranks were seen to abort). A
process of a ``measure`` killed from outside (kill -9, as the out-of-memory killer does) stops the
launch cleanly: the survivor prints one line naming the dead rank and exits 2 within seconds,
nothing is written, and the same command then runs through.

(A rank that raises is ``tests/test_distributed.py``'s ``test_a_failing_rank_stops_every_rank``.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._cli import launch_failure, torchrun, torchrun_command

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")

FLAGS = [
    "--generator", "mlp", "--capacities", "4,8", "--seeds", "3", "--steps", "20",
    "--batch-size", "32", "--n-eval", "24", "--threads", "1", "--no-progress",
    "--encode-batch-size", "16", "--device", "cpu",
]  # fmt: skip
STOP_BOUND_S = 20  # torchrun's own backstop (SIGKILL to a survivor that ignores SIGTERM) is 30 s
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An image folder (64 8x8 grey images) and a TorchScript encoder to 2x2x2."""
    from PIL import Image

    root = tmp_path_factory.mktemp("kill")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(64):
        img = np.kron(rng.normal(size=(3, 3)), np.ones((3, 3)))[:8, :8]
        img = (255 * (img - img.min()) / (np.ptp(img) + 1e-9)).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 4, stride=4), torch.nn.Tanh())
    torch.jit.script(enc).save(str(root / "encoder.pt"))
    return root


LEAVE = """
import os
import torch
from latentdist import parallel

with parallel.session("cpu") as group:
    torch.optim.Adam(torch.nn.Linear(2, 2).parameters())  # as every fit does, once
    group.gather(lambda: group.rank)
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(f"rank {group.rank} threads after the session: {sorted(names)}", flush=True)
"""


def test_leaving_the_group_stops_gloo_threads(tmp_path):
    """An optimizer made in the session (torch.optim imports torch._dynamo, which then holds the
    group) once kept gloo's threads alive past ``destroy_process_group``."""
    (tmp_path / "leave_group.py").write_text(LEAVE)
    proc = torchrun(["leave_group"], cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, launch_failure(proc.stderr)
    # the two ranks' lines reach torchrun's stdout unordered, at times without the newline
    # between them: read each report by its pattern, not by line
    reports = sorted(re.findall(r"rank (\d) threads after the session: (\[[^\]]*\])", proc.stdout))
    assert [r for r, _ in reports] == ["0", "1"], proc.stdout
    assert not [t for _, t in reports if "gloo" in t], reports


def workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of the torchrun agent's worker processes."""
    out = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            stat = (entry / "stat").read_text()
            if int(stat.rpartition(")")[2].split()[1]) != launcher:
                continue
            env = dict(
                kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv
            )
            if "RANK" in env:
                out[int(env["RANK"])] = int(entry.name)
        except (OSError, ValueError):
            continue  # gone meanwhile
    return out


def in_session(pid: int) -> bool:
    """Whether the process has joined the group: parallel.session then catches SIGTERM."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M)
    return bool(caught and int(caught.group(1), 16) & SIGTERM_BIT)


def kill_when_running(proc: subprocess.Popen, rank: int, deadline: float) -> float:
    """SIGKILL rank ``rank`` once both ranks are in the session; the time of the kill."""
    while time.monotonic() < deadline and proc.poll() is None:
        pids = workers(proc.pid)
        if len(pids) == 2 and all(in_session(p) for p in pids.values()):
            os.kill(pids[rank], signal.SIGKILL)
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError("the workers never reached the session")


def launch_and_kill(args: list[str], tmp_path: Path, rank: int, after: Path | None = None):
    """Launch ``args`` under torchrun, SIGKILL rank ``rank`` once both ranks are running (and
    ``after`` exists, when given) and wait for the launch to end: (the launcher's process,
    seconds from the kill to the end, its stderr)."""
    cmd, env = torchrun_command(args)
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 240
            while after is not None and not after.is_file() and time.monotonic() < deadline:
                time.sleep(0.05)
            t_kill = kill_when_running(proc, rank, deadline)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc, time.monotonic() - t_kill, (tmp_path / "stderr").read_text()


@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_rank_stops_the_launch_with_one_line(inputs, tmp_path, killed):
    out = tmp_path / "out"
    args = ["latentdist", "measure", "--encoder", str(inputs / "encoder.pt")]
    args += ["--data", str(inputs / "images"), *FLAGS, "--out", str(out)]
    proc, stopped_after, stderr = launch_and_kill(args, tmp_path, killed)
    assert proc.returncode != 0  # torchrun's status is 1 when a worker fails
    assert stopped_after < STOP_BOUND_S, (stopped_after, launch_failure(stderr))
    survivor = 1 - killed
    lines = [ln for ln in stderr.splitlines() if ln.startswith("latentdist:")]
    assert len(lines) == 1, launch_failure(stderr)
    assert lines[0].startswith("latentdist: error: stopped: "), lines
    assert f"rank {killed} of 2" in lines[0] and f"rank {survivor} of 2" in lines[0], lines
    # torchrun's summary: the killed worker by SIGKILL, the survivor with status 2 (not a signal)
    summary = re.findall(r"rank\s*: (\d+) .*\n\s*exitcode\s*: (-?\d+)", stderr)
    assert {int(r): int(c) for r, c in summary} == {killed: -signal.SIGKILL, survivor: 2}, stderr
    assert "terminate called" not in stderr
    frames = [ln for ln in stderr.splitlines() if ln.strip().startswith('File "')]
    assert not [f for f in frames if "latentdist" in f.split("site-packages")[-1]]  # none of ours
    # no output (a checkpoint, for the rerun, and the folder's lock may be there); no temporary
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) if out.exists() else []
    assert not {"measure.json", "curve.csv", "curve.png"} & set(written), written
    assert not [p for p in written if p.endswith(".tmp")], written
    # the same command runs through afterwards
    rerun = torchrun(args, cwd=tmp_path, timeout=240)
    assert rerun.returncode == 0, launch_failure(rerun.stderr)
    assert (out / "measure.json").is_file()


def test_a_killed_trainer_rank_stops_the_other_with_one_line(tmp_path):
    """train-dae under torchrun (DDP, gloo): rank 1 killed mid-run; rank 0 stops with one line
    and status 2 (its DDP collective broke, or torchrun's SIGTERM came first), and
    ``--resume`` continues from the last checkpoint."""
    out = tmp_path / "run"
    args = ["latentdist", "train-dae", "--data", "digits", "--base-width", "4"]
    args += ["--downsample", "2", "--latent-channels", "2", "--batch-size", "32"]
    args += ["--stage1-steps", "400", "--stage2-steps", "400", "--checkpoint-every", "5"]
    args += ["--threads", "1", "--no-progress", "--device", "cpu", "--out", str(out)]
    _, stopped_after, stderr = launch_and_kill(args, tmp_path, 1, after=out / "checkpoint.pt")
    assert stopped_after < STOP_BOUND_S, (stopped_after, launch_failure(stderr))
    lines = [ln for ln in stderr.splitlines() if ln.startswith("latentdist:")]
    assert len(lines) == 1 and lines[0].startswith("latentdist: error: stopped: "), stderr[-3000:]
    summary = re.findall(r"rank\s*: (\d+) .*\n\s*exitcode\s*: (-?\d+)", stderr)
    assert {int(r): int(c) for r, c in summary} == {1: -signal.SIGKILL, 0: 2}, stderr[-3000:]
    assert not (out / "run.json").exists() and (out / "checkpoint.pt").is_file()
