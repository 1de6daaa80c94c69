"""The daemon's settings: one frozen object built by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.pricing import EMPTY, PriceBook
from shared.output import DEFAULT_MAX_OUTPUT_BYTES


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """Everything ``tallyd`` needs."""

    orchestrator: str
    token: str | None
    state_dir: Path
    executors: dict[str, dict[str, Any]] = field(default_factory=lambda: {"simulated": {}})
    max_concurrent_jobs: int = 4
    daemon_id: str | None = None
    ca_file: Path | None = None
    drain_timeout: float = 30.0
    ack_timeout: float = 10.0
    max_outbox_frames: int = 100_000
    labels: dict[str, str] = field(default_factory=dict)
    prices: PriceBook = EMPTY
    # A job's answer is cut to this many bytes of UTF-8 in its job:result (flagged as cut).
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
