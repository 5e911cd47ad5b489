"""200 concurrent runs over one connection through 2 OS processes: 1 request per expiry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.idp import IdentityProvider
from dispatcher.adapters.identity.token_broker import TokenBroker
from dispatcher.models import Connection
from dispatcher.settings import Settings
from tests.support.identity import expire_access_token

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROCESSES = 2
CALLS_PER_PROCESS = 100


def _start(config: dict[str, object]) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.identity.storm_client", json.dumps(config)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


async def test_two_processes_make_one_request_per_expiry(
    identity_settings: Settings,
    broker: TokenBroker,
    connection: Connection,
    idp: IdentityProvider,
) -> None:
    idp.set_latency(0.05, endpoint="token")  # widen the race window
    settings = identity_settings.model_dump(mode="json")
    for name in ("redis_url", "amqp_url", "secret_keys", "client_secret"):
        settings[name] = getattr(identity_settings, name).get_secret_value()
    config = {
        "settings": settings,
        "connection": connection.model_dump_json(),
        "calls": CALLS_PER_PROCESS,
    }
    processes = [_start(config) for _ in range(PROCESSES)]
    try:
        for round_number in (1, 2, 3):
            await expire_access_token(broker, connection)
            idp.reset_counters()
            for process in processes:
                assert process.stdin is not None
                process.stdin.write("go\n")
                process.stdin.flush()
            replies = [json.loads(p.stdout.readline()) for p in processes if p.stdout]
            assert [r["errors"] for r in replies] == [[]] * PROCESSES, round_number
            digests = {digest for reply in replies for digest in reply["digests"]}
            assert len(digests) == 1, round_number  # every run got the same, new token
            assert idp.counters()["token"] == 1, round_number
    finally:
        for process in processes:
            if process.stdin:
                process.stdin.write("exit\n")
                process.stdin.close()
        for process in processes:
            process.wait(timeout=30)
            if process.stdout:
                process.stdout.close()
