"""Cost of one step of the default conv sweep on photographs, four designs side by side.

One fitting step (forward, backward, Adam) of the default conv sweep (capacities 4, 8, 16, 32
× 3 seeds, depth 2) at measure's default fitting batch (``default_fit_batch``), for the latent
and image shapes of a KL-f4 encoder on 28×28 digits, 96×96 RGB and 250×250 grey photographs.
The designs differ in two choices, each switched off by patching one function:

* channels: constant (``width`` at every level, the design before) or halved per upsampling
  (``conv_level_width``, the current one);
* memory format: contiguous or channels-last (the current CPU member loop).

Reported: seconds per step, the speed-up over the previous design (constant, contiguous), and
the fit time that implies for measure's two fits (paired, mmd) of 400 steps.

    python benchmarks/bench_conv.py [--small] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_result  # noqa: E402

from latentdist.estimator import DEFAULT_CAPACITIES, MeasureConfig, default_fit_batch  # noqa: E402
from latentdist.generators import ensemble as ensemble_module  # noqa: E402
from latentdist.generators import modules  # noqa: E402
from latentdist.generators.ensemble import GeneratorEnsemble  # noqa: E402

CASES = {  # name: (latent shape, image shape)
    "digits 28x28": ((4, 7, 7), (1, 28, 28)),
    "RGB 96x96": ((4, 24, 24), (3, 96, 96)),
    "grey 250x250": ((4, 63, 63), (1, 250, 250)),
}
DESIGNS = {  # name: (halve channels, channels-last)
    "constant, contiguous (before)": (False, False),
    "constant, channels-last": (False, True),
    "halved, contiguous": (True, False),
    "halved, channels-last (now)": (True, True),
}


@contextmanager
def design(halve: bool, channels_last: bool):
    width, layout = modules.conv_level_width, ensemble_module.channels_last
    if not halve:
        modules.conv_level_width = lambda w, level: w
    if not channels_last:
        ensemble_module.channels_last = lambda t: t
    try:
        yield
    finally:
        modules.conv_level_width, ensemble_module.channels_last = width, layout


def step_seconds(latent, image, batch, device, repeats) -> float:
    caps = DEFAULT_CAPACITIES["conv"]
    seeds = 3
    members = [(c, s) for c in caps for s in range(seeds)]
    ens = GeneratorEnsemble(
        "conv", latent, image, [c for c, _ in members], [s for _, s in members], depth=2
    ).to(device)
    opt = torch.optim.Adam(ens.parameters(), lr=2e-3)
    z = torch.randn(len(members), batch, *latent, device=device)

    def step():
        loss = ens(z).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="one repeat, no 250x250 case (CI)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    repeats = 1 if args.small else 3
    steps = MeasureConfig().steps
    rows = []
    for name, (latent, image) in CASES.items():
        if args.small and name.startswith("grey 250"):
            continue
        batch = default_fit_batch(image)
        before = None
        for label, switches in DESIGNS.items():
            with design(*switches):
                s = step_seconds(latent, image, batch, device, repeats)
            before = before or s
            rows.append(
                {
                    "case": name,
                    "latent": "x".join(map(str, latent)),
                    "batch": batch,
                    "design": label,
                    "s per step": s,
                    "speed-up": before / s,
                    "two fits of 400 steps, min": 2 * steps * s / 60,
                }
            )
            print(rows[-1], flush=True)
    body = (
        f"One step of the default conv sweep (capacities {list(DEFAULT_CAPACITIES['conv'])} x 3 "
        f"seeds, depth 2, {repeats} timed step(s) after one warm-up) at measure's default "
        f"fitting batch, device {device}, torch threads {torch.get_num_threads()}. Speed-up: "
        f"over the first design of the same case, measured in the same run.\n\n"
        + markdown_table(rows)
        + "\n"
    )
    path = write_result(
        "conv" + ("_small" if args.small else "") + f"_{device.type}",
        "Conv sweep: cost per step on photographs",
        body,
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
