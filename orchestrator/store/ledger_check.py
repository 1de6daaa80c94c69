"""``tally ledger check``: the hourly rollups equal the detail rows they summarise.

The detail's contributions are computed by ``tally_usage_contributions()`` (migration 0009),
the definition the writer's increments follow; any difference is a rollup row that the
ledger's detail does not explain, or one it explains but the rollups lack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from orchestrator.store.ledger_sql import ROLLUP_VALUES

_KEY = ("hour", "model", "provider", "executor", "labels")

CHECK = f"""
WITH want AS (
    SELECT {", ".join(_KEY)}, {", ".join(f"sum({c}) AS {c}" for c in ROLLUP_VALUES)}
    FROM tally_usage_contributions($1::timestamptz, 'infinity')
    GROUP BY {", ".join(_KEY)}
), have AS (
    SELECT {", ".join(_KEY)}, {", ".join(f"sum({c}) AS {c}" for c in ROLLUP_VALUES)}
    FROM usage_hourly WHERE hour >= $1::timestamptz
    GROUP BY {", ".join(_KEY)}
)
SELECT {", ".join(f"coalesce(w.{k}, h.{k}) AS {k}" for k in _KEY)},
       to_jsonb(w) AS want, to_jsonb(h) AS have
FROM want w FULL JOIN have h
    ON ({", ".join(f"w.{k}" for k in _KEY)}) = ({", ".join(f"h.{k}" for k in _KEY)})
WHERE ({", ".join(f"w.{c}" for c in ROLLUP_VALUES)})
      IS DISTINCT FROM ({", ".join(f"h.{c}" for c in ROLLUP_VALUES)})
ORDER BY 1, 2, 3, 4
LIMIT $2
"""


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One rollup row that differs from what the detail rows make it."""

    hour: datetime
    model: str
    provider: str
    executor: str
    labels: str
    want: dict[str, Any] | None
    have: dict[str, Any] | None

    def describe(self) -> str:
        """One line naming the row and each differing value."""
        where = (
            f"{self.hour.isoformat()} model={self.model} provider={self.provider} "
            f"executor={self.executor} labels={self.labels}"
        )
        if self.have is None:
            return f"{where}: missing from the rollups"
        if self.want is None:
            return f"{where}: in the rollups, not in the detail"
        diffs = [
            f"{c} rollup {self.have.get(c)} != detail {self.want.get(c)}"
            for c in ROLLUP_VALUES
            if self.have.get(c) != self.want.get(c)
        ]
        return f"{where}: " + "; ".join(diffs)


async def horizon(conn: asyncpg.Connection) -> datetime | None:
    """Where the detail begins: the later of the two prune points (None: nothing pruned)."""
    value: datetime | None = await conn.fetchval(
        "SELECT greatest(calls_before, executions_before) FROM ledger_retention"
    )
    return value


# At most this many differing rows are named (the first, in hour order).
MISMATCH_LIMIT = 100


async def check(
    conn: asyncpg.Connection, since: datetime | None = None, limit: int = MISMATCH_LIMIT
) -> tuple[datetime | None, list[Mismatch]]:
    """Compare the rollups with the detail from ``since`` (default: where the detail begins;
    never before it); return the start used and up to ``limit`` mismatches."""
    start = await horizon(conn)
    if since is not None and (start is None or since > start):
        start = since
    rows = await conn.fetch(
        "SELECT date_trunc('hour', coalesce($1::timestamptz, '-infinity'), 'UTC')", start
    )
    begin = rows[0][0]
    found = await conn.fetch(CHECK, begin, limit)
    return start, [
        Mismatch(
            r["hour"],
            r["model"],
            r["provider"],
            r["executor"],
            r["labels"],
            None if r["want"] is None else _plain(r["want"]),
            None if r["have"] is None else _plain(r["have"]),
        )
        for r in found
    ]


def _plain(doc: str) -> dict[str, Any]:
    values: dict[str, Any] = json.loads(doc)
    return {c: values.get(c) for c in ROLLUP_VALUES}
