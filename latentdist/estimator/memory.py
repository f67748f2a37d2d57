"""Peak memory per phase of a measurement, for ``measure.json``'s ``memory`` entry."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from latentdist.parallel import current


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak resident set (Linux: ``/proc/self/clear_refs``, value 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Memory:
    """Peak memory per phase: resident set (VmHWM, reset at each phase's start where Linux
    allows, else the process's peak so far) and, on CUDA, ``torch.cuda.max_memory_allocated``."""

    phases: dict[str, float] = field(default_factory=dict)
    cuda: dict[str, float] = field(default_factory=dict)
    per_phase: bool = True

    def start(self) -> None:
        self.per_phase = _reset_peak() and self.per_phase
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def stop(self, phase: str) -> None:
        hwm = _status_kib("VmHWM")
        kib = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.phases[phase] = max(self.phases.get(phase, 0.0), kib / 1024)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda[phase] = torch.cuda.max_memory_allocated() / 2**20

    @contextlib.contextmanager
    def track(self, phase: str) -> Iterator[None]:
        self.start()
        yield
        self.stop(phase)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "peak_rss_mb": max(self.phases.values(), default=0.0),
            "phases_rss_mb": dict(self.phases),
            "rss_per_phase": self.per_phase,
        }
        if self.cuda:
            out["cuda_peak_mb"] = max(self.cuda.values())
            out["phases_cuda_mb"] = dict(self.cuda)
        return out


def memory_report(memory: Memory, timings: dict[str, float]) -> dict[str, Any]:
    """The memory entry of ``measure.json``: this process's, and with several ranks every rank's
    (``per_rank``, with its timings) and the largest peak over ranks."""
    mine = memory.report()
    group = current()
    if group is None:
        return mine
    ranks = group.gather(lambda: {**mine, "timings": dict(timings)})
    return {
        **mine,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "scope": "rank 0's phases; peak_rss_mb is the largest over ranks",
        "per_rank": ranks,
    }
