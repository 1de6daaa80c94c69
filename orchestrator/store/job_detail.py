"""One job in detail: its executions, calls and tool calls, in the order they happened, and
its answer. What `tally jobs show` prints and ``GET /api/v1/jobs/{id}`` returns."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from orchestrator.store.jobs import stored_output
from orchestrator.store.reports import plain


@dataclass(frozen=True, slots=True)
class JobDetail:
    """A job with its executions, calls and tool calls (None: no such job)."""

    job: Any
    executions: list[Any]
    calls: list[Any]
    tools: list[Any]
    # Whether calls or tool calls follow beyond the page asked for (``job_detail``'s limit).
    more: bool = False


def job_output(executions: Sequence[Any]) -> dict[str, Any] | None:
    """The answer of the attempt that decided the job (its last with a recorded answer)."""
    for e in reversed(executions):
        if e["output"] is not None and e["status"] not in ("lost", "rejected"):
            return {
                "value": stored_output(e["output"], e["output_format"]),
                "truncated": bool(e["output_truncated"]),
                "executionId": str(e["id"]),
            }
    return None


def timeline(detail: JobDetail) -> list[tuple[str, Any]]:
    """Each execution's calls and tool calls in the order they happened: a tool call right
    after the call whose response asked for it."""
    tools: dict[tuple[str, int], list[Any]] = defaultdict(list)
    for t in detail.tools:
        after = -1 if t["after_call"] is None else t["after_call"]
        tools[(str(t["execution_id"]), after)].append(t)
    calls: dict[str, list[Any]] = defaultdict(list)
    for c in detail.calls:
        calls[str(c["execution_id"])].append(c)
    out: list[tuple[str, Any]] = []
    for e in detail.executions:
        eid = str(e["id"])
        out.extend(("tool", t) for t in tools.pop((eid, -1), []))
        for c in calls.get(eid, []):
            out.append(("call", c))
            out.extend(("tool", t) for t in tools.pop((eid, c["seq"]), []))
        for key in sorted(k for k in tools if k[0] == eid):  # after a call not (yet) recorded
            out.extend(("tool", t) for t in tools.pop(key))
    return out


def job_document(detail: JobDetail) -> dict[str, Any]:
    """One job as `tally jobs show --format json` and ``GET /api/v1/jobs/{id}`` return it."""
    return {
        "job": plain(detail.job),
        "output": job_output(detail.executions),
        "executions": [plain(e) for e in detail.executions],
        "calls": [plain(c) for c in detail.calls],
        "toolCalls": [plain(t) for t in detail.tools],
    }


async def job_detail(
    conn: asyncpg.Connection, job_id: str, limit: int | None = None, offset: int = 0
) -> JobDetail:
    """A job, its executions, its calls and its tool calls; with a ``limit``, at most that many
    calls and that many tool calls, from the ``offset``-th of each on (``more`` says whether
    any follow). A job's executions are few (its attempts) and always all there."""
    job = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1::uuid", job_id)
    executions = await conn.fetch(
        "SELECT * FROM executions WHERE job_id = $1::uuid ORDER BY offered_at, id", job_id
    )
    # One past the limit tells whether more follow. NULL: no limit.
    page = (None if limit is None else limit + 1, offset)
    calls = await conn.fetch(
        """
        SELECT c.* FROM llm_calls c JOIN executions e ON e.id = c.execution_id
        WHERE e.job_id = $1::uuid ORDER BY e.offered_at, e.id, c.seq LIMIT $2 OFFSET $3
        """,
        job_id,
        *page,
    )
    tools = await conn.fetch(
        """
        SELECT t.* FROM tool_calls t JOIN executions e ON e.id = t.execution_id
        WHERE e.job_id = $1::uuid ORDER BY e.offered_at, e.id, t.seq LIMIT $2 OFFSET $3
        """,
        job_id,
        *page,
    )
    more = limit is not None and (len(calls) > limit or len(tools) > limit)
    if limit is not None:
        calls, tools = calls[:limit], tools[:limit]
    return JobDetail(job, list(executions), list(calls), list(tools), more)
