"""Rendering report rows as a rich table, JSON or CSV; numbers grouped and aligned."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.store.reports import UsageRow

USAGE_COLUMNS = (
    ("input", "input_tokens"),
    ("cache read", "cache_read_input_tokens"),
    ("cache write", "cache_creation_input_tokens"),
    ("output", "output_tokens"),
    ("reasoning", "reasoning_tokens"),
)


def usage_dicts(rows: Sequence[UsageRow]) -> list[dict[str, Any]]:
    """Rows as plain dicts (JSON/CSV), with the derived fields."""
    return [
        {
            "key": r.key,
            "inputTokens": r.input_tokens,
            "cacheReadInputTokens": r.cache_read_input_tokens,
            "cacheCreationInputTokens": r.cache_creation_input_tokens,
            "outputTokens": r.output_tokens,
            "reasoningTokens": r.reasoning_tokens,
            "totalInputTokens": r.total_input,
            "cacheHitRatio": r.cache_hit_ratio,
            "costUsd": round(r.cost_usd, 10),
            "calls": r.calls,
            "executions": r.executions,
        }
        for r in rows
    ]


def render_usage(rows: Sequence[UsageRow], group_by: str, fmt: str, console: Console) -> None:
    """Print the usage report in the requested format."""
    if fmt == "json":
        console.print_json(json.dumps(usage_dicts(rows)))
        return
    if fmt == "csv":
        buffer = io.StringIO()
        data = usage_dicts(rows)
        fields = list(data[0]) if data else ["key"]
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(data)
        console.file.write(buffer.getvalue())
        return
    table = Table(title=f"Token usage by {group_by}", show_footer=True)
    totals = {attr: sum(getattr(r, attr) for r in rows) for _, attr in USAGE_COLUMNS}
    table.add_column(group_by, footer="total", no_wrap=True, overflow="fold")
    for label, attr in USAGE_COLUMNS:
        table.add_column(label, justify="right", footer=f"{totals[attr]:,}")
    read, total_in = (
        totals["cache_read_input_tokens"],
        (
            totals["input_tokens"]
            + totals["cache_read_input_tokens"]
            + totals["cache_creation_input_tokens"]
        ),
    )
    table.add_column(
        "cache hit", justify="right", footer=f"{read / total_in:.1%}" if total_in else "-"
    )
    table.add_column("calls", justify="right", footer=f"{sum(r.calls for r in rows):,}")
    table.add_column("cost (USD)", justify="right", footer=f"{sum(r.cost_usd for r in rows):,.6f}")
    for r in rows:
        ratio = r.cache_hit_ratio
        table.add_row(
            r.key,
            *(f"{getattr(r, attr):,}" for _, attr in USAGE_COLUMNS),
            "-" if ratio is None else f"{ratio:.1%}",
            f"{r.calls:,}",
            f"{r.cost_usd:,.6f}",
        )
    console.print(table)
