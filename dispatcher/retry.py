"""The one backoff helper: how long to wait between tries, and a loop that retries an operation.

Every loop that waits for something to come back uses it: the consumer holding deliveries
through a store outage, a process connecting at start-up, a worker reporting outcomes, the
client waiting for a run, and the identity and vault calls retried within a run's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from dispatcher.errors import Unavailable

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays that grow by ``factor`` from ``first_s`` up to ``max_s``.

    ``jitter`` draws each delay between half and all of its value, so that many clients that
    failed together do not come back together.
    """

    first_s: float = 0.2
    factor: float = 2.0
    max_s: float = 5.0
    jitter: bool = False

    def delays(self) -> Iterator[float]:
        """The delays, without end."""
        delay = self.first_s
        while True:
            yield delay * random.uniform(0.5, 1.0) if self.jitter else delay
            delay = min(delay * self.factor, self.max_s)


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    retry_on: type[BaseException] | tuple[type[BaseException], ...],
    backoff: Backoff,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    floor: Callable[[BaseException], float | None] = lambda _exc: None,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """Run ``operation`` until it succeeds; an exception of ``retry_on`` is retried after the
    next delay, any other propagates.

    ``deadline`` (on ``clock``): the last error is raised when the next try would start past
    it; ``None`` tries forever. ``floor`` can raise a delay to the failure's own hint (a
    server's ``Retry-After``). ``on_retry`` sees each failure and the delay before the next try.
    """
    delays = backoff.delays()
    while True:
        try:
            return await operation()
        except retry_on as exc:
            delay = max(next(delays), floor(exc) or 0.0)
            if deadline is not None and clock() + delay >= deadline:
                raise
            if on_retry is not None:
                on_retry(exc, delay)
            await asyncio.sleep(delay)


async def when_reachable(
    operation: Callable[[], Awaitable[T]], wait_s: float, backoff: Backoff
) -> T:
    """``operation``, tried again for ``wait_s`` seconds while Redis or RabbitMQ cannot be
    reached (``Unavailable``): a process starting during a restart waits for it."""

    def waiting(exc: BaseException, delay: float) -> None:
        log.warning("cannot reach Redis or RabbitMQ yet, retrying in %.1f s: %s", delay, exc)

    return await retry(
        operation,
        retry_on=Unavailable,
        backoff=backoff,
        deadline=time.monotonic() + wait_s,
        on_retry=waiting,
    )
