"""Run every benchmark; each writes a Markdown table to benchmarks/results/ and prints it.

python benchmarks/run_all.py [--small]     (make bench / make bench-small)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    small = "--small" in sys.argv[1:]
    jobs = [
        ["bench_sweep.py", *(["--small"] if small else [])],
        ["bench_conv.py", *(["--small"] if small else [])],
        ["bench_trainer.py", *(["--steps", "60", "--repeats", "2", "--no-write"] if small else [])],
        ["bench_quality.py", *(["--small"] if small else [])],
        ["bench_validity.py", *(["--small"] if small else [])],
        ["bench_predictive.py", *(["--small"] if small else [])],
        ["bench_scale.py", *(["--small"] if small else [])],
        ["bench_faults.py", *(["--small"] if small else [])],
    ]
    failed = []
    for script, *args in jobs:
        print(f"== {script} {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *args]).returncode:
            failed.append(script)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
