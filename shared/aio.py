"""Small asyncio helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float | None) -> T:
    """Await with a deadline (TimeoutError past it).

    Unlike ``asyncio.wait_for`` on Python 3.11, ``asyncio.timeout`` never swallows a
    cancellation of the caller that races with the awaited result.
    """
    async with asyncio.timeout(seconds):
        return await awaitable
