"""Run requests: the body ``Client.submit`` sends, a pre-fill, and a paced producer process.

    python -m bench.producer --exchange NS.requests --rate 150 --duration 20 \
        --connections c-live-0,c-live-1 --owner bench@contoso.com --prefix lat-

The paced producer publishes every 5 ms tick the requests that are due (persistent,
confirmed; the confirms of a tick are awaited together in the background, never one by one),
each carrying ``submitted_at`` = the time of its publish; request ``i`` names connection
``i mod len(connections)``. It prints a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence

import aio_pika
from aio_pika.abc import AbstractExchange

from dispatcher.core.principals import admin_user_of
from dispatcher.settings import Settings

FLOW = "bench-flow"
TICK_S = 0.005


def request_body(run_id: str, connection_id: str, owner: str) -> bytes:
    """Exactly what ``dispatcher.client.Client.submit`` publishes for a zero-length flow."""
    return json.dumps(
        {
            "run_id": run_id,
            "flow_id": FLOW,
            "connection_id": connection_id,
            "requested_by": owner,
            "mode": "unattended",
            "priority": "normal",
            "inputs": {"duration_s": 0},
            "submitted_at": time.time(),
        }
    ).encode()


def nth_request(
    prefix: str, i: int, connections: Sequence[str], owner: str, user_id: str
) -> aio_pika.Message:
    """Request ``i``: run id ``<prefix><i>``, the connections taken round robin."""
    body = request_body(f"{prefix}{i}", connections[i % len(connections)], owner)
    return message(body, user_id)


def message(body: bytes, user_id: str) -> aio_pika.Message:
    """A request as the client sends it, with the sender's broker user (the dispatcher accepts
    requests from its own identity and from registered submitters only)."""
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        type="run.request",
        user_id=user_id,
    )


async def prefill(
    exchange: AbstractExchange,
    count: int,
    connections: Sequence[str],
    owner: str,
    prefix: str,
    user_id: str,
    window: int = 500,
) -> None:
    """Publish ``count`` requests as fast as confirms allow (windows of ``window``), naming
    the connections round robin."""
    for start in range(0, count, window):
        await asyncio.gather(
            *(
                exchange.publish(nth_request(prefix, i, connections, owner, user_id), "submit")
                for i in range(start, min(count, start + window))
            )
        )


async def paced(args: argparse.Namespace) -> dict[str, float]:
    settings = Settings.load()
    url = settings.amqp_url.get_secret_value()
    user_id = admin_user_of(url)
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(args.exchange, ensure=False)
        connections = args.connections.split(",")
        pending: set[asyncio.Task[object]] = set()
        sent = 0
        total = int(args.rate * args.duration)
        started = time.monotonic()
        lag_max = 0.0
        while sent < total:
            due = min(total, int((time.monotonic() - started) * args.rate) + 1)
            if due > sent:
                batch = [
                    exchange.publish(
                        nth_request(args.prefix, i, connections, args.owner, user_id), "submit"
                    )
                    for i in range(sent, due)
                ]
                lag_max = max(lag_max, (due - sent) / args.rate)
                sent = due
                task = asyncio.ensure_future(asyncio.gather(*batch))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.sleep(TICK_S)
        elapsed = time.monotonic() - started
        if pending:
            await asyncio.gather(*pending)
    return {"sent": sent, "seconds": elapsed, "rate": sent / elapsed, "max_tick_lag_s": lag_max}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.producer")
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument(
        "--connections", required=True, help="comma-separated connection ids, used round robin"
    )
    parser.add_argument("--owner", required=True)
    parser.add_argument("--prefix", required=True, help="run id prefix")
    summary = asyncio.run(paced(parser.parse_args(argv)))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
