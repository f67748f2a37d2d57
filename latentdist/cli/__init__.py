"""The ``latentdist`` command line: a thin shell over the Python API.

Errors a user can fix (``UsageError``, click's parameter errors) print one line and exit 2
(SPEC §5). Anything else is a bug: one line too, with the traceback behind LATENTDIST_DEBUG=1.
"""

from __future__ import annotations

import os
import sys

import click

from latentdist.cli.options import CONTEXT
from latentdist.errors import UsageError


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="latentdist")
def cli() -> None:
    """Measure how well a latent space serves generation, and train Decoupled Autoencoders.

    \b
    latentdist measure    the GAN-induced latent-data distance over a capacity sweep
    latentdist train-dae  train a Decoupled Autoencoder (or the joint baseline)
    latentdist compare    put trained runs head to head
    latentdist distance   generated samples vs a reference set, with floor and intervals
    latentdist demo       DAE vs joint on MNIST-5k, end to end
    """


def _register() -> None:
    from latentdist.cli import compare, demo, distance, measure, train_dae

    cli.add_command(measure.measure)
    cli.add_command(train_dae.train_dae)
    cli.add_command(compare.compare)
    cli.add_command(distance.distance)
    cli.add_command(demo.demo)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, mapping bad input to one line on stderr and exit status 2."""
    try:
        cli.main(args=argv, prog_name="latentdist", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("latentdist: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (click.ClickException, UsageError) as e:
        if getattr(e, "shared", False) and os.environ.get("RANK", "0") != "0":
            sys.exit(2 if e.usage else 1)  # under torchrun, rank 0 prints a failure every rank saw
        if not getattr(e, "usage", True):  # another rank's internal error
            click.echo(f"latentdist: internal error: {e}", err=True)
            sys.exit(1)
        message = e.format_message() if isinstance(e, click.ClickException) else str(e)
        click.echo(f"latentdist: error: {' '.join(message.split())}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("latentdist: interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("LATENTDIST_DEBUG"):
            raise
        click.echo(
            f"latentdist: internal error: {type(e).__name__}: {' '.join(str(e).split())} "
            "(set LATENTDIST_DEBUG=1 for the traceback)",
            err=True,
        )
        sys.exit(1)
