"""``python -m latentdist.dae ...``: ``latentdist train-dae ...`` on its own (handy under torchrun:
``torchrun --nproc_per_node N -m latentdist.dae --data ... --out ...``)."""

import sys

from latentdist.cli import main as cli_main


def main(argv: list[str] | None = None) -> None:
    """Run ``train-dae`` with ``argv``; bad input gets one line and exit 2, as in the CLI."""
    cli_main(["train-dae", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
