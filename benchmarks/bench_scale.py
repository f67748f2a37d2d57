"""``measure`` past one process: time and peak memory per phase on 1 and 2 CPU processes.

A synthetic image set (3x64x64 uint8 images, smooth random colour fields, in a memory-mapped
``.npy``) is encoded by a small TorchScript conv encoder to 4x8x8 latents and measured with conv
generators, at several row counts. Each run is the command line itself, as a user runs it:
``python -m latentdist measure`` for one process and ``torchrun --standalone --nproc-per-node 2
-m latentdist measure`` for two, each process with ``--threads`` torch threads (default 1).
Times and memory come from ``measure.json`` (``timings``: encode_s, fit_s, eval_s; ``memory``:
the peak resident set of each phase, reset at the phase's start); ``wall`` is the whole
command, start-up included. With two processes the peak is the larger of the two ranks' and
``rss total`` adds both.

    python benchmarks/bench_scale.py [--rows 5000,20000,50000] [--procs 1,2] [--small]

Where no GPU is present the CUDA rows (mixed precision, samples/s, fraction of bf16 peak) are
not run, and the results file says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_result  # noqa: E402


def make_images(path: Path, rows: int, seed: int = 0, chunk: int = 2000) -> None:
    """``rows`` smooth random 3x64x64 uint8 images (bilinear upsampling of 8x8 noise plus a
    finer 16x16 layer), written chunk by chunk into a memory-mapped ``.npy``."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, 3, 64, 64))
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        coarse = torch.randn(n, 3, 8, 8, generator=gen)
        fine = torch.randn(n, 3, 16, 16, generator=gen)
        up = lambda t: torch.nn.functional.interpolate(  # noqa: E731
            t, size=(64, 64), mode="bilinear", align_corners=False
        )
        img = torch.tanh(up(coarse) + 0.3 * up(fine))
        out[start : start + n] = ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    out.flush()
    del out


class Encoder(torch.nn.Module):
    """3x64x64 in [0, 255] -> 4x8x8: three stride-2 convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 4, stride=2, padding=1),
            torch.nn.SiLU(),
            torch.nn.Conv2d(32, 64, 4, stride=2, padding=1),
            torch.nn.SiLU(),
            torch.nn.Conv2d(64, 4, 4, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 127.5 - 1.0)


def run(
    procs: int,
    threads: int,
    data: Path,
    encoder: Path,
    out: Path,
    flags: list[str],
    stream: bool = False,
) -> dict:
    args = ["-m", "latentdist", "measure", "--encoder", str(encoder), "--data", str(data)]
    args += [*flags, "--threads", str(threads), "--out", str(out), "--format", "json", "--quiet"]
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*launcher, "--nproc-per-node", str(procs), *args]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "LATENTDIST_STREAM_ROWS": "1" if stream else "0",
    }
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"bench_scale: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    report = json.loads((out / "measure.json").read_text())
    t, mem = report["timings"], report["memory"]
    ranks = mem.get("per_rank", [mem])
    phases = mem["phases_rss_mb"]
    assert report["data"]["streamed"] == stream
    return {
        "procs": procs,
        "rows read": "on demand" if stream else "in memory",
        "threads/proc": threads,
        "wall_s": wall,
        "encode_s": t["encode_s"],
        "fit_s": t["fit_s"],
        "eval_s": t["eval_s"],
        "rest_s": t["proxies_s"] + t["geometry_s"],
        "encode_mb": phases["encode"],
        "fit_mb": phases["fit"],
        "eval_mb": phases["evaluate"],
        "peak_mb": mem["peak_rss_mb"],
        "rss_total_mb": sum(r["peak_rss_mb"] for r in ranks)
        if len(ranks) > 1
        else mem["peak_rss_mb"],
        "members": report["distributed"]["fitted"],
        "load": load,
    }


def growth(rows: list[int], values: list[float]) -> float:
    """Exponent b of value ~ rows^b between the smallest and the largest row count."""
    if len(rows) < 2 or min(values) <= 0:
        return float("nan")
    return math.log(values[-1] / values[0]) / math.log(rows[-1] / rows[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="5000,20000,50000")
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (default 1: the ratio is then the gain of the split "
        "alone, free of intra-op threading and of oversubscribing shared cores)",
    )
    ap.add_argument("--small", action="store_true", help="1000 rows, 10 steps (CI, < 1 min)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument(
        "--no-stream",
        action="store_true",
        help="skip the one-process runs that read the data rows on demand (streaming.py)",
    )
    ap.add_argument("--keep", help="folder for the data files (default: a temporary one)")
    a = ap.parse_args()
    rows = [1000] if a.small else [int(r) for r in a.rows.split(",")]
    procs = [int(p) for p in a.procs.split(",")]
    steps = 10 if a.small else a.steps
    flags = [
        "--generator", "conv", "--capacities", "4,8", "--seeds", "2", "--steps", str(steps),
        "--batch-size", "64", "--n-eval", "250" if a.small else "500", "--no-proxies",
        "--encode-batch-size", "256", "--device", "cpu",
    ]  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(dir=a.keep) as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        encoder = tmp / "encoder.pt"
        torch.jit.script(Encoder().eval()).save(str(encoder))
        for n in rows:
            data = tmp / f"images_{n}.npy"
            t0 = time.perf_counter()
            make_images(data, n)
            print(f"{n} rows: data written in {time.perf_counter() - t0:.1f} s", flush=True)
            for p in procs:
                r = run(p, a.threads, data, encoder, tmp / f"out_{n}_{p}", flags)
                r = {"rows": n, **r}
                results.append(r)
                print(json.dumps(r), flush=True)
            if not (a.small or a.no_stream):
                r = run(1, a.threads, data, encoder, tmp / f"out_{n}_s", flags, stream=True)
                r = {"rows": n, **r}
                results.append(r)
                print(json.dumps(r), flush=True)
            data.unlink()
    body = report(results, rows, procs, flags, a.threads)
    print(body)
    if not a.no_write and not a.small:
        print(f"wrote {write_result('scale', 'Scale: measure on 1 and 2 CPU processes', body)}")


def report(
    results: list[dict], rows: list[int], procs: list[int], flags: list[str], threads: int
) -> str:
    cols = ["rows", "procs", "rows read", "wall_s", "encode_s", "fit_s", "eval_s", "rest_s"]
    cols += ["encode_mb", "fit_mb", "eval_mb", "peak_mb", "rss_total_mb", "load"]
    table = markdown_table([{k: r[k] for k in cols} for r in results])
    by = {(r["rows"], r["procs"]): r for r in results if r["rows read"] == "in memory"}
    streamed = {r["rows"]: r for r in results if r["rows read"] == "on demand"}
    ratio_rows = []
    if 1 in procs and len(procs) > 1:
        for n in rows:
            one = by[(n, 1)]
            for p in procs[1:]:
                other = by[(n, p)]
                ratio_rows.append(
                    {
                        "rows": n,
                        "procs": p,
                        **{
                            f"{k} 1p/{p}p": one[k] / other[k]
                            for k in ("wall_s", "encode_s", "fit_s", "eval_s")
                        },
                        "peak_mb ratio": other["peak_mb"] / one["peak_mb"],
                    }
                )
    growth_rows = []
    series = [(f"{p}, in memory", [by[(n, p)] for n in rows]) for p in procs]
    if len(streamed) == len(rows):
        series.append(("1, on demand", [streamed[n] for n in rows]))
    for name, vals in series:
        growth_rows.append(
            {
                "procs, rows": name,
                **{
                    f"{k} exponent": growth(rows, [v[k] for v in vals])
                    for k in ("encode_s", "fit_s", "eval_s", "wall_s", "peak_mb")
                },
            }
        )
    members = by[(rows[0], procs[-1])]["members"]
    out = [
        "Command per run: `latentdist measure --encoder enc.pt --data images.npy "
        + " ".join(flags)
        + f" --threads {threads}` in one process (`python -m latentdist measure ...`) and in "
        "two (`torchrun --standalone --nproc-per-node 2 -m latentdist measure ...`): "
        f"{threads} torch thread(s) per process, so two processes use twice the cores.",
        "",
        "Times in seconds, memory in MiB (peak resident set per phase, reset at its start; "
        "rank 0's phases, `peak_mb` the largest over ranks, `rss_total_mb` all ranks' peaks "
        "added). `rows read`: in memory (the rows the splits use loaded as one block) or on "
        "demand (`LATENTDIST_STREAM_ROWS=1`: each step reads its minibatches from the "
        "memory-mapped file). `rest_s`: geometry and diagnostics (proxies are off). "
        "`load`: the machine's 1-minute "
        "load average when the run ended (above the core count, other work shared the cores).",
        "",
        table,
        "",
        "**Ratio** (one process over two, > 1: two are faster; memory: two over one, per process):",
        "",
        markdown_table(ratio_rows) if ratio_rows else "(only one process count run)",
        "",
        "**Growth with rows**: the exponent b in cost ~ rows^b between "
        f"{rows[0]} and {rows[-1]} rows (1: linear, 0: flat).",
        "",
        markdown_table(growth_rows) if len(rows) > 1 else "(one row count run)",
        "",
        f"Members per rank (two processes): `{json.dumps(members)}`.",
        "",
        "GPU: "
        + (
            "present, but this benchmark's CUDA rows are not written yet."
            if torch.cuda.is_available()
            else "no GPU was lent to the session that ran this benchmark, so the CUDA rows "
            "(mixed precision, samples/s, fraction of the bf16 peak reached by the fit) were "
            "not measured."
        ),
    ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
