"""One process per directory: an advisory lock held for the life of the process."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from shared.errors import ConfigError


@contextlib.contextmanager
def exclusive(directory: Path, name: str, what: str) -> Iterator[None]:
    """Hold ``directory/name`` locked, or raise ConfigError naming the process holding it.

    The kernel drops the lock when the process dies, so a crash never leaves it stale.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ConfigError(
                f"{directory} is in use by another {what} (pid {holder}); stop it or use "
                "another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
