"""The generation probe's own quality: candidate recipes, their time, precision and repeatability.

A few encoders are trained with ``train-dae`` (as ``bench_predictive``: DAE and joint, a larger
KL weight, 2 and 8 latent channels) and share one feature network. For every candidate recipe of
``latentdist.evaluation.probe`` and every encoder the probe runs exactly as ``compare`` runs it
(``flow_sampler`` and ``score_prior``: per seed, fit the flow with that seed, sample, decode,
score against the held-out rows), for ``--seeds`` probe seeds (each a fresh training). Reported
per recipe:

- time per compare run (``compare``'s 3 generation seeds; the probe runs on one torch thread,
  so this is its time on any machine of this core speed);
- probe FD per encoder as ``compare`` reports it: the mean of seeds 0-2 ± the half-width of its
  95 % t-interval;
- between-seed sd per encoder (all ``--seeds`` seeds) and its pooled value;
- spread / median interval: (largest - smallest encoder FD) / the median half-width;
- the reliability ceiling: the correlation between the reported (3-seed) probe FD and the probe
  FD of infinitely many seeds, sqrt(1 - (pooled sd^2 / 3) / var(encoder FDs)); no signal can
  correlate with the reported probe FD better than this; and the mean Spearman rho between two
  independent repeats of the reported FD (simulated from the pooled sd);
- for ``PROBE_RECIPE`` on the second and third encoders: the sd of FD over sampling seeds of
  one fitted flow, at 500 and 2000 samples (how much of the spread is sampling alone).

    python benchmarks/bench_probe.py [--small] [--keep DIR] [--recipes a,b] [--seeds S]

Default: 5 encoders on MNIST-5k (600 training steps), every candidate, 3 seeds. ``--small``: 3
tiny encoders on digits, short recipes (CI-sized, < 60 s). Writes
benchmarks/results/probe[_small].md and, for ``PROBE_RECIPE``, probe[_small]_<encoder>.png
(held-out rows, reconstructions, the candidate it replaced and ``PROBE_RECIPE``'s samples).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_predictive import shared_features, train_one  # noqa: E402
from common import RESULTS, markdown_table, write_result  # noqa: E402

from latentdist._io import save_json  # noqa: E402
from latentdist.evaluation.probe import PROBE_RECIPE, ProbeRecipe  # noqa: E402

ZOO = [  # name, changes to bench_predictive.BASE (and mode)
    ("dae", dict(mode="dae")),
    ("joint", dict(mode="joint")),
    ("dae-kl1e-2", dict(mode="dae", kl_weight=1e-2)),
    ("joint-c2", dict(mode="joint", latent_channels=2)),
    ("dae-c8", dict(mode="dae", latent_channels=8)),
]
SMALL_ZOO = ZOO[:3]  # trained with bench_predictive's SMALL_BASE (tiny encoders)
OLD = ProbeRecipe(steps=1000, sample_steps=32, integrator="euler")  # before this study
CANDIDATES = {
    "mlp-1k (old)": OLD,
    "mlp-4k-heun": ProbeRecipe(steps=4000, sample_steps=16, integrator="heun"),
    "mlp-4k-ema-heun": ProbeRecipe(steps=4000, ema=0.999, sample_steps=16, integrator="heun"),
}
EXTRA = {  # measured on the first encoder only and dropped (see the report); --recipes NAME
    "mlp-2k-ema-heun": ProbeRecipe(steps=2000, ema=0.999, sample_steps=16, integrator="heun"),
    "mlp512-4k-ema-heun": ProbeRecipe(
        steps=4000, width=512, ema=0.999, sample_steps=16, integrator="heun"
    ),
    "conv32-2k-ema-heun": ProbeRecipe(
        steps=2000, conv_width=32, conv_blocks=2, ema=0.999, sample_steps=16, integrator="heun"
    ),
}
SMALL_STEPS = 150  # the small version's probe steps (both recipes)
REPORTED_SEEDS = 3  # compare's default --gen-seeds


def _setup(folders, data, features, cache_dir):
    """What both measurements share: the results cache (``cache_dir``/probe_cache.json), the
    runs, compare's settings, its inputs and the feature extractor."""
    from latentdist.evaluation.compare import CompareConfig, RunSpec, feature_space, load_inputs

    cache_path = Path(cache_dir) / "probe_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    specs = [RunSpec.from_dir(f) for f in folders]
    cfg = CompareConfig(features=features, device="cpu").validate()
    inputs = load_inputs(specs, data, cfg)
    extractor, _ = feature_space(inputs, cfg)
    return cache_path, cache, specs, cfg, inputs, extractor


def probe_runs(folders, data, features, recipes, seeds, cache_dir, image_keys=()):
    """Per (recipe, encoder): per-seed probe scores and seconds, exactly as compare's probe
    computes them; cached in ``cache_dir``/probe_cache.json by recipe, encoder and seed."""
    import torch

    from latentdist.evaluation.compare import encode_run, flow_sampler, score_prior

    cache_path, cache, specs, cfg, inputs, extractor = _setup(folders, data, features, cache_dir)
    out: dict = {}
    samples: dict = {}
    for spec in specs:
        coded = encode_run(spec, inputs, cfg, progress=False)
        samples[spec.name] = {"held-out": coded.x_val[:16], "recon": coded.x_hat[:16]}
        z_train = coded.z[coded.train_rows]
        for rname, recipe in recipes.items():
            rows = out.setdefault(rname, {}).setdefault(spec.name, [])
            for seed in range(seeds):
                key = json.dumps([asdict(recipe), spec.name, seed, features])
                img = Path(cache_dir) / f"probe_samples_{zlib.crc32(key.encode()):08x}.pt"
                need_images = seed == 0 and rname in image_keys
                if key in cache and (not need_images or img.is_file()):
                    rows.append(cache[key])
                    if need_images:
                        samples[spec.name][rname] = torch.load(img)
                    continue
                one = replace(
                    cfg, gen_seeds=1, measure_config=replace(cfg.measure_config, seed=seed)
                )
                t0, c0 = time.perf_counter(), time.process_time()
                scores, fakes = score_prior(
                    flow_sampler(z_train, recipe), coded, extractor, one, inputs.device
                )
                row = {"fd": scores["fd"]["mean"], "kid": scores["kid"]["mean"]}
                row["s"], row["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
                cache[key] = row
                rows.append(row)
                if need_images:
                    samples[spec.name][rname] = fakes[:48].clone()
                    torch.save(samples[spec.name][rname], img)
                save_json(cache_path, cache)
                print(f"{rname} {spec.name} seed {seed}: FD {row['fd']:.3f} ({row['s']:.1f} s)")
        del coded
    return out, samples, inputs


def sampling_noise(folders, data, features, recipe, cache_dir, draws=5, sizes=(500, 2000)):
    """How much of the between-seed spread is sampling alone: per encoder, one flow fitted with
    seed 0, then ``draws`` sampling seeds of each size in ``sizes`` (decoded, scored against the
    held-out rows as ``score_prior`` does); the sd of FD over the draws. Cached like the rest."""
    from latentdist.evaluation.compare import decode, encode_run
    from latentdist.evaluation.generation import generation_metrics
    from latentdist.evaluation.probe import FlowPrior

    cache_path, cache, specs, cfg, inputs, extractor = _setup(folders, data, features, cache_dir)
    rows = []
    for spec in specs:
        key = json.dumps(["sampling", asdict(recipe), spec.name, draws, list(sizes), features])
        if key not in cache:
            coded = encode_run(spec, inputs, cfg, progress=False)
            prior = FlowPrior(recipe).fit(coded.z[coded.train_rows], seed=0)
            cache[key] = {}
            for n in sizes:
                fds = []
                for d in range(draws):
                    z = prior.sample(n, seed=100 + d)
                    fake = decode(coded.decoder, z, inputs.device, cfg.encode_batch_size)
                    fds.append(
                        float(generation_metrics(coded.x_val, fake, extractor, k=cfg.k)["fd"])
                    )
                cache[key][str(n)] = fds
            save_json(cache_path, cache)
        for n, fds in cache[key].items():
            rows.append(
                {
                    "encoder": spec.name,
                    "samples": int(n),
                    "FD over sampling draws": f"{np.mean(fds):.2f}",
                    "sampling sd": float(np.std(fds, ddof=1)),
                }
            )
    return rows


def summarise(per_encoder: dict) -> tuple[dict, list[dict]]:
    """The recipe's summary numbers and its per-encoder rows."""
    from latentdist.stats import mean_ci

    rows, means, halves, variances, times, cpu = [], [], [], [], [], []
    for name, seeds in per_encoder.items():
        fd = np.array([s["fd"] for s in seeds])
        rep = mean_ci(fd[:REPORTED_SEEDS])
        half = (rep["ci"][1] - rep["ci"][0]) / 2
        sd = float(fd.std(ddof=1))
        means.append(rep["mean"])
        halves.append(half)
        variances.append(sd**2)
        times.append(sum(s["s"] for s in seeds) / len(seeds) * REPORTED_SEEDS)
        cpu.append(sum(s["cpu_s"] for s in seeds) / len(seeds) * REPORTED_SEEDS)
        rows.append({"encoder": name, "FD": rep["mean"], "± (95%)": half, "seed sd": sd})
    means, halves = np.array(means), np.array(halves)
    spread = float(means.max() - means.min())
    pooled = float(np.sqrt(np.mean(variances)))
    between = float(means.var(ddof=1)) if len(means) > 1 else math.nan
    noise = pooled**2 / REPORTED_SEEDS
    ceiling = math.sqrt(max(0.0, 1 - noise / between)) if between > 0 else math.nan
    rest = np.delete(means, means.argmax()), np.delete(halves, means.argmax())
    rng = np.random.default_rng(0)
    from scipy.stats import spearmanr

    noisy = means + rng.normal(0, math.sqrt(noise), (2, 2000, len(means)))
    rank_ceiling = float(np.mean([spearmanr(a, b).statistic for a, b in zip(*noisy, strict=True)]))
    summary = {
        "time/run s (1 core)": float(np.median(times)),
        "cpu s/run": float(np.median(cpu)),
        "spread": spread,
        "median ±": float(np.median(halves)),
        "spread / median ±": spread / float(np.median(halves)),
        "same, w/o worst": float(np.ptp(rest[0])) / float(np.median(rest[1]))
        if len(means) > 2
        else math.nan,
        "pooled seed sd": pooled,
        "ceiling r": ceiling,
        "repeat rho": rank_ceiling,
    }
    return summary, rows


def save_grids(samples: dict, inputs, suffix: str, old: str, chosen: str) -> list[str]:
    from latentdist.report.compare import plot_image_grid

    paths = []
    for enc, imgs in samples.items():
        rows = [("held-out rows", imgs["held-out"]), ("reconstructions", imgs["recon"])]
        if old in imgs and old != chosen:
            rows.append((f"{old} (seed 0)", imgs[old][:16]))
        for i in range(3):
            label = f"PROBE_RECIPE = {chosen} (seed 0)" if i == 0 else ""
            rows.append((label, imgs[chosen][16 * i : 16 * (i + 1)]))
        path = RESULTS / f"probe{suffix}_{enc}.png"
        plot_image_grid(rows, inputs.x_min, inputs.x_max, path)
        paths.append(path.name)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="3 tiny encoders on digits (CI-sized)")
    ap.add_argument("--keep", default=None, help="keep (and reuse) encoders and probe results")
    ap.add_argument("--recipes", default=None, help="comma-separated candidate names (all)")
    ap.add_argument("--seeds", type=int, default=3, help="probe seeds per encoder (>= 3)")
    ap.add_argument("--no-extra", action="store_true", help="skip the dropped candidates")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    if args.seeds < REPORTED_SEEDS:
        sys.exit(f"--seeds {args.seeds}: expected >= {REPORTED_SEEDS}")

    import torch

    torch.set_num_threads(1)
    small = args.small
    data = "digits" if small else "mnist5k"
    zoo = SMALL_ZOO if small else ZOO
    if small:
        cands = {"old": replace(OLD, steps=SMALL_STEPS)}
        cands["PROBE_RECIPE"] = replace(PROBE_RECIPE, steps=SMALL_STEPS)
    else:
        cands = dict(CANDIDATES)
        if PROBE_RECIPE not in cands.values():
            cands["PROBE_RECIPE"] = PROBE_RECIPE
    if args.recipes:
        cands = {k: v for k, v in {**cands, **EXTRA}.items() if k in args.recipes.split(",")}
    old = next(iter(cands))
    chosen = next(
        (k for k, v in cands.items() if v == (cands.get("PROBE_RECIPE") or PROBE_RECIPE)), old
    )
    extra = {} if small or args.recipes or args.no_extra else EXTRA
    steps = 100 if small else 600
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or tmp
        Path(root).mkdir(parents=True, exist_ok=True)
        trained = [train_one(n, c, data, steps, root, small) for n, c in zoo]
        features = shared_features(data, trained[0]["folder"], 100 if small else 300, root)
        folders = [t["folder"] for t in trained]
        results, samples, inputs = probe_runs(
            folders, data, features, cands, args.seeds, root, image_keys=(old, chosen)
        )
        extra_results = (
            probe_runs(folders[:1], data, features, extra, REPORTED_SEEDS, root)[0] if extra else {}
        )
        noise_rows = (
            []
            if small or args.recipes or args.no_extra
            else sampling_noise(folders[1:3], data, features, cands[chosen], root)
        )
        wall = time.perf_counter() - t_start
        table, detail = [], []
        for key, per_encoder in results.items():
            summary, rows = summarise(per_encoder)
            table.append({"recipe": key, **summary})
            fds = {
                r["encoder"]: f"{r['FD']:.2f} ± {r['± (95%)']:.2f} (sd {r['seed sd']:.2f})"
                for r in rows
            }
            detail.append({"recipe": key, **fds})
        suffix = "_small" if small else ""
        described = "\n".join(f"- **{k}**: {r.describe()}" for k, r in {**cands, **extra}.items())
        extra_rows = []
        for key, per_encoder in extra_results.items():
            summary, rows = summarise(per_encoder)
            r = rows[0]
            extra_rows.append(
                {
                    "recipe": key,
                    "encoder": r["encoder"],
                    "FD": f"{r['FD']:.2f} ± {r['± (95%)']:.2f}",
                    "seed sd": r["seed sd"],
                    "time/run s (1 core)": summary["time/run s (1 core)"],
                }
            )
        body = (
            f"Data `{data}`; {len(zoo)} encoders ({', '.join(n for n, _ in zoo)}), {steps} "
            "training steps each, one shared feature network; the probe as `compare` runs it "
            f"(held-out rows as reference, {args.seeds} probe seeds per encoder, each a fresh "
            f"training and sampling). `PROBE_RECIPE` is **{chosen}**. "
            f"Wall time {wall / 60:.1f} min (cached results reused when --keep).\n\n"
            "time/run: the probe's seconds for one compare run (3 seeds; one torch thread; "
            "median over encoders), wall clock on one pinned core that other work may share; "
            "cpu s/run: the process's CPU seconds for the same (what it takes on a free core). "
            "spread: largest - smallest encoder FD. median ±: the median half-width of the "
            "reported 95 % interval (3 seeds). same, w/o worst: spread / median ± without the "
            "encoder of the largest FD (an outlier can carry the spread alone). pooled seed sd: the sd of one seed's FD for a "
            "fixed encoder (probe training and sampling seed), pooled over encoders. ceiling r: "
            "the correlation of the reported FD with its infinitely-many-seeds value, "
            "sqrt(1 - (sd^2/3) / var(encoder FDs)). repeat rho: the mean Spearman rho between two "
            "independent repeats of the reported FD (each encoder's mean plus normal noise of "
            "the pooled sd / sqrt 3; 2000 draws), the rank agreement the probe has with itself "
            "on this zoo.\n\n"
            + markdown_table(table)
            + "\n\n## Probe FD per encoder: mean of seeds 0-2 ± 95 % half-width (sd over all "
            "seeds)\n\n"
            + markdown_table(detail)
            + (
                "\n\n## Measured on the first encoder only, and dropped\n\n"
                + markdown_table(extra_rows)
                if extra_rows
                else ""
            )
            + (
                "\n\n## Sampling alone\n\n"
                "`PROBE_RECIPE` fitted once (seed 0) per encoder, then 5 sampling seeds of 500 "
                "(compare's sample count here, the held-out count) and of 2000 samples, each "
                "decoded and scored against the held-out rows. Compare the sampling sd with the "
                "between-seed sd above (fresh training and sampling per seed): where they are "
                "alike, the probe's imprecision is FD's sampling noise, not its training.\n\n"
                + markdown_table(noise_rows)
                if noise_rows
                else ""
            )
            + "\n\n## The recipes\n\n"
            + described
            + "\n"
        )
        if not args.no_write:
            figures = save_grids(samples, inputs, suffix, old, chosen)
            body += "\n## Decoded samples\n\n" + "\n".join(f"![{f}]({f})" for f in figures) + "\n"
            path = write_result(f"probe{suffix}", "The generation probe's recipe", body)
            print(path.read_text())
        else:
            print(body)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
