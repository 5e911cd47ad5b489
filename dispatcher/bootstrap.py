"""The composition root: every process builds its parts here, from the settings.

- :func:`runtime`: the connections (Redis, RabbitMQ) and the adapters on top of them, for a
  replica, a worker, the CLI and the Python client;
- :func:`build_dispatcher`: a replica's use cases, wired to the adapters through their ports;
- :func:`serve`: ``python -m dispatcher serve``;
- :func:`identity_sources`, :func:`report_state`, :func:`readiness`: the optional parts of a
  replica (sources of secrets, gauges, the readiness probe);
- :func:`purge_namespace`: delete everything of a namespace (demos, tests, benchmarks).

Nothing else in ``dispatcher`` (but the tools) builds an adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from dispatcher.adapters.amqp import topology
from dispatcher.adapters.amqp.broker import UNREACHABLE as AMQP_UNREACHABLE
from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.adapters.amqp.identities import BrokerIdentities, vhost_of
from dispatcher.adapters.outbox import OutboxPublisher
from dispatcher.adapters.redis.clock import StoreClock
from dispatcher.adapters.redis.connection import UNREACHABLE as REDIS_UNREACHABLE
from dispatcher.adapters.redis.connection import Redis, delete_namespace, make_redis, ping
from dispatcher.adapters.redis.fleet import RedisFleet
from dispatcher.adapters.redis.leases import RedisLeases
from dispatcher.adapters.redis.machines import RedisMachines
from dispatcher.adapters.redis.outbox import RedisOutbox
from dispatcher.adapters.redis.queue_state import RedisQueueState
from dispatcher.adapters.redis.reads import RedisRunReads
from dispatcher.adapters.redis.traces import RedisTraces
from dispatcher.adapters.redis.transitions import RedisTransitions
from dispatcher.crypto import Sealer
from dispatcher.errors import DispatchError, Unavailable
from dispatcher.metrics import DispatcherMetrics, MetricsHooks, NullMetrics
from dispatcher.metrics.health import HealthServer, Readiness, ReadyCheck, serve_health
from dispatcher.names import Names
from dispatcher.process import Stopper, tune_garbage_collector
from dispatcher.retry import Backoff, when_reachable
from dispatcher.settings import Settings
from dispatcher.usecases.cancel import Canceller
from dispatcher.usecases.foresight import Foresight
from dispatcher.usecases.handoff import Handoff
from dispatcher.usecases.intake import Intake
from dispatcher.usecases.lifecycle import Lifecycle
from dispatcher.usecases.placement import Placer
from dispatcher.usecases.ports import PasswordSource, TokenSource
from dispatcher.usecases.reconcile import Reconciler
from dispatcher.usecases.replica import Dispatcher
from dispatcher.usecases.sweeper import Sweeper
from dispatcher.usecases.worker_link import WorkerRequests

log = logging.getLogger(__name__)

# A service (dispatcher, worker) starting while Redis or RabbitMQ restarts waits this long.
STARTUP_WAIT_S = 120.0
CONNECT_BACKOFF = Backoff(first_s=0.2, max_s=2.0)
QUEUE_STATE_INTERVAL_S = 2.0
READY_PING_S = 2.0

Closer = Callable[[], Awaitable[None]]
# What the client libraries raise when Redis or RabbitMQ cannot be reached (for the commands'
# error messages: an operator sees one line, never a traceback).
UNREACHABLE: tuple[type[BaseException], ...] = (Unavailable, *REDIS_UNREACHABLE, *AMQP_UNREACHABLE)


# ---- connections and adapters ---------------------------------------------------------------
@dataclass
class Runtime:
    """Live connections and the adapters on top of them."""

    settings: Settings
    names: Names
    redis: Redis
    amqp: Amqp
    runs: RedisRunReads
    transitions: RedisTransitions
    fleet: RedisFleet
    machines: RedisMachines
    outbox: RedisOutbox
    traces: RedisTraces

    def lifecycle(self, metrics: MetricsHooks | None = None) -> Lifecycle:
        """The run lifecycle over this store, publishing through the outbox."""
        return Lifecycle(self.transitions, OutboxPublisher(self.amqp, self.outbox, metrics))

    def foresight(
        self,
        lifecycle: Lifecycle | None = None,
        leases: RedisLeases | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Foresight:
        """Predictions over this store (with a lifecycle and leases: the forecast chore)."""
        return Foresight(
            settings=self.settings, runs=self.runs, machines=self.machines, fleet=self.fleet,
            traces=self.traces, lifecycle=lifecycle, leases=leases, clock=clock,
        )  # fmt: skip


async def _connect(redis: Redis, broker: Amqp | None, wait_s: float) -> None:
    """Reach Redis (and RabbitMQ); keep trying for ``wait_s`` seconds before giving up."""

    async def once() -> None:
        try:
            await ping(redis)
            if broker is not None:
                await broker.connect()
        except Unavailable:
            if broker is not None:
                await broker.close()
            raise

    await when_reachable(once, wait_s, CONNECT_BACKOFF)


@contextlib.asynccontextmanager
async def runtime(
    settings: Settings, *, amqp: bool = True, wait_s: float = 0.0
) -> AsyncIterator[Runtime]:
    """Connect to Redis (and RabbitMQ unless ``amqp`` is False); close both on exit.

    ``wait_s``: how long to keep trying while they cannot be reached (a service starting
    during a Redis restart waits for it; a CLI command fails at once).
    """
    names, redis = Names(settings.namespace), make_redis(settings)
    broker = Amqp(
        settings.amqp_url.get_secret_value(),
        names,
        prefetch=settings.prefetch,
        hold_s=settings.outage_hold_s,
        machine_queue_type=settings.machine_queue_type,
        dead_letter_max=settings.dead_letter_max,
        one_active=settings.active_replicas == "one",
    )
    try:
        await _connect(redis, broker if amqp else None, wait_s)
        yield Runtime(
            settings=settings,
            names=names,
            redis=redis,
            amqp=broker,
            runs=RedisRunReads(redis, names),
            transitions=RedisTransitions(redis, names, settings.retention_s),
            fleet=RedisFleet(redis, names),
            machines=RedisMachines(redis, names),
            outbox=RedisOutbox(redis, names),
            traces=RedisTraces(
                redis,
                names,
                retention_s=settings.trace_retention_s,
                max_records=settings.trace_max_records,
            ),
        )
    finally:
        await broker.close()
        await redis.aclose()


async def purge_namespace(settings: Settings, machine_ids: list[str]) -> int:
    """Delete every Redis key and AMQP queue and exchange of the namespace (demos, tests,
    benchmarks). Returns how many Redis keys were deleted."""
    names = Names(settings.namespace)
    redis = make_redis(settings)
    try:
        deleted = await delete_namespace(redis, names)
    finally:
        await redis.aclose()
    await topology.delete_namespace(settings.amqp_url.get_secret_value(), names, machine_ids)
    with contextlib.suppress(DispatchError):  # no management API: no identities to remove
        admin_url = settings.broker_admin_url.get_secret_value()
        vhost = vhost_of(settings.amqp_url.get_secret_value())
        async with BrokerIdentities(admin_url, vhost) as identities:
            await identities.delete_namespace(names)
    return deleted


# ---- a dispatcher replica -------------------------------------------------------------------
def build_dispatcher(
    settings: Settings,
    rt: Runtime,
    *,
    metrics: MetricsHooks | None = None,
    tokens: TokenSource | None = None,
    passwords: PasswordSource | None = None,
    clock: Callable[[], float] = time.time,
    replica_id: str | None = None,
) -> Dispatcher:
    """A replica's use cases, each given its collaborators through the ports."""
    metrics = metrics or NullMetrics()
    replica_id = replica_id or uuid.uuid4().hex[:12]
    lifecycle = rt.lifecycle(metrics)
    handoff = Handoff(
        tokens=tokens,
        passwords=passwords,
        seal=Sealer(),
        token_validity_s=settings.token_validity_s,
    )
    placer = Placer(
        settings=settings,
        fleet=rt.fleet,
        runs=rt.runs,
        machines=rt.machines,
        lifecycle=lifecycle,
        handoff=handoff,
        metrics=metrics,
        clock=clock,
    )
    canceller = Canceller(runs=rt.runs, lifecycle=lifecycle, clock=clock)
    leases = RedisLeases(rt.redis, rt.names, replica_id)
    foresight = rt.foresight(lifecycle, leases, clock)
    return Dispatcher(
        settings=settings,
        names=rt.names,
        broker=rt.amqp,
        runs=rt.runs,
        fleet=rt.fleet,
        machines=rt.machines,
        lifecycle=lifecycle,
        intake=Intake(
            settings=settings,
            fleet=rt.fleet,
            lifecycle=lifecycle,
            canceller=canceller,
            placer=placer,
            metrics=metrics,
            tokens=tokens,
            clock=clock,
        ),
        placer=placer,
        sweeper=Sweeper(
            settings=settings,
            runs=rt.runs,
            machines=rt.machines,
            lifecycle=lifecycle,
            placer=placer,
            leases=leases,
            clock=clock,
            foresight=foresight,
        ),
        foresight=foresight,
        reconciler=Reconciler(settings=settings, runs=rt.runs, lifecycle=lifecycle, clock=clock),
        metrics=metrics,
        replica_id=replica_id,
        worker_requests=WorkerRequests(
            settings=settings,
            broker=rt.amqp,
            lifecycle=lifecycle,
            runs=rt.runs,
            machines=rt.machines,
            metrics=metrics,
            clock=clock,
        ),
        clock=clock,
    )


async def serve(settings: Settings, metrics_port: int | None = None) -> int:
    """``python -m dispatcher serve``: run one replica until SIGTERM/SIGINT, then drain."""
    tune_garbage_collector()
    stopper = Stopper()
    try:
        return await _serve(settings, metrics_port, stopper)
    except asyncio.CancelledError:
        if stopper.stopped_while_starting():
            return 0
        raise


async def _serve(settings: Settings, metrics_port: int | None, stopper: Stopper) -> int:
    port = settings.metrics_port if metrics_port is None else metrics_port
    registry = CollectorRegistry()
    exporter = DispatcherMetrics(registry) if port >= 0 else None
    health = None
    if exporter is not None:
        # Up before connecting: /healthz answers and /readyz says "starting" meanwhile.
        health = serve_health(registry, settings.metrics_host, port, exporter.set_up)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, health.port)
    try:
        await _replica(settings, stopper, exporter, health)
    finally:
        if health is not None:
            health.close()
    return 0


async def _replica(
    settings: Settings,
    stopper: Stopper,
    exporter: DispatcherMetrics | None,
    health: HealthServer | None,
) -> None:
    async with runtime(settings, wait_s=STARTUP_WAIT_S) as rt:
        metrics: MetricsHooks = exporter or NullMetrics()
        if exporter is not None:
            rt.amqp.on_outage = exporter.set_store_outage
        tokens, passwords, closers = identity_sources(settings, rt, metrics)
        clock = StoreClock(rt.redis)
        # Redis may go away again between the connection and here (a restart): wait for it
        # as the connection did, instead of exiting.
        await when_reachable(clock.sync, STARTUP_WAIT_S, CONNECT_BACKOFF)
        clock_task = asyncio.create_task(clock.keep_in_sync(), name="clock")
        dispatcher = build_dispatcher(
            settings, rt, metrics=metrics, tokens=tokens, passwords=passwords, clock=clock
        )
        await dispatcher.start()
        check = readiness(rt, dispatcher.consuming)
        reporter_task: asyncio.Task[None] | None = None
        if health is not None and exporter is not None:
            health.probes.check = check
            reporter_task = asyncio.create_task(report_state(settings, rt, exporter, check))
        await stopper.wait()
        log.info("stopping: draining for up to %g s", settings.drain_s)
        clock_task.cancel()
        if exporter is not None:
            exporter.set_up(False)
        if reporter_task:
            reporter_task.cancel()
        clean = await dispatcher.drain(settings.drain_s)
        log.info("drained%s", "" if clean else " (timed out: the rest is redelivered)")
        for close in closers:
            await close()


def readiness(rt: Runtime, consuming: Callable[[], bool]) -> ReadyCheck:
    """Ready: Redis answers a PING, the RabbitMQ connection is up, the consumers run."""

    async def check() -> Readiness:
        if not rt.amqp.is_connected():
            return Readiness(False, "RabbitMQ is unreachable")
        if not consuming() or not rt.amqp.consuming():
            return Readiness(False, "consumers are not running")
        try:
            async with asyncio.timeout(READY_PING_S):
                await ping(rt.redis)
        except (Unavailable, TimeoutError):
            return Readiness(False, "Redis is unreachable")
        return Readiness(True)

    return check


def identity_sources(
    settings: Settings, rt: Runtime, metrics: MetricsHooks
) -> tuple[TokenSource | None, PasswordSource | None, list[Closer]]:
    """The token broker (when a client is configured) and the credential resolver."""
    if not settings.secret_keys.get_secret_value():
        log.warning("RUNDISPATCH_SECRET_KEYS is not set: runs cannot receive secrets")
        return None, None, []
    from dispatcher.adapters.identity.credentials import CredentialResolver
    from dispatcher.adapters.identity.token_broker import TokenBroker
    from dispatcher.crypto import SecretBox

    box = SecretBox.from_settings(settings)
    passwords = CredentialResolver(settings, box)
    closers: list[Closer] = [passwords.aclose]
    tokens = None
    if settings.client_id:
        tokens = TokenBroker(settings, rt.redis, rt.names, box, on_refresh=metrics.token_refresh)
        closers.append(tokens.aclose)
    else:
        log.info("RUNDISPATCH_CLIENT_ID is not set: sign-in connections cannot get tokens")
    return tokens, passwords, closers


async def report_state(
    settings: Settings, rt: Runtime, metrics: DispatcherMetrics, check: ReadyCheck
) -> None:
    """Every few seconds: the queue and machine gauges, the outbox backlog, and
    ``rundispatch_up`` from the readiness check."""
    state = RedisQueueState(
        rt.redis,
        rt.names,
        rt.fleet,
        rt.machines,
        traces=rt.traces,
        outlook_max_age_s=max(30.0, 10 * settings.forecast_interval_s),
    )
    while True:
        answer = await check()
        metrics.set_up(answer.ready)
        try:
            metrics.set_queue_state(await state.snapshot(settings.offline_after_s))
            metrics.set_outbox_backlog(await state.outbox_length())
        except Exception as exc:
            log.warning("queue state not refreshed: %s", exc)
        await asyncio.sleep(QUEUE_STATE_INTERVAL_S)
