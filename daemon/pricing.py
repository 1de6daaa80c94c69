"""Cost of a call when the provider gives none: the operator's overrides, then ``genai-prices``.

Overrides (``tallyd --prices FILE``) come first: private models, fine-tunes and negotiated
rates, USD per million tokens per bucket, ``costSource: "price_override"``. Then the
maintained ``genai-prices`` table (``"price_table"``), given everything it needs: the
5-minute/1-hour split of cache writes and the call's time, so historical prices apply. Else
the call is ``"unpriced"`` and its cost unknown (never $0).
"""

from __future__ import annotations

import tomllib
import warnings
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.usage import Usage

PER_MILLION = Decimal(1_000_000)
RATE_KEYS = ("input", "cached_input", "cache_write_5m", "cache_write_1h", "output")


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens for one model; a rate left out is not charged."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    cache_write_5m: Decimal | None = None
    cache_write_1h: Decimal | None = None

    def cost(self, usage: Usage, cache_creation_1h: int | None) -> float:
        """The cost of a call's usage at these rates (cache writes split 5 m / 1 h)."""
        one_hour = cache_creation_1h or 0
        five_min = max(0, (usage.cache_creation or 0) - one_hour)
        total = (
            self.input * (usage.input or 0)
            + self.output * (usage.output or 0)
            + (self.cached_input if self.cached_input is not None else self.input)
            * (usage.cache_read or 0)
            + (self.cache_write_5m if self.cache_write_5m is not None else self.input) * five_min
            + (self.cache_write_1h if self.cache_write_1h is not None else self.input) * one_hour
        )
        return float(total / PER_MILLION)


@dataclass(frozen=True, slots=True)
class PriceBook:
    """The operator's price overrides, by model name (any provider) or ``provider/model``."""

    rates: dict[str, Rates]

    def find(self, provider: str, model: str) -> Rates | None:
        """The override for a call's model, the provider-qualified one first."""
        return self.rates.get(f"{provider}/{model}") or self.rates.get(model)


EMPTY = PriceBook({})


def load_prices(path: Path) -> PriceBook:
    """Read a TOML prices file; any fault is one ConfigError naming the file and the key.

    ```toml
    [models."acme-private-7b"]          # or [models."openai/ft:gpt-4.1-mini:acme"]
    input = 0.50                        # USD per million tokens
    cached_input = 0.05
    cache_write_5m = 0.625
    cache_write_1h = 1.00
    output = 1.50
    ```
    """
    where = f"--prices {path}"
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f'{where}: expected a [models."NAME"] table per model')
    unknown = set(data) - {"models"}
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key {sorted(unknown)[0]!r}")
    return PriceBook({str(name): _rates(where, str(name), entry) for name, entry in models.items()})


def _rates(where: str, name: str, entry: Any) -> Rates:
    at = f'{where}: models."{name}"'
    if not isinstance(entry, dict):
        raise ConfigError(f"{at}: expected a table of rates")
    unknown = set(entry) - set(RATE_KEYS)
    if unknown:
        raise ConfigError(f"{at}: unknown rate {sorted(unknown)[0]!r} (known: {RATE_KEYS})")
    values: dict[str, Decimal] = {}
    for key, value in entry.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{at}.{key}: expected a number >= 0 (USD per million tokens)")
        values[key] = Decimal(repr(value))
    for required in ("input", "output"):
        if required not in values:
            raise ConfigError(f"{at}: missing {required!r}")
    return Rates(**values)


def price(
    provider: str,
    model: str,
    usage: Usage,
    cache_creation_1h: int | None = None,
    at: datetime | None = None,
    book: PriceBook = EMPTY,
) -> tuple[float | None, str]:
    """``(cost, costSource)``: an override, else ``price_table``, else ``(None, "unpriced")``.

    genai-prices counts input *including* cache reads and writes, so Tally's uncached
    ``input`` is converted back to total input first. A usage whose input or output is
    unknown (a provider that left one out) is never priced with it as 0: unpriced, and the
    job's limits count that call at its upper bound.
    """
    if usage.input is None or usage.output is None:
        return None, "unpriced"
    rates = book.find(provider, model)
    if rates is not None:
        return rates.cost(usage, cache_creation_1h), "price_override"
    try:
        from genai_prices import Usage as PriceUsage
        from genai_prices import calc_price
    except ImportError:
        return None, "unpriced"
    split: dict[str, int] = {}
    if cache_creation_1h is not None:
        split = {
            "cache_write_1h_tokens": cache_creation_1h,
            "cache_write_5m_tokens": max(0, (usage.cache_creation or 0) - cache_creation_1h),
        }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = calc_price(
                PriceUsage(
                    input_tokens=usage.total_input or 0,
                    output_tokens=usage.output or 0,
                    cache_read_tokens=usage.cache_read or 0,
                    cache_write_tokens=usage.cache_creation or 0,
                    **split,
                ),
                model_ref=model,
                provider_id=provider,
                genai_request_timestamp=at,
            )
    except LookupError:
        return None, "unpriced"
    return float(result.total_price), "price_table"
