"""The DAE trainer: one readable training loop for both the DAE and its joint baseline.

Decoupled Autoencoder (Hu et al., "Complexity Matters: Rethinking the Latent Space for Generative
Modeling", NeurIPS 2023, arXiv 2307.08283):

* stage 1 (``stage1_steps``): encoder (+ bottleneck/codebook) and a *weaker* auxiliary decoder
  (``aux_width_mult`` times the width, ``aux_dropout`` dropout) are trained together;
* stage 2 (``stage2_steps``): encoder and bottleneck are frozen (no gradient, eval mode, weights
  bit-for-bit unchanged) and the full decoder is trained on their latents.

``mode='joint'`` trains encoder + full decoder together for ``stage1_steps + stage2_steps`` steps.

Data order: global batch ``t`` holds samples ``[t B, (t + 1) B)`` of the endless concatenation of
per-epoch permutations ``default_rng([seed, epoch]).permutation(n_train)``; process ``r`` of ``W``
takes the ``r``-th of ``W`` equal slices (a DistributedSampler over the global batch). The order is
therefore a function of the step alone, which makes resuming exact.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from latentdist._io import atomic_open, save_json, save_torch
from latentdist._shapes import Crop, PadTo, padded_size
from latentdist.dae import distributed as dist_util
from latentdist.dae.bottleneck import VectorQuantizer, make_bottleneck
from latentdist.dae.config import RESUMABLE_CHANGES, TrainConfig, default_batch_size
from latentdist.dae.curves import log_scalars, plot_curves, require_tensorboard, summary_writer
from latentdist.dae.losses import (
    PerceptualLoss,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
)
from latentdist.dae.models import (
    Affine,
    PatchDiscriminator,
    conv_decoder,
    conv_encoder,
    count_params,
    last_layer,
    mlp_decoder,
    mlp_encoder,
    streamed_statistics,
)
from latentdist.data import DataSource, ImageOptions, load_data
from latentdist.device import resolve_device
from latentdist.errors import UsageError

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
_PRELOAD_BYTES = 2 << 30  # keep the training split in (device) memory below this size
_CURVE_VAL_ROWS = 1024  # held-out rows behind the validation points of curves.png
LOG_KEYS = ("loss", "rec", "kl", "vq", "perplexity", "perceptual", "g_loss", "d_loss", "d_weight")


class NonFiniteLossError(UsageError):
    """The loss became NaN or Inf; the run stopped and its last checkpoint predates the failure."""


# ---------------------------------------------------------------- models


@dataclass
class Models:
    """Every network of a run; ``normalize``/``denormalize`` map data to and from the model's scale.

    ``pad``/``crop`` carry the image-size rule (``latentdist._shapes``): the encoder sees images
    padded to multiples of ``downsample``, the decoder's output is cropped back to the data size.
    """

    normalize: Affine
    denormalize: Affine
    encoder: nn.Module
    bottleneck: nn.Module
    decoder: nn.Module
    aux_decoder: nn.Module | None
    discriminator: nn.Module | None
    pad: nn.Module = field(default_factory=nn.Identity)
    crop: nn.Module = field(default_factory=nn.Identity)

    def named(self) -> dict[str, nn.Module]:
        mods = {
            "normalize": self.normalize,
            "encoder": self.encoder,
            "bottleneck": self.bottleneck,
            "decoder": self.decoder,
            "aux_decoder": self.aux_decoder,
            "discriminator": self.discriminator,
        }
        return {k: v for k, v in mods.items() if v is not None}

    def to(self, device: torch.device, channels_last: bool = False) -> Models:
        """Move every network to ``device``, ``denormalize`` too (it has no entry in ``named``:
        its buffers are ``normalize``'s, so checkpoints do not hold them twice)."""
        for m in (*self.named().values(), self.denormalize):
            m.to(device)
            if channels_last:
                m.to(memory_format=torch.channels_last)
        return self


def build_models(
    config: TrainConfig,
    data_shape: tuple[int, ...],
    kind: str,
    shift: torch.Tensor,
    scale: torch.Tensor,
) -> Models:
    """Build the networks of ``config`` with ``torch.manual_seed(config.seed)``.

    Encoder, bottleneck and full decoder are built first, so a DAE run and a joint run with the
    same seed start from the same encoder and decoder.
    """
    torch.manual_seed(config.seed)
    c = config.latent_channels
    vq = dict(
        num_codes=config.codebook_size,
        beta=config.vq_beta,
        ema=config.vq_ema,
        decay=config.vq_decay,
        restart_every=config.vq_restart_every,
    )
    bottleneck = make_bottleneck(config.bottleneck, c, **(vq if config.bottleneck == "vq" else {}))
    aux_dropout = config.aux_dropout
    pad, crop = nn.Identity(), nn.Identity()
    if kind == "images":
        hw = tuple(data_shape[1:])
        if padded_size(*hw, config.downsample) != hw:
            pad, crop = PadTo(padded_size(*hw, config.downsample)), Crop(hw)
        ch, mult, nr, w = data_shape[0], config.mult(), config.num_res_blocks, config.base_width
        encoder = conv_encoder(ch, w, mult, nr, bottleneck.in_channels)
        decoder = conv_decoder(c, w, mult, nr, ch)
        aux_w = max(1, round(w * config.aux_width_mult))
        make_aux = lambda: conv_decoder(c, aux_w, mult, nr, ch, aux_dropout)  # noqa: E731
    else:
        h, n = config.mlp_hidden, config.mlp_layers
        encoder = mlp_encoder(data_shape, h, n, bottleneck.in_channels)
        decoder = mlp_decoder(c, h, n, data_shape)
        aux_h = max(1, round(h * config.aux_width_mult))
        make_aux = lambda: mlp_decoder(c, aux_h, n, data_shape, aux_dropout)  # noqa: E731
    aux = make_aux() if config.mode == "dae" else None
    disc = None
    if config.disc_weight > 0:
        disc = PatchDiscriminator(data_shape[0], 4 * config.base_width, min(data_shape[1:]))
    return Models(
        Affine(shift, scale),
        Affine(shift, scale, inverse=True),
        encoder,
        bottleneck,
        decoder,
        aux,
        disc,
        pad,
        crop,
    )


class Pipeline(nn.Module):
    """normalised data -> pad -> encoder -> bottleneck -> decoder -> crop; the encoder part
    frozen in stage 2."""

    def __init__(
        self,
        encoder: nn.Module,
        bottleneck: nn.Module,
        decoder: nn.Module,
        frozen: bool,
        pad: nn.Module | None = None,
        crop: nn.Module | None = None,
    ):
        super().__init__()
        self.encoder, self.bottleneck, self.decoder, self.frozen = (
            encoder,
            bottleneck,
            decoder,
            frozen,
        )
        self.pad, self.crop = pad or nn.Identity(), crop or nn.Identity()

    def train(self, mode: bool = True) -> Pipeline:
        super().train(mode)
        if self.frozen:  # eval-mode normalisation and no codebook updates in stage 2
            self.encoder.eval()
            self.bottleneck.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.frozen:
            with torch.no_grad():
                z, _ = self.bottleneck(self.encoder(self.pad(x)), sample=True)
            return self.crop(self.decoder(z)), {}
        z, terms = self.bottleneck(self.encoder(self.pad(x)), sample=True)
        return self.crop(self.decoder(z)), terms


class ExportEncoder(nn.Module):
    """Data in its own scale -> latent (``ae``: z; ``kl``: posterior mean; ``vq``: quantised vectors).

    A VQ encoder also carries its (K, C) codebook as the top-level buffer ``codebook``. Images
    are padded to the run's padded size first (``latentdist._shapes``).
    """

    def __init__(
        self,
        normalize: nn.Module,
        encoder: nn.Module,
        bottleneck: nn.Module,
        pad: nn.Module | None = None,
    ):
        super().__init__()
        self.normalize, self.encoder, self.bottleneck = normalize, encoder, bottleneck
        self.pad = pad or nn.Identity()
        if isinstance(bottleneck, VectorQuantizer):
            self.register_buffer("codebook", bottleneck.codebook.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck.encode(self.encoder(self.pad(self.normalize(x.float()))))

    @classmethod
    def of(cls, models: Models) -> ExportEncoder:
        return cls(models.normalize, models.encoder, models.bottleneck, models.pad)


class ExportDecoder(nn.Module):
    """Latent -> data in its own scale (images cropped back to the data size)."""

    def __init__(self, decoder: nn.Module, denormalize: nn.Module, crop: nn.Module | None = None):
        super().__init__()
        self.decoder, self.denormalize = decoder, denormalize
        self.crop = crop or nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.denormalize(self.crop(self.decoder(z.float())))


def _cpu_copy(module: nn.Module) -> nn.Module:
    m = copy.deepcopy(module).cpu().float().eval()
    return m.to(memory_format=torch.contiguous_format)


def save_torchscript(path: Path, module: nn.Module, example: torch.Tensor) -> None:
    """Trace ``module`` (a CPU float32 eval-mode copy) on ``example`` and save it atomically."""
    with torch.no_grad(), warnings.catch_warnings():
        # shape checks inside GroupNorm and jit's deprecation notices are harmless here
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_cpu_copy(module), example.cpu().float())
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


# ---------------------------------------------------------------- data


def split_indices(n: int, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded hold-out split: ``p = default_rng(split_seed).permutation(n)``; the last
    ``round(n * val_fraction)`` of ``p`` (sorted) are validation, the rest (sorted) training."""
    perm = np.random.default_rng(split_seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[: n - n_val]), np.sort(perm[n - n_val :])


class BatchStream:
    """Global batch ``t`` = samples ``[tB, (t+1)B)`` of concatenated seeded epoch permutations."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._cache[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        start, parts = step * self.batch, []
        end = start + self.batch
        while start < end:
            epoch, pos = divmod(start, self.n)
            take = min(end - start, self.n - pos)
            parts.append(self._perm(epoch)[pos : pos + take])
            start += take
        return np.concatenate(parts)

    def local_indices(self, step: int) -> np.ndarray:
        b = self.batch // self.world
        return self.global_indices(step)[self.rank * b : (self.rank + 1) * b]

    def state(self, step: int) -> dict:
        epoch, pos = divmod(step * self.batch, self.n)
        return {"seed": self.seed, "epoch": epoch, "position": pos, "global_batch": self.batch}


class TrainData:
    """The training split, normalised, in memory when small enough (else read per batch)."""

    def __init__(
        self,
        src: DataSource,
        idx: np.ndarray,
        normalize: Affine,
        device: torch.device,
        channels_last: bool,
    ):
        self.src, self.idx, self.normalize, self.device = src, idx, normalize, device
        self.channels_last = channels_last
        self.tensor = None
        if len(idx) * math.prod(src.sample_shape) * 4 <= _PRELOAD_BYTES:
            with torch.no_grad():  # normalize's buffers live on ``device``: move, then map
                self.tensor = normalize(src.take(idx).to(device))

    def __call__(self, local: np.ndarray) -> torch.Tensor:
        if self.tensor is not None:
            x = self.tensor[torch.from_numpy(local).to(self.device)]
        else:
            with torch.no_grad():
                x = self.normalize(
                    self.src.take(self.idx[local]).to(self.device, non_blocking=True)
                )
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


# ---------------------------------------------------------------- state


def _rng_state() -> dict:
    np_state = np.random.get_state()  # noqa: NPY002 (global state, saved for exact resumption)
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [py[0], list(py[1]), py[2]],
    }


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def _check_out_dir(config: TrainConfig) -> dict | None:
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


def _check_resumable(config: TrainConfig, ckpt: dict, fingerprint: str) -> None:
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


def _validate_data(config: TrainConfig, src: DataSource) -> None:
    shape = src.sample_shape
    if src.kind == "images":
        if len(shape) != 3:
            raise UsageError(
                f"--data {config.data}: images must be (N, C, H, W), got {(len(src),) + shape}"
            )
    else:
        if config.disc_weight > 0:
            raise UsageError("--disc-weight: the patch discriminator needs image data (N, C, H, W)")
        if config.perceptual:
            raise UsageError("--perceptual: a perceptual loss needs image data (N, C, H, W)")


def _state_dicts(models: Models) -> dict:
    return {k: m.state_dict() for k, m in models.named().items()}


def save_safetensors(path: Path, models: Models, metadata: dict[str, str]) -> None:
    """All weights as ``<module>.<name>``; a VQ codebook also under the top-level key ``codebook``."""
    from safetensors.torch import save

    tensors = {}
    for name, sd in _state_dicts(models).items():
        for k, v in sd.items():
            tensors[f"{name}.{k}"] = v.detach().cpu().contiguous().clone()
    if isinstance(models.bottleneck, VectorQuantizer):
        tensors["codebook"] = models.bottleneck.codebook.detach().cpu().float().contiguous().clone()
    with atomic_open(path, "wb") as f:
        f.write(save(tensors, metadata=metadata))


# ---------------------------------------------------------------- evaluation


@contextlib.contextmanager
def _eval_mode(models: Models):
    """Every network in eval mode, each restored to its own mode afterwards."""
    mods = list(models.named().values())
    modes = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(mods, modes, strict=True):
            m.train(mode)


@torch.no_grad()
def evaluate(
    models: Models, src: DataSource, idx: np.ndarray, device: torch.device, batch: int = 256
) -> dict:
    """Validation reconstruction MSE in the data's own scale (mean over all elements).

    Rows ``idx`` of ``src`` are read ``batch`` at a time. Uses the deterministic encoding
    (posterior mean for ``kl``); ``val_mse_aux`` for the stage-1 decoder when there is one;
    codebook perplexity ``exp(H(p))`` and codes used for ``vq``.
    """
    if len(idx) == 0:
        return {"val_mse": None, "val_mse_aux": None}
    err, err_aux, counts, n = 0.0, 0.0, None, 0
    with _eval_mode(models):
        for start in range(0, len(idx), batch):
            xb = src.take(idx[start : start + batch]).to(device)
            h = models.encoder(models.pad(models.normalize(xb)))
            z = models.bottleneck.encode(h)
            decoded = models.denormalize(models.crop(models.decoder(z)))
            err += (decoded - xb).pow(2).sum().item()
            if models.aux_decoder is not None:
                decoded = models.denormalize(models.crop(models.aux_decoder(z)))
                err_aux += (decoded - xb).pow(2).sum().item()
            if isinstance(models.bottleneck, VectorQuantizer):
                codes = models.bottleneck.codes(h).flatten()
                c = torch.bincount(codes, minlength=models.bottleneck.num_codes).double()
                counts = c if counts is None else counts + c
            n += xb.numel()
    res = {
        "val_mse": err / n,
        "val_mse_aux": err_aux / n if models.aux_decoder is not None else None,
    }
    if counts is not None:
        p = counts / counts.sum()
        res["codebook_perplexity"] = float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))
        res["codes_used"] = int((counts > 0).sum())
    return res


@torch.no_grad()
def validation_loss(
    models: Models,
    decoder: nn.Module,
    src: DataSource,
    idx: np.ndarray,
    device: torch.device,
    kind: str,
    batch: int = 256,
) -> float | None:
    """The training reconstruction loss (``kind``, on normalised data) of ``decoder`` on rows
    ``idx``, in eval mode with the deterministic encoding: the validation point of the curves."""
    if len(idx) == 0:
        return None
    total, n = 0.0, 0
    with _eval_mode(models):
        for start in range(0, len(idx), batch):
            x = models.normalize(src.take(idx[start : start + batch]).to(device))
            z = models.bottleneck.encode(models.encoder(models.pad(x)))
            total += float(reconstruction_loss(models.crop(decoder(z)), x, kind)) * x.numel()
            n += x.numel()
    return total / n


# ---------------------------------------------------------------- training


def _stage_of(config: TrainConfig, step: int) -> str:
    if config.mode == "joint":
        return "joint"
    return "stage1" if step < config.stage1_steps else "stage2"


def _versions() -> dict:
    import latentdist

    v = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__}
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        v["latentdist"] = version("latentdist")
    v.setdefault("latentdist", getattr(latentdist, "__version__", "unknown"))
    return v


def train(config: TrainConfig) -> dict:
    """Train a DAE (``mode='dae'``) or the joint baseline (``mode='joint'``); return run.json.

    Writes ``encoder.pt``, ``decoder.pt`` (TorchScript), ``model.safetensors``, ``run.json``,
    ``metrics.jsonl``, ``checkpoint.pt`` and, in dae mode, ``stage1/encoder.pt`` into
    ``config.out`` (see docs/dae.md). Runs under torchrun with DDP when ``WORLD_SIZE > 1``.
    """
    config.validate()
    device = resolve_device(config.device)
    info = dist_util.setup(device.type)
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        if device.type == "cuda" and info.world_size > 1:
            device = torch.device("cuda", info.local_rank)
        return _train(config, device, info)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        dist_util.teardown(info)


def _train(config: TrainConfig, device: torch.device, info: dist_util.DistInfo) -> dict:
    t_start = time.time()
    out = Path(config.out)
    done = _check_out_dir(config)
    if done is not None:
        return done
    if config.precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16: needs --device cuda (use bf16 or fp32 on CPU)")
    if config.tensorboard and info.is_main:
        require_tensorboard()

    # data and split
    src = load_data(
        config.data,
        trust_pickle=config.trust_pickle,
        image=ImageOptions(config.channels, config.resize),
    )
    _validate_data(config, src)
    if config.batch_size is None:  # resolved once; the run's config then records the number
        config = replace(config, batch_size=default_batch_size(src.sample_shape, info.world_size))
    if config.batch_size % info.world_size:
        raise UsageError(
            f"--batch-size {config.batch_size}: must be divisible by the {info.world_size} processes"
        )
    fingerprint = src.fingerprint()
    train_idx, val_idx = split_indices(len(src), config.val_fraction, config.split_seed)
    if len(train_idx) == 0:
        raise UsageError(f"--val-fraction {config.val_fraction}: leaves no training samples")
    stat_idx = train_idx[
        np.linspace(0, len(train_idx) - 1, min(len(train_idx), 10000)).astype(np.int64)
    ]
    row_bytes = math.prod(src.sample_shape) * 8
    shift, scale = streamed_statistics(
        src.take, np.unique(stat_idx), src.kind, max(1, (_PRELOAD_BYTES // 8) // row_bytes)
    )
    ckpt = None
    if config.resume:
        ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
        _check_resumable(config, ckpt, fingerprint)

    # models
    if device.type == "cpu":  # bit-exact resumption on CPU
        torch.use_deterministic_algorithms(True, warn_only=True)
    models = build_models(config, src.sample_shape, src.kind, shift, scale)
    if ckpt is not None:
        for name, mod in models.named().items():
            mod.load_state_dict(ckpt["models"][name])
    channels_last = (
        config.channels_last if config.channels_last is not None else device.type == "cuda"
    )
    channels_last = channels_last and src.kind == "images"
    models.to(device, channels_last)
    torch.manual_seed(config.seed + info.rank)  # per-process noise (dropout, KL samples)
    perceptual = PerceptualLoss(config.perceptual, device) if config.perceptual else None
    data = TrainData(src, train_idx, models.normalize, device, channels_last)
    stream = BatchStream(len(train_idx), config.batch_size, config.seed, info.rank, info.world_size)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    disc_opt, disc_ddp = None, None
    if models.discriminator is not None:
        disc_opt = torch.optim.Adam(
            models.discriminator.parameters(), lr=config.disc_lr or config.lr, betas=(0.5, 0.9)
        )
        disc_ddp = models.discriminator
        if dist_util.active():
            disc_ddp = nn.parallel.DistributedDataParallel(models.discriminator)
    start_step, elapsed_before = 0, 0.0
    if ckpt is not None:
        start_step, elapsed_before = int(ckpt["step"]), float(ckpt["elapsed"])
        scaler.load_state_dict(ckpt["scaler"])
        if disc_opt is not None:
            disc_opt.load_state_dict(ckpt["disc_optimizer"])
        rng = ckpt["rng"]
        if len(rng) == info.world_size:
            _set_rng_state(rng[info.rank])
        else:  # a different process count cannot replay the old noise streams
            torch.manual_seed(config.seed + info.rank + 7919 * start_step)

    # output folder (rank 0 alone writes)
    metrics_path = out / "metrics.jsonl"
    history: list[dict] = []  # metrics.jsonl records, for curves.png
    writer = None  # TensorBoard SummaryWriter with --tensorboard
    if info.is_main:
        if config.overwrite:
            for name in OUTPUT_FILES:
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "stage1", ignore_errors=True)
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if ckpt is not None and metrics_path.is_file():  # drop lines logged after the checkpoint
            kept = [
                ln
                for ln in metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= start_step
            ]
        with atomic_open(metrics_path, "w") as f:
            f.write("".join(ln + "\n" for ln in kept))
        history = [json.loads(ln) for ln in kept]
        if config.tensorboard:
            writer = summary_writer(out / "tensorboard", purge_step=start_step + 1)
    dist_util.barrier()
    metrics_file = open(metrics_path, "a") if info.is_main else None  # noqa: SIM115
    curve_rows = val_idx[:_CURVE_VAL_ROWS]
    title = f"{config.mode} ({config.bottleneck}) on {config.data}"

    def checkpoint(step: int, stage: str, opt: torch.optim.Optimizer) -> None:
        rng = dist_util.all_gather_object(_rng_state())
        if not info.is_main:
            return
        metrics_file.flush()
        plot_curves(history, out / "curves.png", title)
        if writer is not None:
            writer.flush()
        save_torch(
            out / "checkpoint.pt",
            {
                "format": 1,
                "step": step,
                "stage": stage,
                "config": config.to_dict(),
                "data_fingerprint": fingerprint,
                "models": _state_dicts(models),
                "optimizer": opt.state_dict(),
                "disc_optimizer": disc_opt.state_dict() if disc_opt is not None else None,
                "scaler": scaler.state_dict(),
                "rng": rng,
                "data_order": stream.state(step),
                "elapsed": elapsed_before + time.time() - t_start,
                "world_size": info.world_size,
            },
        )

    def check_finite(step: int, stage: str) -> None:
        flag = bad.float()
        dist_util.all_reduce_sum_(flag)
        if flag.item() > 0:
            last = out / "checkpoint.pt"
            where = (
                f"last good checkpoint: {last}" if last.is_file() else "no checkpoint was written"
            )
            raise NonFiniteLossError(
                f"loss became NaN/Inf by step {step} ({stage}); training stopped, {where}; "
                "try a lower --lr, --grad-clip 1 or --precision fp32"
            )

    # the loop
    stage, module, opt, decoder = None, None, None, None
    bad = torch.zeros((), dtype=torch.bool, device=device)
    example = src.take(val_idx[:2] if len(val_idx) else train_idx[:2])
    bar = None
    if info.is_main and config.progress:
        from latentdist._progress import progress_bar as tqdm

        bar = tqdm(
            total=config.total_steps,
            initial=start_step,
            desc=f"train-dae {config.mode}",
            dynamic_ncols=True,
        )
    last_log: dict = {}
    t_loop = time.perf_counter()
    try:
        for step in range(start_step, config.total_steps):
            if _stage_of(config, step) != stage:
                # set up a stage: which parts train, a fresh optimiser, DDP and compile wrappers
                stage = _stage_of(config, step)
                frozen = stage == "stage2"
                decoder = models.aux_decoder if stage == "stage1" else models.decoder
                if frozen:
                    models.encoder.requires_grad_(False)
                    models.bottleneck.requires_grad_(False)
                    if info.is_main:  # the frozen stage-1 encoder, for measuring it on its own
                        save_torchscript(
                            out / "stage1" / "encoder.pt",
                            ExportEncoder.of(models),
                            example,
                        )
                pipe = Pipeline(
                    models.encoder, models.bottleneck, decoder, frozen, models.pad, models.crop
                ).train()
                opt = torch.optim.Adam(
                    [p for p in pipe.parameters() if p.requires_grad],
                    lr=config.lr,
                    betas=config.adam_betas,
                )
                if ckpt is not None and ckpt["stage"] == stage and step == start_step:
                    opt.load_state_dict(ckpt["optimizer"])
                    for group in opt.param_groups:  # --lr may change on resumption
                        group["lr"] = config.lr
                module = pipe
                if dist_util.active():
                    module = nn.parallel.DistributedDataParallel(
                        pipe, device_ids=[device.index] if device.type == "cuda" else None
                    )
                if config.compile:
                    module = torch.compile(module)
            x = data(stream.local_indices(step))
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                x_hat, terms = module(x)
            rec = reconstruction_loss(x_hat, x, config.rec_loss)
            loss = rec
            logs = {"rec": rec.detach()}
            if "kl" in terms:
                loss = loss + config.kl_weight * terms["kl"]
                logs["kl"] = terms["kl"].detach()
            if "vq" in terms:
                loss = loss + terms["vq"]
                logs["vq"], logs["perplexity"] = terms["vq"].detach(), terms["perplexity"]
            if perceptual is not None and config.perceptual_weight > 0:
                p_loss = perceptual(models.denormalize(x_hat.float()), models.denormalize(x))
                loss = loss + config.perceptual_weight * p_loss
                logs["perceptual"] = p_loss.detach()
            use_disc = models.discriminator is not None and step >= config.disc_start
            if use_disc:  # generator side of VQGAN's hinge game, with the adaptive weight
                models.discriminator.requires_grad_(False)
                with torch.autocast(
                    device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    g_loss = hinge_g_loss(models.discriminator(x_hat))
                d_weight = config.disc_weight * adaptive_weight(loss, g_loss, last_layer(decoder))
                loss = loss + d_weight * g_loss
                logs["g_loss"], logs["d_weight"] = g_loss.detach(), d_weight
            logs["loss"] = loss.detach()
            bad |= ~torch.isfinite(loss.detach())
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(
                    [p for g in opt.param_groups for p in g["params"]], config.grad_clip
                )
            scaler.step(opt)
            scaler.update()
            if use_disc:  # critic step on real and (detached) reconstructed images in one batch
                models.discriminator.requires_grad_(True)
                with torch.autocast(
                    device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    logits = disc_ddp(torch.cat([x, x_hat.detach().to(x.dtype)]))
                d_loss = hinge_d_loss(logits[: len(x)], logits[len(x) :])
                disc_opt.zero_grad(set_to_none=True)
                scaler.scale(d_loss).backward()
                scaler.step(disc_opt)
                scaler.update()
                logs["d_loss"] = d_loss.detach()
                bad |= ~torch.isfinite(d_loss.detach())

            done_steps = step + 1
            stage_end = done_steps == config.total_steps or (
                config.mode == "dae" and done_steps == config.stage1_steps
            )
            save_now = stage_end or (
                config.checkpoint_every and done_steps % config.checkpoint_every == 0
            )
            if done_steps % config.log_every == 0 or stage_end or save_now:
                check_finite(done_steps, stage)
                keys = [k for k in LOG_KEYS if k in logs]
                vals = dist_util.all_reduce_mean_(
                    torch.stack([logs[k].float() for k in keys])
                ).tolist()
                last_log = dict(zip(keys, vals, strict=True))
                if info.is_main:
                    rec_line = {
                        "step": done_steps,
                        "stage": stage,
                        **last_log,
                        "lr": opt.param_groups[0]["lr"],
                        "time": round(elapsed_before + time.time() - t_start, 4),
                    }
                    if save_now:  # a held-out point on the curves (no randomness used)
                        rec_line["val_rec"] = validation_loss(
                            models, decoder, src, curve_rows, device, config.rec_loss
                        )
                    metrics_file.write(json.dumps(rec_line) + "\n")
                    history.append(rec_line)
                    if writer is not None:
                        log_scalars(writer, rec_line)
                    if bar is not None:
                        bar.set_postfix(stage=stage, loss=f"{last_log['loss']:.4g}", refresh=False)
            if save_now:
                checkpoint(done_steps, stage, opt)
            if bar is not None:
                bar.update(1)
    finally:  # also when the loss diverged: leave a tidy bar and a flushed metrics file
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()
    loop_time = time.perf_counter() - t_loop
    steps_run = config.total_steps - start_step

    # final outputs
    result: dict = {}
    if info.is_main:
        if (
            start_step == config.total_steps
            and ckpt is not None
            and ckpt["stage"] == "stage2"
            and not (out / "stage1" / "encoder.pt").is_file()
        ):
            save_torchscript(
                out / "stage1" / "encoder.pt",
                ExportEncoder.of(models),
                example,
            )
        final = evaluate(models, src, val_idx, device)
        enc = ExportEncoder.of(models)
        save_torchscript(out / "encoder.pt", enc, example)
        with torch.no_grad():
            z_example = _cpu_copy(enc)(example.float())
        save_torchscript(
            out / "decoder.pt",
            ExportDecoder(models.decoder, models.denormalize, models.crop),
            z_example,
        )
        save_safetensors(
            out / "model.safetensors", models, {"config": json.dumps(config.to_dict())}
        )
        dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        result = {
            "finished": True,
            "mode": config.mode,
            "bottleneck": config.bottleneck,
            "data": config.data,
            "data_fingerprint": fingerprint,
            "data_kind": src.kind,
            "data_shape": list(src.sample_shape),
            "latent_shape": list(z_example.shape[1:]),
            "latent_encoding": {
                "ae": "z",
                "kl": "posterior mean",
                "vq": "quantised codebook vectors",
            }[config.bottleneck],
            "codebook_key": "codebook" if config.bottleneck == "vq" else None,
            "n_samples": len(src),
            "seed": config.seed,
            "split": {
                "rule": "p = numpy.random.default_rng(split_seed).permutation(n); validation = sorted(last round(n * val_fraction) of p)",
                "split_seed": config.split_seed,
                "val_fraction": config.val_fraction,
                "n_train": len(train_idx),
                "n_val": len(val_idx),
                "val_indices": val_idx.tolist() if len(val_idx) <= 100_000 else None,
            },
            "stage1_steps": config.stage1_steps,
            "stage2_steps": config.stage2_steps,
            "steps": config.total_steps,
            "global_batch": config.batch_size,
            "world_size": info.world_size,
            "encoder_params": count_params(models.encoder, models.bottleneck),
            "decoder_params": count_params(models.decoder),
            "aux_decoder_params": count_params(models.aux_decoder)
            if models.aux_decoder is not None
            else None,
            "discriminator_params": count_params(models.discriminator)
            if models.discriminator is not None
            else None,
            "final": {**final, "train": last_log},
            "time_s": elapsed_before + time.time() - t_start,
            "loop_time_s": loop_time,
            "steps_this_process": steps_run,
            "step_time_s": loop_time / steps_run if steps_run else None,
            "samples_per_s": config.batch_size * steps_run / loop_time if steps_run else None,
            "device": str(device),
            "device_name": dev_name,
            "precision": config.precision,
            "channels_last": channels_last,
            "compile": config.compile,
            "versions": _versions(),
            "config": config.to_dict(),
        }
        save_json(out / "run.json", result)
    dist_util.barrier()
    return result
