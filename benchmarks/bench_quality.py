"""Quality: DAE vs joint latents, head to head (``latentdist compare``), with intervals.

For each data set, a DAE run and a joint run with the demo's settings and equal budgets, then
``compare`` with the demo's measurement. The table states reconstruction, the distance curve
summary and generation quality, each with its 95 % interval over seeds.

    python benchmarks/bench_quality.py [--small] [--steps N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from latentdist.cli.demo import DEMO_MEASURE, train_demo_run  # noqa: E402
from latentdist.evaluation.compare import compare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="digits only, short training (CI)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run")
    args = ap.parse_args()
    datasets = ["digits"] if args.small else ["digits", "mnist5k"]
    steps = args.steps or (200 if args.small else 600)
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in datasets:
            out = Path(tmp) / name
            for mode in ("dae", "joint"):
                train_demo_run(mode, out, name, steps, True, "cpu", False)
            cfg = DEMO_MEASURE
            if args.small:
                cfg = type(cfg)(
                    **{**cfg.__dict__, "steps": 60, "capacities": (8, 32), "max_capacity": 0}
                )
            result = compare(
                [out / "dae", out / "joint"],
                name,
                measure_config=cfg,
                device="cpu",
                progress=False,
                gen_seeds=2 if args.small else 3,
                probe_steps=300 if args.small else None,
            )
            sections.append(
                f"## {name} ({steps} training steps per run)\n\n```\n{result.table()}\n```\n"
            )
    path = write_result(
        "quality" + ("_small" if args.small else ""), "Quality: DAE vs joint", "\n".join(sections)
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
