"""Running the CLI in-process from tests, and under torchrun in subprocesses."""

import os
import subprocess
import sys

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


def torchrun_command(module_args: list[str], env: dict | None = None) -> tuple[list[str], dict]:
    """``torchrun --standalone --nproc-per-node 2 -m <module_args>`` and its environment, one
    thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return [*cmd, "-m", *module_args], {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"}


def torchrun(module_args: list[str], cwd=None, env: dict | None = None, timeout: int = 300):
    """Run ``torchrun_command`` once. No relaunch: a worker that dies by a signal is a failure
    of the test (the teardown abort that once needed one is gone, benchmarks/results/
    teardown.md)."""
    cmd, env = torchrun_command(module_args, env)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
