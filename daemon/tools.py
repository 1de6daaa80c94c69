"""Tools the daemon answers for agent loops: built-ins plus the ``tally.tools`` entry points."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

Tool = Callable[[dict[str, Any]], str]


def current_time(_args: dict[str, Any]) -> str:
    """The harmless built-in tool: the current UTC time."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


BUILTIN: dict[str, tuple[Tool, dict[str, Any]]] = {
    "current_time": (
        current_time,
        {"description": "Current UTC time (ISO 8601).", "type": "object", "properties": {}},
    ),
}


def registered() -> dict[str, tuple[Tool, dict[str, Any]]]:
    """Built-in tools plus those other packages register in the ``tally.tools`` group.

    An entry point must load to ``(callable, json_schema)``.
    """
    tools = dict(BUILTIN)
    for ep in entry_points(group="tally.tools"):
        tools[ep.name] = ep.load()
    return tools
