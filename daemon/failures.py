"""Whether a failed attempt may succeed if tried again, from the exception that ended it.

The provider SDKs (anthropic, openai, google-genai, ollama) raise exceptions carrying the HTTP
status (``status_code``, or ``code`` for google-genai) and the response; connection failures
and request timeouts are their own classes. Read by attribute and class name, so no SDK is
imported here:

- retryable: 408, 409, 425, 429, any 5xx (529 is Anthropic's "overloaded"), connection errors,
  request timeouts; the provider's ``retry-after`` (seconds or an HTTP date) is kept;
- permanent: every other 4xx (authentication, permission, invalid request, not found) and any
  other exception (a bug, an invalid spec): trying again would fail the same way.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

from shared.limits import ErrorClass

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
# Longest retry-after honoured; a provider asking for more is waited for this long.
MAX_RETRY_AFTER_MS = 600_000.0


def _status(exc: BaseException) -> int | None:
    for name in ("status_code", "code", "status"):
        value = getattr(exc, name, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None)
    return value if isinstance(value, int) else None


def _retry_after_ms(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers: Any = getattr(response, "headers", None)
    if headers is None:
        return None
    raw = headers.get("retry-after-ms") or headers.get("retry-after")
    if not isinstance(raw, str) or not raw.strip():
        return None
    raw = raw.strip()
    try:
        ms = float(raw) if headers.get("retry-after-ms") else float(raw) * 1000
    except ValueError:
        when = email.utils.parsedate_to_datetime(raw) if raw else None
        if when is None:
            return None
        ms = (when.timestamp() - time.time()) * 1000
    if ms != ms or ms < 0:  # NaN or in the past
        return None
    return min(ms, MAX_RETRY_AFTER_MS)


def classify(exc: BaseException) -> tuple[ErrorClass, float | None]:
    """The class of the failure and the provider's retry-after in ms (None when not given)."""
    status = _status(exc)
    if status is not None:
        if status in RETRYABLE_STATUS or status >= 500:
            return "retryable", _retry_after_ms(exc)
        return "permanent", None
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"APIConnectionError", "APITimeoutError", "ConnectError", "ReadTimeout"} or (
        isinstance(exc, ConnectionError | TimeoutError)
    ):
        return "retryable", None
    return "permanent", None
