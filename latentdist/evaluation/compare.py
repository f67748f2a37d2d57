"""``compare``: put trained autoencoders head to head on the same data, settings and seeds.

For every run (a ``train-dae`` folder, or an external TorchScript encoder + decoder pair):

* **reconstruction** on held-out rows: ``MSE = mean_{i,j} (D(E(x_i))_j - x_ij)^2`` over all
  elements, and ``PSNR = 10 log10(R^2 / MSE)`` with ``R = max(x) - min(x)`` the peak-to-peak range
  of the whole data set (R = 2 for the built-ins, scaled to [-1, 1]); the interval is the
  Student-t 95 % interval of the per-sample MSE;
* the full **measurement** ``latentdist.measure`` on the latents of all rows (it holds out its own
  rows): the distance curve ``c -> D_c`` with floor, intervals, critical capacity, proxies and
  latent geometry (SPEC §1-2);
* **generation quality**, twice: the cheap baseline (a Gaussian mixture over flattened latents
  after PCA when they are large) and the **probe** (a rectified flow of one fixed recipe,
  ``latentdist.evaluation.probe``, trained on the training rows' latents, as diffusion models use
  latents); for VQ codes both are the autoregressive prior over code positions. Samples are
  decoded with the run's decoder and compared with the held-out data by Fréchet distance and
  KID in a feature space (Heusel et al., 2017; Binkowski et al., 2018), precision / recall /
  density / coverage with k nearest neighbours (Naeem et al., 2020) and W2 in data space; one
  value per generation seed, reported as mean with a 95 % interval;
* **diagnostics** (``latentdist.proxies.diagnostics``): latent spectrum vs image spectrum,
  equivariance errors, latent statistics, mode count (all from ``measure``) and the decoder's
  robustness to latent noise;
* **signals** (``latentdist.proxies.signals``), cheap predictors of generation: interpolation FD
  (continuous latents) or perturbation FD (VQ codes) of the held-out rows' latents, decoded and
  scored against as many other (training) rows in the same feature space, beside their floor;
  the velocity
  irreducible variance of the flow-matching target; the linear-probe accuracy when the data carry
  labels.

Held-out rows: a train-dae run's recorded validation indices when the data fingerprint matches the
run's, else the trainer's rule with its defaults (``split_indices(n, 0.1, 0)``) and a warning. The
default feature network is trained once per call on rows outside every run's held-out set, so FD
values are comparable across runs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdist import parallel
from latentdist._io import to_json
from latentdist.checkpoint import DEFAULT_EVERY_S, Checkpoints, rng_state, set_rng_state
from latentdist.checkpoint import digest as checkpoint_digest
from latentdist.dae import split_indices
from latentdist.data import DataSource, load_data
from latentdist.data.encoders import load_encoder
from latentdist.device import resolve_device
from latentdist.discrepancy import extract_features, load_feature_extractor, train_feature_net
from latentdist.errors import UsageError
from latentdist.estimator import MeasureConfig, measure, sharding
from latentdist.estimator.paired import paired_difference, verdict
from latentdist.evaluation.generation import CodePrior, GaussianMixturePrior, generation_metrics
from latentdist.evaluation.probe import PROBE_RECIPE, FlowPrior, ProbeRecipe
from latentdist.generators.modules import count_params
from latentdist.proxies import diagnostics as diag
from latentdist.proxies import signals as sig
from latentdist.proxies.geometry import nearest_codes
from latentdist.report.compare import compare_frame, format_table, save_compare
from latentdist.stats import mean_ci
from latentdist.versions import versions

GENERATION_KEYS = ("fd", "kid", "precision", "recall", "density", "coverage", "w2")
FALLBACK_SPLIT = {"val_fraction": 0.1, "split_seed": 0}
N_IMAGES = 8  # reconstructions and samples kept per run for the figures

Sampler = Callable[[int, int], torch.Tensor]  # (seed, n) -> n latents


@dataclass
class RunSpec:
    """One contender: TorchScript ``encoder`` (data -> latent) and ``decoder`` (latent -> data).

    ``mode`` is 'dae' or 'joint' for a train-dae run (read from its run.json), 'external' for a
    pair the user names; ``run`` holds the run.json content when there is one.
    """

    name: str
    encoder: Path
    decoder: Path
    mode: str = "external"
    run: dict | None = None
    folder: Path | None = None

    @classmethod
    def from_dir(cls, path: str | Path, name: str | None = None) -> RunSpec:
        """A train-dae output folder; UsageError unless it holds encoder.pt, decoder.pt, run.json."""
        folder = Path(path)
        if not folder.is_dir():
            raise UsageError(f"{folder}: no such run folder (expected a train-dae --out folder)")
        missing = [
            f for f in ("encoder.pt", "decoder.pt", "run.json") if not (folder / f).is_file()
        ]
        if missing:
            raise UsageError(
                f"{folder}: not a finished train-dae run (missing {', '.join(missing)})"
            )
        try:
            run = json.loads((folder / "run.json").read_text())
        except (ValueError, OSError) as e:
            raise UsageError(f"{folder / 'run.json'}: unreadable ({e})") from None
        if not isinstance(run, dict) or run.get("mode") not in ("dae", "joint"):
            raise UsageError(f"{folder / 'run.json'}: expected a train-dae run.json with a mode")
        return cls(
            name=name or folder.resolve().name,
            encoder=folder / "encoder.pt",
            decoder=folder / "decoder.pt",
            mode=run["mode"],
            run=run,
            folder=folder,
        )

    @classmethod
    def parse_pair(cls, text: str) -> RunSpec:
        """``NAME:ENCODER_PATH:DECODER_PATH`` (both TorchScript) as an external contender."""
        parts = text.split(":")
        if len(parts) != 3 or not all(parts):
            raise UsageError(f"--pair {text}: expected NAME:ENCODER_PATH:DECODER_PATH")
        name, enc, dec = parts
        for p in (enc, dec):
            if not Path(p).is_file():
                raise UsageError(f"--pair {text}: {p}: no such file")
        return cls(name=name, encoder=Path(enc), decoder=Path(dec))


@dataclass(frozen=True)
class CompareConfig:
    """Every setting of ``compare``; ``validate`` checks them once (UsageError naming the flag)
    and returns the copy compare runs with.

    ``measure_config``: the settings of ``latentdist.measure``, used identically for every run
    (its ``device`` is replaced by ``device``). Generation: ``gen_seeds`` repetitions of (fit
    prior, sample ``n_samples`` (default: the held-out count, at most ``max_samples``), decode,
    score against held-out data); ``features``: a TorchScript feature extractor for FD/PRDC, or
    "inception:PATH" / "dinov2:PATH" (``latentdist.discrepancy.pretrained``), else
    a small network trained once on training rows (``feature_steps`` steps); ``k``: PRDC's
    neighbours. The probe uses ``PROBE_RECIPE`` with ``probe_steps`` optimiser steps when given
    (0: no probe).
    """

    measure_config: MeasureConfig | None = None  # None: MeasureConfig()
    gen_seeds: int = 3
    features: str | Path | None = None
    feature_steps: int = 300
    n_samples: int | None = None
    max_samples: int = 2000
    prior_components: int = 10
    prior_pca: int = 64
    probe_steps: int | None = None
    k: int = 5
    encode_batch_size: int = 256
    device: str = "auto"
    trust_pickle: bool = False

    def validate(self) -> CompareConfig:
        """This config checked, with ``measure_config`` validated on ``device`` (a copy)."""
        if self.gen_seeds < 1:
            raise UsageError(f"--gen-seeds {self.gen_seeds}: expected an integer >= 1")
        if self.n_samples is not None and self.n_samples < 2:
            raise UsageError(f"--n-samples {self.n_samples}: expected an integer >= 2")
        if self.probe_steps is not None and self.probe_steps < 0:
            raise UsageError(f"--probe-steps {self.probe_steps}: expected an integer >= 0")
        given = self.measure_config or MeasureConfig()
        return replace(self, measure_config=replace(given, device=self.device).validate())

    @property
    def recipe(self) -> ProbeRecipe:
        """The probe's recipe: ``PROBE_RECIPE``, with ``probe_steps`` steps when given."""
        if self.probe_steps is None:
            return PROBE_RECIPE
        return replace(PROBE_RECIPE, steps=self.probe_steps)

    @property
    def seeds(self) -> list[int]:
        """The generation seeds: ``gen_seeds`` of them from the measurement's seed."""
        seed = (self.measure_config or MeasureConfig()).seed
        return [seed + i for i in range(self.gen_seeds)]


@dataclass
class CompareResult:
    """The outcome of ``compare``: ``.report`` is the compare.json content."""

    report: dict[str, Any]
    images: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def to_json(self, indent: int | None = 2) -> str:
        return to_json(self.report, indent)

    def to_frame(self):
        """One row per run: reconstruction, distance summary, generation metrics (pandas)."""
        return compare_frame(self.report)

    def table(self) -> str:
        """A plain-text table for the terminal."""
        return format_table(self.report)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write compare.json, report.md and the PNG figures into ``out_dir`` (atomically)."""
        return save_compare(self.report, self.images, out_dir)


def compare(
    runs: Sequence[str | Path | RunSpec],
    data: Any,
    config: CompareConfig | None = None,
    *,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    restart: bool = False,
    checkpoint_every: float = DEFAULT_EVERY_S,
    **settings: Any,
) -> CompareResult:
    """Compare autoencoders: reconstruction, the latent–data distance curve, generation quality.

    ``runs``: train-dae folders or ``RunSpec`` (external pairs via ``RunSpec.parse_pair``);
    ``data``: a name, path or ``DataSource``. Settings are ``CompareConfig`` fields, as a config
    or keywords (e.g. ``measure_config=MeasureConfig(...), gen_seeds=3, device="cpu"``). See the
    module docstring for the definitions. ``checkpoint``: a folder keeping each run's finished
    phases (its measurement, inside it every fit, and the whole run), so the same call resumes
    after an interruption to the same result; see ``compare_checkpoints``.
    """
    t_start = time.perf_counter()
    specs = run_specs(runs)
    cfg = replace(config or CompareConfig(), **settings).validate()
    inputs = load_inputs(specs, data, cfg)
    extractor, features_info = feature_space(inputs, cfg)
    kept = compare_checkpoints(checkpoint, restart, checkpoint_every, specs, inputs, cfg)
    entries, images, warnings, measured_with = measure_runs(
        specs, inputs, extractor, cfg, progress, kept
    )
    report = {
        "data": inputs.describe(),
        "measure_config": {**asdict(measured_with), "capacities": list(measured_with.capacities)},
        "generation_settings": generation_settings(cfg, features_info),
        "probe_settings": probe_settings(cfg),
        "runs": entries,
        "difference": differences(entries),
        "warnings": inputs.warnings + warnings,
        "device": str(inputs.device),
        "timings": {"total_s": time.perf_counter() - t_start},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return CompareResult(report, images)


def differences(entries: list[dict]) -> list[dict[str, Any]]:
    """Every pair of runs (in the order given) as a paired experiment: both were measured on
    the same held-out rows, seeds and judges, so D_c(a) - D_c(b) is taken seed by seed
    (``latentdist.estimator.paired``), with the paired bootstrap of their critical capacities
    and a verdict."""
    out = []
    for i, a in enumerate(entries):
        for b in entries[i + 1 :]:
            diff = paired_difference(a["measure"], b["measure"])
            out.append(
                {
                    "a": a["name"],
                    "b": b["name"],
                    **diff,
                    "verdict": verdict(a["name"], b["name"], diff, a["measure"], b["measure"]),
                }
            )
    return out


# --- phase 1: the runs and the data -----------------------------------------------------------


def run_specs(runs: Sequence[str | Path | RunSpec]) -> list[RunSpec]:
    """``runs`` as ``RunSpec``s with unique names (a repeated name gets -2, -3, ...)."""
    specs = [r if isinstance(r, RunSpec) else RunSpec.from_dir(r) for r in runs]
    if not specs:
        raise UsageError("compare: give at least one RUN_DIR or --pair NAME:ENCODER:DECODER")
    seen: dict[str, int] = {}
    for s in specs:
        n = seen.get(s.name, 0)
        seen[s.name] = n + 1
        if n:
            s.name = f"{s.name}-{n + 1}"
    return specs


@dataclass(frozen=True)
class Inputs:
    """What every run is evaluated on: the data, its value range, each run's held-out rows."""

    src: DataSource
    name: str
    x_min: float
    x_max: float
    held: dict[str, tuple[np.ndarray, str]]  # run name -> (held-out rows, where they came from)
    warnings: list[str]
    device: torch.device

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.src.sample_shape)

    @property
    def data_range(self) -> float:
        return (self.x_max - self.x_min) or 1.0

    def describe(self) -> dict[str, Any]:
        """The report's ``data`` entry."""
        return {
            "name": self.name,
            "kind": self.src.kind,
            "shape": list(self.shape),
            "rows": len(self.src),
            "fingerprint": self.src.fingerprint(),
            "min": self.x_min,
            "max": self.x_max,
            "range": self.data_range,
        }


def load_inputs(specs: list[RunSpec], data: Any, cfg: CompareConfig) -> Inputs:
    """Load the data, read its value range and find every run's held-out rows."""
    dev = resolve_device(cfg.device)
    src = data if isinstance(data, DataSource) else load_data(data, trust_pickle=cfg.trust_pickle)
    n, shape, fingerprint = len(src), tuple(src.sample_shape), src.fingerprint()
    x_min, x_max = value_range(src, cfg.encode_batch_size)
    held: dict[str, tuple[np.ndarray, str]] = {}
    warnings: list[str] = []
    for s in specs:
        val, where, w = held_out_rows(s, n, fingerprint, shape)
        if len(val) < 2:
            raise UsageError(f"{s.name}: fewer than 2 held-out rows to evaluate on")
        held[s.name] = (val, where)
        warnings += w
    name = getattr(src, "name", str(data))
    return Inputs(src, name, x_min, x_max, held, warnings, dev)


def held_out_rows(
    spec: RunSpec, n: int, fingerprint: str, shape: tuple
) -> tuple[np.ndarray, str, list]:
    """Held-out row indices for ``spec``, where they came from, and any warnings."""
    warnings: list[str] = []
    run = spec.run
    if run is not None:
        if list(run.get("data_shape", shape)) != list(shape):
            raise UsageError(
                f"{spec.folder}: the run was trained on samples of shape {run['data_shape']}, "
                f"but --data has {list(shape)}"
            )
        split = run.get("split") or {}
        val = split.get("val_indices")
        if run.get("data_fingerprint") == fingerprint and val and run.get("n_samples", n) == n:
            return np.asarray(val, dtype=np.int64), "the run's validation split (run.json)", []
        if run.get("data_fingerprint") != fingerprint:
            warnings.append(
                f"{spec.name}: --data is not the data the run was trained on (fingerprint "
                f"{fingerprint} vs {run.get('data_fingerprint')}); held-out rows may have been "
                "seen in training"
            )
    _, val = split_indices(n, FALLBACK_SPLIT["val_fraction"], FALLBACK_SPLIT["split_seed"])
    src = (
        f"fallback split: split_indices(n, val_fraction={FALLBACK_SPLIT['val_fraction']}, "
        f"split_seed={FALLBACK_SPLIT['split_seed']})"
    )
    return val, src, warnings


def value_range(src: DataSource, batch_size: int) -> tuple[float, float]:
    """The smallest and largest value in the data, read a batch at a time."""
    lo, hi = math.inf, -math.inf
    for xb in src.batches(batch_size):
        lo, hi = min(lo, float(xb.min())), max(hi, float(xb.max()))
    return lo, hi


def feature_space(inputs: Inputs, cfg: CompareConfig) -> tuple[Any, dict[str, Any]]:
    """One feature space for every run, so FD and PRDC are comparable: (extractor, its entry in
    the report). The default network trains on rows outside every run's held-out set."""
    if cfg.features is not None:
        return load_feature_extractor(cfg.features), {"kind": "user", "path": str(cfg.features)}
    src, n = inputs.src, len(inputs.src)
    in_any_val = np.zeros(n, dtype=bool)
    for val, _ in inputs.held.values():
        in_any_val[val] = True
    train_rows = np.flatnonzero(~in_any_val) if (~in_any_val).any() else np.arange(n)
    seed = cfg.measure_config.seed
    extractor = parallel.on_main(  # under torchrun: rank 0's, sent to every rank
        lambda: train_feature_net(src, steps=cfg.feature_steps, seed=seed, rows=train_rows)
    )
    supervised = getattr(src, "labels", None) is not None
    description = (
        "FeatureNet (conv 3x3 32, conv 3x3/2 64, conv 3x3/2 64, global average pool, "
        "linear 64 + ReLU; features = this 64-d layer)"
        if src.kind == "images"
        else "FeatureNet (MLP 256, 64 + ReLU; features = this 64-d layer)"
    ) + (
        ", trained as a classifier on the data's labels"
        if supervised
        else ", trained as a denoising autoencoder"
    )
    return extractor, {
        "kind": "trained",
        "steps": cfg.feature_steps,
        "seed": seed,
        "train_rows": len(train_rows),
        "description": description,
    }


# --- phase 2: measure every run ---------------------------------------------------------------


@dataclass
class Coded:
    """One run's encoder and decoder, the latents of every row, and the held-out rows decoded."""

    encoder: Any
    decoder: Any
    z: torch.Tensor
    val: np.ndarray
    x_val: torch.Tensor
    x_hat: torch.Tensor

    @property
    def train_rows(self) -> np.ndarray:
        return np.setdiff1d(np.arange(len(self.z)), self.val)


def compare_checkpoints(
    folder: str | Path | None,
    restart: bool,
    every_s: float,
    specs: list[RunSpec],
    inputs: Inputs,
    cfg: CompareConfig,
) -> Checkpoints:
    """The checkpoint folder of this comparison, named by its data, its runs' files, its
    settings, the process and thread counts and the library versions (``latentdist.checkpoint``)."""
    if folder is None:
        return Checkpoints(None)
    describe = {
        **{k: v for k, v in asdict(cfg).items() if k != "measure_config"},
        **{f"measure {k}": v for k, v in asdict(cfg.measure_config).items()},
        "data": inputs.src.fingerprint(),
        "runs": [
            [s.name, checkpoint_digest(s.encoder.read_bytes(), s.decoder.read_bytes())]
            for s in specs
        ],
        "world_size": parallel.describe(parallel.current())["world_size"],
        "threads": torch.get_num_threads(),
        **{f"version {k}": v for k, v in versions().items()},
    }
    fingerprint = checkpoint_digest(describe)
    parallel.on_main(lambda: Checkpoints(folder, fingerprint, describe, restart=restart) and None)
    return Checkpoints(folder, fingerprint, describe, every_s=every_s, owner=False)


def measure_runs(
    specs: list[RunSpec],
    inputs: Inputs,
    extractor: Any,
    cfg: CompareConfig,
    progress: bool,
    kept: Checkpoints | None = None,
) -> tuple[list[dict], dict[str, dict], list[str], MeasureConfig]:
    """Every run evaluated in turn: (report entries, images by run, the measurements' warnings,
    the measurement config they all ran with). ``kept``: each finished run is kept in slot
    ``run{i}`` (with the random streams after it) and read back instead of evaluated again."""
    measure_config, extra = cfg.measure_config, None
    entries, images, warnings = [], {}, []
    kept = kept or Checkpoints(None)
    for i, spec in enumerate(specs):
        slot = kept.slot(f"run{i}")
        done = slot.load()
        coded = None if done is not None else encode_run(spec, inputs, cfg, progress)
        if measure_config.generator == "auto":  # one family for every run, chosen on the first
            latent_shape = tuple(done["latent_shape"] if done else coded.z.shape[1:])
            measure_config, why = measure_config.resolve(latent_shape, inputs.shape)
            extra = {"generator_choice": why + " (on the first run; same for all)"}
        if done is not None:
            entry, images[spec.name] = done["entry"], done["images"]
            set_rng_state(done["rng"])
        else:
            measured_in = None if kept.folder is None else kept.folder / f"run{i}-measure"
            entry, images[spec.name] = evaluate_run(
                spec, coded, inputs, extractor, cfg, measure_config, extra, progress,
                measured_in, kept.every_s,
            )  # fmt: skip
            slot.save(
                {"entry": entry, "images": images[spec.name], "rng": rng_state(),
                 "latent_shape": list(coded.z.shape[1:])}
            )  # fmt: skip
        entries.append(entry)
        warnings += [f"{spec.name}: {w}" for w in entry["measure"]["warnings"]]
    return entries, images, warnings, measure_config


def evaluate_run(
    spec: RunSpec,
    coded: Coded,
    inputs: Inputs,
    extractor: Any,
    cfg: CompareConfig,
    measure_config: MeasureConfig,
    report_extra: dict | None,
    progress: bool,
    checkpoint: Path | None = None,
    checkpoint_every: float = DEFAULT_EVERY_S,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One run's report entry and images: reconstruction, measurement (with ``report_extra``
    added to its report; its finished work kept in ``checkpoint``), diagnostics, generation
    and probe."""
    recon = reconstruction_metrics(coded.x_val, coded.x_hat, inputs.data_range)
    t0 = time.perf_counter()
    m = measure(
        coded.z,
        inputs.src,
        measure_config,
        codebook=coded.encoder.codebook,
        encoder=partial(coded.encoder.encode, device=inputs.device, progress=False),
        progress=progress,
        report_extra=report_extra,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
    )
    t_measure = time.perf_counter() - t0
    measured = {key: v for key, v in m.report.items() if key != "diagnostics"}
    diagnostics = {**m.report["diagnostics"], "decoder_robustness": robustness(coded, inputs, cfg)}
    generation, fakes, t_generation = generation_quality(coded, extractor, cfg, inputs.device)
    probe, probe_fakes, t_probe = probe_quality(
        coded, extractor, cfg, inputs.device, generation, fakes
    )
    signals = parallel.on_main(latent_signals, coded, inputs, extractor, cfg)
    val, where = inputs.held[spec.name]
    run = spec.run or {}
    entry = {
        "name": spec.name,
        "mode": spec.mode,
        "encoder": str(spec.encoder),
        "decoder": str(spec.decoder),
        "folder": str(spec.folder) if spec.folder else None,
        "bottleneck": run.get("bottleneck"),
        "latent_shape": list(coded.z.shape[1:]),
        "encoder_params": run.get("encoder_params", count_params(coded.encoder.module)),
        "decoder_params": run.get("decoder_params", count_params(coded.decoder)),
        "aux_decoder_params": run.get("aux_decoder_params"),
        "steps": run.get("steps"),
        "held_out": {"rows": len(val), "source": where},
        "reconstruction": recon,
        "measure": measured,
        "generation": generation,
        "probe": probe,
        "diagnostics": diagnostics,
        "signals": signals,
        "timings": {
            "measure_s": t_measure,
            "generation_s": t_generation,
            "probe_s": t_probe,
            "diagnostics_s": diagnostics["time_s"],
            "signals_s": signals["time_s"],
        },
    }
    return entry, run_images(coded, fakes, probe_fakes)


def encode_run(spec: RunSpec, inputs: Inputs, cfg: CompareConfig, progress: bool) -> Coded:
    """Load the run's encoder and decoder, encode every row and decode the held-out rows."""
    dev, batch, shape = inputs.device, cfg.encode_batch_size, inputs.shape
    val, _ = inputs.held[spec.name]
    enc = load_encoder(spec.encoder, trust_pickle=cfg.trust_pickle, device=dev)
    z = sharding.encode(  # under torchrun: row shards across ranks, gathered
        enc,
        inputs.src,
        batch_size=batch,
        device=dev,
        progress=progress,
        seed=cfg.measure_config.seed,
    )
    try:
        decoder = torch.jit.load(str(spec.decoder), map_location=dev).eval()
    except Exception as e:  # noqa: BLE001 (any load failure is a bad file)
        raise UsageError(
            f"{spec.decoder}: not a TorchScript decoder ({type(e).__name__})"
        ) from None
    x_val = inputs.src.take(val)
    try:
        x_hat = decode(decoder, z[val], dev, batch)
    except Exception as e:  # noqa: BLE001
        raise UsageError(
            f"{spec.decoder}: cannot decode latents of shape {list(z.shape[1:])} "
            f"({type(e).__name__})"
        ) from None
    if tuple(x_hat.shape[1:]) != shape:
        raise UsageError(
            f"{spec.decoder}: decodes to samples of shape {list(x_hat.shape[1:])}, "
            f"but --data has {list(shape)}"
        )
    return Coded(enc, decoder, z, val, x_val, x_hat)


@torch.no_grad()
def decode(decoder: Any, z: torch.Tensor, device: torch.device, batch: int) -> torch.Tensor:
    """``decoder`` applied to ``z`` a batch at a time on ``device``; float32 on the CPU."""
    return torch.cat(
        [decoder(zb.to(device)).float().cpu() for zb in z.split(batch)]
    )  # one pass, no autograd


def robustness(coded: Coded, inputs: Inputs, cfg: CompareConfig) -> dict[str, Any]:
    """The decoder's robustness to noise on the held-out rows' latents (diagnostics)."""
    return diag.decoder_robustness(
        decoder_fn(coded, inputs, cfg),
        coded.z[coded.val],
        coded.x_val,
        seed=cfg.measure_config.seed,
    )


# --- phase 3: the cheap signals, generation quality and the probe ----------------------------


def latent_signals(
    coded: Coded, inputs: Inputs, extractor: Any, cfg: CompareConfig
) -> dict[str, Any]:
    """The cheap predictors of generation for one run (``latentdist.proxies.signals``), each
    ``{"skipped": reason}`` where its inputs do not exist. Interpolation FD (continuous latents)
    or perturbation FD (VQ codes): the held-out rows' latents are mixed with neighbours among
    the training rows or perturbed, decoded and scored in the compare feature space against an
    equal number of other training rows (``signal_rows``); velocity irreducible variance on 1000
    rows; linear probe on 2000 labelled rows, 5 splits."""
    t0 = time.perf_counter()
    seed = cfg.measure_config.seed
    n, ref, pool = signal_rows(coded, cfg)
    zq, x_query, x_ref = coded.z[coded.val[:n]], coded.x_val[:n], inputs.src.take(ref)
    args = (x_query, x_ref, decoder_fn(coded, inputs, cfg), feature_fn(extractor))
    codebook = coded.encoder.codebook
    out: dict[str, Any] = {}
    if codebook is None:
        out["interpolation"] = sig.interpolation_fd(
            zq, coded.z[pool], *args, x_recon=coded.x_hat[:n], seed=seed
        )
        out["perturbation"] = {"skipped": "continuous latent (perturbation FD is for VQ codes)"}
    else:
        out["interpolation"] = {"skipped": "VQ codes (interpolation FD mixes continuous latents)"}
        out["perturbation"] = sig.perturbation_fd(zq, codebook, *args, seed=seed)
    out["velocity_variance"] = sig.velocity_irreducible_variance(coded.z, seed=seed)
    labels = getattr(inputs.src, "labels", None)
    out["linear_probe"] = (
        sig.linear_probe_accuracy(coded.z, labels, seed=seed)
        if labels is not None
        else {"skipped": "the data carry no labels"}
    )
    out["time_s"] = time.perf_counter() - t0
    return out


def signal_rows(coded: Coded, cfg: CompareConfig) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, reference, pool): the first n held-out rows are the queries, n = the held-out count
    (at most ``max_samples``, as the generation metrics' sample count); the reference is n
    training rows drawn with the measurement's seed, and the other training rows are the pool
    among which the interpolation's neighbours are sought."""
    train = coded.train_rows
    n = min(cfg.n_samples or len(coded.val), len(coded.val), cfg.max_samples, len(train) // 2)
    rng = np.random.default_rng(cfg.measure_config.seed)
    pick = np.zeros(len(train), dtype=bool)
    pick[rng.choice(len(train), n, replace=False)] = True
    return n, train[pick], train[~pick]


def decoder_fn(coded: Coded, inputs: Inputs, cfg: CompareConfig) -> Callable:
    """The run's decoder as a function of latents: batches on the device, float32 on the CPU."""
    return partial(decode, coded.decoder, device=inputs.device, batch=cfg.encode_batch_size)


def feature_fn(extractor: Any) -> Callable:
    """The compare feature space as a function of samples: (n, F) features in eval mode."""

    def features(x: torch.Tensor) -> torch.Tensor:
        was_training = extractor.training
        extractor.eval()
        try:
            return extract_features(extractor, x)
        finally:
            extractor.train(was_training)

    return features


def generation_quality(
    coded: Coded, extractor: Any, cfg: CompareConfig, device: torch.device
) -> tuple[dict[str, Any], torch.Tensor, float]:
    """The baseline prior's scores (Gaussian mixture; for VQ codes the autoregressive prior),
    its first seed's decoded samples, and the seconds it took."""
    t0 = time.perf_counter()
    z_train = coded.z[coded.train_rows]
    vq = coded.encoder.codebook is not None
    if vq:
        sampler = code_sampler(z_train, coded.encoder.codebook)
    else:
        sampler = gmm_sampler(z_train, cfg.prior_components, cfg.prior_pca)
    generation, fakes = parallel.on_main(score_prior, sampler, coded, extractor, cfg, device)
    generation["prior"] = "codes (autoregressive)" if vq else "gaussian mixture"
    return generation, fakes, time.perf_counter() - t0


def probe_quality(
    coded: Coded,
    extractor: Any,
    cfg: CompareConfig,
    device: torch.device,
    generation: dict[str, Any],
    fakes: torch.Tensor,
) -> tuple[dict[str, Any] | None, torch.Tensor | None, float]:
    """The probe's scores (None when ``probe_steps`` is 0), its first seed's decoded samples, and
    the seconds it took. For VQ codes the autoregressive prior is the probe: ``generation``."""
    t0 = time.perf_counter()
    probe: dict[str, Any] | None = None
    probe_fakes = None
    recipe = cfg.recipe
    if recipe.steps > 0:
        if coded.encoder.codebook is not None:
            probe, probe_fakes = dict(generation), fakes
            probe["model"] = "codes (autoregressive), as the baseline"
        else:
            sampler = flow_sampler(coded.z[coded.train_rows], recipe)
            probe, probe_fakes = parallel.on_main(
                score_prior, sampler, coded, extractor, cfg, device
            )
            probe["model"] = "rectified flow"
    t_probe = time.perf_counter() - t0
    if probe is not None:
        probe["time_s"] = t_probe
    return probe, probe_fakes, t_probe


def gmm_sampler(z_train: torch.Tensor, components: int, pca: int) -> Sampler:
    """A sampler: a Gaussian mixture over the flattened training latents, fitted per seed."""

    def sample(seed: int, n: int) -> torch.Tensor:
        prior = GaussianMixturePrior(n_components=components, n_pca=pca, seed=seed).fit(z_train)
        return torch.as_tensor(prior.sample(n, seed=seed)).float()

    return sample


def flow_sampler(z_train: torch.Tensor, recipe: ProbeRecipe) -> Sampler:
    """A sampler: the probe's rectified flow on the training latents, fitted per seed."""

    def sample(seed: int, n: int) -> torch.Tensor:
        return FlowPrior(recipe).fit(z_train, seed=seed).sample(n, seed=seed)

    return sample


def code_sampler(z_train: torch.Tensor, codebook: torch.Tensor) -> Sampler:
    """A sampler: the autoregressive prior over the runs' code maps, fitted per seed."""
    codes = nearest_codes(z_train, codebook)

    def sample(seed: int, n: int) -> torch.Tensor:
        prior = CodePrior(num_codes=len(codebook)).fit(codes, seed=seed)
        zs = codebook.float()[prior.sample(n, seed=seed)]
        return zs.movedim(-1, 1) if z_train.ndim == 4 else zs

    return sample


def score_prior(
    sampler: Sampler, coded: Coded, extractor: Any, cfg: CompareConfig, device: torch.device
) -> tuple[dict, torch.Tensor]:
    """Per seed: ``sampler(seed, n)`` latents, decode, score against the held-out rows; mean and
    95 % CI per metric, and the first seed's decoded samples."""
    n_samples = cfg.n_samples or min(len(coded.val), cfg.max_samples)
    per_seed: dict[str, list[float]] = {key: [] for key in GENERATION_KEYS}
    first = None
    for seed in cfg.seeds:
        fake = decode(coded.decoder, sampler(seed, n_samples), device, cfg.encode_batch_size)
        scores = generation_metrics(coded.x_val, fake, extractor, k=cfg.k)
        for key in GENERATION_KEYS:
            per_seed[key].append(float(scores[key]))
        if first is None:
            first = fake
    out: dict[str, Any] = {key: mean_ci(v) for key, v in per_seed.items()}
    out["n_samples"] = n_samples
    return out, first


def run_images(
    coded: Coded, fakes: torch.Tensor, probe_fakes: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The first held-out rows, their reconstructions and samples, for the report's figures."""
    images = {
        "original": coded.x_val[:N_IMAGES].clone(),
        "recon": coded.x_hat[:N_IMAGES].clone(),
        "samples": fakes[: 2 * N_IMAGES].clone(),
    }
    if probe_fakes is not None:
        images["probe"] = probe_fakes[: 2 * N_IMAGES].clone()
    return images


# --- phase 4: the report ----------------------------------------------------------------------


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, data_range: float) -> dict:
    """MSE over all elements, its 95 % t-interval over samples, and PSNR = 10 log10(R^2/MSE).

    The interval is that of the mean of per-sample MSEs (equal to the element-wise MSE since every
    sample has the same number of elements); PSNR's interval maps the MSE interval through the
    same (decreasing) formula.
    """
    per = (x_hat.double() - x.double()).pow(2).reshape(len(x), -1).mean(dim=1).numpy()
    s = mean_ci(per)
    mse = s["mean"]

    def psnr(m: float) -> float:
        return 10 * math.log10(data_range**2 / m) if m > 0 else math.inf

    ci = s["ci"]
    return {
        "mse": mse,
        "mse_ci": ci,
        "psnr": psnr(mse),
        "psnr_ci": [psnr(ci[1]), psnr(max(ci[0], 1e-300))] if ci else None,
        "data_range": data_range,
        "n": len(x),
        "definition": "MSE: mean squared error over all elements of the held-out rows, in the "
        "data's own scale; PSNR = 10 log10(R^2 / MSE), R = max - min of --data",
    }


def generation_settings(cfg: CompareConfig, features_info: dict[str, Any]) -> dict[str, Any]:
    """The report's ``generation_settings``: seeds, sample counts, priors, features, metrics."""
    return {
        "seeds": cfg.seeds,
        "n_samples": cfg.n_samples,
        "max_samples": cfg.max_samples,
        "k": cfg.k,
        "prior": {
            "continuous": f"Gaussian mixture ({cfg.prior_components} full-covariance components) "
            f"over flattened latents, after PCA to {cfg.prior_pca} dimensions when larger",
            "vq": "autoregressive prior over code positions (raster order)",
        },
        "features": features_info,
        "reference": "held-out data rows",
        "metrics": {
            "fd": "Fréchet distance between Gaussian fits in the feature space (Heusel et al., 2017)",
            "kid": "unbiased MMD^2, cubic polynomial kernel, in the feature space, mean over "
            "50 subsets of at most 1000 (Binkowski et al., 2018)",
            "precision/recall/density/coverage": f"k-NN manifolds, k={cfg.k} (Naeem et al., 2020)",
            "w2": "exact W2 between decoded samples and held-out data, in data space (POT)",
        },
    }


def probe_settings(cfg: CompareConfig) -> dict[str, Any]:
    """The report's ``probe_settings``: the recipe, in numbers and in words."""
    recipe = cfg.recipe
    return {
        "recipe": recipe.to_dict(),
        "continuous": recipe.describe() if recipe.steps > 0 else "off (--probe-steps 0)",
        "vq": "the autoregressive prior over code positions (as the baseline)",
        "seeds": cfg.seeds,
        "metrics": "as generation_settings (same features, held-out rows and sample count)",
    }
