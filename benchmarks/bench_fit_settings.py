"""What cheaper fitting settings cost in the bound: D_c per capacity against the default's.

The default sweep costs about 150 s on 2 CPU cores (sweep_cpu.md), over the 60 s goal, and its
cost is the ``mmd`` fit's arithmetic (per member and step, B x B kernel matrices of 784-d rows).
The two levers are the fitting batch B (cost ~ B^2 per step) and the steps. Every fitted
generator is an upper bound on D_c, so a cheaper setting is as good only if its bounds are not
higher. Each setting measures the same latent (MNIST-5k, 32-d PCA) on the same held-out rows,
seeds and judges; per capacity the table gives the mean over seeds and the paired (per seed)
difference from the default with its 95 % t interval, and the fit's seconds in this run.

    python benchmarks/bench_fit_settings.py [--small]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_result  # noqa: E402

from latentdist import load_data, measure  # noqa: E402
from latentdist.estimator import MeasureConfig  # noqa: E402
from latentdist.estimator.fit import minibatch_mmd_loss  # noqa: E402
from latentdist.stats import mean_ci  # noqa: E402

DEFAULT = (256, MeasureConfig().steps)
CHEAPER = [(128, 400), (256, 200), (128, 600), (128, 800), (64, 1600)]


def loss_cost(batches=(256, 128, 64), members: int = 24, repeats: int = 10) -> list[dict]:
    """Seconds per step of the mmd fit's loss and gradient (its dominant cost) per batch size,
    side by side: ``members`` members of 784-d outputs, 3 seed slots, the default kernel."""
    gammas = [1 / (2 * (a * 8.0) ** 2) for a in (0.25, 0.5, 1.0, 2.0, 4.0)]
    rows, slot = [], torch.arange(members) % 3
    for b in batches:
        fake = torch.randn(members, b, 784, requires_grad=True)
        real = torch.randn(3, b, 784)
        minibatch_mmd_loss(fake, real, slot, gammas).sum().backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            minibatch_mmd_loss(fake, real, slot, gammas).sum().backward()
        rows.append({"batch": b, "loss step ms": 1000 * (time.perf_counter() - t0) / repeats})
    for r in rows:
        r["relative to 256"] = r["loss step ms"] / rows[0]["loss step ms"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="digits, 2 capacities, 40 steps")
    args = ap.parse_args()
    data = load_data("digits" if args.small else "mnist5k")
    x = data.take()
    k = 16 if args.small else 32
    z = PCA(k, random_state=0).fit_transform(x.flatten(1).numpy())
    z = torch.as_tensor(z, dtype=torch.float32)
    caps = (1, 8) if args.small else (1, 4, 16, 64)
    scale = 10 if args.small else 1  # small: a tenth of the steps
    settings = [DEFAULT, *CHEAPER]
    curves, fit_s = {}, {}
    measure(z, data, progress=False, device="cpu", steps=1, capacities=(1,), seeds=2, proxies=False)
    for batch, steps in settings:
        steps = max(1, steps // scale)
        t0 = time.perf_counter()
        res = measure(
            z, data, progress=False, device="cpu", batch_size=batch, steps=steps,
            capacities=caps, max_capacity=0, proxies=False,
        )  # fmt: skip
        fit_s[batch, steps] = res.report["timings"]["fit_s"]
        curves[batch, steps] = res.report["curve"]
        print(f"batch {batch}, {steps} steps: {time.perf_counter() - t0:.1f} s", flush=True)
    ref = curves[DEFAULT[0], max(1, DEFAULT[1] // scale)]
    rows = []
    for (batch, steps), curve in curves.items():
        row = {"batch": batch, "steps": steps, "fit s": fit_s[batch, steps]}
        for point, base in zip(curve, ref, strict=True):
            diff = np.subtract(point["distance"]["per_seed"], base["distance"]["per_seed"])
            mean = point["distance"]["mean"]
            if curve is ref:
                row[f"c={point['capacity']}"] = f"{mean:.4g}"
                continue
            ci = mean_ci(diff)
            m, (lo, hi) = ci["mean"], ci["ci"]
            mark = " higher" if lo > 0 else (" lower" if hi < 0 else "")
            row[f"c={point['capacity']}"] = f"{mean:.4g} ({m:+.2g} [{lo:+.2g}, {hi:+.2g}]{mark})"
        rows.append(row)
    seeds = MeasureConfig().seeds
    cost = loss_cost()
    body = (
        f"{'Digits' if args.small else 'MNIST-5k'}, {k}-d PCA latents, mlp capacities "
        f"{list(caps)}, {seeds} seeds, the default fits and selection, proxies off, device cpu. "
        f"First row: the default batch and steps; the others: D_c mean over seeds, then the "
        f"paired difference from the default [95 % t interval over seeds]; 'higher' where the "
        f"interval lies above 0 (a looser bound). fit s: this run's fitting seconds, measured "
        f"one after another in one process (their ratios are the comparison).\n\n"
        + markdown_table(rows)
        + "\n\nThe mmd fit's loss and gradient per step (24 members, the default sweep's count, "
        "side by side in this process): what a step costs, whatever else the machine runs.\n\n"
        + markdown_table(cost)
        + "\n"
    )
    path = write_result(
        "fit_settings" + ("_small" if args.small else "") + "_cpu",
        "Cheaper fitting settings: what they cost in the bound",
        body,
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
