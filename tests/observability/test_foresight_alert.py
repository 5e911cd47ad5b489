"""``RunsPredictedToTimeOut`` fires, on a real Prometheus scraping a real dispatcher, before the
first run of a saturated target actually times out.

One machine, one account (one run at a time), a flow of 3 s with some history; then six runs
with a 10 s queue limit at once: four can start in time, the last two cannot. The dispatcher's
forecast chore counts them in ``rundispatch_queue_predicted_timeouts`` within a second or two;
the shipped rule is loaded with its ``for: 5m`` shortened to ``for: 2s`` (the only change: a
test cannot wait five minutes, and the promtool tests in ``dashboards/tests`` check the rule
with its real duration). The first actual time-out comes at 10 s.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from dispatcher.client import Client
from dispatcher.models import RunStatus
from tests.support.builders import fleet_document
from tests.support.constants import OWNER
from tests.support.e2e import in_status
from tests.support.processes import Processes
from tests.support.promserver import (
    ALERT_RULES,
    DISPATCHER_JOB,
    free_port,
    prometheus_binary,
    prometheus_server,
)

from .test_rules import require

pytestmark = [pytest.mark.e2e, pytest.mark.prometheus, pytest.mark.timeout(180)]

ALERT = "RunsPredictedToTimeOut"


def rules_with_short_for(tmp_path: Path) -> Path:
    document = yaml.safe_load(ALERT_RULES.read_text())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    (rule,) = [rule for rule in rules if rule.get("alert") == ALERT]
    assert rule["for"] == "5m"
    rule["for"] = "2s"
    path = tmp_path / "alerts.rules.yml"
    path.write_text(yaml.safe_dump(document))
    return path


def one_slot_fleet() -> dict[str, Any]:
    return fleet_document(
        groups=[{"group_id": "ops", "name": "Ops bots"}],
        machines=[
            {"machine_id": "m1", "name": "OPS-01", "group_id": "ops", "os": "windows_server",
             "max_unattended_runs": 1},
        ],
        connections=[
            {"connection_id": "c1", "owner": OWNER, "kind": "credentials",
             "target": {"group_id": "ops"}, "username": "CONTOSO\\svc-ops",
             "password": "s3cret-pw"},
        ],
    )  # fmt: skip


async def slow_run(client: Client, **extra: Any) -> str:
    return await client.submit(
        connection_id="c1", flow_id="slow", requested_by=OWNER, mode="unattended",
        inputs={"duration_s": 3.0}, **extra,
    )  # fmt: skip


async def test_predicted_time_out_alert_fires_before_the_first_time_out(
    client: Client, procs: Processes, apply_fleet: Any, tmp_path: Path
) -> None:
    require(prometheus_binary(), "prometheus")
    apply_fleet(one_slot_fleet())
    port = free_port()
    procs.dispatcher("dispatcher", "--metrics-port", str(port))
    procs.worker("m1")
    history = [await slow_run(client) for _ in range(3)]
    for run_id in history:
        assert (await client.wait(run_id, timeout=30)).status is RunStatus.succeeded
    rules = rules_with_short_for(tmp_path)
    with prometheus_server({DISPATCHER_JOB: [f"127.0.0.1:{port}"]}, rule_files=[rules]) as prom:
        await asyncio.to_thread(prom.wait_for_targets_up, 30.0)
        assert not prom.firing(ALERT)
        run_ids = [await slow_run(client, queue_timeout_s=10) for _ in range(6)]
        await in_status(client, run_ids[0], RunStatus.running)

        def fired() -> bool:
            return bool(prom.firing(ALERT))

        await asyncio.to_thread(prom.wait_for, fired, 10.0, 0.1, f"{ALERT} firing")
        fired_at = time.time()
        (alert,) = prom.firing(ALERT)
        assert alert["labels"]["target"] == "g:ops"
        assert alert["labels"]["severity"] == "critical"
        runs = [await client.wait(run_id, timeout=60) for run_id in run_ids]
    timed_out = [run for run in runs if run.status is RunStatus.timed_out]
    assert len(timed_out) >= 1, [run.status for run in runs]
    first_time_out = min(run.finished_at or 0.0 for run in timed_out)
    print(f"\n{ALERT} fired {first_time_out - fired_at:.1f} s before the first time-out")
    assert fired_at < first_time_out
