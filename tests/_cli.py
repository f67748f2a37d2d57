"""Running the CLI in-process from tests, and under torchrun in subprocesses."""

import os
import re
import subprocess
import sys
import warnings

from latentdist.cli import main


def run_cli(args, capsys):
    """Run the CLI in-process: (exit code, stdout, stderr); 0 when it returns normally."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def launch_failure(stderr: str) -> str:
    """What a failed torchrun launch printed, the ranks' own errors first: the launcher's
    summary at the end names only the signal, the cause is printed before it."""
    return stderr if len(stderr) <= 6000 else stderr[:4000] + "\n[...]\n" + stderr[-2000:]


def torchrun(module_args: list[str], cwd=None, env: dict | None = None, timeout: int = 300):
    """``torchrun --standalone --nproc-per-node 2 -m <module_args>``, one thread per process.

    A worker killed by a signal (gloo's transport aborts with SIGABRT when a socket fails, seen
    once in CI on a loaded 2-core machine and never reproduced) is a crash of the launch, not a
    result: the launch is retried once and the first failure reported as a warning. A worker
    that exits with a status of its own (an error of ours) is never retried.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"}
    for attempt in (1, 2):
        proc = subprocess.run(
            [*cmd, "-m", *module_args], cwd=cwd, env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)]
        if proc.returncode == 0 or attempt == 2 or not codes or max(codes) >= 0:
            return proc
        warnings.warn(f"torchrun: a worker died by a signal, retrying once:\n"
                      f"{launch_failure(proc.stderr)}", stacklevel=2)  # fmt: skip
    return proc
