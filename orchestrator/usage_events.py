"""Usage events for log pipelines: one ``llm_call`` per recorded call and one
``attempt_completed`` per recorded result, logged after the batch that recorded them
committed (``tally serve --log-format json``).

Each event carries the ledger's own values: what was recorded, once. A redelivered frame is
recorded nowhere and logs nothing. A bucket the ledger holds as unknown is absent, never 0.
The shape is pinned by ``tests/test_usage_events.py``.
"""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from typing import Any

from shared import protocol as p
from shared.usage import Usage

# A published name (docs/operating.md, "Logs for log pipelines"): pipelines select usage
# events by it, so it is not the module's name.
log = logging.getLogger("tally.usage")

_BUCKETS = (
    ("input_tokens", "input"),
    ("output_tokens", "output"),
    ("cache_read_input_tokens", "cache_read"),
    ("cache_creation_input_tokens", "cache_creation"),
    ("reasoning_tokens", "reasoning"),
)


def _known(usage: Usage) -> dict[str, int]:
    return {
        field: value for field, bucket in _BUCKETS if (value := getattr(usage, bucket)) is not None
    }


def _ids(row: Any, execution_id: str) -> dict[str, Any]:
    return {
        "job_id": str(row["job_id"]),
        "execution_id": execution_id,
        "attempt": int(row["attempt"]),
        "executor": row["executor"],
        "labels": json.loads(row["labels"]) if row["labels"] else {},
    }


def call_event(
    execution_id: str,
    row: Any,
    payload: p.GenerationPayload,
    model: str,
    usage: Usage,
    cost: Decimal | None,
) -> dict[str, Any]:
    """The ``llm_call`` event of a newly recorded call."""
    event: dict[str, Any] = {
        "event": "llm_call",
        **_ids(row, execution_id),
        "seq": payload.seq,
        "provider": payload.provider,
        "model": model,
        **_known(usage),
    }
    if cost is not None:
        event["cost_usd"] = float(cost)
    if isinstance(payload.cost_source, str):
        event["cost_source"] = payload.cost_source
    if isinstance(payload.duration_ms, float | int):
        event["duration_ms"] = payload.duration_ms
    if isinstance(payload.finish_reason, str):
        event["finish_reason"] = payload.finish_reason
    return event


def attempt_event(
    execution_id: str,
    row: Any,
    payload: p.ResultPayload,
    status: str,
    totals: Usage,
    cost: float | Decimal | None,
) -> dict[str, Any]:
    """The ``attempt_completed`` event of a newly recorded result: the attempt's totals as
    the ledger holds them."""
    event: dict[str, Any] = {
        "event": "attempt_completed",
        **_ids(row, execution_id),
        "status": status,
        "model": row["model"] or row["executor"],
        **_known(totals),
    }
    if cost is not None:
        event["cost_usd"] = float(cost)
    for key, value in (
        ("cost_source", payload.cost_source),
        ("duration_ms", payload.duration_ms),
        ("stop_reason", payload.stop_reason),
        ("num_turns", payload.num_turns),
        ("error_class", payload.error_class),
    ):
        if value is not p.UNSET:
            event[key] = value
    return event


def emit(events: list[dict[str, Any]]) -> None:
    """Log a committed batch's events (their fields are the record's extra fields)."""
    for event in events:
        log.info(event["event"], extra=event)
