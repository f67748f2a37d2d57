"""A 2-process ``torchrun`` of ``measure`` run N times beside a busy process: does any worker die?

Issue 22 asked for the teardown abort (a worker killed by SIGABRT, "terminate called without an
active exception", seen only on a loaded 2-core machine) to be root-caused and the launchers'
relaunch removed; this loop is the evidence. It launches the command of
``tests/test_distributed.py`` (128 8x8 grey images, a TorchScript encoder, mlp capacities 4 and
8, 3 seeds, 20 steps; gloo, one thread per process) ``--runs`` times, one after another, while a
third process spins a Python busy loop on one core, and counts the launches whose workers
exited by a signal.

    python benchmarks/loop_torchrun.py [--runs 50] [--no-load]

It prints one line per launch and a table; ``benchmarks/results/teardown.md`` records it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

FLAGS = [
    "--generator", "mlp", "--capacities", "4,8", "--seeds", "3", "--steps", "20",
    "--batch-size", "32", "--n-eval", "24", "--threads", "1", "--no-progress",
    "--encode-batch-size", "16", "--device", "cpu", "--format", "json",
]  # fmt: skip
BUSY = "while True:\n    pass\n"


def make_inputs(root: Path) -> None:
    """The test's inputs: 128 smooth random 8x8 grey PNGs and a conv encoder to 2x2x2."""
    from PIL import Image

    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(128):
        img = np.kron(rng.normal(size=(3, 3)), np.ones((3, 3)))[:8, :8]
        img = (255 * (img - img.min()) / (np.ptp(img) + 1e-9)).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 4, stride=4), torch.nn.Tanh())
    torch.jit.script(enc).save(str(root / "encoder.pt"))


def command(root: Path, out: Path) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    args = ["--encoder", str(root / "encoder.pt"), "--data", str(root / "images")]
    return [*launcher, "--nproc-per-node", "2", "-m", "latentdist", "measure", *args, *FLAGS,
            "--out", str(out)]  # fmt: skip


def snapshot(root: Path) -> dict:
    """A copy of the package as it is now, first on the workers' path: edits made to the tree
    while the loop runs do not reach it."""
    src = Path(__file__).resolve().parents[1] / "latentdist"
    shutil.copytree(src, root / "src" / "latentdist", ignore=shutil.ignore_patterns("__pycache__"))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}


def once(root: Path, i: int, env: dict) -> dict:
    """One launch: torchrun's status, the workers' exit codes, whether one aborted, wall time."""
    out = root / f"out_{i}"
    t0 = time.perf_counter()
    proc = subprocess.run(command(root, out), cwd=root, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    # torchrun's summary lists each failed worker (the first again as the root cause)
    found = re.findall(r"exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)", proc.stderr)
    codes = sorted({pid: int(c) for c, pid in found}.values())
    aborted = -signal.SIGABRT in codes or "terminate called" in proc.stderr
    return {
        "run": i,
        "status": proc.returncode,
        "worker_codes": codes,
        "aborted": aborted,
        "wrote": (out / "measure.json").is_file(),
        "wall_s": wall,
        "load": os.getloadavg()[0],
        "stderr": proc.stderr if proc.returncode or aborted else "",
    }


def summary(runs: list[dict], loaded: bool, total_s: float) -> str:
    """The loop's table: runs, aborts, exit statuses, wall times, load."""
    walls = [r["wall_s"] for r in runs]
    statuses = Counter(r["status"] for r in runs)
    codes = Counter(c for r in runs for c in r["worker_codes"])
    row = {
        "runs": len(runs),
        "ok (status 0, measure.json)": sum(r["status"] == 0 and r["wrote"] for r in runs),
        "aborts (SIGABRT)": sum(r["aborted"] for r in runs),
        "launches with a worker killed by a signal": sum(
            any(c < 0 for c in r["worker_codes"]) for r in runs
        ),
        "torchrun statuses": ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
        "worker exit codes": ", ".join(f"{k}: {v}" for k, v in sorted(codes.items())) or "-",
        "wall per run, s (median, max)": f"{statistics.median(walls):.1f}, {max(walls):.1f}",
        "loop wall, min": f"{total_s / 60:.1f}",
        "load (1-min avg, median)": f"{statistics.median(r['load'] for r in runs):.2f}",
        "busy third process": "yes" if loaded else "no",
    }
    lines = ["| " + " | ".join(row) + " |", "|" + "---|" * len(row)]
    lines.append("| " + " | ".join(str(v) for v in row.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--no-load", action="store_true", help="no busy third process")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the busy process too
    busy = None if a.no_load else subprocess.Popen([sys.executable, "-c", BUSY])
    runs: list[dict] = []
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_inputs(root)
            env = snapshot(root)
            for i in range(a.runs):
                r = once(root, i, env)
                runs.append(r)
                print(f"run {i}: status {r['status']}, workers {r['worker_codes']}, "
                      f"aborted {r['aborted']}, {r['wall_s']:.1f} s", flush=True)  # fmt: skip
                if r["stderr"]:
                    print(r["stderr"][-3000:], flush=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    body = summary(runs, busy is not None, time.perf_counter() - t0)
    print(body)


if __name__ == "__main__":
    main()
