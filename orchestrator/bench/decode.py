"""``tally bench decode``: our decoder beside a strict pydantic v2 model of the same frame."""

from __future__ import annotations

import statistics
import time
from typing import Any

import msgspec

from shared.protocol import decode_daemon_frame

SAMPLE_RESULT = (
    b'{"type":"job:result","id":"6f1c2b9e-8d4a-4c3b-a2e1-0f9d8c7b6a51","timestamp":1732380000123.5,'
    b'"payload":{"success":true,"deliveryId":"d-1","costUsd":0.0421,"durationMs":5123.4,'
    b'"numTurns":3,"inputTokens":1200,"outputTokens":950,"cacheReadInputTokens":48000,'
    b'"cacheCreationInputTokens":2048,"reasoningTokens":300,"costSource":"provider",'
    b'"stopReason":"end_turn","modelUsage":['
    b'{"model":"claude-haiku-4-5","inputTokens":400,"outputTokens":150,"cacheReadInputTokens":16000,'
    b'"cacheCreationInputTokens":0,"costUsd":0.0031,"provider":"anthropic"},'
    b'{"model":"claude-sonnet-4-5","inputTokens":700,"outputTokens":700,"cacheReadInputTokens":32000,'
    b'"cacheCreationInputTokens":2048,"costUsd":0.0362,"provider":"anthropic","reasoningTokens":300},'
    b'{"model":"gpt-4.1-mini","inputTokens":100,"outputTokens":100,"cacheReadInputTokens":0,'
    b'"cacheCreationInputTokens":0,"costUsd":0.0028,"provider":"openai"}]}}'
)


def _pydantic_decoder() -> Any:
    """A strict pydantic v2 model with the same constraints as ``shared.protocol``."""
    from typing import Annotated, Literal

    from pydantic import BaseModel, ConfigDict, Field

    uuid_re = (
        r"^(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[1-8][0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}"
        r"-[0-9a-fA-F]{12}|00000000-0000-0000-0000-000000000000)$"
    )
    count = Annotated[int, Field(ge=0, le=2**63 - 1)]
    money = Annotated[float, Field(ge=0)]
    cfg = ConfigDict(strict=True, extra="ignore", frozen=True)

    class ModelUsage(BaseModel):
        model_config = cfg
        model: Annotated[str, Field(min_length=1)]
        inputTokens: count
        outputTokens: count
        cacheReadInputTokens: count
        cacheCreationInputTokens: count
        costUsd: money
        provider: Annotated[str, Field(min_length=1)] | None = None
        reasoningTokens: count | None = None

    class Payload(BaseModel):
        model_config = cfg
        success: bool
        deliveryId: str | None = None
        costUsd: money | None = None
        durationMs: money | None = None
        numTurns: count | None = None
        inputTokens: count | None = None
        outputTokens: count | None = None
        cacheReadInputTokens: count | None = None
        cacheCreationInputTokens: count | None = None
        modelUsage: list[ModelUsage] | None = None
        errorMessage: str | None = None
        reasoningTokens: count | None = None
        tokensUnavailable: bool | None = None
        costSource: (
            Literal["provider", "sdk_estimate", "price_table", "unpriced", "local"] | None
        ) = None
        stopReason: str | None = None

    class Frame(BaseModel):
        model_config = cfg
        type: Literal["job:result"]
        id: Annotated[str, Field(pattern=uuid_re)]
        timestamp: Annotated[float, Field(ge=0)]
        payload: Payload

    return Frame.model_validate_json


def _rate(fn: Any, data: bytes, n: int) -> float:
    for _ in range(min(n, 2000)):
        fn(data)
    start = time.perf_counter()
    for _ in range(n):
        fn(data)
    return n / (time.perf_counter() - start)


def run(n: int, rounds: int = 5) -> dict[str, Any]:
    """Decode the sample frame ``n`` times per round with each decoder, rounds interleaved.

    Interleaving and taking the median of each side keeps a noisy neighbour on a shared
    machine from favouring one decoder.
    """
    pydantic_decode = _pydantic_decoder()
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(rounds):
        ours.append(_rate(decode_daemon_frame, SAMPLE_RESULT, n))
        theirs.append(_rate(pydantic_decode, SAMPLE_RESULT, n))
    ours_median, theirs_median = statistics.median(ours), statistics.median(theirs)
    return {
        "bench": "decode",
        "frame": "job:result with 3 modelUsage entries",
        "frameBytes": len(SAMPLE_RESULT),
        "n": n,
        "rounds": rounds,
        "tallyFramesPerSecond": round(ours_median),
        "pydanticFramesPerSecond": round(theirs_median),
        "ratio": round(ours_median / theirs_median, 2),
        "jsonParseFloorFramesPerSecond": round(_rate(msgspec.json.decode, SAMPLE_RESULT, n)),
    }
