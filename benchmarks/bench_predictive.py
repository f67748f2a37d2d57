"""Predictive validity: which cheap signal ranks latents the way the generation probe does?

A zoo of latents on MNIST-5k spans what users choose between: encoders trained with
``train-dae`` (DAE and joint at 3 seeds each; KL weights 1e-6 to 1e-1; 1 to 16 latent channels;
downsampling 2 and 4 (the trainer takes powers of two only, so 7 is not in the zoo); VQ
bottlenecks with codebooks of 32 and 512 codes; auxiliary-decoder width and dropout) and
non-learned latents whose order is known in advance, given to ``compare`` as external
TorchScript encoder/decoder pairs: PCA-k (k = 4, 8, 16, 32; decoder: the inverse map), a
Gaussian random projection to 32 (decoder: its pseudo-inverse) and PCA-16 through the fixed
invertible warp of the validity benchmark's V8 row (``latentdist.evaluation.validity.
CouplingWarp``; decoder: its exact inverse). Every run goes through ``compare`` with one shared
feature network (so FD values are comparable), and every signal that ``compare`` reports (D_c at
each capacity, the critical and saturation capacities, each proxy at the configured sweep's
largest capacity, latent geometry, each diagnostic, the cheap signals of
``latentdist.proxies.signals`` — interpolation FD, perturbation FD for VQ codes, the velocity
irreducible variance, linear-probe accuracy —, reconstruction MSE, the Gaussian-mixture
baseline's FD) is rank-correlated with the probe's FD across the zoo: Spearman's rho
(``scipy.stats.spearmanr``) with a percentile bootstrap interval over encoders, and a scatter plot
per signal. Beside them:

* the probe's ceiling: every encoder is probed at ``gen_seeds`` seeds (each seed fits its own
  flow); the Spearman correlation of two single-seed probe FDs across the zoo, averaged over seed
  pairs (r1), is stepped up to the mean over all seeds by Spearman-Brown (r = k r1 / (1 + (k - 1)
  r1)), and sqrt(r) is the ceiling on the correlation any signal can have with the probe's FD
  (the attenuation bound of classical test theory, applied to ranks: approximate);
* the known orders among the non-learned latents (PCA-8 before PCA-4, PCA-16 before PCA-8,
  PCA-32 before PCA-16, PCA-32 before PCA-8, PCA-32 before the random projection to 32,
  PCA-16 before its warp; ``KNOWN_ORDER``):
  for each signal, how many of these pairs it puts in order, reading the signal in the direction
  of its correlation with the probe's FD;
* the DAE-vs-joint effect: for seeds 0, 1, 2 the paired difference (DAE - joint, same seed) in
  probe FD, D_c at each capacity and reconstruction MSE, mean and Student-t 95 % interval over
  the seeds (``latentdist.stats.mean_ci``).

A second, smaller zoo on ``photos32`` (32x32 RGB crops of scikit-learn's sample photographs:
DAE and joint at 2 seeds, KL 1e-2 and 1e-6, PCA-8 and PCA-32) asks whether the ranking holds
beyond digits.

    python benchmarks/bench_predictive.py [--small] [--jobs J] [--keep DIR] [--no-photos]
        [--only NAME,NAME]

Default: the two zoos above, 600 training steps per encoder; the distance is measured at
capacities 4, 16, 64 with 150 steps, 3 seeds, n_eval 400 and no extension beyond 64 — cheaper
than ``measure``'s defaults, so that the study fits 90 minutes on 2 cores with ``--jobs 2`` (the
default wherever there are 2 cores or more).
``--small``: 4 latents on digits (DAE, joint, PCA-4, PCA-8) with short training and a
shortened probe (CI); no photographs. ``--jobs J`` trains and compares J encoders at a time,
each process pinned to its own share of the cores (the per-run times then add up to the
sequential time); every member's CPU seconds are recorded beside its wall seconds (the cost on a
quiet core when a busy machine stretches the wall time). ``--only`` keeps the named members (to
check a few; with ``--tag T`` its results go to predictive_T.*, beside the whole zoo's). Writes
benchmarks/results/predictive[_small][_T].md, .json and .png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, markdown_table, write_result  # noqa: E402

from latentdist.cli.demo import DEMO_TRAIN  # noqa: E402
from latentdist.stats import bootstrap_draws  # noqa: E402

BASE = {**DEMO_TRAIN, "kl_weight": 1e-4, "checkpoint_every": 0, "log_every": 50, "progress": False}
# name, changes to BASE (and mode); "linear" marks a non-learned latent (no training)
ZOO = [
    ("dae", dict(mode="dae")),
    ("dae-seed1", dict(mode="dae", seed=1)),
    ("dae-seed2", dict(mode="dae", seed=2)),
    ("joint", dict(mode="joint")),
    ("joint-seed1", dict(mode="joint", seed=1)),
    ("joint-seed2", dict(mode="joint", seed=2)),
    ("dae-kl1e-6", dict(mode="dae", kl_weight=1e-6)),
    ("dae-kl1e-2", dict(mode="dae", kl_weight=1e-2)),
    ("joint-kl1e-2", dict(mode="joint", kl_weight=1e-2)),
    ("dae-kl1e-1", dict(mode="dae", kl_weight=1e-1)),
    ("dae-c1", dict(mode="dae", latent_channels=1)),
    ("dae-c2", dict(mode="dae", latent_channels=2)),
    ("dae-c8", dict(mode="dae", latent_channels=8)),
    ("dae-c16", dict(mode="dae", latent_channels=16)),
    ("dae-ds2", dict(mode="dae", downsample=2)),
    ("dae-ds2-c1", dict(mode="dae", downsample=2, latent_channels=1)),
    ("dae-vq32", dict(mode="dae", bottleneck="vq", codebook_size=32)),
    ("dae-vq512", dict(mode="dae", bottleneck="vq", codebook_size=512)),
    ("dae-aux0.25-drop0.3", dict(mode="dae", aux_width_mult=0.25, aux_dropout=0.3)),
    ("dae-aux1-drop0", dict(mode="dae", aux_width_mult=1.0, aux_dropout=0.0)),
    ("pca4", dict(linear="pca", k=4)),
    ("pca8", dict(linear="pca", k=8)),
    ("pca16", dict(linear="pca", k=16)),
    ("pca32", dict(linear="pca", k=32)),
    ("randproj32", dict(linear="random", k=32)),
    ("warped-pca16", dict(linear="pca", k=16, warp=True)),
]
PHOTO_ZOO = [
    ("dae", dict(mode="dae")),
    ("dae-seed1", dict(mode="dae", seed=1)),
    ("joint", dict(mode="joint")),
    ("joint-seed1", dict(mode="joint", seed=1)),
    ("dae-kl1e-6", dict(mode="dae", kl_weight=1e-6)),
    ("dae-kl1e-2", dict(mode="dae", kl_weight=1e-2)),
    ("pca8", dict(linear="pca", k=8)),
    ("pca32", dict(linear="pca", k=32)),
]
SMALL_ZOO = [ZOO[0], ZOO[3], ("pca4", dict(linear="pca", k=4)), ("pca8", dict(linear="pca", k=8))]
SMALL_BASE = dict(BASE, downsample=2, latent_channels=2, base_width=4)
# (better, worse) by construction: more principal components; PCA before a random projection
# of the same size; PCA before the same information through a nonlinear warp
KNOWN_ORDER = [
    ("pca8", "pca4"),
    ("pca16", "pca8"),
    ("pca32", "pca16"),
    ("pca32", "randproj32"),
    ("pca16", "warped-pca16"),
    ("pca32", "pca8"),
]


def _pin(cores_per_job: int, slot_queue) -> None:
    """Pool initializer: take a slot, pin this process to its cores, set torch's threads."""
    import torch

    slot = slot_queue.get()
    if hasattr(os, "sched_setaffinity"):
        avail = sorted(os.sched_getaffinity(0))
        mine = avail[slot * cores_per_job : (slot + 1) * cores_per_job]
        if len(mine) == cores_per_job:
            os.sched_setaffinity(0, mine)
    torch.set_num_threads(cores_per_job)


def train_one(name: str, changes: dict, data: str, steps: int, root: str, small: bool) -> dict:
    """Train one zoo member with train-dae's library entry point (or build a non-learned pair,
    ``linear_pair``); returns its folder and time.

    A finished run of the same steps already in the folder (``--keep``) is reused, with the
    training times recorded beside it (bench_train.json; run.json's wall time if absent)."""
    if "linear" in changes:
        return linear_pair(name, changes, data, root)
    from latentdist.dae import TrainConfig, train

    done = Path(root) / name / "run.json"
    if done.is_file():
        run = json.loads(done.read_text())
        if run.get("finished") and run.get("steps") == steps and run.get("data") == data:
            times = done.parent / "bench_train.json"
            recorded = json.loads(times.read_text()) if times.is_file() else {}
            return {"name": name, "folder": str(done.parent), "train_s": run["time_s"],
                    **recorded, "reused": True}  # fmt: skip
    mode = changes.get("mode", "dae")
    half = steps // 2
    cfg = TrainConfig(
        data=data,
        out=str(Path(root) / name),
        stage1_steps=half if mode == "dae" else steps,
        stage2_steps=steps - half if mode == "dae" else 0,
        device="cpu",
        overwrite=True,
        **{**(SMALL_BASE if small else BASE), **changes},
    )
    from latentdist._io import save_json

    t0, c0 = time.perf_counter(), time.process_time()
    train(cfg)
    times = {"train_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0}
    save_json(Path(cfg.out) / "bench_train.json", times)
    return {"name": name, "folder": cfg.out, **times}


def _linear_modules():
    """The scriptable encoder and decoder of a non-learned latent (built on first use, so that
    the pool's workers import torch only when they need it)."""
    import torch

    from latentdist.evaluation.validity import CouplingWarp

    class LinearEncoder(torch.nn.Module):
        """x -> standardise((x.flatten - mean) @ proj), then the warp, then standardised again
        (identity warp when it has no layers); float64 inside, float32 out."""

        def __init__(self, mean, proj, z_mean, z_std, warp, w_mean, w_std):
            super().__init__()
            for k, v in dict(
                mean=mean, proj=proj, z_mean=z_mean, z_std=z_std, w_mean=w_mean, w_std=w_std
            ).items():
                self.register_buffer(k, torch.as_tensor(v, dtype=torch.float64))
            self.warp = warp.double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = (x.flatten(1).double() - self.mean) @ self.proj
            z = self.warp((z - self.z_mean) / self.z_std)
            return ((z - self.w_mean) / self.w_std).float()

    class LinearDecoder(torch.nn.Module):
        """The encoder undone: the warp's exact inverse, then ``back`` (PCA: the components;
        a random projection: its pseudo-inverse) and the mean, reshaped to the data's shape."""

        def __init__(self, enc: LinearEncoder, back, shape: list[int]):
            super().__init__()
            for k in ("mean", "z_mean", "z_std", "w_mean", "w_std"):
                self.register_buffer(k, getattr(enc, k).clone())
            self.register_buffer("back", torch.as_tensor(back, dtype=torch.float64))
            self.warp = enc.warp
            self.shape = shape

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            z = self.warp.inverse(z.double() * self.w_std + self.w_mean)
            x = (z * self.z_std + self.z_mean) @ self.back + self.mean
            return x.float().reshape([-1] + self.shape)

    return LinearEncoder, LinearDecoder, CouplingWarp


def linear_pair(name: str, changes: dict, data: str, root: str) -> dict:
    """A non-learned latent as a TorchScript encoder.pt / decoder.pt pair in ``root/name``,
    fitted on the rows outside compare's held-out split (the trainer's default split, which
    compare applies to external pairs): ``pca`` with ``k`` components (decoder: the inverse
    map), ``random``: a Gaussian projection to ``k`` (seed 0; decoder: its pseudo-inverse);
    ``warp``: the result through ``CouplingWarp(k, seed=0)`` (decoder: its exact inverse)."""
    import torch
    from sklearn.decomposition import PCA

    from latentdist.data import load_data
    from latentdist.evaluation.compare import RunSpec, held_out_rows

    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    src = load_data(data)
    probe = RunSpec(name, folder / "encoder.pt", folder / "decoder.pt")
    val, _, _ = held_out_rows(probe, len(src), src.fingerprint(), tuple(src.sample_shape))
    x = src.take(np.setdiff1d(np.arange(len(src)), val)).flatten(1).double().numpy()
    k = changes["k"]
    mean = x.mean(0)
    if changes["linear"] == "pca":
        proj = PCA(k, random_state=0).fit(x).components_.T  # (D, k), orthonormal columns
        back = proj.T
    else:
        proj = np.random.default_rng(0).standard_normal((x.shape[1], k)) / math.sqrt(x.shape[1])
        back = np.linalg.pinv(proj)
    z = (x - mean) @ proj
    z_mean, z_std = z.mean(0), z.std(0)
    Enc, Dec, Warp = _linear_modules()
    warp = Warp(k, seed=0, layers=4 if changes.get("warp") else 0)
    with torch.no_grad():
        w = warp.double()(torch.as_tensor((z - z_mean) / z_std)).numpy()
    enc = Enc(mean, proj, z_mean, z_std, warp, w.mean(0), w.std(0))
    dec = Dec(enc, back, list(src.sample_shape))
    torch.jit.script(enc.eval()).save(str(folder / "encoder.pt"))
    torch.jit.script(dec.eval()).save(str(folder / "decoder.pt"))
    return {
        "name": name,
        "folder": str(folder),
        "train_s": time.perf_counter() - t0,
        "train_cpu_s": time.process_time() - c0,
    }


def run_spec(folder: str):
    """A train-dae folder as itself, a folder with only encoder.pt / decoder.pt as an external
    pair named after the folder."""
    from latentdist.evaluation.compare import RunSpec

    f = Path(folder)
    if (f / "run.json").is_file():
        return str(f)
    return RunSpec(f.name, f / "encoder.pt", f / "decoder.pt")


def compare_one(folder: str, data: str, features: str, settings: dict) -> dict:
    """``compare`` on one run with the shared feature network; returns its report entry, also
    saved beside the run (bench_compare.json) and reused from there by a later call with the same
    settings, feature network and probe recipe."""
    from latentdist._io import save_json, to_json
    from latentdist.evaluation.compare import compare
    from latentdist.evaluation.probe import PROBE_RECIPE

    saved = Path(folder) / "bench_compare.json"
    plain = {k: asdict(v) if is_dataclass(v) else v for k, v in settings.items()}
    # the probe's recipe too: a changed recipe must not reuse a kept run's scores
    key = json.loads(to_json({**plain, "features": features, "probe": PROBE_RECIPE.to_dict()}))
    if saved.is_file():
        run = json.loads(saved.read_text())
        if run.get("bench_key") == key:
            return run | {"reused": True}
    t0, c0 = time.perf_counter(), time.process_time()
    res = compare(
        [run_spec(folder)], data, features=features, device="cpu", progress=False, **settings
    )
    run = res.report["runs"][0]
    run["compare_s"] = time.perf_counter() - t0
    run["compare_cpu_s"] = time.process_time() - c0  # this process's CPU: robust to a busy machine
    run["settings"] = {k: v for k, v in res.report.items() if k.endswith("settings")}
    run["bench_key"] = key
    save_json(saved, run)
    return json.loads(saved.read_text())


def shared_features(data: str, folder: str, steps: int, out: str) -> str:
    """Train compare's default feature network once on the rows outside the held-out split (all
    zoo members share the trainer's split) and save it as TorchScript for every compare."""
    import torch

    from latentdist.data import load_data
    from latentdist.discrepancy import train_feature_net
    from latentdist.evaluation.compare import RunSpec, held_out_rows

    path = Path(out) / "features.pt"
    if path.is_file():  # a kept run's network (--keep): FD stays comparable with its runs
        return str(path)
    src = load_data(data)
    spec = RunSpec.from_dir(folder)
    val, _, _ = held_out_rows(spec, len(src), src.fingerprint(), tuple(src.sample_shape))
    rows = np.setdiff1d(np.arange(len(src)), val)
    net = train_feature_net(src, steps=steps, seed=0, rows=rows)
    torch.jit.trace(net, src.take(slice(0, 2))).save(str(path))
    return str(path)


SIGNAL_NAMES = {
    "ifid_linear": "interpolation FD (linear)",
    "ifid_slerp": "interpolation FD (slerp)",
    "ifid_recon": "recon FD (same rows)",
    "pfid": "perturbation FD (VQ)",
    "viv": "velocity irreducible variance",
    "linear_probe_acc": "linear-probe accuracy",
}


def signals(run: dict) -> dict[str, float]:
    """Every scalar signal of one compare entry (NaN where missing), plus the probe's FD.

    For VQ codes compare's probe is the autoregressive prior, which is also its baseline: the
    Gaussian-mixture FD is left out there (NaN) rather than correlated with itself."""
    from latentdist.report.compare import diagnostic_values, signal_values

    m = run["measure"]
    out: dict[str, float] = {"recon MSE": run["reconstruction"]["mse"]}
    configured = m["config"]["capacities"]
    for e in m["curve"]:
        if e["capacity"] in configured:  # extensions differ between encoders
            out[f"D_c c={e['capacity']}"] = e["distance"]["mean"]
    crit = m["critical_capacity"]["capacity"]
    out["critical capacity"] = math.inf if crit is None else float(crit)  # none: beyond the sweep
    flat = m.get("saturation") or {}
    cap = flat.get("capacity")
    out["saturation capacity"] = math.inf if cap is None else float(cap)  # none: still falling
    out["D at saturation - floor"] = flat["excess"]["mean"] if cap is not None else math.nan
    # proxies at the configured sweep's end, which every encoder measured
    end = [e for e in m["curve"] if e["capacity"] in configured][-1]
    for k, v in end.get("proxies", {}).items():
        if isinstance(v, (int, float)) and k not in ("params", "n_points"):
            out[f"{k} (c={end['capacity']})"] = float(v)
    lat = m["latent"]
    for k in ("twonn", "mle"):
        v = (lat.get("intrinsic_dim") or {}).get(k)
        if isinstance(v, (int, float)):
            out[f"intrinsic dim ({k})"] = float(v)
    if isinstance(lat.get("effective_rank"), (int, float)):
        out["effective rank"] = float(lat["effective_rank"])
    for k, v in diagnostic_values(run["diagnostics"]).items():
        if v is not None:
            out[k] = v
    values = signal_values(run.get("signals") or {})
    for k, label in SIGNAL_NAMES.items():
        v = values.get(k)
        out[label] = math.nan if v is None else float(v)
    vq = (run.get("bottleneck") == "vq") or "autoregressive" in str(run["probe"].get("model"))
    out["GMM-prior FD"] = math.nan if vq else run["generation"]["fd"]["mean"]
    out["probe FD"] = run["probe"]["fd"]["mean"]
    return out


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair of ``a`` and ``b`` (m, n): Pearson's correlation of the
    average ranks; NaN where a row is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(1) / np.sqrt((ra**2).sum(1) * (rb**2).sum(1))


def spearman_with_interval(
    x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> tuple[float, list[float] | None]:
    """Spearman's rho of (x, y) and its 95 % percentile bootstrap interval over resampled pairs.
    The resamples' rho are computed at once: Pearson's correlation of average ranks, which is
    Spearman's rho. A resample in which either variable is constant has no rho; when more than
    5 % of them have none (a heavily tied signal, e.g. a critical capacity that one latent alone
    sets apart), the rest are a biased subset, so no interval is reported."""
    from scipy.stats import spearmanr

    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if len(x) < 3 or len(set(x.tolist())) < 2 or len(set(y.tolist())) < 2:
        return math.nan, None
    rho = float(spearmanr(x, y).statistic)
    idx = bootstrap_draws(len(x), n_boot, seed)
    boots = rowwise_spearman(x[idx], y[idx])
    if np.mean(~np.isfinite(boots)) > 0.05:
        return rho, None
    return rho, percentile_interval(boots)


def percentile_interval(boots: np.ndarray) -> list[float] | None:
    """The 95 % percentile interval of the finite bootstrap values (None when there are none)."""
    boots = boots[np.isfinite(boots)]
    if not len(boots):
        return None
    return [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def probe_ceiling(per_seed: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """The probe's repeatability across the zoo from its per-seed FDs (latents x seeds): r1, the
    mean over seed pairs of Spearman's rho between two single-seed FDs; r = k r1 / (1 + (k-1) r1)
    for the mean of the k seeds (Spearman-Brown); the ceiling sqrt(max(r, 0)) on the correlation
    of any signal with the probe's mean FD. Interval: percentile bootstrap over latents."""
    n, k = per_seed.shape
    if k < 2 or n < 3:
        return {"r1": math.nan, "ceiling": math.nan, "ci": None, "encoders": n, "seeds": k}
    idx = np.vstack([np.arange(n), bootstrap_draws(n, n_boot, seed)])
    pairs = list(itertools.combinations(range(k), 2))
    rs = np.stack([rowwise_spearman(per_seed[idx, i], per_seed[idx, j]) for i, j in pairs])
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-constant resamples: NaN
        r1 = np.nanmean(rs, axis=0)
        r = k * r1 / (1 + (k - 1) * r1)
        top = np.sqrt(np.clip(r, 0.0, None))
    ci = percentile_interval(top[1:])
    return {"r1": float(r1[0]), "ceiling": float(top[0]), "ci": ci, "encoders": n, "seeds": k}


def known_order(table: list[dict[str, float]], name: str, direction: float) -> str:
    """How many of ``KNOWN_ORDER``'s pairs the signal ``name`` orders as known, read in
    ``direction`` (+1: larger is worse, as for the probe's FD), out of the pairs present in the
    zoo with a value for both latents; "-" when there are none, "?" when the direction is
    undefined (rho NaN or 0)."""
    by = {t["_name"]: t.get(name, math.nan) for t in table}
    pairs = [
        (b, w)
        for b, w in KNOWN_ORDER
        if b in by and w in by and not (math.isnan(by[b]) or math.isnan(by[w]))
    ]
    if not pairs:
        return "-"
    if not np.isfinite(direction) or direction == 0:
        return f"?/{len(pairs)}"
    ok = sum(1 for b, w in pairs if direction * (by[w] - by[b]) > 0)
    return f"{ok}/{len(pairs)}"


def correlation_rows(table: list[dict[str, float]], known: bool = True) -> list[dict]:
    """Spearman's rho of every signal with the probe's FD, its bootstrap interval, n and (when
    ``known``) the known-order pairs it reproduces; sorted by |rho| (undefined last)."""
    y = np.array([t["probe FD"] for t in table], dtype=float)
    names = [k for k in table[0] if k not in ("probe FD", "_name")]
    names += sorted({k for t in table for k in t} - set(names) - {"probe FD", "_name"})
    rows = []
    for name in names:
        x = np.array([t.get(name, math.nan) for t in table], dtype=float)
        rho, ci = spearman_with_interval(x, y)
        row = {
            "signal": name,
            "spearman rho vs probe FD": rho,
            "95% bootstrap CI": "-" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]",
            "n": int((~np.isnan(x)).sum()),
        }
        if known:
            row["known order"] = known_order(table, name, np.sign(rho))
        rows.append(row)
    rho = "spearman rho vs probe FD"
    rows.sort(key=lambda r: -abs(r[rho]) if np.isfinite(r[rho]) else 1.0)  # undefined last
    if known:
        rows.insert(0, {"signal": "(probe FD itself)", rho: 1.0, "95% bootstrap CI": "-",
                        "n": len(table), "known order": known_order(table, "probe FD", 1.0)})  # fmt: skip
    return rows


def paired_effect(table: list[dict[str, float]], pairs: list[tuple[str, str]]) -> list[dict]:
    """DAE - joint per seed pair: mean and Student-t 95 % interval over the pairs of probe FD,
    D_c at each capacity and reconstruction MSE (``latentdist.stats.mean_ci``)."""
    from latentdist.stats import mean_ci

    by = {t["_name"]: t for t in table}
    pairs = [(a, b) for a, b in pairs if a in by and b in by]
    if not pairs:
        return []
    keys = ["probe FD"] + [k for k in by[pairs[0][0]] if k.startswith("D_c c=")] + ["recon MSE"]
    rows = []
    for k in keys:
        d = [by[a][k] - by[b][k] for a, b in pairs]
        s = mean_ci(d)
        rows.append(
            {
                "quantity": k,
                "DAE mean": float(np.mean([by[a][k] for a, _ in pairs])),
                "joint mean": float(np.mean([by[b][k] for _, b in pairs])),
                "DAE - joint per seed": ", ".join(f"{v:.3g}" for v in d),
                "mean difference": s["mean"],
                "95% t interval": "-"
                if s["ci"] is None
                else f"[{s['ci'][0]:.3g}, {s['ci'][1]:.3g}]",
            }
        )
    return rows


DAE_JOINT = [("dae", "joint"), ("dae-seed1", "joint-seed1"), ("dae-seed2", "joint-seed2")]


def scatter(table: list[dict[str, float]], names: list[str], rhos: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from latentdist._io import save_figure

    ncol = 6
    nrow = math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.8 * nrow), squeeze=False)
    y = [t["probe FD"] for t in table]
    for ax, name in zip(axes.flat, names, strict=False):
        x = [t.get(name, math.nan) for t in table]
        finite = [v if np.isfinite(v) else np.nan for v in x]
        ax.scatter(finite, y, s=18)
        for xi, yi, t in zip(finite, y, table, strict=True):
            ax.annotate(t["_name"], (xi, yi), fontsize=5, alpha=0.7)
        ax.set_title(f"{name}\nrho = {rhos.get(name, math.nan):.2f}", fontsize=8)
        ax.tick_params(labelsize=6)
        if min(y) > 0 and max(y) > 20 * min(y):  # e.g. the warped PCA's FD far above the rest
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("probe FD", fontsize=8)
    fig.tight_layout()
    save_figure(path, fig, dpi=80)
    plt.close(fig)


class Runner:
    """Maps a function over argument lists, in this process (jobs = 1) or in a pool of ``jobs``
    processes, each pinned to its own ``per_job`` cores."""

    def __init__(self, jobs: int, per_job: int):
        self.jobs, self.per_job, self.pool = jobs, per_job, None

    def __enter__(self) -> Runner:
        import torch

        if self.jobs == 1:
            torch.set_num_threads(min(self.per_job, torch.get_num_threads()))
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            slots = ctx.Queue()
            for i in range(self.jobs):
                slots.put(i)
            self.pool = ProcessPoolExecutor(
                self.jobs, ctx, initializer=_pin, initargs=(self.per_job, slots)
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def map(self, fn, *arglists) -> list:
        if self.pool is None:
            return [fn(*a) for a in zip(*arglists, strict=True)]
        return list(self.pool.map(fn, *arglists))

    def call(self, fn, *args):
        return fn(*args) if self.pool is None else self.pool.submit(fn, *args).result()


def study(
    zoo: list, data: str, steps: int, small: bool, settings: dict, feature_steps: int,
    root: str, runner: Runner, train_only: bool,
) -> dict:  # fmt: skip
    """Train (or build) and compare every member of ``zoo`` on ``data``; the zoo table, the
    signal table, the per-member times."""
    Path(root).mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    args = [(n, c, data, steps, root, small) for n, c in zoo]
    trained = runner.map(train_one, *zip(*args, strict=True))
    if train_only:
        return {"trained": trained}
    t0 = time.perf_counter()
    first = next(t for t, (_, c) in zip(trained, zoo, strict=True) if "linear" not in c)
    features = runner.call(shared_features, data, first["folder"], feature_steps, root)
    t_features = time.perf_counter() - t0
    n = len(trained)
    runs = runner.map(
        compare_one, [t["folder"] for t in trained], [data] * n, [features] * n, [settings] * n
    )
    wall = time.perf_counter() - t_start
    table = []
    for t, r in zip(trained, runs, strict=True):
        sig = signals(r)
        sig["_name"] = t["name"]
        table.append(sig)
    zoo_rows = []
    for (name, changes), t, r in zip(zoo, trained, runs, strict=True):
        p, g = r["probe"], r["generation"]
        half = half_width(p["fd"]["ci"])
        zoo_rows.append(
            {
                "encoder": name,
                "changes": ", ".join(f"{k}={v}" for k, v in changes.items()),
                "latent": "x".join(map(str, r["latent_shape"])),
                "recon MSE": r["reconstruction"]["mse"],
                "probe FD": f"{p['fd']['mean']:.3g} ± {half:.2g}",
                "probe KID": p["kid"]["mean"],
                "GMM FD": g["fd"]["mean"],
                "train s": t["train_s"],
                "compare s": r["compare_s"],
                "probe s": probe_seconds(r),
                "train+compare CPU s": t.get("train_cpu_s", math.nan)
                + r.get("compare_cpu_s", math.nan),
            }
        )
    per_seed = np.array([r["probe"]["fd"]["per_seed"] for r in runs], dtype=float)
    learned = ["linear" not in c for _, c in zoo]
    return {
        "data": data,
        "zoo": zoo,
        "trained": trained,
        "runs": runs,
        "table": table,
        "zoo_rows": zoo_rows,
        "ceiling": probe_ceiling(per_seed),
        "ceiling_learned": probe_ceiling(per_seed[np.array(learned, dtype=bool)]),
        "spread": probe_spread(runs, learned),
        "wall_s": wall,
        "features_s": t_features,
        "sequential_s": t_features
        + sum(t["train_s"] for t in trained)
        + sum(r["compare_s"] for r in runs),
    }


def probe_seconds(run: dict) -> float:
    """The probe's seconds in one compare entry; for VQ codes the probe is the autoregressive
    baseline, so its time is the baseline's (generation) time."""
    if "autoregressive" in str(run["probe"].get("model")):
        return run["timings"]["generation_s"]
    return run["timings"]["probe_s"]


def describe_times(res: dict) -> dict:
    """Median per-member times, learned and non-learned apart: wall seconds of training (or
    building), compare and its probe, and the CPU seconds of training + compare (one thread per
    job: the time on a quiet core)."""
    rows = {"learned": [], "non-learned": []}
    for t, r, (_, c) in zip(res["trained"], res["runs"], res["zoo"], strict=True):
        cpu = t.get("train_cpu_s", math.nan) + r.get("compare_cpu_s", math.nan)
        rows["non-learned" if "linear" in c else "learned"].append(
            (t["train_s"], r["compare_s"], probe_seconds(r), cpu)
        )
    out: dict = {}
    for kind, rs in rows.items():
        out[kind] = len(rs)
        if rs:
            a = np.array(rs, dtype=float)
            out[f"{kind}: train s"] = float(np.median(a[:, 0]))
            out[f"{kind}: compare s"] = float(np.median(a[:, 1]))
            out[f"{kind}: probe s"] = float(np.median(a[:, 2]))
            out[f"{kind}: train+compare CPU s"] = float(np.median(a[:, 3]))
    return out


def half_width(ci: list[float] | None) -> float:
    """Half the width of an interval; NaN where there is none."""
    return (ci[1] - ci[0]) / 2 if ci else math.nan


def probe_spread(runs: list[dict], learned: list[bool]) -> dict:
    """The probe's resolution across the zoo: the spread of its mean FD (max - min over latents)
    against the median half-width of its per-latent 95 % interval (issue 21's goal: >= 5x), for
    every latent and for the learned ones (the non-learned include deliberate outliers)."""
    out = {}
    for kind, keep in (("all", [True] * len(runs)), ("learned", learned)):
        fds = [r["probe"]["fd"] for r, k in zip(runs, keep, strict=True) if k]
        means = np.array([f["mean"] for f in fds], dtype=float)
        halves = np.array([half_width(f["ci"]) for f in fds], dtype=float)
        halves = halves[np.isfinite(halves)]
        if len(means) < 2 or not len(halves):
            continue
        spread, half = float(means.max() - means.min()), float(np.median(halves))
        out[kind] = {"latents": len(means), "spread": spread, "median half-width": half,
                     "ratio": spread / half}  # fmt: skip
    return out


def spread_text(s: dict) -> str:
    return (
        "The probe's resolution: "
        + "; ".join(
            f"{kind} {v['latents']} latents: FD spread {v['spread']:.3g} = {v['ratio']:.1f}x the "
            f"median 95% half-width {v['median half-width']:.2g}"
            for kind, v in s.items()
        )
        + " (goal: spread >= 5x the median half-width)."
    )


def record_first_run(keep: str, wall: float, jobs: int, per_job: int) -> None:
    """Record (``first_run.json``) the wall time of a run into a ``--keep`` folder that reused
    nothing: a later run that reuses the folder would otherwise lose it."""
    from datetime import datetime, timezone

    from latentdist._io import save_json

    record = {"wall_s": wall, "jobs": jobs, "cores_per_job": per_job,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    save_json(Path(keep) / "first_run.json", record)


def first_run_text(keep: str) -> str:
    """The sentence quoting ``record_first_run``'s record; empty where there is none."""
    path = Path(keep) / "first_run.json"
    if not path.exists():
        return ""
    r = json.loads(path.read_text())
    return (
        f" The first whole run into this folder took {r['wall_s'] / 60:.1f} min wall with "
        f"{r['jobs']} job(s) of {r['cores_per_job']} core(s) ({r['date'][:10]})."
    )


def ceiling_text(c: dict, short: bool = False) -> str:
    ci = "" if c["ci"] is None else f" [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]"
    if short:
        return f"{c['encoders']} latents, r1 = {c['r1']:.2f}, ceiling **{c['ceiling']:.2f}**{ci}."
    return (
        f"The probe's ceiling: single-seed probe FDs agree across the {c['encoders']} latents "
        f"with Spearman r1 = {c['r1']:.2f} (mean over pairs of its {c['seeds']} seeds); for the "
        f"mean of {c['seeds']} seeds (Spearman-Brown) the ceiling on any signal's |rho| is "
        f"sqrt(r) = **{c['ceiling']:.2f}**{ci} (95% bootstrap over latents)."
    )


def report_section(res: dict, title: str, known: bool) -> str:
    """One data set's tables: the zoo, the ceiling, the correlations (all; learned only), the
    DAE-vs-joint effect."""
    table = res["table"]
    corr = correlation_rows(table, known)
    learned = [t for t, (_, c) in zip(table, res["zoo"], strict=True) if "linear" not in c]
    out = (
        f"## {title}: the zoo\n\n"
        + markdown_table(res["zoo_rows"])
        + f"\n\n## {title}: Spearman rank correlation of each signal with the probe's FD\n\n"
        + ceiling_text(res["ceiling"])
        + (
            " Among the learned latents alone: " + ceiling_text(res["ceiling_learned"], short=True)
            if 3 <= res["ceiling_learned"]["encoders"] < res["ceiling"]["encoders"]
            else ""
        )
        + "\n\n"
        + spread_text(res["spread"])
        + "\n\nPositive rho: a larger signal goes with a worse (larger) probe FD. Interval: 95% "
        "percentile bootstrap over latents (2000 resamples). Critical capacity 'none' counts "
        "as beyond the sweep (largest rank). "
        + (
            "'known order': of the pairs whose order is known by construction ("
            + ", ".join(f"{b} before {w}" for b, w in KNOWN_ORDER)
            + "; those present), how many the signal puts in order, read in the direction of "
            "its rho (the first row: the probe itself). "
            if known
            else ""
        )
        + "VQ latents: the probe is the autoregressive code prior, which is also the baseline, "
        "so the Gaussian-mixture FD is left out for them.\n\n" + markdown_table(corr) + "\n"
    )
    if 5 <= len(learned) < len(table):
        out += (
            f"\n## {title}: the same among the learned encoders only ({len(learned)})\n\n"
            + markdown_table(correlation_rows(learned, known=False))
            + "\n"
        )
    effect = paired_effect(table, DAE_JOINT)
    if effect:
        out += (
            f"\n## {title}: DAE vs joint, paired by seed\n\n"
            f"DAE - joint for each seed pair present ({len(effect[0]['DAE - joint per seed'].split(','))}"
            "), mean and Student-t 95% interval over the pairs (`latentdist.stats.mean_ci`). "
            "Negative: the DAE's value is smaller (for probe FD and D_c: better).\n\n"
            + markdown_table(effect)
            + "\n"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="4 latents on digits, short (CI)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per encoder")
    ap.add_argument(
        "--jobs", type=int, default=None, help="encoders processed at a time (default: 2 where "
        "there are 2 cores or more: the budget's setting)"
    )  # fmt: skip
    ap.add_argument(
        "--cores-per-job", type=int, default=None,
        help="cores pinned to each job when --jobs > 1 (default: the cores shared out)",
    )  # fmt: skip
    ap.add_argument("--keep", default=None, help="keep (and reuse) the runs in this folder")
    ap.add_argument("--only", default=None, help="comma-separated zoo members (checks)")
    ap.add_argument("--no-photos", action="store_true", help="skip the photos32 zoo")
    ap.add_argument("--train-only", action="store_true", help="stop after training (with --keep)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--tag", default="", help="write predictive[_small]_TAG.* (a partial zoo)")
    args = ap.parse_args()

    from latentdist.estimator import MeasureConfig

    small = args.small
    data = "digits" if small else "mnist5k"
    zoo = SMALL_ZOO if small else ZOO
    photo_zoo = [] if small or args.no_photos else PHOTO_ZOO
    if args.only:
        keep = set(args.only.split(","))
        zoo = [m for m in zoo if m[0] in keep]
        photo_zoo = [m for m in photo_zoo if m[0] in keep]
    steps = args.steps or (100 if small else 600)
    cfg = MeasureConfig(  # metric and fit: measure's defaults; a cheaper sweep than its default
        generator="mlp",
        capacities=(4, 16) if small else (4, 16, 64),
        max_capacity=0,  # no extension beyond the configured sweep
        seeds=2 if small else 3,
        n_eval=150 if small else 400,
        steps=60 if small else 150,
    )
    settings = dict(
        measure_config=cfg,
        gen_seeds=3,  # also the probe's seeds: each fits its own flow (the ceiling needs >= 2)
        probe_steps=300 if small else None,
    )
    feature_steps = 100 if small else 300
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jobs = max(1, min(args.jobs or min(2, cores or 1), len(zoo)))
    per_job = (
        args.cores_per_job if jobs > 1 and args.cores_per_job else max(1, (cores or 1) // jobs)
    )
    if jobs > 1 and jobs * per_job > (cores or 1):
        sys.exit(f"--jobs {jobs} x --cores-per-job {per_job} exceeds the {cores} cores")
    t_start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp, Runner(jobs, per_job) as runner:
        root = Path(args.keep or tmp)
        for key, members, name in ((data, zoo, data), ("photos32", photo_zoo, "photos32")):
            if not members:
                continue
            results[key] = study(
                members, name, steps, small, settings, feature_steps,
                str(root / name), runner, args.train_only,
            )  # fmt: skip
        if args.train_only:
            return print(json.dumps({k: r["trained"] for k, r in results.items()}, indent=1))
    wall = time.perf_counter() - t_start

    first = results[data] if data in results else next(iter(results.values()))
    m0 = first["runs"][0]["measure"]
    sequential = sum(r["sequential_s"] for r in results.values())
    times = {k: describe_times(r) for k, r in results.items()}
    runs_all = [r for res in results.values() for r in res["runs"]]
    probe_times = [probe_seconds(r) for r in runs_all]
    trained_all = [t for res in results.values() for t in res["trained"]]
    any_reused = any(r.get("reused") for r in runs_all + trained_all)
    reused = (
        f" Reused from `--keep`: {sum(bool(t.get('reused')) for t in trained_all)} of "
        f"{len(trained_all)} trainings and {sum(bool(r.get('reused')) for r in runs_all)} of "
        f"{len(runs_all)} compares (their recorded times count in the sum; the wall time is "
        "this invocation's)." + first_run_text(args.keep)
        if any_reused
        else ""
    )
    if args.keep and not any_reused:
        record_first_run(args.keep, wall, jobs, per_job)
    body = (
        f"Zoo on `{data}`: {len(zoo)} latents"
        + (f"; second zoo on `photos32`: {len(photo_zoo)} latents" if photo_zoo else "")
        + f". {steps} training steps per encoder (DAE: half stage 1, half stage 2; joint: all "
        f"joint), base settings {SMALL_BASE if small else BASE}. Non-learned latents (PCA-k, "
        "random projection, warped PCA) enter `compare` as TorchScript encoder/decoder pairs "
        "fitted on the training rows. Each run through `compare` with one shared feature network "
        f"per data set ({feature_steps} steps); distance: {m0['metric']}, fit={m0['fit']}, mlp "
        f"capacities {list(cfg.capacities)}, {cfg.steps} steps, {cfg.seeds} seeds, n_eval "
        f"{m0['n_eval']}, no extension beyond the sweep (cheaper than `measure`'s defaults, "
        "to fit the budget); probe: "
        f"{first['runs'][0]['settings']['probe_settings']['continuous']}; "
        f"{settings['gen_seeds']} generation (and probe) seeds.\n\n"
        f"Time: {wall / 60:.1f} min wall with {jobs} job(s) of {per_job} core(s); "
        f"{sequential / 60:.1f} min summed over jobs.{reused} Probe time per run: median "
        f"{np.median(probe_times):.0f} s (min {min(probe_times):.0f}, max {max(probe_times):.0f})."
        " Median per-member times: "
        + "; ".join(
            f"{k}: "
            + ", ".join(
                f"{n} {v:.0f}" if isinstance(v, float) else f"{n} {v}" for n, v in t.items()
            )
            for k, t in times.items()
        )  # fmt: skip
        + ".\n\n"
    )
    for key, res in results.items():
        title = "Digits" if key == "digits" else ("MNIST-5k" if key == "mnist5k" else "photos32")
        body += report_section(res, title, known=True) + "\n"
    if "photos32" in results and data in results:
        a = {r["signal"]: r for r in correlation_rows(results[data]["table"], known=False)}
        b = correlation_rows(results["photos32"]["table"], known=False)
        rows = [
            {
                "signal": r["signal"],
                f"rho on {data}": a.get(r["signal"], {}).get("spearman rho vs probe FD", math.nan),
                "rho on photos32": r["spearman rho vs probe FD"],
                "photos32 CI": r["95% bootstrap CI"],
            }
            for r in b
        ]
        body += (
            "## Does the ranking hold beyond digits?\n\n"
            "Each signal's rho with the probe's FD on both data sets (photos32 sorted by |rho|; "
            "its zoo is smaller, so its intervals are wider).\n\n" + markdown_table(rows) + "\n"
        )
    suffix = ("_small" if small else "") + (f"_{args.tag}" if args.tag else "")
    if not args.no_write:
        from latentdist._io import save_json

        main_res = results[data] if data in results else first
        corr = correlation_rows(main_res["table"], known=False)
        rhos = {r["signal"]: r["spearman rho vs probe FD"] for r in corr}
        scatter(
            main_res["table"],
            [r["signal"] for r in corr],
            rhos,
            RESULTS / f"predictive{suffix}.png",
        )
        body += f"\n![scatter plots](predictive{suffix}.png)\n"
        save_json(
            RESULTS / f"predictive{suffix}.json",
            {
                k: {
                    "signals": r["table"],
                    "zoo": r["zoo_rows"],
                    "ceiling": r["ceiling"],
                    "ceiling_learned": r["ceiling_learned"],
                    "spread": r["spread"],
                    "times": times[k],
                    "wall_s": r["wall_s"],
                }
                for k, r in results.items()
            }
            | {"wall_s": wall},
        )
        path = write_result(f"predictive{suffix}", "Predictive validity of latent signals", body)
        print(path.read_text())
    else:
        print(body)


if __name__ == "__main__":
    main()
