"""SQL of durable cancels: which executions a daemon must still be told to stop.

A client's cancel is a flag on the job (``jobs.cancel_requested``, set by
:data:`orchestrator.store.jobs.CANCEL_JOB`); the notification that relays it may be lost (the
daemon's link down, the listener reconnecting, the offer not yet attached). So the flag is
read again: at a daemon's registration, by the accept's own statement, and by the periodic
cancel sweep (:meth:`orchestrator.upkeep.Upkeep.cancel_sweep`).
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

PENDING_CANCELS = """
SELECT e.id, e.job_id
FROM executions e JOIN jobs j ON j.id = e.job_id
WHERE e.id = ANY($1::uuid[]) AND e.status IN ('offered', 'running') AND j.cancel_requested
ORDER BY e.id
"""


async def pending(pool: asyncpg.Pool, execution_ids: Sequence[str]) -> list[tuple[str, str]]:
    """Among these executions, the live ones whose job a client cancelled: ``(execution, job)``."""
    if not execution_ids:
        return []
    rows = await pool.fetch(PENDING_CANCELS, list(execution_ids))
    return [(str(r["id"]), str(r["job_id"])) for r in rows]


# The sweep's read: the live executions of cancelled jobs on these daemons (the orchestrator's
# own), through the partial index of active executions by daemon: no list of every
# execution in flight is sent, and no scan of the jobs.
CANCELLED_ON_DAEMONS = """
SELECT e.id, e.job_id
FROM executions e JOIN jobs j ON j.id = e.job_id
WHERE e.daemon_id = ANY($1::text[]) AND e.status IN ('offered', 'running')
  AND j.cancel_requested AND j.status = 'running'
ORDER BY e.id
"""


async def cancelled_on(pool: asyncpg.Pool, daemon_ids: Sequence[str]) -> list[tuple[str, str]]:
    """The live executions on these daemons whose job a client cancelled: ``(execution,
    job)``."""
    if not daemon_ids:
        return []
    rows = await pool.fetch(CANCELLED_ON_DAEMONS, list(daemon_ids))
    return [(str(r["id"]), str(r["job_id"])) for r in rows]
