"""Every flag the README and docs/ name exists on some command, so the docs cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

import click

from daemon.cli import tallyd
from orchestrator.cli import _register_commands, cli

DOCS = Path(__file__).resolve().parent.parent
# Flags in the docs that belong to other tools (pip, pipx, pytest, curl, ...), not to Tally.
OTHER_TOOLS = {"--help", "--version", "--check", "--change"}  # ruff, duplicates


def _options(command: click.Command) -> set[str]:
    found = {opt for param in command.params for opt in getattr(param, "opts", [])}
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            found |= _options(sub)
    return found


def test_every_documented_flag_exists() -> None:
    """A `--flag` in README.md, CONTRIBUTING.md or docs/*.md is an option of tally or tallyd."""
    _register_commands()
    known = _options(cli) | _options(tallyd) | OTHER_TOOLS
    pages = [DOCS / "README.md", DOCS / "CONTRIBUTING.md", *sorted((DOCS / "docs").glob("*.md"))]
    missing = {
        (page.name, flag)
        for page in pages
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", page.read_text())
        if flag not in known
    }
    assert not missing, sorted(missing)
