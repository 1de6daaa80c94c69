"""Executors: one module per provider, all speaking to the runner through ``JobContext``.

The building blocks live in :mod:`daemon.executors.base`; this module is the registry.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from daemon.executors.base import (
    MILLION,
    Executor,
    JobContext,
    LLMCall,
    Outcome,
    Rates,
    StopJob,
    StreamCutError,
    estimate_tokens,
    sleep_ms,
)
from shared.errors import ConfigError
from shared.specs import SpecError  # an offer whose spec fails is rejected ``unsupported``

__all__ = [
    "MILLION",
    "Executor",
    "JobContext",
    "LLMCall",
    "Outcome",
    "Rates",
    "SpecError",
    "StopJob",
    "StreamCutError",
    "estimate_tokens",
    "load_executor",
    "parse_executor_flag",
    "sleep_ms",
]

BUILTIN = {
    "simulated": "daemon.executors.simulated",
    "anthropic": "daemon.executors.anthropic",
    "openai": "daemon.executors.openai",
    "ollama": "daemon.executors.ollama",
    "gemini": "daemon.executors.gemini",
    "claude-agent": "daemon.executors.claude_agent",
}

# The pip extra that installs an executor's SDK, where it is not named after the executor.
EXTRAS = {"claude-agent": "claude"}


def parse_executor_flag(value: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME=JSON-object`` -> (name, config)."""
    name, sep, raw = value.partition("=")
    if not name:
        raise ConfigError(f"--executor {value!r}: expected NAME or NAME=JSON")
    config: dict[str, Any] = {}
    if sep:
        try:
            config = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--executor {name}: config is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise ConfigError(f"--executor {name}: config must be a JSON object")
    return name, config


def load_executor(name: str, config: dict[str, Any]) -> Executor:
    """Instantiate a built-in executor by name."""
    module_name = BUILTIN.get(name)
    if module_name is None:
        raise ConfigError(f"--executor {name}: unknown executor (known: {', '.join(BUILTIN)})")
    try:
        # Executors import their SDK when the module loads or when built: both are covered.
        module = importlib.import_module(module_name)
        executor: Executor = module.create(config)
    except ImportError as exc:
        raise ConfigError(
            f"--executor {name}: its SDK is not installed ({exc}); "
            f"pip install 'tally-ledger[{EXTRAS.get(name, name)}]'"
        ) from None
    return executor
