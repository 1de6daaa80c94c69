"""The read-only usage API on ``tally serve``: the same JSON as ``tally usage --format json``
and ``tally jobs show --format json``, so dashboards and scripts need no database access.

- ``GET /api/v1/usage?by=model,label:team&since=7d&until=...&label=team=a&model=...``
  ``&executor=...&provider=...``
- ``GET /api/v1/jobs/{id}`` (the id or its first characters)
- ``GET /api/v1/budgets``: every budget's standing, as ``tally budgets list --format json``

Authentication (a client token) is checked by ``orchestrator.http`` before this answers.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from http import HTTPStatus
from urllib.parse import parse_qs, unquote

import asyncpg

from orchestrator.store import budgets, reports
from orchestrator.store.db import TRANSIENT
from orchestrator.store.job_detail import job_detail, job_document
from shared.aio import within
from shared.errors import ConfigError

log = logging.getLogger(__name__)

# A report the database cannot answer in this long is cut off rather than held open.
QUERY_TIMEOUT_S = 30.0
_USAGE_PARAMS = {"by", "since", "until", "label", "model", "executor", "provider"}


class UsageApi:
    """Answers the API's paths from the orchestrator's pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def answer(self, path: str, query: str) -> tuple[HTTPStatus, object]:
        """Status and JSON body for one GET."""
        try:
            if path == "/api/v1/usage":
                return HTTPStatus.OK, await self._usage(query)
            if path == "/api/v1/budgets":
                return HTTPStatus.OK, await self._budgets()
            if path.startswith("/api/v1/jobs/") and path.count("/") == 4:
                found = await self._job(unquote(path.rsplit("/", 1)[1]))
                if found is None:
                    return HTTPStatus.NOT_FOUND, {"error": "no such job"}
                return HTTPStatus.OK, found
            return HTTPStatus.NOT_FOUND, {"error": f"no API at {path}"}
        except ConfigError as exc:
            message = str(exc)
            if message.startswith("no job"):
                return HTTPStatus.NOT_FOUND, {"error": message}
            return HTTPStatus.BAD_REQUEST, {"error": message}
        except (TimeoutError, *TRANSIENT) as exc:
            log.warning("usage API: database unavailable: %s", exc)
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "database unavailable"}
        except asyncpg.PostgresError:
            log.exception("usage API: query failed")
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}

    async def _budgets(self) -> object:
        async with self.pool.acquire() as conn:
            standings = await within(budgets.report(conn, datetime.now(UTC)), QUERY_TIMEOUT_S)
        return [budgets.standing_record(s) for s in standings]

    async def _usage(self, query: str) -> object:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False)
        unknown = sorted(set(params) - _USAGE_PARAMS)
        if unknown:
            raise ConfigError(f"unknown parameter {unknown[0]!r}: expected {sorted(_USAGE_PARAMS)}")
        for name, values in params.items():
            if name != "label" and len(values) > 1:
                raise ConfigError(f"parameter {name!r} given {len(values)} times")

        def one(name: str) -> str | None:
            values = params.get(name)
            return values[0] if values else None

        usage_query = reports.build_query(
            one("by") or "model",
            one("since") or "30d",
            one("until"),
            params.get("label", []),
            one("model"),
            one("executor"),
            one("provider"),
            prefix="",
        )
        async with self.pool.acquire(timeout=QUERY_TIMEOUT_S) as conn:
            rows = await reports.usage(conn, usage_query, timeout=QUERY_TIMEOUT_S)
        return reports.usage_documents(rows)

    async def _job(self, prefix: str) -> object | None:
        async with self.pool.acquire(timeout=QUERY_TIMEOUT_S) as conn:
            job_id = await reports.resolve_job_id(conn, prefix)
            detail = await job_detail(conn, job_id)
        if detail.job is None:
            return None
        return job_document(detail)
