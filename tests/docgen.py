"""Generates the configuration reference of ``docs/operating.md`` from the CLI itself.

``python -m tests.docgen`` prints it; ``tests/test_docs.py`` checks the committed copy.
"""

from __future__ import annotations

import click

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def _default(option: click.Option) -> str:
    value = option.default
    if value is None or value is False or value == () or callable(value):
        return ""
    if type(value).__name__ == "Sentinel" or "UNSET" in repr(value):
        return ""
    return f"`{value}`"


def _table(command: click.Command, name: str) -> str:
    rows = [f"### `{name}`", "", "| flag | environment | default | meaning |", "|---|---|---|---|"]
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        env = param.envvar if isinstance(param.envvar, str) else ""
        meaning = (param.help or "").replace("|", "/")
        rows.append(f"| `{', '.join(param.opts)}` | `{env}` | {_default(param)} | {meaning} |")
    return "\n".join(rows) + "\n"


def config_reference() -> str:
    """The reference for `tally serve`, `tallyd` and `tally up`, as Markdown."""
    from daemon.cli import tallyd
    from orchestrator.cli import _register_commands, cli

    _register_commands()
    parts = [
        _table(cli.commands["serve"], "tally serve"),
        _table(tallyd, "tallyd"),
        _table(cli.commands["up"], "tally up"),
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    print(config_reference(), end="")
