"""SQL of the reports: usage by any grouping, recent jobs, one job in detail."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from shared.errors import ConfigError
from shared.settings import parse_labels
from shared.usage import BUCKETS, COLUMNS, WIRE_FIELDS

# The dimensions a report groups by, as SQL over ``usage_hourly`` (label:KEY aside). Time
# dimensions are UTC: an hour, a day, an ISO week (its Monday).
DIMENSIONS = {
    "model": "model",
    "provider": "provider",
    "executor": "executor",
    "hour": "hour AT TIME ZONE 'UTC'",
    "day": "date_trunc('day', hour AT TIME ZONE 'UTC')",
    "week": "date_trunc('week', hour AT TIME ZONE 'UTC')",
}
# How a time dimension's value is shown (applied to each group, not to each row).
TIME_FORMATS = {"hour": 'YYYY-MM-DD"T"HH24:00"Z"', "day": "YYYY-MM-DD", "week": "YYYY-MM-DD"}
MAX_DIMENSIONS = 4

BUCKET_COLUMNS = tuple(COLUMNS.values())
# The buckets in the order reports show them: input, cache read, cache write, output, reasoning.
BUCKET_ORDER = tuple(
    COLUMNS[b] for b in ("input", "cache_read", "cache_creation", "output", "reasoning")
)
# usage_hourly's per-bucket counts of calls that did not report the bucket.
UNREPORTED = {col: f"unreported_{bucket}" for bucket, col in COLUMNS.items()}


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group of the usage report; None is unknown (nothing reported), never 0.

    ``unreported`` counts, per bucket column, the calls of the group that did not report
    it; ``unpriced_calls`` the calls without a cost, which make ``cost_usd`` a lower bound.
    ``executions`` counts each attempt once, under the group of its first recorded usage.
    """

    key: str
    input_tokens: int | None
    output_tokens: int | None
    cache_read_input_tokens: int | None
    cache_creation_input_tokens: int | None
    reasoning_tokens: int | None
    cost_usd: float | None
    calls: int
    executions: int
    unreported: dict[str, int] = field(default_factory=dict)
    unpriced_calls: int = 0
    group: dict[str, str] = field(default_factory=dict)

    @property
    def total_input(self) -> int | None:
        """input + cache read + cache creation (the known parts), None when none is known."""
        parts = (self.input_tokens, self.cache_read_input_tokens, self.cache_creation_input_tokens)
        if all(v is None for v in parts):
            return None
        return sum(v or 0 for v in parts)

    @property
    def cache_hit_ratio(self) -> float | None:
        """cache read / total input, None when there was no (known) input."""
        total = self.total_input
        return None if not total else (self.cache_read_input_tokens or 0) / total


def parse_by(text: str, flag: str = "--by") -> list[str]:
    """``model,label:team,day`` -> the dimensions, each checked; ConfigError names the bad one."""
    dims = [d.strip() for d in text.split(",")]
    for dim in dims:
        if dim not in DIMENSIONS and not (dim.startswith("label:") and len(dim) > 6):
            raise ConfigError(
                f"{flag} {dim!r}: expected model, provider, executor, hour, day, week or "
                "label:KEY (several joined by commas)"
            )
    if len(set(dims)) != len(dims):
        raise ConfigError(f"{flag} {text!r}: a dimension is named twice")
    if len(dims) > MAX_DIMENSIONS:
        raise ConfigError(f"{flag} {text!r}: at most {MAX_DIMENSIONS} dimensions")
    return dims


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """A usage report: dimensions, a window of whole UTC hours, and filters.

    The window holds the hours that begin in [since rounded down to its hour, until); a
    missing ``until`` is now (the current hour included).
    """

    by: tuple[str, ...]
    since: datetime
    until: datetime | None = None
    labels: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    executor: str | None = None
    provider: str | None = None

    def sql(
        self, limit: int | None = None, offset: int = 0, after: Sequence[str] | None = None
    ) -> tuple[str, list[Any]]:
        """The report's statement over the rollups and its arguments.

        Without a ``limit``: every group, in the report's order (time, then cost). With one:
        a page, in the order of the group keys as shown (time first, as the key sorts), of
        the groups after the keys ``after`` (a previous page's last), from ``offset`` on.
        Costs change while jobs run; keys do not, so pages neither skip nor repeat a group.
        """
        args: list[Any] = [self.since, self.until, json.dumps(self.labels)]
        where = [
            "hour >= date_trunc('hour', $1::timestamptz, 'UTC')",
            "($2::timestamptz IS NULL OR hour < $2::timestamptz)",
            "labels @> $3::jsonb",
        ]
        for column, value in (
            ("model", self.model),
            ("executor", self.executor),
            ("provider", self.provider),
        ):
            if value is not None:
                args.append(value)
                where.append(f"{column} = ${len(args)}")
        exprs = []
        for dim in self.by:
            if dim in DIMENSIONS:
                exprs.append(DIMENSIONS[dim])
            else:
                args.append(dim[6:])
                exprs.append(f"coalesce(labels ->> ${len(args)}, '(none)')")
        # Group by the raw values (a UTC timestamp for time dimensions); format the groups.
        keys = ", ".join(f"{e} AS d{i}" for i, e in enumerate(exprs))
        group = ", ".join(str(i + 1) for i in range(len(exprs)))
        shown = ", ".join(
            f"to_char(d{i}, '{TIME_FORMATS[dim]}') AS d{i}" if dim in TIME_FORMATS else f"d{i}"
            for i, dim in enumerate(self.by)
        )
        times = [f"g.d{i}" for i, d in enumerate(self.by) if d in TIME_FORMATS]
        order = ", ".join(
            [*times, "cost_usd DESC NULLS LAST", *(f"g.d{i}" for i in range(len(exprs)))]
        )
        sums = ", ".join(
            f"sum({c}) AS {c}"
            for c in (*BUCKET_COLUMNS, "cost_usd", "calls", "executions", *UNREPORTED.values())
        )
        statement = f"""
            SELECT {shown}, {", ".join((*BUCKET_COLUMNS, "cost_usd", "calls", "executions"))},
                   unpriced, {", ".join(UNREPORTED.values())}
            FROM (
                SELECT {keys}, {sums}, sum(unpriced_calls) AS unpriced
                FROM usage_hourly WHERE {" AND ".join(where)}
                GROUP BY {group}
                HAVING sum(calls) > 0 OR sum(executions) > 0
                    OR {" OR ".join(f"sum({c}) <> 0" for c in (*BUCKET_COLUMNS, "cost_usd"))}
            ) g
        """
        if limit is None:
            return statement + f"ORDER BY {order}\n", args
        # A page: keyset over the keys as shown (text; a time's fixed-width form sorts as
        # the time does), compared and ordered under one collation.
        shown_keys = [f"p.d{i}" for i in range(len(exprs))]
        statement = f"SELECT * FROM ({statement}) p\n"
        if after is not None:
            first = len(args) + 1
            args.extend(after)
            bound = ", ".join(f"${first + i}::text" for i in range(len(after)))
            statement += f"WHERE ({', '.join(shown_keys)}) > ({bound})\n"
        args.extend((limit, offset))
        statement += (
            f"ORDER BY {', '.join(shown_keys)} LIMIT ${len(args) - 1} OFFSET ${len(args)}\n"
        )
        return statement, args


_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(value: str, flag: str = "--since") -> datetime:
    """``30m``, ``24h``, ``7d`` (that long ago) or an ISO date/time (UTC unless it names a
    zone) -> an aware datetime; ConfigError names the flag."""
    shown = value if len(value) <= 40 else value[:40] + "..."
    match = _DURATION.match(value)
    if match:
        try:
            # int() refuses more than 4,300 digits (ValueError): as far back as no date is.
            return datetime.now(UTC) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        except (OverflowError, ValueError):
            raise ConfigError(f"{flag} {shown!r}: further back than a date can be") from None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"{flag} {shown!r}: expected a duration like 24h or 7d, or an ISO date"
        ) from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        # In UTC here: 0001-01-01T00:00+14:00 is before the first date Python (and the
        # driver) can hold, and would fail in the driver, not name the parameter.
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ConfigError(f"{flag} {shown!r}: out of the range of dates in UTC") from None


def build_query(
    by: str,
    since: str,
    until: str | None = None,
    labels: Sequence[str] = (),
    model: str | None = None,
    executor: str | None = None,
    provider: str | None = None,
    prefix: str = "--",
) -> UsageQuery:
    """A usage report from its textual parameters: the CLI's flags, or the API's query
    (``prefix=""``: errors name ``since``, not ``--since``)."""
    for name, value in (
        ("by", by),
        ("since", since),
        ("until", until),
        ("model", model),
        ("executor", executor),
        ("provider", provider),
        *(("label", v) for v in labels),
    ):
        if value is not None and "\x00" in value:
            # PostgreSQL text cannot hold U+0000: refused here, named, not a database error.
            raise ConfigError(f"{prefix}{name} {value!r}: NUL characters are not allowed")
    start = parse_time(since, f"{prefix}since")
    end = None if until is None else parse_time(until, f"{prefix}until")
    if end is not None and end <= start:
        raise ConfigError(f"{prefix}until {until!r}: must be after {prefix}since {since!r}")
    return UsageQuery(
        tuple(parse_by(by, f"{prefix}by")),
        start,
        end,
        parse_labels(labels, f"{prefix}label"),
        model,
        executor,
        provider,
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


async def usage(
    conn: asyncpg.Connection, query: UsageQuery, timeout: float | None = None
) -> list[UsageRow]:
    """Tokens by bucket, cost, calls and executions per group, from the hourly rollups.

    A bucket no call of the group reported is None (unknown), not 0; so is a cost nothing
    priced. Each group also says how many of its calls did not report each bucket and how
    many had no price.
    """
    statement, args = query.sql()
    return usage_rows(query, await conn.fetch(statement, *args, timeout=timeout))


async def usage_page(
    conn: asyncpg.Connection,
    query: UsageQuery,
    limit: int,
    offset: int = 0,
    after: Sequence[str] | None = None,
) -> tuple[list[asyncpg.Record], bool]:
    """At most ``limit`` groups of the report, in key order, after the keys ``after`` and
    from ``offset`` on, as records (for :func:`usage_rows`), and whether more groups follow."""
    statement, args = query.sql(limit + 1, offset, after)
    records = list(await conn.fetch(statement, *args))
    return records[:limit], len(records) > limit


def page_keys(query: UsageQuery, record: Any) -> list[str]:
    """A page's record's keys as shown: the ``after`` of the page that follows it."""
    return [str(record[f"d{i}"]) for i in range(len(query.by))]


def report_order(query: UsageQuery, records: Sequence[Any]) -> list[Any]:
    """Records of a whole report read in key order, in the report's order (time, then cost
    highest first, unknown last): the order of :meth:`UsageQuery.sql` without a limit, ties
    kept in key order as there."""
    times = [i for i, dim in enumerate(query.by) if dim in TIME_FORMATS]

    def rank(r: Any) -> tuple[Any, ...]:
        cost = r["cost_usd"]
        return (*(r[f"d{i}"] for i in times), cost is None, -(cost or 0))

    return sorted(records, key=rank)


def usage_rows(query: UsageQuery, records: Sequence[Any]) -> list[UsageRow]:
    """The report's records as rows (pure: the API builds them off the event loop)."""
    out = []
    for r in records:
        group = {dim: str(r[f"d{i}"]) for i, dim in enumerate(query.by)}
        out.append(
            UsageRow(
                key=" / ".join(group.values()),
                **{c: _optional_int(r[c]) for c in BUCKET_COLUMNS},
                cost_usd=None if r["cost_usd"] is None else float(r["cost_usd"]),
                calls=int(r["calls"]),
                executions=int(r["executions"]),
                unreported={c: int(r[u]) for c, u in UNREPORTED.items() if r[u]},
                unpriced_calls=int(r["unpriced"]),
                group=group,
            )
        )
    return out


WIRE = {COLUMNS[bucket]: WIRE_FIELDS[bucket] for bucket in BUCKETS}


def usage_documents(rows: Sequence[UsageRow]) -> list[dict[str, Any]]:
    """Rows as plain dicts (the CLI's JSON and CSV, the usage API), with the derived fields;
    unknown is null, not 0.

    ``key`` joins the group's values; ``group`` names each. ``costUsd`` is a lower bound when
    ``unpricedCalls`` is above 0, and null when nothing of the group was priced;
    ``unreportedCalls`` counts, per bucket, the calls that did not report it.
    """
    return [
        {
            "key": r.key,
            "group": r.group,
            **{WIRE[c]: getattr(r, c) for c in BUCKET_ORDER},
            "totalInputTokens": r.total_input,
            "cacheHitRatio": r.cache_hit_ratio,
            "costUsd": None if r.cost_usd is None else round(r.cost_usd, 10),
            "costIsLowerBound": r.unpriced_calls > 0 and r.cost_usd is not None,
            "unpricedCalls": r.unpriced_calls,
            "unreportedCalls": {WIRE[k]: v for k, v in r.unreported.items()},
            "calls": r.calls,
            "executions": r.executions,
        }
        for r in rows
    ]


async def recent_jobs(
    conn: asyncpg.Connection,
    status: str | None,
    executor: str | None,
    labels: dict[str, str],
    limit: int,
) -> list[asyncpg.Record]:
    """The most recent jobs matching the filters."""
    return list(
        await conn.fetch(
            """
            SELECT id, status, executor, model, attempts, created_at, finished_at,
                   input_tokens, output_tokens, cache_read_input_tokens,
                   cache_creation_input_tokens, cost_usd, stop_reason, error, labels,
                   unpriced_calls, hold_reason,
                   -- queued, and no connected daemon offers its executor
                   (status = 'queued' AND NOT EXISTS (
                        SELECT 1 FROM daemons d
                        WHERE d.status = 'connected'
                          AND d.executors @> jsonb_build_array(
                                  jsonb_build_object('name', jobs.executor))
                   )) AS waiting_for_executor
            FROM jobs
            WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR executor = $2)
              AND labels @> $3::jsonb
            ORDER BY created_at DESC LIMIT $4
            """,
            status,
            executor,
            json.dumps(labels),
            limit,
        )
    )


async def resolve_job_id(conn: asyncpg.Connection, prefix: str) -> str:
    """The one job whose id starts with ``prefix`` (as `git` resolves a short hash)."""
    clean = prefix.lower()
    hyphens = (8, 13, 18, 23)
    if (
        not clean
        or len(clean) > 36
        or any(
            (c != "-") if i in hyphens else (c not in "0123456789abcdef")
            for i, c in enumerate(clean)
        )
    ):
        raise ConfigError(f"JOB_ID {prefix!r}: expected a job id or the start of one (hex)")
    if len(clean) == 36:
        return clean
    if len(clean) < 4:
        raise ConfigError(f"JOB_ID {prefix!r}: give at least 4 characters of the id")
    # The primary key's btree serves the range; no cast of every id to text.
    low = (clean + "00000000-0000-0000-0000-000000000000"[len(clean) :])[:36]
    high = (clean + "ffffffff-ffff-ffff-ffff-ffffffffffff"[len(clean) :])[:36]
    rows = await conn.fetch(
        "SELECT id::text FROM jobs WHERE id BETWEEN $1::uuid AND $2::uuid LIMIT 2", low, high
    )
    if not rows:
        raise ConfigError(f"no job {prefix}")
    if len(rows) > 1:
        raise ConfigError(f"JOB_ID {prefix!r} is ambiguous: several jobs start with it")
    return str(rows[0]["id"])


def plain(row: Any) -> dict[str, Any]:
    """A database row as JSON-ready values: ids and times as text, NUMERIC as a number,
    jsonb parsed, NULL (unknown) as null."""
    out: dict[str, Any] = {}
    for key, value in dict(row).items():
        if isinstance(value, uuid.UUID):
            value = str(value)
        elif isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, Decimal):
            value = float(value)
        elif isinstance(value, str) and key in ("spec", "limits", "labels", "model_usage"):
            value = json.loads(value)
        out[key] = value
    return out
