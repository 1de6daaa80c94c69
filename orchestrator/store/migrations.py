"""Ordered SQL migrations: discovery, status, a locked ``up`` and the start-up schema check."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg

from shared.errors import MigrationError, SchemaMismatchError

# An arbitrary constant: the advisory lock every `tally migrate up` takes for the whole run.
ADVISORY_LOCK_KEY = 0x7A11_0001
_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9]+(?:_[a-z0-9]+)*)\.sql$")

_CREATE_HISTORY = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY CHECK (version >= 1),
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def default_sql_dir() -> Path:
    """The migrations: ``orchestrator/migrations/`` inside an installed wheel, else the
    checkout's ``sql/`` folder (the source the wheel copies them from)."""
    package = Path(__file__).resolve().parent.parent  # orchestrator/
    shipped = package / "migrations"
    return shipped if shipped.is_dir() else package.parent / "sql"


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    path: Path
    sql: str
    checksum: str

    @property
    def filename(self) -> str:
        """The file's name, e.g. ``0001_ledger.sql``."""
        return self.path.name


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    """One row of ``schema_migrations``."""

    version: int
    name: str
    checksum: str
    applied_at: datetime


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    """What is applied, what is pending, and every inconsistency between code and database."""

    applied: list[AppliedMigration]
    pending: list[Migration]
    problems: list[str]

    @property
    def current(self) -> bool:
        """True when nothing is pending and nothing is wrong."""
        return not self.pending and not self.problems


def discover(directory: Path | None = None) -> list[Migration]:
    """Read the migration files in order, refusing bad names and gaps before any database work."""
    directory = directory or default_sql_dir()
    if not directory.is_dir():
        raise MigrationError(f"migrations folder {directory} does not exist")
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files must be named NNNN_snake_case.sql")
        version = int(match.group("version"))
        if version in found:
            raise MigrationError(
                f"{path.name}: version {version:04d} also used by {found[version].filename}"
            )
        raw = path.read_bytes()
        found[version] = Migration(
            version=version,
            name=match.group("name"),
            path=path,
            sql=raw.decode("utf-8"),
            checksum=hashlib.sha256(raw).hexdigest(),
        )
    migrations = [found[v] for v in sorted(found)]
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"migration {expected:04d} is missing: found {migration.filename} after "
                f"{'nothing' if expected == 1 else migrations[expected - 2].filename}"
            )
    return migrations


async def _history(conn: asyncpg.Connection) -> list[AppliedMigration] | None:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return None
    rows = await conn.fetch(
        "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
    )
    return [AppliedMigration(r["version"], r["name"], r["checksum"], r["applied_at"]) for r in rows]


async def status(conn: asyncpg.Connection, migrations: list[Migration]) -> MigrationStatus:
    """Compare the database's history with the shipped files."""
    applied = await _history(conn) or []
    by_version = {m.version: m for m in migrations}
    problems: list[str] = []
    for row in applied:
        shipped = by_version.get(row.version)
        if shipped is None:
            problems.append(
                f"database has migration {row.version:04d}_{row.name}.sql which this code does "
                "not ship (the database is ahead of the code)"
            )
        elif shipped.checksum != row.checksum:
            problems.append(
                f"{shipped.filename} was changed after it was applied "
                f"(checksum {row.checksum[:12]} in the database, {shipped.checksum[:12]} on disk)"
            )
    applied_versions = {row.version for row in applied}
    pending = [m for m in migrations if m.version not in applied_versions]
    if applied and pending and pending[0].version < max(applied_versions):
        problems.append(f"{pending[0].filename} is missing from the database's history")
    return MigrationStatus(applied=applied, pending=pending, problems=problems)


def _line_of(sql: str, position: str | None) -> int | None:
    if not position or not position.isdigit():
        return None
    return sql[: int(position) - 1].count("\n") + 1


async def up(
    conn: asyncpg.Connection,
    migrations: list[Migration],
    to: int | None = None,
    dry_run: bool = False,
) -> list[Migration]:
    """Apply pending migrations (up to ``to``) under an advisory lock; return those applied.

    Each file runs in its own transaction together with its history row, so a failure leaves
    the earlier files applied and nothing of the failing one.
    """
    if to is not None and not any(m.version == to for m in migrations):
        raise MigrationError(f"--to {to}: no migration with that version is shipped")
    await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
    try:
        await conn.execute(_CREATE_HISTORY)
        current = await status(conn, migrations)
        if current.problems:
            raise MigrationError("; ".join(current.problems))
        todo = [m for m in current.pending if to is None or m.version <= to]
        if dry_run:
            return todo
        for migration in todo:
            try:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) "
                        "VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )
            except asyncpg.PostgresError as exc:
                line = _line_of(migration.sql, getattr(exc, "position", None))
                where = f"{migration.filename}, line {line}" if line else migration.filename
                raise MigrationError(f"{where}: {exc.__class__.__name__}: {exc}") from exc
        return todo
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)


async def check_current(conn: asyncpg.Connection, migrations: list[Migration]) -> None:
    """Raise SchemaMismatchError unless the database is exactly at the shipped schema."""
    current = await status(conn, migrations)
    if current.problems:
        raise SchemaMismatchError("schema drift: " + "; ".join(current.problems))
    if current.pending:
        names = ", ".join(m.filename for m in current.pending)
        raise SchemaMismatchError(
            f"database schema is not current ({len(current.pending)} pending: {names}); "
            "run `tally migrate up` (or start with --migrate)"
        )
