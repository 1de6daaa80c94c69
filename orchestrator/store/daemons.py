"""SQL of the daemons table: identity, token fingerprint, status, last seen."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from orchestrator.store.db import json_text
from shared import protocol as p


class DaemonRows:
    """Statements on ``daemons``; mixed into :class:`orchestrator.store.jobs.JobStore`."""

    pool: asyncpg.Pool

    async def upsert_daemon(
        self,
        reg: p.RegisterPayload,
        orchestrator_id: str,
        token_fingerprint: str | None = None,
        stale_after: float = 15.0,
    ) -> bool:
        """Record a daemon's identity and mark it connected to this orchestrator.

        Returns False, changing nothing, when a live connection that presented another token
        holds the id (connected, and seen within ``stale_after`` seconds): one daemon token
        cannot take over another daemon's id.
        """
        row = await self.pool.fetchval(
            """
            INSERT INTO daemons (id, hostname, version, executors, max_concurrent_jobs, labels,
                                 status, orchestrator_id, token_fingerprint)
            VALUES ($1, $2, $3, $4::jsonb, $5, $6::jsonb, 'connected', $7, $8)
            ON CONFLICT (id) DO UPDATE SET hostname = EXCLUDED.hostname,
                version = EXCLUDED.version, executors = EXCLUDED.executors,
                max_concurrent_jobs = EXCLUDED.max_concurrent_jobs, labels = EXCLUDED.labels,
                status = 'connected', orchestrator_id = EXCLUDED.orchestrator_id,
                token_fingerprint = EXCLUDED.token_fingerprint, last_seen_at = now()
            WHERE daemons.status = 'disconnected'
               OR daemons.token_fingerprint IS NOT DISTINCT FROM EXCLUDED.token_fingerprint
               OR daemons.last_seen_at < now() - make_interval(secs => $9)
            RETURNING id
            """,
            reg.daemon_id,
            reg.hostname,
            reg.version,
            json_text(reg.executors),
            reg.max_concurrent_jobs,
            json_text(reg.labels),
            orchestrator_id,
            token_fingerprint,
            stale_after,
        )
        return row is not None

    async def known_executors(self) -> set[str]:
        """Every executor a registered daemon offers (connected or not: it may come back)."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT x->>'name' AS name FROM daemons, jsonb_array_elements(executors) AS x"
        )
        return {r["name"] for r in rows if r["name"] is not None}

    async def set_daemon_status(self, daemon_id: str, status: str, orchestrator_id: str) -> None:
        """Update a daemon's status, unless another orchestrator now holds it."""
        await self.pool.execute(
            "UPDATE daemons SET status = $2, last_seen_at = now() "
            "WHERE id = $1 AND orchestrator_id = $3",
            daemon_id,
            status,
            orchestrator_id,
        )

    async def touch_daemons(self, daemon_ids: Sequence[str]) -> None:
        """Refresh last_seen_at of live daemons."""
        if daemon_ids:
            await self.pool.execute(
                "UPDATE daemons SET last_seen_at = now() WHERE id = ANY($1::text[])",
                list(daemon_ids),
            )
