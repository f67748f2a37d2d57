"""``TrainConfig``: every knob of the DAE trainer, validated once at the edge."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from latentdist._shapes import pixel_budget_batch
from latentdist.errors import UsageError

# Fields that may differ between a run and its resumption (all but lr/grad_clip leave the numbers alone).
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "overwrite",
        "progress",
        "log_every",
        "checkpoint_every",
        "device",
        "compile",
        "trust_pickle",
        "threads",
        "tensorboard",
        "lr",  # so a diverged run can continue from its last checkpoint with a lower rate
        "grad_clip",
    }
)


# the default batch: this many images of up to this many pixels, fewer for larger images
DEFAULT_BATCH = 64
DEFAULT_BATCH_PIXELS = 64 * 64
MIN_DEFAULT_BATCH = 4


def default_batch_size(sample_shape: tuple[int, ...], world_size: int = 1) -> int:
    """64 samples, or for images of more than 64 x 64 pixels 64 * 4096 / (H * W) (at least 4):
    the same pixels per step at every image size, so that a step's time and memory do not grow
    with the image area (250 x 250 photos: 4 per step, not 64 taking ~8 GB on a CPU). Rounded
    up to a multiple of the torchrun process count."""
    batch = pixel_budget_batch(sample_shape, DEFAULT_BATCH, DEFAULT_BATCH_PIXELS, MIN_DEFAULT_BATCH)
    return -(-batch // world_size) * world_size


@dataclass
class TrainConfig:
    """Configuration of one DAE (``mode='dae'``) or joint-baseline (``mode='joint'``) run.

    Defaults are sized for the built-in ``digits``/``mnist5k`` on a 2-core CPU. ``batch_size`` is
    the *global* batch (default ``default_batch_size``: 64, fewer for images above 64 x 64):
    under torchrun with N processes each process takes ``batch_size / N`` samples and DDP
    averages the gradients, so the optimisation is that of one process with ``batch_size``
    samples.
    """

    data: str = "digits"
    channels: str = "auto"  # image folders: auto | grey | rgb (see latentdist.data.ImageOptions)
    resize: tuple[int, int] | None = None  # image folders: resize every image to (H, W)
    out: str = "runs/dae"
    mode: str = "dae"  # dae | joint
    bottleneck: str = "kl"  # ae | kl | vq
    stage1_steps: int = 300
    stage2_steps: int = 300
    batch_size: int | None = None  # None: default_batch_size(the data's sample shape)
    lr: float = 2e-3
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 0.0  # 0 = off
    # architecture (images: VQGAN/SD conv pair; vectors: MLP pair)
    base_width: int = 16
    channel_mult: tuple[int, ...] | None = None  # default derived from downsample
    num_res_blocks: int = 1
    downsample: int = 4
    latent_channels: int = 4  # channels of the latent image, or the latent dimension for vectors
    mlp_hidden: int = 256
    mlp_layers: int = 2
    # the weaker auxiliary decoder of stage 1
    aux_width_mult: float = 0.5
    aux_dropout: float = 0.1
    # bottlenecks
    kl_weight: float = 1e-4
    codebook_size: int = 128
    vq_beta: float = 0.25
    vq_ema: bool = False
    vq_decay: float = 0.99
    vq_restart_every: int = 50
    # losses
    rec_loss: str = "l2"  # l1 | l2
    disc_weight: float = 0.0  # 0 = no discriminator
    disc_start: int = 100
    disc_lr: float | None = None  # default: lr
    perceptual: str | None = None
    perceptual_weight: float = 1.0
    # data split
    val_fraction: float = 0.1
    split_seed: int = 0
    # execution
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: CUDA only, with a GradScaler)
    channels_last: bool | None = None  # default: on for CUDA images
    compile: bool = False
    threads: int | None = None  # torch intra-op threads for this run (default: torch's choice)
    log_every: int = 10
    checkpoint_every: int = 100  # 0 = only at the end of each stage
    progress: bool = True
    tensorboard: bool = False  # also write TensorBoard event files to OUT/tensorboard
    resume: bool = False
    overwrite: bool = False
    trust_pickle: bool = False

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    def mult(self) -> tuple[int, ...]:
        """Channel multipliers: given, or (1, 2, 2, 4, 4, ...) cut to log2(downsample) + 1 levels."""
        if self.channel_mult is not None:
            return tuple(self.channel_mult)
        levels = int(math.log2(self.downsample)) + 1
        return tuple(([1, 2, 2] + [4] * levels)[:levels])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("adam_betas", "channel_mult", "resize"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def validate(self) -> None:
        """Raise ``UsageError`` naming the flag for any value that cannot work."""
        self._check_choices()
        self._check_schedule()
        self._check_architecture()
        self._check_optimiser()
        self._check_downsampling()
        self._check_losses()
        self._check_execution()

    def _need(self, ok: bool, flag: str, msg: str) -> None:
        if not ok:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(self, flag)}: {msg}")

    def _check_choices(self) -> None:
        """Mode, bottleneck and the image-folder options."""
        need = self._need
        need(self.mode in ("dae", "joint"), "mode", "expected dae or joint")
        need(self.channels in ("auto", "grey", "rgb"), "channels", "expected auto, grey or rgb")
        need(
            self.resize is None or (len(self.resize) == 2 and min(self.resize) >= 1),
            "resize",
            "expected two positive integers H,W",
        )
        need(self.bottleneck in ("ae", "kl", "vq"), "bottleneck", "expected ae, kl or vq")

    def _check_schedule(self) -> None:
        """Step counts, seeds and the batch."""
        need = self._need
        for f in (
            "stage1_steps",
            "stage2_steps",
            "disc_start",
            "vq_restart_every",
            "checkpoint_every",
            "split_seed",
            "seed",
        ):
            need(
                isinstance(getattr(self, f), int) and getattr(self, f) >= 0,
                f,
                "expected an integer >= 0",
            )
        if self.mode == "dae":
            need(self.stage1_steps >= 1, "stage1_steps", "dae mode needs at least one stage-1 step")
            need(self.stage2_steps >= 1, "stage2_steps", "dae mode needs at least one stage-2 step")
        need(self.total_steps >= 1, "stage1_steps", "stage1 + stage2 steps must be at least 1")
        need(
            self.batch_size is None or (isinstance(self.batch_size, int) and self.batch_size >= 1),
            "batch_size",
            "expected an integer >= 1",
        )

    def _check_architecture(self) -> None:
        """Widths and depths (with ``--threads`` and ``--log-every``, the other counts >= 1)."""
        need = self._need
        for f in (
            "base_width",
            "num_res_blocks",
            "latent_channels",
            "mlp_hidden",
            "log_every",
        ):
            need(
                isinstance(getattr(self, f), int) and getattr(self, f) >= 1,
                f,
                "expected an integer >= 1",
            )
        need(self.threads is None or self.threads >= 1, "threads", "expected an integer >= 1")
        need(self.mlp_layers >= 0, "mlp_layers", "expected an integer >= 0")

    def _check_optimiser(self) -> None:
        """Learning rates, Adam's betas and gradient clipping."""
        need = self._need
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "expected a positive number")
        need(
            self.disc_lr is None or (math.isfinite(self.disc_lr) and self.disc_lr > 0),
            "disc_lr",
            "expected a positive number",
        )
        need(
            all(0 <= b < 1 for b in self.adam_betas), "adam_betas", "expected two numbers in [0, 1)"
        )
        need(self.grad_clip >= 0, "grad_clip", "expected a number >= 0 (0 = off)")

    def _check_downsampling(self) -> None:
        """A power-of-two ``--downsample`` and channel multipliers with as many levels."""
        need = self._need
        need(
            self.downsample >= 1 and (self.downsample & (self.downsample - 1)) == 0,
            "downsample",
            "expected a power of two (1, 2, 4, 8, ...)",
        )
        if self.channel_mult is not None:
            need(
                len(self.channel_mult) >= 1 and all(int(m) >= 1 for m in self.channel_mult),
                "channel_mult",
                "expected positive integers like 1,2,2",
            )
            need(
                2 ** (len(self.channel_mult) - 1) == self.downsample,
                "channel_mult",
                f"{len(self.channel_mult)} levels downsample by {2 ** (len(self.channel_mult) - 1)}, but --downsample is {self.downsample}",
            )

    def _check_losses(self) -> None:
        """The auxiliary decoder, bottleneck and loss weights."""
        need = self._need
        need(0 < self.aux_width_mult <= 1, "aux_width_mult", "expected a number in (0, 1]")
        need(0 <= self.aux_dropout < 1, "aux_dropout", "expected a number in [0, 1)")
        need(self.kl_weight >= 0, "kl_weight", "expected a number >= 0")
        need(self.codebook_size >= 2, "codebook_size", "expected an integer >= 2")
        need(self.vq_beta >= 0, "vq_beta", "expected a number >= 0")
        need(0 < self.vq_decay < 1, "vq_decay", "expected a number in (0, 1)")
        need(self.rec_loss in ("l1", "l2"), "rec_loss", "expected l1 or l2")
        need(self.disc_weight >= 0, "disc_weight", "expected a number >= 0 (0 = off)")
        need(self.perceptual_weight >= 0, "perceptual_weight", "expected a number >= 0")

    def _check_execution(self) -> None:
        """Split, precision, device, resume/overwrite and the output folder."""
        need = self._need
        need(0 <= self.val_fraction < 1, "val_fraction", "expected a number in [0, 1)")
        need(self.precision in ("fp32", "bf16", "fp16"), "precision", "expected fp32, bf16 or fp16")
        need(
            self.device.split(":")[0] in ("auto", "cpu", "cuda"),
            "device",
            "expected auto, cpu or cuda",
        )
        need(
            not (self.resume and self.overwrite),
            "resume",
            "--resume and --overwrite exclude each other",
        )
        need(bool(str(self.out)), "out", "expected a folder")
