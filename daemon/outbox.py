"""The durable outbox: every job frame is written here before it is sent, deleted on ``job:ack``.

SQLite in WAL mode: a committed write survives the process being killed (SIGKILL), which is
the failure this guards against. The outbox is bounded: at the bound the daemon stops taking
offers; it never drops a frame.
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

from shared import protocol as p


class Outbox:
    """Unacknowledged frames and the daemon's stable identity, in ``state_dir/outbox.sqlite3``."""

    def __init__(self, state_dir: Path, max_frames: int = 100_000) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.max_frames = max_frames
        self._db = sqlite3.connect(state_dir / "outbox.sqlite3", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (key TEXT PRIMARY KEY, execution_id TEXT NOT NULL,"
            " frame BLOB NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self._count = int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def daemon_id(self, given: str | None) -> str:
        """The given id, else the one persisted on first start (stable across restarts)."""
        if given:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('daemon_id', ?)", (given,))
            return given
        row = self._db.execute("SELECT value FROM meta WHERE key = 'daemon_id'").fetchone()
        if row:
            return str(row[0])
        new = f"tallyd-{uuid.uuid4().hex[:12]}"
        self._db.execute("INSERT INTO meta VALUES ('daemon_id', ?)", (new,))
        return new

    def put(self, key: str, execution_id: str, frame: bytes) -> None:
        """Make a frame durable (idempotent on key)."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO outbox (key, execution_id, frame) VALUES (?, ?, ?)",
            (key, execution_id, frame),
        )
        self._count += cur.rowcount

    def replace(self, key: str, frame: bytes) -> bool:
        """Put another frame in place of a stored one, keeping its place in the resend order;
        True if it was there."""
        cur = self._db.execute("UPDATE outbox SET frame = ? WHERE key = ?", (frame, key))
        return cur.rowcount > 0

    def delete(self, key: str) -> bool:
        """Forget an acknowledged frame; True if it was there."""
        cur = self._db.execute("DELETE FROM outbox WHERE key = ?", (key,))
        self._count -= cur.rowcount
        return cur.rowcount > 0

    def pending(self) -> list[tuple[str, bytes]]:
        """Every unacknowledged frame, oldest first."""
        rows = self._db.execute("SELECT key, frame FROM outbox ORDER BY rowid").fetchall()
        return [(str(k), bytes(f)) for k, f in rows]

    def __len__(self) -> int:
        return self._count

    @property
    def full(self) -> bool:
        """At the bound: take no new offers until acks make room."""
        return self._count >= self.max_frames

    def close(self) -> None:
        """Close the database."""
        self._db.close()


def generation_key(execution_id: str, seq: int) -> str:
    """Outbox key of a ``job:generation``."""
    return f"{execution_id.lower()}:gen:{seq}"


def result_key(execution_id: str) -> str:
    """Outbox key of a ``job:result``."""
    return f"{execution_id.lower()}:result"


def tool_key(execution_id: str, seq: int) -> str:
    """Outbox key of a ``job:tool``."""
    return f"{execution_id.lower()}:tool:{seq}"


def answered_key(of: object, execution_id: str, seq: object) -> str | None:
    """The outbox key of the job frame an ack or an error names; None when it names none: not
    a job frame, or a call or tool call without a readable ``seq`` (which of the execution's
    frames it means is unknown, and no frame is settled by a guess)."""
    if of == "job:result":
        return result_key(execution_id)
    if type(seq) is not int:
        return None
    if of == "job:generation":
        return generation_key(execution_id, seq)
    if of == "job:tool":
        return tool_key(execution_id, seq)
    return None


def frame_key(frame: p.JobGeneration | p.JobTool | p.JobResult) -> str:
    """The outbox key of a job frame."""
    if isinstance(frame, p.JobResult):
        return result_key(frame.id)
    if isinstance(frame, p.JobTool):
        return tool_key(frame.id, frame.payload.seq)
    return generation_key(frame.id, frame.payload.seq)
