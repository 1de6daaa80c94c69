"""Tools the daemon answers for agent loops: built-ins plus the ``tally.tools`` entry points.

Every executor with an agent loop offers the tools a spec names (``"tools": [names]``) in its
provider's format, built from the one declaration here: a description and a JSON schema.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable
from dataclasses import dataclass
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


@functools.cache
def registered() -> dict[str, tuple[Tool, dict[str, Any]]]:
    """Built-in tools plus those other packages register in the ``tally.tools`` group (loaded
    once per process).

    An entry point must load to ``(callable, json_schema)``; the schema's ``description`` is
    the tool's description, the rest its parameters.
    """
    tools = dict(BUILTIN)
    for ep in entry_points(group="tally.tools"):
        tools[ep.name] = ep.load()
    return tools


@dataclass(frozen=True, slots=True)
class Declaration:
    """A tool as a model is told of it."""

    name: str
    description: str
    parameters: dict[str, Any]


def function_tools(names: list[str]) -> list[dict[str, Any]]:
    """The named tools as function tools in the format OpenAI Chat Completions and Ollama
    share: ``{"type": "function", "function": {name, description, parameters}}``."""
    return [
        {
            "type": "function",
            "function": {"name": d.name, "description": d.description, "parameters": d.parameters},
        }
        for d in declarations(names)
    ]


def declarations(names: list[str]) -> list[Declaration]:
    """The declarations of the named tools (each checked by the spec's validation first)."""
    tools = registered()
    out = []
    for name in names:
        schema = tools[name][1]
        out.append(
            Declaration(
                name,
                str(schema.get("description", "")),
                {k: v for k, v in schema.items() if k != "description"},
            )
        )
    return out


def unknown(names: list[str]) -> list[str]:
    """The names no registered tool answers."""
    tools = registered()
    return [n for n in names if n not in tools]
