"""Shared pieces of the benchmarks: machine facts and Markdown tables with a stated context."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def extended_sweep(text: str) -> dict:
    """'1,4,16,64' -> ``measure`` settings that start the mlp sweep there and extend it by the
    default rule, as the default sweep is (given capacities are otherwise measured as given).
    ValueError on anything but positive integers."""
    from latentdist.estimator import EXTEND_LIMIT

    caps = tuple(int(c) for c in text.split(","))
    if min(caps) < 1:
        raise ValueError(text)
    return {"capacities": caps, "max_capacity": EXTEND_LIMIT["mlp"]}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}; {os.cpu_count()} cores; torch threads {torch.get_num_threads()}; {gpu}"


def context() -> str:
    import numpy
    import ot

    import latentdist

    return (
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n"
        f"- machine: {machine()}\n"
        f"- versions: latentdist {latentdist.__version__}, torch {torch.__version__}, "
        f"numpy {numpy.__version__}, POT {ot.__version__}, Python {platform.python_version()}\n"
    )


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append(
            "| "
            + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values())
            + " |"
        )
    return "\n".join(out)


def write_result(name: str, title: str, body: str) -> Path:
    from latentdist._io import save_text

    path = RESULTS / f"{name}.md"
    save_text(path, f"# {title}\n\n{context()}\n{body}\n")
    return path
