"""A machine's queues on the dispatcher's side: its assignments queue and its replies queue
declared (with their bindings), declared again when found gone (a consumer cancelled with its
queue, an answer returned unroutable), and the answers published. Part of
:class:`.broker.Amqp`, kept apart to keep modules small."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aio_pika.exceptions import PublishError
from aiormq.exceptions import ChannelPreconditionFailed

from dispatcher.adapters.amqp.topology import close_channel, declare_replies_queue
from dispatcher.core.principals import machine_queue_arguments
from dispatcher.errors import ConfigurationError
from dispatcher.names import Names

log = logging.getLogger(__name__)

# Channels that declare machine queues, so that as many machines are declared at once.
DECLARING_CHANNELS = 8


def declaring_channels() -> asyncio.Queue[AbstractChannel | None]:
    """The pool of :meth:`MachineQueues._declaring_channel` (slots are opened when needed)."""
    pool: asyncio.Queue[AbstractChannel | None] = asyncio.Queue()
    for _ in range(DECLARING_CHANNELS):
        pool.put_nowait(None)
    return pool


class MachineQueues:
    """Mixed into :class:`.broker.Amqp` (whose attributes and methods are named below)."""

    names: Names
    cluster: bool
    machine_queue_type: str
    declare: bool
    connection: AbstractRobustConnection | None
    _machine_queues: set[str]
    _declaring: asyncio.Queue[AbstractChannel | None]
    _tasks: set[asyncio.Task[None]]

    if TYPE_CHECKING:

        @property
        def publisher(self) -> AbstractChannel: ...

        def exchange(self, role: str) -> AbstractExchange: ...

        async def _publish(
            self,
            role: str,
            routing_key: str,
            body: bytes,
            kind: str,
            message_id: str | None = None,
            *,
            mandatory: bool | None = None,
        ) -> None: ...

    async def ensure_machine_queue(self, machine_id: str) -> None:
        """Declare a machine's queue (``machine_queue_type``, bound to the machines exchange by
        machine id) and its replies queue (``core/principals.replies_arguments``): four round
        trips on one of the declaring channels, so that several machines are declared at once
        (a replica beside 10,000 new machines declares 20,000 queues).

        ``ConfigurationError`` when the machine's queue exists with other arguments (declared
        with another ``machine_queue_type``): declaring it again cannot succeed until an
        operator deletes it or sets the type back."""
        name = self.names.machine_queue(machine_id)
        async with self._declaring_channel() as channel:
            try:
                queue = await channel.declare_queue(
                    name,
                    durable=True,
                    arguments=machine_queue_arguments(self.names, self.machine_queue_type),
                )
            except ChannelPreconditionFailed as exc:
                raise ConfigurationError(
                    f"queue {name} exists with other arguments than machine_queue_type="
                    f"{self.machine_queue_type} asks for ({exc.args[0] if exc.args else exc}); "
                    f"delete it (its worker declares nothing) or set "
                    f"RUNDISPATCH_MACHINE_QUEUE_TYPE to its type"
                ) from None
            if machine_id in self._machine_queues:
                return
            await queue.bind(self.exchange("machines"), machine_id)
            if self.connection is None:
                raise RuntimeError("not connected")
            replies = await declare_replies_queue(
                self.connection,
                self.publisher,
                self.names.machine_replies_queue(machine_id),
                cluster=self.cluster,
                probe=channel,
            )
            await replies.bind(self.exchange("machines"), self.names.replies_key(machine_id))
            self._machine_queues.add(machine_id)

    @contextlib.asynccontextmanager
    async def _declaring_channel(self) -> AsyncIterator[AbstractChannel]:
        """One of ``DECLARING_CHANNELS`` channels kept for declarations, opened when first
        needed and replaced once closed (a refused declaration closes its channel). Before,
        every machine opened and closed a channel of its own to declare its replies queue, and
        declared its queues on the publisher channel, one machine at a time: a replica declared
        ~11 machines a second while 10,000 machines heartbeated (bench/README.md, "live
        fleet")."""
        slot = await self._declaring.get()
        try:
            if slot is None:
                if self.connection is None:
                    raise RuntimeError("not connected")
                slot = await self.connection.channel()
            yield slot
        finally:
            # Back in the pool first (a slot must not be lost to a cancellation), then a
            # channel the broker closed is closed for good (``topology.close_channel``).
            refused = slot is not None and slot.is_closed
            self._declaring.put_nowait(None if refused else slot)
            if refused and slot is not None:
                await close_channel(slot)

    async def publish_reply(self, machine_id: str, body: bytes) -> None:
        """Answer a machine's worker on its replies queue, confirmed. ``mandatory``: an answer
        RabbitMQ cannot route (the replies queue was deleted) comes back; the queue is declared
        again and the answer published once more. The worker's consumer, cancelled with the
        queue, is restored by its robust channel once the queue is back."""
        key = self.names.replies_key(machine_id)
        try:
            await self._publish("machines", key, body, "reply", mandatory=True)
        except PublishError:
            log.warning("replies queue of machine %s is gone: declared again", machine_id)
            self._machine_queues.discard(machine_id)
            await self.ensure_machine_queue(machine_id)
            await self._publish("machines", key, body, "reply", mandatory=True)

    def _watch_cancel(self, channel: AbstractChannel, queue: str) -> None:
        """RabbitMQ cancels a consumer whose queue is deleted. The robust channel then tries
        to consume again, but declares the queue passively; the queue itself is declared
        again here (with its binding), so that consuming resumes."""
        prefix = self.names.machine_queue("")
        if not queue.startswith(prefix) or not self.declare or queue.endswith(".replies"):
            return  # shared queues: every dispatcher declares them; a worker declares nothing
        machine_id = queue.removeprefix(prefix)

        async def redeclare() -> None:
            self._machine_queues.discard(machine_id)
            for _ in range(60):
                try:
                    await self.ensure_machine_queue(machine_id)
                    log.warning("queue %s was deleted under its consumer: declared again", queue)
                    return
                except Exception as exc:
                    log.warning("queue %s not declared again yet: %s", queue, exc)
                    await asyncio.sleep(1.0)

        def cancelled(_: object) -> None:
            task = asyncio.get_running_loop().create_task(redeclare())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        async def watch(*_: object) -> None:
            underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
            underlay.on_consumer_cancel_callbacks.add(cancelled)

        task = asyncio.get_running_loop().create_task(watch())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        reopen = getattr(channel, "reopen_callbacks", None)
        if reopen is not None:
            reopen.add(watch)
