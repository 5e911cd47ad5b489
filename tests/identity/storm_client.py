"""A stand-in dispatcher replica for the storm test: N concurrent ``access_token`` calls.

Started as ``python -m tests.identity.storm_client CONFIG_JSON``; prints ``ready``, then for
each ``go`` line on stdin runs the calls and prints one JSON line (token digests, never tokens)
until ``exit``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys

import redis.asyncio as aioredis

from dispatcher.adapters.identity.token_broker import TokenBroker
from dispatcher.crypto import SecretBox
from dispatcher.models import Connection
from dispatcher.names import Names
from dispatcher.settings import Settings


async def main(config: dict[str, object]) -> None:
    settings = Settings(**config["settings"])  # type: ignore[arg-type]
    connection = Connection.model_validate_json(str(config["connection"]))
    calls = int(config["calls"])  # type: ignore[call-overload]
    redis = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    broker = TokenBroker(
        settings, redis, Names(settings.namespace), SecretBox.from_settings(settings)
    )
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    try:
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "go":
            results = await asyncio.gather(
                *(broker.access_token(connection, 600) for _ in range(calls)),
                return_exceptions=True,
            )
            digests = sorted(
                {hashlib.sha256(r.encode()).hexdigest() for r in results if isinstance(r, str)}
            )
            errors = [repr(r) for r in results if not isinstance(r, str)]
            print(json.dumps({"digests": digests, "errors": errors}), flush=True)
    finally:
        await broker.aclose()
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
