"""Counts a process's Redis round trips and AMQP frames, for the "hops" section.

Loaded only when the bench starts a process with ``PYTHONPATH=bench/trace`` and
``RUNDISPATCH_BENCH_TRACE=<file>``: Python imports ``sitecustomize`` at start-up. On SIGUSR1
(and at exit) the counts are written to ``<file>`` as JSON. It wraps, without changing them,
``Redis.execute_command`` (one round trip), ``Pipeline.execute`` (one round trip, n commands),
``Pipeline.immediate_execute_command`` (what redis-py sends before a pipeline with scripts),
and aiormq's ``basic_publish``, ``basic_ack``, ``basic_nack``, deliveries and returns.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
from collections import Counter
from typing import Any

_OUT = os.environ.get("RUNDISPATCH_BENCH_TRACE")
_COUNTS: Counter[str] = Counter()


def _dump(*_: Any) -> None:
    if _OUT:
        with open(_OUT, "w", encoding="utf-8") as handle:
            json.dump(dict(_COUNTS), handle)


def _name(args: tuple[Any, ...]) -> str:
    first = args[0] if args else "?"
    return (first.decode() if isinstance(first, bytes) else str(first)).upper()


def _install() -> None:
    import aiormq.channel
    from redis.asyncio import client

    execute_command = client.Redis.execute_command

    async def counted_command(self: Any, *args: Any, **options: Any) -> Any:
        _COUNTS["redis.round_trips"] += 1
        _COUNTS[f"redis.cmd.{_name(args)}"] += 1
        return await execute_command(self, *args, **options)

    execute = client.Pipeline.execute

    async def counted_execute(self: Any, raise_on_error: bool = True) -> Any:
        if self.command_stack:
            _COUNTS["redis.round_trips"] += 1
            _COUNTS["redis.pipelines"] += 1
            for args, _options in self.command_stack:
                _COUNTS[f"redis.cmd.{_name(args)}"] += 1
        return await execute(self, raise_on_error)

    immediate = client.Pipeline.immediate_execute_command

    async def counted_immediate(self: Any, *args: Any, **options: Any) -> Any:
        _COUNTS["redis.round_trips"] += 1
        _COUNTS[f"redis.cmd.{_name(args)}"] += 1
        return await immediate(self, *args, **options)

    channel = aiormq.channel.Channel
    publish, ack, nack = channel.basic_publish, channel.basic_ack, channel.basic_nack
    deliver, returned = channel._on_deliver_frame, channel._on_return_frame

    async def counted_publish(self: Any, *args: Any, **kwargs: Any) -> Any:
        _COUNTS["amqp.publish"] += 1
        return await publish(self, *args, **kwargs)

    async def counted_ack(self: Any, delivery_tag: int, multiple: bool = False, **kw: Any) -> Any:
        _COUNTS["amqp.ack_multiple" if multiple else "amqp.ack"] += 1
        return await ack(self, delivery_tag, multiple, **kw)

    async def counted_nack(self: Any, *args: Any, **kwargs: Any) -> Any:
        _COUNTS["amqp.nack"] += 1
        return await nack(self, *args, **kwargs)

    async def counted_deliver(self: Any, frame: Any) -> Any:
        _COUNTS["amqp.deliveries"] += 1
        return await deliver(self, frame)

    async def counted_return(self: Any, frame: Any) -> Any:
        _COUNTS["amqp.returns"] += 1
        return await returned(self, frame)

    client.Redis.execute_command = counted_command  # type: ignore[method-assign]
    client.Pipeline.execute = counted_execute  # type: ignore[method-assign]
    client.Pipeline.immediate_execute_command = counted_immediate  # type: ignore[method-assign]
    channel.basic_publish = counted_publish  # type: ignore[method-assign]
    channel.basic_ack = counted_ack  # type: ignore[method-assign]
    channel.basic_nack = counted_nack  # type: ignore[method-assign]
    channel._on_deliver_frame = counted_deliver  # type: ignore[method-assign]
    channel._on_return_frame = counted_return  # type: ignore[method-assign]
    signal.signal(signal.SIGUSR1, _dump)
    atexit.register(_dump)


if _OUT:
    _install()
