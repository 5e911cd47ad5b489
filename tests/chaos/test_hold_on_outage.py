"""A consumer holds its deliveries through a store outage instead of handing them back.

Handing a message back to a quorum queue counts against its delivery limit: during a Redis
restart a request or an assignment would be dead-lettered after five quick retries. The
consumer loop therefore retries outages itself (``Unavailable`` in the error tree, which the
Redis adapter raises for redis-py's connection errors); only crashes go back at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from dispatcher.adapters.amqp import consumer
from dispatcher.errors import StoreUnavailable
from dispatcher.usecases.ports import Ack, Retry, Verdict, retry_for

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


async def test_a_store_outage_is_retried_while_holding_the_batch() -> None:
    calls: list[list[Any]] = []

    async def handler(batch: Sequence[Any]) -> list[Verdict]:
        calls.append(list(batch))
        if len(calls) <= 2:
            raise StoreUnavailable("Error 111 connecting")
        return [Ack() for _ in batch]

    verdicts = await consumer.decide(handler, ["a", "b"])  # type: ignore[arg-type]
    assert verdicts == [Ack(), Ack()]
    assert calls == [["a", "b"]] * 3


async def test_only_the_messages_asked_to_retry_are_handled_again() -> None:
    calls: list[list[Any]] = []

    async def handler(batch: Sequence[Any]) -> list[Verdict]:
        calls.append(list(batch))
        if len(calls) == 1:
            return [Ack(), Retry("store unavailable", outage=True), Ack()]
        return [Ack() for _ in batch]

    verdicts = await consumer.decide(handler, ["a", "b", "c"])  # type: ignore[arg-type]
    assert verdicts == [Ack(), Ack(), Ack()]
    assert calls == [["a", "b", "c"], ["b"]]


async def test_a_retry_that_is_not_an_outage_goes_back_at_once() -> None:
    calls = 0

    async def handler(batch: Sequence[Any]) -> list[Verdict]:
        nonlocal calls
        calls += 1
        return [retry_for(KeyError("no such run"))]

    verdicts = await consumer.decide(handler, ["a"])  # type: ignore[arg-type]
    assert verdicts == [Retry("KeyError('no such run')")]
    assert calls == 1


async def test_a_crash_goes_back_to_the_queue_at_once() -> None:
    calls = 0

    async def handler(batch: Sequence[Any]) -> list[Verdict]:
        nonlocal calls
        calls += 1
        raise ValueError("a bug")

    verdicts = await consumer.decide(handler, ["a"])  # type: ignore[arg-type]
    assert verdicts == [Retry("handler crashed")]
    assert calls == 1


async def test_a_failure_outlasting_the_hold_goes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer, "HOLD_S", 0.5)

    async def handler(batch: Sequence[Any]) -> list[Verdict]:
        return [retry_for(StoreUnavailable("refused")) for _ in batch]

    verdicts = await consumer.decide(handler, ["a"])  # type: ignore[arg-type]
    assert len(verdicts) == 1 and isinstance(verdicts[0], Retry) and verdicts[0].outage
