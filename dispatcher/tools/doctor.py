"""``python -m dispatcher doctor``: check a deployment and say what to fix.

Each check answers ``ok``, ``warn`` (works, but not as recommended) or ``FAIL`` (runs would be
lost, duplicated or stuck), with the fix. The exit code is 1 when anything failed.

    versions ─ Redis: reachable, AOF, noeviction, clock skew ─ RabbitMQ: reachable, topology,
    dead letters, files for queues, the replicas consuming ─ identities: the secret keys, the
    broker user
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Literal
from urllib.parse import urlsplit

from dispatcher import __version__
from dispatcher.adapters.amqp.cluster import split_urls
from dispatcher.adapters.amqp.consumers import QueueConsumer, read_consumers
from dispatcher.adapters.amqp.identities import vhost_of
from dispatcher.adapters.amqp.inspect import inspect_namespace
from dispatcher.adapters.amqp.node_files import NodeFiles, files_per_machine, read_node_files
from dispatcher.adapters.amqp.topology import consumed_queues
from dispatcher.adapters.redis.connection import UNREACHABLE as REDIS_UNREACHABLE
from dispatcher.adapters.redis.connection import make_redis
from dispatcher.errors import BrokerUnavailable, ConfigurationError, DispatchError
from dispatcher.names import Names
from dispatcher.settings import Settings

Status = Literal["ok", "warn", "FAIL", "skip"]

MIN_REDIS = (6, 2)
MIN_RABBITMQ = (3, 10)
# Deadlines and heartbeats compare this host's clock with the others' (through Redis).
SKEW_WARN_S = 0.5
SKEW_FAIL_S = 2.0
TIMEOUT_S = 5.0
# Share of RabbitMQ's files for queues in use (adapters/amqp/node_files.py): past the budget
# the node stops confirming publishes, so this warns early.
FILES_WARN = 0.7
FILES_FAIL = 0.9
REDIS_DOWN: tuple[type[BaseException], ...] = (*REDIS_UNREACHABLE, TimeoutError)


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _where(url: str) -> str:
    """Host and port of a service URL, without its credentials."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


async def check_redis(settings: Settings) -> list[Check]:
    url = settings.redis_url.get_secret_value()
    redis = make_redis(settings)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            info = await redis.info()
            before = time.time()
            seconds, micros = await redis.time()
            after = time.time()
    except REDIS_DOWN as exc:
        return [
            Check(
                "redis",
                "FAIL",
                f"cannot reach Redis at {_where(url)}: {type(exc).__name__}",
                "start Redis or correct RUNDISPATCH_REDIS_URL",
            )
        ]
    finally:
        await redis.aclose()
    checks = []
    version = str(info.get("redis_version", "?"))
    checks.append(
        Check("redis.version", "ok", f"Redis {version}")
        if _version(version) >= MIN_REDIS
        else Check(
            "redis.version",
            "FAIL",
            f"Redis {version}",
            f"upgrade Redis to {'.'.join(map(str, MIN_REDIS))} or later",
        )
    )
    aof = str(info.get("aof_enabled", "0")) == "1"
    checks.append(
        Check("redis.aof", "ok", "append-only file on")
        if aof
        else Check(
            "redis.aof",
            "FAIL",
            "append-only file off: a Redis restart loses accepted runs",
            "set 'appendonly yes' and 'appendfsync everysec' (deploy/redis/redis.conf)",
        )
    )
    policy = str(info.get("maxmemory_policy", "?"))
    checks.append(
        Check("redis.eviction", "ok", "maxmemory-policy noeviction")
        if policy == "noeviction"
        else Check(
            "redis.eviction",
            "FAIL",
            f"maxmemory-policy {policy}: Redis may evict run records under memory pressure",
            "set 'maxmemory-policy noeviction' (deploy/redis/redis.conf)",
        )
    )
    skew = seconds + micros / 1e6 - (before + after) / 2
    fix = "synchronise this host's clock (NTP / w32time)"
    if abs(skew) >= SKEW_FAIL_S:
        checks.append(Check("clock", "FAIL", f"this host is {-skew:+.3f} s off Redis's clock", fix))
    elif abs(skew) >= SKEW_WARN_S:
        checks.append(Check("clock", "warn", f"this host is {-skew:+.3f} s off Redis's clock", fix))
    else:
        checks.append(Check("clock", "ok", f"{-skew:+.3f} s from Redis's clock"))
    return checks


async def check_rabbitmq(settings: Settings) -> list[Check]:
    url = settings.amqp_url.get_secret_value()
    names = Names(settings.namespace)
    try:
        report = await inspect_namespace(
            url,
            names,
            TIMEOUT_S,
            settings.dead_letter_max,
            cluster=len(split_urls(url)) > 1,
            one_active=settings.active_replicas == "one",
        )
    except BrokerUnavailable as exc:
        return [
            Check(
                "rabbitmq",
                "FAIL",
                f"cannot reach RabbitMQ at {_where(url)}: {exc}",
                "start RabbitMQ or correct RUNDISPATCH_AMQP_URL (user, password, vhost)",
            )
        ]
    version, missing, differing = report.version, report.missing, report.differing
    dead_letters = report.dead_letters
    checks = [
        Check("rabbitmq.version", "ok", f"RabbitMQ {version}")
        if _version(version) >= MIN_RABBITMQ
        else Check(
            "rabbitmq.version",
            "FAIL",
            f"RabbitMQ {version}",
            f"upgrade RabbitMQ to {'.'.join(map(str, MIN_RABBITMQ))} or later",
        )
    ]
    if missing:
        checks.append(
            Check(
                "rabbitmq.topology",
                "FAIL",
                "missing: " + ", ".join(missing),
                "start a dispatcher (it declares them) or import deploy/rabbitmq/definitions.json",
            )
        )
    if differing:
        # Used as they are (an operator's own definitions); policies may do what the
        # arguments would.
        checks.append(
            Check(
                "rabbitmq.topology",
                "warn",
                "declared with other arguments: " + ", ".join(differing),
                "make sure policies set the delivery limit and dead-lettering, or import the "
                "generated definitions (python -m dispatcher definitions); after a change of "
                "RUNDISPATCH_ACTIVE_REPLICAS see docs/operations.md, 'Replicas'",
            )
        )
    if not missing and not differing:
        checks.append(Check("rabbitmq.topology", "ok", f"namespace {names.ns} as expected"))
    if dead_letters:
        bound = settings.dead_letter_max
        # Past its bound the queue drops its oldest dead letters: say so before it does.
        near = dead_letters >= 0.9 * bound
        checks.append(
            Check(
                "rabbitmq.dead_letters",
                "FAIL" if near else "warn",
                f"{dead_letters} messages in {names.dead_queue}"
                + (f", {dead_letters / bound:.0%} of its bound of {bound}" if near else ""),
                "read them (header x-rundispatch-reason) and see docs/operations.md runbooks"
                + ("; then drain the queue: past the bound the oldest are dropped" if near else ""),
            )
        )
    return checks


async def check_rabbitmq_files(settings: Settings) -> list[Check]:
    admin = settings.broker_admin_url.get_secret_value()
    if not admin:
        return [Check("rabbitmq.files", "skip", "RUNDISPATCH_BROKER_ADMIN_URL is not set")]
    try:
        files = await read_node_files(admin, TIMEOUT_S)
    except (BrokerUnavailable, ConfigurationError) as exc:
        return [
            Check(
                "rabbitmq.files",
                "warn",
                f"cannot read the nodes' open-file limit: {exc}",
                "enable the rabbitmq_management plugin and set RUNDISPATCH_BROKER_ADMIN_URL",
            )
        ]
    cluster = len(split_urls(settings.amqp_url.get_secret_value())) > 1
    per_machine = files_per_machine(settings.machine_queue_type, cluster)
    return [files_check(files, per_machine, settings.machine_queue_type)]


async def check_replicas(settings: Settings) -> list[Check]:
    """Which replicas consume the shared queues; with ``active_replicas=one``, which one
    RabbitMQ delivers to and which stand by."""
    admin = settings.broker_admin_url.get_secret_value()
    if not admin:
        return [Check("rabbitmq.replicas", "skip", "RUNDISPATCH_BROKER_ADMIN_URL is not set")]
    names = Names(settings.namespace)
    queues = consumed_queues(names)
    try:
        consumers = await read_consumers(
            admin, vhost_of(settings.amqp_url.get_secret_value()), queues, TIMEOUT_S
        )
    except (BrokerUnavailable, ConfigurationError) as exc:
        return [Check("rabbitmq.replicas", "warn", f"cannot read the queues' consumers: {exc}")]
    return [replicas_check(consumers, settings.active_replicas)]


def replicas_check(consumers: dict[str, list[QueueConsumer]], active_replicas: str) -> Check:
    idle = [queue for queue, of_queue in consumers.items() if not of_queue]
    if idle:
        return Check(
            "rabbitmq.replicas",
            "warn",
            "no replica consumes " + ", ".join(idle),
            "start a dispatcher (python -m dispatcher serve); runs wait until one consumes",
        )
    replicas = sorted({c.connection for of_queue in consumers.values() for c in of_queue})
    if active_replicas != "one":
        return Check("rabbitmq.replicas", "ok", f"{len(replicas)} consuming: {', '.join(replicas)}")
    active = {
        queue: sorted(c.connection for c in of_queue if c.active)
        for queue, of_queue in consumers.items()
    }
    leaders = sorted({c for of_queue in active.values() for c in of_queue})
    standing_by = ", ".join(r for r in replicas if r not in leaders) or "none"
    if len(leaders) > 1:
        return Check(
            "rabbitmq.replicas",
            "warn",
            "active per queue: "
            + "; ".join(f"{q} {', '.join(c) or 'none'}" for q, c in active.items())
            + f"; standing by: {standing_by}",
            "RabbitMQ gives each queue to its first consumer, and the queues went to different "
            "replicas (a reconnection): correct, but each replica works; restart all but one",
        )
    detail = f"active: {', '.join(leaders) or 'none'}; standing by: {standing_by}"
    if standing_by == "none":
        return Check(
            "rabbitmq.replicas",
            "warn",
            detail,
            "start a second replica: with active_replicas=one it takes over the queues when "
            "the active one's connection closes",
        )
    return Check("rabbitmq.replicas", "ok", detail)


def files_check(files: NodeFiles, per_machine: int, machine_queue_type: str) -> Check:
    """How full RabbitMQ's budget of files for queues is, and how many machines it has room
    for (``per_machine`` files each)."""
    used = files.needed / files.budget if files.budget else 1.0
    status: Status = "FAIL" if used >= FILES_FAIL else "warn" if used >= FILES_WARN else "ok"
    detail = (
        f"queues hold up to {files.needed} of the {files.budget} files RabbitMQ keeps for them "
        f"({files.quorum_queues} quorum queues x3, {files.classic_queues} classic x1; "
        f"open-file limit {files.open_file_limit}): room for ~{files.room_for(per_machine)} "
        f"more machines with {machine_queue_type} machine queues"
    )
    fix = (
        "raise RabbitMQ's open-file limit (LimitNOFILE in its systemd unit, or ulimit -n "
        "before rabbitmq-server; 65536 or more), or use classic machine queues "
        "(RUNDISPATCH_MACHINE_QUEUE_TYPE=classic): at the limit the node stops confirming "
        "publishes (docs/operations.md, 'RabbitMQ's open files')"
    )
    return Check("rabbitmq.files", status, detail, fix)


def check_identities(settings: Settings) -> list[Check]:
    checks = []
    try:
        from dispatcher.crypto import SecretBox

        SecretBox.from_settings(settings)
        checks.append(Check("identities.secret_keys", "ok", "secret keys load"))
    except DispatchError as exc:
        checks.append(
            Check("identities.secret_keys", "FAIL", str(exc), "set RUNDISPATCH_SECRET_KEYS")
        )
    admin = getattr(settings, "broker_admin_url", None)
    if admin is None:
        checks.append(
            Check("identities.registry", "skip", "no per-principal identities configured here")
        )
    else:
        value = admin.get_secret_value() if hasattr(admin, "get_secret_value") else str(admin)
        checks.append(
            Check("identities.registry", "ok", f"management API at {_where(value)}")
            if value
            else Check(
                "identities.registry",
                "warn",
                "RUNDISPATCH_BROKER_ADMIN_URL is not set: machines cannot be registered",
                "set it to the RabbitMQ management API URL of an administrator",
            )
        )
    user = urlsplit(settings.amqp_url.get_secret_value()).username or "guest"
    if user == "guest":
        checks.append(
            Check(
                "identities.broker_user",
                "warn",
                "connected to RabbitMQ as 'guest'",
                "give each dispatcher and each machine its own broker user "
                "(docs/operations.md, 'Principals and registration')",
            )
        )
    else:
        checks.append(Check("identities.broker_user", "ok", f"broker user {user!r}"))
    return checks


async def diagnose(settings: Settings) -> list[Check]:
    """Every check, in the order they are shown."""
    checks = [
        Check(
            "versions",
            "ok",
            f"rundispatch {__version__}, Python {sys.version.split()[0]}",
        )
    ]
    steps: list[Callable[[Settings], Awaitable[list[Check]]]] = [
        check_redis,
        check_rabbitmq,
        check_rabbitmq_files,
        check_replicas,
    ]
    for step in steps:
        checks += await step(settings)
    checks += check_identities(settings)
    return checks


def render(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"{check.status:<5} {check.name:<24} {check.detail}")
        if check.fix and check.status != "ok":
            lines.append(f"{'':<5} {'':<24} fix: {check.fix}")
    failed = sum(check.status == "FAIL" for check in checks)
    warned = sum(check.status == "warn" for check in checks)
    lines.append(f"{failed} problems, {warned} warnings")
    return "\n".join(lines)


def as_json(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(check) for check in checks]
