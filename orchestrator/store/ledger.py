"""SQL of the ledger: one transaction per batch of ``job:generation``, ``job:tool`` and
``job:result`` frames (the rows they become: :mod:`ledger_rows` and :mod:`tools`).

Idempotent on (execution id, seq) for calls and tool calls and (execution id) for results,
fenced on the daemon an execution is assigned to. Returns what was *newly* recorded so that
the metrics count each token exactly once, after the commit.
"""

from __future__ import annotations

import secrets
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from msgspec import UnsetType

from orchestrator.accounting import (
    BatchOutcome,
    CallSums,
    FinishedJob,
    count,
    merge_counted,
    settle_result,
    unpriced_calls_of,
)
from orchestrator.rollups import Increments, vec
from orchestrator.store import ledger_sql as sql
from orchestrator.store.ledger_rows import (
    add_running_totals,
    call_rows,
    count_call,
    document,
    fenced,
    none_if_unset,
)
from orchestrator.store.tools import record_tools
from orchestrator.usage_events import attempt_event, call_event
from shared import protocol as p
from shared.limits import MAX_RETRY_AFTER_MS
from shared.output import DEFAULT_MAX_OUTPUT_BYTES, as_text, fit
from shared.usage import BUCKETS, Usage

__all__ = ["BatchOutcome", "Incoming", "LedgerStore", "count", "merge_counted"]

# Rollup shards a writer picks from (at random, once); a past hour is folded into shard 0.
ROLLUP_SHARDS = 64


@dataclass(frozen=True, slots=True)
class Incoming:
    """A validated job frame waiting to be persisted, with the daemon that sent it."""

    daemon_id: str
    frame: p.JobGeneration | p.JobTool | p.JobResult


class LedgerStore:
    """Batched, idempotent persistence of calls and results."""

    def __init__(
        self,
        dsn: str,
        connect_timeout: float = 5.0,
        shard: int | None = None,
        retry_backoff: float = 1.0,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        usage_events: bool = False,
    ) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        # Seconds before a job's second attempt after a retryable failure (doubled per attempt).
        self.retry_backoff = retry_backoff
        # An attempt's answer is stored cut to this many bytes (flagged as cut).
        self.max_output_bytes = max_output_bytes
        # Build a usage event per recorded call and result (logged after the commit).
        self.usage_events = usage_events
        # This writer's rollup shard (see migration 0009): writers that share none never wait
        # for each other's rollup rows.
        self.shard = secrets.randbelow(ROLLUP_SHARDS) if shard is None else shard
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        # The writer owns one connection: no pool hand-offs on the hot path, and after an
        # outage a fresh connection instead of whatever state a pool holder is in.
        if self._conn is None or self._conn.is_closed():
            # Every statement of the writer reaches a batch's rows by primary key. With the
            # default random_page_cost (4, spinning disks) the planner hashes a batch of a few
            # hundred rows against a sequential scan of jobs and executions once those hold a
            # few ten thousand rows: milliseconds per batch where index probes take a tenth.
            self._conn = await asyncpg.connect(
                self.dsn,
                timeout=self.connect_timeout,
                server_settings={"random_page_cost": "1.1"},
            )
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
        # One text parameter: asyncpg type-checks every element of an array parameter in
        # Python. The ids were checked as UUIDs by the decoder.
        rows = await conn.fetch(sql.LOCK_EXECUTIONS, ",".join(exec_ids))
        execs = {str(r["id"]): r for r in rows}
        # The batch's one time, read once its executions are locked: a batch that waited for
        # another's lock is recorded after it, so "recorded up to the result" is exact.
        at = await conn.fetchval("SELECT clock_timestamp()")
        touched_jobs: set[str] = set()
        rollups = Increments()
        called_now = await self._record_calls(
            conn, batch, execs, outcome, touched_jobs, at, rollups
        )
        await record_tools(conn, batch, execs, outcome, at)
        results = self._new_results(batch, execs, outcome)
        if results:
            await self._record_results(
                conn, results, execs, outcome, touched_jobs, called_now, at, rollups
            )
        if touched_jobs:
            await conn.execute(sql.RESUM_AND_ANNOUNCE, list(touched_jobs))
        if rollups.cells:
            # A batch without results: its calls' increments, last (the hour's rollup rows are
            # the ones every writer shares, so their locks are held only until the commit).
            await conn.execute(sql.UPSERT_ROLLUPS, document(rollups.rows()), at, self.shard)
        return outcome

    async def _record_calls(
        self,
        conn: asyncpg.Connection,
        batch: Sequence[Incoming],
        execs: dict[str, Any],
        outcome: BatchOutcome,
        touched_jobs: set[str],
        at: datetime,
        rollups: Increments,
    ) -> set[str]:
        """Insert the batch's new calls, count them, add them to their executions' running
        totals and the rollups; return the executions that got calls."""
        gen_index: dict[tuple[str, int], list[int]] = defaultdict(list)
        gens: list[tuple[str, p.GenerationPayload, str]] = []
        for i, item in enumerate(batch):
            frame = item.frame
            if not isinstance(frame, p.JobGeneration):
                continue
            eid = frame.id.lower()
            row = fenced(execs, eid, item.daemon_id)
            if row is None:
                continue
            key = (eid, frame.payload.seq)
            if key not in gen_index:
                gens.append((eid, frame.payload, row["model"] or row["executor"]))
            gen_index[key].append(i)
        if not gens:
            return set()
        new_rows = await conn.fetch(sql.INSERT_CALLS, document(call_rows(gens)), at)
        inserted = {(str(r["execution_id"]), r["seq"]) for r in new_rows}
        # An execution counts once in the rollups: at its first call.
        first_seq: dict[str, int] = {}
        for eid, seq in inserted:
            if not execs[eid]["had_calls"] and not execs[eid]["done"]:
                first_seq[eid] = min(seq, first_seq.get(eid, seq))
        running_totals: dict[str, list[Any]] = {}
        for eid, payload, fallback in gens:
            key = (eid, payload.seq)
            for i in gen_index[key]:
                outcome.verdicts[i] = "duplicate"
            if key not in inserted:
                continue
            outcome.verdicts[gen_index[key][0]] = "recorded"
            row = execs[eid]
            model, usage, cost = count_call(
                outcome, payload, fallback, row["done"], running_totals, eid
            )
            rollups.call(
                (model, payload.provider, row["executor"], row["labels"]),
                vec(usage),
                cost,
                counted=not row["done"],
                first=first_seq.get(eid) == payload.seq,
            )
            if self.usage_events:
                outcome.events.append(call_event(eid, row, payload, model, usage, cost))
            touched_jobs.add(str(row["job_id"]))
        if running_totals:
            await add_running_totals(conn, running_totals)
            late = [eid for eid in running_totals if execs[eid]["done"]]
            if late:  # outside the result's totals, but exported (their rows are locked)
                await conn.execute(sql.MARK_OTLP_PENDING, ",".join(late))
        return set(running_totals)

    def _output(self, payload: p.ResultPayload) -> dict[str, Any]:
        """The attempt's answer as stored: text (an object as its JSON), cut to the cap."""
        if isinstance(payload.output, UnsetType):
            return {}
        value, cut = fit(payload.output, self.max_output_bytes)
        text, form = as_text(value)
        return {
            "output": text,
            "output_format": form,
            "output_truncated": cut or payload.output_truncated is True,
        }

    @staticmethod
    def _new_results(
        batch: Sequence[Incoming], execs: dict[str, Any], outcome: BatchOutcome
    ) -> list[tuple[int, str, p.ResultPayload]]:
        """The batch's results to record: fenced on their daemon, each execution's once."""
        results: list[tuple[int, str, p.ResultPayload]] = []
        seen_results: set[str] = set()
        for i, item in enumerate(batch):
            frame = item.frame
            if not isinstance(frame, p.JobResult):
                continue
            eid = frame.id.lower()
            row = fenced(execs, eid, item.daemon_id)
            if row is None:
                continue
            if row["done"] or eid in seen_results:
                outcome.verdicts[i] = "duplicate"
                continue
            seen_results.add(eid)
            outcome.verdicts[i] = "recorded"
            results.append((i, eid, frame.payload))
        return results

    async def _record_results(
        self,
        conn: asyncpg.Connection,
        results: list[tuple[int, str, p.ResultPayload]],
        execs: dict[str, Any],
        outcome: BatchOutcome,
        touched_jobs: set[str],
        called_now: set[str],
        at: datetime,
        rollups: Increments,
    ) -> None:
        # Only executions that have recorded calls (before or in this batch) need theirs.
        ids = [eid for _, eid, _ in results if execs[eid]["had_calls"] or eid in called_now]
        calls_by_exec: dict[str, list[CallSums]] = defaultdict(list)
        call_keys: dict[str, list[dict[str, Any]]] = defaultdict(list)
        unpriced_calls: dict[str, int] = {}
        calls_1h: dict[str, int] = {}
        if ids:
            call_rows = await conn.fetch(
                sql.CALLS_BY_MODEL,
                ",".join(ids),
            )
            for r in call_rows:
                eid = str(r["execution_id"])
                unpriced_calls[eid] = unpriced_calls.get(eid, 0) + int(r["unpriced"])
                if r["cache_1h"] is not None:
                    calls_1h[eid] = calls_1h.get(eid, 0) + int(r["cache_1h"])
                row = execs[eid]
                model = r["model"] or row["model"] or row["executor"]
                usage = Usage(*(None if r[b] is None else int(r[b]) for b in BUCKETS))
                calls_by_exec[eid].append(CallSums(model, usage, r["cost"]))
                call_keys[eid].append(
                    {
                        "model": model,
                        "provider": r["provider"],
                        **{f"b{i}": r[b] for i, b in enumerate(BUCKETS)},
                        "cost": r["cost"],
                    }
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
            error, stop_reason = (
                none_if_unset(payload.error_message),
                none_if_unset(payload.stop_reason),
            )
            unpriced = unpriced_calls_of(eid, unpriced_calls, settled.cost, effective)
            rows.append(
                {
                    "id": eid,
                    "status": status,
                    "error": error,
                    "stop_reason": stop_reason,
                    "duration_ms": none_if_unset(payload.duration_ms),
                    "num_turns": none_if_unset(payload.num_turns),
                    "input_tokens": effective.input,
                    "output_tokens": effective.output,
                    "cache_read": effective.cache_read,
                    "cache_creation": effective.cache_creation,
                    "reasoning": effective.reasoning,
                    "unavailable": payload.tokens_unavailable is True,
                    "cost": cost_exact,
                    "cost_source": none_if_unset(payload.cost_source),
                    "model_usage": entries,
                    "unpriced": unpriced,
                    # Its rollup key and recorded calls (see RECORD_RESULTS).
                    "job_model": row["model"] or row["executor"],
                    "executor": row["executor"],
                    "labels": row["labels"],
                    "calls": call_keys.get(eid),
                    "calls_unpriced": unpriced_calls.get(eid),
                    "error_class": none_if_unset(payload.error_class),
                    **self._output(payload),
                    # The 1-hour sub-bucket: as the result sent it, else its calls' sum.
                    "cache_1h": payload.cache_creation_1h_input_tokens
                    if isinstance(payload.cache_creation_1h_input_tokens, int)
                    else calls_1h.get(eid),
                }
            )
            if self.usage_events:
                outcome.events.append(
                    attempt_event(eid, row, payload, status, effective, cost_exact)
                )
            job_id = str(row["job_id"])
            if status not in ("lost", "rejected"):
                deciding.append(
                    {
                        "job_id": job_id,
                        "status": status,
                        "error": error,
                        "stop_reason": stop_reason,
                        "retryable": payload.error_class == "retryable",
                        "retry_after_ms": none_if_unset(payload.retry_after_ms),
                    }
                )
            touched_jobs.add(job_id)
            outcome.freed_executions.append(eid)

        # One JSON document carries the batch: built by msgspec in C, parsed by PostgreSQL,
        # where per-element array parameters cost the writer a Python-level type check each.
        # The per-model rows are read from the same document's modelUsage lists.
        # The calls' rollup increments go in the same statement: one upsert per batch.
        await conn.execute(
            sql.RECORD_RESULTS, document(rows), at, document(rollups.rows()), self.shard
        )
        rollups.cells.clear()
        if deciding:
            finished = await conn.fetch(
                sql.DECIDE_JOBS,
                document(deciding),
                self.retry_backoff,
                MAX_RETRY_AFTER_MS / 1000,
            )
            outcome.finished_jobs.extend(
                FinishedJob(str(r["id"]), r["executor"], r["status"], float(r["age"]))
                for r in finished
                if r["status"] != "queued"  # re-queued for another attempt
            )
            # Those jobs' totals were recomputed by the same statement.
            touched_jobs.difference_update(str(r["id"]) for r in finished)
