"""``latentdist compare``: a thin shell over ``latentdist.evaluation.compare.compare``."""

from __future__ import annotations

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
from latentdist.errors import UsageError
from latentdist.evaluation.compare import CompareConfig, CompareResult, RunSpec
from latentdist.evaluation.compare import compare as run_compare
from latentdist.outdir import output_folder


@click.command("compare", context_settings=CONTEXT)
@click.argument("run_dirs", nargs=-1, metavar="RUN_DIR...")
@click.option(
    "--pair",
    "pairs",
    multiple=True,
    metavar="NAME:ENCODER:DECODER",
    help="An external contender: TorchScript encoder (data -> latent) and decoder (latent -> data). "
    "Repeatable.",
)
@click.option(
    "--data",
    required=True,
    metavar="PATH_OR_NAME",
    help="Data: an array file, a folder of images, or a built-in name (digits, mnist5k, photos32).",
)
@image_options
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="Write compare.json, report.md, PNGs; each run's finished phases are kept in "
    "OUT/checkpoint until then, so the same command resumes after an interruption.",
)
@resume_options
@click.option(
    "--features",
    type=click.Path(),
    help="Feature extractor for FD / precision / recall: a TorchScript file, inception:PATH or "
    "dinov2:PATH (as distance --features) (default: a small network trained once here on the "
    "training rows).",
)
@click.option(
    "--feature-steps", type=int, default=300, show_default=True, help="Steps for the default net."
)
@click.option(
    "--gen-seeds", type=int, default=3, show_default=True, help="Generation repetitions (for CIs)."
)
@click.option(
    "--n-samples",
    type=int,
    default=None,
    help="Decoded samples per generation seed. Default: the held-out count, at most 2000.",
)
@click.option("--prior-components", type=int, default=10, show_default=True)
@click.option(
    "--prior-pca", type=int, default=64, show_default=True, help="PCA dimensions before the GMM."
)
@click.option(
    "--probe-steps",
    type=int,
    default=None,
    help="Training steps of the generation probe (a rectified flow on the latents; see "
    "docs/metrics.md). Default: the fixed recipe's 4000; 0 skips the probe.",
)
@click.option("--k", "k", type=int, default=5, show_default=True, help="k for PRDC.")
@measurement_options
@click.option("--encode-batch-size", type=int, default=256, show_default=True)
@click.option(
    "--trust-pickle", is_flag=True, help="Allow unpickling files (only for files you trust)."
)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@click.option("--no-progress", "--quiet", "quiet", is_flag=True, help="No progress bars.")
def compare(**o) -> None:
    """Compare train-dae runs (and external encoder/decoder pairs) head to head.

    Every run gets the same measurement (same flags and seeds as `measure`), reconstruction error
    on held-out rows, generation quality (a Gaussian-mixture prior and the probe, a rectified
    flow of one fixed recipe, fitted, sampled and decoded; FD, KID, precision/recall/density/
    coverage, W2 against held-out data) and diffusability diagnostics (latent spectrum,
    equivariance, latent statistics, mode count, decoder robustness to latent noise).

    Under torchrun (torchrun --nproc-per-node N -m latentdist compare ...) the measurement and
    the encoding are split across the processes; rank 0 writes (docs/distributed.md).
    """
    with output_folder(o["out"], "compare"):  # refused up front when unwritable or in use
        with parallel.session(o["device"]) as group:  # under torchrun: the process group
            # a failure on any rank stops every rank with its message, before anything is written
            result = parallel.check(lambda: _compare(o))
            if group is not None and not group.is_main:
                return  # rank 0 alone writes and prints
        result.save(o["out"])
        checkpoint.remove(checkpoint_folder(o))  # the result is written: nothing to resume
    click.echo(result.to_json() if o["fmt"] == "json" else result.table())
    if o["fmt"] == "table":
        click.echo(f"wrote {o['out']}/compare.json, report.md and figures")


def _compare(o: dict) -> CompareResult:
    specs = [RunSpec.from_dir(d) for d in o["run_dirs"]]
    specs += [RunSpec.parse_pair(p) for p in o["pairs"]]
    if not specs:
        raise UsageError("compare: give at least one RUN_DIR or --pair NAME:ENCODER:DECODER")
    config = CompareConfig(
        measure_config=config_from_options(o),
        gen_seeds=o["gen_seeds"],
        features=o["features"],
        feature_steps=o["feature_steps"],
        n_samples=o["n_samples"],
        prior_components=o["prior_components"],
        prior_pca=o["prior_pca"],
        probe_steps=o["probe_steps"],
        k=o["k"],
        encode_batch_size=o["encode_batch_size"],
        device=o["device"],
        trust_pickle=o["trust_pickle"],
    )
    data = o["data"]
    if o["channels"] != "auto" or o["resize"]:
        data = load_data(data, trust_pickle=o["trust_pickle"], image=image_options_of(o))
    return run_compare(
        specs,
        data,
        config,
        progress=parallel.progress(o["quiet"]),
        checkpoint=checkpoint_folder(o),
        restart=o["restart"],
        checkpoint_every=o["checkpoint_every"],
    )
