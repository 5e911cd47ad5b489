"""Retrying a transient identity or vault failure within a run's deadline."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from dispatcher.errors import RetryableRunError
from dispatcher.retry import Backoff, retry

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
    return await retry(
        operation,
        retry_on=RetryableRunError,
        backoff=Backoff(first_s=first_delay_s, max_s=max_delay_s, jitter=True),
        deadline=deadline,
        clock=clock,
        floor=lambda exc: getattr(exc, "retry_after_s", None),
    )
