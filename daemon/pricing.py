"""Cost of a call from the maintained ``genai-prices`` table when the provider gives none."""

from __future__ import annotations

from shared.usage import Usage


def price(provider: str, model: str, usage: Usage) -> tuple[float | None, str]:
    """``(cost, costSource)``: ``price_table`` when the model is known, else ``unpriced``.

    genai-prices counts input *including* cache reads and writes, so Tally's uncached
    ``input`` is converted back to total input first.
    """
    try:
        from genai_prices import Usage as PriceUsage
        from genai_prices import calc_price
    except ImportError:
        return None, "unpriced"
    if usage.is_unknown:
        return None, "unpriced"
    try:
        result = calc_price(
            PriceUsage(
                input_tokens=usage.total_input or 0,
                output_tokens=usage.output or 0,
                cache_read_tokens=usage.cache_read or 0,
                cache_write_tokens=usage.cache_creation or 0,
            ),
            model_ref=model,
            provider_id=provider,
        )
    except LookupError:
        return None, "unpriced"
    return float(result.total_price), "price_table"
