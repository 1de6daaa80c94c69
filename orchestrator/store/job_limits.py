"""A job's limits across its attempts, as an offer carries them (pure rules, no I/O).

A job's ``budgetUsd``, ``maxTurns``, ``maxTotalTokens``, ``maxOutputTokens`` and ``timeoutMs``
bound the job, not each attempt: a retry is offered what its earlier attempts left (their
recorded cost, calls, tokens and run time taken off), and a retry with nothing left of one of
them is decided at the claim (failed, ``stopReason`` the limit) instead of offered. The server's
``--default-max-turns`` is offered (per attempt) only to an attempt offered none of
``maxTurns``, ``budgetUsd`` (its own or its budget's reservation) and ``timeoutMs``: nothing
else would stop its tool loop. Every value is clamped to what the wire allows, so an offer's
limits always decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec

from shared import protocol as p
from shared.limits import MAX_COUNTER, MAX_MONEY

MAX_INT = 2**31 - 1  # maxTurns and timeoutMs are PositiveInt on the wire


class LimitError(ValueError):
    """A stored limit the wire cannot carry (not a number, negative): the job is failed."""


@dataclass(frozen=True, slots=True)
class Used:
    """What a job's earlier attempts spent, as recorded."""

    cost_usd: Decimal = Decimal(0)
    turns: int = 0
    tokens: int = 0
    output_tokens: int = 0
    run_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Exhausted:
    """A retry whose job has nothing left of one limit."""

    stop_reason: str
    reason: str


# camelCase limit -> (stop reason, what an attempt used of it, the wire's bound).
_RULES: dict[str, tuple[str, str, float]] = {
    "budgetUsd": ("budget", "cost_usd", MAX_MONEY),
    "maxTurns": ("max_turns", "turns", MAX_INT),
    "maxTotalTokens": ("max_total_tokens", "tokens", MAX_COUNTER),
    "maxOutputTokens": ("max_output_tokens", "output_tokens", MAX_COUNTER),
    "timeoutMs": ("timeout", "run_ms", MAX_INT),
}


def _number(key: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise LimitError(f"limits.{key} {value!r}: not a number")
    if value < 0:
        raise LimitError(f"limits.{key} {value!r}: negative")
    return value


def offer_limits(limits: dict[str, Any], used: Used | None) -> dict[str, Any] | Exhausted:
    """The limits an attempt is offered: the job's own less what ``used`` (None: a first
    attempt) spent, clamped to the wire's bounds; :class:`Exhausted` for a retry with nothing
    left; LimitError for a stored value the wire cannot carry."""
    out: dict[str, Any] = {}
    wanted = dict(limits)
    for key, (stop_reason, spent_field, bound) in _RULES.items():
        if key not in wanted:
            continue
        own = _number(key, wanted[key])
        spent = getattr(used, spent_field) if used is not None else 0
        if key == "budgetUsd":
            left_usd = Decimal(str(own)) - Decimal(spent)
            if used is not None and left_usd <= 0:
                return Exhausted(stop_reason, f"{key}={own}, ${spent:.6f} spent")
            out[key] = float(min(max(left_usd, Decimal(0)), Decimal(str(bound))))
            continue
        left = int(own - spent)
        if used is not None and left <= 0:
            return Exhausted(stop_reason, f"{key}={own}, {_shown(spent)} used")
        floor = 1 if key in ("maxTurns", "timeoutMs") else 0  # PositiveInt on the wire
        out[key] = int(min(max(left, floor), bound))
    try:
        msgspec.convert(out, p.Limits)
    except msgspec.ValidationError as exc:  # a bound above is wrong: never offer it
        raise LimitError(f"limits {out}: {exc}") from None
    return out


def with_default_turns(offered: dict[str, Any], default_max_turns: int | None) -> dict[str, Any]:
    """An offer's limits with ``default_max_turns`` added when it has none of maxTurns,
    budgetUsd and timeoutMs (an unbounded tool loop); otherwise as they are."""
    if not default_max_turns or any(k in offered for k in ("maxTurns", "budgetUsd", "timeoutMs")):
        return offered
    return {**offered, "maxTurns": min(default_max_turns, MAX_INT)}


def exhausted_error(found: Exhausted, attempts: int) -> str:
    """The error of a job decided at the claim because its limits are used up."""
    return f"job limit used up by its {attempts} earlier attempt(s): {found.reason}"


def _shown(value: float | int) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.0f}"
