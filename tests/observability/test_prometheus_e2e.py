"""The observability acceptance test: a real Prometheus scraping real processes.

Two dispatcher replicas and two machine workers run as processes (each serving ``/metrics`` on
its own free port, passed with ``--metrics-port``) against the real RabbitMQ and Redis, with the
local identity provider (``devtools.idp``) for sign-in connections. Debian's
``prometheus`` scrapes all four every second and evaluates the shipped alert rules
(``dashboards/alerts.rules.yml``, unchanged) every second. The runs are real:

- unattended successes and flows that fail (simulate executor, ``outcome=failed``), in two waves
  a few scrapes apart, so that every ``rate()`` window of the dashboards sees an increase;
- rejections at admission: ``ConnectionAccessDenied`` and ``ConnectionNotFound``;
- a queue time-out: an attended run nobody is logged in for, with ``queue_timeout_s=3``;
- dead letters: bodies that are not JSON and not an object, published to ``<ns>.requests``;
- sign-in runs: bob's (a real token refresh at the local identity provider at each dispatch:
  it answers with ``refresh_in`` 1 s), dave's (his grant is revoked: the refresh fails
  permanently and the run fails ``PasswordlessTokenExpiry``), and carol's, which waits (no session
  of hers on the machine) and is what the sign-in age panel shows;
- runs that keep waiting, so that queue depth, oldest age and why-waiting have values.

Then: every query of every dashboard panel (and of the dashboard variables) parses and returns
at least one series, histogram quantiles a finite value, and the "last hour" tables count every
outcome and rejection exactly (the first of a series too); every metric name the dashboards and
rules use is present in this Prometheus, scraped from the processes; the queue time-out alert
``RunsTimingOutInQueue`` fires (it has no ``for:``, so the shipped rule is used as it is), and so
do ``TokenRefreshFailures`` and ``DeadLettersRising``; both replicas export the same queue
gauges (read from Redis); ``promtool check metrics`` accepts each process's ``/metrics``.

What no short test can show: ``QueueDeadlineNear`` (a deadline under 15 minutes) and
``QueueBacklogGrowing`` (15 minutes of growth) need real time to pass; their panels have data
here (the waiting runs' deadlines, the queue depth), and ``dashboards/tests/alerts_test.yml``
proves the rules themselves with promtool. ``RunsPredictedToTimeOut`` firing before a real
time-out is ``test_foresight_alert.py``.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from prometheus_client import CollectorRegistry

from devtools.idp import IdentityProvider
from dispatcher.adapters.identity.sign_in import import_refresh_token
from dispatcher.adapters.identity.token_broker import TokenBroker
from dispatcher.client import Client
from dispatcher.core.principals import admin_user_of
from dispatcher.crypto import SecretBox
from dispatcher.metrics import DispatcherMetrics, QueueStateSnapshot
from dispatcher.models import Connection, ConnectionKind, RunStatus, Target
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.builders import (
    fleet_document,
)
from tests.support.constants import CLIENT_ID, CLIENT_SECRET, OWNER, TENANT
from tests.support.processes import (
    Processes,
    new_settings,
)
from tests.support.promserver import (
    DISPATCHER_JOB,
    GRAFANA_VARIABLES,
    WORKER_JOB,
    PromServer,
    dashboard_queries,
    free_port,
    prometheus_binary,
    prometheus_server,
)

from .test_rules import alert_rules, metric_names, require, variable_queries

BOB, CAROL, DAVE = "bob@contoso.com", "carol@contoso.com", "dave@contoso.com"
PROMETHEUS_SERIES = frozenset({"up"})  # made by Prometheus, not by the code


def sign_in(connection_id: str, account: str) -> dict[str, Any]:
    return {
        "connection_id": connection_id,
        "owner": account,
        "kind": "sign_in",
        "target": {"machine_id": "m2"},
        "account": account,
        "tenant_id": TENANT,
    }


def observed_fleet() -> dict[str, Any]:
    """Group finance: m1 and m2 run workers, m3 never comes online, m4 is in maintenance."""
    return fleet_document(
        groups=[{"group_id": "finance", "name": "Finance bots"}],
        machines=[
            {"machine_id": "m1", "name": "FIN-01", "group_id": "finance", "max_unattended_runs": 2},
            {"machine_id": "m2", "name": "FIN-02", "group_id": "finance", "max_unattended_runs": 2},
            {"machine_id": "m3", "name": "FIN-03", "group_id": "finance"},
            {"machine_id": "m4", "name": "FIN-04", "group_id": "finance", "maintenance": True},
        ],
        connections=[
            {
                "connection_id": "c1",
                "owner": OWNER,
                "kind": "credentials",
                "target": {"group_id": "finance"},
                "username": "CONTOSO\\svc-fin",
                "password": "s3cret-pw",
            },
            {  # for attended runs: nobody is logged in as the clerk on any machine
                "connection_id": "c2",
                "owner": OWNER,
                "kind": "credentials",
                "target": {"group_id": "finance"},
                "username": "CONTOSO\\clerk",
                "password": "s3cret-pw",
            },
            sign_in("s-bob", BOB),
            sign_in("s-carol", CAROL),
            sign_in("s-dave", DAVE),
        ],
    )


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[IdentityProvider]:
    # refresh_in: every cached access token is due for refresh one second after it was issued,
    # so each sign-in dispatch below makes a real refresh at the identity provider.
    with IdentityProvider(
        cert_dir=tmp_path / "certs",
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        refresh_in_s=1,
    ) as provider:
        yield provider


@pytest.fixture
def settings(idp: IdentityProvider) -> Settings:
    """The conftest's settings, plus the local identity provider for sign-in connections."""
    return new_settings(
        authority_host=idp.url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        idp_ca_file=idp.ca_file,
    )


async def sign_in_accounts(settings: Settings, client: Client, idp: IdentityProvider) -> None:
    """What ``connections sign-in`` does, with refresh tokens minted by the identity provider;
    then dave's grant is revoked, as an administrator would."""
    broker = TokenBroker(
        settings, client.rt.redis, client.rt.names, SecretBox.from_settings(settings)
    )
    try:
        for connection_id, account in (("s-bob", BOB), ("s-dave", DAVE)):
            connection = Connection(
                connection_id=connection_id,
                owner=account,
                kind=ConnectionKind.sign_in,
                target=Target(machine_id="m2"),
                account=account,
                tenant_id=TENANT,
            )
            refresh_token = idp.mint_refresh_token(TENANT, account, CLIENT_ID)
            await import_refresh_token(broker, connection, refresh_token)
    finally:
        await broker.aclose()
    assert idp.revoke_user(DAVE) == 1


async def publish_garbage(settings: Settings, bodies: list[bytes]) -> None:
    names = Names(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names.requests_exchange)
        for body in bodies:
            await exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    user_id=admin_user_of(settings.amqp_url.get_secret_value()),
                ),
                "submit",
            )


async def wave(client: Client, successes: int) -> dict[str, str]:
    """One wave of runs that end: successes, a failed flow, bob's sign-in run."""
    runs: dict[str, str] = {}
    for i in range(successes):
        runs[f"ok{i}"] = await client.submit(
            connection_id="c1",
            flow_id="invoice",
            requested_by=OWNER,
            mode="unattended",
            inputs={"duration_s": 0.3},
        )
    runs["failed"] = await client.submit(
        connection_id="c1",
        flow_id="invoice",
        requested_by=OWNER,
        mode="unattended",
        inputs={"outcome": "failed", "duration_s": 0.2},
    )
    runs["bob"] = await client.submit(
        connection_id="s-bob", flow_id="report", requested_by=BOB, mode="attended"
    )
    return runs


async def final(client: Client, runs: dict[str, str], timeout: float = 30) -> dict[str, Any]:
    done = await asyncio.gather(*(client.wait(run_id, timeout=timeout) for run_id in runs.values()))
    return dict(zip(runs, done, strict=True))


def distinct_free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago, all different (each process binds its own)."""
    ports: list[int] = []
    while len(ports) < count:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def by_instance(prom: PromServer, expr: str) -> dict[tuple[str, ...], dict[str, float]]:
    """Series of ``expr`` grouped by their labels other than instance: {labels: {instance: v}}."""
    grouped: dict[tuple[str, ...], dict[str, float]] = defaultdict(dict)
    for series in prom.query(expr):
        labels = dict(series["metric"])
        instance = labels.pop("instance")
        labels.pop("job", None)
        labels.pop("__name__", None)
        grouped[tuple(sorted(f"{k}={v}" for k, v in labels.items()))][instance] = float(
            series["value"][1]
        )
    return dict(grouped)


def replicas_agree(prom: PromServer, metric: str, replicas: int) -> dict[tuple[str, ...], float]:
    """The gauge's value per label set if every replica exports it with the same value."""
    grouped = by_instance(prom, f'{metric}{{job="{DISPATCHER_JOB}"}}')
    agreed = {}
    for labels, values in grouped.items():
        if len(values) != replicas or len(set(values.values())) != 1:
            return {}
        agreed[labels] = next(iter(values.values()))
    return agreed


def values(series: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    """{label values: value} of a query's series, values rounded to 3 decimals."""
    return {
        tuple(s["metric"].get(label, "") for label in labels): round(float(s["value"][1]), 3)
        for s in series
    }


def finite(series: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in series)


@pytest.mark.unit
def test_a_replica_exports_the_fleets_time_out_counters_at_zero() -> None:
    # The replica that counts a time-out (it consumed the run's event) may never have admitted a
    # run of that target: the counter must already be exported at 0, or increase() and the
    # RunsTimingOutInQueue alert would not see the time-out.
    registry = CollectorRegistry()
    replica = DispatcherMetrics(registry)
    labels = {("g:finance", "credentials", "attended"), ("m:m2", "sign_in", "attended")}
    replica.set_queue_state(QueueStateSnapshot(now=time.time(), run_labels=frozenset(labels)))
    for target, kind, mode in labels:
        sample = {"target": target, "connection_kind": kind, "mode": mode}
        assert registry.get_sample_value("rundispatch_runs_timed_out_total", sample) == 0.0
    replica.run_completed(
        "g:finance", "credentials", "attended", status="timed_out", code="NoCandidateMachine"
    )
    sample = {"target": "g:finance", "connection_kind": "credentials", "mode": "attended"}
    assert registry.get_sample_value("rundispatch_runs_timed_out_total", sample) == 1.0


@pytest.mark.e2e
@pytest.mark.prometheus
@pytest.mark.timeout(150)
async def test_prometheus_scrapes_real_processes_dashboards_have_data_and_alerts_fire(
    settings: Settings,
    client: Client,
    procs: Processes,
    apply_fleet: Any,
    idp: IdentityProvider,
) -> None:
    require(prometheus_binary(), "prometheus")
    promtool = require(shutil.which("promtool"), "promtool")
    began = time.monotonic()
    apply_fleet(observed_fleet())
    await sign_in_accounts(settings, client, idp)

    *dispatcher_ports, m1_port, m2_port = distinct_free_ports(4)
    worker_ports = {"m1": m1_port, "m2": m2_port}
    for index, port in enumerate(dispatcher_ports):
        procs.dispatcher(f"dispatcher-{index}", "--metrics-port", str(port))
    procs.worker("m1", extra=["--metrics-port", str(worker_ports["m1"])])
    procs.worker(
        "m2",
        sessions=[{"user": BOB, "state": "active"}, {"user": DAVE, "state": "active"}],
        extra=["--metrics-port", str(worker_ports["m2"])],
    )
    jobs = {
        DISPATCHER_JOB: [f"127.0.0.1:{port}" for port in dispatcher_ports],
        WORKER_JOB: [f"127.0.0.1:{port}" for port in worker_ports.values()],
    }
    with prometheus_server(jobs) as prom:
        try:
            await exercise_and_check(
                prom, promtool, client, settings, dispatcher_ports, worker_ports
            )
        except BaseException:
            for name in procs.procs:
                print(f"---- {name}\n{procs.log_text(name)[-3000:]}")
            print(f"---- prometheus\n{prom.log_tail()}")
            raise
    print(f"observability e2e took {time.monotonic() - began:.1f} s")


async def exercise_and_check(
    prom: PromServer,
    promtool: str,
    client: Client,
    settings: Settings,
    dispatcher_ports: list[int],
    worker_ports: dict[str, int],
) -> None:
    await asyncio.to_thread(prom.wait_for_targets_up, 30.0)
    scraped_since = time.monotonic()
    # Both replicas have read the fleet: the time-out counters exist at 0 everywhere before a
    # run times out (whichever replica ends up counting it).
    await asyncio.to_thread(
        prom.wait_for,
        lambda: (
            prom.value(
                'count(count by (instance) (rundispatch_runs_timed_out_total{target="g:finance",'
                'connection_kind="credentials",mode="attended"} == 0))'
            )
            == len(dispatcher_ports)
        ),
        20.0,
        what="time-out counters at 0 on both replicas",
    )

    # ---- wave 1, and the runs that do not end by themselves ----------------------------------
    waiting = {
        "attended": await client.submit(
            connection_id="c2", flow_id="close-books", requested_by=OWNER, mode="attended"
        ),
        "carol": await client.submit(
            connection_id="s-carol", flow_id="report", requested_by=CAROL, mode="attended"
        ),
    }
    ending = await wave(client, successes=6)
    ending["timeout"] = await client.submit(
        connection_id="c2",
        flow_id="close-books",
        requested_by=OWNER,
        mode="attended",
        queue_timeout_s=3,
    )
    ending["dave"] = await client.submit(
        connection_id="s-dave", flow_id="report", requested_by=DAVE, mode="attended"
    )
    ending["denied"] = await client.submit(
        connection_id="c1", flow_id="invoice", requested_by="mallory@contoso.com", mode="unattended"
    )
    ending["unknown"] = await client.submit(
        connection_id="nope", flow_id="invoice", requested_by=OWNER, mode="unattended"
    )
    await publish_garbage(settings, [b"\x00\xffgarbage\x13", b"[1, 2, 3]"])
    first = await final(client, ending)
    status = {name: run.status for name, run in first.items()}
    assert status == {
        **{f"ok{i}": RunStatus.succeeded for i in range(6)},
        "failed": RunStatus.failed,
        "bob": RunStatus.succeeded,
        "timeout": RunStatus.timed_out,
        "dave": RunStatus.failed,
        "denied": RunStatus.rejected,
        "unknown": RunStatus.rejected,
    }, {name: (run.status, run.error) for name, run in first.items()}
    codes = {name: run.error.code.value for name, run in first.items() if run.error}
    assert codes == {
        "failed": "FlowFailed",
        "timeout": "NoCandidateMachine",
        "dave": "PasswordlessTokenExpiry",
        "denied": "ConnectionAccessDenied",
        "unknown": "ConnectionNotFound",
    }

    # ---- wave 2, a few scrapes later: rate() windows see the counters and histograms grow -----
    await asyncio.sleep(3)
    second = await final(client, await wave(client, successes=6))
    assert {run.status for name, run in second.items() if name != "failed"} == {RunStatus.succeeded}
    assert second["failed"].status is RunStatus.failed
    for run in await asyncio.gather(*(client.get(r) for r in waiting.values())):
        assert run.status is RunStatus.queued
    settled = time.time()  # from now on, Redis holds exactly the two waiting runs

    # Prometheus has scraped the end state: every final status counted once over both replicas
    # (terminal events are consumed by one replica each), every execution by the workers.
    completed = len(first) - 2 + len(second)  # rejections are no completions
    executed = 2 * 8  # per wave: 6 successes, the failed flow, bob's run
    await asyncio.to_thread(
        prom.wait_for,
        lambda: (
            prom.value("sum(rundispatch_runs_completed_total)") == completed
            and prom.value("sum(rundispatch_worker_runs_total)") == executed
        ),
        20.0,
        what="every completion and execution scraped",
    )
    assert prom.value('sum(rundispatch_runs_completed_total{status="timed_out"})') == 1
    assert prom.value("sum(rundispatch_runs_timed_out_total)") == 1
    assert prom.value('sum(rundispatch_runs_rejected_total{code="ConnectionAccessDenied"})') == 1
    unknown_connection = 'code="ConnectionNotFound",target="none",connection_kind="none"'
    assert prom.value(f"sum(rundispatch_runs_rejected_total{{{unknown_connection}}})") == 1
    assert prom.value("sum(rundispatch_dead_letters_total)") == 2
    assert (prom.value('sum(rundispatch_token_refreshes_total{result="success"})') or 0) >= 2
    assert prom.value('sum(rundispatch_token_refreshes_total{result="permanent_failure"})') == 1

    # ---- alerts --------------------------------------------------------------------------------
    # RunsTimingOutInQueue has no `for:`: the shipped rule fires as soon as it sees the time-out.
    alerts = await asyncio.to_thread(
        prom.wait_for,
        lambda: prom.firing("RunsTimingOutInQueue"),
        20.0,
        what="RunsTimingOutInQueue firing",
    )
    assert [alert["labels"]["target"] for alert in alerts] == ["g:finance"]
    refresh_alerts = prom.firing("TokenRefreshFailures")
    assert [alert["labels"]["result"] for alert in refresh_alerts] == ["permanent_failure"]
    dead_alerts = prom.firing("DeadLettersRising")
    assert {alert["labels"]["reason"] for alert in dead_alerts} == {"encoding", "not_an_object"}
    assert not prom.firing("DispatcherDown")
    assert not prom.firing("NoMachineOnlineForQueuedRuns")
    unhealthy = [rule for rule in prom.rules() if rule["health"] != "ok"]
    assert not unhealthy

    # ---- several replicas: queue gauges come from Redis, so both export the same values --------
    await asyncio.to_thread(
        prom.wait_for,
        lambda: (
            prom.value(f"count(rundispatch_queue_state_timestamp_seconds > {settled})")
            == len(dispatcher_ports)
        ),
        15.0,
        what="both replicas scraped with a queue state read after the runs settled",
    )
    depth = replicas_agree(prom, "rundispatch_queued_runs", len(dispatcher_ports))
    assert depth == {
        ("priority=high", "target=g:finance"): 0,
        ("priority=normal", "target=g:finance"): 1,  # the attended run nobody can take
        ("priority=high", "target=m:m2"): 0,
        ("priority=normal", "target=m:m2"): 1,  # carol's sign-in run
    }
    waiting_reasons = replicas_agree(prom, "rundispatch_queue_waiting_runs", len(dispatcher_ports))
    assert waiting_reasons == {
        ("reason=AttendedUserNotLoggedIn", "target=g:finance"): 1,
        ("reason=NoSessionFoundForPasswordless", "target=m:m2"): 1,
    }
    machines = replicas_agree(prom, "rundispatch_machines", len(dispatcher_ports))
    assert machines == {
        ("group=finance", "state=maintenance"): 1,
        ("group=finance", "state=offline"): 1,
        ("group=finance", "state=online"): 2,
    }

    # ---- every panel query parses and has data -------------------------------------------------
    # The rate() windows reach back to the first scrape, as an operator looking at the whole
    # exercise would set them: tokens are refreshed early (sign-in, then once per token), and on
    # a loaded machine the waves take longer than Grafana's default window of a minute.
    window_s = math.ceil(time.monotonic() - scraped_since) + 60
    empty, no_value, errors = [], [], []
    panels: dict[str, list[dict[str, Any]]] = {}
    for query in dashboard_queries(values={**GRAFANA_VARIABLES, "__rate_interval": f"{window_s}s"}):
        where = f"{query.dashboard} panel {query.panel_id} {query.panel!r} {query.ref_id}"
        try:
            series = panels[query.panel] = prom.query(query.expr)
        except Exception as exc:
            errors.append(f"{where}: {exc}")
            continue
        if not series:
            empty.append(where)
        elif "histogram_quantile" in query.expr and not finite(series):
            no_value.append(f"{where}: {series}")
    for expr in variable_queries():
        if not prom.query(expr):
            empty.append(f"variable {expr}")
    assert not errors
    assert not empty, "queries without any series"
    assert not no_value, "quantiles without a finite value"
    # The "last hour" tables count every run, also the first one a replica counted in a series.
    assert values(panels["Rejections by code, last hour"], "code") == {
        ("ConnectionAccessDenied",): 1,
        ("ConnectionNotFound",): 1,
    }
    assert values(panels["Outcomes by code, last hour"], "status", "code") == {
        ("succeeded", "none"): 14,
        ("failed", "FlowFailed"): 2,
        ("failed", "PasswordlessTokenExpiry"): 1,
        ("timed_out", "NoCandidateMachine"): 1,
    }

    # ---- every metric name the dashboards and rules use is exported by the processes -----------
    used: set[str] = set()
    for rule in alert_rules():
        used |= metric_names(rule["expr"])
    for query in dashboard_queries():
        used |= metric_names(query.expr)
    for expr in variable_queries():
        used |= metric_names(expr)
    scraped = set(prom.api("label/__name__/values"))
    assert used - PROMETHEUS_SERIES - scraped == set()

    # ---- promtool's linter accepts each process's real exposition ------------------------------
    for port in [*dispatcher_ports, *worker_ports.values()]:
        text = await asyncio.to_thread(scrape, port)
        assert "rundispatch_" in text
        result = await asyncio.to_thread(
            subprocess.run,
            [promtool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0 and not result.stdout.strip(), (
            f"port {port}:\n{result.stdout}{result.stderr}"
        )
