"""Opening database connections with errors wrapped at one boundary."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

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
