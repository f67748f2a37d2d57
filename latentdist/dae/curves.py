"""Training curves a person can look at: ``curves.png`` and (optionally) TensorBoard events.

``curves.png`` is redrawn from the metrics.jsonl records at every checkpoint and at the end of
the run: the reconstruction loss on the training batches and on held-out rows (``val_rec``, the
same loss in the same normalised units) per stage, and the total loss with its other terms.
TensorBoard event files (``--tensorboard``, the ``tensorboard`` extra) go to ``OUT/tensorboard``
under the tags ``train/<term>`` and ``val/rec``, the ``SummaryWriter`` convention.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from latentdist._io import save_figure
from latentdist.errors import UsageError

STAGE_COLOURS = {"stage1": "tab:blue", "stage2": "tab:orange", "joint": "tab:green"}
_TERMS = ("kl", "vq", "perceptual", "g_loss", "d_loss")


def plot_curves(records: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Draw the loss curves of ``records`` (metrics.jsonl lines) to ``path``, atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_rec, ax_loss = fig.subplots(1, 2)
    stages = list(dict.fromkeys(r["stage"] for r in records))
    for stage in stages:
        rows = [r for r in records if r["stage"] == stage]
        colour = STAGE_COLOURS.get(stage, "tab:gray")
        steps = [r["step"] for r in rows]
        ax_rec.plot(steps, [r.get("rec") for r in rows], color=colour, label=f"{stage} train")
        val = [(r["step"], r["val_rec"]) for r in rows if r.get("val_rec") is not None]
        if val:
            ax_rec.plot(*zip(*val, strict=True), "o--", color=colour, label=f"{stage} validation")
        ax_loss.plot(steps, [r.get("loss") for r in rows], color=colour, label=f"{stage} loss")
        for style, term in zip(("--", ":", "-.", "--", ":"), _TERMS, strict=True):
            values = [(r["step"], r[term]) for r in rows if r.get(term) is not None]
            if values:
                ax_loss.plot(
                    *zip(*values, strict=True), style, color=colour, label=f"{stage} {term}"
                )
    for stage in stages[:-1]:  # stage boundaries: the last step of each stage but the last
        last = max(r["step"] for r in records if r["stage"] == stage)
        for ax in (ax_rec, ax_loss):
            ax.axvline(last, color="grey", lw=0.8, ls=":")
    ax_rec.set(xlabel="step", ylabel="reconstruction loss (normalised data)", yscale="log")
    ax_rec.set_title("reconstruction: training batches and held-out rows")
    values = [v for r in records for k in ("loss", *_TERMS) if (v := r.get(k)) is not None]
    positive = bool(values) and min(values) > 0
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log" if positive else "symlog")
    ax_loss.set_title("total loss and its terms")
    for ax in (ax_rec, ax_loss):
        if ax.has_data():
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(Path(path), fig, dpi=100)


def require_tensorboard() -> None:
    """A one-line UsageError unless the tensorboard package (the optional extra) is installed."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UsageError(
            "--tensorboard: needs the tensorboard package (pip install 'latentdist[tensorboard]')"
        ) from None


def summary_writer(folder: Path, purge_step: int | None = None) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``folder``. ``purge_step`` drops events
    logged after the checkpoint a resumed run starts from."""
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def log_scalars(writer: Any, record: dict) -> None:
    """One metrics.jsonl record as TensorBoard scalars: ``train/<term>``, ``val/rec``, ``lr``."""
    step = record["step"]
    for key, value in record.items():
        if key in ("step", "stage", "time") or value is None:
            continue
        tag = "val/rec" if key == "val_rec" else ("lr" if key == "lr" else f"train/{key}")
        writer.add_scalar(tag, value, step)
