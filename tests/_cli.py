"""Running the CLI in-process from tests."""

from latentdist.cli import main


def run_cli(args, capsys):
    """Run the CLI in-process: (exit code, stdout, stderr); 0 when it returns normally."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
