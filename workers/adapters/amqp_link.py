"""The worker's link to the dispatcher over RabbitMQ only: no Redis credentials on the machine.

Fenced starts, outcomes and the two queries go to ``<ns>.reports`` as requests; the dispatcher
runs the transitions and answers on the machine's replies queue, matched by correlation id
(``dispatcher/usecases/worker_link.py`` holds both sides of the wire format). An answer that
does not come in time raises ``BrokerUnavailable``: the intake gives the assignments back to
RabbitMQ, the reporter tries again; a start asked twice by the same worker answers ``Started``
again (``start.lua``), and the worker's ledger keeps a run from running twice.

The machine's lease (one live worker per machine) is an exclusive queue,
``<ns>.machine.<id>.lease``, that the worker declares before anything else: RabbitMQ refuses
it to a second connection (``InExclusiveUse``) and deletes it when the holder's connection
closes. Not an exclusive *consumer*: RabbitMQ 3.10 ignores ``exclusive`` on a quorum queue
(the machine's assignments queue, and its replies queue on a cluster). A reconnection takes
the lease again; if another worker took it meanwhile, ``lease_lost`` says so once
``lease_wait_s`` has passed (long enough for RabbitMQ to close a stale connection of ours).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from dispatcher.errors import BrokerUnavailable
from dispatcher.models import Heartbeat
from dispatcher.names import Names
from dispatcher.usecases.ports import Ack, BatchHandler, Broker, Delivery, Verdict
from dispatcher.usecases.results import FinishResult, RunState, StartResult
from dispatcher.usecases.worker_link import (
    decode_finish_result,
    decode_start_result,
    decode_state,
    encode_outcome,
)
from workers.ports import Outcome, RunningHere, StartRequest

REPLY_TIMEOUT_S = 15.0
LEASE_WAIT_S = 90.0


def _never_refused() -> float:
    return 0.0


class AmqpLink:
    """``DispatcherLink`` for one machine, over RabbitMQ."""

    def __init__(
        self,
        *,
        machine_id: str,
        worker_id: str,
        names: Names,
        broker: Broker,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
        refused_for: Callable[[], float] = _never_refused,
        lease_wait_s: float = LEASE_WAIT_S,
    ) -> None:
        """``refused_for``: for how long the connection has been refused its lease back
        (``Amqp.exclusive_refused_for``)."""
        self.machine_id = machine_id
        self.worker_id = worker_id
        self.names = names
        self.broker = broker
        self.reply_timeout_s = reply_timeout_s
        self.refused_for = refused_for
        self.lease_wait_s = lease_wait_s
        self._waiting: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)
        self._replies: asyncio.Task[None] | None = None
        self._replies_lock = asyncio.Lock()

    async def lease(self) -> None:
        await self.broker.hold_exclusive_queue(self.names.machine_lease_queue(self.machine_id))
        await self._listen()

    async def lease_lost(self) -> str:
        while self.refused_for() < self.lease_wait_s:  # noqa: ASYNC110 - polled
            await asyncio.sleep(1.0)
        return (
            f"another worker took machine {self.machine_id}'s lease while this worker was "
            f"disconnected (refused for {self.refused_for():.0f} s); it serves the machine now"
        )

    async def receive(
        self, handler: BatchHandler, *, batch_size: int, prefetch: int
    ) -> asyncio.Task[None]:
        queue = self.names.machine_queue(self.machine_id)
        return await self.broker.consume(queue, handler, batch_size=batch_size, prefetch=prefetch)

    async def stop_receiving(self, timeout_s: float) -> bool:
        """Take no more assignments; the replies keep coming (outcomes are still reported)."""
        queue = self.names.machine_queue(self.machine_id)
        return await self.broker.stop_consuming(timeout_s, queues=[queue])

    async def start(self, starts: Sequence[StartRequest]) -> list[StartResult]:
        payload = [{"run_id": s.run_id, "fence": s.fence, "deadline": s.deadline} for s in starts]
        results = await self._ask("start", starts=payload)
        return [decode_start_result(r) for r in results]

    async def report(self, outcomes: Sequence[Outcome]) -> list[FinishResult]:
        payload = [
            encode_outcome(o.run_id, o.fence, o.status, o.error, o.outputs) for o in outcomes
        ]
        results = await self._ask("finish", outcomes=payload)
        return [decode_finish_result(r) for r in results]

    async def heartbeat(self, heartbeat: Heartbeat) -> None:
        body = heartbeat.model_dump_json().encode()
        await self.broker.publish_json("heartbeats", "", body, kind="heartbeat")

    async def run_states(self, run_ids: Sequence[str]) -> list[RunState]:
        return [decode_state(r) for r in await self._ask("states", run_ids=list(run_ids))]

    async def running_here(self) -> list[RunningHere]:
        return [RunningHere(str(r["run_id"]), int(r["fence"])) for r in await self._ask("running")]

    async def aclose(self) -> None:
        if self._replies is not None:
            self._replies.cancel()
        for future in self._waiting.values():
            future.cancel()

    # ---- requests and replies -------------------------------------------------------------------
    async def _ask(self, op: str, **fields: Any) -> list[dict[str, Any]]:
        await self._listen()
        correlation_id = f"{self.worker_id}-{self._prefix}-{next(self._ids)}"
        request = {
            "op": op,
            "machine_id": self.machine_id,
            "worker_id": self.worker_id,
            "correlation_id": correlation_id,
            **fields,
        }
        future: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        try:
            try:
                await self.broker.publish_json(
                    "reports", "report", json.dumps(request).encode(), kind=op
                )
            except BrokerUnavailable:
                raise
            except Exception as exc:  # a channel closing under a connection cut, a return
                raise BrokerUnavailable(f"{op} could not be sent: {exc!r}") from exc
            async with asyncio.timeout(self.reply_timeout_s):
                return await future
        except TimeoutError:
            raise BrokerUnavailable(
                f"no answer from a dispatcher to {op} within {self.reply_timeout_s:g} s"
            ) from None
        finally:
            self._waiting.pop(correlation_id, None)

    async def _listen(self) -> None:
        if self._replies is not None and not self._replies.done():
            return
        async with self._replies_lock:
            if self._replies is None or self._replies.done():
                self._replies = await self.broker.consume(
                    self.names.machine_replies_queue(self.machine_id),
                    self._on_replies,
                    batch_size=100,
                    prefetch=200,
                )

    async def _on_replies(self, batch: Sequence[Delivery]) -> list[Verdict]:
        for message in batch:
            try:
                reply = json.loads(message.body)
                future = self._waiting.get(str(reply["correlation_id"]))
                results = reply["results"]
            except (ValueError, KeyError, TypeError):
                continue  # not an answer: nothing waits for it
            if future is not None and not future.done() and isinstance(results, list):
                future.set_result(results)
        return [Ack() for _ in batch]
