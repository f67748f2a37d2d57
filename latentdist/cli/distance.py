"""``latentdist distance``: a thin shell over ``latentdist.evaluation.distance.sample_distance``."""

from __future__ import annotations

import click
import torch

from latentdist.cli.options import CONTEXT, THREADS_OPTION
from latentdist.data import load_data
from latentdist.discrepancy import METRICS
from latentdist.errors import UsageError
from latentdist.evaluation.distance import sample_distance
from latentdist.outdir import output_folder


def _metric_names() -> list[str]:
    return list(METRICS)


@click.command("distance", context_settings=CONTEXT)
@click.argument("samples", metavar="SAMPLES")
@click.option(
    "--data",
    "reference",
    required=True,
    metavar="PATH_OR_NAME",
    help="Reference data: an array file, a folder of images, or a built-in name (digits, mnist5k, photos32).",
)
@click.option(
    "--metric",
    type=click.Choice(_metric_names()),
    default=None,
    help="Discrepancy d_F (see docs/metrics.md). Default: mmd (unbiased, several bandwidths).",
)
@click.option(
    "--n-eval",
    type=int,
    default=None,
    help="Rows per evaluation. Default: min(1000, half the samples, what the reference allows); "
    "the reference needs 2 x n_eval rows (evaluation + floor), more for metrics that train.",
)
@click.option(
    "--seeds", type=int, default=5, show_default=True, help="Independent splits for the 95% CI."
)
@click.option(
    "--features",
    default="auto",
    show_default=True,
    metavar="auto|identity|learned|inception:PATH|dinov2:PATH|PATH",
    help="Feature space of fd and kid: auto (learned for images, identity for vectors), "
    "identity, learned (trained on reference rows that are never scored), inception:PATH "
    "(FID's Inception-v3 with pytorch-fid's weights file; needs pytorch-fid), dinov2:PATH "
    "(DINOv2 from a torch-hub checkpoint; needs latentdist[features]), or a TorchScript "
    "feature extractor. Images must be scaled to [-1, 1]; preprocessing: docs/metrics.md.",
)
@click.option(
    "--feature-steps",
    type=int,
    default=300,
    show_default=True,
    help="Training steps of a learned feature network (one per seed, as compare's).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="First seed.")
@click.option(
    "--trust-pickle", is_flag=True, help="Allow unpickling files (only for files you trust)."
)
@THREADS_OPTION
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Write distance.json here (one run at a time; see docs/formats.md).",
)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@click.option("--no-progress", "--quiet", "quiet", is_flag=True, help="No progress bars.")
def distance(samples: str, reference: str, **o) -> None:
    """The discrepancy between generated SAMPLES and a reference set, with its floor.

    SAMPLES takes any format --data takes. For every seed the reference is split into an
    evaluation sample and a disjoint floor sample of n_eval rows (and, for metrics that train,
    rows to train on); distance = d(samples, reference eval rows), floor = d(reference floor rows,
    reference eval rows): what fresh real data scores at this size. Mean and 95% interval over
    seeds, and whether the samples lie above the floor (the interval of distance - floor, seed by
    seed, excludes 0).
    """

    if o["threads"] is not None:
        torch.set_num_threads(o["threads"])
    if o["feature_steps"] < 1:
        raise UsageError(f"--feature-steps {o['feature_steps']}: expected an integer >= 1")
    with output_folder(o["out"], "distance"):  # checked before the work, not after it
        smp = load_data(samples, trust_pickle=o["trust_pickle"])
        ref = load_data(reference, trust_pickle=o["trust_pickle"])
        result = sample_distance(
            smp,
            ref,
            metric=o["metric"],
            n_eval=o["n_eval"],
            seeds=o["seeds"],
            features=o["features"],
            seed=o["seed"],
            feature_steps=o["feature_steps"],
            progress=not o["quiet"],
        )
        if o["out"]:
            path = result.save(o["out"])
    click.echo(result.to_json() if o["fmt"] == "json" else result.table())
    if o["out"] and o["fmt"] == "table":
        click.echo(f"wrote {path}")
