"""The read-only usage API on ``tally serve``: the same JSON as ``tally usage --format json``
and ``tally jobs show --format json``, so dashboards and scripts need no database access.

- ``GET /api/v1/usage?by=model,label:team&since=7d&until=...&label=team=a&model=...``
  ``&executor=...&provider=...&limit=...&offset=...&after=...``
- ``GET /api/v1/jobs/{id}?limit=...&offset=...`` (the id or its first characters)
- ``GET /api/v1/budgets``: every budget's standing, as ``tally budgets list --format json``

Authentication (a client token) is checked by ``orchestrator.http`` before this answers.

The API must never slow the orchestrator's own work (accepts, lease renewals, the ledger): it
reads through its own small pool, answers at most ``--api-max-concurrent`` requests at once
(the others wait ``--api-queue-timeout`` seconds for a turn, then get 503 with
``Retry-After``, as every 503 of the API), returns at most ``--api-max-rows`` rows per list
(the rest announced by ``Link: <...>; rel="next"``), stops its statements after
``--api-statement-timeout`` seconds, and builds and encodes its bodies on a thread of its own.
Every bad parameter is a 400 naming it, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlencode

import asyncpg
import msgspec

from orchestrator.config import ServeSettings
from orchestrator.store import budgets, reports
from orchestrator.store.db import TRANSIENT
from orchestrator.store.job_detail import job_detail, job_document
from orchestrator.store.spend import ClosedSpend
from shared.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

_USAGE_PARAMS = {"by", "since", "until", "label", "model", "executor", "provider", "after"}
_PAGE_PARAMS = {"limit", "offset"}
_MAX_OFFSET = 1_000_000_000
# Seconds a refused client is asked to wait before it asks again (Retry-After): busy, and
# the database unavailable.
RETRY_AFTER_S = 1
RETRY_AFTER_DB_S = 5
# At most one warning per this many seconds while requests are being refused.
_WARN_INTERVAL_S = 60.0

_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer of the API: status, JSON body (encoded) and extra headers."""

    status: HTTPStatus
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def encode(body: object) -> bytes:
    """A JSON body as bytes (msgspec: several times faster than ``json.dumps``)."""
    return _encoder.encode(body) + b"\n"


def error(status: HTTPStatus, message: str, *headers: tuple[str, str]) -> Answer:
    """An ``{"error": ...}`` answer."""
    return Answer(status, encode({"error": message}), headers)


class _Busy(Exception):
    """No turn or no connection within the queue timeout."""


class _TooSlow(Exception):
    """The answer's statements ran past the statement timeout."""


@dataclass(frozen=True, slots=True)
class _Page:
    limit: int
    offset: int


class UsageApi:
    """Answers the API's paths from a pool of its own, a bounded number at a time."""

    def __init__(
        self, pool: asyncpg.Pool, settings: ServeSettings, closed: ClosedSpend | None = None
    ) -> None:
        self.pool = pool
        self.settings = settings
        # The process's closed-hours sums (the dispatcher's warm-up keeps them current): a
        # budget not yet summed is reported ``loading``, never summed here.
        self.closed = closed if closed is not None else ClosedSpend()
        self.turns = asyncio.Semaphore(settings.api_max_concurrent)
        # Rows become documents and JSON here, off the event loop that answers heartbeats.
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tally-api")
        self.refused = 0  # requests answered 503 busy, for the warning
        self._warned_at: float | None = None

    def close(self) -> None:
        """Stop the encoding thread (the pool is closed by its owner)."""
        self.encoder.shutdown(wait=False, cancel_futures=True)

    async def answer(self, path: str, query: str) -> Answer:
        """The answer to one GET, or 503 busy when no turn comes within the queue timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.api_queue_timeout
        try:
            async with asyncio.timeout(self.settings.api_queue_timeout):
                await self.turns.acquire()
        except TimeoutError:
            return self._busy()
        try:
            return await self._route(path, query, deadline)
        except _Busy:
            return self._busy()
        finally:
            self.turns.release()

    def _busy(self) -> Answer:
        self.refused += 1
        now = asyncio.get_running_loop().time()
        if self._warned_at is None or now - self._warned_at > _WARN_INTERVAL_S:
            self._warned_at = now
            log.warning(
                "usage API busy: %d request(s) refused so far (at most %d answered at once, "
                "--api-max-concurrent; each waits %gs, --api-queue-timeout)",
                self.refused,
                self.settings.api_max_concurrent,
                self.settings.api_queue_timeout,
            )
        return error(
            HTTPStatus.SERVICE_UNAVAILABLE,
            f"usage API busy: {self.settings.api_max_concurrent} requests are being answered; "
            f"retry after {RETRY_AFTER_S}s",
            ("Retry-After", str(RETRY_AFTER_S)),
        )

    async def _route(self, path: str, query: str, deadline: float) -> Answer:
        try:
            if path == "/api/v1/usage":
                return await self._usage(query, deadline)
            if path == "/api/v1/budgets":
                return await self._budgets(query, deadline)
            if path.startswith("/api/v1/jobs/") and path.count("/") == 4:
                return await self._job(unquote(path.rsplit("/", 1)[1]), query, deadline)
            return error(HTTPStatus.NOT_FOUND, f"no API at {path}")
        except _Busy:
            raise
        except ConfigError as exc:
            message = str(exc)
            if message.startswith("no job"):
                return error(HTTPStatus.NOT_FOUND, message)
            return error(HTTPStatus.BAD_REQUEST, message)
        except _TooSlow:
            # The same request is as slow again: a client that retries on its own waits as
            # long as the statement ran, not at once.
            return error(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"the answer took longer than {self.settings.api_statement_timeout:g}s "
                "(--api-statement-timeout): narrow since/until, filter, or group by less",
                ("Retry-After", str(math.ceil(self.settings.api_statement_timeout))),
            )
        except TRANSIENT as exc:
            log.warning("usage API: database unavailable: %r", exc)
            return error(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "database unavailable",
                ("Retry-After", str(RETRY_AFTER_DB_S)),
            )
        except Exception:
            # A parameter this code failed to check is a bug here: 500 without a traceback
            # to the client (the log has it), and the connection is answered.
            log.exception("usage API: %s?%s failed", path, query[:200])
            return error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")

    async def _read(self, deadline: float, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``work`` on one of the API's connections: waiting for it until ``deadline``
        (else busy), its statements bounded by the statement timeout (else too slow)."""
        wait = max(0.05, deadline - asyncio.get_running_loop().time())
        try:
            conn = await self.pool.acquire(timeout=wait)
        except TimeoutError:
            raise _Busy from None
        try:
            # The server's statement_timeout (set on the pool) stops each statement; this
            # bounds them together, and still holds if the server's setting is lost.
            async with asyncio.timeout(self.settings.api_statement_timeout):
                return await work(conn)
        except (TimeoutError, asyncpg.QueryCanceledError):
            raise _TooSlow from None
        finally:
            await self._release(conn)

    async def _release(self, conn: asyncpg.Connection) -> None:
        # Released with a timeout of its own (asyncpg would reuse the acquire's, which may be
        # nearly spent); a connection that cannot be reset is closed by asyncpg and replaced,
        # which does not change the answer already read.
        try:
            await self.pool.release(conn, timeout=self.settings.api_statement_timeout)
        except (TimeoutError, *TRANSIENT) as exc:
            log.debug("usage API: connection not reset, replaced: %r", exc)

    async def _off_loop(self, build: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.encoder, build)

    def _params(self, query: str, allowed: set[str]) -> dict[str, list[str]]:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False)
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ConfigError(f"unknown parameter {unknown[0]!r}: expected {sorted(allowed)}")
        for name, values in params.items():
            if name != "label" and len(values) > 1:
                raise ConfigError(f"parameter {name!r} given {len(values)} times")
        return params

    def _page(self, params: dict[str, list[str]]) -> _Page:
        most = self.settings.api_max_rows

        def number(name: str, default: int, low: int, high: int) -> int:
            values = params.get(name)
            if not values:
                return default
            text = values[0]
            # Length first: int() refuses more than 4,300 digits with a ValueError.
            if (
                not text.isascii()
                or not text.isdigit()
                or len(text) > len(str(high))
                or not low <= int(text) <= high
            ):
                raise ConfigError(
                    f"{name} {text[:40]!r}: expected a whole number from {low} to {high}"
                )
            return int(text)

        return _Page(number("limit", most, 1, most), number("offset", 0, 0, _MAX_OFFSET))

    async def _budgets(self, query: str, deadline: float) -> Answer:
        self._params(query, set())

        async def read(conn: asyncpg.Connection) -> list[budgets.Standing]:
            return await budgets.report(conn, datetime.now(UTC), self.closed, advance=False)

        standings = await self._read(deadline, read)
        body = await self._off_loop(lambda: encode([budgets.standing_record(s) for s in standings]))
        return Answer(HTTPStatus.OK, body)

    async def _usage(self, query: str, deadline: float) -> Answer:
        params = self._params(query, _USAGE_PARAMS | _PAGE_PARAMS)
        page = self._page(params)

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

        after = _after(one("after"), len(usage_query.by))

        async def read(conn: asyncpg.Connection) -> tuple[list[asyncpg.Record], bool]:
            return await reports.usage_page(conn, usage_query, page.limit, page.offset, after)

        records, more = await self._read(deadline, read)
        whole = not more and page.offset == 0 and after is None

        def build() -> bytes:
            # Pages come in key order (stable while costs change); a whole report in one
            # answer in the report's order, as the CLI prints it.
            ordered = reports.report_order(usage_query, records) if whole else records
            return encode(reports.usage_documents(reports.usage_rows(usage_query, ordered)))

        body = await self._off_loop(build)
        if not more:
            return Answer(HTTPStatus.OK, body)
        # The next page: after this one's last keys, over the same window (a relative
        # ``since`` or ``until`` pinned to the instant this page read).
        pinned_until = usage_query.until
        following = {
            **{k: v for k, v in params.items() if k != "offset"},
            "since": [usage_query.since.isoformat()],
            **({"until": [pinned_until.isoformat()]} if pinned_until is not None else {}),
            "limit": [str(page.limit)],
            "after": [json.dumps(reports.page_keys(usage_query, records[-1]))],
        }
        return Answer(
            HTTPStatus.OK, body, _next_headers("/api/v1/usage?" + urlencode(following, doseq=True))
        )

    async def _job(self, prefix: str, query: str, deadline: float) -> Answer:
        page = self._page(self._params(query, _PAGE_PARAMS))

        async def read(conn: asyncpg.Connection) -> Any:
            job_id = await reports.resolve_job_id(conn, prefix)
            return await job_detail(conn, job_id, page.limit, page.offset)

        detail = await self._read(deadline, read)
        if detail.job is None:
            return error(HTTPStatus.NOT_FOUND, "no such job")
        if not detail.more:
            return Answer(HTTPStatus.OK, await self._off_loop(lambda: encode(job_document(detail))))
        job_id = str(detail.job["id"])
        following = urlencode({"limit": page.limit, "offset": page.offset + page.limit})
        url = f"/api/v1/jobs/{quote(job_id)}?{following}"

        def build() -> bytes:
            return encode({**job_document(detail), "truncated": True, "next": url})

        return Answer(HTTPStatus.OK, await self._off_loop(build), _next_headers(url))


def _after(text: str | None, dimensions: int) -> list[str] | None:
    """The ``after`` parameter: the JSON array of a page's last keys, one per dimension."""
    if text is None:
        return None
    try:
        keys = json.loads(text)
    except (ValueError, RecursionError):
        keys = None
    if (
        not isinstance(keys, list)
        or len(keys) != dimensions
        or not all(isinstance(k, str) and "\x00" not in k and _utf8(k) for k in keys)
    ):
        raise ConfigError(
            f"after {text[:40]!r}: expected the JSON array of {dimensions} key(s) from a "
            'Link rel="next"'
        )
    return keys


def _next_headers(url: str) -> tuple[tuple[str, str], ...]:
    """The headers of a cut answer: where the next page is (RFC 8288) and that it is cut."""
    return (("Link", f'<{url}>; rel="next"'), ("Tally-Truncated", "true"))


def _utf8(text: str) -> bool:
    """Whether a key has a UTF-8 form (a lone surrogate from a JSON escape has none)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
