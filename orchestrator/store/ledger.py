"""SQL of the ledger: one transaction per batch of ``job:generation`` and ``job:result`` frames.

Idempotent on (execution id, seq) for calls and (execution id) for results, fenced on the
daemon an execution is assigned to. Returns what was *newly* recorded so that the metrics
count each token exactly once, after the commit.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
from msgspec import UNSET

from orchestrator.accounting import (
    BatchOutcome,
    CallSums,
    FinishedJob,
    NewCall,
    count,
    merge_counted,
    settle_result,
)
from orchestrator.store.jobs import RECOMPUTE_JOB_TOTALS
from shared import protocol as p
from shared.usage import BUCKETS, COLUMNS, Usage, money

__all__ = ["BatchOutcome", "Incoming", "LedgerStore", "count", "merge_counted"]

_row_encoder = msgspec.json.Encoder(decimal_format="number")
_exact_decoder = msgspec.json.Decoder(float_hook=Decimal)


def _document(rows: object) -> str:
    """Rows as one JSON document for ``json_to_recordset``.

    PostgreSQL text cannot hold U+0000. A frame's strings may contain it (JSON allows it), and
    refusing the frame for that would drop its tokens, so such characters are stored as
    U+FFFD. The check is one scan of the encoded bytes; only a document that contains the
    escape is rebuilt.
    """
    doc = _row_encoder.encode(rows)
    if b"\\u0000" in doc:
        doc = _row_encoder.encode(_without_nul(_exact_decoder.decode(doc)))
    return doc.decode()


_without_nul = p.scrub_nul


# A result's execution row and its per-model rows, from one JSON array of objects.
RECORD_RESULTS = """
WITH u AS MATERIALIZED (
    SELECT * FROM json_to_recordset($1::json) AS u(
        id uuid, status text, error text, stop_reason text, duration_ms float8, num_turns int,
        input_tokens bigint, output_tokens bigint, cache_read bigint, cache_creation bigint,
        reasoning bigint, unavailable bool, cost numeric, cost_source text, model_usage jsonb,
        unpriced int, cache_1h bigint)
), updated AS (
    UPDATE executions e SET status = u.status, error = u.error,
        stop_reason = u.stop_reason, duration_ms = u.duration_ms,
        num_turns = coalesce(u.num_turns, e.num_turns),
        input_tokens = u.input_tokens, output_tokens = u.output_tokens,
        cache_read_input_tokens = u.cache_read,
        cache_creation_input_tokens = u.cache_creation,
        reasoning_tokens = u.reasoning, tokens_unavailable = u.unavailable,
        unpriced_calls = u.unpriced, cache_creation_1h_input_tokens = u.cache_1h,
        cost_usd = u.cost, cost_source = u.cost_source, model_usage = u.model_usage,
        result_recorded_at = now(), finished_at = coalesce(e.finished_at, now()),
        lease_expires_at = NULL
    FROM u WHERE e.id = u.id
)
INSERT INTO execution_model_usage (execution_id, model, provider, input_tokens, output_tokens,
    cache_read_input_tokens, cache_creation_input_tokens, reasoning_tokens, cost_usd)
SELECT u.id, m.model, m.provider,
       CASE WHEN m.unreported ? 'inputTokens' THEN NULL ELSE m."inputTokens" END,
       CASE WHEN m.unreported ? 'outputTokens' THEN NULL ELSE m."outputTokens" END,
       CASE WHEN m.unreported ? 'cacheReadInputTokens' THEN NULL
            ELSE m."cacheReadInputTokens" END,
       CASE WHEN m.unreported ? 'cacheCreationInputTokens' THEN NULL
            ELSE m."cacheCreationInputTokens" END,
       CASE WHEN m.unreported ? 'reasoningTokens' THEN NULL ELSE m."reasoningTokens" END,
       CASE WHEN m.unreported ? 'costUsd' THEN NULL ELSE m."costUsd" END
FROM u CROSS JOIN LATERAL jsonb_to_recordset(u.model_usage) AS m(
    model text, provider text, "inputTokens" bigint, "outputTokens" bigint,
    "cacheReadInputTokens" bigint, "cacheCreationInputTokens" bigint, "reasoningTokens" bigint,
    "costUsd" numeric, unreported jsonb)
"""


# Jobs whose totals a batch changed without deciding them (calls of a running attempt, or
# late usage of a lost or rejected one after the job was decided) are re-summed; a finished
# job whose totals moved is announced like a status change ("<id> <status> -", at most 100
# lines per notification), so watching clients on every orchestrator get its new totals.
RESUM_AND_ANNOUNCE = f"""
WITH resummed AS (
    {RECOMPUTE_JOB_TOTALS.strip()}
    AND (j.input_tokens, j.output_tokens, j.cache_read_input_tokens,
         j.cache_creation_input_tokens, j.reasoning_tokens, j.cost_usd, j.num_turns,
         j.unpriced_calls, j.cache_creation_1h_input_tokens)
        IS DISTINCT FROM
        (s.input_tokens, s.output_tokens, s.cache_read_input_tokens,
         s.cache_creation_input_tokens, s.reasoning_tokens, s.cost_usd, s.num_turns,
         s.unpriced_calls, s.cache_creation_1h_input_tokens)
    RETURNING j.id, j.status
)
SELECT pg_notify('tally_jobs', string_agg(line, E'\\n'))
FROM (SELECT id::text || ' ' || status || ' -' AS line, (row_number() OVER () - 1) / 100 AS chunk
      FROM resummed WHERE status IN ('succeeded', 'failed', 'cancelled')) lines
GROUP BY chunk
"""


@dataclass(frozen=True, slots=True)
class Incoming:
    """A validated job frame waiting to be persisted, with the daemon that sent it."""

    daemon_id: str
    frame: p.JobGeneration | p.JobResult


def _opt(value: Any) -> Any:
    return None if value is UNSET else value


def _unpriced(eid: str, counted: dict[str, int], cost: Any, totals: Usage) -> int:
    """Calls of an execution without a price: its recorded calls with no cost; for a result
    without recorded calls whose usage is known but cost is not, that one result."""
    if eid in counted:
        return counted[eid]
    return 1 if cost is None and not totals.is_unknown else 0


def _call_model(payload: p.GenerationPayload, fallback: str) -> str:
    for value in (payload.response_model, payload.request_model):
        if isinstance(value, str):
            return value
    return fallback


class LedgerStore:
    """Batched, idempotent persistence of calls and results."""

    def __init__(self, dsn: str, connect_timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        # The writer owns one connection: no pool hand-offs on the hot path, and after an
        # outage a fresh connection instead of whatever state a pool holder is in.
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout)
        return self._conn

    async def close(self) -> None:
        """Close the writer's connection."""
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def persist(self, batch: Sequence[Incoming]) -> BatchOutcome:
        """Persist one batch in one transaction; verdicts: recorded, duplicate, not_assigned."""
        conn = await self._connection()
        try:
            async with conn.transaction():
                return await self._persist(conn, batch)
        except BaseException:
            if conn.is_closed() or not isinstance(sys.exc_info()[1], asyncpg.PostgresError):
                await self.close()
            raise

    async def _persist(self, conn: asyncpg.Connection, batch: Sequence[Incoming]) -> BatchOutcome:
        outcome = BatchOutcome(verdicts=["not_assigned"] * len(batch))
        exec_ids = sorted({item.frame.id.lower() for item in batch})
        rows = await conn.fetch(
            """
            SELECT e.id, e.daemon_id, e.job_id, e.status, e.result_recorded_at IS NOT NULL AS done,
                   j.executor, j.model, j.status AS job_status, j.cancel_requested,
                   e.input_tokens, e.output_tokens, e.cache_read_input_tokens,
                   e.cache_creation_input_tokens, e.reasoning_tokens, e.cost_usd,
                   e.num_turns IS NOT NULL AS had_calls
            FROM executions e JOIN jobs j ON j.id = e.job_id
            WHERE e.id = ANY(string_to_array($1, ',')::uuid[])
            ORDER BY e.id
            FOR UPDATE OF e
            """,
            # One text parameter: asyncpg type-checks every element of an array parameter in
            # Python. The ids were checked as UUIDs by the decoder.
            ",".join(exec_ids),
        )
        execs = {str(r["id"]): r for r in rows}
        touched_jobs: set[str] = set()

        # --- calls ---------------------------------------------------------------------
        gen_index: dict[tuple[str, int], list[int]] = defaultdict(list)
        gens: list[tuple[str, p.GenerationPayload, str]] = []
        for i, item in enumerate(batch):
            frame = item.frame
            if not isinstance(frame, p.JobGeneration):
                continue
            eid = frame.id.lower()
            row = execs.get(eid)
            if row is None or row["daemon_id"] != item.daemon_id:
                continue
            key = (eid, frame.payload.seq)
            if key not in gen_index:
                gens.append((eid, frame.payload, row["model"] or row["executor"]))
            gen_index[key].append(i)
        inserted: set[tuple[str, int]] = set()
        if gens:
            new_rows = await conn.fetch(
                """
                INSERT INTO llm_calls (execution_id, seq, provider, request_model, response_model,
                    finish_reason, input_tokens, output_tokens, cache_read_input_tokens,
                    cache_creation_input_tokens, reasoning_tokens, tokens_unavailable, cost_usd,
                    cost_source, duration_ms, request_id, cache_creation_1h_input_tokens)
                SELECT * FROM json_to_recordset($1::json) AS c(execution_id uuid, seq int,
                    provider text, request_model text, response_model text, finish_reason text,
                    input_tokens bigint, output_tokens bigint, cache_read_input_tokens bigint,
                    cache_creation_input_tokens bigint, reasoning_tokens bigint,
                    tokens_unavailable bool, cost_usd numeric, cost_source text,
                    duration_ms float8, request_id text, cache_creation_1h_input_tokens bigint)
                ON CONFLICT (execution_id, seq) DO NOTHING
                RETURNING execution_id, seq
                """,
                _document(self._call_rows(gens)),
            )
            inserted = {(str(r["execution_id"]), r["seq"]) for r in new_rows}
        running_totals: dict[str, list[Any]] = {}
        for eid, payload, fallback in gens:
            key = (eid, payload.seq)
            for i in gen_index[key]:
                outcome.verdicts[i] = "duplicate"
            if key not in inserted:
                continue
            outcome.verdicts[gen_index[key][0]] = "recorded"
            usage = Usage.from_struct(payload)
            cost = payload.cost_usd if isinstance(payload.cost_usd, float | int) else None
            model = _call_model(payload, fallback)
            if not execs[eid]["done"]:
                # A call arriving after its execution's result is already inside the result's
                # totals, which were counted then: count it as a call, not as tokens again.
                count(outcome.counted, payload.provider, model, usage, cost or 0.0)
            outcome.new_calls.append(
                NewCall(
                    payload.provider,
                    model,
                    payload.finish_reason if isinstance(payload.finish_reason, str) else "unknown",
                    _opt(payload.duration_ms),
                    usage,
                    payload.tokens_unavailable is True or usage.is_unknown,
                    cost is not None,
                )
            )
            acc = running_totals.setdefault(eid, [Usage(), None, 0, 0, None])
            acc[0] = acc[0] + usage
            one_hour = payload.cache_creation_1h_input_tokens
            if isinstance(one_hour, int):
                acc[4] = one_hour if acc[4] is None else acc[4] + one_hour
            if cost is not None:
                acc[1] = money(cost) if acc[1] is None else acc[1] + money(cost)
            else:
                acc[3] += 1  # unpriced: counted, never $0
            acc[2] += 1
            touched_jobs.add(str(execs[eid]["job_id"]))
        if running_totals:
            await self._add_running_totals(conn, running_totals)

        # --- results -------------------------------------------------------------------
        results: list[tuple[int, str, p.ResultPayload]] = []
        seen_results: set[str] = set()
        for i, item in enumerate(batch):
            frame = item.frame
            if not isinstance(frame, p.JobResult):
                continue
            eid = frame.id.lower()
            row = execs.get(eid)
            if row is None or row["daemon_id"] != item.daemon_id:
                continue
            if row["done"] or eid in seen_results:
                outcome.verdicts[i] = "duplicate"
                continue
            seen_results.add(eid)
            outcome.verdicts[i] = "recorded"
            results.append((i, eid, frame.payload))
        if results:
            await self._record_results(
                conn,
                results,
                execs,
                outcome,
                touched_jobs,
                set(running_totals),
            )
        if touched_jobs:
            await conn.execute(RESUM_AND_ANNOUNCE, list(touched_jobs))
        return outcome

    @staticmethod
    def _call_rows(gens: list[tuple[str, p.GenerationPayload, str]]) -> list[dict[str, Any]]:
        return [
            {
                "execution_id": eid,
                "seq": g.seq,
                "provider": g.provider,
                "request_model": _opt(g.request_model),
                "response_model": _opt(g.response_model),
                "finish_reason": _opt(g.finish_reason),
                "input_tokens": _opt(g.input_tokens),
                "output_tokens": _opt(g.output_tokens),
                "cache_read_input_tokens": _opt(g.cache_read_input_tokens),
                "cache_creation_input_tokens": _opt(g.cache_creation_input_tokens),
                "cache_creation_1h_input_tokens": _opt(g.cache_creation_1h_input_tokens),
                "reasoning_tokens": _opt(g.reasoning_tokens),
                "tokens_unavailable": g.tokens_unavailable is True
                or Usage.from_struct(g).is_unknown,
                "cost_usd": _opt(g.cost_usd),  # JSON number text: the decimal the sender wrote
                "cost_source": _opt(g.cost_source),
                "duration_ms": _opt(g.duration_ms),
                "request_id": _opt(g.request_id),
            }
            for eid, g, _ in gens
        ]

    @staticmethod
    async def _add_running_totals(conn: asyncpg.Connection, totals: dict[str, list[Any]]) -> None:
        """Until its result arrives, an execution's totals are the sum of its recorded calls."""
        sets = ",\n".join(
            f"{col} = CASE WHEN d.{col} IS NULL THEN e.{col} "
            f"ELSE coalesce(e.{col}, 0) + d.{col} END"
            for col in [*COLUMNS.values(), "cost_usd", "cache_creation_1h_input_tokens"]
        )
        await conn.execute(
            f"""
            UPDATE executions e SET {sets},
                num_turns = coalesce(e.num_turns, 0) + d.calls,
                unpriced_calls = e.unpriced_calls + d.unpriced
            FROM json_to_recordset($1::json)
                 AS d(id uuid, input_tokens bigint, output_tokens bigint,
                      cache_read_input_tokens bigint, cache_creation_input_tokens bigint,
                      reasoning_tokens bigint, cost_usd numeric, calls int, unpriced int,
                      cache_creation_1h_input_tokens bigint)
            WHERE e.id = d.id AND e.result_recorded_at IS NULL
            """,
            _document(
                [
                    {
                        "id": eid,
                        "input_tokens": usage.input,
                        "output_tokens": usage.output,
                        "cache_read_input_tokens": usage.cache_read,
                        "cache_creation_input_tokens": usage.cache_creation,
                        "reasoning_tokens": usage.reasoning,
                        "cost_usd": cost,
                        "calls": calls,
                        "unpriced": unpriced,
                        "cache_creation_1h_input_tokens": one_hour,
                    }
                    for eid, (usage, cost, calls, unpriced, one_hour) in totals.items()
                ]
            ),
        )

    async def _record_results(
        self,
        conn: asyncpg.Connection,
        results: list[tuple[int, str, p.ResultPayload]],
        execs: dict[str, Any],
        outcome: BatchOutcome,
        touched_jobs: set[str],
        called_now: set[str],
    ) -> None:
        # Only executions that have recorded calls (before or in this batch) need theirs.
        ids = [eid for _, eid, _ in results if execs[eid]["had_calls"] or eid in called_now]
        calls_by_exec: dict[str, list[CallSums]] = defaultdict(list)
        unpriced_calls: dict[str, int] = {}
        calls_1h: dict[str, int] = {}
        if ids:
            call_rows = await conn.fetch(
                """
                SELECT execution_id, coalesce(response_model, request_model) AS model,
                       sum(input_tokens) AS input, sum(output_tokens) AS output,
                       sum(cache_read_input_tokens) AS cache_read,
                       sum(cache_creation_input_tokens) AS cache_creation,
                       sum(reasoning_tokens) AS reasoning, sum(cost_usd) AS cost,
                       count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced,
                       sum(cache_creation_1h_input_tokens) AS cache_1h
                FROM llm_calls WHERE execution_id = ANY(string_to_array($1, ',')::uuid[])
                GROUP BY 1, 2
                """,
                ",".join(ids),
            )
            for r in call_rows:
                eid = str(r["execution_id"])
                unpriced_calls[eid] = unpriced_calls.get(eid, 0) + int(r["unpriced"])
                if r["cache_1h"] is not None:
                    calls_1h[eid] = calls_1h.get(eid, 0) + int(r["cache_1h"])
                fallback = execs[eid]["model"] or execs[eid]["executor"]
                calls_by_exec[eid].append(
                    CallSums(
                        r["model"] or fallback,
                        Usage(*(None if r[b] is None else int(r[b]) for b in BUCKETS)),
                        r["cost"],
                    )
                )

        rows: list[dict[str, Any]] = []
        deciding: list[dict[str, Any]] = []
        for _, eid, payload in results:
            row = execs[eid]
            entries = payload.model_usage if isinstance(payload.model_usage, list) else None
            settled = settle_result(
                outcome.counted,
                payload,
                calls_by_exec.get(eid, ()),
                row["executor"],
                row["model"] or row["executor"],
            )
            if settled.inconsistent:
                outcome.inconsistent += 1
            effective, cost_exact = settled.totals, settled.cost
            # One decider per job: only the job's open attempt (offered or running) decides
            # it. A result for an attempt already reaped (lost, or an offer that timed out or
            # was rejected) is kept as late usage and leaves the job to its current attempt.
            if row["status"] in ("lost", "rejected"):
                status = row["status"]
            elif row["cancel_requested"] or payload.stop_reason == "cancelled":
                status = "cancelled"
            else:
                status = "succeeded" if payload.success else "failed"
            error, stop_reason = _opt(payload.error_message), _opt(payload.stop_reason)
            rows.append(
                {
                    "id": eid,
                    "status": status,
                    "error": error,
                    "stop_reason": stop_reason,
                    "duration_ms": _opt(payload.duration_ms),
                    "num_turns": _opt(payload.num_turns),
                    "input_tokens": effective.input,
                    "output_tokens": effective.output,
                    "cache_read": effective.cache_read,
                    "cache_creation": effective.cache_creation,
                    "reasoning": effective.reasoning,
                    "unavailable": payload.tokens_unavailable is True,
                    "cost": cost_exact,
                    "cost_source": _opt(payload.cost_source),
                    "model_usage": entries,
                    "unpriced": _unpriced(eid, unpriced_calls, settled.cost, effective),
                    # The 1-hour sub-bucket: as the result sent it, else its calls' sum.
                    "cache_1h": payload.cache_creation_1h_input_tokens
                    if isinstance(payload.cache_creation_1h_input_tokens, int)
                    else calls_1h.get(eid),
                }
            )
            job_id = str(row["job_id"])
            if status not in ("lost", "rejected"):
                deciding.append(
                    {"job_id": job_id, "status": status, "error": error, "stop_reason": stop_reason}
                )
            touched_jobs.add(job_id)
            outcome.freed_executions.append(eid)

        # One JSON document carries the batch: built by msgspec in C, parsed by PostgreSQL,
        # where per-element array parameters cost the writer a Python-level type check each.
        # The per-model rows are read from the same document's modelUsage lists.
        await conn.execute(RECORD_RESULTS, _document(rows))
        if deciding:
            finished = await conn.fetch(
                """
                UPDATE jobs j SET status = u.status, finished_at = now(), error = u.error,
                    stop_reason = u.stop_reason,
                    input_tokens = s.input_tokens, output_tokens = s.output_tokens,
                    cache_read_input_tokens = s.cache_read_input_tokens,
                    cache_creation_input_tokens = s.cache_creation_input_tokens,
                    reasoning_tokens = s.reasoning_tokens, cost_usd = s.cost_usd,
                    num_turns = s.num_turns, unpriced_calls = s.unpriced_calls,
                    cache_creation_1h_input_tokens = s.cache_creation_1h_input_tokens
                FROM json_to_recordset($1::json)
                     AS u(job_id uuid, status text, error text, stop_reason text)
                CROSS JOIN LATERAL (
                    SELECT sum(input_tokens) AS input_tokens,
                           sum(output_tokens) AS output_tokens,
                           sum(cache_read_input_tokens) AS cache_read_input_tokens,
                           sum(cache_creation_input_tokens) AS cache_creation_input_tokens,
                           sum(reasoning_tokens) AS reasoning_tokens,
                           sum(cost_usd) AS cost_usd, sum(num_turns) AS num_turns,
                           sum(unpriced_calls) AS unpriced_calls,
                           sum(cache_creation_1h_input_tokens)
                               AS cache_creation_1h_input_tokens
                    FROM executions e WHERE e.job_id = u.job_id
                ) s
                WHERE j.id = u.job_id AND j.status = 'running'
                RETURNING j.id, j.executor, j.status,
                          extract(epoch FROM now() - j.created_at) AS age
                """,
                _document(deciding),
            )
            outcome.finished_jobs.extend(
                FinishedJob(str(r["id"]), r["executor"], r["status"], float(r["age"]))
                for r in finished
            )
            # Those jobs' totals were recomputed by the same statement.
            touched_jobs.difference_update(str(r["id"]) for r in finished)
