"""``latentdist measure``: a thin shell over ``latentdist.measure``."""

from __future__ import annotations

import click
import torch

from latentdist.cli_context import CONTEXT
from latentdist.data.files import ImageOptions, image_options, parse_size
from latentdist.errors import UsageError
from latentdist.estimator.fit import FITS
from latentdist.estimator.measure import (
    DEFAULT_CAPACITIES,
    GENERATORS,
    METRICS,
    MLP_PARAMS_LIMIT,
    MeasureConfig,
)

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


def measurement_options(f):
    """The measurement flags, shared by ``measure`` and ``compare``."""
    options = [
        click.option(
            "--generator",
            type=click.Choice(GENERATORS),
            default="auto",
            show_default=True,
            help="Generator family G_c: linear (one-entry curve), mlp (capacity = hidden width), "
            "conv (capacity = channel width; C×H×W latents to images). auto: mlp, unless its "
            f"widest member would exceed {MLP_PARAMS_LIMIT:,} parameters and the latent is "
            "spatial (e.g. 250×250 images), then conv; the report's generator_choice says which.",
        ),
        click.option(
            "--capacities",
            metavar="C1,C2,...",
            help="Capacities to sweep. Default: mlp "
            + ",".join(map(str, DEFAULT_CAPACITIES["mlp"]))
            + "; conv "
            + ",".join(map(str, DEFAULT_CAPACITIES["conv"]))
            + ".",
        ),
        click.option(
            "--depth",
            type=int,
            default=2,
            show_default=True,
            help="Hidden layers (mlp) or convs per upsampling stage (conv).",
        ),
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
    for option in reversed(options):
        f = option(f)
    return f


def config_from_options(o: dict) -> MeasureConfig:
    """The validated measurement configuration; also applies ``--threads`` to this process."""
    if o["threads"] is not None:
        torch.set_num_threads(o["threads"])
    return MeasureConfig(
        generator=o["generator"],
        capacities=parse_capacities(o["capacities"]),
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


@click.command("measure", context_settings=CONTEXT)
@click.option(
    "--encoder",
    type=click.Path(),
    help="Encoder: TorchScript, torch.export (.pt2), state dict "
    "(+ --arch), or a diffusers AutoencoderKL/VQModel folder.",
)
@click.option(
    "--latents",
    type=click.Path(),
    help="Precomputed latents (.npy/.npz/.pt/.safetensors/.csv), rows matching --data.",
)
@click.option(
    "--data",
    required=True,
    metavar="PATH_OR_NAME",
    help="Data: an array file, a folder of images, or a built-in name (digits, mnist5k).",
)
@image_options
@click.option("--arch", metavar="MODULE:FACTORY", help="Architecture for a state-dict encoder.")
@click.option("--arch-kwargs", metavar="JSON", help="Keyword arguments for --arch, as JSON.")
@click.option(
    "--sample",
    is_flag=True,
    help="diffusers AutoencoderKL: draw from the posterior (default: its mean).",
)
@click.option(
    "--latent-norm/--no-latent-norm",
    default=True,
    show_default=True,
    help="diffusers AutoencoderKL: normalise the latent as diffusers pipelines do (latents_mean/"
    "latents_std, or shift_factor, and scaling_factor from its config) or keep it raw.",
)
@click.option(
    "--codebook",
    type=click.Path(),
    help="Codebook (K×C array) of vector-quantised latents, for usage stats.",
)
@click.option(
    "--trust-pickle", is_flag=True, help="Allow unpickling files (only for files you trust)."
)
@measurement_options
@click.option("--encode-batch-size", type=int, default=256, show_default=True)
@click.option("--out", type=click.Path(), help="Write measure.json, curve.csv and curve.png here.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@click.option("--no-progress", "--quiet", "quiet", is_flag=True, help="No progress bars.")
def measure(**o) -> None:
    """Estimate the latent-data distance D_c(P_z; P_x) over a capacity sweep.

    Fits generators g in G_c from the latents to the data for every capacity and seed (all at once),
    evaluates the discrepancy on held-out rows beside the finite-sample floor, and reports
    intervals, the critical capacity, generator-complexity proxies and the latent's geometry.

    Under torchrun (torchrun --nproc-per-node N -m latentdist measure ...; several nodes with
    torchrun's rendezvous flags) the members, the encoding and the evaluation are split across
    the processes, with the single-process result; rank 0 writes (docs/distributed.md).
    """
    from latentdist.estimator import distributed

    with distributed.session(o["device"]) as group:  # under torchrun: the process group
        # a failure on any rank stops every rank with its message, before anything is written
        result, encoder_info = distributed.check(lambda: _measure(o))
        if group is not None and not group.is_main:
            return  # rank 0 alone writes and prints
    if o["out"]:
        result.save(o["out"])
    click.echo(result.to_json() if o["fmt"] == "json" else result.table())
    if o["fmt"] == "table" and encoder_info.get("normalisation"):
        click.echo(f"latent normalisation: {encoder_info['normalisation']}")
    if o["out"] and o["fmt"] == "table":
        click.echo(f"wrote {o['out']}/measure.json, curve.csv, curve.png")


def _measure(o: dict):
    """The measurement of ``measure``'s options: (result, encoder information)."""
    import time

    from latentdist import measure as run_measure
    from latentdist.data import load_data
    from latentdist.estimator import distributed

    if bool(o["encoder"]) == bool(o["latents"]):
        raise UsageError("give exactly one of --encoder PATH or --latents PATH")
    cfg = config_from_options(o)
    data = load_data(o["data"], trust_pickle=o["trust_pickle"], image=image_options_of(o))
    encoder_info: dict = {}
    memory, t0 = distributed.Memory(), time.perf_counter()
    memory.start()
    latents, codebook, encoder = load_latents(o, data, cfg.device, encoder_info)
    t_encode = time.perf_counter() - t0
    memory.stop("encode" if o["encoder"] else "latents")
    result = run_measure(
        latents, data, cfg, codebook=codebook, encoder=encoder, progress=distributed.progress(o)
    )
    report = result.report
    if encoder_info:
        report["encoder"] = encoder_info
        report["timings"]["encode_s"] = t_encode
    for phase, mb in memory.phases.items():
        report["memory"]["phases_rss_mb"][phase] = mb
        report["memory"]["peak_rss_mb"] = max(report["memory"]["peak_rss_mb"], mb)
    return result, encoder_info


def image_options_of(o: dict) -> ImageOptions:
    """``--channels`` / ``--resize`` as the ``ImageOptions`` of ``load_data``."""
    return ImageOptions(o["channels"], parse_size(o["resize"]))


def load_latents(o: dict, data, device: str, info: dict | None = None):
    """Latents from ``--latents`` or by encoding the data with ``--encoder``; a codebook if any;
    and the encoder as a callable (batch -> latents) for the diagnostics, None with --latents.

    ``info``, when given, receives the encoder's path, format and latent normalisation.
    """
    from latentdist.data import load_data
    from latentdist.data.encoders import load_encoder
    from latentdist.device import resolve_device
    from latentdist.estimator import distributed

    codebook = None
    if o.get("codebook"):
        codebook = load_data(o["codebook"], trust_pickle=o["trust_pickle"]).take()
    if o.get("latents"):
        latents = load_data(o["latents"], trust_pickle=o["trust_pickle"])
        if len(latents) != len(data):
            raise UsageError(
                f"--latents {o['latents']}: {len(latents)} rows, but --data has {len(data)}; "
                "rows must correspond"
            )
        return latents, codebook, None
    dev = resolve_device(device)
    enc = load_encoder(
        o["encoder"],
        arch=o.get("arch"),
        arch_kwargs=o.get("arch_kwargs"),
        trust_pickle=o["trust_pickle"],
        sample=o.get("sample", False),
        device=dev,
        latent_norm=o.get("latent_norm", True),
    )
    if info is not None:
        info.update(path=str(o["encoder"]), format=enc.format, normalisation=enc.normalisation)
    latents = distributed.encode(  # under torchrun: row shards across ranks, gathered
        enc,
        data,
        batch_size=o.get("encode_batch_size", 256),
        device=dev,
        progress=not o.get("quiet"),
        seed=o.get("seed", 0),
    )
    if codebook is None:
        codebook = enc.codebook
    return latents, codebook, lambda xb: enc.encode(xb, device=dev, progress=False)
