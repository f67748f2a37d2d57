"""``latentdist train-dae``: a thin shell over ``latentdist.dae.train`` (``python -m
latentdist.dae`` runs it on its own)."""

from __future__ import annotations

import click

from latentdist._io import to_json
from latentdist.cli.options import CONTEXT, image_options, parse_size
from latentdist.dae import TrainConfig, train
from latentdist.errors import UsageError
from latentdist.outdir import output_folder

_D = TrainConfig()


def _ints(text: str | None) -> tuple[int, ...] | None:
    if text is None or text == "":
        return None
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise UsageError(
            f"--channel-mult {text}: expected comma-separated integers like 1,2,2"
        ) from None


@click.command("train-dae", context_settings={**CONTEXT, "show_default": True})
@click.option(
    "--data",
    required=True,
    help="Built-in name (digits, mnist5k, photos32), array file or image folder.",
)
@image_options
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder (one run at a time; see docs/formats.md).",
)
@click.option(
    "--mode",
    type=click.Choice(["dae", "joint"]),
    default=_D.mode,
    help="dae: stage 1 (encoder + weak aux decoder), stage 2 (frozen encoder, full decoder); joint: baseline.",
)
@click.option("--bottleneck", type=click.Choice(["ae", "kl", "vq"]), default=_D.bottleneck)
@click.option(
    "--stage1-steps",
    type=int,
    default=_D.stage1_steps,
    help="Stage-1 steps (joint: trains stage1+stage2 steps).",
)
@click.option("--stage2-steps", type=int, default=_D.stage2_steps)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="GLOBAL batch; split evenly over torchrun processes. Default: 64, or for images above "
    "64x64 pixels 64*4096/(H*W), at least 4 (the same pixels per step at any size).",
)
@click.option("--lr", type=float, default=_D.lr, help="Adam learning rate (constant).")
@click.option(
    "--grad-clip", type=float, default=_D.grad_clip, help="Clip the gradient norm (0 = off)."
)
@click.option(
    "--base-width", type=int, default=_D.base_width, help="Conv channels at full resolution."
)
@click.option(
    "--channel-mult",
    default=None,
    help="Per-level multipliers, e.g. 1,2,2 [default: 1,2,2,4,.. cut to --downsample].",
)
@click.option(
    "--num-res-blocks",
    type=int,
    default=_D.num_res_blocks,
    help="ResNet blocks per level (decoder: one more).",
)
@click.option(
    "--downsample",
    type=int,
    default=_D.downsample,
    help="Spatial downsampling factor (power of two).",
)
@click.option(
    "--latent-channels",
    type=int,
    default=_D.latent_channels,
    help="Latent channels (vectors: latent dimension).",
)
@click.option(
    "--mlp-hidden",
    type=int,
    default=_D.mlp_hidden,
    help="Hidden width of the MLP pair (vector data).",
)
@click.option(
    "--mlp-layers",
    type=int,
    default=_D.mlp_layers,
    help="Hidden layers of the MLP pair (vector data).",
)
@click.option(
    "--aux-width-mult",
    type=float,
    default=_D.aux_width_mult,
    help="Stage-1 aux decoder width / full width.",
)
@click.option(
    "--aux-dropout", type=float, default=_D.aux_dropout, help="Dropout in the stage-1 aux decoder."
)
@click.option(
    "--kl-weight", type=float, default=_D.kl_weight, help="beta of the KL term (kl bottleneck)."
)
@click.option("--codebook-size", type=int, default=_D.codebook_size, help="Codes (vq bottleneck).")
@click.option("--vq-beta", type=float, default=_D.vq_beta, help="Commitment weight (vq).")
@click.option(
    "--vq-ema/--no-vq-ema",
    default=_D.vq_ema,
    help="EMA codebook updates instead of the codebook loss.",
)
@click.option("--vq-decay", type=float, default=_D.vq_decay, help="EMA decay (vq).")
@click.option(
    "--vq-restart-every",
    type=int,
    default=_D.vq_restart_every,
    help="Restart codes unused for this many steps (0 = off).",
)
@click.option("--rec-loss", type=click.Choice(["l1", "l2"]), default=_D.rec_loss)
@click.option(
    "--disc-weight",
    type=float,
    default=_D.disc_weight,
    help="PatchGAN hinge loss weight (0 = no discriminator).",
)
@click.option(
    "--disc-start", type=int, default=_D.disc_start, help="Step at which the GAN loss starts."
)
@click.option(
    "--perceptual",
    type=click.Path(dir_okay=False),
    default=None,
    help="TorchScript feature network for a perceptual loss (yours; nothing is downloaded).",
)
@click.option("--perceptual-weight", type=float, default=_D.perceptual_weight)
@click.option(
    "--val-fraction", type=float, default=_D.val_fraction, help="Held-out fraction (seeded split)."
)
@click.option("--split-seed", type=int, default=_D.split_seed)
@click.option("--seed", type=int, default=_D.seed)
@click.option("--device", default=_D.device, help="auto, cpu or cuda.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default=_D.precision,
    help="Autocast dtype.",
)
@click.option(
    "--channels-last/--no-channels-last", default=None, help="[default: on for CUDA images]"
)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option(
    "--threads", type=int, default=None, help="CPU threads for torch [default: torch's choice]."
)
@click.option(
    "--log-every", type=int, default=_D.log_every, help="Steps between metrics.jsonl lines."
)
@click.option(
    "--checkpoint-every",
    type=int,
    default=_D.checkpoint_every,
    help="Steps between checkpoints (0 = stage ends only).",
)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in OUT.")
@click.option("--progress/--no-progress", default=True, help="Progress bar.")
@click.option(
    "--tensorboard",
    is_flag=True,
    help="Also write TensorBoard event files to OUT/tensorboard (needs latentdist[tensorboard]).",
)
@click.option("--trust-pickle", is_flag=True, help="Allow unpickling --data files.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def train_dae(
    channel_mult: str | None, compile_: bool, fmt: str, resize: str | None, **kw: object
) -> None:
    """Train a Decoupled Autoencoder (--mode dae) or the joint baseline (--mode joint).

    Writes encoder.pt / decoder.pt (TorchScript), model.safetensors, run.json, metrics.jsonl,
    curves.png, checkpoint.pt (and stage1/encoder.pt in dae mode) to --out. Images of any size
    work: the encoder pads them to multiples of --downsample, the decoder crops back. Under `torchrun --nproc_per_node N`
    it trains with DDP; --batch-size is the global batch.
    """
    config = TrainConfig(
        channel_mult=_ints(channel_mult),
        compile=compile_,
        resize=parse_size(resize),
        **kw,  # type: ignore[arg-type]
    )
    with output_folder(config.out, "train-dae"):  # locked before the checkpoint is read
        run = train(config)
    if not run:  # not rank 0
        return
    if fmt == "json":
        click.echo(to_json(run))
        return
    f = run["final"]
    lines = [
        f"mode {run['mode']}  bottleneck {run['bottleneck']}  data {run['data']} {run['data_shape']} -> latent {run['latent_shape']}",
        f"params: encoder {run['encoder_params']}  decoder {run['decoder_params']}  aux decoder {run['aux_decoder_params']}",
        f"validation MSE {f['val_mse']}"
        + (
            f"  (stage-1 aux decoder {f['val_mse_aux']})"
            if f.get("val_mse_aux") is not None
            else ""
        ),
    ]
    if "codebook_perplexity" in f:
        lines.append(
            f"codebook perplexity {f['codebook_perplexity']:.1f}, codes used {f['codes_used']}"
        )
    lines.append(
        f"wrote {config.out}/ (encoder.pt, decoder.pt, model.safetensors, run.json, curves.png) in {run['time_s']:.1f} s"
    )
    click.echo("\n".join(lines))
