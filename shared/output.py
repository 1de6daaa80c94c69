"""A job's answer: cut to a size in bytes, and kept within the nesting a frame may have."""

from __future__ import annotations

from typing import Any

import msgspec

DEFAULT_MAX_OUTPUT_BYTES = 262_144  # 256 KiB
# The most a daemon may send: half the orchestrator's default frame limit (1 MiB).
MAX_OUTPUT_BYTES = 524_288
_encoder = msgspec.json.Encoder()


def depth(value: Any) -> int:
    """How deeply a plain JSON value nests (a scalar is 0, ``{}`` and ``[]`` are 1)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
            deepest = max(deepest, level + 1)
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
            deepest = max(deepest, level + 1)
    return deepest


def cut_text(text: str, max_bytes: int) -> tuple[str, bool]:
    """The text cut so that it takes at most ``max_bytes`` as a JSON string in a frame (never
    inside a character). Measured encoded, not as raw UTF-8: control characters take six
    bytes each in JSON, and a frame past the orchestrator's size limit would close the link."""
    size = len(_encoder.encode(text))
    if size <= max_bytes:
        return text, False
    cut = text.encode("utf-8", "surrogatepass")[:max_bytes].decode("utf-8", "ignore")
    size = len(_encoder.encode(cut))
    while size > max_bytes and cut:
        keep = min(len(cut) - 1, len(cut) * max_bytes // size)
        cut = cut[: max(0, keep)]
        size = len(_encoder.encode(cut))
    return cut, True


def fit(value: str | dict[str, Any], max_bytes: int) -> tuple[str | dict[str, Any], bool]:
    """An answer that fits ``max_bytes``: a text is cut; a JSON object too large to carry
    whole becomes the cut text of its JSON (a partial object is not an object)."""
    if isinstance(value, str):
        return cut_text(value, max_bytes)
    encoded = _encoder.encode(value)
    if len(encoded) <= max_bytes:
        return value, False
    return cut_text(encoded.decode(), max_bytes)[0], True


def as_text(value: str | dict[str, Any]) -> tuple[str, str]:
    """(stored text, format): a text as it is, an object as its JSON."""
    if isinstance(value, str):
        return value, "text"
    return _encoder.encode(value).decode(), "json"
