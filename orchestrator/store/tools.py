"""The tool calls of a batch (``job:tool``): recorded beside the calls, idempotent, fenced.

A tool call is kept only when its execution is assigned to the daemon that sent it, once per
(execution, seq) however often it is redelivered, and counted in the metrics once: when it is
newly inserted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from orchestrator.accounting import BatchOutcome
from orchestrator.store import ledger_sql as sql
from orchestrator.store.ledger_rows import document, fenced
from shared import protocol as p


async def record_tools(
    conn: asyncpg.Connection,
    batch: Sequence[Any],
    execs: dict[str, Any],
    outcome: BatchOutcome,
    at: datetime,
) -> None:
    """Insert the batch's new tool calls; set their verdicts and what the metrics add."""
    index: dict[tuple[str, int], list[int]] = defaultdict(list)
    rows: list[dict[str, Any]] = []
    payloads: dict[tuple[str, int], p.ToolPayload] = {}
    for i, item in enumerate(batch):
        frame = item.frame
        if not isinstance(frame, p.JobTool):
            continue
        eid = frame.id.lower()
        if fenced(execs, eid, item.daemon_id) is None:
            continue
        t = frame.payload
        key = (eid, t.seq)
        if key not in index:
            payloads[key] = t
            rows.append(
                {
                    "execution_id": eid,
                    "seq": t.seq,
                    "name": t.name,
                    "after_call": t.after_call if isinstance(t.after_call, int) else None,
                    "started_at": t.started_at,
                    "duration_ms": t.duration_ms,
                    "arguments_bytes": t.arguments_bytes,
                    "result_bytes": t.result_bytes,
                    "error": t.error,
                }
            )
        index[key].append(i)
    if not rows:
        return
    inserted = await conn.fetch(sql.INSERT_TOOLS, document(rows), at)
    new = {(str(r["execution_id"]), r["seq"]) for r in inserted}
    for key, positions in index.items():
        for i in positions:
            outcome.verdicts[i] = "duplicate"
        if key in new:
            outcome.verdicts[positions[0]] = "recorded"
            t = payloads[key]
            outcome.new_tools.append((t.name, t.error, t.duration_ms))
