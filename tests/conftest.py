"""Fixtures: a real PostgreSQL, and a fresh database per test cloned from a migrated template."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from orchestrator.store import migrations as migrate
from tests.pg import execute, run_sync, with_database

TIMEOUT_FACTOR = float(os.environ.get("TALLY_TEST_TIMEOUT_FACTOR", "1"))


def scaled(seconds: float) -> float:
    """A wait bound scaled by the suite's one timeout factor."""
    return seconds * TIMEOUT_FACTOR


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of a database on a real PostgreSQL server where the tests may create databases."""
    external = os.environ.get("TALLY_TEST_DATABASE_URL")
    if external:
        yield external
        return
    from orchestrator.local.embedded import embedded_database

    root = tmp_path_factory.mktemp("pg")
    with embedded_database(root) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def template_db(pg_admin_dsn: str) -> Iterator[str]:
    """Name of a database migrated to the shipped schema, used as the clone source."""
    name = f"tally_tpl_{uuid.uuid4().hex[:10]}"
    files = migrate.discover()

    async def create() -> None:
        await execute(pg_admin_dsn, f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(with_database(pg_admin_dsn, name))
        try:
            await migrate.up(conn, files)
        finally:
            await conn.close()

    run_sync(create)
    yield name
    run_sync(lambda: execute(pg_admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _fresh(pg_admin_dsn: str, template: str | None) -> Iterator[str]:
    name = f"tally_t_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    run_sync(lambda: execute(pg_admin_dsn, f'CREATE DATABASE "{name}"{clause}'))
    yield with_database(pg_admin_dsn, name)
    run_sync(lambda: execute(pg_admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def db_url(pg_admin_dsn: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for this test alone."""
    yield from _fresh(pg_admin_dsn, template_db)


@pytest.fixture
def empty_db_url(pg_admin_dsn: str) -> Iterator[str]:
    """A fresh database with no schema at all."""
    yield from _fresh(pg_admin_dsn, None)


@pytest.fixture
def repo_root() -> Path:
    """The checkout's root folder."""
    return Path(__file__).resolve().parent.parent
