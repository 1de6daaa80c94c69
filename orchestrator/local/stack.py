"""Where a running ``tally up`` tells other commands how to reach it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.local.embedded import default_data_dir


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def state_file(data_dir: Path | None) -> Path:
    """``<data dir>/up.json``."""
    return (data_dir or default_data_dir()) / "up.json"


def read_state(data_dir: Path | None) -> dict[str, Any] | None:
    """The running local stack's URL and tokens, if any."""
    path = state_file(data_dir)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data
