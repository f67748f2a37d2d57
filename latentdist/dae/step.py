"""One optimisation step of a stage: the losses, the backward pass and, once the GAN loss is on,
the critic's step.

Stage 1 trains encoder, bottleneck and the weak auxiliary decoder; stage 2 the full decoder on
the frozen encoder's latents; ``joint`` everything together (see ``latentdist.dae.train``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from latentdist import parallel
from latentdist.dae.config import TrainConfig
from latentdist.dae.losses import (
    PerceptualLoss,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
)
from latentdist.dae.models import Models, Pipeline, last_layer

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --precision -> autocast dtype


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Autocast to ``precision``'s dtype on ``device``; fp32 is a disabled (no-op) autocast."""
    dtype = AMP_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def stage_of(config: TrainConfig, step: int) -> str:
    """``joint``, or for a DAE ``stage1`` before ``stage1_steps`` and ``stage2`` from there."""
    if config.mode == "joint":
        return "joint"
    return "stage1" if step < config.stage1_steps else "stage2"


@dataclass
class Stage:
    """What one stage trains: its decoder, the (DDP / compiled) pipeline and a fresh optimiser."""

    name: str
    decoder: nn.Module
    module: nn.Module
    opt: torch.optim.Optimizer


def freeze_encoder(models: Models) -> None:
    """Stage 2: encoder and bottleneck get no gradient (``Pipeline`` keeps them in eval mode)."""
    models.encoder.requires_grad_(False)
    models.bottleneck.requires_grad_(False)


def start_stage(
    name: str,
    models: Models,
    config: TrainConfig,
    device: torch.device,
    opt_state: dict | None = None,
) -> Stage:
    """Set up stage ``name``: which parts train, a fresh Adam (or ``opt_state``'s, resumed with
    the current ``--lr``), the DDP and compile wrappers."""
    decoder = models.aux_decoder if name == "stage1" else models.decoder
    pipe = Pipeline(
        models.encoder, models.bottleneck, decoder, name == "stage2", models.pad, models.crop
    ).train()
    opt = torch.optim.Adam(
        [p for p in pipe.parameters() if p.requires_grad],
        lr=config.lr,
        betas=config.adam_betas,
    )
    if opt_state is not None:
        opt.load_state_dict(opt_state)
        for group in opt.param_groups:  # --lr may change on resumption
            group["lr"] = config.lr
    module = pipe
    if parallel.active():
        module = nn.parallel.DistributedDataParallel(
            pipe, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        module = torch.compile(module)
    return Stage(name, decoder, module, opt)


@dataclass
class Critic:
    """The patch discriminator as trained (DDP-wrapped under torchrun) and its optimiser."""

    module: nn.Module
    opt: torch.optim.Optimizer


@dataclass
class Stepper:
    """What every step shares: settings, networks, perceptual loss, grad scaler and critic."""

    config: TrainConfig
    models: Models
    device: torch.device
    perceptual: PerceptualLoss | None
    scaler: torch.amp.GradScaler
    critic: Critic | None

    def uses_critic(self, step: int) -> bool:
        return self.critic is not None and step >= self.config.disc_start


def make_stepper(
    config: TrainConfig, models: Models, device: torch.device, perceptual: PerceptualLoss | None
) -> Stepper:
    """The grad scaler (active for fp16) and, with ``--disc-weight``, the critic's Adam."""
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    critic = None
    if models.discriminator is not None:
        disc_opt = torch.optim.Adam(
            models.discriminator.parameters(), lr=config.disc_lr or config.lr, betas=(0.5, 0.9)
        )
        disc_module = models.discriminator
        if parallel.active():
            disc_module = nn.parallel.DistributedDataParallel(models.discriminator)
        critic = Critic(disc_module, disc_opt)
    return Stepper(config, models, device, perceptual, scaler, critic)


def train_step(
    s: Stepper, stage: Stage, x: torch.Tensor, step: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One step of ``stage`` on the normalised batch ``x``; return the detached loss terms
    (``LOG_KEYS``) and a flag that is true when a loss was NaN or Inf."""
    config, opt = s.config, stage.opt
    with autocast(s.device, config.precision):
        x_hat, terms = stage.module(x)
    loss, logs = _generator_loss(s, stage, x, x_hat, terms, step)
    bad = ~torch.isfinite(loss.detach())
    opt.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    if config.grad_clip > 0:
        s.scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(
            [p for g in opt.param_groups for p in g["params"]], config.grad_clip
        )
    s.scaler.step(opt)
    s.scaler.update()
    if s.uses_critic(step):
        d_loss = _critic_step(s, x, x_hat)
        logs["d_loss"] = d_loss.detach()
        bad |= ~torch.isfinite(d_loss.detach())
    return logs, bad


def _generator_loss(
    s: Stepper,
    stage: Stage,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    terms: dict[str, torch.Tensor],
    step: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reconstruction + bottleneck terms (+ perceptual, + the adaptively weighted GAN loss)."""
    config, models = s.config, s.models
    rec = reconstruction_loss(x_hat, x, config.rec_loss)
    loss = rec
    logs = {"rec": rec.detach()}
    if "kl" in terms:
        loss = loss + config.kl_weight * terms["kl"]
        logs["kl"] = terms["kl"].detach()
    if "vq" in terms:
        loss = loss + terms["vq"]
        logs["vq"], logs["perplexity"] = terms["vq"].detach(), terms["perplexity"]
    if s.perceptual is not None and config.perceptual_weight > 0:
        p_loss = s.perceptual(models.denormalize(x_hat.float()), models.denormalize(x))
        loss = loss + config.perceptual_weight * p_loss
        logs["perceptual"] = p_loss.detach()
    if s.uses_critic(step):  # generator side of VQGAN's hinge game, with the adaptive weight
        models.discriminator.requires_grad_(False)
        with autocast(s.device, config.precision):
            g_loss = hinge_g_loss(models.discriminator(x_hat))
        d_weight = config.disc_weight * adaptive_weight(loss, g_loss, last_layer(stage.decoder))
        loss = loss + d_weight * g_loss
        logs["g_loss"], logs["d_weight"] = g_loss.detach(), d_weight
    logs["loss"] = loss.detach()
    return loss, logs


def _critic_step(s: Stepper, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Critic step on real and (detached) reconstructed images in one batch; its hinge loss."""
    critic = s.critic
    s.models.discriminator.requires_grad_(True)
    with autocast(s.device, s.config.precision):
        logits = critic.module(torch.cat([x, x_hat.detach().to(x.dtype)]))
    d_loss = hinge_d_loss(logits[: len(x)], logits[len(x) :])
    critic.opt.zero_grad(set_to_none=True)
    s.scaler.scale(d_loss).backward()
    s.scaler.step(critic.opt)
    s.scaler.update()
    return d_loss
