"""Database connections, and database errors sorted once, at one boundary.

The ledger writer refuses a frame only for an error that the frame itself causes and that
would recur on every retry; it retries everything else. Errors are classified by SQLSTATE
class, so a new error code of a known class is sorted without a code change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import DecimalException
from typing import Any, Literal

import asyncpg
import msgspec

from shared.errors import StoreError

CONNECT_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError)


def describe_dsn(dsn: str) -> str:
    """A DSN with any password removed, safe to print."""
    if "@" not in dsn or "://" not in dsn:
        return dsn
    scheme, rest = dsn.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"


async def connect(dsn: str, timeout: float = 10.0) -> asyncpg.Connection:
    """One connection, or StoreError naming the (password-free) DSN."""
    try:
        return await asyncpg.connect(dsn, timeout=timeout)
    except CONNECT_ERRORS as exc:
        raise StoreError(f"cannot connect to {describe_dsn(dsn)}: {exc}") from exc


@asynccontextmanager
async def connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection closed on exit."""
    conn = await connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def create_pool(dsn: str, min_size: int = 1, max_size: int = 8, **kw: Any) -> asyncpg.Pool:
    """A connection pool, or StoreError."""
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, **kw
        )
    except CONNECT_ERRORS as exc:
        raise StoreError(f"cannot connect to {describe_dsn(dsn)}: {exc}") from exc
    return pool


log = logging.getLogger(__name__)

ErrorKind = Literal["data", "transient", "server"]

# Errors of the connection or of a passing server condition: retry the same statement.
TRANSIENT = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    ConnectionError,
    asyncpg.InternalClientError,
)

# SQLSTATE classes whose errors are a property of the values sent: 21 cardinality violation,
# 22 data exception (out of range, bad encoding, ...), 23 integrity constraint violation,
# 54 program limit exceeded (an index row over the btree maximum, ...).
DATA_CLASSES = frozenset({"21", "22", "23", "54"})
# Classes of a connection or a passing condition: 08 connection, 40 transaction rollback
# (deadlock, serialization), 53 insufficient resources, 55 lock not available, 57 operator
# intervention (shutdown, cancel), 58 system error.
TRANSIENT_CLASSES = frozenset({"08", "40", "53", "55", "57", "58"})

# Errors raised in Python while turning a frame into rows: also a property of the frame.
PYTHON_DATA_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    OverflowError,
    ArithmeticError,
    DecimalException,
    UnicodeError,
    msgspec.EncodeError,
    msgspec.ValidationError,
)


def classify(exc: BaseException) -> ErrorKind:
    """``data`` (refuse the frame that caused it), ``transient`` (retry) or ``server``.

    ``server`` is any other database error (a missing table, a permission, a read-only
    standby): not the frame's fault, so it is retried like an outage and reported by
    ``/readyz`` when it lasts.
    """
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        cls = sqlstate[:2]
        if cls in DATA_CLASSES:
            return "data"
        if cls in TRANSIENT_CLASSES or isinstance(exc, TRANSIENT):
            return "transient"
        return "server"
    # asyncpg's client-side "invalid input for query argument" (a DataError that is also an
    # InterfaceError) is the data's fault, not the connection's.
    if isinstance(exc, asyncpg.exceptions._base.DataError):
        return "data"
    if isinstance(exc, TRANSIENT):
        return "transient"
    if isinstance(exc, PYTHON_DATA_ERRORS):
        return "data"
    return "server"


async def retry_until_done(
    action: Callable[[], Awaitable[object]], limit: float | None = 600
) -> object:
    """Retry a database action through an outage, backing off to 5 s; return its result.

    With a ``limit`` it gives up (returning None) after that many seconds; without one it
    retries until the action completes or the task is cancelled.
    """
    loop = asyncio.get_running_loop()
    deadline, backoff = (None if limit is None else loop.time() + limit), 0.2
    while True:
        try:
            return await action()
        except TRANSIENT as exc:
            if deadline is not None and loop.time() > deadline:
                log.error("gave up on a database action after %.0fs: %s", limit, exc)
                return None
            await asyncio.sleep(backoff)
            backoff = min(5.0, backoff * 2)


def json_text(value: object) -> str:
    """A value (msgspec structs included) as the JSON text a ``$n::jsonb`` parameter takes."""
    return msgspec.json.encode(value).decode()
