"""Batched vs sequential fitting of a capacity sweep, side by side in one process.

MNIST-5k with 32-d PCA latents, mlp generators at 6 capacities × 3 seeds, ``--fit ot``. The
batched path fits all 18 members as one vectorised model (``GeneratorEnsemble`` with one padded
bucket); the sequential path fits them one after another (``bucket_ratio=None``), with the same
steps, batch size and data. Goals (issue 2, 2 CPU cores): batched >= 4x faster, and the full
default ``measure`` sweep (fit + evaluation + proxies) <= 60 s.

    python benchmarks/bench_sweep.py [--small] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from sklearn.decomposition import PCA

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_result  # noqa: E402

from latentdist import load_data, measure  # noqa: E402
from latentdist.estimator.fit import FitSettings, fit_ensemble  # noqa: E402
from latentdist.estimator.measure import DEFAULT_CAPACITIES  # noqa: E402
from latentdist.estimator.split import make_split  # noqa: E402
from latentdist.generators.ensemble import GeneratorEnsemble, default_bucket_ratio  # noqa: E402


def fit_time(z, x, caps, seeds, steps, device, bucket_ratio) -> float:
    members = [(c, s) for c in caps for s in range(seeds)]
    splits = [make_split(len(z), len(x), 1000, s, False) for s in range(seeds)]
    rows_z = [sp.train_z.to(device) for sp in splits]
    rows_x = [sp.train_x.to(device) for sp in splits]
    settings = FitSettings(fit="ot", steps=steps, batch_size=256, lr=2e-3)
    ens = GeneratorEnsemble(
        "mlp",
        (z.shape[1],),
        tuple(x.shape[1:]),
        [c for c, _ in members],
        [s for _, s in members],
        depth=2,
        bucket_ratio=bucket_ratio,
    ).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if bucket_ratio is None:  # the sequential reference: one member at a time, same total steps
        for m, (c, s) in enumerate(members):
            one = GeneratorEnsemble("mlp", (z.shape[1],), tuple(x.shape[1:]), [c], [s], depth=2).to(
                device
            )
            fit_ensemble(one, z, x, [rows_z[s]], [rows_x[s]], [0], settings, seed=m, progress=False)
    else:
        fit_ensemble(ens, z, x, rows_z, rows_x, [s for _, s in members], settings, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="fewer steps (CI)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    data = load_data("mnist5k")
    x = data.take()
    z = torch.as_tensor(
        PCA(32, random_state=0).fit_transform(x.flatten(1).numpy()), dtype=torch.float32
    )
    caps, seeds = DEFAULT_CAPACITIES["mlp"], 3
    steps = 40 if args.small else 200
    xd, zd = x.to(device), z.to(device)
    ratio = default_bucket_ratio(device)
    fit_time(zd, xd, caps[:1], 1, 5, device, ratio)  # warm-up
    batched = fit_time(zd, xd, caps, seeds, steps, device, ratio)
    sequential = fit_time(zd, xd, caps, seeds, steps, device, None)
    rows = [
        {"fitting": "sequential (18 separate fits)", "seconds": sequential, "ratio": 1.0},
        {
            "fitting": "batched (one vectorised model)",
            "seconds": batched,
            "ratio": sequential / batched,
        },
    ]
    t0 = time.perf_counter()
    result = measure(
        z, data, device=args.device, progress=False, **({"steps": steps} if args.small else {})
    )
    full = time.perf_counter() - t0
    t = result.report["timings"]
    body = (
        f"MNIST-5k, 32-d PCA latents, mlp capacities {list(caps)} x {seeds} seeds, fit=ot, "
        f"{steps} steps of batch 256 per member, device {device}.\n\n"
        + markdown_table(rows)
        + f"\n\nBatched speed-up: **{sequential / batched:.2f}x** (goal >= 4x).\n\n"
        f"Full default `measure` sweep{' (small: ' + str(steps) + ' steps)' if args.small else ''}: "
        f"**{full:.1f} s** (goal <= 60 s; fit {t['fit_s']:.1f} s, evaluation {t['eval_s']:.1f} s, "
        f"proxies {t['proxies_s']:.1f} s, geometry {t['geometry_s']:.1f} s).\n"
    )
    path = write_result(
        "sweep" + ("_small" if args.small else "") + f"_{device.type}",
        "Capacity sweep: batched vs sequential",
        body,
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
