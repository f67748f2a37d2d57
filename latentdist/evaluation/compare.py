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
  robustness to latent noise.

Held-out rows: a train-dae run's recorded validation indices when the data fingerprint matches the
run's, else the trainer's rule with its defaults (``split_indices(n, 0.1, 0)``) and a warning. The
default feature network is trained once per call on rows outside every run's held-out set, so FD
values are comparable across runs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from latentdist.errors import UsageError
from latentdist.estimator.measure import MeasureConfig
from latentdist.estimator.stats import mean_ci
from latentdist.evaluation.probe import PROBE_RECIPE, FlowPrior

if TYPE_CHECKING:
    from latentdist.data import DataSource

GENERATION_KEYS = ("fd", "kid", "precision", "recall", "density", "coverage", "w2")
FALLBACK_SPLIT = {"val_fraction": 0.1, "split_seed": 0}
N_IMAGES = 8  # reconstructions and samples kept per run for the figures


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


@dataclass
class CompareResult:
    """The outcome of ``compare``: ``.report`` is the compare.json content."""

    report: dict[str, Any]
    images: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def to_json(self, indent: int | None = 2) -> str:
        from latentdist._io import to_json

        return to_json(self.report, indent)

    def to_frame(self):
        """One row per run: reconstruction, distance summary, generation metrics (pandas)."""
        from latentdist.report.compare import compare_frame

        return compare_frame(self.report)

    def table(self) -> str:
        """A plain-text table for the terminal."""
        from latentdist.report.compare import format_table

        return format_table(self.report)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write compare.json, report.md and the PNG figures into ``out_dir`` (atomically)."""
        from latentdist.report.compare import save_compare

        return save_compare(self.report, self.images, out_dir)


def _as_spec(r: str | Path | RunSpec) -> RunSpec:
    return r if isinstance(r, RunSpec) else RunSpec.from_dir(r)


def _unique_names(specs: list[RunSpec]) -> None:
    seen: dict[str, int] = {}
    for s in specs:
        n = seen.get(s.name, 0)
        seen[s.name] = n + 1
        if n:
            s.name = f"{s.name}-{n + 1}"


def _held_out(
    spec: RunSpec, n: int, fingerprint: str, shape: tuple
) -> tuple[np.ndarray, str, list]:
    """Held-out row indices for ``spec``, where they came from, and any warnings."""
    from latentdist.dae import split_indices

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


def _value_range(src: DataSource, batch_size: int) -> tuple[float, float]:
    """The smallest and largest value in the data, read a batch at a time."""
    lo, hi = math.inf, -math.inf
    for xb in src.batches(batch_size):
        lo, hi = min(lo, float(xb.min())), max(hi, float(xb.max()))
    return lo, hi


def _count_params(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


@torch.no_grad()
def _decode(decoder: Any, z: torch.Tensor, device: torch.device, batch: int) -> torch.Tensor:
    return torch.cat(
        [decoder(zb.to(device)).float().cpu() for zb in z.split(batch)]
    )  # one pass, no autograd


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


def compare(
    runs: list[str | Path | RunSpec],
    data: Any,
    *,
    measure_config: MeasureConfig | None = None,
    gen_seeds: int = 3,
    features: str | Path | None = None,
    feature_steps: int = 300,
    n_samples: int | None = None,
    max_samples: int = 2000,
    prior_components: int = 10,
    prior_pca: int = 64,
    probe_steps: int | None = None,
    k: int = 5,
    encode_batch_size: int = 256,
    device: str = "auto",
    trust_pickle: bool = False,
    progress: bool = True,
) -> CompareResult:
    """Compare autoencoders: reconstruction, the latent–data distance curve, generation quality.

    ``runs``: train-dae folders or ``RunSpec`` (external pairs via ``RunSpec.parse_pair``);
    ``data``: a name, path or ``DataSource``; ``measure_config``: the settings of
    ``latentdist.measure`` used identically for every run (its ``device`` is overridden by
    ``device``). Generation: ``gen_seeds`` repetitions of (fit prior, sample ``n_samples``
    (default: the held-out count, at most ``max_samples``), decode, score against held-out data);
    ``features``: a TorchScript feature extractor for FD/PRDC, else a small network trained once
    here on training rows (``feature_steps`` steps). The probe uses ``PROBE_RECIPE`` with
    ``probe_steps`` optimiser steps when given (0: no probe). See the module docstring for the
    definitions.
    """
    from latentdist import measure
    from latentdist.data import DataSource, load_data
    from latentdist.data.encoders import load_encoder
    from latentdist.device import resolve_device
    from latentdist.estimator import distributed
    from latentdist.evaluation import generation as gen
    from latentdist.proxies import diagnostics as diag

    t_start = time.perf_counter()
    specs = [_as_spec(r) for r in runs]
    if not specs:
        raise UsageError("compare: give at least one RUN_DIR or --pair NAME:ENCODER:DECODER")
    _unique_names(specs)
    if gen_seeds < 1:
        raise UsageError(f"--gen-seeds {gen_seeds}: expected an integer >= 1")
    if n_samples is not None and n_samples < 2:
        raise UsageError(f"--n-samples {n_samples}: expected an integer >= 2")
    if probe_steps is not None and probe_steps < 0:
        raise UsageError(f"--probe-steps {probe_steps}: expected an integer >= 0")
    recipe = PROBE_RECIPE if probe_steps is None else replace(PROBE_RECIPE, steps=probe_steps)
    cfg = MeasureConfig(**{**asdict(measure_config or MeasureConfig()), "device": device})
    cfg.validate()
    dev = resolve_device(device)
    src = data if isinstance(data, DataSource) else load_data(data, trust_pickle=trust_pickle)
    n, shape, fingerprint = len(src), tuple(src.sample_shape), src.fingerprint()
    x_min, x_max = _value_range(src, encode_batch_size)
    data_range = (x_max - x_min) or 1.0

    held: dict[str, tuple[np.ndarray, str]] = {}
    warnings: list[str] = []
    for s in specs:
        val, where, w = _held_out(s, n, fingerprint, shape)
        if len(val) < 2:
            raise UsageError(f"{s.name}: fewer than 2 held-out rows to evaluate on")
        held[s.name] = (val, where)
        warnings += w
    in_any_val = np.zeros(n, dtype=bool)
    for val, _ in held.values():
        in_any_val[val] = True

    # one feature space for every run, so FD and PRDC are comparable
    if features is not None:
        extractor = gen.load_feature_extractor(features)
        features_info = {"kind": "user", "path": str(features)}
    else:
        train_rows = np.flatnonzero(~in_any_val) if (~in_any_val).any() else np.arange(n)
        extractor = distributed.on_main(  # under torchrun: rank 0's, sent to every rank
            lambda: gen.train_feature_net(src, steps=feature_steps, seed=cfg.seed, rows=train_rows)
        )
        supervised = getattr(src, "labels", None) is not None
        features_info = {
            "kind": "trained",
            "steps": feature_steps,
            "seed": cfg.seed,
            "train_rows": len(train_rows),
            "description": (
                "FeatureNet (conv 3x3 32, conv 3x3/2 64, conv 3x3/2 64, global average pool, "
                "linear 64 + ReLU; features = this 64-d layer)"
                if src.kind == "images"
                else "FeatureNet (MLP 256, 64 + ReLU; features = this 64-d layer)"
            )
            + (
                ", trained as a classifier on the data's labels"
                if supervised
                else ", trained as a denoising autoencoder"
            ),
        }

    results, images = [], {}
    generator_choice = None
    for s in specs:
        val, where = held[s.name]
        train_rows = np.setdiff1d(np.arange(n), val)
        enc = load_encoder(s.encoder, trust_pickle=trust_pickle, device=dev)
        z = distributed.encode(  # under torchrun: row shards across ranks, gathered
            enc, src, batch_size=encode_batch_size, device=dev, progress=progress, seed=cfg.seed
        )
        try:
            decoder = torch.jit.load(str(s.decoder), map_location=dev).eval()
        except Exception as e:  # noqa: BLE001 (any load failure is a bad file)
            raise UsageError(
                f"{s.decoder}: not a TorchScript decoder ({type(e).__name__})"
            ) from None
        x_val = src.take(val)
        try:
            x_hat = _decode(decoder, z[val], dev, encode_batch_size)
        except Exception as e:  # noqa: BLE001
            raise UsageError(
                f"{s.decoder}: cannot decode latents of shape {list(z.shape[1:])} "
                f"({type(e).__name__})"
            ) from None
        if tuple(x_hat.shape[1:]) != shape:
            raise UsageError(
                f"{s.decoder}: decodes to samples of shape {list(x_hat.shape[1:])}, "
                f"but --data has {list(shape)}"
            )
        recon = reconstruction_metrics(x_val, x_hat, data_range)

        if cfg.generator == "auto":  # one family for every run, chosen on the first
            generator_choice = cfg.resolve_generator(tuple(z.shape[1:]), shape)
        t0 = time.perf_counter()
        m = measure(
            z,
            src,
            cfg,
            codebook=enc.codebook,
            encoder=lambda xb, enc=enc: enc.encode(xb, device=dev, progress=False),
            progress=progress,
        )
        t_measure = time.perf_counter() - t0
        if generator_choice:
            m.report["generator_choice"] = generator_choice + " (on the first run; same for all)"
        diagnostics = m.report.pop("diagnostics")
        diagnostics["decoder_robustness"] = diag.decoder_robustness(
            lambda zb, decoder=decoder: _decode(decoder, zb, dev, encode_batch_size),
            z[val],
            x_val,
            seed=cfg.seed,
        )

        seeds = [cfg.seed + i for i in range(gen_seeds)]
        n_gen = n_samples or min(len(val), max_samples)
        vq = enc.codebook is not None
        scoring = dict(
            decoder=decoder, extractor=extractor, k=k, device=dev, batch=encode_batch_size
        )
        z_train = z[train_rows]
        t0 = time.perf_counter()
        if vq:
            sampler = _code_sampler(z_train, enc.codebook)
            generation, fakes = distributed.on_main(
                _score_prior, sampler, x_val, seeds, n_gen, **scoring
            )
        else:

            def gmm(seed: int, n: int, z_train=z_train) -> torch.Tensor:
                prior = gen.GaussianMixturePrior(
                    n_components=prior_components, n_pca=prior_pca, seed=seed
                ).fit(z_train)
                return torch.as_tensor(prior.sample(n, seed=seed)).float()

            generation, fakes = distributed.on_main(
                _score_prior, gmm, x_val, seeds, n_gen, **scoring
            )
        generation["prior"] = "codes (autoregressive)" if vq else "gaussian mixture"
        t_generation = time.perf_counter() - t0
        t0 = time.perf_counter()
        probe: dict[str, Any] | None = None
        probe_fakes = None
        if recipe.steps > 0:
            if vq:  # the autoregressive prior is the probe for code maps
                probe, probe_fakes = dict(generation), fakes
                probe["model"] = "codes (autoregressive), as the baseline"
            else:

                def flow(seed: int, n: int, z_train=z_train) -> torch.Tensor:
                    return FlowPrior(recipe).fit(z_train, seed=seed).sample(n, seed=seed)

                probe, probe_fakes = distributed.on_main(
                    _score_prior, flow, x_val, seeds, n_gen, **scoring
                )
                probe["model"] = "rectified flow"
        t_probe = time.perf_counter() - t0
        if probe is not None:
            probe["time_s"] = t_probe
        run = s.run or {}
        warnings += [f"{s.name}: {w}" for w in m.report["warnings"]]
        results.append(
            {
                "name": s.name,
                "mode": s.mode,
                "encoder": str(s.encoder),
                "decoder": str(s.decoder),
                "folder": str(s.folder) if s.folder else None,
                "bottleneck": run.get("bottleneck"),
                "latent_shape": list(z.shape[1:]),
                "encoder_params": run.get("encoder_params", _count_params(enc.module)),
                "decoder_params": run.get("decoder_params", _count_params(decoder)),
                "aux_decoder_params": run.get("aux_decoder_params"),
                "steps": run.get("steps"),
                "held_out": {"rows": len(val), "source": where},
                "reconstruction": recon,
                "measure": m.report,
                "generation": generation,
                "probe": probe,
                "diagnostics": diagnostics,
                "timings": {
                    "measure_s": t_measure,
                    "generation_s": t_generation,
                    "probe_s": t_probe,
                    "diagnostics_s": diagnostics["time_s"],
                },
            }
        )
        images[s.name] = {
            "original": x_val[:N_IMAGES].clone(),
            "recon": x_hat[:N_IMAGES].clone(),
            "samples": fakes[: 2 * N_IMAGES].clone(),
        }
        if probe_fakes is not None:
            images[s.name]["probe"] = probe_fakes[: 2 * N_IMAGES].clone()

    report = {
        "data": {
            "name": getattr(src, "name", str(data)),
            "kind": src.kind,
            "shape": list(shape),
            "rows": n,
            "fingerprint": fingerprint,
            "min": x_min,
            "max": x_max,
            "range": data_range,
        },
        "measure_config": {**asdict(cfg), "capacities": list(cfg.capacities)},
        "generation_settings": {
            "seeds": [cfg.seed + i for i in range(gen_seeds)],
            "n_samples": n_samples,
            "max_samples": max_samples,
            "k": k,
            "prior": {
                "continuous": f"Gaussian mixture ({prior_components} full-covariance components) "
                f"over flattened latents, after PCA to {prior_pca} dimensions when larger",
                "vq": "autoregressive prior over code positions (raster order)",
            },
            "features": features_info,
            "reference": "held-out data rows",
            "metrics": {
                "fd": "Fréchet distance between Gaussian fits in the feature space (Heusel et al., 2017)",
                "kid": "unbiased MMD^2, cubic polynomial kernel, in the feature space, mean over "
                "50 subsets of at most 1000 (Binkowski et al., 2018)",
                "precision/recall/density/coverage": f"k-NN manifolds, k={k} (Naeem et al., 2020)",
                "w2": "exact W2 between decoded samples and held-out data, in data space (POT)",
            },
        },
        "probe_settings": {
            "recipe": recipe.to_dict(),
            "continuous": recipe.describe() if recipe.steps > 0 else "off (--probe-steps 0)",
            "vq": "the autoregressive prior over code positions (as the baseline)",
            "seeds": [cfg.seed + i for i in range(gen_seeds)],
            "metrics": "as generation_settings (same features, held-out rows and sample count)",
        },
        "runs": results,
        "warnings": warnings,
        "device": str(dev),
        "timings": {"total_s": time.perf_counter() - t_start},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return CompareResult(report, images)


def _code_sampler(z_train: torch.Tensor, codebook: torch.Tensor):
    """A sampler (seed, n) -> latents: the autoregressive prior over the runs' code maps."""
    from latentdist.evaluation.generation import CodePrior
    from latentdist.proxies.geometry import nearest_codes

    codes = nearest_codes(z_train, codebook)

    def sample(seed: int, n: int) -> torch.Tensor:
        prior = CodePrior(num_codes=len(codebook)).fit(codes, seed=seed)
        zs = codebook.float()[prior.sample(n, seed=seed)]
        return zs.movedim(-1, 1) if z_train.ndim == 4 else zs

    return sample


def _score_prior(
    sampler: Any,
    x_val: torch.Tensor,
    seeds: list[int],
    n_samples: int,
    *,
    decoder: Any,
    extractor: Any,
    k: int,
    device: torch.device,
    batch: int,
) -> tuple[dict, torch.Tensor]:
    """Per seed: ``sampler(seed, n)`` latents, decode, score; mean and 95 % CI per metric."""
    from latentdist.evaluation.generation import generation_metrics

    per_seed: dict[str, list[float]] = {key: [] for key in GENERATION_KEYS}
    first = None
    for seed in seeds:
        fake = _decode(decoder, sampler(seed, n_samples), device, batch)
        scores = generation_metrics(x_val, fake, extractor, k=k)
        for key in GENERATION_KEYS:
            per_seed[key].append(float(scores[key]))
        if first is None:
            first = fake
    out: dict[str, Any] = {key: mean_ci(v) for key, v in per_seed.items()}
    out["n_samples"] = n_samples
    return out, first
