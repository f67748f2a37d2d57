"""A run's state and how it is kept: the output folder's rules, the checkpoint (RNG states
included, for exact resumption) and the summary that becomes ``run.json``."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from latentdist.checkpoint import set_rng_state
from latentdist.dae.config import RESUMABLE_CHANGES, TrainConfig
from latentdist.dae.data import BatchStream, TrainData
from latentdist.dae.models import Models
from latentdist.dae.step import Stage, Stepper
from latentdist.data import DataSource
from latentdist.errors import UsageError
from latentdist.generators.modules import count_params
from latentdist.parallel import DistInfo
from latentdist.versions import versions

OUTPUT_FILES = (
    "encoder.pt",
    "decoder.pt",
    "model.safetensors",
    "run.json",
    "metrics.jsonl",
    "curves.png",
    "checkpoint.pt",
    "stage1/encoder.pt",
)
SPLIT_RULE = (
    "p = numpy.random.default_rng(split_seed).permutation(n); "
    "validation = sorted(last round(n * val_fraction) of p)"
)
LATENT_ENCODINGS = {"ae": "z", "kl": "posterior mean", "vq": "quantised codebook vectors"}


@dataclass
class Run:
    """One run as its loop sees it: what is set up once, and what it carries from step to step
    (the current stage, the non-finite flag since the last check, the last logged terms)."""

    config: TrainConfig
    device: torch.device
    info: DistInfo
    src: DataSource
    fingerprint: str
    train_idx: np.ndarray
    val_idx: np.ndarray
    models: Models
    channels_last: bool
    data: TrainData
    stream: BatchStream
    stepper: Stepper
    example: torch.Tensor  # two rows the exported networks are traced on
    bad: torch.Tensor  # any loss NaN/Inf since the last check
    t_start: float
    ckpt: dict | None = None
    start_step: int = 0
    elapsed_before: float = 0.0  # training time before the checkpoint resumed from
    stage: Stage | None = None
    last_log: dict = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def elapsed(self) -> float:
        """Seconds of training so far, the resumed run's earlier time included."""
        return self.elapsed_before + time.time() - self.t_start


# ---------------------------------------------------------------- the output folder


def check_out_dir(config: TrainConfig) -> dict | None:
    """Refuse to clobber runs; return the finished run.json when resuming a finished run."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    run_json, ckpt = out / "run.json", out / "checkpoint.pt"
    finished = None
    if run_json.is_file():
        with contextlib.suppress(ValueError, OSError):
            finished = json.loads(run_json.read_text())
        finished = finished if isinstance(finished, dict) and finished.get("finished") else None
    if config.overwrite:
        return None
    if finished is not None:
        if config.resume:
            return finished
        raise UsageError(f"--out {out}: holds a finished run; pass --overwrite to replace it")
    if config.resume and not ckpt.is_file():
        raise UsageError(f"--resume: {ckpt} not found (nothing to resume)")
    if ckpt.is_file() and not config.resume:
        raise UsageError(
            f"--out {out}: holds an unfinished run; pass --resume to continue it or --overwrite to restart"
        )
    return None


def prepare_out_dir(config: TrainConfig) -> None:
    """Create ``--out``; with ``--overwrite`` first remove what an earlier run wrote there."""
    out = Path(config.out)
    if config.overwrite:
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "stage1", ignore_errors=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- checkpoints


def check_resumable(config: TrainConfig, ckpt: dict, fingerprint: str) -> None:
    """Refuse to resume with settings (other than ``RESUMABLE_CHANGES``) or data that differ."""
    old = TrainConfig.from_dict(ckpt["config"]).to_dict()
    new = config.to_dict()
    for k, v in new.items():
        if k in RESUMABLE_CHANGES or k in ("out", "data"):
            continue
        if old.get(k) != v:
            raise UsageError(
                f"--resume: --{k.replace('_', '-')} is {v} but the checkpoint was made with {old.get(k)}"
            )
    if ckpt["data_fingerprint"] != fingerprint:
        raise UsageError(
            f"--resume: --data {config.data} is not the data the checkpoint was trained on"
        )


def load_checkpoint(config: TrainConfig, fingerprint: str) -> dict:
    """``OUT/checkpoint.pt``, checked to continue this config on this data."""
    ckpt = torch.load(Path(config.out) / "checkpoint.pt", map_location="cpu", weights_only=True)
    check_resumable(config, ckpt, fingerprint)
    return ckpt


def restore(run: Run, ckpt: dict) -> None:
    """Continue from ``ckpt``: its step and time, the grad scaler, the critic's optimiser and
    this process's RNG states (the stage's optimiser is restored when the stage starts)."""
    run.ckpt = ckpt
    run.start_step, run.elapsed_before = int(ckpt["step"]), float(ckpt["elapsed"])
    run.stepper.scaler.load_state_dict(ckpt["scaler"])
    if run.stepper.critic is not None:
        run.stepper.critic.opt.load_state_dict(ckpt["disc_optimizer"])
    rng = ckpt["rng"]
    if len(rng) == run.info.world_size:
        set_rng_state(rng[run.info.rank])
    else:  # a different process count cannot replay the old noise streams
        torch.manual_seed(run.config.seed + run.info.rank + 7919 * run.start_step)


def checkpoint_payload(run: Run, step: int, rng: list[dict]) -> dict:
    """What ``checkpoint.pt`` holds after ``step`` steps; ``rng`` has every process's states."""
    critic = run.stepper.critic
    return {
        "format": 1,
        "step": step,
        "stage": run.stage.name,
        "config": run.config.to_dict(),
        "data_fingerprint": run.fingerprint,
        "models": run.models.state_dicts(),
        "optimizer": run.stage.opt.state_dict(),
        "disc_optimizer": critic.opt.state_dict() if critic is not None else None,
        "scaler": run.stepper.scaler.state_dict(),
        "rng": rng,
        "data_order": run.stream.state(step),
        "elapsed": run.elapsed(),
        "world_size": run.info.world_size,
    }


# ---------------------------------------------------------------- run.json


def split_summary(run: Run) -> dict:
    """The seeded split, reproducible from run.json alone (indices listed up to 100,000)."""
    return {
        "rule": SPLIT_RULE,
        "split_seed": run.config.split_seed,
        "val_fraction": run.config.val_fraction,
        "n_train": len(run.train_idx),
        "n_val": len(run.val_idx),
        "val_indices": run.val_idx.tolist() if len(run.val_idx) <= 100_000 else None,
    }


def run_summary(run: Run, final: dict, latent_shape: list[int], loop_time: float) -> dict:
    """run.json: the data, split, schedule, network sizes, final scores, speed and versions."""
    config, models, device = run.config, run.models, run.device
    steps_run = config.total_steps - run.start_step
    return {
        "finished": True,
        "mode": config.mode,
        "bottleneck": config.bottleneck,
        "data": config.data,
        "data_fingerprint": run.fingerprint,
        "data_kind": run.src.kind,
        "data_shape": list(run.src.sample_shape),
        "latent_shape": latent_shape,
        "latent_encoding": LATENT_ENCODINGS[config.bottleneck],
        "codebook_key": "codebook" if config.bottleneck == "vq" else None,
        "n_samples": len(run.src),
        "seed": config.seed,
        "split": split_summary(run),
        "stage1_steps": config.stage1_steps,
        "stage2_steps": config.stage2_steps,
        "steps": config.total_steps,
        "global_batch": config.batch_size,
        "world_size": run.info.world_size,
        "encoder_params": count_params(models.encoder, models.bottleneck),
        "decoder_params": count_params(models.decoder),
        "aux_decoder_params": count_params(models.aux_decoder)
        if models.aux_decoder is not None
        else None,
        "discriminator_params": count_params(models.discriminator)
        if models.discriminator is not None
        else None,
        "final": {**final, "train": run.last_log},
        "time_s": run.elapsed(),
        "loop_time_s": loop_time,
        "steps_this_process": steps_run,
        "step_time_s": loop_time / steps_run if steps_run else None,
        "samples_per_s": config.batch_size * steps_run / loop_time if steps_run else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": config.precision,
        "channels_last": run.channels_last,
        "compile": config.compile,
        "versions": versions(),
        "config": config.to_dict(),
    }
