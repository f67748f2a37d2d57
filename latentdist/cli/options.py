"""Click options and parsers shared by the commands: the CLI's vocabulary in one place.

``CONTEXT`` is set on each command, not only the group: click caches a command's help option
the first time it is built, so a command run on its own must already know ``-h``.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from latentdist.checkpoint import DEFAULT_EVERY_S, FOLDER
from latentdist.data import ImageOptions
from latentdist.data.files import CHANNELS
from latentdist.errors import UsageError
from latentdist.estimator import (
    DEFAULT_CAPACITIES,
    EXTEND_LIMIT,
    FITS,
    GENERATORS,
    METRICS,
    MLP_PARAMS_LIMIT,
    MeasureConfig,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# --threads of every command that fits or scores (measure, compare, distance)
THREADS_OPTION = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for torch [default: torch's choice]; a fit's assignment solver uses as "
    "many. On a shared machine fewer threads can be many times faster.",
)


def parse_capacities(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        caps = tuple(int(c) for c in text.replace(" ", "").split(",") if c)
    except ValueError:
        raise UsageError(
            f"--capacities {text}: expected comma-separated integers, e.g. 4,8,16"
        ) from None
    if not caps or min(caps) < 1:
        raise UsageError(f"--capacities {text}: expected positive integers, e.g. 4,8,16")
    return caps


def parse_size(text: str | None, flag: str = "--resize") -> tuple[int, int] | None:
    """``"H,W"`` (or ``"S"`` for a square) as a (height, width) pair; None stays None."""
    if text is None or str(text).strip() == "":
        return None
    parts = str(text).replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise UsageError(f"{flag} {text}: expected a size H,W of two positive integers, e.g. 64,64")
    return size  # type: ignore[return-value]


def image_options(f):
    """The click options ``--channels`` and ``--resize`` (image folders), for every command."""
    f = click.option(
        "--resize",
        metavar="H,W",
        default=None,
        help="Image folders: resize every image to H x W (Pillow, bicubic) [default: keep sizes, "
        "which must agree].",
    )(f)
    return click.option(
        "--channels",
        type=click.Choice(CHANNELS),
        default="auto",
        show_default=True,
        help="Image folders: auto keeps grey as 1 channel and colour as RGB (a folder mixing "
        "both is refused); grey or rgb converts every image.",
    )(f)


def image_options_of(o: dict) -> ImageOptions:
    """``--channels`` / ``--resize`` as the ``ImageOptions`` of ``load_data``."""
    return ImageOptions(o["channels"], parse_size(o["resize"]))


def _family_options() -> list:
    """The generator family and its capacities."""
    return [
        click.option(
            "--generator",
            type=click.Choice(GENERATORS),
            default="auto",
            show_default=True,
            help="Generator family G_c: linear (one-entry curve), mlp (capacity = hidden width), "
            "conv (capacity = channel width; C×H×W latents to images). auto: mlp, unless the "
            f"linear map from latent to data would exceed {MLP_PARAMS_LIMIT:,} parameters and the "
            "latent is spatial (e.g. 96×96 RGB or 250×250 images), then conv; the report's "
            "generator_choice says which.",
        ),
        click.option(
            "--capacities",
            metavar="C1,C2,...",
            help="Capacities to sweep. Default: mlp "
            + ",".join(map(str, DEFAULT_CAPACITIES["mlp"]))
            + "; conv "
            + ",".join(map(str, DEFAULT_CAPACITIES["conv"]))
            + ". A default sweep then doubles its largest capacity until the curve flattens "
            "(see --max-capacity).",
        ),
        click.option(
            "--max-capacity",
            type=int,
            default=None,
            metavar="C",
            help="Extend the sweep by doubling its largest capacity while the distance still "
            "falls measurably (paired over seeds) and has not reached epsilon at two consecutive "
            "capacities, up to C; 0: never. Default: "
            + f"{EXTEND_LIMIT['mlp']} for a default mlp sweep, {EXTEND_LIMIT['conv']} (no "
            "extension) for conv, none when --capacities is given.",
        ),
        click.option(
            "--depth",
            type=int,
            default=2,
            show_default=True,
            help="Hidden layers (mlp) or convs per upsampling stage (conv).",
        ),
    ]


def _fit_options() -> list:
    """What is measured and how the generators are fitted."""
    return [
        click.option(
            "--metric",
            type=click.Choice(METRICS),
            default="mmd",
            show_default=True,
            help="Held-out discrepancy d_F (see docs/metrics.md). mmd: multi-bandwidth "
            "Gaussian kernel fixed by the held-out data; the default because it puts every "
            "degradation of MNIST above fresh data (benchmarks/results/validity.md), where "
            "w1/w2/sinkhorn rank blurred images below it.",
        ),
        click.option(
            "--fit",
            type=click.Choice(FITS),
            default="mmd",
            show_default=True,
            help="mmd / ot / adversarial estimate D_c (unpaired); paired regresses x on E(x) "
            "and gives an upper bound on D_c (plus the held-out reconstruction RMSE).",
        ),
        click.option(
            "--no-select",
            is_flag=True,
            help="Report each capacity's own fit only. By default the reported value is the best "
            "held-out bound, chosen on validation rows, over the fit, the paired fit (when rows "
            "correspond) and the smaller capacities' choices (which G_c contains).",
        ),
        click.option(
            "--metric-features",
            metavar="identity|learned|PATH",
            default=None,
            help="Feature space of --metric fd/kid: identity (default), learned (a net trained "
            "on fitting rows only), or a TorchScript extractor file.",
        ),
    ]


def _run_options() -> list:
    """Repetitions, sizes, optimisation, device."""
    return [
        click.option(
            "--seeds",
            type=int,
            default=3,
            show_default=True,
            help="Independent repetitions (split, initialisation, batches) for the 95% CI.",
        ),
        click.option(
            "--n-eval",
            type=int,
            default=None,
            help="Held-out points per evaluation. Default: min(1000, rows/4); needs > 2×n_eval rows.",
        ),
        click.option(
            "--steps",
            type=int,
            default=400,
            show_default=True,
            help="Optimiser steps per generator.",
        ),
        click.option(
            "--batch-size",
            type=int,
            default=None,
            help="Fitting minibatch [default: 256, or 256*1024/(H*W) rows of images above 32x32 "
            "pixels, at least 16]; at most the rows one seed fits on (measure.json: "
            "fit_batch_size).",
        ),
        click.option(
            "--lr",
            type=float,
            default=None,
            help="Adam learning rate. Default: 0.02 for linear, 0.002 otherwise.",
        ),
        click.option(
            "--epsilon",
            type=float,
            default=None,
            help="Tolerance for the critical capacity. Default: the floor's upper 95% limit.",
        ),
        click.option(
            "--no-proxies",
            is_flag=True,
            help="Skip the costly proxies (Lipschitz bounds, Jacobian norms, intrinsic dimension).",
        ),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda"]),
            default="auto",
            show_default=True,
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="First seed."),
        THREADS_OPTION,
    ]


def measurement_options(f):
    """The measurement flags, shared by ``measure`` and ``compare``."""
    for option in reversed(_family_options() + _fit_options() + _run_options()):
        f = option(f)
    return f


def resume_options(f):
    """--restart and --checkpoint-every: the checkpoint a command keeps in its --out folder."""
    f = click.option(
        "--checkpoint-every",
        type=click.FloatRange(min=0),
        default=DEFAULT_EVERY_S,
        show_default=True,
        metavar="SECONDS",
        help="Keep each fitting loop's state in OUT/checkpoint at most this often (and at its "
        "end); 0 keeps it at every step.",
    )(f)
    return click.option(
        "--restart",
        is_flag=True,
        help="Discard the checkpoint in --out and start afresh. Without it, the same command "
        "run again resumes from the checkpoint (to the same result); a checkpoint of other "
        "inputs or settings is refused.",
    )(f)


def checkpoint_folder(o: dict) -> Path | None:
    """OUT/checkpoint, where a command keeps finished work until its result is written; None
    without --out."""
    return Path(o["out"]) / FOLDER if o.get("out") else None


def config_from_options(o: dict) -> MeasureConfig:
    """The validated measurement configuration; also applies ``--threads`` to this process."""
    if o["threads"] is not None:
        torch.set_num_threads(o["threads"])
    return MeasureConfig(
        generator=o["generator"],
        capacities=parse_capacities(o["capacities"]),
        max_capacity=o["max_capacity"],
        depth=o["depth"],
        metric=o["metric"],
        fit=o["fit"],
        select=not o["no_select"],
        features=o["metric_features"],
        seeds=o["seeds"],
        n_eval=o["n_eval"],
        steps=o["steps"],
        batch_size=o["batch_size"],
        lr=o["lr"],
        device=o["device"],
        epsilon=o["epsilon"],
        proxies=not o["no_proxies"],
        seed=o["seed"],
    ).validate()
