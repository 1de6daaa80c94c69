"""Whether a failed attempt may succeed if tried again, from the exception that ended it.

The provider SDKs (anthropic, openai, google-genai, ollama) raise exceptions carrying the HTTP
status (``status_code``, or ``code`` for google-genai) and the response; connection failures
and request timeouts are their own classes. Read by attribute and class name, so no SDK is
imported here:

- retryable: 408, 409, 425, 429, any 5xx (529 is Anthropic's "overloaded"), connection errors,
  request timeouts and streams cut short (a ``TimeoutError`` raised inside an SDK is the
  provider's, not the job's own timeout); the provider's ``retry-after`` (seconds or an HTTP
  date) is kept, up to :data:`shared.limits.MAX_RETRY_AFTER_MS`;
- permanent: every other 4xx (authentication, permission, invalid request, not found) and any
  other exception (a bug, an invalid spec): trying again would fail the same way.

:func:`classify` is total: whatever the exception holds (a garbage ``retry-after``, a hostile
attribute), it answers, so the attempt always gets its ``job:result``.
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from typing import Any

from shared.limits import MAX_RETRY_AFTER_MS, ErrorClass

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
# Exception classes (by name, anywhere in the MRO) that mean the provider or the link failed,
# not the request: the SDKs' connection and timeout errors, httpx's and aiohttp's transport
# errors, and a stream that ended before it finished (daemon.executors.StreamCutError).
RETRYABLE_NAMES = frozenset(
    {
        "APIConnectionError",
        "APITimeoutError",
        "ConnectError",
        "ReadTimeout",
        "TransportError",
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "StreamCutError",
    }
)

__all__ = ["MAX_RETRY_AFTER_MS", "classify"]


def _status(exc: BaseException) -> int | None:
    for name in ("status_code", "code", "status"):
        value = getattr(exc, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None)
    return value if isinstance(value, int) and 100 <= value <= 599 else None


def _header(headers: Any, name: str) -> str | None:
    value = headers.get(name)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _bounded(ms: float) -> float | None:
    """A wait in ms within ``0 ..= MAX_RETRY_AFTER_MS``; None for NaN, infinity or the past."""
    if not math.isfinite(ms) or ms < 0:
        return None
    return min(ms, MAX_RETRY_AFTER_MS)


def _seconds_or_date(raw: str) -> float | None:
    """``retry-after``: delta-seconds, or an HTTP date; None for anything else."""
    try:
        return _bounded(float(raw) * 1000)
    except (ValueError, OverflowError):
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None  # "soon", "2s": not a date either
    try:
        return _bounded((when.timestamp() - time.time()) * 1000)
    except (ValueError, OverflowError, OSError):
        return None


def retry_after_ms(exc: BaseException) -> float | None:
    """The wait the provider asked for (``retry-after-ms``, else ``retry-after`` in seconds or
    as an HTTP date), bounded; None when absent or unreadable. Never raises."""
    try:
        headers: Any = getattr(getattr(exc, "response", None), "headers", None)
        if headers is None:
            return None
        raw_ms = _header(headers, "retry-after-ms")
        if raw_ms is not None:
            try:
                found = _bounded(float(raw_ms))
            except (ValueError, OverflowError):
                found = None
            if found is not None:
                return found
        raw = _header(headers, "retry-after")
        return _seconds_or_date(raw) if raw is not None else None
    except Exception:  # a provider's headers are not worth an attempt without a result
        return None


def _classify(exc: BaseException) -> tuple[ErrorClass, float | None]:
    status = _status(exc)
    if status is not None:
        if status in RETRYABLE_STATUS or status >= 500:
            return "retryable", retry_after_ms(exc)
        return "permanent", None
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & RETRYABLE_NAMES or isinstance(exc, ConnectionError | TimeoutError):
        return "retryable", None
    return "permanent", None


def classify(exc: BaseException) -> tuple[ErrorClass, float | None]:
    """The class of the failure and the provider's retry-after in ms (None when not given).

    Total: an exception it cannot read is permanent, never a second exception."""
    try:
        return _classify(exc)
    except Exception:
        log.warning("could not classify %s; treating it as permanent", type(exc).__name__)
        return "permanent", None
