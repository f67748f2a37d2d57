"""``python -m latentdist.dae ...``: the ``train-dae`` command on its own (handy under torchrun).

Bad input prints one line and exits 2, as ``latentdist train-dae`` does (SPEC §5).
"""

import sys

import click

from latentdist.dae.cli import train_dae
from latentdist.errors import UsageError


def main(argv: list[str] | None = None) -> None:
    try:
        train_dae.main(args=argv, prog_name="latentdist train-dae", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (click.ClickException, UsageError) as e:
        message = e.format_message() if isinstance(e, click.ClickException) else str(e)
        click.echo(f"latentdist: error: {' '.join(message.split())}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
