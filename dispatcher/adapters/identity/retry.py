"""Retrying a transient identity or vault failure within a run's deadline."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from dispatcher.errors import RetryableRunError

T = TypeVar("T")


async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    *,
    deadline: float,
    clock: Callable[[], float] = time.time,
    first_delay_s: float = 0.2,
    max_delay_s: float = 5.0,
) -> T:
    """Run ``operation``, retrying ``RetryableRunError`` with capped, jittered backoff.

    Stops at ``deadline`` (epoch seconds, as ``clock``): the last error is raised when the next
    try would start past it. A server's ``retry_after_s`` hint, when the error has one, is a
    floor for the wait (msal would replay the same failure before that anyway).
    """
    delay = first_delay_s
    while True:
        try:
            return await operation()
        except RetryableRunError as exc:
            hint = getattr(exc, "retry_after_s", None)
            wait = max(delay * random.uniform(0.5, 1.0), float(hint or 0.0))
            if clock() + wait >= deadline:
                raise
            await asyncio.sleep(wait)
            delay = min(delay * 2, max_delay_s)
