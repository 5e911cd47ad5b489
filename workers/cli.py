"""``python -m workers serve``: run the worker of one machine (its composition root: the
settings, the executor, the link to the dispatcher side, the worker)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from dispatcher.bootstrap import STARTUP_WAIT_S, UNREACHABLE
from dispatcher.crypto import WorkerKeyPair
from dispatcher.errors import ConfigurationError, DispatchError, InExclusiveUse
from dispatcher.logs import bind, configure, scrub
from dispatcher.metrics import NullWorkerMetrics, WorkerHooks
from dispatcher.metrics.health import HealthServer
from dispatcher.names import Names
from dispatcher.process import Stopper
from dispatcher.settings import Settings
from dispatcher.tools.worker_runtime import worker_broker, worker_readiness
from workers.adapters.amqp_link import AmqpLink
from workers.executors import CommandExecutor, Executor, SimulateExecutor
from workers.keyfile import key_file_guard
from workers.ledger import Ledger
from workers.sessions import SessionsFile
from workers.worker import MachineWorker, new_worker_id

log = logging.getLogger(__name__)

# Exit codes: 2 bad settings or files, 3 RabbitMQ unreachable, 4 another worker serves the
# machine (it holds the machine's lease), 130 interrupted.
LEASE_HELD = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m workers",
        description="Machine worker: heartbeats its machine's live state, runs the flows the "
        "dispatcher hands to it, reports the outcome. Settings: RUNDISPATCH_* variables.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("serve", help="serve one machine", description="serve one machine")
    p.add_argument("--machine-id", required=True, help="the machine this worker runs on")
    p.add_argument(
        "--executor",
        choices=["simulate", "command"],
        default="simulate",
        help="simulate: honours inputs duration_s and outcome; command: runs a program",
    )
    p.add_argument(
        "--command",
        default=None,
        help="command executor: the program for every flow (the run as JSON on stdin)",
    )
    p.add_argument(
        "--command-map",
        default=None,
        help="command executor: JSON file {flow_id: command} (overrides --command)",
    )
    p.add_argument(
        "--run-as",
        default=None,
        metavar="USER",
        help="command executor (POSIX): run flows as this user, who cannot read the worker's "
        "key; the worker must be allowed to switch users",
    )
    p.add_argument(
        "--sessions-file",
        type=Path,
        default=None,
        help='JSON [{"user": ..., "state": "active|locked|disconnected"}], re-read '
        "at every heartbeat and as soon as it changes",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="key pair and execution ledger (default ~/.rundispatch/<ns>/<machine>)",
    )
    p.add_argument("--capacity", type=int, default=1, help="reported capacity (informational)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on this port")
    return parser


async def serve(args: argparse.Namespace, settings: Settings) -> int:
    state_dir = (
        args.state_dir or Path.home() / ".rundispatch" / settings.namespace / args.machine_id
    )
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    executor: Executor
    if args.executor == "command":
        if not (args.command or args.command_map):
            print("error: --executor command needs --command or --command-map", file=sys.stderr)
            return 2
        executor = CommandExecutor.from_options(args.command, args.command_map, args.run_as)
    else:
        executor = SimulateExecutor()
    bind(machine_id=args.machine_id)  # every record of this process is about its machine
    # Checked before connecting: a key file others can read stops the worker at once.
    keys = WorkerKeyPair.load_or_create(state_dir / "worker.key", **key_file_guard())
    stopper = Stopper()
    metrics: WorkerHooks = NullWorkerMetrics()
    health = None
    if args.metrics_port is not None:
        from workers.telemetry import start_metrics

        metrics, health = start_metrics(settings, args.metrics_port, args.executor)
    try:
        await _serve(
            args,
            settings,
            stopper=stopper,
            executor=executor,
            keys=keys,
            metrics=metrics,
            health=health,
        )
    except asyncio.CancelledError:
        if not stopper.stopped_while_starting():
            raise
    finally:
        if health is not None:
            health.close()
    return 0


async def _serve(
    args: argparse.Namespace,
    settings: Settings,
    *,
    stopper: Stopper,
    executor: Executor,
    keys: WorkerKeyPair,
    metrics: WorkerHooks,
    health: HealthServer | None,
) -> None:
    state_dir = (
        args.state_dir or Path.home() / ".rundispatch" / settings.namespace / args.machine_id
    )
    # RabbitMQ only: the worker holds no Redis URL; the dispatcher records for it.
    async with worker_broker(settings, wait_s=STARTUP_WAIT_S) as broker:
        worker_id = new_worker_id()
        link = AmqpLink(
            machine_id=args.machine_id,
            worker_id=worker_id,
            names=Names(settings.namespace),
            broker=broker,
            refused_for=broker.exclusive_refused_for,
            lease_wait_s=settings.worker_lease_wait_s,
        )
        worker = MachineWorker(
            settings=settings,
            machine_id=args.machine_id,
            link=link,
            worker_id=worker_id,
            executor=executor,
            keys=keys,
            ledger=Ledger(state_dir / "ledger.jsonl", keep_s=settings.retention_s),
            sessions=SessionsFile(args.sessions_file),
            capacity=args.capacity,
            metrics=metrics,
        )
        await worker.start()
        if health is not None:
            health.probes.check = worker_readiness(broker, worker.consuming)
        stop = asyncio.create_task(stopper.wait(), name="stop-signal")
        lost = asyncio.create_task(link.lease_lost(), name="lease")
        await asyncio.wait((stop, lost), return_when=asyncio.FIRST_COMPLETED)
        lease_lost = lost.done() and not stop.done()
        for task in (stop, lost):
            task.cancel()
        if lease_lost:
            reason = lost.result()
            await worker.give_up(reason)
            worker.ledger.close()
            raise InExclusiveUse(reason)
        log.info("stopping: running flows get up to %g s to finish", settings.worker_grace_s)
        await worker.drain(settings.worker_grace_s, settings.drain_s)
        worker.ledger.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.load()
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    try:
        return asyncio.run(serve(args, settings))
    except KeyboardInterrupt:
        return 130
    except UNREACHABLE as exc:
        print(f"error: cannot reach RabbitMQ: {scrub(str(exc))}", file=sys.stderr)
        return 3
    except InExclusiveUse as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return LEASE_HELD
    except DispatchError as exc:  # a bad key file, settings, command map ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
