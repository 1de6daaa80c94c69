"""What several commands share: the database options, spelled once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from shared.settings import option

F = TypeVar("F", bound=Callable[..., Any])

database_url_option = option(
    "--database-url", help="libpq DSN of PostgreSQL; absent: the embedded PostgreSQL."
)
data_dir_option = option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Tally's data directory: the embedded PostgreSQL, `tally up`'s state and its daemons "
    "(default ~/.local/share/tally).",
)


def with_db(f: F) -> F:
    """Add ``--database-url`` and ``--data-dir`` to a command."""
    return database_url_option(data_dir_option(f))
