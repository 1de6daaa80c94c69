"""The rows the ledger writer sends: calls as JSON documents, a call's count and running
totals, and the small helpers every statement of a batch shares (see :mod:`ledger`)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
from msgspec import UNSET

from orchestrator.accounting import BatchOutcome, NewCall, count
from orchestrator.store import ledger_sql as sql
from shared import protocol as p
from shared.usage import Usage, money

_row_encoder = msgspec.json.Encoder(decimal_format="number")
_exact_decoder = msgspec.json.Decoder(float_hook=Decimal)


def document(rows: object) -> str:
    """Rows as one JSON document for ``json_to_recordset``.

    PostgreSQL text cannot hold U+0000, and refusing a frame for it would drop its tokens: it
    is stored as U+FFFD. One scan of the encoded bytes; only a document with it is rebuilt.
    """
    doc = _row_encoder.encode(rows)
    if b"\\u0000" in doc:
        doc = _row_encoder.encode(p.scrub_nul(_exact_decoder.decode(doc)))
    return doc.decode()


def none_if_unset(value: Any) -> Any:
    """UNSET (a field the frame omitted) becomes None (NULL in the ledger)."""
    return None if value is UNSET else value


def fenced(execs: dict[str, Any], execution_id: str, daemon_id: str) -> Any:
    """The execution's row when it is assigned to the daemon that sent the frame, else None."""
    row = execs.get(execution_id)
    return row if row is not None and row["daemon_id"] == daemon_id else None


def call_model(payload: p.GenerationPayload, fallback: str) -> str:
    for value in (payload.response_model, payload.request_model):
        if isinstance(value, str):
            return value
    return fallback


def count_call(
    outcome: BatchOutcome,
    payload: p.GenerationPayload,
    fallback: str,
    result_done: bool,
    running_totals: dict[str, list[Any]],
    eid: str,
) -> tuple[str, Usage, Decimal | None]:
    """Count a newly recorded call and add it to its execution's running totals; return
    its model, usage and exact cost (for the rollups)."""
    usage = Usage.from_struct(payload)
    cost = payload.cost_usd if isinstance(payload.cost_usd, float | int) else None
    model = call_model(payload, fallback)
    if not result_done:
        # A call arriving after its execution's result is outside the result's totals,
        # which do not change: count it as a call, not as tokens.
        count(outcome.counted, payload.provider, model, usage, cost or 0.0)
    outcome.new_calls.append(
        NewCall(
            payload.provider,
            model,
            payload.finish_reason if isinstance(payload.finish_reason, str) else "unknown",
            none_if_unset(payload.duration_ms),
            usage,
            payload.tokens_unavailable is True or usage.is_unknown,
            cost is not None,
            payload.usage_inconsistent is True,
        )
    )
    acc = running_totals.setdefault(eid, [Usage(), None, 0, 0, None])
    acc[0] = acc[0] + usage
    one_hour = payload.cache_creation_1h_input_tokens
    if isinstance(one_hour, int):
        acc[4] = one_hour if acc[4] is None else acc[4] + one_hour
    exact = None if cost is None else money(cost)
    if exact is not None:
        acc[1] = exact if acc[1] is None else acc[1] + exact
    else:
        acc[3] += 1  # unpriced: counted, never $0
    acc[2] += 1
    return model, usage, exact


def call_rows(gens: list[tuple[str, p.GenerationPayload, str]]) -> list[dict[str, Any]]:
    return [
        {
            "execution_id": eid,
            "seq": g.seq,
            "provider": g.provider,
            "request_model": none_if_unset(g.request_model),
            "response_model": none_if_unset(g.response_model),
            "finish_reason": none_if_unset(g.finish_reason),
            "input_tokens": none_if_unset(g.input_tokens),
            "output_tokens": none_if_unset(g.output_tokens),
            "cache_read_input_tokens": none_if_unset(g.cache_read_input_tokens),
            "cache_creation_input_tokens": none_if_unset(g.cache_creation_input_tokens),
            "cache_creation_1h_input_tokens": none_if_unset(g.cache_creation_1h_input_tokens),
            "reasoning_tokens": none_if_unset(g.reasoning_tokens),
            "tokens_unavailable": g.tokens_unavailable is True or Usage.from_struct(g).is_unknown,
            "cost_usd": none_if_unset(g.cost_usd),  # JSON number text: the decimal the sender wrote
            "cost_source": none_if_unset(g.cost_source),
            "duration_ms": none_if_unset(g.duration_ms),
            "request_id": none_if_unset(g.request_id),
            "started_at": none_if_unset(g.started_at),
            "usage_inconsistent": g.usage_inconsistent is True,
        }
        for eid, g, _ in gens
    ]


async def add_running_totals(conn: asyncpg.Connection, totals: dict[str, list[Any]]) -> None:
    """Until its result arrives, an execution's totals are the sum of its recorded calls."""
    await conn.execute(
        sql.ADD_RUNNING_TOTALS,
        document(
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
