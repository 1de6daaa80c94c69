"""Rendering report rows as a rich table, JSON or CSV; numbers grouped and aligned."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.store.reports import WIRE, UsageRow, usage_documents
from shared.usage import COLUMNS

# Column headers in the table's order; names of buckets come from shared.usage.
HEADERS = {
    "input": "input",
    "cache_read": "cache read",
    "cache_creation": "cache write",
    "output": "output",
    "reasoning": "reasoning",
}
USAGE_COLUMNS = tuple((label, COLUMNS[bucket]) for bucket, label in HEADERS.items())


def _csv_rows(rows: Sequence[UsageRow]) -> list[dict[str, Any]]:
    out = []
    for d in usage_documents(rows):
        group = d.pop("group")
        unreported = d.pop("unreportedCalls")
        d = {**group, **d}
        for _, attr in USAGE_COLUMNS:
            d[f"unreported{WIRE[attr][0].upper()}{WIRE[attr][1:]}Calls"] = unreported.get(
                WIRE[attr], 0
            )
        out.append({k: "" if v is None else v for k, v in d.items()})
    return out


def _tokens(value: int | None, unreported: int) -> str:
    """A bucket: the number, 'unknown', or the number with how many calls did not report it."""
    if value is None:
        return f"unknown ({unreported:,} calls)" if unreported else "unknown"
    return f"{value:,}" + (f" ({unreported:,} calls unknown)" if unreported else "")


def _cost(value: float | None, unpriced: int) -> str:
    if value is None:
        return f"unpriced ({unpriced:,} calls)" if unpriced else "unpriced"
    return (f">= {value:,.6f} ({unpriced:,} unpriced)") if unpriced else f"{value:,.6f}"


def _sum(values: Sequence[int | float | None]) -> Any:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def render_usage(rows: Sequence[UsageRow], by: Sequence[str], fmt: str, console: Console) -> None:
    """Print the usage report in the requested format."""
    if fmt == "json":
        console.print_json(json.dumps(usage_documents(rows)))
        return
    if fmt == "csv":
        buffer = io.StringIO()
        data = _csv_rows(rows)
        fields = list(data[0]) if data else ["key"]
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(data)
        console.file.write(buffer.getvalue())
        return
    table = Table(title=f"Token usage by {', '.join(by)}", show_footer=True)
    totals = {attr: _sum([getattr(r, attr) for r in rows]) for _, attr in USAGE_COLUMNS}
    unknown = {attr: sum(r.unreported.get(attr, 0) for r in rows) for _, attr in USAGE_COLUMNS}
    for i, dim in enumerate(by):
        table.add_column(dim, footer="total" if i == 0 else "", no_wrap=True, overflow="fold")
    for label, attr in USAGE_COLUMNS:
        table.add_column(label, justify="right", footer=_tokens(totals[attr], unknown[attr]))
    read = totals["cache_read_input_tokens"] or 0
    total_in = sum(
        totals[a] or 0 for a in (COLUMNS["input"], COLUMNS["cache_read"], COLUMNS["cache_creation"])
    )
    table.add_column(
        "cache hit", justify="right", footer=f"{read / total_in:.1%}" if total_in else "-"
    )
    table.add_column("calls", justify="right", footer=f"{sum(r.calls for r in rows):,}")
    table.add_column(
        "cost (USD)",
        justify="right",
        footer=_cost(_sum([r.cost_usd for r in rows]), sum(r.unpriced_calls for r in rows)),
    )
    for r in rows:
        ratio = r.cache_hit_ratio
        table.add_row(
            *(r.group.get(dim, r.key) for dim in by),
            *(_tokens(getattr(r, attr), r.unreported.get(attr, 0)) for _, attr in USAGE_COLUMNS),
            "-" if ratio is None else f"{ratio:.1%}",
            f"{r.calls:,}",
            _cost(r.cost_usd, r.unpriced_calls),
        )
    console.print(table)
