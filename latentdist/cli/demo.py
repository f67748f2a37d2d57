"""``latentdist demo``: DAE vs its joint baseline on MNIST-5k, end to end, in a few CPU minutes.

Both runs get the same total budget (DAE: stage 1 + stage 2 steps; joint: the same number of
steps), the same seed, hence the same full decoder architecture and initialisation; the DAE's
stage-1 auxiliary decoder is weaker (half the width, dropout 0.1). Then ``compare`` with a small
measurement with the defaults the validity benchmark chose (MLP generators at widths 2, 8, 32,
the multi-bandwidth MMD as metric and fit, the best held-out bound over the MMD and paired fits,
3 seeds) beside generation quality (FD, precision, recall).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from latentdist.cli.options import CONTEXT
from latentdist.dae import TrainConfig, train
from latentdist.errors import UsageError
from latentdist.estimator import MeasureConfig
from latentdist.evaluation.compare import compare
from latentdist.outdir import output_folder

DEMO_TRAIN = dict(
    bottleneck="kl",
    base_width=8,
    downsample=4,
    latent_channels=4,
    batch_size=64,
    lr=2e-3,
    aux_width_mult=0.5,
    aux_dropout=0.1,
    checkpoint_every=100,
    log_every=10,
)
DEMO_MEASURE = MeasureConfig(
    generator="mlp", capacities=(1, 4, 16, 64), depth=2, metric="mmd", fit="mmd", seeds=3,
    n_eval=500, steps=200, batch_size=256, max_capacity=256,
)  # fmt: skip


def _finished(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "run.json").read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def train_demo_run(
    mode: str, out: Path, data: str, steps: int, fresh: bool, device: str, progress: bool
) -> str:
    """Train (or reuse, or resume) one demo run; return what was done."""
    folder = out / mode
    half = steps // 2
    cfg = TrainConfig(
        data=data,
        out=str(folder),
        mode=mode,
        stage1_steps=half if mode == "dae" else steps,
        stage2_steps=steps - half if mode == "dae" else 0,
        device=device,
        progress=progress,
        **DEMO_TRAIN,
    )
    if fresh:
        cfg.overwrite = True
        train(cfg)
        return "trained"
    if _finished(folder):
        return "reused"  # a finished run in place: not retrained
    cfg.resume = (folder / "checkpoint.pt").is_file()
    train(cfg)
    return "resumed" if cfg.resume else "trained"


@click.command("demo", context_settings=CONTEXT)
@click.option(
    "--out",
    default="demo_out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder (one run at a time; see docs/formats.md).",
)
@click.option("--data", default="mnist5k", show_default=True, help="Data to train and compare on.")
@click.option(
    "--steps",
    default=300,
    show_default=True,
    type=int,
    help="Training steps per run (same for both).",
)
@click.option("--fresh", is_flag=True, help="Retrain even when finished runs are in --out.")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("--no-progress", "--quiet", "quiet", is_flag=True, help="No progress bars.")
def demo(out: str, data: str, steps: int, fresh: bool, device: str, quiet: bool) -> None:
    """Train a DAE and the joint baseline on MNIST-5k, compare them, print the table.

    Finished runs already in --out are reused rather than retrained (pass --fresh to retrain);
    an interrupted run resumes from its checkpoint.
    """
    if steps < 2:
        raise UsageError(f"--steps {steps}: expected an integer >= 2")
    t0 = time.perf_counter()
    root = Path(out)
    with output_folder(root, "demo"):
        for mode in ("dae", "joint"):
            what = train_demo_run(mode, root, data, steps, fresh, device, not quiet)
            note = " (finished run found; pass --fresh to retrain)" if what == "reused" else ""
            click.echo(f"{mode}: {what} {root / mode}{note}", err=True)
        t_train = time.perf_counter() - t0
        result = compare(
            [root / "dae", root / "joint"],
            data,
            measure_config=DEMO_MEASURE,
            gen_seeds=3,
            feature_steps=200,
            device=device,
            progress=not quiet,
        )
        result.save(root / "compare")
    click.echo(result.table())
    total = time.perf_counter() - t0
    click.echo(
        f"report: {root / 'compare' / 'report.md'}  (training {t_train:.0f} s, total {total:.0f} s)"
    )
