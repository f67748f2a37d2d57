"""What rank 0 writes while a run trains: ``metrics.jsonl`` (one record per logged step),
``curves.png`` and TensorBoard events redrawn / flushed at each checkpoint, and a progress bar."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from latentdist._io import atomic_open
from latentdist._progress import progress_bar
from latentdist.dae.curves import log_scalars, plot_curves, summary_writer


class RunLog:
    """The training log of one run; on processes other than rank 0 every method does nothing."""

    def __init__(self, out: Path, title: str):
        self.out, self.title = out, title
        self.path = out / "metrics.jsonl"
        self.history: list[dict] = []  # metrics.jsonl records, for curves.png
        self.writer: Any = None  # TensorBoard SummaryWriter with --tensorboard
        self.file: Any = None
        self.bar: Any = None

    def start(self, start_step: int, resumed: bool, tensorboard: bool) -> None:
        """Rewrite metrics.jsonl to the lines a resumed run logged up to ``start_step`` (none
        for a new run) and open the TensorBoard writer, its events after that step dropped."""
        kept = []
        if resumed and self.path.is_file():  # drop lines logged after the checkpoint
            kept = [r for r in _records(self.path.read_text()) if r["step"] <= start_step]
        with atomic_open(self.path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))
        self.history = kept
        if tensorboard:
            self.writer = summary_writer(self.out / "tensorboard", purge_step=start_step + 1)

    def open(self, progress: bool, total: int, initial: int, desc: str) -> None:
        """Open metrics.jsonl for appending and, with ``progress``, the progress bar."""
        self.file = open(self.path, "a")  # noqa: SIM115 (closed by close())
        if progress:
            self.bar = progress_bar(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def write(self, record: dict) -> None:
        """One metrics.jsonl record (also a TensorBoard point and the bar's postfix)."""
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.history.append(record)
        if self.writer is not None:
            log_scalars(self.writer, record)
        if self.bar is not None:
            self.bar.set_postfix(stage=record["stage"], loss=f"{record['loss']:.4g}", refresh=False)

    def flush(self) -> None:
        """At a checkpoint: metrics.jsonl and TensorBoard on disk, curves.png redrawn."""
        if self.file is None:
            return
        self.file.flush()
        plot_curves(self.history, self.out / "curves.png", self.title)
        if self.writer is not None:
            self.writer.flush()

    def advance(self) -> None:
        """One step done (the progress bar)."""
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        """Close bar, metrics.jsonl and TensorBoard writer (also after a diverged loss)."""
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _records(text: str) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short (the process killed, or the disk full,
    while appending it; only ever after the last checkpoint) is skipped."""
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return [r for r in out if isinstance(r, dict) and "step" in r]
