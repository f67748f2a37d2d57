"""``latentdist measure``: a thin shell over ``latentdist.measure``."""

from __future__ import annotations

import time
from typing import Any

import click

from latentdist import checkpoint, parallel
from latentdist.cli.options import (
    CONTEXT,
    checkpoint_folder,
    config_from_options,
    image_options,
    image_options_of,
    measurement_options,
    resume_options,
)
from latentdist.data import load_data
from latentdist.data.encoders import load_encoder
from latentdist.device import resolve_device
from latentdist.errors import UsageError
from latentdist.estimator import MeasureResult, Memory, sharding
from latentdist.estimator import measure as run_measure
from latentdist.outdir import output_folder


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
    help="Data: an array file, a folder of images, or a built-in name (digits, mnist5k, photos32).",
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
@click.option(
    "--out",
    type=click.Path(),
    help="Write measure.json, curve.csv and curve.png here; finished work is kept in "
    "OUT/checkpoint until then, so the same command resumes after an interruption.",
)
@resume_options
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
    with output_folder(o["out"], "measure"):  # refused up front when unwritable or in use
        with parallel.session(o["device"]) as group:  # under torchrun: the process group
            # a failure on any rank stops every rank with its message, before anything is written
            result, encoder_info = parallel.check(lambda: _measure(o))
            if group is not None and not group.is_main:
                return  # rank 0 alone writes and prints
        if o["out"]:
            result.save(o["out"])
            checkpoint.remove(checkpoint_folder(o))  # the result is written: nothing to resume
    click.echo(result.to_json() if o["fmt"] == "json" else result.table())
    if o["fmt"] == "table" and encoder_info.get("normalisation"):
        click.echo(f"latent normalisation: {encoder_info['normalisation']}")
    if o["out"] and o["fmt"] == "table":
        click.echo(f"wrote {o['out']}/measure.json, curve.csv, curve.png")


def _measure(o: dict) -> tuple[MeasureResult, dict]:
    """The measurement of ``measure``'s options: (result, encoder information)."""
    if bool(o["encoder"]) == bool(o["latents"]):
        raise UsageError("give exactly one of --encoder PATH or --latents PATH")
    cfg = config_from_options(o)
    data = load_data(o["data"], trust_pickle=o["trust_pickle"], image=image_options_of(o))
    memory, t0 = Memory(), time.perf_counter()
    memory.start()
    latents, codebook, encoder, encoder_info = load_latents(
        data,
        latents=o["latents"],
        encoder=o["encoder"],
        arch=o["arch"],
        arch_kwargs=o["arch_kwargs"],
        codebook=o["codebook"],
        trust_pickle=o["trust_pickle"],
        sample=o["sample"],
        latent_norm=o["latent_norm"],
        device=cfg.device,
        batch_size=o["encode_batch_size"],
        progress=not o["quiet"],
        seed=o["seed"],
    )
    t_encode = time.perf_counter() - t0
    memory.stop("encode" if o["encoder"] else "latents")
    result = run_measure(
        latents,
        data,
        cfg,
        codebook=codebook,
        encoder=encoder,
        progress=parallel.progress(o["quiet"]),
        memory=memory,
        timings={"encode_s": t_encode} if encoder_info else None,
        report_extra={"encoder": encoder_info} if encoder_info else None,
        checkpoint=checkpoint_folder(o),
        restart=o["restart"],
        checkpoint_every=o["checkpoint_every"],
    )
    return result, encoder_info


def load_latents(
    data: Any,
    *,
    latents: str | None = None,
    encoder: str | None = None,
    arch: str | None = None,
    arch_kwargs: str | None = None,
    codebook: str | None = None,
    trust_pickle: bool = False,
    sample: bool = False,
    latent_norm: bool = True,
    device: str = "auto",
    batch_size: int = 256,
    progress: bool = True,
    seed: int = 0,
) -> tuple[Any, Any, Any, dict]:
    """Latents from the file ``latents`` or by encoding ``data`` with the encoder at ``encoder``
    (under torchrun in row shards across the ranks); a codebook if any; the encoder as a
    callable (batch -> latents) for the diagnostics, None for a latents file; and what is known
    of the encoder (path, format, latent normalisation; empty for a latents file)."""
    book = load_data(codebook, trust_pickle=trust_pickle).take() if codebook else None
    if latents:
        z = load_data(latents, trust_pickle=trust_pickle)
        if len(z) != len(data):
            raise UsageError(
                f"--latents {latents}: {len(z)} rows, but --data has {len(data)}; "
                "rows must correspond"
            )
        return z, book, None, {}
    dev = resolve_device(device)
    enc = load_encoder(
        encoder,
        arch=arch,
        arch_kwargs=arch_kwargs,
        trust_pickle=trust_pickle,
        sample=sample,
        device=dev,
        latent_norm=latent_norm,
    )
    info = {"path": str(encoder), "format": enc.format, "normalisation": enc.normalisation}
    z = sharding.encode(enc, data, batch_size=batch_size, device=dev, progress=progress, seed=seed)
    return (
        z,
        enc.codebook if book is None else book,
        lambda xb: enc.encode(xb, device=dev, progress=False),
        info,
    )
