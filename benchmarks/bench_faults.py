"""Faults: ``measure``, ``compare`` and ``train-dae`` killed at random points resume to the result
of a run never killed.

Each case is the command line as a user runs it, in one process or under ``torchrun --standalone
--nproc-per-node 2`` (gloo). First the case runs uninterrupted: its output is the reference and
its wall time T. Then, per trial, the same command starts in a session of its own and, at a time
drawn uniformly from [0.1 T, 0.9 T], it and every process below it (torchrun's workers run in
sessions of their own) are killed with SIGKILL, as a preempted machine would be (when it
finished before, it starts again in a fresh folder and is killed after half the time, up to four
times); the command is then run again (train-dae with ``--resume``, the others as they were) and
its output compared with the reference: ``measure.json`` / ``compare.json`` without timings,
memory and dates, bitwise; train-dae's ``model.safetensors`` tensors bitwise and ``run.json``
without its timings.

    python benchmarks/bench_faults.py [--small] [--trials N] [--seed S]

The table counts kills tried, the killed runs that had written a result anyway (the kill came
too late: not counted as resumed), reruns that finished (resumed) and results equal to the
reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_result  # noqa: E402

PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def prepare(root: Path) -> None:
    """Latents for measure (a fixed nonlinear projection of digits) and two tiny train-dae runs
    for compare."""
    from latentdist.data import load_data

    x = load_data("digits").take()
    g = torch.Generator().manual_seed(0)
    z = torch.tanh(x.flatten(1) @ torch.randn(64, 6, generator=g) / 8)
    np.save(root / "z.npy", z.numpy())
    np.save(root / "x.npy", x.numpy())
    for mode, s1, s2 in (("dae", 20, 20), ("joint", 40, 0)):
        cmd = [*TRAIN[:-2], "--out", str(root / mode), "--mode", mode]
        cmd += ["--stage1-steps", str(s1), "--stage2-steps", str(s2)]
        subprocess.run([PY, "-m", "latentdist", *cmd], check=True, env=ENV, capture_output=True)


MEASURE = [
    "measure", "--latents", "z.npy", "--data", "x.npy", "--capacities", "2,4,8", "--seeds", "2",
    "--steps", "150", "--n-eval", "150", "--no-proxies", "--threads", "1", "--quiet",
    "--device", "cpu", "--checkpoint-every", "0.5",
]  # fmt: skip
COMPARE = [
    "compare", "dae", "joint", "--data", "digits", "--capacities", "4,16", "--steps", "60",
    "--n-eval", "100", "--seeds", "2", "--no-proxies", "--gen-seeds", "2", "--feature-steps",
    "30", "--prior-components", "3", "--probe-steps", "60", "--threads", "1", "--quiet",
    "--device", "cpu", "--checkpoint-every", "0.5",
]  # fmt: skip
TRAIN = [
    "train-dae", "--data", "digits", "--base-width", "4", "--downsample", "2",
    "--latent-channels", "2", "--batch-size", "32", "--stage1-steps", "150", "--stage2-steps",
    "150", "--checkpoint-every", "10", "--threads", "1", "--no-progress", "--device", "cpu",
    "--mode", "dae",
]  # fmt: skip
CASES = {  # name: (arguments, result file, processes)
    "measure": (MEASURE, "measure.json", 1),
    "measure (torchrun 2)": (MEASURE, "measure.json", 2),
    "compare": (COMPARE, "compare.json", 1),
    "train-dae": (TRAIN, "model.safetensors", 1),
    "train-dae (torchrun 2)": (TRAIN, "model.safetensors", 2),
}
# entries that differ between any two runs: times, speeds, memory, dates; train-dae's config
# (its --out and --resume) and how many steps this process ran
VOLATILE = (
    "timings", "memory", "created", "time_s", "loop_time_s", "step_time_s", "samples_per_s",
    "steps_this_process", "config",
)  # fmt: skip


SMALL = {"--steps": "60", "--stage1-steps": "50", "--stage2-steps": "50"}  # CI: shorter runs


def scaled(args: list[str], small: bool) -> list[str]:
    """``args`` with the step counts of ``SMALL`` when ``small``."""
    if not small:
        return args
    return [SMALL.get(args[i - 1], a) if i else a for i, a in enumerate(args)]


def command(args: list[str], out: Path, procs: int, resume: bool = False) -> list[str]:
    extra = ["--resume"] if resume and args[0] == "train-dae" else []
    launcher = [PY] if procs == 1 else TORCHRUN
    return [*launcher, "-m", "latentdist", *args, "--out", str(out), *extra]


def run(cmd: list[str], cwd: Path) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - t0, proc.stderr[-600:]


def killed_at(cmd: list[str], cwd: Path, delay: float) -> bool:
    """Start ``cmd`` in a session of its own and SIGKILL the whole session after ``delay``
    seconds; True when it was still running (else it had finished)."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: kill every descendant, as the
        # loss of the machine would, not only the launcher's session
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        return True


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stable(value):
    """A report without the entries that differ between any two runs (times, memory, dates)."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def result_of(out: Path, name: str):
    """What must be equal: a JSON report (stable part), or train-dae's tensors and run.json."""
    if name.endswith(".json"):
        return stable(json.loads((out / name).read_text()))
    from safetensors.torch import load_file

    tensors = load_file(out / name)
    run_json = stable(json.loads((out / "run.json").read_text()))
    return {k: v.numpy().tobytes() for k, v in sorted(tensors.items())}, run_json


def trial(case: str, root: Path, ref, t_ref: float, rng: random.Random, small: bool) -> dict:
    args, name, procs = CASES[case]
    args = scaled(args, small)
    delay = rng.uniform(0.1 * t_ref, 0.9 * t_ref)
    attempts = 0
    for _ in range(4):  # finished before the kill (the machine was faster): sooner
        attempts += 1
        out = root / f"trial-{rng.random():.12f}"
        killed = killed_at(command(args, out, procs), root, delay)
        if killed:
            break
        shutil.rmtree(out, ignore_errors=True)
        delay /= 2
    before = (out / name).exists()
    code, _, err = run(command(args, out, procs, resume=killed and not before), root)
    if code and killed and args[0] == "train-dae" and "not found" in err:  # killed before
        code, _, err = run(command(args, out, procs), root)  # its first checkpoint: start over
    equal = code == 0 and result_of(out, name) == ref
    if code:
        print(f"  {case}: rerun failed ({code}): {err.strip()[-300:]}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    if not killed or before:
        print(f"  {case}: not killed while running ({attempts} attempts, last at {delay:.1f} s; "
              f"result written before the kill: {before})", flush=True)  # fmt: skip
    return {"killed": killed and not before, "resumed": code == 0, "equal": equal, "at": delay}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="CI: fewer cases and trials")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", help="comma-separated subset of: " + ", ".join(CASES))
    args = ap.parse_args()
    trials = args.trials or (1 if args.small else 3)
    cases = ["measure", "measure (torchrun 2)", "train-dae"] if args.small else list(CASES)
    cases = args.cases.split(",") if args.cases else cases
    rng = random.Random(args.seed)
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root)
        for case in cases:
            cmd_args, name, procs = CASES[case]
            cmd_args = scaled(cmd_args, args.small)
            code, t_ref, err = run(command(cmd_args, root / f"ref-{procs}-{name}", procs), root)
            if code:
                sys.exit(f"bench_faults: the uninterrupted {case} failed: {err}")
            ref = result_of(root / f"ref-{procs}-{name}", name)
            res = [trial(case, root, ref, t_ref, rng, args.small) for _ in range(trials)]
            kills = sum(r["killed"] for r in res)
            resumed = sum(r["resumed"] and r["killed"] for r in res)
            equal = sum(r["equal"] and r["killed"] for r in res)
            rows.append(
                {
                    "case": case,
                    "uninterrupted (s)": round(t_ref, 1),
                    "kills tried": trials,
                    "killed while running": kills,
                    "resumed": resumed,
                    "equal": equal,
                }
            )
            at = ", ".join(f"{r['at']:.1f}" for r in res)
            print(f"{case}: T={t_ref:.1f}s, killed {kills}, resumed {resumed}, equal {equal} "
                  f"(kills at {at} s)", flush=True)  # fmt: skip
            if resumed != kills or equal != kills:
                failed.append(case)
    table = markdown_table(rows)
    print(table)
    if not args.small:
        write_result(
            "faults",
            "Faults: kill -9 at a random point, rerun, compare with the uninterrupted result",
            f"{__doc__.split(chr(10) + chr(10), 1)[1]}\n{table}",
        )
    if failed:
        sys.exit(f"bench_faults: not every kill resumed to an equal result: {', '.join(failed)}")


if __name__ == "__main__":
    main()
