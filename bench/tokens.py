"""Tokens: the cost of the cache-hit path of the token broker, and identity-provider requests
per access-token expiry under N concurrent sign-in runs of one connection.

It plugs into ``dispatcher.adapters.identity.token_broker.TokenBroker`` and the local identity
provider ``devtools.idp.IdentityProvider``. When either is missing (or fails to
start) the section reports ``measured: false`` with the reason, and the final line says
``idp_requests_per_expiry=n/a``.

What runs: a sign-in connection signed in with a refresh token minted by the local identity
provider; then

* cache hit: ``access_token()`` called sequentially (wall and CPU µs per call) and by N
  coroutines at once (wall per call); no identity-provider request may happen;
* expiry: the cached access token is expired (as time would), then N coroutines of two
  brokers (two replicas: one Redis lock, one asyncio lock each) ask for a token at once;
  the identity provider's token-endpoint counter says how many refreshes that cost. Repeated
  ``expiries`` times.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from bench.env import delete_keys
from dispatcher.adapters.redis.connection import make_redis
from dispatcher.names import Names
from dispatcher.settings import Settings

TENANT = "11111111-2222-3333-4444-555555555555"
ACCOUNT = "bench-signin@contoso.com"
CLIENT_ID = "rundispatch-bench"
CLIENT_SECRET = "bench-client-secret-value"


async def measure_tokens(
    base: Settings, workdir: Path, *, concurrency: int = 500, expiries: int = 3, hits: int = 1000
) -> dict[str, Any]:
    try:
        from devtools.idp import IdentityProvider
        from dispatcher.adapters.identity.cache_view import expire_access_tokens
        from dispatcher.adapters.identity.sign_in import import_refresh_token
        from dispatcher.adapters.identity.token_broker import TokenBroker
        from dispatcher.crypto import SecretBox
        from dispatcher.models import Connection, ConnectionKind, Target
    except ImportError as exc:
        return {"measured": False, "reason": f"token broker or local IdP not available: {exc}"}

    namespace = f"{base.namespace}tok"
    names = Names(namespace)
    redis = make_redis(base)  # the product's client: a blocking pool of 64 connections
    try:
        with IdentityProvider(
            cert_dir=workdir / "certs", client_id=CLIENT_ID, client_secret=CLIENT_SECRET
        ) as idp:
            settings = Settings.load(
                namespace=namespace,
                secret_keys=base.secret_keys.get_secret_value(),
                authority_host=idp.url,
                client_id=CLIENT_ID,
                client_secret=CLIENT_SECRET,
                idp_ca_file=idp.ca_file,
                log_level="WARNING",
            )
            box = SecretBox.from_settings(settings)
            brokers = [TokenBroker(settings, redis, names, box) for _ in range(2)]
            connection = Connection(
                connection_id="bench-signin",
                owner=ACCOUNT,
                kind=ConnectionKind.sign_in,
                target=Target(machine_id="bench-m"),
                account=ACCOUNT,
                tenant_id=TENANT,
            )
            try:
                await import_refresh_token(
                    brokers[0], connection, idp.mint_refresh_token(TENANT, ACCOUNT, CLIENT_ID)
                )
                validity = settings.token_validity_s
                first = brokers[0]
                await first.access_token(connection, validity)  # warm: msal, TLS, Redis
                idp.reset_counters()

                # Cache hit, one at a time.
                wall0, cpu0 = time.perf_counter(), time.process_time()
                for _ in range(hits):
                    await first.access_token(connection, validity)
                hit_wall_us = (time.perf_counter() - wall0) / hits * 1e6
                hit_cpu_us = (time.process_time() - cpu0) / hits * 1e6

                # Cache hit, N at once.
                wall0 = time.perf_counter()
                await asyncio.gather(
                    *(first.access_token(connection, validity) for _ in range(concurrency))
                )
                burst_s = time.perf_counter() - wall0
                hit_requests = idp.counters().get("token", 0)

                # Expiry under N concurrent runs over two replicas.
                per_expiry: list[int] = []
                refresh_walls: list[float] = []
                distinct_tokens: list[int] = []
                for _ in range(expiries):
                    snapshot = await first.store.load(connection)
                    assert snapshot.cache_json is not None
                    await first.store.save_cache(
                        connection, expire_access_tokens(snapshot.cache_json, 0)
                    )
                    idp.reset_counters()
                    wall0 = time.perf_counter()
                    tokens = await asyncio.gather(
                        *(
                            brokers[i % 2].access_token(connection, validity)
                            for i in range(concurrency)
                        )
                    )
                    refresh_walls.append(time.perf_counter() - wall0)
                    per_expiry.append(idp.counters().get("token", 0))
                    distinct_tokens.append(len(set(tokens)))
            finally:
                for broker in brokers:
                    await broker.aclose()
    except Exception as exc:  # the broker is being built: report, do not fail the bench
        return {"measured": False, "reason": f"token measurement failed: {exc!r}"}
    finally:
        await delete_keys(redis, names.pattern())
        await redis.aclose()
    return {
        "measured": True,
        "concurrency": concurrency,
        "cache_hit_wall_us": round(hit_wall_us, 1),
        "cache_hit_cpu_us": round(hit_cpu_us, 1),
        "cache_hit_burst_wall_us_per_call": round(burst_s / concurrency * 1e6, 1),
        "idp_requests_on_cache_hits": hit_requests,
        "idp_requests_per_expiry": per_expiry,
        "idp_requests_per_expiry_max": max(per_expiry),
        "distinct_tokens_per_expiry": distinct_tokens,
        "expiry_burst_wall_s": [round(w, 3) for w in refresh_walls],
        "expiry_burst_wall_s_median": round(statistics.median(refresh_walls), 3),
    }
