"""The DAE trainer: one readable training loop for both the DAE and its joint baseline.

Decoupled Autoencoder (Hu et al., "Complexity Matters: Rethinking the Latent Space for Generative
Modeling", NeurIPS 2023, arXiv 2307.08283):

* stage 1 (``stage1_steps``): encoder (+ bottleneck/codebook) and a *weaker* auxiliary decoder
  (``aux_width_mult`` times the width, ``aux_dropout`` dropout) are trained together;
* stage 2 (``stage2_steps``): encoder and bottleneck are frozen (no gradient, eval mode, weights
  bit-for-bit unchanged) and the full decoder is trained on their latents.

``mode='joint'`` trains encoder + full decoder together for ``stage1_steps + stage2_steps`` steps.

Read top to bottom: ``train`` sets up the process group, ``_setup`` the data and networks (the
seeded steps in a fixed order), ``_loop`` steps, logs and checkpoints, ``_finish`` exports.
Beside it: ``data.py`` (split and batch order), ``step.py`` (one optimisation step),
``evaluate.py``, ``state.py`` (checkpoints, run.json), ``export.py``, ``log.py``.
"""

from __future__ import annotations

import time

import torch

from latentdist import parallel
from latentdist._io import save_json, save_torch
from latentdist.checkpoint import rng_state
from latentdist.dae.config import TrainConfig
from latentdist.dae.curves import require_tensorboard
from latentdist.dae.data import (
    BatchStream,
    TrainData,
    load_training_data,
    normalization_statistics,
    training_split,
)
from latentdist.dae.evaluate import evaluate, validation_loss
from latentdist.dae.export import export_run, save_stage1_encoder
from latentdist.dae.log import RunLog
from latentdist.dae.losses import PerceptualLoss
from latentdist.dae.models import build_models
from latentdist.dae.state import (
    Run,
    check_out_dir,
    checkpoint_payload,
    load_checkpoint,
    prepare_out_dir,
    restore,
    run_summary,
)
from latentdist.dae.step import (
    Stage,
    freeze_encoder,
    make_stepper,
    stage_of,
    start_stage,
    train_step,
)
from latentdist.device import resolve_device
from latentdist.errors import UsageError

_CURVE_VAL_ROWS = 1024  # held-out rows behind the validation points of curves.png
LOG_KEYS = ("loss", "rec", "kl", "vq", "perplexity", "perceptual", "g_loss", "d_loss", "d_weight")


class NonFiniteLossError(UsageError):
    """The loss became NaN or Inf; the run stopped and its last checkpoint predates the failure."""


def train(config: TrainConfig) -> dict:
    """Train a DAE (``mode='dae'``) or the joint baseline (``mode='joint'``); return run.json.

    Writes ``encoder.pt``, ``decoder.pt`` (TorchScript), ``model.safetensors``, ``run.json``,
    ``metrics.jsonl``, ``checkpoint.pt`` and, in dae mode, ``stage1/encoder.pt`` into
    ``config.out`` (see docs/dae.md). Runs under torchrun with DDP when ``WORLD_SIZE > 1``.
    """
    config.validate()
    device = resolve_device(config.device)
    info = parallel.setup(device.type)
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        if device.type == "cuda" and info.world_size > 1:
            device = torch.device("cuda", info.local_rank)
        with parallel.stop_when_a_rank_dies(info):  # a rank killed: one line here, exit 2
            return _train(config, device, info)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        parallel.teardown(info)


def _train(config: TrainConfig, device: torch.device, info: parallel.DistInfo) -> dict:
    """Set up, run the loop, write the outputs (rank 0 alone writes)."""
    t_start = time.time()
    finished = check_out_dir(config)
    if finished is not None:
        return finished
    run = _setup(config, device, info, t_start)
    log = _open_log(run)
    t_loop = time.perf_counter()
    try:
        _loop(run, log)
    finally:  # also when the loss diverged: leave a tidy bar and a flushed metrics file
        log.close()
    loop_time = time.perf_counter() - t_loop
    result = _finish(run, loop_time) if info.is_main else {}
    parallel.barrier()
    return result


def _setup(
    config: TrainConfig, device: torch.device, info: parallel.DistInfo, t_start: float
) -> Run:
    """Data, split and statistics, the networks, the optimisers' shared parts and, with
    ``--resume``, the checkpoint's states. The seeded steps run in this order, always."""
    if config.precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16: needs --device cuda (use bf16 or fp32 on CPU)")
    if config.tensorboard and info.is_main:
        require_tensorboard()
    config, src = load_training_data(config, info.world_size)
    fingerprint = src.fingerprint()
    train_idx, val_idx = training_split(config, len(src))
    shift, scale = normalization_statistics(src, train_idx)
    ckpt = load_checkpoint(config, fingerprint) if config.resume else None
    if device.type == "cpu":  # bit-exact resumption on CPU
        torch.use_deterministic_algorithms(True, warn_only=True)
    models = build_models(config, src.sample_shape, src.kind, shift, scale)
    if ckpt is not None:
        models.load_state_dicts(ckpt["models"])
    channels_last = (
        config.channels_last if config.channels_last is not None else device.type == "cuda"
    )
    channels_last = channels_last and src.kind == "images"
    models.to(device, channels_last)
    torch.manual_seed(config.seed + info.rank)  # per-process noise (dropout, KL samples)
    perceptual = PerceptualLoss(config.perceptual, device) if config.perceptual else None
    run = Run(
        config=config,
        device=device,
        info=info,
        src=src,
        fingerprint=fingerprint,
        train_idx=train_idx,
        val_idx=val_idx,
        models=models,
        channels_last=channels_last,
        data=TrainData(src, train_idx, models.normalize, device, channels_last),
        stream=BatchStream(
            len(train_idx), config.batch_size, config.seed, info.rank, info.world_size
        ),
        stepper=make_stepper(config, models, device, perceptual),
        example=src.take(val_idx[:2] if len(val_idx) else train_idx[:2]),
        bad=torch.zeros((), dtype=torch.bool, device=device),
        t_start=t_start,
    )
    if ckpt is not None:
        restore(run, ckpt)
    return run


def _open_log(run: Run) -> RunLog:
    """Rank 0 prepares the output folder and opens the log; the other processes wait for it."""
    config = run.config
    log = RunLog(run.out, f"{config.mode} ({config.bottleneck}) on {config.data}")
    if run.info.is_main:
        prepare_out_dir(config)
        log.start(run.start_step, run.ckpt is not None, config.tensorboard)
    parallel.barrier()
    if run.info.is_main:
        log.open(config.progress, config.total_steps, run.start_step, f"train-dae {config.mode}")
    return log


def _loop(run: Run, log: RunLog) -> None:
    """The training loop: a step per global batch; logs, checks and checkpoints on schedule."""
    config = run.config
    for step in range(run.start_step, config.total_steps):
        name = stage_of(config, step)
        if run.stage is None or run.stage.name != name:
            run.stage = _enter_stage(run, name, step)
        x = run.data(run.stream.local_indices(step))
        logs, bad = train_step(run.stepper, run.stage, x, step)
        run.bad |= bad
        done_steps = step + 1
        stage_end = done_steps == config.total_steps or (
            config.mode == "dae" and done_steps == config.stage1_steps
        )
        save_now = stage_end or (
            config.checkpoint_every and done_steps % config.checkpoint_every == 0
        )
        if done_steps % config.log_every == 0 or stage_end or save_now:
            _check_finite(run, done_steps)
            _log_step(run, log, logs, done_steps, save_now)
        if save_now:
            _checkpoint(run, log, done_steps)
        log.advance()


def _enter_stage(run: Run, name: str, step: int) -> Stage:
    """Start stage ``name`` at ``step``; stage 2 first freezes the encoder and (rank 0) saves it
    as ``stage1/encoder.pt``. A resumed run takes its stage's optimiser from the checkpoint."""
    if name == "stage2":
        freeze_encoder(run.models)
        if run.info.is_main:
            save_stage1_encoder(run.out, run.models, run.example)
    ckpt = run.ckpt
    resumed = ckpt is not None and ckpt["stage"] == name and step == run.start_step
    opt_state = ckpt["optimizer"] if resumed else None
    return start_stage(name, run.models, run.config, run.device, opt_state)


def _check_finite(run: Run, step: int) -> None:
    """Stop every process with ``NonFiniteLossError`` once any saw a NaN/Inf loss."""
    flag = run.bad.float()
    parallel.all_reduce_sum_(flag)
    if flag.item() > 0:
        last = run.out / "checkpoint.pt"
        where = f"last good checkpoint: {last}" if last.is_file() else "no checkpoint was written"
        raise NonFiniteLossError(
            f"loss became NaN/Inf by step {step} ({run.stage.name}); training stopped, {where}; "
            "try a lower --lr, --grad-clip 1 or --precision fp32"
        )


def _log_step(run: Run, log: RunLog, logs: dict, step: int, save_now: bool) -> None:
    """Average the loss terms over processes; rank 0 writes them (with a held-out point on the
    curves at checkpoints, which uses no randomness)."""
    keys = [k for k in LOG_KEYS if k in logs]
    vals = parallel.all_reduce_mean_(torch.stack([logs[k].float() for k in keys])).tolist()
    run.last_log = dict(zip(keys, vals, strict=True))
    if not run.info.is_main:
        return
    record = {
        "step": step,
        "stage": run.stage.name,
        **run.last_log,
        "lr": run.stage.opt.param_groups[0]["lr"],
        "time": round(run.elapsed(), 4),
    }
    if save_now:
        rows = run.val_idx[:_CURVE_VAL_ROWS]
        record["val_rec"] = validation_loss(
            run.models, run.stage.decoder, run.src, rows, run.device, run.config.rec_loss
        )
    log.write(record)


def _checkpoint(run: Run, log: RunLog, step: int) -> None:
    """Gather every process's RNG state; rank 0 flushes the log and writes checkpoint.pt."""
    rng = parallel.all_gather_object(rng_state())
    if not run.info.is_main:
        return
    log.flush()
    save_torch(run.out / "checkpoint.pt", checkpoint_payload(run, step, rng))


def _finish(run: Run, loop_time: float) -> dict:
    """Rank 0: the final evaluation, the exported networks and run.json (returned)."""
    out, ckpt = run.out, run.ckpt
    if (
        run.start_step == run.config.total_steps
        and ckpt is not None
        and ckpt["stage"] == "stage2"
        and not (out / "stage1" / "encoder.pt").is_file()
    ):
        save_stage1_encoder(out, run.models, run.example)
    final = evaluate(run.models, run.src, run.val_idx, run.device)
    latent_shape = export_run(out, run.models, run.config, run.example)
    result = run_summary(run, final, latent_shape, loop_time)
    save_json(out / "run.json", result)
    return result
