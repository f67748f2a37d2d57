"""The documentation stays in sync with the code: CLI reference and relative links."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_matches_help_texts():
    gen = _gen_cli()
    expected = gen.render()
    actual = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert actual == expected, (
        "docs/cli.md is out of date with the CLI's --help texts: run `python docs/gen_cli.py`"
    )


def test_cli_reference_covers_every_command():
    from latentdist.cli import cli

    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    for name, cmd in cli.commands.items():
        assert f"## `latentdist {name}`" in text
        # every option of the command is documented under its own heading
        section = text.split(f"## `latentdist {name}`", 1)[1]
        for param in cmd.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--"):
                    assert opt in section, f"{opt} of {name} missing from docs/cli.md"


@pytest.mark.parametrize(
    "page", ["index.md", "concepts.md", "cli.md", "tutorial_diffusers.md"], ids=str
)
def test_relative_links_resolve(page):
    text = (DOCS / page).read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, f"{page} links to no other page"
    missing = [t for t in local if not (DOCS / t).exists()]
    assert not missing, f"docs/{page} links to missing files: {missing}"
