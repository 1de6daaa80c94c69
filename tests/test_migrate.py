"""Migrations: ordered files, one locked runner, refusal on drift, the committed schema snapshot."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from orchestrator.store import migrations as migrate
from shared.errors import MigrationError, SchemaMismatchError

SNAPSHOT = Path(__file__).parent / "schema_snapshot.txt"


async def _up(dsn: str, directory: Path | None = None) -> list[migrate.Migration]:
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate.up(conn, migrate.discover(directory))
    finally:
        await conn.close()


async def _status(dsn: str, directory: Path | None = None) -> migrate.MigrationStatus:
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate.status(conn, migrate.discover(directory))
    finally:
        await conn.close()


def tally(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `tally` CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


async def test_fresh_up_then_noop_and_current(empty_db_url: str) -> None:
    """Fresh database: up applies all files, a second up is a no-op, status is current."""
    applied = await _up(empty_db_url)
    assert [m.version for m in applied] == [m.version for m in migrate.discover()]
    assert await _up(empty_db_url) == []
    st = await _status(empty_db_url)
    assert st.current and len(st.applied) == len(applied)


def test_cli_up_status_verify(empty_db_url: str) -> None:
    """The CLI applies, lists and verifies; verify fails while files are pending."""
    env = {"TALLY_DATABASE_URL": empty_db_url}
    before = tally("migrate", "verify", env=env)
    assert before.returncode == 1 and "pending" in before.stderr
    assert len(before.stderr.strip().splitlines()) == 1
    up = tally("migrate", "up", env=env)
    assert up.returncode == 0, up.stderr
    assert "applied 0001_ledger.sql" in up.stdout
    status = tally("migrate", "status", "--json", env=env)
    assert '"current": true' in status.stdout
    assert tally("migrate", "verify", env=env).returncode == 0


def test_five_concurrent_up_processes(empty_db_url: str) -> None:
    """Five `up` processes at once: each file applied exactly once, all exit 0."""
    env = {**os.environ, "TALLY_DATABASE_URL": empty_db_url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "migrate", "up"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 5, outputs
    applied_lines = sum(out.count("applied 0001_ledger.sql") for out, _ in outputs)
    assert applied_lines == 1
    st = asyncio.run(_status(empty_db_url))
    assert st.current and len(st.applied) == len(migrate.discover())


async def test_edited_file_is_refused(empty_db_url: str, tmp_path: Path) -> None:
    """An applied file edited by one byte: verify and up refuse and name it."""
    folder = tmp_path / "sql"
    shutil.copytree(migrate.default_sql_dir(), folder)
    await _up(empty_db_url, folder)
    target = folder / "0001_ledger.sql"
    target.write_bytes(target.read_bytes() + b" ")
    st = await _status(empty_db_url, folder)
    assert not st.current and "0001_ledger.sql was changed" in st.problems[0]
    with pytest.raises(MigrationError, match=r"0001_ledger\.sql"):
        await _up(empty_db_url, folder)
    result = tally(
        "migrate",
        "verify",
        "--migrations-dir",
        str(folder),
        env={"TALLY_DATABASE_URL": empty_db_url},
    )
    assert result.returncode == 1 and "0001_ledger.sql" in result.stderr


async def test_database_ahead_is_refused(db_url: str) -> None:
    """A database holding a version the code does not ship is refused, and serve's check too."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (99, 'future', 'x')"
        )
        with pytest.raises(MigrationError, match=r"0099_future\.sql"):
            await migrate.up(conn, migrate.discover())
        with pytest.raises(SchemaMismatchError, match="ahead"):
            await migrate.check_current(conn, migrate.discover())
    finally:
        await conn.close()


def test_gap_is_refused_before_touching_the_database(tmp_path: Path) -> None:
    """A gap in file numbers is refused by discovery, with no database at all."""
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="0002 is missing"):
        migrate.discover(tmp_path)
    result = tally(
        "migrate",
        "up",
        "--migrations-dir",
        str(tmp_path),
        env={"TALLY_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
    )
    assert result.returncode == 1 and "0002 is missing" in result.stderr


def test_bad_file_name_is_refused(tmp_path: Path) -> None:
    """A file not named NNNN_snake_case.sql is named in the error."""
    (tmp_path / "0001_Bad-Name.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"0001_Bad-Name\.sql"):
        migrate.discover(tmp_path)


async def test_syntax_error_names_file_and_line(empty_db_url: str, tmp_path: Path) -> None:
    """A failing file reports file and line; earlier files stay applied, nothing of it does."""
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE first_t (id int);\n")
    (tmp_path / "0002_broken.sql").write_text(
        "CREATE TABLE half_t (id int);\n\nCREATE TABLEE oops (id int);\n"
    )
    with pytest.raises(MigrationError, match=r"0002_broken.sql, line 3"):
        await _up(empty_db_url, tmp_path)
    conn = await asyncpg.connect(empty_db_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('first_t') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('half_t') IS NULL")
        versions = await conn.fetch("SELECT version FROM schema_migrations")
        assert [r["version"] for r in versions] == [1]
    finally:
        await conn.close()


async def test_up_to_and_dry_run(empty_db_url: str, tmp_path: Path) -> None:
    """--to stops at a version; --dry-run applies nothing."""
    for i in (1, 2, 3):
        (tmp_path / f"{i:04d}_step.sql").write_text(f"CREATE TABLE t{i} (id int);")
    conn = await asyncpg.connect(empty_db_url)
    try:
        files = migrate.discover(tmp_path)
        assert len(await migrate.up(conn, files, dry_run=True)) == 3
        assert [m.version for m in await migrate.up(conn, files, to=2)] == [1, 2]
        st = await migrate.status(conn, files)
        assert [m.version for m in st.pending] == [3]
    finally:
        await conn.close()


SCHEMA_QUERY = """
SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type
       || CASE WHEN is_nullable = 'NO' THEN ' not null' ELSE '' END
       || coalesce(' default ' || column_default, '')
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'trigger ' || tgname || ' on ' || tgrelid::regclass FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'view ' || viewname || ' ' || md5(definition) FROM pg_views WHERE schemaname = 'public'
ORDER BY 1
"""


async def test_schema_equals_committed_snapshot(db_url: str) -> None:
    """The migrated schema equals tests/schema_snapshot.txt, so any change is deliberate.

    Regenerate with TALLY_UPDATE_SNAPSHOT=1 after adding a migration.
    """
    conn = await asyncpg.connect(db_url)
    try:
        lines = [r[0] for r in await conn.fetch(SCHEMA_QUERY)]
    finally:
        await conn.close()
    text = "\n".join(lines) + "\n"
    if os.environ.get("TALLY_UPDATE_SNAPSHOT"):
        SNAPSHOT.write_text(text)
    assert text == SNAPSHOT.read_text()


async def test_job_changes_are_announced_once_per_statement(db_url: str) -> None:
    """A statement changing many jobs sends one notification per 100 of them, one line each
    ("<job id> <status> <cancel|->"); a change to neither status nor cancel is not announced."""
    listener = await asyncpg.connect(db_url)
    writer = await asyncpg.connect(db_url)
    got: list[str] = []
    try:
        await listener.add_listener("tally_jobs", lambda *args: got.append(args[3]))
        ids = await writer.fetch(
            "INSERT INTO jobs (id, executor) SELECT gen_random_uuid(), 'simulated'"
            " FROM generate_series(1, 250) RETURNING id::text"
        )
        await writer.execute("UPDATE jobs SET priority = 5")  # not announced
        await writer.execute("UPDATE jobs SET status = 'running'")
        await writer.execute(
            "UPDATE jobs SET cancel_requested = true WHERE id = $1::uuid", ids[0][0]
        )
        for _ in range(100):
            if len(got) >= 7:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # nothing more may arrive
        lines = [payload.split("\n") for payload in got]
        sizes = [len(chunk) for chunk in lines]  # chunks of one statement in any order
        assert sorted(sizes[:3]) == sorted(sizes[3:6]) == [50, 100, 100] and sizes[6:] == [1]
        inserted = {line.split(" ")[0] for chunk in lines[:3] for line in chunk}
        assert inserted == {r[0] for r in ids}
        assert all(line.endswith(" queued -") for chunk in lines[:3] for line in chunk)
        assert all(line.endswith(" running -") for chunk in lines[3:6] for line in chunk)
        assert lines[6] == [f"{ids[0][0]} running cancel"]
        assert all(len(payload.encode()) < 8000 for payload in got)
    finally:
        await listener.close()
        await writer.close()
